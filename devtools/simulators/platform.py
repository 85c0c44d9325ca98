"""County-platform simulator: listens to the agents' uplink on a real MQTT broker, checks every message
against docs/schemas, and keeps what a platform keeps (de-duplicated by seq), so tests can prove nothing
was lost. It reads `data` of both contract versions: version 1, and version 2 (compact, zlib-compressed or not)
with the point maps it keeps from `map/+`; either becomes the same readings.

It publishes only when a test asks it to: a command (`command`) or a signed configuration push (`push_config`,
with a key pair of its own), whose results it keeps.

Given the agents' public keys (`agent_keys`, as a platform registers them), it verifies every `data`, `alarm` and
`quality` message as docs/protocol.md asks: its signature, and its place in the agent's hash chain, whatever the
order of arrival; a message whose own seal fails is not kept, and every break is in the report.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import logging
import queue
import re
import signal
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, NamedTuple

import jsonschema  # type: ignore[import-untyped,unused-ignore]
import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.trust.canonical import NotCanonical, loads_strict
from agent.trust.chain import TOPICS, ChainVerifier, Finding
from agent.trust.keys import TrustedKeys

log = logging.getLogger(__name__)

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"  # docs/schemas, linked so that it ships with the simulator
KINDS = ("data", "alarm", "status", "health", "quality")
# What this platform itself sends to the agents; seen on `{prefix}/#` and let be.
RESERVED_KINDS = frozenset({"config/set"})
MAX_GAPS_LISTED = 100_000
# version 2 (compact): the schema of its data messages and of the point maps on `map/{id}`
COMPACT_SCHEMAS = ("data-v2", "map")
QUALITY_NAMES = ("good", "uncertain", "bad")
REASONS = frozenset({"frozen", "spike", "range_end", "out_of_range", "device_ts", "comm"})
MAX_PAYLOAD = 64 * 1024 * 1024  # what a compressed payload may inflate to at most

Value = float | bool | None
MessageHook = Callable[[str, dict[str, Any]], None]


class PlatformSimulatorError(Exception):
    """The simulator could not start: the broker is unreachable, refused us, or refused the subscription."""


class Reading(NamedTuple):
    """One reading as the platform stores it."""

    enterprise: str
    agent: str
    point: str
    ts: int
    value: Value
    quality: str
    hist: bool
    reason: str | None = None


@dataclass(frozen=True)
class AgentReport:
    """What one agent delivered.

    `messages`, `duplicates` and `hist_messages` count `data` and `alarm` messages as received (duplicates
    included); `readings`, `alarms_raised` and `alarms_cleared` count what was kept after dropping duplicates.
    `gaps` lists seq numbers missing between `seq_min` and `seq_max` (at most MAX_GAPS_LISTED of them);
    `missing` is their exact count.
    """

    enterprise: str
    agent: str
    messages: int
    readings: int
    alarms_raised: int
    alarms_cleared: int
    seq_min: int | None
    seq_max: int | None
    gaps: list[int]
    missing: int
    duplicates: int
    hist_messages: int
    chain: ChainReport | None = None


@dataclass(frozen=True)
class ChainReport:
    """What the verification of one agent's chain found (docs/protocol.md, Tamper-evident messages).

    `verified`: messages whose own seal held and that joined the chain; `kids`: the keys they were signed with
    (empty when the agent's key is not registered: then only the chain is checked); `restarts`: (seq, reason) of
    each declared start of a chain; `breaks`: what failed (a signature, a link, a second content for a seq, a
    fork), `missing`: predecessors named but never received (on their way, dropped or evicted)."""

    verified: int
    kids: frozenset[str]
    restarts: list[tuple[int, str]]
    breaks: list[Finding]
    missing: list[Finding]

    @property
    def intact(self) -> bool:
        return not self.breaks and not self.missing


@dataclass(frozen=True)
class PlatformReport:
    """Per-agent delivery figures, keyed by (enterprise, agent), and the messages the platform rejected."""

    agents: dict[tuple[str, str], AgentReport]
    schema_errors: list[str] = field(default_factory=list)

    def agent(self, agent: str, enterprise: str | None = None) -> AgentReport:
        """The report of one agent, found by its id (and enterprise when the id alone is ambiguous)."""
        found = [r for (e, a), r in self.agents.items() if a == agent and enterprise in (None, e)]
        if len(found) != 1:
            seen = ", ".join(f"{e}/{a}" for e, a in self.agents) or "none"
            raise KeyError(f"{len(found)} agents match {agent!r} (enterprise {enterprise!r}); seen: {seen}")
        return found[0]

    @property
    def has_gaps(self) -> bool:
        return any(r.missing for r in self.agents.values())

    @property
    def chain_breaks(self) -> list[Finding]:
        """Every break and missing link found in the agents' chains (empty when none was verified)."""
        return [f for r in self.agents.values() if r.chain is not None for f in (*r.chain.breaks, *r.chain.missing)]

    def summary(self) -> str:
        """A few human-readable lines, one per agent, then the rejected-message count."""
        lines = []
        for r in self.agents.values():
            gaps = ""
            if r.missing:
                shown = ", ".join(map(str, r.gaps[:10])) + (", …" if r.missing > 10 else "")
                gaps = f" [{shown}]"
            lines.append(
                f"{r.enterprise}/{r.agent}: {r.messages} messages (seq {r.seq_min}..{r.seq_max}, "
                f"{r.hist_messages} hist, {r.duplicates} duplicates, {r.missing} missing{gaps}), "
                f"{r.readings} readings, alarms {r.alarms_raised} raised / {r.alarms_cleared} cleared"
            )
            if r.chain is not None:
                lines.append(_chain_line(r.chain))
        if not self.agents:
            lines.append("no data or alarm messages received")
        lines.append(f"{len(self.schema_errors)} rejected messages")
        return "\n".join(lines)


def _chain_line(chain: ChainReport) -> str:
    signed = f"signed by {', '.join(sorted(chain.kids))}" if chain.kids else "not signature-checked"
    found = [f"seq {f.seq}: {f.kind}" for f in (*chain.breaks, *chain.missing)]
    shown = "; ".join(found[:5]) + ("; …" if len(found) > 5 else "")
    return (f"  chain: {chain.verified} verified, {signed}, {len(chain.restarts)} start(s), "
            f"{len(chain.breaks)} break(s), {len(chain.missing)} missing" + (f" [{shown}]" if found else ""))


@dataclass
class _AgentState:
    seqs: set[int] = field(default_factory=set)
    messages: int = 0
    readings: int = 0
    alarms_raised: int = 0
    alarms_cleared: int = 0
    duplicates: int = 0
    hist_messages: int = 0


_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_ENTERPRISE = re.compile(r"[A-Za-z0-9_\-]+")
_DATA_KEYS = frozenset({"v", "seq", "hist", "agent", "enterprise", "readings"})
_READING_KEYS = frozenset({"point", "ts", "value", "quality"})
_READING_KEYS_WITH_REASON = _READING_KEYS | {"reason"}
_QUALITIES = frozenset({"good", "uncertain", "bad"})
_NUMBER_OR_BOOL = frozenset({int, float, bool})
_MAX_SEQ = 2**53 - 1


class _FastDataCheck:
    """Passes only `data` messages the schema certainly accepts; everything else goes to jsonschema.

    jsonschema needs about 25 ms for a 500-reading message, too slow for 10,000 readings/s; this ~0.3 ms.
    It may be stricter than the schema (then jsonschema decides), never looser: a test checks that.
    """

    def __init__(self) -> None:
        self._names: set[str] = set()  # agent, enterprise and point ids already seen to match their pattern

    def _name_ok(self, name: object, pattern: re.Pattern[str]) -> bool:
        if type(name) is not str:
            return False
        if name in self._names:
            return True
        if len(name) > 64 or pattern.fullmatch(name) is None:
            return False
        if len(self._names) < 100_000:
            self._names.add(name)
        return True

    def __call__(self, msg: dict[str, Any]) -> bool:
        if msg.keys() != _DATA_KEYS and not (msg.keys() - _SEAL_KEYS == _DATA_KEYS and _seal_ok(msg)):
            return False
        v, seq, readings = msg["v"], msg["seq"], msg["readings"]
        if type(v) is not int or v != 1 or type(seq) is not int or not 0 <= seq <= _MAX_SEQ:
            return False
        if type(msg["hist"]) is not bool:
            return False
        if not (self._name_ok(msg["agent"], _ID) and self._name_ok(msg["enterprise"], _ENTERPRISE)):
            return False
        if type(readings) is not list or not 1 <= len(readings) <= 5000:
            return False
        names = self._names
        for r in readings:
            if type(r) is not dict:
                return False
            if r.keys() != _READING_KEYS:
                reason = r.get("reason")
                if r.keys() != _READING_KEYS_WITH_REASON or type(reason) is not str or reason not in REASONS \
                        or r["quality"] == "good":
                    return False
            point, ts, value, quality = r["point"], r["ts"], r["value"], r["quality"]
            if not (type(point) is str and point in names) and not self._name_ok(point, _ID):
                return False
            if type(ts) is not int or ts < 0 or type(quality) is not str or quality not in _QUALITIES:
                return False
            if value is None:
                if quality != "bad":
                    return False
            elif type(value) not in _NUMBER_OR_BOOL:
                return False
        return True


_SEAL_KEYS = frozenset({"chain", "sig"})
_LINK_KEYS = frozenset({"prev_seq", "prev_topic", "prev_hash"})
_HASH_TEXT = re.compile(r"[A-Za-z0-9_-]{42}[AEIMQUYcgkosw048]")
_KID_TEXT = re.compile(r"[0-9a-f]{16}")
_SIGNATURE_TEXT = re.compile(r"[A-Za-z0-9_-]{85}[AQgw]")


def _seal_ok(msg: dict[str, Any]) -> bool:
    """Whether the `chain` and `sig` members a message may carry are what their schemas accept (or stricter)."""
    chain, sig = msg.get("chain"), msg.get("sig")
    if chain is not None:
        if type(chain) is not dict:
            return False
        if chain.keys() == {"start"}:
            if chain["start"] not in ("new", "recovered"):
                return False
        elif chain.keys() != _LINK_KEYS or type(chain["prev_seq"]) is not int \
                or not 0 <= chain["prev_seq"] <= _MAX_SEQ or chain["prev_topic"] not in ("alarm", "data", "quality") \
                or type(chain["prev_hash"]) is not str or not _HASH_TEXT.fullmatch(chain["prev_hash"]):
            return False
    elif "chain" in msg:
        return False
    if "sig" in msg:
        if type(sig) is not dict or sig.keys() != {"alg", "kid", "value"} or sig["alg"] != "ed25519":
            return False
        if type(sig["kid"]) is not str or type(sig["value"]) is not str:
            return False
        return bool(_KID_TEXT.fullmatch(sig["kid"]) and _SIGNATURE_TEXT.fullmatch(sig["value"]))
    return True


def load_validators(schema_dir: Path = SCHEMA_DIR) -> dict[str, jsonschema.protocols.Validator]:
    """One draft 2020-12 validator per message kind, from `{kind}.schema.json`."""
    validators: dict[str, jsonschema.protocols.Validator] = {}
    for kind in KINDS:
        schema = orjson.loads((schema_dir / f"{kind}.schema.json").read_bytes())
        jsonschema.Draft202012Validator.check_schema(schema)
        validators[kind] = jsonschema.Draft202012Validator(schema)
    result_schema = orjson.loads((schema_dir / "cmd-result.schema.json").read_bytes())
    validators["cmd/result"] = jsonschema.Draft202012Validator(result_schema)
    for name in COMPACT_SCHEMAS:
        schema = orjson.loads((schema_dir / f"{name}.schema.json").read_bytes())
        jsonschema.Draft202012Validator.check_schema(schema)
        validators[name] = jsonschema.Draft202012Validator(schema)
    return validators


# -- version 2 (compact) --------------------------------------------------------------------------------------

Row = tuple[str, int, Value, str, str | None]  # point, ts, value, quality, reason


def payload_json(payload: bytes | bytearray) -> Any:
    """A `data` or `map` payload as JSON: as it is when it begins with `{`, else inflated first (the agent's
    uplink.compress); ValueError when it is neither JSON nor zlib-compressed JSON."""
    if payload[:1] != b"{":
        inflater = zlib.decompressobj()
        try:
            text = inflater.decompress(payload, MAX_PAYLOAD)
        except zlib.error as exc:
            try:
                return orjson.loads(payload)  # JSON after all (with leading space, say)
            except orjson.JSONDecodeError:
                raise ValueError(f"not UTF-8 JSON nor zlib-compressed JSON ({exc}): {bytes(payload[:80])!r}") from None
        if inflater.unconsumed_tail or not inflater.eof:
            raise ValueError("a compressed payload that is cut short or inflates beyond 64 MiB")
        payload = text
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not UTF-8 JSON ({exc}): {bytes(payload[:80])!r}") from None


def map_id_of(devices: list[Any]) -> str:
    """What a map's id must be: the first 12 hex digits of SHA-256 over its `devices` array, written without
    spaces in the order received."""
    return hashlib.sha256(orjson.dumps(devices)).hexdigest()[:12]


def map_devices(msg: dict[str, Any]) -> list[list[str]]:
    """A point map message (schema-checked) as each device's point ids; ValueError when its id is not its digest."""
    if map_id_of(msg["devices"]) != msg["map"]:
        raise ValueError(f"map {msg['map']!r} is not the digest of its devices ({map_id_of(msg['devices'])})")
    return [list(device["points"]) for device in msg["devices"]]


def compact_rows(msg: dict[str, Any], devices: Sequence[Sequence[str]]) -> list[Row]:
    """The readings of a version 2 `data` message (schema-checked) with its map's devices; ValueError naming
    the first thing the schema cannot say is wrong (a device, offset or `q` entry out of range, a null value
    that is not `bad`, a reading listed twice in `q`)."""
    rows: list[Row] = []
    starts: list[int] = []
    for n, group in enumerate(msg["g"]):
        d, t, o, values = group["d"], group["t"], group["o"], group["v"]
        if d >= len(devices):
            raise ValueError(f"$.g[{n}].d: device {d}, but map {msg['map']} has {len(devices)}")
        points = devices[d]
        count = len(values)
        if isinstance(o, int):
            offsets = range(o, o + count)
        elif len(o) == count:
            offsets = o
        else:
            raise ValueError(f"$.g[{n}].o: {len(o)} offsets for {count} values")
        if max(offsets) >= len(points):
            raise ValueError(f"$.g[{n}].o: offset {max(offsets)}, but device {d} has {len(points)} points")
        if isinstance(t, int):
            times = [t] * count
        elif len(t) == count:
            times = t
        else:
            raise ValueError(f"$.g[{n}].t: {len(t)} times for {count} values")
        starts.append(len(rows))
        rows.extend((points[x], ts, value, "good", None) for x, ts, value in zip(offsets, times, values, strict=True))
    starts.append(len(rows))
    flagged: set[int] = set()
    for n, flag in enumerate(msg.get("q", [])):
        g, p, code = flag[0], flag[1], flag[2]
        if g >= len(starts) - 1 or starts[g] + p >= starts[g + 1]:
            raise ValueError(f"$.q[{n}]: group {g}, position {p} is no reading of this message")
        k = starts[g] + p
        if k in flagged:
            raise ValueError(f"$.q[{n}]: group {g}, position {p} is listed twice")
        flagged.add(k)
        point, ts, value, _, _ = rows[k]
        rows[k] = (point, ts, value, QUALITY_NAMES[code], flag[3] if len(flag) > 3 else None)
    for k, (point, _, value, quality, _) in enumerate(rows):
        if value is None and quality != "bad":
            raise ValueError(f"reading {k} ({point}) is null but not bad: null needs a `q` entry of quality 2")
    return rows


def count_readings(payload: bytes | bytearray) -> int:
    """How many readings one `data` payload holds, either version, compressed or not (ValueError when it is not
    a data message). A compact message has one value a reading, so no map is needed to count."""
    msg = payload_json(payload)
    if not isinstance(msg, dict):
        raise ValueError("a data payload is a JSON object")
    if msg.get("v") == 2:
        return sum(len(group["v"]) for group in msg["g"])
    return len(msg["readings"])


class DataDecoder:
    """Reads `data` payloads of either version into (point, ts, value, quality, reason) rows, with the point maps
    of one agent given to `add_map` (payloads of `map/{id}`), as a platform (or a benchmark) does."""

    def __init__(self) -> None:
        self.maps: dict[str, list[list[str]]] = {}

    def add_map(self, payload: bytes | bytearray) -> str:
        msg = payload_json(payload)
        self.maps[msg["map"]] = map_devices(msg)
        return str(msg["map"])

    def rows(self, payload: bytes | bytearray) -> list[Row]:
        """KeyError for a compact message whose map was not given; ValueError for one that does not decode."""
        msg = payload_json(payload)
        if msg.get("v") == 2:
            return compact_rows(msg, self.maps[msg["map"]])
        return [(r["point"], r["ts"], r["value"], r["quality"], r.get("reason")) for r in msg["readings"]]


def _describe(error: jsonschema.ValidationError) -> str:
    message = error.message if len(error.message) <= 200 else error.message[:200] + "…"
    return f"{error.json_path}: {message}"


class PlatformSimulator:
    """Subscribes to `{prefix}/#` and keeps every agent's readings, alarms, statuses and health reports.

    Messages are taken off paho's network thread at once and handled in order by one worker thread, so the
    broker is acknowledged promptly even while a large batch is being checked. A message that fails its
    schema (or is not JSON, or names another agent than its topic) is rejected: it is listed in
    `schema_errors()` and not kept. `data` and `alarm` messages whose seq was already seen from that agent are
    counted as duplicates and not kept again, as the platform does. The reserved topics (config/set, cmd, …)
    and an empty payload on `status` (a deleted retained message) are ignored.

    `on_message(topic, payload)`, when set, is called from the worker thread for every accepted message
    (duplicates included); an exception in it is logged and does not stop the simulator.

    The session is persistent (MQTT 3.1.1, clean session false), so the broker queues messages for us while
    we reconnect, across a broker restart too when the broker persists sessions (mosquitto keeps MQTT 5
    sessions only within one run, hence 3.1.1). `stop()` ends the session.

    Version 2 (compact) `data` are decoded with the agent's point map of that id, kept from `map/{id}` (checked
    against its schema and its digest); a message whose map has not arrived waits for it (`waiting_for_maps`),
    and is neither kept nor counted until then.
    """

    def __init__(
        self,
        host: str,
        port: int,
        prefix: str,
        *,
        validate: bool = True,
        on_message: MessageHook | None = None,
        schema_dir: Path = SCHEMA_DIR,
        agent_keys: Mapping[str, str | Sequence[str]] | None = None,
        verify_chains: bool | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.prefix = prefix.strip("/")
        self.validate = validate
        self.on_message: MessageHook | None = on_message
        self._validators = load_validators(schema_dir) if validate else {}
        self._fast_data_check = _FastDataCheck()
        self._client_id = f"platform-sim-{uuid.uuid4().hex[:12]}"
        self._client: mqtt.Client | None = None
        self._inbox: queue.SimpleQueue[tuple[str, bytes | bytearray] | None] = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self._ready = threading.Event()
        self._refused: str | None = None
        self._subscribe_mid: int | None = None
        self._connected = False
        self._lock = threading.Lock()
        self._readings: list[Reading] = []
        self._alarms: list[dict[str, Any]] = []
        self._statuses: list[dict[str, Any]] = []
        self._results: list[dict[str, Any]] = []
        self._config_results: list[dict[str, Any]] = []
        self._config_key: Any = None  # the key it signs configuration pushes with, made when first needed
        self._health: list[dict[str, Any]] = []
        self._quality: list[dict[str, Any]] = []
        self._errors: list[str] = []
        self._agents: dict[tuple[str, str], _AgentState] = {}
        self._received = 0
        self._maps: dict[tuple[str, str, str], list[list[str]]] = {}  # (enterprise, agent, map id) -> devices
        self._parked: dict[tuple[str, str, str], list[tuple[str, dict[str, Any], str]]] = {}
        # the agents' registered public keys, by "enterprise/agent"; their chains are verified, and any agent's
        # chain with verify_chains (without a registered key only the chain, not the signatures)
        self._agent_keys = {name: TrustedKeys.from_texts([texts] if isinstance(texts, str) else texts)
                            for name, texts in (agent_keys or {}).items()}
        self.verify_chains = bool(agent_keys) if verify_chains is None else verify_chains
        self._chains: dict[tuple[str, str], ChainVerifier] = {}

    # -- lifecycle ---------------------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        """Connect, subscribe to `{prefix}/#` at QoS 1 and return once the broker has granted it.

        Retries the TCP connection until `timeout` seconds have passed, then raises PlatformSimulatorError.
        """
        if self._client is not None:
            raise PlatformSimulatorError("the platform simulator is already started")
        deadline = time.monotonic() + timeout
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self._client_id, clean_session=False)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_mqtt_message
        client.reconnect_delay_set(1, 2)
        self._ready.clear()
        self._refused = None
        self._worker = threading.Thread(target=self._work, name="platform-simulator", daemon=True)
        self._worker.start()
        self._client = client
        where = f"MQTT broker {self.host}:{self.port}"
        client.connect_timeout = max(0.1, min(5.0, timeout))  # paho refuses changes after the first attempt
        while True:
            try:
                client.connect(self.host, self.port, keepalive=30)
                break
            except OSError as exc:
                if time.monotonic() + 0.1 >= deadline:
                    self.stop()
                    raise PlatformSimulatorError(
                        f"{where} unreachable for {timeout:g} s ({exc}); is the broker running?"
                    ) from exc
                time.sleep(0.1)
        client.loop_start()
        if not self._ready.wait(max(0.0, deadline - time.monotonic())):
            self.stop()
            raise PlatformSimulatorError(
                f"{where} did not grant our connection and subscription in {timeout:g} s"
            )
        if self._refused is not None:
            refused = self._refused
            self.stop()
            raise PlatformSimulatorError(f"{where}: {refused}")

    def stop(self) -> None:
        """End the session, then handle every message already received; the accessors keep working."""
        client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()
            if self._ready.is_set() and self._refused is None:
                self._end_session()
        worker, self._worker = self._worker, None
        if worker is not None:
            self._inbox.put(None)
            worker.join()
        self._connected = False

    def _end_session(self) -> None:
        """Connect once more with a clean session, so the broker drops ours and stops queueing for it."""
        eraser = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self._client_id, clean_session=True)
        eraser.connect_timeout = 2.0
        try:
            eraser.connect(self.host, self.port, keepalive=10)
        except OSError:
            return  # the broker is gone, and our session with it unless it persists sessions
        eraser.loop_start()
        deadline = time.monotonic() + 2.0
        while not eraser.is_connected() and time.monotonic() < deadline:
            time.sleep(0.005)
        eraser.disconnect()
        eraser.loop_stop()

    def __enter__(self) -> PlatformSimulator:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def connected(self) -> bool:
        """True while connected and subscribed (False during a reconnect)."""
        return self._connected

    # -- paho callbacks (network thread): never block here ------------------------------------------------

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            self._refused = f"connection refused: {reason_code}"
            self._ready.set()
            return
        _, self._subscribe_mid = client.subscribe(f"{self.prefix}/#", qos=1)

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        if mid != self._subscribe_mid:
            return
        if any(rc.is_failure for rc in reason_codes):
            self._refused = f"subscription to {self.prefix}/# refused: {', '.join(map(str, reason_codes))}"
        else:
            self._connected = True
        self._ready.set()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._connected = False
        if self._client is not None:
            log.warning("platform simulator lost the broker (%s); reconnecting", reason_code)

    def _on_mqtt_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self._inbox.put((message.topic, message.payload))

    # -- worker thread -------------------------------------------------------------------------------------

    def _work(self) -> None:
        while (item := self._inbox.get()) is not None:
            topic, payload = item
            try:
                self._handle(topic, payload)
            except Exception:  # a bug here must not silently stop all later checks
                log.exception("platform simulator failed on a message on %s", topic)
                self._reject(f"{topic}: the simulator failed on this message (see the log)")
            finally:
                with self._lock:
                    self._received += 1

    def _reject(self, error: str) -> None:
        with self._lock:
            self._errors.append(error)

    def _handle(self, topic: str, payload: bytes | bytearray) -> None:
        parts = topic.removeprefix(self.prefix + "/").split("/", 2)
        if len(parts) != 3 or not topic.startswith(self.prefix + "/"):
            self._reject(f"{topic}: not a topic {self.prefix}/{{enterprise}}/{{agent}}/{{kind}}")
            return
        enterprise, agent, kind = parts
        if kind in RESERVED_KINDS or kind == "cmd":  # `cmd` is what this platform itself sends
            return
        if kind.startswith("map/"):
            self._keep_map(topic, enterprise, agent, kind.removeprefix("map/"), payload)
            return
        if kind == "cmd/result":
            self._keep_result(topic, payload)
            return
        if kind == "config/result":
            self._keep_config_result(topic, payload)
            return
        if kind not in KINDS:
            self._reject(f"{topic}: unknown message kind {kind!r}")
            return
        if kind == "status" and not payload:  # someone deleted the retained status; not a message of the agent
            return
        try:
            msg = payload_json(payload) if kind == "data" else orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            self._reject(f"{topic}: not UTF-8 JSON ({exc}): {payload[:80]!r}")
            return
        except ValueError as exc:
            self._reject(f"{topic}: {exc}")
            return
        if not isinstance(msg, dict):
            self._reject(f"{topic}: the payload is {type(msg).__name__}, not a JSON object")
            return
        where = f"{topic} seq={msg['seq']}" if "seq" in msg else topic
        compact = kind == "data" and msg.get("v") == 2
        if self.validate and not (kind == "data" and not compact and self._fast_data_check(msg)):
            validator = self._validators["data-v2" if compact else kind]
            errors = [_describe(e) for e in itertools.islice(validator.iter_errors(msg), 3)]
            if errors:
                self._reject(f"{where}: " + "; ".join(errors))
                return
        if msg.get("enterprise") != enterprise or msg.get("agent") != agent:
            self._reject(
                f"{where}: payload names {msg.get('enterprise')!r}/{msg.get('agent')!r}, "
                f"the topic {enterprise!r}/{agent!r}"
            )
            return
        if kind == "alarm" and msg.get("id") != f"{msg.get('point')}/{msg.get('type')}":
            self._reject(f"{where}: alarm id {msg.get('id')!r} is not point/type")
            return
        if self.verify_chains and kind in TOPICS and not self._verify(enterprise, agent, kind, payload, where):
            return
        self._accept(topic, enterprise, agent, kind, msg, where)

    def _verify(self, enterprise: str, agent: str, kind: str, payload: bytes | bytearray, where: str) -> bool:
        """Check a message's seal and its links in its agent's chain; False when it must not be kept (its own seal
        fails). Parsed again, strictly: a member given twice must not show the chain one message, the platform
        another."""
        key = (enterprise, agent)
        with self._lock:
            verifier = self._chains.get(key)
            if verifier is None:
                verifier = self._chains[key] = ChainVerifier(self._agent_keys.get(f"{enterprise}/{agent}"))
        try:
            message: object = loads_strict(_inflated(payload) if kind == "data" else bytes(payload))
        except (NotCanonical, ValueError) as exc:
            message = {"seq": None, "unreadable": str(exc)}
        with self._lock:
            found = verifier.add(message, kind)
        for finding in found:
            log.warning("%s: chain break (%s): %s", where, finding.kind, finding.text)
        return not any(f.kind not in _LINK_BREAKS for f in found)

    def _accept(self, topic: str, enterprise: str, agent: str, kind: str, msg: dict[str, Any], where: str) -> None:
        """Keep a checked message; a compact one is decoded with its map first, or waits for the map."""
        rows: list[Row] | None = None
        try:
            if kind == "data" and msg.get("v") == 2:
                key = (enterprise, agent, msg["map"])
                with self._lock:
                    devices = self._maps.get(key)
                    if devices is None:
                        self._parked.setdefault(key, []).append((topic, msg, where))
                        return
                try:
                    rows = compact_rows(msg, devices)
                except ValueError as exc:
                    self._reject(f"{where}: {exc}")
                    return
            self._keep(enterprise, agent, kind, msg, rows)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:  # only with validate=False
            self._reject(f"{where}: cannot be kept ({type(exc).__name__}: {exc})")
            return
        self._call_hook(topic, msg)

    def _keep_map(self, topic: str, enterprise: str, agent: str, map_id: str, payload: bytes | bytearray) -> None:
        """A point map (retained on `map/{id}`): checked, kept, and the messages that waited for it decoded."""
        if not payload:  # someone deleted the retained map; what was decoded with it stays
            return
        try:
            msg = payload_json(payload)
        except ValueError as exc:
            self._reject(f"{topic}: {exc}")
            return
        if not isinstance(msg, dict):
            self._reject(f"{topic}: the payload is {type(msg).__name__}, not a JSON object")
            return
        if self.validate:
            errors = [_describe(e) for e in itertools.islice(self._validators["map"].iter_errors(msg), 3)]
            if errors:
                self._reject(f"{topic}: " + "; ".join(errors))
                return
        if msg.get("enterprise") != enterprise or msg.get("agent") != agent or msg.get("map") != map_id:
            self._reject(f"{topic}: payload names {msg.get('enterprise')!r}/{msg.get('agent')!r} map "
                         f"{msg.get('map')!r}, the topic {enterprise!r}/{agent!r} map {map_id!r}")
            return
        try:
            devices = map_devices(msg)
        except (KeyError, TypeError, ValueError) as exc:
            self._reject(f"{topic}: {exc}")
            return
        key = (enterprise, agent, map_id)
        with self._lock:
            self._maps[key] = devices
            waiting = self._parked.pop(key, [])
        self._call_hook(topic, msg)
        for data_topic, data_msg, where in waiting:
            self._accept(data_topic, enterprise, agent, "data", data_msg, where)

    def _keep_result(self, topic: str, payload: bytes | bytearray) -> None:
        try:
            msg = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            self._reject(f"{topic}: not UTF-8 JSON ({exc}): {payload[:80]!r}")
            return
        if self.validate and "cmd/result" in self._validators:
            errors = [_describe(e) for e in itertools.islice(self._validators["cmd/result"].iter_errors(msg), 3)]
            if errors:
                self._reject(f"{topic}: " + "; ".join(errors))
                return
        with self._lock:
            self._results.append(msg)
        self._call_hook(topic, msg)

    def _call_hook(self, topic: str, msg: dict[str, Any]) -> None:
        hook = self.on_message
        if hook is not None:
            try:
                hook(topic, msg)
            except Exception:
                log.exception("the on_message hook failed on %s", topic)

    def command(self, enterprise: str, agent: str, body: dict[str, Any]) -> None:
        """Send a command to an agent (topic cmd, QoS 1); its result arrives in `command_results()`."""
        client = self._client
        if client is None:
            raise PlatformSimulatorError("the platform simulator is not started")
        client.publish(f"{self.prefix}/{enterprise}/{agent}/cmd", orjson.dumps({"v": 1, **body}), qos=1)

    def command_results(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._results)

    def result_of(self, cmd_id: str, timeout: float = 10.0) -> dict[str, Any] | None:
        """Wait for the result of one command."""
        found: list[dict[str, Any]] = []

        def arrived(p: PlatformSimulator) -> bool:
            found[:] = [r for r in p.command_results() if r.get("id") == cmd_id]
            return bool(found)

        return found[0] if self.wait_for(arrived, timeout) else None

    # -- configuration pushes (config/set → config/result) ------------------------------------------------------

    def config_public_key(self) -> str:
        """The public key the simulator signs configuration pushes with, as an agent's remote_config.keys lists it
        (base64url of the raw 32 bytes); the key pair is made on first use and kept for the simulator's life."""
        from agent.trust.keys import generate_private_key, public_key_text

        if self._config_key is None:
            self._config_key = generate_private_key()
        return str(public_key_text(self._config_key.public_key()))

    def push_config(self, enterprise: str, agent: str, config: dict[str, Any], revision: int, *,
                    push_id: str | None = None, not_after: int | None = None, signed: bool = True,
                    retain: bool = False, timeout: float = 30.0, payload: bytes | None = None,
                    **members: Any) -> dict[str, Any] | None:
        """Sign (with `config_public_key`'s key) and publish a configuration push on `config/set`: the agent,
        enterprise, id, revision, ts (now) and `config`, with `not_after` and any `members` added (or replaced);
        `payload` publishes those bytes instead, as they are (`push_id` then names the id they carry). Returns the
        push's first `config/result` (the agent answers `trial` when it applies it, `refused` else;
        `config_results` has the later `applied` or `rolled_back`), or None when none came within `timeout`."""
        from agent.trust.signing import sign_payload

        client = self._client
        if client is None:
            raise PlatformSimulatorError("the platform simulator is not started")
        if payload is not None:
            answer_id = push_id  # the id the given payload carries (None: an answer with a null id)
        else:
            push_id = answer_id = push_id or f"cfg-{uuid.uuid4().hex[:12]}"
            message: dict[str, Any] = {"v": 1, "id": push_id, "revision": revision, "ts": int(time.time() * 1000),
                                       "agent": agent, "enterprise": enterprise, "config": config}
            if not_after is not None:
                message["not_after"] = not_after
            message.update(members)
            if signed:
                self.config_public_key()
                payload = sign_payload(message, self._config_key)
            else:
                payload = orjson.dumps(message)

        def answers() -> list[dict[str, Any]]:
            return [r for r in self.config_results() if r.get("id") == answer_id]

        before = len(answers())
        client.publish(f"{self.prefix}/{enterprise}/{agent}/config/set", payload, qos=1, retain=retain)
        found: list[dict[str, Any]] = []

        def answered(p: PlatformSimulator) -> bool:
            found[:] = answers()[before:]
            return bool(found)

        return found[0] if self.wait_for(answered, timeout) else None

    def config_results(self, push_id: str | None = None) -> list[dict[str, Any]]:
        """The `config/result` messages received, in arrival order (of one push's id when given: null for the
        answers to pushes with no readable id)."""
        with self._lock:
            return [r for r in self._config_results if push_id is None or r.get("id") == push_id]

    def _keep_config_result(self, topic: str, payload: bytes | bytearray) -> None:
        try:
            msg = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            self._reject(f"{topic}: not UTF-8 JSON ({exc}): {payload[:80]!r}")
            return
        if self.validate:
            validator = self._validators.get("config/result")
            if validator is None:
                schema = orjson.loads((SCHEMA_DIR / "config-result.schema.json").read_bytes())
                validator = self._validators["config/result"] = jsonschema.Draft202012Validator(schema)
            errors = [_describe(e) for e in itertools.islice(validator.iter_errors(msg), 3)]
            if errors:
                self._reject(f"{topic}: " + "; ".join(errors))
                return
        with self._lock:
            self._config_results.append(msg)
        self._call_hook(topic, msg)

    def _keep(self, enterprise: str, agent: str, kind: str, msg: dict[str, Any], decoded: list[Row] | None) -> None:
        if kind == "status":
            with self._lock:
                self._statuses.append(msg)
            return
        if kind == "health":
            with self._lock:
                self._health.append(msg)
            return
        seq = msg["seq"]
        hist = msg["hist"]
        if not isinstance(seq, int) or not isinstance(hist, bool):
            raise TypeError("seq must be an integer and hist a boolean")
        alarm_state = msg["state"] if kind == "alarm" else None
        rows: list[Reading] = []
        if decoded is not None:
            rows = [Reading(enterprise, agent, point, ts, value, quality, hist, reason)
                    for point, ts, value, quality, reason in decoded]
        elif kind == "data":
            rows = [
                Reading(enterprise, agent, r["point"], r["ts"], r["value"], r["quality"], hist, r.get("reason"))
                for r in msg["readings"]
            ]
        with self._lock:
            state = self._agents.get((enterprise, agent))
            if state is None:
                state = self._agents[(enterprise, agent)] = _AgentState()
            state.messages += 1
            state.hist_messages += hist
            if seq in state.seqs:
                state.duplicates += 1
                return
            state.seqs.add(seq)
            if kind == "data":
                self._readings.extend(rows)
                state.readings += len(rows)
            elif kind == "quality":
                self._quality.append(msg)
            else:
                self._alarms.append(msg)
                state.alarms_raised += alarm_state == "raised"
                state.alarms_cleared += alarm_state == "cleared"

    # -- accessors (any thread) ----------------------------------------------------------------------------

    def readings(self) -> list[Reading]:
        """Every reading kept, in arrival order: (enterprise, agent, point, ts, value, quality, hist)."""
        with self._lock:
            return list(self._readings)

    def alarms(self) -> list[dict[str, Any]]:
        """Every alarm event kept so far (payloads as received), in arrival order."""
        with self._lock:
            return list(self._alarms)

    def statuses(self) -> list[dict[str, Any]]:
        """Every status message, retained ones included, in arrival order."""
        with self._lock:
            return list(self._statuses)

    def health(self) -> list[dict[str, Any]]:
        """Every health message, in arrival order."""
        with self._lock:
            return list(self._health)

    def quality_reports(self) -> list[dict[str, Any]]:
        """Every daily `quality` report (once per seq), in arrival order."""
        with self._lock:
            return list(self._quality)

    def maps(self) -> dict[tuple[str, str, str], list[list[str]]]:
        """The point maps kept, by (enterprise, agent, map id): each device's point ids."""
        with self._lock:
            return dict(self._maps)

    def waiting_for_maps(self) -> int:
        """Compact `data` messages held until their point map arrives (not kept, not counted yet)."""
        with self._lock:
            return sum(len(waiting) for waiting in self._parked.values())

    def schema_errors(self) -> list[str]:
        """One line per rejected message: not JSON, failed its schema, or contradicts its topic."""
        with self._lock:
            return list(self._errors)

    def received(self) -> int:
        """How many messages have been handled (kept or rejected), reserved topics included."""
        with self._lock:
            return self._received

    def report(self) -> PlatformReport:
        """Per-agent delivery figures (seq range, gaps, duplicates, counts) and the rejected messages."""
        with self._lock:
            states = {key: (set(s.seqs), replace(s, seqs=set())) for key, s in self._agents.items()}
            errors = list(self._errors)
        agents: dict[tuple[str, str], AgentReport] = {}
        with self._lock:
            chains = {key: _chain_report(v) for key, v in self._chains.items()}
        for (enterprise, agent), (seq_set, s) in states.items():
            seqs = sorted(seq_set)
            gaps, missing = _gaps(seqs)
            agents[(enterprise, agent)] = AgentReport(
                enterprise=enterprise,
                agent=agent,
                messages=s.messages,
                readings=s.readings,
                alarms_raised=s.alarms_raised,
                alarms_cleared=s.alarms_cleared,
                seq_min=seqs[0] if seqs else None,
                seq_max=seqs[-1] if seqs else None,
                gaps=gaps,
                missing=missing,
                duplicates=s.duplicates,
                hist_messages=s.hist_messages,
                chain=chains.get((enterprise, agent)),
            )
        return PlatformReport(agents=agents, schema_errors=errors)

    def wait_for(
        self, predicate: Callable[[PlatformSimulator], bool], timeout: float, interval: float = 0.02
    ) -> bool:
        """Poll `predicate(self)` until it is true (return True) or `timeout` seconds pass (return False)."""
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if time.monotonic() >= deadline:
                return False
            time.sleep(interval)
        return True


_LINK_BREAKS = frozenset({"broken_link", "fork", "missing"})  # about a pair of messages: both are kept, reported


def _chain_report(verifier: ChainVerifier) -> ChainReport:
    return ChainReport(verified=verifier.verified, kids=frozenset(verifier.kids), restarts=list(verifier.restarts),
                       breaks=list(verifier.breaks), missing=verifier.missing())


def _inflated(payload: bytes | bytearray) -> bytes:
    """A `data` payload's JSON bytes, inflated when compressed (ValueError beyond MAX_PAYLOAD or when damaged)."""
    if payload[:1] == b"{":
        return bytes(payload)
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(payload, MAX_PAYLOAD)
    except zlib.error as exc:
        raise ValueError(f"not zlib-compressed: {exc}") from None
    if inflater.unconsumed_tail or not inflater.eof:
        raise ValueError("a compressed payload that is cut short or inflates beyond 64 MiB")
    return text


def _gaps(seqs: Sequence[int]) -> tuple[list[int], int]:
    """The seq numbers missing between the first and last of `seqs` (sorted): the first few, and how many."""
    gaps: list[int] = []
    missing = 0
    for a, b in itertools.pairwise(seqs):
        if b - a > 1:
            missing += b - a - 1
            room = MAX_GAPS_LISTED - len(gaps)
            if room > 0:
                gaps.extend(range(a + 1, min(b, a + 1 + room)))
    return gaps, missing


# -- command line -------------------------------------------------------------------------------------------


def _fmt(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"{value:g}" if isinstance(value, float) else str(value)


def format_message(topic: str, msg: dict[str, Any]) -> str:
    """One compact line describing a received message."""
    kind = topic.rsplit("/", 1)[-1]
    who = f"{msg.get('enterprise')}/{msg.get('agent')}"
    clock = time.strftime("%H:%M:%S")
    if topic.rsplit("/", 2)[-2] == "map":
        points = sum(len(d["points"]) for d in msg["devices"])
        return f"{clock} map    {who} {msg['map']}: {len(msg['devices'])} devices, {points} points"
    if kind == "data" and msg["v"] == 2:
        values = [v for group in msg["g"] for v in group["v"]]
        shown = ", ".join(_fmt(v) for v in values[:4]) + (f", … +{len(values) - 4}" if len(values) > 4 else "")
        hist = "hist" if msg["hist"] else "live"
        return (f"{clock} data   {who} seq={msg['seq']} {hist} {len(values)} readings (compact, map {msg['map']}, "
                f"{len(msg.get('q', []))} not good): {shown}")
    if kind == "data":
        readings = msg["readings"]
        shown = ", ".join(
            f"{r['point']}={_fmt(r['value'])}" + ("" if r["quality"] == "good" else f"({r['quality']})")
            for r in readings[:4]
        )
        more = f", … +{len(readings) - 4}" if len(readings) > 4 else ""
        hist = "hist" if msg["hist"] else "live"
        return f"{clock} data   {who} seq={msg['seq']} {hist} {len(readings)} readings: {shown}{more}"
    if kind == "alarm":
        hist = " hist" if msg["hist"] else ""
        return (
            f"{clock} alarm  {who} seq={msg['seq']}{hist} {msg['id']} L{msg['level']} {msg['state']} "
            f"value={_fmt(msg['value'])} limit={_fmt(msg['limit'])} {msg['unit']}".rstrip()
        )
    if kind == "status":
        if msg["online"]:
            return (
                f"{clock} status {who} online version={msg.get('version')} config={msg.get('config_version')}"
            )
        return f"{clock} status {who} offline" + ("" if "ts" in msg else " (last will)")
    backlog, points = msg["backlog"], msg["points"]
    links = " ".join(f"{c['id']}:{c['link']}" for c in msg["channels"])
    return (
        f"{clock} health {who} backlog={backlog['messages']} msgs/{backlog['readings']} readings "
        f"evicted={msg['evicted_readings']} points={points['good']}/{points['uncertain']}/{points['bad']} "
        f"links[{links}] cpu={_fmt(msg['cpu_percent'])}% rss={_fmt(msg['rss_mb'])}MB"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulators.platform",
        description="Listen as the county platform: print every uplink message, then a delivery summary. "
        "Exits 1 when seq numbers are missing, or a verified chain is broken.",
    )
    parser.add_argument("--broker", required=True, metavar="HOST:PORT", help="broker, e.g. 127.0.0.1:1883")
    parser.add_argument("--prefix", required=True, help="topic prefix (the agent's uplink.prefix)")
    parser.add_argument("--duration", type=float, default=None, metavar="S", help="stop after S seconds")
    parser.add_argument("--no-validate", action="store_true", help="skip the schema checks")
    parser.add_argument("--agent-key", action="append", default=[], metavar="ENTERPRISE/AGENT=KEY",
                        help="an agent's public key (edge-agent keys show): verify its signatures and chain "
                        "(repeatable; exits 1 on a break)")
    parser.add_argument("--verify-chains", action="store_true", help="verify every agent's chain, signed or not")
    args = parser.parse_args(argv)
    agent_keys: dict[str, list[str]] = {}
    for item in args.agent_key:
        name, _, key = item.partition("=")
        if name.count("/") != 1 or not key:
            parser.error(f"--agent-key must be ENTERPRISE/AGENT=KEY, not {item!r}")
        agent_keys.setdefault(name, []).append(key)
    host, _, port_text = args.broker.rpartition(":")
    if not host or not port_text.isdigit():
        parser.error(f"--broker must be HOST:PORT, not {args.broker!r}")

    def show(topic: str, msg: dict[str, Any]) -> None:
        print(format_message(topic, msg), flush=True)

    try:
        simulator = PlatformSimulator(host, int(port_text), args.prefix, validate=not args.no_validate,
                                      on_message=show, agent_keys=agent_keys,
                                      verify_chains=True if args.verify_chains else None)
    except ValueError as exc:
        parser.error(f"--agent-key: {exc}")
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    try:
        simulator.start()
    except PlatformSimulatorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"listening on {host}:{port_text} {simulator.prefix}/#", flush=True)
    deadline = None if args.duration is None else time.monotonic() + args.duration
    shown_errors = 0
    try:
        while not stopping.wait(0.2) and (deadline is None or time.monotonic() < deadline):
            errors = simulator.schema_errors()
            for error in errors[shown_errors:]:
                print(f"REJECTED {error}", flush=True)
            shown_errors = len(errors)
    except KeyboardInterrupt:
        pass
    finally:
        simulator.stop()
    report = simulator.report()
    for error in report.schema_errors[shown_errors:]:
        print(f"REJECTED {error}")
    print("--- summary")
    print(report.summary())
    return 1 if report.has_gaps or report.chain_breaks else 0


if __name__ == "__main__":
    sys.exit(main())

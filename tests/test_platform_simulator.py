"""The county-platform simulator against a real mosquitto, and the protocol page against its schemas."""

from __future__ import annotations

import copy
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from simulators.platform import (
    COMPACT_SCHEMAS,
    KINDS,
    DataDecoder,
    PlatformSimulator,
    PlatformSimulatorError,
    Reading,
    _FastDataCheck,
    count_readings,
    load_validators,
    map_id_of,
)

ROOT = Path(__file__).resolve().parent.parent
PROTOCOL = ROOT / "docs" / "protocol.md"
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
ENTERPRISE = "150625000123"
AGENT = "ipc-01"
T0 = 1764331200000

Publish = Callable[..., None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Mosquitto:
    """A real mosquitto on a loopback port; `persistent` keeps sessions across a restart."""

    def __init__(self, folder: Path, *, persistent: bool = False) -> None:
        if not Path(MOSQUITTO).exists():
            pytest.skip(f"mosquitto not found at {MOSQUITTO}")
        self.folder = folder
        self.port = _free_port()
        self.log = folder / "mosquitto.log"
        folder.chmod(0o777)  # mosquitto started as root saves its database as user mosquitto
        lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous true", f"persistence {str(persistent).lower()}"]
        if persistent:
            lines.append(f"persistence_location {folder}/")
        (folder / "mosquitto.conf").write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [MOSQUITTO, "-c", str(self.folder / "mosquitto.conf")], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"mosquitto exited: {self.log.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("mosquitto did not listen within 10 s")
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A real mosquitto on a free loopback port, for this module only."""
    mosquitto = Mosquitto(tmp_path_factory.mktemp("mosquitto"))
    mosquitto.start()
    try:
        yield mosquitto.port
    finally:
        mosquitto.stop()


@pytest.fixture
def publish(broker: int) -> Iterator[Publish]:
    """Publish a dict (as JSON) or raw bytes at QoS 1 and wait for the broker's PUBACK."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"test-pub-{uuid.uuid4().hex[:8]}")
    client.connect("127.0.0.1", broker)
    client.loop_start()

    def send(topic: str, payload: dict[str, Any] | bytes, *, retain: bool = False) -> None:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        info = client.publish(topic, body, qos=1, retain=retain)
        info.wait_for_publish(5)
        assert info.is_published(), f"publish to {topic} not acknowledged"

    yield send
    client.disconnect()
    client.loop_stop()


@pytest.fixture
def prefix() -> str:
    """A topic prefix of its own for each test, so retained messages never leak between tests."""
    return f"test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def platform(broker: int, prefix: str) -> Iterator[PlatformSimulator]:
    simulator = PlatformSimulator("127.0.0.1", broker, prefix)
    simulator.start(timeout=10)
    yield simulator
    simulator.stop()


def data(seq: int, readings: list[dict[str, Any]], *, hist: bool = False) -> dict[str, Any]:
    return {"v": 1, "seq": seq, "hist": hist, "agent": AGENT, "enterprise": ENTERPRISE, "readings": readings}


def reading(point: str, ts: int, value: Any, quality: str = "good") -> dict[str, Any]:
    return {"point": point, "ts": ts, "value": value, "quality": quality}


def alarm(seq: int, point: str, type_: str, state: str, value: Any, limit: Any, **extra: Any) -> dict[str, Any]:
    level = 2 if type_ in ("high_high", "low_low") else 1
    return {
        "v": 1, "seq": seq, "hist": False, "agent": AGENT, "enterprise": ENTERPRISE,
        "id": f"{point}/{type_}", "point": point, "type": type_, "level": level, "state": state,
        "value": value, "limit": limit, "unit": "%LEL", "ts": T0 + seq, **extra,
    }  # fmt: skip


def wait_received(platform: PlatformSimulator, count: int) -> None:
    assert platform.wait_for(lambda p: p.received() >= count, timeout=10), (
        f"only {platform.received()} of {count} messages arrived"
    )


@pytest.mark.timeout(30)
def test_report_counts_what_arrived_and_finds_gaps_and_duplicates(
    platform: PlatformSimulator, publish: Publish, prefix: str
) -> None:
    root = f"{prefix}/{ENTERPRISE}/{AGENT}"
    publish(f"{root}/data", data(1, [reading("LT-101", T0, 12.53), reading("XV-101", T0, True)]))
    publish(f"{root}/alarm", alarm(2, "GT-201", "high", "raised", 27.5, 25.0))
    publish(f"{root}/data", data(3, [reading("GT-201", T0 - 5000, None, "bad")], hist=True))
    publish(f"{root}/data", data(3, [reading("GT-201", T0 - 5000, None, "bad")], hist=True))  # redelivered
    publish(f"{root}/data", data(6, [reading("LT-101", T0 + 1000, 99.0, "uncertain")]))  # 4 and 5 missing
    publish(f"{root}/alarm", alarm(7, "GT-201", "high", "cleared", 20.0, 25.0, message="back below 25 %LEL"))
    wait_received(platform, 6)

    assert platform.schema_errors() == []
    report = platform.report().agent(AGENT)
    assert (report.enterprise, report.agent) == (ENTERPRISE, AGENT)
    assert report.messages == 6
    assert report.duplicates == 1
    assert report.hist_messages == 2
    assert (report.seq_min, report.seq_max) == (1, 7)
    assert report.gaps == [4, 5]
    assert report.missing == 2
    assert report.readings == 4  # the duplicate's reading is not kept twice
    assert (report.alarms_raised, report.alarms_cleared) == (1, 1)
    assert platform.readings() == [
        Reading(ENTERPRISE, AGENT, "LT-101", T0, 12.53, "good", False),
        Reading(ENTERPRISE, AGENT, "XV-101", T0, True, "good", False),
        Reading(ENTERPRISE, AGENT, "GT-201", T0 - 5000, None, "bad", True),
        Reading(ENTERPRISE, AGENT, "LT-101", T0 + 1000, 99.0, "uncertain", False),
    ]
    assert [(a["id"], a["state"]) for a in platform.alarms()] == [("GT-201/high", "raised"), ("GT-201/high", "cleared")]


@pytest.mark.timeout(30)
def test_invalid_and_non_json_messages_are_rejected_and_not_kept(
    platform: PlatformSimulator, publish: Publish, prefix: str
) -> None:
    root = f"{prefix}/{ENTERPRISE}/{AGENT}"
    publish(f"{root}/data", data(1, [reading("LT-101", T0, 1.0)]))
    publish(f"{root}/data", data(2, [reading("LT-101", T0, 1.0, "excellent")]))
    publish(f"{root}/data", data(3, [reading("LT-101", T0, None, "good")]))  # null needs quality bad
    publish(f"{root}/alarm", b'{"v": 1, "seq": 4, "hist": fal')
    publish(f"{root}/alarm", alarm(5, "GT-201", "high_high", "raised", 55.0, 50.0) | {"level": 1})
    publish(f"{root}/data", data(6, [reading("LT-101", T0, 2.0)]))
    wait_received(platform, 6)

    errors = platform.schema_errors()
    assert len(errors) == 4, errors
    assert "seq=2" in errors[0] and "$.readings[0].quality" in errors[0] and "excellent" in errors[0]
    assert "seq=3" in errors[1] and "'bad' was expected" in errors[1]
    assert f"{root}/alarm" in errors[2] and "not UTF-8 JSON" in errors[2]
    assert "seq=5" in errors[3] and "$.level" in errors[3]
    report = platform.report().agent(AGENT)
    assert report.readings == 2
    assert report.gaps == [2, 3, 4, 5]  # a rejected message is not delivered
    assert platform.alarms() == []


@pytest.mark.timeout(30)
def test_compact_data_wait_for_their_map_and_read_as_version_1_would(
    platform: PlatformSimulator, publish: Publish, prefix: str
) -> None:
    root = f"{prefix}/{ENTERPRISE}/{AGENT}"
    devices = [{"id": "plc1", "channel": "tankfarm", "points": ["LT-101", "XV-101"]},
               {"id": "gd-3", "channel": "gas-bus", "points": ["GT-201"]}]
    map_id = map_id_of(devices)
    the_map = {"v": 2, "agent": AGENT, "enterprise": ENTERPRISE, "map": map_id, "devices": devices}

    def compact(seq: int, groups: list[dict[str, Any]], flags: list[list[Any]] | None = None) -> dict[str, Any]:
        message = {"v": 2, "seq": seq, "hist": False, "map": map_id, "agent": AGENT, "enterprise": ENTERPRISE,
                   "g": groups}
        return message if flags is None else message | {"q": flags}

    first = compact(1, [{"d": 0, "t": T0, "o": 0, "v": [12.53, True]}, {"d": 1, "t": [T0 - 5], "o": [0], "v": [None]}],
                    [[1, 0, 2, "comm"]])
    publish(f"{root}/data", zlib.compress(json.dumps(first).encode()))  # compressed, and before its map
    wait_received(platform, 1)
    assert platform.waiting_for_maps() == 1 and platform.readings() == []
    publish(f"{root}/map/{map_id}", zlib.compress(json.dumps(the_map).encode()), retain=True)
    wait_received(platform, 2)
    assert platform.schema_errors() == [] and platform.waiting_for_maps() == 0
    assert platform.readings() == [
        Reading(ENTERPRISE, AGENT, "LT-101", T0, 12.53, "good", False),
        Reading(ENTERPRISE, AGENT, "XV-101", T0, True, "good", False),
        Reading(ENTERPRISE, AGENT, "GT-201", T0 - 5, None, "bad", False, "comm"),
    ]
    # what the schema cannot say about a compact message is checked too
    publish(f"{root}/data", compact(2, [{"d": 2, "t": T0, "o": 0, "v": [1.0]}]))
    publish(f"{root}/data", compact(3, [{"d": 0, "t": T0, "o": 1, "v": [1.0, 2.0]}]))
    publish(f"{root}/data", compact(4, [{"d": 1, "t": T0, "o": 0, "v": [None]}]))
    publish(f"{root}/data", compact(5, [{"d": 0, "t": T0, "o": 0, "v": [1.0]}], [[0, 0, 1], [0, 0, 2]]))
    publish(f"{root}/data", compact(6, [{"d": 0, "t": T0, "o": 0, "v": [1.0]}], [[0, 1, 1]]))
    publish(f"{root}/data", compact(7, [{"d": 0, "t": [T0, T0], "o": 0, "v": [1.0]}]))
    publish(f"{root}/data", compact(8, [{"d": 0, "t": T0, "o": 0, "v": [1.0]}], [[0, 0, 3]]))
    forged = the_map | {"map": "0123456789ab"}
    publish(f"{root}/map/0123456789ab", json.dumps(forged).encode(), retain=True)
    publish(f"{root}/map/{map_id}", json.dumps(the_map | {"agent": "ipc-02"}).encode(), retain=True)
    publish(f"{root}/data", b"x\x9c not really zlib")
    wait_received(platform, 12)
    errors = platform.schema_errors()
    assert len(errors) == 10, errors
    assert "seq=2" in errors[0] and "device 2, but map" in errors[0]
    assert "seq=3" in errors[1] and "offset 2, but device 0 has 2 points" in errors[1]
    assert "seq=4" in errors[2] and "null but not bad" in errors[2]
    assert "seq=5" in errors[3] and "listed twice" in errors[3]
    assert "seq=6" in errors[4] and "no reading of this message" in errors[4]
    assert "seq=7" in errors[5] and "2 times for 1 values" in errors[5]
    assert "seq=8" in errors[6] and "$.q[0][2]" in errors[6]
    assert "is not the digest of its devices" in errors[7]
    assert "'ipc-02'" in errors[8]
    assert "nor zlib-compressed JSON" in errors[9]
    assert platform.report().agent(AGENT).readings == 3


@pytest.mark.timeout(30)
def test_payload_naming_another_agent_than_its_topic_is_rejected(
    platform: PlatformSimulator, publish: Publish, prefix: str
) -> None:
    publish(f"{prefix}/{ENTERPRISE}/ipc-02/data", data(1, [reading("LT-101", T0, 1.0)]))
    publish(f"{prefix}/{ENTERPRISE}/{AGENT}/alarm", alarm(2, "GT-201", "high", "raised", 30.0, 25.0) | {"id": "X/high"})
    publish(f"{prefix}/{ENTERPRISE}/{AGENT}/telemetry", data(3, [reading("LT-101", T0, 1.0)]))
    publish(f"{prefix}/{ENTERPRISE}/{AGENT}/config/set", b"what the platform itself sends: not checked")
    wait_received(platform, 4)

    errors = platform.schema_errors()
    assert len(errors) == 3, errors
    assert "'ipc-02'" in errors[0]
    assert "alarm id 'X/high' is not point/type" in errors[1]
    assert "unknown message kind 'telemetry'" in errors[2]
    assert platform.report().agents == {}


@pytest.mark.timeout(30)
def test_retained_status_and_health_are_kept(broker: int, publish: Publish, prefix: str) -> None:
    root = f"{prefix}/{ENTERPRISE}/{AGENT}"
    online = {
        "v": 1, "online": True, "agent": AGENT, "enterprise": ENTERPRISE, "version": "0.1.0",
        "config_version": "2026-11-28.1", "started": T0, "ts": T0 + 123,
    }  # fmt: skip
    publish(f"{root}/status", online, retain=True)  # before the platform subscribes
    with PlatformSimulator("127.0.0.1", broker, prefix) as platform:
        will = {"v": 1, "online": False, "agent": AGENT, "enterprise": ENTERPRISE}
        publish(f"{root}/status", will, retain=True)
        health = {
            "v": 1, "ts": T0, "agent": AGENT, "enterprise": ENTERPRISE, "uptime_s": 60,
            "backlog": {"messages": 0, "readings": 0, "oldest_age_s": None}, "evicted_readings": 0,
            "channels": [{"id": "tankfarm", "link": "down",
                          "devices": [{"id": "plc1", "state": "failing", "last_error": "timeout"}]}],
            "points": {"good": 0, "uncertain": 0, "bad": 2}, "cpu_percent": 1.0, "rss_mb": 40.0,
            "disk_free_mb": 1000.0,
        }  # fmt: skip
        publish(f"{root}/health", health)
        publish(f"{root}/health", health | {"backlog": {"messages": 0, "readings": 0, "oldest_age_s": 3.0}})
        wait_received(platform, 4)
        assert platform.statuses() == [online, will]
        assert platform.health() == [health]
        assert len(platform.schema_errors()) == 1 and "oldest_age_s" in platform.schema_errors()[0]
        publish(f"{root}/status", b"", retain=True)  # clearing the retained status is not a message
        wait_received(platform, 5)
        assert len(platform.schema_errors()) == 1


@pytest.mark.timeout(30)
def test_on_message_hook_sees_each_accepted_message(broker: int, publish: Publish, prefix: str) -> None:
    seen: list[tuple[str, dict[str, Any]]] = []

    def hook(topic: str, msg: dict[str, Any]) -> None:
        seen.append((topic, msg))
        if len(seen) == 1:
            raise RuntimeError("a failing hook must not stop the platform")

    root = f"{prefix}/{ENTERPRISE}/{AGENT}"
    with PlatformSimulator("127.0.0.1", broker, prefix, on_message=hook) as platform:
        first, second = data(1, [reading("LT-101", T0, 1.0)]), data(2, [reading("LT-101", T0 + 1, 2.0)])
        publish(f"{root}/data", first)
        publish(f"{root}/data", b"not json")
        publish(f"{root}/data", second)
        wait_received(platform, 3)
    assert seen == [(f"{root}/data", first), (f"{root}/data", second)]
    assert platform.report().agent(AGENT).readings == 2


@pytest.mark.timeout(60)
def test_full_batches_at_speed_all_arrive(platform: PlatformSimulator, publish: Publish, prefix: str) -> None:
    points = [f"GT-{i:03d}" for i in range(500)]
    root = f"{prefix}/{ENTERPRISE}/{AGENT}"
    for seq in range(1, 101):
        publish(f"{root}/data", data(seq, [reading(p, T0 + seq * 1000, seq + i / 8) for i, p in enumerate(points)]))
    wait_received(platform, 100)
    assert platform.schema_errors() == []
    report = platform.report().agent(AGENT)
    assert (report.readings, report.seq_min, report.seq_max, report.gaps) == (50_000, 1, 100, [])


@pytest.mark.timeout(60)
def test_messages_published_while_the_broker_restarted_still_arrive(prefix: str) -> None:
    # Not under tmp_path: pytest's folders are private to root, and mosquitto saves its sessions as user mosquitto.
    folder = Path(tempfile.mkdtemp(prefix="platform-sim-mosquitto-"))
    mosquitto = Mosquitto(folder, persistent=True)
    mosquitto.start()
    root = f"{prefix}/{ENTERPRISE}/{AGENT}"

    def send(seq: int) -> None:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"test-pub-{seq}")
        client.connect("127.0.0.1", mosquitto.port)
        client.loop_start()
        message = data(seq, [reading("LT-101", T0 + seq, 1.0)])
        client.publish(f"{root}/data", json.dumps(message), qos=1).wait_for_publish(5)
        client.disconnect()
        client.loop_stop()

    try:
        with PlatformSimulator("127.0.0.1", mosquitto.port, prefix) as platform:
            send(1)
            mosquitto.stop()
            mosquitto.start()
            send(2)  # most likely before the simulator is back: the broker queues it in our session
            assert platform.wait_for(lambda p: p.received() >= 2 and p.connected, timeout=15)
            report = platform.report().agent(AGENT)
            assert (report.seq_min, report.seq_max, report.gaps) == (1, 2, [])
    finally:
        mosquitto.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.timeout(30)
def test_start_fails_clearly_when_the_broker_is_unreachable() -> None:
    simulator = PlatformSimulator("127.0.0.1", _free_port(), "edge")
    with pytest.raises(PlatformSimulatorError, match=r"unreachable for 0\.5 s"):
        simulator.start(timeout=0.5)
    assert simulator.report().agents == {}


@pytest.mark.timeout(60)
def test_command_line_prints_messages_and_exits_1_on_a_gap(broker: int, publish: Publish, prefix: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "simulators.platform", "--broker", f"127.0.0.1:{broker}", "--prefix", prefix,
         "--duration", "3"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("listening on"), first
        root = f"{prefix}/{ENTERPRISE}/{AGENT}"
        publish(f"{root}/data", data(1, [reading("LT-101", T0, 12.5)]))
        publish(f"{root}/data", data(3, [reading("LT-101", T0 + 1000, 12.75)]))
        publish(f"{root}/alarm", b"{")
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, out
    assert "seq=1 live 1 readings: LT-101=12.5" in out
    assert "REJECTED" in out and "not UTF-8 JSON" in out
    assert f"{ENTERPRISE}/{AGENT}: 2 messages (seq 1..3" in out and "1 missing [2]" in out


# -- the contract documents -----------------------------------------------------------------------------------

EXAMPLE = re.compile(r"<!-- example: ([\w-]+) -->\n```json\n(.*?)\n```", re.DOTALL)
COMMAND_KINDS = ("cmd", "cmd-result", "config-set", "config-result")


def protocol_examples() -> list[tuple[str, dict[str, Any]]]:
    text = PROTOCOL.read_text(encoding="utf-8")
    examples = [(kind, json.loads(body)) for kind, body in EXAMPLE.findall(text)]
    assert len(examples) == text.count("```json"), "every ```json block needs an <!-- example: kind --> line"
    return examples


@pytest.mark.timeout(30)
def test_every_example_in_the_protocol_page_validates_against_its_schema() -> None:
    validators = load_validators()
    examples = protocol_examples()
    assert {kind for kind, _ in examples} == set(KINDS) | set(COMMAND_KINDS) | set(COMPACT_SCHEMAS)
    import jsonschema  # type: ignore[import-untyped,unused-ignore]

    validators["cmd"] = jsonschema.Draft202012Validator(json.loads((ROOT / "docs/schemas/cmd.schema.json").read_text()))
    validators["cmd-result"] = validators["cmd/result"]
    for name in ("config-set", "config-result"):
        validators[name] = jsonschema.Draft202012Validator(
            json.loads((ROOT / f"docs/schemas/{name}.schema.json").read_text()))
    for kind, example in examples:
        errors = [f"{e.json_path}: {e.message}" for e in validators[kind].iter_errors(example)]
        assert errors == [], f"{kind} example {example}"


@pytest.mark.timeout(30)
def test_every_example_in_the_protocol_page_is_accepted_by_the_platform(
    platform: PlatformSimulator, publish: Publish, prefix: str
) -> None:
    examples = [(kind, example) for kind, example in protocol_examples() if kind in KINDS + COMPACT_SCHEMAS]
    # a compact message needs its map first; the map goes on map/{id}, compact data on data
    examples.sort(key=lambda item: item[0] != "map")
    for kind, example in examples:
        leaf = {"map": f"map/{example.get('map')}", "data-v2": "data"}.get(kind, kind)
        publish(f"{prefix}/{example['enterprise']}/{example['agent']}/{leaf}", example)
    wait_received(platform, len(examples))
    assert platform.schema_errors() == [] and platform.waiting_for_maps() == 0


def test_compact_examples_carry_the_readings_of_the_version_1_examples_of_their_seq() -> None:
    examples = protocol_examples()
    decoder = DataDecoder()
    for kind, example in examples:
        if kind == "map":
            decoder.add_map(json.dumps(example).encode())
    plain = {e["seq"]: e for kind, e in examples if kind == "data"}
    compact = [e for kind, e in examples if kind == "data-v2"]
    assert compact and decoder.maps
    for example in compact:
        rows = decoder.rows(json.dumps(example).encode())
        assert len(rows) == count_readings(zlib.compress(json.dumps(example).encode()))
        if example["seq"] in plain:
            assert sorted(rows, key=repr) == sorted(decoder.rows(json.dumps(plain[example["seq"]]).encode()), key=repr)


def _mutations(msg: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Valid and invalid variants of a data message, one change each."""
    bad_values: dict[str, list[Any]] = {
        "v": [0, 2, True, 1.5, "1", None],
        "seq": [-1, 1.5, "1", True, None, 2**53, 2**53 - 1, 0],
        "hist": [0, 1, "true", None, True],
        "agent": ["", "-x", "a/b", "x" * 64, "x" * 65, 5, None, "a b", "ipc.01_b-2"],
        "enterprise": ["", "a.b", "x" * 65, 5, "A_b-1"],
        "readings": [[], {}, None, "x", [1], [reading("P", T0, 1.0)] * 5000, [reading("P", T0, 1.0)] * 5001],
    }
    for key, values in bad_values.items():
        for value in values:
            yield msg | {key: value}
        yield {k: v for k, v in msg.items() if k != key}
    yield msg | {"extra": 1}
    reading_values: dict[str, list[Any]] = {
        "point": ["", "-P", "P/1", "P" * 65, 1, None, "P 1", ["P"], "p.1_x-Y"],
        "ts": [-1, 1.5, "1", True, None, 0, T0 * 1000],
        "value": ["1", [], {}, None, True, 0, -1e300, 3],
        "quality": ["GOOD", "", None, 1, ["good"], "bad", "uncertain"],
        "reason": ["comm", "spike", "gremlins", None, 1, ""],  # on a good reading: always wrong
    }
    for key, values in reading_values.items():
        for value in values:
            changed = copy.deepcopy(msg)
            changed["readings"][1][key] = value
            yield changed
        changed = copy.deepcopy(msg)
        changed["readings"][1].pop(key, None)
        yield changed
    for extra in ({"unit": "m"}, {"quality": "bad", "value": None}, {"quality": "bad", "value": None, "reason": "comm"},
                  {"quality": "uncertain", "reason": "spike"}, {"quality": "uncertain", "reason": "gremlins"}):
        changed = copy.deepcopy(msg)
        changed["readings"][1] |= extra
        yield changed
    yield msg | {"readings": [*msg["readings"], "not a reading"]}


@pytest.mark.timeout(60)
def test_fast_data_check_never_accepts_what_the_schema_rejects() -> None:
    schema = load_validators()["data"]
    valid = data(7, [reading("LT-101", T0, 12.53), reading("XV-101", T0, True), reading("GT-201", T0, None, "bad")])
    fast = _FastDataCheck()
    assert fast(valid), "the fast path must take ordinary data messages"
    accepted = 0
    for variant in _mutations(valid):
        if fast(variant):
            accepted += 1
            assert schema.is_valid(variant), f"fast check accepted an invalid message: {variant}"
    assert accepted >= 10  # the valid variants really went through the fast path

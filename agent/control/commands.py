"""Commands from the platform (topic `cmd`) and from the local CLI (the control socket), one handler for both.

Every request gets exactly one result carrying its id, `ok`, and either a `result` or an `error` that names
the field at fault, quoting what it got in a bounded form. A malformed, unknown, retained, stale or refused
command changes nothing. A command repeated with the same id (MQTT delivers at least once) gets the first
result again and is not done twice, across restarts too; the platform and local users have separate id spaces.
A command carrying a `sig` is done only if the signature verifies against the platform's keys (and, from the
platform, names this agent and carries `ts`); with `require_signed_cmd` an unsigned platform command is refused.
Nothing here raises on any input.
"""

from __future__ import annotations

import hashlib
import logging
import reprlib
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol, Union

import orjson
from pydantic import Field, TypeAdapter, ValidationError

from agent.config.base import Model
from agent.config.models import AgentConfig
from agent.errors import ResetRefused
from agent.trust.canonical import SIG, NotCanonical, loads_strict
from agent.trust.keys import TrustedKeys
from agent.trust.signing import REFUSAL_KINDS, RefusalKind, SignatureRefused, verify

if TYPE_CHECKING:  # the library is loaded only when a key is used (it costs 8 MB)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

log = logging.getLogger(__name__)

MAX_COMMAND_BYTES = 64 * 1024
_REMEMBERED = 256  # ids kept in memory per source
_KEPT = 1000  # ids of state-changing commands kept in the store per source
SOURCES = ("platform", "local")
PLATFORM_ONLY = ("set_production_state",)  # a local user must not switch off the halt-violation rule

_QUOTE = reprlib.Repr()
_QUOTE.maxstring = 60
_QUOTE.maxother = 60
_QUOTE.maxlevel = 2
_QUOTE.maxlist = _QUOTE.maxdict = 4


def quote(value: object) -> str:
    """A short, bounded repr of untrusted input: never deep, never long, never raises."""
    try:
        return _QUOTE.repr(value)
    except Exception:
        return f"<{type(value).__name__}>"


class _Command(Model):
    v: Literal[1] = Field(1, description="Contract version.")
    id: Annotated[str, Field(min_length=1, max_length=128)] = Field(description="Correlates the result.")
    ts: int | None = Field(None, description="When the platform sent it (ms); too old or too far ahead: refused.")
    agent: Annotated[str, Field(max_length=64)] | None = Field(None, description="The agent it is for.")
    enterprise: Annotated[str, Field(max_length=64)] | None = Field(None, description="That agent's enterprise.")


class ResetCommand(_Command):
    cmd: Literal["reset"]
    alarm: Annotated[str, Field(min_length=3, max_length=160)] = Field(description="Alarm id, point/type.")


class ProductionStateCommand(_Command):
    cmd: Literal["set_production_state"]
    state: Literal["normal", "halted"]


class StatusCommand(_Command):
    cmd: Literal["status"]


Command = Annotated[Union[ResetCommand, ProductionStateCommand, StatusCommand], Field(discriminator="cmd")]  # noqa: UP007
KNOWN = ("reset", "set_production_state", "status")
_FIELD_TYPES = {"v": int, "id": str, "ts": int, "cmd": str, "alarm": str, "state": str, "agent": str,
                "enterprise": str}
_JSON_TYPE = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
              type(None): "null"}


class CommandIds(Protocol):
    """Where the ids of commands that changed something are kept over restarts (the store)."""

    def command_result(self, source: str, cmd_id: str) -> tuple[str, bytes] | None: ...

    def save_command_result(self, source: str, cmd_id: str, digest: str, result: bytes, keep: int) -> None: ...


@dataclass(frozen=True)
class CommandTrust:
    """What a signed command is checked against: the platform's keys, whether a platform command must be signed,
    and the agent a signed platform command must name (so one signed for another agent cannot be replayed here)."""

    keys: Mapping[str, Ed25519PublicKey] = field(default_factory=TrustedKeys)
    require_signed: bool = False
    agent: str | None = None
    enterprise: str | None = None

    @classmethod
    def of(cls, config: AgentConfig) -> CommandTrust:
        return cls(TrustedKeys.from_texts(config.remote_config.keys), config.remote_config.require_signed_cmd,
                   config.agent.id, config.agent.enterprise)


class CommandHandler:
    def __init__(self, reset: Callable[[str], dict[str, Any]], set_production_state: Callable[[str], dict[str, Any]],
                 status: Callable[[], dict[str, Any]], *, ids: CommandIds | None = None, max_age: float = 600.0,
                 clock: Callable[[], float] = time.time, trust: CommandTrust | None = None) -> None:
        self._reset = reset
        self._set_state = set_production_state
        self._status = status
        self._ids = ids
        self._max_age_ms = max_age * 1000
        self._clock = clock
        self._trust = trust or CommandTrust()
        self._done: dict[str, OrderedDict[str, tuple[str, dict[str, Any]]]] = {s: OrderedDict() for s in SOURCES}
        self.refused = 0  # requests answered with an error
        # commands refused for their signature, by SignatureRefused.kind (also counted in `refused`)
        self.signature_refused: dict[RefusalKind, int] = dict.fromkeys(REFUSAL_KINDS, 0)

    def reconfigure(self, trust: CommandTrust, max_age: float) -> None:
        """A new configuration: its keys and agent, and its command age window, from the next command on."""
        self._trust = trust
        self._max_age_ms = max_age * 1000

    def handle(self, payload: bytes, source: str = "platform", *, retained: bool = False,
               caller: str = "") -> dict[str, Any]:
        """The result of one request; never raises."""
        try:
            outcome = self._handle(payload, source, retained)
        except Exception as exc:  # a bug here must cost one answer, never the uplink or the socket
            log.exception("%s command could not be handled", source)
            outcome = self._error(None, None, f"internal error: {type(exc).__name__}")
        if not outcome["ok"]:
            self.refused += 1
        who = f" from {caller}" if caller else ""
        log.info("%s command%s %s (%s): %s", source, who, outcome["cmd"], quote(outcome["id"]),
                 "ok" if outcome["ok"] else outcome["error"])
        return outcome

    def _handle(self, payload: bytes, source: str, retained: bool) -> dict[str, Any]:
        if len(payload) > MAX_COMMAND_BYTES:
            return self._error(None, None, f"command of {len(payload)} bytes is larger than {MAX_COMMAND_BYTES}")
        try:
            raw = orjson.loads(payload)
        except (orjson.JSONDecodeError, RecursionError) as exc:
            return self._error(None, None, f"not JSON: {quote(str(exc))}")
        if not isinstance(raw, dict):
            return self._error(None, None, "a command is a JSON object")
        cmd_id = raw.get("id") if isinstance(raw.get("id"), str) else None
        name = raw.get("cmd") if isinstance(raw.get("cmd"), str) and raw.get("cmd") in KNOWN else None
        signed = SIG in raw
        if signed or (source == "platform" and self._trust.require_signed):
            try:
                raw = self._verified(payload, raw)
            except SignatureRefused as exc:
                self.signature_refused[exc.kind] += 1
                return self._error(cmd_id, name, str(exc))
        # types first: nothing below (validation, messages, the id digest) ever sees a nested or odd value
        for key, value in raw.items():
            expected = _FIELD_TYPES.get(key)
            if isinstance(value, dict | list) or (expected is not None and value is not None and (
                    not isinstance(value, expected) or isinstance(value, bool))):
                want = {str: "a string", int: "an integer"}.get(expected, "a plain value")  # type: ignore[arg-type]
                return self._error(cmd_id, name, f"{quote(key)[1:-1]}: must be {want}, not a JSON "
                                                 f"{_JSON_TYPE.get(type(value), 'value')}")
        if isinstance(raw.get("cmd"), str) and raw["cmd"] not in KNOWN:
            return self._error(cmd_id, None, f"unknown command {quote(raw['cmd'])}; known: {', '.join(KNOWN)}")
        try:
            command = _validate(raw)
        except ValidationError as exc:
            return self._error(cmd_id, name, "; ".join(_describe(e) for e in exc.errors(include_url=False)))
        if retained:
            return self._error(command.id, command.cmd, "a retained command is refused: commands are never "
                                                        "retained (publish with retain=false)")
        if source == "platform" and command.ts is not None:
            stale = age_error(command.ts, self._clock() * 1000, self._max_age_ms)
            if stale:
                return self._error(command.id, command.cmd, stale)
        if source != "platform" and command.cmd in PLATFORM_ONLY:
            return self._error(command.id, command.cmd, f"{command.cmd} is only taken from the platform")
        wrong_target = self._wrong_target(command, signed=signed and source == "platform")
        if wrong_target:
            return self._error(command.id, command.cmd, wrong_target)
        digest = hashlib.blake2b(orjson.dumps(raw, option=orjson.OPT_SORT_KEYS), digest_size=16).hexdigest()
        done = self._recall(source, command.id)
        if done is not None:
            if done[0] != digest:
                return self._error(command.id, command.cmd, f"id {quote(command.id)} was already used for another "
                                                            "command; use a new id")
            return done[1]
        try:
            result = self._run(command)
            outcome = {"v": 1, "id": command.id, "cmd": command.cmd, "ok": True, "result": result}
        except (ResetRefused, ValueError) as exc:
            outcome = self._error(command.id, command.cmd, str(exc))
        except Exception as exc:  # a bug in a command must not take the uplink down
            log.exception("command %s %s failed", command.cmd, quote(command.id))
            outcome = self._error(command.id, command.cmd, f"internal error: {type(exc).__name__}")
        self._remember(source, command.id, digest, outcome, durable=command.cmd != "status")
        return outcome

    def _verified(self, payload: bytes, raw: dict[str, Any]) -> dict[str, Any]:
        if SIG not in raw:
            raise SignatureRefused("unsigned", "sig: missing: the platform's commands must be signed "
                                               "(remote_config.require_signed_cmd)")
        return verified(payload, self._trust.keys)[0]

    def _wrong_target(self, command: ResetCommand | ProductionStateCommand | StatusCommand, *, signed: bool) -> str:
        return target_error(command.agent, command.enterprise, command.ts, self._trust, signed=signed)

    def _recall(self, source: str, cmd_id: str) -> tuple[str, dict[str, Any]] | None:
        done = self._done.setdefault(source, OrderedDict()).get(cmd_id)
        if done is None and self._ids is not None:
            stored = self._ids.command_result(source, cmd_id)
            if stored is not None:
                done = (stored[0], orjson.loads(stored[1]))
        return done

    def _remember(self, source: str, cmd_id: str, digest: str, outcome: dict[str, Any], *, durable: bool) -> None:
        memory = self._done.setdefault(source, OrderedDict())
        memory[cmd_id] = (digest, outcome)
        while len(memory) > _REMEMBERED:
            memory.popitem(last=False)
        if durable and self._ids is not None:
            self._ids.save_command_result(source, cmd_id, digest, orjson.dumps(outcome), _KEPT)

    def _run(self, command: ResetCommand | ProductionStateCommand | StatusCommand) -> dict[str, Any]:
        if isinstance(command, ResetCommand):
            return self._reset(command.alarm)
        if isinstance(command, ProductionStateCommand):
            return self._set_state(command.state)
        return self._status()

    @staticmethod
    def _error(cmd_id: str | None, name: str | None, message: str) -> dict[str, Any]:
        return {"v": 1, "id": cmd_id, "cmd": name, "ok": False, "error": message}


# --- the checks every message from the platform gets (commands here, configurations in agent.control.pushes) -----


def verified(payload: bytes, keys: Mapping[str, Ed25519PublicKey]) -> tuple[dict[str, Any], str]:
    """The message in `payload` without its `sig`, read again strictly (no member given twice: what was verified
    is what runs), and the id of the key that signed it, once its signature verifies against `keys`;
    SignatureRefused otherwise."""
    try:
        strict = loads_strict(payload)
    except NotCanonical as exc:
        raise SignatureRefused("not_canonical", f"cannot be signed: {exc}") from None
    kid = verify(strict, keys)
    return {key: value for key, value in strict.items() if key != SIG}, kid


def target_error(agent: str | None, enterprise: str | None, ts: int | None, trust: CommandTrust, *,
                 signed: bool, noun: str = "command") -> str:
    """Why a message naming `agent`/`enterprise` is not for this agent, or ''. A signed one must say whom it is for
    and when it was sent: else it could be replayed to another agent, or here long after."""
    for name, theirs, ours in (("agent", agent, trust.agent), ("enterprise", enterprise, trust.enterprise)):
        if theirs is None and signed:
            return f"{name}: required in a signed {noun} (whom it is for)"
        if theirs is not None and ours is not None and theirs != ours:
            return f"{name}: the {noun} is for {quote(theirs)}, this is {quote(ours)}"
    if signed and ts is None:
        return f"ts: required in a signed {noun} (so that it cannot be replayed later)"
    return ""


def age_error(ts: int, now_ms: float, max_age_ms: float) -> str:
    """Why a message sent at `ts` (ms) is refused as too old or too far ahead of the agent's clock, or ''."""
    age = now_ms - ts
    if abs(age) <= max_age_ms:
        return ""
    return (f"ts is {abs(age) / 1000:.0f}s {'old' if age > 0 else 'ahead of the agent clock'}: refused (the window "
            f"is {max_age_ms / 1000:.0f}s; check both clocks)")


_ADAPTER: TypeAdapter[ResetCommand | ProductionStateCommand | StatusCommand] = TypeAdapter(Command)


def _validate(raw: dict[str, Any]) -> ResetCommand | ProductionStateCommand | StatusCommand:
    return _ADAPTER.validate_python(raw)


def _describe(error: Any) -> str:
    loc = ".".join(quote(part)[1:-1] if isinstance(part, str) else str(part)
                   for part in error["loc"] if part not in KNOWN)
    if error["type"] == "missing":
        return f"{loc}: required field is missing"
    if error["type"] == "literal_error":
        return f"{loc}: {quote(error.get('input'))} is not one of {error['ctx']['expected']}"
    if error["type"] == "extra_forbidden":
        return f"{loc}: unknown field"
    if error["type"] == "union_tag_not_found":
        return f"cmd: required field is missing (one of {', '.join(KNOWN)})"
    if error["type"] == "union_tag_invalid":
        return f"cmd: {quote(error.get('input', {}).get('cmd'))} is not one of {', '.join(KNOWN)}"
    return f"{loc}: {error['msg']}"

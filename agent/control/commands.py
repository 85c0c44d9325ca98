"""Commands from the platform (topic `cmd`) and from the local CLI (the control socket), one handler for both.

Every request gets exactly one result carrying its id, `ok`, and either a `result` or an `error` that names
the field at fault. A malformed or unknown command changes nothing. A command repeated with the same id
(MQTT delivers at least once) gets the first result again and is not done twice.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Annotated, Any, Literal, Union

import orjson
from pydantic import Field, TypeAdapter, ValidationError

from agent.config.base import Model
from agent.errors import ResetRefused

log = logging.getLogger(__name__)

MAX_COMMAND_BYTES = 64 * 1024
_REMEMBERED = 256


class _Command(Model):
    v: Literal[1] = Field(1, description="Contract version.")
    id: Annotated[str, Field(min_length=1, max_length=128)] = Field(description="Correlates the result.")
    ts: int | None = Field(None, description="When the platform sent it (ms), informative.")


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


class CommandHandler:
    def __init__(self, reset: Callable[[str], dict[str, Any]], set_production_state: Callable[[str], dict[str, Any]],
                 status: Callable[[], dict[str, Any]]) -> None:
        self._reset = reset
        self._set_state = set_production_state
        self._status = status
        self._done: OrderedDict[str, tuple[int, dict[str, Any]]] = OrderedDict()

    def handle(self, payload: bytes, source: str = "platform") -> dict[str, Any]:
        """The result of one request; never raises."""
        if len(payload) > MAX_COMMAND_BYTES:
            return self._error(None, None, f"command of {len(payload)} bytes is larger than {MAX_COMMAND_BYTES}")
        try:
            raw = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            return self._error(None, None, f"not JSON: {exc}")
        if not isinstance(raw, dict):
            return self._error(None, None, "a command is a JSON object")
        cmd_id = raw.get("id") if isinstance(raw.get("id"), str) else None
        name = raw.get("cmd") if isinstance(raw.get("cmd"), str) else None
        if name is not None and name not in KNOWN:
            return self._error(cmd_id, name, f"unknown command {name!r}; known: {', '.join(KNOWN)}")
        try:
            command = _validate(raw)
        except ValidationError as exc:
            return self._error(cmd_id, name, "; ".join(_describe(e) for e in exc.errors(include_url=False)))
        digest = hash(orjson.dumps(raw, option=orjson.OPT_SORT_KEYS))
        done = self._done.get(command.id)
        if done is not None:
            if done[0] != digest:
                return self._error(command.id, command.cmd, f"id {command.id!r} was already used for another "
                                                            "command; use a new id")
            return done[1]
        try:
            result = self._run(command)
            outcome = {"v": 1, "id": command.id, "cmd": command.cmd, "ok": True, "result": result}
        except (ResetRefused, ValueError) as exc:
            outcome = self._error(command.id, command.cmd, str(exc))
        except Exception as exc:  # a bug in a command must not take the uplink down
            log.exception("command %s %s failed", command.cmd, command.id)
            outcome = self._error(command.id, command.cmd, f"internal error: {exc!r}")
        log.info("%s command %s (%s): %s", source, command.cmd, command.id,
                 "ok" if outcome["ok"] else outcome["error"])
        self._done[command.id] = (digest, outcome)
        while len(self._done) > _REMEMBERED:
            self._done.popitem(last=False)
        return outcome

    def _run(self, command: ResetCommand | ProductionStateCommand | StatusCommand) -> dict[str, Any]:
        if isinstance(command, ResetCommand):
            return self._reset(command.alarm)
        if isinstance(command, ProductionStateCommand):
            return self._set_state(command.state)
        return self._status()

    @staticmethod
    def _error(cmd_id: str | None, name: str | None, message: str) -> dict[str, Any]:
        return {"v": 1, "id": cmd_id, "cmd": name, "ok": False, "error": message}


_ADAPTER: TypeAdapter[ResetCommand | ProductionStateCommand | StatusCommand] = TypeAdapter(Command)


def _validate(raw: dict[str, Any]) -> ResetCommand | ProductionStateCommand | StatusCommand:
    return _ADAPTER.validate_python(raw)


def _describe(error: Any) -> str:
    loc = ".".join(str(part) for part in error["loc"] if part not in KNOWN)
    if error["type"] == "missing":
        return f"{loc}: required field is missing"
    if error["type"] == "literal_error":
        return f"{loc}: {error.get('input')!r} is not one of {error['ctx']['expected']}"
    if error["type"] == "extra_forbidden":
        return f"{loc}: unknown field"
    if error["type"] == "union_tag_not_found":
        return f"cmd: required field is missing (one of {', '.join(KNOWN)})"
    if error["type"] == "union_tag_invalid":
        return f"cmd: {error.get('input', {}).get('cmd')!r} is not one of {', '.join(KNOWN)}"
    return f"{loc}: {error['msg']}"

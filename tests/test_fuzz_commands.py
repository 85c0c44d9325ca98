"""Fuzz the command handler with what the platform's `cmd` topic and the control socket's lines may carry: any
bytes, any JSON value (deep nesting, huge strings, odd types, duplicate keys, unicode), and commands right or
nearly right.

Every request gets exactly one answer that validates against docs/schemas/cmd-result.schema.json and can be
published; the reset and production-state actions run only for a valid command, judged here apart from the
handler, and a repeated id never runs twice. Example counts come from the hypothesis profiles in
tests/conftest.py (a long run: EDGE_FUZZ=long pytest this file).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import orjson
from hypothesis import given
from hypothesis import strategies as st

from agent.control.commands import MAX_COMMAND_BYTES, CommandHandler
from agent.errors import ResetRefused

ROOT = Path(__file__).resolve().parent.parent
RESULT = jsonschema.Draft202012Validator(
    json.loads((ROOT / "docs" / "schemas" / "cmd-result.schema.json").read_text(encoding="utf-8")))
NOW = 1_750_000_000.0  # the handler's clock, in seconds
MAX_AGE = 600.0
FIELDS = {"reset": {"alarm"}, "set_production_state": {"state"}, "status": set()}
REFUSED_ALARM = "GT-9/refused"  # the reset action refuses this one, as it would an alarm that is not latched

Action = tuple[str, ...]


class Ids:
    """The store's side of CommandIds, in memory: what a restarted handler recalls."""

    def __init__(self) -> None:
        self.kept: dict[tuple[str, str], tuple[str, bytes]] = {}

    def command_result(self, source: str, cmd_id: str) -> tuple[str, bytes] | None:
        return self.kept.get((source, cmd_id))

    def save_command_result(self, source: str, cmd_id: str, digest: str, result: bytes, keep: int) -> None:
        self.kept[(source, cmd_id)] = (digest, result)


def handler(ids: Ids | None = None) -> tuple[CommandHandler, list[Action]]:
    actions: list[Action] = []

    def reset(alarm: str) -> dict[str, Any]:
        actions.append(("reset", alarm))
        if alarm == REFUSED_ALARM:
            raise ResetRefused(f"{alarm} is not latched")
        return {"alarm": alarm}

    def state(value: str) -> dict[str, Any]:
        actions.append(("state", value))
        return {"production_state": value}

    def status() -> dict[str, Any]:
        actions.append(("status",))
        return {"points": 3}

    return CommandHandler(reset, state, status, ids=ids, max_age=MAX_AGE, clock=lambda: NOW), actions


def parsed(payload: bytes) -> Any:
    """The payload as JSON, or None when it is too long or not JSON (orjson's reading: last duplicate key wins)."""
    if len(payload) > MAX_COMMAND_BYTES:
        return None
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None


def expected_action(payload: bytes, source: str, retained: bool) -> Action | None:
    """What a request must do, judged from the contract rather than the handler's code: None unless valid."""
    raw = parsed(payload)
    if not isinstance(raw, dict) or retained:
        return None
    cmd = raw.get("cmd")
    if not isinstance(cmd, str) or cmd not in FIELDS or not set(raw) <= {"v", "id", "ts", "cmd"} | FIELDS[cmd]:
        return None
    v, cmd_id, ts = raw.get("v", 1), raw.get("id"), raw.get("ts")
    if type(v) is not int or v != 1 or not isinstance(cmd_id, str) or not 1 <= len(cmd_id) <= 128:
        return None
    if ts is not None and (type(ts) is not int or (source == "platform" and abs(NOW * 1000 - ts) > MAX_AGE * 1000)):
        return None
    if cmd == "reset":
        alarm = raw.get("alarm")
        return ("reset", alarm) if isinstance(alarm, str) and 3 <= len(alarm) <= 160 else None
    if cmd == "set_production_state":
        state = raw.get("state")
        return ("state", state) if source == "platform" and state in ("normal", "halted") else None
    return ("status",)


def check_answer(answer: Any, payload: bytes) -> None:
    """One answer of the contract's shape, publishable, correlated with the request's id when it had one."""
    assert isinstance(answer, dict)
    RESULT.validate(answer)
    orjson.dumps(answer)  # the uplink and the control socket send it as JSON
    raw = parsed(payload)
    if answer["id"] is not None:
        assert isinstance(raw, dict) and answer["id"] == raw.get("id")
    if answer["cmd"] is not None:
        assert isinstance(raw, dict) and answer["cmd"] == raw.get("cmd")
    if not answer["ok"]:
        assert len(answer["error"]) < 1000, "an error quotes what it got in a bounded form"


# --- what a request may carry -----------------------------------------------------------------------------------

NOW_MS = int(NOW * 1000)
huge_text = st.integers(0, 70_000).map(lambda n: "x" * n)
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-(2**70), 2**70),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(), huge_text)
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                             st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)
good_values = {
    "v": st.sampled_from([1, 1, 1, 0, 2, 1.0, True, "1"]),
    "id": st.one_of(st.text(min_size=1, max_size=10), st.text(min_size=120, max_size=140), st.just("")),
    "ts": st.one_of(st.integers(NOW_MS - 700_000, NOW_MS + 700_000), st.integers(), st.just(NOW_MS),
                    st.just(float(NOW_MS)), st.just(str(NOW_MS))),
    "cmd": st.one_of(st.sampled_from(["reset", "set_production_state", "status"]), st.text(max_size=25)),
    "alarm": st.one_of(st.sampled_from(["GT-101/high", "GT-101/high_high", REFUSED_ALARM, "ab", "x" * 161]),
                       st.text(min_size=3, max_size=12)),
    "state": st.one_of(st.sampled_from(["normal", "halted", "Halted", "off", ""]), st.text(max_size=8)),
}
keys = st.one_of(st.sampled_from(list(good_values)), st.sampled_from(list(good_values)), st.text(max_size=6))


@st.composite
def fields(draw: st.DrawFn) -> list[tuple[str, Any]]:
    """Key/value pairs of a command-shaped object; keys may repeat, values may be right or anything at all."""
    pairs = []
    for key in draw(st.lists(keys, max_size=7)):
        value = draw(st.one_of(good_values.get(key, json_values), json_values)) if key in good_values \
            else draw(json_values)
        pairs.append((key, value))
    return pairs


def text_of(pairs: list[tuple[str, Any]], ascii_only: bool) -> bytes:
    """A JSON object written pair by pair, so a key can appear twice as it can on the wire."""
    return ("{" + ",".join(f"{json.dumps(k, ensure_ascii=ascii_only)}:{json.dumps(v, ensure_ascii=ascii_only)}"
                           for k, v in pairs) + "}").encode("utf-8", "surrogatepass")


@st.composite
def commands(draw: st.DrawFn) -> bytes:
    """A command that is often valid: the right fields with right values, each maybe spoiled."""
    cmd = draw(st.sampled_from(["reset", "set_production_state", "status"]))
    body: dict[str, Any] = {"id": draw(st.sampled_from(["a", "b", "c"])), "cmd": cmd}
    if cmd == "reset":
        body["alarm"] = draw(st.sampled_from(["GT-101/high", "GT-102/high", REFUSED_ALARM]))
    elif cmd == "set_production_state":
        body["state"] = draw(st.sampled_from(["normal", "halted"]))
    if draw(st.booleans()):
        body["v"] = 1
    if draw(st.booleans()):
        body["ts"] = NOW_MS - draw(st.integers(0, 1_000_000))
    pairs = list(body.items())
    if draw(st.integers(0, 3)) == 0:
        pairs = draw(st.permutations(pairs)) + draw(fields())
    return text_of(pairs, draw(st.booleans()))


@st.composite
def nested(draw: st.DrawFn) -> bytes:
    """A valid command with one value nested deeper than any parser should follow."""
    depth = draw(st.sampled_from([1, 10, 1000, 1023, 1024, 1025, 5000]))
    opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}"), ('[{"a":', "}]")]))
    key = draw(st.sampled_from(["id", "cmd", "v", "ts", "alarm", "state", "other"]))
    head = b'{"id":"n1","cmd":"set_production_state","state":"halted","'
    return head + key.encode() + b'":' + (opener * depth + "1" + closer * depth).encode() + b"}"


odd_texts = st.sampled_from([
    b'{"id":"\\ud800","cmd":"status"}', b'{"id":"a\\u0000","cmd":"status"}', b'\xef\xbb\xbf{"id":"a","cmd":"status"}',
    b'{"id":"a","cmd":"status","ts":NaN}', b'{"id":"a","cmd":"status","ts":1e400}', b'{"id":"a","cmd":"status"} x',
    b'{"id":"a","cmd":"status"}\n{"id":"b","cmd":"status"}', b'{"id":"a","cmd":"status",}', b"", b" ", b"null",
    b'"status"', b"[]", b"{}", b'{"id":"\xff","cmd":"status"}', b'{"id":"a","cmd":"status","ts":1.0e3}',
    b'{"id":"a","cmd":"status","v":1.0}', b'{"id":"a","cmd":"status","ts":-0}',
    b'{"id":"a","cmd":"status","ts":18446744073709551616}', b'{"id":"a","cmd":"status","ts":-9223372036854775809}',
])
payloads = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.builds(text_of, fields(), st.booleans()),
    commands(),
    nested(),
    odd_texts,
    st.builds(lambda p, n: p + b" " * n, commands(), st.sampled_from([MAX_COMMAND_BYTES - 60, MAX_COMMAND_BYTES])),
)
sources = st.sampled_from(["platform", "platform", "local"])


@given(payloads, sources, st.sampled_from([False, False, False, True]))
def test_any_request_gets_one_valid_answer_and_only_a_valid_command_acts(payload: bytes, source: str,
                                                                          retained: bool) -> None:
    h, actions = handler()
    answer = h.handle(payload, source, retained=retained, caller="uid 1000 pid 1")
    check_answer(answer, payload)
    expected = expected_action(payload, source, retained)
    assert actions == ([expected] if expected is not None else []), (answer, expected)
    refused = expected is None or expected == ("reset", REFUSED_ALARM)
    assert answer["ok"] is not refused, answer
    assert h.refused == (1 if refused else 0)


@given(st.binary(max_size=300).map(lambda b: b + b"\n"))
def test_any_control_socket_line_gets_one_valid_answer(line: bytes) -> None:
    h, actions = handler()
    payload = line.strip()  # what the control socket hands the handler
    answer = h.handle(payload, "local", caller="uid 0 gid 0 pid 1")
    check_answer(answer, payload)
    assert actions == [] or expected_action(payload, "local", False) == actions[0]


@given(st.lists(commands(), min_size=1, max_size=4), st.lists(st.tuples(st.integers(0, 3), sources,
                                                                       st.sampled_from([False] * 4 + [True])),
                                                             max_size=12))
def test_a_command_id_acts_once_and_its_repeat_gets_the_first_answer_across_restarts(
    pool: list[bytes], requests: list[tuple[int, str, bool]]
) -> None:
    ids = Ids()
    h, actions = handler(ids)
    first: dict[tuple[str, str], tuple[Any, dict[str, Any]]] = {}  # (source, id) -> (request, its answer)
    for index, source, restart in requests:
        payload = pool[index % len(pool)]
        if restart:  # a new process: only what changed something was kept in the store
            h, actions = handler(ids)
            first = {k: v for k, v in first.items() if v[1]["cmd"] != "status"}
        before = len(actions)
        answer = h.handle(payload, source)
        check_answer(answer, payload)
        expected = expected_action(payload, source, False)
        if expected is None:
            assert len(actions) == before and not answer["ok"]
            continue
        raw = parsed(payload)
        key = (source, raw["id"])
        if key not in first:
            assert actions[before:] == [expected]
            first[key] = (raw, answer)
        elif raw == first[key][0]:
            assert len(actions) == before and answer == first[key][1], "a repeat is answered again, not redone"
        else:
            assert len(actions) == before and "already used" in answer["error"]

"""Fuzz what a configuration push brings from the broker, and what the agent reads back of its own records of
revisions: any bytes, any JSON value (deep nesting, huge strings, odd types, duplicate members), pushes right or
nearly right, signed or not.

Reading a push raises nothing but PushRefused (whose answer validates against config-result.schema.json and
can be published) or gives a push of the documented shape; a revision file or an active-revision record that is
damaged reads as an error or as nothing, never as a wrong record. Example counts come from the hypothesis
profiles in tests/conftest.py (a long run: EDGE_FUZZ=long pytest this file).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import orjson
from hypothesis import given
from hypothesis import strategies as st

from agent.app.live_config import Active
from agent.config.revisions import Revision, RevisionError, RevisionFiles
from agent.control.commands import CommandTrust
from agent.control.pushes import MAX_ID, Push, PushRefused, read_push, refusal
from agent.trust.keys import TrustedKeys, generate_private_key
from agent.trust.signing import sign_payload

ROOT = Path(__file__).resolve().parent.parent
RESULT = jsonschema.Draft202012Validator(
    json.loads((ROOT / "docs" / "schemas" / "config-result.schema.json").read_text(encoding="utf-8")))
NOW = 1_750_000_000_000
KEY = generate_private_key()
TRUST = CommandTrust(TrustedKeys([KEY.public_key()]), agent="ipc-01", enterprise="e1")

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**63 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=25,
)
members = st.fixed_dictionaries({}, optional={
    "v": st.sampled_from([1, 2, "1", True, None]),
    "id": st.one_of(st.text(min_size=0, max_size=140), json_values),
    "revision": st.one_of(st.integers(min_value=-2, max_value=2**60), json_values),
    "not_after": st.one_of(st.integers(min_value=NOW - 10**6, max_value=NOW + 10**6), json_values),
    "ts": st.one_of(st.integers(min_value=NOW - 10**6, max_value=NOW + 10**6), json_values),
    "agent": st.sampled_from(["ipc-01", "ipc-02", "", None, 7]),
    "enterprise": st.sampled_from(["e1", "e2", None]),
    "config": st.one_of(st.dictionaries(st.text(max_size=10), json_values, max_size=4), json_values),
    "extra": json_values,
})


def read(payload: bytes, *, retained: bool = False, allow_unsigned: bool = False) -> Push | PushRefused:
    try:
        return read_push(payload, retained=retained, trust=TRUST, allow_unsigned=allow_unsigned, max_bytes=1 << 16,
                         now_ms=NOW, max_age_ms=600_000)
    except PushRefused as exc:
        return exc


def check(outcome: Push | PushRefused) -> None:
    if isinstance(outcome, PushRefused):
        answer = refusal(outcome)
        assert list(RESULT.iter_errors(answer)) == [], answer
        assert len(orjson.dumps(answer)) < 20_000, "an answer quotes what it got in a bounded form"
        return
    assert isinstance(outcome.id, str) and 0 < len(outcome.id) <= MAX_ID
    assert isinstance(outcome.revision, int) and outcome.revision >= 1 and isinstance(outcome.config, dict)
    assert outcome.hash.startswith("sha256:")


@given(st.binary(max_size=300), st.booleans(), st.booleans())
def test_any_bytes_are_a_push_or_a_refusal(payload: bytes, retained: bool, allow_unsigned: bool) -> None:
    check(read(payload, retained=retained, allow_unsigned=allow_unsigned))


@given(members, st.booleans(), st.booleans())
def test_pushes_right_or_nearly_right_are_read_or_refused_with_a_valid_answer(
        message: dict[str, Any], signed: bool, allow_unsigned: bool) -> None:
    try:
        payload = sign_payload(message, KEY) if signed else orjson.dumps(message)
    except Exception:  # not signable: then sent as it is
        payload = orjson.dumps(message, option=orjson.OPT_NON_STR_KEYS)
    outcome = read(payload, allow_unsigned=allow_unsigned)
    check(outcome)
    if isinstance(outcome, Push):
        assert outcome.config == message["config"] and outcome.revision == message["revision"]
        assert signed or allow_unsigned, "an unsigned push is taken only when allowed"
        if signed:
            assert message.get("agent") == "ipc-01" and message.get("enterprise") == "e1" and "ts" in message


@given(st.integers(min_value=1, max_value=30), st.integers(min_value=0, max_value=200), st.binary(max_size=8))
def test_a_signed_push_altered_anywhere_is_refused(depth: int, where: int, junk: bytes) -> None:
    config: Any = {"agent": {"id": "ipc-01", "enterprise": "e1"}}
    for _ in range(depth % 5):
        config = {"x": [config]}
    payload = sign_payload({"v": 1, "id": "p", "revision": 3, "ts": NOW, "agent": "ipc-01", "enterprise": "e1",
                            "config": config}, KEY)
    at = where % len(payload)
    altered = payload[:at] + (junk or b"0") + payload[at + 1:]
    outcome = read(altered)
    check(outcome)
    if isinstance(outcome, Push):  # only an alteration that leaves the same JSON (e.g. whitespace) may pass
        assert orjson.loads(altered) == {**orjson.loads(payload)} or outcome.config == config


@given(st.binary(max_size=400))
def test_a_damaged_revision_file_is_an_error_never_a_revision(tmp_path_factory: Any, data: bytes) -> None:
    files = RevisionFiles(tmp_path_factory.mktemp("revisions"))
    files.folder.mkdir()
    files.path(4).write_bytes(data)
    try:
        kept = files.load(4)
    except RevisionError:
        return
    assert isinstance(kept, Revision) and kept.revision == 4


@given(st.one_of(st.binary(max_size=200), st.text(max_size=200), json_values.map(lambda v: orjson.dumps(v)),
                 st.fixed_dictionaries({"revision": json_values, "source": st.sampled_from(["file", "x", None]),
                                        "hash": json_values, "kid": json_values, "id": json_values,
                                        "since": json_values, "previous": json_values, "trial_until": json_values,
                                        "starts": json_values}).map(lambda v: orjson.dumps(v))))
def test_a_damaged_active_revision_record_reads_as_none_or_a_well_typed_record(text: Any) -> None:
    active = Active.from_json(text)
    if active is None:
        return
    assert isinstance(active.revision, int) and isinstance(active.hash, str) and isinstance(active.starts, int)
    assert active.previous is None or Active.from_summary(active.previous) is not None
    assert Active.from_json(active.to_json()) == active

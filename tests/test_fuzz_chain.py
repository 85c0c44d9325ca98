"""Fuzz the seal of stored messages and its verifier; a long run (20,000 examples a test): EDGE_FUZZ=long pytest this
file.

The fast road to a `data` message's entry bytes (agent.seal) gives exactly what the generic RFC 8785 encoder gives,
for every body the agent's encoders write (both versions) and for any values at all; the verifier a platform runs
never raises on any payload, only finds breaks; and a sealed message changed anywhere but in `hist` never passes.
"""

from __future__ import annotations

import math
import os
import struct
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_fuzz_compact import ENCODER, IDENTITY, TABLE, batches

from agent.compact import EntryReady
from agent.core import AlarmEvent, ReadingBatch
from agent.messages import SealReady, alarm_body, data_body, frame
from agent.seal import Sealer, body_entry_bytes
from agent.trust.canonical import NotCanonical, loads_strict
from agent.trust.chain import ChainVerifier, Head, entry_bytes
from agent.trust.keys import TrustedKeys, generate_private_key

pytestmark = pytest.mark.timeout(0 if os.environ.get("EDGE_FUZZ") == "long" else 180)

KEY = generate_private_key()
KEYS = TrustedKeys([KEY.public_key()])
SEALER = Sealer(KEY)
HEAD = Head(41, "alarm", bytes(range(32)))
LINK = {"prev_seq": 41, "prev_topic": "alarm", "prev_hash": "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8"}


def generic(body: bytes, seq: int, chain: dict[str, Any]) -> bytes:
    message = orjson.loads(b"{" + body)
    message.update({"v": 2 if body.startswith(b'"map"') else 1, "seq": seq, "chain": chain})
    return entry_bytes(message)


@given(st.lists(batches(), min_size=1, max_size=4), st.booleans())
def test_the_fast_road_gives_the_generic_bytes_for_every_body_the_encoders_write(
        batch_list: list[ReadingBatch], compact: bool) -> None:
    body = ENCODER.body(batch_list)[0] if compact else data_body(IDENTITY, TABLE.points, batch_list)[0]
    assert body_entry_bytes(body, 42, LINK, data=True) == generic(body, 42, LINK)
    # each encoder's own road is taken exactly when its numbers are written as RFC 8785 writes them
    assert isinstance(body, EntryReady if compact else SealReady) == all(map(written_as_rfc_8785, batch_list))


def written_as_rfc_8785(batch: ReadingBatch) -> bool:
    """Whether the encoders write every value of the batch as RFC 8785 does: the rule (then the seal takes their
    road)."""
    for index, value in zip(batch.indices, batch.values, strict=True):
        if type(value) is int and abs(value) > 2**53 - 1:
            return False
        if type(value) is float and ("e" in TABLE.points[index].json_float % value
                                     or TABLE.points[index].json_float % value == "-0"):
            return False
    return True


@pytest.mark.parametrize("values", [[2**53 + 1], [-(2**53) - 3, 7], [-0.0], [1e-05], [1e16, 2.5], [None, -0.0],
                                    [True, 2**53 + 1], [None, 1e-7], [3, 4.5], [None, 0.25]])
def test_a_compact_body_takes_its_road_only_when_every_number_is_written_as_rfc_8785_writes_it(
        values: list[Any]) -> None:
    point = TABLE.by_id["CT-104"].index  # a 64-bit integer point, written with %.12g: any of these values
    batch = ReadingBatch(1_764_331_200_000, [point] * len(values), values, [2 if v is None else 0 for v in values])
    body = ENCODER.body([batch])[0]
    assert isinstance(body, EntryReady) == written_as_rfc_8785(batch) == (values in ([3, 4.5], [None, 0.25]))
    assert body_entry_bytes(body, 42, LINK, data=True) == generic(body, 42, LINK)


def any_double() -> st.SearchStrategy[float]:
    """Every kind of double: random bit patterns, integral ones, powers of ten at the notation borders."""
    bits = st.integers(0, 2**64 - 1).map(lambda n: struct.unpack("<d", n.to_bytes(8, "little"))[0])
    edges = st.sampled_from([0.0, -0.0, 1e16, 1e21, 1e-6, 1e-7, 1e-5, 1e15, 9.5e15, 2.0**53, 5e-324,
                             1.7976931348623157e308, 123456789012345680.0, 1e20, 0.1, 100.0])
    scaled = st.tuples(st.floats(-10, 10), st.integers(-9, 23)).map(lambda t: t[0] * 10.0 ** t[1])
    return st.one_of(bits, edges, scaled, st.integers(-(10**6), 10**6).map(float)).filter(math.isfinite)


scalar = st.one_of(any_double(), st.integers(-(2**63), 2**64 - 1), st.booleans(), st.none())


@given(st.lists(st.tuples(st.integers(0, len(TABLE) - 1), scalar), min_size=1, max_size=30))
def test_a_version_1_body_is_written_as_rfc_8785_whatever_its_values(readings: list[tuple[int, Any]]) -> None:
    batch = ReadingBatch(1_764_331_200_000, [i for i, _ in readings], [v for _, v in readings],
                         [2 if v is None else 0 for _, v in readings])
    body, _ = data_body(IDENTITY, TABLE.points, [batch])
    assert body_entry_bytes(body, 42, LINK, data=True) == generic(body, 42, LINK)


@given(st.lists(scalar, min_size=1, max_size=30), st.booleans())
def test_the_fast_road_gives_the_generic_bytes_for_any_values(values: list[Any], compact: bool) -> None:
    if compact:
        body = (b'"map":"22508d4737b5",' + IDENTITY.encode() + b'"g":[{"d":0,"t":1,"o":0,"v":' + orjson.dumps(values)
                + b"}]}")
    else:
        readings = b",".join(b'{"point":"P%d","ts":%d,"value":%s,"quality":"good"}'
                             % (i, 1_764_331_200_000 + i, orjson.dumps(v)) for i, v in enumerate(values))
        body = IDENTITY.encode() + b'"readings":[' + readings + b"]}"
    assert body_entry_bytes(body, 7, LINK, data=True) == generic(body, 7, LINK)


@given(st.lists(st.one_of(scalar, st.sampled_from([math.nan, math.inf, -math.inf])), min_size=1, max_size=30),
       st.one_of(st.sampled_from([1_764_331_200_000, 2**53 - 2, 2**53 - 1, 2**53 + 1, 1 - 2**53, -(2**53) - 1, 2**62]),
                 st.integers(-(2**63), 2**63 - 2)), st.booleans())
def test_the_compact_encoders_road_gives_the_generic_bytes_for_any_values_and_times(
        values: list[Any], ts: int, stamped: bool) -> None:
    point = TABLE.by_id["CT-104"].index  # a 64-bit integer point, written with %.12g: any of these values
    n = len(values)
    batch = ReadingBatch(ts, [point] * n, values, [2 if v is None else 0 for v in values],
                         [ts + k % 2 for k in range(n)] if stamped else None)
    body = ENCODER.body([batch])[0]
    if any(type(v) is float and not math.isfinite(v) for v in values):
        assert not isinstance(body, EntryReady)  # NaN and infinity are no JSON: no road may seal it as if it were
        return
    safe_times = ts >= -(2**53 - 1) and (ts + 1 if stamped and n > 1 else ts) <= 2**53 - 1
    assert isinstance(body, EntryReady) == (written_as_rfc_8785(batch) and safe_times)
    assert body_entry_bytes(body, 7, LINK, data=True) == generic(body, 7, LINK)


@given(st.text(max_size=40), st.one_of(any_double(), st.integers(-(2**63), 2**64 - 1), st.booleans(), st.none()))
def test_alarm_bodies_take_the_generic_road_and_verify(text: str, value: Any) -> None:
    event = AlarmEvent(point="GT-201", type="high", level=1, state="raised", value=value,
                       limit=25.0, unit="%LEL", ts=1_764_331_200_000, message=text)
    body = alarm_body(IDENTITY, event)
    sealed, head = SEALER.seal("alarm", 42, body, HEAD)
    message = loads_strict(frame(42, True, sealed))
    verifier = ChainVerifier(KEYS)
    assert verifier.add(message, "alarm") == [] and verifier.entry(42) == (head.hash, "alarm")


json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=6))
json_value = st.recursive(json_scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)), max_leaves=16)
chain_member = st.one_of(json_value, st.fixed_dictionaries({}, optional={
    "prev_seq": st.one_of(st.integers(-2, 50), json_value), "prev_topic": st.one_of(st.sampled_from(
        ["data", "alarm", "quality", "health"]), json_value), "prev_hash": st.one_of(st.just(LINK["prev_hash"]),
                                                                                    json_value),
    "start": st.one_of(st.sampled_from(["new", "recovered"]), json_value), "x": json_value}))
odd_message = st.fixed_dictionaries({}, optional={
    "v": st.one_of(st.just(1), json_value), "seq": st.one_of(st.integers(-1, 60), json_value),
    "chain": chain_member, "sig": json_value, "hist": json_value, "readings": json_value})


@given(st.lists(st.tuples(st.one_of(odd_message, json_value), st.sampled_from(["data", "alarm", "quality", "map/x"])),
                max_size=8), st.booleans())
def test_the_verifier_never_raises_on_any_message(messages: list[tuple[Any, str]], keyed: bool) -> None:
    verifier = ChainVerifier(KEYS if keyed else None)
    for message, topic in messages:
        found = verifier.add(message, topic)
        assert all(f.text and f.kind for f in found)
    verifier.missing()


@given(st.binary(max_size=600))
def test_any_payload_bytes_are_read_or_refused_never_raise(payload: bytes) -> None:
    try:
        message: Any = loads_strict(payload)
    except NotCanonical:
        return
    ChainVerifier(KEYS).add(message, "data")


def changes(message: dict[str, Any]) -> list[dict[str, Any]]:
    """The message changed in one place each: a value, a member added or taken out, its link, its seq."""
    reading = message["readings"][0]
    return [
        {**message, "readings": [{**reading, "value": 13.5}]},
        {**message, "readings": [{**reading, "quality": "uncertain"}]},
        {**message, "readings": [{**reading, "ts": reading["ts"] + 1}]},
        {**message, "readings": [reading, reading]},
        {**message, "seq": message["seq"] + 1},
        {**message, "v": 2},
        {**message, "agent": "ipc-02"},
        {**message, "extra": True},
        {**message, "chain": {**message["chain"], "prev_seq": 40}},
        {**message, "chain": {"start": "new"}},
        {k: v for k, v in message.items() if k != "enterprise"},
    ]


@given(st.floats(allow_nan=False, allow_infinity=False, width=32), st.booleans())
def test_a_sealed_message_changed_anywhere_but_hist_never_passes(value: float, hist: bool) -> None:
    body = data_body(IDENTITY, TABLE.points, [ReadingBatch(1_764_331_200_000, [0], [value], [0])])[0]
    sealed, _ = SEALER.seal("data", 42, body, HEAD)
    message = loads_strict(frame(42, hist, sealed))
    assert ChainVerifier(KEYS).add({**message, "hist": not hist}, "data") == []
    for changed in changes(message):
        if changed == message:
            continue
        assert ChainVerifier(KEYS).add(changed, "data") != [], changed

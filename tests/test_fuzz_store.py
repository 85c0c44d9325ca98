"""Fuzz the store's readers with hostile input; a long run (20,000 examples a test): EDGE_FUZZ=long pytest this file.

Archive chunks decode to samples or raise ChunkError, with work bounded by the chunk's size; every chunk the
encoder writes comes back exactly; stored message bodies never raise (but the one ValueError of `read_body`)
and never yield a reading of the wrong shape; `history` times are an in-range integer or one HistoryError.
Example counts come from the hypothesis profiles in tests/conftest.py.
"""

from __future__ import annotations

import contextlib
import math
import os
import struct
import zlib
from array import array
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from agent.messages import read_body, read_readings
from agent.store.chunks import ChunkError, Sample, decode_chunk, encode_chunk
from agent.store.history import TS_MAX, TS_MIN, HistoryError, parse_time

# a long run takes minutes a test: no per-test time limit then
pytestmark = pytest.mark.timeout(0 if os.environ.get("EDGE_FUZZ") == "long" else 180)

_HEADER = struct.Struct("<BBIq")
# deflate's largest ratio, and the fewest bytes a sample takes (int32 time delta, quality, float32 value)
MAX_INFLATE, MIN_SAMPLE_BYTES = 1032, 9

stamp = st.integers(min_value=TS_MIN, max_value=TS_MAX)
quality = st.integers(min_value=0, max_value=2)
float64 = st.floats(allow_nan=True, allow_infinity=True)
float32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
values = st.one_of(float64, float32, st.just(math.nan), st.sampled_from([math.inf, -math.inf, -0.0, 0.0]))


@st.composite
def series(draw: st.DrawFn, value: st.SearchStrategy[float] | None = None) -> tuple[list[int], list[float], list[int]]:
    n = draw(st.integers(min_value=1, max_value=120))
    if draw(st.booleans()):  # a polled point: regular steps with jitter, the common case
        start, step = draw(stamp.filter(lambda t: t < TS_MAX // 2)), draw(st.integers(1, 3_600_000))
        jitter = draw(st.lists(st.integers(0, 50), min_size=n, max_size=n))
        stamps = [start + i * step + j for i, j in enumerate(jitter)]
    else:  # any times in any order: the encoder must not assume more than the calendar's range
        stamps = draw(st.lists(stamp, min_size=n, max_size=n))
    if value is None:  # all float32 values (most field points), all float64, or both mixed
        value = draw(st.sampled_from([values, float32, float64]))
    return stamps, draw(st.lists(value, min_size=n, max_size=n)), draw(st.lists(quality, min_size=n, max_size=n))


def encode(stamps: list[int], vals: list[float], quals: list[int]) -> bytes:
    return encode_chunk(array("q", stamps), array("d", vals), array("B", quals))


def decodes_or_refuses(blob: bytes, is_bool: bool = False) -> list[Sample] | None:
    """decode_chunk's promise: samples of the right shape, as many as the bytes can hold, or ChunkError."""
    try:
        samples = decode_chunk(blob, is_bool)
    except ChunkError:
        return None
    assert len(samples) * MIN_SAMPLE_BYTES <= MAX_INFLATE * len(blob)
    for s in samples:
        assert type(s.ts) is int and s.quality in (0, 1, 2)
        assert s.value is None or type(s.value) is (bool if is_bool else float)
    return samples


def bits(x: float) -> bytes:
    return struct.pack("<d", x)


# --- archive chunks -------------------------------------------------------------------------------------------

@given(st.binary(max_size=4096), st.booleans())
def test_any_bytes_decode_or_raise_chunk_error(blob: bytes, is_bool: bool) -> None:
    decodes_or_refuses(blob, is_bool)


@given(st.binary(max_size=4096), st.booleans())
def test_any_inflated_bytes_decode_or_raise_chunk_error(raw: bytes, is_bool: bool) -> None:
    decodes_or_refuses(zlib.compress(raw), is_bool)


@given(st.one_of(st.just(2), st.integers(0, 255)), st.one_of(st.integers(0, 3), st.integers(0, 255)),
       st.one_of(st.integers(0, 300), st.integers(0, 2**32 - 1)), st.integers(-(2**63), 2**63 - 1),
       st.binary(max_size=2048), st.one_of(st.just(0), st.integers(0, 1 << 20)), st.booleans())
def test_any_header_over_any_body_decodes_or_raises_chunk_error(
        version: int, flags: int, count: int, first: int, body: bytes, zeros: int, fit: bool) -> None:
    if fit:  # a body exactly as long as the header's count needs, of random bytes
        count %= 301
        body = (body * (count * 17 // max(len(body), 1) + 1))[: count * ((4 if flags & 2 else 8) + 1
                                                                         + (4 if flags & 1 else 8))]
        zeros = 0
    # zeros: a body that inflates far beyond its compressed size, as a bomb does
    decodes_or_refuses(zlib.compress(_HEADER.pack(version, flags, count, first) + body + bytes(zeros), 9))


@given(series(), st.data())
def test_a_chunk_with_flipped_bytes_decodes_or_raises_chunk_error(chunk_of: Any, data: st.DataObject) -> None:
    blob = bytearray(encode(*chunk_of))
    for _ in range(data.draw(st.integers(1, 8))):
        blob[data.draw(st.integers(0, len(blob) - 1))] ^= data.draw(st.integers(1, 255))
    decodes_or_refuses(bytes(blob))


@given(series(), st.data())
def test_a_truncated_chunk_raises_chunk_error(chunk_of: Any, data: st.DataObject) -> None:
    blob = encode(*chunk_of)
    cut = data.draw(st.integers(0, len(blob) - 1))
    assert decodes_or_refuses(blob[:cut]) is None


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(series(), st.data())
def test_a_chunk_tampered_inside_its_compression_decodes_or_raises_chunk_error(
        chunk_of: Any, data: st.DataObject) -> None:
    raw = bytearray(zlib.decompress(encode(*chunk_of)))
    how = data.draw(st.sampled_from(["flip", "cut", "grow", "count"]))
    if how == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
    elif how == "cut":
        del raw[data.draw(st.integers(0, len(raw) - 1)):]
    elif how == "grow":
        raw += data.draw(st.binary(min_size=1, max_size=64))
    else:
        struct.pack_into("<I", raw, 2, data.draw(st.integers(0, 2**32 - 1)))
    decodes_or_refuses(zlib.compress(bytes(raw)))


@given(series())
def test_every_chunk_round_trips_exactly(chunk_of: tuple[list[int], list[float], list[int]]) -> None:
    stamps, vals, quals = chunk_of
    samples = decodes_or_refuses(encode(stamps, vals, quals))
    assert samples is not None
    assert [s.ts for s in samples] == stamps
    assert [s.quality for s in samples] == quals
    for sample, value in zip(samples, vals, strict=True):
        if math.isnan(value):
            assert sample.value is None
        else:
            assert isinstance(sample.value, float) and bits(sample.value) == bits(value)


@given(series(value=st.one_of(st.booleans(), st.none()).map(lambda b: math.nan if b is None else float(b))))
def test_on_off_chunks_round_trip_as_bools(chunk_of: tuple[list[int], list[float], list[int]]) -> None:
    stamps, vals, quals = chunk_of
    samples = decodes_or_refuses(encode(stamps, vals, quals), is_bool=True)
    assert samples is not None
    assert [s.value for s in samples] == [None if math.isnan(v) else v == 1.0 for v in vals]


# --- stored message bodies ------------------------------------------------------------------------------------

json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(), st.text(max_size=8))
json_value = st.recursive(json_scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)
good_reading = st.fixed_dictionaries({
    "point": st.text(max_size=16), "ts": stamp, "quality": st.sampled_from(["good", "uncertain", "bad"]),
    "value": st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
                       st.floats(allow_nan=False, allow_infinity=False)),
})
# a reading whose fields are each either right or any JSON at all, sometimes missing or with extra keys
odd_reading = st.fixed_dictionaries({}, optional={
    "point": st.one_of(st.text(max_size=8), json_value), "ts": st.one_of(stamp, json_value),
    "value": st.one_of(st.floats(), json_value), "quality": st.one_of(st.sampled_from(["good", "bad"]), json_value),
    "extra": json_value,
})


def body_of(message: Any) -> bytes:
    """A stored body holds the message's JSON without its opening brace."""
    text = orjson.dumps(message)
    return text[1:] if text.startswith(b"{") else text


def readings_or_none(body: bytes) -> list[tuple[str, int, Any, int]] | None:
    """read_readings' promise: never raises; None, or readings of exactly the right shape."""
    got = read_readings(body)
    if got is not None:
        for point, ts, value, code in got:
            assert type(point) is str and type(ts) is int and TS_MIN <= ts <= TS_MAX
            assert value is None or type(value) in (bool, int, float)
            assert code in (0, 1, 2)
    return got


@given(st.binary(max_size=2048))
def test_any_bytes_as_a_body_never_raise_but_value_error(body: bytes) -> None:
    with contextlib.suppress(ValueError):
        assert isinstance(read_body(body), dict)
    readings_or_none(body)


@given(json_value)
def test_any_json_as_a_body_or_as_its_readings_is_read_or_refused(shape: Any) -> None:
    readings_or_none(body_of(shape))
    readings_or_none(body_of({"agent": "a", "readings": shape}))


@given(st.lists(st.one_of(good_reading, odd_reading, json_value), max_size=8))
def test_readings_of_any_shape_are_read_exactly_or_the_body_is_damaged(readings: list[Any]) -> None:
    body = body_of({"agent": "a", "enterprise": "e", "readings": readings})
    got = readings_or_none(body)
    if got is not None:  # then each reading was right, and comes back as stored (NaN and inf are stored as null)
        stored = orjson.loads(b"{" + body)["readings"]
        codes = {"good": 0, "uncertain": 1, "bad": 2}
        assert got == [(r["point"], r["ts"], r["value"], codes[r["quality"]]) for r in stored]


@given(st.lists(good_reading, max_size=8))
def test_readings_as_the_agent_writes_them_are_all_read(readings: list[dict[str, Any]]) -> None:
    got = readings_or_none(body_of({"agent": "a", "enterprise": "e", "readings": readings}))
    assert got is not None and len(got) == len(readings)


# --- history times ----------------------------------------------------------------------------------------------

@given(st.one_of(st.text(max_size=40), st.from_regex(r"\A\d{1,30}(\.\d{1,5})?(ms|s|m|min|h|d)?\Z"),
                 st.integers(0, 10**30).map(str), st.datetimes().map(lambda d: d.isoformat())))
def test_any_time_argument_is_an_in_range_integer_or_one_history_error(text: str) -> None:
    assume("\x00" not in text)  # argv cannot hold one
    try:
        ms = parse_time(text, now=1_764_331_200.0)
    except HistoryError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 200
        return
    assert type(ms) is int and TS_MIN <= ms <= TS_MAX

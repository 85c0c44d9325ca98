"""Fuzz the compact (version 2) reader and encoder; a long run (20,000 examples a test): EDGE_FUZZ=long pytest this
file.

A compact stored body never makes `read_readings` raise, whatever its bytes or its JSON; it reads as None (damaged)
or as readings of exactly the right shape, each naming a point of its map; every batch the encoder is given reads
back as version 1 reads it, and the platform simulator reads the same (reasons included) from the published
message, which its schema accepts. Example counts come from the hypothesis profiles in tests/conftest.py.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.compact import PREFIX, TS_MAX, TS_MIN, parse_map
from agent.config.loader import parse_config
from agent.config.points import PointTable
from agent.core import REASONS, ReadingBatch
from agent.messages import DataEncoder, data_body, frame, identity_fields, read_readings
from simulators.platform import DataDecoder, load_validators

pytestmark = pytest.mark.timeout(0 if os.environ.get("EDGE_FUZZ") == "long" else 180)

IDENTITY = identity_fields("ipc-01", "150625000123")
SITE = """
agent: {id: ipc-01, enterprise: "150625000123"}
channels:
  - id: c1
    driver: modbus_tcp
    host: 127.0.0.1
    devices:
      - id: d1
        points:
          - {id: LT-101, address: 0, type: float32}
          - {id: FT-102, address: 2, type: float64}
          - {id: XV-103, table: coil, address: 0, type: bool}
          - {id: CT-104, address: 6, type: int64}
      - id: d2
        unit: 2
        points:
          - {id: PT-201, address: 0, type: float32}
          - {id: PT-202, address: 2, type: float32}
"""
TABLE = PointTable(parse_config(SITE))
TABLE.add_derived("EP-M1.day", "kWh", "power", "M1")  # a point of no configured device, as daily energy is
ENCODER = DataEncoder(IDENTITY, TABLE, "compact")
MAP = parse_map(ENCODER.map_message())
assert MAP is not None and ENCODER.map_id is not None
MAPS = {ENCODER.map_id: MAP}
POINTS = {p for device in MAP for p in device}
SCHEMA = load_validators()["data-v2"]


def readings_or_none(body: bytes, lookup: Any = MAPS.get) -> list[tuple[str, int, Any, int]] | None:
    """read_readings' promise for compact bodies: never raises; None, or readings of exactly the right shape."""
    got = read_readings(body, lookup)
    if got is not None:
        for point, ts, value, code in got:
            assert type(point) is str and point in POINTS
            assert type(ts) is int and TS_MIN <= ts <= TS_MAX
            assert value is None or type(value) in (bool, int, float)
            assert code in (0, 1, 2)
    return got


def value_of(index: int) -> st.SearchStrategy[Any]:
    """What decode gives a point: its kind of value, or None (a bad reading)."""
    info = TABLE.points[index]
    if info.is_bool:
        kind: st.SearchStrategy[Any] = st.booleans()
    elif info.json_float == "%.7g":
        kind = st.floats(width=32, allow_nan=False, allow_infinity=False).map(
            lambda v: float(struct.unpack("<f", struct.pack("<f", v))[0]))
    else:
        kind = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-(2**63), 2**64 - 1))
    return st.one_of(kind, st.none())


@st.composite
def batches(draw: st.DrawFn) -> ReadingBatch:
    if draw(st.booleans()):  # a whole poll or a slice of one device
        slot = draw(st.sampled_from(TABLE.devices))
        start = draw(st.integers(0, len(slot.indices) - 1))
        indices = slot.indices[start:draw(st.integers(start + 1, len(slot.indices)))]
    else:  # any points in any order, repeats included (data changes, derived points)
        indices = draw(st.lists(st.integers(0, len(TABLE) - 1), min_size=1, max_size=12))
    n = len(indices)
    values = [draw(value_of(i)) for i in indices]
    qualities = [2 if v is None else draw(st.sampled_from([0, 0, 0, 1, 2])) for v in values]
    reasons = None
    if draw(st.booleans()):
        reasons = [draw(st.one_of(st.none(), st.sampled_from(REASONS))) if q else None for q in qualities]
    stamps = None
    if draw(st.booleans()):
        stamps = draw(st.lists(st.sampled_from([1_764_331_200_000 + k for k in (0, 1, 500, 1000)]), min_size=n,
                               max_size=n))
    return ReadingBatch(1_764_331_200_000, list(indices), values, qualities, stamps, reasons)


def _as_number(reading: tuple[str, int, Any, int]) -> tuple[str, int, Any, int]:
    point, ts, value, code = reading
    if type(value) is int:
        value = float(value)
    return point, ts, value, code


def _row_as_number(row: tuple[Any, ...]) -> tuple[Any, ...]:
    value = row[2]
    return (*row[:2], float(value) if type(value) is int else value, *row[3:])


@given(st.lists(batches(), min_size=1, max_size=4))
def test_every_batch_reads_back_as_version_1_reads_it(batch_list: list[ReadingBatch]) -> None:
    body, count = ENCODER.body(batch_list)
    plain, plain_count = data_body(IDENTITY, TABLE.points, batch_list)
    got, expected = readings_or_none(body), read_readings(plain)
    assert got is not None and expected is not None and count == plain_count == len(got)
    # version 1 writes numbers as RFC 8785 does (1.5e16 as 15000000000000000, which reads back as an integer):
    # the same number, compared as one
    assert sorted(map(_as_number, got), key=repr) == sorted(map(_as_number, expected), key=repr)
    published = frame(9, False, body)
    assert SCHEMA.is_valid(orjson.loads(published))
    decoder = DataDecoder()
    decoder.add_map(ENCODER.map_message())
    assert sorted(map(_row_as_number, decoder.rows(published)), key=repr) == \
        sorted(map(_row_as_number, decoder.rows(frame(9, False, plain))), key=repr)


@given(st.binary(max_size=2048))
def test_any_bytes_after_the_prefix_never_raise(tail: bytes) -> None:
    readings_or_none(PREFIX + tail)
    readings_or_none(PREFIX + tail, lambda _id: MAP)


json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=6))
json_value = st.recursive(json_scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=4), inner, max_size=4)), max_leaves=12)
small = st.integers(-2, 8)
# a group whose fields are each either plausible or any JSON at all, sometimes missing or with extra keys
odd_group = st.fixed_dictionaries({}, optional={
    "d": st.one_of(small, json_value), "t": st.one_of(st.integers(TS_MIN - 1, TS_MAX + 1), st.lists(small), json_value),
    "o": st.one_of(small, st.lists(small, max_size=6), json_value),
    "v": st.one_of(st.lists(st.one_of(json_scalar, st.floats()), max_size=6), json_value), "x": json_value,
})
odd_flag = st.one_of(st.lists(st.one_of(small, st.sampled_from(REASONS), json_scalar), max_size=5), json_value)


@given(st.lists(st.one_of(odd_group, json_value), max_size=5), st.one_of(st.lists(odd_flag, max_size=5), json_value),
       st.booleans())
def test_groups_and_flags_of_any_shape_are_read_exactly_or_the_body_is_damaged(
    groups: list[Any], flags: Any, with_q: bool
) -> None:
    message: dict[str, Any] = {"map": ENCODER.map_id, "agent": "a", "enterprise": "e", "g": groups}
    if with_q:
        message["q"] = flags
    body = json.dumps(message, separators=(",", ":")).encode()[1:]  # any integer (orjson writes 64 bits at most)
    assert body.startswith(PREFIX)
    got = readings_or_none(body)
    if got is not None:  # then each group was right: its values come back, in order, on the map's points
        assert [v for _, _, v, _ in got] == [v for g in orjson.loads(b"{" + body)["g"] for v in g["v"]]


@given(st.lists(batches(), min_size=1, max_size=3), st.data())
def test_one_change_to_a_written_body_reads_exactly_or_as_damaged(batch_list: list[ReadingBatch],
                                                                   data: st.DataObject) -> None:
    message = orjson.loads(b"{" + ENCODER.body(batch_list)[0])
    group = data.draw(st.sampled_from(message["g"]))
    key = data.draw(st.sampled_from(["d", "t", "o", "v"]))
    group[key] = data.draw(st.one_of(json_value, small, st.lists(small, max_size=6)))
    if data.draw(st.booleans()):
        message["q"] = [*message.get("q", []), data.draw(odd_flag)]
    readings_or_none(json.dumps(message, separators=(",", ":")).encode()[1:])

"""The history archive: chunks round-trip exactly, cost a few bytes per reading, and answer by point and time."""

from __future__ import annotations

import math
import random
import struct
from array import array
from pathlib import Path

import pytest

from agent.core import KIND_DATA
from agent.store import Store
from agent.store.archive import ArchiveBuffer, decode_chunk, encode_chunk


def f32(x: float) -> float:
    return float(struct.unpack("<f", struct.pack("<f", x))[0])


def test_chunk_round_trips_values_gaps_bad_readings_and_irregular_times() -> None:
    stamps = array("q", [1_000, 2_000, 3_001, 3_999, 10_000, 10_500])
    values = array("d", [1.5, -2.25, math.nan, 1e300, 0.0, 42.0])
    qualities = array("B", [0, 1, 2, 0, 0, 0])
    samples = decode_chunk(encode_chunk(stamps, values, qualities))
    assert [s.ts for s in samples] == list(stamps)
    assert [s.value for s in samples] == [1.5, -2.25, None, 1e300, 0.0, 42.0]
    assert [s.quality for s in samples] == [0, 1, 2, 0, 0, 0]


def test_bool_points_come_back_as_bools() -> None:
    chunk = encode_chunk(array("q", [1, 2, 3]), array("d", [1.0, 0.0, 1.0]), array("B", [0, 0, 0]))
    assert [s.value for s in decode_chunk(chunk, is_bool=True)] == [True, False, True]


def test_a_minute_of_a_1s_float32_point_costs_under_8_bytes_a_reading() -> None:
    rng = random.Random(7)
    value = 50.0
    stamps, values = array("q"), array("d")
    for i in range(60):
        value += rng.uniform(-0.5, 0.5)
        stamps.append(1_764_331_200_000 + 1000 * i + rng.randint(0, 3))  # polling jitter
        values.append(f32(value))
    chunk = encode_chunk(stamps, values, array("B", [0] * 60))
    assert len(chunk) / 60 < 8


def test_buffer_sorts_each_point_and_keeps_points_apart() -> None:
    buffer = ArchiveBuffer()
    buffer.add_many(["A", "B", "A"], [3000, 1000, 1000], [3.0, 9.0, 1.0], [0, 0, 0])
    rows = {key: (start, end, count, decode_chunk(chunk)) for key, start, end, count, chunk in buffer.take()}
    assert rows["A"][:3] == (1000, 3000, 2) and [s.value for s in rows["A"][3]] == [1.0, 3.0]
    assert rows["B"][:3] == (1000, 1000, 1)
    assert buffer.count == 0 and list(buffer.take()) == []


def test_history_joins_the_archive_and_messages_not_yet_archived(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        keys = store.point_keys(["LT-1", "XV-1"], frozenset({"XV-1"}))
        buffer = ArchiveBuffer()
        assert set(keys) == {"LT-1", "XV-1"}
        buffer.add_many(["LT-1"] * 3 + ["XV-1"], [1000, 2000, 3000, 1000], [1.0, 2.0, None, 1.0],
                        [0, 0, 2, 0])
        seq = store.append(KIND_DATA, 1, b'"agent":"a","enterprise":"e","readings":[{"point":"LT-1","ts":4000,'
                           b'"value":4.5,"quality":"uncertain"}]}')
        store.write_chunks(list(buffer.take()), mark=seq - 1)
        got = store.history("LT-1", 1500, 5000)
        assert [(s.ts, s.value, s.quality) for s in got] == [(2000, 2.0, 0), (3000, None, 2), (4000, 4.5, 1)]
        assert [s.value for s in store.history("XV-1", 0, 9999)] == [True]
        assert store.point_is_bool("nope") is None


def test_archived_and_acknowledged_messages_leave_the_outbox(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        seqs = [store.append(KIND_DATA, 1, b'"readings":[]}') for _ in range(4)]
        store.ack(seqs[:3])
        store.write_chunks([], mark=seqs[1])
        left = [s for s, _ in store.data_rows_after(0)]
        assert left == seqs[2:]  # seq 3 is acknowledged but not yet archived: kept for crash recovery
        assert [r.seq for r in store.fetch(0)] == [seqs[3]]


@pytest.mark.parametrize("text", ["1h", "30m", "2d"])
def test_history_times_ago(text: str) -> None:
    from agent.store.history import parse_time

    assert parse_time(text, now=100_000.0) < 100_000_000
    assert parse_time("now", now=100.0) == 100_000
    assert parse_time("1764331200000") == 1764331200000


def test_float32_chunks_with_gaps_still_round_trip() -> None:
    stamps = array("q", [0, 1000, 2000, 3000])
    values = array("d", [f32(1.1), math.nan, f32(-7.25), f32(3.3)])
    samples = decode_chunk(encode_chunk(stamps, values, array("B", [0, 2, 0, 0])))
    assert [s.value for s in samples] == [f32(1.1), None, -7.25, f32(3.3)]


def test_values_that_need_double_precision_keep_it() -> None:
    values = array("d", [0.1, 1 / 3, 123456789.123456789])
    samples = decode_chunk(encode_chunk(array("q", [0, 1, 2]), values, array("B", [0, 0, 0])))
    assert [s.value for s in samples] == list(values)

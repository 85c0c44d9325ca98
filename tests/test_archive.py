"""The history archive: chunks round-trip exactly, cost a few bytes per reading, and answer by point and time."""

from __future__ import annotations

import logging
import math
import random
import struct
import tracemalloc
import zlib
from array import array
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.core import KIND_DATA
from agent.messages import read_readings
from agent.store import Store
from agent.store.chunks import ArchiveBuffer, ChunkError, decode_chunk, encode_chunk


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


def test_archived_messages_can_leave_in_steps_after_the_mark(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        seqs = [store.append(KIND_DATA, 1, b'"readings":[]}') for _ in range(25)]
        store.ack(seqs[:20])
        store.write_chunks([], mark=seqs[14], drop=False)
        assert store.archive_mark() == seqs[14] and not store.archive_partial()
        assert len(list(store.data_rows_after(0))) == 25  # all still there, none read for the archive again
        assert [s for s, _ in store.data_rows_after(store.archive_mark())] == seqs[15:]
        assert [store.drop_archived(seqs[14], 6) for _ in range(4)] == [6, 6, 3, 0]
        # acknowledged but after the mark, and not acknowledged: kept
        assert [s for s, _ in store.data_rows_after(0)] == seqs[15:]
        assert [r.seq for r in store.fetch(0)] == seqs[20:]


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


# --- damaged and tampered chunks: one ChunkError, bounded work, the other chunks still answer ----------------

_HEADER = struct.Struct("<BBIq")


def sample_chunk(n: int = 50) -> bytes:
    stamps = array("q", [1_764_331_200_000 + 1000 * i for i in range(n)])
    return encode_chunk(stamps, array("d", [f32(i / 4) for i in range(n)]), array("B", [0] * n))


def with_count(chunk: bytes, count: int) -> bytes:
    """`chunk` with its header's sample count replaced, compressed again (a tampered chunk that inflates)."""
    raw = bytearray(zlib.decompress(chunk))
    version, flags, _, first = _HEADER.unpack_from(raw)
    _HEADER.pack_into(raw, 0, version, flags, count, first)
    return zlib.compress(bytes(raw))


def peak_bytes(action: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        action()
    except ChunkError:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_a_tampered_count_is_damage_and_allocates_nothing_from_it() -> None:
    chunk = with_count(sample_chunk(), 5_000_000)  # it used to build lists of 5 million, then IndexError
    with pytest.raises(ChunkError, match="5000000 samples"):
        decode_chunk(chunk)
    assert peak_bytes(lambda: decode_chunk(chunk)) < 1_000_000
    with pytest.raises(ChunkError, match="needs"):
        decode_chunk(with_count(sample_chunk(), 51))  # one more than the bytes hold
    with pytest.raises(ChunkError, match="needs"):
        decode_chunk(with_count(sample_chunk(), 49))  # one fewer: bytes left over are damage too


def test_a_truncated_chunk_is_damage() -> None:
    chunk = sample_chunk()
    for cut in (0, 1, 5, len(chunk) // 2, len(chunk) - 1):
        with pytest.raises(ChunkError):  # it used to raise zlib.error, which nothing caught
            decode_chunk(chunk[:cut])
    raw = zlib.decompress(chunk)
    for cut in (3, _HEADER.size, _HEADER.size + 7, len(raw) - 1):
        with pytest.raises(ChunkError):  # inflates, but the samples are cut short: used to be IndexError
            decode_chunk(zlib.compress(raw[:cut]))


def test_a_zlib_bomb_inflates_no_further_than_its_count_allows() -> None:
    raw = _HEADER.pack(2, 3, 1000, 0) + bytes(20_000_000)  # claims 1000 samples, inflates to 20 MB
    bomb = zlib.compress(raw, 9)
    assert len(bomb) < 30_000
    with pytest.raises(ChunkError, match="more than"):
        decode_chunk(bomb)
    assert peak_bytes(lambda: decode_chunk(bomb)) < 1_000_000
    # a count as large as the header allows is refused before inflating anything past the header
    huge = zlib.compress(_HEADER.pack(2, 0, 2**32 - 1, 0) + bytes(20_000_000), 9)
    with pytest.raises(ChunkError, match="more than its"):
        decode_chunk(huge)
    assert peak_bytes(lambda: decode_chunk(huge)) < 1_000_000


def test_unknown_format_flags_or_quality_codes_are_damage() -> None:
    raw = bytearray(zlib.decompress(sample_chunk(3)))
    for offset, byte in ((0, 9), (1, 0x80)):
        tampered = bytearray(raw)
        tampered[offset] = byte
        with pytest.raises(ChunkError):
            decode_chunk(zlib.compress(bytes(tampered)))
    tampered = bytearray(raw)
    tampered[_HEADER.size + 3 * 4] = 7  # the first quality code (after three int32 time deltas)
    with pytest.raises(ChunkError, match="quality"):
        decode_chunk(zlib.compress(bytes(tampered)))


def test_chunk_errors_are_value_errors_for_older_callers() -> None:
    assert issubclass(ChunkError, ValueError)


def test_history_skips_a_damaged_chunk_logs_it_once_and_answers_from_the_rest(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with Store(tmp_path / "s.db") as store:
        for start in (1000, 61_000, 121_000):
            buffer = ArchiveBuffer()
            buffer.add_many(["LT-1"] * 3, [start, start + 1000, start + 2000], [1.0, 2.0, 3.0], [0, 0, 0])
            store.write_chunks(list(buffer.take()), mark=0)
        good = store.db.execute("SELECT chunk FROM archive WHERE start = 1000").fetchone()[0]
        store.db.execute("UPDATE archive SET chunk = ? WHERE start = 61000", (with_count(good, 4_000_000),))
        store.db.execute("UPDATE archive SET chunk = 'text, not bytes' WHERE start = 121000")
        with caplog.at_level(logging.ERROR, logger="agent.store.archive"):
            got = store.history("LT-1", 0, 10**12)
        assert [s.ts for s in got] == [1000, 2000, 3000]
        damaged = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
        assert len(damaged) == 2
        assert "LT-1" in damaged[0] and "61000" in damaged[0] and "121000" in damaged[1]


@pytest.mark.parametrize("reading", [
    b'{"point":7,"ts":1000,"value":1.0,"quality":"good"}',  # point not a string
    b'{"point":"LT-1","ts":"1000","value":1.0,"quality":"good"}',  # ts not an integer
    b'{"point":"LT-1","ts":1000.5,"value":1.0,"quality":"good"}',
    b'{"point":"LT-1","ts":true,"value":1.0,"quality":"good"}',  # a bool is no time
    b'{"point":"LT-1","ts":99999999999999999999,"value":1.0,"quality":"good"}',  # beyond the year 9999
    b'{"point":"LT-1","ts":1000,"value":1.0,"quality":"stale"}',  # unknown quality
    b'{"point":"LT-1","ts":1000,"value":1.0,"quality":["good"]}',
    b'{"point":"LT-1","ts":1000,"value":{"nested":1},"quality":"good"}',  # value a nested object
    b'{"point":"LT-1","ts":1000,"value":[1],"quality":"good"}',
    b'{"point":"LT-1","ts":1000,"value":"1.0","quality":"good"}',
    b'{"point":"LT-1","ts":1000,"quality":"good"}',  # no value at all
    b'["LT-1",1000,1.0,"good"]',
])
def test_a_stored_body_with_one_malformed_reading_is_damaged(reading: bytes) -> None:
    good = b'{"point":"LT-1","ts":900,"value":2.5,"quality":"good"}'
    assert read_readings(b'"readings":[' + good + b"]}") == [("LT-1", 900, 2.5, 0)]
    assert read_readings(b'"readings":[' + good + b"," + reading + b"]}") is None


def test_history_leaves_out_a_damaged_message_and_keeps_the_rest(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        store.point_keys(["LT-1"])
        store.append(KIND_DATA, 1, b'"readings":[{"point":"LT-1","ts":1000,"value":{"x":1},"quality":"good"}]}')
        store.append(KIND_DATA, 1, b'"readings":[{"point":"LT-1","ts":2000,"value":2.0,"quality":"bad"}]}')
        assert [(s.ts, s.value, s.quality) for s in store.history("LT-1", 0, 10**12)] == [(2000, 2.0, 2)]


def test_whole_polls_kept_as_columns_come_back_per_point_with_bad_and_odd_values() -> None:
    ids = ["P0", "P1", "P2"]
    buffer = ArchiveBuffer(ids)
    buffer.add_poll(0, 1000, [1.5, True, None], [0, 0, 2])
    buffer.add_poll(0, 2000, [2.5, False, 10**400], [0, 0, 1])  # an int no float holds is kept as missing
    buffer.add_poll(0, 3000, [f32(3.3), 1, 7], [1, 0, 0])
    assert buffer.count == 9
    rows = {key: (start, end, count, decode_chunk(chunk)) for key, start, end, count, chunk in buffer.take()}
    assert buffer.count == 0
    assert rows["P0"][:3] == (1000, 3000, 3)
    assert [(s.ts, s.value, s.quality) for s in rows["P0"][3]] == [(1000, 1.5, 0), (2000, 2.5, 0), (3000, f32(3.3), 1)]
    assert [s.value for s in rows["P1"][3]] == [1.0, 0.0, 1.0]
    assert [(s.value, s.quality) for s in rows["P2"][3]] == [(None, 2), (None, 1), (7.0, 0)]


def test_qualities_kept_only_from_the_first_poll_not_all_good() -> None:
    buffer = ArchiveBuffer(["A", "B"])
    buffer.add_poll(0, 1000, [1.0, 10.0], [0, 0])
    buffer.add_poll(0, 2000, [2.0, 20.0], [0, 0])
    assert buffer.count == 4
    buffer.add_poll(0, 3000, [3.0, None], [1, 2])
    buffer.add_poll(0, 4000, [4.0, 40.0], [0, 0])
    rows = {key: [(s.ts, s.quality) for s in decode_chunk(chunk)] for key, _, _, _, chunk in buffer.take()}
    assert rows == {"A": [(1000, 0), (2000, 0), (3000, 1), (4000, 0)],
                    "B": [(1000, 0), (2000, 0), (3000, 2), (4000, 0)]}
    buffer.add_poll(0, 5000, [5.0, 50.0], [0, 0])
    buffer.add_poll(0, 4500, [4.5, 45.0], [0, 0])  # all good, and taken apart point by point (the clock stepped back)
    rows = {key: [(s.ts, s.quality) for s in decode_chunk(chunk)] for key, _, _, _, chunk in buffer.take()}
    assert rows == {"A": [(4500, 0), (5000, 0)], "B": [(4500, 0), (5000, 0)]}


def test_columns_meet_readings_of_their_own_time_and_a_clock_stepping_back() -> None:
    buffer = ArchiveBuffer(["A", "B"])
    buffer.add_poll(0, 5000, [5.0, 50.0], [0, 0])
    buffer.add_poll(0, 4000, [4.0, 40.0], [0, 0])  # the wall clock stepped back between two polls
    buffer.add("A", 4500, 4.5, 1)  # a reading with its own time for a point also polled whole
    buffer.add_poll(0, 6000, [6.0, 60.0], [0, 0])
    rows = {key: decode_chunk(chunk) for key, _, _, _, chunk in buffer.take()}
    assert [(s.ts, s.value) for s in rows["A"]] == [(4000, 4.0), (4500, 4.5), (5000, 5.0), (6000, 6.0)]
    assert [s.ts for s in rows["B"]] == [4000, 5000, 6000]


def test_a_device_whose_point_list_changes_keeps_its_earlier_polls() -> None:
    buffer = ArchiveBuffer(["A", "B", "C"])
    buffer.add_poll(0, 1000, [1.0, 2.0], [0, 0])
    buffer.add_poll(0, 2000, [1.5, 2.5, 3.5], [0, 0, 0])
    assert buffer.count == 5
    rows = {key: [s.value for s in decode_chunk(chunk)] for key, _, _, _, chunk in buffer.take()}
    assert rows == {"A": [1.0, 1.5], "B": [2.0, 2.5], "C": [3.5]}


def test_columns_encode_exactly_as_a_point_alone_would() -> None:
    rng = random.Random(5)
    buffer = ArchiveBuffer([f"P{k}" for k in range(4)])
    columns: list[list[float]] = [[] for _ in range(4)]
    stamps = [1_764_331_200_000 + 1000 * i + rng.randint(0, 3) for i in range(60)]
    for ts in stamps:
        poll = [f32(rng.uniform(0, 100)) if k % 2 else rng.uniform(0, 100) for k in range(4)]
        for k in range(4):
            columns[k].append(poll[k])
        buffer.add_poll(0, ts, poll, [0] * 4)
    for key, _, _, _, chunk in buffer.take():
        k = int(key[1:])
        assert chunk == encode_chunk(array("q", stamps), array("d", columns[k]), bytes(60))


def test_a_block_kept_in_float32_widens_without_losing_a_digit() -> None:
    buffer = ArchiveBuffer(["A", "B"])
    buffer.add_poll(0, 1000, [f32(1.1), 2.0], [0, 0])
    buffer.add_poll(0, 2000, [f32(1.2), None], [0, 2])
    buffer.add_poll(0, 3000, [0.1, 2**40 + 1], [0, 0])  # neither is a float32: the block goes to float64
    buffer.add_poll(0, 4000, [f32(1.4), 3.0], [0, 0])
    rows = {key: [s.value for s in decode_chunk(chunk)] for key, _, _, _, chunk in buffer.take()}
    assert rows == {"A": [f32(1.1), f32(1.2), 0.1, f32(1.4)], "B": [2.0, None, float(2**40 + 1), 3.0]}


@given(width=st.integers(1, 700), polls=st.integers(1, 12), wide_at=st.integers(0, 14), seed=st.integers(0, 2**32))
def test_sealed_polls_come_back_exactly_whatever_the_width_and_the_float64_switch(
        width: int, polls: int, wide_at: int, seed: int) -> None:
    # blocks of several hundred points seal every poll or two: chains of XOR across seals, a poll that goes
    # float64 in the middle, missing values and values that repeat must all come back bit for bit
    rng = random.Random(seed)
    ids = [f"P{k}" for k in range(width)]
    buffer = ArchiveBuffer(ids)
    sent: list[list[float | None]] = []
    state = [rng.uniform(-100, 100) for _ in range(width)]
    for p in range(polls):
        state = [x if rng.random() < 0.3 else x + rng.uniform(-1, 1) for x in state]
        row: list[float | None] = [x if p >= wide_at else f32(x) for x in state]
        row = [None if rng.random() < 0.02 else v for v in row]
        sent.append(row)
        buffer.add_poll(0, 1000 * (p + 1), row, [0 if v is not None else 2 for v in row])
    got = {key: decode_chunk(chunk) for key, _, _, _, chunk in buffer.take()}
    for k, key in enumerate(ids):
        assert [s.value for s in got[key]] == [row[k] for row in sent]
        assert [s.ts for s in got[key]] == [1000 * (p + 1) for p in range(polls)]


def test_a_minute_of_a_device_is_held_deflated_not_raw() -> None:
    # 1,000 points a second for a minute: float32 values that a noisy walk moves each poll cost about 3.3 bytes
    # a reading held, not 4; values that stay as they were cost almost nothing
    rng = random.Random(3)
    for moving, most in ((True, 3.6), (False, 0.5)):
        buffer = ArchiveBuffer([f"P{k}" for k in range(1000)])
        state = [rng.uniform(0, 90) for _ in range(1000)]
        polls = []
        for _ in range(60):
            if moving:
                state = [x + rng.uniform(-2, 2) for x in state]
            polls.append([f32(x) for x in state])
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for p, row in enumerate(polls):
            buffer.add_poll(0, 1000 * p, row, [0] * 1000)
        held = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        assert held / 60_000 < most, (moving, held / 60_000)
        rows = {key: decode_chunk(chunk) for key, _, _, _, chunk in buffer.take()}
        assert [s.value for s in rows["P999"]] == [row[999] for row in polls]

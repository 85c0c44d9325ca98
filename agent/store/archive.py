"""The archive: every reading kept on site for the retention time (30 days by default), compactly.

Readings are gathered per point in memory (typed arrays, not objects) and written once a minute as one
compressed chunk per point: sample times as deltas of deltas, values XORed with their predecessor (in float32
when that loses nothing), split into byte planes, then zlib. A 1 s point costs 3 to 5 bytes per reading.
The archive never decides what is delivered (the outbox's job); it keeps history and answers `history`, from
its chunks and from the messages not yet in it.
"""

from __future__ import annotations

import logging
import math
import operator
import struct
import sys
import zlib
from array import array
from collections.abc import Iterable, Iterator
from itertools import accumulate
from typing import Any, NamedTuple

import orjson

from agent.core import BAD
from agent.errors import AgentError
from agent.messages import read_body, read_readings
from agent.store.outbox import ENC_ZLIB, Outbox

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<BBIq")  # format version, flags, count, first sample time (ms)
_VERSION = 2
_F32 = 1  # values stored as float32 (every value of the chunk is exactly a float32)
_I32 = 2  # time deltas stored as int32
_NAN64 = struct.unpack("<Q", struct.pack("<d", math.nan))[0]
_NAN32 = struct.unpack("<I", struct.pack("<f", math.nan))[0]
_BIG = sys.byteorder == "big"
# deflate never inflates more than 1032 to 1: what a chunk of n bytes can hold at most, whatever its header says
_MAX_INFLATE = 1032


class ChunkError(AgentError, ValueError):
    """An archive chunk that cannot be decoded (damaged or tampered with); the history query skips it."""


class Sample(NamedTuple):
    ts: int
    value: float | bool | None
    quality: int


def _xor_chain(words: array[int]) -> array[int]:
    out = array(words.typecode, [0] * len(words))
    last = 0
    for i, w in enumerate(words):
        out[i] = w ^ last
        last = w
    return out


def encode_chunk(stamps: array[int], values: array[float], qualities: array[int]) -> bytes:
    """Compress one point's samples (stamps ascending, NaN for a missing value)."""
    n = len(stamps)
    flags = 0
    deltas = array("q", [0] * n)
    prev = stamps[0]
    prev_delta = 0
    for i in range(1, n):
        delta = stamps[i] - prev
        deltas[i] = delta - prev_delta
        prev, prev_delta = stamps[i], delta
    if all(-(1 << 31) <= d < (1 << 31) for d in deltas):
        deltas = array("i", deltas)
        flags |= _I32
    narrow = array("f", values)
    if all(a == b or b != b for a, b in zip(narrow, values, strict=True)):
        # float32 sources (most field values) lose nothing at half the width
        words = array("I")
        words.frombytes(narrow.tobytes())
        flags |= _F32
    else:
        words = array("Q")
        words.frombytes(values.tobytes())
    xored = _xor_chain(words)
    if _BIG:
        deltas.byteswap()
        xored.byteswap()
    body = (_HEADER.pack(_VERSION, flags, n, stamps[0]) + _shuffle(deltas.tobytes(), deltas.itemsize)
            + bytes(qualities) + _shuffle(xored.tobytes(), xored.itemsize))
    return zlib.compress(body, 6)


def _shuffle(raw: bytes, width: int) -> bytes:
    """Byte planes: all first bytes, then all second bytes...; zeros line up, so zlib packs them tighter."""
    return b"".join(raw[i::width] for i in range(width))


def _unshuffle(raw: bytes, width: int) -> bytes:
    n = len(raw) // width
    out = bytearray(len(raw))
    for i in range(width):
        out[i::width] = raw[i * n : (i + 1) * n]
    return bytes(out)


def decode_chunk(blob: bytes, is_bool: bool = False) -> list[Sample]:
    """One point's samples from a chunk; ChunkError, and no other error, when the chunk is damaged.

    The header's count is checked against what the chunk's bytes can hold before anything is sized from it,
    and inflating stops at the length that count implies: a tampered chunk (or a zlib bomb) costs at most
    about a thousand times its own size, never what its header claims.
    """
    inflater = zlib.decompressobj()
    try:
        head = inflater.decompress(blob, _HEADER.size)
        if len(head) < _HEADER.size:
            raise ChunkError(f"archive chunk ends inside its header ({len(head)} bytes)")
        version, flags, n, first = _HEADER.unpack(head)
        if version != _VERSION:
            raise ChunkError(f"archive chunk format {version} is not known")
        if flags & ~(_F32 | _I32):
            raise ChunkError(f"archive chunk has unknown flags {flags:#x}")
        delta_width = 4 if flags & _I32 else 8
        value_width = 4 if flags & _F32 else 8
        size = n * (delta_width + 1 + value_width)
        if _HEADER.size + size > _MAX_INFLATE * len(blob):
            raise ChunkError(f"archive chunk claims {n} samples, more than its {len(blob)} bytes can hold")
        # one byte more than the count needs: a longer body is damage too, and inflating stops there
        raw = inflater.decompress(inflater.unconsumed_tail, size + 1)
    except zlib.error as exc:
        raise ChunkError(f"archive chunk does not inflate: {exc}") from None
    if len(raw) != size:
        raise ChunkError(f"archive chunk holds {'more than ' if len(raw) > size else ''}{min(len(raw), size)} "
                         f"bytes of samples where its count ({n}) needs {size}")
    if not inflater.eof:
        raise ChunkError("archive chunk is cut short (its compressed stream does not end)")
    deltas = array("i" if flags & _I32 else "q")
    deltas.frombytes(_unshuffle(raw[: delta_width * n], delta_width))
    qualities = raw[delta_width * n : (delta_width + 1) * n]
    if qualities and max(qualities) > BAD:
        raise ChunkError(f"archive chunk has an unknown quality code {max(qualities)}")
    xored = array("I" if flags & _F32 else "Q")
    xored.frombytes(_unshuffle(raw[(delta_width + 1) * n :], value_width))
    if _BIG:
        deltas.byteswap()
        xored.byteswap()
    words = array(xored.typecode, accumulate(xored, operator.xor))
    floats = array("f" if flags & _F32 else "d")
    floats.frombytes(words.tobytes())
    nan_bits = _NAN32 if flags & _F32 else _NAN64
    out: list[Sample] = []
    ts = first
    delta = 0
    for i in range(n):
        if i:
            delta += deltas[i]
            ts += delta
        value: float | bool | None
        if words[i] == nan_bits or floats[i] != floats[i]:
            value = None
        elif is_bool:
            value = floats[i] != 0.0
        else:
            value = float(floats[i])
        out.append(Sample(ts, value, qualities[i]))
    return out


class _Series:
    __slots__ = ("qualities", "stamps", "values")

    def __init__(self) -> None:
        self.stamps = array("q")
        self.values = array("d")
        self.qualities = array("B")


class ArchiveBuffer:
    """Readings since the last flush, per point id, in typed arrays (ids, not store keys: a store replaced
    while running gives new keys, and the buffer must still land on the right points)."""

    def __init__(self) -> None:
        self._series: dict[str, _Series] = {}
        self.count = 0

    def add(self, key: str, ts: int, value: Any, quality: int) -> None:
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _Series()
        series.stamps.append(ts)
        series.values.append(math.nan if value is None else float(value))
        series.qualities.append(quality)
        self.count += 1

    def add_many(self, keys: list[str], stamps: Iterable[int], values: list[Any], qualities: list[int]) -> None:
        series_of = self._series
        for key, ts, value, quality in zip(keys, stamps, values, qualities, strict=True):
            series = series_of.get(key)
            if series is None:
                series = series_of[key] = _Series()
            series.stamps.append(ts)
            series.values.append(math.nan if value is None else float(value))
            series.qualities.append(quality)
        self.count += len(keys)

    def take(self) -> Iterator[tuple[str, int, int, int, bytes]]:
        """Empty the buffer as (point id, first ts, last ts, count, chunk) rows, sample times sorted per point."""
        series_of, self._series, self.count = self._series, {}, 0
        for key, s in series_of.items():
            if any(s.stamps[i] > s.stamps[i + 1] for i in range(len(s.stamps) - 1)):
                order = sorted(range(len(s.stamps)), key=s.stamps.__getitem__)
                s.stamps = array("q", (s.stamps[i] for i in order))
                s.values = array("d", (s.values[i] for i in order))
                s.qualities = array("B", (s.qualities[i] for i in order))
            yield key, s.stamps[0], s.stamps[-1], len(s.stamps), encode_chunk(s.stamps, s.values, s.qualities)


class Archive(Outbox):
    """The archive's tables: point keys, chunks, and the history query over chunks and unarchived messages."""

    def __init__(self, path: Any, *, readonly: bool = False, memory_fallback: bool = False) -> None:
        super().__init__(path, readonly=readonly, memory_fallback=memory_fallback)
        # every point id and on/off point told to this store, told again to a file that replaced a damaged one
        self._registered: set[str] = set()
        self._bools: frozenset[str] = frozenset()

    def _after_recovery(self) -> None:
        super()._after_recovery()
        if self._registered:
            self.point_keys(sorted(self._registered), self._bools)

    def point_keys(self, ids: Iterable[str], bools: frozenset[str] = frozenset()) -> dict[str, int]:
        """Small integer keys for point ids (stable for the life of the file); `bools` are the on/off points."""
        ids = list(ids)
        self._registered.update(ids)
        self._bools |= bools
        with self.transaction():
            self.db.executemany("INSERT OR IGNORE INTO point (id) VALUES (?)", [(i,) for i in ids])
            if bools:
                self.db.executemany("UPDATE point SET is_bool = 1 WHERE id = ?", [(i,) for i in bools])
        keys = dict(self.db.execute("SELECT id, key FROM point"))
        return {i: int(keys[i]) for i in ids}

    def point_is_bool(self, point_id: str) -> bool | None:
        """Whether a point's values are on/off; None when the store has never seen the point."""
        row = self.db.execute("SELECT is_bool FROM point WHERE id = ?", (point_id,)).fetchone()
        return None if row is None else bool(row[0])

    def write_chunks(self, chunks: Iterable[tuple[str, int, int, int, bytes]], mark: int) -> int:
        """Store archive chunks (by point id), then drop acknowledged data messages up to `mark` (now archived)."""
        chunks = list(chunks)
        keys = self.point_keys(sorted({c[0] for c in chunks}))
        with self.transaction():
            cur = self.db.executemany(
                "INSERT OR REPLACE INTO archive (point, start, end, count, chunk) VALUES (?, ?, ?, ?, ?)",
                [(keys[point], start, end, count, chunk) for point, start, end, count, chunk in chunks],
            )
            written = cur.rowcount
            self.add_meta("archive_readings", sum(c[3] for c in chunks))
            self.set_meta("archive_mark", mark)
            self.db.execute("DELETE FROM outbox WHERE kind = 1 AND acked = 1 AND seq <= ?", (mark,))
        return written

    def archive_mark(self) -> int:
        return int(self.meta("archive_mark", 0) or 0)

    def history(self, point_id: str, since: int, until: int) -> list[Sample]:
        """Readings of one point with since <= ts <= until, from the archive and from messages not yet in it."""
        row = self.db.execute("SELECT key, is_bool FROM point WHERE id = ?", (point_id,)).fetchone()
        out: list[Sample] = []
        if row is not None:
            is_bool = bool(row[1])
            for start, chunk in self.db.execute(
                "SELECT start, chunk FROM archive WHERE point = ? AND end >= ? AND start <= ? ORDER BY start",
                (row[0], since, until),
            ):
                try:
                    if not isinstance(chunk, bytes):  # a value of another type written into the file
                        raise ChunkError(f"archive chunk is a {type(chunk).__name__}, not bytes")
                    samples = decode_chunk(chunk, is_bool)
                except ChunkError as exc:
                    # the other chunks still answer; the damaged one stays in the file for whoever inspects it
                    log.error("store: archive chunk of %s from %s is damaged and is skipped: %s", point_id, start, exc)
                    continue
                out.extend(s for s in samples if since <= s.ts <= until)
        needle = orjson.dumps(point_id)
        for _, body in self.data_rows_after(self.archive_mark()):
            if needle not in body:
                continue
            readings = read_readings(body)
            if readings is None:
                continue  # reported when the agent reads it back for the archive
            out.extend(Sample(ts, value, quality) for point, ts, value, quality in readings
                       if point == point_id and since <= ts <= until)
        out.sort(key=lambda s: s.ts)
        return out

    def alarm_history(self, since: int, until: int) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT seq, enc, body FROM outbox WHERE kind = 0 AND created BETWEEN ? AND ? ORDER BY seq",
            (since, until),
        )
        out = []
        for seq, enc, body in rows:
            try:
                out.append({"seq": seq, **read_body(zlib.decompress(body) if enc == ENC_ZLIB else bytes(body))})
            except (zlib.error, ValueError) as exc:
                log.error("store: alarm event seq %d is damaged: %s", seq, exc)
        return out

    def drop_oldest_archive(self, limit: int) -> int:
        """Delete the `limit` oldest archive chunks; return the readings they held."""
        with self.transaction():
            rows = self.db.execute(
                "SELECT point, start, end, count FROM archive ORDER BY end LIMIT ?", (limit,)
            ).fetchall()
            self.db.executemany("DELETE FROM archive WHERE point = ? AND start = ? AND end = ?",
                                [r[:3] for r in rows])
            self.add_meta("archive_readings", -sum(r[3] for r in rows))
        return sum(r[3] for r in rows)

    def expire(self, before: int) -> tuple[int, int]:
        """Retention: drop archive chunks and delivered alarm events older than `before` (ms)."""
        with self.transaction():
            readings = self.db.execute("SELECT coalesce(sum(count), 0) FROM archive WHERE end < ?",
                                       (before,)).fetchone()[0]
            self.db.execute("DELETE FROM archive WHERE end < ?", (before,))
            self.add_meta("archive_readings", -int(readings))
            events = self.db.execute(
                "DELETE FROM outbox WHERE kind = 0 AND acked = 1 AND created < ?", (before,)
            ).rowcount
            self.db.execute("DELETE FROM outbox WHERE acked = 2 AND created < ?", (before,))
        return int(readings), int(events)

    def archive_stats(self) -> tuple[int, int | None]:
        """Readings in the archive (a counter: no scan of a 20 GB table) and the end of its oldest chunk."""
        oldest = self.db.execute("SELECT min(end) FROM archive").fetchone()[0]
        return max(0, int(self.meta("archive_readings", 0) or 0)), oldest

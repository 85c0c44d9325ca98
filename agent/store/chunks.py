"""Archive chunks: one point's samples compressed, and the buffer that gathers them between flushes.

A chunk holds sample times as deltas of deltas, the quality codes, and values XORed with their predecessor (in
float32 when that loses nothing), split into byte planes, then zlib; a 1 s point costs 3 to 5 bytes per
reading. The buffer keeps a device's polls as columns (one sample time per poll, its points' values side by
side in typed arrays), so a poll is added with a few C calls and a device's time column is encoded once for
all its points; a thousand values gathered are deflated at once (each poll XOR the one before), so the minute
between flushes is held compressed, not raw.
"""

from __future__ import annotations

import math
import operator
import struct
import sys
import zlib
from array import array
from collections.abc import Iterable, Iterator, Sequence
from itertools import accumulate
from typing import Any, NamedTuple

from agent.core import BAD
from agent.errors import AgentError

_HEADER = struct.Struct("<BBIq")  # format version, flags, count, first sample time (ms)
_VERSION = 2
_F32 = 1  # values stored as float32 (every value of the chunk is exactly a float32)
_I32 = 2  # time deltas stored as int32
_NAN64 = struct.unpack("<Q", struct.pack("<d", math.nan))[0]
_NAN32 = struct.unpack("<I", struct.pack("<f", math.nan))[0]
_BIG = sys.byteorder == "big"
# deflate never inflates more than 1032 to 1: what a chunk of n bytes can hold at most, whatever its header says
_MAX_INFLATE = 1032
_SEAL_VALUES = 1000  # a buffer block deflates its polls once this many values wait (a poll of 1,000 points)

Row = tuple[str, int, int, int, bytes]  # point id, first and last sample time, count, chunk


class ChunkError(AgentError, ValueError):
    """An archive chunk that cannot be decoded (damaged or tampered with); the history query skips it."""


class Sample(NamedTuple):
    ts: int
    value: float | bool | None
    quality: int


def _time_part(stamps: Sequence[int]) -> tuple[int, bytes]:
    """Flags and byte planes of the sample times (ascending): deltas of deltas, int32 when they fit."""
    n = len(stamps)
    deltas = array("q", bytes(8 * n))
    prev, prev_delta = stamps[0], 0
    for i in range(1, n):
        delta = stamps[i] - prev
        deltas[i] = delta - prev_delta
        prev, prev_delta = stamps[i], delta
    flags = 0
    if min(deltas) >= -(1 << 31) and max(deltas) < (1 << 31):
        deltas = array("i", deltas)
        flags = _I32
    if _BIG:
        deltas.byteswap()
    return flags, _shuffle(deltas.tobytes(), deltas.itemsize)


def _value_part(values: array[float]) -> tuple[int, bytes]:
    """Flags and byte planes of the values XORed with their predecessor, as float32 when that loses nothing
    (values given as float32 are so already)."""
    narrow = values if values.typecode == "f" else array("f", values)
    if values.typecode == "f" or array("d", narrow).tobytes() == values.tobytes() or all(
            a == b or b != b for a, b in zip(narrow, values, strict=True)):
        # float32 sources (most field values) lose nothing at half the width
        flags, width, raw = _F32, 4, narrow
    else:
        flags, width, raw = 0, 8, values
    if _BIG:
        raw = array(raw.typecode, raw)
        raw.byteswap()
    data = raw.tobytes()
    # each word XOR its predecessor, done on the whole column as one integer (little-endian words)
    words = int.from_bytes(data, "little")
    xored = (words ^ (words << (8 * width))) & ((1 << (8 * len(data))) - 1)
    return flags, _shuffle(xored.to_bytes(len(data), "little"), width)


def _chunk(n: int, first: int, time_part: tuple[int, bytes], qualities: bytes, values: array[float]) -> bytes:
    value_flags, value_bytes = _value_part(values)
    head = _HEADER.pack(_VERSION, time_part[0] | value_flags, n, first)
    return zlib.compress(head + time_part[1] + qualities + value_bytes, 6)


def encode_chunk(stamps: Sequence[int], values: array[float], qualities: Sequence[int]) -> bytes:
    """Compress one point's samples (stamps ascending, NaN for a missing value)."""
    return _chunk(len(stamps), stamps[0], _time_part(stamps), bytes(qualities), values)


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


def _as_float(value: Any) -> float:
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):  # a value no float holds is kept as missing
        return math.nan


class _Series:
    """One point's samples, each with its own time (device timestamps, subsets, readings read back)."""

    __slots__ = ("qualities", "stamps", "values")

    def __init__(self) -> None:
        self.stamps = array("q")
        self.values = array("d")
        self.qualities = bytearray()

    def rows(self, key: str) -> Row:
        if any(self.stamps[i] > self.stamps[i + 1] for i in range(len(self.stamps) - 1)):
            order = sorted(range(len(self.stamps)), key=self.stamps.__getitem__)
            self.stamps = array("q", (self.stamps[i] for i in order))
            self.values = array("d", (self.values[i] for i in order))
            self.qualities = bytearray(self.qualities[i] for i in order)
        s = self
        return key, s.stamps[0], s.stamps[-1], len(s.stamps), encode_chunk(s.stamps, s.values, s.qualities)


class _Block:
    """The polls of one run of consecutive points: one sample time per poll, values poll after poll. Once a
    thousand values wait, they are sealed: each poll XOR the one before, in byte planes, deflated (a value that
    does not change costs almost nothing, a noisy float32 about 3 bytes instead of 4)."""

    __slots__ = ("prev", "qualities", "sealed", "stamps", "values", "width")

    def __init__(self, width: int) -> None:
        self.width = width
        self.stamps = array("q")
        # float32 while every value is one exactly (most field values): a minute of 10,000 points in 2.4 MB less
        self.values: array[float] = array("f")  # the polls not sealed yet
        self.sealed: list[tuple[int, int, bytes]] = []  # (word width, polls, deflated planes), oldest first
        self.prev = 0  # the last sealed poll's words as one integer, what the next poll is XORed with
        self.qualities = bytearray()  # empty while every reading was good (the usual minute): 60 bytes a point less

    def qualities_of(self, k: int) -> bytes:
        """The k-th point's quality column."""
        return bytes(self.qualities[k::self.width]) if self.qualities else bytes(len(self.stamps))

    def seal(self) -> None:
        """Deflate the polls waiting, each XOR the poll before (across seals, while the word width is the same)."""
        values = self.values
        if not values:
            return
        if _BIG:
            values = array(values.typecode, values)
            values.byteswap()
        data = values.tobytes()
        size = len(data)
        row = self.width * values.itemsize * 8  # bits of one poll
        words = int.from_bytes(data, "little")
        # each poll XOR the one before it (rows are little-endian, so the one before sits a row lower)
        xored = (words ^ (words << row) ^ self.prev) & ((1 << (8 * size)) - 1)
        self.prev = words >> (row * (len(values) // self.width - 1))
        # run-length matches only: the planes of a noisy value have none longer, and it is the fastest search
        deflate = zlib.compressobj(1, zlib.DEFLATED, 12, 8, zlib.Z_RLE)
        planes = _shuffle(xored.to_bytes(size, "little"), values.itemsize)
        self.sealed.append((values.itemsize, len(values) // self.width, deflate.compress(planes) + deflate.flush()))
        self.values = array(self.values.typecode)

    def all_values(self) -> array[float]:
        """Every poll's values, sealed or not, poll after poll (float64 if any poll needed it)."""
        wide = self.values.typecode == "d" or any(width == 8 for width, _, _ in self.sealed)
        out: array[float] = array("d" if wide else "f")
        row_bytes, prev, last_width = 0, 0, 0
        for width, polls, blob in self.sealed:
            if width != last_width:
                prev, last_width = 0, width  # the XOR chain begins again with the wider words
            row_bytes = self.width * width
            raw = _unshuffle(zlib.decompress(blob), width)
            words = array("f" if width == 4 else "d")
            for k in range(polls):
                prev ^= int.from_bytes(raw[k * row_bytes:(k + 1) * row_bytes], "little")
                words.frombytes(prev.to_bytes(row_bytes, "little"))
            if _BIG:
                words.byteswap()
            out.extend(words if words.typecode == out.typecode else array(out.typecode, words))
        out.extend(self.values if self.values.typecode == out.typecode else array(out.typecode, self.values))
        return out


class ArchiveBuffer:
    """Readings since the last flush. Whole polls of consecutive points go to a block (columns, one per poll);
    anything else goes to a series per point id (ids, not store keys: a store replaced while running gives
    new keys, and the buffer must still land on the right points). `ids` names the points of the blocks."""

    def __init__(self, ids: Sequence[str] = ()) -> None:
        self._ids = ids
        self._series: dict[str, _Series] = {}
        self._blocks: dict[int, _Block] = {}
        self.count = 0

    def add(self, key: str, ts: int, value: Any, quality: int) -> None:
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _Series()
        series.stamps.append(ts)
        series.values.append(_as_float(value))
        series.qualities.append(quality)
        self.count += 1

    def add_many(self, keys: list[str], stamps: Iterable[int], values: list[Any], qualities: list[int]) -> None:
        _spread(self._series, keys, stamps, values, qualities)
        self.count += len(keys)

    def add_poll(self, first: int, ts: int, values: list[Any], qualities: list[int]) -> None:
        """One poll of the points first, first+1, ... (by index into `ids`), all sampled at `ts`."""
        width = len(values)
        block = self._blocks.get(first)
        if block is None or block.width != width:
            if block is not None:  # the device's point list changed: its earlier polls go per point
                self._unblock(first, block, self._series)
            block = self._blocks[first] = _Block(width)
        narrow: array[float] | None = None
        if block.values.typecode == "f":
            try:  # the usual poll: float32 values, good; compared as floats, an array to a list costs least
                narrow = array("f", values)
                if narrow.tolist() != values:
                    narrow = None
            except (TypeError, ValueError, OverflowError):
                narrow = None
        if narrow is None:
            try:
                wide = array("d", values)
            except (TypeError, ValueError, OverflowError):  # None (a bad reading) or a value no float holds
                wide = array("d", [_as_float(v) for v in values])
            if block.values.typecode == "f":
                narrow = array("f", wide)
                if array("d", narrow).tobytes() != wide.tobytes():
                    # a value float32 cannot hold exactly: the block goes to float64 from this poll on
                    block.seal()
                    block.values, block.prev, narrow = array("d"), 0, None  # the XOR chain begins again
            if narrow is None:
                block.values.extend(wide)
        if narrow is not None:
            block.values.extend(narrow)
        if len(block.values) >= _SEAL_VALUES:
            block.seal()
        if block.qualities:
            block.qualities.extend(qualities)
        elif any(qualities):  # the first reading not good: the polls before it were all good (GOOD is 0)
            block.qualities = bytearray(width * len(block.stamps))
            block.qualities.extend(qualities)
        block.stamps.append(ts)
        self.count += width

    def _unblock(self, first: int, block: _Block, series_of: dict[str, _Series]) -> None:
        width, stamps, values = block.width, block.stamps, block.all_values()
        for k in range(width):
            _spread(series_of, [self._ids[first + k]] * len(stamps), stamps, values[k::width],
                    block.qualities_of(k))

    def take(self) -> Iterator[Row]:
        """Empty the buffer as (point id, first ts, last ts, count, chunk) rows, sample times sorted per point;
        rows are encoded as they are taken, so a caller may pause between them."""
        blocks, series_of = self._blocks, self._series
        self._blocks, self._series, self.count = {}, {}, 0
        while blocks:  # each block let go once taken: a flush of 100,000 points never holds two minutes at once
            first, block = blocks.popitem()
            stamps = block.stamps
            if any(stamps[i] > stamps[i + 1] for i in range(len(stamps) - 1)) or any(
                    self._ids[first + k] in series_of for k in range(block.width)):
                self._unblock(first, block, series_of)  # the clock stepped back, or readings apart too
                continue
            time_part = _time_part(stamps)
            width, n, values = block.width, len(stamps), block.all_values()
            for k in range(width):
                yield (self._ids[first + k], stamps[0], stamps[-1], n,
                       _chunk(n, stamps[0], time_part, block.qualities_of(k), values[k::width]))
        for key, series in series_of.items():
            yield series.rows(key)


def _spread(series_of: dict[str, _Series], keys: Sequence[str], stamps: Iterable[int], values: Iterable[Any],
            qualities: Iterable[int]) -> None:
    for key, ts, value, quality in zip(keys, stamps, values, qualities, strict=True):
        series = series_of.get(key)
        if series is None:
            series = series_of[key] = _Series()
        series.stamps.append(ts)
        series.values.append(_as_float(value))
        series.qualities.append(quality)

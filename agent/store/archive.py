"""The archive: every reading kept on site for the retention time (30 days by default), compactly.

Readings are gathered per point in memory (typed arrays, not objects) and written once a minute as one
compressed chunk per point: sample times as deltas of deltas, values XORed with their predecessor (in float32
when that loses nothing), split into byte planes, then zlib. A 1 s point costs 3 to 5 bytes per reading.
The archive never decides what is delivered (the outbox's job); it keeps history and answers `history`.
"""

from __future__ import annotations

import math
import struct
import sys
import zlib
from array import array
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

_HEADER = struct.Struct("<BBIq")  # format version, flags, count, first sample time (ms)
_VERSION = 2
_F32 = 1  # values stored as float32 (every value of the chunk is exactly a float32)
_I32 = 2  # time deltas stored as int32
_NAN64 = struct.unpack("<Q", struct.pack("<d", math.nan))[0]
_NAN32 = struct.unpack("<I", struct.pack("<f", math.nan))[0]
_BIG = sys.byteorder == "big"


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
    raw = zlib.decompress(blob)
    version, flags, n, first = _HEADER.unpack_from(raw)
    if version != _VERSION:
        raise ValueError(f"archive chunk format {version} is not known")
    offset = _HEADER.size
    deltas = array("i" if flags & _I32 else "q")
    deltas.frombytes(_unshuffle(raw[offset : offset + deltas.itemsize * n], deltas.itemsize))
    offset += deltas.itemsize * n
    qualities = raw[offset : offset + n]
    offset += n
    xored = array("I" if flags & _F32 else "Q")
    xored.frombytes(_unshuffle(raw[offset : offset + xored.itemsize * n], xored.itemsize))
    if _BIG:
        deltas.byteswap()
        xored.byteswap()
    words = array(xored.typecode, [0] * n)
    last = 0
    for i in range(n):
        last ^= xored[i]
        words[i] = last
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

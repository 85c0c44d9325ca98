"""The archive: every reading kept on site for the retention time (30 days by default), compactly.

Readings are gathered per point in memory (typed arrays, not objects) and written once a minute as one
compressed chunk per point: sample times as deltas of deltas, values XORed with their predecessor, then zlib.
A regular 1 s point costs about 3-4 bytes per reading on disk. The archive never decides what is delivered:
that is the outbox's job; it only keeps history and answers `edge-agent history`.
"""

from __future__ import annotations

import math
import struct
import sys
import zlib
from array import array
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

_HEADER = struct.Struct("<BIq")  # format version, count, first sample time (ms)
_VERSION = 1
_NAN_BITS = struct.unpack("<Q", struct.pack("<d", math.nan))[0]
_BIG = sys.byteorder == "big"


class Sample(NamedTuple):
    ts: int
    value: float | bool | None
    quality: int


def encode_chunk(stamps: array[int], values: array[float], qualities: array[int]) -> bytes:
    """Compress one point's samples (stamps ascending, NaN for a missing value)."""
    n = len(stamps)
    deltas = array("q", [0] * n)
    prev = stamps[0]
    prev_delta = 0
    for i in range(1, n):
        delta = stamps[i] - prev
        deltas[i] = delta - prev_delta
        prev, prev_delta = stamps[i], delta
    bits = array("Q")
    bits.frombytes(values.tobytes())
    xored = array("Q", [0] * n)
    last = 0
    for i, b in enumerate(bits):
        xored[i] = b ^ last
        last = b
    if _BIG:
        deltas.byteswap()
        xored.byteswap()
    body = _HEADER.pack(_VERSION, n, stamps[0]) + deltas.tobytes() + bytes(qualities) + xored.tobytes()
    return zlib.compress(body, 6)


def decode_chunk(blob: bytes, is_bool: bool = False) -> list[Sample]:
    raw = zlib.decompress(blob)
    version, n, first = _HEADER.unpack_from(raw)
    if version != _VERSION:
        raise ValueError(f"archive chunk format {version} is not known")
    offset = _HEADER.size
    deltas = array("q")
    deltas.frombytes(raw[offset : offset + 8 * n])
    offset += 8 * n
    qualities = raw[offset : offset + n]
    offset += n
    xored = array("Q")
    xored.frombytes(raw[offset : offset + 8 * n])
    if _BIG:
        deltas.byteswap()
        xored.byteswap()
    out: list[Sample] = []
    ts = first
    delta = 0
    last = 0
    for i in range(n):
        if i:
            delta += deltas[i]
            ts += delta
        last ^= xored[i]
        value: float | bool | None
        if last == _NAN_BITS:
            value = None
        else:
            value = struct.unpack("<d", struct.pack("<Q", last))[0]
            if is_bool:
                value = value != 0.0
        out.append(Sample(ts, value, qualities[i]))
    return out


class _Series:
    __slots__ = ("qualities", "stamps", "values")

    def __init__(self) -> None:
        self.stamps = array("q")
        self.values = array("d")
        self.qualities = array("B")


class ArchiveBuffer:
    """Readings since the last flush, per point key, in typed arrays."""

    def __init__(self) -> None:
        self._series: dict[int, _Series] = {}
        self.count = 0

    def add(self, key: int, ts: int, value: Any, quality: int) -> None:
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _Series()
        series.stamps.append(ts)
        series.values.append(math.nan if value is None else float(value))
        series.qualities.append(quality)
        self.count += 1

    def add_many(self, keys: list[int], stamps: Iterable[int], values: list[Any], qualities: list[int]) -> None:
        series_of = self._series
        for key, ts, value, quality in zip(keys, stamps, values, qualities, strict=True):
            series = series_of.get(key)
            if series is None:
                series = series_of[key] = _Series()
            series.stamps.append(ts)
            series.values.append(math.nan if value is None else float(value))
            series.qualities.append(quality)
        self.count += len(keys)

    def take(self) -> Iterator[tuple[int, int, int, int, bytes]]:
        """Empty the buffer as (key, first ts, last ts, count, chunk) rows, sample times sorted per point."""
        series_of, self._series, self.count = self._series, {}, 0
        for key, s in series_of.items():
            if any(s.stamps[i] > s.stamps[i + 1] for i in range(len(s.stamps) - 1)):
                order = sorted(range(len(s.stamps)), key=s.stamps.__getitem__)
                s.stamps = array("q", (s.stamps[i] for i in order))
                s.values = array("d", (s.values[i] for i in order))
                s.qualities = array("B", (s.qualities[i] for i in order))
            yield key, s.stamps[0], s.stamps[-1], len(s.stamps), encode_chunk(s.stamps, s.values, s.qualities)

"""The decode stage: raw values from a driver become engineering values with a quality, one batch per poll.

It never raises on a bad value: NaN, infinity or a missing value becomes a `bad` reading.
"""

from __future__ import annotations

import math
from typing import Any

from agent.config.points import PointInfo
from agent.core import BAD, GOOD, UNCERTAIN, DeviceRead, ReadingBatch


def decode(points: list[PointInfo], indices: list[int], read: DeviceRead, ts: int) -> ReadingBatch:
    """Apply scale/offset and the measuring range; `indices` are the device's points in driver order."""
    if read.positions is not None:
        indices = [indices[p] for p in read.positions]
    device_q = read.qualities
    values: list[Any] = []
    qualities: list[int] = []
    for n, (index, raw) in enumerate(zip(indices, read.values, strict=True)):
        if raw is None:
            values.append(None)
            qualities.append(BAD)
            continue
        said = device_q[n] if device_q is not None else GOOD
        if said == BAD:
            values.append(None)
            qualities.append(BAD)
            continue
        info = points[index]
        if info.is_bool or raw is True or raw is False:
            values.append(bool(raw))
            qualities.append(said)
            continue
        value = raw * info.scale + info.offset if (info.scale != 1.0 or info.offset != 0.0) else raw
        if isinstance(value, float) and not math.isfinite(value):
            values.append(None)
            qualities.append(BAD)
        elif info.lo <= value <= info.hi:
            values.append(value)
            qualities.append(said)
        else:
            values.append(value)
            qualities.append(UNCERTAIN)
    stamps = list(read.timestamps) if read.timestamps is not None else None
    return ReadingBatch(ts, list(indices), values, qualities, stamps)


def bad_batch(indices: list[int], ts: int) -> ReadingBatch:
    """Every point of a device `bad`: the device could not be read at all."""
    n = len(indices)
    return ReadingBatch(ts, list(indices), [None] * n, [BAD] * n)

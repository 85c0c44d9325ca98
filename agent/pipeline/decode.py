"""The decode stage: raw values from a driver become engineering values with a quality, one batch per poll.

It never raises on a bad value: NaN, infinity or a missing value becomes a `bad` reading. It never lets a
device's own timestamp through that is further from the agent's clock than the device's `max_clock_skew`:
such a reading takes the agent's time and is `uncertain`, for every driver that passes timestamps.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from agent.config.base import DeviceBase
from agent.config.points import DeviceSlot, PointInfo
from agent.core import BAD, GOOD, UNCERTAIN, DeviceRead, ReadingBatch

log = logging.getLogger(__name__)

DEFAULT_SKEW_MS = round(DeviceBase.model_fields["max_clock_skew"].default * 1000)


class DeviceClock:
    """One device's timestamps against the agent's clock: how far off they may be (`max_clock_skew`), how many
    were not trusted, and which points' latest timestamp was not, so that the device is logged once when its
    timestamps go wrong and once when every such point has a trusted one again."""

    __slots__ = ("off", "skew_ms", "untrusted", "where")

    def __init__(self, where: str, max_skew: float) -> None:
        self.where = where
        self.skew_ms = round(max_skew * 1000)
        self.untrusted = 0
        self.off: set[int] = set()


def decode(
    points: list[PointInfo], indices: list[int], read: DeviceRead, ts: int, clock: DeviceClock | None = None,
    slot: DeviceSlot | None = None,
) -> ReadingBatch:
    """Apply scale/offset and the measuring range; `indices` are the device's points in driver order, `ts` the
    agent's clock at the poll. Device timestamps are checked against `ts` within `clock`'s skew (the default
    one, neither counted nor logged, without a clock). With the device's `slot`, a whole poll of plain numbers
    all within their ranges takes a path with no work per reading but one comparison."""
    if slot is not None and slot.plain and read.positions is None and read.qualities is None \
            and read.timestamps is None:
        raws = read.values
        try:
            inside = all(lo <= v <= hi for v, lo, hi in zip(raws, slot.lo, slot.hi, strict=True))
        except TypeError:  # None (unreadable), or a value no number compares with: the careful path
            inside = False
        if inside:
            return ReadingBatch(ts, list(indices), list(raws), [GOOD] * len(raws))
    if read.positions is not None:
        indices = [indices[p] for p in read.positions]
    device_q = read.qualities
    values: list[Any] = []
    qualities: list[int] = []
    why: list[tuple[int, str]] = []  # (position, reason) of the readings decode finds not good
    for n, (index, raw) in enumerate(zip(indices, read.values, strict=True)):
        if raw is None:
            values.append(None)
            qualities.append(BAD)
            why.append((n, "comm"))
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
            why.append((n, "out_of_range"))  # beyond what a number holds: the device sent no usable value
        elif info.lo <= value <= info.hi:
            values.append(value)
            qualities.append(said)
        else:
            values.append(value)
            qualities.append(UNCERTAIN)
            why.append((n, "out_of_range"))
    indices = list(indices)
    reasons: list[str | None] | None = None
    if why:
        reasons = [None] * len(indices)
        for n, reason in why:
            reasons[n] = reason
    if read.timestamps is None:
        return ReadingBatch(ts, indices, values, qualities, None, reasons)
    stamps = list(read.timestamps)
    skew = clock.skew_ms if clock is not None else DEFAULT_SKEW_MS
    # min and max run in C: a batch whose stamps are all plausible costs no Python loop
    batch = ReadingBatch(ts, indices, values, qualities, stamps, reasons)
    if stamps and (min(stamps) < ts - skew or max(stamps) > ts + skew):
        _distrust(points, batch, ts, skew, clock)
    elif clock is not None and clock.off:
        clock.off.difference_update(indices)
        if not clock.off:
            log.info("%s: device timestamps trusted again (within max_clock_skew %g s)", clock.where,
                     clock.skew_ms / 1000)
    return batch


def _distrust(points: list[PointInfo], batch: ReadingBatch, ts: int, skew: int, clock: DeviceClock | None) -> None:
    """Give every reading whose device timestamp is out of the window the agent's time, `uncertain` (a bad one
    stays bad); count them, and log the device if its timestamps were trusted until now."""
    indices, stamps = batch.indices, batch.stamps
    assert stamps is not None
    lo, hi = ts - skew, ts + skew
    off = clock.off if clock is not None else set()
    was_off = bool(off)
    count = 0
    worst, worst_index = 0, indices[0]
    for n, stamp in enumerate(stamps):
        index = indices[n]
        if lo <= stamp <= hi:
            off.discard(index)
            continue
        stamps[n] = ts
        batch.set_reason(n, UNCERTAIN, "device_ts")  # a bad reading stays bad, with its own reason
        off.add(index)
        count += 1
        if abs(stamp - ts) > abs(worst):
            worst, worst_index = stamp - ts, index
    if clock is None:
        return
    clock.untrusted += count
    if not was_off:
        log.warning("%s: device timestamps not trusted: point %s is %s %s the agent's clock (max_clock_skew %g s); "
                    "readings so stamped take the agent's time and are uncertain", clock.where,
                    points[worst_index].id, _span(worst), "ahead of" if worst > 0 else "behind", skew / 1000)


def _span(ms: int) -> str:
    seconds = min(abs(ms), 2**63) / 1000  # an absurd int would not convert to float
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"


def bad_batch(indices: list[int], ts: int) -> ReadingBatch:
    """Every point of a device `bad`: the device could not be read at all."""
    n = len(indices)
    return ReadingBatch(ts, list(indices), [None] * n, [BAD] * n, None, ["comm"] * n)

"""The shared words of the agent: reading qualities, message kinds, acknowledgement states, a batch of readings,
one device read and one alarm event.

A leaf: it imports nothing of ours, so every stage can use it and none is pulled in by it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any


class Quality(IntEnum):
    """What a reading is worth; the codes are stored in the archive and must never change."""

    GOOD = 0
    UNCERTAIN = 1
    BAD = 2


# plain ints for the hot path (enum members compare and hash more slowly)
GOOD, UNCERTAIN, BAD = int(Quality.GOOD), int(Quality.UNCERTAIN), int(Quality.BAD)
QUALITY_NAMES = ("good", "uncertain", "bad")
QUALITY_CODES = {name: code for code, name in enumerate(QUALITY_NAMES)}
# why a reading is not good (the `reason` of a reading on the wire; docs/protocol.md)
REASONS = ("frozen", "spike", "range_end", "out_of_range", "device_ts", "comm")


class MessageKind(IntEnum):
    """What an outbox message is; stored in the outbox, so the codes must never change."""

    ALARM = 0
    DATA = 1
    QUALITY = 2  # the daily data-quality report


KIND_ALARM, KIND_DATA, KIND_QUALITY = int(MessageKind.ALARM), int(MessageKind.DATA), int(MessageKind.QUALITY)
KIND_NAMES = {KIND_ALARM: "alarm", KIND_DATA: "data", KIND_QUALITY: "quality"}


class AckState(IntEnum):
    """Where an outbox message stands; stored in the outbox, so the codes must never change."""

    PENDING = 0  # waiting for the broker's PUBACK
    ACKED = 1  # acknowledged: goes once archived (data) or past retention (alarm events)
    DAMAGED = 2  # cannot be decoded: set aside, never sent, counted


class ReadingBatch:
    """The readings of one device poll: parallel lists and one sample time, or one per reading in `stamps`.

    `reasons`, when not None, says why each reading that is not `good` is so (a short code of REASONS, None for
    a good reading); a batch with every reading good carries None.
    """

    __slots__ = ("indices", "qualities", "reasons", "stamps", "ts", "values")

    def __init__(
        self, ts: int, indices: list[int], values: list[Any], qualities: list[int], stamps: list[int] | None = None,
        reasons: list[str | None] | None = None,
    ) -> None:
        self.ts = ts
        self.indices = indices
        self.values = values
        self.qualities = qualities
        self.stamps = stamps
        self.reasons = reasons

    def __len__(self) -> int:
        return len(self.indices)

    def times(self) -> list[int]:
        """The sample time of each reading."""
        return self.stamps if self.stamps is not None else [self.ts] * len(self.indices)

    def slice(self, start: int, end: int) -> ReadingBatch:
        stamps = self.stamps[start:end] if self.stamps is not None else None
        reasons = self.reasons[start:end] if self.reasons is not None else None
        return ReadingBatch(self.ts, self.indices[start:end], self.values[start:end], self.qualities[start:end], stamps,
                            reasons)

    def set_reason(self, n: int, quality: int, reason: str) -> None:
        """Mark reading n as `quality` (uncertain or bad) for `reason`; a worse quality already set stays."""
        if quality > self.qualities[n]:
            self.qualities[n] = quality
        if self.reasons is None:
            self.reasons = [None] * len(self.indices)
        if self.reasons[n] is None:
            self.reasons[n] = reason


class DeviceRead:
    """One poll of one device.

    `values` has one entry per point of the device, in the device's order, or, when `positions` is given, one
    per listed position (a driver that only has news for some points, e.g. OPC UA data changes). None means
    the point could not be read. `timestamps` (ms since the epoch) are the device's own sample times where it
    has them; `qualities` (GOOD/UNCERTAIN/BAD) what the device says of each value. `errors` says what went
    wrong, one line per failed request.
    """

    __slots__ = ("errors", "positions", "qualities", "timestamps", "values")

    def __init__(
        self,
        values: list[Any],
        errors: list[str] | None = None,
        *,
        positions: list[int] | None = None,
        timestamps: list[int] | None = None,
        qualities: list[int] | None = None,
    ) -> None:
        self.values = values
        self.errors = errors or []
        self.positions = positions
        self.timestamps = timestamps
        self.qualities = qualities


@dataclass(slots=True)
class AlarmEvent:
    """A state change of one alarm (`raised`, `cleared`, `reset`), with the value and the limit."""

    point: str
    type: str
    level: int
    state: str
    value: Any
    limit: float | None
    unit: str
    ts: int
    message: str = ""
    zone: str | None = None
    color: str | None = None

    @property
    def id(self) -> str:
        return f"{self.point}/{self.type}"

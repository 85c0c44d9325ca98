"""Rules on one point's values: the common rule state machine (raised, latched, on-delay), four-level limits
with deadband, and rate of change over a window. Each emits an event only when its state changes.
"""

from __future__ import annotations

import time
from array import array
from typing import Any

from agent.config.points import PointInfo
from agent.core import AlarmEvent

# type name, level, limit attribute, direction (+1 raises at or above the limit, -1 at or below)
LIMIT_KINDS = (
    ("high_high", 2, "high_high", 1),
    ("high", 1, "high", 1),
    ("low", 1, "low", -1),
    ("low_low", 2, "low_low", -1),
)
NORMAL, RAISED, LATCHED = "normal", "raised", "latched"  # latched: raised, condition gone, waiting for reset


class Rule:
    """Common state of every rule: raised or not, latched or not, and the on-delay timer."""

    __slots__ = ("delay_ms", "info", "kind", "latch", "level", "limit", "pending_since", "pending_value",
                 "pending_wall", "state", "unit")

    def __init__(self, info: PointInfo, kind: str, level: int, limit: float | None, delay: float, latch: bool,
                 unit: str | None = None) -> None:
        self.info = info
        self.kind = kind
        self.level = level
        self.limit = limit
        self.delay_ms = round(delay * 1000)
        self.latch = latch
        self.state = NORMAL
        self.pending_since: int | None = None
        self.pending_value: Any = None
        self.pending_wall = 0.0  # the agent's clock when the on-delay began: a device's clock may be off
        self.unit = info.unit if unit is None else unit

    @property
    def id(self) -> str:
        return f"{self.info.id}/{self.kind}"

    def event(self, state: str, value: Any, ts: int, **extra: Any) -> AlarmEvent:
        shown = float(self.info.json_float % value) if type(value) is float else value
        return AlarmEvent(self.info.id, self.kind, self.level, state, shown, self.limit, self.unit, ts, **extra)

    def step(self, beyond: bool, back: bool, value: Any, ts: int) -> AlarmEvent | None:
        """Advance on one observation: `beyond` the condition holds, `back` it is gone (with hysteresis)."""
        if self.state == NORMAL:
            if not beyond:
                self.pending_since = None
                return None
            if self.pending_since is None:
                self.pending_since = ts
                self.pending_wall = time.time() * 1000
            self.pending_value = value
            if ts - self.pending_since < self.delay_ms:
                return None
            self.pending_since = None
            self.state = RAISED
            return self.event("raised", value, ts)
        if self.state == RAISED and back:
            if self.latch:
                self.state = LATCHED  # stays raised for the platform until someone resets it
                return None
            self.state = NORMAL
            return self.event("cleared", value, ts)
        if self.state == LATCHED and beyond:
            self.state = RAISED  # the condition came back before the reset: still the same alarm
        return None

    def hold(self) -> None:
        """An unknown value: keep the state, restart any on-delay."""
        self.pending_since = None

    def elapse(self, now: int) -> AlarmEvent | None:
        """Time passes with no new reading (a value held still, sent only on change): the on-delay runs on."""
        if self.state != NORMAL or self.pending_since is None or now - self.pending_wall < self.delay_ms:
            return None
        ts = self.pending_since + self.delay_ms  # in the device's time, like the readings' own
        self.pending_since = None
        self.state = RAISED
        return self.event("raised", self.pending_value, ts)

    def feed(self, value: Any, ts: int) -> AlarmEvent | None:
        """One good or uncertain reading of the point the rule watches."""
        raise NotImplementedError


class LimitRule(Rule):
    __slots__ = ("deadband", "direction")

    def __init__(self, info: PointInfo, kind: str, level: int, limit: float, direction: int, deadband: float,
                 delay: float, latch: bool) -> None:
        super().__init__(info, kind, level, limit, delay, latch)
        self.direction = direction
        self.deadband = deadband

    def feed(self, value: float, ts: int) -> AlarmEvent | None:
        limit = self.limit
        assert limit is not None
        if self.direction > 0:
            return self.step(value >= limit, value < limit - self.deadband, value, ts)
        return self.step(value <= limit, value > limit + self.deadband, value, ts)


class RateHistory:
    """The kept samples of many rate rules side by side in two arrays, SLOTS a rule: 10,000 points with a rate rule
    cost 160 kB of samples, not 20,000 small arrays."""

    SLOTS = 10

    def __init__(self) -> None:
        self.stamps = array("q")
        self.values = array("d")

    def allot(self) -> int:
        """Room for one more rule's samples; returns where they begin."""
        base = len(self.stamps)
        self.stamps.extend([0] * self.SLOTS)
        self.values.extend([0.0] * self.SLOTS)
        return base


_UNITS: dict[str, str] = {}  # "m/min" once, not once a point


class RateRule(Rule):
    """Rate of change over a window, in the point's unit per minute.

    It keeps at most SLOTS samples, one every window/8, in the engine's RateHistory.
    """

    __slots__ = ("base", "count", "fall", "history", "rise", "step_ms", "window_ms")

    def __init__(self, info: PointInfo, rise: float | None, fall: float | None, window: float, latch: bool,
                 history: RateHistory | None = None) -> None:
        unit = f"{info.unit}/min"
        super().__init__(info, "rate", 1, rise if rise is not None else fall, 0.0, latch,
                         unit=_UNITS.setdefault(unit, unit))
        self.rise = rise
        self.fall = fall
        self.window_ms = round(window * 1000)
        self.step_ms = max(1, self.window_ms // 8)
        self.history = history if history is not None else RateHistory()
        self.base = self.history.allot()
        self.count = 0  # samples kept, oldest first

    def _keep(self, ts: int, value: float) -> None:
        n, b = self.count, self.base
        stamps, values = self.history.stamps, self.history.values
        if n and ts - stamps[b + n - 1] < self.step_ms:
            return  # close to the last kept sample: the window needs no more detail
        if n == RateHistory.SLOTS:
            stamps[b:b + n - 1] = stamps[b + 1:b + n]
            values[b:b + n - 1] = values[b + 1:b + n]
            n -= 1
        stamps[b + n] = ts
        values[b + n] = value
        self.count = n + 1

    def feed(self, value: float, ts: int) -> AlarmEvent | None:
        history, b, count = self.history, self.base, self.count
        stamps = history.stamps
        if not count or ts - stamps[b + count - 1] >= self.step_ms:
            self._keep(ts, value)
            count = self.count
        # the oldest kept sample that is still inside the window (or the only one old enough)
        first, last, window = b, b + count - 1, self.window_ms
        while first < last and ts - stamps[first + 1] >= window:
            first += 1
        span = ts - stamps[first]
        if span < window // 2 or span <= 0:
            return None  # too short a look to call it a trend
        rate = (value - history.values[first]) / span * 60_000
        too_fast_up = self.rise is not None and rate >= self.rise
        too_fast_down = self.fall is not None and -rate >= self.fall
        if not (too_fast_up or too_fast_down) and self.state == NORMAL:
            self.pending_since = None  # the usual case, as step() would take it, without its cost
            return None
        if too_fast_up or too_fast_down:
            self.limit = self.rise if too_fast_up else -(self.fall or 0.0)
        return self.step(too_fast_up or too_fast_down, not (too_fast_up or too_fast_down), round(rate, 6), ts)

    def hold(self) -> None:
        super().hold()
        self.count = 0

"""Rules on one point's values: the common rule state machine (raised, latched, on-delay), four-level limits
with deadband, and rate of change over a window. Each emits an event only when its state changes.
"""

from __future__ import annotations

import math
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

    __slots__ = ("_state", "book", "delay_ms", "id", "info", "kind", "latch", "level", "limit", "pending_since",
                 "pending_value", "pending_wall", "unit")

    def __init__(self, info: PointInfo, kind: str, level: int, limit: float | None, delay: float, latch: bool,
                 unit: str | None = None) -> None:
        self.info = info
        self.kind = kind
        self.id = f"{info.id}/{kind}"  # asked of every raised alarm each time their states are saved
        self.level = level
        self.limit = limit
        self.delay_ms = round(delay * 1000)
        self.latch = latch
        self._state = NORMAL
        # where each change of state is noted (alarm id -> new state), for the store to save only what changed;
        # the engine that owns the rule gives it (None: a rule on its own)
        self.book: dict[str, str] | None = None
        self.pending_since: int | None = None
        self.pending_value: Any = None
        self.pending_wall = 0.0  # the agent's clock when the on-delay began: a device's clock may be off
        self.unit = info.unit if unit is None else unit

    @property
    def state(self) -> str:
        return self._state

    @state.setter
    def state(self, state: str) -> None:
        if state != self._state:
            self._state = state
            if self.book is not None:
                self.book[self.id] = state

    def event(self, state: str, value: Any, ts: int, **extra: Any) -> AlarmEvent:
        shown = float(self.info.json_float % value) if type(value) is float else value
        return AlarmEvent(self.info.id, self.kind, self.level, state, shown, self.limit, self.unit, ts, **extra)

    def step(self, beyond: bool, back: bool, value: Any, ts: int) -> AlarmEvent | None:
        """Advance on one observation: `beyond` the condition holds, `back` it is gone (with hysteresis)."""
        if self._state == NORMAL:  # read past the property: this runs for every reading of a rule's point
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
        if self._state == RAISED and back:
            if self.latch:
                self.state = LATCHED  # stays raised for the platform until someone resets it
                return None
            self.state = NORMAL
            return self.event("cleared", value, ts)
        if self._state == LATCHED and beyond:
            self.state = RAISED  # the condition came back before the reset: still the same alarm
        return None

    def hold(self) -> None:
        """An unknown value: keep the state, restart any on-delay."""
        self.pending_since = None

    def elapse(self, now: int) -> AlarmEvent | None:
        """Time passes with no new reading (a value held still, sent only on change): the on-delay runs on."""
        if self._state != NORMAL or self.pending_since is None or now - self.pending_wall < self.delay_ms:
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


_STAMP_LIMIT = 2**31 - 1  # a rate table's sample times are 32-bit ms from their slot's base
_SLOTS = 10  # samples a rate keeps: one every window/8 spans the window and a little more


class RateTable:
    """The rate-of-change rules of many points as arrays: each point's kept samples (SLOTS of them, one every
    window/8) and its settings, shared by the points written alike. A point whose rate stays within its limits
    costs about 160 bytes and no object; its `RateRule` (the alarm's state) is made when the rate first goes
    beyond, or when a saved state or a command names it (`engine.AlarmEngine` decides)."""

    SLOTS = _SLOTS

    def __init__(self, points: int) -> None:
        self.slot_of = array("i", [-1]) * points  # point index -> its slot here, -1 without a rate rule
        self.stamps = array("i")  # ms after the slot's base: 4 bytes a sample, not 8 (10 samples a slot)
        self.bases = array("q")  # slot -> the wall time (ms) its stamps count from; moved when a time does not fit
        self.values = array("d")
        self.counts = bytearray()  # samples kept by each slot, oldest first
        self.spec_of = array("H")  # slot -> its settings in `specs`
        self.specs: list[tuple[float | None, float | None, int, int, bool]] = []  # rise, fall, window, step, latch
        self.quick: list[float] = []  # spec -> a rate strictly between -quick and quick goes beyond neither limit
        # spec -> what `rate` needs of it, worked out once: window, step, half a window, the calm band's reach a ms
        # of span, the latest stamp that leaves room for a due time within 32 bits
        self._terms: list[tuple[int, int, int, float, int]] = []
        # the calm of each slot: a value strictly between calm_lo and calm_hi at a time from `since` (included) to
        # `due` (both ms after the base) keeps no sample and has a rate within ±quick (or none yet), so the engine
        # settles it without calling `rate`; set by each call of `rate`, empty (since = due) until then
        self.since = array("i")
        self.due = array("i")
        self.calm_lo = array("d")
        self.calm_hi = array("d")
        self._spec_ids: dict[tuple[float | None, float | None, int, int, bool], int] = {}

    def add(self, index: int, rise: float | None, fall: float | None, window: float, latch: bool) -> None:
        window_ms = round(window * 1000)
        spec = (rise, fall, window_ms, max(1, window_ms // 8), latch)
        spec_id = self._spec_ids.get(spec)
        if spec_id is None:
            spec_id = self._spec_ids[spec] = len(self.specs)
            self.specs.append(spec)
            quick = min(rise if rise is not None else math.inf, fall if fall is not None else math.inf)
            self.quick.append(quick)
            # a hair narrower than exact, so a value on the band's edge is judged the long way
            self._terms.append((window_ms, spec[3], window_ms // 2, quick * (1 - 1e-9) / 60_000,
                                _STAMP_LIMIT - 2 * window_ms))
        self.slot_of[index] = len(self.counts)
        self.counts.append(0)
        self.bases.append(0)
        self.spec_of.append(spec_id)

    def ready(self) -> None:
        """Room for the samples of every rule added: call it once they are all added."""
        slots = len(self.counts)
        self.stamps = array("i", bytes(4 * self.SLOTS * slots))
        self.bases = array("q", [int(time.time() * 1000)]) * slots
        self.values = array("d", bytes(8 * self.SLOTS * slots))
        self.since = array("i", bytes(4 * slots))
        self.due = array("i", bytes(4 * slots))
        self.calm_lo = array("d", bytes(8 * slots))
        self.calm_hi = array("d", bytes(8 * slots))

    def spec(self, index: int) -> tuple[float | None, float | None, int, int, bool] | None:
        slot = self.slot_of[index]
        return None if slot < 0 else self.specs[self.spec_of[slot]]

    def rate(self, slot: int, value: float, ts: int) -> float | None:
        """Keep the sample if it is due and return the rate over the window in unit per minute, or None when the
        kept samples span too short a time to call it a trend. Sets the slot's calm band (see `since`)."""
        window, step, half, per_ms, latest = self._terms[self.spec_of[slot]]
        ts -= self.bases[slot]
        if not -_STAMP_LIMIT < ts < latest:  # 24 days on (or back) from the base: count from now instead
            self._rebase(slot, ts)
            ts = 0
        stamps, values = self.stamps, self.values
        b = slot * _SLOTS
        n = self.counts[slot]
        last = b + n - 1
        if n and ts < stamps[last]:
            n = 0  # the clock stepped back past the newest sample: the trend begins again from this one
        if not n or ts - stamps[last] >= step:
            if n == _SLOTS:  # full: the oldest goes
                stamps[b:last] = stamps[b + 1:last + 1]
                values[b:last] = values[b + 1:last + 1]
            else:
                n += 1
                last = b + n - 1
                self.counts[slot] = n
            stamps[last] = ts
            values[last] = value
        # the oldest kept sample that is still inside the window (or the only one old enough)
        first = b
        while first < last and ts - stamps[first + 1] >= window:
            first += 1
        span = ts - stamps[first]
        # the calm band from now until the next sample is due: a rate counts from the oldest sample in the window,
        # over a span that only grows until the oldest moves on (then over a whole window), so a value this close
        # to each sample that is the oldest meanwhile has a rate within ±quick (or none); a NaN sample leaves none
        origin = values[first]
        reach = per_ms * (span if span > half else half)  # before half a window there is no rate at all
        lo, hi = origin - reach, origin + reach
        due = stamps[last] + step
        if due > latest:  # from there on `rate` counts from a new base, and may clamp the oldest stamps
            due = latest
        k = first
        if k < last and stamps[k + 1] + window < due:
            reach = per_ms * window
            while k < last and stamps[k + 1] + window < due:
                k += 1
                if not values[k] - reach <= lo:
                    lo = values[k] - reach
                if not values[k] + reach >= hi:
                    hi = values[k] + reach
        self.since[slot] = ts
        self.due[slot] = due
        self.calm_lo[slot] = lo
        self.calm_hi[slot] = hi
        if span < half or span <= 0:
            return None
        return (value - origin) / span * 60_000

    def _rebase(self, slot: int, shift: int) -> None:
        """Count the slot's stamps from `shift` ms after its base (ten samples at most: each slot alone, when it
        needs it, so no step of the loop rewrites them all); a sample beyond what 32 bits hold is clamped there,
        so it is older (or newer) than any window, as it really is."""
        self.bases[slot] += shift
        stamps, b = self.stamps, slot * self.SLOTS
        for i in range(b, b + self.counts[slot]):
            stamps[i] = min(max(stamps[i] - shift, -_STAMP_LIMIT), _STAMP_LIMIT)

    def forget(self, slot: int) -> None:
        """An unknown value: the trend starts again from the next good one."""
        self.counts[slot] = 0
        self.due[slot] = self.since[slot]


_UNITS: dict[str, str] = {}  # "m/min" once, not once a point


class RateRule(Rule):
    """The alarm state of one point's rate of change, in the point's unit per minute; its samples and settings
    stay in the engine's RateTable."""

    __slots__ = ("fall", "rise", "slot", "table")

    def __init__(self, info: PointInfo, table: RateTable) -> None:
        spec = table.spec(info.index)
        assert spec is not None
        rise, fall, _, _, latch = spec
        unit = f"{info.unit}/min"
        super().__init__(info, "rate", 1, rise if rise is not None else fall, 0.0, latch,
                         unit=_UNITS.setdefault(unit, unit))
        self.rise = rise
        self.fall = fall
        self.table = table
        self.slot = table.slot_of[info.index]

    def feed(self, value: float, ts: int) -> AlarmEvent | None:
        rate = self.table.rate(self.slot, value, ts)
        if rate is None:
            return None
        return self.judge(rate, ts)

    def judge(self, rate: float, ts: int) -> AlarmEvent | None:
        too_fast_up = self.rise is not None and rate >= self.rise
        too_fast_down = self.fall is not None and -rate >= self.fall
        if not (too_fast_up or too_fast_down) and self._state == NORMAL:
            self.pending_since = None  # the usual case, as step() would take it, without its cost
            return None
        if too_fast_up or too_fast_down:
            self.limit = self.rise if too_fast_up else -(self.fall or 0.0)
        return self.step(too_fast_up or too_fast_down, not (too_fast_up or too_fast_down), round(rate, 6), ts)

    def hold(self) -> None:
        super().hold()
        self.table.forget(self.slot)

"""The alarm stage: every rule the agent knows, evaluated on whole reading batches.

Rules are small state machines keyed by alarm id (`point/type`): four-level limits with deadband and on-delay,
rate of change, detector fault, communication loss, zone crowding and production during an ordered shutdown.
A rule emits an event only when its state changes. A latched rule stays raised after its condition is gone
until it is reset by hand, and the reset is an event of its own. Bad readings hold limit alarms as they are.
The engine's state can be saved and loaded, so a restart neither raises twice nor forgets a clear.
"""

from __future__ import annotations

import time
from array import array
from typing import TYPE_CHECKING, Any

from agent.config.points import PointInfo, PointTable
from agent.core import BAD, AlarmEvent, ReadingBatch
from agent.errors import ResetRefused

if TYPE_CHECKING:
    from agent.config.models import AgentConfig

# type name, level, limit attribute, direction (+1 raises at or above the limit, -1 at or below)
_LIMIT_KINDS = (
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


class RateRule(Rule):
    """Rate of change over a window, in the point's unit per minute.

    It keeps at most _SLOTS samples, one every window/8, in two small arrays: 10,000 points with a rate
    rule cost a few MB, not one Python object per reading in the window.
    """

    __slots__ = ("count", "fall", "rise", "stamps", "step_ms", "values", "window_ms")

    _SLOTS = 10

    def __init__(self, info: PointInfo, rise: float | None, fall: float | None, window: float, latch: bool) -> None:
        super().__init__(info, "rate", 1, rise if rise is not None else fall, 0.0, latch, unit=f"{info.unit}/min")
        self.rise = rise
        self.fall = fall
        self.window_ms = round(window * 1000)
        self.step_ms = max(1, self.window_ms // 8)
        self.stamps = array("q", bytes(8 * self._SLOTS))
        self.values = array("d", bytes(8 * self._SLOTS))
        self.count = 0  # samples kept, oldest first

    def _keep(self, ts: int, value: float) -> None:
        n = self.count
        if n and ts - self.stamps[n - 1] < self.step_ms:
            return  # close to the last kept sample: the window needs no more detail
        if n == self._SLOTS:
            self.stamps[:-1] = self.stamps[1:]
            self.values[:-1] = self.values[1:]
            n -= 1
        self.stamps[n] = ts
        self.values[n] = value
        self.count = n + 1

    def feed(self, value: float, ts: int) -> AlarmEvent | None:
        self._keep(ts, value)
        # the oldest kept sample that is still inside the window (or the only one old enough)
        first = 0
        while first + 1 < self.count and ts - self.stamps[first + 1] >= self.window_ms:
            first += 1
        span = ts - self.stamps[first]
        if span < self.window_ms // 2 or span <= 0:
            return None  # too short a look to call it a trend
        rate = (value - self.values[first]) / span * 60_000
        too_fast_up = self.rise is not None and rate >= self.rise
        too_fast_down = self.fall is not None and -rate >= self.fall
        if too_fast_up or too_fast_down:
            self.limit = self.rise if too_fast_up else -(self.fall or 0.0)
        return self.step(too_fast_up or too_fast_down, not (too_fast_up or too_fast_down), round(rate, 6), ts)

    def hold(self) -> None:
        super().hold()
        self.count = 0


class FaultRule(Rule):
    """A detector's fault status (a bit or a code): non-zero is a fault of the detector point."""

    def feed(self, value: Any, ts: int) -> AlarmEvent | None:
        faulty = bool(value)
        return self.step(faulty, not faulty, value, ts)


class CrowdingRule(Rule):
    __slots__ = ("color", "zone")

    def __init__(self, info: PointInfo, zone: str, color: str, limit: int, duration: float) -> None:
        super().__init__(info, "crowding", 1, float(limit), duration, False)
        self.zone = zone
        self.color = color

    def event(self, state: str, value: Any, ts: int, **extra: Any) -> AlarmEvent:
        return super().event(state, value, ts, zone=self.zone, color=self.color, **extra)

    def feed(self, value: float, ts: int) -> AlarmEvent | None:
        assert self.limit is not None
        return self.step(value > self.limit, value <= self.limit, value, ts)


class HaltRule(Rule):
    """Active power above the idle baseline while the enterprise is ordered to halt."""

    def __init__(self, info: PointInfo, idle_kw: float, delay: float) -> None:
        super().__init__(info, "halt_violation", 1, idle_kw, delay, False)
        self.halted = False

    def feed(self, value: float, ts: int) -> AlarmEvent | None:
        assert self.limit is not None
        producing = self.halted and value > self.limit
        return self.step(producing, not producing, value, ts)


class CommLossRule(Rule):
    def __init__(self, info: PointInfo) -> None:
        super().__init__(info, "comm_loss", 1, info.comm_loss, info.comm_loss, False)

    def event(self, state: str, value: Any, ts: int, **extra: Any) -> AlarmEvent:
        if state == "raised":
            extra.setdefault("message", f"no valid reading for {self.delay_ms / 1000:g}s")
        return super().event(state, value, ts, **extra)


class AlarmEngine:
    def __init__(self, table: PointTable, config: AgentConfig | None = None) -> None:
        self.table = table
        n = len(table)
        self._limit_rules: list[list[LimitRule] | None] = [None] * n
        self._other_rules: list[list[Rule] | None] = [None] * n  # rate, fault, crowding, halt: fed the value
        self._comm = [CommLossRule(info) for info in table.points]
        self._bad_since: dict[int, int] = {}
        self.rules: dict[str, Rule] = {}
        self._halt_rules: list[HaltRule] = []
        self._waiting: set[Rule] = set()  # rules in their on-delay
        latching = self._latching(config)
        for info in table.points:
            self.rules[self._comm[info.index].id] = self._comm[info.index]
            if info.limits is None or info.is_bool:
                continue
            latch = info.id in latching
            rules = []
            for kind, level, attr, direction in _LIMIT_KINDS:
                limit = getattr(info.limits, attr)
                if limit is not None:
                    rules.append(LimitRule(info, kind, level, limit, direction, info.limits.deadband,
                                           info.limits.delay, latch))
            if rules:
                self._limit_rules[info.index] = rules
            if info.limits.rate_rise is not None or info.limits.rate_fall is not None:
                self._add(info, RateRule(info, info.limits.rate_rise, info.limits.rate_fall,
                                         info.limits.rate_window, latch))
            for rule in rules:
                self.rules[rule.id] = rule
        if config is not None:
            self._domain_rules(config)

    def _latching(self, config: AgentConfig | None) -> set[str]:
        if config is None:
            return set()
        return {p.id for _, _, p in config.points() if p.latches()}

    def _add(self, info: PointInfo, rule: Rule) -> None:
        rules = self._other_rules[info.index]
        if rules is None:
            rules = self._other_rules[info.index] = []
        rules.append(rule)
        self.rules[rule.id] = rule

    def _domain_rules(self, config: AgentConfig) -> None:
        by_id = self.table.by_id
        for _, _, point in config.points():
            if point.fault_of is not None:
                status, target = by_id[point.id], by_id[point.fault_of]
                self._add(status, FaultRule(target, "fault", 1, None, 0.0, False))
        for zone in config.zones:
            info = by_id[zone.head_count]
            self._add(info, CrowdingRule(info, zone.id, zone.color, zone.limit, zone.duration))
        for meter in config.power.meters:
            info = by_id[meter.active_power]
            halt = HaltRule(info, meter.idle_kw, meter.delay)
            self._halt_rules.append(halt)
            self._add(info, halt)

    # --- evaluation ------------------------------------------------------------------------------

    def evaluate(self, batch: ReadingBatch) -> list[AlarmEvent]:
        events: list[AlarmEvent] = []
        limit_rules = self._limit_rules
        other_rules = self._other_rules
        for index, value, quality, ts in zip(batch.indices, batch.values, batch.qualities, batch.times(),
                                             strict=True):
            if quality == BAD:
                self._bad(index, ts, events)
                continue
            if index in self._bad_since:
                del self._bad_since[index]
                event = self._comm[index].step(False, True, value, ts)
                if event is not None:
                    events.append(event)
            rules = limit_rules[index]
            if rules is not None:
                for rule in rules:
                    event = rule.feed(value, ts)
                    if event is not None:
                        events.append(event)
                    if rule.pending_since is not None:
                        self._waiting.add(rule)
            others = other_rules[index]
            if others is not None:
                for other in others:
                    event = other.feed(value, ts)
                    if event is not None:
                        events.append(event)
                    if other.pending_since is not None:
                        self._waiting.add(other)
        return events

    def tick(self, now: int) -> list[AlarmEvent]:
        """Raise what waited out its on-delay without a new reading to show it (values sent only on change)."""
        events = []
        for rule in list(self._waiting):
            if rule.pending_since is None:
                self._waiting.discard(rule)
                continue
            event = rule.elapse(now)
            if event is not None:
                self._waiting.discard(rule)
                events.append(event)
        return events

    def _bad(self, index: int, ts: int, events: list[AlarmEvent]) -> None:
        for rule in self._limit_rules[index] or ():
            rule.hold()
        for other in self._other_rules[index] or ():
            other.hold()
        since = self._bad_since.setdefault(index, ts)
        comm = self._comm[index]
        if comm.state == NORMAL and ts - since >= comm.delay_ms:
            comm.state = RAISED
            events.append(comm.event("raised", None, ts))

    # --- commands --------------------------------------------------------------------------------

    def reset(self, alarm_id: str, ts: int) -> AlarmEvent:
        """Reset a latched alarm whose condition is gone; the reset is an event of its own."""
        rule = self.rules.get(alarm_id)
        if rule is None:
            raise ResetRefused(f"no alarm {alarm_id!r} (ids are point/type, e.g. GT-201/high)")
        if rule.state == NORMAL:
            raise ResetRefused(f"alarm {alarm_id} is not raised")
        if rule.state == RAISED:
            reason = "its condition is still present" if rule.latch else "it is not latched: it clears by itself"
            raise ResetRefused(f"alarm {alarm_id} cannot be reset: {reason}")
        rule.state = NORMAL
        return rule.event("reset", None, ts, message="reset by hand")

    def set_halted(self, halted: bool, ts: int) -> list[AlarmEvent]:
        """The production state changed; back to normal clears every halt violation at once."""
        events = []
        for rule in self._halt_rules:
            rule.halted = halted
            if not halted:
                rule.pending_since = None
                if rule.state != NORMAL:
                    rule.state = NORMAL
                    events.append(rule.event("cleared", None, ts, message="production state set to normal"))
        return events

    # --- state -----------------------------------------------------------------------------------

    def active(self) -> list[str]:
        """Ids of the alarms raised now (latched ones included)."""
        return sorted(rule_id for rule_id, rule in self.rules.items() if rule.state != NORMAL)

    def states(self) -> dict[str, str]:
        """What to save: the state of every alarm that is not normal."""
        return {rule_id: rule.state for rule_id, rule in self.rules.items() if rule.state != NORMAL}

    def load(self, states: dict[str, str], now: int) -> list[str]:
        """Take back saved states (after a restart); returns ids that no longer exist in the configuration."""
        unknown = []
        for rule_id, state in states.items():
            rule = self.rules.get(rule_id)
            if rule is None or state not in (RAISED, LATCHED):
                unknown.append(rule_id)
                continue
            rule.state = state
            if isinstance(rule, CommLossRule):
                self._bad_since[rule.info.index] = now
        return unknown

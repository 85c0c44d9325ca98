"""The alarm stage: the engine that evaluates every rule the agent knows (agent.rules.limits, agent.rules.domain)
on whole reading batches.

Rules are small state machines keyed by alarm id (`point/type`): four-level limits with deadband and on-delay,
rate of change, detector fault, communication loss, zone crowding and production during an ordered shutdown.
A rule emits an event only when its state changes. A latched rule stays raised after its condition is gone
until it is reset by hand, and the reset is an event of its own. Bad readings hold limit alarms as they are.
The engine's state can be saved and loaded, so a restart neither raises twice nor forgets a clear.
"""

from __future__ import annotations

from array import array
from typing import TYPE_CHECKING, Any

from agent.config.points import PointInfo, PointTable
from agent.core import BAD, AlarmEvent, ReadingBatch
from agent.errors import ResetRefused
from agent.rules.domain import CommLossRule, CrowdingRule, FaultRule, HaltRule
from agent.rules.limits import LATCHED, LIMIT_KINDS, NORMAL, RAISED, LimitRule, RateRule, RateTable, Rule

if TYPE_CHECKING:
    from agent.config.models import AgentConfig

_LIMIT_NAMES = frozenset(kind for kind, _, _, _ in LIMIT_KINDS)

_INF = float("inf")


class AlarmEngine:
    """Every alarm rule of a point table, evaluated batch by batch.

    Limit and communication-loss rules are made only when a point first needs them (a value outside its quiet
    band, a bad reading, a saved state): a point whose value stays between its limits costs one comparison
    per reading and no rule object; a rate rule keeps its samples in arrays (RateTable) and gets an object when its
    rate first goes beyond. Rules of other kinds (fault, crowding, halt) are made at start.
    """

    def __init__(self, table: PointTable, config: AgentConfig | None = None) -> None:
        self.table = table
        n = len(table)
        self._latching, faults = self._walk(config)
        # the quiet band of each point: strictly between these, no limit rule can change state; a point whose
        # rules are not all settled (normal, no on-delay running) gets an empty band (+inf, -inf)
        # lists, not arrays: points written alike share one band, and a read hands over that float instead of
        # making one (as many bytes a point; the pipeline took 4 % less)
        self._lo: list[float] = [_INF] * n
        self._hi: list[float] = [-_INF] * n
        self._limit_rules: dict[int, list[LimitRule]] = {}
        self._other_rules: list[tuple[Rule, ...] | None] = [None] * n  # rate, fault, crowding, halt: fed the value
        self._rates = RateTable(n)
        self._rate_slot = self._rates.slot_of  # replaced by a copy below; -1 once the point's RateRule is made
        self._comm: dict[int, CommLossRule] = {}
        self._bad_since: dict[int, int] = {}
        self._named: dict[str, Rule] = {}  # rules of other kinds by alarm id (a fault rule sits on its status point)
        self._halt_rules: list[HaltRule] = []
        self._waiting: set[Rule] = set()  # rules in their on-delay
        self._raised: set[Rule] = set()  # rules that may not be normal (checked when read)
        self._changes: dict[str, str] = {}  # alarm id -> its new state, for every change since `changes` was asked
        self._shared: dict[str, list[Rule]] = {}  # rules that share one alarm id (two zones on one head count)
        bands: dict[int, tuple[float, float]] = {}  # points written alike share their limits object
        lo, hi = self._lo, self._hi
        for info in table.points:
            limits = info.limits
            if limits is None or info.is_bool:
                lo[info.index], hi[info.index] = -_INF, _INF
                continue
            band = bands.get(id(limits))
            if band is None:
                band = bands[id(limits)] = self._band(info)
            lo[info.index], hi[info.index] = band
            if limits.rate_rise is not None or limits.rate_fall is not None:
                self._rates.add(info.index, limits.rate_rise, limits.rate_fall, limits.rate_window,
                                info.id in self._latching)
        self._rates.ready()
        self._rate_slot = array("i", self._rates.slot_of)
        if config is not None:
            self._domain_rules(config, faults)

    @staticmethod
    def _walk(config: AgentConfig | None) -> tuple[set[str], list[tuple[str, str]]]:
        """One walk over the points (each is rebuilt from its packed columns): the ids of the latching ones, and
        (status point, detector) for every detector fault status."""
        latching: set[str] = set()
        faults: list[tuple[str, str]] = []
        for point in config.each_point() if config is not None else ():
            if point.latches():
                latching.add(point.id)
            if point.fault_of is not None:
                faults.append((point.id, point.fault_of))
        return latching, faults

    def _band(self, info: PointInfo) -> tuple[float, float]:
        """Values strictly between these raise no four-level limit of the point."""
        limits = info.limits
        if limits is None or info.is_bool:
            return -_INF, _INF
        highs = [x for x in (limits.high, limits.high_high) if x is not None]
        lows = [x for x in (limits.low, limits.low_low) if x is not None]
        return (max(lows) if lows else -_INF), (min(highs) if highs else _INF)

    def _settle(self, index: int) -> None:
        """Give a point its quiet band back if every limit rule it has is normal with no on-delay running."""
        for rule in self._limit_rules.get(index, ()):
            if rule._state != NORMAL or rule.pending_since is not None:  # past the property: once a reading
                self._lo[index], self._hi[index] = _INF, -_INF
                return
        self._lo[index], self._hi[index] = self._band(self.table.points[index])

    def _limits_of(self, index: int) -> list[LimitRule]:
        """The point's four-level limit rules, made the first time they are needed."""
        rules = self._limit_rules.get(index)
        if rules is None:
            info = self.table.points[index]
            rules = []
            if info.limits is not None and not info.is_bool:
                latch = info.id in self._latching
                for kind, level, attr, direction in LIMIT_KINDS:
                    limit = getattr(info.limits, attr)
                    if limit is not None:
                        rule = LimitRule(info, kind, level, limit, direction, info.limits.deadband, info.limits.delay,
                                         latch)
                        rule.book = self._changes
                        rules.append(rule)
            self._limit_rules[index] = rules
        return rules

    def _comm_of(self, index: int) -> CommLossRule:
        rule = self._comm.get(index)
        if rule is None:
            rule = self._comm[index] = CommLossRule(self.table.points[index])
            rule.book = self._changes
        return rule

    def _add(self, info: PointInfo, rule: Rule) -> None:
        rule.book = self._changes
        self._other_rules[info.index] = (*(self._other_rules[info.index] or ()), rule)  # a tuple: 40 B less a point
        if rule.kind != "rate":  # a rate rule is found through its point
            if rule.id in self._named:
                self._shared.setdefault(rule.id, [self._named[rule.id]]).append(rule)
            self._named[rule.id] = rule

    def _domain_rules(self, config: AgentConfig, faults: list[tuple[str, str]]) -> None:
        by_id = self.table.by_id
        for status_id, detector in faults:
            status, target = by_id[status_id], by_id[detector]
            self._add(status, FaultRule(target, "fault", 1, None, 0.0, False))
        for zone in config.zones:
            info = by_id[zone.head_count]
            self._add(info, CrowdingRule(info, zone.id, zone.color, zone.limit, zone.duration))
        for meter in config.power.meters:
            info = by_id[meter.active_power]
            halt = HaltRule(info, meter.idle_kw, meter.delay)
            self._halt_rules.append(halt)
            self._add(info, halt)

    def rule(self, alarm_id: str, make: bool = False) -> Rule | None:
        """The rule behind an alarm id (`point/type`); a limit or comm_loss rule not yet needed is made only
        with `make` (otherwise None: it is normal)."""
        named = self._named.get(alarm_id)
        if named is not None:
            return named
        point, _, kind = alarm_id.rpartition("/")
        info = self.table.by_id.get(point)
        if info is None:
            return None
        if kind == "comm_loss":
            return self._comm_of(info.index) if make else self._comm.get(info.index)
        if kind == "rate":
            made = next((r for r in self._other_rules[info.index] or () if r.kind == "rate"), None)
            if made is None and make and self._rates.slot_of[info.index] >= 0:
                made = self._rate_rule(info.index)
            return made
        if info.limits is None or info.is_bool or getattr(info.limits, kind, None) is None or \
                kind not in _LIMIT_NAMES:
            return None
        rules = self._limits_of(info.index) if make else self._limit_rules.get(info.index, [])
        return next((r for r in rules if r.kind == kind), None)

    # --- evaluation ------------------------------------------------------------------------------

    def evaluate(self, batch: ReadingBatch) -> list[AlarmEvent]:
        events: list[AlarmEvent] = []
        lo, hi = self._lo, self._hi
        other_rules = self._other_rules
        bad_since = self._bad_since
        rate_slot = self._rate_slot
        rates = self._rates
        rate_of, quick, spec_of = rates.rate, rates.quick, rates.spec_of
        bases, since, due, calm_lo, calm_hi = rates.bases, rates.since, rates.due, rates.calm_lo, rates.calm_hi
        reasons = batch.reasons
        for n, (index, value, quality) in enumerate(zip(batch.indices, batch.values, batch.qualities, strict=True)):
            if quality == BAD:
                self._bad(index, batch.stamps[n] if batch.stamps is not None else batch.ts, events)
                continue
            if reasons is not None and reasons[n] == "spike":
                continue  # an unconfirmed jump: no rule acts on it (the next sample confirms it or not)
            others = other_rules[index]
            if lo[index] < value < hi[index] and others is None and index not in bad_since:
                # the usual case: a value between its limits changes no state; a rate rule keeps its sample
                slot = rate_slot[index]
                if slot >= 0:
                    ts = batch.stamps[n] if batch.stamps is not None else batch.ts
                    if since[slot] <= ts - bases[slot] < due[slot] and calm_lo[slot] < value < calm_hi[slot]:
                        continue  # no sample to keep, the rate within its limits: as `rate` would say, in line
                    rate = rate_of(slot, value, ts)
                    if rate is not None and not -(q := quick[spec_of[slot]]) < rate < q:
                        self._rate(index, value, ts, events, rate)
                continue
            ts = batch.stamps[n] if batch.stamps is not None else batch.ts
            if index in bad_since:
                del bad_since[index]
                comm = self._comm.get(index)
                if comm is not None:  # a point bad for less than its comm_loss time never needed one
                    self._feed(comm, False, True, value, ts, events)
            if not lo[index] < value < hi[index]:
                for rule in self._limits_of(index):
                    self._fed(rule, rule.feed(value, ts), events)
                self._settle(index)
            if rate_slot[index] >= 0:
                self._rate(index, value, ts, events)
            if others is not None:
                for other in others:
                    event = other.feed(value, ts)
                    if event is not None or other.pending_since is not None:
                        self._fed(other, event, events)
        return events

    def _rate(self, index: int, value: float, ts: int, events: list[AlarmEvent], rate: float | None = None) -> None:
        """A point whose rate rule has no object yet: one is made when the rate first goes beyond its limit."""
        rates = self._rates
        slot = self._rate_slot[index]
        if rate is None:
            rate = rates.rate(slot, value, ts)
            if rate is None:
                return
        rise, fall, _, _, _ = rates.specs[rates.spec_of[slot]]
        if (rise is not None and rate >= rise) or (fall is not None and -rate >= fall):
            rule = self._rate_rule(index)
            self._fed(rule, rule.judge(rate, ts), events)

    def _rate_rule(self, index: int) -> RateRule:
        """Make the point's rate rule object; from now on it is fed with the point's other rules."""
        rule = RateRule(self.table.points[index], self._rates)
        self._add(rule.info, rule)
        self._rate_slot[index] = -1
        return rule

    def _fed(self, rule: Rule, event: AlarmEvent | None, events: list[AlarmEvent]) -> None:
        if event is not None:
            events.append(event)
            if event.state == "raised":
                self._raised.add(rule)
        if rule.pending_since is not None:
            self._waiting.add(rule)

    def _feed(self, rule: Rule, beyond: bool, back: bool, value: Any, ts: int, events: list[AlarmEvent]) -> None:
        self._fed(rule, rule.step(beyond, back, value, ts), events)

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
                self._raised.add(rule)
                events.append(event)
        return events

    def _bad(self, index: int, ts: int, events: list[AlarmEvent]) -> None:
        if self._lo[index] > self._hi[index]:  # rules unsettled: restart their on-delays
            for rule in self._limit_rules.get(index, ()):
                rule.hold()
            self._settle(index)
        for other in self._other_rules[index] or ():
            other.hold()
        if self._rate_slot[index] >= 0:
            self._rates.forget(self._rate_slot[index])
        since = self._bad_since.setdefault(index, ts)
        info = self.table.points[index]
        if ts - since >= round(info.comm_loss * 1000):
            comm = self._comm_of(index)
            if comm.state == NORMAL:
                comm.state = RAISED
                self._raised.add(comm)
                events.append(comm.event("raised", None, ts))

    # --- commands --------------------------------------------------------------------------------

    def reset(self, alarm_id: str, ts: int) -> AlarmEvent:
        """Reset a latched alarm whose condition is gone; the reset is an event of its own."""
        rule = self.rule(alarm_id)
        if rule is None and not self._configured(alarm_id):
            raise ResetRefused(f"no alarm {alarm_id!r} (ids are point/type, e.g. GT-201/high)")
        if rule is None or rule.state == NORMAL:
            raise ResetRefused(f"alarm {alarm_id} is not raised")
        if rule.state == RAISED:
            reason = "its condition is still present" if rule.latch else "it is not latched: it clears by itself"
            raise ResetRefused(f"alarm {alarm_id} cannot be reset: {reason}")
        rule.state = NORMAL
        if isinstance(rule, LimitRule):
            self._settle(rule.info.index)
        return rule.event("reset", None, ts, message="reset by hand")

    def _configured(self, alarm_id: str) -> bool:
        """An alarm the configuration defines, whether or not its rule was needed yet."""
        point, _, kind = alarm_id.rpartition("/")
        info = self.table.by_id.get(point)
        if info is None:
            return False
        if kind == "comm_loss":
            return True
        if kind == "rate":
            return self._rates.slot_of[info.index] >= 0
        return kind in _LIMIT_NAMES and info.limits is not None and not info.is_bool and \
            getattr(info.limits, kind) is not None

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
        return sorted(self.states())

    def states(self) -> dict[str, str]:
        """What to save: the state of every alarm that is not normal."""
        states = {rule.id: rule.state for rule in self._raised if rule.state != NORMAL}
        if len(states) != len(self._raised):  # some went back to normal (or share an id): forget those
            self._raised = {rule for rule in self._raised if rule.state != NORMAL}
        for alarm, rules in self._shared.items():
            if alarm in states:
                states[alarm] = _standing(rules)
        return states

    def changes(self) -> dict[str, str | None]:
        """Every alarm whose state changed since the last call: its state now, None when back to normal."""
        changes: dict[str, str | None] = {}
        for alarm, state in self._changes.items():
            shared = self._shared.get(alarm)
            if shared is not None:
                state = _standing(shared)
            changes[alarm] = None if state == NORMAL else state
        self._changes.clear()  # the same dict: every rule notes its changes in it
        return changes

    def load(self, states: dict[str, str], now: int) -> list[str]:
        """Take back saved states (after a restart); returns ids that no longer exist in the configuration."""
        unknown = []
        for rule_id, state in states.items():
            rule = self.rule(rule_id, make=True) if state in (RAISED, LATCHED) else None
            if rule is None:
                unknown.append(rule_id)
                continue
            rule.state = state
            self._raised.add(rule)
            if isinstance(rule, CommLossRule):
                self._bad_since[rule.info.index] = now
            if isinstance(rule, LimitRule):
                self._settle(rule.info.index)
        return unknown


def _standing(rules: list[Rule]) -> str:
    """The state of an alarm id several rules share: it stands while any of them does, raised before latched."""
    states = {rule.state for rule in rules}
    return RAISED if RAISED in states else LATCHED if LATCHED in states else NORMAL

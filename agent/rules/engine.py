"""The alarm stage: the engine that evaluates every rule the agent knows (agent.rules.limits, agent.rules.domain)
on whole reading batches.

Rules are small state machines keyed by alarm id (`point/type`): four-level limits with deadband and on-delay,
rate of change, detector fault, communication loss, zone crowding and production during an ordered shutdown.
A rule emits an event only when its state changes. A latched rule stays raised after its condition is gone
until it is reset by hand, and the reset is an event of its own. Bad readings hold limit alarms as they are.
The engine's state can be saved and loaded, so a restart neither raises twice nor forgets a clear.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent.config.points import PointInfo, PointTable
from agent.core import BAD, AlarmEvent, ReadingBatch
from agent.errors import ResetRefused
from agent.rules.domain import CommLossRule, CrowdingRule, FaultRule, HaltRule
from agent.rules.limits import LATCHED, LIMIT_KINDS, NORMAL, RAISED, LimitRule, RateRule, Rule

if TYPE_CHECKING:
    from agent.config.models import AgentConfig

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
            for kind, level, attr, direction in LIMIT_KINDS:
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

"""The alarm stage: limit rules and communication loss, evaluated on whole reading batches.

Each rule is a small state machine (normal → pending → raised → normal); it emits an event only when its
state changes. Bad readings hold limit alarms as they are (an unknown value neither raises nor clears).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agent.decode import BAD, ReadingBatch
from agent.points import PointTable

# type name, level, limit attribute, direction (+1 raises at or above the limit, -1 at or below)
_LIMIT_KINDS = (
    ("high_high", 2, "high_high", 1),
    ("high", 1, "high", 1),
    ("low", 1, "low", -1),
    ("low_low", 2, "low_low", -1),
)


@dataclass(slots=True)
class AlarmEvent:
    point: str
    type: str
    level: int
    state: str
    value: Any
    limit: float | None
    unit: str
    ts: int
    message: str = ""

    @property
    def id(self) -> str:
        return f"{self.point}/{self.type}"


class _LimitRule:
    __slots__ = ("active", "deadband", "delay_ms", "direction", "kind", "level", "limit", "pending_since")

    def __init__(self, kind: str, level: int, limit: float, direction: int, deadband: float, delay: float) -> None:
        self.kind = kind
        self.level = level
        self.limit = limit
        self.direction = direction
        self.deadband = deadband
        self.delay_ms = round(delay * 1000)
        self.active = False
        self.pending_since: int | None = None

    def step(self, value: float, ts: int) -> str | None:
        """Feed one value; return "raised" or "cleared" when the state changes."""
        if self.direction > 0:
            beyond = value >= self.limit
            back = value < self.limit - self.deadband
        else:
            beyond = value <= self.limit
            back = value > self.limit + self.deadband
        if self.active:
            if back:
                self.active = False
                return "cleared"
            return None
        if not beyond:
            self.pending_since = None
            return None
        if self.pending_since is None:
            self.pending_since = ts
        if ts - self.pending_since >= self.delay_ms:
            self.active = True
            self.pending_since = None
            return "raised"
        return None


class AlarmEngine:
    def __init__(self, table: PointTable) -> None:
        self.table = table
        self._rules: list[list[_LimitRule] | None] = [None] * len(table)
        for info in table.points:
            if info.limits is None or info.is_bool:
                continue
            rules = []
            for kind, level, attr, direction in _LIMIT_KINDS:
                limit = getattr(info.limits, attr)
                if limit is not None:
                    rules.append(_LimitRule(kind, level, limit, direction, info.limits.deadband, info.limits.delay))
            self._rules[info.index] = rules
        self._comm_ms = [round(p.comm_loss * 1000) for p in table.points]
        self._bad_since: dict[int, int] = {}
        self._comm_active: set[int] = set()

    def evaluate(self, batch: ReadingBatch) -> list[AlarmEvent]:
        events: list[AlarmEvent] = []
        points = self.table.points
        rules_of = self._rules
        for index, value, quality, ts in zip(batch.indices, batch.values, batch.qualities, batch.times(), strict=True):
            if quality == BAD:
                self._bad(index, ts, events)
                continue
            if index in self._bad_since:
                self._good_again(index, value, ts, events)
            rules = rules_of[index]
            if rules is None:
                continue
            for rule in rules:
                change = rule.step(value, ts)
                if change is not None:
                    info = points[index]
                    shown = float(info.json_float % value) if type(value) is float else value
                    events.append(AlarmEvent(info.id, rule.kind, rule.level, change, shown, rule.limit, info.unit, ts))
        return events

    def _bad(self, index: int, ts: int, events: list[AlarmEvent]) -> None:
        for rule in self._rules[index] or ():
            rule.pending_since = None
        since = self._bad_since.setdefault(index, ts)
        if index not in self._comm_active and ts - since >= self._comm_ms[index]:
            self._comm_active.add(index)
            info = self.table.points[index]
            events.append(
                AlarmEvent(info.id, "comm_loss", 1, "raised", None, info.comm_loss, info.unit, ts,
                           f"no valid reading for {(ts - since) / 1000:g}s")
            )

    def _good_again(self, index: int, value: Any, ts: int, events: list[AlarmEvent]) -> None:
        del self._bad_since[index]
        if index in self._comm_active:
            self._comm_active.discard(index)
            info = self.table.points[index]
            shown = float(info.json_float % value) if type(value) is float else value
            events.append(AlarmEvent(info.id, "comm_loss", 1, "cleared", shown, info.comm_loss, info.unit, ts))

    def active(self) -> list[str]:
        """Ids of the alarms raised now."""
        out = [f"{self.table.points[i].id}/comm_loss" for i in sorted(self._comm_active)]
        for index, rules in enumerate(self._rules):
            for rule in rules or ():
                if rule.active:
                    out.append(f"{self.table.points[index].id}/{rule.kind}")
        return out

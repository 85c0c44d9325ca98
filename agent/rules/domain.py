"""The domain rules: a gas detector's fault, crowding in a zone, production during an ordered shutdown, and
communication loss. They share the limit rules' state machine.
"""

from __future__ import annotations

from typing import Any

from agent.config.points import PointInfo
from agent.core import AlarmEvent
from agent.rules.limits import Rule


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

"""Daily energy per meter, from its total-energy register: what the meter counted since local midnight.

A register that goes down is either a rollover (it was near its top: count on across the wrap) or a reset or
replaced meter (count from the new reading). The state is saved, so a restart neither loses nor doubles energy:
the first reading after it closes the gap from the saved register value.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any


@dataclass
class DailyEnergy:
    rollover: float
    day: str = ""
    today: float = 0.0
    last: float | None = None

    def update(self, total: float, ts: int) -> float:
        """Feed one reading of the total register (kWh) at sample time ts (ms); returns today's energy."""
        day = time.strftime("%Y-%m-%d", time.localtime(ts / 1000))
        if day != self.day:
            self.day = day
            self.today = 0.0
        if self.last is not None:
            delta = total - self.last
            if delta < 0:
                # near the top and now near zero: the register wrapped; otherwise it was reset or replaced
                wrapped = self.last > 0.9 * self.rollover and total < 0.1 * self.rollover
                delta = (self.rollover - self.last) + total if wrapped else total
            self.today += delta
        self.last = total
        return round(self.today, 3)

    def save(self) -> dict[str, Any]:
        return {"day": self.day, "today": self.today, "last": self.last}

    def restore(self, saved: dict[str, Any]) -> None:
        self.day = str(saved.get("day", ""))
        self.today = float(saved.get("today", 0.0))
        last = saved.get("last")
        self.last = None if last is None else float(last)

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
    suspect: float | None = None  # an implausible step, waiting for the next reading to confirm it

    def update(self, total: float, ts: int) -> float:
        """Feed one good reading of the total register (kWh) at sample time ts (ms); returns today's energy.

        A step that no meter makes between two readings (the register going down without wrapping, or jumping
        by more than 1 % of its span) is believed only when the next reading confirms it: one garbled reply
        must not book a day's worth of energy."""
        day = time.strftime("%Y-%m-%d", time.localtime(ts / 1000))
        if day != self.day:
            self.day = day
            self.today = 0.0
        if self.last is None:
            self.last = total
            return round(self.today, 3)
        delta = total - self.last
        wrapped = delta < 0 and self.last > 0.9 * self.rollover and total < 0.1 * self.rollover
        if wrapped:
            delta = (self.rollover - self.last) + total
        elif delta < 0 or delta > 0.01 * self.rollover:
            suspect, self.suspect = self.suspect, total
            if suspect is None or abs(total - suspect) > 0.001 * self.rollover:
                return round(self.today, 3)  # wait for a second reading to confirm the step
            delta = total if delta < 0 else delta  # confirmed: a reset or replaced meter counts from zero
        self.suspect = None
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

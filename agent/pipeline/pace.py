"""Pace: the work of polls that complete together is shared out over turns of the event loop.

When many devices answer at once (a slow device server, a loop that was busy a moment), asyncio runs every
ready callback in one turn: 50 polls of 1,000 points each held the loop 130 ms, and every timer, the uplink and
the local socket waited behind them. Each poll asks `turn()` before its readings are decoded and judged; once
the turn's work passes a budget, the polls still waiting go on in the next turn, after the timers and the
I/O that came meanwhile. No reading is dropped or re-timed: each keeps the sample time of its poll.
"""

from __future__ import annotations

import asyncio
import time

BUDGET = 0.010  # seconds of poll work in one turn of the loop: a 50 ms stall needs five turns' worth in one


class Pace:
    """One per event loop: how long the polls handled in this turn of the loop have taken so far."""

    def __init__(self, budget: float = BUDGET) -> None:
        self.budget = budget
        self._began: float | None = None  # when this turn's first poll work began
        self.deferred = 0  # polls put off to a later turn, since start

    async def turn(self) -> None:
        """Return at once while this turn has budget left; otherwise in a later turn that has."""
        while True:
            now = time.perf_counter()
            if self._began is None:
                self._began = now
                # runs ahead of the polls put off below: they were queued after it, so they find a new turn
                asyncio.get_running_loop().call_soon(self._new_turn)
                return
            if now - self._began < self.budget:
                return
            self.deferred += 1
            await asyncio.sleep(0)

    def _new_turn(self) -> None:
        self._began = None

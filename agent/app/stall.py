"""The event loop's longest stall: a timer that should fire every 25 ms notes how late it fires, so a step that
holds the loop (a long write, a slow callback) shows in `health` as `max_loop_stall_ms`."""

from __future__ import annotations

import asyncio

PERIOD = 0.025  # short enough to see a 50 ms stall, long enough to cost nothing (40 wake-ups a second)


class LoopWatch:
    """How late the loop ran a timer: the worst since the last report, and the worst since start."""

    def __init__(self) -> None:
        self.window_max = 0.0  # seconds
        self.peak = 0.0
        self._handle: asyncio.TimerHandle | None = None

    async def run(self) -> None:
        """Watch until cancelled. The timer is a plain callback that sets the next one: no task step or future a
        wake-up, which at 40 a second were about 1.5 % of the agent's CPU at 10,000 readings a second."""
        if self._handle is not None:  # two runs would share one timer slot, and one of them would outlive its task
            raise RuntimeError("the loop watch is already running")
        loop = asyncio.get_running_loop()
        due = loop.time() + PERIOD
        self._handle = loop.call_at(due, self._fired, loop, due)
        try:
            await loop.create_future()  # never done: the watch ends with its task
        finally:
            if self._handle is not None:
                self._handle.cancel()
                self._handle = None

    def _fired(self, loop: asyncio.AbstractEventLoop, due: float) -> None:
        now = loop.time()
        late = now - due
        if late > self.window_max:
            self.window_max = late
            self.peak = max(self.peak, late)
        due = now + PERIOD
        self._handle = loop.call_at(due, self._fired, loop, due)

    def take(self) -> float:
        """The longest stall (ms) since the last call."""
        worst, self.window_max = self.window_max, 0.0
        return round(worst * 1000, 1)

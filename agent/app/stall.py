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

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + PERIOD
            await asyncio.sleep(PERIOD)
            late = loop.time() - due
            if late > self.window_max:
                self.window_max = late
                self.peak = max(self.peak, late)

    def take(self) -> float:
        """The longest stall (ms) since the last call."""
        worst, self.window_max = self.window_max, 0.0
        return round(worst * 1000, 1)

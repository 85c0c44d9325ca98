"""Scenario playing shared by every simulator: a scenario is an async method named after it, played once or in
a loop as a task the simulator owns (so `stop` cancels it)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, ClassVar, TypeVar

T = TypeVar("T")


class ScenarioPlayer:
    SCENARIOS: ClassVar[tuple[str, ...]] = ()
    speed: float
    _tasks: set[asyncio.Task[Any]]

    def _check_scenario(self, name: str) -> None:
        if name not in self.SCENARIOS:
            raise ValueError(f"no scenario {name!r} (one of {', '.join(self.SCENARIOS)})")

    async def run_scenario(self, name: str, *, speed: float | None = None) -> None:
        self._check_scenario(name)
        scenario: Callable[..., Awaitable[None]] = getattr(self, name)
        await scenario(speed=speed)

    def start_scenario(self, name: str, *, speed: float | None = None, loop: bool = False,
                       pause: float = 30.0) -> asyncio.Task[None]:
        """Run a scenario as a task the simulator owns (cancelled by `stop`); with loop, again after `pause`."""
        self._check_scenario(name)

        async def repeat() -> None:
            while True:
                await self.run_scenario(name, speed=speed)
                if not loop:
                    return
                await asyncio.sleep(pause / (speed or self.speed))

        return self._own(asyncio.create_task(repeat(), name=f"scenario {name}"))

    def _own(self, task: asyncio.Task[T]) -> asyncio.Task[T]:
        """Keep `task` until it ends, so that `stop` cancels it."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


async def ramp(start: float, target: float, seconds: float, pace: float) -> AsyncIterator[float]:
    """The values of a straight ramp from `start` to `target` over `seconds / pace`, a step every half second at
    pace 1, each given once its step's time has passed; the last is `target` itself."""
    steps = max(1, math.ceil(seconds / 0.5))
    for k in range(1, steps + 1):
        await asyncio.sleep(seconds / steps / pace)
        yield target if k == steps else start + (target - start) * k / steps

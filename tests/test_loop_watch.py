"""The loop watch: a step that holds the event loop shows as the longest stall, once, and the watch ends with its
task leaving no timer behind."""

from __future__ import annotations

import asyncio
import time

from agent.app.stall import PERIOD, LoopWatch


async def _settle(seconds: float) -> None:
    await asyncio.sleep(seconds)


def _hold_the_loop(seconds: float) -> None:
    time.sleep(seconds)  # on purpose: a step that keeps the loop from turning


def test_a_held_loop_shows_as_the_longest_stall_once() -> None:
    async def main() -> tuple[float, float, float, float]:
        watch = LoopWatch()
        task = asyncio.create_task(watch.run())
        await _settle(4 * PERIOD)
        calm = watch.take()
        _hold_the_loop(0.2)
        await _settle(2 * PERIOD)
        held = watch.take()
        await _settle(4 * PERIOD)
        after = watch.take()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return calm, held, after, watch.peak

    calm, held, after, peak = asyncio.run(main())
    assert held >= 150, held
    assert calm < 150 and after < 150, (calm, after)
    assert peak * 1000 >= 150


def test_the_watch_ends_with_its_task_and_leaves_no_timer() -> None:
    async def main() -> int:
        watch = LoopWatch()
        task = asyncio.create_task(watch.run())
        await _settle(3 * PERIOD)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        loop = asyncio.get_running_loop()
        # the loop's own timers: none of them is the watch's
        return sum(1 for handle in loop._scheduled if not handle.cancelled())  # type: ignore[attr-defined,misc]

    assert asyncio.run(main()) == 0


def test_the_watch_keeps_firing_while_the_loop_turns() -> None:
    async def main() -> int:
        watch = LoopWatch()
        fired = 0
        original = watch._fired

        def counting(loop: asyncio.AbstractEventLoop, due: float) -> None:
            nonlocal fired
            fired += 1
            original(loop, due)

        watch._fired = counting  # type: ignore[method-assign]
        task = asyncio.create_task(watch.run())
        await _settle(0.5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return fired

    fired = asyncio.run(main())
    assert 5 <= fired <= 0.5 / PERIOD + 2, fired


def test_a_second_run_at_once_is_refused_and_a_later_one_works() -> None:
    async def main() -> tuple[bool, int]:
        watch = LoopWatch()
        first = asyncio.create_task(watch.run())
        await _settle(PERIOD)
        refused = False
        try:
            await asyncio.wait_for(watch.run(), 1.0)  # a second run let in would run until cancelled
        except RuntimeError:
            refused = True
        except TimeoutError:
            pass
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        again = asyncio.create_task(watch.run())
        await _settle(3 * PERIOD)
        again.cancel()
        await asyncio.gather(again, return_exceptions=True)
        loop = asyncio.get_running_loop()
        return refused, sum(1 for handle in loop._scheduled if not handle.cancelled())  # type: ignore[attr-defined,misc]

    refused, left = asyncio.run(main())
    assert refused and left == 0

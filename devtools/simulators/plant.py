"""What every device simulator shares: its lifecycle (open, walk the values every period, cancel every task it
owns on stop, `async with`), the errors that name what it serves, and its command line's common flags and run loop.

It knows no protocol: what opening, closing and a walk tick do is each simulator's own.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from typing import Any, ClassVar, Self, TypeVar

from agent.errors import ConfigError
from simulators.scenario import ScenarioPlayer

T = TypeVar("T")


class Done:
    """An awaitable that is already complete, for calls made while nothing is served (no event loop yet)."""

    def __await__(self) -> Generator[Any, None, None]:
        return
        yield


class Plant(ScenarioPlayer):
    """A simulated piece of plant: `start` opens it and walks its values every `period` seconds, `stop` cancels the
    walk, the scenarios and every other task it owns, then closes it; it can start again after a stop."""

    PROTOCOL: ClassVar[str] = ""
    """The driver name of the channels served, as errors name them."""
    WALK_TASK: ClassVar[str] = "walk"

    def __init__(self, *, period: float, speed: float) -> None:
        if period <= 0 or speed <= 0:
            raise ValueError("period and speed must be positive")
        self.period = period
        self.speed = speed
        self._tasks: set[asyncio.Task[Any]] = set()
        self._walker: asyncio.Task[None] | None = None
        self._started = False

    async def _open(self) -> None:
        """Start serving; on an error `stop` follows."""

    async def _close(self) -> None:
        """Stop serving, once the tasks are cancelled."""

    def _workers(self) -> list[asyncio.Task[Any]]:
        """Tasks of the simulator's own beyond the walk and the owned ones, cancelled by `stop`."""
        return []

    async def _tick(self, elapsed: float) -> None:
        """One step of the values, `elapsed` seconds after the last."""

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        try:
            await self._open()
        except BaseException:
            await self.stop()
            raise
        self._walker = asyncio.create_task(self._walk_forever(), name=self.WALK_TASK)

    async def stop(self) -> None:
        tasks = [t for t in (self._walker, *self._tasks, *self._workers()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._walker = None
        self._tasks.clear()
        await self._close()
        self._started = False

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _walk_forever(self) -> None:
        loop = asyncio.get_running_loop()
        due = last = loop.time()
        while True:
            due = max(due + self.period, loop.time())  # a late tick is not made up for by a burst
            await asyncio.sleep(due - loop.time())
            now = loop.time()
            await self._tick(now - last)
            last = now

    # --- what is served ---

    def _channel_of(self, channels: Mapping[str, T], channel_id: str) -> T:
        try:
            return channels[channel_id]
        except KeyError:
            raise ValueError(f"no {self.PROTOCOL} channel {channel_id!r} (served: {', '.join(channels)})") from None

    def _point_of(self, points: Mapping[str, T], point_id: str) -> T:
        try:
            return points[point_id]
        except KeyError:
            raise ValueError(f"no point {point_id!r} on a {self.PROTOCOL} channel") from None

    @staticmethod
    def _device_of(channel_id: str, device_id: str, served: Iterable[T], ids: Callable[[T], list[str]]) -> T:
        """The unit, slave or meter that answers for a device (several devices may share one)."""
        for item in served:
            if device_id in ids(item):
                return item
        raise ValueError(f"channel {channel_id}: no device {device_id!r}")


# --- command line ------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser, scenarios: Sequence[str], *, values: str = "the value walk",
                  verbose: str = "log scenario steps") -> None:
    """The flags every simulator takes, after its own: scenarios, their speed, the walk of `values`, -v."""
    parser.add_argument("--scenario", action="append", default=[], choices=scenarios, help="run a scenario")
    parser.add_argument("--speed", type=float, default=1.0, help="scenario speed factor (2 = twice as fast)")
    parser.add_argument("--loop", action="store_true", help="repeat the scenarios until stopped")
    parser.add_argument("--period", type=float, default=1.0, help=f"seconds between steps of {values}")
    parser.add_argument("--seed", type=int, help=f"random seed of {values}")
    parser.add_argument("-v", "--verbose", action="store_true", help=verbose)


async def serve_until_stopped(plant: Plant, args: argparse.Namespace, announce: Callable[[], Iterable[str]]) -> None:
    """Serve until SIGINT or SIGTERM: once started, print the lines of `announce` and play `--scenario`s."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with plant:
        for line in announce():
            print(line, flush=True)
        for name in args.scenario:
            plant.start_scenario(name, loop=args.loop)
        await stop.wait()


def run_command(args: argparse.Namespace, action: Callable[[], object], *, quiet: str | None = None) -> int:
    """Log to stderr (scenario steps with -v; the `quiet` library's errors only), then do `action`: exit status 0,
    or 2 with one line on stderr for a bad configuration, a bad value or a port that cannot be served."""
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if quiet is not None:
        logging.getLogger(quiet).setLevel(logging.ERROR)
    try:
        action()
    except (ConfigError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0

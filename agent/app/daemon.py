"""The daemon: opens the store, wires the stages (poller → ingest → store → uplink, the control plane beside),
starts them, and stops them in order on SIGTERM/SIGINT (channels first, pending readings stored, a short
drain, then offline).

A stop always ends within the drain time plus a few seconds, whatever state each stage is in: a task that
does not end when cancelled (a library that swallowed the cancellation, a device that hangs its close) is
asked again, then left behind and named in the log. Nothing in flight is lost on a stop: unacknowledged
messages stay in the store for the next start. No alarm is raised by the stop itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from typing import Any

from agent import __version__
from agent.app.agent_key import load_sealer
from agent.app.health import Reports
from agent.app.stall import LoopWatch
from agent.app.systemd import Watchdog, sd_notify, watchdog_interval
from agent.config.models import AgentConfig
from agent.control.actions import Actions
from agent.control.commands import CommandHandler, CommandTrust
from agent.control.socket import ControlServer
from agent.pipeline.ingest import Pipeline
from agent.pipeline.poller import Poller
from agent.store import Store
from agent.store.upkeep import Upkeep, UpkeepConfig
from agent.uplink.uplink import Uplink

log = logging.getLogger(__name__)


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.store = Store(config.store.path, memory_fallback=config.store.memory_fallback)
        self.reports: Reports | None = None
        self._stop = asyncio.Event()
        self.abandoned: list[str] = []  # tasks that did not end on a stop (the caller exits the process)

    def request_stop(self) -> None:
        self._stop.set()

    async def _until_stop_or_failure(self, tasks: list[asyncio.Task[None]]) -> BaseException | None:
        """Wait for a stop request; a stage that ends on an error stops the agent too (and is returned)."""
        stop: asyncio.Future[Any] = asyncio.ensure_future(self._stop.wait())
        running: set[asyncio.Future[Any]] = set(tasks)
        try:
            while True:
                done, _ = await asyncio.wait({stop, *running}, return_when=asyncio.FIRST_COMPLETED)
                if stop in done:
                    return None
                for task in done:
                    running.discard(task)
                    error = None if task.cancelled() else task.exception()
                    if error is not None:
                        log.error("%s failed: %r; stopping", getattr(task, "get_name", str)(), error,
                                  exc_info=error)
                        return error
        finally:
            stop.cancel()

    async def _end(self, tasks: list[asyncio.Task[None]], within: float) -> None:
        """Cancel `tasks` and wait up to `within` seconds, asking again every half second; what still runs then
        is left behind, named in the log."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        pending = {t for t in tasks if not t.done()}
        while pending and loop.time() < deadline:
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=min(0.5, max(0.0, deadline - loop.time())))
        for task in pending:
            log.error("stopping: %s did not end within %.0fs of being cancelled; left behind", task.get_name(),
                      within)
            self.abandoned.append(task.get_name())

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop)
        cfg = self.config
        self.store.sealer = load_sealer(cfg.store.path.parent)
        with self.store:
            uplink = Uplink(cfg.uplink, cfg.agent, self.store, version=__version__, config_version=cfg.version)
            pipeline = Pipeline(cfg, self.store, on_stored=uplink.wake)
            poller = Poller(pipeline.table, pipeline.ingest, pipeline.polled)
            actions = Actions(pipeline, self.store)
            actions.restore()
            upkeep = Upkeep(self.store, UpkeepConfig(
                max_bytes=int(cfg.store.max_mb * 1e6), min_free_bytes=int(cfg.store.min_free_mb * 1e6),
                retention_s=cfg.store.retention, sync_interval=cfg.store.sync_interval,
            ))
            watch = LoopWatch()
            reports = self.reports = Reports(cfg, self.store, pipeline, poller, uplink, upkeep, actions, watch)
            uplink.health = reports.health
            pipeline.recover_archive()
            commands = CommandHandler(actions.reset_alarm, actions.set_production_state, reports.status,
                                      ids=self.store, max_age=cfg.control.command_max_age,
                                      trust=CommandTrust.of(cfg))
            reports.commands = commands
            uplink.on_command = lambda payload, retained: commands.handle(payload, "platform", retained=retained)
            control = ControlServer(cfg.control.socket,
                                    lambda line, caller: commands.handle(line, "local", caller=caller),
                                    {"points": reports.points, "channels": reports.channels, "buffer": reports.buffer})
            log.info("agent %s/%s starting: %d channel(s), %d point(s), store %s, next seq %d",
                     cfg.agent.enterprise, cfg.agent.id, len(cfg.channels), len(pipeline.table),
                     cfg.store.path, self.store.last_seq() + 1)
            # owned here, not by a TaskGroup: a group waits for every child at its exit, and one child that never
            # ends (a swallowed cancellation) would hold the stop forever
            uplink_task = loop.create_task(uplink.run(), name="uplink")
            field = [loop.create_task(poller.run_channel(ch), name=f"channel {ch.id}")
                     for ch in cfg.channels if ch.enabled]
            field.append(loop.create_task(pipeline.flush_loop(), name="batch timer"))
            field.append(loop.create_task(pipeline.archive_loop(), name="archive"))
            field.append(loop.create_task(control.run(), name="control socket"))
            upkeep_task = loop.create_task(upkeep.run(), name="store upkeep")
            others = [uplink_task, upkeep_task, loop.create_task(watch.run(), name="loop watch")]
            period = watchdog_interval()
            if period is not None:
                slowest = max((d.interval for _, d, _ in cfg.points()), default=0.0)
                polling = any(ch.enabled for ch in cfg.channels)  # without channels the loop's turning is progress
                watchdog = Watchdog(period, lambda: pipeline.readings_in if polling else int(loop.time()),
                                    stall=max(period, 3 * slowest))
                others.append(loop.create_task(watchdog.run(), name="watchdog"))
            sd_notify("READY=1")
            failed = await self._until_stop_or_failure([*field, *others])
            sd_notify("STOPPING=1")
            log.info("stopping: channels first, then a drain of up to %.1fs", cfg.store.shutdown_drain)
            pipeline.stopping = True  # from here on no alarm is raised: the agent itself stopped polling
            await self._end(field, 3.0)
            pipeline.flush()
            if failed is None:
                await uplink.drain(cfg.store.shutdown_drain)
            await uplink.stop()
            await self._end(others, 3.0)
            pipeline.save_energy()
            pipeline.archive_flush()
            self.store.sync()
            if failed is not None:
                raise ExceptionGroup("a stage of the agent failed", [failed]) if isinstance(failed, Exception) \
                    else failed
            left = self.store.backlog()
            log.info("stopped; %d message(s) (%d readings) stay in the store for the next start",
                     left.messages, left.readings)
        if self.abandoned:
            # the store is synced and closed; waiting for a task that ignores cancellation would never end
            log.error("exiting without waiting for: %s", ", ".join(self.abandoned))
            logging.shutdown()
            os._exit(0)

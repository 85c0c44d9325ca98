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
import gc
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent import __version__
from agent.app.agent_key import load_sealer
from agent.app.health import Reports
from agent.app.live_config import LiveConfig
from agent.app.stall import LoopWatch
from agent.app.systemd import Watchdog, sd_notify, watchdog_interval
from agent.config.base import ChannelBase
from agent.config.models import AgentConfig
from agent.control.actions import Actions
from agent.control.commands import CommandHandler, CommandTrust
from agent.control.socket import ControlServer
from agent.pipeline.ingest import Pipeline
from agent.pipeline.poller import Poller
from agent.store import Store
from agent.store.lock import StoreLock
from agent.store.upkeep import Upkeep, UpkeepConfig
from agent.uplink.uplink import Uplink

log = logging.getLogger(__name__)


class Agent:
    def __init__(self, config: AgentConfig, bootstrap: Path | None = None) -> None:
        """`bootstrap`: the configuration file `config` was read from (re-read on SIGHUP; the folder relative paths
        and the revisions from afar are judged by)."""
        self.config = config
        self.bootstrap = bootstrap if bootstrap is not None else Path("agent.yaml")
        self.store = Store(config.store.path, memory_fallback=config.store.memory_fallback)
        self.reports: Reports | None = None
        self._stop = asyncio.Event()
        self._tasks_changed = asyncio.Event()
        self.channel_tasks: dict[str, asyncio.Task[None]] = {}
        self.abandoned: list[str] = []  # tasks that did not end on a stop (the caller exits the process)

    def request_stop(self) -> None:
        self._stop.set()

    async def _until_stop_or_failure(self, tasks: Callable[[], list[asyncio.Task[None]]]) -> BaseException | None:
        """Wait for a stop request; a stage that ends on an error stops the agent too (and is returned). `tasks`
        gives the stages of the moment (a new configuration restarts channels)."""
        stop: asyncio.Future[Any] = asyncio.ensure_future(self._stop.wait())
        seen: set[asyncio.Task[None]] = set()
        try:
            while True:
                self._tasks_changed.clear()
                changed: asyncio.Future[Any] = asyncio.ensure_future(self._tasks_changed.wait())
                running = [t for t in tasks() if t not in seen]
                try:
                    done, _ = await asyncio.wait({stop, changed, *running}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    changed.cancel()
                if stop in done:
                    return None
                for task in running:
                    if not task.done():
                        continue
                    seen.add(task)
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
            log.error("%s did not end within %.0fs of being cancelled; left behind", task.get_name(), within)
            self.abandoned.append(task.get_name())

    # --- what a new configuration changes (agent.app.live_config) ----------------------------------------------

    def retire_channels(self, ids: list[str]) -> list[asyncio.Task[None]]:
        """Cancel the tasks of these channels at once (a new configuration changes or removes them)."""
        retired = [self.channel_tasks.pop(i) for i in ids if i in self.channel_tasks]
        for task in retired:
            task.cancel()
        self._tasks_changed.set()
        return retired

    async def start_channels(self, retired: list[asyncio.Task[None]], channels: list[ChannelBase]) -> None:
        """Once the retired tasks have ended (a serial port is opened by one task at a time), start `channels`."""
        await self._end(retired, 3.0)
        loop = asyncio.get_running_loop()
        for channel in channels:
            self.channel_tasks[channel.id] = loop.create_task(self.poller.run_channel(channel),
                                                              name=f"channel {channel.id}")
        self._tasks_changed.set()

    def configured(self, config: AgentConfig) -> None:
        """`config` is now the running configuration."""
        self.config = config
        gc.freeze()  # the new configuration's parts, like the start's, are kept out of the collector's walks
        if self.reports is not None:
            self.reports.config = config

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop)
        self.store.sealer = load_sealer(self.config.store.path.parent)  # the store's folder: push cannot move it
        with StoreLock(self.config.store.path), self.store:
            live = LiveConfig(self, self.bootstrap)
            cfg = self.config = await live.choose(self.config)
            self.uplink = uplink = Uplink(cfg.uplink, cfg.agent, self.store, version=__version__,
                                          config_version=cfg.version)
            self.pipeline = pipeline = Pipeline(cfg, self.store, on_stored=uplink.wake)
            self.poller = poller = Poller(pipeline.table, pipeline.ingest, pipeline.polled)
            self.actions = actions = Actions(pipeline, self.store)
            actions.restore()
            self.upkeep = upkeep = Upkeep(self.store, UpkeepConfig(
                max_bytes=int(cfg.store.max_mb * 1e6), min_free_bytes=int(cfg.store.min_free_mb * 1e6),
                retention_s=cfg.store.retention, sync_interval=cfg.store.sync_interval,
            ))
            watch = LoopWatch()
            reports = self.reports = Reports(cfg, self.store, pipeline, poller, uplink, upkeep, actions, watch)
            reports.config_info = live.info
            uplink.health = reports.health
            pipeline.recover_archive()
            self.commands = commands = CommandHandler(actions.reset_alarm, actions.set_production_state,
                                                      reports.status, ids=self.store,
                                                      max_age=cfg.control.command_max_age, trust=CommandTrust.of(cfg))
            reports.commands = commands
            uplink.on_command = lambda payload, retained: commands.handle(payload, "platform", retained=retained)
            uplink.on_config = live.on_push
            control = ControlServer(cfg.control.socket,
                                    lambda line, caller: commands.handle(line, "local", caller=caller),
                                    {"points": reports.points, "channels": reports.channels, "buffer": reports.buffer},
                                    {"config_apply": live.apply_local, "config_rollback": live.rollback_local})
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signal.SIGHUP, live.reload_soon)
            live.resume()
            log.info("agent %s/%s starting: %d channel(s), %d point(s), store %s, next seq %d, configuration "
                     "revision %d (%s)", cfg.agent.enterprise, cfg.agent.id, len(cfg.channels), len(pipeline.table),
                     cfg.store.path, self.store.last_seq() + 1, live.active.revision, live.active.source)
            # owned here, not by a TaskGroup: a group waits for every child at its exit, and one child that never
            # ends (a swallowed cancellation) would hold the stop forever
            uplink_task = loop.create_task(uplink.run(), name="uplink")
            self.channel_tasks = {ch.id: loop.create_task(poller.run_channel(ch), name=f"channel {ch.id}")
                                  for ch in cfg.channels if ch.enabled}
            field = [loop.create_task(pipeline.flush_loop(), name="batch timer"),
                     loop.create_task(pipeline.archive_loop(), name="archive"),
                     loop.create_task(control.run(), name="control socket"),
                     loop.create_task(live.run(), name="configuration")]
            upkeep_task = loop.create_task(upkeep.run(), name="store upkeep")
            others = [uplink_task, upkeep_task, loop.create_task(watch.run(), name="loop watch")]
            period = watchdog_interval()
            if period is not None:
                slowest = max((d.interval for ch in cfg.channels for d in getattr(ch, "devices", [])), default=0.0)
                polling = any(ch.enabled for ch in cfg.channels)  # without channels the loop's turning is progress
                watchdog = Watchdog(period, lambda: pipeline.readings_in if polling else int(loop.time()),
                                    stall=max(period, 3 * slowest))
                others.append(loop.create_task(watchdog.run(), name="watchdog"))
            # what start built lives as long as the process: a full collection need not walk it again and again
            gc.collect()
            gc.freeze()
            sd_notify("READY=1")
            failed = await self._until_stop_or_failure(lambda: [*self.channel_tasks.values(), *field, *others])
            sd_notify("STOPPING=1")
            log.info("stopping: channels first, then a drain of up to %.1fs", self.config.store.shutdown_drain)
            pipeline.stopping = True  # from here on no alarm is raised: the agent itself stopped polling
            await self._end([*field, *self.channel_tasks.values()], 3.0)
            pipeline.flush()
            if failed is None:
                await uplink.drain(self.config.store.shutdown_drain)
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

"""The daemon: opens the store, starts the uplink, the channels and the batch timer under one TaskGroup, and
stops them in order on SIGTERM/SIGINT (channels first, pending readings stored, a short drain, then offline).

Nothing in flight is lost on a stop: unacknowledged messages stay in the store for the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import time
from typing import Any

import psutil

from agent import __version__
from agent.config.models import AgentConfig
from agent.control.commands import CommandHandler
from agent.control.socket import ControlServer
from agent.pipeline.ingest import Pipeline
from agent.store.db import Store
from agent.store.upkeep import Upkeep, UpkeepConfig
from agent.uplink.session import Uplink

log = logging.getLogger(__name__)


def sd_notify(state: str) -> None:
    """Tell systemd (Type=notify) about our state; a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(state.encode(), address)


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.store = Store(config.store.path)
        self.pipeline: Pipeline | None = None
        self.uplink: Uplink | None = None
        self.upkeep: Upkeep | None = None
        self.started = time.time()
        self._stop = asyncio.Event()
        self._process = psutil.Process()
        self._process.cpu_percent()

    def request_stop(self) -> None:
        self._stop.set()

    def health(self) -> dict[str, Any]:
        assert self.pipeline is not None and self.upkeep is not None
        backlog = self.store.backlog()
        oldest = None if backlog.oldest_created is None else max(0.0, time.time() - backlog.oldest_created / 1000)
        history, history_oldest = self.store.archive_stats()
        try:
            disk_free = shutil.disk_usage(self.config.store.path.parent).free / 1e6
        except OSError:
            disk_free = None
        with self._process.oneshot():
            cpu = self._process.cpu_percent()
            rss = self._process.memory_info().rss / 1e6
        return {
            "ts": int(time.time() * 1000),
            "agent": self.config.agent.id,
            "enterprise": self.config.agent.enterprise,
            "uptime_s": round(time.time() - self.started),
            "backlog": {
                "messages": backlog.messages,
                "readings": backlog.readings,
                "oldest_age_s": None if oldest is None else round(oldest, 1),
            },
            "evicted_readings": self.upkeep.evicted + self.pipeline.lost_readings,
            "store": {
                "used_mb": round(self.store.used_bytes() / 1e6, 1),
                "history_readings": history,
                "history_oldest_age_s": None if history_oldest is None
                else round(max(0.0, time.time() - history_oldest / 1000), 1),
                "pruned_readings": self.upkeep.pruned,
                "recovered": self.store.recovered,
                "memory_only": self.store.fallback_reason,
            },
            **self.pipeline.health(),
            "cpu_percent": round(cpu, 1),
            "rss_mb": round(rss, 1),
            "disk_free_mb": None if disk_free is None else round(disk_free, 1),
        }

    def status(self) -> dict[str, Any]:
        """What `status` answers, to the platform and to the local CLI."""
        assert self.pipeline is not None and self.uplink is not None
        backlog = self.store.backlog()
        states = self.pipeline.alarms.states()
        return {
            "agent": self.config.agent.id,
            "enterprise": self.config.agent.enterprise,
            "version": __version__,
            "config_version": self.config.version,
            "uptime_s": round(time.time() - self.started),
            "production_state": self.pipeline.production_state,
            "alarms": [{"id": alarm_id, "state": state} for alarm_id, state in sorted(states.items())],
            "backlog": {"messages": backlog.messages, "readings": backlog.readings},
            "uplink": {"connected": self.uplink.connected, "last_error": self.uplink.last_error},
            **self.pipeline.health(),
        }

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop)
        cfg = self.config
        with self.store:
            uplink = Uplink(cfg.uplink, cfg.agent, self.store, version=__version__, config_version=cfg.version,
                            health=self.health)
            pipeline = Pipeline(cfg, self.store, on_stored=uplink.wake)
            upkeep = Upkeep(self.store, UpkeepConfig(
                max_bytes=int(cfg.store.max_mb * 1e6), min_free_bytes=int(cfg.store.min_free_mb * 1e6),
                retention_s=cfg.store.retention, sync_interval=cfg.store.sync_interval,
            ))
            self.uplink, self.pipeline, self.upkeep = uplink, pipeline, upkeep
            pipeline.recover_archive()
            commands = CommandHandler(pipeline.reset_alarm, pipeline.set_production_state, self.status)
            uplink.on_command = commands.handle
            control = ControlServer(cfg.control.socket, commands.handle)
            log.info("agent %s/%s starting: %d channel(s), %d point(s), store %s, next seq %d",
                     cfg.agent.enterprise, cfg.agent.id, len(cfg.channels), len(pipeline.table),
                     cfg.store.path, self.store.last_seq() + 1)
            async with asyncio.TaskGroup() as tg:
                uplink_task = tg.create_task(uplink.run(), name="uplink")
                field = [tg.create_task(pipeline.run_channel(ch), name=f"channel {ch.id}")
                         for ch in cfg.channels if ch.enabled]
                field.append(tg.create_task(pipeline.flush_loop(), name="batch timer"))
                field.append(tg.create_task(pipeline.archive_loop(), name="archive"))
                upkeep_task = tg.create_task(upkeep.run(), name="store upkeep")
                field.append(tg.create_task(control.run(), name="control socket"))
                sd_notify("READY=1")
                await self._stop.wait()
                sd_notify("STOPPING=1")
                log.info("stopping: channels first, then a drain of up to %.1fs", cfg.store.shutdown_drain)
                for task in field:
                    task.cancel()
                await asyncio.gather(*field, return_exceptions=True)
                pipeline.flush()
                await uplink.drain(cfg.store.shutdown_drain)
                await uplink.stop()
                uplink_task.cancel()
                upkeep_task.cancel()
                pipeline.save_energy()
                pipeline.archive_flush()
                self.store.sync()
            left = self.store.backlog()
            log.info("stopped; %d message(s) (%d readings) stay in the store for the next start",
                     left.messages, left.readings)

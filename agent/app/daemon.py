"""The daemon: opens the store, wires the stages (poller → ingest → store → uplink, the control plane beside),
starts them under one TaskGroup, and stops them in order on SIGTERM/SIGINT (channels first, pending readings
stored, a short drain, then offline).

Nothing in flight is lost on a stop: unacknowledged messages stay in the store for the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket

from agent import __version__
from agent.app.health import Reports
from agent.config.models import AgentConfig
from agent.control.actions import Actions
from agent.control.commands import CommandHandler
from agent.control.socket import ControlServer
from agent.pipeline.ingest import Pipeline
from agent.pipeline.poller import Poller
from agent.store import Store
from agent.store.upkeep import Upkeep, UpkeepConfig
from agent.uplink.uplink import Uplink

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
        self.reports: Reports | None = None
        self._stop = asyncio.Event()

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop)
        cfg = self.config
        with self.store:
            uplink = Uplink(cfg.uplink, cfg.agent, self.store, version=__version__, config_version=cfg.version)
            pipeline = Pipeline(cfg, self.store, on_stored=uplink.wake)
            poller = Poller(pipeline.table, pipeline.ingest)
            actions = Actions(pipeline, self.store)
            actions.restore()
            upkeep = Upkeep(self.store, UpkeepConfig(
                max_bytes=int(cfg.store.max_mb * 1e6), min_free_bytes=int(cfg.store.min_free_mb * 1e6),
                retention_s=cfg.store.retention, sync_interval=cfg.store.sync_interval,
            ))
            reports = self.reports = Reports(cfg, self.store, pipeline, poller, uplink, upkeep, actions)
            uplink.health = reports.health
            pipeline.recover_archive()
            commands = CommandHandler(actions.reset_alarm, actions.set_production_state, reports.status,
                                      ids=self.store, max_age=cfg.control.command_max_age)
            reports.commands = commands
            uplink.on_command = lambda payload, retained: commands.handle(payload, "platform", retained=retained)
            control = ControlServer(cfg.control.socket,
                                    lambda line, caller: commands.handle(line, "local", caller=caller))
            log.info("agent %s/%s starting: %d channel(s), %d point(s), store %s, next seq %d",
                     cfg.agent.enterprise, cfg.agent.id, len(cfg.channels), len(pipeline.table),
                     cfg.store.path, self.store.last_seq() + 1)
            async with asyncio.TaskGroup() as tg:
                uplink_task = tg.create_task(uplink.run(), name="uplink")
                field = [tg.create_task(poller.run_channel(ch), name=f"channel {ch.id}")
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

"""systemd's notify protocol: READY and STOPPING, and the watchdog. The agent says it is alive only while its
event loop runs and the pipeline makes progress, so a stuck loop or a wedged stage gets the service restarted.

A no-op outside systemd (no NOTIFY_SOCKET).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable

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


def watchdog_interval() -> float | None:
    """The watchdog period systemd asks for (WatchdogSec=), in seconds; None when there is none for us."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        seconds = int(usec) / 1e6
    except ValueError:
        return None
    return seconds if seconds > 0 else None


class Watchdog:
    """Pings systemd every half period while `progress()` keeps changing within `stall` seconds."""

    def __init__(self, period: float, progress: Callable[[], int], stall: float,
                 notify: Callable[[str], None] = sd_notify) -> None:
        self.period = period
        self.progress = progress
        self.stall = stall
        self.notify = notify
        self.stalled = False

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        last, since = self.progress(), loop.time()
        while True:
            await asyncio.sleep(self.period / 2)  # systemd's advice: ping at half the period
            now = self.progress()
            if now != last:
                last, since = now, loop.time()
            quiet = loop.time() - since
            if quiet <= self.stall:
                if self.stalled:
                    log.warning("watchdog: the pipeline moves again; telling systemd the agent is alive")
                    self.stalled = False
                self.notify("WATCHDOG=1")
            elif not self.stalled:
                log.error("watchdog: no reading went through the pipeline for %.0fs; no longer telling systemd the "
                          "agent is alive (it restarts the service after WatchdogSec)", quiet)
                self.stalled = True

"""Store upkeep, one background task: syncs committed telemetry to disk at a steady cadence, keeps the store
under its disk cap and above the minimum free disk, and expires records past their retention.

When space runs out it drops history that was already delivered first, then the oldest undelivered telemetry
(counted as evicted); alarm events are never dropped for space.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import sqlite3
import time
from dataclasses import dataclass

from agent.store import Store

log = logging.getLogger(__name__)


@dataclass
class UpkeepConfig:
    max_bytes: int
    min_free_bytes: int
    retention_s: float
    sync_interval: float


class Upkeep:
    def __init__(self, store: Store, config: UpkeepConfig) -> None:
        self.store = store
        self.config = config
        self.evicted = int(store.meta("evicted_readings", 0) or 0)
        self.pruned = int(store.meta("pruned_readings", 0) or 0)
        self.expired = 0
        self.full_of_alarms = False
        self.last_error: str | None = None
        self.last_sync: float | None = None  # wall time of the last sync to disk

    def free_disk(self) -> int:
        try:
            return shutil.disk_usage(self.store.path.parent).free
        except OSError:
            return 1 << 62

    def over(self) -> str | None:
        """Which bound is crossed now, if any."""
        if self.store.fallback_reason is not None:
            return None
        if self.store.used_bytes() > self.config.max_bytes:
            return "cap"
        if self.free_disk() < self.config.min_free_bytes:
            return "disk"
        return None

    def enforce_bounds(self, rounds: int = 10_000) -> None:
        """Drop the oldest history, then the oldest undelivered telemetry, until both bounds hold (or `rounds`
        batches were dropped; the rest waits for the next call, so the event loop is never held long)."""
        reason = self.over()
        if reason is None:
            self.full_of_alarms = False
            return
        pruned = evicted = 0
        free_before = self.free_disk()
        for _ in range(rounds):
            n = self.store.drop_oldest_archive(500)
            if n:
                pruned += n
            else:
                undelivered, delivered = self.store.drop_oldest_data(50)
                if not undelivered and not delivered:
                    if not self.full_of_alarms:
                        log.error("store: the %s is reached and only alarm events are left; they are never "
                                  "dropped, so the store goes over it", "disk cap" if reason == "cap" else "free disk")
                    self.full_of_alarms = True
                    break
                evicted += undelivered
            if reason == "disk":
                self.store.release_free_pages()
                if self.free_disk() <= free_before and pruned + evicted > 100_000:
                    # other files fill the disk: emptying the store would not help; say so and keep the data
                    log.error("store: the disk stays below min_free_mb although the store gave space back; "
                              "something else is filling %s", self.store.path.parent)
                    break
            reason = self.over()
            if reason is None:
                break
        if pruned or evicted:
            with self.store.transaction():
                self.store.add_meta("pruned_readings", pruned)
                self.store.add_meta("evicted_readings", evicted)
            self.pruned += pruned
            self.evicted += evicted
            log.warning("store: over its bounds: dropped %d delivered readings of history and evicted %d "
                        "undelivered readings (%d evicted in all)", pruned, evicted, self.evicted)

    def expire(self) -> None:
        before = int((time.time() - self.config.retention_s) * 1000)
        readings, events = self.store.expire(before)
        self._expired(readings, events)

    async def expire_in_steps(self, chunks: int = 2000) -> None:
        """Retention a few thousand chunks at a time, the loop turning between them."""
        before = int((time.time() - self.config.retention_s) * 1000)
        readings = events = 0
        while True:
            r, e = self.store.expire(before, limit=chunks)
            readings, events = readings + r, events + e
            if self.store.expired_chunks < chunks:
                break
            await asyncio.sleep(0)
        self._expired(readings, events)

    def _expired(self, readings: int, events: int) -> None:
        if readings or events:
            self.expired += readings
            log.info("store: retention: expired %d readings and %d alarm events older than %.0f days",
                     readings, events, self.config.retention_s / 86400)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        next_bounds = next_expire = loop.time()
        while True:
            await asyncio.sleep(self.config.sync_interval)
            try:
                await asyncio.to_thread(self.store.sync_apart)  # a checkpoint may take long: not on the loop
                self.last_sync = time.time()
                now = loop.time()
                if now >= next_bounds:
                    self.enforce_bounds(rounds=20)  # a few batches per second until within bounds
                    next_bounds = now + (1.0 if self.over() else 5.0)
                if now >= next_expire:
                    await self.expire_in_steps()
                    next_expire = now + 600.0
                self.last_error = None
            except sqlite3.DatabaseError as exc:
                if not self.store.recover_if_corrupt(exc):
                    self.last_error = str(exc)
                    log.error("store upkeep failed: %s", exc)

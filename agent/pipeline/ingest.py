"""The pipeline: channels poll their devices; each poll goes decode → alarms → store as one batch.

Alarm events are stored at once in their own commit; readings are grouped into `data` messages of at most
`batch.max_readings`, stored when a message is full or `batch.max_delay` has passed. A failing device is
backed off, and while it is, each of its poll slots still yields `bad` readings: never silence.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sqlite3
import time
from collections.abc import Callable
from typing import Any, TypeVar

import orjson

from agent.config.base import ChannelBase
from agent.config.models import AgentConfig
from agent.config.points import DeviceSlot, PointTable
from agent.drivers import registry
from agent.drivers.registry import DeviceRead, Driver
from agent.pipeline.decode import BAD, GOOD, UNCERTAIN, ReadingBatch, bad_batch, decode
from agent.rules.energy import DailyEnergy
from agent.rules.engine import AlarmEngine, AlarmEvent
from agent.store.archive import ArchiveBuffer
from agent.store.db import Store
from agent.uplink.messages import KIND_ALARM, KIND_DATA, alarm_body, data_body, identity_fields

log = logging.getLogger(__name__)

_UNKNOWN = 255
_MAX_UNSTORED_EVENTS = 100_000  # alarm events held in memory while the store refuses writes
_QUALITY_CODES = {"good": GOOD, "uncertain": UNCERTAIN, "bad": BAD}
T = TypeVar("T")


class Pipeline:
    def __init__(self, config: AgentConfig, store: Store, on_stored: Callable[[], None] = lambda: None) -> None:
        self.config = config
        self.store = store
        self.on_stored = on_stored
        self.table = PointTable(config)
        # derived points (daily energy) get their indices before anything sizes itself on the table
        self._energy: dict[int, tuple[DailyEnergy, int, str]] = {}
        for meter in config.power.meters:
            if meter.daily_energy is not None and meter.total_energy is not None:
                derived = self.table.add_derived(meter.daily_energy, "kWh", "power", meter.id)
                source = self.table.by_id[meter.total_energy].index
                self._energy[source] = (DailyEnergy(meter.rollover), derived.index, meter.id)
        self.alarms = AlarmEngine(self.table, config)
        self.identity = identity_fields(config.agent.id, config.agent.enterprise)
        self.max_readings = config.uplink.batch.max_readings
        self.max_delay = config.uplink.batch.max_delay
        self.quality = bytearray([_UNKNOWN]) * len(self.table)
        self.drivers: dict[str, Driver] = {}
        self.event_listeners: list[Callable[[AlarmEvent], None]] = []
        self._pending: list[ReadingBatch] = []
        self._pending_count = 0
        self._pending_since = 0.0
        self.readings_in = 0
        self.events_out = 0
        self.lost_readings = 0  # readings the store refused (disk full, unreadable file)
        self._unstored: list[tuple[bytes, int]] = []  # alarm events the store refused, retried first
        self.archive = ArchiveBuffer()
        self._id_of = [p.id for p in self.table.points]
        self._remap_keys()
        self.production_state = "normal"
        self._restore_state()

    def _restore_state(self) -> None:
        """Alarm states, the production state and the energy counters as they were before the restart."""
        def load() -> None:
            unknown = self.alarms.load(self.store.alarm_states(), int(time.time() * 1000))
            if unknown:
                log.info("alarms no longer configured, forgotten: %s", ", ".join(sorted(unknown)))
            self.production_state = str(self.store.meta("production_state", "normal"))
            restored.extend(self.alarms.set_halted(self.production_state == "halted", int(time.time() * 1000)))
            for energy, _, meter in self._energy.values():
                saved = self.store.meta(f"energy:{meter}")
                if saved:
                    energy.restore(orjson.loads(saved))

        restored: list[AlarmEvent] = []
        self._guard("restoring alarm and production states", load)
        if restored:  # a violation saved as raised while the state says normal (a crash between two commits)
            self.store_events(restored)
        raised = self.alarms.active()
        if raised:
            log.info("alarms raised before the restart, still raised: %s", ", ".join(raised))

    def save_energy(self) -> None:
        def save() -> None:
            with self.store.transaction():
                for energy, _, meter in self._energy.values():
                    self.store.set_meta(f"energy:{meter}", orjson.dumps(energy.save()).decode())

        if self._energy:
            self._guard("saving energy counters", save)

    def _remap_keys(self) -> None:
        """Tell the store every point and which are on/off (history reads those back as booleans)."""
        bools = frozenset(p.id for p in self.table.points if p.is_bool)
        self.store.point_keys((p.id for p in self.table.points), bools)

    def _guard(self, what: str, action: Callable[[], T]) -> T | None:
        """Run a store action; a damaged file is replaced and the action tried again; other errors are logged."""
        try:
            return action()
        except sqlite3.DatabaseError as exc:
            if self.store.recover_if_corrupt(exc):
                self._remap_keys()
                try:
                    return action()
                except sqlite3.DatabaseError as again:
                    exc = again
            log.error("store: %s failed: %s", what, exc)
            return None

    # --- decode → alarms → store -----------------------------------------------------------------

    def ingest(self, batch: ReadingBatch) -> None:
        if not batch.indices:
            return  # a subscription with no news
        if self._energy:
            self._add_daily_energy(batch)
        events = self.alarms.evaluate(batch)
        quality = self.quality
        for index, q in zip(batch.indices, batch.qualities, strict=True):
            quality[index] = q
        id_of = self._id_of
        self.archive.add_many([id_of[i] for i in batch.indices], batch.times(), batch.values, batch.qualities)
        self.readings_in += len(batch)
        if events:
            self.store_events(events)
        if not self._pending:
            self._pending_since = time.monotonic()
        self._pending.append(batch)
        self._pending_count += len(batch)
        if self._pending_count >= self.max_readings:
            self.flush()

    def _add_daily_energy(self, batch: ReadingBatch) -> None:
        energy = self._energy
        times = batch.times()
        extra: list[tuple[int, float, int]] = []
        for n, index in enumerate(batch.indices):
            meter = energy.get(index)
            if meter is not None and batch.qualities[n] == GOOD:
                extra.append((meter[1], meter[0].update(float(batch.values[n]), times[n]), times[n]))
        for derived, value, ts in extra:
            batch.indices.append(derived)
            batch.values.append(value)
            batch.qualities.append(GOOD)
            if batch.stamps is not None:
                batch.stamps.append(ts)

    def store_events(self, events: list[AlarmEvent]) -> None:
        """Store alarm events (and the engine's states) in one synced commit; events the store refuses (a full
        disk) wait in memory, in order, and go first at the next attempt: an alarm event is never dropped."""
        bodies = self._unstored + [(alarm_body(self.identity, event), event.ts) for event in events]
        states = self.alarms.states()

        def write() -> bool:
            # alarm events are rare and must survive a power cut: their commit syncs the log
            with self.store.transaction(durable=True):
                for body, ts in bodies:
                    self.store.append(KIND_ALARM, 1, body, created=ts)
                self.store.save_alarm_states(states)
            return True

        if self._guard("storing alarm events", write) is None:
            if len(bodies) > _MAX_UNSTORED_EVENTS:
                log.error("alarm events waiting for the store: %d, the oldest beyond %d are dropped",
                          len(bodies), _MAX_UNSTORED_EVENTS)
            self._unstored = bodies[-_MAX_UNSTORED_EVENTS:]
        else:
            self._unstored = []
        self.events_out += len(events)
        for event in events:
            log.log(logging.WARNING if event.state == "raised" else logging.INFO,
                    "alarm %s %s: value %s, limit %s %s", event.id, event.state, event.value, event.limit, event.unit)
            for listener in self.event_listeners:
                listener(event)
        self.on_stored()

    def flush(self) -> None:
        """Store every pending reading as `data` messages of at most max_readings each, in one commit."""
        if not self._pending:
            return
        pending, self._pending, self._pending_count = self._pending, [], 0
        points = self.table.points
        messages: list[tuple[bytes, int]] = []
        chunk: list[ReadingBatch] = []
        size = 0
        for batch in pending:
            start = 0
            while start < len(batch):
                take = min(len(batch) - start, self.max_readings - size)
                part = batch if start == 0 and take == len(batch) else batch.slice(start, start + take)
                chunk.append(part)
                size += take
                start += take
                if size == self.max_readings:
                    messages.append(data_body(self.identity, points, chunk))
                    chunk, size = [], 0
        if chunk:
            messages.append(data_body(self.identity, points, chunk))

        def write() -> bool:
            with self.store.transaction():
                for body, count in messages:
                    self.store.append(KIND_DATA, count, body)
            return True

        if self._guard("storing readings", write) is None:
            self.lost_readings += sum(count for _, count in messages)
        self.on_stored()

    # --- commands (from the platform or the local CLI) -------------------------------------------

    def reset_alarm(self, alarm_id: str) -> dict[str, Any]:
        """Reset a latched alarm; raises ResetRefused with the reason when it cannot be."""
        event = self.alarms.reset(alarm_id, int(time.time() * 1000))
        self.store_events([event])
        return {"alarm": alarm_id, "state": "reset"}

    def set_production_state(self, state: str) -> dict[str, Any]:
        if state not in ("normal", "halted"):
            raise ValueError(f"production state must be 'normal' or 'halted', not {state!r}")
        previous, self.production_state = self.production_state, state

        def save() -> None:
            with self.store.transaction(durable=True):
                self.store.set_meta("production_state", state)

        self._guard("saving the production state", save)
        events = self.alarms.set_halted(state == "halted", int(time.time() * 1000))
        if events:
            self.store_events(events)
        if previous != state:
            log.warning("production state: %s -> %s", previous, state)
        return {"production_state": state, "previous": previous}

    # --- the archive -----------------------------------------------------------------------------

    def archive_flush(self) -> None:
        """Write the readings gathered since the last flush to the archive, as one chunk per point."""
        self.flush()  # every reading in the archive buffer is now in a stored message
        if self.archive.count == 0:
            return
        mark = self.store.last_seq()
        chunks = list(self.archive.take())
        self._guard("writing the archive", lambda: self.store.write_chunks(chunks, mark))

    def recover_archive(self) -> int:
        """At start: readings of messages stored after the last archive flush (a crash) go to the archive."""
        missing = 0

        def replay() -> None:
            nonlocal missing
            for seq, body in self.store.data_rows_after(self.store.archive_mark()):
                try:
                    readings = orjson.loads(b"{" + body)["readings"]
                except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
                    log.error("store: message seq %d cannot be read back for the archive: %s", seq, exc)
                    continue
                for r in readings:  # a point no longer configured keeps its history too
                    self.archive.add(r["point"], r["ts"], r["value"], _QUALITY_CODES.get(r["quality"], BAD))
                    missing += 1

        self._guard("recovering the archive", replay)
        if missing:
            log.info("store: %d readings stored after the last archive flush were added to the archive", missing)
            self.archive_flush()
        return missing

    async def archive_loop(self) -> None:
        """Flush the archive every archive_interval, encoding a few hundred points per turn of the loop, so a
        10,000-point flush never holds up polls or alarms (a cancelled flush is redone from the outbox)."""
        interval = self.config.store.archive_interval
        while True:
            await asyncio.sleep(interval)
            self.flush()
            self.save_energy()
            if self.archive.count == 0:
                continue
            mark = self.store.last_seq()
            rows: list[tuple[str, int, int, int, bytes]] = []
            taking = self.archive.take()
            try:
                for n, row in enumerate(taking, 1):
                    rows.append(row)
                    if n % 250 == 0:
                        await asyncio.sleep(0)
            except asyncio.CancelledError:
                rows.extend(taking)  # stopping: what was taken must still be written
                self._guard("writing the archive", functools.partial(self.store.write_chunks, rows, mark))
                raise
            self._guard("writing the archive", functools.partial(self.store.write_chunks, rows, mark))

    async def flush_loop(self) -> None:
        """Store a partial batch once its oldest reading has waited max_delay."""
        tick = max(0.05, min(self.max_delay / 4, 0.25))
        while True:
            await asyncio.sleep(tick)
            events = self.alarms.tick(int(time.time() * 1000))
            if events or self._unstored:
                self.store_events(events)
            if self._pending and time.monotonic() - self._pending_since >= self.max_delay:
                self.flush()

    # --- channels --------------------------------------------------------------------------------

    def slots_of(self, channel: ChannelBase) -> list[DeviceSlot]:
        return [s for s in self.table.devices if s.channel is channel]

    async def run_channel(self, channel: ChannelBase) -> None:
        """Poll the devices of one channel in turn, one transaction at a time, until cancelled."""
        driver = registry.get(channel.driver).factory(channel)
        self.drivers[channel.id] = driver
        slots = self.slots_of(channel)
        loop = asyncio.get_running_loop()
        due = {id(s): loop.time() for s in slots}
        retry_at = {id(s): 0.0 for s in slots}
        try:
            while True:
                slot = min(slots, key=lambda s: due[id(s)])
                delay = due[id(slot)] - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                ts = int(time.time() * 1000)
                now = loop.time()
                if slot.failures and now < retry_at[id(slot)]:
                    self.ingest(bad_batch(slot.indices, ts))
                else:
                    read = await self._read(driver, slot)
                    if read is None:
                        self.ingest(bad_batch(slot.indices, ts))
                        failed = True
                    else:
                        self.ingest(decode(self.table.points, slot.indices, read, ts))
                        failed = read.positions is None and all(v is None for v in read.values)
                    self._device_outcome(slot, read, failed)
                    if failed:
                        backoff = min(slot.device.interval * 2 ** (slot.failures - 1), slot.device.backoff_max)
                        retry_at[id(slot)] = loop.time() + backoff
                interval = slot.device.interval
                nxt = due[id(slot)] + interval
                # a poll that overran skips the missed slots instead of bursting to catch up
                due[id(slot)] = nxt if nxt > loop.time() else loop.time() + interval
        finally:
            await driver.close()

    async def _read(self, driver: Driver, slot: DeviceSlot) -> DeviceRead | None:
        try:
            return await driver.read(slot.device)
        except (OSError, TimeoutError, EOFError) as exc:
            slot.last_error = str(exc) or type(exc).__name__
        except Exception as exc:  # a driver bug must cost this poll, not the channel
            log.exception("channel %s device %s: driver failed", slot.channel.id, slot.device.id)
            slot.last_error = f"driver error: {exc!r}"
        return None

    def _device_outcome(self, slot: DeviceSlot, read: DeviceRead | None, failed: bool) -> None:
        where = f"channel {slot.channel.id} device {slot.device.id}"
        if read is not None and read.errors:
            slot.last_error = "; ".join(read.errors)
        if failed:
            slot.failures += 1
            if slot.state != "failing":
                log.warning("%s: not answering: %s", where, slot.last_error)
            slot.state = "failing"
            return
        if slot.state == "failing":
            log.info("%s: answering again", where)
        if read is not None and read.errors:
            if slot.state != "partial":
                log.warning("%s: some points unreadable: %s", where, slot.last_error)
            slot.state = "partial"
        else:
            slot.state = "ok"
            slot.last_error = None
        slot.failures = 0

    # --- health ----------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        channels = []
        for channel in self.config.channels:
            driver = self.drivers.get(channel.id)
            channels.append({
                "id": channel.id,
                "link": "up" if driver is not None and driver.connected else "down",
                "devices": [
                    {"id": s.device.id, "state": "ok" if s.state == "ok" else "failing", "last_error": s.last_error}
                    for s in self.slots_of(channel)
                ],
            })
        q = self.quality
        return {
            "channels": channels,
            "points": {"good": q.count(GOOD), "uncertain": q.count(UNCERTAIN),
                       "bad": q.count(BAD) + q.count(_UNKNOWN)},
        }


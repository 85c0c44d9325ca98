"""The poller: each channel polls its devices in turn, one transaction at a time, and hands every poll on as one
batch (decoded, or `bad` when the device did not answer). It keeps each device's state and backs a failing
device off; while it is backed off, each of its poll slots still yields `bad` readings: never silence.

It never touches the store or the uplink: what it reads goes to the `ingest` callable it was given.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.config.base import ChannelBase, DeviceBase
from agent.config.points import DeviceSlot, PointTable
from agent.core import DeviceRead, ReadingBatch
from agent.drivers import registry
from agent.drivers.registry import Driver
from agent.pipeline.decode import DeviceClock, bad_batch, decode
from agent.pipeline.pace import Pace

log = logging.getLogger(__name__)


@dataclass(slots=True)
class DeviceState:
    """How one device answers: `ok`, `partial` (some points unreadable) or `failing`, and since when."""

    slot: DeviceSlot
    state: str = "ok"
    last_error: str | None = None
    failures: int = 0  # consecutive failed polls
    due: float = 0.0  # loop time of the next poll
    retry_at: float = 0.0  # loop time before which a failing device is not asked
    last_good: int | None = None  # wall time (ms) of the last poll that read something
    round_trip: float | None = None  # seconds the last read took
    polls: int = 0
    errors: int = 0  # polls that failed or read only part of the points
    late: int = 0  # polls run after their slot (the one before overran): their readings carry the real time
    overruns: int = 0  # slots skipped because the polls before them overran by a whole interval or more
    overrun_logged: float = -1e9  # loop time of the last warning about skipped slots
    retired: bool = False  # its channel was restarted or removed by a new configuration: it reads no more
    clock: DeviceClock = field(init=False)  # the device's own timestamps against the agent's clock (decode checks)

    def __post_init__(self) -> None:
        self.clock = DeviceClock(self.where, self.slot.device.max_clock_skew)

    @property
    def device(self) -> DeviceBase:
        return self.slot.device

    @property
    def where(self) -> str:
        return f"channel {self.slot.channel.id} device {self.slot.device.id}"


@dataclass
class Poller:
    """Polls every enabled channel of a point table; `ingest` receives one batch per poll."""

    table: PointTable
    ingest: Callable[[ReadingBatch], None]
    polled: Callable[[DeviceSlot, int], None] = lambda slot, ts: None  # every slot, read or not (online rates)
    drivers: dict[str, Driver] = field(default_factory=dict)
    pace: Pace = field(default_factory=Pace)  # one for every channel: the budget is a turn of the loop
    devices: list[DeviceState] = field(init=False)

    def __post_init__(self) -> None:
        self.devices = [DeviceState(slot) for slot in self.table.devices]

    def devices_of(self, channel: ChannelBase) -> list[DeviceState]:
        return [d for d in self.devices if d.slot.channel is channel]

    async def run_channel(self, channel: ChannelBase) -> None:
        """Poll the devices of one channel in turn, one transaction at a time, until cancelled."""
        driver = registry.get(channel.driver).factory(channel)
        self.drivers[channel.id] = driver
        devices = self.devices_of(channel)
        loop = asyncio.get_running_loop()
        now, count = loop.time(), len(self.devices)
        # devices spread evenly by their place in the table (within the first second at most): 200 devices polled
        # every second must not all come due at one instant and hold the loop for a whole round, every timer and
        # the uplink waiting behind them
        for place, d in enumerate(self.devices):
            if d.slot.channel is channel:
                d.due, d.retry_at = now + place / count * min(d.device.interval, 1.0), 0.0
        try:
            while True:
                dev = min(devices, key=lambda d: d.due)
                delay = dev.due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                if dev.retired:
                    return
                ts = int(time.time() * 1000)
                if dev.failures and loop.time() < dev.retry_at:
                    self.ingest(bad_batch(dev.slot.indices, ts))
                    self.polled(dev.slot, ts)
                else:
                    began = loop.time()
                    read = await self._read(driver, dev)
                    if dev.retired:
                        return  # a new configuration took this channel over while it read: its slots are gone
                    dev.round_trip = loop.time() - began
                    try:
                        await self.pace.turn()
                    except asyncio.CancelledError:
                        if not dev.retired:  # a stop: the read is done, its readings are kept all the same
                            self._took(dev, read, ts, loop.time())
                        raise
                    if dev.retired:
                        return
                    self._took(dev, read, ts, loop.time())
                self._next_slot(dev, loop.time())
        finally:
            if self.drivers.get(channel.id) is driver:
                del self.drivers[channel.id]
            await driver.close()

    def _took(self, dev: DeviceState, read: DeviceRead | None, ts: int, now: float) -> None:
        """A read done (or failed): its batch goes to ingest, and the device's state follows the outcome."""
        dev.polls += 1
        if read is None:
            self.ingest(bad_batch(dev.slot.indices, ts))
            failed = True
        else:
            # the table of the moment: a new configuration may have renumbered the points between polls
            self.ingest(decode(self.table.points, dev.slot.indices, read, ts, dev.clock, dev.slot))
            failed = read.positions is None and all(v is None for v in read.values)
        self.polled(dev.slot, ts)
        self._outcome(dev, read, failed)
        if failed and dev.failures > 1:
            # one missed reply (noise on a bus) costs no slot; a device silent twice is backed off
            backoff = min(dev.device.interval * 2 ** (dev.failures - 2), dev.device.backoff_max)
            dev.retry_at = now + backoff

    def reconfigure(self, table: PointTable, keep: set[str]) -> None:
        """A new point table, installed between two polls: the devices of the channels in `keep` (unchanged, their
        tasks go on) keep their state and poll schedule with the new slots; every other device starts afresh,
        and the devices of channels not kept are retired (their tasks are being cancelled)."""
        kept = {(d.slot.channel.id, d.slot.device.id): d for d in self.devices if d.slot.channel.id in keep}
        devices = []
        for slot in table.devices:
            state = kept.pop((slot.channel.id, slot.device.id), None) if slot.channel.id in keep else None
            if state is None:
                state = DeviceState(slot)
            else:
                state.slot = slot
            devices.append(state)
        for state in self.devices:
            if state.slot.channel.id not in keep:
                state.retired = True
        self.table = table
        self.devices = devices

    @staticmethod
    def _next_slot(dev: DeviceState, now: float) -> None:
        """Slots stay on the device's grid. A slot that came while the channel was busy runs at once, late, with
        the time it really runs at; slots wholly passed are skipped (no burst to catch up), counted and logged."""
        interval = dev.device.interval
        due = dev.due + interval
        if due <= now:
            behind = int((now - due) // interval)
            if behind:
                dev.overruns += behind
                if now - dev.overrun_logged >= 60:
                    dev.overrun_logged = now
                    log.warning("%s: polls overran their %g s interval: %d slot(s) skipped so far (the channel "
                                "is busier than its devices' intervals allow)", dev.where, interval, dev.overruns)
                due += behind * interval
            dev.late += 1
        dev.due = due

    @staticmethod
    async def _read(driver: Driver, dev: DeviceState) -> DeviceRead | None:
        try:
            return await driver.read(dev.device)
        except (OSError, EOFError) as exc:  # DriverError is an OSError; TimeoutError too
            dev.last_error = str(exc) or type(exc).__name__
        except Exception as exc:  # a bug in a driver must cost this poll, not the channel: logged with its trace
            log.exception("%s: driver failed", dev.where)
            dev.last_error = f"driver error: {exc!r}"
        return None

    @staticmethod
    def _outcome(dev: DeviceState, read: DeviceRead | None, failed: bool) -> None:
        if read is not None and read.errors:
            dev.last_error = "; ".join(read.errors)
        if failed or (read is not None and read.errors):
            dev.errors += 1
        if not failed:
            dev.last_good = int(time.time() * 1000)
        if failed:
            dev.failures += 1
            if dev.state != "failing":
                log.warning("%s: not answering: %s", dev.where, dev.last_error)
            dev.state = "failing"
            return
        if dev.state == "failing":
            log.info("%s: answering again", dev.where)
        if read is not None and read.errors:
            if dev.state != "partial":
                log.warning("%s: some points unreadable: %s", dev.where, dev.last_error)
            dev.state = "partial"
        else:
            dev.state = "ok"
            dev.last_error = None
        dev.failures = 0

    def health(self, channels: list[ChannelBase]) -> list[dict[str, Any]]:
        """Per channel: link up or down, and each device's state, last error and untrusted timestamps."""
        out = []
        for channel in channels:
            driver = self.drivers.get(channel.id)
            devices = self.devices_of(channel)
            out.append({
                "id": channel.id,
                "link": "up" if driver is not None and driver.connected else "down",
                "polls": sum(d.polls for d in devices),
                "late_polls": sum(d.late for d in devices),
                "skipped_polls": sum(d.overruns for d in devices),
                "devices": [
                    {"id": d.device.id, "state": "ok" if d.state == "ok" else "failing", "last_error": d.last_error,
                     "untrusted_timestamps": d.clock.untrusted}
                    for d in self.devices_of(channel)
                ],
            })
        return out

    def details(self, channels: list[ChannelBase]) -> list[dict[str, Any]]:
        """What a field engineer looks at (`edge-agent channels`): per channel and device, the state, the last
        good read, consecutive failures, round-trip time, back-off, error counts and the last error."""
        now = asyncio.get_running_loop().time()
        out = []
        for channel in channels:
            driver = self.drivers.get(channel.id)
            out.append({
                "id": channel.id, "driver": channel.driver, "enabled": channel.enabled,
                "link": "up" if driver is not None and driver.connected else "down",
                "devices": [{
                    "id": d.device.id, "state": d.state, "interval_s": d.device.interval,
                    "last_good_ts": d.last_good, "failures": d.failures,
                    "round_trip_ms": None if d.round_trip is None else round(d.round_trip * 1000, 1),
                    "backoff_s": round(d.retry_at - now, 1) if d.failures and d.retry_at > now else 0.0,
                    "polls": d.polls, "late_polls": d.late, "skipped_polls": d.overruns, "errors": d.errors,
                    "last_error": d.last_error,
                    "untrusted_timestamps": d.clock.untrusted,
                } for d in self.devices_of(channel)],
            })
        return out

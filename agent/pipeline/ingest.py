"""Ingest: each poll's batch goes through the alarm rules into the store, and into the archive buffer.

Alarm events are stored at once in their own commit, held from the uplink until a worker thread has synced the
log to disk; readings are grouped into `data` messages of at most `batch.max_readings`, stored when a message is
full or `batch.max_delay` has passed. It never talks to the network: the uplink is only woken (`on_stored`) when
something new is in the store.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import time
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import chain, islice
from typing import Any

import orjson

from agent.config.models import AgentConfig
from agent.config.points import DeviceSlot, PointTable
from agent.core import BAD, GOOD, KIND_ALARM, KIND_DATA, KIND_QUALITY, UNCERTAIN, AlarmEvent, ReadingBatch
from agent.messages import DataEncoder, alarm_body, identity_fields, read_readings, report_body
from agent.rules.energy import DailyEnergy
from agent.rules.engine import AlarmEngine
from agent.rules.quality import ALARM_TYPE, QualityRules
from agent.store import Store
from agent.store.chunks import ArchiveBuffer, Row

log = logging.getLogger(__name__)

_UNKNOWN = 255
_MAX_UNSTORED_EVENTS = 100_000  # alarm events held in memory while the store refuses writes
_DROP_STEP = 1000  # archived messages deleted a step (about 5 ms)
_ARCHIVE_SLICE = 250  # archive chunks encoded and written per turn of the loop (about 10 ms)


def _next_slice(rows: Iterator[Row]) -> list[Row]:
    return list(islice(rows, _ARCHIVE_SLICE))


@dataclass
class PipelineParts:
    """What a configuration compiles to for the pipeline, built apart from the running one (in a thread, while
    the old parts keep working) and then installed in one step (`Pipeline.reconfigure`)."""

    config: AgentConfig
    table: PointTable
    energy: dict[int, tuple[DailyEnergy, int, str]]  # source point index -> (counter, derived index, meter id)
    judge: QualityRules
    alarms: AlarmEngine
    encoder: DataEncoder
    ids: list[str]  # point ids by index
    bools: frozenset[str]  # the on/off points


class Pipeline:
    def __init__(self, config: AgentConfig, store: Store, on_stored: Callable[[], None] = lambda: None) -> None:
        self.store = store
        self.on_stored = on_stored
        self._install(self.prepare(config))
        self._pending: list[ReadingBatch] = []
        self._pending_count = 0
        self._pending_since = 0.0
        self.readings_in = 0
        self.stopping = False  # set by the daemon when a stop begins: no alarm is raised from then on
        self._reported_day = 0  # end of the day whose quality report is stored
        self._unsynced = False  # alarm events stored since the last log sync began
        self._syncing: asyncio.Task[None] | None = None
        self.events_out = 0
        self.lost_readings = 0  # readings the store refused (disk full, unreadable file)
        self._unstored: list[tuple[bytes, int]] = []  # alarm events the store refused, retried first
        self._retired: list[ArchiveBuffer] = []  # readings gathered under an earlier configuration, not yet archived
        self._register()
        self._restore_state()

    @staticmethod
    def prepare(config: AgentConfig) -> PipelineParts:
        """Compile `config` for the pipeline; touches nothing running (safe in another thread)."""
        table = PointTable(config)
        # derived points (daily energy) get their indices before anything sizes itself on the table
        energy: dict[int, tuple[DailyEnergy, int, str]] = {}
        for meter in config.power.meters:
            if meter.daily_energy is not None and meter.total_energy is not None:
                derived = table.add_derived(meter.daily_energy, "kWh", "power", meter.id)
                source = table.by_id[meter.total_energy].index
                energy[source] = (DailyEnergy(meter.rollover), derived.index, meter.id)
        judge = QualityRules(table, config)  # data quality: frozen, spikes, range ends, online rates
        alarms = AlarmEngine(table, config)
        # built once the table is complete (derived points above): the compact encoding's map numbers its points
        encoder = DataEncoder(identity_fields(config.agent.id, config.agent.enterprise), table, config.uplink.encoding)
        return PipelineParts(config, table, energy, judge, alarms, encoder, [p.id for p in table.points],
                             frozenset(p.id for p in table.points if p.is_bool))

    def _install(self, parts: PipelineParts) -> None:
        config = self.config = parts.config
        self.table = parts.table
        self._energy = parts.energy
        self.judge = parts.judge
        self.alarms = parts.alarms
        self.identity = identity_fields(config.agent.id, config.agent.enterprise)
        self.encoder = parts.encoder
        self.max_readings = config.uplink.batch.max_readings
        self.max_delay = config.uplink.batch.max_delay
        self.quality = bytearray([_UNKNOWN]) * len(self.table)
        # each point's last reading, for `edge-agent points` (one slot a point, no object per reading)
        self.last_value: list[Any] = [None] * len(self.table)
        self.last_ts = array("q", bytes(8 * len(self.table)))
        self._id_of = parts.ids
        self._bools = parts.bools
        self.archive = ArchiveBuffer(self._id_of)

    def _register(self, ids: list[str] | set[str] | None = None, bools: frozenset[str] | None = None) -> None:
        """Tell the store the points (`ids` and `bools`: only these, which it does not know yet) and the point map."""
        self._remap_keys(self._id_of if ids is None else ids, self._bools if bools is None else bools)
        self.store.attempt("registering the point map",
                           lambda: self.store.register_map(self.encoder.map_id, self.encoder.map_message()))

    def reconfigure(self, parts: PipelineParts, now: int, why: str) -> list[AlarmEvent]:
        """Install a new configuration's parts between two polls, losing nothing: pending readings are stored with
        the old encoding first, the readings gathered for the archive are carried (archived at the next flush),
        each kept point keeps its last reading and its alarm states, and an alarm raised on a point or a rule that
        is gone is cleared with an event (`why` says why, in its message). Returns those events, stored."""
        self.flush()
        old_table, old_alarms, old_judge = self.table, self.alarms, self.judge
        old_quality, old_value, old_ts = self.quality, self.last_value, self.last_ts
        old_energy = {meter: counter for counter, _, meter in self._energy.values()}
        states = self.alarm_states()
        if self.archive.count:
            self._retired.append(self.archive)
        old_ids, old_bools = self._id_of, self._bools
        self._install(parts)
        runs = self._kept_runs(old_table, old_ids)
        self._carry_last(old_table, runs, old_quality, old_value, old_ts)
        self.judge.carry(old_judge, runs)
        for counter, _, meter in self._energy.values():
            if meter in old_energy:
                counter.restore(old_energy[meter].save())
        gone = [a for a in self.alarms.load(states, now) if not a.endswith("/" + ALARM_TYPE)]
        gone += self.judge.load(states, now)
        events = []
        for alarm_id in sorted(gone):
            rule = old_alarms.rule(alarm_id)
            if rule is not None:
                events.append(rule.event("cleared", None, now, message=why))
            else:  # a data_quality alarm
                point = alarm_id.rpartition("/")[0]
                unit = old_table.by_id[point].unit if point in old_table.by_id else ""
                events.append(AlarmEvent(point, ALARM_TYPE, 1, "cleared", None, None, unit, now, why))
        self._register(set(parts.ids).difference(old_ids), parts.bools - old_bools)
        self.store.forget_saved_states()  # other rules now: every state is written again
        self.store_events(events)  # the new states are saved with the events, in one synced commit
        return events

    def _kept_runs(self, old_table: PointTable, old_ids: list[str]) -> list[tuple[int, int, int, int, int]]:
        """The devices whose points kept their ids and order: (old first index, new first index, count, old device
        slot, new device slot), each a run of consecutive indices in both tables."""
        old_slots = {(s.channel.id, s.device.id): (k, s.indices) for k, s in enumerate(old_table.devices)}
        runs = []
        for k, slot in enumerate(self.table.devices):
            old_slot, before = old_slots.get((slot.channel.id, slot.device.id), (-1, []))
            n = len(slot.indices)
            if n and len(before) == n and \
                    self._id_of[slot.indices[0]:slot.indices[0] + n] == old_ids[before[0]:before[0] + n]:
                runs.append((before[0], slot.indices[0], n, old_slot, k))
        return runs

    def _carry_last(self, old_table: PointTable, runs: list[tuple[int, int, int, int, int]], old_quality: bytearray,
                    old_value: list[Any], old_ts: array[int]) -> None:
        """Each kept point's last reading, from the old arrays: a device whose points are as they were in one
        slice each (10,000 points: about a millisecond), the others point by point."""
        done = 0
        for old_first, new_first, n, _, _ in runs:
            self.quality[new_first:new_first + n] = old_quality[old_first:old_first + n]
            self.last_value[new_first:new_first + n] = old_value[old_first:old_first + n]
            self.last_ts[new_first:new_first + n] = old_ts[old_first:old_first + n]
            done += n
        if done == len(self.table):
            return
        for info in self.table.points:
            if self.quality[info.index] != _UNKNOWN:
                continue  # carried above
            kept = old_table.by_id.get(info.id)
            if kept is not None:
                self.quality[info.index] = old_quality[kept.index]
                self.last_value[info.index] = old_value[kept.index]
                self.last_ts[info.index] = old_ts[kept.index]

    def _restore_state(self) -> None:
        """Alarm states and the energy counters as they were before the restart."""
        def load() -> None:
            saved, now = self.store.alarm_states(), int(time.time() * 1000)
            unknown = [a for a in self.alarms.load(saved, now) if not a.endswith("/" + ALARM_TYPE)]
            unknown += self.judge.load(saved, now)
            if unknown:
                log.info("alarms no longer configured, forgotten: %s", ", ".join(sorted(unknown)))
            for energy, _, meter in self._energy.values():
                saved = self.store.meta(f"energy:{meter}")
                if saved:
                    energy.restore(orjson.loads(saved))

        self.store.attempt("restoring alarm states", load)
        raised = sorted(self.alarm_states())
        if raised:
            log.info("alarms raised before the restart, still raised: %s", ", ".join(raised))

    def _hold_from(self, seq: int) -> None:
        if self.store.hold_after is None:
            self.store.hold_after = seq - 1
        self._unsynced = True
        if self._syncing is None or self._syncing.done():
            try:
                self._syncing = asyncio.get_running_loop().create_task(self._sync_events(), name="event sync")
            except RuntimeError:  # no loop (a stop, or a caller outside the daemon): sync here and now
                self.store.sync_log()
                self.store.hold_after = None

    async def _sync_events(self) -> None:
        """Sync the log until no alarm event waits for it, then let the uplink send them."""
        while self._unsynced:
            self._unsynced = False
            upto = self.store.last_seq()
            try:
                await asyncio.to_thread(self.store.sync_log)
            except OSError as exc:  # the disk is failing: the commit stands, the events go (they are stored)
                log.error("store: cannot sync the log for alarm events: %s", exc)
            # everything up to `upto` is on disk; an event stored meanwhile holds what follows it
            self.store.hold_after = upto if self._unsynced else None
            self.on_stored()

    def save_energy(self) -> None:
        def save() -> None:
            with self.store.transaction():
                for energy, _, meter in self._energy.values():
                    self.store.set_meta(f"energy:{meter}", orjson.dumps(energy.save()).decode())

        if self._energy:
            self.store.attempt("saving energy counters", save)

    def _remap_keys(self, ids: list[str] | set[str], bools: frozenset[str]) -> None:
        """Tell the store these points and which are on/off (history reads those back as booleans); the store
        tells a file that replaces a damaged one again by itself."""
        names = [*(ids if isinstance(ids, list) else sorted(ids)), *sorted(bools.difference(ids))]
        if names:
            self.store.attempt("registering points", lambda: self.store.point_keys(names, bools))

    # --- decode → alarms → store -----------------------------------------------------------------

    def ingest(self, batch: ReadingBatch) -> None:
        if not batch.indices:
            return  # a subscription with no news
        if self._energy:
            self._add_daily_energy(batch)
        events = self.judge.check(batch)  # first: the alarm rules must not act on a spike it marks
        events += self.alarms.evaluate(batch)
        indices = batch.indices
        n = len(indices)
        first = indices[0]
        if batch.stamps is None and indices[-1] - first == n - 1 and indices == list(range(first, first + n)):
            # a whole poll of one device (its points have consecutive indices): slices, no loop per reading
            self.quality[first:first + n] = bytes(batch.qualities)
            self.last_value[first:first + n] = batch.values
            self.last_ts[first:first + n] = array("q", (batch.ts,)) * n
            self.archive.add_poll(first, batch.ts, batch.values, batch.qualities)
        else:
            quality, last_value, last_ts = self.quality, self.last_value, self.last_ts
            times = batch.times()
            for index, q, value, ts in zip(indices, batch.qualities, batch.values, times, strict=True):
                quality[index] = q
                last_value[index] = value
                last_ts[index] = ts
            id_of = self._id_of
            self.archive.add_many([id_of[i] for i in indices], times, batch.values, batch.qualities)
        self.readings_in += n
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
        """Store alarm events (and the engine's states) in one commit, synced apart; events the store refuses (a full
        disk) wait in memory, in order, and go first at the next attempt: an alarm event is never dropped."""
        bodies = self._unstored + [(alarm_body(self.identity, event), event.ts) for event in events]
        changes = {**self.alarms.changes(), **self.judge.changes()}

        first: list[int] = []

        def write() -> bool:
            with self.store.transaction():
                for body, ts in bodies:
                    seq = self.store.append(KIND_ALARM, 1, body, created=ts)
                    first.append(seq)
                self.store.save_alarm_states(self.alarm_states, changes)
            return True

        try:
            stored = self.store.attempt("storing alarm events", write)
        except BaseException:
            self.store.forget_saved_states()  # the changes taken are lost: the next save writes every state
            raise
        if stored is None:
            self.store.forget_saved_states()
            if len(bodies) > _MAX_UNSTORED_EVENTS:
                log.error("alarm events waiting for the store: %d, the oldest beyond %d are dropped",
                          len(bodies), _MAX_UNSTORED_EVENTS)
            self._unstored = bodies[-_MAX_UNSTORED_EVENTS:]
        else:
            self._unstored = []
            if first:
                # alarm events must survive a power cut: held back from the uplink until the log is on disk, which
                # a worker thread does (an fsync can take tens of ms: polls and alarms go on meanwhile)
                self._hold_from(first[0])
        self.events_out += len(events)
        for event in events:
            log.log(logging.WARNING if event.state == "raised" else logging.INFO,
                    "alarm %s %s: value %s, limit %s %s", event.id, event.state, event.value, event.limit, event.unit)
        self.on_stored()

    def flush(self) -> None:
        """Store every pending reading as `data` messages of at most max_readings each, in one commit."""
        if not self._pending:
            return
        pending, self._pending, self._pending_count = self._pending, [], 0
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
                    messages.append(self.encoder.body(chunk))
                    chunk, size = [], 0
        if chunk:
            messages.append(self.encoder.body(chunk))

        def write() -> bool:
            with self.store.transaction():
                for body, count in messages:
                    self.store.append(KIND_DATA, count, body)
            return True

        if self.store.attempt("storing readings", write) is None:
            self.lost_readings += sum(count for _, count in messages)
        self.on_stored()

    # --- the archive -----------------------------------------------------------------------------

    def archive_flush(self, force: bool = False) -> None:
        """Write the readings gathered since the last flush to the archive, as one chunk per point, in one
        transaction (at a stop and at start); `force`: even with nothing gathered (ends a flush under way)."""
        self.flush()  # every reading in the archive buffer is now in a stored message
        if self._archive_count() == 0 and not force:
            return
        mark = self.store.last_seq()
        chunks = list(self._take_archive())
        self.store.attempt("writing the archive", lambda: self.store.write_chunks(chunks, mark))

    def recover_archive(self) -> int:
        """At start: readings of messages stored after the last archive flush (a crash) go to the archive; after
        a crash inside a flush, a point's readings its written chunks already hold are not added again."""
        missing = 0

        def replay() -> None:
            nonlocal missing
            partial = self.store.archive_partial()
            archived: dict[str, int | None] = {}
            for seq, body in self.store.data_rows_after(self.store.archive_mark()):
                readings = read_readings(body, self.store.point_map)
                if readings is None:
                    log.error("store: message seq %d cannot be read back for the archive", seq)
                    continue
                for point, ts, value, quality in readings:  # a point no longer configured keeps its history too
                    if partial:
                        if point not in archived:
                            archived[point] = self.store.last_archived(point)
                        end = archived[point]
                        if end is not None and ts <= end:
                            continue
                    self.archive.add(point, ts, value, quality)
                    missing += 1

        self.store.attempt("recovering the archive", replay)
        if missing or self.store.attempt("reading the archive state", self.store.archive_partial):
            log.info("store: %d readings stored after the last archive flush were added to the archive", missing)
            self.archive_flush(force=True)
        return missing

    async def archive_loop(self) -> None:
        """Flush the archive every archive_interval, a few hundred chunks per transaction and per turn of the
        loop, so a 100,000-point flush never holds up polls, alarms or the other writers."""
        interval = self.config.store.archive_interval
        # slices are encoded on a thread of their own: zlib lets go of the interpreter lock, so most of a flush
        # runs on another core while the loop polls; each slice is written here, on the loop's own connection
        encoder = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="archive encoder")
        try:
            await self._archive_every(interval, encoder)
        finally:
            encoder.shutdown(wait=False)

    async def _archive_every(self, interval: float, encoder: concurrent.futures.Executor) -> None:
        while True:
            await asyncio.sleep(interval)
            interval = self.config.store.archive_interval  # a new configuration may change it
            self.flush()
            self.save_energy()
            if self._archive_count() == 0:
                continue
            mark = self.store.last_seq()
            taking = self._take_archive()
            rows: list[Row] = []
            try:
                while True:
                    encoding = encoder.submit(_next_slice, taking)
                    try:
                        rows = await asyncio.wrap_future(encoding)
                    except asyncio.CancelledError:
                        try:
                            rows = encoding.result()  # a slice under way ends first: the generator is not shared
                        except concurrent.futures.CancelledError:
                            rows = []  # the slice never began (the stop cancelled it): its rows are still to take
                        raise
                    if len(rows) < _ARCHIVE_SLICE:
                        break
                    self.store.attempt("writing the archive", functools.partial(self.store.write_chunks, rows, None))
                    rows = []
            except asyncio.CancelledError:
                rows.extend(taking)  # stopping: what was taken must still be written
                self.store.attempt("writing the archive", functools.partial(self.store.write_chunks, rows, mark))
                raise
            if self.store.attempt("writing the archive", functools.partial(self.store.write_chunks, rows, mark,
                                                                             drop=False)) is not None:
                # a minute of 100,000 points is 12,000 messages: deleted in one statement it held the loop 54 ms
                await self._drop_archived(mark)

    async def _drop_archived(self, mark: int) -> None:
        """The acknowledged messages up to `mark`, now archived, leave the outbox a step per turn of the loop."""
        for _ in range(1_000_000):  # bounded: a step drops _DROP_STEP messages or ends the loop
            dropped = self.store.attempt("dropping archived messages",
                                         functools.partial(self.store.drop_archived, mark, _DROP_STEP))
            if dropped != _DROP_STEP:
                return
            await asyncio.sleep(0)

    def _archive_count(self) -> int:
        return self.archive.count + sum(b.count for b in self._retired)

    def _take_archive(self) -> Iterator[Row]:
        """Empty the archive buffer and those of earlier configurations (each names its points as it was built)."""
        # swapped at once: readings that come while the rows are written belong to the next flush
        retired, self._retired = [*self._retired, self.archive], []
        self.archive = ArchiveBuffer(self._id_of)
        return chain.from_iterable(b.take() for b in retired)

    async def flush_loop(self) -> None:
        """Store a partial batch once its oldest reading has waited max_delay."""
        tick = max(0.05, min(self.max_delay / 4, 0.25))
        while not self.stopping:
            await asyncio.sleep(tick)
            if self.stopping:
                break  # a stop began while sleeping: comm loss of devices the agent stopped polling is no alarm
            now = int(time.time() * 1000)
            events = self.alarms.tick(now) + self.judge.tick(now)
            if self.judge.last_day_end and self.judge.last_day_end != self._reported_day:
                self.store_report()
            confirmed = self.judge.take_confirmed()  # jumps no sample contradicted: the alarm rules see them now
            if confirmed is not None:
                events += self.alarms.evaluate(confirmed)
            if events or self._unstored:
                self.store_events(events)
            if self._pending and time.monotonic() - self._pending_since >= self.max_delay:
                self.flush()

    def store_report(self) -> None:
        """Store the daily `quality` report of the day just ended, once (the day is remembered in the store, so
        a restart does not send it twice); delivered like alarm events, before the backlog of readings."""
        report = self.judge.daily_report()
        day_end = self.judge.last_day_end
        if report is None:
            return

        def write() -> bool:
            with self.store.transaction(durable=True):
                if int(self.store.meta("quality_reported", 0) or 0) < day_end:
                    self.store.append(KIND_QUALITY, 0, report_body(self.identity, report))
                    self.store.set_meta("quality_reported", day_end)
            return True

        if self.store.attempt("storing the daily quality report", write) is not None:
            self._reported_day = day_end
            log.info("daily data-quality report for %s stored", report["day"])
            self.on_stored()

    def polled(self, slot: DeviceSlot, ts: int) -> None:
        """One poll slot of a device came (read, failed or backed off): its points each owed a sample."""
        self.judge.expected(slot, ts)

    def alarm_states(self) -> dict[str, str]:
        """Every alarm not normal (limits, domain rules and data quality), by id: what is saved and shown."""
        return {**self.alarms.states(), **self.judge.states()}

    # --- health ----------------------------------------------------------------------------------

    def point_counts(self) -> dict[str, int]:
        """How many points stand good, uncertain and bad (never read counts as bad)."""
        q = self.quality
        return {"good": q.count(GOOD), "uncertain": q.count(UNCERTAIN), "bad": q.count(BAD) + q.count(_UNKNOWN)}

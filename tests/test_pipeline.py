"""The ingest stage on a real SQLite store: batching into `data` messages, alarm events in their own commit,
alarm events held while the store refuses writes, the archive, and recovery from a damaged file whoever met it.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from pathlib import Path

import pytest

from agent.config.loader import parse_config
from agent.config.models import AgentConfig
from agent.core import BAD, GOOD, KIND_ALARM, KIND_DATA, ReadingBatch
from agent.errors import ResetRefused
from agent.messages import read_body, read_readings
from agent.pipeline.ingest import Pipeline
from agent.store import Store
from agent.store.upkeep import Upkeep, UpkeepConfig
from agent.uplink.uplink import Uplink

CONFIG = """
agent: {id: a1, enterprise: "e1"}
uplink: {host: 127.0.0.1, batch: {max_readings: 4}}
channels:
  - id: c1
    driver: modbus_tcp
    host: 127.0.0.1
    devices:
      - id: d1
        points:
          - {id: LT-101, address: 0, type: float32, unit: m, limits: {high: 8.5}}
          - {id: LT-102, address: 2, type: float32, unit: m}
          - {id: SW-1, table: coil, address: 0, type: bool}
"""


def config() -> AgentConfig:
    return parse_config(CONFIG)


def batch(ts: int, values: list[object]) -> ReadingBatch:
    return ReadingBatch(ts, list(range(len(values))), list(values), [GOOD] * len(values))


def stored(store: Store, kind: int) -> list[dict[str, object]]:
    return [read_body(row.body) for row in store.fetch(0, kind=kind, limit=1000)]


def test_readings_are_stored_in_messages_of_at_most_max_readings_in_order(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        woken = []
        pipeline = Pipeline(config(), store, on_stored=lambda: woken.append(1))
        for n in range(3):
            pipeline.ingest(batch(1000 + n, [1.0 + n, 2.0 + n, n % 2 == 0]))
        # once a message's worth is pending, everything pending is stored, cut into messages of at most 4
        assert store.backlog().readings == 6
        pipeline.flush()
        messages = [read_readings(row.body) for row in store.fetch(0, kind=KIND_DATA, limit=10)]
        assert [len(m or []) for m in messages] == [4, 2, 3]
        flat = [r for m in messages for r in m or []]
        assert [(p, ts) for p, ts, _, _ in flat] == [(p, 1000 + n) for n in range(3) for p in ("LT-101", "LT-102",
                                                                                               "SW-1")]
        assert flat[2][2] is True and flat[5][2] is False, "on/off points are published as booleans"
        assert woken


def test_an_alarm_event_is_stored_at_once_with_its_state(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        pipeline = Pipeline(config(), store)
        pipeline.ingest(batch(1000, [9.0, 1.0, False]))
        events = stored(store, KIND_ALARM)
        assert [(e["point"], e["type"], e["state"]) for e in events] == [("LT-101", "high", "raised")]
        assert store.alarm_states() == {"LT-101/high": "raised"}
    with Store(tmp_path / "s.db") as store:  # a restart neither raises again nor forgets
        pipeline = Pipeline(config(), store)
        pipeline.ingest(batch(2000, [9.1, 1.0, False]))
        assert len(stored(store, KIND_ALARM)) == 1
        assert pipeline.alarms.active() == ["LT-101/high"]


def test_alarm_events_the_store_refuses_wait_and_go_first(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        pipeline = Pipeline(config(), store)
        store.db.execute("PRAGMA query_only=1")  # the store refuses every write, as a full disk would
        pipeline.ingest(batch(1000, [9.0, 1.0, False]))
        pipeline.ingest(batch(2000, [1.0, 1.0, False]))
        assert store.backlog().messages == 0
        store.db.execute("PRAGMA query_only=0")
        pipeline.store_events([])
        events = stored(store, KIND_ALARM)
        assert [(e["state"], e["ts"]) for e in events] == [("raised", 1000), ("cleared", 2000)]


def test_the_archive_gets_every_reading_and_data_leaves_the_outbox_only_when_acknowledged(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        pipeline = Pipeline(config(), store)
        for n in range(4):
            pipeline.ingest(batch(1000 + n, [1.0, 2.0, True]))
        pipeline.archive_flush()
        assert [s.ts for s in store.history("LT-102", 0, 10_000)] == [1000, 1001, 1002, 1003]
        assert store.backlog().messages == 4, "not acknowledged: still in the outbox"
        store.ack(row.seq for row in store.fetch(0, limit=10))
        pipeline.ingest(batch(1004, [1.0, 2.0, True]))
        pipeline.archive_flush()
        assert store.backlog().messages == 1
        assert len(store.history("LT-102", 0, 10_000)) == 5


def damage(store: Store) -> sqlite3.DatabaseError:
    """What SQLite raises on a damaged file; the file really is damaged (its header overwritten)."""
    store.sync()
    with open(store.path, "r+b") as f:
        f.write(b"garbage!" * 16)
    return sqlite3.DatabaseError("database disk image is malformed")


def test_on_off_points_stay_booleans_after_a_recovery_started_by_the_uplink(tmp_path: Path) -> None:
    cfg = config()
    with Store(tmp_path / "s.db") as store:
        pipeline = Pipeline(cfg, store)
        uplink = Uplink(cfg.uplink, cfg.agent, store, version="t", config_version="t")
        error = damage(store)

        def ack(_: object) -> int:
            raise error

        store.ack = ack  # type: ignore[method-assign]  # the uplink's next write meets the damage
        uplink.acked(1)
        uplink.flush_acks()
        del store.ack
        assert store.recovered is not None, "the uplink's failed write started a recovery"
        pipeline.ingest(batch(1000, [1.0, 2.0, True]))
        pipeline.ingest(batch(1001, [1.0, 2.0, False]))
        pipeline.archive_flush()
        assert [repr(s.value) for s in store.history("SW-1", 0, 10_000)] == ["True", "False"]  # not 1.0, 0.0


def test_on_off_points_stay_booleans_after_a_recovery_started_by_upkeep(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        pipeline = Pipeline(config(), store)
        upkeep = Upkeep(store, UpkeepConfig(max_bytes=10**9, min_free_bytes=0, retention_s=86400, sync_interval=1))
        error = damage(store)
        assert store.recover_if_corrupt(error), "upkeep's path: its failed step asks the store to recover"
        assert upkeep.over() is None
        pipeline.ingest(batch(1000, [1.0, 2.0, True]))
        pipeline.archive_flush()
        assert [repr(s.value) for s in store.history("SW-1", 0, 10_000)] == ["True"]  # not 1.0
        assert [repr(s.value) for s in store.history("LT-101", 0, 10_000)] == ["1.0"]


def test_the_minute_flush_drops_archived_messages_in_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    import agent.pipeline.ingest as ingest

    monkeypatch.setattr(ingest, "_DROP_STEP", 3)  # 10 messages: four steps, the loop turning between them
    cfg = config().model_copy(update={"store": config().store.model_copy(update={"archive_interval": 1.0})})
    with Store(tmp_path / "s.db") as store:
        pipeline = Pipeline(cfg, store)
        pipeline.max_readings = 3
        for n in range(10):
            pipeline.ingest(batch(1000 + n, [n / 2, 2.0, True]))
        store.append(KIND_DATA, 1, b'"readings":[]}')  # not acknowledged: stays
        assert store.ack(row.seq for row in store.fetch(0, limit=10)) == 10

        async def one_flush() -> None:
            task = asyncio.create_task(pipeline.archive_loop())
            for _ in range(300):  # bounded: 3 s
                await asyncio.sleep(0.01)
                if store.archive_mark() and store.backlog().messages == 1 and len(list(store.data_rows_after(0))) == 1:
                    break
            task.cancel()

        asyncio.run(one_flush())
        assert [s.value for s in store.history("LT-101", 0, 10_000)] == [n / 2 for n in range(10)]
        assert len(list(store.data_rows_after(0))) == 1  # the archived, acknowledged ten are gone


def _twenty_polls_to_archive(store: Store) -> Pipeline:
    """A pipeline that flushes its archive every 50 ms, with 20 polls of its three points waiting for it."""
    cfg = config().model_copy(update={"store": config().store.model_copy(update={"archive_interval": 0.05})})
    pipeline = Pipeline(cfg, store)
    for n in range(20):
        pipeline.ingest(batch(1000 + n, [n / 2, 2.0 + n, n % 2 == 0]))
    return pipeline


def test_a_stop_in_the_middle_of_a_flush_still_archives_every_reading(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # slices are encoded on a worker thread: a stop that comes while one is under way waits for it, then writes
    # the rest of the minute with the mark, nothing taken twice and nothing left out
    import asyncio

    import agent.pipeline.ingest as ingest

    monkeypatch.setattr(ingest, "_ARCHIVE_SLICE", 1)  # three points: three slices, the loop turning between them
    with Store(tmp_path / "s.db") as store:
        pipeline = _twenty_polls_to_archive(store)

        async def stop_mid_flush() -> int:
            task = asyncio.create_task(pipeline.archive_loop())
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                await asyncio.sleep(0)
                if store.archive_partial():  # a slice is written, not every one
                    break
            archived = store.archive_stats()[0]
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return archived

        assert 0 < asyncio.run(stop_mid_flush()) < 60
        assert store.archive_stats()[0] == 60  # all of them, each once
        assert store.archive_mark() == store.last_seq() and not store.archive_partial()
        assert [s.value for s in store.history("LT-101", 0, 10_000)] == [n / 2 for n in range(20)]
        assert [s.value for s in store.history("LT-102", 0, 10_000)] == [2.0 + n for n in range(20)]
        assert [s.value for s in store.history("SW-1", 0, 10_000)] == [n % 2 == 0 for n in range(20)]
        assert pipeline.archive.count == 0


def test_a_stop_while_a_slice_waits_for_the_encoder_still_archives_every_reading(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the encoder thread is still busy when the stop comes: the slice asked of it never begins (the stop cancels
    # it), and its rows must be written with the rest, not left in a generator nobody reads again
    import asyncio
    import concurrent.futures
    import threading

    gate = threading.Event()
    asked: list[concurrent.futures.Future[object]] = []
    waiting: list[asyncio.Event] = []

    class BusyEncoder(concurrent.futures.ThreadPoolExecutor):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(1)
            super().submit(gate.wait, 10)  # busy with something else until the test lets it go

        def submit(self, fn: object, /, *args: object, **kwargs: object) -> concurrent.futures.Future[object]:
            future = super().submit(fn, *args, **kwargs)  # type: ignore[arg-type]
            asked.append(future)
            for event in waiting:
                event.set()  # called on the loop's thread: the archive loop asks from there
            return future

    monkeypatch.setattr(concurrent.futures, "ThreadPoolExecutor", BusyEncoder)
    with Store(tmp_path / "s.db") as store:
        pipeline = _twenty_polls_to_archive(store)

        async def stop_while_waiting() -> None:
            waiting.append(asyncio.Event())
            task = asyncio.create_task(pipeline.archive_loop())
            await asyncio.wait_for(waiting[0].wait(), 5)
            assert asked and not asked[0].running()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        try:
            asyncio.run(stop_while_waiting())
        finally:
            gate.set()
        assert store.archive_stats()[0] == 60
        assert store.archive_mark() == store.last_seq() and not store.archive_partial()


def test_a_flush_cut_short_by_a_crash_is_not_archived_twice(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        pipeline = Pipeline(config(), store)
        for n in range(5):
            pipeline.ingest(batch(1000 * (n + 1), [1.0 + n, 2.0 + n, n % 2 == 0]))
        pipeline.flush()
        # the first transaction of a flush is written, then the agent is killed: the mark never moves
        rows = list(pipeline.archive.take())
        store.write_chunks(rows[:1], None)
        assert store.archive_partial()
    with Store(tmp_path / "s.db") as store:
        pipeline = Pipeline(config(), store)
        assert pipeline.recover_archive() == 10  # the five readings of the point already written are not added
        assert not store.archive_partial()
        for point in ("LT-101", "LT-102", "SW-1"):
            assert [s.ts for s in store.history(point, 0, 10_000)] == [1000, 2000, 3000, 4000, 5000], point


def test_the_daily_quality_report_is_stored_once_and_framed_as_its_schema_says(tmp_path: Path) -> None:
    import json
    from datetime import datetime, timedelta

    import jsonschema

    from agent.core import KIND_QUALITY
    from agent.messages import frame

    today = datetime.now().replace(hour=12, minute=0, second=0, microsecond=0)
    with Store(tmp_path / "s.db") as store:
        pipeline = Pipeline(config(), store)
        slot = pipeline.table.devices[0]
        for k in range(4):  # four polls yesterday, the last one bad
            ts = int((today - timedelta(days=1)).timestamp() * 1000) + k * 1000
            pipeline.ingest(ReadingBatch(ts, list(slot.indices), [1.0 + k, 2.0, True],
                                         [GOOD if k < 3 else 2] * 3))
            pipeline.polled(slot, ts)
        pipeline.polled(slot, int(today.timestamp() * 1000))  # today: yesterday is complete
        assert pipeline.judge.last_day_end
        pipeline.store_report()
        pipeline.store_report()  # asked again: the day is reported once
    with Store(tmp_path / "s.db") as store:
        again = Pipeline(config(), store)  # after a restart too
        again.judge.expected(again.table.devices[0], int((today - timedelta(days=1)).timestamp() * 1000))
        again.judge.expected(again.table.devices[0], int(today.timestamp() * 1000))
        again.store_report()
        rows = store.fetch(0, kind=KIND_QUALITY, limit=10)
        assert len(rows) == 1
        message = json.loads(frame(rows[0].seq, False, rows[0].body))
    schema = json.loads((Path(__file__).parent.parent / "docs/schemas/quality.schema.json").read_text())
    assert list(jsonschema.Draft202012Validator(schema).iter_errors(message)) == []
    device = message["devices"][0]
    assert (device["polls"], device["expected"], device["good"]) == (4, 12, 9)
    assert message["day"] == (today - timedelta(days=1)).date().isoformat()


def test_alarm_events_are_held_from_the_uplink_until_their_log_is_on_disk(tmp_path: Path) -> None:
    import asyncio
    import os

    synced: list[int] = []
    with Store(tmp_path / "s.db") as store:
        real_sync = store.sync_log

        def sync_log() -> None:
            synced.append(store.last_seq())
            real_sync()

        store.sync_log = sync_log  # type: ignore[method-assign]
        woken: list[int | None] = []

        async def main() -> None:
            released = asyncio.Event()

            def on_stored() -> None:
                woken.append(store.hold_after)
                if store.hold_after is None:
                    released.set()

            pipeline = Pipeline(config(), store, on_stored=on_stored)
            pipeline.ingest(batch(1000, [9.0, 1.0, True]))  # LT-101 above its high limit: one event
            seq = store.last_seq()
            assert store.hold_after == seq - 1  # committed, not yet sent: its log is not on disk yet
            assert store.fetch(0, upto=store.hold_after) == []
            await asyncio.wait_for(released.wait(), 10)
            assert synced == [seq] and woken[-1] is None
            assert [r.seq for r in store.fetch(0, upto=store.hold_after)] == [seq]

        asyncio.run(main())
        assert os.path.exists(f"{store.path}-wal")


STORM = CONFIG.split("      - id: d1")[0] + """      - id: d1
        comm_loss: 2
        points:
          - {id: A, address: 0, type: float32, limits: {high: 80, high_high: 90, low: 10, rate_rise: 60}}
          - {id: B, address: 2, type: float32, latch: true, limits: {high: 80, low: 10, deadband: 2}}
          - {id: C, address: 4, type: float32, latch: true, limits: {high_high: 90, delay: 2}}
          - {id: D, address: 6, type: float32, range: [0, 100], limits: {high: 80},
             quality: {frozen_after: 3s, range_end_delay: 2s}}
          - {id: E, address: 8, type: float32, range: [0, 100], quality: {frozen_after: 3s}}
          - {id: F1, address: 10, fault_of: A}
          - {id: F2, address: 11, fault_of: A}
          - {id: HC, address: 12}
          - {id: P, address: 13, type: float32, unit: kW}
zones:
  - {id: Z1, head_count: HC, limit: 5, color: red, duration: 2s}
  - {id: Z2, head_count: HC, limit: 10, color: red, duration: 0s}
power:
  meters:
    - {id: M1, active_power: P, idle_kw: 5, delay: 2s}
"""
WALKS = {"A": (-30, -5, 0, 0, 5, 30), "B": (-30, -5, 0, 0, 5, 30), "C": (-30, -5, 0, 0, 5, 30),
         "D": (-30, -5, 0, 0, 5, 30), "E": (0, 0, 0, 0, 0, 1), "HC": (-3, -1, 0, 0, 1, 3), "P": (-4, 0, 0, 4)}


def test_the_saved_alarm_states_follow_every_change_of_state(tmp_path: Path) -> None:
    """States are saved as the changes the rules note (a latched alarm's silent change too), not as a rewrite of
    every raised alarm: after every batch of events the table holds what the rules hold, through bad readings and
    comm_loss, rate, fault, crowding (two zones: one alarm id) and halt alarms, on-delays elapsing without a reading,
    resets by hand, production halted and resumed, writes the store refuses, a reopen and a new configuration."""
    import random

    rng = random.Random(5)
    store = Store(tmp_path / "s.db").open()
    pipeline = Pipeline(parse_config(STORM), store)
    append, refusing = store.append, [False]

    def refused(*args: object, **kwargs: object) -> int:
        if refusing[0]:
            raise sqlite3.OperationalError("disk I/O error")
        return append(*args, **kwargs)  # type: ignore[arg-type]

    store.append = refused  # type: ignore[method-assign]
    values = {"A": 50.0, "B": 50.0, "C": 50.0, "D": 50.0, "E": 50.0, "F1": 0, "F2": 0, "HC": 3.0, "P": 8.0}
    bad_run = 0
    ts = 1_000_000
    seen: set[str] = set()
    checked = 0
    for step in range(1500):
        ts += 1000
        for point, moves in WALKS.items():
            values[point] = min(max(values[point] + rng.choice(moves), -20.0), 120.0)
        values["F1"], values["F2"] = int(rng.random() < 0.05), int(rng.random() < 0.05)
        bad_run = bad_run - 1 if bad_run else (4 if rng.random() < 0.03 else 0)  # B unreadable 4 polls in a row
        points = [info.id for info in pipeline.table.points]
        qualities = [BAD if (p == "B" and bad_run) or rng.random() < 0.02 else GOOD for p in points]
        refusing[0] = rng.random() < 0.03
        out = pipeline.events_out
        pipeline.ingest(ReadingBatch(ts, list(range(len(points))),
                                     [None if q == BAD else values[p] for p, q in zip(points, qualities, strict=True)],
                                     qualities))
        refusing[0] = False
        pipeline.store_events(pipeline.alarms.tick(int(time.time() * 1000) + 60_000))  # on-delays run out
        if rng.random() < 0.05:  # someone resets whatever latched alarm may be reset
            for alarm in pipeline.alarms.active():
                with contextlib.suppress(ResetRefused):
                    pipeline.store_events([pipeline.alarms.reset(alarm, ts)])
        if step % 97 == 0:  # production halted, then resumed
            pipeline.store_events(pipeline.alarms.set_halted(step % 194 == 0, ts))
        if step == 700:  # the same store reopened, as after a restart
            pipeline.flush()
            store.close()
            store.open()
        if step == 1100:  # a new configuration (one point fewer) installed while running
            pipeline.reconfigure(Pipeline.prepare(parse_config(STORM.replace(
                "          - {id: E, address: 8, type: float32, range: [0, 100], quality: {frozen_after: 3s}}\n",
                ""))), ts, "configuration changed")
        if pipeline.events_out != out or step in (700, 1100):
            pipeline.store_events([])  # what a batch of events stores with them, and any the store refused
            assert store.alarm_states() == pipeline.alarm_states(), f"step {step}"
            checked += 1
            seen.update(f"{a.rpartition('/')[2]}:{s}" for a, s in store.alarm_states().items())
    kinds = {"latched", "data_quality", "comm_loss", "rate", "fault", "crowding", "halt_violation"}
    assert checked > 100 and kinds <= {part for k in seen for part in k.split(":")}, sorted(seen)
    store.close()

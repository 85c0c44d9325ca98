"""Store-and-forward under load, with the real processes: a synthetic plant over Modbus TCP, the agent as its own
process, a real mosquitto that we stop and start, and the platform simulator checking every `seq`.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import now_ms, wait_until

from agent.config.points import PointTable
from agent.core import GOOD, KIND_DATA, ReadingBatch
from agent.messages import data_body, identity_fields
from agent.store import Store
from simulators.modbus import synthetic_config, synthetic_data
from simulators.platform import PlatformSimulator

PREFIX = "sf"


def site(plant_port: int, broker_port: int, store: Path, *, points: int, interval: float,
         **store_options: Any) -> dict[str, Any]:
    data = synthetic_data(points, interval=interval, port=plant_port, per_device=min(points, 500),
                          uplink_port=broker_port, store=str(store))
    data["uplink"].update({"prefix": PREFIX, "reconnect_min": 0.2, "reconnect_max": 1, "health_interval": 2,
                           "keepalive": 5, "batch": {"max_readings": 500, "max_delay": 0.3}})
    data["store"].update({"shutdown_drain": 10, **store_options})
    return data


def start_plant(plant: Any, points: int, interval: float) -> Any:
    config = synthetic_config(points, interval=interval, port=1, per_device=min(points, 500))
    return plant(config, {"bench": 0})


def no_gaps(platform: PlatformSimulator) -> bool:
    agents = platform.report().agents
    return bool(agents) and all(not a.gaps and a.seq_min == 1 for a in agents.values())


def assert_everything_arrived(platform: PlatformSimulator, store: Path) -> None:
    report = platform.report().agent("bench")
    assert report.seq_min == 1 and report.gaps == [], f"missing seq: {report.gaps[:20]}"
    assert platform.schema_errors() == []
    with Store(store) as s:
        assert s.backlog().messages == 0
        assert s.last_seq() == report.seq_max


def poll_times(platform: PlatformSimulator, point: str) -> list[int]:
    return sorted({r.ts for r in platform.readings() if r.point == point})


@pytest.mark.timeout(300)
def test_broker_down_for_2_minutes_every_reading_arrives_after(
    tmp_path: Path, broker: Any, plant: Any, agent_process: Any
) -> None:
    sim = start_plant(plant, 1000, 0.5)
    platform = PlatformSimulator("127.0.0.1", broker.port, PREFIX)
    platform.start()
    store = tmp_path / "store.db"
    agent = agent_process(site(sim.ports["bench"], broker.port, store, points=1000, interval=0.5)).start()
    assert platform.wait_for(lambda p: len(p.readings()) >= 5000, 30), agent.log()[-2000:]
    down_at = int(time.time() * 1000)
    broker.stop()
    time.sleep(120)  # the scenario: the broker stays down for 2 minutes
    up_at = int(time.time() * 1000)
    broker.start()
    assert platform.wait_for(lambda p: no_gaps(p) and any(r.ts > up_at + 3000 for r in p.readings()), 90), \
        agent.log()[-3000:]
    assert agent.stop_seen_by(platform) == 0
    assert_everything_arrived(platform, store)
    stamps = poll_times(platform, "P00000")
    holes = [b - a for a, b in itertools.pairwise(stamps) if b - a > 1500]
    assert holes == [], f"polls missing around the outage: {holes}"
    outage = [r for r in platform.readings() if down_at + 1000 < r.ts < up_at - 1000]
    assert len(outage) >= 1000 * 2 * 115
    assert all(r.hist for r in outage)
    platform.stop()


@pytest.mark.timeout(300)
def test_kill_9_twenty_times_leaves_no_gap_and_duplicates_only_what_was_in_flight(
    tmp_path: Path, broker: Any, plant: Any, agent_process: Any
) -> None:
    sim = start_plant(plant, 500, 0.2)
    platform = PlatformSimulator("127.0.0.1", broker.port, PREFIX)
    platform.start()
    store = tmp_path / "store.db"
    config = site(sim.ports["bench"], broker.port, store, points=500, interval=0.2)
    rng = random.Random(20)
    kills = 20
    for n in range(kills):
        agent = agent_process(config).start()
        if n % 2 == 0:  # every other run is killed while it sends, however slowly the machine starts it
            assert platform.wait_for(agent.seen_online_by, 30), agent.log()[-2000:]
        time.sleep(rng.uniform(0.6, 2.5))  # the scenario: killed at a random moment
        agent.kill9()
    agent = agent_process(config).start()
    # the last run delivers what the killed ones left behind
    assert platform.wait_for(lambda p: agent.seen_online_by(p) and no_gaps(p), 60), agent.log()[-2000:]
    assert agent.stop_seen_by(platform) == 0
    assert platform.wait_for(no_gaps, 30), platform.report().agent("bench").gaps[:20]
    assert_everything_arrived(platform, store)
    inflight = 100  # uplink.inflight default: what may be unacknowledged at a kill
    assert platform.report().agent("bench").duplicates <= kills * inflight
    assert "Traceback" not in agent.log()
    platform.stop()


@pytest.mark.timeout(300)
def test_disk_cap_in_an_outage_evicts_only_telemetry_and_every_alarm_arrives(
    tmp_path: Path, broker: Any, plant: Any, agent_process: Any
) -> None:
    sim = start_plant(plant, 1000, 0.25)
    platform = PlatformSimulator("127.0.0.1", broker.port, PREFIX)
    platform.start()
    store = tmp_path / "store.db"
    agent = agent_process(site(sim.ports["bench"], broker.port, store, points=1000, interval=0.25,
                               max_mb=1.5)).start()
    assert platform.wait_for(lambda p: len(p.readings()) >= 4000, 30), agent.log()[-2000:]
    broker.stop()
    crossed = [f"P{i:05d}" for i in range(0, 1000, 50)]
    for point in crossed:  # 20 points over both limits: 40 alarm events during the outage
        sim.call(sim.sim.set_value, point, 97.0)
    time.sleep(40)  # the scenario: the broker stays down 40 s while 20 points are over both limits
    for point in crossed:
        sim.call(sim.sim.release, point)

    def all_cleared() -> bool:
        text = agent.log()
        return all(f"alarm {p}/{t} cleared:" in text for p in crossed for t in ("high", "high_high"))

    wait_until(all_cleared, 20, "the agent's log of every clear, made while the broker is down")
    broker.start()

    def alarm_ids(p: PlatformSimulator, state: str) -> set[str]:
        return {a["id"] for a in p.alarms() if a["state"] == state}

    expected = {f"{p}/{t}" for p in crossed for t in ("high", "high_high")}
    assert platform.wait_for(lambda p: expected <= alarm_ids(p, "raised") and expected <= alarm_ids(p, "cleared")
                             and any(h["evicted_readings"] > 0 for h in p.health()), 60), agent.log()[-3000:]
    assert agent.stop_seen_by(platform) == 0
    report = platform.report().agent("bench")
    evicted = max(h["evicted_readings"] for h in platform.health())
    assert report.gaps, "the cap should have forced evictions"
    assert len(report.gaps) <= evicted <= 500 * len(report.gaps), "each missing seq is an evicted data message"
    with Store(store) as s:
        assert s.backlog().messages == 0
        assert int(s.meta("evicted_readings")) == evicted
    assert "evicted" in agent.log()
    platform.stop()


@pytest.mark.timeout(120)
def test_agent_starts_on_a_damaged_store_keeps_the_old_file_and_seq_goes_on(
    tmp_path: Path, broker: Any, plant: Any, agent_process: Any
) -> None:
    sim = start_plant(plant, 100, 0.5)
    platform = PlatformSimulator("127.0.0.1", broker.port, PREFIX)
    platform.start()
    store = tmp_path / "store.db"
    config = site(sim.ports["bench"], broker.port, store, points=100, interval=0.5)
    agent = agent_process(config).start()
    assert platform.wait_for(lambda p: len(p.readings()) >= 500, 30), agent.log()[-2000:]
    assert agent.stop() == 0
    before = platform.report().agent("bench").seq_max
    with open(store, "r+b") as f:
        f.write(b"\x00garbage\xff" * 2000)
    agent = agent_process(config).start()
    assert platform.wait_for(lambda p: p.report().agent("bench").seq_max > before + 3, 30), agent.log()[-2000:]
    assert platform.wait_for(lambda p: any(h["store"]["recovered"] for h in p.health()), 20)
    assert agent.stop() == 0
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("store.db.corrupt-")]
    assert kept and kept[0].stat().st_size > 0
    assert "is damaged" in agent.log()
    report = platform.report().agent("bench")
    assert report.duplicates == 0, "a new store must not reuse seq"
    platform.stop()


def prefill_backlog(store_path: Path, config: dict[str, Any], messages: int) -> int:
    """Put `messages` full data messages from an hour ago into the store, as an agent would have."""
    from agent.config.loader import validate_config_data

    table = PointTable(validate_config_data(config, source="test", base_dir=None))
    identity = identity_fields("bench", "000000000000")
    start = int(time.time() * 1000) - 3_600_000
    with Store(store_path) as store, store.transaction():
        for m in range(messages):
            indices = [(m * 500 + i) % len(table) for i in range(500)]
            batch = ReadingBatch(start + m * 1000, indices, [50.0] * 500, [GOOD] * 500)
            body, count = data_body(identity, table.points, [batch])
            store.append(KIND_DATA, count, body, created=batch.ts)
    return messages * 500


@pytest.mark.timeout(180)
def test_live_readings_keep_their_latency_while_a_long_backlog_replays(
    tmp_path: Path, broker: Any, plant: Any, agent_process: Any
) -> None:
    sim = start_plant(plant, 1000, 0.5)
    store = tmp_path / "store.db"
    config = site(sim.ports["bench"], broker.port, store, points=1000, interval=0.5)
    config["uplink"]["backlog_rate"] = 10_000
    backlog = prefill_backlog(store, config, 600)  # 300,000 readings: 30 s at the backlog rate
    lags: list[tuple[float, float]] = []
    hist_seen: list[float] = []
    lock = threading.Lock()

    def watch(topic: str, message: dict[str, Any]) -> None:
        if not topic.endswith("/data"):
            return
        now = time.time() * 1000
        with lock:
            if message["hist"]:
                hist_seen.append(now)
            else:
                lags.append((now, now - max(r["ts"] for r in message["readings"])))

    platform = PlatformSimulator("127.0.0.1", broker.port, PREFIX, on_message=watch)
    platform.start()
    agent = agent_process(config).start()
    assert platform.wait_for(lambda p: sum(1 for r in p.readings() if r.hist) >= backlog, 90), agent.log()[-2000:]
    assert agent.stop() == 0
    with lock:
        drain_end = max(hist_seen)
        during = [lag for arrived, lag in lags if arrived <= drain_end]
    assert drain_end - min(hist_seen) > 15_000, "the backlog should take a while to replay"
    assert len(during) > 50
    # live data never waits for history: were it queued behind the backlog, lags would reach tens of seconds
    assert max(during) < 5000, f"live data waited {max(during):.0f} ms behind the backlog"
    platform.stop()


def test_what_is_held_at_a_reconnect_goes_once_the_alarm_events_before_it_are_on_disk(
        tmp_path: Path, broker: Any) -> None:
    """An alarm event is held from the uplink (with everything stored after it) until a worker thread has synced
    its log. A connection that begins meanwhile must send the held backlog once it is released, not leave it for
    the next reconnect: in-process uplink, real store, real mosquitto, the platform simulator counting."""
    import asyncio

    from agent.config.loader import validate_config_data
    from agent.pipeline.ingest import Pipeline
    from agent.uplink.uplink import Uplink

    data = site(1, broker.port, tmp_path / "s.db", points=10, interval=1.0)
    config = validate_config_data(data, source="<test>", base_dir=None)
    store = Store(config.store.path).open()
    pipeline = Pipeline(config, store)
    for n in range(6):  # six data messages of ten readings: seq 1..6, all stored before the connection
        pipeline.ingest(ReadingBatch(now_ms() + n, list(range(10)), [float(n)] * 10, [GOOD] * 10))
        pipeline.flush()
    assert store.last_seq() == 6
    store.hold_after = 2  # as while an alarm event stored as seq 3 waits for its log to reach the disk
    platform = PlatformSimulator("127.0.0.1", broker.port, PREFIX)
    platform.start()

    async def scenario() -> None:
        uplink = Uplink(config.uplink, config.agent, store, version="t", config_version="t")
        running = asyncio.get_running_loop().create_task(uplink.run())
        try:
            await asyncio.sleep(1.5)  # connected, and what it may send sent (the backlog's data wait behind it)
            assert len(platform.readings()) <= 20, "nothing after the hold goes"
            store.hold_after = None  # the log is synced: what was held may go
            uplink.wake()
            for _ in range(200):
                if len(platform.readings()) >= 60:
                    break
                await asyncio.sleep(0.05)
            assert len(platform.readings()) == 60, "the held backlog went on the same connection"
        finally:
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running

    try:
        asyncio.run(scenario())
    finally:
        platform.stop()
        store.close()

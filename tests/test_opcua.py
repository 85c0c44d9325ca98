"""The OPC UA driver against the OPC UA simulator (asyncua's server, over loopback): poll and subscribe modes,
source timestamps, status codes as qualities, missing nodes, a server restarted mid-run, a server clock a day
ahead or stepped back, Basic256Sha256 with generated certificates, and username/password logins.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.config.loader import validate_config_data
from agent.config.models import AgentConfig
from agent.config.points import PointTable
from agent.core import DeviceRead
from agent.drivers.opcua import driver as opcua
from agent.drivers.opcua.driver import OpcUaChannel, OpcUaDevice, OpcUaDriver, OpcUaError
from agent.errors import ConfigError
from agent.pipeline.decode import BAD, GOOD, UNCERTAIN, decode
from simulators.opcua import OpcUaSimulator, client_certificate

ROOT = Path(__file__).resolve().parent.parent

PLANT_POINTS: list[dict[str, Any]] = [
    {"id": "ZONE1", "node": "ns=2;s=Zone.1.HeadCount", "domain": "personnel", "limits": {"high": 5}},
    {"id": "TI-101", "node": "ns=2;i=1001", "range": [0, 200], "limits": {"high": 95, "high_high": 105}},
    {"id": "PI-101", "node": "ns=2;i=1002"},
    {"id": "LI-101", "node": "ns=2;i=1003", "scale": 100, "offset": 1},
    {"id": "RUN", "node": "ns=2;s=Pump.Running"},
    {"id": "NAME", "node": "ns=2;s=Zone.1.Name"},
]


def site(channels: list[dict[str, Any]]) -> AgentConfig:
    return validate_config_data({"agent": {"id": "t", "enterprise": "e"}, "channels": channels},
                                source="test", base_dir=None)


def plant_config() -> AgentConfig:
    return site([{
        "id": "plant", "driver": "opcua", "endpoint": "opc.tcp://127.0.0.1:4840/edge",
        "devices": [{"id": "polled", "points": PLANT_POINTS}],
    }])


class SimThread:
    """The simulator on its own event loop in a thread, shared by the tests of this module."""

    def __init__(self, sim: OpcUaSimulator) -> None:
        self.sim = sim
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="opcua-sim")

    def run(self, make: Callable[[], Any], timeout: float = 20) -> Any:
        """Call `make` on the simulator's loop and await what it returns there."""
        async def invoke() -> Any:
            result = make()
            if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future | asyncio.Task):
                return await result
            if hasattr(result, "__await__"):
                return await result
            return result

        return asyncio.run_coroutine_threadsafe(invoke(), self.loop).result(timeout)

    def start(self) -> SimThread:
        self.thread.start()
        self.run(self.sim.start)
        return self

    def stop(self) -> None:
        try:
            self.run(self.sim.stop)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


@pytest.fixture(scope="module")
def plant(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimThread]:
    # period 3600: nothing walks, so every value and timestamp is the one a test set
    sim = OpcUaSimulator(plant_config(), folder=tmp_path_factory.mktemp("plant"), period=3600,
                         users={"operator": "s3cret"})
    thread = SimThread(sim).start()
    thread.run(lambda: thread.sim.set_value("RUN", True))
    yield thread
    thread.stop()


def channel_for(endpoint: str, devices: list[dict[str, Any]], **fields: Any) -> OpcUaChannel:
    return OpcUaChannel.model_validate({"id": "c1", "driver": "opcua", "endpoint": endpoint, "devices": devices,
                                        **fields})


def ms(stamp: datetime | None) -> int:
    assert stamp is not None
    return int(stamp.timestamp() * 1000)


async def read_until(driver: OpcUaDriver, device: OpcUaDevice, done: Callable[[DeviceRead], bool],
                     limit: float = 10.0) -> DeviceRead:
    """Read every 50 ms until `done` says the read is the awaited one; fail after `limit` seconds."""
    async with asyncio.timeout(limit):
        while True:
            read = await driver.read(device)
            if done(read):
                return read
            await asyncio.sleep(0.05)


async def until(what: Callable[[], bool], limit: float = 20.0) -> None:
    """Return once `what()` holds; fail after `limit` seconds."""
    for _ in range(int(limit / 0.05)):
        if what():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {limit}s")


# --- configuration -------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_config_rejects_bad_node_ids_and_incomplete_security() -> None:
    base = {"id": "c", "driver": "opcua", "endpoint": "opc.tcp://10.0.0.5:4840"}
    point = {"id": "p", "node": "ns=2;s=A"}

    def errors(**overrides: Any) -> str:
        channel = {**base, "devices": [{"id": "d", "points": [point]}], **overrides}
        with pytest.raises(ConfigError) as info:
            site([channel])
        return "; ".join(info.value.errors)

    assert "node" in errors(devices=[{"id": "d", "points": [{"id": "p", "node": "Zone1.HeadCount"}]}])
    assert "endpoint" in errors(endpoint="tcp://10.0.0.5:4840")
    assert "needs `certificate` and `private_key`" in errors(security="Basic256Sha256")
    assert "only apply with security" in errors(mode="Sign")
    assert "password is given but username is not" in errors(password="x")
    assert "publishing_interval is only for mode: subscribe" in errors(
        devices=[{"id": "d", "publishing_interval": 1, "points": [point]}])
    good = site([{**base, "security": "Basic256Sha256", "certificate": "/c.pem", "private_key": "/k.pem",
                  "devices": [{"id": "d", "mode": "subscribe", "publishing_interval": "200ms",
                               "points": [point, {"id": "q", "node": "ns=3;i=1001"}]}]}])
    assert good.channels[0].devices[0].publishing_interval == 0.2  # type: ignore[attr-defined]


@pytest.mark.timeout(60)
def test_loading_the_drivers_does_not_import_asyncua() -> None:
    code = ("import sys\nfrom agent.drivers import registry\nnames = [d.name for d in registry.all_drivers()]\n"
            "assert 'opcua' in names, names\nbad = [m for m in sys.modules if m.startswith('asyncua')]\n"
            "assert not bad, bad[:5]\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=50)


@pytest.mark.timeout(30)
def test_qualities_are_the_pipelines() -> None:
    assert (opcua.GOOD, opcua.UNCERTAIN, opcua.BAD) == (GOOD, UNCERTAIN, BAD)


@pytest.mark.timeout(30)
def test_timestamp_falls_back_from_source_to_server_to_poll_time() -> None:
    from asyncua import ua

    point = opcua.OpcUaPoint(id="p", node="ns=2;i=1")
    source, server = datetime(2026, 1, 2, 3, 4, 5, 678000, UTC), datetime(2026, 1, 2, 3, 4, 6, tzinfo=UTC)
    both = ua.DataValue(ua.Variant(1.5), SourceTimestamp=source, ServerTimestamp=server)
    only_server = ua.DataValue(ua.Variant(1.5), ServerTimestamp=server)
    neither = ua.DataValue(ua.Variant(1.5))
    assert opcua.convert(both, point, 42).ts == ms(source)
    assert opcua.convert(only_server, point, 42).ts == ms(server)
    assert opcua.convert(neither, point, 42).ts == 42
    assert opcua.convert(both, point, 42, "server").ts == ms(server)
    assert opcua.convert(both, point, 42, "poll").ts == 42


# --- reading -------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_poll_reads_every_node_with_its_source_timestamp(plant: SimThread) -> None:
    values = {"ZONE1": 3, "TI-101": 81.25, "PI-101": 0.5, "LI-101": 5.0}  # LI-101 is served raw: (5 - 1) / 100
    for key, value in values.items():
        plant.run(lambda k=key, v=value: plant.sim.set_value(k, v))  # type: ignore[misc]
    stamps = {key: ms(plant.sim.source_timestamp(key)) for key in (*values, "RUN")}
    channel = channel_for(plant.sim.endpoint, [{"id": "d", "points": PLANT_POINTS[:5]}])

    async def run() -> DeviceRead:
        driver = OpcUaDriver(channel)
        try:
            return await driver.read(channel.devices[0])
        finally:
            await driver.close()

    read = asyncio.run(run())
    assert read.errors == []
    assert read.values == [3, 81.25, 0.5, 0.04, True]
    assert read.timestamps == [stamps[k] for k in ("ZONE1", "TI-101", "PI-101", "LI-101", "RUN")]
    assert read.qualities == [GOOD] * 5
    config = site([channel.model_dump()])
    table = PointTable(config)
    batch = decode(table.points, table.devices[0].indices, read, int(time.time() * 1000))
    assert batch.values == [3, 81.25, 0.5, 5.0, True]  # scale and offset are the pipeline's, not the driver's
    assert batch.stamps == read.timestamps


@pytest.mark.timeout(60)
def test_status_codes_map_to_quality_and_strings_are_bad(plant: SimThread) -> None:
    plant.run(lambda: plant.sim.set_value("PI-101", 0.75))
    plant.run(lambda: plant.sim.set_status("PI-101", "uncertain"))
    plant.run(lambda: plant.sim.set_status("TI-101", "bad"))
    plant.run(lambda: plant.sim.set_value("NAME", "1#反应区"))
    channel = channel_for(plant.sim.endpoint, [{"id": "d", "points": [
        PLANT_POINTS[0], PLANT_POINTS[1], PLANT_POINTS[2], PLANT_POINTS[5]]}])

    async def run() -> DeviceRead:
        driver = OpcUaDriver(channel)
        try:
            return await driver.read(channel.devices[0])
        finally:
            await driver.close()

    try:
        read = asyncio.run(run())
    finally:
        plant.run(lambda: plant.sim.set_status("PI-101", "good"))
        plant.run(lambda: plant.sim.set_status("TI-101", "good"))
    assert read.qualities == [GOOD, BAD, UNCERTAIN, BAD]
    assert read.values[1] is None and read.values[2] == 0.75 and read.values[3] is None
    assert len(read.errors) == 2
    assert "TI-101" in read.errors[0] and "BadSensorFailure" in read.errors[0]
    assert "NAME" in read.errors[1] and "String" in read.errors[1] and "not a number or bool" in read.errors[1]
    config = site([channel.model_dump()])
    table = PointTable(config)
    batch = decode(table.points, table.devices[0].indices, read, int(time.time() * 1000))
    assert batch.qualities == [GOOD, BAD, UNCERTAIN, BAD]


@pytest.mark.timeout(60)
def test_a_missing_node_is_bad_with_its_id_while_the_others_read(plant: SimThread) -> None:
    plant.run(lambda: plant.sim.set_value("ZONE1", 4))
    points = [PLANT_POINTS[0], {"id": "GONE", "node": "ns=2;s=No.Such.Node"}, PLANT_POINTS[4]]
    channel = channel_for(plant.sim.endpoint, [{"id": "d", "points": points}])

    async def run() -> DeviceRead:
        driver = OpcUaDriver(channel)
        try:
            return await driver.read(channel.devices[0])
        finally:
            await driver.close()

    read = asyncio.run(run())
    assert read.values == [4, None, True]
    assert read.qualities == [GOOD, BAD, GOOD]
    assert len(read.errors) == 1
    assert "ns=2;s=No.Such.Node" in read.errors[0] and "BadNodeIdUnknown" in read.errors[0]


@pytest.mark.timeout(60)
def test_subscribe_returns_everything_once_then_only_changes(plant: SimThread) -> None:
    plant.run(lambda: plant.sim.set_value("ZONE1", 2))
    plant.run(lambda: plant.sim.set_value("TI-101", 80.5))
    points = [PLANT_POINTS[0], PLANT_POINTS[1], {"id": "GONE", "node": "ns=2;s=No.Such.Node"}, PLANT_POINTS[4]]
    channel = channel_for(plant.sim.endpoint, [{"id": "s", "mode": "subscribe", "interval": 0.1,
                                                "publishing_interval": 0.05, "points": points}])
    device = channel.devices[0]

    async def run() -> tuple[DeviceRead, DeviceRead, DeviceRead, DeviceRead, int]:
        driver = OpcUaDriver(channel)
        try:
            first = await driver.read(device)
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(_set(plant, "TI-101", 88.0), plant.loop))
            stamp = ms(plant.sim.source_timestamp("TI-101"))
            change = await read_until(driver, device, lambda r: 1 in (r.positions or []))
            quiet = await driver.read(device)
            # what asyncua does to a stale subscription: the server sends every current value again
            watch = driver._devices["s"].watch
            assert watch is not None
            await watch.subscription.recreate()
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(_set(plant, "ZONE1", 3), plant.loop))
            resent = await read_until(driver, device, lambda r: 0 in (r.positions or []))
            return first, change, quiet, resent, stamp
        finally:
            await driver.close()

    first, change, quiet, resent, stamp = asyncio.run(run())
    assert first.positions is None
    assert first.values == [2, 80.5, None, True]
    assert first.qualities == [GOOD, GOOD, BAD, GOOD]
    # the subscription's initial values equal what the first read returned: they are not news again
    assert change.positions == [1, 2]
    assert change.values == [88.0, None]
    assert change.timestamps is not None and change.timestamps[0] == stamp
    assert change.qualities == [GOOD, BAD]
    assert any("ns=2;s=No.Such.Node" in e and "BadNodeIdUnknown" in e for e in change.errors)
    assert quiet.positions == [2] and quiet.values == [None]  # nothing changed; the missing node stays bad
    assert resent.positions == [0, 2] and resent.values == [3, None]  # values sent again are not news


async def _set(plant: SimThread, key: str, value: Any) -> None:
    await plant.sim.set_value(key, value)


@pytest.mark.timeout(60)
def test_username_and_password_log_in_and_a_wrong_password_is_refused(plant: SimThread) -> None:
    points = [{"id": "RUN", "node": "ns=2;s=Pump.Running"}]
    good = channel_for(plant.sim.endpoint, [{"id": "d", "points": points}], username="operator", password="s3cret")
    wrong = channel_for(plant.sim.endpoint, [{"id": "d", "points": points}], username="operator", password="guess")

    async def run(channel: OpcUaChannel) -> DeviceRead:
        driver = OpcUaDriver(channel)
        try:
            return await driver.read(channel.devices[0])
        finally:
            await driver.close()

    assert asyncio.run(run(good)).values == [True]
    with pytest.raises(OpcUaError, match="BadUserAccessDenied") as info:
        asyncio.run(run(wrong))
    assert isinstance(info.value, OSError)  # the pipeline counts it a failed poll and backs off
    assert info.value.kind == "login"


@pytest.mark.timeout(60)
def test_simulator_serves_config_nodes_and_a_crowding_scenario(plant: SimThread) -> None:
    overrides = plant.sim.channel_overrides()
    assert overrides == {"plant": {"endpoint": plant.sim.endpoint}}
    assert set(plant.sim.nodes()) >= {p["node"] for p in PLANT_POINTS}
    before = len(plant.sim.changes)
    plant.run(lambda: plant.sim.crowding(speed=50, hold=1.0), timeout=30)
    counts = [v for node, v in plant.sim.changes[before:] if node == "ns=2;s=Zone.1.HeadCount"]
    assert max(counts) > 5  # the zone's high limit
    assert counts[-1] < 5
    assert min(counts[counts.index(max(counts)):counts.index(max(counts)) + 3]) > 5  # it holds above the limit


# --- a server that goes away -----------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_server_restart_mid_run_reconnects_and_resubscribes(tmp_path: Path) -> None:
    points = [PLANT_POINTS[0], PLANT_POINTS[1]]
    config = site([{"id": "plant", "driver": "opcua", "endpoint": "opc.tcp://127.0.0.1:4840/edge",
                    "devices": [{"id": "polled", "points": points},
                                {"id": "watched", "mode": "subscribe", "interval": 0.1, "publishing_interval": 0.05,
                                 "points": [{**p, "id": p["id"] + "-s"} for p in points]}]}])

    async def run() -> None:
        sim = OpcUaSimulator(config, folder=tmp_path, period=3600)
        await sim.start()
        port = sim.port
        channel = config.channels[0].model_copy(update=sim.channel_overrides()["plant"])
        assert isinstance(channel, OpcUaChannel)
        polled, watched = channel.devices
        driver = OpcUaDriver(channel)
        try:
            await sim.set_value("ZONE1", 1)
            assert (await driver.read(polled)).values[0] == 1
            assert (await driver.read(watched)).positions is None
            await sim.set_value("ZONE1", 2)
            await read_until(driver, watched, lambda r: r.values == [2])

            await sim.stop()
            with pytest.raises(OSError, match="connection refused"):
                await driver.read(polled)
            with pytest.raises(OSError, match="connection refused"):
                await driver.read(watched)
            assert not driver.connected
            await sim.set_value("ZONE1", 3)  # changed while the server was down
            await sim.start()
            assert sim.port == port

            assert (await driver.read(polled)).values[0] == 3
            again = await driver.read(watched)
            assert again.positions is None and again.values[0] == 3  # everything once after re-subscribing
            await sim.set_value("ZONE1", 4)
            change = await read_until(driver, watched, lambda r: bool(r.positions))
            assert change.positions == [0] and change.values == [4]  # the new subscription delivers

            # a restart between two polls, before the driver noticed: the next read still succeeds
            await sim.stop()
            await sim.start()
            await sim.set_value("ZONE1", 5)
            assert (await driver.read(polled)).values[0] == 5
            assert (await driver.read(watched)).values[0] == 5
        finally:
            await driver.close()
            await sim.stop()

    asyncio.run(run())


@pytest.mark.timeout(90)
def test_pipeline_reports_bad_during_a_restart_and_good_after_it(tmp_path: Path) -> None:
    points = [PLANT_POINTS[0], PLANT_POINTS[1]]
    config = site([{"id": "plant", "driver": "opcua", "endpoint": "opc.tcp://127.0.0.1:4840/edge",
                    "devices": [{"id": "polled", "interval": 0.1, "backoff_max": 0.2, "points": points},
                                {"id": "watched", "mode": "subscribe", "interval": 0.1, "backoff_max": 0.2,
                                 "publishing_interval": 0.05,
                                 "points": [{**p, "id": p["id"] + "-s"} for p in points]}]}])
    seen: list[tuple[str, Any, int]] = []

    async def run() -> dict[str, Any]:
        from agent.pipeline.ingest import Pipeline
        from agent.pipeline.poller import Poller
        from agent.store import Store

        sim = OpcUaSimulator(config, folder=tmp_path, period=3600)
        await sim.start()
        channel = config.channels[0].model_copy(update=sim.channel_overrides()["plant"])
        cfg = config.model_copy(update={"channels": [channel]})
        with Store(tmp_path / "store.db").open() as store:
            pipeline = Pipeline(cfg, store)
            ids = [p.id for p in pipeline.table.points]
            ingest = pipeline.ingest

            def record(batch: Any) -> None:
                seen.extend((ids[i], v, q) for i, v, q in zip(batch.indices, batch.values, batch.qualities,
                                                               strict=True))
                ingest(batch)

            poller = Poller(pipeline.table, record)
            task = asyncio.create_task(poller.run_channel(channel))

            try:
                await sim.set_value("ZONE1", 1)
                await until(lambda: ("ZONE1", 1, GOOD) in seen and ("ZONE1-s", 1, GOOD) in seen)
                await sim.stop()
                await until(lambda: ("ZONE1", None, BAD) in seen and ("ZONE1-s", None, BAD) in seen)
                await sim.set_value("ZONE1", 2)
                await sim.start()
                await until(lambda: ("ZONE1", 2, GOOD) in seen and ("ZONE1-s", 2, GOOD) in seen)
                await sim.set_value("ZONE1", 3)  # through the re-created subscription
                await until(lambda: ("ZONE1-s", 3, GOOD) in seen)
                return {"channels": poller.health(cfg.channels)}
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                await sim.stop()

    health = asyncio.run(run())
    assert health["channels"][0]["link"] == "up"
    assert [d["state"] for d in health["channels"][0]["devices"]] == ["ok", "ok"]


# --- a server clock that is wrong ------------------------------------------------------------------------

SKEW_MS = 300_000  # the default max_clock_skew of a device
Seen = tuple[str, Any, int, int, int]
"""One reading the pipeline took: point id, value, quality, its ts, and the agent's clock when it arrived."""


def _clock_site() -> AgentConfig:
    """TI-101 (high 95) read by a polled device (as TI-101) and a subscribed one (as TI-101-s)."""
    point = PLANT_POINTS[1]
    return site([{"id": "plant", "driver": "opcua", "endpoint": "opc.tcp://127.0.0.1:4840/edge",
                  "devices": [{"id": "polled", "interval": 0.1, "points": [point]},
                              {"id": "watched", "mode": "subscribe", "interval": 0.1, "publishing_interval": 0.05,
                               "points": [{**point, "id": "TI-101-s"}]}]}])


async def _run_site(tmp_path: Path, script: Callable[[OpcUaSimulator, list[Seen], Any], Awaitable[None]]
                    ) -> tuple[list[Seen], dict[str, Any]]:
    """Run `script(sim, seen, pipeline)` while the poller feeds the pipeline (alarms, store) from the simulator;
    return every reading taken and the poller's health of the channel."""
    from agent.pipeline.ingest import Pipeline
    from agent.pipeline.poller import Poller
    from agent.store import Store

    config = _clock_site()
    sim = OpcUaSimulator(config, folder=tmp_path, period=3600)
    await sim.start()
    channel = config.channels[0].model_copy(update=sim.channel_overrides()["plant"])
    cfg = config.model_copy(update={"channels": [channel]})
    seen: list[Seen] = []
    with Store(tmp_path / "store.db").open() as store:
        pipeline = Pipeline(cfg, store)
        ids = [p.id for p in pipeline.table.points]

        def record(batch: Any) -> None:
            now = int(time.time() * 1000)
            seen.extend((ids[i], v, q, t, now)
                        for i, v, q, t in zip(batch.indices, batch.values, batch.qualities, batch.times(), strict=True))
            pipeline.ingest(batch)

        poller = Poller(pipeline.table, record)
        task = asyncio.create_task(poller.run_channel(channel))
        try:
            await script(sim, seen, pipeline)
            return seen, poller.health(cfg.channels)[0]
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await sim.stop()


def _both_have(seen: list[Seen], value: float, quality: int) -> Callable[[], bool]:
    """True once both devices delivered `value` with `quality`."""
    return lambda: {p for p, v, q, _, _ in seen if v == value and q == quality} == {"TI-101", "TI-101-s"}


def _decode_log(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "agent.pipeline.decode" and r.levelno == level]


@pytest.mark.timeout(90)
def test_a_day_ahead_source_timestamp_is_distrusted_and_later_values_still_arrive(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def script(sim: OpcUaSimulator, readings: list[Seen], pipeline: Any) -> None:
        await sim.set_value("TI-101", 80.0)
        await until(_both_have(readings, 80.0, GOOD))
        sim.set_clock(86_400)  # one value stamped a day ahead...
        await sim.set_value("TI-101", 81.0)
        await until(_both_have(readings, 81.0, UNCERTAIN))
        sim.set_clock(0)  # ...then good values with correct times, rising past the high limit
        for value in (88.0, 96.0, 100.0):
            await sim.set_value("TI-101", value)
            await until(_both_have(readings, value, GOOD))
        assert {"TI-101/high", "TI-101-s/high"} <= set(pipeline.alarms.active())

    with caplog.at_level(logging.INFO, logger="agent.pipeline.decode"):
        seen, health = asyncio.run(_run_site(tmp_path, script))

    assert all(abs(ts - now) <= SKEW_MS for _, _, _, ts, now in seen)  # nothing stored or sent a day ahead
    ahead = [r for r in seen if r[1] == 81.0]
    assert all(q == UNCERTAIN and abs(ts - now) < 5_000 for _, _, q, ts, now in ahead)  # the agent's time
    assert [p for p, v, q, _, _ in seen if v is None or q == BAD] == []  # never bad: the server answered
    # logged once per device (the polled one read the day-ahead value at several polls), and once when it recovered
    warnings = _decode_log(caplog, logging.WARNING)
    assert sorted(w.split(":")[0] for w in warnings) == ["channel plant device polled", "channel plant device watched"]
    assert all("ahead of the agent's clock" in w and "max_clock_skew 300 s" in w for w in warnings)
    recovered = [m for m in _decode_log(caplog, logging.INFO) if "trusted again" in m]
    assert sorted(m.split(":")[0] for m in recovered) == ["channel plant device polled",
                                                          "channel plant device watched"]
    devices = {d["id"]: d for d in health["devices"]}
    assert devices["watched"]["untrusted_timestamps"] == 1  # the one day-ahead sample
    assert devices["polled"]["untrusted_timestamps"] == len([r for r in ahead if r[0] == "TI-101"])


@pytest.mark.timeout(90)
def test_a_server_clock_stepping_back_never_silences_a_point(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                                             ) -> None:
    async def script(sim: OpcUaSimulator, readings: list[Seen], pipeline: Any) -> None:
        await sim.set_value("TI-101", 80.0)
        await until(_both_have(readings, 80.0, GOOD))
        sim.set_clock(-30)  # a small step back (an NTP correction): older stamps than the last, still plausible
        for value in (85.0, 90.0):
            await sim.set_value("TI-101", value)
            await until(_both_have(readings, value, GOOD))
        sim.set_clock(-3600)  # an hour back: outside max_clock_skew
        await sim.set_value("TI-101", 96.0)
        await until(_both_have(readings, 96.0, UNCERTAIN))
        assert {"TI-101/high", "TI-101-s/high"} <= set(pipeline.alarms.active())
        sim.set_clock(0)
        await sim.set_value("TI-101", 70.0)
        await until(_both_have(readings, 70.0, GOOD))

    with caplog.at_level(logging.INFO, logger="agent.pipeline.decode"):
        seen, health = asyncio.run(_run_site(tmp_path, script))

    assert all(abs(ts - now) <= SKEW_MS for _, _, _, ts, now in seen)
    # the step back within the window: delivered with the server's own (earlier) times, good
    stepped = [r for r in seen if r[1] in (85.0, 90.0)]
    assert all(q == GOOD and 25_000 < now - ts < 35_000 for _, _, q, ts, now in stepped)
    # an hour back: the agent's time, uncertain, logged once per device and once more when it recovered
    hour = [r for r in seen if r[1] == 96.0]
    assert hour and all(q == UNCERTAIN and abs(ts - now) < 5_000 for _, _, q, ts, now in hour)
    warnings = _decode_log(caplog, logging.WARNING)
    assert len(warnings) == 2 and all("behind the agent's clock" in w for w in warnings)
    assert len([m for m in _decode_log(caplog, logging.INFO) if "trusted again" in m]) == 2
    devices = {d["id"]: d for d in health["devices"]}
    assert devices["watched"]["untrusted_timestamps"] == 1
    assert devices["polled"]["untrusted_timestamps"] == len([r for r in hour if r[0] == "TI-101"])


# --- security --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimThread]:
    """A server offering only Basic256Sha256, trusting one client certificate, refusing anonymous logins."""
    folder = tmp_path_factory.mktemp("guarded")
    cert, _ = client_certificate(folder, "agent")
    sim = OpcUaSimulator(None, folder=folder, allow_none=False, trusted=[cert], users={"operator": "s3cret"},
                         anonymous=False, period=3600)
    thread = SimThread(sim).start()
    yield thread
    thread.stop()


def _read_guarded(guarded: SimThread, **fields: Any) -> DeviceRead:
    channel = channel_for(guarded.sim.endpoint, [{"id": "d", "points": [
        {"id": "TI-101", "node": "ns=2;i=1001"}, {"id": "ZONE1", "node": "ns=2;s=Zone.1.HeadCount"}]}], **fields)

    async def run() -> DeviceRead:
        driver = OpcUaDriver(channel)
        try:
            return await driver.read(channel.devices[0])
        finally:
            await driver.close()

    return asyncio.run(run())


@pytest.mark.timeout(60)
def test_basic256sha256_sign_and_encrypt_with_generated_certificates(guarded: SimThread) -> None:
    cert, key = client_certificate(guarded.sim.folder, "agent")
    guarded.run(lambda: guarded.sim.set_value("ns=2;i=1001", 90.5))
    secured = {"security": "Basic256Sha256", "certificate": str(cert), "private_key": str(key),
               "server_certificate": str(guarded.sim.server_certificate), "username": "operator",
               "password": "s3cret"}
    for mode in ("SignAndEncrypt", "Sign"):
        read = _read_guarded(guarded, mode=mode, **secured)
        assert read.errors == [] and read.values[0] == 90.5


@pytest.mark.timeout(60)
def test_security_failures_say_what_was_refused(guarded: SimThread) -> None:
    cert, key = client_certificate(guarded.sim.folder, "agent")
    stranger_cert, stranger_key = client_certificate(guarded.sim.folder, "stranger")
    secured = {"security": "Basic256Sha256", "mode": "SignAndEncrypt", "certificate": str(cert),
               "private_key": str(key), "username": "operator", "password": "s3cret"}
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({**secured, "certificate": str(stranger_cert), "private_key": str(stranger_key)},
         "BadCertificateUntrusted", "security"),
        ({**secured, "server_certificate": str(stranger_cert)}, "not the pinned server_certificate", "security"),
        ({"username": "operator", "password": "s3cret"}, "no endpoint with security None", "security"),
        ({**secured, "password": "guess"}, "BadUserAccessDenied", "login"),
        ({k: v for k, v in secured.items() if k not in ("username", "password")}, "refuses anonymous login",
         "login"),
        ({**secured, "private_key": str(stranger_key)}, "does not belong to certificate", "file"),
        ({**secured, "certificate": str(guarded.sim.folder / "missing.pem")}, "missing.pem", "file"),
    ]
    for fields, message, kind in cases:
        with pytest.raises(OpcUaError) as info:
            _read_guarded(guarded, **fields)
        assert message in str(info.value), (fields, str(info.value))
        assert guarded.sim.endpoint in str(info.value) or kind == "file"
        assert info.value.kind == kind, (fields, info.value.kind)


@pytest.mark.timeout(30)
def test_certificates_are_made_once_and_reused(tmp_path: Path) -> None:
    cert, key = client_certificate(tmp_path)
    first = cert.read_bytes()
    assert client_certificate(tmp_path) == (cert, key)
    assert cert.read_bytes() == first
    from cryptography import x509

    loaded = x509.load_pem_x509_certificate(first)
    uris = loaded.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier)
    assert uris == [opcua.CLIENT_URI]
    assert loaded.not_valid_after_utc - datetime.now(UTC) > timedelta(days=365)


def test_a_null_opc_ua_datetime_is_no_timestamp() -> None:
    from datetime import UTC, datetime

    from agent.drivers.opcua.driver import _ms

    assert _ms(datetime(1601, 1, 1, tzinfo=UTC)) is None  # DateTime 0 on the wire
    assert _ms(datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)) is None
    assert _ms(datetime(2026, 11, 28, tzinfo=UTC)) == 1795824000000

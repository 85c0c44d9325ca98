"""The Modbus RTU drivers against the RTU bus simulator over real pseudo-terminals and TCP sockets: every type and
byte order, CRC vectors, spoiled frames that must cost one block and never the bus, dead and slow slaves through
the pipeline, a serial adapter pulled and plugged back, and RTU frames over TCP.

The simulator frames and checks CRCs with its own code, so the two sides do not share a misreading of the spec.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from agent.config.loader import validate_config_data
from agent.config.models import AgentConfig
from agent.config.points import PointTable
from agent.core import BAD, GOOD, ReadingBatch
from agent.drivers.modbus.codec import ModbusError, parse_read_reply, read_request, reply_length
from agent.drivers.modbus.rtu import (
    ModbusRtuChannel,
    ModbusRtuDriver,
    ModbusRtuTcpChannel,
    ModbusRtuTcpDriver,
    crc16,
    frame,
)
from agent.errors import ConfigError
from agent.pipeline.decode import decode
from agent.pipeline.ingest import Pipeline
from agent.pipeline.poller import Poller
from agent.store import Store
from simulators import modbus_rtu as sim_rtu
from simulators.modbus_rtu import RtuBusSimulator

ORDERS = ("ABCD", "CDAB", "BADC", "DCBA")
SAMPLES: dict[str, Any] = {
    "int16": -12345, "uint16": 54321, "int32": -123456789, "uint32": 3_000_000_123,
    "float32": -1234.5, "int64": -1_234_567_890_123_456, "uint64": 12_345_678_901_234_567_890,
    "float64": 98765.4321,
}
WIDTH = {"int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "float32": 2, "int64": 4, "uint64": 4, "float64": 4}


def site(*channels: dict[str, Any]) -> AgentConfig:
    return validate_config_data({"agent": {"id": "t", "enterprise": "e"}, "channels": list(channels)},
                                source="test", base_dir=None)


def gas_device(unit: int, **extra: Any) -> dict[str, Any]:
    """A gas controller slave: two detectors (float32 %LEL) and a fault bit."""
    return {
        "id": f"g{unit}", "unit": unit, "timeout": 0.3, "retries": 0, **extra,
        "points": [
            {"id": f"GT-{unit}01", "address": 0, "type": "float32", "domain": "gas", "unit": "%LEL",
             "range": [0, 100], "limits": {"high": 25, "high_high": 50}},
            {"id": f"GT-{unit}02", "address": 2, "type": "float32", "domain": "gas", "unit": "%LEL",
             "range": [0, 100]},
            {"id": f"GF-{unit}", "table": "discrete", "address": 0, "type": "bool"},
        ],
    }


def rtu_channel(*devices: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"id": "bus", "driver": "modbus_rtu", "port": "/dev/null", "baudrate": 38400, "devices": list(devices),
            **fields}


@asynccontextmanager
async def serving(config: AgentConfig, folder: Path) -> AsyncIterator[tuple[RtuBusSimulator, AgentConfig]]:
    """The simulator, and the config as the agent must use it (the pty link path, the TCP port)."""
    async with RtuBusSimulator(config, folder=folder, seed=7) as sim:
        overrides = sim.channel_overrides()
        channels = [c.model_copy(update=overrides.get(c.id, {})) for c in config.channels]
        yield sim, config.model_copy(update={"channels": channels})


def driver_of(channel: Any) -> ModbusRtuDriver | ModbusRtuTcpDriver:
    if isinstance(channel, ModbusRtuChannel):
        return ModbusRtuDriver(channel)
    assert isinstance(channel, ModbusRtuTcpChannel)
    return ModbusRtuTcpDriver(channel)


def values_by_id(config: AgentConfig, device_index: int, read: Any) -> dict[str, Any]:
    table = PointTable(config)
    batch = decode(table.points, table.devices[device_index].indices, read, 0)
    return {table.points[i].id: v for i, v in zip(batch.indices, batch.values, strict=True)}


# --- CRC and configuration -------------------------------------------------------------------------------


def test_crc_of_both_sides_matches_the_spec_examples() -> None:
    # the Modbus serial line examples, and the catalogue check value of CRC-16/MODBUS
    vectors = {"010300000001": 0x0A84, "1103006B0003": 0x8776, "313233343536373839": 0x4B37}
    for hexed, crc in vectors.items():
        data = bytes.fromhex(hexed)
        assert crc16(data) == crc, hexed
        assert sim_rtu.crc16(data) == crc, hexed
    assert frame(0x01, bytes.fromhex("0300000001")) == bytes.fromhex("01030000000184 0A".replace(" ", ""))
    assert frame(0x11, bytes.fromhex("03006B0003")).hex() == "1103006b00037687"


def test_unit_ids_outside_the_serial_range_are_config_errors() -> None:
    for unit in (0, 248):
        with pytest.raises(ConfigError) as info:
            site(rtu_channel(gas_device(unit)))
        assert any(line.startswith("channels[0].devices[0].unit:") for line in info.value.errors), info.value.errors
    with pytest.raises(ConfigError, match="parity"):
        site(rtu_channel(gas_device(1), parity="X"))


def test_frame_gap_defaults_to_three_and_a_half_characters_and_1_75_ms_above_19200_baud() -> None:
    def gap(**fields: Any) -> float:
        channel = site(rtu_channel(gas_device(1), **fields)).channels[0]
        assert isinstance(channel, ModbusRtuChannel)
        return channel.effective_frame_gap()

    # the standard counts an RTU character as 11 bits, whatever the parity and stop bits
    assert gap(baudrate=9600, parity="N") == pytest.approx(3.5 * 11 / 9600)
    assert gap(baudrate=9600, parity="E") == pytest.approx(3.5 * 11 / 9600)
    assert gap(baudrate=19200, parity="E") == pytest.approx(3.5 * 11 / 19200)
    assert gap(baudrate=38400) == pytest.approx(0.00175)
    assert gap(baudrate=115200) == pytest.approx(0.00175)
    assert gap(baudrate=9600, frame_gap="10ms") == pytest.approx(0.010)


# --- values ----------------------------------------------------------------------------------------------


def every_type_and_order() -> tuple[list[dict[str, Any]], dict[str, Any]]:
    points: list[dict[str, Any]] = []
    expected: dict[str, Any] = {}
    address = 0
    for dtype, value in SAMPLES.items():
        for order in ORDERS:
            pid = f"{dtype}-{order}"
            points.append({"id": pid, "address": address, "type": dtype, "order": order})
            expected[pid] = value
            address += WIDTH[dtype]
    for bit in (0, 7, 15):
        points.append({"id": f"bit{bit}", "table": "input", "address": 5, "type": "bool", "bit": bit})
        expected[f"bit{bit}"] = bit != 7
    for i in range(3):
        points.append({"id": f"coil{i}", "table": "coil", "address": 10 + i, "type": "bool"})
        points.append({"id": f"di{i}", "table": "discrete", "address": 20 + i * 9, "type": "bool"})
        expected[f"coil{i}"] = i != 1
        expected[f"di{i}"] = i == 1
    points.append({"id": "scaled", "table": "input", "address": 0, "type": "int16", "scale": 0.1, "offset": -40,
                   "range": [-40, 60]})
    expected["scaled"] = 23.4
    return points, expected


@pytest.mark.timeout(30)
@pytest.mark.parametrize("parity", ["N", "E"])
def test_every_type_and_byte_order_reads_back_through_rtu(tmp_path: Path, parity: str) -> None:
    points, expected = every_type_and_order()
    config = site(rtu_channel({"id": "d1", "unit": 3, "timeout": 1, "points": points}, parity=parity,
                              baudrate=19200))

    async def main() -> tuple[dict[str, Any], list[str], dict[str, bytes]]:
        async with serving(config, tmp_path) as (sim, cfg):
            for pid, value in expected.items():
                sim.set_value(pid, value)
            channel = cfg.channels[0]
            driver = driver_of(channel)
            try:
                read = await driver.read(channel.devices[0])  # type: ignore[attr-defined]
                await driver.close()
                raw = {}
                for order in ORDERS:  # the words on the wire, beside the codec's reading of them
                    address = next(p["address"] for p in points if p["id"] == f"float32-{order}")
                    reply = await driver.transact(3, read_request(3, address, 2), 1.0)  # reopens the port
                    raw[order] = parse_read_reply(reply, 3, 2)
            finally:
                await driver.close()
        return values_by_id(cfg, 0, read), read.errors, raw

    values, errors, raw = asyncio.run(main())
    assert errors == []
    for pid, value in expected.items():
        if isinstance(value, float):
            assert values[pid] == pytest.approx(value, rel=1e-6), pid
        else:
            assert values[pid] == value, pid
    a, b, c, d = struct.pack(">f", -1234.5)
    assert raw == {"ABCD": bytes([a, b, c, d]), "CDAB": bytes([c, d, a, b]), "BADC": bytes([b, a, d, c]),
                   "DCBA": bytes([d, c, b, a])}


@pytest.mark.timeout(20)
def test_an_exception_reply_is_a_modbus_error_with_its_code(tmp_path: Path) -> None:
    config = site(rtu_channel(gas_device(1)))

    async def main() -> None:
        async with serving(config, tmp_path) as (_, cfg):
            driver = driver_of(cfg.channels[0])
            try:
                reply = await driver.transact(1, read_request(3, 500, 2), 1.0)
                with pytest.raises(ModbusError) as info:
                    parse_read_reply(reply, 3, 2)
                assert info.value.code == 2
                reply = await driver.transact(1, read_request(3, 0, 2), 1.0)  # the bus is still in step
                assert len(parse_read_reply(reply, 3, 2)) == 4
            finally:
                await driver.close()

    asyncio.run(main())


# --- spoiled frames --------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        ("bad_crc", "CRC error"),
        ("truncated", "incomplete reply"),
        ("garbage_before", "garbage on the line"),
        ("noise", "garbage on the line"),
        ("wrong_address", "ignored a frame from unit 2"),
    ],
)
def test_a_spoiled_reply_fails_its_block_and_the_bus_reads_on(tmp_path: Path, fault: str, expected: str) -> None:
    config = site(rtu_channel(gas_device(1), gas_device(2)))

    async def main() -> list[tuple[list[Any], list[str]]]:
        async with serving(config, tmp_path) as (sim, cfg):
            sim.set_value("GT-101", 12.5)
            sim.set_value("GT-201", 7.5)
            channel = cfg.channels[0]
            devices = channel.devices  # type: ignore[attr-defined]
            driver = driver_of(channel)
            sim.inject_fault("bus", "g1", fault)
            out = []
            try:
                for device in (devices[0], devices[1], devices[0]):
                    read = await driver.read(device)
                    out.append((read.values, read.errors))
            finally:
                await driver.close()
        return out

    (spoiled, spoiled_errors), (other, other_errors), (again, again_errors) = asyncio.run(main())
    assert spoiled[:2] == [None, None]
    assert any(expected in e for e in spoiled_errors), spoiled_errors
    if fault in ("bad_crc", "garbage_before", "noise"):
        # the slave answers, so its next block is asked at once and must not read the rest of the noise
        assert spoiled[2] is False and len(spoiled_errors) == 1, spoiled_errors
    assert other_errors == [] and other[0] == pytest.approx(7.5)
    assert again_errors == [] and again[0] == pytest.approx(12.5)


@pytest.mark.timeout(20)
def test_a_spoiled_reply_is_asked_again_within_the_poll_when_retries_allow(tmp_path: Path) -> None:
    config = site(rtu_channel(gas_device(1, retries=1)))

    async def main() -> tuple[list[Any], list[str]]:
        async with serving(config, tmp_path) as (sim, cfg):
            sim.set_value("GT-101", 33.0)
            sim.inject_fault("bus", "g1", "bad_crc")  # the first reply only: its retry is clean
            driver = driver_of(cfg.channels[0])
            try:
                read = await driver.read(cfg.channels[0].devices[0])  # type: ignore[attr-defined]
            finally:
                await driver.close()
        return read.values, read.errors

    values, errors = asyncio.run(main())
    assert errors == []
    assert values[0] == pytest.approx(33.0)


@pytest.mark.timeout(20)
def test_a_late_reply_of_a_timed_out_slave_is_not_taken_for_the_next_slaves_answer(tmp_path: Path) -> None:
    # g1 answers after its timeout, while the master already waits for slow g2: g1's frame must be skipped
    config = site(rtu_channel(gas_device(1), gas_device(2, timeout=2.0)))

    async def main() -> tuple[list[str], list[Any], list[str]]:
        async with serving(config, tmp_path) as (sim, cfg):
            sim.set_value("GT-101", 11.0)
            sim.set_value("GT-201", 22.0)
            sim.set_slave_delay("bus", "g1", 0.5)
            sim.set_slave_delay("bus", "g2", 0.6)
            devices = cfg.channels[0].devices  # type: ignore[attr-defined]
            driver = driver_of(cfg.channels[0])
            try:
                late = await driver.read(devices[0])
                second = await driver.read(devices[1])
            finally:
                await driver.close()
        return late.errors, second.values, second.errors

    late_errors, values, errors = asyncio.run(main())
    assert late_errors and "no reply within 0.3s" in late_errors[0]
    assert errors == []
    assert values[0] == pytest.approx(22.0)


# --- dead and slow slaves through the pipeline -----------------------------------------------------------


class Recorder:
    """Every batch the pipeline ingests, by device id."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.by_device: dict[str, list[ReadingBatch]] = {}
        self._device_of = {p.index: p.device for p in pipeline.table.points}
        self._ingest = pipeline.ingest
        self.poller = Poller(pipeline.table, self)

    def __call__(self, batch: ReadingBatch) -> None:
        self.by_device.setdefault(self._device_of[batch.indices[0]], []).append(batch)
        self._ingest(batch)

    def count(self, device: str, quality: int) -> int:
        return sum(1 for b in self.by_device.get(device, []) if all(q == quality for q in b.qualities))


async def until(condition: Callable[[], bool], what: str, timeout: float = 20) -> None:
    for _ in range(int(timeout / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {timeout}s")


@pytest.mark.timeout(60)
def test_a_dead_and_a_slow_slave_never_cost_the_others_their_readings(tmp_path: Path) -> None:
    devices = [gas_device(u, interval=0.4, timeout=0.4, backoff_max=0.8) for u in (1, 2, 3, 4, 5)]
    config = site(rtu_channel(*devices))

    async def main() -> tuple[Recorder, int]:
        async with serving(config, tmp_path) as (sim, cfg):
            sim.set_slave_dead("bus", "g2", True)
            sim.set_slave_delay("bus", "g4", 0.25)  # slow, but within its timeout
            with Store(tmp_path / "store.db").open() as store:
                pipeline = Pipeline(cfg, store)
                recorder = Recorder(pipeline)
                task = asyncio.create_task(recorder.poller.run_channel(cfg.channels[0]))
                try:
                    await until(lambda: all(recorder.count(d, GOOD) >= 8 for d in ("g1", "g3", "g4", "g5"))
                                and recorder.count("g2", BAD) >= 4, "eight good polls of every live slave")
                finally:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                heard = sim.requests_heard("bus", "g2")
        return recorder, heard

    recorder, heard = asyncio.run(main())
    for device in ("g1", "g3", "g4", "g5"):
        batches = recorder.by_device[device]
        assert all(q == GOOD for b in batches for q in b.qualities), f"{device} had a bad reading"
    dead = recorder.by_device["g2"]
    assert dead and all(q == BAD for b in dead for q in b.qualities)
    slot = next(s for s in recorder.poller.devices if s.device.id == "g2")
    assert slot.state == "failing" and slot.last_error is not None and "no reply" in slot.last_error
    assert heard >= 2  # the dead slave was asked again (after its back-off), not given up


# --- the adapter pulled and plugged back -----------------------------------------------------------------


@pytest.mark.timeout(60)
def test_readings_resume_after_the_serial_adapter_is_pulled_and_plugged_back(tmp_path: Path) -> None:
    config = site(rtu_channel(gas_device(1, interval=0.2, backoff_max=0.4), parity="E"))

    async def main() -> tuple[Recorder, list[str], bool]:
        async with serving(config, tmp_path) as (sim, cfg):
            sim.set_value("GT-101", 5.0)
            with Store(tmp_path / "store.db").open() as store:
                pipeline = Pipeline(cfg, store)
                recorder = Recorder(pipeline)
                task = asyncio.create_task(recorder.poller.run_channel(cfg.channels[0]))
                try:
                    await until(lambda: recorder.count("g1", GOOD) >= 3, "first readings")
                    sim.unplug("bus")
                    await until(lambda: recorder.count("g1", BAD) >= 3, "bad readings while unplugged")
                    slot = recorder.poller.devices[0]
                    errors = [slot.last_error or ""]
                    link_down = not recorder.poller.drivers["bus"].connected
                    sim.set_value("GT-101", 44.0)
                    await sim.replug("bus")
                    await until(lambda: any(b.values[0] == pytest.approx(44.0)
                                            for b in recorder.by_device["g1"]), "readings after re-plugging")
                finally:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
        return recorder, errors, link_down

    recorder, errors, link_down = asyncio.run(main())
    assert link_down
    assert "serial port" in errors[0], errors
    last = recorder.by_device["g1"][-1]
    assert last.qualities[:2] == [GOOD, GOOD]


# --- RTU over TCP ----------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_rtu_frames_over_tcp_read_every_slave_and_reconnect_after_the_server_restarts(tmp_path: Path) -> None:
    config = site({"id": "nport", "driver": "modbus_rtu_tcp", "host": "127.0.0.1", "port": 4001,
                   "devices": [gas_device(1), gas_device(2), gas_device(3)]})

    async def main() -> tuple[list[list[Any]], list[str], list[str], list[Any]]:
        async with serving(config, tmp_path) as (sim, cfg):
            for unit in (1, 2, 3):
                sim.set_value(f"GT-{unit}01", 10.0 * unit)
            channel = cfg.channels[0]
            devices = channel.devices  # type: ignore[attr-defined]
            driver = driver_of(channel)
            try:
                first = [(await driver.read(d)).values for d in devices]
                sim.inject_fault("nport", "g2", "bad_crc")
                spoiled = (await driver.read(devices[1])).errors
                sim.unplug("nport")
                down = (await driver.read(devices[0])).errors
                await sim.replug("nport")
                after = (await driver.read(devices[2])).values
            finally:
                await driver.close()
        return first, spoiled, down, after

    first, spoiled, down, after = asyncio.run(main())
    assert [v[0] for v in first] == [pytest.approx(10.0), pytest.approx(20.0), pytest.approx(30.0)]
    assert all(v[2] is False for v in first)
    assert spoiled and "CRC error" in spoiled[0]
    assert down and ("lost" in down[0] or "refused" in down[0]), down
    assert after[0] == pytest.approx(30.0)


# --- scenario --------------------------------------------------------------------------------------------


@pytest.mark.timeout(20)
def test_the_gas_leak_passes_both_alarm_levels_on_the_wire_and_clears(tmp_path: Path) -> None:
    config = site(rtu_channel(gas_device(1), gas_device(2)))

    async def main() -> tuple[list[float], float]:
        async with serving(config, tmp_path) as (sim, cfg):
            assert sim.scenarios() == ["gas_leak", "frozen_detector"]
            channel = cfg.channels[0]
            driver = driver_of(channel)
            seen: list[float] = []
            try:
                task = sim.start_scenario("gas_leak", speed=40)
                while not task.done():
                    read = await driver.read(channel.devices[0])  # type: ignore[attr-defined]
                    if read.values[0] is not None:
                        seen.append(read.values[0])
                    await asyncio.sleep(0.02)
                await task
                final = (await driver.read(channel.devices[0])).values[0]  # type: ignore[attr-defined]
            finally:
                await driver.close()
        return seen, final

    seen, final = asyncio.run(main())
    assert max(seen) > 50  # past high_high, read through the driver
    assert any(25 < v < 50 for v in seen)  # the first level on the way
    assert final < 25 - 1


# --- found by tests/test_fuzz_frames.py ------------------------------------------------------------------


def test_the_reply_length_of_a_head_too_short_to_tell_is_unknown_not_an_index_error() -> None:
    assert reply_length(b"") is None  # was IndexError
    assert reply_length(b"\x03") is None  # was IndexError: the byte count is still to come
    assert reply_length(b"\x83") == 2  # an exception reply is known from its first byte
    assert reply_length(b"\x03\x04") == 6

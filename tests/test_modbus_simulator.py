"""The Modbus plant simulator, read back through pymodbus's own client (an implementation independent of both
the simulator's encoder and the agent's driver) and through the agent's driver."""

from __future__ import annotations

import asyncio
import itertools
import signal
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal, TypeVar

import pytest
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusIOException

from agent.config.loader import load_config, parse_config, validate_config_data
from agent.config.models import AgentConfig
from agent.drivers.modbus.codec import ModbusPoint
from agent.drivers.modbus.tcp import ModbusTcpChannel, ModbusTcpDriver
from simulators.modbus import PlantSimulator, normal_band, synthetic_config

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "example.yaml"
T = TypeVar("T")

TYPES = ("int16", "uint16", "int32", "uint32", "float32", "int64", "uint64", "float64")
ORDERS = ("ABCD", "CDAB", "BADC", "DCBA")
WIDTH = {"int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "float32": 2, "int64": 4, "uint64": 4, "float64": 4}
# values whose every byte differs, so a wrong byte or word order cannot read back right
SAMPLES: dict[str, float] = {"int16": -12345, "uint16": 0xABCD, "int32": -123456789, "uint32": 0x89ABCDEF,
                             "float32": -1234.5, "int64": -0x0123456789ABCDEF, "uint64": 0xFEDCBA9876543210,
                             "float64": 98765.4321}
DATATYPE = AsyncModbusTcpClient.DATATYPE


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


@asynccontextmanager
async def modbus_client(port: int, timeout: float = 1.0) -> AsyncIterator[AsyncModbusTcpClient]:
    # reconnect_delay=0: a closed server must stay closed for the client, not be dialled again in the background
    client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=timeout, retries=0, reconnect_delay=0)
    assert await client.connect()
    try:
        yield client
    finally:
        client.close()


def decode(point: ModbusPoint, registers: Sequence[int]) -> float | int:
    """The raw value, decoded by pymodbus (byte swaps done here, since pymodbus only knows word order)."""
    order = point.order
    if WIDTH[point.type] == 1:
        order = "DCBA" if order in ("BADC", "DCBA") else "ABCD"
    if order in ("BADC", "DCBA"):
        registers = [((r & 0xFF) << 8) | (r >> 8) for r in registers]
    word_order: Literal["big", "little"] = "little" if order in ("CDAB", "DCBA") else "big"
    value = AsyncModbusTcpClient.convert_from_registers(registers, getattr(DATATYPE, point.type.upper()), word_order)
    assert isinstance(value, int | float)
    return value


async def read_point(client: AsyncModbusTcpClient, unit: int, point: ModbusPoint) -> float | int | bool:
    """The engineering value of one point as a client reads it."""
    if point.table in ("coil", "discrete"):
        read = client.read_coils if point.table == "coil" else client.read_discrete_inputs
        reply = await read(point.address, count=1, device_id=unit)
        assert not reply.isError(), reply
        return bool(reply.bits[0])
    read = client.read_holding_registers if point.table == "holding" else client.read_input_registers
    reply = await read(point.address, count=point.width(), device_id=unit)
    assert not reply.isError(), reply
    if point.type == "bool":
        return bool(reply.registers[0] >> (point.bit or 0) & 1)
    raw = decode(point, reply.registers)
    return raw if point.scale == 1 and point.offset == 0 else raw * point.scale + point.offset


def every_type_config() -> AgentConfig:
    """One unit with each type in each byte order, scaled points, register bits, coils and discrete inputs."""
    points: list[dict[str, Any]] = []
    address = 0
    for type_, order in itertools.product(TYPES, ORDERS):
        points.append({"id": f"H-{type_}-{order}", "table": "holding", "address": address, "type": type_,
                       "order": order})
        address += WIDTH[type_]
    address = 0
    for type_, order in itertools.product(("int16", "uint16", "int32", "float32"), ORDERS):
        points.append({"id": f"I-{type_}-{order}", "table": "input", "address": address, "type": type_,
                       "order": order, "scale": 0.1, "offset": -50.0, "range": [-50, 150]})
        address += WIDTH[type_]
    points += [
        {"id": "HB-0", "table": "holding", "address": 200, "type": "bool", "bit": 0},
        {"id": "HB-9", "table": "holding", "address": 200, "type": "bool", "bit": 9},
        {"id": "HB-15", "table": "holding", "address": 200, "type": "bool", "bit": 15},
        {"id": "IB-3", "table": "input", "address": 100, "type": "bool", "bit": 3},
    ]
    points += [{"id": f"C-{a}", "table": "coil", "address": a, "type": "bool"} for a in (0, 5, 15, 16, 17, 40)]
    points += [{"id": f"D-{a}", "table": "discrete", "address": a, "type": "bool"} for a in (0, 1, 31, 33)]
    data = {"agent": {"id": "t", "enterprise": "000000000000"},
            "channels": [{"id": "plc", "driver": "modbus_tcp", "host": "127.0.0.1", "port": 502,
                          "devices": [{"id": "d1", "unit": 7, "points": points}]}]}
    return validate_config_data(data, source="<test>", base_dir=None)


def two_unit_config() -> AgentConfig:
    def device(name: str, unit: int) -> dict[str, Any]:
        return {"id": name, "unit": unit, "timeout": 0.3,
                "points": [{"id": f"{name}-level", "address": 0, "type": "float32", "range": [0, 10]}]}

    data = {"agent": {"id": "t", "enterprise": "000000000000"},
            "channels": [
                {"id": "a", "driver": "modbus_tcp", "host": "127.0.0.1", "port": 502,
                 "devices": [device("d1", 1), device("d2", 2)]},
                {"id": "b", "driver": "modbus_tcp", "host": "127.0.0.1", "port": 503, "devices": [device("d3", 1)]},
            ]}
    return validate_config_data(data, source="<test>", base_dir=None)


def points_of(config: AgentConfig) -> list[tuple[int, ModbusPoint]]:
    out = []
    for _channel, device, point in config.points():
        assert isinstance(point, ModbusPoint)
        out.append((getattr(device, "unit"), point))  # noqa: B009
    return out


@pytest.mark.timeout(30)
def test_set_values_read_back_for_every_type_and_byte_order() -> None:
    config = every_type_config()
    expected: dict[str, float | bool] = {}
    for _unit, point in points_of(config):
        if point.type == "bool":
            expected[point.id] = point.id in ("HB-0", "HB-15", "IB-3", "C-5", "C-16", "C-40", "D-1", "D-33")
        elif point.table == "input":
            expected[point.id] = 12.3
        else:
            expected[point.id] = SAMPLES[point.type]

    async def body() -> None:
        async with PlantSimulator(config, ports={"plc": 0}) as sim:
            for point_id, value in expected.items():
                sim.set_value(point_id, value)
            async with modbus_client(sim.ports["plc"]) as client:
                for unit, point in points_of(config):
                    got = await read_point(client, unit, point)
                    want = expected[point.id]
                    if point.type == "float32":
                        assert got == pytest.approx(want, rel=1e-6), point.id
                    elif point.table == "input":
                        assert got == pytest.approx(want, abs=0.051), point.id
                    else:
                        assert got == want, point.id
                    assert sim.value(point.id) == pytest.approx(got, rel=1e-6)

    run(body())


@pytest.mark.timeout(30)
def test_walked_values_read_back_as_the_simulator_reports_them() -> None:
    config = every_type_config()

    async def body() -> None:
        async with PlantSimulator(config, ports={"plc": 0}, period=3600, seed=3) as sim, \
                modbus_client(sim.ports["plc"]) as client:
            for _ in range(3):
                for _ in range(10):
                    sim.walk()
                for unit, point in points_of(config):
                    if point.type != "bool":
                        got = await read_point(client, unit, point)
                        assert got == pytest.approx(sim.value(point.id), rel=1e-6, abs=1e-9), point.id

    run(body())


@pytest.mark.timeout(30)
def test_walk_stays_inside_the_normal_band_so_nothing_alarms() -> None:
    config = load_config(EXAMPLE)
    sim = PlantSimulator(config, ports={c.id: 0 for c in config.channels}, seed=11)
    seen: dict[str, set[float]] = {}
    for _ in range(3000):
        sim.walk()
        for _unit, point in points_of(config):
            if point.type == "bool":
                assert sim.value(point.id) is False
                continue
            value = float(sim.value(point.id))
            seen.setdefault(point.id, set()).add(value)
            low, high = normal_band(point)
            quantum = abs(point.scale) if point.type not in ("float32", "float64") else 1e-6
            assert low - quantum <= value <= high + quantum, (point.id, value)
            if point.range is not None:
                assert point.range[0] <= value <= point.range[1]
            limits = point.limits
            if limits is not None:
                if limits.high is not None:
                    assert value < limits.high - limits.deadband, (point.id, value)
                if limits.low is not None:
                    assert value > limits.low + limits.deadband, (point.id, value)
    assert all(len(values) > 5 for values in seen.values()), "every analog point must move"


@pytest.mark.timeout(30)
def test_set_value_holds_until_release() -> None:
    config = load_config(EXAMPLE)
    sim = PlantSimulator(config, seed=5)
    sim.set_value("LT-101", 7.25)
    for _ in range(20):
        sim.walk()
    assert sim.value("LT-101") == 7.25 and sim.held("LT-101")
    assert sim.changes[-1][1:] == ("LT-101", 7.25)
    sim.release("LT-101")
    sim.walk()
    assert not sim.held("LT-101")
    assert 7.0 < float(sim.value("LT-101")) < 7.25, "the walk resumes from the held value, not with a jump"
    with pytest.raises(ValueError, match="outside uint16"):
        sim.set_value("GT-201", -5)
    with pytest.raises(ValueError, match="no point"):
        sim.set_value("NOPE", 1)


@pytest.mark.timeout(30)
def test_agent_driver_reads_the_example_plant() -> None:
    config = load_config(EXAMPLE)

    async def body() -> None:
        async with PlantSimulator(config, ports={c.id: 0 for c in config.channels}) as sim:
            sim.set_value("XV-101", True)
            sim.set_value("GT-202-F", True)
            sim.set_value("FT-101", 1234.56)
            for channel in config.channels:
                assert isinstance(channel, ModbusTcpChannel)
                driver = ModbusTcpDriver(channel.model_copy(update={"port": sim.ports[channel.id]}))
                try:
                    for device in channel.devices:
                        reading = await driver.read(device)
                        assert reading.errors == []
                        for point, raw in zip(device.points, reading.values, strict=True):
                            value = raw if point.type == "bool" else raw * point.scale + point.offset
                            assert value == pytest.approx(sim.value(point.id), rel=1e-6), point.id
                finally:
                    await driver.close()

    run(body())


@pytest.mark.timeout(30)
def test_writes_are_refused() -> None:
    config = every_type_config()

    async def body() -> None:
        async with PlantSimulator(config, ports={"plc": 0}) as sim:
            sim.set_value("H-uint16-ABCD", 77)
            async with modbus_client(sim.ports["plc"]) as client:
                reply = await client.write_register(4, 5, device_id=7)  # H-uint16-ABCD
                assert reply.isError() and reply.exception_code == 1
                reply = await client.write_coil(0, True, device_id=7)
                assert reply.isError() and reply.exception_code == 1
                reply = await client.read_holding_registers(4, count=1, device_id=7)
                assert reply.registers == [77]

    run(body())


@pytest.mark.timeout(30)
def test_dead_unit_times_out_while_another_unit_on_the_server_answers() -> None:
    config = two_unit_config()

    async def body() -> None:
        async with PlantSimulator(config, ports={"a": 0, "b": 0}) as sim:
            sim.set_value("d1-level", 1.5)
            sim.set_value("d2-level", 2.5)
            sim.set_device_dead("a", "d2", True)
            async with modbus_client(sim.ports["a"], timeout=0.3) as client:
                with pytest.raises(ModbusIOException):
                    await client.read_holding_registers(0, count=2, device_id=2)
                with pytest.raises(ModbusIOException):
                    await client.read_holding_registers(0, count=2, device_id=9)  # no such unit: silence too
                reply = await client.read_holding_registers(0, count=2, device_id=1)
                assert decode(points_of(config)[0][1], reply.registers) == 1.5
            channel = config.channels[0]
            assert isinstance(channel, ModbusTcpChannel)
            driver = ModbusTcpDriver(channel.model_copy(update={"port": sim.ports["a"]}))
            try:
                dead = await driver.read(channel.devices[1])
                assert dead.values == [None] and "no reply" in dead.errors[0]
                alive = await driver.read(channel.devices[0])
                assert alive.errors == [] and alive.values == [1.5]
                sim.set_device_dead("a", "d2", False)
                assert (await driver.read(channel.devices[1])).values == [2.5]
            finally:
                await driver.close()

    run(body())


@pytest.mark.timeout(30)
def test_channel_down_refuses_connections_and_comes_back_on_the_same_port() -> None:
    config = two_unit_config()

    async def body() -> None:
        async with PlantSimulator(config, ports={"a": 0, "b": 0}) as sim:
            sim.set_value("d1-level", 4.0)
            port = sim.ports["a"]
            async with modbus_client(port) as client:
                assert not (await client.read_holding_registers(0, count=2, device_id=1)).isError()
                await sim.set_channel_down("a", True)
                for _ in range(100):  # the server closed the open connection
                    if not client.connected:
                        break
                    await asyncio.sleep(0.02)
                assert not client.connected
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection("127.0.0.1", port)
            async with modbus_client(sim.ports["b"]) as other:
                assert not (await other.read_holding_registers(0, count=2, device_id=1)).isError()
            await sim.set_channel_down("a", False)
            assert sim.ports["a"] == port
            async with modbus_client(port) as client:
                reply = await client.read_holding_registers(0, count=2, device_id=1)
                assert decode(points_of(config)[0][1], reply.registers) == 4.0

    run(body())


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("scenario", "point_id"), [("gas_leak", "GT-201"), ("tank_overfill", "LT-101")])
def test_scenario_passes_high_then_high_high_and_ends_below_high(scenario: str, point_id: str) -> None:
    config = load_config(EXAMPLE)
    point = next(p for _u, p in points_of(config) if p.id == point_id)
    limits = point.limits
    assert limits is not None and limits.high is not None and limits.high_high is not None
    high, high_high = limits.high, limits.high_high
    unit = 1

    async def body() -> None:
        async with PlantSimulator(config, ports={c.id: 0 for c in config.channels}, speed=40, period=0.05) as sim:
            assert scenario in sim.scenarios()
            channel = next(c.id for c, _d, p in config.points() if p.id == point_id)
            seen: list[float] = []
            async with modbus_client(sim.ports[channel]) as client:
                task = asyncio.create_task(sim.run_scenario(scenario))
                while not task.done():
                    seen.append(float(await read_point(client, unit, point)))
                    await asyncio.sleep(0.02)
                await task
                final = float(await read_point(client, unit, point))
            values = [v for _t, p, v in sim.changes if p == point_id]
            assert isinstance(values[0], float)
            first_high = next(i for i, v in enumerate(values) if float(v) >= high)
            first_high_high = next(i for i, v in enumerate(values) if float(v) >= high_high)
            assert first_high < first_high_high
            assert any(high <= float(v) < high_high for v in values[first_high:first_high_high])
            assert float(values[-1]) < high - limits.deadband
            assert not sim.held(point_id), "the scenario releases its point"
            assert final < high - limits.deadband
            # a client polling the server saw both levels too
            assert any(high <= v < high_high for v in seen) and max(seen) >= high_high
            assert [t for t, _p, _v in sim.changes] == sorted(t for t, _p, _v in sim.changes)
            with pytest.raises(ValueError, match="no scenario"):
                await sim.run_scenario("earthquake")

    run(body())


@pytest.mark.timeout(60)
def test_synthetic_config_validates_and_serves_10000_points() -> None:
    config = synthetic_config(10000, interval=1.0, port=5020)
    assert (config.agent.id, config.agent.enterprise) == ("bench", "000000000000")
    channel = config.channels[0]
    assert isinstance(channel, ModbusTcpChannel)
    assert [d.unit for d in channel.devices] == list(range(1, 11))
    points = points_of(config)
    assert len(points) == 10000 and points[0][1].id == "P00000" and points[-1][1].id == "P09999"
    assert all(p.type == "float32" and p.table == "holding" and p.range == (0, 100) for _u, p in points)
    assert all(p.limits is not None and (p.limits.high, p.limits.high_high) == (90, 95) for _u, p in points)
    spread = [c for c in synthetic_config(250, interval=0.5, port=6000, per_device=100, channels=2).channels
              if isinstance(c, ModbusTcpChannel)]
    assert [c.port for c in spread] == [6000, 6001]
    assert sorted(d.unit for c in spread for d in c.devices) == [1, 2, 3]
    assert sum(len(d.points) for c in spread for d in c.devices) == 250

    async def body() -> None:
        async with PlantSimulator(config, ports={"bench": 0}, seed=1) as sim, \
                modbus_client(sim.ports["bench"]) as client:
            for device in channel.devices:
                registers: list[int] = []
                for start in range(0, 2000, 125):
                    reply = await client.read_holding_registers(start, count=125, device_id=device.unit)
                    assert not reply.isError(), reply
                    registers += reply.registers
                values = struct.unpack(">1000f", struct.pack(">2000H", *registers))
                for point, value in zip(device.points, values, strict=True):
                    assert 0 <= value < 90
                    assert value == pytest.approx(sim.value(point.id), rel=1e-6)

    run(body())


@pytest.mark.timeout(60)
def test_command_line_serves_and_prints_its_config() -> None:
    printed = subprocess.run(
        [sys.executable, "-m", "simulators.modbus", "--synthetic", "1500", "--per-device", "500", "--port", "5100",
         "--print-config"],
        cwd=ROOT, capture_output=True, text=True, timeout=30, check=True,
    ).stdout
    config = parse_config(printed)
    assert config == synthetic_config(1500, interval=1.0, port=5100, per_device=500)

    proc = subprocess.Popen(
        [sys.executable, "-m", "simulators.modbus", "--synthetic", "1500", "--per-device", "500", "--port", "0"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        assert line[:2] == ["listening", "bench"], line
        port = int(line[2].rsplit(":", 1)[1])

        async def read() -> list[int]:
            async with modbus_client(port) as client:
                reply = await client.read_holding_registers(0, count=2, device_id=3)
                assert not reply.isError()
                return list(reply.registers)

        assert len(run(read())) == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()

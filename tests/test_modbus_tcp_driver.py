"""The Modbus TCP driver against the plant simulator (pymodbus's server, an independent implementation):
every type and byte order decodes right, and block merging puts exactly the planned requests on the wire.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import pytest

from agent.config.loader import validate_config_data
from agent.config.models import AgentConfig
from agent.config.points import PointTable
from agent.drivers.modbus.codec import plan_blocks
from agent.drivers.modbus.tcp import ModbusTcpDriver
from agent.pipeline.decode import GOOD, UNCERTAIN, decode
from simulators.modbus import PlantSimulator

ORDERS = ("ABCD", "CDAB", "BADC", "DCBA")
SAMPLES: dict[str, Any] = {
    "int16": -12345, "uint16": 54321, "int32": -123456789, "uint32": 3_000_000_123,
    "float32": -1234.5, "int64": -1_234_567_890_123_456, "uint64": 12_345_678_901_234_567_890,
    "float64": 98765.4321,
}
WIDTH = {"int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "float32": 2, "int64": 4, "uint64": 4, "float64": 4}


def site(points: list[dict[str, Any]], **device: Any) -> AgentConfig:
    return validate_config_data({
        "agent": {"id": "t", "enterprise": "e"},
        "channels": [{"id": "c1", "driver": "modbus_tcp", "host": "127.0.0.1", "port": 502,
                      "devices": [{"id": "d1", "unit": 3, "timeout": 1, "points": points, **device}]}],
    }, source="test", base_dir=None)


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
    points.append({"id": "over", "table": "input", "address": 1, "type": "uint16", "range": [0, 100]})
    expected["over"] = 250
    return points, expected


async def read_once(config: AgentConfig, values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, int]]:
    async with PlantSimulator(config, ports={"c1": 0}) as sim:
        for pid, value in values.items():
            sim.set_value(pid, value)
        channel = config.channels[0].model_copy(update={"port": sim.ports["c1"]})
        driver = ModbusTcpDriver(channel)  # type: ignore[arg-type]
        try:
            device = channel.devices[0]  # type: ignore[attr-defined]
            read = await driver.read(device)
        finally:
            await driver.close()
    assert read.errors == []
    table = PointTable(config)
    batch = decode(table.points, table.devices[0].indices, read, 0)
    names = [table.points[i].id for i in batch.indices]
    return dict(zip(names, batch.values, strict=True)), dict(zip(names, batch.qualities, strict=True))


@pytest.mark.timeout(30)
def test_every_type_and_byte_order_decodes_right() -> None:
    points, expected = every_type_and_order()
    got, quality = asyncio.run(read_once(site(points), expected))
    for pid, value in expected.items():
        if pid.startswith("float32"):
            assert got[pid] == pytest.approx(value, rel=1e-7), pid
        elif pid == "scaled":
            assert got[pid] == pytest.approx(value, abs=1e-9)
        else:
            assert got[pid] == value and type(got[pid]) is type(value), pid
    assert quality["over"] == UNCERTAIN
    assert quality["scaled"] == GOOD


@pytest.mark.timeout(30)
def test_byte_orders_put_the_bytes_where_the_standard_orders_say() -> None:
    # 0x3F800000 is 1.0f: ABCD on the wire is 3F 80 00 00; CDAB 00 00 3F 80; BADC 80 3F 00 00; DCBA 00 00 80 3F
    wire = {"ABCD": "3f800000", "CDAB": "00003f80", "BADC": "803f0000", "DCBA": "0000803f"}
    points = [{"id": o, "address": 2 * i, "type": "float32", "order": o} for i, o in enumerate(ORDERS)]
    config = site(points)

    async def raw_registers() -> dict[str, str]:
        async with PlantSimulator(config, ports={"c1": 0}) as sim:
            for order in ORDERS:
                sim.set_value(order, 1.0)
            reader, writer = await asyncio.open_connection("127.0.0.1", sim.ports["c1"])
            writer.write(struct.pack(">HHHBBHH", 1, 0, 6, 3, 3, 0, 8))
            head = await reader.readexactly(9)
            data = await reader.readexactly(head[8])
            writer.close()
        return {o: data[4 * i : 4 * i + 4].hex() for i, o in enumerate(ORDERS)}

    assert asyncio.run(raw_registers()) == wire


async def proxy(target_port: int, seen: list[tuple[int, int, int]]) -> asyncio.Server:
    """A TCP relay that records (function, start, count) of every request passing through."""

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, record: bool) -> None:
        try:
            while True:
                head = await reader.readexactly(7)
                body = await reader.readexactly(struct.unpack(">H", head[4:6])[0] - 1)
                if record:
                    seen.append(struct.unpack(">BHH", body[:5]))
                writer.write(head + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(relay(client_r, server_w, True), relay(server_r, client_w, False))

    return await asyncio.start_server(handle, "127.0.0.1", 0)


@pytest.mark.timeout(30)
def test_block_merging_issues_the_planned_requests_and_no_more() -> None:
    points = (
        [{"id": f"h{i}", "address": 100 + 2 * i, "type": "float32"} for i in range(70)]  # 140 registers: 2 requests
        + [{"id": "far", "address": 400}]  # beyond max_gap: its own request
        + [{"id": f"i{i}", "table": "input", "address": i * 3} for i in range(5)]  # gaps of 2: one request
        + [{"id": f"c{i}", "table": "coil", "address": i} for i in range(0, 40, 4)]
        + [{"id": f"d{i}", "table": "discrete", "address": 7, "type": "bool"} for i in range(1)]
    )
    for p in points:
        if p.get("table") in ("coil", "discrete"):
            p["type"] = "bool"
    config = site(points, max_gap=8)
    device = config.channels[0].devices[0]  # type: ignore[attr-defined]
    planned = [(b.function, b.start, b.count) for b in plan_blocks(device)]
    assert planned == [(3, 100, 124), (3, 224, 16), (3, 400, 1), (4, 0, 13), (1, 0, 37), (2, 7, 1)]

    async def poll() -> list[tuple[int, int, int]]:
        seen: list[tuple[int, int, int]] = []
        async with PlantSimulator(config, ports={"c1": 0}) as sim:
            relay = await proxy(sim.ports["c1"], seen)
            channel = config.channels[0].model_copy(update={"port": relay.sockets[0].getsockname()[1]})
            driver = ModbusTcpDriver(channel)  # type: ignore[arg-type]
            read = await driver.read(device)
            await driver.close()
            relay.close()
            assert read.errors == [] and None not in read.values
        return seen

    assert asyncio.run(poll()) == planned


@pytest.mark.timeout(30)
def test_a_device_is_planned_at_its_first_read_not_at_the_channels_start() -> None:
    # a start of many channels polls its first device before every other device is planned (a 1,000-point device
    # is about 3 ms of planning; 100 of them held the first poll 0.4 s)
    config = validate_config_data({
        "agent": {"id": "t", "enterprise": "e"},
        "channels": [{"id": "c1", "driver": "modbus_tcp", "host": "127.0.0.1", "port": 502, "devices": [
            {"id": f"d{n}", "unit": n, "timeout": 1, "points": [{"id": f"p{n}-{i}", "address": i} for i in range(3)]}
            for n in (1, 2)]}],
    }, source="test", base_dir=None)
    channel = config.channels[0]
    first, second = channel.devices  # type: ignore[attr-defined]

    async def poll() -> tuple[list[str], list[str], list[Any]]:
        async with PlantSimulator(config, ports={"c1": 0}) as sim:
            driver = ModbusTcpDriver(channel.model_copy(update={"port": sim.ports["c1"]}))  # type: ignore[arg-type]
            before = list(driver._plans)
            read = await driver.read(first)
            await driver.close()
            return before, list(driver._plans), read.values

    before, after, values = asyncio.run(poll())
    assert before == [] and after == [first.id]
    assert None not in values and len(values) == 3
    assert [(b.function, b.start, b.count) for b in plan_blocks(second)] == [(3, 0, 3)]

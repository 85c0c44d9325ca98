"""Fuzz the decoders of device bytes: Modbus PDUs, blocks and register codecs, the DL/T 645 frame splitter, address,
DI and value codecs, and the readers reached only through I/O (the Modbus TCP MBAP reader on a real socket, the RTU
receive loop and the DL/T 645 bus on a pseudo-terminal), each driven by a scripted peer that sends the fuzzed bytes.

A decoder fed any bytes returns a well-formed result or raises its module's own error (a ProtocolError for frames),
never IndexError, struct.error, a hang or a read sized by an untrusted length; every encoder round-trips. Example
counts come from the hypothesis profiles in tests/conftest.py (a long run: EDGE_FUZZ=long pytest this file).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import struct
import tty
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.core import DeviceRead
from agent.drivers.dlt645 import codec as dlt
from agent.drivers.modbus import codec as mb
from agent.drivers.modbus.rtu import (
    ModbusRtuChannel,
    ModbusRtuDriver,
    crc16,
    frame,
    reply_data_length,
)
from agent.drivers.modbus.tcp import ModbusTcpChannel, ModbusTcpDriver
from agent.errors import DriverError, ProtocolError
from simulators import dlt645 as sim_dlt
from simulators import modbus_rtu as sim_rtu

ORDERS = ("ABCD", "CDAB", "BADC", "DCBA")
INT_RANGE = {"int16": (-(2**15), 2**15 - 1), "uint16": (0, 2**16 - 1), "int32": (-(2**31), 2**31 - 1),
             "uint32": (0, 2**32 - 1), "int64": (-(2**63), 2**63 - 1), "uint64": (0, 2**64 - 1)}
FLOATS = ("float32", "float64")
UNIT = 7
IO = settings(suppress_health_check=[HealthCheck.too_slow])


def same(a: Any, b: Any) -> bool:
    """Equal, with NaN equal to NaN and -0.0 apart from 0.0 (a codec must keep the sign bit)."""
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    return type(a) is type(b) and a == b


# --- Modbus: points, PDUs and blocks -------------------------------------------------------------------------


@st.composite
def register_points(draw: st.DrawFn, max_address: int = 200) -> dict[str, Any]:
    table = draw(st.sampled_from(["holding", "input", "coil", "discrete"]))
    if table in mb.BIT_TABLES:
        return {"table": table, "type": "bool", "address": draw(st.integers(0, max_address))}
    dtype = draw(st.sampled_from(list(mb.REGISTERS)))
    point: dict[str, Any] = {"table": table, "type": dtype, "address": draw(st.integers(0, max_address)),
                             "order": draw(st.sampled_from(ORDERS))}
    if dtype == "bool":
        point["bit"] = draw(st.integers(0, 15))
    return point


@st.composite
def devices(draw: st.DrawFn) -> mb.ModbusDevice:
    points = draw(st.lists(register_points(), min_size=1, max_size=12))
    return mb.ModbusDevice.model_validate({
        "id": "d", "max_registers": draw(st.integers(1, 125)), "max_bits": draw(st.integers(1, 2000)),
        "max_gap": draw(st.integers(0, 124)),
        "points": [{"id": f"p{i}", **p} for i, p in enumerate(points)],
    })


def data_size(function: int, count: int) -> int:
    return (count + 7) // 8 if function in (1, 2) else 2 * count


@st.composite
def reply_pdus(draw: st.DrawFn, function: int, count: int) -> bytes:
    """Reply PDUs to (function, count): right, nearly right and plain wrong."""
    size = data_size(function, count)
    kind = draw(st.sampled_from(["good", "exception", "count", "function", "short", "random"]))
    if kind == "good":
        return bytes([function, size & 0xFF]) + draw(st.binary(min_size=size, max_size=size))
    if kind == "exception":  # 2: a gap refused (the block is read again without gaps); 5, 6: busy, asked again
        return bytes([function | 0x80]) + draw(st.one_of(st.sampled_from([b"\x02", b"\x05", b"\x06"]),
                                                         st.binary(max_size=3)))
    if kind == "count":
        return bytes([function, draw(st.integers(0, 255))]) + draw(st.binary(max_size=260))
    if kind == "function":
        return bytes([draw(st.integers(0, 255))]) + draw(st.binary(max_size=260))
    if kind == "short":
        return bytes([function, size & 0xFF]) + draw(st.binary(max_size=max(size - 1, 0)))
    return draw(st.binary(max_size=300))


@st.composite
def requests_and_replies(draw: st.DrawFn) -> tuple[int, int, bytes]:
    function = draw(st.integers(1, 4))
    count = draw(st.integers(1, 2000 if function in (1, 2) else 125))
    return function, count, draw(reply_pdus(function, count))


@given(requests_and_replies())
def test_any_read_reply_pdu_is_data_of_the_asked_size_or_a_modbus_error(case: tuple[int, int, bytes]) -> None:
    function, count, pdu = case
    try:
        data = mb.parse_read_reply(pdu, function, count)
    except mb.ModbusError as exc:
        assert pdu == bytes([function | 0x80, exc.code])
        return
    except mb.FrameError:
        return
    assert len(data) == data_size(function, count) and pdu == bytes([function, len(data)]) + data


@given(st.binary(max_size=3), requests_and_replies())
def test_reply_length_of_any_head_is_a_bounded_length_or_unknown(head: bytes, case: tuple[int, int, bytes]) -> None:
    length = mb.reply_length(head)
    assert length is None or 2 <= length <= 257
    if len(head) >= 2:
        assert length is not None
    function, count, pdu = case
    with contextlib.suppress(mb.ModbusError, mb.FrameError):
        mb.parse_read_reply(pdu, function, count)
        assert mb.reply_length(pdu[:2]) == len(pdu)  # a reply that parses is exactly as long as its head says
    if len(pdu) == 2 and pdu[0] & 0x80:
        assert mb.reply_length(pdu[:1]) == 2  # an exception reply is known from its first byte


def value_fits(point: mb.ModbusPoint, value: Any) -> bool:
    if point.type == "bool":
        return isinstance(value, bool)
    if point.type in FLOATS:
        return isinstance(value, float)
    low, high = INT_RANGE[point.type]
    return type(value) is int and low <= value <= high


@given(devices(), st.data())
def test_decode_block_of_any_bytes_fills_every_member_or_raises_a_frame_error(
    device: mb.ModbusDevice, data: st.DataObject
) -> None:
    for block in mb.plan_blocks(device):
        size = data_size(block.function, block.count)
        raw = data.draw(st.one_of(st.binary(min_size=size, max_size=size), st.binary(max_size=2 * size + 2)))
        values: list[Any] = [None] * len(device.points)
        try:
            mb.decode_block(block, raw, values)
        except mb.FrameError:
            assert len(raw) != size, "data of the block's own size always decodes"
            assert values == [None] * len(device.points), "a refused block writes no value"
            continue
        assert len(raw) == size, f"{len(raw)} bytes decoded for a block of {size}"
        for index in block.points():
            assert value_fits(device.points[index], values[index]), (device.points[index], values[index])


@given(st.integers(1, 2000), st.binary(max_size=260))
def test_bits_of_any_bytes_are_the_asked_bits_or_a_frame_error(count: int, raw: bytes) -> None:
    try:
        bits = mb.bits_of(raw, count)
    except mb.FrameError:
        assert len(raw) < (count + 7) // 8
        return
    assert len(bits) == count and all(b is bool(raw[i // 8] >> (i % 8) & 1) for i, b in enumerate(bits))


@st.composite
def typed_values(draw: st.DrawFn) -> tuple[mb.ModbusPoint, float | int]:
    dtype = draw(st.sampled_from([t for t in mb.REGISTERS if t != "bool"]))
    point = mb.ModbusPoint.model_validate({"id": "p", "address": 0, "type": dtype,
                                           "order": draw(st.sampled_from(ORDERS))})
    value: float | int
    if dtype in FLOATS:
        value = draw(st.floats(width=32 if dtype == "float32" else 64))
    else:
        value = draw(st.integers(*INT_RANGE[dtype]))
    return point, value


@given(typed_values(), st.integers(0, 8), st.binary(max_size=8))
def test_every_type_and_byte_order_round_trips_through_encode_and_decode(
    case: tuple[mb.ModbusPoint, float | int], lead: int, tail: bytes
) -> None:
    point, value = case
    registers = mb.encode(point, value)
    assert len(registers) == mb.REGISTERS[point.type] and all(0 <= r <= 0xFFFF for r in registers)
    wire = bytes(lead * 2) + b"".join(r.to_bytes(2, "big") for r in registers) + tail
    assert same(mb.decoder(point)(wire, lead * 2), value)
    # the order names where each byte of the big-endian value goes on the wire
    big = struct.pack(">" + mb._STRUCT_CHAR[point.type], value)
    order = point.order if len(big) > 2 else ("DCBA" if point.order in ("BADC", "DCBA") else "ABCD")
    words = [big[i : i + 2] for i in range(0, len(big), 2)]
    expected = {"ABCD": big, "DCBA": big[::-1], "CDAB": b"".join(reversed(words)),
                "BADC": b"".join(w[::-1] for w in words)}[order]
    assert wire[lead * 2 : lead * 2 + len(big)] == expected


@given(st.sampled_from([t for t in mb.REGISTERS if t != "bool"]), st.sampled_from(ORDERS), st.data())
def test_any_register_bytes_decode_to_a_value_that_encodes_back_to_them(
    dtype: str, order: str, data: st.DataObject
) -> None:
    point = mb.ModbusPoint.model_validate({"id": "p", "address": 0, "type": dtype, "order": order})
    raw = data.draw(st.binary(min_size=2 * point.width(), max_size=2 * point.width()))
    value = mb.decoder(point)(raw, 0)
    assert value_fits(point, value)
    if not (isinstance(value, float) and math.isnan(value)):  # NaN payloads are many; any one is NaN
        assert b"".join(r.to_bytes(2, "big") for r in mb.encode(point, value)) == raw


@given(st.integers(0, 15), st.binary(min_size=2, max_size=2))
def test_a_bool_point_reads_its_bit_of_the_register(bit: int, raw: bytes) -> None:
    point = mb.ModbusPoint.model_validate({"id": "p", "address": 0, "type": "bool", "bit": bit})
    assert mb.decoder(point)(raw, 0) is bool(int.from_bytes(raw, "big") >> bit & 1)


# --- Modbus RTU: CRC and lengths -------------------------------------------------------------------------------


@given(st.integers(0, 255), st.binary(max_size=253), st.data())
def test_the_crc_of_a_frame_is_the_specs_and_catches_every_single_bit_error(
    address: int, pdu: bytes, data: st.DataObject
) -> None:
    body = bytes([address]) + pdu
    assert crc16(body) == sim_rtu.crc16(body)  # the simulator's bit-by-bit CRC, written apart
    whole = frame(address, pdu)
    assert crc16(whole) == 0  # CRC-16/MODBUS appended low byte first leaves no remainder
    bit = data.draw(st.integers(0, 8 * len(whole) - 1))
    spoiled = bytearray(whole)
    spoiled[bit // 8] ^= 1 << (bit % 8)
    assert crc16(bytes(spoiled)) != 0


@given(st.one_of(st.binary(max_size=8), st.builds(mb.read_request, st.integers(0, 255), st.integers(0, 0xFFFF),
                                                  st.integers(0, 0xFFFF))))
def test_reply_data_length_knows_every_read_request_and_refuses_the_rest(pdu: bytes) -> None:
    try:
        size = reply_data_length(pdu)
    except ValueError:  # our own request, never device bytes: a programming error
        assert len(pdu) != 5 or pdu[0] not in (1, 2, 3, 4)
        return
    assert size == data_size(pdu[0], int.from_bytes(pdu[3:5], "big"))


# --- Modbus over the wire: a scripted peer sends the fuzzed bytes ---------------------------------------------

WIRE_POINTS = [
    {"id": "f32", "address": 0, "type": "float32"},
    {"id": "i16", "address": 2, "type": "int16", "order": "BADC"},
    {"id": "u32", "address": 3, "type": "uint32", "order": "CDAB"},
    {"id": "bit", "address": 5, "type": "bool", "bit": 15},
    {"id": "f64", "address": 6, "type": "float64", "order": "DCBA"},
    {"id": "c0", "table": "coil", "address": 0, "type": "bool"},
    {"id": "c9", "table": "coil", "address": 9, "type": "bool"},
]
# (function, count) of the requests the device above makes, in order: its two blocks, and after an exception 2
# to the coils (which bridge a gap) the registers again and the first coil alone
WIRE_BLOCKS = [(3, 10), (1, 10), (3, 10), (1, 1)]
TIMEOUT = 0.01  # a scripted peer answers at once; only bytes that never come wait this long
HANG = 10.0  # far beyond any timeout and settle of one poll: a read that takes this long hangs


def wire_device(retries: int, timeout: float) -> dict[str, Any]:
    return {"id": "d", "unit": UNIT, "timeout": timeout, "retries": retries, "points": WIRE_POINTS}


class Recorded:
    """Every block of data the driver took from the wire, and its plan of the device after the poll."""

    def __init__(self) -> None:
        self.taken: list[tuple[int, bytes]] = []
        self.plan: list[mb.Block] = []


def check_poll(read: DeviceRead, device: mb.ModbusDevice, recorded: Recorded,
               came_from_wire: Callable[[int, bytes], bool]) -> None:
    """A poll's result is well-formed, and every value it holds was decoded from a reply that was on the wire."""
    assert len(read.values) == len(device.points) and all(isinstance(e, str) for e in read.errors)
    for point, value in zip(device.points, read.values, strict=True):
        assert value is None or value_fits(point, value), (point.id, value)
    for function, data in recorded.taken:
        assert came_from_wire(function, data), f"data {data.hex(' ')} was never sent as a reply"
    for block in recorded.plan:
        got = [read.values[i] for i in block.points()]
        assert all(v is None for v in got) or all(v is not None for v in got), "a block is read whole or not at all"
    if not read.errors:
        assert all(v is not None for v in read.values)


@st.composite
def mbap_scripts(draw: st.DrawFn, function: int, count: int) -> list[tuple[int | None, int, int, int | str, bytes]]:
    """What the server sends for one request: MBAP frames as (tid offset, unit, protocol, length, PDU) with the
    length field relative to the PDU's (an int) or as given (a str of hex); tid offset None for raw bytes."""
    piece = st.one_of(
        st.tuples(st.sampled_from([0, 0, 0, 1, -1, 0x8000]), st.sampled_from([UNIT, UNIT, UNIT, 0, 255]),
                  st.sampled_from([0, 0, 0, 1, 0xFFFF]),
                  st.one_of(st.sampled_from([0, 0, 0, -1, 1, -2, 200]), st.sampled_from([0, 1, 255, 0xFFFF]).map(hex)),
                  reply_pdus(function, count)),
        st.tuples(st.none(), st.just(0), st.just(0), st.just(0), st.binary(max_size=40)),
    )
    return draw(st.lists(piece, max_size=3))


def render_mbap(script: list[tuple[int | None, int, int, int | str, bytes]], tid: int) -> bytes:
    out = b""
    for tid_offset, unit, proto, length_offset, pdu in script:
        if tid_offset is None:
            out += pdu
        else:
            relative = not isinstance(length_offset, str)
            length = (len(pdu) + 1 + int(length_offset)) & 0xFFFF if relative else int(length_offset, 16)
            out += struct.pack(">HHHB", (tid + tid_offset) & 0xFFFF, proto, length, unit) + pdu
    return out


async def tcp_poll(scripts: list[list[Any]], retries: int, hold: bool, timeout: float = TIMEOUT) -> tuple[
        DeviceRead, mb.ModbusDevice, Recorded, bytes]:
    """Poll the device once against a server that answers request i with `scripts[i]` and then closes the
    connection (or with `hold`, keeps it open in silence); returns what the driver took and all bytes sent."""
    sent = bytearray()
    asked = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal asked
        try:
            while True:
                head = await reader.readexactly(7)
                tid, _, length, _ = struct.unpack(">HHHB", head)
                await reader.readexactly(length - 1)
                script = scripts[asked] if asked < len(scripts) else []
                asked += 1
                out = render_mbap(script, tid)
                sent.extend(out)
                writer.write(out)
                await writer.drain()
                if not hold:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    channel = ModbusTcpChannel.model_validate({"id": "c", "driver": "modbus_tcp", "host": "127.0.0.1",
                                               "port": port, "devices": [wire_device(retries, timeout)]})
    recorded = Recorded()

    class Driver(ModbusTcpDriver):
        async def read_block(self, device: mb.ModbusDevice, block: mb.Block) -> bytes:
            data = await super().read_block(device, block)
            recorded.taken.append((block.function, data))
            return data

    driver = Driver(channel)
    try:
        read = await asyncio.wait_for(driver.read(channel.devices[0]), HANG)
    finally:
        await driver.close()
        server.close()
    recorded.plan = driver._plans["d"]
    return read, channel.devices[0], recorded, bytes(sent)


@IO
@given(st.tuples(*(mbap_scripts(f, c) for f, c in WIRE_BLOCKS)).map(list), st.integers(0, 1),
       st.sampled_from([False, False, False, True]))
def test_any_bytes_from_a_modbus_tcp_server_cost_the_poll_at_most_never_the_driver(
    scripts: list[list[Any]], retries: int, hold: bool
) -> None:
    read, device, recorded, sent = asyncio.run(tcp_poll(scripts, retries, hold))

    def on_wire(function: int, data: bytes) -> bool:
        pdu = bytes([function, len(data)]) + data
        return struct.pack(">HHB", 0, len(pdu) + 1, UNIT) + pdu in sent  # after any transaction id

    check_poll(read, device, recorded, on_wire)


@IO
@given(st.data())
def test_a_good_tcp_reply_with_any_register_contents_reads_back_what_was_sent(data: st.DataObject) -> None:
    blocks = WIRE_BLOCKS[:2]
    contents = [data.draw(st.binary(min_size=data_size(f, c), max_size=data_size(f, c))) for f, c in blocks]
    scripts = [[(0, UNIT, 0, 0, bytes([f, len(d)]) + d)] for (f, _), d in zip(blocks, contents, strict=True)]
    read, device, recorded, _ = asyncio.run(tcp_poll(scripts, 0, True, timeout=1.0))
    assert read.errors == [] and [d for _, d in recorded.taken] == contents
    expected: list[Any] = [None] * len(device.points)
    for block, raw in zip(mb.plan_blocks(device), contents, strict=True):
        mb.decode_block(block, raw, expected)
    assert all(same(a, b) for a, b in zip(read.values, expected, strict=True))


@st.composite
def rtu_scripts(draw: st.DrawFn, function: int, count: int) -> bytes:
    """What the serial line carries after one request: frames of our slave and others, spoiled or whole, noise."""
    size = data_size(function, count)
    pieces = []
    for _ in range(draw(st.integers(1, 3))):  # silence costs a timeout and proves little: one test has it
        kind = draw(st.sampled_from(["ours", "ours", "pdu", "other", "exception", "noise"]))
        address = UNIT
        if kind == "ours":
            pdu = bytes([function, size]) + draw(st.binary(min_size=size, max_size=size))
        elif kind == "pdu":
            pdu = draw(reply_pdus(function, count))
        elif kind == "other":
            address = draw(st.integers(0, 255).filter(lambda a: a != UNIT))
            fn = draw(st.integers(1, 4))
            pdu = bytes([fn]) + bytes([n := draw(st.integers(0, 255))]) + draw(st.binary(min_size=n, max_size=n))
        elif kind == "exception":
            address = draw(st.sampled_from([UNIT, UNIT, 1, 200]))
            fn = draw(st.sampled_from([function | 0x80, function | 0x80, 0x80, 0x83, 0x87]))
            pdu = bytes([fn, draw(st.one_of(st.sampled_from([2, 5, 6]), st.integers(0, 255)))])
        else:
            pieces.append(draw(st.binary(max_size=30)))
            continue
        whole = bytearray(frame(address, pdu))
        spoil = draw(st.sampled_from(["none", "none", "none", "crc", "cut"]))
        if spoil == "crc":
            whole[draw(st.integers(0, len(whole) - 1))] ^= draw(st.integers(1, 255))
        elif spoil == "cut":
            del whole[draw(st.integers(0, len(whole) - 1)) :]
        pieces.append(bytes(whole))
    return b"".join(pieces)


async def rtu_poll(scripts: list[bytes], split: list[int], retries: int, timeout: float = TIMEOUT) -> tuple[
        DeviceRead, mb.ModbusDevice, Recorded]:
    """Poll the device once over a pseudo-terminal whose far end answers request i with `scripts[i]` (in two
    writes, cut at `split[i]`), and is silent once the scripts run out."""
    master, slave = os.openpty()
    tty.setraw(slave)
    loop = asyncio.get_running_loop()
    heard = bytearray()
    asked = 0

    def on_request() -> None:
        nonlocal asked
        try:
            heard.extend(os.read(master, 1024))
        except OSError:
            loop.remove_reader(master)
            return
        while len(heard) >= 8:  # every read request frame is 8 bytes
            del heard[:8]
            if asked < len(scripts):
                script, cut = scripts[asked], split[asked] % (len(scripts[asked]) + 1)
                os.write(master, script[:cut])
                if script[cut:]:
                    loop.call_later(0.001, os.write, master, script[cut:])
            asked += 1

    channel = ModbusRtuChannel.model_validate({"id": "bus", "driver": "modbus_rtu", "port": os.ttyname(slave),
                                               "baudrate": 115200, "parity": "N",
                                               "devices": [wire_device(retries, timeout)]})
    recorded = Recorded()

    class Driver(ModbusRtuDriver):
        async def read_block(self, device: mb.ModbusDevice, block: mb.Block) -> bytes:
            data = await super().read_block(device, block)
            recorded.taken.append((block.function, data))
            return data

    driver = Driver(channel)
    loop.add_reader(master, on_request)
    try:
        read = await asyncio.wait_for(driver.read(channel.devices[0]), HANG)
    finally:
        loop.remove_reader(master)
        await driver.close()
        os.close(master)
        os.close(slave)
    recorded.plan = driver._plans["d"]
    return read, channel.devices[0], recorded


@IO
@given(st.tuples(*(rtu_scripts(f, c) for f, c in WIRE_BLOCKS)).map(list),
       st.lists(st.integers(0, 600), min_size=len(WIRE_BLOCKS), max_size=len(WIRE_BLOCKS)), st.integers(0, 1))
def test_any_bytes_on_the_serial_line_cost_the_poll_at_most_never_the_rtu_master(
    scripts: list[bytes], split: list[int], retries: int
) -> None:
    read, device, recorded = asyncio.run(rtu_poll(scripts, split, retries))
    sent = b"".join(scripts)
    check_poll(read, device, recorded, lambda f, d: frame(UNIT, bytes([f, len(d)]) + d) in sent)


@IO
@given(st.data())
def test_a_good_rtu_reply_with_any_register_contents_reads_back_what_was_sent(data: st.DataObject) -> None:
    blocks = WIRE_BLOCKS[:2]
    contents = [data.draw(st.binary(min_size=data_size(f, c), max_size=data_size(f, c))) for f, c in blocks]
    scripts = [frame(UNIT, bytes([f, len(d)]) + d) for (f, _), d in zip(blocks, contents, strict=True)]
    read, device, recorded = asyncio.run(rtu_poll(scripts, [0, 0], 0, timeout=1.0))
    assert read.errors == [] and [d for _, d in recorded.taken] == contents
    expected: list[Any] = [None] * len(device.points)
    for block, raw in zip(mb.plan_blocks(device), contents, strict=True):
        mb.decode_block(block, raw, expected)
    assert all(same(a, b) for a, b in zip(read.values, expected, strict=True))


# --- DL/T 645 ------------------------------------------------------------------------------------------------

bcd_byte = st.integers(0, 99).map(lambda n: (n // 10) << 4 | n % 10)
# addresses rich in the bytes a frame reader could mistake for a frame's start (68H) or end (16H)
address_bytes = st.lists(st.one_of(st.sampled_from([0x68, 0x16, 0xAA]), bcd_byte), min_size=6, max_size=6).map(bytes)


@st.composite
def dlt_frames(draw: st.DrawFn) -> tuple[str, int, bytes, int, bytes]:
    """(address, control, data, preamble, the frame built of them)."""
    address = dlt.address_text(draw(address_bytes))
    control = draw(st.one_of(st.integers(0, 255), st.sampled_from([0x91, 0xD1, 0xB1, 0x93, 0x11, 0x68, 0x16])))
    data = draw(st.binary(max_size=dlt.MAX_DATA))
    preamble = draw(st.integers(0, 4))
    return address, control, data, preamble, dlt.build_frame(address, control, data, preamble)


def valid_frame(raw: bytes) -> bool:
    """The standard's frame, checked apart from split_frame: 68 A0..A5 68 C L DATA CS 16."""
    return (len(raw) >= 12 and raw[0] == raw[7] == 0x68 and raw[9] <= dlt.MAX_DATA and len(raw) == 12 + raw[9]
            and raw[-1] == 0x16 and raw[-2] == sum(raw[:-2]) % 256)


def check_scan(buffer: bytes, scan: dlt.Scan) -> None:
    assert 0 <= scan.skip <= len(buffer)
    assert scan.skip > 0 or scan.missing > 0, "no progress: a reader would spin"
    if scan.frame is not None:
        raw = scan.frame.raw
        assert scan.problem is None and scan.missing == 0
        assert valid_frame(raw) and buffer[scan.skip - len(raw) : scan.skip] == raw
        assert 0x68 not in buffer[: scan.skip - len(raw)], "a frame is the first 68H that starts one"
        assert scan.frame.address == dlt.address_text(raw[1:7]) and len(scan.frame.address) == 12
        assert scan.frame.control == raw[8]
        assert scan.frame.data == bytes((b - 0x33) % 256 for b in raw[10:-2])
    elif scan.problem is not None:
        assert isinstance(scan.problem, str) and buffer[scan.skip - 1] == 0x68
    elif scan.missing:
        assert 0x68 not in buffer[: scan.skip] and (scan.skip == len(buffer) or buffer[scan.skip] == 0x68)
        assert scan.missing <= 12 + dlt.MAX_DATA
    else:  # a 68H that starts no frame, dropped alone
        assert buffer[scan.skip - 1] == 0x68 and 0x68 not in buffer[: scan.skip - 1]


def split_all(stream: bytes, chunks: list[int]) -> list[tuple[int, dlt.Frame]]:
    """Feed `stream` in chunks the way the driver reads the line, scanning after each; (end offset, frame) found."""
    buffer = bytearray()
    consumed = 0
    found: list[tuple[int, dlt.Frame]] = []
    position = 0
    for size in [*chunks, len(stream)]:
        buffer += stream[position : position + size]
        position += size
        for _ in range(len(stream) + 2):
            before = bytes(buffer)
            scan = dlt.split_frame(buffer)
            check_scan(before, scan)
            del buffer[: scan.skip]
            consumed += scan.skip
            if scan.frame is not None:
                found.append((consumed, scan.frame))
            elif scan.problem is None and scan.missing:
                break
        else:
            pytest.fail("split_frame made no progress")
        if position >= len(stream):
            break
    return found


@given(st.one_of(st.binary(max_size=300), st.lists(st.sampled_from([0x68, 0x16, 0xFE, 0x00, 0x33, 0xC8]),
                                                   max_size=300).map(bytes)))
def test_split_frame_on_any_bytes_takes_only_valid_frames_and_always_progresses(buffer: bytes) -> None:
    check_scan(buffer, dlt.split_frame(buffer))
    check_scan(buffer, dlt.split_frame(bytearray(buffer)))
    split_all(buffer, [])


@given(dlt_frames())
def test_build_frame_then_split_frame_gives_back_address_control_and_data(
    case: tuple[str, int, bytes, int, bytes]
) -> None:
    address, control, data, preamble, built = case
    assert built[:preamble] == b"\xfe" * preamble and valid_frame(built[preamble:])
    scan = dlt.split_frame(built)
    assert scan.frame is not None and scan.skip == len(built)
    assert (scan.frame.address, scan.frame.control, scan.frame.data) == (address, control, data)
    assert scan.frame.raw == built[preamble:]
    for cut in range(preamble, len(built)):  # a frame still arriving waits, however much of it is here
        partial = dlt.split_frame(built[:cut])
        assert partial.frame is None and partial.problem is None
        if partial.skip == preamble + 1:  # unless its bytes so far hold a whole valid frame (the protocol's limit)
            assert split_all(built[preamble + 1 : cut], []), built[:cut].hex(" ")
        else:
            assert partial.skip == preamble and partial.missing > 0


@given(st.lists(st.one_of(dlt_frames().map(lambda f: f[4]), st.binary(max_size=40),
                          st.lists(st.sampled_from([0x68, 0x16, 0xFE, 0x99]), max_size=20).map(bytes)), max_size=6),
       st.lists(st.integers(1, 64), max_size=40))
def test_frames_in_noise_are_found_whatever_chunks_the_line_delivers(pieces: list[bytes], chunks: list[int]) -> None:
    stream = b"".join(pieces)
    found = split_all(stream, chunks)
    spans = [(end - len(f.raw), end) for end, f in found]
    for (start, end), (_, f) in zip(spans, found, strict=True):
        assert stream[start:end] == f.raw
    position = 0
    for piece in pieces:
        start = piece.find(0x68)
        if start >= 0 and valid_frame(piece[start:]) and len(piece[start:]) == 12 + piece[start + 9]:
            begin, end = position + start, position + len(piece)
            # a real frame is lost only to another valid frame that overlaps it (the protocol cannot tell them)
            assert (begin, end) in spans or any(s < end and begin < e for s, e in spans), (piece.hex(" "), spans)
        position += len(piece)


@given(address_bytes)
def test_address_text_and_address_field_are_inverse(field: bytes) -> None:
    text = dlt.address_text(field)
    assert len(text) == 12 and dlt.address_field(text) == field and dlt.address_field(text.lower()) == field


@given(st.one_of(st.text(max_size=14), st.text(alphabet="0123456789Aa", min_size=12, max_size=12)))
def test_address_field_takes_twelve_digits_or_wildcard_pairs_and_refuses_the_rest(text: str) -> None:
    try:
        field = dlt.address_field(text)
    except ValueError:  # configuration and command-line text, not device bytes
        return
    assert len(field) == 6 and dlt.address_text(field) == text.upper()


@given(st.one_of(st.text(max_size=10), st.text(alphabet="0123456789abcdefABCDEF", min_size=8, max_size=8),
                 st.text(alphabet="0123456789abcdefxX_+- ", min_size=8, max_size=8)))
def test_parse_di_takes_exactly_eight_hex_digits(text: str) -> None:
    try:
        di = dlt.parse_di(text)
    except ValueError:  # configuration and command-line text, not device bytes
        assert len(text) != 8 or not all(c in "0123456789abcdefABCDEF" for c in text)
        return
    assert 0 <= di <= 0xFFFFFFFF and dlt.di_text(di) == text.upper()
    assert dlt.read_request("123456789012", di)  # a DI it takes can be asked


formats = st.builds(lambda size, dec, signed: dlt.DataFormat(size, min(dec, 2 * size), signed),
                    st.integers(1, 8), st.integers(0, 16), st.booleans())


@given(formats, st.data())
def test_decode_value_gives_back_the_bcd_digits_with_sign_and_decimals(fmt: dlt.DataFormat,
                                                                      data: st.DataObject) -> None:
    digits = 2 * fmt.size
    top = 8 * 10 ** (digits - 1) - 1 if fmt.signed else 10**digits - 1  # the sign takes the top digit's bit 3
    magnitude = data.draw(st.integers(0, top))
    negative = fmt.signed and data.draw(st.booleans())
    most_first = bytearray.fromhex(f"{magnitude:0{digits}d}")
    if negative:
        most_first[0] |= 0x80
    value = dlt.decode_value(bytes(reversed(most_first)), fmt)
    expected = magnitude / float(10**fmt.decimals)
    assert same(value, -expected if negative else expected)
    if magnitude < 10**15:  # within a float's exact digits, the simulator's encoder (written apart) agrees
        assert dlt.decode_value(sim_dlt.bcd(value, fmt.size, fmt.decimals, fmt.signed), fmt) == value


@given(formats, st.binary(max_size=10))
def test_decode_value_of_any_bytes_is_a_finite_number_or_a_protocol_error(fmt: dlt.DataFormat, raw: bytes) -> None:
    try:
        value = dlt.decode_value(raw, fmt)
    except ProtocolError as exc:
        assert isinstance(exc, dlt.Dlt645Error) and isinstance(exc, ValueError)  # callers catch ValueError too
        return
    assert len(raw) == fmt.size and isinstance(value, float) and math.isfinite(value)
    assert abs(value) < 10 ** (2 * fmt.size - fmt.decimals)


METER = "681668166816"  # its address bytes are 16 68 16 68 16 68: every one a frame's start or end byte
ENERGY = 0x00010000


@st.composite
def meter_scripts(draw: st.DrawFn) -> bytes:
    """What the bus carries after a read of ENERGY from METER: replies of it and of others, right, wrong for the
    request, abnormal, spoiled, the request's echo, wake-up bytes and noise. Framed by the simulator's code."""
    pieces = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["reply", "reply", "other", "echo", "abnormal", "any", "noise"]))
        if kind == "noise":
            pieces.append(draw(st.binary(max_size=30)))
            continue
        address = METER if kind != "other" else dlt.address_text(draw(address_bytes))
        di = ENERGY.to_bytes(4, "little")
        if kind in ("reply", "other"):
            control = draw(st.sampled_from([0x91, 0x91, 0xB1, 0x93]))
            payload = draw(st.sampled_from([di, di, b"", bytes(4)])) + draw(st.binary(max_size=6))
        elif kind == "echo":
            control, payload = 0x11, di
        elif kind == "abnormal":
            control, payload = draw(st.sampled_from([0xD1, 0xD3, 0xF1])), draw(st.binary(max_size=2))
        else:
            control, payload = draw(st.integers(0, 255)), draw(st.binary(max_size=40))
        whole = bytearray(b"\xfe" * draw(st.integers(0, 4)) + sim_dlt.frame(sim_dlt.wire_address(address), control,
                                                                              payload))
        spoil = draw(st.sampled_from(["none", "none", "none", "sum", "cut"]))
        if spoil == "sum":
            whole[draw(st.integers(0, len(whole) - 1))] ^= draw(st.integers(1, 255))
        elif spoil == "cut":
            del whole[draw(st.integers(0, len(whole) - 1)) :]
        pieces.append(bytes(whole))
    return b"".join(pieces)


async def meter_read(script: bytes, split: int) -> Any:
    """Read ENERGY from METER over a pseudo-terminal whose far end answers with `script` (in two writes)."""
    from agent.drivers.dlt645.driver import Dlt645Bus

    master, slave = os.openpty()
    tty.setraw(slave)
    loop = asyncio.get_running_loop()

    def on_request() -> None:
        try:
            os.read(master, 1024)
        except OSError:
            loop.remove_reader(master)
            return
        loop.remove_reader(master)
        cut = split % (len(script) + 1)
        os.write(master, script[:cut])
        if script[cut:]:
            loop.call_later(0.001, os.write, master, script[cut:])

    bus = Dlt645Bus(os.ttyname(slave), baudrate=115200, preamble=0, response_timeout=0.01, latency=0.0, gap=0.0)
    loop.add_reader(master, on_request)
    try:
        return await asyncio.wait_for(bus.read(METER, ENERGY, 0.02), HANG)
    except (dlt.NoReply, dlt.FrameError, dlt.ErrorReply) as exc:
        return exc
    finally:
        loop.remove_reader(master)
        await bus.close()
        os.close(master)
        os.close(slave)


@IO
@given(meter_scripts(), st.integers(0, 600))
def test_any_bytes_on_a_meter_bus_give_the_matching_reply_or_one_of_the_codecs_errors(script: bytes,
                                                                                      split: int) -> None:
    result = asyncio.run(meter_read(script, split))
    if isinstance(result, dlt.ErrorReply):
        assert result.frame in script and result.frame[8] & dlt.ABNORMAL
    elif isinstance(result, dlt.FrameError):
        assert result.kind in ("checksum", "bad_frame", "truncated", "follow_up"), result.kind
    elif not isinstance(result, dlt.NoReply):
        frame = result.frame
        assert frame.raw in script and valid_frame(frame.raw)
        assert (frame.address, frame.control) == (METER, 0x91) and frame.data[:4] == ENERGY.to_bytes(4, "little")
        assert result.payload == frame.data[4:]


def test_the_error_classes_are_the_driver_hierarchy() -> None:
    # what the properties above allow a decoder to raise is what the read path catches
    for error in (mb.ModbusError, mb.FrameError, dlt.FrameError, dlt.ErrorReply):
        assert issubclass(error, ProtocolError) and issubclass(error, DriverError)

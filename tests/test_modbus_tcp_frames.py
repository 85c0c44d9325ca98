"""The Modbus TCP driver facing a misbehaving server: every bad frame is an error for that block, never a
crash, and the next poll works again. The server is a real TCP listener that answers with scripted bytes.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Callable

import pytest

from agent.drivers.modbus.codec import FrameError, ModbusDevice, bits_of, decode_block, plan_blocks
from agent.drivers.modbus.tcp import ModbusTcpChannel, ModbusTcpDriver


class Closing(bytes):
    """Reply bytes after which the server closes the connection."""


Reply = Callable[[int, int, bytes], Awaitable[bytes | None]]


async def serve(reply: Reply, sent: asyncio.Queue[int] | None = None) -> tuple[asyncio.Server, int]:
    """A TCP server that reads MBAP requests and writes whatever `reply(tid, unit, pdu)` returns; the tid of
    each reply written goes to `sent` when given."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readexactly(7)
                tid, _, length, unit = struct.unpack(">HHHB", head)
                pdu = await reader.readexactly(length - 1)
                out = await reply(tid, unit, pdu)
                if out is not None:
                    writer.write(out)
                    if sent is not None:
                        sent.put_nowait(tid)
                    await writer.drain()
                if isinstance(out, Closing):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def mbap(tid: int, unit: int, pdu: bytes, proto: int = 0) -> bytes:
    return struct.pack(">HHHB", tid, proto, len(pdu) + 1, unit) + pdu


def good_reply(tid: int, unit: int, pdu: bytes) -> bytes:
    _, start, count = struct.unpack(">BHH", pdu)
    data = b"".join(struct.pack(">H", start + i) for i in range(count))
    return mbap(tid, unit, bytes([3, len(data)]) + data)


def channel(port: int) -> ModbusTcpChannel:
    return ModbusTcpChannel.model_validate({
        "id": "c1", "driver": "modbus_tcp", "host": "127.0.0.1", "port": port,
        "devices": [{"id": "d1", "unit": 7, "timeout": 0.3, "retries": 0,
                     "points": [{"id": "p0", "address": 10}, {"id": "p1", "address": 11}]}],
    })


def run_two_polls(bad: Callable[[int, int, bytes], bytes | None]) -> tuple[list[object], list[str], list[object]]:
    """First request gets `bad(...)`, later ones a good reply; returns (values1, errors1, values2)."""

    async def main() -> tuple[list[object], list[str], list[object]]:
        calls = 0

        async def reply(tid: int, unit: int, pdu: bytes) -> bytes | None:
            nonlocal calls
            calls += 1
            return bad(tid, unit, pdu) if calls == 1 else good_reply(tid, unit, pdu)

        server, port = await serve(reply)
        ch = channel(port)
        driver = ModbusTcpDriver(ch)
        try:
            first = await driver.read(ch.devices[0])
            second = await driver.read(ch.devices[0])
        finally:
            await driver.close()
            server.close()
        return first.values, first.errors, second.values

    return asyncio.run(main())


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    ("name", "bad", "expected"),
    [
        ("exception reply", lambda t, u, p: mbap(t, u, bytes([0x83, 2])), "exception 2 (illegal data address)"),
        ("wrong byte count", lambda t, u, p: mbap(t, u, bytes([3, 3, 0, 1, 2])), "data bytes"),
        ("wrong function", lambda t, u, p: mbap(t, u, bytes([4, 4, 0, 1, 0, 2])), "reply to function 4"),
        ("wrong unit", lambda t, u, p: good_reply(t, u + 1, p), "reply from unit 8"),
        ("bad protocol id", lambda t, u, p: mbap(t, u, bytes([3, 4, 0, 1, 0, 2]), proto=9), "bad MBAP header"),
        ("silence", lambda t, u, p: None, "no reply within 0.3s"),
        ("truncated then closed", lambda t, u, p: Closing(mbap(t, u, bytes([3, 4, 0, 1, 0, 2]))[:9]),
         "connection closed"),
    ],
)
def test_bad_reply_is_an_error_and_the_next_poll_recovers(
    name: str, bad: Callable[[int, int, bytes], bytes | None], expected: str
) -> None:
    values, errors, after = run_two_polls(bad)
    assert values == [None, None], name
    assert errors and expected in errors[0], errors
    assert after == [10, 11], name


@pytest.mark.timeout(20)
def test_late_reply_to_an_abandoned_request_is_not_taken_for_the_next_answer() -> None:
    async def main() -> tuple[list[str], list[object]]:
        calls = 0
        gave_up = asyncio.Event()
        sent: asyncio.Queue[int] = asyncio.Queue()

        async def reply(tid: int, unit: int, pdu: bytes) -> bytes | None:
            nonlocal calls
            calls += 1
            if calls == 1:
                async with asyncio.timeout(5):
                    await gave_up.wait()  # the answer comes only once the client has given up on it
                return mbap(tid, unit, bytes([3, 4, 0xDE, 0xAD, 0xBE, 0xEF]))
            return good_reply(tid, unit, pdu)

        server, port = await serve(reply, sent)
        ch = channel(port)
        driver = ModbusTcpDriver(ch)
        try:
            first = await driver.read(ch.devices[0])
            gave_up.set()
            await asyncio.wait_for(sent.get(), 5)  # the late reply is written before the next request goes
            second = await driver.read(ch.devices[0])
        finally:
            await driver.close()
            server.close()
        return first.errors, second.values

    errors, values = asyncio.run(main())
    assert "no reply" in errors[0]
    assert values == [10, 11]


@pytest.mark.timeout(20)
def test_refused_connection_gives_bad_values_with_the_reason() -> None:
    async def main() -> list[str]:
        server, port = await serve(lambda t, u, p: asyncio.sleep(0, good_reply(t, u, p)))
        server.close()
        await server.wait_closed()
        ch = channel(port)
        driver = ModbusTcpDriver(ch)
        result = await driver.read(ch.devices[0])
        await driver.close()
        assert result.values == [None, None]
        return result.errors

    errors = asyncio.run(main())
    assert "Connect call failed" in errors[0] or "refused" in errors[0].lower()


@pytest.mark.timeout(20)
def test_a_server_refusing_unused_addresses_inside_a_merged_block_is_read_without_gaps() -> None:
    present = {0: 7, 10: 8, 11: 9}  # a strict server: exception 2 for any address it does not have

    async def reply(tid: int, unit: int, pdu: bytes) -> bytes | None:
        _, start, count = struct.unpack(">BHH", pdu)
        if any(a not in present for a in range(start, start + count)):
            return mbap(tid, unit, bytes([0x83, 2]))
        data = b"".join(struct.pack(">H", present[a]) for a in range(start, start + count))
        return mbap(tid, unit, bytes([3, len(data)]) + data)

    async def main() -> tuple[list[object], list[str], list[object]]:
        server, port = await serve(reply)
        ch = ModbusTcpChannel.model_validate({
            "id": "c1", "driver": "modbus_tcp", "host": "127.0.0.1", "port": port,
            "devices": [{"id": "d1", "timeout": 0.5, "points": [
                {"id": "a", "address": 0}, {"id": "b", "address": 10}, {"id": "c", "address": 11}]}],
        })
        driver = ModbusTcpDriver(ch)
        try:
            first = await driver.read(ch.devices[0])
            second = await driver.read(ch.devices[0])
        finally:
            await driver.close()
            server.close()
        return first.values, first.errors, second.values

    values, errors, again = asyncio.run(main())
    assert values == [7, 8, 9] and errors == []
    assert again == [7, 8, 9]


def test_a_block_without_gaps_refused_with_exception_2_is_an_error_not_a_gap() -> None:
    async def reply(tid: int, unit: int, pdu: bytes) -> bytes | None:
        return mbap(tid, unit, bytes([0x83, 2]))  # illegal data address, whatever is asked

    async def main() -> tuple[list[object], list[str]]:
        server, port = await serve(reply)
        ch = ModbusTcpChannel.model_validate({
            "id": "c1", "driver": "modbus_tcp", "host": "127.0.0.1", "port": port,
            "devices": [{"id": "d1", "timeout": 0.5, "points": [  # one run of three registers: nothing bridged
                {"id": "a", "address": 0}, {"id": "b", "address": 1}, {"id": "c", "address": 2}]}],
        })
        driver = ModbusTcpDriver(ch)
        try:
            read = await driver.read(ch.devices[0])
        finally:
            await driver.close()
            server.close()
        return read.values, read.errors

    values, errors = asyncio.run(main())
    assert values == [None, None, None]
    assert len(errors) == 1 and "holding 0..2" in errors[0]


# --- found by tests/test_fuzz_frames.py ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("point", "data"),
    [
        ({"table": "coil", "type": "bool"}, b""),  # was IndexError
        ({"type": "bool", "bit": 0}, b""),  # was IndexError
        ({"type": "int16"}, b""),  # was struct.error
        ({"type": "int32", "order": "CDAB"}, b"\x00\x00"),  # was struct.error
        ({"table": "coil", "type": "bool"}, b"\x00\x00\x00"),  # was decoded from the first byte, the rest ignored
    ],
)
def test_a_block_given_data_of_another_size_is_a_frame_error_and_writes_no_value(
    point: dict[str, object], data: bytes
) -> None:
    device = ModbusDevice.model_validate({"id": "d", "points": [{"id": "p", "address": 0, **point}]})
    (block,) = plan_blocks(device)
    values: list[object] = [None]
    with pytest.raises(FrameError, match="data bytes for"):
        decode_block(block, data, values)
    assert values == [None]


def test_bits_asked_beyond_the_data_are_a_frame_error() -> None:
    with pytest.raises(FrameError, match="0 data bytes for 1 bits"):
        bits_of(b"", 1)  # was IndexError
    assert list(bits_of(b"\x05", 3)) == [True, False, True]

"""The Modbus TCP connection (agent/drivers/modbus/mbap.py) and its driver facing real servers on loopback that cut
their replies into single bytes, send two in one segment, stream frames or garbage without end, or vanish in the
middle of a reply: each case is the right reply or an error for that block, the input kept stays under one frame,
and the next poll works again on a fresh connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from test_modbus_tcp_frames import good_reply, mbap

from agent.drivers.links import MAX_UNREAD
from agent.drivers.modbus.codec import FrameError
from agent.drivers.modbus.mbap import MAX_LENGTH, MbapConnection
from agent.drivers.modbus.tcp import ModbusTcpChannel, ModbusTcpDriver
from agent.errors import LinkError, NoReply

UNIT = 7
LONGEST_FRAME = 6 + MAX_LENGTH
Handler = Callable[[int, int, bytes, asyncio.StreamWriter], Awaitable[None]]


async def serve(handler: Handler) -> tuple[asyncio.Server, int]:
    """A TCP server (no Nagle delay: each write is its own segment) that hands every MBAP request to `handler`."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                head = await reader.readexactly(7)
                tid, _, length, unit = struct.unpack(">HHHB", head)
                pdu = await reader.readexactly(length - 1)
                await handler(tid, unit, pdu, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def channel(port: int, *devices: dict[str, Any]) -> ModbusTcpChannel:
    """A channel whose devices read holding registers 10 and 11 (a good reply holds 10, 11)."""
    default = {"id": "d1", "unit": UNIT, "timeout": 2, "retries": 0}
    return ModbusTcpChannel.model_validate({
        "id": "c1", "driver": "modbus_tcp", "host": "127.0.0.1", "port": port,
        "devices": [{**default, **d, "points": [{"id": f"{d.get('id', 'd1')}-p{a}", "address": a} for a in (10, 11)]}
                    for d in devices or [{}]],
    })


def registers(tid: int, unit: int, *values: int) -> bytes:
    data = struct.pack(f">{len(values)}H", *values)
    return mbap(tid, unit, bytes([3, len(data)]) + data)


async def polls(handler: Handler, count: int, *devices: dict[str, Any]) -> list[tuple[list[object], list[str]]]:
    """Poll the channel's devices in turn, `count` rounds, against a server of `handler`; (values, errors) each."""
    server, port = await serve(handler)
    ch = channel(port, *devices)
    driver = ModbusTcpDriver(ch)
    out = []
    try:
        for _ in range(count):
            for device in ch.devices:
                read = await asyncio.wait_for(driver.read(device), 10)
                out.append((read.values, read.errors))
    finally:
        await driver.close()
        server.close()
    return out


class Recording(MbapConnection):
    """The real connection, noting how the input arrived and the most it ever kept unread."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.chunks: list[int] = []
        self.peak = 0

    def data_received(self, data: bytes) -> None:
        self.chunks.append(len(data))
        super().data_received(data)
        self.peak = max(self.peak, len(self._buffer))


async def connect(port: int) -> Recording:
    connection = Recording("c1")
    await asyncio.get_running_loop().create_connection(lambda: connection, "127.0.0.1", port)
    return connection


# --- cut and joined replies ----------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_a_reply_cut_into_one_byte_segments_is_read_whole() -> None:
    async def byte_by_byte(tid: int, unit: int, pdu: bytes, writer: asyncio.StreamWriter) -> None:
        for byte in good_reply(tid, unit, pdu):
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.002)  # each byte its own segment

    async def main() -> tuple[bytes, list[int], list[tuple[list[object], list[str]]]]:
        server, port = await serve(byte_by_byte)
        connection = await connect(port)
        try:
            reply = await asyncio.wait_for(connection.request(1, UNIT, struct.pack(">BHH", 3, 10, 2), 5), 10)
        finally:
            await connection.close()
            server.close()
        return reply, connection.chunks, await polls(byte_by_byte, 2)

    reply, chunks, results = asyncio.run(main())
    assert reply == bytes([3, 4, 0, 10, 0, 11])
    assert len(chunks) > 6, f"the reply came in {chunks}: not cut, the test proves nothing"
    assert results == [([10, 11], []), ([10, 11], [])]


@pytest.mark.timeout(30)
def test_a_late_reply_and_the_right_one_in_one_segment_give_the_right_one() -> None:
    async def late_first(tid: int, unit: int, pdu: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(registers(tid - 1, unit, 666, 666) + good_reply(tid, unit, pdu))

    results = asyncio.run(polls(late_first, 2))
    assert results == [([10, 11], []), ([10, 11], [])]


@pytest.mark.timeout(30)
def test_a_second_answer_in_the_same_segment_is_not_taken_for_the_next_request() -> None:
    answered = 0

    async def twice(tid: int, unit: int, pdu: bytes, writer: asyncio.StreamWriter) -> None:
        nonlocal answered
        answered += 1
        writer.write(registers(tid, unit, answered, 1) + registers(tid, unit, 666, 666))

    results = asyncio.run(polls(twice, 3))
    assert results == [([1, 1], []), ([2, 1], []), ([3, 1], [])]


@pytest.mark.timeout(30)
def test_replies_of_two_transactions_and_half_a_third_in_one_read_keep_the_half() -> None:
    frames = registers(1, UNIT, 1, 1) + registers(2, UNIT, 2, 2) + registers(3, UNIT, 3, 3)

    async def batched(tid: int, unit: int, pdu: bytes, writer: asyncio.StreamWriter) -> None:
        # tid 1 gets its reply, tid 2's (never asked) and the head of tid 3's; tid 3 gets the tail
        writer.write(frames[:-3] if tid == 1 else frames[-3:])

    async def main() -> tuple[list[bytes], int, int]:
        server, port = await serve(batched)
        connection = await connect(port)
        pdu = struct.pack(">BHH", 3, 10, 2)
        try:
            got = [await asyncio.wait_for(connection.request(1, UNIT, pdu, 5), 10)]
            kept = len(connection._buffer)
            got.append(await asyncio.wait_for(connection.request(3, UNIT, pdu, 5), 10))
        finally:
            await connection.close()
            server.close()
        return got, kept, connection.overflowed

    got, kept, dropped = asyncio.run(main())
    assert got == [bytes([3, 4, 0, 1, 0, 1]), bytes([3, 4, 0, 3, 0, 3])]
    assert kept == len(registers(3, UNIT, 3, 3)) - 3
    assert dropped == len(registers(2, UNIT, 2, 2))


# --- hostile servers -----------------------------------------------------------------------------------------------


def endless(chunk: Callable[[int, int], bytes]) -> tuple[Handler, asyncio.Event]:
    """A server that answers the first request with `chunk(tid, unit)` again and again until the link drops,
    then answers well; the event is set when its stream ended."""
    ended = asyncio.Event()
    streamed = False

    async def handler(tid: int, unit: int, pdu: bytes, writer: asyncio.StreamWriter) -> None:
        nonlocal streamed
        if streamed:
            writer.write(good_reply(tid, unit, pdu))
            return
        streamed = True
        data = chunk(tid, unit)
        try:
            for _ in range(100_000):  # 64 KiB a write: gigabytes before this gives up
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            ended.set()
            raise

    return handler, ended


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("name", "chunk", "expected"),
    [
        ("garbage", lambda tid, unit: bytes(range(256)) * 256, "bad MBAP header 00010203040506"),
        ("a header of a frame too long", lambda tid, unit: b"\x00\x01\x00\x00\x01\x00\x07" * 9362,
         "length 256"),
        ("frames of other transactions", lambda tid, unit: registers(tid + 1, unit, 0, 0) * 4096,
         f"more than {MAX_UNREAD} bytes of replies nobody asked for"),
    ],
)
def test_a_server_streaming_without_end_is_dropped_and_its_input_stays_under_one_frame(
    name: str, chunk: Callable[[int, int], bytes], expected: str
) -> None:
    async def main() -> tuple[BaseException | bytes, int, list[tuple[list[object], list[str]]]]:
        handler, ended = endless(chunk)
        server, port = await serve(handler)
        connection = await connect(port)
        try:
            result: BaseException | bytes = await asyncio.wait_for(
                connection.request(1, UNIT, struct.pack(">BHH", 3, 10, 2), 5), 10)
        except (FrameError, LinkError) as exc:
            result = exc
        await asyncio.wait_for(ended.wait(), 10)  # the server's writes fail: the agent dropped the link
        await connection.close()
        server.close()
        handler, ended = endless(chunk)
        return result, connection.peak, await polls(handler, 2)

    result, peak, results = asyncio.run(main())
    assert isinstance(result, FrameError | LinkError) and expected in str(result), (name, result)
    assert peak < LONGEST_FRAME
    (values, errors), after = results
    assert values == [None, None] and expected in errors[0], (name, errors)
    assert after == ([10, 11], []), name


@pytest.mark.timeout(30)
def test_bytes_between_transactions_drop_the_link_and_the_next_poll_reconnects() -> None:
    async def answer_then_junk(tid: int, unit: int, pdu: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(good_reply(tid, unit, pdu) + b"\x00\x00\xff\xff\x00\x02\x07")  # then a header of protocol 0xffff

    async def main() -> tuple[list[tuple[list[object], list[str]]], int]:
        server, port = await serve(answer_then_junk)
        ch = channel(port)
        driver = ModbusTcpDriver(ch)
        out, dropped = [], 0
        try:
            for _ in range(3):
                read = await asyncio.wait_for(driver.read(ch.devices[0]), 10)
                out.append((read.values, read.errors))
                for _ in range(500):  # the junk may come a moment after the reply
                    if not driver.connected:
                        dropped += 1
                        break
                    await asyncio.sleep(0.01)
        finally:
            await driver.close()
            server.close()
        return out, dropped

    results, dropped = asyncio.run(main())
    assert results == [([10, 11], [])] * 3
    assert dropped == 3


# --- connections that break ----------------------------------------------------------------------------------------


def rst(writer: asyncio.StreamWriter) -> None:
    """Close with a reset rather than an orderly end of stream."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("how", "expected"),
    [("end of stream", "connection closed by the server (9 bytes of a reply read)"),
     ("reset", "connection lost: [Errno 104]")],
)
def test_a_connection_lost_in_the_middle_of_a_reply_fails_the_block_and_the_next_poll_reconnects(
    how: str, expected: str
) -> None:
    calls = 0

    async def half_then_gone(tid: int, unit: int, pdu: bytes, writer: asyncio.StreamWriter) -> None:
        nonlocal calls
        calls += 1
        if calls > 1:
            writer.write(good_reply(tid, unit, pdu))
            return
        writer.write(good_reply(tid, unit, pdu)[:9])
        await writer.drain()
        await asyncio.sleep(0.05)  # the half arrives first
        if how == "reset":
            rst(writer)
        raise ConnectionResetError  # ends this connection's handler

    (values, errors), after = asyncio.run(polls(half_then_gone, 2))
    assert values == [None, None] and expected in errors[0], errors
    assert after == ([10, 11], [])


@pytest.mark.timeout(30)
def test_a_request_on_a_closed_connection_is_a_link_error() -> None:
    async def main() -> None:
        async def silent(tid: int, unit: int, pdu: bytes, writer: asyncio.StreamWriter) -> None:
            return None

        server, port = await serve(silent)
        connection = await connect(port)
        waiting = connection.request(1, UNIT, b"\x03\x00\x00\x00\x01", 5)
        await connection.close()
        server.close()
        with pytest.raises(LinkError, match="connection closed"):
            await asyncio.wait_for(waiting, 5)
        with pytest.raises(LinkError, match="not connected"):
            connection.request(2, UNIT, b"\x03\x00\x00\x00\x01", 5)
        assert not connection.is_open

    asyncio.run(main())


# --- timeouts ------------------------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_a_short_timeout_after_a_long_one_fires_on_time() -> None:
    async def only_unit_1(tid: int, unit: int, pdu: bytes, writer: asyncio.StreamWriter) -> None:
        if unit == 1:
            writer.write(good_reply(tid, unit, pdu))

    async def main() -> list[tuple[list[object], list[str]]]:
        # the long device's timer (30 s) is pending when the short one asks: the short one must not wait it out
        return await asyncio.wait_for(polls(only_unit_1, 1, {"id": "long", "unit": 1, "timeout": 30},
                                            {"id": "short", "unit": 2, "timeout": 0.2}), 10)

    assert asyncio.run(main()) == [([10, 11], []), ([None, None], ["holding 10..11: no reply within 0.2s"])]


@pytest.mark.timeout(30)
def test_a_long_timeout_after_a_short_one_waits_its_whole_time() -> None:
    async def slow_unit_2(tid: int, unit: int, pdu: bytes, writer: asyncio.StreamWriter) -> None:
        if unit == 2:
            await asyncio.sleep(0.5)  # longer than unit 1's timeout, well within unit 2's
        writer.write(good_reply(tid, unit, pdu))

    results = asyncio.run(polls(slow_unit_2, 2, {"id": "short", "unit": 1, "timeout": 0.2},
                                {"id": "long", "unit": 2, "timeout": 5}))
    assert results == [([10, 11], [])] * 4


@pytest.mark.timeout(30)
def test_a_timed_out_request_closes_the_connection_and_its_late_reply_reaches_nobody() -> None:
    calls = 0

    async def late_once(tid: int, unit: int, pdu: bytes, writer: asyncio.StreamWriter) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(0.4)
            writer.write(registers(tid, unit, 666, 666))
            return
        writer.write(good_reply(tid, unit, pdu))

    results = asyncio.run(polls(late_once, 2, {"timeout": 0.2}))
    assert results == [([None, None], ["holding 10..11: no reply within 0.2s"]), ([10, 11], [])]


@pytest.mark.timeout(30)
def test_a_cancelled_transaction_leaves_the_connection_in_step() -> None:
    async def main() -> tuple[bytes, int]:
        release = asyncio.Event()

        async def late_first(tid: int, unit: int, pdu: bytes, writer: asyncio.StreamWriter) -> None:
            if tid == 1:
                await asyncio.wait_for(release.wait(), 5)
                writer.write(registers(tid, unit, 666, 666))
                return
            writer.write(good_reply(tid, unit, pdu))

        server, port = await serve(late_first)
        connection = await connect(port)
        pdu = struct.pack(">BHH", 3, 10, 2)
        try:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(connection.request(1, UNIT, pdu, 30), 0.1)  # the poll was cancelled
            release.set()
            second = connection.request(2, UNIT, pdu, 5)
            reply = await asyncio.wait_for(second, 10)
        finally:
            await connection.close()
            server.close()
        return reply, connection.overflowed

    reply, dropped = asyncio.run(main())
    assert reply == bytes([3, 4, 0, 10, 0, 11])
    assert dropped == len(registers(1, UNIT, 666, 666))


@pytest.mark.timeout(30)
def test_a_connect_that_hangs_is_a_link_error_after_connect_timeout() -> None:
    # a listener whose accept queue is full and never accepted: the kernel leaves further SYNs unanswered
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            fillers.append(filler)

        async def main() -> str:
            ch = ModbusTcpChannel.model_validate({
                "id": "c1", "driver": "modbus_tcp", "host": "127.0.0.1", "port": port, "connect_timeout": 0.3,
                "devices": [{"id": "d1", "timeout": 1, "points": [{"id": "p", "address": 0}]}]})
            driver = ModbusTcpDriver(ch)
            read = await asyncio.wait_for(driver.read(ch.devices[0]), 10)
            await driver.close()
            return read.errors[0]

        assert asyncio.run(main()) == f"holding 0..0: connect to 127.0.0.1:{port} timed out after 0.3s"
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def test_no_reply_and_frame_errors_are_the_driver_errors_the_poller_expects() -> None:
    assert issubclass(NoReply, TimeoutError) and issubclass(FrameError, OSError) and issubclass(LinkError, OSError)


@pytest.mark.timeout(30)
def test_a_second_request_while_one_waits_is_refused_and_the_first_still_gets_its_reply() -> None:
    async def main() -> bytes:
        async def answer(tid: int, unit: int, pdu: bytes, writer: asyncio.StreamWriter) -> None:
            writer.write(good_reply(tid, unit, pdu))

        server, port = await serve(answer)
        connection = await connect(port)
        pdu = struct.pack(">BHH", 3, 10, 2)
        try:
            first = connection.request(1, UNIT, pdu, 5)
            with pytest.raises(RuntimeError, match="already waiting"):
                connection.request(2, UNIT, pdu, 5)
            return await asyncio.wait_for(first, 10)
        finally:
            await connection.close()
            server.close()

    assert asyncio.run(main()) == bytes([3, 4, 0, 10, 0, 11])

"""Fuzz the Modbus TCP connection's reader (agent/drivers/modbus/mbap.py): any bytes a server sends, cut into any
segments, give the waiting transaction the PDU of its first frame with its own transaction id and unit, or one
error, exactly as a plain reading of the stream frame by frame says; never an exception out of the callback, and
never more than one incomplete frame kept.

The connection runs on a real loopback socket; the fuzzed bytes are handed to it as its transport hands what the
kernel gives, segment by segment, so that the cuts are the fuzzer's and not the kernel's.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import struct

from hypothesis import event, given
from hypothesis import strategies as st

from agent.drivers.links import MAX_UNREAD
from agent.drivers.modbus.codec import FrameError
from agent.drivers.modbus.mbap import MAX_LENGTH, MbapConnection
from agent.errors import LinkError

TID, UNIT = 0x1234, 7
Outcome = tuple[str, bytes]  # ("reply", pdu), ("error", message start), ("waiting", b"")


def expected(stream: bytes) -> Outcome:
    """What a plain reading of the whole stream, frame after frame, makes of it (the MBAP rules, written apart)."""
    at, stray = 0, 0
    while len(stream) - at >= 7:
        tid, proto, length, unit = struct.unpack_from(">HHHB", stream, at)
        if proto != 0 or not 2 <= length <= 254:
            return ("error", b"bad MBAP header")
        if at + 6 + length > len(stream):
            break
        if tid == TID:
            if unit != UNIT:
                return ("error", b"reply from unit")
            return ("reply", stream[at + 7 : at + 6 + length])
        stray += 6 + length
        if stray > MAX_UNREAD:
            return ("error", b"channel c: the server sent more than")
        at += 6 + length
    return ("waiting", b"")


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    """Frames of our transaction and others, of our unit and others, with good and broken headers, and noise."""
    out = b""
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from(["frame", "frame", "frame", "frame", "noise", "strays"]))
        if kind == "noise":
            out += draw(st.binary(max_size=20))
            continue
        pdu = draw(st.binary(min_size=1, max_size=MAX_LENGTH - 1))
        if kind == "strays":  # well-formed replies to other transactions, enough to cross the bound at times
            frame = struct.pack(">HHHB", TID - 1, 0, len(pdu) + 1, UNIT) + pdu
            out += frame * draw(st.integers(1, 5000 // len(frame) + 2))
            continue
        tid = draw(st.sampled_from([TID, TID, TID, TID - 1, 0, 0xFFFF]))
        unit = draw(st.sampled_from([UNIT] * 6 + [0, 255]))
        proto = draw(st.sampled_from([0] * 12 + [1, 0xFFFF]))
        length = len(pdu) + 1 + draw(st.sampled_from([0] * 16 + [-1, 1, -len(pdu), -len(pdu) - 1, 300]))
        out += struct.pack(">HHHB", tid, proto, length & 0xFFFF, unit) + pdu
    return out


class Probe(MbapConnection):
    """The real connection, checking after every segment that it keeps less than one frame."""

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        assert len(self._buffer) < 6 + MAX_LENGTH, len(self._buffer)


async def feed(stream: bytes, cuts: list[int]) -> Outcome:
    ours, theirs = socket.socketpair()
    try:
        connection = Probe("c")
        await asyncio.get_running_loop().create_connection(lambda: connection, sock=ours)
        waiter = connection.request(TID, UNIT, b"\x03\x00\x00\x00\x01", 60)
        bounds = [0, *sorted(c % (len(stream) + 1) for c in cuts), len(stream)]
        for a, b in itertools.pairwise(bounds):
            if a < b and connection.is_open:
                connection.data_received(stream[a:b])
        await asyncio.sleep(0)  # a dropped connection reports its end
        if not waiter.done():
            outcome: Outcome = ("waiting", b"")
        elif isinstance(exc := waiter.exception(), FrameError | LinkError):
            outcome = ("error", str(exc).encode())
        else:
            assert exc is None, exc
            outcome = ("reply", waiter.result())
        await connection.close()
        return outcome
    finally:
        theirs.close()


@given(streams(), st.lists(st.integers(0, 20_000), max_size=12))
def test_any_stream_in_any_segments_is_read_as_one_plain_reading_of_it(stream: bytes, cuts: list[int]) -> None:
    kind, value = expected(stream)
    event(f"{kind}: {value[:20]!r}" if kind == "error" else kind)
    got_kind, got = asyncio.run(feed(stream, cuts))
    assert got_kind == kind, (got_kind, got)
    if kind == "error":
        assert got.startswith(value), got
    else:
        assert got == value


@given(st.binary(max_size=600), st.lists(st.integers(0, 600), max_size=8))
def test_any_bytes_in_any_segments_give_a_reply_an_error_or_a_wait(stream: bytes, cuts: list[int]) -> None:
    kind, value = expected(stream)
    got_kind, got = asyncio.run(feed(stream, cuts))
    assert (got_kind, got if kind != "error" else got[: len(value)]) == (kind, value)

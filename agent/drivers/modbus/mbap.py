"""One Modbus TCP connection as an asyncio protocol: a request goes out in one write, replies are cut out of the
received bytes by their MBAP header, and the one waiting transaction gets its reply PDU straight from there.

It never keeps more than one incomplete frame of input (at most 260 bytes), never takes a reply of another
transaction id, and never raises out of a callback: a broken frame, an end of stream or a lost socket fails the
waiting transaction and drops the connection, since after a bad frame nothing on it can be trusted in step.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from typing import cast

from agent.drivers.links import MAX_UNREAD
from agent.drivers.modbus.codec import FrameError
from agent.errors import LinkError, NoReply

log = logging.getLogger(__name__)

MBAP = struct.Struct(">HHHB")
"""Transaction id, protocol id (0 for Modbus), length (unit id and PDU), unit id."""
MIN_LENGTH, MAX_LENGTH = 2, 254  # the length field: unit id and at least a function code, at most a 253-byte PDU


class MbapConnection(asyncio.Protocol):
    """The protocol of one TCP connection to a Modbus TCP server; one transaction at a time (`request`)."""

    def __init__(self, name: str) -> None:
        self.name = name  # the channel, for the log
        self.overflowed = 0  # bytes of replies nobody waited for, dropped
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._buffer = bytearray()
        self._lost: Exception | None = None
        self._closing = False
        self._closed: asyncio.Future[None] = self._loop.create_future()
        # the transaction in progress: its future, ids and deadline
        self._waiter: asyncio.Future[bytes] | None = None
        self._tid = -1
        self._unit = -1
        self._timeout = 0.0
        self._deadline = 0.0
        # one timer serves many transactions: it is moved only when a deadline comes earlier than it, and when it
        # fires before the current deadline it is set again, so a fast reply costs no timer of its own
        self._timer: asyncio.TimerHandle | None = None
        self._stray = 0  # bytes of replies nobody waited for since the last request

    @property
    def is_open(self) -> bool:
        return self._transport is not None and self._lost is None and not self._closing

    # --- the transaction --------------------------------------------------------------------------------------

    def request(self, tid: int, unit: int, pdu: bytes, timeout: float) -> asyncio.Future[bytes]:
        """Send one request; the future gets the reply PDU of `tid` from `unit`, or NoReply, FrameError, LinkError."""
        transport = self._transport
        if transport is None or self._lost is not None or self._closing:
            raise LinkError(f"channel {self.name}: not connected")
        if self._waiter is not None and not self._waiter.done():
            raise RuntimeError(f"channel {self.name}: a transaction is already waiting for its reply")
        loop = self._loop
        waiter: asyncio.Future[bytes] = loop.create_future()
        self._waiter, self._tid, self._unit, self._timeout, self._stray = waiter, tid, unit, timeout, 0
        deadline = self._deadline = loop.time() + timeout
        timer = self._timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = loop.call_at(deadline, self._on_timer)
        transport.write(MBAP.pack(tid, 0, len(pdu) + 1, unit) + pdu)
        return waiter

    def _on_timer(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if self._loop.time() < self._deadline:  # set for an earlier transaction: wait on for this one
            self._timer = self._loop.call_at(self._deadline, self._on_timer)
            return
        self._fail(NoReply(f"no reply within {self._timeout:g}s"))

    def _fail(self, exc: Exception) -> None:
        """Fail the waiting transaction with `exc` (or log it when none waits) and drop the connection."""
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        else:  # bytes nobody asked for
            log.warning("channel %s: dropped the connection: %s", self.name, exc)
        self._buffer.clear()
        self._lost = self._lost or exc
        if self._transport is not None:
            self._transport.abort()  # unread input and the rest of the stream go with it

    # --- asyncio.Protocol -------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._lost is not None:
            return  # aborted: what was already read is not to be trusted
        buffer = self._buffer
        received: bytes | bytearray = data
        if buffer:  # the start of a frame came before: join it (a reply mostly comes whole, and skips this copy)
            buffer += data
            received = buffer
        size = len(received)
        start = 0
        while size - start >= 7:
            tid, proto, length, unit = MBAP.unpack_from(received, start)
            if proto != 0 or not MIN_LENGTH <= length <= MAX_LENGTH:
                head = bytes(received[start : start + 7]).hex()
                self._fail(FrameError(f"bad MBAP header {head} (protocol {proto}, length {length})"))
                return
            end = start + 6 + length
            if end > size:
                break  # the rest of the frame is still on its way
            waiter = self._waiter
            if tid != self._tid or waiter is None or waiter.done():
                self._drop(tid, end - start)
                if self._lost is not None:
                    return
            elif unit != self._unit:
                self._fail(FrameError(f"reply from unit {unit} to a request for unit {self._unit}"))
                return
            else:
                self._waiter = None
                waiter.set_result(bytes(received[start + 7 : end]))
            start = end
        # what stays is less than one frame (at most 6 + MAX_LENGTH bytes), whatever the peer sends
        if received is buffer:
            del buffer[:start]
        elif start < size:
            buffer += data[start:]

    def _drop(self, tid: int, size: int) -> None:
        """A whole frame nobody waits for: a late reply, or a second answer; too many of them drop the link."""
        log.debug("channel %s: dropped late reply tid %d (waiting for %d)", self.name, tid, self._tid)
        self.overflowed += size
        self._stray += size
        if self._stray > MAX_UNREAD:
            self._fail(LinkError(f"channel {self.name}: the server sent more than {MAX_UNREAD} bytes of replies "
                                 "nobody asked for"))

    def eof_received(self) -> bool | None:
        return None  # the transport closes; connection_lost fails a waiting transaction

    def connection_lost(self, exc: Exception | None) -> None:
        partial = len(self._buffer)
        if self._lost is None:
            if self._closing:
                self._lost = LinkError(f"channel {self.name}: connection closed")
            elif exc is None:
                self._lost = LinkError(f"connection closed by the server ({partial} bytes of a reply read)")
            else:
                self._lost = LinkError(f"connection lost: {exc}")
            waiter, self._waiter = self._waiter, None
            if waiter is not None and not waiter.done():
                waiter.set_exception(self._lost)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._buffer.clear()
        if not self._closed.done():
            self._closed.set_result(None)

    # --- closing ----------------------------------------------------------------------------------------------

    async def close(self) -> None:
        """Close the connection and wait (at most 1 s) until the socket is gone."""
        self._closing = True
        if self._transport is None:
            return
        self._transport.close()
        try:
            await asyncio.wait_for(asyncio.shield(self._closed), 1.0)
        except TimeoutError:
            self._transport.abort()

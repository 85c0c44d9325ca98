"""The byte links the drivers share: a serial port (an RS-485 bus) on the event loop, and a TCP socket with the
same reading interface (for RTU framed over TCP through a serial device server). pyserial opens and configures
the port; reads arrive through a reader callback, so no thread blocks.

A link frames nothing: it moves bytes, knows the time one character takes on the wire (serial), and reports a
port or socket that disappeared as LinkError (a ConnectionError) so the driver can reopen it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import termios
from typing import Any, Protocol, cast

from agent.errors import LinkError, NoReply

PARITIES = {"N": "N", "E": "E", "O": "O", "M": "M", "S": "S"}
# what a link keeps of unread input: a few of the largest frames of any protocol here (Modbus RTU: 256 bytes,
# DL/T 645: about 220); a device or peer that sends more than that between reads loses the oldest bytes
MAX_UNREAD = 4096


def _keep_newest(buffer: bytearray, data: bytes) -> int:
    """Append `data`, keep at most MAX_UNREAD bytes (the newest: a reply follows the noise); return bytes lost."""
    buffer += data
    excess = len(buffer) - MAX_UNREAD
    if excess > 0:
        del buffer[:excess]
        return excess
    return 0


class _Input:
    """Unread input of a link: what arrived piles up here (bounded) and a transaction takes it by count."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._arrived = asyncio.Event()
        self._lost: BaseException | None = None
        self.overflowed = 0  # bytes dropped because more arrived than MAX_UNREAD between reads

    def _check(self) -> None:
        raise NotImplementedError

    def _received(self, data: bytes) -> None:
        self.overflowed += _keep_newest(self._buffer, data)
        self._arrived.set()

    async def read(self, nbytes: int, deadline: float) -> bytes:
        """Wait until `nbytes` are there and take them; TimeoutError at `deadline` (loop time) keeps the partial."""
        loop = asyncio.get_running_loop()
        while len(self._buffer) < nbytes:
            self._check()
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise NoReply(f"{len(self._buffer)} of {nbytes} bytes before the deadline")
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)
        data = bytes(self._buffer[:nbytes])
        del self._buffer[:nbytes]
        return data

    def discard_input(self) -> bytes:
        """Drop (and return) whatever arrived so far: stale bytes must not be taken for the next reply."""
        stale = bytes(self._buffer)
        self._buffer.clear()
        return stale

    def peek(self) -> bytes:
        return bytes(self._buffer)


class SerialLink(_Input):
    def __init__(
        self, port: str, *, baudrate: int = 9600, bytesize: int = 8, parity: str = "N", stopbits: float = 1
    ) -> None:
        if parity.upper() not in PARITIES:
            raise ValueError(f"parity must be one of N, E, O, M, S, not {parity!r}")
        self.port = port
        self.baudrate = baudrate
        self.bytesize = bytesize
        self.parity = parity.upper()
        self.stopbits = stopbits
        self._serial: Any = None
        self._fd: int | None = None
        super().__init__()

    @property
    def is_open(self) -> bool:
        return self._serial is not None and self._lost is None

    def char_time(self) -> float:
        """Seconds one character takes on the wire: start bit, data bits, parity bit, stop bits."""
        bits = 1 + self.bytesize + (0 if self.parity == "N" else 1) + self.stopbits
        return bits / self.baudrate

    def wire_time(self, nbytes: int) -> float:
        return nbytes * self.char_time()

    async def open(self) -> None:
        import serial  # pyserial, only where a serial channel exists

        if self._serial is not None:
            await self.close()
        try:
            port = serial.serial_for_url(
                self.port, baudrate=self.baudrate, bytesize=self.bytesize, parity=self.parity,
                stopbits=self.stopbits, timeout=0, write_timeout=2.0,
            )
        except (serial.SerialException, ValueError, termios.error) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise LinkError(f"cannot open serial port {self.port}: {reason}") from None
        self._serial = port
        self._lost = None
        self._buffer.clear()
        self._fd = port.fileno()
        asyncio.get_running_loop().add_reader(self._fd, self._on_readable)

    def _on_readable(self) -> None:
        assert self._fd is not None
        try:
            data = os.read(self._fd, 4096)
        except OSError as exc:  # EIO: the device is gone (adapter unplugged, pty closed)
            self._mark_lost(exc)
            return
        if not data:
            self._mark_lost(EOFError("end of file on the serial port"))
            return
        self._received(data)

    def _mark_lost(self, exc: BaseException) -> None:
        self._lost = exc
        if self._fd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._fd)
        self._arrived.set()

    def _check(self) -> None:
        if self._serial is None:
            raise LinkError(f"serial port {self.port} is not open")
        if self._lost is not None:
            raise LinkError(f"serial port {self.port} was lost: {self._lost}")

    async def close(self) -> None:
        port, self._serial = self._serial, None
        if port is not None:
            if self._fd is not None and self._lost is None:
                with contextlib.suppress(Exception):
                    asyncio.get_running_loop().remove_reader(self._fd)
            with contextlib.suppress(Exception):
                port.close()
        self._fd = None
        self._buffer.clear()

    async def write(self, data: bytes) -> None:
        """Send bytes and wait until they have left on the wire at the configured speed."""
        self._check()
        try:
            self._serial.write(data)
        except Exception as exc:  # pyserial raises SerialException/OSError when the port vanished
            self._mark_lost(exc)
            self._check()
        await asyncio.sleep(self.wire_time(len(data)))

    async def read_quiet(self, gap: float, deadline: float) -> bytes:
        """Everything that arrives until the line has been quiet for `gap` seconds (or the deadline)."""
        loop = asyncio.get_running_loop()
        while True:
            self._check()
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), min(gap, remaining))
            except TimeoutError:
                if self._buffer:
                    break
        data = bytes(self._buffer)
        self._buffer.clear()
        return data



class ByteLink(Protocol):
    """What a master needs of a byte link: SerialLink or TcpLink."""

    overflowed: int

    @property
    def is_open(self) -> bool: ...

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def write(self, data: bytes) -> None: ...

    async def read(self, nbytes: int, deadline: float) -> bytes: ...

    def discard_input(self) -> bytes: ...

    def peek(self) -> bytes: ...


class TcpLink(_Input, asyncio.Protocol):
    """A TCP socket with SerialLink's reading interface: bytes pile up in a buffer a transaction reads by count."""

    def __init__(self, host: str, port: int, connect_timeout: float) -> None:
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self._transport: asyncio.Transport | None = None
        super().__init__()

    @property
    def is_open(self) -> bool:
        return self._transport is not None and self._lost is None

    async def open(self) -> None:
        await self.close()
        self._lost = None
        loop = asyncio.get_running_loop()
        where = f"{self.host}:{self.port}"
        try:
            await asyncio.wait_for(loop.create_connection(lambda: self, self.host, self.port), self.connect_timeout)
        except TimeoutError:
            raise LinkError(f"connect to {where} timed out after {self.connect_timeout:g}s") from None
        except OSError as exc:
            reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
            raise LinkError(f"cannot connect to {where}: {reason}") from None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = exc or EOFError("closed by the device server")
        self._arrived.set()

    def _check(self) -> None:
        if self._transport is None:
            raise LinkError(f"{self.host}:{self.port} is not connected")
        if self._lost is not None:
            raise LinkError(f"connection to {self.host}:{self.port} lost: {self._lost}")

    async def close(self) -> None:
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.close()
        self._buffer.clear()

    async def write(self, data: bytes) -> None:
        self._check()
        assert self._transport is not None
        self._transport.write(data)


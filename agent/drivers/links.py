"""A serial port (an RS-485 bus) on the event loop: pyserial opens and configures it, reads arrive through a
reader callback, so no thread blocks. Used by every serial protocol driver and by the probes.

It frames nothing: it moves bytes, knows the time one character takes on the wire, and reports a port that
disappeared (a USB adapter pulled) as ConnectionError so the driver can reopen it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import termios
from typing import Any

PARITIES = {"N": "N", "E": "E", "O": "O", "M": "M", "S": "S"}


class SerialLink:
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
        self._buffer = bytearray()
        self._arrived = asyncio.Event()
        self._lost: BaseException | None = None

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
            raise ConnectionError(f"cannot open serial port {self.port}: {reason}") from None
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
        self._buffer += data
        self._arrived.set()

    def _mark_lost(self, exc: BaseException) -> None:
        self._lost = exc
        if self._fd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._fd)
        self._arrived.set()

    def _check(self) -> None:
        if self._serial is None:
            raise ConnectionError(f"serial port {self.port} is not open")
        if self._lost is not None:
            raise ConnectionError(f"serial port {self.port} was lost: {self._lost}")

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

    def discard_input(self) -> bytes:
        """Drop (and return) whatever arrived so far: stale bytes must not be taken for the next reply."""
        stale = bytes(self._buffer)
        self._buffer.clear()
        return stale

    async def write(self, data: bytes) -> None:
        """Send bytes and wait until they have left on the wire at the configured speed."""
        self._check()
        try:
            self._serial.write(data)
        except Exception as exc:  # pyserial raises SerialException/OSError when the port vanished
            self._mark_lost(exc)
            self._check()
        await asyncio.sleep(self.wire_time(len(data)))

    async def read(self, nbytes: int, deadline: float) -> bytes:
        """Wait until `nbytes` are there and take them; TimeoutError at `deadline` (loop time) keeps the partial."""
        loop = asyncio.get_running_loop()
        while len(self._buffer) < nbytes:
            self._check()
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"{len(self._buffer)} of {nbytes} bytes before the deadline")
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)
        data = bytes(self._buffer[:nbytes])
        del self._buffer[:nbytes]
        return data

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

    def peek(self) -> bytes:
        return bytes(self._buffer)

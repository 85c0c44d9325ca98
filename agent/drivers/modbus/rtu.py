"""Modbus RTU drivers: RTU frames (slave address, PDU, CRC-16) on an RS-485 serial port (`modbus_rtu`) or on a
TCP socket to a serial device server (`modbus_rtu_tcp`), strictly one transaction at a time per channel.

A reply is read by its expected length and taken only with a good CRC, the polled address and the asked
function; garbage is dropped with the rest of the line's noise and fails its block, never becomes a value.
A port or socket that vanished is reopened on the next poll. Importing this module opens nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Literal

from pydantic import Field

from agent.config.base import ChannelBase, Duration
from agent.drivers import registry
from agent.drivers.links import MAX_UNREAD, ByteLink, TcpLink
from agent.drivers.modbus.codec import (
    Block,
    BlockReader,
    FrameError,
    ModbusDevice,
    ModbusError,
    parse_read_reply,
    read_request,
)
from agent.errors import LinkError, NoReply

log = logging.getLogger(__name__)

READ_FUNCTIONS = (1, 2, 3, 4)
MAX_FRAME = 256
"""Longest RTU frame the spec allows (address + 253-byte PDU + CRC)."""

# --- CRC and framing -----------------------------------------------------------------------------------


def _crc_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC_TABLE = _crc_table()


def crc16(data: bytes) -> int:
    """CRC-16/MODBUS: polynomial 0xA001 (0x8005 reflected), initial value 0xFFFF; sent low byte first."""
    crc = 0xFFFF
    table = _CRC_TABLE
    for byte in data:
        crc = (crc >> 8) ^ table[(crc ^ byte) & 0xFF]
    return crc


def frame(address: int, pdu: bytes) -> bytes:
    """The RTU frame of one PDU: address, PDU, CRC low byte, CRC high byte."""
    body = bytes([address]) + pdu
    return body + crc16(body).to_bytes(2, "little")


class CrcError(FrameError):
    """A reply whose CRC does not match: noise on the line, or a frame cut short."""


def default_frame_gap(baudrate: int) -> float:
    """The Modbus serial line's t3.5: 3.5 character times, but at least 1.75 ms above 19200 baud. The
    standard counts an RTU character as 11 bits whatever the parity and stop bits (2.5.1)."""
    char = 11 / baudrate
    gap = 3.5 * char
    return max(gap, 0.00175) if baudrate > 19200 else gap


def reply_data_length(pdu: bytes) -> int:
    """Data bytes the reply to a read request PDU carries; ValueError for anything but functions 1-4."""
    if len(pdu) != 5 or pdu[0] not in READ_FUNCTIONS:
        raise ValueError("only the read functions 1-4 are supported")
    count = int.from_bytes(pdu[3:5], "big")
    return (count + 7) // 8 if pdu[0] in (1, 2) else 2 * count


# --- configuration -------------------------------------------------------------------------------------


class ModbusRtuDevice(ModbusDevice):
    """A slave on a serial bus; the same points, blocks and codecs as Modbus TCP."""

    unit: int = Field(
        1, ge=1, le=247, description="Slave address on the bus, 1-247 (0 is broadcast, which never answers)."
    )


class ModbusRtuChannel(ChannelBase):
    """One RS-485 (or RS-232) serial port and the slaves on its bus, polled in turn."""

    driver: Literal["modbus_rtu"]
    port: str = Field(
        min_length=1,
        description="Serial port: a device path (/dev/ttyUSB0, better /dev/serial/by-id/... which survives "
        "re-plugging) or a pyserial URL (e.g. rfc2217://host:port).",
    )
    baudrate: int = Field(9600, ge=300, le=4_000_000, description="Line speed in bit/s, as set on the slaves.")
    bytesize: Literal[8] = Field(8, description="Data bits; Modbus RTU frames 8-bit bytes, so always 8.")
    parity: Literal["N", "E", "O"] = Field(
        "E", description="Parity: E even (the Modbus serial line's default), O odd, N none; must match the slaves."
    )
    stopbits: Literal[1, 2] = Field(1, description="Stop bits (the spec asks 2 without parity; most slaves take 1).")
    frame_gap: Duration | None = Field(
        None,
        le=1.0,
        description="Silence kept between frames (t3.5). Default: 3.5 character times, and 1.75 ms above 19200 "
        "baud, per the Modbus serial line spec; raise it for slow slaves or converters that need a longer pause.",
    )
    devices: list[ModbusRtuDevice] = Field(min_length=1, description="Slaves polled on this bus, one at a time.")

    def char_time(self) -> float:
        """Seconds one character takes on the wire."""
        return (1 + self.bytesize + (0 if self.parity == "N" else 1) + self.stopbits) / self.baudrate

    def effective_frame_gap(self) -> float:
        if self.frame_gap is not None:
            return self.frame_gap
        return default_frame_gap(self.baudrate)


class ModbusRtuTcpChannel(ChannelBase):
    """RTU frames over TCP to a serial device server (Moxa NPort, USR-TCP232, ...) in raw TCP server mode."""

    driver: Literal["modbus_rtu_tcp"]
    host: str = Field(min_length=1, description="IP address or host name of the serial device server.")
    port: int = Field(ge=1, le=65535, description="TCP port of the server's serial port (e.g. 4001 on a Moxa).")
    connect_timeout: Duration = Field(3.0, gt=0, le=60, description="Longest wait to open the connection.")
    frame_gap: Duration = Field(
        0.0,
        le=1.0,
        description="Pause after a reply before the next request; the device server keeps the serial line's "
        "timing itself, so 0 is usual.",
    )
    devices: list[ModbusRtuDevice] = Field(min_length=1, description="Slaves on the server's bus, one at a time.")


# --- the master ------------------------------------------------------------------------------------------


class RtuMaster(BlockReader):
    """The RTU master of one bus: frames requests, reads and checks replies, keeps the line's silences.

    Subclasses say which link carries the frames. A device that did not answer its last request gets a
    single attempt per block (no retry), so a dead slave costs the bus one timeout per poll of it.
    """

    # a reply with a bad CRC or frame is noise on a bus that answers: the other blocks still get asked
    answered = (ModbusError, FrameError)

    def __init__(self, channel_id: str, *, gap: float, quiet: float, settle_max: float) -> None:
        self.channel_id = channel_id
        self.gap = gap
        self._quiet = quiet
        self._settle_max = settle_max
        self._plans = {}
        self._link: ByteLink | None = None
        self._lock = asyncio.Lock()
        self._idle_since = 0.0
        self._silent: set[str] = set()
        self._lost_logged = False
        self._overflow_reported = 0

    def _new_link(self) -> ByteLink:
        raise NotImplementedError

    def _where(self) -> str:
        raise NotImplementedError

    @property
    def connected(self) -> bool:
        return self._link is not None and self._link.is_open

    async def open(self) -> None:
        if self.connected:
            return
        if self._link is None:
            self._link = self._new_link()
            self._overflow_reported = 0
        try:
            await self._link.open()
        except ConnectionError:
            raise
        except Exception as exc:  # e.g. termios.error: settings the port refuses escape SerialLink.open
            raise LinkError(f"cannot open {self._where()}: {type(exc).__name__} {exc}") from None
        # a port just opened may still carry a frame in flight: start with a full silence
        self._idle_since = asyncio.get_running_loop().time()
        log.info("channel %s: opened %s", self.channel_id, self._where())
        self._lost_logged = False

    async def close(self) -> None:
        if self._link is not None:
            with contextlib.suppress(Exception):
                await self._link.close()

    async def transact(self, unit: int, pdu: bytes, timeout: float) -> bytes:
        """Send one read request PDU to `unit` and return its reply PDU (data or exception), CRC checked.

        Raises TimeoutError (no or incomplete reply), CrcError / FrameError (a reply that does not fit; the
        line is settled before returning), ConnectionError (the port or socket is gone; reopened next time).
        """
        data_len = reply_data_length(pdu)
        async with self._lock:
            try:
                if not self.connected:
                    await self.open()
                link = self._link
                assert link is not None
                await self._wait_idle(link)
                await link.write(frame(unit, pdu))
                deadline = asyncio.get_running_loop().time() + timeout
                try:
                    return await self._receive(link, unit, pdu[0], data_len, deadline, timeout)
                finally:
                    self._idle_since = asyncio.get_running_loop().time()
            except FrameError:
                await self._settle()
                raise
            except TimeoutError:
                raise  # a silent slave, not a lost port (TimeoutError is an OSError)
            except (OSError, EOFError) as exc:
                if not self._lost_logged:
                    log.warning("channel %s: %s: %s; reopening on the next poll", self.channel_id, self._where(),
                                exc)
                    self._lost_logged = True
                await self.close()
                raise

    async def _wait_idle(self, link: ByteLink) -> None:
        """Keep the frame gap after the last frame on the line, and drop whatever arrived since (not ours)."""
        if link.peek():  # a late reply or noise may still be arriving: let the line fall quiet first
            await self._settle()
        loop = asyncio.get_running_loop()
        wait = self._idle_since + self.gap - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        stale = link.discard_input()
        if stale:
            log.debug("channel %s: dropped %d stale bytes before a request", self.channel_id, len(stale))
        if link.overflowed > self._overflow_reported:
            log.warning("channel %s: %s sends without being asked: %d bytes dropped beyond the %d-byte input bound",
                        self.channel_id, self._where(), link.overflowed - self._overflow_reported, MAX_UNREAD)
            self._overflow_reported = link.overflowed

    async def _settle(self) -> None:
        """Drop input until the line has been quiet for a while (bounded): the tail of a bad frame must not be
        read as the start of the next reply."""
        link = self._link
        if link is None:
            return
        loop = asyncio.get_running_loop()
        limit = loop.time() + self._settle_max
        dropped = len(link.discard_input())
        while True:
            await asyncio.sleep(self._quiet)
            if not link.peek() or loop.time() >= limit:
                break
            dropped += len(link.discard_input())
        dropped += len(link.discard_input())
        self._idle_since = loop.time()
        if dropped:
            log.debug("channel %s: dropped %d bytes of noise", self.channel_id, dropped)

    async def _receive(self, link: ByteLink, unit: int, function: int, data_len: int, deadline: float,
                       timeout: float) -> bytes:
        """Read frames until the one from `unit`; a good frame of another slave (a late reply) is skipped."""
        others: list[int] = []
        expected = 1 + 2 + data_len + 2  # address, function, byte count, data, CRC
        got = 0
        try:
            while True:
                got = 0
                head = await link.read(2, deadline)
                got = 2
                address, fn = head
                if address == unit and fn == function:
                    total = expected
                elif fn & 0x80 and (fn & 0x7F) in READ_FUNCTIONS:
                    total = 5  # address, function | 0x80, exception code, CRC
                elif address != unit and fn in READ_FUNCTIONS:
                    count = await link.read(1, deadline)
                    head += count
                    got = 3
                    total = 5 + count[0]
                elif address == unit:
                    raise FrameError(f"reply with function {fn} from unit {unit} to a function {function} request")
                else:
                    raise FrameError(f"garbage on the line ({head.hex(' ')}...) instead of a reply from unit {unit}")
                whole = head + await link.read(total - len(head), deadline)
                if crc16(whole[:-2]) != int.from_bytes(whole[-2:], "little"):
                    shown = whole.hex(" ") if len(whole) <= 16 else whole[:16].hex(" ") + " ..."
                    raise CrcError(f"CRC error in a {len(whole)}-byte reply ({shown})")
                if address != unit:
                    others.append(address)
                    log.debug("channel %s: skipped a frame from unit %d while waiting for unit %d",
                              self.channel_id, address, unit)
                    continue
                return whole[1:-2]
        except TimeoutError:
            partial = got + len(link.peek())
            skipped = f" (ignored a frame from unit {', '.join(map(str, others))})" if others else ""
            if partial:
                raise NoReply(f"incomplete reply: {partial} bytes within {timeout:g}s{skipped}") from None
            raise NoReply(f"no reply within {timeout:g}s{skipped}") from None

    async def read_block(self, device: ModbusDevice, block: Block) -> bytes:
        pdu = read_request(block.function, block.start, block.count)
        attempts = 1 if device.id in self._silent else device.retries + 1
        for attempt in range(attempts):
            last = attempt == attempts - 1
            try:
                reply = await self.transact(device.unit, pdu, device.timeout)
                self._silent.discard(device.id)
                return parse_read_reply(reply, block.function, block.count)
            except ModbusError as exc:
                self._silent.discard(device.id)
                if exc.code not in (5, 6) or last:  # only "busy" is worth asking again
                    raise
            except TimeoutError:
                if last:
                    self._silent.add(device.id)
                    raise
            except FrameError:
                if last:
                    raise
            # a ConnectionError is not retried: the port is gone until the next poll reopens it
        raise AssertionError("unreachable")


class ModbusRtuDriver(RtuMaster):
    """Modbus RTU on a serial port through agent.drivers.links (pyserial is imported only when it opens)."""

    def __init__(self, channel: ModbusRtuChannel) -> None:
        gap = channel.effective_frame_gap()
        # a frame's tail arrives within a few character times; the longest frame bounds the wait
        super().__init__(channel.id, gap=gap, quiet=max(gap, 0.002),
                         settle_max=MAX_FRAME * channel.char_time() + 4 * gap + 0.05)
        self.channel = channel

    def _new_link(self) -> ByteLink:
        from agent.drivers.links import SerialLink

        ch = self.channel
        return SerialLink(ch.port, baudrate=ch.baudrate, bytesize=ch.bytesize, parity=ch.parity,
                          stopbits=ch.stopbits)

    def _where(self) -> str:
        ch = self.channel
        return f"{ch.port} ({ch.baudrate} {ch.bytesize}{ch.parity}{ch.stopbits})"


class ModbusRtuTcpDriver(RtuMaster):
    """Modbus RTU frames over one TCP connection to a serial device server."""

    def __init__(self, channel: ModbusRtuTcpChannel) -> None:
        # device servers forward serial bytes in TCP segments with pauses of their own
        super().__init__(channel.id, gap=channel.frame_gap,
                         quiet=max(channel.frame_gap, 0.02), settle_max=0.5)
        self.channel = channel

    def _new_link(self) -> ByteLink:
        ch = self.channel
        return TcpLink(ch.host, ch.port, ch.connect_timeout)

    def _where(self) -> str:
        return f"{self.channel.host}:{self.channel.port}"


registry.register("modbus_rtu", ModbusRtuChannel, ModbusRtuDriver)
registry.register("modbus_rtu_tcp", ModbusRtuTcpChannel, ModbusRtuTcpDriver)

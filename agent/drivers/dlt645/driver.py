"""DL/T 645-2007 driver: electricity meters on one serial port (an RS-485 bus), one data identifier per read.

Its configuration models, the bus transactions and the driver; the frame codec is agent.drivers.dlt645.codec.
The driver only ever reads (11H) and reads the address (13H): it never writes to a meter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from agent.config.base import ChannelBase, DeviceBase, Duration, Model, PointBase
from agent.core import DeviceRead
from agent.drivers import registry
from agent.drivers.dlt645.codec import (
    ABNORMAL,
    BROADCAST,
    FOLLOWS,
    KNOWN_DIS,
    READ,
    READ_ADDRESS,
    DataFormat,
    ErrorReply,
    Frame,
    FrameError,
    NoReply,
    decode_value,
    di_text,
    read_address_request,
    read_request,
    split_frame,
)
from agent.drivers.links import SerialLink
from agent.errors import LinkError

log = logging.getLogger(__name__)

# --- configuration ---------------------------------------------------------------------------------------


class Dlt645Format(Model):
    """The coding of a data identifier the driver does not know (see `edge-agent config schema`)."""

    bytes: int = Field(ge=1, le=8, description="BCD bytes of the value (low byte first on the wire).")
    decimals: int = Field(0, ge=0, le=16, description="Implied decimal places, e.g. 2 for XXXXXX.XX.")
    signed: bool = Field(False, description="The top bit of the most significant byte is the sign (1 = negative).")

    @model_validator(mode="after")
    def _digits(self) -> Dlt645Format:
        if self.decimals > 2 * self.bytes:
            raise ValueError(f"{self.decimals} decimals do not fit in {2 * self.bytes} digits")
        return self


class Dlt645Point(PointBase):
    di: str = Field(
        pattern=r"^[0-9A-Fa-f]{8}$",
        description="Data identifier DI3 DI2 DI1 DI0 as 8 hex digits, e.g. 00010000 (total forward active energy). "
        "Known: " + ", ".join(f"{di_text(k)} {f.name}" for k, f in KNOWN_DIS.items()) + ".",
    )
    format: Dlt645Format | None = Field(
        None, description="Coding of the value; required for a DI the driver does not know, else the standard's."
    )

    @model_validator(mode="before")
    @classmethod
    def _unit_of_known_di(cls, data: Any) -> Any:
        # a known DI brings its unit, so the platform sees kWh without every point repeating it
        if isinstance(data, dict) and "unit" not in data and isinstance(data.get("di"), str):
            with contextlib.suppress(ValueError):
                known = KNOWN_DIS.get(int(data["di"], 16))
                if known is not None and known.unit:
                    return {**data, "unit": known.unit}
        return data

    @field_validator("di", mode="before")
    @classmethod
    def _quoted(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            raise ValueError("write the data identifier in quotes, e.g. di: \"00010000\" (YAML reads it as a number)")
        return value

    @field_validator("di")
    @classmethod
    def _upper(cls, value: str) -> str:
        return value.upper()

    @model_validator(mode="after")
    def _format_known(self) -> Dlt645Point:
        if self.format is None and int(self.di, 16) not in KNOWN_DIS:
            raise ValueError(f"data identifier {self.di} is not one the driver knows: give its `format` "
                             "(bytes, decimals, signed)")
        return self

    def data_format(self) -> DataFormat:
        if self.format is not None:
            return DataFormat(self.format.bytes, self.format.decimals, self.format.signed, self.unit)
        return KNOWN_DIS[int(self.di, 16)]


class Dlt645Device(DeviceBase):
    address: str = Field(
        description="Meter address: the 12 decimal digits on its nameplate, quoted (leading zeros count).",
    )
    points: list[Dlt645Point] = Field(min_length=1, description="Points read from this meter, one DI each.")

    @field_validator("address", mode="before")
    @classmethod
    def _number(cls, value: Any) -> Any:
        # YAML reads an unquoted address as a number, which loses leading zeros
        if isinstance(value, int) and not isinstance(value, bool):
            if not 10**11 <= value < 10**12:
                raise ValueError(f"address {value} was read as a number: write it in quotes, leading zeros count")
            return str(value)
        return value

    @field_validator("address")
    @classmethod
    def _digits(cls, value: str) -> str:
        if len(value) != 12 or not value.isdigit() or not value.isascii():
            raise ValueError(f"a meter address is 12 decimal digits, not {value!r}")
        if value == BROADCAST:
            raise ValueError("999999999999 is the broadcast address, which no meter answers")
        return value


class Dlt645Channel(ChannelBase):
    """One serial port (an RS-485 bus) of DL/T 645-2007 meters, polled in turn."""

    driver: Literal["dlt645"]
    port: str = Field(min_length=1, description="Serial port, e.g. /dev/ttyUSB0 (or a pyserial URL).")
    baudrate: int = Field(2400, ge=300, le=115200, description="Bits per second; meters default to 2400.")
    bytesize: int = Field(8, ge=5, le=8, description="Data bits.")
    parity: str = Field("E", pattern=r"^[NEOMS]$", description="Parity: N, E (the standard's), O, M or S.")
    stopbits: float = Field(1, description="Stop bits: 1, 1.5 or 2.")
    preamble: int = Field(4, ge=0, le=4, description="FEH wake-up bytes sent before each request.")
    response_timeout: Duration = Field(
        0.5, ge=0.02, le=10,
        description="Longest wait from the end of a request to the first byte of the reply; the standard lets a "
        "meter take 20-500 ms (Td), so below 0.5 s a compliant meter may be missed.",
    )
    latency: Duration = Field(
        0.05, le=1, description="Allowance added to response_timeout for the adapter and the OS (a USB serial "
        "adapter holds bytes up to its latency timer, often 16 ms).",
    )
    gap: Duration = Field(
        0.02, le=2, description="Quiet time on the bus after a reply before the next request, so a meter's "
        "transmitter is off before the master talks.",
    )
    devices: list[Dlt645Device] = Field(min_length=1, description="Meters on this bus.")

    @field_validator("stopbits")
    @classmethod
    def _stopbits(cls, value: float) -> float:
        if value not in (1, 1.5, 2):
            raise ValueError(f"stopbits must be 1, 1.5 or 2, not {value}")
        return value

    @model_validator(mode="after")
    def _timeouts(self) -> Dlt645Channel:
        for device in self.devices:
            if device.timeout < self.response_timeout:
                raise ValueError(f"device {device.id}: timeout {device.timeout:g}s is shorter than the channel's "
                                 f"response_timeout {self.response_timeout:g}s")
        return self


# --- transactions ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Exchange:
    """One successful transaction: the request's bytes, the reply frame and the reply's data after the DI."""

    request: bytes
    frame: Frame
    payload: bytes


Accept = Callable[[Frame], str | None]
"""Judges a valid frame against the request: None takes it as the reply, a string says why it is ignored."""


class Dlt645Bus:
    """One serial port and its transactions, one at a time: request out, the matching reply in.

    A reply from another address or for another DI (a late reply, an echo) is skipped and waiting goes on; a
    corrupt frame fails the transaction once the line is quiet; an error reply fails it at once.
    """

    def __init__(
        self, port: str, *, baudrate: int = 2400, bytesize: int = 8, parity: str = "E", stopbits: float = 1,
        preamble: int = 4, response_timeout: float = 0.5, latency: float = 0.05, gap: float = 0.02,
    ) -> None:
        self.link = SerialLink(port, baudrate=baudrate, bytesize=bytesize, parity=parity, stopbits=stopbits)
        self.preamble = preamble
        self.response_timeout = response_timeout
        self.latency = latency
        self.gap = gap
        self.last_request = b""
        self._lock = asyncio.Lock()
        self._quiet_since = 0.0

    @property
    def is_open(self) -> bool:
        return self.link.is_open

    async def open(self) -> None:
        import termios  # only where a serial channel exists

        try:
            await self.link.open()
        except termios.error as exc:  # pyserial lets tcsetattr's error through (EINVAL, e.g. on some ptys)
            await self.link.close()
            raise LinkError(f"cannot configure serial port {self.link.port}: {exc}") from None

    async def close(self) -> None:
        await self.link.close()

    async def read(self, address: str, di: int, timeout: float) -> Exchange:
        """Read one data identifier of one meter; raises NoReply, FrameError, ErrorReply or ConnectionError."""
        want = di.to_bytes(4, "little")

        def accept(frame: Frame) -> str | None:
            if frame.address != address:
                return f"a reply from meter {frame.address}, not {address}"
            if frame.function != READ:
                return f"a reply with control {frame.control:02X} to a read (11H)"
            if frame.control & ABNORMAL:
                return None
            if frame.data[:4] != want:
                got = int.from_bytes(frame.data[:4], "little") if len(frame.data) >= 4 else None
                return f"a reply for DI {di_text(got) if got is not None else frame.data.hex()}, not {di_text(di)}"
            return None

        request = read_request(address, di, self.preamble)
        frame = await self.transact(request, accept, timeout)
        self._raise_abnormal(frame)
        return Exchange(request, frame, frame.data[4:])

    async def read_address(self, timeout: float) -> Exchange:
        """The address of the only meter on the bus (all-AA read address); several meters answer at once."""

        def accept(frame: Frame) -> str | None:
            if frame.function != READ_ADDRESS:
                return f"a reply with control {frame.control:02X} to a read address (13H)"
            return None

        request = read_address_request(self.preamble)
        frame = await self.transact(request, accept, timeout)
        self._raise_abnormal(frame)
        if len(frame.data) != 6:
            raise FrameError(f"read address reply with {len(frame.data)} data bytes, not 6", frame.raw)
        return Exchange(request, frame, frame.data)

    @staticmethod
    def _raise_abnormal(frame: Frame) -> None:
        if frame.control & ABNORMAL:
            raise ErrorReply(frame.data[0] if frame.data else 0, frame.raw)
        if frame.control & FOLLOWS:
            raise FrameError(f"reply with follow-up frames (control {frame.control:02X}), which this driver does "
                             "not read", frame.raw, "follow_up")

    async def transact(self, request: bytes, accept: Accept, timeout: float) -> Frame:
        """Send `request` and return the first valid frame from a meter that `accept` takes."""
        async with self._lock:
            link = self.link
            if not link.is_open:
                await self.open()
            loop = asyncio.get_running_loop()
            wait = self._quiet_since + self.gap - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            stale = link.discard_input()
            if stale:
                log.debug("%s: dropped %d stale bytes before a request: %s", link.port, len(stale), stale.hex(" "))
            self.last_request = request
            try:
                await link.write(request)
                return await self._receive(accept, timeout)
            except ConnectionError:
                await link.close()
                raise
            finally:
                self._quiet_since = loop.time()

    async def _receive(self, accept: Accept, timeout: float) -> Frame:
        link = self.link
        loop = asyncio.get_running_loop()
        sent = loop.time()
        # the reply's first byte is whole one character time after it started
        first_by = sent + min(self.response_timeout + self.latency + link.char_time(), timeout)
        deadline = sent + timeout
        settle = max(0.05, 10 * link.char_time())
        buffer = bytearray()
        received = bytearray()
        notes: list[str] = []
        corrupt: str | None = None
        corrupt_frame = b""
        while True:
            scan = split_frame(buffer)
            if scan.problem is not None:
                corrupt, corrupt_frame = scan.problem, bytes(buffer)
            if scan.skip:
                del buffer[: scan.skip]
            if scan.frame is not None:
                frame = scan.frame
                if not frame.from_meter:
                    continue  # our own request, echoed by a two-wire adapter
                reason = accept(frame)
                if reason is None:
                    return frame
                notes.append(f"ignored {reason}")
                continue
            if scan.missing == 0:
                continue
            limit = deadline if received else first_by
            if corrupt is not None:
                limit = min(limit, loop.time() + settle)  # the rest of a bad reply may still be on the wire
            try:
                # rescan on every arrival: a frame head in noise may claim more bytes than ever come
                chunk = await link.read(1, limit)
            except TimeoutError:
                break
            chunk += link.discard_input()
            received += chunk
            buffer += chunk
        return self._failed(loop.time() - sent, bytes(received), bytes(buffer), notes, corrupt, corrupt_frame)

    @staticmethod
    def _failed(waited: float, received: bytes, pending: bytes, notes: list[str], corrupt: str | None,
                corrupt_frame: bytes) -> Frame:
        """Raise the error that says best why no reply was taken."""
        ignored = f"; {'; '.join(notes)}" if notes else ""
        if corrupt is not None:
            kind = "checksum" if corrupt.startswith("checksum") else "bad_frame"
            raise FrameError(f"bad frame: {corrupt}{ignored}", corrupt_frame, kind)
        if pending:
            raise FrameError(f"truncated reply: {len(pending)} bytes of an incomplete frame "
                             f"({pending.hex(' ')}){ignored}", pending, "truncated")
        if received and not notes:
            raise NoReply(f"no reply within {waited:.2f}s, only noise ({received.hex(' ')})", received)
        raise NoReply(f"no reply within {waited:.2f}s{ignored}", received, notes)


# --- the driver ------------------------------------------------------------------------------------------


class Dlt645Driver:
    """Polls the meters of one channel; each distinct DI of a meter is one transaction."""

    def __init__(self, channel: Dlt645Channel) -> None:
        self.channel = channel
        self.bus = Dlt645Bus(
            channel.port, baudrate=channel.baudrate, bytesize=channel.bytesize, parity=channel.parity,
            stopbits=channel.stopbits, preamble=channel.preamble, response_timeout=channel.response_timeout,
            latency=channel.latency, gap=channel.gap,
        )
        # points sharing a DI are read once
        self._plans: dict[str, list[tuple[int, list[tuple[int, DataFormat]]]]] = {}
        for device in channel.devices:
            by_di: dict[int, list[tuple[int, DataFormat]]] = {}
            for index, point in enumerate(device.points):
                by_di.setdefault(int(point.di, 16), []).append((index, point.data_format()))
            self._plans[device.id] = list(by_di.items())

    @property
    def connected(self) -> bool:
        return self.bus.is_open

    async def open(self) -> None:
        if not self.bus.is_open:
            await self.bus.open()
            log.info("channel %s: opened %s at %d %d%s%g", self.channel.id, self.channel.port,
                     self.channel.baudrate, self.channel.bytesize, self.channel.parity, self.channel.stopbits)

    async def close(self) -> None:
        await self.bus.close()

    async def read_di(self, device: Dlt645Device, di: int) -> Exchange:
        """One DI with the device's retries; an error reply is the meter's answer and is not asked again."""
        attempts = device.retries + 1
        for attempt in range(attempts):
            try:
                return await self.bus.read(device.address, di, device.timeout)
            except (TimeoutError, FrameError):
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    async def read(self, device: DeviceBase) -> DeviceRead:
        assert isinstance(device, Dlt645Device)
        await self.open()
        values: list[object] = [None] * len(device.points)
        errors: list[str] = []
        plan = self._plans[device.id]
        for n, (di, targets) in enumerate(plan):
            what = f"DI {di_text(di)}"
            try:
                exchange = await self.read_di(device, di)
            except ErrorReply as exc:
                errors.append(f"{what}: {exc}")
                continue
            except (TimeoutError, ConnectionError) as exc:
                errors.append(f"{what}: {exc or type(exc).__name__}")
                if len(plan) > n + 1:
                    errors.append(f"{len(plan) - n - 1} more DI(s) skipped: the meter is not answering")
                break
            except FrameError as exc:
                errors.append(f"{what}: {exc}")
                continue
            for index, fmt in targets:
                try:
                    values[index] = decode_value(exchange.payload, fmt)
                except ValueError as exc:
                    errors.append(f"{what}: {exc}")
        return DeviceRead(values, errors)


registry.register("dlt645", Dlt645Channel, Dlt645Driver)

"""DL/T 645-2007 meter bus simulator: every `dlt645` channel of a configuration becomes a pseudo-terminal whose far
end (a stable symlink in a given folder) the agent opens, with several meters answering on it, for tests and demos.

Its frame code is written apart from the driver's on purpose (it imports only the driver's config models), so a
misreading of the standard in one shows up against the other. Meters answer read (11H) and read-address (13H)
only: no request ever changes a value; values change through this module's own API.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import termios
import time
import tty
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.config.loader import load_config
from agent.config.models import AgentConfig
from agent.drivers.dlt645.driver import Dlt645Channel, Dlt645Device, Dlt645Point
from simulators.plant import Plant, add_arguments, run_command, serve_until_stopped
from simulators.scenario import ramp

log = logging.getLogger("simulators.dlt645")  # not __main__ when run with -m

# --- the wire, per DL/T 645-2007 (kept independent of agent.drivers.dlt645.driver) ---------------------------------
#
# A frame: 68 A0 A1 A2 A3 A4 A5 68 C L DATA CS 16, the address A0 first (its low two digits), every DATA byte sent
# as byte + 33H mod 256, CS the sum mod 256 of every byte from the first 68 to the end of DATA. Worked by hand:
# reading DI 00010000 (total forward active energy) from meter 123456789012:
#   address 12 34 56 78 90 12 low byte first        -> 12 90 78 56 34 12
#   DI 00 01 00 00 low byte first                   -> 00 00 01 00, +33H -> 33 33 34 33
#   68+12+90+78+56+34+12+68 = 286H, +11+04 = 29BH, +33+33+34+33 = 368H -> CS 68
#   request: 68 12 90 78 56 34 12 68 11 04 33 33 34 33 68 16 (the checksum itself is 68H)
# and the reply for 1234.56 kWh (BCD 00 12 34 56, low byte first 56 34 12 00, +33H 89 67 45 33):
#   286H + 91 + 08 + CDH (the DI) + 89+67+45+33 (150H) = 554H -> CS 54
#   reply: 68 12 90 78 56 34 12 68 91 08 33 33 34 33 89 67 45 33 54 16

WAKE_UP = 0xFE
HEAD = 0x68
TAIL = 0x16
SHIFT = 0x33
ANY = 0xAA
"""An address byte of AAH in a request matches any two digits (so all-AA reaches every meter)."""

C_READ, C_READ_ADDRESS = 0x11, 0x13
R_READ, R_READ_ADDRESS, R_READ_ERROR = 0x91, 0x93, 0xD1
ERR_OTHER, ERR_NO_DATA = 0x01, 0x02

NOISE = bytes.fromhex("00 68 16 ff 68 55 aa 16 68 e5")
"""Line noise sent before a reply's preamble; it holds 68H and 16H to trap a reader that hunts for them."""

FAULTS = ("garbage", "bad_checksum", "truncated", "wrong_address", "error_reply", "drop")

# DI -> (bytes, decimals, signed, quantity), as the standard's data dictionary codes them
REGISTERS: dict[str, tuple[int, int, bool, str]] = {
    "00010000": (4, 2, False, "energy"),
    "00020000": (4, 2, False, "energy_reverse"),
    "02010100": (2, 1, False, "voltage_a"),
    "02010200": (2, 1, False, "voltage_b"),
    "02010300": (2, 1, False, "voltage_c"),
    "02020100": (3, 3, True, "current_a"),
    "02020200": (3, 3, True, "current_b"),
    "02020300": (3, 3, True, "current_c"),
    "02030000": (3, 4, True, "power"),
    "02030100": (3, 4, True, "power_a"),
    "02030200": (3, 4, True, "power_b"),
    "02030300": (3, 4, True, "power_c"),
    "02040000": (3, 4, True, "reactive"),
    "02060000": (2, 3, True, "pf"),
    "02060100": (2, 3, True, "pf_a"),
    "02060200": (2, 3, True, "pf_b"),
    "02060300": (2, 3, True, "pf_c"),
    "02800002": (2, 2, False, "frequency"),
}
PHASES = ("a", "b", "c")

SCENARIOS = ("production_during_shutdown",)
PULL = 0.05
"""Share of the distance to its centre a walked quantity recovers each tick (mean reversion)."""


def wire_address(digits: str) -> bytes:
    """'123456789012' -> 12 90 78 56 34 12: the digits read as hex pairs are BCD already; low pair first."""
    return bytes.fromhex(digits)[::-1]


def address_digits(wire: bytes) -> str:
    return wire[::-1].hex().upper()


def frame(address: bytes, control: int, payload: bytes) -> bytes:
    """A frame without wake-up bytes; `payload` is plain, the 33H shift is applied here."""
    head = bytes([HEAD, *address, HEAD, control, len(payload)]) + bytes((b + SHIFT) % 256 for b in payload)
    return head + bytes([sum(head) % 256, TAIL])


def bcd(value: float, size: int, decimals: int, signed: bool) -> bytes:
    """A value as `size` BCD bytes, low byte first; signed puts the sign in the top bit of the last byte.

    Values beyond the format are held at its largest magnitude, as a meter's display would be.
    """
    digits = 2 * size
    scaled = round(abs(value) * 10**decimals)
    scaled = min(scaled, (8 * 10 ** (digits - 1) - 1) if signed else 10**digits - 1)
    most_first = bytearray.fromhex(f"{scaled:0{digits}d}")
    if signed and value < 0 and scaled:
        most_first[0] |= 0x80
    return bytes(reversed(most_first))


def quantised(value: float, size: int, decimals: int, signed: bool) -> float:
    """The value a meter sends for `value` (rounded and held within the format), as a number."""
    digits = 2 * size
    top: int = (8 * 10 ** (digits - 1) - 1) if signed else 10**digits - 1
    scaled: int = min(round(abs(value) * 10**decimals), top)
    return (-scaled if signed and value < 0 else scaled) / float(10**decimals)


@dataclass
class Request:
    address: bytes
    control: int
    payload: bytes
    size: int  # bytes on the wire, wake-up bytes and noise before it included


class RequestReader:
    """Collects bytes from the master and cuts them into requests by the length byte; corrupt ones are dropped,
    as a meter drops them, silently."""

    def __init__(self) -> None:
        self.pending = bytearray()
        self.corrupt = 0
        self._lead = 0  # bytes dropped since the last request (wake-up bytes, noise), counted into its size

    def feed(self, data: bytes) -> list[Request]:
        self.pending += data
        buf = self.pending
        out: list[Request] = []
        i = mark = 0
        while True:
            while i < len(buf) and buf[i] != HEAD:
                i += 1
            if len(buf) - i < 10:
                break
            if buf[i + 7] != HEAD:
                i += 1
                continue
            end = i + 12 + buf[i + 9]
            if len(buf) < end:
                break
            whole = bytes(buf[i:end])
            if whole[-1] != TAIL or sum(whole[:-2]) % 256 != whole[-2]:
                self.corrupt += 1
                i += 1
                continue
            payload = bytes((b - SHIFT) % 256 for b in whole[10:-2])
            out.append(Request(whole[1:7], whole[8], payload, self._lead + end - mark))
            self._lead = 0
            mark = i = end
        del buf[:i]
        self._lead += i - mark
        return out


# --- the meters ------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Custom:
    """A DI the standard's table here does not have, served with the format its point configures."""

    size: int
    decimals: int
    signed: bool
    value: float


@dataclass(eq=False)
class _Meter:
    channel_id: str
    address: str
    device_ids: list[str]
    delay: float
    preamble: int
    base_kw: float
    rng: random.Random
    dead: bool = False
    energy: float = 0.0
    energy_reverse: float = 0.0
    power: float = 0.0
    pf: float = 0.9
    frequency: float = 50.0
    voltages: list[float] = field(default_factory=lambda: [220.0, 220.0, 220.0])
    shares: list[float] = field(default_factory=lambda: [1 / 3, 1 / 3, 1 / 3])
    pf_offsets: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    held: dict[str, float] = field(default_factory=dict)
    custom: dict[str, _Custom] = field(default_factory=dict)

    @property
    def wire(self) -> bytes:
        return wire_address(self.address)

    def quantity(self, name: str) -> float:
        """A quantity in the meter's own unit (kWh, V, A, kW, kvar, Hz, power factor)."""
        if name in self.held:
            return self.held[name]
        if name == "energy":
            return self.energy
        if name == "energy_reverse":
            return self.energy_reverse
        if name == "power":
            return self.power
        if name == "pf":
            return self.pf
        if name == "frequency":
            return self.frequency
        if name == "reactive":
            pf = min(1.0, max(0.05, abs(self.quantity("pf"))))
            return self.quantity("power") * math.tan(math.acos(pf))
        kind, _, phase = name.partition("_")
        k = PHASES.index(phase)
        if kind == "voltage":
            return self.voltages[k]
        if kind == "pf":
            return max(-1.0, min(1.0, self.quantity("pf") + self.pf_offsets[k]))
        if kind == "power":
            return self.quantity("power") * self.shares[k]
        if kind == "current":
            volts = max(1.0, self.quantity(f"voltage_{phase}"))
            pf = max(0.05, abs(self.quantity(f"pf_{phase}")))
            return self.quantity(f"power_{phase}") * 1000.0 / (volts * pf)
        raise KeyError(name)

    def step(self, elapsed: float) -> None:
        """Move the walked quantities one step; energy counts the power over `elapsed` seconds."""
        rnd = self.rng.random
        self.power += PULL * (self.base_kw - self.power) + 0.05 * self.base_kw * (rnd() - 0.5)
        self.pf += PULL * (0.9 - self.pf) + 0.01 * (rnd() - 0.5)
        self.frequency += PULL * (50.0 - self.frequency) + 0.01 * (rnd() - 0.5)
        self.voltages = [v + PULL * (220.0 - v) + 0.8 * (rnd() - 0.5) for v in self.voltages]
        power = self.quantity("power")
        hours = elapsed / 3600.0
        if power >= 0:
            self.energy += power * hours
        else:
            self.energy_reverse -= power * hours

    def read(self, di: str) -> bytes | None:
        """The BCD value of a DI, or None when the meter has no such data."""
        register = REGISTERS.get(di)
        if register is not None:
            size, decimals, signed, name = register
            return bcd(self.quantity(name), size, decimals, signed)
        custom = self.custom.get(di)
        if custom is not None:
            return bcd(custom.value, custom.size, custom.decimals, custom.signed)
        return None


@dataclass(eq=False)
class _Served:
    point: Dlt645Point
    meter: _Meter


@dataclass(eq=False)
class _Bus:
    channel: Dlt645Channel
    link: Path
    meters: list[_Meter]
    char_time: float
    master: int | None = None
    slave: int | None = None
    down: bool = False
    reader: RequestReader = field(default_factory=RequestReader)
    queue: asyncio.Queue[tuple[float, Request]] = field(default_factory=asyncio.Queue)
    faults: collections.deque[tuple[str, int]] = field(default_factory=collections.deque)
    worker: asyncio.Task[None] | None = None

    def wire_time(self, nbytes: int) -> float:
        return nbytes * self.char_time


# --- the simulator ---------------------------------------------------------------------------------------


class Dlt645BusSimulator(Plant):
    """Serves every `dlt645` channel of `config` on a pseudo-terminal, one meter per distinct address.

    The agent opens `folder/ttyMeter-<channel id>` (see `channel_overrides`). Each meter answers after
    `response_delay` (20-500 ms, as the standard allows) plus the wire time of the request and of its reply at
    the channel's baud rate. Values are engineering units (after the point's scale and offset) throughout.
    """

    SCENARIOS = SCENARIOS
    PROTOCOL = "dlt645"
    WALK_TASK = "dlt645 walk"

    def __init__(
        self,
        config: AgentConfig,
        *,
        folder: Path,
        response_delay: float = 0.05,
        period: float = 1.0,
        speed: float = 1.0,
        seed: int | None = None,
        idle_kw: float = 1.5,
        production_kw: float = 60.0,
        reply_preamble: int | None = None,
    ) -> None:
        _check_delay(response_delay)
        super().__init__(period=period, speed=speed)
        if reply_preamble is not None and not 0 <= reply_preamble <= 4:
            raise ValueError("reply_preamble must be 0 to 4 wake-up bytes")
        self.config = config
        self.folder = Path(folder)
        self.idle_kw = idle_kw
        self.production_kw = production_kw
        self.changes: list[tuple[float, str, float]] = []
        """(time.time(), point id, value) of every set_value, scenarios included, in order."""
        self.requests: collections.deque[tuple[float, str, str, int, str | None]] = collections.deque(maxlen=10000)
        """(loop time, channel id, address, control, DI or None) of every well-formed request heard."""
        self._rng = random.Random(seed)
        self._buses: dict[str, _Bus] = {}
        self._points: dict[str, _Served] = {}
        count = 0
        for channel in config.channels:
            if not isinstance(channel, Dlt645Channel):
                continue
            bits = 1 + channel.bytesize + (0 if channel.parity == "N" else 1) + channel.stopbits
            bus = _Bus(channel, self.folder / f"ttyMeter-{channel.id}", [], bits / channel.baudrate)
            by_address: dict[str, list[Dlt645Device]] = {}
            for device in channel.devices:
                # devices sharing an address are one meter read as several devices (e.g. two intervals)
                by_address.setdefault(device.address, []).append(device)
            for address, devices in by_address.items():
                meter = self._meter(channel.id, address, devices, count, response_delay, reply_preamble)
                bus.meters.append(meter)
                count += 1
            self._buses[channel.id] = bus

    def _meter(self, channel_id: str, address: str, devices: list[Dlt645Device], index: int, delay: float,
               preamble: int | None) -> _Meter:
        rng = random.Random(self._rng.random())
        base = round(8.0 + 40.0 * rng.random(), 1)
        meter = _Meter(channel_id, address, [d.id for d in devices], delay,
                       index % 5 if preamble is None else preamble, base, rng)
        meter.power = base
        meter.energy = round(10000.0 + 90000.0 * rng.random(), 2)
        meter.energy_reverse = round(10.0 * rng.random(), 2)
        meter.pf = 0.88 + 0.04 * rng.random()
        meter.voltages = [218.0 + 4.0 * rng.random() for _ in PHASES]
        share = [1.0 + 0.1 * (rng.random() - 0.5) for _ in PHASES]
        meter.shares = [s / sum(share) for s in share]
        meter.pf_offsets = [0.02 * (rng.random() - 0.5) for _ in PHASES]
        for device in devices:
            for point in device.points:
                self._points[point.id] = _Served(point, meter)
                if point.di not in REGISTERS and point.format is not None:
                    low, high = point.range if point.range is not None else (0.0, 0.0)
                    raw = ((low + high) / 2 - point.offset) / point.scale if point.scale else 0.0
                    meter.custom[point.di] = _Custom(point.format.bytes, point.format.decimals, point.format.signed,
                                                     raw)
        return meter

    # --- lifecycle ---

    def channel_overrides(self) -> dict[str, dict[str, Any]]:
        """Channel id -> the config fields the agent must use to reach this simulator."""
        return {cid: {"port": str(bus.link)} for cid, bus in self._buses.items()}

    @property
    def paths(self) -> dict[str, Path]:
        return {cid: bus.link for cid, bus in self._buses.items()}

    async def _open(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for bus in self._buses.values():
            if not bus.down:
                self._plug(bus)
            bus.worker = asyncio.create_task(self._serve(bus), name=f"dlt645 bus {bus.channel.id}")

    def _workers(self) -> list[asyncio.Task[Any]]:
        return [bus.worker for bus in self._buses.values() if bus.worker is not None]

    async def _close(self) -> None:
        for bus in self._buses.values():
            bus.worker = None
            self._unplug(bus)

    def _plug(self, bus: _Bus) -> None:
        """A new pseudo-terminal behind the bus's stable path (an adapter plugged in)."""
        master, slave = os.openpty()
        # raw before anyone opens it: a cooked tty would echo requests back and mangle bytes
        tty.setraw(slave)
        os.set_blocking(master, False)
        bus.master, bus.slave = master, slave
        bus.reader = RequestReader()
        self._leave_speed(bus)
        temporary = bus.link.with_name(f".{bus.link.name}.{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        temporary.symlink_to(os.ttyname(slave))
        temporary.replace(bus.link)  # atomic: the path is never missing while it is replaced
        asyncio.get_running_loop().add_reader(master, self._readable, bus)
        log.info("channel %s: meters %s on %s", bus.channel.id, ", ".join(m.address for m in bus.meters), bus.link)

    @staticmethod
    def _leave_speed(bus: _Bus) -> None:
        """Leave the pty at a speed other than the channel's. Linux refuses (EINVAL) to set parity on a pty unless
        the speed changes in the same call, so without this a second open of the port with parity E fails."""
        if bus.slave is None:
            return
        attrs = termios.tcgetattr(bus.slave)
        other = termios.B38400 if bus.channel.baudrate != 38400 else termios.B19200
        if attrs[4] != other or attrs[5] != other:
            attrs[4] = attrs[5] = other
            with contextlib.suppress(termios.error):
                termios.tcsetattr(bus.slave, termios.TCSANOW, attrs)

    def _unplug(self, bus: _Bus) -> None:
        """Close the pseudo-terminal and remove the path: the agent's port reports the device gone."""
        if bus.master is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(bus.master)
            os.close(bus.master)
        if bus.slave is not None:
            os.close(bus.slave)
        bus.master = bus.slave = None
        with contextlib.suppress(FileNotFoundError):
            bus.link.unlink()

    def set_channel_down(self, channel_id: str, down: bool) -> None:
        """Down pulls the adapter (the pty closes, the path disappears); up plugs a new one behind the same path."""
        bus = self._bus(channel_id)
        bus.down = down
        if not self._started:
            return
        if down:
            self._unplug(bus)
            while not bus.queue.empty():
                bus.queue.get_nowait()
        elif bus.master is None:
            self._plug(bus)

    # --- the wire ---

    def _readable(self, bus: _Bus) -> None:
        assert bus.master is not None
        try:
            data = os.read(bus.master, 4096)
        except BlockingIOError:
            return
        except OSError:  # nobody has the far end open; our own slave fd normally prevents this
            return
        now = asyncio.get_running_loop().time()
        self._leave_speed(bus)
        for request in bus.reader.feed(data):
            bus.queue.put_nowait((now, request))

    async def _serve(self, bus: _Bus) -> None:
        """Answer the requests of one bus in order: one transaction at a time, as on a half-duplex line."""
        loop = asyncio.get_running_loop()
        while True:
            heard, request = await bus.queue.get()
            reply, delay = self._answer(bus, request, loop.time())
            if reply is None:
                continue
            fault, code = bus.faults.popleft() if bus.faults else ("", 0)
            if fault == "drop":
                continue
            if fault == "error_reply":
                reply = frame(reply[1:7], R_READ_ERROR, bytes([code]))
            elif fault == "wrong_address":
                reply = self._other_address(bus, reply)
            elif fault == "bad_checksum":
                reply = reply[:-2] + bytes([(reply[-2] + 1) % 256, TAIL])
            elif fault == "truncated":
                reply = reply[: len(reply) // 2]
            meter = self._addressed(bus, request.address)
            wake = bytes([WAKE_UP]) * (meter[0].preamble if meter else 0)
            data = (NOISE if fault == "garbage" else b"") + wake + reply
            # the request is still on the wire until its last byte; the meter waits its delay after that
            start = heard + bus.wire_time(request.size) + delay
            await asyncio.sleep(max(0.0, start - loop.time()))
            await self._send(bus, data)

    def _answer(self, bus: _Bus, request: Request, now: float) -> tuple[bytes | None, float]:
        """The reply frame (without wake-up bytes) and the responding meter's delay; None when nobody answers."""
        di = request.payload[3::-1].hex().upper() if request.control == C_READ and len(request.payload) >= 4 \
            else None
        self.requests.append((now, bus.channel.id, address_digits(request.address), request.control, di))
        meters = [m for m in self._addressed(bus, request.address) if not m.dead]
        if not meters or request.address == b"\x99" * 6:  # broadcast: commands nobody answers
            return None, 0.0
        replies = []
        for meter in meters:
            if request.control == C_READ and di is not None:
                value = meter.read(di)
                if value is None:
                    replies.append(frame(meter.wire, R_READ_ERROR, bytes([ERR_NO_DATA])))
                else:
                    replies.append(frame(meter.wire, R_READ, request.payload[:4] + value))
            elif request.control == C_READ_ADDRESS:
                replies.append(frame(meter.wire, R_READ_ADDRESS, meter.wire))
            else:
                replies.append(frame(meter.wire, 0xC0 | request.control, bytes([ERR_OTHER])))
        delay = min(m.delay for m in meters)
        if len(replies) == 1:
            return replies[0], delay
        # several meters talking at once: on the line the frames garble each other
        log.warning("channel %s: %d meters answer address %s at once", bus.channel.id, len(replies),
                    address_digits(request.address))
        garbled = bytearray(max(len(r) for r in replies))
        garbled[:] = b"\xff" * len(garbled)
        for r in replies:
            for i, b in enumerate(r):
                garbled[i] &= b
        return bytes(garbled), delay

    @staticmethod
    def _addressed(bus: _Bus, address: bytes) -> list[_Meter]:
        return [m for m in bus.meters
                if all(a in (ANY, b) for a, b in zip(address, m.wire, strict=True))]

    @staticmethod
    def _other_address(bus: _Bus, reply: bytes) -> bytes:
        """The same reply as if another meter had sent it."""
        own = reply[1:7]
        others = [m.wire for m in bus.meters if m.wire != own]
        other = others[0] if others else bytes([own[0] ^ 0x01]) + own[1:]
        body = bytes([HEAD, *other]) + reply[7:-2]
        return body + bytes([sum(body) % 256, TAIL])

    async def _send(self, bus: _Bus, data: bytes) -> None:
        """Write at the baud rate: a chunk about every 10 ms, so the bytes arrive over their wire time."""
        per_chunk = max(1, int(0.01 / bus.char_time))
        for offset in range(0, len(data), per_chunk):
            chunk = data[offset : offset + per_chunk]
            if bus.master is None:
                return
            try:
                os.write(bus.master, chunk)
            except BlockingIOError:  # nobody reads the far end and its buffer is full: the bytes are lost
                log.debug("channel %s: far end not reading, %d bytes lost", bus.channel.id, len(chunk))
            except OSError:
                return
            await asyncio.sleep(bus.wire_time(len(chunk)))

    # --- faults ---

    def _bus(self, channel_id: str) -> _Bus:
        return self._channel_of(self._buses, channel_id)

    def _device(self, channel_id: str, device_id: str) -> _Meter:
        return self._device_of(channel_id, device_id, self._bus(channel_id).meters, lambda meter: meter.device_ids)

    def set_meter_dead(self, channel_id: str, device_id: str, dead: bool) -> None:
        """A dead meter hears requests but never answers, so the master times out."""
        self._device(channel_id, device_id).dead = dead

    def set_response_delay(self, channel_id: str, device_id: str, seconds: float) -> None:
        """How long the meter waits after a request before it answers (the standard's Td, 20-500 ms)."""
        _check_delay(seconds)
        self._device(channel_id, device_id).delay = seconds

    def inject(self, channel_id: str, fault: str, *, error: int = ERR_OTHER) -> None:
        """Spoil the next reply on the channel: `garbage` before its preamble, a `bad_checksum`, `truncated`
        halfway, `wrong_address` (sent as another meter), `error_reply` (error byte `error`) or `drop` it.
        Faults queue up, one per reply."""
        if fault not in FAULTS:
            raise ValueError(f"no fault {fault!r} (one of {', '.join(FAULTS)})")
        self._bus(channel_id).faults.append((fault, error))

    # --- values ---

    def _served(self, point_id: str) -> _Served:
        return self._point_of(self._points, point_id)

    def set_value(self, point_id: str, value: float) -> None:
        """Set a point now (engineering units). An energy register keeps counting from there; anything else is
        held until `release` (a phase current or power is held apart from the totals it is derived from)."""
        served = self._served(point_id)
        point, meter = served.point, served.meter
        if point.scale == 0:
            raise ValueError(f"point {point.id}: scale 0 cannot be inverted")
        raw = (float(value) - point.offset) / point.scale
        register = REGISTERS.get(point.di)
        if register is None:
            meter.custom[point.di].value = raw
        elif register[3] == "energy":
            meter.energy = raw
        elif register[3] == "energy_reverse":
            meter.energy_reverse = raw
        else:
            meter.held[register[3]] = raw
        self.changes.append((time.time(), point_id, float(value)))

    def release(self, point_id: str) -> None:
        """Let a held quantity follow the meter again."""
        served = self._served(point_id)
        register = REGISTERS.get(served.point.di)
        if register is not None:
            served.meter.held.pop(register[3], None)

    def value(self, point_id: str) -> float:
        """The point's engineering value as the meter would send it now."""
        served = self._served(point_id)
        point, meter = served.point, served.meter
        register = REGISTERS.get(point.di)
        if register is not None:
            size, decimals, signed, name = register
            raw = quantised(meter.quantity(name), size, decimals, signed)
        else:
            custom = meter.custom[point.di]
            raw = quantised(custom.value, custom.size, custom.decimals, custom.signed)
        return raw * point.scale + point.offset

    def walk(self, elapsed: float | None = None) -> None:
        """Move every meter one step; energy counts `elapsed` seconds (one period when omitted)."""
        for bus in self._buses.values():
            for meter in bus.meters:
                meter.step(self.period if elapsed is None else elapsed)

    async def _tick(self, elapsed: float) -> None:
        self.walk(elapsed)
        for bus in self._buses.values():
            self._leave_speed(bus)  # also after an open that sent nothing

    # --- scenarios ---

    def scenarios(self) -> list[str]:
        return list(SCENARIOS)

    def _power_point(self) -> Dlt645Point:
        for served in self._points.values():
            if served.point.di == "02030000":
                return served.point
        raise ValueError("no total active power point (DI 02030000) is served")

    async def _ramp(self, point: Dlt645Point, target_kw: float, seconds: float, speed: float) -> None:
        meter = self._points[point.id].meter
        async for kw in ramp(meter.quantity("power"), target_kw, seconds, speed):
            self.set_value(point.id, kw * point.scale + point.offset)

    async def production_during_shutdown(self, *, speed: float | None = None) -> None:
        """The first total active power point: the site idles (ordered shutdown), then its load rises to the
        production level, holds, and falls back to idle, as if production went on during a halt."""
        pace = speed or self.speed
        point = self._power_point()
        try:
            log.info("scenario production_during_shutdown: %s idles at %g kW", point.id, self.idle_kw)
            await self._ramp(point, self.idle_kw, 5.0, pace)
            await asyncio.sleep(10.0 / pace)
            log.info("scenario production_during_shutdown: %s rises to %g kW", point.id, self.production_kw)
            await self._ramp(point, self.production_kw, 15.0, pace)
            await asyncio.sleep(30.0 / pace)
            log.info("scenario production_during_shutdown: %s falls back to %g kW", point.id, self.idle_kw)
            await self._ramp(point, self.idle_kw, 15.0, pace)
            await asyncio.sleep(10.0 / pace)
        finally:
            self.release(point.id)
        log.info("scenario production_during_shutdown: done")


def _check_delay(seconds: float) -> None:
    if not 0.02 <= seconds <= 0.5:
        raise ValueError(f"a response delay must be 20-500 ms as the standard sets it, not {seconds * 1000:g} ms")


# --- command line ------------------------------------------------------------------------------------------


def _arguments(argv: Iterable[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m simulators.dlt645", description=__doc__)
    parser.add_argument("--config", type=Path, required=True, help="serve the dlt645 channels of this configuration")
    parser.add_argument("--folder", type=Path, help="where the port paths go (default: a new temporary folder)")
    parser.add_argument("--response-delay", type=float, default=0.05, help="seconds a meter waits (0.02-0.5)")
    add_arguments(parser, SCENARIOS, values="the values", verbose="log meters and scenario steps")
    return parser.parse_args(None if argv is None else list(argv))


async def _serve(args: argparse.Namespace, folder: Path) -> None:
    config = load_config(args.config)
    sim = Dlt645BusSimulator(config, folder=folder, response_delay=args.response_delay, period=args.period,
                             speed=args.speed, seed=args.seed)
    if not sim.paths:
        raise ValueError(f"{args.config}: no dlt645 channel to serve")
    await serve_until_stopped(sim, args, lambda: (f"serving {channel} {path}" for channel, path in sim.paths.items()))


def main(argv: Iterable[str] | None = None) -> int:
    args = _arguments(argv)
    folder = args.folder or Path(tempfile.mkdtemp(prefix="dlt645-"))
    try:
        return run_command(args, lambda: asyncio.run(_serve(args, folder)))
    finally:
        if args.folder is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

"""Modbus RTU gas-detector controller simulator: serves every `modbus_rtu` channel of a configuration on a
pseudo-terminal (the agent opens a stable link to its slave side) and every `modbus_rtu_tcp` channel on a TCP
port, several slaves to a bus, with the wire's timing, dead and slow slaves, spoiled replies, unplugging and a
gas leak.

Its RTU framing and CRC are written here, apart from the driver's, so that one misreading of the spec shared by
both could not pass the tests. It only answers reads; values change only through this module's API.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import random
import signal
import struct
import sys
import tempfile
import termios
import time
import tty
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.config.models import AgentConfig, load_config
from agent.drivers.modbus.codec import BIT_TABLES, REGISTERS, ModbusDevice, ModbusPoint
from agent.drivers.modbus.rtu import ModbusRtuChannel, ModbusRtuTcpChannel
from simulators.modbus import _INT_BOUNDS, _engineering, _raw_of, _Run, _Served, _Unit, normal_band
from simulators.scenario import ScenarioPlayer

log = logging.getLogger("simulators.modbus_rtu")  # not __main__ when run with -m

SCENARIOS = ("gas_leak",)
FAULTS = ("bad_crc", "truncated", "garbage_before", "wrong_address", "noise")
"""Ways the next reply of a slave can be spoiled (see `inject_fault`)."""

_TABLE_OF_FUNCTION = {1: "coil", 2: "discrete", 3: "holding", 4: "input"}
_GARBAGE = b"\x00\xff\x13\x37"


# --- the wire: CRC and the slaves' answers ------------------------------------------------------------------


def crc16(data: bytes) -> int:
    """CRC-16/MODBUS, bit by bit as the spec's flow chart draws it (the driver uses a table; they must agree)."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            lsb = crc & 1
            crc >>= 1
            if lsb:
                crc ^= 0xA001
    return crc


def with_crc(body: bytes) -> bytes:
    return body + struct.pack("<H", crc16(body))


def t35(baudrate: int, bits_per_char: float) -> float:
    """The silence that ends a frame: 3.5 characters, fixed at 1.75 ms above 19200 baud."""
    return 0.00175 if baudrate > 19200 else 3.5 * bits_per_char / baudrate


@dataclass(eq=False)
class _Slave:
    unit: _Unit
    tables: set[str]
    dead: bool = False
    delay: float = 0.0
    faults: list[str] = field(default_factory=list)
    heard: int = 0


def _answer(slave: _Slave, pdu: bytes) -> bytes:
    """The reply PDU a slave gives to a request PDU: data, or an exception (illegal function/address/value)."""
    function = pdu[0]
    table = _TABLE_OF_FUNCTION.get(function)
    if table is None or len(pdu) != 5:
        return bytes([function | 0x80, 1])
    start, count = struct.unpack(">HH", pdu[1:5])
    words = slave.unit.words[table]
    if table in BIT_TABLES:
        if not 1 <= count <= 2000:
            return bytes([function | 0x80, 3])
        if table not in slave.tables or start + count > 16 * len(words):
            return bytes([function | 0x80, 2])
        data = bytearray((count + 7) // 8)
        for i in range(count):
            address = start + i
            if (words[address >> 4] >> (address & 15)) & 1:
                data[i >> 3] |= 1 << (i & 7)
        return bytes([function, len(data)]) + bytes(data)
    if not 1 <= count <= 125:
        return bytes([function | 0x80, 3])
    if table not in slave.tables or start + count > len(words):
        return bytes([function | 0x80, 2])
    return bytes([function, 2 * count]) + struct.pack(f">{count}H", *words[start : start + count])


def _spoil(reply: bytes, fault: str) -> bytes:
    if fault == "bad_crc":
        return reply[:-1] + bytes([reply[-1] ^ 0x5A])
    if fault == "truncated":
        return reply[: max(2, len(reply) - 3)]
    if fault == "garbage_before":
        return _GARBAGE + reply
    if fault == "wrong_address":
        return with_crc(bytes([reply[0] % 247 + 1]) + reply[1:-2])
    return b"\xff" * len(reply)  # noise


class _Receiver:
    """Frames requests the way a slave does: the bytes between two silences of t3.5 are one frame."""

    def __init__(self, bus: _Bus, send: Callable[[bytes], None]) -> None:
        self.bus = bus
        self.send = send
        self.buffer = bytearray()
        self.timer: asyncio.TimerHandle | None = None

    def feed(self, data: bytes) -> None:
        self.buffer += data
        if self.timer is not None:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(self.bus.gap, self._end)

    def _end(self) -> None:
        self.timer = None
        request, self.buffer = bytes(self.buffer), bytearray()
        self.bus.handle(request, self.send)

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class _Bus:
    """One channel: the slaves on it and the line they share (a pty pair, or a TCP listener)."""

    def __init__(self, config: ModbusRtuChannel | ModbusRtuTcpChannel, link: Path | None, port: int) -> None:
        self.config = config
        self.slaves: dict[int, _Slave] = {}
        self.link = link
        self.port = port
        self.parity = "N"
        if isinstance(config, ModbusRtuChannel):
            self.parity = config.parity
            bits = 1 + 8 + (0 if config.parity == "N" else 1) + config.stopbits
            self.char_time = bits / config.baudrate
            self.gap = t35(config.baudrate, bits)
        else:
            self.char_time = 0.0  # the device server's own line timing is not emulated
            self.gap = 0.002
        self.plugged = False
        self.master: int | None = None
        self.slave_fd: int | None = None
        self.receiver: _Receiver | None = None
        self.server: asyncio.Server | None = None
        self.clients: set[asyncio.StreamWriter] = set()
        self.replies: set[asyncio.Task[None]] = set()
        self.damaged = 0
        """Requests dropped for a bad CRC, as a slave drops them."""

    def handle(self, request: bytes, send: Callable[[bytes], None]) -> None:
        if len(request) < 4 or crc16(request[:-2]) != int.from_bytes(request[-2:], "little"):
            self.damaged += 1
            log.debug("bus %s: ignored a damaged request %s", self.config.id, request.hex(" "))
            return
        if self.slave_fd is not None:
            self._unset_speed()
        slave = self.slaves.get(request[0])
        if slave is None:
            return  # nobody has that address (0, broadcast, is never answered)
        slave.heard += 1
        if slave.dead:
            return
        reply = with_crc(request[:1] + _answer(slave, request[1:-2]))
        if slave.faults:
            reply = _spoil(reply, slave.faults.pop(0))
        # the request's bytes were on the wire before the slave could know it ended, the reply's after
        delay = (len(request) + len(reply)) * self.char_time + slave.delay
        task = asyncio.get_running_loop().create_task(self._send_later(delay, reply, send))
        self.replies.add(task)
        task.add_done_callback(self.replies.discard)

    @staticmethod
    async def _send_later(delay: float, reply: bytes, send: Callable[[bytes], None]) -> None:
        await asyncio.sleep(delay)
        send(reply)

    # --- the pseudo-terminal ---

    def plug_pty(self) -> None:
        assert self.link is not None
        master, slave = os.openpty()
        tty.setraw(master)
        tty.setraw(slave)  # no echo, no line editing, before the agent's pyserial sets the same
        os.set_blocking(master, False)
        # the slave side stays open here too: with no one holding it, reads on the master fail with EIO
        self.master, self.slave_fd = master, slave
        staging = self.link.with_name(self.link.name + ".new")
        with contextlib.suppress(FileNotFoundError):
            staging.unlink()
        os.symlink(os.ttyname(slave), staging)
        os.replace(staging, self.link)
        self._unset_speed()
        self.receiver = _Receiver(self, self._write_master)
        asyncio.get_running_loop().add_reader(master, self._on_master)
        self.plugged = True

    def _unset_speed(self) -> None:
        """A pty has no parity: Linux refuses (EINVAL) a tcsetattr whose only change is parity, so the agent's
        second open with parity E or O would fail; a sentinel speed makes each of its opens a real change."""
        if self.slave_fd is None or self.parity == "N":
            return
        with contextlib.suppress(termios.error, OSError):
            attrs = termios.tcgetattr(self.slave_fd)
            if attrs[4] != termios.B50:
                attrs[4] = attrs[5] = termios.B50
                termios.tcsetattr(self.slave_fd, termios.TCSANOW, attrs)

    def _on_master(self) -> None:
        assert self.master is not None and self.receiver is not None
        try:
            data = os.read(self.master, 4096)
        except BlockingIOError:
            return
        except OSError:
            asyncio.get_running_loop().remove_reader(self.master)
            return
        self.receiver.feed(data)

    def _write_master(self, data: bytes) -> None:
        if self.master is not None:
            with contextlib.suppress(OSError):  # a full pty buffer: nobody reads, as on an idle bus
                os.write(self.master, data)

    def unplug_pty(self) -> None:
        if self.receiver is not None:
            self.receiver.close()
            self.receiver = None
        if self.master is not None:
            asyncio.get_running_loop().remove_reader(self.master)
            os.close(self.master)
            self.master = None
        if self.slave_fd is not None:
            os.close(self.slave_fd)
            self.slave_fd = None
        if self.link is not None:
            with contextlib.suppress(FileNotFoundError):
                self.link.unlink()
        self.plugged = False

    # --- the TCP listener ---

    async def listen(self, host: str) -> None:
        try:
            self.server = await asyncio.start_server(self._client, host, self.port)
        except OSError as exc:
            raise OSError(f"channel {self.config.id}: cannot listen on {host}:{self.port}: {exc}") from None
        self.port = int(self.server.sockets[0].getsockname()[1])
        self.plugged = True

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.clients.add(writer)

        def send(data: bytes) -> None:
            if not writer.is_closing():
                writer.write(data)

        receiver = _Receiver(self, send)
        try:
            while data := await reader.read(4096):
                receiver.feed(data)
        except ConnectionError:
            pass
        finally:
            receiver.close()
            self.clients.discard(writer)
            writer.close()

    def close_listener(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.close()
        for writer in list(self.clients):
            writer.close()  # the listener alone would leave its connections open
        self.clients.clear()
        self.plugged = False

    def cancel_replies(self) -> None:
        for task in list(self.replies):
            task.cancel()


# --- the simulator ---------------------------------------------------------------------------------------


class RtuBusSimulator(ScenarioPlayer):
    """Serves every `modbus_rtu` channel of `config` on a pty whose slave side is linked at
    `folder/ttyRS485-<channel id>`, and every `modbus_rtu_tcp` channel on a TCP port of `host`.

    `ports` maps a `modbus_rtu_tcp` channel id to the port to listen on; unlisted channels get a free port.
    `channel_overrides()` says what the agent must use to reach each channel. Values are engineering units.
    """

    SCENARIOS = SCENARIOS

    def __init__(
        self,
        config: AgentConfig,
        *,
        folder: Path,
        host: str = "127.0.0.1",
        ports: dict[str, int] | None = None,
        period: float = 1.0,
        speed: float = 1.0,
        seed: int | None = None,
    ) -> None:
        if period <= 0 or speed <= 0:
            raise ValueError("period and speed must be positive")
        self.config = config
        self.folder = Path(folder)
        self.host = host
        self.period = period
        self.speed = speed
        self.changes: list[tuple[float, str, float | bool]] = []
        """(time.time(), point id, value) of every set_value, scenarios included, in order."""
        self._rng = random.Random(seed)
        self._buses: dict[str, _Bus] = {}
        self._points: dict[str, _Served] = {}
        self._runs: list[_Run] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._walker: asyncio.Task[None] | None = None
        self._started = False
        wanted = dict(ports or {})
        for channel in config.channels:
            if isinstance(channel, ModbusRtuChannel):
                bus = _Bus(channel, self.folder / f"ttyRS485-{channel.id}", 0)
            elif isinstance(channel, ModbusRtuTcpChannel):
                bus = _Bus(channel, None, wanted.pop(channel.id, 0))
            else:
                continue
            self._buses[channel.id] = bus
            by_unit: dict[int, list[ModbusDevice]] = {}
            for device in channel.devices:
                by_unit.setdefault(device.unit, []).append(device)  # one slave may be polled as several devices
            for unit_id, devices in by_unit.items():
                unit = _Unit(unit_id, devices)
                bus.slaves[unit_id] = _Slave(unit, {p.table for d in devices for p in d.points})
                self._build_unit(unit, devices)
        if wanted:
            raise ValueError(f"ports given for channels that are not modbus_rtu_tcp: {sorted(wanted)}")

    def _build_unit(self, unit: _Unit, devices: list[ModbusDevice]) -> None:
        groups: dict[tuple[str, str, str], list[ModbusPoint]] = {}
        for device in devices:
            for p in device.points:
                self._points[p.id] = _Served(p, unit)
                if p.type == "bool":
                    self._points[p.id].held = False
                else:
                    order = p.order if REGISTERS[p.type] > 1 else ("DCBA" if p.order in ("BADC", "DCBA") else "ABCD")
                    groups.setdefault((p.table, p.type, order), []).append(p)
        for (table, _, _), points in groups.items():
            points.sort(key=lambda p: p.address)
            run = _Run(unit, table, points, self._rng)
            for i, p in enumerate(points):
                self._points[p.id].run, self._points[p.id].index = run, i
            run.write()
            self._runs.append(run)

    # --- lifecycle ---

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            for bus in self._buses.values():
                await self._plug(bus)
        except BaseException:
            await self.stop()
            raise
        self._walker = asyncio.create_task(self._walk_forever(), name="rtu walk")

    async def stop(self) -> None:
        tasks = [t for t in (self._walker, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._walker = None
        self._tasks.clear()
        for bus in self._buses.values():
            self._unplug(bus)
        self._started = False

    async def __aenter__(self) -> RtuBusSimulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _plug(self, bus: _Bus) -> None:
        if bus.plugged:
            return
        if bus.link is not None:
            bus.plug_pty()
            log.info("channel %s: serving on %s -> %s", bus.config.id, bus.link, os.readlink(bus.link))
        else:
            await bus.listen(self.host)
            log.info("channel %s: listening on %s:%d", bus.config.id, self.host, bus.port)

    def _unplug(self, bus: _Bus) -> None:
        bus.cancel_replies()
        if bus.link is not None:
            bus.unplug_pty()
        else:
            bus.close_listener()

    def channel_overrides(self) -> dict[str, dict[str, Any]]:
        """Channel id -> the config fields the agent must use to reach it (valid once started)."""
        out: dict[str, dict[str, Any]] = {}
        for cid, bus in self._buses.items():
            out[cid] = {"port": str(bus.link)} if bus.link is not None else {"host": self.host, "port": bus.port}
        return out

    # --- faults ---

    def _bus(self, channel_id: str) -> _Bus:
        try:
            return self._buses[channel_id]
        except KeyError:
            raise ValueError(f"no modbus_rtu channel {channel_id!r} (served: {', '.join(self._buses)})") from None

    def _slave(self, channel_id: str, device_id: str) -> _Slave:
        bus = self._bus(channel_id)
        for slave in bus.slaves.values():
            if device_id in slave.unit.device_ids:
                return slave
        raise ValueError(f"channel {channel_id}: no device {device_id!r}")

    def set_slave_dead(self, channel_id: str, device_id: str, dead: bool) -> None:
        """A dead slave hears requests but never answers, so the master times out."""
        self._slave(channel_id, device_id).dead = dead

    def set_slave_delay(self, channel_id: str, device_id: str, seconds: float) -> None:
        """A slow slave answers `seconds` later than the wire alone would allow."""
        if seconds < 0:
            raise ValueError("a delay cannot be negative")
        self._slave(channel_id, device_id).delay = seconds

    def inject_fault(self, channel_id: str, device_id: str, fault: str, times: int = 1) -> None:
        """Spoil the slave's next `times` replies: bad_crc, truncated (its last 3 bytes missing), garbage_before
        (junk bytes, then the reply), wrong_address (a good frame from the next address) or noise (junk only)."""
        if fault not in FAULTS:
            raise ValueError(f"no fault {fault!r} (one of {', '.join(FAULTS)})")
        self._slave(channel_id, device_id).faults.extend([fault] * times)

    def requests_heard(self, channel_id: str, device_id: str) -> int:
        """Good requests addressed to the device's slave so far, answered or not."""
        return self._slave(channel_id, device_id).heard

    def unplug(self, channel_id: str) -> None:
        """Pull the cable: a pty channel's master side closes and its link disappears (the agent's port reads
        fail as when a USB adapter is pulled); a TCP channel closes its listener and every connection."""
        bus = self._bus(channel_id)
        self._unplug(bus)

    def replug(self, channel_id: str) -> Awaitable[None]:
        """Plug back: a new pty behind the same link path (done on return), or a listener on the same TCP port
        (await the result to know it listens)."""
        bus = self._bus(channel_id)
        loop = asyncio.get_running_loop()
        if bus.link is not None or bus.plugged:
            if not bus.plugged:
                bus.plug_pty()
            done: asyncio.Future[None] = loop.create_future()
            done.set_result(None)
            return done
        task = loop.create_task(self._plug(bus), name=f"rtu replug {channel_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- values ---

    def _served(self, point_id: str) -> _Served:
        try:
            return self._points[point_id]
        except KeyError:
            raise ValueError(f"no point {point_id!r} on a modbus_rtu channel") from None

    def set_value(self, point_id: str, value: float | bool) -> None:
        """Set a point now (engineering units) and hold it there until `release`."""
        served = self._served(point_id)
        point = served.point
        if point.type == "bool":
            served.held = bool(value)
            served.unit.put(point, bool(value))
        else:
            raw = _raw_of(point, value)
            served.unit.put(point, raw)
            served.held = _engineering(point, raw) if isinstance(raw, int) else float(value)
            assert served.run is not None
            served.run.held[served.index] = raw
            served.run.state[served.index] = raw
        self.changes.append((time.time(), point_id, served.held))

    def value(self, point_id: str) -> float | bool:
        """The point's engineering value as it is served now."""
        served = self._served(point_id)
        if served.held is not None:
            return served.held
        assert served.run is not None
        raw = served.run.state[served.index]
        return _engineering(served.point, round(raw) if served.run.integer else raw)

    def release(self, point_id: str) -> None:
        """Let a held analog point walk again, from where it is; bool points stay as set."""
        served = self._served(point_id)
        if served.run is not None:
            served.run.held.pop(served.index, None)
            served.held = None

    def walk(self) -> None:
        """Move every analog point that is not held one step of its bounded random walk."""
        rnd = self._rng.random
        for run in self._runs:
            run.walk(rnd)

    async def _walk_forever(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            due = max(due + self.period, loop.time())
            await asyncio.sleep(due - loop.time())
            self.walk()

    # --- scenarios ---

    def scenarios(self) -> list[str]:
        return list(SCENARIOS)

    async def _ramp(self, point: ModbusPoint, target: float, seconds: float, pace: float) -> None:
        start = float(self.value(point.id))
        steps = max(1, math.ceil(seconds / 0.5))
        for k in range(1, steps + 1):
            await asyncio.sleep(seconds / steps / pace)
            self.set_value(point.id, start + (target - start) * k / steps)

    async def gas_leak(self, *, speed: float | None = None) -> None:
        """The first combustible gas detector (domain gas, %LEL, with high and high_high limits) reads a leak that
        passes the first and the second alarm level, holds, then is ventilated back to clean air."""
        point = next((s.point for s in self._points.values()
                      if s.run is not None and s.point.domain == "gas" and s.point.unit == "%LEL"
                      and s.point.limits is not None and s.point.limits.high is not None
                      and s.point.limits.high_high is not None), None)
        if point is None:
            raise ValueError("no gas point in %LEL with high and high_high limits is served")
        limits = point.limits
        assert limits is not None and limits.high is not None and limits.high_high is not None
        pace = speed or self.speed
        quantum = abs(point.scale) if point.type in _INT_BOUNDS else 0.0
        margin = max(0.1 * (limits.high_high - limits.high), 2 * limits.deadband, 2 * quantum)
        first = min(limits.high + margin, (limits.high + limits.high_high) / 2)
        second = limits.high_high + margin
        if point.range is not None and limits.high_high <= point.range[1]:
            second = min(second, point.range[1])
        band_low, band_high = normal_band(point)
        clean = min((band_low + band_high) / 2, limits.high - limits.deadband - margin)
        try:
            log.info("scenario gas_leak: %s rises past the first alarm %g %s", point.id, limits.high, point.unit)
            await self._ramp(point, first, 10.0, pace)
            await asyncio.sleep(15.0 / pace)
            log.info("scenario gas_leak: %s rises past the second alarm %g %s", point.id, limits.high_high,
                     point.unit)
            await self._ramp(point, second, 10.0, pace)
            await asyncio.sleep(15.0 / pace)
            log.info("scenario gas_leak: %s is ventilated back to %g %s", point.id, clean, point.unit)
            await self._ramp(point, clean, 20.0, pace)
        finally:
            self.release(point.id)
        log.info("scenario gas_leak: done")


# --- command line ----------------------------------------------------------------------------------------


def _arguments(argv: Iterable[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m simulators.modbus_rtu", description=__doc__)
    parser.add_argument("--config", type=Path, required=True, help="serve the modbus_rtu channels of this config")
    parser.add_argument("--folder", type=Path, help="where the serial port links go (default: a new temp folder)")
    parser.add_argument("--host", default="127.0.0.1", help="address the modbus_rtu_tcp channels listen on")
    parser.add_argument("--free-ports", action="store_true",
                        help="modbus_rtu_tcp channels listen on free ports instead of their configured ones")
    parser.add_argument("--scenario", action="append", default=[], choices=SCENARIOS, help="run a scenario")
    parser.add_argument("--speed", type=float, default=1.0, help="scenario speed factor (2 = twice as fast)")
    parser.add_argument("--loop", action="store_true", help="repeat the scenarios until stopped")
    parser.add_argument("--period", type=float, default=1.0, help="seconds between steps of the value walk")
    parser.add_argument("--seed", type=int, help="random seed of the value walk")
    parser.add_argument("-v", "--verbose", action="store_true", help="log scenario steps")
    return parser.parse_args(None if argv is None else list(argv))


async def _serve(args: argparse.Namespace) -> None:
    config = load_config(args.config)
    folder = args.folder or Path(tempfile.mkdtemp(prefix="rtu-sim-"))
    ports = {} if args.free_ports else {c.id: c.port for c in config.channels if isinstance(c, ModbusRtuTcpChannel)}
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with RtuBusSimulator(config, folder=folder, host=args.host, ports=ports, period=args.period,
                               speed=args.speed, seed=args.seed) as sim:
        for channel, fields in sim.channel_overrides().items():
            where = fields["port"] if "host" not in fields else f"{fields['host']}:{fields['port']}"
            print(f"serving {channel} {where}", flush=True)
        for name in args.scenario:
            sim.start_scenario(name, loop=args.loop)
        await stop.wait()


def main(argv: Iterable[str] | None = None) -> int:
    from agent.config.models import ConfigError

    args = _arguments(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        asyncio.run(_serve(args))
    except (ConfigError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

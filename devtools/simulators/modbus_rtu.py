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
import os
import struct
import sys
import tempfile
import termios
import tty
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.config.loader import load_config
from agent.config.models import AgentConfig
from agent.drivers.modbus.codec import BIT_TABLES
from agent.drivers.modbus.rtu import ModbusRtuChannel, ModbusRtuTcpChannel
from simulators.modbus import ModbusPlant, _is_gas, _Unit
from simulators.plant import add_arguments, run_command, serve_until_stopped

log = logging.getLogger("simulators.modbus_rtu")  # not __main__ when run with -m

SCENARIOS = ("gas_leak", "frozen_detector")
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
        if table not in slave.unit.tables or start + count > 16 * len(words):
            return bytes([function | 0x80, 2])
        data = bytearray((count + 7) // 8)
        for i in range(count):
            address = start + i
            if (words[address >> 4] >> (address & 15)) & 1:
                data[i >> 3] |= 1 << (i & 7)
        return bytes([function, len(data)]) + bytes(data)
    if not 1 <= count <= 125:
        return bytes([function | 0x80, 3])
    if table not in slave.unit.tables or start + count > len(words):
        return bytes([function | 0x80, 2])
    registers = words[start : start + count]
    slave.unit.spoil(table, start, 0, count, registers)
    return bytes([function, 2 * count]) + struct.pack(f">{count}H", *registers)


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


class RtuBusSimulator(ModbusPlant):
    """Serves every `modbus_rtu` channel of `config` on a pty whose slave side is linked at
    `folder/ttyRS485-<channel id>`, and every `modbus_rtu_tcp` channel on a TCP port of `host`.

    `ports` maps a `modbus_rtu_tcp` channel id to the port to listen on; unlisted channels get a free port.
    `channel_overrides()` says what the agent must use to reach each channel. Values are engineering units.
    """

    SCENARIOS = SCENARIOS
    PROTOCOL = "modbus_rtu"
    WALK_TASK = "rtu walk"
    LOG = log

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
        super().__init__(period=period, speed=speed, seed=seed)
        self.config = config
        self.folder = Path(folder)
        self.host = host
        self._buses: dict[str, _Bus] = {}
        wanted = dict(ports or {})
        for channel in config.channels:
            if isinstance(channel, ModbusRtuChannel):
                bus = _Bus(channel, self.folder / f"ttyRS485-{channel.id}", 0)
            elif isinstance(channel, ModbusRtuTcpChannel):
                bus = _Bus(channel, None, wanted.pop(channel.id, 0))
            else:
                continue
            self._buses[channel.id] = bus
            for unit_id, unit in self._serve_units(channel.devices).items():
                bus.slaves[unit_id] = _Slave(unit)
        if wanted:
            raise ValueError(f"ports given for channels that are not modbus_rtu_tcp: {sorted(wanted)}")

    # --- lifecycle ---

    async def _open(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for bus in self._buses.values():
            await self._plug(bus)

    async def _close(self) -> None:
        for bus in self._buses.values():
            self._unplug(bus)

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
        return self._channel_of(self._buses, channel_id)

    def _slave(self, channel_id: str, device_id: str) -> _Slave:
        slaves = self._bus(channel_id).slaves.values()
        return self._device_of(channel_id, device_id, slaves, lambda slave: slave.unit.device_ids)

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
        return self._own(loop.create_task(self._plug(bus), name=f"rtu replug {channel_id}"))

    # --- scenarios ---

    def scenarios(self) -> list[str]:
        playable = ["gas_leak"]
        with contextlib.suppress(ValueError):
            self._last_gas_detector()
            playable.append("frozen_detector")
        return playable

    async def gas_leak(self, *, speed: float | None = None) -> None:
        """The first combustible gas detector (domain gas, %LEL, with high and high_high limits) reads a leak that
        passes the first and the second alarm level, holds, then is ventilated back to clean air."""
        point = self._first_point("gas point in %LEL", _is_gas)
        await self._excursion("gas_leak", point, (10.0, 15.0, 10.0, 15.0, 20.0), speed,
                              ("rises past the first alarm", "rises past the second alarm", "is ventilated back to"))


# --- command line ----------------------------------------------------------------------------------------


def _arguments(argv: Iterable[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m simulators.modbus_rtu", description=__doc__)
    parser.add_argument("--config", type=Path, required=True, help="serve the modbus_rtu channels of this config")
    parser.add_argument("--folder", type=Path, help="where the serial port links go (default: a new temp folder)")
    parser.add_argument("--host", default="127.0.0.1", help="address the modbus_rtu_tcp channels listen on")
    parser.add_argument("--free-ports", action="store_true",
                        help="modbus_rtu_tcp channels listen on free ports instead of their configured ones")
    add_arguments(parser, SCENARIOS)
    return parser.parse_args(None if argv is None else list(argv))


def _where(fields: dict[str, Any]) -> str:
    return str(fields["port"]) if "host" not in fields else f"{fields['host']}:{fields['port']}"


async def _serve(args: argparse.Namespace) -> None:
    config = load_config(args.config)
    folder = args.folder or Path(tempfile.mkdtemp(prefix="rtu-sim-"))
    ports = {} if args.free_ports else {c.id: c.port for c in config.channels if isinstance(c, ModbusRtuTcpChannel)}
    sim = RtuBusSimulator(config, folder=folder, host=args.host, ports=ports, period=args.period, speed=args.speed,
                          seed=args.seed)
    await serve_until_stopped(sim, args, lambda: (f"serving {channel} {_where(fields)}"
                                                  for channel, fields in sim.channel_overrides().items()))


def main(argv: Iterable[str] | None = None) -> int:
    args = _arguments(argv)
    return run_command(args, lambda: asyncio.run(_serve(args)))


if __name__ == "__main__":
    sys.exit(main())

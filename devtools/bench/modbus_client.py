"""Modbus client benchmark: the agent's own Modbus client against pymodbus's async client, on CPU per register
read and on late and wrong-unit replies, for Modbus TCP, RTU on a serial line (a pseudo-terminal pair) and RTU
framed over TCP. Prints figures; decides nothing (docs/decisions/modbus-client.md does).

    python -m bench.modbus_client [--repeat 3] [--seconds 1] [--baud 115200] [--only cpu|cases] [--json]

CPU: the device simulators (simulators.modbus for TCP, simulators.modbus_rtu for RTU and RTU over TCP) run as
separate processes, so only the client's CPU is counted: this process's time.process_time over `--seconds` of
back-to-back reads of one block of 100 holding registers, divided by the reads (after 20 warm-up reads, with the
objects that exist before the run frozen out of the garbage collector's passes). Two levels: `block`, the bare
client call (our driver's read_block, pymodbus's read_holding_registers), and `poll`, the agent's BlockReader.read
decoding 100 uint16 points (pymodbus behind a minimal BlockReader adapter, as a driver built on it would be).
The pty carries no line timing; the RTU simulator delays each reply by its wire time at `--baud`.

Cases, against small scripted servers in this process, each client with a 0.2 s timeout and no retries:
  late_same_size   request 1 (unit 1, 10 registers at 0) is answered 0.05 s after the client gave up, while
                   request 2 (unit 1, 10 registers at 100) is outstanding; request 2's answer follows 0.05 s later
  late_other_size  the same, request 2 asks for 20 registers
  late_other_unit  request 2 goes to unit 2; unit 1's late answer and unit 2's answer arrive in one chunk
  wrong_unit       the only reply to a request for unit 1 comes from unit 2
  wrong_then_right a reply from unit 2, then 0.05 s later the right one from unit 1
Each register at address a holds 1000 + a, so a value says which request it answers. Outcome of the judged request
(request 2 of the late cases, the only request otherwise): correct, wrong values, or error.
Everything listens on 127.0.0.1 or a pty only; every run is bounded in reads and seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import socket
import statistics
import struct
import sys
import tempfile
import time
import tty
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException
from pymodbus.framer import FramerType

from agent.config.loader import validate_config_data
from agent.config.models import AgentConfig
from agent.drivers.modbus.codec import Block, BlockReader, ModbusDevice, ModbusError, plan_blocks
from agent.drivers.modbus.rtu import ModbusRtuChannel, ModbusRtuDriver, ModbusRtuTcpChannel, ModbusRtuTcpDriver
from agent.drivers.modbus.tcp import ModbusTcpChannel, ModbusTcpDriver

TRANSPORTS = ("tcp", "rtu", "rtu_tcp")
CLIENTS = ("own", "pymodbus")
CASES = ("late_same_size", "late_other_size", "late_other_unit", "wrong_unit", "wrong_then_right")
BLOCK = 100  # registers per read in the CPU runs
UNIT = 1
CASE_TIMEOUT = 0.2
WARMUP_READS = 20
MAX_READS = 100_000

AnyClient = AsyncModbusTcpClient | AsyncModbusSerialClient


class Driver(Protocol):
    """The part of the agent's Modbus drivers this benchmark uses."""

    async def read_block(self, device: ModbusDevice, block: Block) -> bytes: ...

    async def close(self) -> None: ...


# --- configuration: the same models the agent validates ---------------------------------------------------------


def device_data(blocks: Iterable[tuple[int, int]], timeout: float, prefix: str = "R", unit: int = UNIT
                ) -> dict[str, Any]:
    """A unit with one uint16 holding point per register of each (start, count) block; no retries."""
    points = [{"id": f"{prefix}{unit}-{a:05d}", "address": a, "type": "uint16"}
              for start, count in blocks for a in range(start, start + count)]
    return {"id": f"u{unit}", "unit": unit, "interval": 1, "timeout": timeout, "retries": 0, "points": points}


def channel_data(transport: str, where: str | int, devices: list[dict[str, Any]], baud: int,
                 frame_gap: float | None = None) -> dict[str, Any]:
    if transport == "tcp":
        return {"id": transport, "driver": "modbus_tcp", "host": "127.0.0.1", "port": where, "devices": devices}
    if transport == "rtu":
        gap = {} if frame_gap is None else {"frame_gap": frame_gap}
        return {"id": transport, "driver": "modbus_rtu", "port": where, "baudrate": baud, "parity": "N",
                "devices": devices, **gap}
    return {"id": transport, "driver": "modbus_rtu_tcp", "host": "127.0.0.1", "port": where, "devices": devices}


def site(*channels: dict[str, Any]) -> AgentConfig:
    return validate_config_data({"agent": {"id": "bench-modbus", "enterprise": "000000000000"},
                                 "channels": list(channels)}, source="<bench.modbus_client>", base_dir=None)


def own_driver(transport: str, where: str | int, devices: list[dict[str, Any]], baud: int,
               frame_gap: float | None = None) -> tuple[Driver, list[ModbusDevice]]:
    """Our driver for one channel, built from its validated config model as the agent builds it."""
    channel = site(channel_data(transport, where, devices, baud, frame_gap)).channels[0]
    driver: Driver
    models: list[ModbusDevice] = []
    if isinstance(channel, ModbusTcpChannel):
        driver = ModbusTcpDriver(channel)
        models.extend(channel.devices)
    elif isinstance(channel, ModbusRtuChannel):
        driver = ModbusRtuDriver(channel)
        models.extend(channel.devices)
    else:
        assert isinstance(channel, ModbusRtuTcpChannel)
        driver = ModbusRtuTcpDriver(channel)
        models.extend(channel.devices)
    return driver, models


def pymodbus_client(transport: str, where: str | int, timeout: float, baud: int) -> AnyClient:
    if transport == "rtu":
        assert isinstance(where, str)
        return AsyncModbusSerialClient(where, baudrate=baud, parity="N", timeout=timeout, retries=0,
                                       reconnect_delay=0)
    assert isinstance(where, int)
    framer = FramerType.SOCKET if transport == "tcp" else FramerType.RTU
    return AsyncModbusTcpClient("127.0.0.1", port=where, framer=framer, timeout=timeout, retries=0,
                                reconnect_delay=0)


class PymodbusBlockReader(BlockReader):
    """pymodbus's client behind the agent's BlockReader: what a driver built on pymodbus would at least do."""

    def __init__(self, client: AnyClient, devices: list[ModbusDevice]) -> None:
        self.client = client
        self._plans = {d.id: plan_blocks(d) for d in devices}

    async def read_block(self, device: ModbusDevice, block: Block) -> bytes:
        if block.function != 3:
            raise ValueError("this adapter reads holding registers only")
        try:
            reply = await self.client.read_holding_registers(block.start, count=block.count, device_id=device.unit)
        except ModbusException as exc:
            raise TimeoutError(str(exc)) from None
        if reply.isError():
            raise ModbusError(block.function, reply.exception_code)
        return struct.pack(f">{len(reply.registers)}H", *reply.registers)


# --- the simulators, in processes of their own ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Simulators:
    """simulators.modbus (TCP) and simulators.modbus_rtu (pty and RTU over TCP) as child processes."""

    folder: Path
    baud: int
    procs: list[asyncio.subprocess.Process] = field(default_factory=list)
    where: dict[str, str | int] = field(default_factory=dict)

    async def start(self, transports: Iterable[str]) -> None:
        wanted = set(transports)
        channels = [channel_data("tcp", free_port(), [device_data([(0, BLOCK)], 1.0, "T")], self.baud),
                    channel_data("rtu", "/dev/null", [device_data([(0, BLOCK)], 1.0, "S")], self.baud),
                    channel_data("rtu_tcp", 1, [device_data([(0, BLOCK)], 1.0, "G")], self.baud)]
        config = self.folder / "simulated.yaml"
        data = {"agent": {"id": "bench-modbus", "enterprise": "000000000000"}, "channels": channels}
        site(*channels)  # the simulators load the same file; fail here first
        config.write_text(yaml.safe_dump(data, sort_keys=False))
        if "tcp" in wanted:
            await self._spawn(["simulators.modbus", "--config", str(config)], "listening", 1)
        if wanted & {"rtu", "rtu_tcp"}:
            await self._spawn(["simulators.modbus_rtu", "--config", str(config), "--folder", str(self.folder),
                               "--free-ports"], "serving", 2)

    async def _spawn(self, args: list[str], word: str, lines: int) -> None:
        log = open(self.folder / f"{args[0]}.log", "wb")  # noqa: SIM115
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", *args, stdout=asyncio.subprocess.PIPE,
                                                    stderr=log)
        log.close()
        self.procs.append(proc)
        assert proc.stdout is not None
        for _ in range(lines):
            line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode().split()
            if len(line) != 3 or line[0] != word:
                raise RuntimeError(f"{args[0]} did not start; see {self.folder / (args[0] + '.log')}")
            channel, where = line[1], line[2]
            self.where[channel] = int(where.rsplit(":", 1)[1]) if channel != "rtu" else where

    async def stop(self) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 10)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
        self.procs.clear()


# --- CPU per read -----------------------------------------------------------------------------------------------


async def timed(read: Callable[[], Awaitable[object]], seconds: float) -> dict[str, float]:
    """CPU µs of this process per read, and reads per second, over `seconds` of back-to-back reads."""
    for _ in range(WARMUP_READS):
        await read()
    # the collector's full passes would otherwise charge whichever client runs for every object this process
    # holds (imports, config models): frozen objects are skipped, the client's own garbage is still collected
    gc.collect()
    gc.freeze()
    try:
        cpu0, wall0 = time.process_time(), time.perf_counter()
        reads = 0
        while reads < MAX_READS and (reads == 0 or time.perf_counter() - wall0 < seconds):
            await read()
            reads += 1
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    finally:
        gc.unfreeze()
    return {"cpu_us": cpu / reads * 1e6, "reads_per_s": reads / wall, "reads": reads}


async def measure_own(transport: str, where: str | int, baud: int, seconds: float,
                      frame_gap: float | None = None) -> dict[str, dict[str, float]]:
    driver, (device,) = own_driver(transport, where, [device_data([(0, BLOCK)], 1.0)], baud, frame_gap)
    block = plan_blocks(device)[0]
    assert isinstance(driver, BlockReader) and block.count == BLOCK

    async def read_block() -> object:
        return await driver.read_block(device, block)

    async def poll() -> object:
        read = await driver.read(device)
        if read.errors:  # a poll with errors would measure timeouts, not the client
            raise RuntimeError("; ".join(read.errors))
        return read

    try:
        return {"block": await timed(read_block, seconds), "poll": await timed(poll, seconds)}
    finally:
        await driver.close()


async def measure_pymodbus(transport: str, where: str | int, baud: int, seconds: float,
                           frame_gap: float | None = None) -> dict[str, dict[str, float]]:
    client = pymodbus_client(transport, where, 1.0, baud)
    if not await client.connect():
        raise RuntimeError(f"pymodbus could not connect to {where}")
    _, (device,) = own_driver(transport, where, [device_data([(0, BLOCK)], 1.0)], baud)
    reader = PymodbusBlockReader(client, [device])

    async def read_block() -> object:
        reply = await client.read_holding_registers(0, count=BLOCK, device_id=UNIT)
        if reply.isError() or len(reply.registers) != BLOCK:
            raise RuntimeError(f"pymodbus read failed: {reply}")
        return reply

    async def poll() -> object:
        read = await reader.read(device)
        if read.errors:
            raise RuntimeError("; ".join(read.errors))
        return read

    try:
        return {"block": await timed(read_block, seconds), "poll": await timed(poll, seconds)}
    finally:
        client.close()


# --- scripted servers for the correctness cases -----------------------------------------------------------------


def crc16(data: bytes) -> int:
    """CRC-16/MODBUS bit by bit, written here apart from the driver's table so the two cannot share a mistake."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def values_of(start: int, count: int) -> list[int]:
    return [1000 + a for a in range(start, start + count)]


@dataclass
class Request:
    unit: int
    start: int
    count: int
    tid: int = 0


@dataclass
class Reply:
    """Frames written in one go, `after` seconds after the first request arrived: (request answered, unit)."""

    after: float
    frames: list[tuple[Request, int]]


def script(case: str, requests: list[Request]) -> list[Reply]:
    """What the scripted server answers to the latest request of a case."""
    index, request = len(requests) - 1, requests[-1]
    late = CASE_TIMEOUT + 0.05  # request 1's answer: after the client gave up, while request 2 is outstanding
    if case == "late_other_unit":
        # on a bus, the late answer of unit 1 and unit 2's answer follow each other and may be read in one chunk
        return [] if index == 0 else [Reply(late, [(requests[0], requests[0].unit), (request, request.unit)])]
    if case.startswith("late"):
        return [Reply(late if index == 0 else late + 0.05, [(request, request.unit)])]
    if case == "wrong_unit":
        return [Reply(0.01, [(request, request.unit + 1)])]
    return [Reply(0.01, [(request, request.unit + 1)]), Reply(0.06, [(request, request.unit)])]  # wrong_then_right


class ScriptedServer:
    """Answers read-holding-register requests by the case's script, on TCP (MBAP or RTU frames) or a pty."""

    def __init__(self, transport: str, case: str) -> None:
        self.transport = transport
        self.case = case
        self.requests: list[Request] = []
        self.first: float | None = None
        self.where: str | int = 0
        self._server: asyncio.Server | None = None
        self._master: int | None = None
        self._slave: int | None = None
        self._buffer = bytearray()
        self._handles: list[asyncio.TimerHandle] = []

    async def start(self) -> None:
        if self.transport == "rtu":
            master, slave = os.openpty()
            tty.setraw(master)
            tty.setraw(slave)
            os.set_blocking(master, False)
            self._master, self._slave = master, slave  # the slave side stays open, or reads on the master fail
            asyncio.get_running_loop().add_reader(master, self._on_pty)
            self.where = os.ttyname(slave)
        else:
            self._server = await asyncio.start_server(self._on_client, "127.0.0.1", 0)
            self.where = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        for handle in self._handles:
            handle.cancel()
        if self._master is not None:
            asyncio.get_running_loop().remove_reader(self._master)
            os.close(self._master)
        if self._slave is not None:
            os.close(self._slave)
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    def _on_pty(self) -> None:
        assert self._master is not None
        with contextlib.suppress(BlockingIOError):
            self._buffer += os.read(self._master, 4096)
        master = self._master

        def send(data: bytes) -> None:
            with contextlib.suppress(OSError):
                os.write(master, data)

        self._take_rtu(send)

    def _take_rtu(self, send: Callable[[bytes], None]) -> None:
        while len(self._buffer) >= 8:  # a read request is 8 bytes: unit, function, start, count, CRC
            frame, self._buffer = bytes(self._buffer[:8]), self._buffer[8:]
            if crc16(frame[:6]) != int.from_bytes(frame[6:], "little") or frame[1] != 3:
                self._buffer.clear()
                return
            start, count = struct.unpack(">HH", frame[2:6])
            self._handle(Request(frame[0], start, count), send)

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        def send(data: bytes) -> None:
            if not writer.is_closing():
                writer.write(data)

        try:
            while True:
                if self.transport == "tcp":
                    head = await reader.readexactly(7)
                    tid, _, length, unit = struct.unpack(">HHHB", head)
                    body = await reader.readexactly(length - 1)
                    start, count = struct.unpack(">HH", body[1:5])
                    self._handle(Request(unit, start, count, tid), send)
                else:
                    data = await reader.read(4096)
                    if not data:
                        break
                    self._buffer += data
                    self._take_rtu(send)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def _handle(self, request: Request, send: Callable[[bytes], None]) -> None:
        loop = asyncio.get_running_loop()
        if self.first is None:
            self.first = loop.time()
        self.requests.append(request)
        for reply in script(self.case, self.requests):
            data = b"".join(self._frame(answered, unit) for answered, unit in reply.frames)
            self._handles.append(loop.call_at(max(self.first + reply.after, loop.time()), send, data))

    def _frame(self, request: Request, unit: int) -> bytes:
        values = values_of(request.start, request.count)
        pdu = bytes([3, 2 * len(values)]) + struct.pack(f">{len(values)}H", *values)
        if self.transport == "tcp":
            return struct.pack(">HHHB", request.tid, 0, len(pdu) + 1, unit) + pdu
        body = bytes([unit]) + pdu
        return body + crc16(body).to_bytes(2, "little")


@dataclass
class Outcome:
    outcome: str  # correct, wrong values, error
    detail: str
    seconds: float


def judge(result: list[int] | BaseException, expected: list[int], stale: list[int], seconds: float) -> Outcome:
    if isinstance(result, BaseException):
        text = str(result).splitlines()[0] if str(result) else ""
        return Outcome("error", f"{type(result).__name__}: {text}"[:110], seconds)
    if result == expected:
        return Outcome("correct", f"{len(result)} registers as asked", seconds)
    if result == stale:
        return Outcome("wrong values", f"the {len(result)} registers of request 1 ({len(expected)} asked)", seconds)
    return Outcome("wrong values", f"{len(result)} registers starting {result[:3]}", seconds)


async def run_case(case: str, transport: str, client_name: str, baud: int) -> Outcome:
    # (unit, start, count) of each request; the last one is judged
    first = (UNIT, 0, 10)
    second = (UNIT + 1 if case == "late_other_unit" else UNIT, 100, 20 if case == "late_other_size" else 10)
    requests = [first, second] if case.startswith("late") else [first]
    server = ScriptedServer(transport, case)
    await server.start()
    read: Callable[[int, int, int], Awaitable[list[int]]]
    close: Callable[[], Awaitable[None]]
    if client_name == "own":
        units: dict[int, list[tuple[int, int]]] = {}
        for unit, start, count in requests:
            units.setdefault(unit, []).append((start, count))
        driver, devices = own_driver(transport, server.where,
                                     [device_data(blocks, CASE_TIMEOUT, unit=u) for u, blocks in units.items()], baud)
        planned = {(d.unit, b.start, b.count): (d, b) for d in devices for b in plan_blocks(d)}

        async def read_own(unit: int, start: int, count: int) -> list[int]:
            device, block = planned[(unit, start, count)]
            data = await driver.read_block(device, block)
            return list(struct.unpack(f">{len(data) // 2}H", data))

        read, close = read_own, driver.close
    else:
        client = pymodbus_client(transport, server.where, CASE_TIMEOUT, baud)
        if not await client.connect():
            raise RuntimeError(f"pymodbus could not connect to {server.where}")

        async def read_pymodbus(unit: int, start: int, count: int) -> list[int]:
            reply = await client.read_holding_registers(start, count=count, device_id=unit)
            if reply.isError():
                raise ModbusError(3, reply.exception_code)
            return list(reply.registers)

        async def close_pymodbus() -> None:
            client.close()

        read, close = read_pymodbus, close_pymodbus

    async def attempt(request: tuple[int, int, int]) -> tuple[list[int] | BaseException, float]:
        began = time.perf_counter()
        try:
            result: list[int] | BaseException = await asyncio.wait_for(read(*request), 5 * CASE_TIMEOUT)
        except Exception as exc:  # the outcome being measured
            result = exc
        return result, time.perf_counter() - began

    try:
        if len(requests) == 2:
            got, _ = await attempt(first)
            if not isinstance(got, BaseException):
                return Outcome("wrong values", f"request 1 was answered in time: {got[:3]}...", 0.0)
        got, seconds = await attempt(requests[-1])
        await asyncio.sleep(0.1)  # let a straggling reply land before the link is closed
        return judge(got, values_of(*requests[-1][1:]), values_of(*first[1:]), seconds)
    finally:
        await close()
        await server.stop()


# --- the run ----------------------------------------------------------------------------------------------------


def summary(samples: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples),
            "runs": [round(s, 2) for s in samples]}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"settings": {"repeat": args.repeat, "seconds": args.seconds, "baud": args.baud,
                                           "rtu_frame_gap": args.rtu_frame_gap,
                                           "block_registers": BLOCK, "case_timeout_s": CASE_TIMEOUT,
                                           "python": sys.version.split()[0]}}
    if args.only in (None, "cpu"):
        samples: dict[tuple[str, str, str, str], list[float]] = {}
        with tempfile.TemporaryDirectory(prefix="bench-modbus-") as folder:
            sims = Simulators(Path(folder), args.baud)
            try:
                await sims.start(args.transport)
                for repeat in range(args.repeat):
                    for transport in args.transport:
                        # alternate which client goes first, so drift of the machine hits both alike
                        order = CLIENTS if repeat % 2 == 0 else CLIENTS[::-1]
                        for client in order:
                            measure = measure_own if client == "own" else measure_pymodbus
                            figures = await measure(transport, sims.where[transport], args.baud, args.seconds,
                                                    args.rtu_frame_gap)
                            for level, values in figures.items():
                                for name in ("cpu_us", "reads_per_s"):
                                    samples.setdefault((transport, client, level, name), []).append(values[name])
            finally:
                await sims.stop()
        cpu: dict[str, Any] = {}
        for (transport, client, level, name), runs in samples.items():
            cpu.setdefault(transport, {}).setdefault(client, {}).setdefault(level, {})[name] = summary(runs)
        result["cpu"] = cpu
    if args.only in (None, "cases"):
        cases: dict[str, Any] = {}
        for case in CASES:
            for transport in args.transport:
                for client in CLIENTS:
                    outcome = await run_case(case, transport, client, args.baud)
                    cases.setdefault(case, {}).setdefault(transport, {})[client] = outcome.__dict__
        result["cases"] = cases
    return result


LABEL = {"tcp": "Modbus TCP", "rtu": "RTU on a pty", "rtu_tcp": "RTU over TCP"}


def report(result: dict[str, Any]) -> None:
    settings = result["settings"]
    if "cpu" in result:
        print(f"CPU of this process per read of {BLOCK} holding registers: median (min..max) of "
              f"{settings['repeat']} runs of {settings['seconds']:g} s; RTU at {settings['baud']} baud 8N1")
        print(f"  {'transport':<13} {'client':<9} {'block µs/read':>24} {'ns/register':>12} "
              f"{'poll µs/read':>24} {'block reads/s':>14}")
        for transport, clients in result["cpu"].items():
            for client, levels in clients.items():
                block, poll = levels["block"]["cpu_us"], levels["poll"]["cpu_us"]
                rate = levels["block"]["reads_per_s"]["median"]
                print(f"  {LABEL[transport]:<13} {client:<9} "
                      f"{block['median']:>8.1f} ({block['min']:6.1f}..{block['max']:6.1f}) "
                      f"{block['median'] * 1000 / BLOCK:>12.0f} "
                      f"{poll['median']:>8.1f} ({poll['min']:6.1f}..{poll['max']:6.1f}) {rate:>14.0f}")
    if "cases" in result:
        print(f"\ncorrectness (client timeout {settings['case_timeout_s']:g} s, no retries): outcome of the judged "
              "request, seconds it took")
        for case, transports in result["cases"].items():
            for transport, clients in transports.items():
                for client, out in clients.items():
                    print(f"  {case:<17} {LABEL[transport]:<13} {client:<9} {out['outcome']:<13} "
                          f"{out['seconds']:5.2f}s  {out['detail']}")


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.modbus_client", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each CPU figure (default 3)")
    parser.add_argument("--seconds", type=float, default=1.0, help="seconds of reads per CPU figure (default 1)")
    parser.add_argument("--baud", type=int, default=115200, help="RTU line speed on the pty (default 115200)")
    parser.add_argument("--rtu-frame-gap", type=float, metavar="SECONDS",
                        help="our RTU driver's frame_gap in the CPU runs (default: t3.5 at --baud, as configured "
                        "channels have it; 0 shows what keeping the silence costs)")
    parser.add_argument("--transport", action="append", choices=TRANSPORTS,
                        help="only this transport (repeatable; default all)")
    parser.add_argument("--only", choices=("cpu", "cases"), help="only the CPU figures or only the cases")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(None if argv is None else list(argv))
    if args.repeat < 1 or not 0 < args.seconds <= 30:
        parser.error("--repeat must be at least 1 and --seconds in (0, 30]")
    args.transport = args.transport or list(TRANSPORTS)
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)  # it logs every skipped frame as an error
    logging.getLogger("agent").setLevel(logging.ERROR)
    try:
        result = asyncio.run(run(args))
    except (RuntimeError, OSError) as exc:
        print(f"bench.modbus_client: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result))
    else:
        report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

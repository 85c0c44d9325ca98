"""Modbus TCP plant simulator: pymodbus servers that serve every `modbus_tcp` channel of a configuration with
slowly varying values, dead units, dropped links and scripted alarm scenarios, for tests, demos and the benchmark.

It only ever answers reads: every write is refused, so values change only through this module's own API.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import random
import struct
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypedDict, Unpack

import yaml
from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from agent.config.loader import load_config, validate_config_data
from agent.config.models import AgentConfig
from agent.drivers.modbus.codec import BIT_TABLES, REGISTERS, ModbusDevice, ModbusPoint, encode
from agent.drivers.modbus.tcp import ModbusTcpChannel
from simulators.plant import Done, Plant, add_arguments, run_command, serve_until_stopped
from simulators.scenario import ramp

log = logging.getLogger("simulators.modbus")  # not __main__ when run with -m

_TABLE_OF_FUNCTION = {1: "coil", 5: "coil", 15: "coil", 2: "discrete", 4: "input",
                      3: "holding", 6: "holding", 16: "holding", 22: "holding", 23: "holding"}
_INT_BOUNDS = {"int16": (-(2**15), 2**15 - 1), "uint16": (0, 2**16 - 1), "int32": (-(2**31), 2**31 - 1),
               "uint32": (0, 2**32 - 1), "int64": (-(2**63), 2**63 - 1), "uint64": (0, 2**64 - 1)}
_FLOAT32_MAX = 3.4028234663852886e38
_STRUCT_CHAR = {"int16": "h", "uint16": "H", "int32": "i", "uint32": "I", "float32": "f",
                "int64": "q", "uint64": "Q", "float64": "d"}
# (pack endianness of the values, unpack endianness of the 16-bit words) giving each byte order in one call:
# little-endian values reversed whole are DCBA; read back as little-endian words they are CDAB.
_BULK_ENDIAN = {"ABCD": (">", ">"), "DCBA": ("<", ">"), "CDAB": ("<", "<"), "BADC": (">", "<")}

PULL = 0.05
"""Share of the distance to the band's centre a walked value recovers each tick (mean reversion)."""

SCENARIOS = ("gas_leak", "tank_overfill", "detector_fault", "garbled_frame")


def _raw_of(point: ModbusPoint, value: float) -> float | int:
    """Engineering value -> raw register value, rounded for integer types; ValueError if it cannot be stored."""
    if point.scale == 0:
        raise ValueError(f"point {point.id}: scale 0 cannot be inverted")
    bounds = _INT_BOUNDS.get(point.type)
    if bounds is None:
        raw = (float(value) - point.offset) / point.scale
        if point.type == "float32" and math.isfinite(raw) and abs(raw) > _FLOAT32_MAX:
            raise ValueError(f"point {point.id}: {value} is raw {raw:g}, beyond float32")
        return raw
    if isinstance(value, int) and point.scale == 1 and point.offset == 0:
        rounded = int(value)  # 64-bit integers stay exact, which a float would not keep
    else:
        rounded = round((float(value) - point.offset) / point.scale)
    if not bounds[0] <= rounded <= bounds[1]:
        raise ValueError(f"point {point.id}: {value} {point.unit} is raw {rounded}, outside {point.type} {bounds}")
    return rounded


def _engineering(point: ModbusPoint, raw: float | int) -> float | int:
    if point.scale == 1 and point.offset == 0:
        return raw
    return raw * point.scale + point.offset


def _raw_float(point: ModbusPoint, value: float) -> float:
    return (value - point.offset) / point.scale if point.scale else 0.0


def normal_band(point: ModbusPoint) -> tuple[float, float]:
    """The engineering band a point wanders in when nothing happens: well inside its limits and range."""
    limits = point.limits
    low_limit = high_limit = None
    if limits is not None:
        low_limit = limits.low if limits.low is not None else limits.low_low
        high_limit = limits.high if limits.high is not None else limits.high_high
    low, high = point.range if point.range is not None else (0.0, 100.0)
    if low_limit is not None:
        low = max(low, low_limit)
    if high_limit is not None:
        high = min(high, high_limit)
    if low >= high:  # limits outside the range: the limits decide
        low = low_limit if low_limit is not None else high - 100.0
        high = high_limit if high_limit is not None else low + 100.0
    deadband = limits.deadband if limits is not None else 0.0
    # an alarm clears only a deadband inside its limit, so that is where "normal" begins
    if deadband and high - low > 4 * deadband:
        low += deadband if low_limit is not None else 0.0
        high -= deadband if high_limit is not None else 0.0
    width = high - low
    if point.domain == "gas" and low_limit is None:
        return low + 0.02 * width, low + 0.18 * width  # clean air reads near zero
    return low + 0.3 * width, low + 0.7 * width


# --- the served memory -------------------------------------------------------------------------------


class _Unit:
    """One Modbus unit: its four tables as 16-bit words (coils and discrete inputs 16 to a word, bit 0 first)."""

    def __init__(self, unit: int, devices: list[ModbusDevice]) -> None:
        self.unit = unit
        self.device_ids = [d.id for d in devices]
        self.dead = False
        self.spikes: list[tuple[str, int, list[int]]] = []  # (table, address, words) served to one read only
        self.answer_every = 1  # answer one request in so many (2: every other one), the others get silence
        self.requests = 0
        self.answered = 0
        ends = {t: 0 for t in ("holding", "input", "coil", "discrete")}
        for device in devices:
            for p in device.points:
                ends[p.table] = max(ends[p.table], p.address + p.width())
        self.words: dict[str, list[int]] = {
            t: [0] * (max(1, (end + 15) // 16) if t in BIT_TABLES else max(1, end)) for t, end in ends.items()
        }
        self.tables = {t for t, end in ends.items() if end}
        """The tables the unit has points in; reading another is an illegal address."""

    def sim_device(self) -> SimDevice:
        """pymodbus's description of this unit; every read copies the live words in through `_serve`."""

        def block(table: str) -> list[SimData]:
            n = len(self.words[table])
            if table in BIT_TABLES:
                return [SimData(0, values=[0] * n, datatype=DataType.BITS)]
            if table not in self.tables:  # reading a table the unit does not have is an illegal address
                return [SimData(0, count=1, datatype=DataType.INVALID)]
            return [SimData(0, values=[0] * n, datatype=DataType.REGISTERS)]

        return SimDevice(self.unit, simdata=(block("coil"), block("discrete"), block("holding"), block("input")),
                         action=self._serve)

    async def _serve(self, function_code: int, start: int, address: int, count: int, registers: list[int],
                     values: list[int] | list[bool] | None) -> Any:
        if values is not None:
            return ExcCodes.ILLEGAL_FUNCTION  # the plant is read-only: nothing but the simulator sets values
        table = _TABLE_OF_FUNCTION.get(function_code)
        if table is None:
            return ExcCodes.ILLEGAL_FUNCTION
        words = self.words[table]
        first = (address >> 4 if table in BIT_TABLES else address) - start
        stop = min(first + count, len(words))
        registers[first:stop] = words[first:stop]
        self.spoil(table, start, first, stop, registers)
        return None

    def spoil(self, table: str, start: int, first: int, stop: int, registers: list[int]) -> None:
        """Serve the one-shot spikes that fall within registers[first:stop] (addresses from `start`)."""
        for spike in list(self.spikes):
            at, spiked = spike[1] - start, spike[2]
            if spike[0] == table and first <= at and at + len(spiked) <= stop:
                registers[at:at + len(spiked)] = spiked  # this read only: the next one gets the real value
                self.spikes.remove(spike)

    def put(self, point: ModbusPoint, raw: float | int | bool) -> None:
        """Store one raw value the way the point is configured."""
        words = self.words[point.table]
        if point.table in BIT_TABLES:
            index, mask = point.address >> 4, 1 << (point.address & 15)
        elif point.type == "bool":
            index, mask = point.address, 1 << (point.bit or 0)
        else:
            words[point.address : point.address + REGISTERS[point.type]] = encode(point, raw)
            return
        words[index] = words[index] | mask if raw else words[index] & ~mask


class _Run:
    """The walked points of one unit and table sharing type and byte order, encoded with one struct call."""

    def __init__(self, unit: _Unit, table: str, points: list[ModbusPoint], rng: random.Random) -> None:
        self.words = unit.words[table]
        self.points = points
        first = points[0]
        self.integer = first.type in _INT_BOUNDS
        order = first.order
        if REGISTERS[first.type] == 1:
            order = "DCBA" if order in ("BADC", "DCBA") else "ABCD"
        value_end, word_end = _BULK_ENDIAN[order]
        width = REGISTERS[first.type]
        self.pack = struct.Struct(f"{value_end}{len(points)}{_STRUCT_CHAR[first.type]}").pack
        self.unpack = struct.Struct(f"{word_end}{len(points) * width}H").unpack
        self.slots = [p.address + k for p in points for k in range(width)]
        self.start = self.slots[0]
        self.contiguous = self.slots == list(range(self.start, self.start + len(self.slots)))
        self.center: list[float] = []
        self.step: list[float] = []
        self.state: list[float] = []
        for p in points:
            low, high = sorted(_raw_float(p, v) for v in normal_band(p))
            if self.integer:  # keep the band inside what the type can hold
                bounds = _INT_BOUNDS[p.type]
                low, high = min(max(low, bounds[0]), bounds[1]), min(max(high, bounds[0]), bounds[1])
            center, half = (low + high) / 2, (high - low) / 2
            self.center.append(center)
            # with noise at most ±step/2 and PULL of the gap recovered per tick, |x - center| <= half forever
            self.step.append(2 * PULL * half)
            self.state.append(center + half * rng.uniform(-1.0, 1.0))
        self.held: dict[int, float] = {}

    def walk(self, rnd: Callable[[], float]) -> None:
        pull = PULL
        state = [x + pull * (c - x) + s * (rnd() - 0.5)
                 for x, c, s in zip(self.state, self.center, self.step, strict=True)]
        for i, raw in self.held.items():
            state[i] = raw
        self.state = state
        self.write()

    def write(self) -> None:
        words = self.unpack(self.pack(*([round(x) for x in self.state] if self.integer else self.state)))
        if self.contiguous:
            self.words[self.start : self.start + len(words)] = words
        else:
            table = self.words
            for slot, word in zip(self.slots, words, strict=True):
                table[slot] = word


@dataclass(eq=False)
class _Served:
    point: ModbusPoint
    unit: _Unit
    run: _Run | None = None
    index: int = 0
    held: float | bool | None = None  # engineering value while held; bools are always held


@dataclass(eq=False)
class _Channel:
    config: ModbusTcpChannel
    port: int
    units: dict[int, _Unit] = field(default_factory=dict)
    server: Any = None
    down: bool = False
    opening: asyncio.Task[None] | None = None

    def trace_pdu(self, sending: bool, pdu: Any) -> Any:
        """Drop requests to dead or absent units before pymodbus answers them: the client only sees silence."""
        if not sending:
            unit = self.units.get(pdu.dev_id)
            if unit is None or unit.dead:
                return None
            unit.requests += 1
            if (unit.requests - 1) % unit.answer_every:
                return None
            unit.answered += 1
        return pdu


def _is_gas(point: ModbusPoint) -> bool:
    return point.domain == "gas" and point.unit == "%LEL"


def _is_level(point: ModbusPoint) -> bool:
    return point.domain == "hazard" and point.unit == "m"


def _is_fault(point: ModbusPoint) -> bool:
    return point.fault_of is not None


# --- the simulator -----------------------------------------------------------------------------------


class ModbusPlant(Plant):
    """The Modbus units behind a simulator, over TCP or RTU: the value of every point they serve, in engineering
    units, held where it was set and otherwise walked at random within its normal band, and the scenarios that
    move them."""

    LOG: ClassVar[logging.Logger] = log
    """Where scenario steps are logged: the simulator's own module's logger."""

    def __init__(self, *, period: float, speed: float, seed: int | None) -> None:
        super().__init__(period=period, speed=speed)
        self.changes: list[tuple[float, str, float | bool]] = []
        """(time.time(), point id, value) of every set_value, scenarios included, in order."""
        self.walk_seconds = 0.0
        """CPU-bound time the last walk tick took."""
        self._rng = random.Random(seed)
        self._points: dict[str, _Served] = {}
        self._runs: list[_Run] = []

    def _serve_units(self, devices: Iterable[ModbusDevice]) -> dict[int, _Unit]:
        """Unit id -> the unit serving the devices; devices sharing a unit id are one unit polled as several devices
        (e.g. two intervals)."""
        by_unit: dict[int, list[ModbusDevice]] = {}
        for device in devices:
            by_unit.setdefault(device.unit, []).append(device)
        units: dict[int, _Unit] = {}
        for unit_id, unit_devices in by_unit.items():
            units[unit_id] = unit = _Unit(unit_id, unit_devices)
            self._build_unit(unit, unit_devices)
        return units

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
                served = self._points[p.id]
                served.run, served.index = run, i
            run.write()
            self._runs.append(run)

    # --- values ---

    def _served(self, point_id: str) -> _Served:
        return self._point_of(self._points, point_id)

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
            # integer types carry the rounded value; that is what a client reads
            served.held = _engineering(point, raw) if isinstance(raw, int) else float(value)
            assert served.run is not None
            served.run.held[served.index] = raw
            served.run.state[served.index] = raw
        self.changes.append((time.time(), point_id, served.held))

    def spike_once(self, point_id: str, value: float) -> None:
        """The next read of an analog register point gets `value` (a garbled frame, a glitch), the reads after it
        the point's real value again."""
        served = self._served(point_id)
        point = served.point
        if point.table in BIT_TABLES or point.type == "bool":
            raise ValueError(f"point {point_id}: a spike is for analog register points")
        served.unit.spikes.append((point.table, point.address, encode(point, _raw_of(point, value))))

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

    def held(self, point_id: str) -> bool:
        """Whether an analog point is held (not walked); bool points always are."""
        return self._served(point_id).held is not None

    def walk(self) -> None:
        """Move every analog point that is not held one step of its bounded random walk."""
        began = time.perf_counter()
        rnd = self._rng.random
        for run in self._runs:
            run.walk(rnd)
        self.walk_seconds = time.perf_counter() - began

    async def _tick(self, elapsed: float) -> None:
        self.walk()

    # --- scenarios ---

    async def frozen_detector(self, *, speed: float | None = None) -> None:
        """The last combustible gas detector (domain gas, %LEL) sticks at a small non-zero reading, value and noise,
        for its `quality.frozen_after` and 10 s more (real time: the agent's clock judges it), then reads again."""
        point = self._last_gas_detector()
        quality = point.quality
        hold = (quality.frozen_after if quality is not None and quality.frozen_after else 3600.0) + 10.0
        try:
            log.info("scenario frozen_detector: %s sticks at 3.5 %s for %g s", point.id, point.unit, hold)
            self.set_value(point.id, 3.5)
            await asyncio.sleep(hold)
        finally:
            self.release(point.id)
        log.info("scenario frozen_detector: %s reads again", point.id)

    def _last_gas_detector(self) -> ModbusPoint:
        found = [s.point for s in self._points.values() if s.run is not None and _is_gas(s.point)]
        if not found:
            raise ValueError("no gas point in %LEL is served")
        return found[-1]

    def _first_point(self, what: str, match: Callable[[ModbusPoint], bool]) -> ModbusPoint:
        for served in self._points.values():
            p = served.point
            if served.run is not None and p.limits is not None and p.limits.high is not None \
                    and p.limits.high_high is not None and match(p):
                return p
        raise ValueError(f"no {what} with high and high_high limits is served")

    async def _ramp(self, point: ModbusPoint, target: float, seconds: float, speed: float) -> None:
        async for value in ramp(float(self.value(point.id)), target, seconds, speed):
            self.set_value(point.id, value)

    async def _excursion(self, name: str, point: ModbusPoint, timing: tuple[float, float, float, float, float],
                         speed: float | None,
                         says: tuple[str, str, str] = ("rises past high", "rises past high_high", "falls back to"),
                         ) -> None:
        """Rise past high, hold, past high_high, hold, fall back below high - deadband, release; `says` how the log
        tells each of the three moves."""
        pace = speed or self.speed
        limits = point.limits
        assert limits is not None and limits.high is not None and limits.high_high is not None
        high, high_high = limits.high, limits.high_high
        quantum = abs(point.scale) if point.type in _INT_BOUNDS else 0.0
        margin = max(0.1 * (high_high - high), 2 * limits.deadband, 2 * quantum)
        above_high = min(high + margin, (high + high_high) / 2)
        above_high_high = high_high + margin
        if point.range is not None and high_high <= point.range[1]:
            above_high_high = min(above_high_high, point.range[1])  # stay measurable when the range allows
        band_low, band_high = normal_band(point)
        back = min((band_low + band_high) / 2, high - limits.deadband - margin)
        rise, hold, rise2, hold2, fall = timing
        try:
            self.LOG.info("scenario %s: %s %s %g %s", name, point.id, says[0], high, point.unit)
            await self._ramp(point, above_high, rise, pace)
            await asyncio.sleep(hold / pace)
            self.LOG.info("scenario %s: %s %s %g %s", name, point.id, says[1], high_high, point.unit)
            await self._ramp(point, above_high_high, rise2, pace)
            await asyncio.sleep(hold2 / pace)
            self.LOG.info("scenario %s: %s %s %g %s", name, point.id, says[2], back, point.unit)
            await self._ramp(point, back, fall, pace)
        finally:
            self.release(point.id)
        self.LOG.info("scenario %s: done", name)


class PlantSimulator(ModbusPlant):
    """Serves every `modbus_tcp` channel of `config` on `host`, one TCP server per channel, one unit per unit id.

    `ports` maps channel id to the port to serve on instead of the configured one (0 picks a free port); the
    ports really used are in `ports` once started. Values are engineering units throughout.
    """

    SCENARIOS = SCENARIOS
    PROTOCOL = "modbus_tcp"
    WALK_TASK = "plant walk"

    def __init__(
        self,
        config: AgentConfig,
        *,
        host: str = "127.0.0.1",
        ports: dict[str, int] | None = None,
        period: float = 1.0,
        speed: float = 1.0,
        seed: int | None = None,
    ) -> None:
        super().__init__(period=period, speed=speed, seed=seed)
        self.config = config
        self.host = host
        self._channels: dict[str, _Channel] = {}
        overrides = dict(ports or {})
        for channel in config.channels:
            if not isinstance(channel, ModbusTcpChannel):
                continue
            served = _Channel(channel, overrides.pop(channel.id, channel.port))
            self._channels[channel.id] = served
            served.units = self._serve_units(channel.devices)
        unknown = set(overrides) - {c.id for c in config.channels}
        if unknown:
            raise ValueError(f"ports given for channels the configuration does not have: {sorted(unknown)}")

    # --- lifecycle ---

    @property
    def ports(self) -> dict[str, int]:
        """Channel id -> TCP port (the real one once started, also for channels given port 0)."""
        return {cid: c.port for cid, c in self._channels.items()}

    async def _open(self) -> None:
        for channel in self._channels.values():
            if not channel.down:
                await self._listen(channel)

    def _workers(self) -> list[asyncio.Task[Any]]:
        return [c.opening for c in self._channels.values() if c.opening is not None]

    async def _close(self) -> None:
        for channel in self._channels.values():
            self._close_channel(channel)

    async def _listen(self, channel: _Channel) -> None:
        server = ModbusTcpServer(
            [unit.sim_device() for unit in channel.units.values()],
            address=(self.host, channel.port),
            trace_pdu=channel.trace_pdu,
            ignore_missing_devices=True,
        )
        try:
            await server.serve_forever(background=True)
        except RuntimeError:
            raise OSError(f"channel {channel.config.id}: cannot listen on {self.host}:{channel.port}") from None
        channel.server = server
        listener = server.transport
        assert isinstance(listener, asyncio.Server)
        channel.port = int(listener.sockets[0].getsockname()[1])
        log.info("channel %s: listening on %s:%d", channel.config.id, self.host, channel.port)

    @staticmethod
    def _close_channel(channel: _Channel) -> None:
        server, channel.server = channel.server, None
        if server is not None:
            # pymodbus closes the listener and every open connection of it
            server.close()
            if not server.serving.done():
                server.serving.set_result(True)

    # --- faults ---

    def set_device_dead(self, channel_id: str, device_id: str, dead: bool) -> None:
        """A dead device's unit receives requests but never answers, so the client times out."""
        channel = self._channel_of(self._channels, channel_id)
        self._device_of(channel_id, device_id, channel.units.values(), lambda unit: unit.device_ids).dead = dead

    def set_device_flaky(self, channel_id: str, device_id: str, answer_every: int) -> tuple[int, int]:
        """From now on the device's unit answers one request in `answer_every` (1: all) and stays silent to the
        others; returns the (requests, answered) it counted until now, and starts counting again."""
        channel = self._channel_of(self._channels, channel_id)
        unit = self._device_of(channel_id, device_id, channel.units.values(), lambda u: u.device_ids)
        counted = unit.requests, unit.answered
        unit.answer_every, unit.requests, unit.answered = max(1, answer_every), 0, 0
        return counted

    def set_channel_down(self, channel_id: str, down: bool) -> Awaitable[None]:
        """Down closes the listener and every open connection (the port refuses); up listens again on the same
        port. Closing is done on return; await the result to know the port listens again."""
        channel = self._channel_of(self._channels, channel_id)
        channel.down = down
        if not self._started:
            return Done()
        loop = asyncio.get_running_loop()
        if down:
            if channel.opening is not None:
                channel.opening.cancel()
                channel.opening = None
            self._close_channel(channel)
        elif channel.server is None:
            if channel.opening is None or channel.opening.done():
                channel.opening = loop.create_task(self._listen(channel), name=f"plant open {channel_id}")
            return channel.opening
        done: asyncio.Future[None] = loop.create_future()
        done.set_result(None)
        return done

    # --- scenarios ---

    def scenarios(self) -> list[str]:
        """The scenarios this plant can play (each needs its kind of point)."""
        targets: dict[str, Callable[[], object]] = {
            "gas_leak": lambda: self._first_point("gas point", _is_gas),
            "tank_overfill": lambda: self._first_point("level", _is_level),
            "detector_fault": lambda: self._first_status("fault status", _is_fault),
            "garbled_frame": lambda: self._first_point("level", _is_level),
        }
        playable = []
        for name in SCENARIOS:
            try:
                targets[name]()
            except ValueError:
                continue
            playable.append(name)
        return playable

    async def gas_leak(self, *, speed: float | None = None) -> None:
        """The first combustible gas detector (domain gas, %LEL) reads a leak that grows, then is ventilated."""
        point = self._first_point("gas point in %LEL", _is_gas)
        await self._excursion("gas_leak", point, (10.0, 15.0, 10.0, 15.0, 20.0), speed)

    async def tank_overfill(self, *, speed: float | None = None) -> None:
        """The first level point (domain hazard, unit m) fills past high and high_high, then is drawn down."""
        point = self._first_point("hazard level point in m", _is_level)
        await self._excursion("tank_overfill", point, (30.0, 10.0, 15.0, 10.0, 30.0), speed)

    async def detector_fault(self, *, speed: float | None = None) -> None:
        """The first detector fault status (a point with `fault_of`) goes on, holds, and goes off again."""
        pace = speed or self.speed
        point = self._first_status("detector fault status", _is_fault)
        try:
            log.info("scenario detector_fault: %s (fault of %s) on", point.id, point.fault_of)
            self.set_value(point.id, True)
            await asyncio.sleep(15.0 / pace)
            log.info("scenario detector_fault: %s off", point.id)
            self.set_value(point.id, False)
            await asyncio.sleep(5.0 / pace)
        finally:
            self.release(point.id)
        log.info("scenario detector_fault: done")

    async def garbled_frame(self, *, speed: float | None = None) -> None:
        """One read of the first level point (domain hazard, unit m) comes back garbled, far above high_high, the
        next ones right: the agent marks it a spike and raises nothing."""
        pace = speed or self.speed
        point = self._first_point("hazard level point in m", _is_level)
        assert point.limits is not None and point.limits.high_high is not None
        top = point.range[1] if point.range is not None else point.limits.high_high * 1.2
        value = max(point.limits.high_high, top * 0.98)
        log.info("scenario garbled_frame: the next read of %s gets %g %s", point.id, value, point.unit)
        self.spike_once(point.id, value)
        await asyncio.sleep(10.0 / pace)
        log.info("scenario garbled_frame: done")

    def _first_status(self, what: str, match: Callable[[ModbusPoint], bool]) -> ModbusPoint:
        for channel in self.config.channels:
            for device in getattr(channel, "devices", []):
                for point in device.points:
                    if isinstance(point, ModbusPoint) and match(point):
                        return point
        raise ValueError(f"no {what} is configured")


# --- the benchmark's plant ---------------------------------------------------------------------------


class SyntheticOptions(TypedDict, total=False):
    """The optional keywords of `synthetic_data` and `synthetic_config`."""

    per_device: int
    channels: int
    host: str
    timeout: float
    uplink_host: str
    uplink_port: int
    store: str | None


def synthetic_data(
    points: int,
    *,
    interval: float,
    port: int,
    per_device: int = 1000,
    channels: int = 1,
    host: str = "127.0.0.1",
    timeout: float = 1.0,
    uplink_host: str = "127.0.0.1",
    uplink_port: int = 1883,
    store: str | None = None,
) -> dict[str, Any]:
    """The synthetic plant as plain data (what `--print-config` prints); `synthetic_config` validates it."""
    if points < 1 or per_device < 1 or channels < 1:
        raise ValueError("points, per_device and channels must be at least 1")
    if per_device * 2 > 65536:
        raise ValueError("per_device float32 points must fit in 65536 registers")
    devices = math.ceil(points / per_device)
    if devices > 255:
        raise ValueError(f"{devices} devices needed but unit ids stop at 255: raise per_device")
    width = max(5, len(str(points - 1)))
    chans: list[dict[str, Any]] = [
        {"id": f"bench{c}" if channels > 1 else "bench", "driver": "modbus_tcp", "host": host,
         "port": port + c, "devices": []}
        for c in range(channels)
    ]
    for d in range(devices):
        first = d * per_device
        chans[d % channels]["devices"].append({
            "id": f"dev{d + 1}", "unit": d + 1, "interval": interval, "timeout": timeout,
            "points": [
                {"id": f"P{i:0{width}d}", "table": "holding", "address": 2 * (i - first), "type": "float32",
                 "range": [0, 100], "limits": {"high": 90, "high_high": 95}}
                for i in range(first, min(first + per_device, points))
            ],
        })
    data: dict[str, Any] = {
        "agent": {"id": "bench", "enterprise": "000000000000", "name": f"synthetic plant of {points} points"},
        "uplink": {"host": uplink_host, "port": uplink_port},
        "channels": [c for c in chans if c["devices"]],
    }
    if store is not None:
        data["store"] = {"path": store}
    return data


def synthetic_config(points: int, *, interval: float, port: int, **options: Unpack[SyntheticOptions]) -> AgentConfig:
    """A valid configuration of `points` float32 holding registers P00000.. (range 0..100, high 90, high_high
    95), `per_device` to a unit (ids 1..N), units spread over `channels` channels on ports port, port+1, ...
    (the options and their defaults are `synthetic_data`'s)."""
    data = synthetic_data(points, interval=interval, port=port, **options)
    return validate_config_data(data, source="<synthetic>", base_dir=None)


# --- command line ------------------------------------------------------------------------------------


def _arguments(argv: Iterable[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m simulators.modbus", description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", type=Path, help="serve the modbus_tcp channels of this agent configuration")
    source.add_argument("--synthetic", type=int, metavar="POINTS", help="serve a synthetic plant of POINTS points")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, help="synthetic: first port (default 5020; 0 = free ports)")
    parser.add_argument("--per-device", type=int, default=1000, help="synthetic: points per unit")
    parser.add_argument("--channels", type=int, default=1, help="synthetic: channels (one port each)")
    parser.add_argument("--interval", type=float, default=1.0, help="synthetic: the agent's poll interval")
    parser.add_argument("--print-config", action="store_true", help="synthetic: print the config as YAML and exit")
    add_arguments(parser, SCENARIOS)
    args = parser.parse_args(None if argv is None else list(argv))
    if args.synthetic is None and (args.print_config or args.port is not None):
        parser.error("--print-config and --port go with --synthetic (a config file names its own ports)")
    return args


def _synthetic(args: argparse.Namespace) -> tuple[dict[str, Any], AgentConfig]:
    """The synthetic plant the flags ask for, as data and as a validated configuration."""
    data = synthetic_data(args.synthetic, interval=args.interval, port=args.port or 5020,
                          per_device=args.per_device, channels=args.channels, host=args.host)
    return data, validate_config_data(data, source="<synthetic>", base_dir=None)


async def _serve(args: argparse.Namespace) -> None:
    ports: dict[str, int] = {}
    if args.synthetic is not None:
        _, config = _synthetic(args)
        if args.port == 0:
            ports = {c.id: 0 for c in config.channels}
    else:
        config = load_config(args.config)
    sim = PlantSimulator(config, host=args.host, ports=ports, period=args.period, speed=args.speed, seed=args.seed)
    await serve_until_stopped(sim, args, lambda: (f"listening {c} {args.host}:{p}" for c, p in sim.ports.items()))


def _print_config(args: argparse.Namespace) -> None:
    data, _ = _synthetic(args)
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    sys.stdout.write(yaml.dump(data, Dumper=dumper, sort_keys=False, allow_unicode=True))


def main(argv: Iterable[str] | None = None) -> int:
    args = _arguments(argv)
    return run_command(args, lambda: _print_config(args) if args.print_config else asyncio.run(_serve(args)),
                       quiet="pymodbus")


if __name__ == "__main__":
    sys.exit(main())

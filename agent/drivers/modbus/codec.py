"""Modbus data model shared by every Modbus transport: point/device options, register codecs, block
planning and the PDU of the four read functions.

Transports (TCP, RTU, RTU over TCP) frame these PDUs; nothing here touches a socket or a port.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field, model_validator

from agent.config.base import DeviceBase, PointBase
from agent.core import DeviceRead
from agent.errors import ProtocolError

log = logging.getLogger(__name__)

Table = Literal["holding", "input", "coil", "discrete"]
DataType = Literal["bool", "int16", "uint16", "int32", "uint32", "float32", "int64", "uint64", "float64"]
Order = Literal["ABCD", "CDAB", "BADC", "DCBA"]

REGISTERS = {"bool": 1, "int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "float32": 2,
             "int64": 4, "uint64": 4, "float64": 4}
_STRUCT_CHAR = {"int16": "h", "uint16": "H", "int32": "i", "uint32": "I", "float32": "f",
                "int64": "q", "uint64": "Q", "float64": "d"}
FUNCTION = {"coil": 1, "discrete": 2, "holding": 3, "input": 4}
BIT_TABLES = ("coil", "discrete")

EXCEPTION_NAMES = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server device busy",
    8: "memory parity error",
    10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}


class ModbusPoint(PointBase):
    table: Table = Field("holding", description="Register table: holding (4x), input (3x), coil (0x), discrete (1x).")
    address: int = Field(ge=0, le=65535, description="Zero-based register or bit address on the wire.")
    type: DataType = Field("uint16", description="Data type; bool is a coil/discrete input or one bit of a register.")
    order: Order = Field(
        "ABCD",
        description="Byte order of multi-byte values: ABCD big-endian, CDAB word-swapped, BADC byte-swapped, "
        "DCBA little-endian. For 16-bit types only the byte swap (BADC, DCBA) matters.",
    )
    bit: int | None = Field(None, ge=0, le=15, description="Bit of a register for type bool (0 = least significant).")

    @model_validator(mode="after")
    def _table_type(self) -> ModbusPoint:
        if self.table in BIT_TABLES:
            if self.type != "bool":
                raise ValueError(f"table {self.table} holds single bits: type must be bool, not {self.type}")
            if self.bit is not None:
                raise ValueError(f"bit is only for bool points in holding or input registers, not {self.table}")
        elif self.type == "bool" and self.bit is None:
            raise ValueError(f"a bool point in the {self.table} table needs `bit` (0-15)")
        elif self.type != "bool" and self.bit is not None:
            raise ValueError(f"bit is only for type bool, not {self.type}")
        if self.address + self.width() > 65536:
            raise ValueError(f"address {self.address} + {self.width()} registers runs past 65535")
        return self

    def width(self) -> int:
        """Registers (or bits) the point occupies."""
        return 1 if self.table in BIT_TABLES else REGISTERS[self.type]


class ModbusDevice(DeviceBase):
    unit: int = Field(1, ge=0, le=255, description="Unit identifier (slave address).")
    max_registers: int = Field(125, ge=1, le=125, description="Largest register block in one request.")
    max_bits: int = Field(2000, ge=1, le=2000, description="Largest coil/discrete block in one request.")
    max_gap: int = Field(
        16, ge=0, le=124, description="Unused addresses a block may span to join two points in one request."
    )
    points: list[ModbusPoint] = Field(min_length=1, description="Points read from this device.")


# --- codecs ------------------------------------------------------------------------------------------


def _reorder(raw: bytes, order: str) -> bytes:
    """Bring wire bytes (registers in sequence, each big-endian) to big-endian ABCD order."""
    if order == "ABCD":
        return raw
    if order == "DCBA":
        return raw[::-1]
    words = [raw[i : i + 2] for i in range(0, len(raw), 2)]
    if order == "CDAB":
        return b"".join(reversed(words))
    return b"".join(w[::-1] for w in words)  # BADC


def decoder(point: ModbusPoint) -> Callable[[bytes, int], Any]:
    """A function (block bytes, byte offset) -> raw value for a register point."""
    if point.type == "bool":
        mask = 1 << (point.bit or 0)
        return lambda buf, off: bool(((buf[off] << 8) | buf[off + 1]) & mask)
    char = _STRUCT_CHAR[point.type]
    size = REGISTERS[point.type] * 2
    order = point.order
    if size == 2 and order in ("CDAB", "ABCD"):
        order = "ABCD"
    if size == 2 and order in ("BADC", "DCBA"):
        order = "DCBA"
    if order == "ABCD":
        unpack_big = struct.Struct(">" + char).unpack_from
        return lambda buf, off: unpack_big(buf, off)[0]
    if order == "DCBA":
        unpack_little = struct.Struct("<" + char).unpack_from
        return lambda buf, off: unpack_little(buf, off)[0]
    unpack = struct.Struct(">" + char).unpack
    return lambda buf, off: unpack(_reorder(buf[off : off + size], order))[0]


def encode(point: ModbusPoint, value: float | int | bool) -> list[int]:
    """Registers holding `value` as the point is configured (the inverse of `decoder`; used by simulators)."""
    if point.type == "bool":
        raise ValueError("bool points are bits; set the bit in the register instead")
    char = _STRUCT_CHAR[point.type]
    raw = struct.pack(">" + char, float(value) if char in "fd" else int(value))
    order = point.order
    if len(raw) == 2:
        order = "DCBA" if order in ("BADC", "DCBA") else "ABCD"
    # each order is its own inverse
    wire = _reorder(raw, order)
    return [int.from_bytes(wire[i : i + 2], "big") for i in range(0, len(wire), 2)]


# --- block planning ----------------------------------------------------------------------------------


Member = tuple[int, Callable[[bytes, int], Any] | None, int]
_STRUCTS: dict[str, struct.Struct] = {}


@dataclass
class Block:
    """One read request and where each of its points lies inside the reply.

    Register points of one type and byte order that follow each other in the device's list and in the block are
    a run, decoded with one struct call; the others have a decoder of their own.
    """

    table: str
    start: int
    count: int
    # the points outside runs: (index of the point in its device, decoder (None for bits), byte or bit offset)
    members: list[Member] = field(default_factory=list)
    # (index of the run's first point, how many, its unpack_from, byte offset, registers its points use); a run's
    # points have no member of their own (1,000 points of a device: 90 kB less)
    runs: list[tuple[int, int, Callable[[bytes, int], tuple[Any, ...]], int, int]] = field(default_factory=list)

    def points(self) -> list[int]:
        """The index of every point the block reads."""
        return [*(m[0] for m in self.members), *(i for run in self.runs for i in range(run[0], run[0] + run[1]))]

    @property
    def function(self) -> int:
        return FUNCTION[self.table]

    def describe(self) -> str:
        return f"{self.table} {self.start}..{self.start + self.count - 1}"


def _runnable(point: ModbusPoint) -> str | None:
    """The struct byte order ('>' or '<') a point can be decoded in within a run, or None."""
    if point.type == "bool":
        return None
    size = REGISTERS[point.type] * 2
    if point.order == "ABCD" or (size == 2 and point.order == "CDAB"):
        return ">"
    if point.order == "DCBA" or (size == 2 and point.order == "BADC"):
        return "<"
    return None


def _compile(block: Block, entries: list[tuple[int, ModbusPoint, int]]) -> None:
    """Fill the block's members and runs from (index in the device, point, byte offset), in address order."""
    run: list[tuple[int, ModbusPoint, int]] = []

    def close() -> None:
        if len(run) < 2:
            block.members.extend((index, decoder(point), offset) for index, point, offset in run)
        else:
            order = _runnable(run[0][1])
            fmt, end = order or ">", run[0][2]
            for _, point, offset in run:
                fmt += (f"{offset - end}x" if offset > end else "") + _STRUCT_CHAR[point.type]
                end = offset + REGISTERS[point.type] * 2
            unpack = _STRUCTS.setdefault(fmt, struct.Struct(fmt)).unpack_from
            block.runs.append((run[0][0], len(run), unpack, run[0][2], sum(REGISTERS[p.type] for _, p, _ in run)))
        run.clear()

    for entry in entries:
        index, point, offset = entry
        if run:
            last_index, last, last_offset = run[-1]
            if not (index == last_index + 1 and _runnable(point) is not None and _runnable(point) == _runnable(last)
                    and offset >= last_offset + REGISTERS[last.type] * 2):
                close()
        if _runnable(point) is None:
            block.members.append((index, decoder(point), offset))
        else:
            run.append(entry)
    close()


def plan_blocks(device: ModbusDevice) -> list[Block]:
    """Merge neighbouring addresses of one device into as few requests as the limits allow."""
    blocks: list[Block] = []
    by_table: dict[str, list[tuple[int, ModbusPoint]]] = {}
    for index, point in enumerate(device.points):
        by_table.setdefault(point.table, []).append((index, point))
    for table in ("holding", "input", "coil", "discrete"):
        entries = sorted(by_table.get(table, []), key=lambda e: (e[1].address, e[0]))
        limit = device.max_bits if table in BIT_TABLES else device.max_registers
        current: Block | None = None
        pending: list[tuple[int, ModbusPoint, int]] = []
        for index, point in entries:
            end = point.address + point.width()
            if current is not None:
                current_end = current.start + current.count
                gap = point.address - current_end
                if gap <= device.max_gap and max(end, current_end) - current.start <= limit:
                    current.count = max(end, current_end) - current.start
                else:
                    _compile(current, pending)
                    current, pending = None, []
            if current is None:
                current = Block(table, point.address, point.width())
                blocks.append(current)
            if table in BIT_TABLES:
                current.members.append((index, None, point.address - current.start))
            else:
                pending.append((index, point, (point.address - current.start) * 2))
        if current is not None and pending:
            _compile(current, pending)
    return blocks


def gapless_plan(device: ModbusDevice) -> list[Block]:
    """The device's requests without bridged gaps: for a server that refuses any address it does not have
    (exception 2, as the standard allows) inside an otherwise merged block."""
    return plan_blocks(device.model_copy(update={"max_gap": 0}))


def refused_for_a_gap(exc: ModbusError, block: Block, device: ModbusDevice) -> bool:
    """Exception 2 on a block that bridges unused addresses: read it again without the gaps."""
    used = sum(device.points[index].width() for index, _, _ in block.members) + sum(run[4] for run in block.runs)
    return exc.code == 2 and used < block.count


# --- PDUs --------------------------------------------------------------------------------------------


class ModbusError(ProtocolError):
    """The device answered with a Modbus exception response."""

    def __init__(self, function: int, code: int) -> None:
        self.function = function
        self.code = code
        super().__init__(f"exception {code} ({EXCEPTION_NAMES.get(code, 'unknown')}) to function {function}")


class FrameError(ProtocolError):
    """A reply that does not fit the request (wrong length, function, address): the link may be out of step."""


def read_request(function: int, start: int, count: int) -> bytes:
    return struct.pack(">BHH", function, start, count)


def parse_read_reply(pdu: bytes, function: int, count: int) -> bytes:
    """Return the data bytes of a read reply, or raise ModbusError / FrameError."""
    if not pdu:
        raise FrameError("empty reply")
    if pdu[0] == function | 0x80:
        if len(pdu) != 2:
            raise FrameError(f"exception reply of {len(pdu)} bytes")
        raise ModbusError(function, pdu[1])
    if pdu[0] != function:
        raise FrameError(f"reply to function {pdu[0]} while {function} was asked")
    expected = (count + 7) // 8 if function in (1, 2) else count * 2
    if len(pdu) < 2 or pdu[1] != expected or len(pdu) != 2 + expected:
        raise FrameError(f"reply carries {len(pdu) - 2} data bytes (byte count {pdu[1] if len(pdu) > 1 else '-'}), "
                         f"{expected} expected")
    return pdu[2:]


def reply_length(pdu_head: bytes) -> int | None:
    """Length of a read reply PDU from its first two bytes (for framings without a length field); None while
    too few bytes are in to tell."""
    if not pdu_head:
        return None
    if pdu_head[0] & 0x80:
        return 2
    return 2 + pdu_head[1] if len(pdu_head) > 1 else None


def decode_block(block: Block, data: bytes, values: list[Any]) -> None:
    """Write the raw value of each member point of `block` into `values`; FrameError, and no value written,
    when `data` is not the block's size."""
    bits = block.table in BIT_TABLES
    size = (block.count + 7) >> 3 if bits else block.count * 2
    if len(data) != size:
        raise FrameError(f"{len(data)} data bytes for {block.describe()}, which takes {size}")
    if bits:
        for index, _, bit in block.members:
            values[index] = bool(data[bit >> 3] & (1 << (bit & 7)))
        return
    for first, count, unpack, offset, _ in block.runs:
        values[first:first + count] = unpack(data, offset)
    for index, decode, offset in block.members:
        if decode is not None:
            values[index] = decode(data, offset)


class BlockReader:
    """Reads a device block by block: a refused block costs its points, a silent device the rest of its poll.
    Transports give `read_block` and say which errors still mean the device answered."""

    answered: tuple[type[Exception], ...] = (ModbusError,)
    # each device's requests, planned at its first read: a start of 100 channels does not plan every device
    # before the first one is polled (1,000 points: about 3 ms a device)
    _plans: dict[str, list[Block]]

    async def read_block(self, device: ModbusDevice, block: Block) -> bytes:
        raise NotImplementedError

    async def read(self, device: DeviceBase) -> DeviceRead:
        assert isinstance(device, ModbusDevice)
        values: list[object] = [None] * len(device.points)
        errors: list[str] = []
        blocks = self._plans.get(device.id)
        if blocks is None:
            blocks = self._plans[device.id] = plan_blocks(device)
        for i, block in enumerate(blocks):
            try:
                data = await self.read_block(device, block)
            except self.answered as exc:
                if isinstance(exc, ModbusError) and refused_for_a_gap(exc, block, device):
                    log.warning("device %s: the server refuses unused addresses inside a request (exception 2); "
                                "reading it without bridged gaps from now on", device.id)
                    self._plans[device.id] = gapless_plan(device)
                    return await self.read(device)
                errors.append(f"{block.describe()}: {exc}")  # the device answers: its other blocks may read
                continue
            except (TimeoutError, OSError, EOFError, FrameError) as exc:
                errors.append(f"{block.describe()}: {str(exc) or type(exc).__name__}")
                if len(blocks) > i + 1:
                    errors.append(f"{len(blocks) - i - 1} more block(s) skipped: the device is not answering")
                break
            decode_block(block, data, values)
        return DeviceRead(values, errors)


def bits_of(data: bytes, count: int) -> Sequence[bool]:
    """The first `count` bits of a coil/discrete reply's data; FrameError when the data holds fewer."""
    if len(data) < (count + 7) >> 3:
        raise FrameError(f"{len(data)} data bytes for {count} bits")
    return [bool(data[i >> 3] & (1 << (i & 7))) for i in range(count)]

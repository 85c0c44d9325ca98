"""`edge-agent probe modbus URL`: read one block of registers or bits from one Modbus device, over Modbus TCP,
RTU over TCP or a serial port, through the agent's own drivers, and say plainly what failed.

It only reads (functions 1-4); it never writes to a device.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import urllib.parse
from dataclasses import dataclass
from typing import Any

import click
from pydantic import ValidationError

from agent.cli.probe import emit, fail
from agent.drivers.modbus.codec import (
    EXCEPTION_NAMES,
    FUNCTION,
    REGISTERS,
    FrameError,
    ModbusError,
    ModbusPoint,
    bits_of,
    decoder,
    parse_read_reply,
    read_request,
)

TABLES = ("holding", "input", "coil", "discrete")
TYPES = ("bool", "int16", "uint16", "int32", "uint32", "float32", "int64", "uint64", "float64")
ORDERS = ("ABCD", "CDAB", "BADC", "DCBA")
URL_FORMS = "tcp://HOST:PORT, rtu+tcp://HOST:PORT or rtu:///dev/ttyX?baud=9600&parity=N&stopbits=1"


class UrlError(ValueError):
    pass


@dataclass(frozen=True)
class Target:
    """Where the device is: `kind` tcp, rtu+tcp or rtu, and the channel fields that reach it."""

    kind: str
    fields: dict[str, Any]


def parse_url(url: str) -> Target:
    """tcp://HOST[:PORT] (502 by default), rtu+tcp://HOST:PORT, rtu:///dev/ttyX?baud=&parity=&stopbits=."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UrlError(f"bad URL {url!r}: {exc}") from None
    if parts.scheme in ("tcp", "rtu+tcp"):
        if not parts.hostname or parts.path not in ("", "/") or parts.query:
            raise UrlError(f"bad URL {url!r}: write {parts.scheme}://HOST:PORT")
        if port is None:
            if parts.scheme == "rtu+tcp":
                raise UrlError(f"bad URL {url!r}: a serial device server has no standard port, give :PORT")
            port = 502
        return Target(parts.scheme, {"host": parts.hostname, "port": port})
    if parts.scheme == "rtu":
        if parts.netloc or not parts.path:
            raise UrlError(f"bad URL {url!r}: write rtu:///dev/ttyX (three slashes, then the port's path)")
        fields: dict[str, Any] = {"port": parts.path}
        names = {"baud": "baudrate", "parity": "parity", "stopbits": "stopbits"}
        for key, values in urllib.parse.parse_qs(parts.query, keep_blank_values=True).items():
            if key not in names:
                raise UrlError(f"bad URL {url!r}: unknown option {key!r} (baud, parity, stopbits)")
            value = values[-1]
            if key == "parity":
                fields["parity"] = value.upper()
            else:
                try:
                    fields[names[key]] = int(value)
                except ValueError:
                    raise UrlError(f"bad URL {url!r}: {key}={value!r} is not a whole number") from None
        return Target("rtu", fields)
    raise UrlError(f"bad URL {url!r}: use {URL_FORMS}")


def _channel(target: Target, device: dict[str, Any], timeout: float) -> Any:
    """The channel config of the target's driver, validated as the agent validates its configuration."""
    base = {"id": "probe", "devices": [device]}
    if target.kind == "tcp":
        from agent.drivers.modbus.tcp import ModbusTcpChannel

        return ModbusTcpChannel.model_validate({**base, **target.fields, "driver": "modbus_tcp",
                                                "connect_timeout": timeout})
    from agent.drivers.modbus.rtu import ModbusRtuChannel, ModbusRtuTcpChannel

    if target.kind == "rtu+tcp":
        return ModbusRtuTcpChannel.model_validate({**base, **target.fields, "driver": "modbus_rtu_tcp",
                                                   "connect_timeout": timeout})
    return ModbusRtuChannel.model_validate({**base, **target.fields, "driver": "modbus_rtu"})


def _driver(target: Target, channel: Any) -> Any:
    if target.kind == "tcp":
        from agent.drivers.modbus.tcp import ModbusTcpDriver

        return ModbusTcpDriver(channel)
    from agent.drivers.modbus.rtu import ModbusRtuDriver, ModbusRtuTcpDriver

    return ModbusRtuTcpDriver(channel) if target.kind == "rtu+tcp" else ModbusRtuDriver(channel)


async def _ask(target: Target, channel: Any, unit: int, function: int, start: int, count: int,
               timeout: float) -> bytes:
    driver = _driver(target, channel)
    try:
        reply: bytes = await driver.transact(unit, read_request(function, start, count), timeout)
        return parse_read_reply(reply, function, count)
    finally:
        await driver.close()


def _validation_message(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"] if p not in ("devices", 0, "points"))
        lines.append(f"{where}: {err['msg']}" if where else err["msg"])
    return "; ".join(lines)


class _Command(click.Command):
    """With --json, even a usage error (an unknown option, a bad choice) is reported as one JSON object."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        as_json = "--json" in args  # click consumes `args` as it parses
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            if as_json:
                fail(exc.format_message(), True, 2, failure="argument")
            raise


@click.command(name="modbus", cls=_Command)
@click.argument("url")
@click.option("--unit", type=int, default=1, show_default=True, help="Unit id (slave address).")
@click.option("--table", type=click.Choice(TABLES), default="holding", show_default=True, help="Register table.")
@click.option("--address", type=int, required=True, help="Zero-based register or bit address on the wire.")
@click.option("--count", type=int, help="Registers or bits to read (default 1, or the width of --type).")
@click.option("--type", "dtype", type=click.Choice(TYPES), help="Decode the registers as this type.")
@click.option("--order", type=click.Choice(ORDERS), default="ABCD", show_default=True,
              help="Byte order of multi-register types.")
@click.option("--bit", type=int, help="Bit of the register for --type bool (0 = least significant).")
@click.option("--timeout", type=float, default=1.0, show_default=True, help="Seconds to wait for the reply.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def command(url: str, unit: int, table: str, address: int, count: int | None, dtype: str | None, order: str,
            bit: int | None, timeout: float, as_json: bool) -> None:
    """Read COUNT registers or bits at ADDRESS of one Modbus device.

    URL is tcp://HOST:PORT (Modbus TCP), rtu+tcp://HOST:PORT (RTU frames to a serial device server) or
    rtu:///dev/ttyUSB0?baud=9600&parity=N&stopbits=1 (a serial port).
    """
    bits = table in ("coil", "discrete")
    try:
        target = parse_url(url)
    except UrlError as exc:
        fail(str(exc), as_json, 2, failure="url")
    if not 0 < timeout <= 60:
        fail(f"--timeout must be above 0 and at most 60 seconds, not {timeout:g}", as_json, 2, failure="argument")
    if bits and dtype not in (None, "bool"):
        fail(f"the {table} table holds bits: --type can only be bool", as_json, 2, failure="argument")
    width = 1 if bits or dtype is None else REGISTERS[dtype]
    if count is None:
        count = width
    elif dtype is not None and not bits and count not in (1, width):
        fail(f"--type {dtype} takes {width} register(s): give --count {width} or leave it out", as_json, 2,
             failure="argument")
    elif dtype is not None:
        count = width
    if dtype is None and not 1 <= count <= (2000 if bits else 125):
        fail(f"--count must be 1..{2000 if bits else 125} for the {table} table", as_json, 2, failure="argument")
    point: dict[str, Any] = {"id": "probe", "table": table, "address": address,
                             "type": dtype or ("bool" if bits else "uint16"), "order": order}
    if bit is not None:
        point["bit"] = bit
    device = {"id": "probe", "unit": unit, "timeout": timeout, "points": [point]}
    try:
        channel = _channel(target, device, timeout)
    except ValidationError as exc:
        fail(_validation_message(exc), as_json, 2, failure="argument")
    if address + count > 65536:
        fail(f"--address {address} + --count {count} runs past 65535", as_json, 2, failure="argument")

    function = FUNCTION[table]
    where = f"unit {unit} at {url}"
    drivers_log = logging.getLogger("agent.drivers")
    level = drivers_log.level
    drivers_log.setLevel(logging.ERROR)  # the probe says what failed itself, once
    try:
        data = asyncio.run(_ask(target, channel, unit, function, address, count, timeout))
    except ModbusError as exc:
        name = EXCEPTION_NAMES.get(exc.code, "unknown")
        fail(f"Modbus exception {exc.code} ({name}) from {where} to function {function}", as_json,
             failure="exception", exception=exc.code, exception_name=name)
    except TimeoutError as exc:
        fail(f"timeout: {exc} from {where}", as_json, failure="timeout")
    except FrameError as exc:
        from agent.drivers.modbus.rtu import CrcError

        if isinstance(exc, CrcError):
            fail(f"{exc} from {where}", as_json, failure="crc")
        fail(f"bad reply from {where}: {exc}", as_json, failure="frame")
    except OSError as exc:
        if isinstance(exc, ConnectionRefusedError) or exc.errno == errno.ECONNREFUSED or "refused" in str(exc):
            endpoint = f"{target.fields['host']}:{target.fields['port']}" if "host" in target.fields else url
            fail(f"connection refused by {endpoint}", as_json, failure="refused")
        fail(f"connection failed: {exc}", as_json, failure="connection")
    finally:
        drivers_log.setLevel(level)

    first, last = address, address + count - 1
    span = f"{first}" if count == 1 else f"{first}..{last}"
    result: dict[str, Any] = {"url": url, "unit": unit, "table": table, "address": address, "count": count}
    if bits:
        states = list(bits_of(data, count))
        result["raw"] = [int(b) for b in states]
        if count == 1:
            result["value"] = states[0]
        else:
            result["values"] = states
        lines = [f"{table} {span} of {where}:"] + [f"  {first + i}: {int(b)}" for i, b in enumerate(states)]
    else:
        registers = [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]
        result["raw"] = registers
        hexed = " ".join(f"0x{r:04X}" for r in registers)
        if dtype is not None:
            value = decoder(ModbusPoint.model_validate(point))(data, 0)
            result.update(type=dtype, order=order, value=value)
            shown = f"{dtype} {order}" if width > 1 else dtype
            lines = [f"{table} {span} of {where}: {shown} = {value} (raw {hexed})"]
        elif count == 1:
            result["value"] = registers[0]
            lines = [f"{table} {span} of {where}: {registers[0]} (raw {hexed})"]
        else:
            result["values"] = registers
            lines = [f"{table} {span} of {where}:"] + [f"  {first + i}: {r} (0x{r:04X})"
                                                        for i, r in enumerate(registers)]
    finite = not isinstance(result.get("value"), float) or math.isfinite(result["value"])
    if not finite:
        result["value"] = None  # JSON has no NaN or infinity; the device sent one, which the agent reads as bad
    result["quality"] = "good" if finite else "bad"
    emit(result, as_json, "\n".join(lines))

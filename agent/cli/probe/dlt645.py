"""`edge-agent probe dlt645`: read one data identifier of one DL/T 645-2007 meter, or the address of the only meter
on a bus, straight from a serial port; it only reads, never writes to a meter.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from agent.cli.probe import emit, fail

if TYPE_CHECKING:
    from agent.drivers.dlt645.codec import DataFormat

EXIT_ARGUMENTS = 2
EXIT_DEVICE = 1


class _Command(click.Command):
    """With --json, even a malformed command line is answered with one JSON object."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            if "--json" in args:
                fail(exc.format_message(), True, EXIT_ARGUMENTS, kind="arguments")
            raise


def _number(text: str, what: str, as_json: bool, *, integer: bool = False) -> float:
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        fail(f"{what} must be a {'whole ' if integer else ''}number, not {text!r}", as_json, EXIT_ARGUMENTS,
             kind="arguments")
        raise  # fail() exits; this keeps the type checker sure of it
    return value


@click.command(name="dlt645", cls=_Command)
@click.argument("port")
@click.option("--address", help="Meter address: the 12 digits on its nameplate.")
@click.option("--di", help="Data identifier, 8 hex digits, e.g. 00010000 (total forward active energy).")
@click.option("--discover", is_flag=True, help="Read the address of the only meter on the bus (all-AA address).")
@click.option("--baud", default="2400", show_default=True, help="Bits per second.")
@click.option("--parity", default="E", show_default=True, help="N, E, O, M or S.")
@click.option("--timeout", default="1.0", show_default=True, help="Seconds to wait for the reply to begin.")
@click.option("--preamble", default="4", show_default=True, help="FEH wake-up bytes before the request (0-4).")
@click.option("--format", "fmt", help="Coding of a DI the agent does not know: BYTES,DECIMALS[,signed].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def command(port: str, address: str | None, di: str | None, discover: bool, baud: str, parity: str, timeout: str,
            preamble: str, fmt: str | None, as_json: bool) -> None:
    """Read DI of meter ADDRESS on PORT (e.g. /dev/ttyUSB0), or --discover the address of the only meter."""
    from agent.drivers.dlt645 import codec
    from agent.drivers.dlt645 import driver as dlt645

    def bad(message: str) -> None:
        fail(message, as_json, EXIT_ARGUMENTS, kind="arguments")

    baudrate = int(_number(baud, "--baud", as_json, integer=True))
    if not 300 <= baudrate <= 115200:
        bad(f"--baud {baudrate} is outside 300-115200")
    parity = parity.upper()
    if parity not in ("N", "E", "O", "M", "S"):
        bad(f"--parity must be one of N, E, O, M, S, not {parity!r}")
    wait = _number(timeout, "--timeout", as_json)
    if not 0 < wait <= 60:
        bad(f"--timeout must be more than 0 and at most 60 seconds, not {timeout}")
    wake = int(_number(preamble, "--preamble", as_json, integer=True))
    if not 0 <= wake <= 4:
        bad(f"--preamble must be 0 to 4 wake-up bytes, not {wake}")
    data_format: codec.DataFormat | None = None
    identifier = 0
    if discover:
        if address is not None or di is not None or fmt is not None:
            bad("--discover reads the address of the only meter on the bus: leave out --address, --di and --format")
    else:
        if address is None or di is None:
            bad("give --address and --di to read a value, or --discover to read the address of the only meter")
        assert address is not None and di is not None
        if len(address) != 12 or not address.isdigit() or not address.isascii():
            bad(f"--address must be the meter's 12 decimal digits, not {address!r}")
        try:
            identifier = codec.parse_di(di)
        except ValueError as exc:
            bad(f"--di: {exc}")
        data_format = codec.KNOWN_DIS.get(identifier)
        if fmt is not None:
            data_format = _parse_format(fmt, bad)

    bus = dlt645.Dlt645Bus(port, baudrate=baudrate, parity=parity, preamble=wake, response_timeout=wait)
    # a whole reply of the longest kind must fit after its first byte
    deadline = wait + bus.latency + bus.link.wire_time(4 + 12 + codec.MAX_DATA)

    async def ask() -> dlt645.Exchange:
        try:
            if discover:
                return await bus.read_address(deadline)
            assert address is not None
            return await bus.read(address, identifier, deadline)
        finally:
            await bus.close()

    try:
        exchange = asyncio.run(ask())
    except ConnectionError as exc:
        fail(str(exc), as_json, EXIT_DEVICE, kind="port", port=port)
        return
    except codec.ErrorReply as exc:
        who = f"meter {address}" if address else "the meter"
        fail(f"{who} answered with an error: {exc}", as_json, EXIT_DEVICE, kind="error_reply",
             error_code=exc.code, error_bits=exc.reasons, **_bytes(bus.last_request, exc.frame, address))
        return
    except codec.FrameError as exc:
        # every meter answers the all-AA address, so two on the bus garble each other's replies
        hint = "; if several meters are on the bus they all answer --discover: ask one by --address" \
            if discover else ""
        fail(f"{exc}{hint}", as_json, EXIT_DEVICE, kind=exc.kind, **_bytes(bus.last_request, exc.frame, address))
        return
    except codec.NoReply as exc:
        who = f"meter {address}" if address else "any meter"
        kind = "wrong_reply" if exc.notes else "timeout"
        fail(f"{exc} from {who} on {port}", as_json, EXIT_DEVICE, kind=kind,
             **_bytes(bus.last_request, exc.received, address))
        return

    request_hex, frame_hex = exchange.request.hex(" "), exchange.frame.raw.hex(" ")
    if discover:
        found = codec.address_text(exchange.payload)
        emit({"value": found, "quality": "good", "address": found, "request": request_hex, "frame": frame_hex},
             as_json, f"meter address {found} (reply {frame_hex})")
        return
    assert address is not None
    result: dict[str, Any] = {"address": address, "di": codec.di_text(identifier), "request": request_hex,
                              "frame": frame_hex, "data": exchange.payload.hex(" ")}
    known = codec.KNOWN_DIS.get(identifier)
    name = f" {known.name}" if known is not None else ""
    if data_format is None:
        result.update(value=None, quality="uncertain")
        emit(result, as_json, f"meter {address} DI {codec.di_text(identifier)}: data {exchange.payload.hex(' ')} "
             "(low byte first; give --format BYTES,DECIMALS[,signed] to decode it)")
        return
    try:
        value = codec.decode_value(exchange.payload, data_format)
    except ValueError as exc:
        fail(f"meter {address} DI {codec.di_text(identifier)}: {exc}", as_json, EXIT_DEVICE, kind="value",
             **_bytes(exchange.request, exchange.frame.raw, address))
        return
    unit = data_format.unit or (known.unit if known is not None else "")
    result.update(value=value, unit=unit, quality="good")
    shown = f"{value:.{data_format.decimals}f}"
    emit(result, as_json, f"meter {address} DI {codec.di_text(identifier)}{name}: {shown}{' ' + unit if unit else ''}")


def _parse_format(text: str, bad: Callable[[str], None]) -> DataFormat:
    from agent.drivers.dlt645.codec import DataFormat

    parts = [p.strip().lower() for p in text.split(",")]
    signed = len(parts) == 3 and parts[2] == "signed"
    if len(parts) not in (2, 3) or (len(parts) == 3 and not signed) or not all(p.isdigit() for p in parts[:2]):
        bad(f"--format must be BYTES,DECIMALS or BYTES,DECIMALS,signed (e.g. 4,2), not {text!r}")
    size, decimals = int(parts[0]), int(parts[1])
    if not 1 <= size <= 8 or decimals > 2 * size:
        bad(f"--format {text}: 1-8 bytes, and at most two decimals per byte")
    return DataFormat(size, decimals, signed)


def _bytes(request: bytes, frame: bytes, address: str | None) -> dict[str, Any]:
    return {"request": request.hex(" "), "frame": frame.hex(" ") if frame else None, "address": address}

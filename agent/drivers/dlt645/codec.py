"""The DL/T 645-2007 frame codec: building requests, finding and checking reply frames, decoding values.

A frame is found by its length field, never by searching for 0x16 or 0x68 past its start, since a meter
address may hold either byte. Only the read (11H) and read-address (13H) requests exist here: the agent never
writes to a meter. Pure functions on bytes: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from agent import errors
from agent.errors import ProtocolError

# --- the standard's constants ----------------------------------------------------------------------------

WAKE = 0xFE
START = 0x68
END = 0x16
OFFSET = 0x33
MAX_DATA = 200
"""Longest data field the standard allows in a read reply (L <= 200)."""

READ = 0x11
READ_ADDRESS = 0x13
REPLY = 0x80
"""Control bit D7: set in every frame a meter sends."""
ABNORMAL = 0x40
"""Control bit D6: the meter could not do what was asked; the data field is one error byte."""
FOLLOWS = 0x20
"""Control bit D5: more frames follow (read them with 12H); not supported here."""

WILDCARD = "AAAAAAAAAAAA"
"""The all-AA address every meter answers; used to read the address of the only meter on a bus."""
BROADCAST = "999999999999"
"""The standard's broadcast address: only for commands no meter answers (time sync, freeze)."""

ERROR_BITS = (
    (0x01, "other error"),
    (0x02, "no data requested"),
    (0x04, "password error or unauthorised"),
    (0x08, "communication rate cannot be changed"),
    (0x10, "year time zone count exceeded"),
    (0x20, "day time period count exceeded"),
    (0x40, "rate count exceeded"),
)


@dataclass(frozen=True)
class DataFormat:
    """How a data identifier's value is coded: `size` BCD bytes low byte first, `decimals` implied decimal
    places, and with `signed` the top bit of the last (most significant) byte is the sign."""

    size: int
    decimals: int
    signed: bool = False
    unit: str = ""
    name: str = ""

    def describe(self) -> str:
        digits = 2 * self.size
        text = "X" * (digits - self.decimals) + ("." + "X" * self.decimals if self.decimals else "")
        return f"{text}{' signed' if self.signed else ''}, {self.size} bytes"


KNOWN_DIS: dict[int, DataFormat] = {
    0x00010000: DataFormat(4, 2, False, "kWh", "total forward active energy"),
    0x00020000: DataFormat(4, 2, False, "kWh", "total reverse active energy"),
    0x02010100: DataFormat(2, 1, False, "V", "phase A voltage"),
    0x02010200: DataFormat(2, 1, False, "V", "phase B voltage"),
    0x02010300: DataFormat(2, 1, False, "V", "phase C voltage"),
    0x02020100: DataFormat(3, 3, True, "A", "phase A current"),
    0x02020200: DataFormat(3, 3, True, "A", "phase B current"),
    0x02020300: DataFormat(3, 3, True, "A", "phase C current"),
    0x02030000: DataFormat(3, 4, True, "kW", "total active power"),
    0x02030100: DataFormat(3, 4, True, "kW", "phase A active power"),
    0x02030200: DataFormat(3, 4, True, "kW", "phase B active power"),
    0x02030300: DataFormat(3, 4, True, "kW", "phase C active power"),
    0x02040000: DataFormat(3, 4, True, "kvar", "total reactive power"),
    0x02060000: DataFormat(2, 3, True, "", "total power factor"),
    0x02060100: DataFormat(2, 3, True, "", "phase A power factor"),
    0x02060200: DataFormat(2, 3, True, "", "phase B power factor"),
    0x02060300: DataFormat(2, 3, True, "", "phase C power factor"),
    0x02800002: DataFormat(2, 2, False, "Hz", "grid frequency"),
}


# --- errors ----------------------------------------------------------------------------------------------


class Dlt645Error(ProtocolError):
    """A transaction that failed with a reply; `frame` is the offending reply's bytes when there was one and
    `kind` names the failure for programs (checksum, bad_frame, truncated, follow_up, error_reply, bad_value)."""

    def __init__(self, message: str, frame: bytes = b"", kind: str = "bad_frame") -> None:
        super().__init__(message)
        self.frame = frame
        self.kind = kind


class FrameError(Dlt645Error):
    """Bytes that are not a valid frame (checksum, end byte, length) or a reply that does not fit the request."""


class ValueCodingError(FrameError, ValueError):
    """A value's data bytes that are not its BCD coding (a digit above 9, or not the format's size); also the
    ValueError that callers of `decode_value` catch."""


class ErrorReply(Dlt645Error):
    """The meter's abnormal reply (control D6 set) with its error byte decoded."""

    def __init__(self, code: int, frame: bytes = b"") -> None:
        self.code = code
        self.reasons = error_reasons(code)
        super().__init__(f"error reply 0x{code:02X}: {', '.join(self.reasons)}", frame, "error_reply")


class NoReply(errors.NoReply):
    """No valid reply before the deadline; `received` is whatever arrived, `notes` what was rejected and why."""

    def __init__(self, message: str, received: bytes = b"", notes: list[str] | None = None) -> None:
        super().__init__(message)
        self.received = received
        self.notes = notes or []


def error_reasons(code: int) -> list[str]:
    """Names of the bits set in an error byte, lowest bit first."""
    names = [name for bit, name in ERROR_BITS if code & bit]
    if code & 0x80:
        names.append("reserved bit 7")
    return names or ["no error bit set"]


# --- codec -----------------------------------------------------------------------------------------------


def address_field(address: str) -> bytes:
    """12 decimal digits (or AA wildcard pairs) -> the 6 address bytes, low byte first."""
    text = address.upper()
    if len(text) != 12 or any(c not in "0123456789A" for c in text):
        raise ValueError(f"a meter address is 12 decimal digits, not {address!r}")
    pairs = [text[i : i + 2] for i in range(0, 12, 2)]
    if any("A" in p and p != "AA" for p in pairs):
        raise ValueError(f"a wildcard takes a whole byte (AA), not {address!r}")
    return bytes(int(p, 16) for p in reversed(pairs))


def address_text(field: bytes) -> str:
    """The 6 address bytes (low byte first) as the 12 digits printed on the meter."""
    return "".join(f"{b:02X}" for b in reversed(field))


def checksum(frame: bytes | bytearray) -> int:
    """Sum of every byte from the first 0x68 through the data field, mod 256."""
    return sum(frame) & 0xFF


def di_text(di: int) -> str:
    return f"{di:08X}"


_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


def parse_di(text: str) -> int:
    # int(text, 16) alone would take spaces, a sign, 0x, underscores and other scripts' digits
    if len(text) != 8 or not _HEX_DIGITS.issuperset(text):
        raise ValueError(f"a data identifier is 8 hex digits, not {text!r}")
    return int(text, 16)


def build_frame(address: str, control: int, data: bytes = b"", preamble: int = 0) -> bytes:
    """A complete frame: wake-up bytes, 68 A0..A5 68 C L DATA+33H CS 16."""
    if len(data) > MAX_DATA:
        raise ValueError(f"data field of {len(data)} bytes; the standard allows {MAX_DATA}")
    body = bytes([START]) + address_field(address) + bytes([START, control, len(data)])
    body += bytes((b + OFFSET) & 0xFF for b in data)
    return bytes([WAKE]) * preamble + body + bytes([checksum(body), END])


def read_request(address: str, di: int, preamble: int = 0) -> bytes:
    """Read one data identifier (11H); the DI goes low byte first like every other data item."""
    return build_frame(address, READ, di.to_bytes(4, "little"), preamble)


def read_address_request(preamble: int = 0) -> bytes:
    """Read the address (13H) of whichever meter answers the all-AA address."""
    return build_frame(WILDCARD, READ_ADDRESS, b"", preamble)


@dataclass(frozen=True)
class Frame:
    """A frame as received: its address, control code, data field with 33H taken off, and its wire bytes."""

    address: str
    control: int
    data: bytes
    raw: bytes

    @property
    def from_meter(self) -> bool:
        return bool(self.control & REPLY)

    @property
    def function(self) -> int:
        return self.control & 0x1F


class Scan(NamedTuple):
    """What `split_frame` found at the head of a buffer.

    `skip` bytes are consumed (preamble, noise, or the frame itself). `frame` is a valid frame, `problem` says why
    a frame-like start was rejected (only its first byte is skipped, so a real frame inside it is still found),
    and otherwise at least `missing` more bytes are needed.
    """

    skip: int
    frame: Frame | None = None
    problem: str | None = None
    missing: int = 0


def split_frame(buffer: bytes | bytearray) -> Scan:
    """Find the first frame in `buffer` by its length field; see `Scan`."""
    start = buffer.find(START)
    if start < 0:
        return Scan(len(buffer), missing=1)  # wake-up bytes and noise
    have = len(buffer) - start
    if have < 10:
        if have >= 8 and buffer[start + 7] != START:
            return Scan(start + 1)  # not a frame head: a stray 68H
        return Scan(start, missing=10 - have)
    if buffer[start + 7] != START:
        return Scan(start + 1)
    length = buffer[start + 9]
    if length > MAX_DATA:
        return Scan(start + 1)  # no frame is this long: noise
    total = 12 + length
    if have < total:
        if _complete_frame_after(buffer, start + 1):
            return Scan(start + 1)  # noise that looked like a frame head; a whole frame follows it
        return Scan(start, missing=total - have)
    raw = bytes(buffer[start : start + total])
    if raw[-1] != END:
        return Scan(start + 1, problem=f"frame of length {length} ends in {raw[-1]:02X}, not 16 ({raw.hex(' ')})")
    expected = checksum(raw[:-2])
    if raw[-2] != expected:
        return Scan(start + 1, problem=f"checksum {raw[-2]:02X} but the bytes sum to {expected:02X} ({raw.hex(' ')})")
    data = bytes((b - OFFSET) & 0xFF for b in raw[10:-2])
    return Scan(start + total, frame=Frame(address_text(raw[1:7]), raw[8], data, raw))


def _complete_frame_after(buffer: bytes | bytearray, position: int) -> bool:
    """Whether a whole valid frame starts at or after `position`."""
    start = buffer.find(START, position)
    while start >= 0:
        if len(buffer) - start >= 12 and buffer[start + 7] == START:
            total = 12 + buffer[start + 9]
            if len(buffer) - start >= total and buffer[start + total - 1] == END \
                    and buffer[start + total - 2] == checksum(buffer[start : start + total - 2]):
                return True
        start = buffer.find(START, start + 1)
    return False


def decode_value(data: bytes, fmt: DataFormat) -> float:
    """BCD bytes (low byte first) -> the value; ValueCodingError if the bytes are not BCD or not the format's size."""
    if len(data) != fmt.size:
        raise ValueCodingError(f"{len(data)} data bytes where the format has {fmt.size} ({fmt.describe()})",
                               kind="bad_value")
    negative = False
    if fmt.signed and data[-1] & 0x80:
        negative = True
        data = data[:-1] + bytes([data[-1] & 0x7F])
    magnitude = 0
    for byte in reversed(data):
        high, low = byte >> 4, byte & 0x0F
        if high > 9 or low > 9:
            raise ValueCodingError(f"not BCD: {data[::-1].hex(' ')} (most significant byte first)", kind="bad_value")
        magnitude = magnitude * 100 + high * 10 + low
    value = magnitude / float(10**fmt.decimals)
    return -value if negative else value

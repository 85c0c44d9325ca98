"""Canonical bytes of a JSON message: the exact bytes a signature covers, the same in every language.

The form is RFC 8785 (JSON Canonicalization Scheme), which any platform can reproduce with a JCS library, on a
checked subset of JSON: string member names only, no NaN or infinities, integers within ±(2^53-1), at most
MAX_DEPTH levels, no member name twice in one object. Anything outside it is refused with the path of the value
at fault, never guessed at. This module signs nothing and raises nothing but NotCanonical on any input.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any

import orjson

SIG = "sig"
"""The member that carries the signature; the top-level one is left out of the canonical bytes."""
MAX_DEPTH = 32  # objects and arrays nested deeper than any message of the contract needs
MAX_SAFE_INTEGER = 2**53 - 1  # larger integers are not exact in a reader that holds numbers as doubles (JavaScript)
MAX_MESSAGE_BYTES = 64 * 1_048_576  # the largest message the uplink may be configured to take


class NotCanonical(ValueError):
    """A value outside the signable subset of JSON; the text starts with its path (`readings[0].value: ...`)."""


def canonical_bytes(message: Mapping[str, Any], *, leave_out: frozenset[str] = frozenset(),
                    exact_integers: bool = True) -> bytes:
    """The RFC 8785 bytes of `message` without its top-level `sig` member (and the top-level members named in
    `leave_out`); NotCanonical for anything else.

    `exact_integers=False` writes an integer beyond ±(2^53-1) as RFC 8785 itself does, as the double nearest to it,
    where the default refuses it: the hash chain over the agent's own messages must take every value a 64-bit
    integer point can have (docs/protocol.md, Hash chain)."""
    if not isinstance(message, Mapping):
        raise NotCanonical(f"(top level): a signed message is a JSON object, not {_kind(message)}")
    try:
        members = {key: value for key, value in message.items() if key != SIG and key not in leave_out}
        prepared = _prepare(members, 1, exact_integers)
    except _Refused as exc:
        raise NotCanonical(f"{exc.where()}: {exc}") from None
    try:
        return orjson.dumps(prepared)
    except orjson.JSONEncodeError:  # the one check left to orjson: text that is not Unicode (a lone surrogate)
        raise NotCanonical(f"{_surrogate_at(message)}: text with a lone surrogate (\\ud800-\\udfff) is not "
                           "Unicode") from None


def loads_strict(payload: bytes) -> dict[str, Any]:
    """A JSON object read from UTF-8 bytes, refusing what two readers could take differently: a member name given
    twice (one reader keeps the first, another the last), NaN and infinities, invalid UTF-8."""
    if len(payload) > MAX_MESSAGE_BYTES:
        raise NotCanonical(f"(top level): {len(payload)} bytes, more than {MAX_MESSAGE_BYTES}")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise NotCanonical("(top level): not UTF-8") from None
    try:
        value = json.loads(text, object_pairs_hook=_unique_members, parse_constant=_no_constant)
    except NotCanonical:
        raise
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError, as is an int of 5000 digits
        raise NotCanonical(f"(top level): not JSON ({type(exc).__name__})") from None
    if not isinstance(value, dict):
        raise NotCanonical(f"(top level): a signed message is a JSON object, not {_kind(value)}")
    return value


def format_number(value: float) -> str:
    """A finite double as ECMAScript's Number::toString writes it (RFC 8785 section 3.2.2.3): the shortest digits
    that read back to the same double, in plain notation for 1e-7 <= |x| < 1e21 and in exponent notation else."""
    if not math.isfinite(value):
        raise ValueError(f"{value} is not a JSON number")
    if value == 0:
        return "0"  # minus zero too
    if value < 0:
        return "-" + format_number(-value)
    # Python's repr gives the shortest digits that round-trip, nearest the double: the digits ECMAScript asks for
    text = repr(value)
    if "e" not in text:  # repr writes plain digits only from 1e-4 to 1e16, where ECMAScript does too
        return text.removesuffix(".0")
    _sign, digit_tuple, exponent = Decimal(text).as_tuple()
    digits = "".join(map(str, digit_tuple)).rstrip("0")
    k = len(digits)
    n = int(exponent) + len(digit_tuple)  # the value is 0.digits × 10^n
    if k <= n <= 21:
        return digits + "0" * (n - k)
    if 0 < n <= 21:
        return digits[:n] + "." + digits[n:]
    if -6 < n <= 0:
        return "0." + "0" * -n + digits
    e = n - 1
    mantissa = digits if k == 1 else digits[0] + "." + digits[1:]
    return f"{mantissa}e{'+' if e >= 0 else '-'}{abs(e)}"


class _Refused(Exception):
    """A value the canonical form refuses; `path` collects member names and indexes on the way out."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.path: list[str | int] = []

    def where(self) -> str:
        return _render_path(reversed(self.path))


def _prepare(value: Any, depth: int, exact_integers: bool = True) -> Any:
    """`value` checked and made ready for orjson: members in RFC 8785 order, numbers as their canonical text.
    Runs over every value of a message, so a path is built only for an error."""
    if isinstance(value, str) or value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
            return value
        if not exact_integers:
            try:
                return orjson.Fragment(format_number(float(value)).encode("ascii"))
            except OverflowError:
                raise _Refused("integer beyond the range of a double") from None
        raise _Refused("integer beyond ±(2^53-1), not exact in every JSON reader: send it as a string")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _Refused(f"{value} is not a JSON number")
        return orjson.Fragment(format_number(value).encode("ascii"))
    if not isinstance(value, Mapping | list):
        raise _Refused(f"{_kind(value)} is not a JSON value")
    if depth > MAX_DEPTH:
        raise _Refused(f"nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, list):
        items = []
        for i, item in enumerate(value):
            try:
                items.append(_prepare(item, depth + 1, exact_integers))
            except _Refused as exc:
                exc.path.append(i)
                raise
        return items
    ascii_names = True
    for key in value:
        if not isinstance(key, str):
            raise _Refused(f"member name {_short(key)} is not a string")
        ascii_names = ascii_names and key.isascii()
    # RFC 8785 orders names by UTF-16 code units: not code point order for characters above U+FFFF
    names = sorted(value) if ascii_names else sorted(value, key=_utf16)
    out: dict[str, Any] = {}
    for key in names:
        try:
            out[key] = _prepare(value[key], depth + 1, exact_integers)
        except _Refused as exc:
            exc.path.append(key)
            raise
    return out


def _utf16(name: str) -> bytes:
    return name.encode("utf-16-be", "surrogatepass")


def _surrogate_at(message: Mapping[str, Any]) -> str:
    """The path of the first text (a value or a member name) that is not Unicode, for the error."""
    todo: list[tuple[tuple[str | int, ...], Any]] = [((), message)]
    while todo:
        where, item = todo.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return _render_path(where)
        elif isinstance(item, Mapping):
            for key, member in item.items():
                if where or key != SIG:
                    todo.extend((((*where, key), key), ((*where, key), member)))
        elif isinstance(item, list):
            todo.extend(((*where, i), member) for i, member in enumerate(item))
    return "(top level)"


def _render_path(parts: Iterable[str | int]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{_short(part)}" if out else _short(part))
    return out or "(top level)"


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise NotCanonical(f"{_short(key)}: member name given twice in one object")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise NotCanonical(f"(top level): {name} is not a JSON number")


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
            bool: "a boolean", type(None): "null"}.get(type(value), f"a {type(value).__name__}")


def _short(text: Any, limit: int = 40) -> str:
    """A name from untrusted input, cut short and made printable, for an error text."""
    shown = text if isinstance(text, str) else repr(text)
    shown = shown.encode("utf-8", "backslashreplace").decode("utf-8")
    return shown if len(shown) <= limit else shown[:limit] + "..."

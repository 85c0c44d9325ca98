"""Sealing a stored message: its link in the hash chain and, with the agent's key, its signature
(agent.trust.chain), computed once when the message is stored and kept at the end of its body, so a live send and
every replay carry the same `chain` and `sig`.

The entry bytes are RFC 8785, and the generic encoder costs about 4 µs a reading, more than the whole data path may
add; so a `data` body takes one of three fast roads. A version 1 body that agent.messages wrote in RFC 8785 form
already (a SealReady: members in order, every number as ECMAScript writes it, which is the rule) is hashed as it
is, with `chain`, `seq` and `v` put in their places. A compact body whose numbers are all written so (an
EntryReady, from agent.compact) carries its entry bytes but for `chain` and `seq`, which go in their places. Any
other `data` body is read back and written by orjson with
sorted members, which is RFC 8785 except for some numbers (`12.0`, `1e+16`, `1e-6`, integers beyond 2^53): only
those are rewritten. Anything the fast roads are not sure of (and alarm events and daily reports, a few a day)
goes the generic way. All give the same bytes (tests/test_fuzz_chain.py proves it for every body the encoders
write and for any values). This module never touches the store.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import orjson

from agent.compact import PREFIX, EntryReady
from agent.messages import SealReady
from agent.trust.canonical import MAX_SAFE_INTEGER, format_number
from agent.trust.chain import CHAIN, Head, entry_bytes, entry_hash, link_member
from agent.trust.keys import ALG, b64url, key_id

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

# numbers orjson writes otherwise than RFC 8785, in an array that holds only null, booleans and numbers: an integral
# float (`12.0`, `-0.0`: dropped by replacing text, quick), an exponent (orjson writes one from 1e16 and below 1e-5,
# RFC 8785 from 1e21 and below 1e-6) and an integer beyond 2^53-1 (RFC 8785 writes the double nearest it; runs of 16
# digits or more are looked at), these two by a rewrite of the token (rare)
_TOKEN = re.compile(rb"(?<=[\[,])(?:-?\d(?:\.\d+)?e[+-]?\d+|-?\d{16,}(?=[,\]]))")
_DIGITS = bytes(48 if chr(c).isdigit() and c < 128 else 32 for c in range(256))  # every digit as "0", the rest " "
_LONG = b"0" * 16
_SCALARS = frozenset({type(None), bool, int, float})
_DATA_MEMBERS = frozenset({"agent", "enterprise", "readings", "v", "seq", CHAIN})
_COMPACT_MEMBERS = frozenset({"agent", "enterprise", "map", "g", "q", "v", "seq", CHAIN})
_SORTED = orjson.OPT_SORT_KEYS


class Sealer:
    """Makes the `chain` member (and, with a key, the `sig` member) of each stored message. Without a key the
    chain is still kept, unsigned; `unsigned_reason` says why there is no key."""

    def __init__(self, key: Ed25519PrivateKey | None = None, unsigned_reason: str | None = None) -> None:
        self.key = key
        self.kid = key_id(key.public_key()) if key is not None else None
        self.unsigned_reason = None if key is not None else (unsigned_reason or "no key given")

    def seal(self, topic: str, seq: int, body: bytes, head: Head | None, start: str = "new") -> tuple[bytes, Head]:
        """The stored body with its `chain` (and `sig`) member added, and the new head of the chain. `body` is
        a stored body as agent.messages writes it (without `v`, `seq`, `hist`); `head` the message stored before
        it, None when a chain starts here (for `start`)."""
        if not body.endswith(b"}"):
            raise ValueError("a stored body ends with the message's closing brace")
        chain = link_member(head, start)
        data = body_entry_bytes(body, seq, chain, data=topic == "data")
        tail = b',"chain":' + orjson.dumps(chain)
        if self.key is not None:
            tail += b',"sig":' + orjson.dumps({"alg": ALG, "kid": self.kid, "value": b64url(self.key.sign(data))})
        return body[:-1] + tail + b"}", Head(seq, topic, entry_hash(data))


def body_entry_bytes(body: bytes, seq: int, chain: dict[str, Any], *, data: bool) -> bytes:
    """The entry bytes (agent.trust.chain.entry_bytes) of the message a stored body becomes with this seq and
    chain member, by the fast road for a `data` body; ValueError when the body is not a JSON object."""
    if type(body) is EntryReady:  # a compact body that carries its entry bytes: written so by agent.compact
        return b'%s,"chain":%s%s,"seq":%d,"v":2}' % (body.entry_head, orjson.dumps(chain, option=_SORTED),
                                                     body.entry_tail, seq)
    if isinstance(body, SealReady) and not body.startswith(PREFIX):  # written so by agent.messages: taken as it is
        cut = body.agent_end
        return b"{%s,\"chain\":%s%s,\"seq\":%d,\"v\":1}" % (body[:cut], orjson.dumps(chain, option=_SORTED),
                                                               body[cut:-1], seq)
    message = orjson.loads(b"{" + body)
    if not isinstance(message, dict):
        raise ValueError("a stored body is not a JSON object")
    message["v"] = 2 if body.startswith(PREFIX) else 1
    message["seq"] = seq
    message[CHAIN] = chain
    if data:
        fast = _data_entry_bytes(message)
        if fast is not None:
            return fast
    return entry_bytes(message)


def _data_entry_bytes(message: dict[str, Any]) -> bytes | None:
    """RFC 8785 bytes of a `data` message as agent.messages and agent.compact write it, by orjson with sorted
    members and its values (version 1 `readings[].value`, version 2 `g[].v`) rewritten where orjson writes them
    otherwise; None when the message is not shaped so (then the generic encoder decides). May change `message`."""
    readings = message.get("readings")
    if type(readings) is list and message.keys() <= _DATA_MEMBERS:
        try:
            values = [r["value"] for r in readings]
            stamps = [r["ts"] for r in readings]
        except (TypeError, KeyError):
            return None
        if not _safe_integers(stamps):
            return None
        tokens = _canonical_scalars(values)
        if tokens is None:
            return None
        if tokens is not _AS_IS:
            fragment = orjson.Fragment
            for r, token in zip(readings, tokens, strict=True):
                r["value"] = fragment(token)
        return orjson.dumps(message, option=_SORTED)
    groups = message.get("g")
    if type(groups) is list and message.keys() <= _COMPACT_MEMBERS:
        rewritten: list[tuple[dict[str, Any], orjson.Fragment]] = []
        for group in groups:
            if type(group) is not dict or type(group.get("v")) is not list:
                return None
            t = group.get("t")
            if not _safe_integers(t if type(t) is list else [t]):  # one time or a list of them
                return None
            tokens = _canonical_scalars(group["v"])
            if tokens is None:
                return None
            if tokens is not _AS_IS:
                rewritten.append((group, orjson.Fragment(b"[" + b",".join(tokens) + b"]")))
        for group, text in rewritten:  # only now: until here the generic encoder may still be asked
            group["v"] = text
        return orjson.dumps(message, option=_SORTED)
    return None


_AS_IS: list[bytes] = []  # what _canonical_scalars answers when orjson's text is RFC 8785 already


def _canonical_scalars(values: list[Any]) -> list[bytes] | None:
    """Each of `values` as RFC 8785 writes it, or _AS_IS when orjson writes them so; None if one of them is not
    null, a boolean or a number."""
    if not _SCALARS.issuperset(map(type, values)):  # a loop in C: a generator costs 0.1 µs a value
        return None
    text = orjson.dumps(values)
    changed = False
    if b".0," in text or b".0]" in text:  # in an array of scalars only an integral float ends so
        text = text.replace(b".0,", b",").replace(b".0]", b"]")
        if b"-0," in text or b"-0]" in text:  # -0.0 was: RFC 8785 writes 0
            text = text.replace(b"-0,", b"0,").replace(b"-0]", b"0]")
        changed = True
    if b"e+" in text or b"e-" in text or _LONG in text.translate(_DIGITS):
        text = _TOKEN.sub(_rewrite, text)
        changed = True
    if not changed:
        return _AS_IS
    return text[1:-1].split(b",") if values else []


def _safe_integers(numbers: list[Any]) -> bool:
    """Whether `numbers` are integers that RFC 8785 writes as orjson does (within ±(2^53-1))."""
    return bool(numbers) and set(map(type, numbers)) == {int} and min(numbers) >= -MAX_SAFE_INTEGER \
        and max(numbers) <= MAX_SAFE_INTEGER


def _rewrite(match: re.Match[bytes]) -> bytes:
    token = match.group()
    if b"e" in token:
        return format_number(float(token)).encode("ascii")
    number = int(token)
    if -MAX_SAFE_INTEGER <= number <= MAX_SAFE_INTEGER:
        return token
    return format_number(float(number)).encode("ascii")

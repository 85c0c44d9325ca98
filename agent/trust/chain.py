"""The hash chain over the agent's stored messages (`data`, `alarm`, `quality`): the bytes a message's hash and
signature cover, its `chain` member, checking one message, and checking an agent's whole run of them in any
order of arrival (docs/protocol.md, Tamper-evident messages).

Each message names the seq, topic and hash of the message stored before it, or says that a chain starts there and
why. Its hash is SHA-256 over its entry bytes: the RFC 8785 bytes of the message as published without `hist` (set
when it is sent, not when it is stored) and `sig`, integers beyond ±(2^53-1) written as the double nearest them.
Its signature, when the agent has a key, is Ed25519 over the same bytes. The agent seals with these definitions
(agent.seal); the platform simulator and `edge-agent verify` check with them. Nothing here raises anything but
ChainRefused on any input, and nothing is logged.
"""

from __future__ import annotations

import hashlib
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from agent.errors import AgentError
from agent.trust.canonical import MAX_SAFE_INTEGER, SIG, NotCanonical, canonical_bytes
from agent.trust.keys import b64url, b64url_decode
from agent.trust.signing import SignatureRefused, read_sig

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

CHAIN = "chain"
HIST = "hist"
HASH_BYTES = 32
TOPICS = ("alarm", "data", "quality")
"""The topics of stored messages, which share one seq counter and one chain."""
START_REASONS = ("new", "recovered")
"""Why a chain starts: `new`, a store that holds no chain yet (the first start, a store file removed or replaced by
hand, a store kept in memory only); `recovered`, the store file was damaged and moved aside."""
LINK_MEMBERS = ("prev_seq", "prev_topic", "prev_hash")
MAX_FINDINGS = 10_000  # breaks listed per agent; beyond it they are counted only

BreakKind = Literal["unchained", "malformed", "not_canonical", "unsigned", "unknown_kid", "bad_signature",
                    "conflict", "broken_link", "fork", "missing"]
BREAK_KINDS: tuple[BreakKind, ...] = ("unchained", "malformed", "not_canonical", "unsigned", "unknown_kid",
                                      "bad_signature", "conflict", "broken_link", "fork", "missing")
_LEFT_OUT = frozenset({HIST})
_QUOTE = reprlib.Repr()
_QUOTE.maxstring = _QUOTE.maxother = 40
_QUOTE.maxlevel = 1


class ChainRefused(AgentError):
    """A message that does not belong to a trustworthy chain; `kind` is one of BREAK_KINDS and the text names the
    field at fault (`chain.prev_hash: ...`)."""

    def __init__(self, kind: BreakKind, message: str) -> None:
        self.kind: BreakKind = kind
        super().__init__(message)


class Head(NamedTuple):
    """The last message of a chain: what the next one names as its predecessor."""

    seq: int
    topic: str
    hash: bytes

    def text(self) -> str:
        """How the store keeps it: `seq topic hash` (the hash in base64url)."""
        return f"{self.seq} {self.topic} {b64url(self.hash)}"

    @classmethod
    def parse(cls, text: object) -> Head | None:
        """A head from its stored text; None when it is not one (a store changed by hand)."""
        if not isinstance(text, str):
            return None
        parts = text.split(" ")
        if len(parts) != 3 or not parts[0].isdigit() or parts[1] not in TOPICS:
            return None
        try:
            return cls(int(parts[0]), parts[1], b64url_decode(parts[2], HASH_BYTES))
        except ValueError:
            return None


class Link(NamedTuple):
    """A message's `chain` member, read: its predecessor, or the reason a chain starts at it."""

    prev_seq: int | None
    prev_topic: str | None
    prev_hash: bytes | None
    start: str | None


def link_member(head: Head | None, start: str = "new") -> dict[str, Any]:
    """The `chain` member of the message stored after `head`; with no head, a chain starting for `start`."""
    if head is None:
        return {"start": start}
    return {"prev_seq": head.seq, "prev_topic": head.topic, "prev_hash": b64url(head.hash)}


def entry_bytes(message: Mapping[str, Any]) -> bytes:
    """The bytes a message's hash and signature cover: RFC 8785 without `hist` and `sig`; NotCanonical for a
    message outside the subset (a member given twice, say)."""
    return canonical_bytes(message, leave_out=_LEFT_OUT, exact_integers=False)


def entry_hash(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def read_link(message: Mapping[str, Any]) -> Link:
    """The `chain` member of `message`, checked; ChainRefused ("unchained" or "malformed") naming the field."""
    if CHAIN not in message:
        raise ChainRefused("unchained", "chain: missing: the message is not chained")
    chain = message[CHAIN]
    if not isinstance(chain, Mapping):
        raise ChainRefused("malformed", "chain: must be an object")
    for name in chain:
        if name not in (*LINK_MEMBERS, "start"):
            raise ChainRefused("malformed", f"chain.{_quote(name)}: unknown member (chain has "
                               f"{', '.join(LINK_MEMBERS)}, or start)")
    if "start" in chain:
        if len(chain) != 1:
            raise ChainRefused("malformed", "chain.start: a chain start names no predecessor")
        if chain["start"] not in START_REASONS or not isinstance(chain["start"], str):
            raise ChainRefused("malformed", f"chain.start: must be one of {', '.join(START_REASONS)}, not "
                               f"{_quote(chain['start'])}")
        return Link(None, None, None, str(chain["start"]))
    for name in LINK_MEMBERS:
        if name not in chain:
            raise ChainRefused("malformed", f"chain.{name}: missing")
    prev_seq, prev_topic, prev_hash = chain["prev_seq"], chain["prev_topic"], chain["prev_hash"]
    if type(prev_seq) is not int or not 0 <= prev_seq <= MAX_SAFE_INTEGER:
        raise ChainRefused("malformed", f"chain.prev_seq: must be an integer from 0 to 2^53-1, not "
                           f"{_quote(prev_seq)}")
    if prev_topic not in TOPICS or not isinstance(prev_topic, str):
        raise ChainRefused("malformed", f"chain.prev_topic: must be one of {', '.join(TOPICS)}, not "
                           f"{_quote(prev_topic)}")
    try:
        digest = b64url_decode(prev_hash, HASH_BYTES)
    except ValueError as exc:
        raise ChainRefused("malformed", f"chain.prev_hash: {exc}") from None
    return Link(prev_seq, str(prev_topic), digest, None)


class Checked(NamedTuple):
    """A message whose own seal holds: its seq, hash, link and the key id that signed it (None: not checked)."""

    seq: int
    hash: bytes
    link: Link
    kid: str | None


def check_message(message: object, keys: Mapping[str, Ed25519PublicKey] | None) -> Checked:
    """Check one message on its own: its seq, its `chain` member, its canonical form and, when `keys` is given
    (the agent's registered public keys, by key id), its signature, then required. ChainRefused otherwise."""
    if not isinstance(message, Mapping):
        raise ChainRefused("not_canonical", "(top level): a message is a JSON object")
    seq = message.get("seq")
    if type(seq) is not int or not 0 <= seq <= MAX_SAFE_INTEGER:
        raise ChainRefused("malformed", f"seq: must be an integer from 0 to 2^53-1, not {_quote(seq)}")
    link = read_link(message)
    if link.prev_seq is not None and link.prev_seq >= seq:
        raise ChainRefused("malformed", f"chain.prev_seq: {link.prev_seq} is not below the message's seq {seq}")
    try:
        data = entry_bytes(message)
    except NotCanonical as exc:
        raise ChainRefused("not_canonical", f"cannot be hashed: {exc}") from None
    kid = None
    if keys is not None:
        kid = _check_signature(message, data, keys)
    return Checked(seq, entry_hash(data), link, kid)


def _check_signature(message: Mapping[str, Any], data: bytes, keys: Mapping[str, Ed25519PublicKey]) -> str:
    if SIG not in message:
        raise ChainRefused("unsigned", "sig: missing: the agent's key is registered, so its messages must be signed")
    try:
        kid, value = read_sig(message[SIG])
    except SignatureRefused as exc:
        raise ChainRefused("malformed", str(exc)) from None
    key = keys.get(kid)
    if key is None:
        known = ", ".join(sorted(keys)[:4]) or "none registered"
        raise ChainRefused("unknown_kid", f"sig.kid: key {kid} is not the agent's (registered: {known})")
    from cryptography.exceptions import InvalidSignature

    try:
        key.verify(signature=value, data=data)
    except InvalidSignature:
        raise ChainRefused("bad_signature", f"sig.value: the signature does not match the message (key {kid})") \
            from None
    return kid


@dataclass(frozen=True)
class Finding:
    """One break in an agent's chain: the seq it is found at (None when the message has no readable seq), its
    kind (BREAK_KINDS) and what was found."""

    seq: int | None
    kind: BreakKind
    text: str


@dataclass
class ChainVerifier:
    """One agent's chain as a platform receives it: messages in any order, repeated, with a backlog arriving after
    live ones. `add` checks each message and its links to the messages already seen, both ways; `missing` lists
    the predecessors named but never received. With `keys` (the agent's registered public keys by key id) every
    message must be signed by one of them; without, only the chain is checked.

    Memory: a hash, a topic and a link per message received (about 200 bytes): meant for a platform's store or a
    test, not the agent's loop."""

    keys: Mapping[str, Ed25519PublicKey] | None = None
    verified: int = 0
    duplicates: int = 0
    breaks: list[Finding] = field(default_factory=list)
    break_count: int = 0
    restarts: list[tuple[int, str]] = field(default_factory=list)
    kids: set[str] = field(default_factory=set)
    _entries: dict[int, tuple[bytes, str]] = field(default_factory=dict)  # seq -> (hash, topic)
    _links: dict[int, tuple[int, str, bytes]] = field(default_factory=dict)  # seq -> its predecessor as named
    _named_by: dict[int, int] = field(default_factory=dict)  # seq -> the seq that names it as predecessor

    def add(self, message: object, topic: str) -> list[Finding]:
        """Check one received message (parsed strictly: agent.trust.canonical.loads_strict) of `topic`; the breaks
        it shows, also kept in `breaks`. An empty list: the message is sound as far as its neighbours have come.
        A message whose own seal fails (its signature, its chain member, a second content for its seq) is not
        taken into the chain."""
        try:
            checked = check_message(message, self.keys)
        except ChainRefused as exc:
            seq = message.get("seq") if isinstance(message, Mapping) else None
            return self._found([Finding(seq if type(seq) is int else None, exc.kind, str(exc))])
        seq, digest, link = checked.seq, checked.hash, checked.link
        if topic not in TOPICS:
            return self._found([Finding(seq, "malformed", f"topic {_quote(topic)} carries no chained messages")])
        known = self._entries.get(seq)
        if known is not None:
            if known == (digest, topic):
                self.duplicates += 1
                return []
            return self._found([Finding(seq, "conflict", f"seq {seq}: a second, different message ({topic}) "
                                        f"after the {known[1]} already received under this seq")])
        self._entries[seq] = (digest, topic)
        self.verified += 1
        if checked.kid is not None:
            self.kids.add(checked.kid)
        found: list[Finding] = []
        if link.start is not None:
            self.restarts.append((seq, link.start))
        else:
            assert link.prev_seq is not None and link.prev_topic is not None and link.prev_hash is not None
            prev = link.prev_seq
            self._links[seq] = (prev, link.prev_topic, link.prev_hash)
            other = self._named_by.get(prev)
            if other is not None:
                found.append(Finding(seq, "fork", f"seq {seq} and seq {other} both name seq {prev} as their "
                                     "predecessor: one of them was not written by the agent's chain"))
            else:
                self._named_by[prev] = seq
            before = self._entries.get(prev)
            if before is not None and before != (link.prev_hash, link.prev_topic):
                found.append(self._broken(seq, prev, before[1], link.prev_topic))
        successor = self._named_by.get(seq)
        if successor is not None:
            _, named_topic, named_hash = self._links[successor]
            if (named_hash, named_topic) != (digest, topic):
                found.append(self._broken(successor, seq, topic, named_topic))
        return self._found(found)

    def missing(self) -> list[Finding]:
        """Every predecessor named by a message received but not received itself: on its way still (a backlog),
        or lost: dropped, deleted, or evicted telemetry (health.evicted_readings)."""
        return [Finding(prev, "missing", f"seq {prev} ({topic}), named by seq {seq} as its predecessor, has not "
                        "arrived") for prev, topic, seq in self.missing_links()]

    def missing_links(self) -> list[tuple[int, str, int]]:
        """(seq, topic, named by) of every predecessor named but not received, in seq order."""
        return [(prev, topic, seq) for seq, (prev, topic, _) in sorted(self._links.items())
                if prev not in self._entries]

    def newest(self) -> int | None:
        """The highest seq taken into the chain."""
        return max(self._entries, default=None)

    def entry(self, seq: int) -> tuple[bytes, str] | None:
        """(hash, topic) of the message received under `seq`, if one was taken into the chain."""
        return self._entries.get(seq)

    def _broken(self, seq: int, prev: int, held_topic: str, named_topic: str) -> Finding:
        return Finding(seq, "broken_link", f"seq {seq} names seq {prev} ({named_topic}) as its predecessor, but the "
                       f"seq {prev} received ({held_topic}) has another hash: one of the two was changed")

    def _found(self, findings: list[Finding]) -> list[Finding]:
        self.break_count += len(findings)
        room = MAX_FINDINGS - len(self.breaks)
        self.breaks.extend(findings[:max(0, room)])
        return findings


def _quote(value: object) -> str:
    """A short, bounded repr of untrusted input."""
    try:
        return _QUOTE.repr(value) if not isinstance(value, str) else _QUOTE.repr(value)[1:-1]
    except Exception:
        return f"<{type(value).__name__}>"

"""Checking a store against the seals of its messages, the way the platform checks what it receives (`edge-agent
verify`): every message the outbox still holds, its signature and its links, the chain's head, and the archive as
far as it can be checked. Reads the file only, so it is safe beside a running agent; it never changes it.

What it can prove: that each message still held is the one the agent sealed (with its key: signed; without:
linked), that none between the oldest and the newest was taken out or put in, except those the store itself let go
by its own rules (delivered and archived, evicted at the disk bound, past retention), which only the platform can
still vouch for. What it cannot: archive chunks carry no seal (they re-encode delivered readings), so it shows they
can be read, not that they are unchanged; and someone holding the agent's key can seal anything.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.core import KIND_NAMES
from agent.messages import frame
from agent.store.archive import Archive
from agent.store.chunks import ChunkError, decode_chunk
from agent.store.outbox import CHAIN_HEAD, ENC_ZLIB, EVICTED_UPTO, EXPIRED_UPTO
from agent.trust.canonical import NotCanonical, loads_strict
from agent.trust.chain import ChainVerifier, Finding, Head

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

MAX_LISTED = 1000  # breaks and damaged chunks listed; beyond it they are counted
ARCHIVE_LIMITS = ("archive chunks carry no seal (they re-encode readings already delivered): this check shows they "
                  "can be read, not that they are unchanged; the platform holds the signed messages they came from")


@dataclass
class ArchiveCheck:
    chunks: int = 0
    readings: int = 0
    damaged: list[str] = field(default_factory=list)
    damaged_count: int = 0


@dataclass
class Audit:
    """What `audit_store` found. `intact` when nothing is broken; `left` counts predecessors the store let go by
    its own rules, `before_chain` messages stored before the chain began (by an agent without it)."""

    path: str
    signatures: str
    messages: int = 0
    verified: int = 0
    kids: set[str] = field(default_factory=set)
    restarts: list[tuple[int, str]] = field(default_factory=list)
    breaks: list[Finding] = field(default_factory=list)
    break_count: int = 0
    left: int = 0
    before_chain: int = 0
    head: int | None = None
    archive: ArchiveCheck | None = None

    @property
    def intact(self) -> bool:
        return self.break_count == 0 and (self.archive is None or self.archive.damaged_count == 0)

    def found(self, finding: Finding) -> None:
        self.break_count += 1
        if len(self.breaks) < MAX_LISTED:
            self.breaks.append(finding)

    def as_dict(self) -> dict[str, Any]:
        return {
            "store": self.path, "intact": self.intact, "messages": self.messages, "verified": self.verified,
            "signatures": self.signatures, "kids": sorted(self.kids), "head": self.head,
            "restarts": [{"seq": seq, "start": why} for seq, why in self.restarts],
            "breaks": [{"seq": f.seq, "kind": f.kind, "text": f.text} for f in self.breaks],
            "break_count": self.break_count, "left_the_store": self.left, "before_chain": self.before_chain,
            "archive": None if self.archive is None else {
                "chunks": self.archive.chunks, "readings": self.archive.readings,
                "damaged": self.archive.damaged, "damaged_count": self.archive.damaged_count,
                "limits": ARCHIVE_LIMITS},
        }


def audit_store(path: Path, keys: Mapping[str, Ed25519PublicKey] | None, signatures: str, *,
                archive: bool = True) -> Audit:
    """Check the store at `path`: with `keys` (the agent's public keys by key id) every message must be signed by
    one; without, only the chain is checked (`signatures` says why, for the report). sqlite3.Error or OSError when
    the file cannot be read as a store."""
    audit = Audit(str(path), signatures)
    verifier = ChainVerifier(keys)
    unchained: list[int] = []
    present: set[int] = set()  # a message refused for its own seal is reported once, not again as missing
    with Archive(path, readonly=True) as store:
        rows = store.db.execute("SELECT seq, kind, enc, body FROM outbox ORDER BY seq")
        for seq, kind, enc, body in rows:
            audit.messages += 1
            present.add(seq)
            topic = KIND_NAMES.get(kind)
            if topic is None:
                audit.found(Finding(seq, "malformed", f"seq {seq}: unknown kind {kind!r} of message"))
                continue
            message = _message(seq, enc, body)
            if isinstance(message, Finding):
                audit.found(message)
                continue
            for finding in verifier.add(message, topic):
                if finding.kind == "unchained":
                    unchained.append(seq)
                else:
                    audit.found(finding)
        floors = _floors(store)
        head = Head.parse(store.meta(CHAIN_HEAD))
        if archive:
            audit.archive = _check_archive(store)
    audit.verified, audit.kids, audit.restarts = verifier.verified, verifier.kids, verifier.restarts
    # messages stored before the first chain began (by an agent that did not chain) are no break
    first = min((seq for seq, _ in verifier.restarts), default=None)
    for seq in unchained:
        if first is not None and seq < first:
            audit.before_chain += 1
        else:
            audit.found(Finding(seq, "unchained", f"seq {seq}: no chain member, in a store whose chain began "
                                "before it"))
    for prev, topic, named_by in verifier.missing_links():
        if prev in present:
            continue
        if prev <= floors.get(topic, 0):
            audit.left += 1
        else:
            audit.found(Finding(prev, "missing", f"seq {prev} ({topic}), named by seq {named_by} as its predecessor, "
                                "is not in the store, and the store did not let it go (it was neither delivered "
                                "and archived, nor evicted, nor past retention): deleted by hand"))
    _check_head(audit, verifier, head, floors, present)
    return audit


def _message(seq: int, enc: object, body: object) -> dict[str, Any] | Finding:
    """A stored message as it is published; a Finding when it cannot be read back."""
    try:
        if not isinstance(body, bytes):
            raise TypeError(f"the body is a {type(body).__name__}, not bytes")
        raw = zlib.decompress(body) if enc == ENC_ZLIB else body
        return loads_strict(frame(seq, False, raw))
    except (zlib.error, TypeError) as exc:
        return Finding(seq, "malformed", f"seq {seq}: the stored body cannot be decoded ({exc})")
    except NotCanonical as exc:
        return Finding(seq, "not_canonical", f"seq {seq}: the stored body is not a message ({exc})")


def _floors(store: Archive) -> dict[str, int]:
    """By topic, the highest seq the store itself may have deleted: data once archived or evicted, alarm events and
    reports once past retention (and any message set aside as damaged, then)."""
    def number(key: str) -> int:
        value = store.meta(key, 0)
        return value if type(value) is int else 0

    expired = number(EXPIRED_UPTO)
    return {"data": max(number("archive_mark"), number(EVICTED_UPTO), expired), "alarm": expired, "quality": expired}


def _check_head(audit: Audit, verifier: ChainVerifier, head: Head | None, floors: dict[str, int],
                present: set[int]) -> None:
    """The head (meta) names the newest message sealed: it must be there with that hash (or have left by the
    store's rules), and nothing chained may come after it."""
    newest = verifier.newest()
    if head is None:
        if newest is not None:
            audit.found(Finding(None, "malformed", "the store's chain head (meta chain_head) is missing or "
                                "unreadable, yet it holds chained messages"))
        return
    audit.head = head.seq
    held = verifier.entry(head.seq)
    if held is None:
        if head.seq > floors.get(head.topic, 0) and head.seq not in present:
            audit.found(Finding(head.seq, "missing", f"seq {head.seq} ({head.topic}), the last message stored (the "
                                "chain's head), is not in the store, and the store did not let it go: deleted by hand"))
    elif held != (head.hash, head.topic):
        audit.found(Finding(head.seq, "broken_link", f"seq {head.seq}: not the message the chain's head names "
                            "(another hash or topic): changed after it was stored"))
    if newest is not None and newest > head.seq:
        audit.found(Finding(newest, "fork", f"seq {newest} comes after the chain's head (seq {head.seq}): not "
                            "stored by the agent"))


def _check_archive(store: Archive) -> ArchiveCheck:
    check = ArchiveCheck()
    rows = store.db.execute("SELECT p.id, p.is_bool, a.start, a.end, a.count, a.chunk FROM archive a "
                            "JOIN point p ON p.key = a.point")
    for point, is_bool, start, end, count, chunk in rows:
        check.chunks += 1
        problem = None
        try:
            samples = decode_chunk(bytes(chunk), bool(is_bool))
        except (ChunkError, TypeError) as exc:
            problem = str(exc)
        else:
            if len(samples) != count:
                problem = f"holds {len(samples)} readings, the table says {count}"
            elif samples and (samples[0].ts < start or samples[-1].ts > end):
                problem = "readings outside the chunk's time span"
            else:
                check.readings += count
        if problem is not None:
            check.damaged_count += 1
            if len(check.damaged) < MAX_LISTED:
                check.damaged.append(f"{point} from {start}: {problem}")
    return check

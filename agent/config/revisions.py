"""The configuration revisions the agent has taken from the platform or a local user, kept in its state folder
(the store's folder) with their signatures, the last N of them, so that it can start on them again and roll back.

Each revision is one file, written atomically (a temporary file in the same folder, synced, renamed into place,
the folder synced): after a power cut a revision file is whole or absent, never half written. Which revision is
active is not decided here: the store records it (agent.app.live_config), in the same step that makes it active.
This module never validates a configuration and never reads a file outside its folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson

from agent.errors import AgentError
from agent.trust.canonical import NotCanonical, canonical_bytes
from agent.trust.keys import sync_directory

FOLDER = "config-revisions"
"""Where, in the state folder, the revisions are kept."""
FILE_MODE = 0o600  # a revision may carry an MQTT password: the service user alone reads it
MAX_FILE_BYTES = 80 * 1_048_576  # the largest push (64 MiB) and its envelope
_NAME = re.compile(r"^r(\d{10})\.json$")

Source = Literal["platform", "local", "file"]
SOURCES: tuple[Source, ...] = ("platform", "local", "file")


class RevisionError(AgentError):
    """A kept revision that cannot be read (missing, damaged, or not a revision file)."""


def config_hash(config: Any) -> str:
    """The hash a revision is known by: SHA-256 of the canonical bytes (RFC 8785) of its configuration document,
    so the platform can compute it from what it sent; of the JSON text when the document is outside that subset."""
    try:
        data = canonical_bytes(config)  # a configuration has no member called `sig` (the models refuse one)
    except NotCanonical:
        data = orjson.dumps(config)
    return "sha256:" + hashlib.sha256(data).hexdigest()


def file_hash(data: bytes) -> str:
    """The hash of the bootstrap file: SHA-256 of its bytes."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Revision:
    """One kept revision: its number, where it came from, who signed it, its hash, and the `config/set` message
    as it arrived (for a local one, made alike), so its signature can be checked again."""

    revision: int
    source: Source
    hash: str
    payload: bytes
    kid: str | None = None
    id: str | None = None
    received: int = 0  # ms since the epoch

    def envelope(self) -> bytes:
        return orjson.dumps({"v": 1, "revision": self.revision, "source": self.source, "hash": self.hash,
                             "kid": self.kid, "id": self.id, "received": self.received,
                             "payload": self.payload.decode("utf-8")})

    def summary(self) -> dict[str, Any]:
        return {"revision": self.revision, "source": self.source, "hash": self.hash, "kid": self.kid,
                "id": self.id, "received": self.received}


def _read_envelope(data: bytes, where: str) -> Revision:
    try:
        raw = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise RevisionError(f"{where}: not a revision file (not JSON)") from None
    if not isinstance(raw, dict):
        raise RevisionError(f"{where}: not a revision file")
    revision, source, digest, payload = raw.get("revision"), raw.get("source"), raw.get("hash"), raw.get("payload")
    kid, push_id, received = raw.get("kid"), raw.get("id"), raw.get("received", 0)
    if not (isinstance(revision, int) and not isinstance(revision, bool) and revision >= 0
            and source in SOURCES and isinstance(digest, str) and isinstance(payload, str)
            and (kid is None or isinstance(kid, str)) and (push_id is None or isinstance(push_id, str))
            and isinstance(received, int)):
        raise RevisionError(f"{where}: not a revision file (a member is missing or of the wrong type)")
    return Revision(revision, source, digest, payload.encode("utf-8"), kid, push_id, received)


class RevisionFiles:
    """The revisions kept in `state_dir`/config-revisions, one file each (`r0000000012.json`), the newest `keep`
    of them (and any the caller protects: the active one, the one it would roll back to)."""

    def __init__(self, state_dir: Path, keep: int = 10) -> None:
        self.folder = state_dir / FOLDER
        self.keep = keep

    def path(self, revision: int) -> Path:
        return self.folder / f"r{revision:010d}.json"

    def save(self, revision: Revision) -> Path:
        """Write a revision atomically; OSError when the folder cannot take it (nothing is left half written)."""
        self.folder.mkdir(mode=0o750, parents=True, exist_ok=True)
        path = self.path(revision.revision)
        tmp = self.folder / f".r{revision.revision:010d}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
            try:
                os.fchmod(fd, FILE_MODE)  # whatever the umask
                view = memoryview(revision.envelope())
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        sync_directory(self.folder)
        return path

    def load(self, revision: int) -> Revision:
        """A kept revision; RevisionError when it is missing or damaged."""
        path = self.path(revision)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise RevisionError(f"{path}: {exc.strerror or exc}") from None
        try:
            chunks = []
            size = 0
            while chunk := os.read(fd, 1 << 20):
                size += len(chunk)
                if size > MAX_FILE_BYTES:
                    raise RevisionError(f"{path}: larger than {MAX_FILE_BYTES} bytes, not a revision file")
                chunks.append(chunk)
        except OSError as exc:
            raise RevisionError(f"{path}: {exc.strerror or exc}") from None
        finally:
            os.close(fd)
        kept = _read_envelope(b"".join(chunks), str(path))
        if kept.revision != revision:
            raise RevisionError(f"{path}: holds revision {kept.revision}, not {revision}")
        return kept

    def numbers(self) -> list[int]:
        """The revisions kept, lowest first."""
        try:
            names = os.listdir(self.folder)
        except OSError:
            return []
        return sorted(int(m.group(1)) for m in map(_NAME.match, names) if m is not None)

    def prune(self, protect: set[int]) -> list[int]:
        """Remove all but the newest `keep` revisions and those in `protect`; returns the removed ones."""
        numbers = self.numbers()
        removed = [n for n in numbers[:max(0, len(numbers) - self.keep)] if n not in protect]
        for n in removed:
            with contextlib.suppress(OSError):
                self.path(n).unlink()
        if removed:
            sync_directory(self.folder)
        return removed

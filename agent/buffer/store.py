"""The store: a SQLite outbox (WAL) where every outgoing message is written before it is published.

A message leaves the outbox only when the broker acknowledged it. `seq` is the outbox's AUTOINCREMENT key,
so it is strictly increasing and never reused, across restarts and after every row was deleted.
The store never talks to the network; the uplink only reads from it and marks acknowledgements.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import sqlite_utils

log = logging.getLogger(__name__)


class Row(NamedTuple):
    seq: int
    kind: int
    created: int
    readings: int
    body: bytes


class BacklogStats(NamedTuple):
    messages: int
    readings: int
    oldest_created: int | None


class Store:
    """One SQLite connection, used from the event loop thread only."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._db: sqlite3.Connection | None = None
        self._in_tx = False

    # --- lifecycle ---------------------------------------------------------------------------------

    def open(self) -> Store:
        if str(self.path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL: a commit survives a process crash; a power loss may take the last commits
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=5000")
        utils = sqlite_utils.Database(db)
        if "outbox" not in utils.table_names():
            db.execute(
                "CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, kind INTEGER NOT NULL, "
                "created INTEGER NOT NULL, count INTEGER NOT NULL, body BLOB NOT NULL)"
            )
            db.execute("CREATE INDEX outbox_alarms ON outbox(seq) WHERE kind = 0")
        self._db = db
        return self

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def __enter__(self) -> Store:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("store is not open")
        return self._db

    # --- writing -----------------------------------------------------------------------------------

    @contextmanager
    def transaction(self, *, durable: bool = False) -> Iterator[None]:
        """Group several appends into one commit; `durable` syncs the log to disk at the commit (power loss)."""
        if self._in_tx:
            yield
            return
        if durable:
            self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("BEGIN")
        self._in_tx = True
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        else:
            self.db.execute("COMMIT")
        finally:
            self._in_tx = False
            if durable:
                self.db.execute("PRAGMA synchronous=NORMAL")

    def append(self, kind: int, count: int, body: bytes, created: int | None = None) -> int:
        """Write one message and return its seq; durable once the enclosing transaction commits."""
        created = created if created is not None else int(time.time() * 1000)
        cur = self.db.execute(
            "INSERT INTO outbox (kind, created, count, body) VALUES (?, ?, ?, ?)", (kind, created, count, body)
        )
        seq = cur.lastrowid
        assert seq is not None
        return seq

    def ack(self, seqs: Iterable[int]) -> int:
        """Delete acknowledged messages; contiguous runs go as one range delete."""
        ordered = sorted(set(seqs))
        if not ordered:
            return 0
        runs: list[tuple[int, int]] = []
        start = prev = ordered[0]
        for seq in ordered[1:]:
            if seq != prev + 1:
                runs.append((start, prev))
                start = seq
            prev = seq
        runs.append((start, prev))
        with self.transaction():
            self.db.executemany("DELETE FROM outbox WHERE seq BETWEEN ? AND ?", runs)
        return len(ordered)

    # --- reading -----------------------------------------------------------------------------------

    def fetch(self, after: int, *, upto: int | None = None, kind: int | None = None, limit: int = 100) -> list[Row]:
        """Messages with seq > after (and <= upto), oldest first."""
        sql = "SELECT seq, kind, created, count, body FROM outbox WHERE seq > ?"
        args: list[int] = [after]
        if upto is not None:
            sql += " AND seq <= ?"
            args.append(upto)
        if kind is not None:
            sql += " AND kind = ?"
            args.append(kind)
        sql += " ORDER BY seq LIMIT ?"
        args.append(limit)
        return [Row(*r) for r in self.db.execute(sql, args)]

    def last_seq(self) -> int:
        """The highest seq ever given (0 for a new store)."""
        row = self.db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
        return int(row[0]) if row else 0

    def backlog(self) -> BacklogStats:
        messages, readings, oldest = self.db.execute(
            "SELECT count(*), coalesce(sum(count), 0), min(created) FROM outbox"
        ).fetchone()
        return BacklogStats(int(messages), int(readings), oldest)

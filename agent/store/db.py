"""The store's database: one SQLite file in WAL mode, opened (or, when damaged, moved aside and started anew),
with transactions, meta values, saved alarm states and the seq floor.

`seq` never goes back: it is the outbox's AUTOINCREMENT key, and a floor reserved in a small file beside the
database carries it over even a database that had to be replaced. A damaged file is moved aside, never a
reason not to start; recovering from it is the store's own business (`attempt`), whoever met the damage.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self, TypeVar

from agent.errors import StoreError

log = logging.getLogger(__name__)

SEQ_RESERVE = 10_000
FILE_MODE = 0o640  # the store and its seq reserve: the service user writes, its group (field engineers) may read
SCHEMA_VERSION = 1
T = TypeVar("T")

# acked: agent.core.AckState (0 pending, 1 acknowledged, 2 damaged); literals here and in queries, since SQLite
# uses a partial index only for a query whose condition matches it word for word

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    kind INTEGER NOT NULL,
    created INTEGER NOT NULL,
    count INTEGER NOT NULL,
    enc INTEGER NOT NULL DEFAULT 0,
    acked INTEGER NOT NULL DEFAULT 0,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox(seq) WHERE acked = 0;
CREATE INDEX IF NOT EXISTS outbox_pending_alarms ON outbox(seq) WHERE acked = 0 AND kind = 0;
CREATE TABLE IF NOT EXISTS point (key INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, is_bool INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS archive (
    point INTEGER NOT NULL,
    start INTEGER NOT NULL,
    end INTEGER NOT NULL,
    count INTEGER NOT NULL,
    chunk BLOB NOT NULL,
    PRIMARY KEY (point, start, end)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS archive_by_end ON archive(end);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS alarm_state (id TEXT PRIMARY KEY, state TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS command_id (
    source TEXT NOT NULL,
    id TEXT NOT NULL,
    digest TEXT NOT NULL,
    result BLOB NOT NULL,
    at INTEGER NOT NULL,
    PRIMARY KEY (source, id)
) WITHOUT ROWID;
"""


def _is_corruption(exc: sqlite3.DatabaseError) -> bool:
    # a full disk or an I/O error is not damage: moving a healthy file aside would strand its backlog
    name = getattr(exc, "sqlite_errorname", "")
    if name:
        return name in ("SQLITE_CORRUPT", "SQLITE_NOTADB") or name.startswith("SQLITE_CORRUPT_")
    text = str(exc).lower()
    return "malformed" in text or "not a database" in text


class Database:
    """One SQLite connection, used from the event loop thread only: opening, damage recovery, transactions,
    meta values, alarm states and the seq floor. The outbox and the archive build on it (agent.store.Store)."""

    def __init__(self, path: Path | str, *, readonly: bool = False, memory_fallback: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self._db: sqlite3.Connection | None = None
        self._in_tx = False
        self._seq_reserved = 0
        self._issued = 0  # the highest seq this process gave
        self.recovered: dict[str, Any] | None = None  # what happened when a damaged file was moved aside
        self.fallback_reason: str | None = None
        self.memory_fallback = memory_fallback
        # messages above this seq are committed but not yet on disk and must not be sent before they are (alarm
        # events, whose log is synced on a worker thread); None: nothing is held
        self.hold_after: int | None = None
        # the alarm_state table as this connection last wrote it and committed; None: not known (a new connection,
        # a rolled-back transaction), so the next save rewrites it whole
        self._saved_states: dict[str, str] | None = None

    @property
    def seq_file(self) -> Path:
        return self.path.with_name(self.path.name + ".seq")

    def open(self) -> Self:
        if self.readonly:
            uri = f"{self.path.absolute().as_uri()}?mode=ro"  # escaped: a # or ? in the path is part of it
            self._db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA busy_timeout=5000")
            return self
        try:
            try:
                self._open_file()
            except sqlite3.DatabaseError as exc:
                if not _is_corruption(exc):
                    raise
                self._move_aside(exc)
                self._open_file()
        except (OSError, sqlite3.Error) as exc:
            if not self.memory_fallback:
                raise StoreError(f"store: cannot use {self.path}: {exc}. Make its folder writable by the service "
                                 "user (the unit's StateDirectory), or set store.memory_fallback: true to run "
                                 "without a disk buffer") from None
            # configured to run on without the buffer (full or read-only disk): on memory, saying so loudly
            self.fallback_reason = f"cannot use {self.path}: {exc}"
            log.error("store: %s; keeping messages in memory only until restart", self.fallback_reason)
            self._connect(":memory:").executescript(_SCHEMA)
            self._restore_seq_floor()
        return self

    def _connect(self, target: str) -> sqlite3.Connection:
        db = sqlite3.connect(target, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA busy_timeout=5000")
        self._db = db
        self._saved_states = None
        return db

    def _open_file(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        if not self.path.exists():
            # made here with the store's mode: SQLite gives its -wal and -shm files the mode of the database
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
        db = self._connect(str(self.path))
        try:
            if fresh:
                # must precede the first table: lets a full disk get its space back (incremental_vacuum)
                db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            db.execute("PRAGMA journal_mode=WAL")
            # WAL + NORMAL: a commit survives a process crash; syncs are explicit (alarms, sync())
            db.execute("PRAGMA synchronous=NORMAL")
            # the log file is cut back to this size after a checkpoint, so it stays small beside the cap
            db.execute("PRAGMA journal_size_limit=16777216")
            db.executescript(_SCHEMA)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            # reads every table's root page: a damaged header or schema fails here, not in the middle of a poll
            db.execute("SELECT count(*) FROM outbox WHERE acked = 0").fetchone()
            db.execute("SELECT count(*) FROM meta").fetchone()
        except BaseException:
            db.close()
            self._db = None
            raise
        self._restore_seq_floor()

    def _move_aside(self, exc: BaseException) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        if self._db is not None:
            with contextlib.suppress(Exception):
                self._db.close()
            self._db = None
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(self.path) + suffix)
            if src.exists():
                shutil.move(str(src), str(target) + suffix)
        self.recovered = {"ts": int(time.time() * 1000), "moved_to": str(target), "error": str(exc)}
        log.error("store: %s is damaged (%s); moved it to %s and started a new store", self.path, exc, target)

    def close(self) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None

    def __enter__(self) -> Self:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("store is not open")
        return self._db

    def recover_if_corrupt(self, exc: sqlite3.DatabaseError) -> bool:
        """After a failed operation: if the file is damaged, move it aside and reopen fresh. True if it did."""
        if self.readonly or not _is_corruption(exc) or self.fallback_reason is not None:
            return False
        self._in_tx = False
        self._move_aside(exc)
        self._open_file()
        self._after_recovery()
        return True

    def _after_recovery(self) -> None:
        """Tell a fresh file what the old one knew and the running agent relies on (the archive's point keys)."""

    def attempt(self, what: str, action: Callable[[], T]) -> T | None:
        """Run a store action; a damaged file is replaced and the action tried once more; any other database
        error is logged with `what` and gives None (the caller decides what is kept for later)."""
        try:
            return action()
        except sqlite3.DatabaseError as exc:
            if self.recover_if_corrupt(exc):
                try:
                    return action()
                except sqlite3.DatabaseError as again:
                    exc = again
            log.error("store: %s failed: %s", what, exc)
            return None

    def _restore_seq_floor(self) -> None:
        try:
            floor = int(self.seq_file.read_text().strip() or 0)
        except (OSError, ValueError):
            floor = 0
        floor = max(floor, self._issued)  # a store replaced while running goes on above what it gave
        last = self.last_seq()
        if floor > last:
            # a replaced (or older) database: continue above every seq that may have been given
            self.db.execute("INSERT OR REPLACE INTO sqlite_sequence(name, seq) VALUES ('outbox', ?)", (floor,))
            log.info("store: seq continues from %d (reserved floor)", floor)
        self._seq_reserved = max(floor, last)

    def _reserve_seq(self, seq: int) -> None:
        if seq < self._seq_reserved or self.fallback_reason is not None:
            return
        reserved = seq + SEQ_RESERVE
        tmp = self.seq_file.with_name(self.seq_file.name + ".tmp")
        try:
            with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE), "w") as f:
                f.write(f"{reserved}\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.seq_file)
            self._seq_reserved = reserved
        except OSError as exc:
            # not advanced: the next append tries again, so the file never lags far behind
            log.warning("store: cannot write the seq reserve %s: %s", self.seq_file, exc)

    @contextmanager
    def transaction(self, *, durable: bool = False) -> Iterator[None]:
        """Group several writes into one commit; `durable` syncs the log to disk at the commit (power loss)."""
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
            self._saved_states = None
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("ROLLBACK")
            raise
        else:
            try:
                self.db.execute("COMMIT")
            except BaseException:
                self._saved_states = None
                raise
        finally:
            self._in_tx = False
            if durable:
                with contextlib.suppress(sqlite3.Error):
                    self.db.execute("PRAGMA synchronous=NORMAL")

    def sync(self) -> None:
        """Put everything committed so far on disk (a WAL checkpoint syncs the log first)."""
        self.db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()

    def sync_log(self) -> None:
        """Put the write-ahead log on disk, committed transactions and all, for a worker thread: an fsync of the
        log file itself, so the event loop's connection goes on meanwhile."""
        if self.fallback_reason is not None or self.readonly:
            return
        try:
            fd = os.open(f"{self.path}-wal", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return  # no log: every commit is in the database file, synced by the checkpoint that emptied it
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def sync_apart(self) -> None:
        """`sync` through a connection of its own, for a worker thread: the checkpoint copies and syncs while the
        event loop's connection goes on writing (a passive checkpoint takes no lock a writer waits for)."""
        if self.fallback_reason is not None or self.readonly:
            return
        db = sqlite3.connect(str(self.path), isolation_level=None, timeout=5.0)
        try:
            db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        finally:
            db.close()

    def last_seq(self) -> int:
        """The highest seq ever given (0 for a new store)."""
        row = self.db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
        return int(row[0]) if row else 0

    def meta(self, key: str, default: Any = None) -> Any:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else row[0]

    def set_meta(self, key: str, value: Any) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def add_meta(self, key: str, amount: int) -> None:
        self.db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = value + excluded.value",
            (key, amount),
        )

    def save_alarm_states(self, states: dict[str, str] | Callable[[], dict[str, str]],
                          changes: dict[str, str | None] | None = None) -> None:
        """Save the alarm states (call inside the transaction that stores their events): `states` is every alarm
        not normal, or, with `changes`, gives them when asked (a callable). Only what changed since the last save is
        written: `changes` (alarm id -> its state now, None when normal) when given, else what differs from it.
        In a storm of 100,000 raised alarms a rewrite took 230 ms each batch. What the table holds is known here
        only after a save on this connection that went through: else every state is written."""
        saved, self._saved_states = self._saved_states, None  # unknown until every statement has gone through
        if saved is None or changes is None:
            every = states() if callable(states) else states
            if saved is None:
                self.db.execute("DELETE FROM alarm_state")
                self.db.executemany("INSERT INTO alarm_state (id, state) VALUES (?, ?)", sorted(every.items()))
                self._saved_states = dict(every)  # the enclosing transaction forgets it again if it rolls back
                return
            changes = {i: None for i in saved.keys() - every.keys()}  # what differs from the last save
            changes.update((i, state) for i, state in every.items() if saved.get(i) != state)
        gone = [(i,) for i, state in changes.items() if state is None and i in saved]
        if gone:
            self.db.executemany("DELETE FROM alarm_state WHERE id = ?", gone)
        put = [(i, state) for i, state in changes.items() if state is not None and saved.get(i) != state]
        if put:
            self.db.executemany("INSERT OR REPLACE INTO alarm_state (id, state) VALUES (?, ?)", put)
        for i, state in changes.items():
            if state is None:
                saved.pop(i, None)
            else:
                saved[i] = state
        self._saved_states = saved  # the enclosing transaction forgets it again if it rolls back

    def forget_saved_states(self) -> None:
        """The next save writes every state (the alarms themselves were replaced: a new configuration)."""
        self._saved_states = None

    def alarm_states(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT id, state FROM alarm_state"))

    # --- command ids: a command repeated with the same id is answered, not done again, across restarts --------

    def command_result(self, source: str, cmd_id: str) -> tuple[str, bytes] | None:
        """(digest, stored result) of a command already done under this id from this source."""
        row = self.db.execute("SELECT digest, result FROM command_id WHERE source = ? AND id = ?",
                              (source, cmd_id)).fetchone()
        return None if row is None else (str(row[0]), bytes(row[1]))

    def save_command_result(self, source: str, cmd_id: str, digest: str, result: bytes, keep: int) -> None:
        """Remember a command's result (synced: it changed state); only the newest `keep` per source stay."""
        with self.transaction(durable=True):
            self.db.execute("INSERT OR REPLACE INTO command_id (source, id, digest, result, at) "
                            "VALUES (?, ?, ?, ?, ?)", (source, cmd_id, digest, result, time.time_ns()))
            self.db.execute("DELETE FROM command_id WHERE source = ? AND at <= (SELECT at FROM command_id "
                            "WHERE source = ? ORDER BY at DESC LIMIT 1 OFFSET ?)", (source, source, keep))

    def used_bytes(self) -> int:
        """Bytes the database really holds, free pages excluded (the write-ahead log is bounded apart)."""
        page_size = self.db.execute("PRAGMA page_size").fetchone()[0]
        pages = self.db.execute("PRAGMA page_count").fetchone()[0]
        free = self.db.execute("PRAGMA freelist_count").fetchone()[0]
        return int((pages - free) * page_size)

    def release_free_pages(self) -> None:
        """Give free pages back to the file system (when the disk, not the cap, is short)."""
        self.db.execute("PRAGMA incremental_vacuum").fetchall()
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()

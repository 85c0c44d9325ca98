"""The store: one SQLite file (WAL) holding the outbox, where every outgoing message is written before it is
published, and the archive, where every reading is kept for the retention time.

A message leaves the outbox only after the broker acknowledged it AND its readings are in the archive; alarm
events stay as the local alarm record until their retention ends. `seq` never goes back: it is the outbox's
AUTOINCREMENT key, and a floor reserved in a small file beside the database carries it over even a database
that had to be replaced. A damaged file is moved aside, never a reason not to start. The store never talks to
the network.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sqlite3
import time
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from agent.store.archive import Sample, decode_chunk

log = logging.getLogger(__name__)

KIND_ALARM = 0
KIND_DATA = 1
ENC_RAW = 0
ENC_ZLIB = 1
SEQ_RESERVE = 10_000
SCHEMA_VERSION = 1

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
"""


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


def _is_corruption(exc: sqlite3.DatabaseError) -> bool:
    # a full disk or an I/O error is not damage: moving a healthy file aside would strand its backlog
    name = getattr(exc, "sqlite_errorname", "")
    if name:
        return name in ("SQLITE_CORRUPT", "SQLITE_NOTADB") or name.startswith("SQLITE_CORRUPT_")
    text = str(exc).lower()
    return "malformed" in text or "not a database" in text


class Store:
    """One SQLite connection, used from the event loop thread only."""

    def __init__(self, path: Path | str, *, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self._db: sqlite3.Connection | None = None
        self._in_tx = False
        self._seq_reserved = 0
        self._issued = 0  # the highest seq this process gave
        self.recovered: dict[str, Any] | None = None  # what happened when a damaged file was moved aside
        self.fallback_reason: str | None = None

    # --- lifecycle ---------------------------------------------------------------------------------

    @property
    def seq_file(self) -> Path:
        return self.path.with_name(self.path.name + ".seq")

    def open(self) -> Store:
        if self.readonly:
            uri = f"file:{self.path}?mode=ro"
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
            # never refuse to start because of the buffer (full or read-only disk): run on memory, say so loudly
            self.fallback_reason = f"cannot use {self.path}: {exc}"
            log.error("store: %s; keeping messages in memory only until restart", self.fallback_reason)
            self._connect(":memory:").executescript(_SCHEMA)
            self._restore_seq_floor()
        return self

    def _connect(self, target: str) -> sqlite3.Connection:
        db = sqlite3.connect(target, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA busy_timeout=5000")
        self._db = db
        return db

    def _open_file(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.path.exists() or self.path.stat().st_size == 0
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

    def __enter__(self) -> Store:
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
        return True

    # --- seq floor: a reserve written beside the database --------------------------------------

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
            with open(tmp, "w") as f:
                f.write(f"{reserved}\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.seq_file)
            self._seq_reserved = reserved
        except OSError as exc:
            # not advanced: the next append tries again, so the file never lags far behind
            log.warning("store: cannot write the seq reserve %s: %s", self.seq_file, exc)

    # --- writing -----------------------------------------------------------------------------------

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
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("ROLLBACK")
            raise
        else:
            self.db.execute("COMMIT")
        finally:
            self._in_tx = False
            if durable:
                with contextlib.suppress(sqlite3.Error):
                    self.db.execute("PRAGMA synchronous=NORMAL")

    def append(self, kind: int, count: int, body: bytes, created: int | None = None) -> int:
        """Write one message and return its seq; durable once the enclosing transaction commits."""
        created = created if created is not None else int(time.time() * 1000)
        enc = ENC_RAW
        if kind == KIND_DATA:
            body, enc = zlib.compress(body, 1), ENC_ZLIB
        cur = self.db.execute(
            "INSERT INTO outbox (kind, created, count, enc, body) VALUES (?, ?, ?, ?, ?)",
            (kind, created, count, enc, body),
        )
        seq = cur.lastrowid
        assert seq is not None
        self._issued = max(self._issued, seq)
        self._reserve_seq(seq)
        return seq

    def ack(self, seqs: Iterable[int]) -> int:
        """Mark acknowledged messages; they stop being sent and go when archived (data) or expired (alarms)."""
        runs = _runs(seqs)
        if not runs:
            return 0
        with self.transaction():
            self.db.executemany("UPDATE outbox SET acked = 1 WHERE seq BETWEEN ? AND ?", runs)
        return sum(b - a + 1 for a, b in runs)

    def sync(self) -> None:
        """Put everything committed so far on disk (a WAL checkpoint syncs the log first)."""
        self.db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()

    # --- reading the outbox ------------------------------------------------------------------------

    def fetch(self, after: int, *, upto: int | None = None, kind: int | None = None, limit: int = 100) -> list[Row]:
        """Messages not yet acknowledged with seq > after (and <= upto), oldest first, bodies as published."""
        sql = "SELECT seq, kind, created, count, enc, body FROM outbox WHERE acked = 0 AND seq > ?"
        args: list[int] = [after]
        if upto is not None:
            sql += " AND seq <= ?"
            args.append(upto)
        if kind is not None:
            sql += " AND kind = ?"
            args.append(kind)
        sql += " ORDER BY seq LIMIT ?"
        args.append(limit)
        rows = []
        for seq, k, created, count, enc, body in self.db.execute(sql, args).fetchall():
            try:
                rows.append(Row(seq, k, created, count, zlib.decompress(body) if enc == ENC_ZLIB else bytes(body)))
            except zlib.error as exc:
                self._quarantine(seq, k, count, exc)
        return rows

    def _quarantine(self, seq: int, kind: int, count: int, exc: Exception) -> None:
        """A stored message that cannot be decoded: set aside (never sent, counted), so it blocks nothing."""
        log.error("store: message seq %d (%s, %d readings) is damaged and is set aside: %s",
                  seq, "alarm" if kind == KIND_ALARM else "data", count, exc)
        with self.transaction():
            self.db.execute("UPDATE outbox SET acked = 2 WHERE seq = ?", (seq,))
            self.add_meta("damaged_messages", 1)

    def last_seq(self) -> int:
        """The highest seq ever given (0 for a new store)."""
        row = self.db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
        return int(row[0]) if row else 0

    def backlog(self) -> BacklogStats:
        messages, readings, oldest = self.db.execute(
            "SELECT count(*), coalesce(sum(count), 0), min(created) FROM outbox WHERE acked = 0"
        ).fetchone()
        return BacklogStats(int(messages), int(readings), oldest)

    def data_rows_after(self, seq: int) -> Iterator[tuple[int, bytes]]:
        """Data messages (acknowledged or not) above `seq`, as (seq, JSON body): what the archive has not yet."""
        cur = self.db.execute("SELECT seq, enc, body FROM outbox WHERE kind = 1 AND acked < 2 AND seq > ? "
                              "ORDER BY seq", (seq,))
        for s, enc, body in cur.fetchall():
            try:
                yield s, zlib.decompress(body) if enc == ENC_ZLIB else bytes(body)
            except zlib.error as exc:
                log.error("store: message seq %d cannot be read back for the archive: %s", s, exc)

    # --- meta --------------------------------------------------------------------------------------

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

    # --- alarm states ----------------------------------------------------------------------------

    def save_alarm_states(self, states: dict[str, str]) -> None:
        """Replace the saved alarm states (call inside the transaction that stores their events)."""
        self.db.execute("DELETE FROM alarm_state")
        self.db.executemany("INSERT INTO alarm_state (id, state) VALUES (?, ?)", sorted(states.items()))

    def alarm_states(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT id, state FROM alarm_state"))

    # --- the archive -------------------------------------------------------------------------------

    def point_keys(self, ids: Iterable[str], bools: frozenset[str] = frozenset()) -> dict[str, int]:
        """Small integer keys for point ids (stable for the life of the file); `bools` are the on/off points."""
        ids = list(ids)
        with self.transaction():
            self.db.executemany("INSERT OR IGNORE INTO point (id) VALUES (?)", [(i,) for i in ids])
            if bools:
                self.db.executemany("UPDATE point SET is_bool = 1 WHERE id = ?", [(i,) for i in bools])
        keys = dict(self.db.execute("SELECT id, key FROM point"))
        return {i: int(keys[i]) for i in ids}

    def point_is_bool(self, point_id: str) -> bool | None:
        """Whether a point's values are on/off; None when the store has never seen the point."""
        row = self.db.execute("SELECT is_bool FROM point WHERE id = ?", (point_id,)).fetchone()
        return None if row is None else bool(row[0])

    def write_chunks(self, chunks: Iterable[tuple[str, int, int, int, bytes]], mark: int) -> int:
        """Store archive chunks (by point id), then drop acknowledged data messages up to `mark` (now archived)."""
        chunks = list(chunks)
        keys = self.point_keys(sorted({c[0] for c in chunks}))
        with self.transaction():
            cur = self.db.executemany(
                "INSERT OR REPLACE INTO archive (point, start, end, count, chunk) VALUES (?, ?, ?, ?, ?)",
                [(keys[point], start, end, count, chunk) for point, start, end, count, chunk in chunks],
            )
            written = cur.rowcount
            self.add_meta("archive_readings", sum(c[3] for c in chunks))
            self.set_meta("archive_mark", mark)
            self.db.execute("DELETE FROM outbox WHERE kind = 1 AND acked = 1 AND seq <= ?", (mark,))
        return written

    def archive_mark(self) -> int:
        return int(self.meta("archive_mark", 0) or 0)

    def history(self, point_id: str, since: int, until: int) -> list[Sample]:
        """Readings of one point with since <= ts <= until, from the archive and from messages not yet in it."""
        row = self.db.execute("SELECT key, is_bool FROM point WHERE id = ?", (point_id,)).fetchone()
        out: list[Sample] = []
        if row is not None:
            is_bool = bool(row[1])
            for (chunk,) in self.db.execute(
                "SELECT chunk FROM archive WHERE point = ? AND end >= ? AND start <= ? ORDER BY start",
                (row[0], since, until),
            ):
                out.extend(s for s in decode_chunk(chunk, is_bool) if since <= s.ts <= until)
        needle = orjson.dumps(point_id)
        for _, body in self.data_rows_after(self.archive_mark()):
            if needle not in body:
                continue
            try:
                readings = orjson.loads(b"{" + body)["readings"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                continue  # reported when the agent reads it back for the archive
            for r in readings:
                if r["point"] == point_id and since <= r["ts"] <= until:
                    quality = {"good": 0, "uncertain": 1, "bad": 2}[r["quality"]]
                    out.append(Sample(r["ts"], r["value"], quality))
        out.sort(key=lambda s: s.ts)
        return out

    def alarm_history(self, since: int, until: int) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT seq, enc, body FROM outbox WHERE kind = 0 AND created BETWEEN ? AND ? ORDER BY seq",
            (since, until),
        )
        out = []
        for seq, enc, body in rows:
            try:
                raw = zlib.decompress(body) if enc == ENC_ZLIB else bytes(body)
                out.append({"seq": seq, **orjson.loads(b"{" + raw)})
            except (zlib.error, orjson.JSONDecodeError) as exc:
                log.error("store: alarm event seq %d is damaged: %s", seq, exc)
        return out

    # --- bounds ------------------------------------------------------------------------------------

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

    def drop_oldest_archive(self, limit: int) -> int:
        """Delete the `limit` oldest archive chunks; return the readings they held."""
        with self.transaction():
            rows = self.db.execute(
                "SELECT point, start, end, count FROM archive ORDER BY end LIMIT ?", (limit,)
            ).fetchall()
            self.db.executemany("DELETE FROM archive WHERE point = ? AND start = ? AND end = ?",
                                [r[:3] for r in rows])
            self.add_meta("archive_readings", -sum(r[3] for r in rows))
        return sum(r[3] for r in rows)

    def drop_oldest_data(self, limit: int) -> tuple[int, int]:
        """Delete the `limit` oldest data messages (never alarm events); return (undelivered readings, others)."""
        with self.transaction():
            rows = self.db.execute(
                "SELECT seq, count, acked FROM outbox WHERE kind = 1 ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()
            self.db.executemany("DELETE FROM outbox WHERE seq = ?", [(r[0],) for r in rows])
        undelivered = sum(r[1] for r in rows if not r[2])
        return undelivered, sum(r[1] for r in rows) - undelivered

    def expire(self, before: int) -> tuple[int, int]:
        """Retention: drop archive chunks and delivered alarm events older than `before` (ms)."""
        with self.transaction():
            readings = self.db.execute("SELECT coalesce(sum(count), 0) FROM archive WHERE end < ?",
                                       (before,)).fetchone()[0]
            self.db.execute("DELETE FROM archive WHERE end < ?", (before,))
            self.add_meta("archive_readings", -int(readings))
            events = self.db.execute(
                "DELETE FROM outbox WHERE kind = 0 AND acked = 1 AND created < ?", (before,)
            ).rowcount
            self.db.execute("DELETE FROM outbox WHERE acked = 2 AND created < ?", (before,))
        return int(readings), int(events)

    def archive_stats(self) -> tuple[int, int | None]:
        """Readings in the archive (a counter: no scan of a 20 GB table) and the end of its oldest chunk."""
        oldest = self.db.execute("SELECT min(end) FROM archive").fetchone()[0]
        return max(0, int(self.meta("archive_readings", 0) or 0)), oldest


def _runs(seqs: Iterable[int]) -> list[tuple[int, int]]:
    ordered = sorted(set(seqs))
    if not ordered:
        return []
    runs: list[tuple[int, int]] = []
    start = prev = ordered[0]
    for seq in ordered[1:]:
        if seq != prev + 1:
            runs.append((start, prev))
            start = seq
        prev = seq
    runs.append((start, prev))
    return runs

"""The outbox: every outgoing message (`data` batches and alarm events) is written here before it is
published, and leaves only after the broker acknowledged it (and, for data, once its readings are archived;
alarm events stay as the local alarm record until their retention ends).

Each message is sealed as it is stored, in the same transaction (agent.seal): it names the message stored before
it in a hash chain, whose head is kept in meta (`chain_head`), and is signed when the agent has a key; the seal is
part of the stored body, so every send of it is the same. Data bodies are kept zlib-compressed; a body that cannot
be decoded is set aside (never sent, counted), so it blocks nothing. The outbox never talks to the network.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Iterable, Iterator
from typing import NamedTuple

from agent.core import KIND_ALARM, KIND_NAMES
from agent.seal import Sealer
from agent.store.db import Database
from agent.trust.canonical import NotCanonical
from agent.trust.chain import Head

log = logging.getLogger(__name__)

ENC_RAW = 0
ENC_ZLIB = 1
CHAIN_HEAD = "chain_head"
"""The meta key of the chain's head: `seq topic hash` of the last message sealed (agent.trust.chain.Head)."""
EVICTED_UPTO = "evicted_upto"
"""The meta key of the highest seq of data the store evicted to stay within its disk bounds."""
EXPIRED_UPTO = "expired_upto"
"""The meta key of the highest seq of a message the store deleted when its retention ended."""


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


class Outbox(Database):
    """Messages waiting for the broker, in seq order."""

    sealer: Sealer = Sealer(unsigned_reason="no key given to the store")

    def append(self, kind: int, count: int, body: bytes, created: int | None = None) -> int:
        """Seal one message, write it and return its seq; durable once the enclosing transaction commits."""
        created = created if created is not None else int(time.time() * 1000)
        with self.transaction():  # the seq, the seal and the chain's new head are one change
            seq = self._next_seq()
            body = self._seal(kind, seq, body)
            enc = ENC_RAW
            if kind != KIND_ALARM:  # readings and daily reports are large and compress well
                body, enc = zlib.compress(body, 1), ENC_ZLIB
            self.db.execute(
                "INSERT INTO outbox (seq, kind, created, count, enc, body) VALUES (?, ?, ?, ?, ?, ?)",
                (seq, kind, created, count, enc, body),
            )
        self._issued = max(self._issued, seq)
        self._reserve_seq(seq)
        return seq

    def _next_seq(self) -> int:
        """The seq AUTOINCREMENT would give: above every seq ever given (sqlite_sequence) and every row there is."""
        row = self.db.execute("SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'outbox'), 0), "
                              "coalesce((SELECT max(seq) FROM outbox), 0))").fetchone()
        return max(int(row[0]), self._issued) + 1

    def chain_head(self) -> Head | None:
        """The last message sealed, which the next one names; None when the store holds no chain yet."""
        return Head.parse(self.meta(CHAIN_HEAD))

    def _seal(self, kind: int, seq: int, body: bytes) -> bytes:
        topic = KIND_NAMES.get(kind, "data")
        previous = self.chain_head()
        start = "recovered" if self.recovered is not None else "new"
        try:
            sealed, head = self.sealer.seal(topic, seq, body, previous, start)
        except (ValueError, NotCanonical) as exc:  # a body this agent wrote and cannot read back: a bug, shown
            log.error("store: message seq %d (%s) cannot be sealed and is stored unchained: %s", seq, topic, exc)
            return body
        if previous is None:
            log.info("store: a chain of messages starts at seq %d (%s store)", seq, start)
        self.set_meta(CHAIN_HEAD, head.text())
        return sealed

    def ack(self, seqs: Iterable[int]) -> int:
        """Mark acknowledged messages; they stop being sent and go when archived (data) or expired (alarms)."""
        runs = _runs(seqs)
        if not runs:
            return 0
        with self.transaction():
            self.db.executemany("UPDATE outbox SET acked = 1 WHERE seq BETWEEN ? AND ?", runs)
        return sum(b - a + 1 for a, b in runs)

    def fetch(self, after: int, *, upto: int | None = None, kind: int | None = None,
              kinds: tuple[int, ...] | None = None, limit: int = 100) -> list[Row]:
        """Messages not yet acknowledged with seq > after (and <= upto), of `kind` or any of `kinds` when given,
        oldest first, bodies as published."""
        sql = "SELECT seq, kind, created, count, enc, body FROM outbox WHERE acked = 0 AND seq > ?"
        args: list[int] = [after]
        if upto is not None:
            sql += " AND seq <= ?"
            args.append(upto)
        if kind is not None:
            sql += " AND kind = ?"
            args.append(kind)
        if kinds is not None:
            sql += f" AND kind IN ({', '.join('?' * len(kinds))})"
            args.extend(kinds)
        sql += " ORDER BY seq LIMIT ?"
        args.append(limit)
        rows = []
        for seq, k, created, count, enc, body in self.db.execute(sql, args).fetchall():
            try:
                rows.append(Row(seq, k, created, count, _decoded(enc, body)))
            except (zlib.error, TypeError) as exc:
                self._quarantine(seq, k, count, exc)
        return rows

    def _quarantine(self, seq: int, kind: int, count: int, exc: Exception) -> None:
        """A stored message that cannot be decoded: set aside (never sent, counted), so it blocks nothing."""
        log.error("store: message seq %d (%s, %d readings) is damaged and is set aside: %s",
                  seq, KIND_NAMES.get(kind, str(kind)), count, exc)
        with self.transaction():
            self.db.execute("UPDATE outbox SET acked = 2 WHERE seq = ?", (seq,))
            self.add_meta("damaged_messages", 1)

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
                yield s, _decoded(enc, body)
            except (zlib.error, TypeError) as exc:
                log.error("store: message seq %d cannot be read back for the archive: %s", s, exc)

    def drop_oldest_data(self, limit: int) -> tuple[int, int]:
        """Delete the `limit` oldest data messages (never alarm events); return (undelivered readings, others)."""
        with self.transaction():
            rows = self.db.execute(
                "SELECT seq, count, acked FROM outbox WHERE kind = 1 ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()
            self.db.executemany("DELETE FROM outbox WHERE seq = ?", [(r[0],) for r in rows])
            if rows:  # `edge-agent verify` tells a message the store let go from one deleted by hand
                self.set_meta(EVICTED_UPTO, max(int(self.meta(EVICTED_UPTO, 0) or 0), max(r[0] for r in rows)))
        undelivered = sum(r[1] for r in rows if not r[2])
        return undelivered, sum(r[1] for r in rows) - undelivered


def _decoded(enc: int, body: object) -> bytes:
    """A stored body as published; TypeError when the column holds no bytes (a file changed by hand)."""
    if not isinstance(body, bytes):
        raise TypeError(f"the body is a {type(body).__name__}, not bytes")
    return zlib.decompress(body) if enc == ENC_ZLIB else body


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

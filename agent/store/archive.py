"""The archive: every reading kept on site for the retention time (30 days by default), compactly.

Readings are gathered in memory (agent.store.chunks) and written once a minute as one compressed chunk per
point, in short transactions, so the write never holds up the loop nor the other writers. The archive never
decides what is delivered (the outbox's job); it keeps history and answers `history`, from its chunks and from
the messages not yet in it.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterable
from typing import Any

import orjson

from agent.compact import PREFIX, body_map_id
from agent.messages import read_body, read_readings
from agent.store.chunks import ChunkError, Row, Sample, decode_chunk
from agent.store.maps import PointMaps
from agent.store.outbox import ENC_ZLIB, EXPIRED_UPTO

log = logging.getLogger(__name__)


class Archive(PointMaps):
    """The archive's tables: point keys, chunks, and the history query over chunks and unarchived messages."""

    def __init__(self, path: Any, *, readonly: bool = False, memory_fallback: bool = False) -> None:
        super().__init__(path, readonly=readonly, memory_fallback=memory_fallback)
        self._bools: frozenset[str] = frozenset()  # the on/off points told, told again to a file that replaced one
        self.expired_chunks = 0  # chunks the last limited `expire` dropped

    def _after_recovery(self) -> None:
        super()._after_recovery()
        bools, self._bools = self._bools, frozenset()
        if bools:  # every other point is registered again when its first chunk is written
            self.point_keys(sorted(bools), bools)

    def point_keys(self, ids: Iterable[str], bools: frozenset[str] = frozenset()) -> dict[str, int]:
        """Small integer keys for point ids (stable for the life of the file); `bools` are the on/off points. Not
        remembered here: an archive flush asks the file for 250 at a time (a fraction of a millisecond), and
        100,000 points remembered would cost 10 MB."""
        ids = list(ids)
        keys: dict[str, int] = {}
        self._select_keys(ids, keys)
        missing = [i for i in ids if i not in keys]
        new_bools = bools - self._bools
        if missing or new_bools:
            with self.transaction():
                self.db.executemany("INSERT OR IGNORE INTO point (id) VALUES (?)", [(i,) for i in missing])
                self.db.executemany("UPDATE point SET is_bool = 1 WHERE id = ?", [(i,) for i in new_bools])
            self._bools |= new_bools
            self._select_keys(missing, keys)
        return keys

    def _select_keys(self, ids: list[str], keys: dict[str, int]) -> None:
        for start in range(0, len(ids), 500):
            part = ids[start:start + 500]
            keys.update(self.db.execute(f"SELECT id, key FROM point WHERE id IN ({', '.join('?' * len(part))})",
                                        part))

    def point_is_bool(self, point_id: str) -> bool | None:
        """Whether a point's values are on/off; None when the store has never seen the point."""
        row = self.db.execute("SELECT is_bool FROM point WHERE id = ?", (point_id,)).fetchone()
        return None if row is None else bool(row[0])

    def write_chunks(self, chunks: Iterable[Row], mark: int | None, *, drop: bool = True) -> int:
        """Store archive chunks (by point id) in one transaction. A flush may come in several: the last one
        gives `mark` and (with `drop`) drops the acknowledged data messages up to it (now archived); until then
        the store says a flush is under way, so a start after a crash does not archive twice what it finds
        written. Without `drop` the caller drops them in steps (`drop_archived`): messages up to the mark are
        never read for the archive again, whenever they go."""
        chunks = list(chunks)
        keys = self.point_keys(sorted({c[0] for c in chunks}))
        with self.transaction():
            cur = self.db.executemany(
                "INSERT OR REPLACE INTO archive (point, start, end, count, chunk) VALUES (?, ?, ?, ?, ?)",
                [(keys[point], start, end, count, chunk) for point, start, end, count, chunk in chunks],
            )
            written = cur.rowcount
            self.add_meta("archive_readings", sum(c[3] for c in chunks))
            if mark is None:
                self.set_meta("archive_partial", 1)
            else:
                self.set_meta("archive_mark", mark)
                self.db.execute("DELETE FROM meta WHERE key = 'archive_partial'")
                if drop:
                    self.db.execute("DELETE FROM outbox WHERE kind = 1 AND acked = 1 AND seq <= ?", (mark,))
        return written

    def drop_archived(self, mark: int, limit: int) -> int:
        """Drop at most `limit` acknowledged data messages up to `mark` (archived); returns how many went."""
        with self.transaction():
            cur = self.db.execute("DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox WHERE kind = 1 "
                                  "AND acked = 1 AND seq <= ? ORDER BY seq LIMIT ?)", (mark, limit))
        return int(cur.rowcount)

    def archive_partial(self) -> bool:
        """A flush began and did not end (the agent was killed in it): some of its chunks may be written."""
        return bool(self.meta("archive_partial", 0))

    def last_archived(self, point_id: str) -> int | None:
        """The end of the point's latest chunk (by start), or None."""
        row = self.db.execute("SELECT a.end FROM archive a JOIN point p ON p.key = a.point WHERE p.id = ? "
                              "ORDER BY a.start DESC LIMIT 1", (point_id,)).fetchone()
        return None if row is None else int(row[0])

    def archive_mark(self) -> int:
        return int(self.meta("archive_mark", 0) or 0)

    def history(self, point_id: str, since: int, until: int) -> list[Sample]:
        """Readings of one point with since <= ts <= until, from the archive and from messages not yet in it."""
        row = self.db.execute("SELECT key, is_bool FROM point WHERE id = ?", (point_id,)).fetchone()
        out: list[Sample] = []
        if row is not None:
            is_bool = bool(row[1])
            for start, chunk in self.db.execute(
                "SELECT start, chunk FROM archive WHERE point = ? AND end >= ? AND start <= ? ORDER BY start",
                (row[0], since, until),
            ):
                try:
                    if not isinstance(chunk, bytes):  # a value of another type written into the file
                        raise ChunkError(f"archive chunk is a {type(chunk).__name__}, not bytes")
                    samples = decode_chunk(chunk, is_bool)
                except ChunkError as exc:
                    # the other chunks still answer; the damaged one stays in the file for whoever inspects it
                    log.error("store: archive chunk of %s from %s is damaged and is skipped: %s", point_id, start, exc)
                    continue
                out.extend(s for s in samples if since <= s.ts <= until)
        needle = orjson.dumps(point_id)
        for _, body in self.data_rows_after(self.archive_mark()):
            if body.startswith(PREFIX):  # a compact body names its points through its map
                map_id = body_map_id(body)
                if map_id is not None and not self.map_has_point(map_id, point_id):
                    continue
            elif needle not in body:
                continue
            readings = read_readings(body, self.point_map)
            if readings is None:
                continue  # reported when the agent reads it back for the archive
            out.extend(Sample(ts, value, quality) for point, ts, value, quality in readings
                       if point == point_id and since <= ts <= until)
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
                out.append({"seq": seq, **read_body(zlib.decompress(body) if enc == ENC_ZLIB else bytes(body))})
            except (zlib.error, ValueError) as exc:
                log.error("store: alarm event seq %d is damaged: %s", seq, exc)
        return out

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

    def expire(self, before: int, limit: int | None = None) -> tuple[int, int]:
        """Retention: drop archive chunks and delivered alarm events older than `before` (ms); with `limit`, at
        most that many chunks, the oldest (the caller asks again while the answer's chunks reached the limit:
        100,000 points leave 100,000 chunks a minute, too many to drop in one step of the event loop)."""
        with self.transaction():
            if limit is None:
                readings = self.db.execute("SELECT coalesce(sum(count), 0) FROM archive WHERE end < ?",
                                           (before,)).fetchone()[0]
                self.db.execute("DELETE FROM archive WHERE end < ?", (before,))
            else:
                rows = self.db.execute("SELECT point, start, end, count FROM archive WHERE end < ? ORDER BY end "
                                       "LIMIT ?", (before, limit)).fetchall()
                self.db.executemany("DELETE FROM archive WHERE point = ? AND start = ? AND end = ?",
                                    [r[:3] for r in rows])
                readings = sum(r[3] for r in rows)
                self.expired_chunks = len(rows)
            self.add_meta("archive_readings", -int(readings))
            last = self.db.execute("SELECT max(seq) FROM outbox WHERE ((kind IN (0, 2) AND acked = 1) OR acked = 2) "
                                   "AND created < ?", (before,)).fetchone()[0]
            events = self.db.execute(
                "DELETE FROM outbox WHERE kind IN (0, 2) AND acked = 1 AND created < ?", (before,)
            ).rowcount
            self.db.execute("DELETE FROM outbox WHERE acked = 2 AND created < ?", (before,))
            if last is not None:  # `edge-agent verify` tells a message the store let go from one deleted by hand
                self.set_meta(EXPIRED_UPTO, max(int(self.meta(EXPIRED_UPTO, 0) or 0), int(last)))
        return int(readings), int(events)

    def archive_stats(self) -> tuple[int, int | None]:
        """Readings in the archive (a counter: no scan of a 20 GB table) and the end of its oldest chunk."""
        oldest = self.db.execute("SELECT min(end) FROM archive").fetchone()[0]
        return max(0, int(self.meta("archive_readings", 0) or 0)), oldest

"""Point maps of the compact encoding, kept in the store's meta table: which map the stored messages were written
with, so every message still in the outbox can be read back (history, archive recovery) and its map published
again on every connect, a backlog from before a configuration change included.

Meta holds `maps`, the maps in the order they came into use, each with the last seq stored before it (its
messages follow that seq, up to the next map's), and `map:{id}`, each map's message as published. The newest
MAX_KEPT stay, and any older one while a data message written with it is still in the outbox.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from agent.compact import parse_map
from agent.store.outbox import Outbox

log = logging.getLogger(__name__)

MAX_KEPT = 10


class PointMaps(Outbox):
    """The outbox with the point maps its compact messages refer to."""

    def __init__(self, path: Any, *, readonly: bool = False, memory_fallback: bool = False) -> None:
        super().__init__(path, readonly=readonly, memory_fallback=memory_fallback)
        self._map_in_use: tuple[str | None, bytes] | None = None  # told again to a file replacing a damaged one
        self._parsed: dict[str, list[list[str]]] = {}  # an id names its content: parsed once, valid for good
        self._point_sets: dict[str, frozenset[str]] = {}

    def _after_recovery(self) -> None:
        super()._after_recovery()
        if self._map_in_use is not None:
            self.register_map(*self._map_in_use)

    def register_map(self, map_id: str | None, message: bytes = b"") -> None:
        """From now on data messages are written with this map (None: in version 1, with no map)."""
        self._map_in_use = (map_id, message)
        with self.transaction():
            entries = self._entries()
            if not entries or entries[-1][0] != map_id:
                entries.append((map_id, self.last_seq()))
            if map_id is not None:
                self.set_meta(f"map:{map_id}", message)
            kept = [(mid, after) for n, (mid, after) in enumerate(entries)
                    if n >= len(entries) - MAX_KEPT
                    or (mid is not None and self._holds_data(after, _next_after(entries, n), pending_only=False))]
            self.set_meta("maps", orjson.dumps(kept).decode())
            ids = {mid for mid, _ in kept}
            for (key,) in self.db.execute("SELECT key FROM meta WHERE key LIKE 'map:%'").fetchall():
                if key[4:] not in ids:
                    self.db.execute("DELETE FROM meta WHERE key = ?", (key,))

    def point_map(self, map_id: str) -> list[list[str]] | None:
        """The devices' point ids of a map, for reading compact bodies; None when the store does not have it."""
        devices = self._parsed.get(map_id)
        if devices is None:
            message = self.meta(f"map:{map_id}")
            devices = parse_map(message) if isinstance(message, bytes) else None
            if devices is None:
                return None
            self._parsed[map_id] = devices
        return devices

    def map_has_point(self, map_id: str, point_id: str) -> bool:
        points = self._point_sets.get(map_id)
        if points is None:
            devices = self.point_map(map_id)
            if devices is None:
                return False
            points = self._point_sets[map_id] = frozenset(p for device in devices for p in device)
        return point_id in points

    def maps_to_publish(self) -> list[tuple[str, bytes]]:
        """(id, message) of the map in use and of every map an unacknowledged data message was written with,
        oldest first: what the uplink publishes (retained) on every connect, before any data."""
        entries = self._entries()
        wanted: list[str] = []
        for n, (mid, after) in enumerate(entries):
            if mid is None:
                continue
            if n == len(entries) - 1 or self._holds_data(after, _next_after(entries, n), pending_only=True):
                if mid in wanted:
                    wanted.remove(mid)
                wanted.append(mid)
        out: list[tuple[str, bytes]] = []
        for mid in wanted:
            message = self.meta(f"map:{mid}")
            if isinstance(message, bytes):
                out.append((mid, message))
            else:
                log.error("store: point map %s is missing; messages written with it cannot be decoded", mid)
        return out

    def _entries(self) -> list[tuple[str | None, int]]:
        """The maps in order of use, as (id or None, last seq before it); a damaged record reads as none."""
        try:
            raw = orjson.loads(self.meta("maps", "[]"))
            entries = [(mid, after) for mid, after in raw
                       if (mid is None or type(mid) is str) and type(after) is int]
        except (ValueError, TypeError):
            log.error("store: the record of point maps is damaged; starting it anew")
            return []
        return entries

    def _holds_data(self, after: int, upto: int | None, *, pending_only: bool) -> bool:
        """Whether a data message with after < seq <= upto is in the outbox (only unacknowledged ones)."""
        sql = ("SELECT 1 FROM outbox WHERE acked = 0 AND kind = 1 AND seq > ?" if pending_only
               else "SELECT 1 FROM outbox WHERE acked < 2 AND kind = 1 AND seq > ?")
        args = [after]
        if upto is not None:
            sql += " AND seq <= ?"
            args.append(upto)
        return self.db.execute(sql + " LIMIT 1", args).fetchone() is not None


def _next_after(entries: list[tuple[str | None, int]], n: int) -> int | None:
    """The last seq of entry n's messages: where the next map took over (None for the map in use)."""
    return entries[n + 1][1] if n + 1 < len(entries) else None

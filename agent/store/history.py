"""`edge-agent history`: read a point's readings kept on site, straight from the store file, with no daemon.

It opens the store read-only, so it is safe beside a running agent; it never changes the file.
"""

from __future__ import annotations

import re
import sqlite3
import time
from datetime import datetime
from pathlib import Path

from agent.config.base import parse_duration
from agent.core import QUALITY_NAMES
from agent.store import Store
from agent.store.archive import Sample

_AGO = re.compile(r"^\s*\d+(\.\d+)?\s*(ms|s|m|min|h|d)\s*$")


class HistoryError(Exception):
    """A question the store cannot answer (no such file, bad time, unknown point)."""


def parse_time(text: str, now: float | None = None) -> int:
    """`1h` (an hour ago), `now`, `2026-11-28T10:00` (local time unless it says otherwise), or epoch ms."""
    now = time.time() if now is None else now
    text = text.strip()
    if text == "now":
        return int(now * 1000)
    if _AGO.match(text):
        return int((now - float(parse_duration(text))) * 1000)
    if text.isdigit() and len(text) >= 12:
        return int(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise HistoryError(
            f"{text!r} is not a time: use a duration ago (30m, 1h, 2d), 'now', an ISO time "
            "(2026-11-28T10:00) or milliseconds since the epoch"
        ) from None
    return int(moment.timestamp() * 1000)


def read_history(store_path: Path, point: str, since: int, until: int) -> list[Sample]:
    if not store_path.exists():
        raise HistoryError(f"no store at {store_path} (is this the agent's store.path?)")
    if since > until:
        raise HistoryError("--since is after --until")
    try:
        with Store(store_path, readonly=True) as store:
            if store.point_is_bool(point) is None:
                raise HistoryError(f"point {point!r} has no readings in {store_path}")
            return store.history(point, since, until)
    except sqlite3.DatabaseError as exc:
        raise HistoryError(f"cannot read {store_path}: {exc}") from None


def as_dict(sample: Sample) -> dict[str, object]:
    return {"ts": sample.ts, "value": sample.value, "quality": QUALITY_NAMES[sample.quality]}


def as_line(sample: Sample) -> str:
    when = datetime.fromtimestamp(sample.ts / 1000).isoformat(timespec="milliseconds")
    value = "-" if sample.value is None else (f"{sample.value:.7g}" if isinstance(sample.value, float)
                                              and not isinstance(sample.value, bool) else str(sample.value))
    return f"{when}  {value:>14}  {QUALITY_NAMES[sample.quality]}"

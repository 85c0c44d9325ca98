"""`edge-agent history`: read a point's readings kept on site, straight from the store file, with no daemon.

It opens the store read-only, so it is safe beside a running agent; it never changes the file. Whatever the
user types or the file holds, the answer is readings or one HistoryError line, never a traceback.
"""

from __future__ import annotations

import math
import re
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from agent.config.base import parse_duration
from agent.core import QUALITY_NAMES
from agent.store import Store
from agent.store.chunks import Sample

_AGO = re.compile(r"^\s*\d+(\.\d+)?\s*(ms|s|m|min|h|d)\s*$", re.ASCII)
# the times a calendar can name, 0001-01-01 to 9999-12-31 (UTC), in ms: the store's integers hold them all
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
TS_MIN = (datetime.min.replace(tzinfo=UTC) - _EPOCH) // timedelta(milliseconds=1)
TS_MAX = (datetime.max.replace(tzinfo=UTC) - _EPOCH) // timedelta(milliseconds=1)
_RANGE = "times must lie between the years 1 and 9999"
# characters SQLite reads as URI syntax in the read-only open (file:PATH?mode=ro): they would open another file
_URI_SYNTAX = frozenset("?#%")


class HistoryError(Exception):
    """A question the store cannot answer (no such file, bad time, unknown point)."""


def _shown(text: str, limit: int = 42) -> str:
    """`text` quoted for a one-line message, cut short when it is long."""
    shown = repr(text)
    return shown if len(shown) <= limit else shown[:limit] + "…"


def parse_time(text: str, now: float | None = None) -> int:
    """`1h` (an hour ago), `now`, `2026-11-28T10:00` (local time unless it says otherwise), or epoch ms.

    Anything else, or a time before the year 1 or after 9999, is a HistoryError.
    """
    now = time.time() if now is None else now
    text = text.strip()
    if text == "now":
        return int(now * 1000)
    if _AGO.match(text):
        ago = float(parse_duration(text))
        moment = (now - ago) * 1000 if math.isfinite(ago) else -math.inf
        if not TS_MIN <= moment <= TS_MAX:
            raise HistoryError(f"{_shown(text)} ago is out of range: {_RANGE}")
        return int(moment)
    if text.isascii() and text.isdigit() and len(text) >= 12:
        # the length first: int() refuses (ValueError) thousands of digits
        if len(text) > len(str(TS_MAX)) or int(text) > TS_MAX:
            raise HistoryError(f"{_shown(text)} ms since the epoch is out of range: {_RANGE}")
        return int(text)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise HistoryError(
            f"{_shown(text)} is not a time: use a duration ago (30m, 1h, 2d), 'now', an ISO time "
            "(2026-11-28T10:00) or milliseconds since the epoch"
        ) from None
    try:
        # local time at the ends of the calendar can fall outside it (year 0 or 10000)
        ms = when.timestamp() * 1000
    except (ValueError, OverflowError, OSError):
        raise HistoryError(f"{_shown(text)} is out of range: {_RANGE}") from None
    if not TS_MIN <= ms <= TS_MAX:
        raise HistoryError(f"{_shown(text)} is out of range: {_RANGE}")
    return int(ms)


def read_history(store_path: Path, point: str, since: int, until: int) -> list[Sample]:
    """Readings of `point` with since <= ts <= until; HistoryError when the question or the file is wrong.

    A damaged archive chunk is skipped (logged by the store) and the rest still answer.
    """
    if not (TS_MIN <= since <= TS_MAX and TS_MIN <= until <= TS_MAX):
        raise HistoryError(f"--since and --until are out of range: {_RANGE}")
    if since > until:
        raise HistoryError("--since is after --until")
    try:
        point.encode()
    except UnicodeEncodeError:
        raise HistoryError(f"{_shown(point)} is not a point id (it is not valid text)") from None
    if _URI_SYNTAX.intersection(str(store_path)):
        raise HistoryError(f"cannot read {store_path}: a store path must not hold '?', '#' or '%'")
    try:
        if not store_path.exists():
            raise HistoryError(f"no store at {store_path} (is this the agent's store.path?)")
        if not store_path.is_file():
            # a FIFO would block SQLite and a device mislead it: a store is a regular file
            kind = "a directory" if store_path.is_dir() else "not a regular file"
            raise HistoryError(f"{store_path} is {kind}, not a store file")
        with Store(store_path, readonly=True) as store:
            if store.point_is_bool(point) is None:
                raise HistoryError(f"point {_shown(point)} has no readings in {store_path}")
            return store.history(point, since, until)
    except sqlite3.DatabaseError as exc:
        if "no such table" in str(exc):
            raise HistoryError(f"{store_path} is not an agent store ({exc})") from None
        raise HistoryError(f"cannot read {store_path}: {exc}") from None
    except OSError as exc:
        raise HistoryError(f"cannot read {store_path}: {exc.strerror or exc}") from None


def as_dict(sample: Sample) -> dict[str, object]:
    return {"ts": sample.ts, "value": sample.value, "quality": QUALITY_NAMES[sample.quality]}


def as_line(sample: Sample) -> str:
    try:
        when = datetime.fromtimestamp(sample.ts / 1000).isoformat(timespec="milliseconds")
    except (ValueError, OverflowError, OSError):  # local time at the very ends of the calendar
        when = f"{sample.ts} ms"
    value = "-" if sample.value is None else (f"{sample.value:.7g}" if isinstance(sample.value, float)
                                              and not isinstance(sample.value, bool) else str(sample.value))
    return f"{when}  {value:>14}  {QUALITY_NAMES[sample.quality]}"

"""Log lines fit for the journal: one line per event, a syslog priority journald understands (`<3>` ... `<7>`,
no timestamp of our own: journald has one) when stderr goes to the journal, and repeats folded: the same event
of the same source within a minute is counted, not written again ("×120 in the last 60 s").
"""

from __future__ import annotations

import logging
import os
import sys
import time

# logging level → syslog priority (journald's PRIORITY=)
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}
WINDOW_S = 60.0
_MAX_KEYS = 4096  # distinct repeating events remembered; beyond it the oldest are forgotten (memory stays bounded)


class JournalFormatter(logging.Formatter):
    """`<priority>logger: message`, on one line (a traceback is folded into it)."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record).replace("\n", " | ")
        priority = _PRIORITY.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)
        return f"<{priority}>{text}"


class RepeatFilter(logging.Filter):
    """Lets the first of a run of the same event through; counts the rest for `window` seconds, then lets the
    next one through with the count. The same event: same logger, level, message template and first two
    arguments (the channel and device, by the agent's habit)."""

    def __init__(self, window: float = WINDOW_S, clock: object = time.monotonic) -> None:
        super().__init__()
        self.window = window
        self.clock = clock
        self._seen: dict[tuple[object, ...], list[float]] = {}  # key -> [window start, suppressed count]

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        key = (record.name, record.levelno, str(record.msg), *(repr(a) for a in args[:2]))
        now = self.clock()  # type: ignore[operator]
        seen = self._seen.get(key)
        if seen is None or now - seen[0] >= self.window:
            if seen is not None and seen[1]:
                record.msg = f"{record.msg} (×{int(seen[1]) + 1} in the last {now - seen[0]:.0f} s)"
            self._seen.pop(key, None)
            self._seen[key] = [now, 0]
            while len(self._seen) > _MAX_KEYS:
                del self._seen[next(iter(self._seen))]
            return True
        seen[1] += 1
        return False


def setup(level: str) -> None:
    """Logging for the daemon and the CLI: to stderr, journal-style under systemd, folded repeats."""
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):  # stderr is the journal: priorities, no timestamp of ours
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RepeatFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))

"""Log lines for the journal: priorities journald understands, one line per event, repeats folded."""

from __future__ import annotations

import logging

from agent.app.logs import JournalFormatter, RepeatFilter


def record(msg: str, *args: object, level: int = logging.WARNING) -> logging.LogRecord:
    return logging.LogRecord("agent.x", level, __file__, 1, msg, args, None)


def test_repeats_of_one_event_are_counted_and_reported_once_the_minute_is_over() -> None:
    now = [0.0]
    rule = RepeatFilter(window=60, clock=lambda: now[0])
    shown = []
    for second in range(0, 121):
        now[0] = float(second)
        r = record("channel %s device %s: timeout after %s", "c1", "d1", f"{second} s")
        if rule.filter(r):
            shown.append(r.getMessage())
    assert len(shown) == 3
    assert shown[0] == "channel c1 device d1: timeout after 0 s"
    assert shown[1].endswith("(×60 in the last 60 s)")
    other = record("channel %s device %s: timeout after %s", "c1", "d2", "1 s")
    assert rule.filter(other), "another device's event is its own"


def test_journal_lines_carry_the_syslog_priority_and_stay_on_one_line() -> None:
    fmt = JournalFormatter("%(name)s: %(message)s")
    assert fmt.format(record("x", level=logging.ERROR)) == "<3>agent.x: x"
    assert fmt.format(record("x", level=logging.INFO)).startswith("<6>")
    assert "\n" not in fmt.format(record("two\nlines", level=logging.WARNING))

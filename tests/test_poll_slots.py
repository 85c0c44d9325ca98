"""Poll slots: a poll that overruns its interval makes the next slot run late (never silently skipped), and
slots wholly passed are skipped, counted and logged, without a burst to catch up."""

from __future__ import annotations

import logging

import pytest

from agent.config.loader import parse_config
from agent.config.points import PointTable
from agent.pipeline.poller import DeviceState, Poller

CONFIG = """
agent: {id: a1, enterprise: "e1"}
channels:
  - id: c1
    driver: modbus_tcp
    host: 127.0.0.1
    devices:
      - id: d1
        interval: 1
        points:
          - {id: LT-101, address: 0, type: float32}
"""


def device() -> DeviceState:
    table = PointTable(parse_config(CONFIG))
    return Poller(table, lambda batch: None).devices[0]


def run(dev: DeviceState, poll_seconds: float, polls: int) -> list[float]:
    """Poll `polls` times, each taking `poll_seconds`; return when each poll began."""
    began, now = [], 0.0
    dev.due = 0.0
    for _ in range(polls):
        now = max(now, dev.due)
        began.append(now)
        now += poll_seconds
        Poller._next_slot(dev, now)
    return began


def test_polls_on_time_stay_on_the_grid() -> None:
    dev = device()
    assert run(dev, 0.3, 5) == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert (dev.late, dev.overruns) == (0, 0)


def test_a_poll_that_overruns_makes_the_next_run_late_and_whole_slots_passed_are_counted(
        caplog: pytest.LogCaptureFixture) -> None:
    dev = device()
    with caplog.at_level(logging.WARNING, logger="agent.pipeline.poller"):
        began = run(dev, 1.2, 6)
    # each poll runs as soon as the one before ends; the slot at 5 s had wholly passed by 6 s
    assert began == pytest.approx([0.0, 1.2, 2.4, 3.6, 4.8, 6.0])
    assert dev.late == 6 and dev.overruns == 1  # the slot at 7 s is late already: it runs at 7.2 s
    # polls done plus slots skipped account for every slot before it
    assert len(began) + dev.overruns == 7 and dev.due == 7.0
    assert "1 slot(s) skipped" in caplog.text and "d1" in caplog.text


def test_a_long_stall_skips_slots_without_a_burst() -> None:
    dev = device()
    began = run(dev, 3.5, 3)
    assert began == pytest.approx([0.0, 3.5, 7.0])  # never two polls back to back to catch up
    # slots 1, 2 (passed at 3.5 s), 4, 5, 6 (passed at 7 s), 8, 9 (passed at 10.5 s); 3 and 7 ran late
    assert dev.overruns == 7 and dev.late == 3 and dev.due == 10.0
    assert len(began) + dev.overruns == 10

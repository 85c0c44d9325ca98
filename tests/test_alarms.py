"""Limit alarms and communication loss, fed real reading batches through the real engine."""

from __future__ import annotations

from agent.config.loader import parse_config
from agent.config.points import PointTable
from agent.core import BAD, GOOD, AlarmEvent, ReadingBatch
from agent.rules.engine import AlarmEngine

CONFIG = """
agent: {id: a1, enterprise: "e1"}
channels:
  - id: c1
    driver: modbus_tcp
    host: 127.0.0.1
    devices:
      - id: d1
        comm_loss: 5s
        points:
          - {id: LT-101, address: 0, type: float32, unit: m,
             limits: {high: 8.5, high_high: 9.2, low: 1.0, deadband: 0.1, delay: 3s}}
          - {id: GT-201, address: 2, unit: "%LEL", limits: {high: 25, high_high: 50, deadband: 1}}
"""


def engine() -> AlarmEngine:
    return AlarmEngine(PointTable(parse_config(CONFIG)))


def feed(eng: AlarmEngine, t_s: float, value: float | None, index: int = 0) -> list[AlarmEvent]:
    quality = BAD if value is None else GOOD
    return eng.evaluate(ReadingBatch(int(t_s * 1000), [index], [value], [quality]))


def kinds(events: list[AlarmEvent]) -> list[tuple[str, str]]:
    return [(e.type, e.state) for e in events]


def test_high_raises_at_the_limit_and_carries_value_limit_unit() -> None:
    eng = engine()
    assert feed(eng, 0, 25.0, index=1)[0] == AlarmEvent("GT-201", "high", 1, "raised", 25.0, 25.0, "%LEL", 0)


def test_second_level_raises_beside_the_first() -> None:
    eng = engine()
    assert kinds(feed(eng, 0, 30, 1)) == [("high", "raised")]
    assert kinds(feed(eng, 1, 55, 1)) == [("high_high", "raised")]
    events = feed(eng, 2, 10, 1)
    assert sorted(kinds(events)) == [("high", "cleared"), ("high_high", "cleared")]
    assert {e.level for e in events} == {1, 2}


def test_chatter_inside_the_deadband_gives_one_raise_and_one_clear() -> None:
    eng = engine()
    events: list[AlarmEvent] = []
    for t, v in enumerate([26, 24.5, 25.5, 24.1, 26, 24.01, 23.9, 24.5, 23.0]):
        events += feed(eng, t, v, 1)
    assert kinds(events) == [("high", "raised"), ("high", "cleared")]
    assert events[1].value == 23.9


def test_on_delay_just_shorter_does_not_raise() -> None:
    eng = engine()
    events = []
    for t in (0, 1, 2, 2.999):
        events += feed(eng, t, 8.6)
    events += feed(eng, 3.5, 8.0)
    assert events == []


def test_on_delay_just_longer_raises_once() -> None:
    eng = engine()
    events = []
    for t in (0, 1, 2, 3.0, 4):
        events += feed(eng, t, 8.6)
    assert kinds(events) == [("high", "raised")]
    assert events[0].ts == 3000


def test_a_dip_below_the_limit_restarts_the_on_delay() -> None:
    eng = engine()
    events = []
    for t, v in [(0, 8.6), (2, 8.6), (2.5, 8.4), (3, 8.6), (5.9, 8.6), (6.0, 8.6)]:
        events += feed(eng, t, v)
    assert kinds(events) == [("high", "raised")]
    assert events[0].ts == 6000


def test_low_limit_clears_above_limit_plus_deadband() -> None:
    eng = engine()
    events = []
    for t, v in [(0, 0.9), (3, 0.9), (4, 1.05), (5, 1.11)]:
        events += feed(eng, t, v)
    assert kinds(events) == [("low", "raised"), ("low", "cleared")]


def test_bad_readings_hold_limit_alarms_and_raise_comm_loss_after_its_delay() -> None:
    eng = engine()
    assert kinds(feed(eng, 0, 30, 1)) == [("high", "raised")]
    assert feed(eng, 1, None, 1) == []
    assert feed(eng, 5.9, None, 1) == []
    events = feed(eng, 6, None, 1)
    assert kinds(events) == [("comm_loss", "raised")]
    assert events[0].value is None and events[0].limit == 5.0
    assert sorted(eng.active()) == ["GT-201/comm_loss", "GT-201/high"]
    assert kinds(feed(eng, 7, 30, 1)) == [("comm_loss", "cleared")]
    assert eng.active() == ["GT-201/high"]

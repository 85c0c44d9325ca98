"""The domain rules at their edges, fed real reading batches through the real engine: latching and reset, rate of
change, detector fault, crowding, production during an ordered shutdown, daily energy, and state over a restart.
"""

from __future__ import annotations

import random
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config.loader import parse_config
from agent.config.models import AgentConfig
from agent.config.points import PointTable
from agent.core import BAD, GOOD, AlarmEvent, ReadingBatch
from agent.errors import ResetRefused
from agent.rules.energy import DailyEnergy
from agent.rules.engine import AlarmEngine
from agent.rules.limits import RateTable

SITE = """
agent: {id: a1, enterprise: "e1"}
zones:
  - {id: Z1, name: 罐区, head_count: HC-1, limit: 5, color: red, duration: 60s}
power:
  meters:
    - {id: M1, active_power: P-1, total_energy: E-1, idle_kw: 5, delay: 15m, daily_energy: E-1.day}
channels:
  - id: c1
    driver: modbus_tcp
    host: 127.0.0.1
    devices:
      - id: d1
        points:
          - {id: GT-201, address: 0, unit: "%LEL", gas: {kind: combustible}, limits: {deadband: 1, delay: 2s}}
          - {id: GT-201-F, address: 1, fault_of: GT-201}
          - {id: LT-101, address: 2, type: float32, unit: m, limits: {high: 9, rate_rise: 0.5, rate_window: 60s}}
          - {id: HC-1, address: 4}
          - {id: P-1, address: 5, type: float32, unit: kW}
          - {id: E-1, address: 7, type: float32, unit: kWh}
"""


def engine(text: str = SITE) -> tuple[AlarmEngine, AgentConfig]:
    config = parse_config(text)
    return AlarmEngine(PointTable(config), config), config


def feed(eng: AlarmEngine, t_s: float, point: str, value: Any) -> list[tuple[str, str]]:
    info = eng.table.by_id[point]
    quality = BAD if value is None else GOOD
    events = eng.evaluate(ReadingBatch(int(t_s * 1000), [info.index], [value], [quality]))
    return [(e.id, e.state) for e in events]


def test_combustible_gas_gets_the_standard_levels_and_latches() -> None:
    _, config = engine()
    point = config.points()[0][2]
    assert point.limits is not None and (point.limits.high, point.limits.high_high) == (25.0, 50.0)
    assert point.latches()


def test_latched_gas_alarm_stays_after_the_value_falls_until_reset() -> None:
    eng, _ = engine()
    assert feed(eng, 0, "GT-201", 30) == []
    assert feed(eng, 2, "GT-201", 30) == [("GT-201/high", "raised")]
    assert feed(eng, 3, "GT-201", 55) == []
    assert feed(eng, 5, "GT-201", 55) == [("GT-201/high_high", "raised")]
    assert feed(eng, 6, "GT-201", 3) == []  # back to clean air: nothing, the alarms hold
    assert eng.active() == ["GT-201/high", "GT-201/high_high"]
    event = eng.reset("GT-201/high_high", 7000)
    assert (event.id, event.state, event.ts) == ("GT-201/high_high", "reset", 7000)
    assert eng.active() == ["GT-201/high"]


def test_reset_is_refused_while_the_gas_is_still_there_and_for_unknown_or_quiet_alarms() -> None:
    eng, _ = engine()
    feed(eng, 0, "GT-201", 30)
    feed(eng, 2, "GT-201", 30)
    with pytest.raises(ResetRefused, match="still present"):
        eng.reset("GT-201/high", 3000)
    with pytest.raises(ResetRefused, match="no alarm 'GT-999/high'"):
        eng.reset("GT-999/high", 3000)
    with pytest.raises(ResetRefused, match="not raised"):
        eng.reset("GT-201/high_high", 3000)


def test_a_latched_alarm_that_comes_back_before_reset_is_not_raised_twice() -> None:
    eng, _ = engine()
    feed(eng, 0, "GT-201", 30)
    feed(eng, 2, "GT-201", 30)
    assert feed(eng, 3, "GT-201", 10) == []
    assert feed(eng, 4, "GT-201", 30) == []
    assert feed(eng, 10, "GT-201", 30) == []
    with pytest.raises(ResetRefused):
        eng.reset("GT-201/high", 11000)


def test_detector_fault_is_its_own_event_on_the_detector() -> None:
    eng, _ = engine()
    assert feed(eng, 0, "GT-201-F", 1) == [("GT-201/fault", "raised")]
    assert feed(eng, 1, "GT-201-F", 1) == []
    assert feed(eng, 2, "GT-201-F", 0) == [("GT-201/fault", "cleared")]
    assert "GT-201/high" not in eng.active()


def test_rate_of_rise_over_its_window() -> None:
    eng, _ = engine()
    events: list[tuple[str, str]] = []
    for t in range(0, 61, 5):  # 0.3 m/min: slow fill, no alarm
        events += feed(eng, t, "LT-101", 5 + 0.3 * t / 60)
    assert events == []
    level = 5 + 0.3
    for t in range(65, 130, 5):  # 1.2 m/min: fast rise
        level += 0.1
        events += feed(eng, t, "LT-101", level)
    assert events[0] == ("LT-101/rate", "raised")
    for t in range(130, 260, 5):  # steady again
        events += feed(eng, t, "LT-101", level)
    assert events[-1] == ("LT-101/rate", "cleared")


def _rate_run(start_s: float) -> list[tuple[float, str, str, float]]:
    """The rate scenario above from `start_s` (wall seconds): when each event came, relative to the start."""
    eng, _ = engine()
    info = eng.table.by_id["LT-101"]
    out: list[tuple[float, str, str, float]] = []
    level = 5.0
    for t in range(0, 260, 5):
        level += 0.1 if 65 <= t < 130 else 0.3 * 5 / 60 if t <= 60 else 0.0
        for e in eng.evaluate(ReadingBatch(round((start_s + t) * 1000), [info.index], [level], [GOOD])):
            out.append((e.ts / 1000 - start_s, e.id, e.state, round(e.value, 6)))
    return out


def test_rate_samples_kept_in_32_bits_go_on_across_the_point_where_they_count_from_again() -> None:
    # the table counts sample times in 32-bit ms from a base; 24.8 days on (or a clock set from 1970 to now)
    # it counts from again, and a trend that spans that moment is judged as any other
    now = time.time()
    plain = _rate_run(now)
    assert [(e[1], e[2]) for e in plain] == [("LT-101/rate", "raised"), ("LT-101/rate", "cleared")]
    assert _rate_run(now + (2**31 - 100_000) / 1000) == plain  # the fast rise crosses the 32-bit edge
    assert _rate_run(now - (2**31 + 100_000) / 1000) == plain  # begins beyond it, backwards
    eng, _ = engine()
    info = eng.table.by_id["LT-101"]
    for t in range(0, 61, 5):  # a box without a clock: 1970, steady
        eng.evaluate(ReadingBatch(t * 1000, [info.index], [5.0], [GOOD]))
    for t in range(0, 61, 5):  # time comes from the network: the samples from 1970 are far outside the window
        events = eng.evaluate(ReadingBatch(round((now + t) * 1000), [info.index], [5.5], [GOOD]))
        assert events == []


@pytest.mark.parametrize("back_s", [3600, 30 * 86400])
def test_a_clock_stepped_back_starts_the_trend_again_and_the_rule_still_judges(back_s: int) -> None:
    # samples kept before the step lie in the future: judged from them, no rate would ever be due again
    eng, _ = engine()
    info = eng.table.by_id["LT-101"]
    start = time.time() + back_s
    for t in range(0, 61, 5):
        assert eng.evaluate(ReadingBatch(round((start + t) * 1000), [info.index], [5.0], [GOOD])) == []
    start -= back_s
    level, events = 5.0, []
    for t in range(0, 70, 5):  # 1.2 m/min from just after the step
        level += 0.1
        events += eng.evaluate(ReadingBatch(round((start + t) * 1000), [info.index], [level], [GOOD]))
    assert [(e.id, e.state) for e in events] == [("LT-101/rate", "raised")]


def test_a_quiet_rate_rule_has_no_object_until_its_rate_goes_beyond() -> None:
    eng, _ = engine()
    for t in range(0, 61, 5):
        feed(eng, t, "LT-101", 5.0)
    assert eng.rule("LT-101/rate") is None  # kept in the engine's arrays only
    with pytest.raises(ResetRefused, match="not raised"):  # configured, so not "no alarm"
        eng.reset("LT-101/rate", 61_000)
    level = 5.0
    for t in range(65, 130, 5):
        level += 0.1
        feed(eng, t, "LT-101", level)
    rule = eng.rule("LT-101/rate")
    assert rule is not None and rule.state == "raised"


def test_a_saved_rate_alarm_is_taken_back_and_can_be_reset() -> None:
    eng, _ = engine()
    assert eng.load({"LT-101/rate": "latched"}, 0) == []
    assert eng.active() == ["LT-101/rate"]
    assert eng.reset("LT-101/rate", 1000).state == "reset"
    assert eng.active() == []


def test_a_bad_reading_restarts_the_trend() -> None:
    eng, _ = engine()
    events: list[tuple[str, str]] = []
    for t in range(0, 31, 5):
        events += feed(eng, t, "LT-101", 5.0)
    events += feed(eng, 35, "LT-101", None)
    for t in range(40, 61, 5):  # 3 m higher after the gap: not a rise over the window, the trend begins again
        events += feed(eng, t, "LT-101", 8.0)
    assert events == []
    assert eng.rule("LT-101/rate") is None


def test_rate_event_carries_the_rate_and_its_unit() -> None:
    eng, _ = engine()
    info = eng.table.by_id["LT-101"]
    got: list[AlarmEvent] = []
    for t in range(0, 70, 10):
        got += eng.evaluate(ReadingBatch(t * 1000, [info.index], [5.0 + t / 60], [GOOD]))
    assert got and got[0].type == "rate" and got[0].unit == "m/min" and got[0].limit == 0.5
    assert got[0].value == pytest.approx(1.0, rel=0.01)


@pytest.mark.parametrize(("hold_s", "raised"), [(59.9, False), (60.0, True)])
def test_crowding_needs_more_than_its_duration(hold_s: float, raised: bool) -> None:
    eng, _ = engine()
    events = feed(eng, 0, "HC-1", 6) + feed(eng, hold_s, "HC-1", 7)
    assert (("HC-1/crowding", "raised") in events) is raised
    if raised:
        assert feed(eng, hold_s + 1, "HC-1", 5) == [("HC-1/crowding", "cleared")]


def test_crowding_event_names_zone_and_colour() -> None:
    eng, _ = engine()
    info = eng.table.by_id["HC-1"]
    eng.evaluate(ReadingBatch(0, [info.index], [9], [GOOD]))
    (event,) = eng.evaluate(ReadingBatch(61_000, [info.index], [9], [GOOD]))
    assert (event.zone, event.color, event.limit, event.value) == ("Z1", "red", 5.0, 9)


def test_halt_violation_only_while_halted_and_after_its_delay() -> None:
    eng, _ = engine()
    assert feed(eng, 0, "P-1", 200.0) + feed(eng, 1000, "P-1", 200.0) == []  # normal: production is fine
    eng.set_halted(True, 1_000_000)
    assert feed(eng, 1001, "P-1", 200.0) == []
    assert feed(eng, 1001 + 899, "P-1", 200.0) == []
    assert feed(eng, 1001 + 900, "P-1", 200.0) == [("P-1/halt_violation", "raised")]
    assert feed(eng, 2000, "P-1", 3.0) == [("P-1/halt_violation", "cleared")]
    feed(eng, 3000, "P-1", 200.0)
    feed(eng, 3900, "P-1", 200.0)
    assert [(e.id, e.state) for e in eng.set_halted(False, 3_950_000)] == [("P-1/halt_violation", "cleared")]


def test_state_survives_a_restart_without_a_second_raise_and_with_the_missed_clear() -> None:
    eng, config = engine()
    feed(eng, 0, "GT-201", 30)
    feed(eng, 2, "GT-201", 30)  # latched high
    feed(eng, 2, "HC-1", 9)
    feed(eng, 70, "HC-1", 9)  # crowding raised
    feed(eng, 70, "LT-101", None)
    saved = eng.states()
    again = AlarmEngine(PointTable(config), config)
    assert again.load(saved, 80_000) == []
    assert feed(again, 81, "GT-201", 30) == []  # still raised: no second raise
    assert feed(again, 82, "HC-1", 2) == [("HC-1/crowding", "cleared")]  # cleared while we were away
    assert feed(again, 83, "GT-201", 2) == []  # latched: waits for its reset
    assert again.reset("GT-201/high", 84_000).state == "reset"
    assert again.load({"GONE-1/high": "raised"}, 0) == ["GONE-1/high"]


def test_daily_energy_counts_rollover_reset_and_midnight() -> None:
    day = DailyEnergy(rollover=1_000_000.0)
    t0 = 1_764_340_000_000  # some time on a day; the day is taken in local time
    assert day.update(999_990.0, t0) == 0.0
    assert day.update(999_999.0, t0 + 60_000) == 9.0
    assert day.update(5.0, t0 + 120_000) == 15.0  # wrapped at 1,000,000
    assert day.update(0.5, t0 + 180_000) == 15.0  # a drop is believed only when the next reading confirms it
    assert day.update(1.0, t0 + 200_000) == 16.0  # meter replaced: counts from zero
    restored = DailyEnergy(rollover=1_000_000.0)
    restored.restore(day.save())
    assert restored.update(3.0, t0 + 240_000) == 18.0  # a restart loses nothing
    assert restored.update(4.0, t0 + 86_400_000) == 1.0  # the next day starts from zero


def test_one_garbled_energy_reading_books_nothing() -> None:
    day = DailyEnergy(rollover=1_000_000.0)
    t0 = 1_764_340_000_000
    readings = [52_000.0, 52_001.0, 0.0, 52_002.0, 852_002.0, 52_003.0]
    assert [day.update(v, t0 + i * 60_000) for i, v in enumerate(readings)] == [0.0, 1.0, 1.0, 2.0, 2.0, 3.0]


def test_gas_limits_beyond_the_standard_are_refused_naming_it() -> None:
    text = SITE.replace("gas: {kind: combustible}, limits: {deadband: 1, delay: 2s}",
                        "gas: {kind: combustible}, limits: {high: 30, high_high: 60, delay: 90s}")
    with pytest.raises(Exception) as info:
        parse_config(text)
    message = str(info.value)
    assert "GB/T 50493" in message and "25" in message and "60" in message


def _table(rise: float | None, fall: float | None, window: float) -> RateTable:
    table = RateTable(1)
    table.add(0, rise, fall, window, False)
    table.ready()
    return table


def _samples(table: RateTable) -> tuple[list[int], list[float]]:
    """The samples a slot keeps, their times as wall ms."""
    n, base = table.counts[0], table.bases[0]
    return [base + s for s in table.stamps[:n]], list(table.values[:n])


def _check_calm(limits: tuple[float | None, float | None], window: float, drift: float,
                steps: list[tuple[int, float, int]]) -> None:
    """The engine settles a reading without calling `rate` when it falls in the slot's calm band; a table asked
    every time must then keep no new sample and give a rate within ±quick (or none)."""
    rise, fall = limits
    calm, every = _table(rise, fall, window), _table(rise, fall, window)
    quick = calm.quick[0]
    ts, value = 1_700_000_000_000, 0.0
    for dt, noise, gap in steps:
        if gap == 0:  # an unknown value: the trend starts again
            calm.forget(0)
            every.forget(0)
            continue
        ts += dt
        value += (drift + noise) * quick * abs(dt) / 60_000
        rate = every.rate(0, value, ts)
        if calm.since[0] <= ts - calm.bases[0] < calm.due[0] and calm.calm_lo[0] < value < calm.calm_hi[0]:
            assert rate is None or -quick < rate < quick
        else:
            assert calm.rate(0, value, ts) == rate
        assert _samples(calm) == _samples(every)


_LIMITS = [(0.5, None), (None, 2.0), (1.0, 0.25)]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(_LIMITS), st.sampled_from([1.0, 8.0, 60.0]), st.floats(-1.5, 1.5),
       st.lists(st.tuples(st.one_of(*[st.integers(50, 2_000)] * 4, st.integers(-30_000, 9_000)),  # mostly polls
                          st.floats(-4, 4), st.integers(0, 30)), min_size=1, max_size=200))
def test_the_calm_band_settles_a_reading_only_as_the_rate_itself_would(
        limits: tuple[float | None, float | None], window: float, drift: float,
        steps: list[tuple[int, float, int]]) -> None:
    # whatever the times do (steps back included), the values (a trend about as fast as the limit, and noise)
    # and bad readings between them
    _check_calm(limits, window, drift, steps)


@pytest.mark.parametrize("seed", range(40))
def test_the_calm_band_holds_over_long_runs_of_polls(seed: int) -> None:
    # long runs reach the moments the short examples above seldom do: a reading near the band's edge just after
    # the oldest sample moved on
    rnd = random.Random(seed)
    steps = [(rnd.randint(50, 2_000) if rnd.random() < 0.9 else rnd.randint(-30_000, 9_000), rnd.uniform(-4, 4),
              rnd.randint(0, 100)) for _ in range(600)]
    _check_calm(rnd.choice(_LIMITS), rnd.choice([1.0, 8.0, 60.0]), rnd.uniform(-1.5, 1.5), steps)


def test_the_calm_band_ends_where_the_sample_times_count_from_a_new_base() -> None:
    # a sample from long before the base, then readings up to where the slot must count from a new base (which
    # clamps that old sample's time): the band must not reach past it, or it settles a rate judged beyond
    calm, every = _table(1.0, None, 1.0), _table(1.0, None, 1.0)
    base = calm.bases[0]
    every.bases[0] = base
    latest = 2**31 - 1 - 2 * 1000
    for ts, value in ((base - 10**9, 0.0), (base + latest - 1, 0.0), (base + latest, 52_000.0)):
        rate = every.rate(0, value, ts)
        if calm.since[0] <= ts - calm.bases[0] < calm.due[0] and calm.calm_lo[0] < value < calm.calm_hi[0]:
            assert rate is None or -1.0 < rate < 1.0
        else:
            assert calm.rate(0, value, ts) == rate


def test_a_steady_point_is_settled_by_its_calm_band_between_samples() -> None:
    table = _table(0.5, None, 60.0)
    asked = 0
    for t in range(600):  # 10 minutes at 1 s, rising 0.1 m/min: well within the limit
        ts, value = 1_700_000_000_000 + t * 1000, 5 + t / 600
        if not (table.since[0] <= ts - table.bases[0] < table.due[0] and table.calm_lo[0] < value < table.calm_hi[0]):
            asked += 1
            assert table.rate(0, value, ts) is None or table.rate(0, value, ts) < 0.5
    assert asked <= 600 // 7  # once a sample is due (every window/8 = 7.5 s), and while the span is short

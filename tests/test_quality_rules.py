"""Data-quality rules (frozen value, spike, stuck at a range end, online rate), fed hand-built reading batches through
the real rules and, where it matters, the real alarm engine; their configuration and the daily report's schema."""

from __future__ import annotations

import json
import time
from datetime import date, datetime, timedelta
from typing import Any

import jsonschema  # type: ignore[import-untyped,unused-ignore]
import pytest
from conftest import ROOT
from hypothesis import given
from hypothesis import strategies as st

from agent.config.loader import parse_config
from agent.config.points import PointTable
from agent.core import BAD, GOOD, UNCERTAIN, AlarmEvent, ReadingBatch
from agent.errors import ConfigError
from agent.rules.engine import AlarmEngine
from agent.rules.quality import (
    FROZEN_SCAN_MS,
    SPIKE_WINDOW_MS,
    QualityRules,
    Settings,
    resolve,
    unspiked,
)

CONFIG = """
agent: {id: a1, enterprise: "e1"}
channels:
  - id: c1
    driver: modbus_tcp
    host: 127.0.0.1
    devices:
      - id: d1
        points:
          - {id: LT-101, address: 0, type: float32, unit: m, range: [0, 10],
             limits: {high: 8.5, high_high: 9.2}}
          - {id: GT-201, address: 2, type: float32, unit: "%LEL", domain: gas, range: [0, 100],
             gas: {kind: combustible}}
          - {id: PT-301, address: 4, type: float32, unit: MPa, range: [0, 1.6],
             quality: {frozen_after: 2m, epsilon: 0.001, max_step: 0.5, range_end_delay: 10s}}
          - {id: XV-101, table: coil, address: 0, type: bool}
      - id: meter
        points:
          - {id: PM-1-P, address: 0, type: float32, unit: kW, domain: power, range: [0, 500]}
          - {id: PM-1-E, address: 2, type: float32, unit: kWh, domain: power}
          - {id: GT-203, address: 4, type: float32, unit: "%VOL", domain: gas, range: [0, 30],
             gas: {kind: oxygen}}
  - id: ua
    driver: opcua
    endpoint: opc.tcp://127.0.0.1:4840
    devices:
      - id: dcs
        mode: subscribe
        interval: 1s
        points:
          - {id: TT-401, node: "ns=2;s=TT401", unit: "°C", range: [0, 200]}
          - {id: TT-402, node: "ns=2;s=TT402", unit: "°C", range: [0, 200]}
power:
  meters: [{id: M1, active_power: PM-1-P, total_energy: PM-1-E, idle_kw: 5}]
"""

T0 = int(time.time()) * 1000  # readings near the agent's clock: `tick` takes the clock, and so do spikes and range ends


@pytest.fixture(autouse=True)
def _readings_near_the_clock() -> None:
    """T0 is taken again for each test: a test run minutes after the import must not see its readings as old."""
    global T0
    T0 = int(time.time()) * 1000
MIN = 60_000


class Site:
    """The rules of CONFIG with one helper per way of feeding them."""

    def __init__(self, text: str = CONFIG) -> None:
        self.config = parse_config(text)
        self.table = PointTable(self.config)
        self.rules = QualityRules(self.table, self.config)

    def index(self, point: str) -> int:
        return self.table.by_id[point].index

    def read(self, point: str, t_ms: int, value: Any, quality: int = GOOD) -> tuple[ReadingBatch, list[AlarmEvent]]:
        batch = ReadingBatch(t_ms, [self.index(point)], [value], [quality])
        return batch, self.rules.check(batch)

    def poll(self, device: int, t_ms: int, value: float | None) -> list[AlarmEvent]:
        """One poll of a device: every point `value` (bad when None), then counted."""
        indices = list(self.table.devices[device].indices)
        n = len(indices)
        quality = BAD if value is None else GOOD
        events = self.rules.check(ReadingBatch(t_ms, indices, [value] * n, [quality] * n))
        self.rules.expected(self.table.devices[device], t_ms)  # as the poller knows it (an index works too)
        return events


def marks(batch: ReadingBatch) -> list[tuple[int, str | None]]:
    reasons = batch.reasons or [None] * len(batch)
    return list(zip(batch.qualities, reasons, strict=True))


def states(events: list[AlarmEvent]) -> list[tuple[str, str]]:
    return [(e.id, e.state) for e in events]


# --- frozen values -----------------------------------------------------------------------------------------------


def test_a_value_that_stops_moving_is_frozen_after_frozen_after_and_clears_when_it_moves() -> None:
    site = Site()
    events: list[AlarmEvent] = []
    for s in range(0, 120, 10):  # 0.8 MPa held for 110 s: within the 2 min allowed
        batch, got = site.read("PT-301", T0 + s * 1000, 0.8)
        assert marks(batch) == [(GOOD, None)] and got == []
    batch, events = site.read("PT-301", T0 + 120_000, 0.8)
    assert marks(batch) == [(UNCERTAIN, "frozen")]
    assert states(events) == [("PT-301/data_quality", "raised")]
    raised = events[0]
    assert (raised.level, raised.value, raised.limit, raised.unit, raised.ts) == (1, 0.8, 120.0, "MPa", T0 + 120_000)
    assert raised.message.startswith("frozen:")
    batch, events = site.read("PT-301", T0 + 130_000, 0.8)
    assert marks(batch) == [(UNCERTAIN, "frozen")] and events == []  # raised once
    batch, events = site.read("PT-301", T0 + 140_000, 0.81)
    assert marks(batch) == [(GOOD, None)]
    assert states(events) == [("PT-301/data_quality", "cleared")] and events[0].value == 0.81


def test_a_change_within_epsilon_is_no_movement() -> None:
    site = Site()
    events: list[AlarmEvent] = []
    for k, s in enumerate(range(0, 130, 10)):
        events += site.read("PT-301", T0 + s * 1000, 0.8 + 0.0005 * (k % 2))[1]
    assert states(events) == [("PT-301/data_quality", "raised")]


def test_a_process_value_is_frozen_after_30_minutes_by_default() -> None:
    site = Site()
    events: list[AlarmEvent] = []
    for m in range(30):
        events += site.read("LT-101", T0 + m * MIN, 5.0)[1]
    assert events == []
    assert states(site.read("LT-101", T0 + 30 * MIN, 5.0)[1]) == [("LT-101/data_quality", "raised")]


def test_a_gas_detector_at_zero_is_never_frozen_nor_at_its_range_end() -> None:
    site = Site()
    events: list[AlarmEvent] = []
    for h in range(72):  # three days of clean air
        batch, got = site.read("GT-201", T0 + h * 60 * MIN, 0.0)
        assert marks(batch) == [(GOOD, None)]
        events += got + site.rules.tick(T0 + h * 60 * MIN + 30 * MIN)
    assert events == []


def test_a_gas_detector_holding_a_non_zero_value_is_frozen_after_an_hour() -> None:
    site = Site()
    events: list[AlarmEvent] = []
    for m in range(0, 60, 5):
        events += site.read("GT-201", T0 + m * MIN, 5.0)[1]
    assert events == []
    batch, events = site.read("GT-201", T0 + 60 * MIN, 5.0)
    assert marks(batch) == [(UNCERTAIN, "frozen")] and states(events) == [("GT-201/data_quality", "raised")]


def test_an_oxygen_detector_resting_at_its_clean_air_value_is_never_frozen() -> None:
    site = Site()
    events: list[AlarmEvent] = []
    for m in range(0, 300, 10):
        events += site.read("GT-203", T0 + m * MIN, 20.9 + (0.1 if m % 20 == 0 else 0.0))[1]
    assert events == []
    for m in range(300, 370, 10):  # 19.8 %VOL, steady for an hour: not its resting value
        events += site.read("GT-203", T0 + m * MIN, 19.8)[1]
    assert states(events) == [("GT-203/data_quality", "raised")]


def test_on_off_points_and_energy_counters_are_never_frozen() -> None:
    site = Site()
    events: list[AlarmEvent] = []
    for h in range(48):
        events += site.read("XV-101", T0 + h * 60 * MIN, True)[1]
        events += site.read("PM-1-E", T0 + h * 60 * MIN, 123456.7)[1]
        events += site.rules.tick(T0 + h * 60 * MIN + 1)
    assert events == []


def test_a_value_sent_only_on_change_goes_frozen_by_the_clock() -> None:
    site = Site()
    assert site.read("PT-301", T0, 0.8)[1] == []
    assert site.rules.tick(T0 + 119_000) == []
    events = site.rules.tick(T0 + 120_000 + FROZEN_SCAN_MS)
    assert states(events) == [("PT-301/data_quality", "raised")]
    assert events[0].ts == T0 + 120_000 and events[0].value == 0.8  # when it froze, not when the clock saw it
    batch, events = site.read("PT-301", T0 + 200_000, 0.9)
    assert marks(batch) == [(GOOD, None)] and states(events) == [("PT-301/data_quality", "cleared")]


def test_a_bad_reading_starts_the_stillness_afresh() -> None:
    site = Site()
    site.read("PT-301", T0, 0.8)
    site.read("PT-301", T0 + 100_000, None, BAD)
    events = site.read("PT-301", T0 + 110_000, 0.8)[1] + site.read("PT-301", T0 + 200_000, 0.8)[1]
    assert events == []  # 90 s still since the outage, not 200 s
    assert states(site.read("PT-301", T0 + 230_000, 0.8)[1]) == [("PT-301/data_quality", "raised")]


# --- spikes ------------------------------------------------------------------------------------------------------


def test_a_spike_is_marked_at_once_and_a_confirmed_step_is_accepted() -> None:
    site = Site()  # LT-101: range 0-10 m, so a jump of more than 5 m is a spike
    for s, value in enumerate([4.0, 4.1]):
        assert marks(site.read("LT-101", T0 + s * 1000, value)[0]) == [(GOOD, None)]
    assert marks(site.read("LT-101", T0 + 2000, 9.9)[0]) == [(UNCERTAIN, "spike")]
    assert marks(site.read("LT-101", T0 + 3000, 4.2)[0]) == [(GOOD, None)]  # it came back: the spike was garbage
    assert marks(site.read("LT-101", T0 + 4000, 9.5)[0]) == [(UNCERTAIN, "spike")]
    assert marks(site.read("LT-101", T0 + 5000, 9.6)[0]) == [(GOOD, None)]  # the new level holds: a real step
    assert marks(site.read("LT-101", T0 + 6000, 9.7)[0]) == [(GOOD, None)]


def test_a_spike_outranks_an_earlier_reason() -> None:
    site = Site()
    site.read("LT-101", T0, 4.0)
    batch = ReadingBatch(T0 + 1000, [site.index("LT-101")], [-50.0], [UNCERTAIN], reasons=["out_of_range"])
    site.rules.check(batch)
    assert marks(batch) == [(UNCERTAIN, "spike")]


def test_the_alarm_engine_does_not_act_on_an_unconfirmed_spike() -> None:
    site = Site()
    engine = AlarmEngine(site.table, site.config)
    events: list[AlarmEvent] = []
    for s, value in enumerate([4.0, 9.9, 4.1, 4.0, 9.5, 9.6]):  # a garbled frame, then a real step to 9.5 m
        batch = ReadingBatch(T0 + s * 1000, [site.index("LT-101")], [value], [GOOD])
        site.rules.check(batch)
        events += engine.evaluate(batch)
    assert sorted((e.type, e.state, e.value) for e in events) == [("high", "raised", 9.6),
                                                                  ("high_high", "raised", 9.6)]


def test_unspiked_leaves_out_exactly_the_readings_marked_spike() -> None:
    batch = ReadingBatch(T0, [0, 1, 2], [1.0, 2.0, 3.0], [GOOD, UNCERTAIN, UNCERTAIN],
                         reasons=[None, "spike", "frozen"])
    kept = unspiked(batch)
    assert (kept.indices, kept.values, kept.qualities, kept.reasons) == ([0, 2], [1.0, 3.0], [GOOD, UNCERTAIN],
                                                                         [None, "frozen"])
    plain = ReadingBatch(T0, [0], [1.0], [GOOD])
    assert unspiked(plain) is plain


def test_spikes_again_and_again_raise_data_quality_until_an_hour_passes_without_one() -> None:
    site = Site(CONFIG.replace("range: [0, 10],\n", "range: [0, 10], quality: {disable: [frozen]},\n"))
    events: list[AlarmEvent] = []
    t = T0
    for _ in range(3):
        for value in (4.0, 9.9):
            events += site.read("LT-101", t, value)[1]
            t += 1000
    assert events == []  # two garbage spikes proven so far: the third waits for the next sample
    events = site.read("LT-101", t, 4.0)[1]
    assert states(events) == [("LT-101/data_quality", "raised")] and events[0].message.startswith("spike:")
    assert events[0].limit == 5.0
    now = int(time.time() * 1000)
    assert site.rules.tick(now + SPIKE_WINDOW_MS - 60_000) == []
    assert states(site.rules.tick(now + SPIKE_WINDOW_MS + 60_000)) == [("LT-101/data_quality", "cleared")]


def test_a_jump_no_news_contradicts_is_confirmed_by_the_clock_on_a_subscribed_device() -> None:
    site = Site()
    engine = AlarmEngine(site.table, site.config)
    site.read("TT-401", T0, 50.0)
    batch, _ = site.read("TT-401", T0 + 1000, 180.0)  # more than 100 °C in one step: held for the next sample
    assert marks(batch) == [(UNCERTAIN, "spike")]
    assert site.rules.take_confirmed() is None
    site.rules.tick(int(time.time() * 1000) + 3_100)  # twice the interval and 1 s without a change: it holds
    confirmed = site.rules.take_confirmed()
    assert confirmed is not None
    assert (confirmed.indices, confirmed.values, confirmed.qualities, confirmed.times()) == (
        [site.index("TT-401")], [180.0], [GOOD], [T0 + 1000])
    assert engine.evaluate(confirmed) == []  # no limits on TT-401; evaluating must simply work
    assert marks(site.read("TT-401", T0 + 5000, 181.0)[0]) == [(GOOD, None)]  # the new level is the reference


def test_a_polled_device_confirms_only_by_its_next_sample() -> None:
    site = Site()
    site.read("LT-101", T0, 4.0)
    site.read("LT-101", T0 + 1000, 9.9)
    site.rules.tick(int(time.time() * 1000) + 600_000)
    assert site.rules.take_confirmed() is None


# --- range ends --------------------------------------------------------------------------------------------------


def test_a_value_stuck_at_a_range_end_is_marked_after_the_delay_and_clears_when_it_leaves() -> None:
    site = Site()  # PT-301: range 0-1.6 MPa, range_end_delay 10 s
    for s in range(10):
        batch, events = site.read("PT-301", T0 + s * 1000, 0.0)
        assert marks(batch) == [(GOOD, None)] and events == []
    batch, events = site.read("PT-301", T0 + 10_000, 0.0)
    assert marks(batch) == [(UNCERTAIN, "range_end")]
    assert states(events) == [("PT-301/data_quality", "raised")]
    assert events[0].limit == 0.0 and events[0].message.startswith("range_end:")
    batch, events = site.read("PT-301", T0 + 11_000, -0.1, UNCERTAIN)  # beyond the bottom: still at the end
    assert marks(batch) == [(UNCERTAIN, "range_end")] and events == []
    batch, events = site.read("PT-301", T0 + 12_000, 0.3)
    assert marks(batch) == [(GOOD, None)] and states(events) == [("PT-301/data_quality", "cleared")]


def test_a_value_sent_only_on_change_reaches_its_range_end_delay_by_the_clock() -> None:
    site = Site()
    site.read("PT-301", T0, 1.6)
    now = int(time.time() * 1000)
    assert site.rules.tick(now + 5_000) == []
    events = site.rules.tick(now + 10_500)
    assert states(events) == [("PT-301/data_quality", "raised")] and events[0].ts == T0 + 10_000
    assert events[0].limit == 1.6


def test_a_value_creeping_to_a_range_end_by_less_than_epsilon_is_still_caught() -> None:
    site = Site()  # PT-301: epsilon 0.001 MPa, top of the range 1.6 MPa
    site.read("PT-301", T0, 1.59)
    site.read("PT-301", T0 + 1000, 1.5995)
    for s in range(2, 12):
        site.read("PT-301", T0 + s * 1000, 1.6)  # 0.0005 from the last movement: no movement, but at the end
    batch, events = site.read("PT-301", T0 + 12_000, 1.6)
    assert marks(batch) == [(UNCERTAIN, "range_end")] and states(events) == [("PT-301/data_quality", "raised")]


def test_a_value_passing_a_range_end_is_not_flagged() -> None:
    site = Site()
    events: list[AlarmEvent] = []
    for s, value in enumerate([0.2, 0.0, 0.0, 0.1, 0.3]):
        batch, got = site.read("PT-301", T0 + s * 3000, value)
        assert marks(batch) == [(GOOD, None)]
        events += got
    assert events == []


# --- the online rate ---------------------------------------------------------------------------------------------


def local_ms(day: date, hour: int = 0, minute: int = 0) -> int:
    return int(datetime(day.year, day.month, day.day, hour, minute).timestamp() * 1000)


def test_online_rate_is_half_for_a_device_answering_every_other_poll() -> None:
    site = Site()
    day = date(2025, 11, 28)
    start = local_ms(day, 10)
    for k in range(100):
        site.poll(0, start + k * 1000, None if k % 2 else 0.5 + k / 1000)
        site.poll(1, start + k * 1000, 0.5 + k / 1000)
    now = start + 100_000
    rates = {d["device"]: d for d in site.rules.online_rates(now)}
    assert rates["d1"]["hour"] == {"expected": 400, "good": 200, "rate": 0.5}
    assert rates["meter"]["hour"]["rate"] == 1.0 and rates["dcs"]["hour"]["rate"] is None
    hour, day_rates = site.rules.point_rates(now)
    assert hour[site.index("LT-101")] == 0.5 and day_rates[site.index("XV-101")] == 0.5
    assert hour[site.index("PM-1-P")] == 1.0 and hour[site.index("TT-401")] is None


def test_a_frozen_reading_counts_as_not_good() -> None:
    site = Site()
    start = local_ms(date(2025, 11, 28), 10)
    for s in range(0, 130, 10):
        site.read("PT-301", start + s * 1000, 0.8)
        site.rules.expected(0, start + s * 1000)
    hour, _ = site.rules.point_rates(start + 130_000)
    assert hour[site.index("PT-301")] == round(12 / 13, 4)  # the 13th reading was frozen


def test_a_subscribed_point_keeps_its_last_quality_between_changes() -> None:
    site = Site()
    start = local_ms(date(2025, 11, 28), 10)
    site.rules.check(ReadingBatch(start, [site.index("TT-401"), site.index("TT-402")], [20.0, None], [GOOD, BAD]))
    site.rules.expected(2, start)
    for k in range(1, 10):  # no news: TT-401 stays good, TT-402 stays bad
        site.rules.expected(2, start + k * 1000)
    hour, _ = site.rules.point_rates(start + 10_000)
    assert (hour[site.index("TT-401")], hour[site.index("TT-402")]) == (1.0, 0.0)


def test_the_daily_report_covers_the_last_complete_day_and_validates_against_its_schema() -> None:
    site = Site()
    day = date(2025, 11, 28)
    assert site.rules.daily_report() is None
    start = local_ms(day, 22)
    for k in range(60):
        site.poll(0, start + k * MIN, None if k % 2 else 0.5 + k / 1000)
    site.poll(0, local_ms(day + timedelta(days=1), 0, 1), 0.7)  # the first poll of the next day
    report = site.rules.daily_report()
    assert report is not None
    assert (report["day"], report["from"], report["to"]) == ("2025-11-28", start, local_ms(day + timedelta(days=1)))
    d1 = next(d for d in report["devices"] if d["device"] == "d1")
    assert (d1["polls"], d1["expected"], d1["good"], d1["rate"]) == (60, 240, 120, 0.5)
    assert {p["point"]: (p["expected"], p["good"], p["rate"]) for p in d1["points"]}["LT-101"] == (60, 30, 0.5)
    message = {"v": 1, "seq": 7, "hist": False, "agent": "a1", "enterprise": "e1", **report}
    validator = jsonschema.Draft202012Validator(json.loads((ROOT / "docs/schemas/quality.schema.json").read_text()))
    assert [e.message for e in validator.iter_errors(message)] == []
    _, day_rates = site.rules.point_rates(local_ms(day + timedelta(days=1), 0, 30))
    assert day_rates[site.index("LT-101")] is not None  # the window of a day still holds most of yesterday


# --- alarm state across restarts ---------------------------------------------------------------------------------


def test_a_raised_data_quality_alarm_survives_a_restart_and_clears_when_the_point_moves() -> None:
    site = Site()
    for s in range(0, 130, 10):
        site.read("PT-301", T0 + s * 1000, 0.8)
    saved = site.rules.states()
    assert saved == {"PT-301/data_quality": "raised"} and site.rules.active() == ["PT-301/data_quality"]
    again = Site()
    unknown = again.rules.load({**saved, "LT-101/high": "raised", "GONE-1/data_quality": "raised"}, T0)
    assert unknown == ["GONE-1/data_quality"]  # the engine's own ids are let be
    assert again.rules.states() == saved
    assert again.read("PT-301", T0 + 200_000, 0.8)[1] == []  # still raised: no second `raised`
    assert again.read("PT-301", T0 + 210_000, 0.8)[1] == []
    assert states(again.read("PT-301", T0 + 220_000, 0.9)[1]) == [("PT-301/data_quality", "cleared")]
    assert again.rules.states() == {}


def test_a_restored_alarm_at_a_range_end_stays_raised_and_marks_at_once() -> None:
    site = Site()
    site.rules.load({"PT-301/data_quality": "raised"}, T0)
    batch, events = site.read("PT-301", T0, 0.0)
    assert marks(batch) == [(UNCERTAIN, "range_end")] and events == []
    assert states(site.read("PT-301", T0 + 1000, 0.4)[1]) == [("PT-301/data_quality", "cleared")]


# --- configuration -----------------------------------------------------------------------------------------------


POINT = "          - {id: LT-101, address: 0, type: float32, unit: m, range: [0, 10]}\n"
BASE = CONFIG.split("          - {id: LT-101")[0] + POINT


def errors_of(point_extra: str, with_range: bool = True) -> list[str]:
    point = POINT if with_range else POINT.replace(", range: [0, 10]", "")
    text = BASE.replace(POINT, point.replace("}\n", f", quality: {point_extra}}}\n"))
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    return info.value.errors


@pytest.mark.parametrize(
    ("block", "with_range", "where", "says"),
    [
        ("{frozen_after: 0s}", True, "channels[0].devices[0].points[0].quality.frozen_after: ", "greater than 0"),
        ("{frozen_after: 1y}", True, "channels[0].devices[0].points[0].quality.frozen_after: ", "duration"),
        ("{epsilon: -1}", True, "channels[0].devices[0].points[0].quality.epsilon: ", "0"),
        ("{max_step: 1, max_step_percent: 10}", True, "channels[0].devices[0].points[0].quality: ", "not both"),
        ("{max_step_percent: 10}", False, "channels[0].devices[0].points[0]: ", "quality.max_step_percent"),
        ("{range_end_delay: 5s}", False, "channels[0].devices[0].points[0]: ", "quality.range_end_delay"),
        ("{epsilon: 2, max_step: 1}", True, "channels[0].devices[0].points[0]: ", "quality.epsilon"),
        ("{disable: [frozn]}", True, "channels[0].devices[0].points[0].quality.disable[0]: ", "'frozen'"),
        ("{frozen: 1h}", True, "channels[0].devices[0].points[0].quality.frozen: ", "unknown field"),
        ("{at_rest: .nan}", True, "channels[0].devices[0].points[0].quality.at_rest: ", "finite"),
    ],
)
def test_quality_settings_are_validated_naming_their_path(block: str, with_range: bool, where: str,
                                                          says: str) -> None:
    errors = errors_of(block, with_range)
    assert len(errors) == 1 and errors[0].startswith(where) and says in errors[0], errors


def test_an_on_off_point_refuses_a_step() -> None:
    text = CONFIG.replace("{id: XV-101, table: coil, address: 0, type: bool}",
                          "{id: XV-101, table: coil, address: 0, type: bool, quality: {max_step: 1}}")
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert info.value.errors[0].startswith("channels[0].devices[0].points[3]: quality.max_step")


def test_defaults_come_from_the_domain_and_a_block_overrides_or_disables_them() -> None:
    config = parse_config(CONFIG)
    points = {p.id: p for _, _, p in config.points()}
    assert resolve(points["LT-101"]) == Settings(1800.0, 0.0, None, 5.0, 60.0)
    assert resolve(points["GT-201"]) == Settings(3600.0, 0.0, 0.0, 50.0, 60.0)
    assert resolve(points["GT-203"]) == Settings(3600.0, 0.1, 20.9, 15.0, 60.0)
    assert resolve(points["PT-301"]) == Settings(120.0, 0.001, None, 0.5, 10.0)
    assert resolve(points["PM-1-P"]) == Settings(1800.0, 0.0, 0.0, 250.0, 60.0)
    assert resolve(points["XV-101"]) == Settings(None, 0.0, None, None, None)
    assert resolve(points["PM-1-E"], counter=True) == Settings(None, 0.0, None, None, None)
    watched = CONFIG.replace("{id: PM-1-E, address: 2, type: float32, unit: kWh, domain: power}",
                             "{id: PM-1-E, address: 2, type: float32, unit: kWh, domain: power, "
                             "quality: {frozen_after: 6h}}")
    counter = next(p for _, _, p in parse_config(watched).points() if p.id == "PM-1-E")
    assert resolve(counter, counter=True).frozen_after == 21600.0
    off = CONFIG.replace("range: [0, 10],\n", "range: [0, 10], quality: {disable: [frozen, spike, at_rest]},\n")
    level = next(p for _, _, p in parse_config(off).points() if p.id == "LT-101")
    assert resolve(level) == Settings(None, 0.0, None, None, 60.0)


def test_the_config_schema_documents_the_quality_block() -> None:
    from agent.config.models import AgentConfig

    text = json.dumps(AgentConfig.model_json_schema())
    assert "DataQuality" in text and "frozen_after" in text and "max_step_percent" in text


# --- never raises ------------------------------------------------------------------------------------------------


ODD_VALUES = st.one_of(
    st.none(), st.booleans(), st.floats(allow_nan=True, allow_infinity=True), st.integers(),
    st.integers(min_value=2**1000, max_value=2**1100), st.text(max_size=3), st.just(float("nan")),
)


@given(st.lists(st.tuples(st.integers(0, 8), ODD_VALUES, st.sampled_from([GOOD, UNCERTAIN, BAD]),
                          st.integers(-2**70, 2**70)), min_size=1, max_size=40),
       st.booleans())
def test_check_never_raises_on_any_value(readings: list[tuple[int, Any, int, int]], stamped: bool) -> None:
    site = Site()
    indices = [i for i, _, _, _ in readings]
    batch = ReadingBatch(T0, indices, [v for _, v, _, _ in readings], [q for _, _, q, _ in readings],
                         [ts for _, _, _, ts in readings] if stamped else None)
    before = list(batch.qualities)
    site.rules.check(batch)
    assert all(after >= was for after, was in zip(batch.qualities, before, strict=True))  # only ever worse
    assert batch.reasons is None or len(batch.reasons) == len(batch)
    again = ReadingBatch(T0 + 1000, indices, [v for _, v, _, _ in readings], [GOOD] * len(indices))
    site.rules.check(again)
    site.rules.tick(T0 + 10**9)
    site.rules.online_rates(T0 + 10**9)
    site.rules.point_rates(T0 + 10**9)

"""The decode stage's check of device timestamps, with DeviceRead objects: a time further from the agent's clock
than the device's `max_clock_skew` takes the agent's time and is `uncertain`, counted, and logged once per device
(and once when it recovers); times within it pass as the device gave them, in any order. Fuzzed lightly: no
timestamp makes decode raise or lets a reading out of the window (examples from the profile in conftest.py).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.config.loader import validate_config_data
from agent.config.models import AgentConfig
from agent.config.points import PointInfo, PointTable
from agent.core import BAD, GOOD, UNCERTAIN, DeviceRead
from agent.errors import ConfigError
from agent.pipeline.decode import DEFAULT_SKEW_MS, DeviceClock, decode
from agent.pipeline.poller import Poller

NOW = 1_795_824_000_000  # 2026-11-28 00:00 UTC, the agent's clock at the poll
SKEW = 300_000  # the default max_clock_skew, 5 min
DAY = 86_400_000


def site(**device: Any) -> AgentConfig:
    points = [{"id": "A", "node": "ns=2;s=A", "range": [0, 100]}, {"id": "B", "node": "ns=2;s=B"},
              {"id": "C", "node": "ns=2;s=C", "scale": 10}]
    return validate_config_data({"agent": {"id": "t", "enterprise": "e"}, "channels": [
        {"id": "ua", "driver": "opcua", "endpoint": "opc.tcp://127.0.0.1:4840",
         "devices": [{"id": "dcs", "points": points, **device}]}]}, source="test", base_dir=None)


TABLE = PointTable(site())
POINTS: list[PointInfo] = TABLE.points
INDICES = TABLE.devices[0].indices


def clock(max_skew: float = 300.0) -> DeviceClock:
    return DeviceClock("channel ua device dcs", max_skew)


def decode_log(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "agent.pipeline.decode"]


def test_timestamps_within_the_skew_pass_as_the_device_gave_them_in_any_order() -> None:
    c = clock()
    stamps = [NOW + SKEW, NOW - SKEW, NOW - 1_000]  # the window's edges count as within; not in time order
    batch = decode(POINTS, INDICES, DeviceRead([1.0, 2.0, 3.0], timestamps=stamps), NOW, c)
    assert batch.stamps == stamps and batch.stamps is not stamps
    assert batch.qualities == [GOOD, GOOD, GOOD]
    assert batch.values == [1.0, 2.0, 30.0]
    assert c.untrusted == 0


def test_a_timestamp_beyond_the_skew_takes_the_agents_time_and_is_uncertain(caplog: pytest.LogCaptureFixture
                                                                            ) -> None:
    c = clock()
    read = DeviceRead([5.0, None, 7.0], timestamps=[NOW + DAY, NOW - SKEW - 1, NOW + SKEW + 1],
                      qualities=[GOOD, BAD, UNCERTAIN])
    with caplog.at_level(logging.INFO, logger="agent.pipeline.decode"):
        batch = decode(POINTS, INDICES, read, NOW, c)
    assert batch.times() == [NOW, NOW, NOW]
    assert batch.qualities == [UNCERTAIN, BAD, UNCERTAIN]  # a bad reading stays bad, its time is the agent's too
    assert batch.values == [5.0, None, 70.0]
    assert read.timestamps == [NOW + DAY, NOW - SKEW - 1, NOW + SKEW + 1]  # the driver's read is not changed
    assert c.untrusted == 3
    assert decode_log(caplog) == [(logging.WARNING, "channel ua device dcs: device timestamps not trusted: point A is "
                                   "1.0 d ahead of the agent's clock (max_clock_skew 300 s); readings so stamped "
                                   "take the agent's time and are uncertain")]


def test_out_of_range_stays_uncertain_and_a_trusted_time_is_kept_beside_an_untrusted_one() -> None:
    c = clock()
    read = DeviceRead([150.0, 2.0, 3.0], timestamps=[NOW - 10, NOW - 2 * DAY, NOW + 10])
    batch = decode(POINTS, INDICES, read, NOW, c)
    assert batch.times() == [NOW - 10, NOW, NOW + 10]
    assert batch.qualities == [UNCERTAIN, UNCERTAIN, GOOD]  # A outside its range, B untrusted, C as it was
    assert c.untrusted == 1


def test_a_device_is_logged_once_and_again_when_every_point_is_trusted_again(
    caplog: pytest.LogCaptureFixture
) -> None:
    c = clock()

    def poll(stamps: dict[int, int]) -> None:  # news for some points only, as a subscription gives it
        positions = sorted(stamps)
        decode(POINTS, INDICES, DeviceRead([1.0] * len(positions), positions=positions,
                                           timestamps=[stamps[p] for p in positions]), NOW, c)

    with caplog.at_level(logging.INFO, logger="agent.pipeline.decode"):
        poll({0: NOW + DAY, 1: NOW})
        poll({0: NOW + DAY})  # still off: not logged again
        poll({1: NOW - 3 * 3_600_000})  # another point off as well: not logged again either
        poll({0: NOW})  # A is right again, B not yet
        poll({})  # no news
        assert [level for level, _ in decode_log(caplog)] == [logging.WARNING]
        poll({1: NOW + 1, 2: NOW})  # every point that was off is trusted again
        poll({0: NOW - 1_000})
        poll({2: NOW - 10 * 60_000})  # wrong again: logged again
    log = decode_log(caplog)
    assert [level for level, _ in log] == [logging.WARNING, logging.INFO, logging.WARNING]
    assert log[1][1] == "channel ua device dcs: device timestamps trusted again (within max_clock_skew 300 s)"
    assert "point C is 10.0 min behind the agent's clock" in log[2][1]
    assert c.untrusted == 4


def test_a_read_without_device_timestamps_is_not_checked() -> None:
    c = clock()
    c.off.add(INDICES[0])  # even a device logged as off is not judged by a read that has no times
    batch = decode(POINTS, INDICES, DeviceRead([1.0, 2.0, 3.0]), NOW, c)
    assert batch.stamps is None and batch.times() == [NOW] * 3
    assert batch.qualities == [GOOD] * 3
    assert c.off == {INDICES[0]} and c.untrusted == 0


def test_without_a_clock_the_default_skew_applies_uncounted() -> None:
    assert DEFAULT_SKEW_MS == SKEW
    batch = decode(POINTS, INDICES, DeviceRead([1.0, 2.0, 3.0], timestamps=[NOW + SKEW, NOW + SKEW + 1, 0]), NOW)
    assert batch.times() == [NOW + SKEW, NOW, NOW]
    assert batch.qualities == [GOOD, UNCERTAIN, UNCERTAIN]


def test_max_clock_skew_is_a_device_option_the_poller_gives_decode() -> None:
    table = PointTable(site(max_clock_skew="10s"))
    poller = Poller(table, lambda batch: None)
    state = poller.devices[0]
    assert state.clock.skew_ms == 10_000
    batch = decode(POINTS, INDICES, DeviceRead([1.0, 2.0, 3.0], timestamps=[NOW - 9_000, NOW - 11_000, NOW]), NOW,
                   state.clock)
    assert batch.qualities == [GOOD, UNCERTAIN, GOOD]
    health = poller.health([table.devices[0].channel])
    assert health[0]["devices"] == [{"id": "dcs", "state": "ok", "last_error": None, "untrusted_timestamps": 1}]
    assert PointTable(site()).devices[0].device.max_clock_skew == 300.0
    assert PointTable(site(max_clock_skew="1d")).devices[0].device.max_clock_skew == 86_400.0
    for wrong in (0, "500ms", "2d", "soon"):
        with pytest.raises(ConfigError, match="max_clock_skew"):
            site(max_clock_skew=wrong)


# --- fuzz ------------------------------------------------------------------------------------------------

anything = st.one_of(st.integers(), st.integers(min_value=-(2**63), max_value=2**63 - 1))
edges = st.sampled_from([0, -1, 1, -(2**63), 2**63 - 1, 2**64, -(10**400), 10**400, 253402300799999])


@st.composite
def polls(draw: st.DrawFn) -> tuple[DeviceRead, int, float | None]:
    """A read of some or all points, with times near the poll, anywhere, at the edges, in any order."""
    now = draw(st.integers(min_value=0, max_value=4_102_444_800_000))  # 1970..2100
    skew = draw(st.one_of(st.none(), st.floats(min_value=1, max_value=86_400)))
    window = round((skew if skew is not None else 300.0) * 1000)
    near = st.integers(min_value=now - 2 * window, max_value=now + 2 * window)
    positions = draw(st.one_of(st.none(), st.lists(st.integers(0, 2), max_size=3, unique=True)))
    n = 3 if positions is None else len(positions)
    value = st.one_of(st.none(), st.booleans(), st.integers(-(2**31), 2**31),
                      st.floats(allow_nan=True, allow_infinity=True))
    values = draw(st.lists(value, min_size=n, max_size=n))
    stamps = draw(st.lists(st.one_of(near, anything, edges), min_size=n, max_size=n))
    qualities = draw(st.one_of(st.none(), st.lists(st.sampled_from([GOOD, UNCERTAIN, BAD]), min_size=n,
                                                   max_size=n)))
    return DeviceRead(values, positions=positions, timestamps=stamps, qualities=qualities), now, skew


@given(st.lists(polls(), min_size=1, max_size=4))
def test_fuzz_no_timestamp_raises_or_leaves_the_window(reads: list[tuple[DeviceRead, int, float | None]]) -> None:
    c = clock()
    for read, now, skew in reads:
        window = DEFAULT_SKEW_MS if skew is None else round(skew * 1000)
        c.skew_ms = window
        before = c.untrusted
        given_stamps = list(read.timestamps or [])
        batch = decode(POINTS, INDICES, read, now, c if skew is not None else None)
        times = batch.times()
        assert len(times) == len(batch.indices) == len(batch.values) == len(batch.qualities) == len(given_stamps)
        out = 0
        for stamp, ts, quality, value in zip(given_stamps, times, batch.qualities, batch.values, strict=True):
            assert now - window <= ts <= now + window
            if now - window <= stamp <= now + window:
                assert ts == stamp  # a plausible time is the device's, whatever order it comes in
            else:
                out += 1
                assert ts == now and quality != GOOD
            assert quality in (GOOD, UNCERTAIN, BAD)
            assert value is None or not (isinstance(value, float) and not math.isfinite(value))
        assert c.untrusted - before == (out if skew is not None else 0)


def plain_site() -> PointTable:
    points = [{"id": "A", "node": "ns=2;s=A", "range": [0, 100]}, {"id": "B", "node": "ns=2;s=B"},
              {"id": "D", "node": "ns=2;s=D", "range": [-5, 5]}]
    return PointTable(validate_config_data({"agent": {"id": "t", "enterprise": "e"}, "channels": [
        {"id": "ua", "driver": "opcua", "endpoint": "opc.tcp://127.0.0.1:4840",
         "devices": [{"id": "dcs", "points": points}]}]}, source="test", base_dir=None))


PLAIN = plain_site()
_raw = st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats()


@given(st.lists(_raw, min_size=3, max_size=3))
def test_the_fast_path_of_a_whole_plain_poll_decodes_as_the_careful_one(raw: list[Any]) -> None:
    slot = PLAIN.devices[0]
    assert slot.plain
    fast = decode(PLAIN.points, slot.indices, DeviceRead(list(raw)), NOW, None, slot)
    careful = decode(PLAIN.points, slot.indices, DeviceRead(list(raw)), NOW)
    assert fast.indices == careful.indices and fast.qualities == careful.qualities
    assert fast.reasons == careful.reasons and fast.stamps == careful.stamps
    assert [repr(v) for v in fast.values] == [repr(v) for v in careful.values]


def test_a_device_with_a_scaled_point_never_takes_the_fast_path() -> None:
    assert not TABLE.devices[0].plain  # point C has scale 10

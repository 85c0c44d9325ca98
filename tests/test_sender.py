"""The sender's schedule on its own: live first, the backlog beside it in a small share of the window, alarm
events before data, at a bounded rate; a row that could not be sent is fetched again."""

from __future__ import annotations

from agent.core import KIND_ALARM, KIND_DATA
from agent.uplink.sender import BACKLOG_MAX_INFLIGHT, Sender


def test_a_new_store_has_no_backlog() -> None:
    plan = Sender(boundary=0, window=100, rate=1000, now=0.0)
    assert plan.backlog_done and plan.backlog_request(0, 0) is None
    assert plan.live_room(30) == 70 and plan.live_room(130) == 0


def test_live_starts_after_the_boundary_and_follows_what_was_sent() -> None:
    plan = Sender(boundary=41, window=10, rate=1000, now=0.0)
    assert plan.live_after == 41
    plan.live_sent(42)
    assert plan.live_after == 42


def test_alarm_events_of_the_backlog_go_before_its_data() -> None:
    plan = Sender(boundary=50, window=100, rate=10_000, now=0.0)
    first = plan.backlog_request(0, 0)
    assert first is not None and first.kind == KIND_ALARM and (first.after, first.upto) == (0, 50)
    plan.backlog_fetched(first, first.limit)  # a full answer: there may be more alarm events
    plan.backlog_sent(KIND_ALARM, 7, 1)
    again = plan.backlog_request(0, 1)
    assert again is not None and again.kind == KIND_ALARM and again.after == 7
    plan.backlog_fetched(again, 0)  # none left
    data = plan.backlog_request(0, 0)
    assert data is not None and data.kind == KIND_DATA and data.after == 0
    plan.backlog_fetched(data, 0)
    assert plan.backlog_done and plan.backlog_request(0, 0) is None


def test_the_backlog_uses_at_most_half_the_window_and_never_more_than_its_cap() -> None:
    plan = Sender(boundary=10_000, window=1000, rate=10**9, now=0.0)
    request = plan.backlog_request(0, 0)
    assert request is not None and request.limit == BACKLOG_MAX_INFLIGHT
    assert plan.backlog_request(0, BACKLOG_MAX_INFLIGHT) is None, "its share is in flight already"
    small = Sender(boundary=10_000, window=6, rate=10**9, now=0.0)
    request = small.backlog_request(0, 0)
    assert request is not None and request.limit == 3
    assert small.backlog_request(5, 0) is not None and small.backlog_request(5, 0).limit == 1  # type: ignore[union-attr]
    assert small.backlog_request(6, 0) is None, "live traffic fills the window: nothing for the backlog"


def test_the_backlog_rate_is_bounded_in_readings_per_second() -> None:
    plan = Sender(boundary=10_000, window=100, rate=1000, now=0.0)
    request = plan.backlog_request(0, 0)
    assert request is not None
    plan.backlog_fetched(request, 0)  # no alarm events
    sent = 0
    now = 0.0
    for _ in range(100):  # ten seconds in steps of 0.1 s, each step sending while tokens last
        plan.refill(now)
        while plan.may_send_backlog():
            plan.backlog_sent(KIND_DATA, 1, 500)
            sent += 500
        assert plan.wait_timeout() <= 0.2
        now += 0.1
    assert 10_000 <= sent <= 12_000, sent  # 1,000 readings/s over 10 s, plus the bucket's first second


def test_a_row_not_sent_is_fetched_again() -> None:
    plan = Sender(boundary=100, window=10, rate=1000, now=0.0)
    request = plan.backlog_request(0, 0)
    assert request is not None
    plan.backlog_fetched(request, 2)  # fewer than asked: would be exhausted ...
    plan.backlog_held(KIND_ALARM)  # ... but the client refused the first row
    again = plan.backlog_request(0, 0)
    assert again is not None and again.kind == KIND_ALARM and again.after == 0


def test_a_backlog_cut_short_by_events_not_yet_on_disk_is_not_done() -> None:
    """At a reconnect, alarm events whose log is not yet synced hold back every message after them: a fetch that
    stops there has not seen the end of the backlog, which is fetched again once they are released."""
    plan = Sender(boundary=50, window=100, rate=10_000, now=0.0)
    request = plan.backlog_request(0, 0)
    assert request is not None and request.kind == KIND_ALARM
    plan.backlog_fetched(request, 0, held_after=20)  # nothing up to seq 20, the rest held
    assert not plan.backlog_done
    again = plan.backlog_request(0, 0)
    assert again is not None and again.kind == KIND_ALARM and again.upto == 50
    plan.backlog_fetched(again, 0, held_after=None)  # released: and truly none left
    data = plan.backlog_request(0, 0)
    assert data is not None and data.kind == KIND_DATA
    plan.backlog_fetched(data, 3, held_after=60)  # a hold above the boundary cuts nothing
    assert plan.backlog_done

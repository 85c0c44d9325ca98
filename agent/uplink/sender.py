"""The sender's schedule: what to hand the broker next. Live messages first, in the whole in-flight window; the
backlog (what was stored before this connection) beside them, alarm events before data, in a small share of
the window and at a bounded rate of readings per second (a token bucket). Daily reports go with the alarm
events (EVENT_KINDS): few, small in readings, and each worth more than a batch of readings.

Pure bookkeeping: it reads no store and sends nothing; the uplink asks it and tells it what happened.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.core import KIND_ALARM, KIND_DATA, KIND_QUALITY

EVENT_KINDS = (KIND_ALARM, KIND_QUALITY)  # the backlog that goes before data

# the backlog's share of the in-flight window: half of it and at most 16 messages (8,000 readings), which keeps a
# drain's memory small and is plenty on any real link
BACKLOG_MAX_INFLIGHT = 16


@dataclass(frozen=True, slots=True)
class BacklogRequest:
    """Fetch up to `limit` unacknowledged messages of `kind` with after < seq <= upto."""

    kind: int
    after: int
    upto: int
    limit: int


class Sender:
    def __init__(self, boundary: int, window: int, rate: float, now: float) -> None:
        """`boundary`: the last seq stored before this connection (the backlog ends there, live begins after)."""
        self.boundary = boundary
        self.window = window
        self.rate = float(rate)
        self.live_after = boundary
        self.alarm_after = 0
        self.data_after = 0
        self.alarms_done = self.data_done = boundary == 0
        self.tokens = self.rate
        self._last = now

    @property
    def backlog_done(self) -> bool:
        return self.alarms_done and self.data_done

    def live_room(self, inflight: int) -> int:
        """How many live messages may be handed over now."""
        return max(0, self.window - inflight)

    def live_sent(self, seq: int) -> None:
        self.live_after = seq

    def refill(self, now: float) -> None:
        self.tokens = min(self.rate, self.tokens + (now - self._last) * self.rate)
        self._last = now

    def backlog_request(self, inflight: int, backlog_inflight: int) -> BacklogRequest | None:
        """What of the backlog to fetch now, if anything: alarm events first, then data."""
        if self.backlog_done or self.tokens <= 0:
            return None
        room = self.window - inflight
        cap = max(1, min(self.window // 2, BACKLOG_MAX_INFLIGHT))
        limit = min(room, cap - backlog_inflight)
        if limit <= 0:
            return None
        if not self.alarms_done:
            return BacklogRequest(KIND_ALARM, self.alarm_after, self.boundary, limit)
        return BacklogRequest(KIND_DATA, self.data_after, self.boundary, limit)

    def backlog_fetched(self, request: BacklogRequest, rows: int, held_after: int | None = None) -> None:
        """Fewer rows than asked: that kind of backlog is exhausted (unless a send is refused below), unless the
        fetch stopped at `held_after`, below `request.upto` (alarm events not yet on disk hold back what follows
        them): the rest of the backlog is fetched once they are released."""
        if rows < request.limit and (held_after is None or held_after >= request.upto):
            self._set_done(request.kind, True)

    def may_send_backlog(self) -> bool:
        return self.tokens > 0

    def backlog_sent(self, kind: int, seq: int, readings: int) -> None:
        self.tokens -= readings
        if kind != KIND_DATA:
            self.alarm_after = seq
        else:
            self.data_after = seq

    def backlog_held(self, kind: int) -> None:
        """A fetched row was not sent (no tokens, or the client refused): fetch it again later."""
        self._set_done(kind, False)

    def wait_timeout(self, idle: float = 0.2) -> float:
        """How long to wait for a wake-up before looking again: sooner when only the rate holds the backlog."""
        if not self.backlog_done and self.tokens <= 0:
            return min(idle, -self.tokens / self.rate + 0.01)
        return idle

    def _set_done(self, kind: int, done: bool) -> None:
        if kind != KIND_DATA:
            self.alarms_done = done
        else:
            self.data_done = done

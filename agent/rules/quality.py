"""Data-quality rules on reading batches: a frozen value (僵值), an impossible jump (spike), a value stuck at an end
of its measuring range, and each point's online rate (the share of expected samples that arrived `good`).

Readings are marked in place (`uncertain`, with a reason) and never held back, dropped or delayed; one
`data_quality` alarm per point says a rule holds. Per-point state lives in typed arrays, never in an object per
point or per reading: the usual reading (moved a little, inside its range, no rule pending) costs a few array
reads. It never raises on a value, whatever the batch holds.
"""

from __future__ import annotations

import math
import time
from array import array
from bisect import bisect_right
from dataclasses import dataclass
from datetime import date
from typing import TYPE_CHECKING, Any, NamedTuple

from agent.config.base import DeviceBase, PointBase
from agent.config.points import DeviceSlot, PointTable
from agent.core import BAD, GOOD, UNCERTAIN, AlarmEvent, ReadingBatch

if TYPE_CHECKING:
    from agent.config.models import AgentConfig

ALARM_TYPE = "data_quality"
FROZEN, SPIKE, RANGE_END = "frozen", "spike", "range_end"  # the reasons this module gives (agent.core.REASONS)

SPIKES_TO_ALARM = 3
"""Unconfirmed spikes of one point within SPIKE_WINDOW_MS that raise `data_quality`: one garbled frame is only
marked, a point that keeps producing garbage (a loose wire, interference) is worth an alarm."""
SPIKE_WINDOW_MS = 3_600_000
FROZEN_SCAN_MS = 5_000
"""How often `tick` looks for values frozen without a new reading (sent only on change): 5 s late at most."""


@dataclass(frozen=True, slots=True)
class Settings:
    """One point's rules as they apply: None switches a rule off. Durations in seconds, values in its unit."""

    frozen_after: float | None
    epsilon: float
    at_rest: float | None
    max_step: float | None
    range_end_delay: float | None


@dataclass(frozen=True, slots=True)
class _Defaults:
    frozen_after: float | None
    epsilon: float
    at_rest: float | None
    max_step_percent: float | None
    range_end_delay: float | None


# docs/alarms.md, Data quality, says why each default is what it is
DOMAIN_DEFAULTS = {
    "hazard": _Defaults(1800.0, 0.0, None, 50.0, 60.0),
    "gas": _Defaults(3600.0, 0.0, 0.0, 50.0, 60.0),
    "power": _Defaults(1800.0, 0.0, 0.0, 50.0, 60.0),
    "personnel": _Defaults(None, 0.0, None, None, None),
}
OXYGEN_DEFAULTS = _Defaults(3600.0, 0.1, 20.9, 50.0, 60.0)
EXEMPT_DEFAULTS = _Defaults(None, 0.0, None, None, None)  # on/off, counters, fault status, derived points


def resolve(point: PointBase, *, counter: bool = False) -> Settings:
    """The rules of a point: its `quality` block over its domain's defaults. An on/off point, an energy counter
    (`counter`) or a detector's fault status has no rule unless its block sets one."""
    is_bool = getattr(point, "type", None) == "bool"
    if is_bool or counter or point.fault_of is not None:
        base = EXEMPT_DEFAULTS
    elif point.gas is not None and point.gas.kind == "oxygen":
        base = OXYGEN_DEFAULTS
    else:
        base = DOMAIN_DEFAULTS[point.domain]
    q = point.quality
    set_here = q.model_fields_set if q is not None else set()
    off = set(q.disable) if q is not None else set()
    frozen = q.frozen_after if q is not None and q.frozen_after is not None else base.frozen_after
    epsilon = q.epsilon if q is not None and q.epsilon is not None else base.epsilon
    at_rest = q.at_rest if q is not None and "at_rest" in set_here else base.at_rest
    span = point.range[1] - point.range[0] if point.range is not None else None
    step: float | None = None
    if q is not None and q.max_step is not None:
        step = q.max_step
    elif span is not None and not is_bool:
        percent = q.max_step_percent if q is not None and q.max_step_percent is not None else base.max_step_percent
        step = span * percent / 100 if percent is not None else None
    delay = q.range_end_delay if q is not None and q.range_end_delay is not None else base.range_end_delay
    return Settings(
        frozen_after=None if "frozen" in off else frozen,
        epsilon=epsilon,
        at_rest=None if "at_rest" in off else at_rest,
        max_step=None if "spike" in off else step,
        range_end_delay=None if "range_end" in off or point.range is None or is_bool else delay,
    )


def unspiked(batch: ReadingBatch) -> ReadingBatch:
    """The batch without its readings marked `spike` (the same batch when it has none): what alarm rules see."""
    reasons = batch.reasons
    if reasons is None or SPIKE not in reasons:
        return batch
    keep = [n for n, reason in enumerate(reasons) if reason != SPIKE]
    stamps = batch.times()
    return ReadingBatch(batch.ts, [batch.indices[n] for n in keep], [batch.values[n] for n in keep],
                        [batch.qualities[n] for n in keep], [stamps[n] for n in keep], [reasons[n] for n in keep])


class _Profile(NamedTuple):
    """What the careful path needs of a point beyond the hot arrays; points alike share one."""

    frozen_ms: int  # FROZEN_OFF when the rule is off
    epsilon: float  # as the hot array holds it (float32), so both paths judge alike
    rest_lo: float  # the resting band [at_rest - epsilon, at_rest + epsilon]; empty (inf, -inf) without one
    rest_hi: float
    step: float  # inf when the spike rule is off
    range_ms: int  # -1 when the range-end rule is off
    confirm_ms: int  # a spike that no sample contradicts this long is confirmed (subscribed devices); 0: never


# flags, one byte a point; 0 is the usual state, and only then does a reading take the fast path
_NEW = 1  # no reference value: the first sample, or the first after a bad one
_OFF = 2  # its latest reading was not good: counted as a miss at each poll of its device
_SPIKE = 4  # a jump waits for the next sample
_FROZEN = 8
_EDGE = 16  # at an end of its range, waiting out range_end_delay
_AT_END = 32  # ... and past it
_RESTORED = 64  # its alarm was raised before a restart; cleared when the value shows it is fine
_NEAR = 128  # its reference value is outside the fast bounds: a value near it may be at a range end

NO_SLOT = -1
FROZEN_OFF = 0xFFFF_FFFF  # the largest array('I') value: an exempt point is looked at every 49 days, and let be
_FAR = 1 << 62
_MAX_TS = 1 << 53
HOUR_MS = 3_600_000
DAY_MS = 86_400_000
_INF = math.inf


def _number(value: Any) -> float | None:
    """A reading's value as a finite float; None for anything else (None, NaN, infinities, text, huge ints)."""
    kind = type(value)
    if kind is float:
        number: float = value
        return number if math.isfinite(number) else None
    if kind is int or kind is bool:
        try:
            return float(value)
        except OverflowError:
            return None
    return None


def _span(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:g} {unit}"
    return f"{seconds:g} s"


def _f32(value: float) -> float:
    return array("f", [value])[0] if math.isfinite(value) else value


class QualityRules:
    """The data-quality rules of a point table: `check` marks each batch, `tick` lets time pass, `expected` counts
    a poll for the online rates. Build it after every derived point is added to the table."""

    def __init__(self, table: PointTable, config: AgentConfig | None = None) -> None:
        self.table = table
        n = len(table)
        counters = {m.total_energy for m in config.power.meters if m.total_energy} if config is not None else set()
        # a device's points have consecutive indices (PointTable), so a point's device is found by bisection
        self._starts = array("I")
        self._end = 0  # derived points come after every device's
        for device_slot in table.devices:
            assert device_slot.indices == list(range(self._end, self._end + len(device_slot.indices))), \
                "a device's points must have consecutive indices, in the order of the devices"
            self._starts.append(self._end)
            self._end += len(device_slot.indices)
        # the hot arrays, all the fast path reads. The fast bounds (lo, hi): no value within epsilon of a reference
        # value strictly between them is at a range end (other than at rest), so a still reading needs no look
        self._ref = array("d", [0]) * n  # the value the stillness (and a jump) is measured from
        self._due = array("q", [_FAR]) * n  # still until then: frozen (device time, ms)
        self._profiles: list[_Profile] = []
        shared: dict[_Profile, int] = {}
        # points written alike (the same quality block, domain, kind and range on devices alike) share every fact
        # below: each is worked out once (100,000 points: a few distinct shapes)
        facts: dict[tuple[Any, ...], tuple[float, float, float, float, int, int, int]] = {}
        configured = config.each_point() if config is not None else iter(())  # the table's first points, in order
        lo_list, hi_list, eps_list, step_list, fz_list, prof = [], [], [], [], [], []
        flags = bytearray(n)
        confirm_of = [self._confirm_ms(s.device) for s in table.devices]
        for info in table.points:
            i = info.index
            slot = self._slot(i)
            point = next(configured, None)
            if point is None or slot == NO_SLOT:  # derived (daily energy), or a table built without its config
                key: tuple[Any, ...] = (None, slot == NO_SLOT)
            else:
                assert point.id == info.id, "the point table follows the configuration's order"
                key = (id(point.quality), point.domain, getattr(point, "type", None) == "bool", info.id in counters,
                       point.fault_of is not None, point.gas.kind if point.gas is not None else None, point.range,
                       info.lo, info.hi, confirm_of[slot])
            known = facts.get(key)
            if known is None:
                if point is None or slot == NO_SLOT:
                    settings = Settings(None, 0.0, None, None, None)
                else:
                    settings = resolve(point, counter=info.id in counters)
                profile = self._profile(settings, confirm_of[slot] if slot != NO_SLOT else 0)
                k = shared.setdefault(profile, len(shared))
                if k == len(self._profiles):
                    self._profiles.append(profile)
                lo, hi = -_INF, _INF
                if profile.range_ms >= 0:
                    rest_lo, rest_hi, eps = profile.rest_lo, profile.rest_hi, profile.epsilon
                    # a resting value at a range end is no range end: the fast path lets it through
                    lo = (rest_lo if rest_lo <= info.lo <= rest_hi else info.lo) + eps
                    hi = (rest_hi if rest_lo <= info.hi <= rest_hi else info.hi) - eps
                known = facts[key] = (lo, hi, profile.epsilon, profile.step, profile.frozen_ms, k,
                                      _NEW | _OFF if slot != NO_SLOT else 0)  # never read: a miss until it is
            lo_list.append(known[0])
            hi_list.append(known[1])
            eps_list.append(known[2])
            step_list.append(known[3])
            fz_list.append(known[4])
            prof.append(known[5])
            flags[i] = known[6]  # a derived point has no rule and no device: always the fast path
        self._lo = lo_list  # lists, not arrays: a few shared floats, handed over by a read, not made (as the engine's)
        self._hi = hi_list
        self._eps = array("f", eps_list)
        self._step = array("f", step_list)
        self._fz = array("I", fz_list)
        self._flags = flags
        self._prof = array("B" if len(self._profiles) <= 0x100 else "H" if len(self._profiles) <= 0x10000 else "I",
                           prof)
        # rare state, for the few points where a rule is under way
        self._spike: dict[int, tuple[float, int, int, bool]] = {}  # value, wall ms, ts, good before marked
        self._garbage: dict[int, list[int]] = {}  # wall ms of recent unconfirmed spikes
        self._spiky: set[int] = set()
        self._edge: dict[int, tuple[int, int]] = {}  # since ts, since wall ms
        self._raised: set[int] = set()
        self._changed: set[int] = set()  # points whose data_quality alarm was raised or cleared since `changes`
        self._confirmed: list[tuple[int, float, int, int]] = []  # index, value, ts, quality
        self._last_scan = 0
        # online rate: per point, misses (polls at which its latest reading was not good); per device, polls
        self._off = {k: set(s.indices) for k, s in enumerate(table.devices) if s.indices}  # only devices with some
        d = len(table.devices)
        self._miss_hour, self._miss_prev_hour = array("I", [0]) * n, array("I", [0]) * n
        self._miss_day, self._miss_prev_day = array("I", [0]) * n, array("I", [0]) * n
        self._polls_hour, self._polls_prev_hour = array("I", [0]) * d, array("I", [0]) * d
        self._polls_day, self._polls_prev_day = array("I", [0]) * d, array("I", [0]) * d
        self._hour_start = self._hour_end = self._prev_hour_end = 0
        self._day_start = self._day_end = self._prev_day_start = self._prev_day_end = 0
        self._counting_since = 0
        self._prev_from = 0

    # --- the rules, batch by batch -----------------------------------------------------------------------

    def check(self, batch: ReadingBatch) -> list[AlarmEvent]:
        """Apply every rule to one poll's batch, marking readings in place (`uncertain`, with a reason); returns
        `data_quality` events. Run it before the alarm engine, which must skip readings marked `spike`."""
        events: list[AlarmEvent] = []
        indices, values, qualities, stamps = batch.indices, batch.values, batch.qualities, batch.stamps
        flags, lo, hi, ref, eps, step, fz, due = (self._flags, self._lo, self._hi, self._ref, self._eps,
                                                  self._step, self._fz, self._due)
        ts = batch.ts
        count = len(indices)
        start = n = 0
        while start < count:
            try:
                for n in range(start, count):
                    i = indices[n]
                    if flags[i] or qualities[n]:
                        if flags[i] != _NEW | _OFF or qualities[n] != BAD:  # else: still unreadable, nothing new
                            self._judge(batch, n, i, events)
                        continue
                    if stamps is not None:
                        ts = stamps[n]
                    v = values[n]
                    d = v - ref[i]
                    e = eps[i]
                    if -e <= d <= e:  # no movement: only the stillness may have lasted too long
                        if ts >= due[i]:
                            self._judge(batch, n, i, events)
                        continue
                    s = step[i]
                    if -s <= d <= s and lo[i] < v < hi[i]:  # moved, no jump, well inside its range
                        due[i] = ts + fz[i]
                        ref[i] = v
                    else:
                        self._judge(batch, n, i, events)
                break
            except (TypeError, ValueError, OverflowError):  # a value no number (None, text) or beyond a float
                self._judge(batch, n, indices[n], events)
                start = n + 1  # the rest of the batch takes the fast path again
        return events

    def _judge(self, batch: ReadingBatch, n: int, i: int, events: list[AlarmEvent]) -> None:
        """The careful path: one reading, every rule, any value."""
        f = self._flags[i]
        p = self._profiles[self._prof[i]]
        ts = batch.stamps[n] if batch.stamps is not None else batch.ts
        ts = min(max(ts, 0), _MAX_TS) if type(ts) is int else _MAX_TS
        x = _number(batch.values[n])
        f = self._hold(i, f) if batch.qualities[n] == BAD or x is None else self._value(batch, n, i, x, ts, f, p)
        self._alarm(i, f, x, ts, events)
        self._flags[i] = self._count(i, f, batch.qualities[n] != GOOD)

    def _hold(self, i: int, f: int) -> int:
        """No value: a pending jump is neither confirmed nor refuted, a range-end delay starts again, and the
        next value starts the stillness afresh, unless the value was frozen (it stays so until it moves)."""
        if f & _SPIKE:
            self._spike.pop(i, None)
            f &= ~_SPIKE
        if f & _EDGE and not f & _AT_END:
            self._edge.pop(i, None)
            f &= ~_EDGE
        if not f & _FROZEN:
            f |= _NEW
            self._due[i] = _FAR
        return f

    def _value(self, batch: ReadingBatch, n: int, i: int, x: float, ts: int, f: int, p: _Profile) -> int:
        ref, due = self._ref, self._due
        if f & _NEW:
            f &= ~_NEW
            ref[i] = x
            due[i] = ts + p.frozen_ms
        else:
            confirmed = False
            if f & _SPIKE:
                f &= ~_SPIKE
                jumped = self._spike.pop(i)[0]
                if abs(x - jumped) <= p.step:
                    confirmed = True  # the new level holds: a step, not a spike
                else:
                    self._garbage_spike(i)
            d = x - ref[i]
            if not confirmed and abs(d) > p.step:
                f |= _SPIKE
                self._spike[i] = (x, int(time.time() * 1000), ts, batch.qualities[n] == GOOD)
                batch.set_reason(n, UNCERTAIN, SPIKE)
                assert batch.reasons is not None
                batch.reasons[n] = SPIKE  # above any reason given before: the alarm engine skips it by this
                return f  # the other rules wait for the next sample
            if confirmed or abs(d) > p.epsilon:
                ref[i] = x
                due[i] = ts + p.frozen_ms
                f &= ~(_FROZEN | _RESTORED)
            elif not f & _FROZEN and ts >= due[i]:
                if p.frozen_ms == FROZEN_OFF or p.rest_lo <= x <= p.rest_hi:
                    due[i] = ts + p.frozen_ms  # exempt, or at rest: look again after another while
                else:
                    f |= _FROZEN
                    due[i] = _FAR
        if p.range_ms >= 0:
            info = self.table.points[i]
            if (x <= info.lo or x >= info.hi) and not p.rest_lo <= x <= p.rest_hi:
                if not f & _EDGE:
                    f |= _EDGE
                    self._edge[i] = (ts, int(time.time() * 1000))
                if not f & _AT_END and (f & _RESTORED or ts - self._edge[i][0] >= p.range_ms):
                    f |= _AT_END
                if f & _AT_END:
                    batch.set_reason(n, UNCERTAIN, RANGE_END)
            elif f & _EDGE:
                self._edge.pop(i, None)
                f &= ~(_EDGE | _AT_END)
        if f & _RESTORED and p.frozen_ms == FROZEN_OFF and not f & _AT_END:
            f &= ~_RESTORED  # no rule left that could still hold
        f = self._near(i, f)
        if f & _FROZEN:
            batch.set_reason(n, UNCERTAIN, FROZEN)
        return f

    def _near(self, i: int, f: int) -> int:
        """Keep the fast path off a point whose reference value is near a range end (or past it)."""
        return f & ~_NEAR if self._lo[i] < self._ref[i] < self._hi[i] else f | _NEAR

    def _garbage_spike(self, i: int) -> None:
        now = int(time.time() * 1000)
        recent = [t for t in self._garbage.get(i, ()) if now - t < SPIKE_WINDOW_MS]
        recent.append(now)
        self._garbage[i] = recent[-SPIKES_TO_ALARM:]  # all the alarm needs: are there that many, and the last
        if len(recent) >= SPIKES_TO_ALARM:
            self._spiky.add(i)

    def _count(self, i: int, f: int, off: bool) -> int:
        """Keep the device's set of points whose latest reading is not good (each poll counts them as misses)."""
        if off != bool(f & _OFF):
            f ^= _OFF
            slot = self._slot(i)
            if slot != NO_SLOT:
                if off:
                    self._off.setdefault(slot, set()).add(i)
                else:
                    points = self._off.get(slot)
                    if points is not None:
                        points.discard(i)
                        if not points:  # sets and dicts never shrink: the start's "never read" would stay
                            del self._off[slot]
                            if not self._off:
                                self._off = {}
        return f

    # --- the data_quality alarm ---------------------------------------------------------------------------

    def _alarm(self, i: int, f: int, value: Any, ts: int, events: list[AlarmEvent]) -> None:
        holds = bool(f & (_FROZEN | _AT_END | _RESTORED)) or i in self._spiky
        if holds == (i in self._raised):
            return
        info = self.table.points[i]
        p = self._profiles[self._prof[i]]
        limit: float | None = None
        self._changed.add(i)
        if not holds:
            self._raised.discard(i)
            state, message = "cleared", "data quality back to normal"
        else:
            self._raised.add(i)
            state = "raised"
            if f & _AT_END:
                end = info.lo if value is not None and value <= info.lo else info.hi
                limit = end
                message = (f"{RANGE_END}: at the {'lower' if end == info.lo else 'upper'} end of the measuring range "
                           f"({end:g} {info.unit}) for {_span(p.range_ms / 1000)}")
            elif f & _FROZEN:
                limit = p.frozen_ms / 1000
                message = f"{FROZEN}: not moved by more than {p.epsilon:g} {info.unit} for {_span(limit)}"
            else:
                limit = p.step
                message = (f"{SPIKE}: {SPIKES_TO_ALARM} jumps larger than {p.step:g} {info.unit} within 1 h that "
                           "the next sample did not confirm")
        shown = float(info.json_float % value) if type(value) is float else value
        events.append(AlarmEvent(info.id, ALARM_TYPE, 1, state, shown, limit, info.unit, ts, message))

    # --- time passing -------------------------------------------------------------------------------------

    def tick(self, now: int) -> list[AlarmEvent]:
        """Let time pass (`now`: the agent's clock, ms): a range end waited out, a jump no sample contradicted
        (subscribed devices), spikes gone quiet, values frozen with no new reading (sent only on change), and
        the hour and the day of the online rates. Call it about once a second."""
        events: list[AlarmEvent] = []
        self._roll(now)
        flags = self._flags
        for i, (since, wall) in list(self._edge.items()):
            p = self._profiles[self._prof[i]]
            if not flags[i] & _AT_END and now - wall >= p.range_ms:
                self._settle(i, flags[i] | _AT_END, self._ref[i], since + p.range_ms, events, off=True)
        for i, (value, wall, ts, good) in list(self._spike.items()):
            p = self._profiles[self._prof[i]]
            if p.confirm_ms and now - wall >= p.confirm_ms:
                del self._spike[i]
                self._ref[i] = value
                self._due[i] = ts + p.frozen_ms
                self._confirmed.append((i, value, ts, GOOD if good else UNCERTAIN))
                f = self._near(i, flags[i] & ~(_SPIKE | _FROZEN | _RESTORED))
                self._settle(i, f, value, ts, events, off=not good or bool(f & _AT_END))
        for i, times in list(self._garbage.items()):
            if now - times[-1] >= SPIKE_WINDOW_MS:
                del self._garbage[i]
                if i in self._spiky:
                    self._spiky.discard(i)
                    self._settle(i, flags[i], None, now, events)
        if now - self._last_scan >= FROZEN_SCAN_MS:
            self._last_scan = now
            if min(self._due, default=_FAR) <= now:
                self._frozen_scan(now, events)
        return events

    def _frozen_scan(self, now: int, events: list[AlarmEvent]) -> None:
        due, flags = self._due, self._flags
        for i in [i for i, d in enumerate(due) if d <= now]:
            if flags[i] & (_NEW | _SPIKE | _FROZEN):
                continue
            p = self._profiles[self._prof[i]]
            value = self._ref[i]
            if p.frozen_ms == FROZEN_OFF or p.rest_lo <= value <= p.rest_hi:
                due[i] = now + p.frozen_ms
                continue
            since = due[i]
            due[i] = _FAR
            self._settle(i, flags[i] | _FROZEN, value, since, events, off=True)

    def _settle(self, i: int, f: int, value: Any, ts: int, events: list[AlarmEvent], off: bool | None = None) -> None:
        """A rule changed without a reading: raise or clear; `off`: whether the point's current value is now
        counted a miss at each poll (None: as it was)."""
        self._alarm(i, f, value, ts, events)
        self._flags[i] = f if off is None else self._count(i, f, off)

    def take_confirmed(self) -> ReadingBatch | None:
        """Jumps that `tick` confirmed (no sample contradicted them): the alarm engine skipped them as spikes and
        must now evaluate them. Not to be stored again: they were delivered when they came."""
        if not self._confirmed:
            return None
        taken, self._confirmed = self._confirmed, []
        return ReadingBatch(taken[-1][2], [c[0] for c in taken], [c[1] for c in taken], [c[3] for c in taken],
                            [c[2] for c in taken])

    # --- alarm state across restarts ----------------------------------------------------------------------

    def active(self) -> list[str]:
        """Ids of the data_quality alarms raised now."""
        return sorted(f"{self.table.points[i].id}/{ALARM_TYPE}" for i in self._raised)

    def states(self) -> dict[str, str]:
        """What to save, as AlarmEngine.states() does: every raised data_quality alarm."""
        return {f"{self.table.points[i].id}/{ALARM_TYPE}": "raised" for i in self._raised}

    def changes(self) -> dict[str, str | None]:
        """As AlarmEngine.changes(): each data_quality alarm raised ("raised") or cleared (None) since the last call."""
        points, raised = self.table.points, self._raised
        changes = {f"{points[i].id}/{ALARM_TYPE}": ("raised" if i in raised else None) for i in self._changed}
        self._changed = set()
        return changes

    def load(self, states: dict[str, str], now: int) -> list[str]:
        """Take back saved states (the engine's and these may come in one dict: other ids are let be); returns the
        data_quality ids no longer configured. A restored alarm stays raised, without a new event, until the
        point shows it is fine: its value moves and is not stuck at a range end. (`now` as for AlarmEngine.load.)"""
        unknown = []
        suffix = "/" + ALARM_TYPE
        for alarm_id, state in states.items():
            if not alarm_id.endswith(suffix):
                continue
            info = self.table.by_id.get(alarm_id[:-len(suffix)])
            if info is None or state != "raised" or self._slot(info.index) == NO_SLOT:
                unknown.append(alarm_id)
                continue
            if info.index in self._raised:
                continue  # taken over from the configuration before (`carry`), with its state
            self._raised.add(info.index)
            self._changed.add(info.index)
            self._flags[info.index] |= _RESTORED
        return unknown

    # --- a new configuration ------------------------------------------------------------------------------

    def carry(self, old: QualityRules, runs: list[tuple[int, int, int, int, int]]) -> set[int]:
        """Take over, from the rules of the configuration before, the state of the points that are as they were:
        `runs` are (old first index, new first index, count, old device slot, new device slot) of devices whose
        points kept their ids and order. A run whose rules changed starts afresh. The counting windows of the
        online rates go on; a device of a run keeps its counts. Returns the new indices taken over (their raised
        alarm included: `load` leaves them be)."""
        taken: set[int] = set()
        moved: dict[int, int] = {}
        for a, c, n, old_slot, new_slot in runs:
            if (old._lo[a:a + n] != self._lo[c:c + n] or old._hi[a:a + n] != self._hi[c:c + n]
                    or [old._profiles[k] for k in old._prof[a:a + n]] != [self._profiles[k] for k in
                                                                          self._prof[c:c + n]]):
                continue
            self._ref[c:c + n] = old._ref[a:a + n]
            for mine, theirs in ((self._due, old._due), (self._miss_hour, old._miss_hour),
                                 (self._miss_prev_hour, old._miss_prev_hour), (self._miss_day, old._miss_day),
                                 (self._miss_prev_day, old._miss_prev_day)):
                mine[c:c + n] = theirs[a:a + n]
            self._flags[c:c + n] = old._flags[a:a + n]
            for mine_d, theirs_d in ((self._polls_hour, old._polls_hour), (self._polls_prev_hour,
                                      old._polls_prev_hour), (self._polls_day, old._polls_day),
                                     (self._polls_prev_day, old._polls_prev_day)):
                mine_d[new_slot] = theirs_d[old_slot]
            off = old._off.get(old_slot)
            if off:
                self._off[new_slot] = {i - a + c for i in off}
            elif new_slot in self._off:
                del self._off[new_slot]
            moved.update(zip(range(a, a + n), range(c, c + n), strict=True))
            taken.update(range(c, c + n))
        for name in ("_spike", "_garbage", "_edge"):
            theirs_map: dict[int, Any] = getattr(old, name)
            getattr(self, name).update({moved[i]: v for i, v in theirs_map.items() if i in moved})
        self._spiky |= {moved[i] for i in old._spiky if i in moved}
        carried = {moved[i] for i in old._raised if i in moved}
        self._raised |= carried
        self._changed |= carried
        for name in ("_hour_start", "_hour_end", "_prev_hour_end", "_day_start", "_day_end", "_prev_day_start",
                     "_prev_day_end", "_counting_since", "_prev_from", "_last_scan"):
            setattr(self, name, getattr(old, name))
        return taken

    # --- online rates -------------------------------------------------------------------------------------

    def expected(self, slot: int | DeviceSlot, ts: int) -> None:
        """One poll of a device (its DeviceSlot, or its index in table.devices), good or bad, at `ts` (the agent's
        clock, ms): one expected sample per point, a miss for each point whose latest reading is not good. Call it
        after `check` of the poll's batch, and for a poll with no news too (a subscription: a point not in the
        batch keeps the quality it had)."""
        if isinstance(slot, DeviceSlot):
            slot = self._slot(slot.indices[0]) if slot.indices else self.table.devices.index(slot)
        self._roll(ts)
        self._polls_hour[slot] += 1
        self._polls_day[slot] += 1
        off = self._off.get(slot)
        if off:
            miss_hour, miss_day = self._miss_hour, self._miss_day
            for i in off:
                miss_hour[i] += 1
                miss_day[i] += 1

    @staticmethod
    def _confirm_ms(device: DeviceBase) -> int:
        """A spike that no sample contradicts this long is confirmed: devices read by subscription send news only
        on change, so their silence confirms; polled devices never confirm by silence (0)."""
        if getattr(device, "mode", "poll") != "subscribe":
            return 0
        wait = max(device.interval, getattr(device, "publishing_interval", None) or 0.0)
        return round(2000 * wait) + 1000

    @staticmethod
    def _profile(settings: Settings, confirm_ms: int) -> _Profile:
        eps = _f32(settings.epsilon)
        rest_lo, rest_hi = (_INF, -_INF) if settings.at_rest is None else (
            settings.at_rest - eps - 1e-9 * max(1.0, abs(settings.at_rest)),
            settings.at_rest + eps + 1e-9 * max(1.0, abs(settings.at_rest)))
        step = _f32(settings.max_step) if settings.max_step is not None else _INF
        range_ms = -1 if settings.range_end_delay is None else round(settings.range_end_delay * 1000)
        frozen_ms = FROZEN_OFF if settings.frozen_after is None else round(settings.frozen_after * 1000)
        return _Profile(frozen_ms, eps, rest_lo, rest_hi, step, range_ms, confirm_ms)

    def slot_of(self, index: int) -> int | None:
        """The device slot of a point (None for a derived one): to call `expected` from a batch."""
        slot = self._slot(index)
        return None if slot == NO_SLOT else slot

    def _slot(self, index: int) -> int:
        return NO_SLOT if index >= self._end else bisect_right(self._starts, index) - 1

    def _roll(self, now: int) -> None:
        """Start a new hour or day of counting when `now` has passed the current one."""
        if now < self._hour_end:
            return
        try:
            offset = (time.localtime(now / 1000).tm_gmtoff or 0) * 1000
        except (OverflowError, ValueError, OSError):  # a clock beyond what the C library can tell
            offset = 0
        start = now - (now + offset) % HOUR_MS
        self._miss_prev_hour, self._miss_hour = self._miss_hour, self._miss_prev_hour
        self._polls_prev_hour, self._polls_hour = self._polls_hour, self._polls_prev_hour
        for counts in (self._miss_hour, self._polls_hour):
            counts[:] = array(counts.typecode, [0]) * len(counts)
        self._prev_hour_end = self._hour_end
        self._hour_start, self._hour_end = start, start + HOUR_MS
        if now < self._day_end:
            return
        day_start = now - (now + offset) % DAY_MS
        if self._day_end:  # a day of counting ended: it becomes the day to report
            self._miss_prev_day, self._miss_day = self._miss_day, self._miss_prev_day
            self._polls_prev_day, self._polls_day = self._polls_day, self._polls_prev_day
            for counts in (self._miss_day, self._polls_day):
                counts[:] = array(counts.typecode, [0]) * len(counts)
            self._prev_day_start, self._prev_day_end = self._day_start, self._day_end
            self._prev_from = max(self._day_start, self._counting_since)
        else:
            self._counting_since = now
        self._day_start, self._day_end = day_start, day_start + DAY_MS

    @staticmethod
    def _share(expected: float, good: float) -> dict[str, Any]:
        return {"expected": round(expected), "good": round(good),
                "rate": round(good / expected, 4) if expected > 0 else None}

    def _weights(self, now: int) -> tuple[float, float]:
        """How much of the previous hour and day a window of one hour and one day ending now still covers."""
        hour = 1 - (now - self._hour_start) / HOUR_MS if self._prev_hour_end == self._hour_start else 0.0
        day = 1 - (now - self._day_start) / DAY_MS if self._prev_day_end == self._day_start else 0.0
        return min(max(hour, 0.0), 1.0), min(max(day, 0.0), 1.0)

    def online_rates(self, now: int | None = None) -> list[dict[str, Any]]:
        """Per device, for health: the share of expected samples that arrived good over the last hour and the last
        day (the current hour or day, plus the part of the previous one the window still covers)."""
        now = int(time.time() * 1000) if now is None else now
        self._roll(now)
        wh, wd = self._weights(now)
        out = []
        for s, device_slot in enumerate(self.table.devices):
            size = len(device_slot.indices)
            a, b = self._starts[s], self._starts[s] + size
            hour = (self._polls_hour[s] + wh * self._polls_prev_hour[s]) * size
            miss_h = sum(self._miss_hour[a:b]) + wh * sum(self._miss_prev_hour[a:b])
            day = (self._polls_day[s] + wd * self._polls_prev_day[s]) * size
            miss_d = sum(self._miss_day[a:b]) + wd * sum(self._miss_prev_day[a:b])
            out.append({"channel": device_slot.channel.id, "device": device_slot.device.id,
                        "hour": self._share(hour, hour - miss_h), "day": self._share(day, day - miss_d)})
        return out

    def point_rates(self, now: int | None = None) -> tuple[list[float | None], list[float | None]]:
        """Per point, by index: the online rate over the last hour and over the last day (None where nothing was
        expected: not polled yet, or a derived point). For `edge-agent points`."""
        now = int(time.time() * 1000) if now is None else now
        self._roll(now)
        wh, wd = self._weights(now)
        hour: list[float | None] = [None] * len(self.table)
        day: list[float | None] = [None] * len(self.table)
        for s, device_slot in enumerate(self.table.devices):
            polls_h = self._polls_hour[s] + wh * self._polls_prev_hour[s]
            polls_d = self._polls_day[s] + wd * self._polls_prev_day[s]
            for i in device_slot.indices:
                if polls_h > 0:
                    hour[i] = round(1 - (self._miss_hour[i] + wh * self._miss_prev_hour[i]) / polls_h, 4)
                if polls_d > 0:
                    day[i] = round(1 - (self._miss_day[i] + wd * self._miss_prev_day[i]) / polls_d, 4)
        return hour, day

    @property
    def last_day_end(self) -> int:
        """The end (ms) of the last complete day counted, 0 before one has ended: `daily_report` changes with it."""
        return self._prev_day_end

    def daily_report(self) -> dict[str, Any] | None:
        """The body of the `quality` message for the last complete local day (docs/protocol.md, `quality`), without
        the fields the uplink frames it with; None until a day has ended since the start. The same day's report
        until the next midnight: send it once (keep `day` of the last one sent)."""
        if not self._prev_day_end:
            return None
        devices = []
        for s, device_slot in enumerate(self.table.devices):
            polls = self._polls_prev_day[s]
            points = []
            for i in device_slot.indices:
                good = polls - self._miss_prev_day[i]
                points.append({"point": self.table.points[i].id, "expected": polls, "good": good,
                               "rate": round(good / polls, 4) if polls else None})
            start = self._starts[s]
            expected = polls * len(device_slot.indices)
            good = expected - sum(self._miss_prev_day[start:start + len(device_slot.indices)])
            devices.append({"channel": device_slot.channel.id, "device": device_slot.device.id, "polls": polls,
                            "expected": expected, "good": good,
                            "rate": round(good / expected, 4) if expected else None, "points": points})
        day = date.fromtimestamp((self._prev_day_start + self._prev_day_end) / 2000).isoformat()
        return {"day": day, "from": self._prev_from, "to": self._prev_day_end, "devices": devices}

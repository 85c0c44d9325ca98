"""The compact `data` encoding (contract version 2, docs/protocol.md): the point map that numbers devices and
points, stored bodies of readings grouped by device and sample time with `good` implied, and reading such a
body back with its map.

It never touches the store or the network: the store keeps the maps and the bodies, the uplink publishes them.
"""

from __future__ import annotations

import hashlib
import re
from array import array
from collections.abc import Callable, Iterable, Sequence
from itertools import repeat
from typing import Any

import orjson

from agent.config.points import PointTable
from agent.core import GOOD, REASONS, ReadingBatch
from agent.trust.canonical import MAX_SAFE_INTEGER, NotCanonical, canonical_bytes

# a compact stored body begins with its map id: the uplink frames it as version 2, readers tell it by this
PREFIX = b'"map":"'
MAP_ID_LENGTH = 12
# a reading's time must be one a calendar can name (0001..9999, in ms): the archive's chunks and the history
# command both rely on it, and a tampered body must not smuggle in a time that overflows them (both versions)
TS_MIN = -62_135_596_800_000
TS_MAX = 253_402_300_799_999

Devices = Sequence[Sequence[str]]  # each device's point ids, in the map's order
MapLookup = Callable[[str], Devices | None]

_BOOL_TEXT = {True: "true", False: "false"}
_REASON_TEXT = {reason: f'"{reason}"' for reason in REASONS}
_VALUE_TYPES = frozenset({type(None), bool, int, float})
_NONE = type(None)
# formats whose text, when it has no exponent, NaN, infinity or negative zero, is the number as RFC 8785 writes it:
# at most 15 significant digits name one double, and %g drops trailing zeros (agent.seal relies on it)
_EXACT_FORMAT = re.compile(r"%\.(?:[1-9]|1[0-5])g")


class _Body:
    """What a body gathers while it is encoded: its groups and `q` entries as text, and whether every number in it
    is written as RFC 8785 writes it."""

    __slots__ = ("exact", "flags", "groups")

    def __init__(self, exact: bool) -> None:
        self.groups: list[str] = []
        self.flags: list[str] = []
        self.exact = exact


class EntryReady(bytes):
    """A stored compact body that carries its entry bytes (agent.trust.chain.entry_bytes) but for the `chain` and
    `seq` members: `entry_head` + `,"chain":..` + `entry_tail` + `,"seq":..,"v":2}`. agent.seal takes them as they
    are instead of reading the body back; only CompactEncoder makes one, when every number in it is written as RFC
    8785 writes it."""

    entry_head: bytes
    entry_tail: bytes


def map_id_of(devices_json: bytes) -> str:
    """The map's id: the first 12 hex digits of the SHA-256 of its `devices` array as written (no spaces)."""
    return hashlib.sha256(devices_json).hexdigest()[:MAP_ID_LENGTH]


class PointMap:
    """Every device with its points, numbered as compact bodies refer to them: a device by its place in
    `devices`, a point by its place in its device's list. Points the agent derives (daily energy) come last,
    one entry per device they belong to, on channel `derived`."""

    __slots__ = ("devices", "devices_json", "id", "indices")

    def __init__(self, table: PointTable) -> None:
        entries: list[tuple[str, str, list[int]]] = [
            (slot.channel.id, slot.device.id, list(slot.indices)) for slot in table.devices
        ]
        covered = {i for _, _, indices in entries for i in indices}
        derived: dict[tuple[str, str], list[int]] = {}
        for info in table.points:
            if info.index not in covered:
                derived.setdefault((info.channel, info.device), []).append(info.index)
        entries.extend((channel, device, indices) for (channel, device), indices in derived.items())
        points = table.points
        self.indices = [indices for _, _, indices in entries]
        self.devices: list[list[str]] = [[points[i].id for i in indices] for indices in self.indices]
        self.devices_json = orjson.dumps([{"id": device, "channel": channel, "points": ids}
                                          for (channel, device, _), ids in zip(entries, self.devices, strict=True)])
        self.id = map_id_of(self.devices_json)

    def message(self, identity: str) -> bytes:
        """The map as published on `map/{id}`; `identity` is agent.messages.identity_fields."""
        return b'{"v":2,%s"map":"%s","devices":%s}' % (identity.encode(), self.id.encode(), self.devices_json)


def body_map_id(body: bytes) -> str | None:
    """The map id a compact stored body begins with; None when it does not begin as one."""
    end = body.find(b'"', len(PREFIX))
    if not body.startswith(PREFIX) or end < 0:
        return None
    return body[len(PREFIX):end].decode("ascii", "replace")


def parse_map(message: bytes) -> list[list[str]] | None:
    """A map message's devices as point-id lists; None unless it is a map whose content matches its id."""
    try:
        parsed = orjson.loads(message)
    except ValueError:
        return None
    if not isinstance(parsed, dict) or type(parsed.get("map")) is not str or not isinstance(parsed.get("devices"),
                                                                                             list):
        return None
    devices: list[list[str]] = []
    for device in parsed["devices"]:
        points = device.get("points") if isinstance(device, dict) else None
        if not isinstance(points, list) or not all(type(p) is str for p in points):
            return None
        devices.append(points)
    # a map changed by hand would send readings to the wrong points: its id must still name its content
    if map_id_of(orjson.dumps(parsed["devices"])) != parsed["map"]:
        return None
    return devices


def _values_text(values: list[Any], fmts: list[str]) -> tuple[str, bool]:
    """Values as JSON, each float with its point's format (as version 1 prints it); a loop in C per common kind.
    Also whether RFC 8785 writes every value so, given formats that _EXACT_FORMAT takes (the caller checks them)."""
    kinds = set(map(type, values))
    if len(kinds) == 1:
        kind = kinds.pop()
        if kind is float:
            text = ",".join(fmts) % tuple(values)  # one formatting call: twice as fast as one a value
            # an exponent, nan, inf ("n") or -0 is written otherwise by RFC 8785
            return text, not ("e" in text or "n" in text or "-0," in text or text.endswith("-0"))
        if kind is bool:
            return ",".join(map(_BOOL_TEXT.__getitem__, values)), True
        if kind is _NONE:
            return ",".join(repeat("null", len(values))), True
        if kind is int:
            return ",".join(map(str, values)), min(values) >= -MAX_SAFE_INTEGER and max(values) <= MAX_SAFE_INTEGER
    text = ",".join([_value_text(fmt, value) for fmt, value in zip(fmts, values, strict=True)])
    exact = kinds <= _VALUE_TYPES and not ("e+" in text or "e-" in text or "nan" in text or "inf" in text
                                           or "-0," in text or text.endswith("-0"))
    if exact and int in kinds:
        exact = all(-MAX_SAFE_INTEGER <= v <= MAX_SAFE_INTEGER for v in values if type(v) is int)
    return text, exact


def _value_text(fmt: str, value: Any) -> str:
    if value is None:
        return "null"
    if value is True or value is False:
        return _BOOL_TEXT[value]
    if type(value) is float:
        return fmt % value
    if isinstance(value, int):
        return str(int(value))
    return str(fmt % value)


class CompactEncoder:
    """Stored bodies of version 2 `data` messages for one point map (built from the table once, complete)."""

    def __init__(self, identity: str, table: PointTable) -> None:
        self.map = PointMap(table)
        size = len(table)
        # arrays, not lists of ints: 100,000 int objects would cost 2.8 MB each
        self._device = array("i", bytes(4 * size))  # global index -> device number in the map
        self._offset = array("i", bytes(4 * size))  # global index -> place in its device's list
        self._fmt = [p.json_float for p in table.points]
        # every index by itself, for slice comparisons; the int objects are the map's own, not new ones
        self._all: list[int] = [0] * size
        for indices in self.map.indices:
            for i in indices:
                self._all[i] = i
        self._start: list[int] = []  # first global index of a device whose points are consecutive, else -1
        self._fmts: list[list[str]] = []  # each device's formats, in its order
        for d, indices in enumerate(self.map.indices):
            for o, i in enumerate(indices):
                self._device[i], self._offset[i] = d, o
            consecutive = bool(indices) and indices == self._all[indices[0]:indices[0] + len(indices)]
            self._start.append(indices[0] if consecutive else -1)
            self._fmts.append([self._fmt[i] for i in indices])
        self._head = '"map":"' + self.map.id + '",' + identity + '"g":['
        # the entry bytes around the groups, members in RFC 8785 order; None: every body goes the seal's long way
        self._entry: tuple[bytes, str, str] | None = None
        names = orjson.loads("{" + identity.rstrip(",") + "}")
        try:
            agent = canonical_bytes({"agent": names["agent"]})[:-1]
            enterprise = canonical_bytes({"enterprise": names["enterprise"]})[1:-1].decode()
        except (KeyError, NotCanonical):
            pass
        else:
            if all(_EXACT_FORMAT.fullmatch(fmt) for fmt in set(self._fmt)):
                self._entry = (agent, "," + enterprise + ',"g":[', '],"map":"' + self.map.id + '"')

    def body(self, batches: Iterable[ReadingBatch]) -> tuple[bytes, int]:
        """The stored body (it begins with PREFIX; an EntryReady when it can be) and the number of readings in
        it."""
        out = _Body(self._entry is not None)
        count = 0
        for batch in batches:
            n = len(batch.indices)
            if not n:
                continue
            count += n
            stamps = batch.stamps
            first, last = (batch.ts, batch.ts) if stamps is None else (min(stamps), max(stamps))
            if not -MAX_SAFE_INTEGER <= first <= last <= MAX_SAFE_INTEGER:
                out.exact = False
            if stamps is None:
                self._add(batch, None, str(batch.ts), None, out)
            elif first == last:
                self._add(batch, None, str(stamps[0]), None, out)
            else:
                by_time: dict[int, list[int]] = {}
                for p, t in enumerate(stamps):
                    same = by_time.get(t)
                    if same is None:
                        by_time[t] = [p]
                    else:
                        same.append(p)
                # a group per sample time when times are shared enough to pay for a group's keys; else a `t` list
                if len(by_time) * 3 <= n:
                    for t, positions in by_time.items():
                        self._add(batch, positions, str(t), None, out)
                else:
                    self._add(batch, None, "", stamps, out)
        joined = ",".join(out.groups)
        rest = "]}" if not out.flags else '],"q":[' + ",".join(out.flags) + "]}"
        body = (self._head + joined + rest).encode()
        if self._entry is None or not out.exact:
            return body, count
        ready = EntryReady(body)
        head, before, after = self._entry
        ready.entry_head = head
        ready.entry_tail = (before + joined + after + rest[1:-1]).encode()  # `q` sorts after `map`
        return ready, count

    def _add(self, batch: ReadingBatch, positions: list[int] | None, ts: str, stamps: list[int] | None,
             out: _Body) -> None:
        """Readings of a batch (all, or those at `positions`) sharing one time `ts`, or each its own in `stamps`."""
        indices, values, qualities, reasons = batch.indices, batch.values, batch.qualities, batch.reasons
        if positions is not None:
            indices = [indices[p] for p in positions]
            values = [values[p] for p in positions]
            qualities = [qualities[p] for p in positions]
            reasons = [reasons[p] for p in positions] if reasons is not None else None
        first, n = indices[0], len(indices)
        d = self._device[first]
        start = self._start[d]
        # the common case, a whole poll or a slice of it: the device's consecutive points
        if start >= 0 and self._device[indices[-1]] == d and indices == self._all[first:first + n]:
            o = first - start
            t = ts if stamps is None else "[" + ",".join(map(str, stamps)) + "]"
            self._group(d, str(o), t, values, self._fmts[d][o:o + n], qualities, reasons, out)
            return
        # a subset (data changes), or a batch with a derived point: one group per device, in the batch's order
        devices = list(map(self._device.__getitem__, indices))
        if min(devices) == max(devices):
            self._subset(d, indices, None, ts, stamps, values, qualities, reasons, out)
            return
        by_device: dict[int, list[int]] = {}
        for p, d in enumerate(devices):
            same = by_device.get(d)
            if same is None:
                by_device[d] = [p]
            else:
                same.append(p)
        for d, ps in by_device.items():
            self._subset(d, [indices[p] for p in ps], ps, ts, stamps, [values[p] for p in ps],
                         [qualities[p] for p in ps], [reasons[p] for p in ps] if reasons is not None else None, out)

    def _subset(self, d: int, indices: list[int], positions: list[int] | None, ts: str, stamps: list[int] | None,
                values: list[Any], qualities: list[int], reasons: list[str | None] | None, out: _Body) -> None:
        """Points of device d in any order: their offsets listed, unless they are consecutive after all."""
        offsets = list(map(self._offset.__getitem__, indices))
        first = offsets[0]
        o = str(first) if offsets == self._all[first:first + len(offsets)] else "[" + ",".join(map(str, offsets)) + "]"
        if stamps is None:
            t = ts
        else:
            own = stamps if positions is None else [stamps[p] for p in positions]
            t = "[" + ",".join(map(str, own)) + "]"
        self._group(d, o, t, values, list(map(self._fmt.__getitem__, indices)), qualities, reasons, out)

    @staticmethod
    def _group(d: int, o: str, t: str, values: list[Any], fmts: list[str], qualities: list[int],
               reasons: list[str | None] | None, out: _Body) -> None:
        g = len(out.groups)
        text, exact = _values_text(values, fmts)
        out.exact = out.exact and exact
        # members in RFC 8785 order, so the group is its own entry bytes (EntryReady)
        out.groups.append(f'{{"d":{d},"o":{o},"t":{t},"v":[{text}]}}')
        if any(qualities):  # only the readings that are not good are listed
            flags = out.flags
            for p, q in enumerate(qualities):
                if q:
                    code = reasons[p] if reasons is not None else None
                    reason = _REASON_TEXT.get(code) if code is not None else None
                    flags.append(f"[{g},{p},{q}]" if reason is None else f"[{g},{p},{q},{reason}]")


def read_compact(message: dict[str, Any], lookup: MapLookup | None) -> list[tuple[str, int, Any, int]] | None:
    """The readings of a compact body (parsed) as (point, ts, value, quality code); None when it is damaged.

    Damaged: its map is unknown (or `lookup` is None), or anything in it is not what CompactEncoder writes: a
    group whose device, offsets or times are out of range or of the wrong type, a value that is not null, a bool
    or a number, a `q` entry that names no reading, names one twice, or has an unknown quality or reason.
    """
    map_id = message.get("map")
    if type(map_id) is not str or lookup is None:
        return None
    devices = lookup(map_id)
    groups = message.get("g")
    if devices is None or type(groups) is not list:
        return None
    out: list[tuple[str, int, Any, int]] = []
    starts: list[int] = []
    for group in groups:
        if type(group) is not dict:
            return None
        d, t, o, values = group.get("d"), group.get("t"), group.get("o"), group.get("v")
        if type(d) is not int or not 0 <= d < len(devices) or type(values) is not list or not values:
            return None
        if not set(map(type, values)) <= _VALUE_TYPES:
            return None
        points, n = devices[d], len(values)
        ids: Sequence[str]
        if type(o) is int:
            if not 0 <= o <= len(points) - n:
                return None
            ids = points[o:o + n]
        elif type(o) is list and len(o) == n and set(map(type, o)) == {int} and min(o) >= 0 and max(o) < len(points):
            ids = [points[x] for x in o]
        else:
            return None
        times: Iterable[int]
        if type(t) is int:
            if not TS_MIN <= t <= TS_MAX:
                return None
            times = repeat(t)
        elif type(t) is list and len(t) == n and set(map(type, t)) == {int} and min(t) >= TS_MIN and max(t) <= TS_MAX:
            times = t
        else:
            return None
        starts.append(len(out))
        out.extend(zip(ids, times, values, repeat(GOOD)))
    flags = message.get("q", [])
    if type(flags) is not list:
        return None
    starts.append(len(out))
    seen: set[int] = set()
    for flag in flags:
        if type(flag) is not list or not 3 <= len(flag) <= 4:
            return None
        g, p, code = flag[0], flag[1], flag[2]
        reason = flag[3] if len(flag) == 4 else None
        if type(g) is not int or not 0 <= g < len(groups) or type(p) is not int or type(code) is not int:
            return None
        k = starts[g] + p
        if p < 0 or k >= starts[g + 1] or code not in (1, 2) or k in seen:
            return None
        if reason is not None and (type(reason) is not str or reason not in _REASON_TEXT):
            return None
        seen.add(k)
        point, ts, value, _ = out[k]
        out[k] = (point, ts, value, code)
    return out

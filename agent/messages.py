"""Wire encoding of the uplink contract (docs/protocol.md): data and alarm bodies, status and health, and
reading a stored body back.

A stored message keeps its body without `v`, `seq` and `hist`; `frame` adds them when it is published, so one
stored body serves both a live send and a backlog replay. The pipeline writes bodies, the store reads them
back (history, archive recovery) and the uplink frames them: this module (with agent.compact for version 2)
is the only one that knows the text. A body tells its own version: a compact one begins with `"map":`.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import orjson

from agent.compact import PREFIX, TS_MAX, TS_MIN, CompactEncoder, MapLookup, read_compact
from agent.config.points import PointInfo, PointTable
from agent.core import GOOD, QUALITY_CODES, QUALITY_NAMES, REASONS, AlarmEvent, ReadingBatch
from agent.trust.canonical import MAX_SAFE_INTEGER

ENCODINGS = ("json", "compact")
# a reading's members are written in RFC 8785 order (point, quality, reason, ts, value), so the seal can hash the
# readings as they are (agent.seal); JSON readers do not care about the order
_QUALITY_MID = tuple(f'"{name}","ts":' for name in QUALITY_NAMES)
# a reading that is not good and says why: its reason follows its quality
_REASON_MID: dict[tuple[int, str | None], str] = {(code, reason): f'"{name}","reason":"{reason}","ts":'
                for code, name in enumerate(QUALITY_NAMES) if code != GOOD for reason in REASONS}


class SealReady(bytes):
    """A stored `data` body (version 1) whose members and numbers are already as RFC 8785 writes them: once `chain`
    goes after the agent's member (which ends at `agent_end`) and `seq` and `v` at the end, it is the message's
    entry bytes, and the seal hashes it without reading it back (agent.seal). Only this module makes one."""

    agent_end: int


def identity_fields(agent: str, enterprise: str) -> str:
    """The `"agent":..,"enterprise":..,` part every data and alarm body starts with."""
    return f'"agent":{orjson.dumps(agent).decode()},"enterprise":{orjson.dumps(enterprise).decode()},'


def _value_json(info: PointInfo, value: Any) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    return str(info.json_float % value)


def data_body(identity: str, points: list[PointInfo], batches: list[ReadingBatch]) -> tuple[bytes, int]:
    """The stored body of one `data` message and the number of readings in it: a SealReady unless a value is
    written otherwise than RFC 8785 writes it (a float printed with an exponent or as -0, an integer beyond
    ±(2^53-1)): then the seal reads it back."""
    parts: list[str] = []
    append = parts.append
    ready = True
    for batch in batches:
        stamps = [str(t) for t in batch.stamps] if batch.stamps is not None else None
        ts = str(batch.ts)
        reasons = batch.reasons
        for n, (index, value, quality) in enumerate(zip(batch.indices, batch.values, batch.qualities, strict=True)):
            info = points[index]
            if stamps is not None:
                ts = stamps[n]
            if value is None:
                text = "null"
            elif value is True:
                text = "true"
            elif value is False:
                text = "false"
            elif type(value) is float:
                text = info.json_float % value
                if "e" in text or text == "-0":  # RFC 8785 writes these otherwise (1.5e+07: 15000000; -0: 0)
                    ready = False
            else:
                text = _value_json(info, value)
                ready = ready and type(value) is int and -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER
            mid = _QUALITY_MID[quality]
            if reasons is not None and quality:
                mid = _REASON_MID.get((quality, reasons[n]), mid)
            append(f"{info.json_head or PointTable.json_head(info)}{mid}{ts},\"value\":{text}}}")
    body = (identity + '"readings":[' + ",".join(parts) + "]}").encode()
    agent_end = _agent_end(identity)
    if not ready or not parts or agent_end < 0:
        return body, len(parts)
    sealable = SealReady(body)
    sealable.agent_end = agent_end
    return sealable, len(parts)


_IDENTITY = re.compile(r'"agent":"[^"\\]*"(?=,"enterprise":"[^"\\]*",\Z)')


@functools.lru_cache(maxsize=16)
def _agent_end(identity: str) -> int:
    """Where the agent's member of an identity_fields text ends; -1 for a text of another form."""
    match = _IDENTITY.match(identity)
    return match.end() if match else -1


class DataEncoder:
    """Stored bodies of `data` messages in the configured encoding: `json` (version 1, readings by point id) or
    `compact` (version 2, agent.compact: positions in a point map). Build it once the point table is complete
    (derived points added): the map numbers the points it was built with."""

    def __init__(self, identity: str, table: PointTable, encoding: str = "json") -> None:
        if encoding not in ENCODINGS:
            raise ValueError(f"unknown data encoding {encoding!r}: one of {', '.join(ENCODINGS)}")
        self.encoding = encoding
        self._identity = identity
        self._points = table.points
        self._compact = CompactEncoder(identity, table) if encoding == "compact" else None

    @property
    def map_id(self) -> str | None:
        """The id of the point map compact bodies refer to; None with `json`."""
        return self._compact.map.id if self._compact is not None else None

    def map_message(self) -> bytes:
        """The point map as published on `map/{id}` (empty with `json`, which needs none)."""
        return self._compact.map.message(self._identity) if self._compact is not None else b""

    def body(self, batches: list[ReadingBatch]) -> tuple[bytes, int]:
        """The stored body of one `data` message and the number of readings in it."""
        if self._compact is not None:
            return self._compact.body(batches)
        return data_body(self._identity, self._points, batches)


def alarm_body(identity: str, event: AlarmEvent) -> bytes:
    fields: dict[str, Any] = {
        "id": event.id,
        "point": event.point,
        "type": event.type,
        "level": event.level,
        "state": event.state,
        "value": event.value,
        "limit": event.limit,
        "unit": event.unit,
        "ts": event.ts,
    }
    if event.zone is not None:
        fields["zone"] = event.zone
        fields["color"] = event.color
    if event.message:
        fields["message"] = event.message
    return identity.encode() + orjson.dumps(fields)[1:]


def report_body(identity: str, report: dict[str, Any]) -> bytes:
    """The stored body of a daily `quality` report."""
    return identity.encode() + orjson.dumps(report)[1:]


def frame(seq: int, hist: bool, body: bytes) -> bytes:
    """The published payload: the versioned header (version 2 for a compact body), then the stored body."""
    version = 2 if body.startswith(PREFIX) else 1
    return b'{"v":%d,"seq":%d,"hist":%s,%s' % (version, seq, b"true" if hist else b"false", body)


def encode(message: dict[str, Any]) -> bytes:
    return orjson.dumps({"v": 1, **message})


def read_body(body: bytes) -> dict[str, Any]:
    """A stored body as the message it holds (without `v`, `seq`, `hist`).

    Any bytes at all: the answer is a dict, or ValueError (and no other error) when the body is damaged.
    """
    message = orjson.loads(b"{" + body)  # orjson.JSONDecodeError is a ValueError
    if not isinstance(message, dict):
        raise ValueError("a stored body is not a JSON object")
    return message


_VALUE_TYPES = (bool, int, float)
_REASONS = frozenset(REASONS)


def read_readings(body: bytes, maps: MapLookup | None = None) -> list[tuple[str, int, Any, int]] | None:
    """The readings of a stored `data` body as (point, ts, value, quality code); None when it is damaged.

    Never raises, on any bytes (unless `maps` does). A version 1 body is damaged when it is not a JSON object
    with a `readings` list, or when any one of its readings is not what `data_body` writes: an object whose
    `point` is a string, `ts` an integer (not a bool) from year 1 to 9999 in ms, `value` null, a bool or a number
    (not a string, list or object), `quality` one of the quality names, and `reason`, if there, one of the reason
    codes on a reading that is not good. One such reading makes the whole body damaged, not just that reading:
    this agent did not write it as it is, so none of it is trusted, and the callers report it once. A compact
    body (version 2) is read with its point map, which `maps` looks up by id (the store's `point_map`);
    without it, or with a map it does not know, the body counts as damaged (agent.compact.read_compact).
    """
    try:
        message = read_body(body)
    except ValueError:
        return None
    if body.startswith(PREFIX):
        return read_compact(message, maps)
    readings = message.get("readings")
    if not isinstance(readings, list):
        return None
    out: list[tuple[str, int, Any, int]] = []
    append = out.append
    for r in readings:
        if not isinstance(r, dict) or "value" not in r:
            return None
        point, ts, value, quality = r.get("point"), r.get("ts"), r["value"], r.get("quality")
        if type(point) is not str or type(ts) is not int or not TS_MIN <= ts <= TS_MAX:
            return None
        if value is not None and type(value) not in _VALUE_TYPES:
            return None
        code = QUALITY_CODES.get(quality) if type(quality) is str else None
        if code is None:
            return None
        if "reason" in r and (code == GOOD or type(r["reason"]) is not str or r["reason"] not in _REASONS):
            return None
        append((point, ts, value, code))
    return out

"""Wire encoding of the uplink contract (docs/protocol.md): data and alarm bodies, status and health, and
reading a stored body back.

A stored message keeps its body without `v`, `seq` and `hist`; `frame` adds them when it is published, so one
stored body serves both a live send and a backlog replay. The pipeline writes bodies, the store reads them
back (history, archive recovery) and the uplink frames them: this module is the only one that knows the text.
"""

from __future__ import annotations

from typing import Any

import orjson

from agent.config.points import PointInfo
from agent.core import QUALITY_CODES, QUALITY_NAMES, AlarmEvent, ReadingBatch

_QUALITY_TAIL = tuple(f',"quality":"{name}"}}' for name in QUALITY_NAMES)


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
    """The stored body of one `data` message and the number of readings in it."""
    parts: list[str] = []
    append = parts.append
    for batch in batches:
        stamps = [str(t) for t in batch.stamps] if batch.stamps is not None else None
        ts = str(batch.ts)
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
            else:
                text = _value_json(info, value)
            append(f"{info.json_head}{ts},\"value\":{text}{_QUALITY_TAIL[quality]}")
    body = identity + '"readings":[' + ",".join(parts) + "]}"
    return body.encode(), len(parts)


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


def frame(seq: int, hist: bool, body: bytes) -> bytes:
    """The published payload: the versioned header, then the stored body."""
    return b'{"v":1,"seq":%d,"hist":%s,%s' % (seq, b"true" if hist else b"false", body)


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


# a reading's time must be one a calendar can name (0001..9999): the archive's chunks and the history command
# both rely on it, and a tampered body must not smuggle in a time that overflows them
_TS_MIN = -62_135_596_800_000
_TS_MAX = 253_402_300_799_999
_VALUE_TYPES = (bool, int, float)


def read_readings(body: bytes) -> list[tuple[str, int, Any, int]] | None:
    """The readings of a stored `data` body as (point, ts, value, quality code); None when it is damaged.

    Never raises, on any bytes. A body is damaged when it is not a JSON object with a `readings` list, or when
    any one of its readings is not what `data_body` writes: an object whose `point` is a string, `ts` an integer
    (not a bool) from year 1 to 9999 in ms, `value` null, a bool or a number (not a string, list or object), and
    `quality` one of the quality names. One such reading makes the whole body damaged, not just that reading:
    this agent did not write it as it is, so none of it is trusted, and the callers report it once.
    """
    try:
        readings = read_body(body)["readings"]
    except (ValueError, KeyError):
        return None
    if not isinstance(readings, list):
        return None
    out: list[tuple[str, int, Any, int]] = []
    append = out.append
    for r in readings:
        if not isinstance(r, dict) or "value" not in r:
            return None
        point, ts, value, quality = r.get("point"), r.get("ts"), r["value"], r.get("quality")
        if type(point) is not str or type(ts) is not int or not _TS_MIN <= ts <= _TS_MAX:
            return None
        if value is not None and type(value) not in _VALUE_TYPES:
            return None
        code = QUALITY_CODES.get(quality) if type(quality) is str else None
        if code is None:
            return None
        append((point, ts, value, code))
    return out

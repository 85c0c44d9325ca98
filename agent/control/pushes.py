"""Configuration pushes from the platform (topic `config/set`): reading one and checking everything that can be
checked without the running agent's state, and the `config/result` messages that answer it.

A push is `{v, id, revision, not_after?, ts, agent, enterprise, config, sig}`; the signature covers the canonical
bytes of all of it but `sig`. The checks are the commands' own (agent.control.commands: signature, whom it is
for, its age), plus size, retain, shape and expiry. Every refusal names the field at fault and its kind, and
quotes what it got in a bounded form; nothing here raises anything but PushRefused, on any input, and nothing
here changes anything. Validating the configuration itself and comparing revisions is the caller's part.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import orjson

from agent.config.revisions import config_hash
from agent.control.commands import CommandTrust, age_error, quote, target_error, verified
from agent.errors import AgentError
from agent.trust.canonical import MAX_SAFE_INTEGER, SIG, NotCanonical, loads_strict
from agent.trust.signing import SignatureRefused

RefusalKind = Literal["oversized", "malformed", "retained", "unsigned", "unknown_kid", "bad_signature",
                      "not_canonical", "wrong_target", "stale", "expired", "old_revision", "busy", "invalid",
                      "storage"]
REFUSAL_KINDS: tuple[RefusalKind, ...] = ("oversized", "malformed", "retained", "unsigned", "unknown_kid",
                                         "bad_signature", "not_canonical", "wrong_target", "stale", "expired",
                                         "old_revision", "busy", "invalid", "storage")
MEMBERS = frozenset({"v", "id", "revision", "not_after", "ts", "agent", "enterprise", "config", SIG})
MAX_ID = 128

State = Literal["applied", "trial", "rolled_back", "refused"]


class PushRefused(AgentError):
    """A push that is not taken: `kind` (one of REFUSAL_KINDS), one line per error, and what could be read of its
    id and revision for the answer."""

    def __init__(self, kind: RefusalKind, errors: list[str], push_id: str | None = None,
                 revision: int | None = None) -> None:
        self.kind: RefusalKind = kind
        self.errors = errors
        self.id = push_id
        self.revision = revision
        super().__init__("; ".join(errors))


@dataclass(frozen=True)
class Push:
    """A push whose message checks out; its configuration is not validated yet."""

    id: str
    revision: int
    config: dict[str, Any]
    hash: str
    payload: bytes
    kid: str | None = None
    not_after: int | None = None


def result(push_id: str | None, state: State, revision: int | None, errors: list[str] | None = None, *,
           hash: str | None = None) -> dict[str, Any]:
    """A `config/result` message (docs/schemas/config-result.schema.json)."""
    out: dict[str, Any] = {"v": 1, "id": push_id, "ok": state in ("applied", "trial"), "revision": revision,
                           "state": state, "errors": errors or []}
    if hash is not None:
        out["hash"] = hash
    return out


def refusal(exc: PushRefused) -> dict[str, Any]:
    return result(exc.id, "refused", exc.revision, exc.errors)


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER


def read_push(payload: bytes, *, retained: bool, trust: CommandTrust, allow_unsigned: bool, max_bytes: int,
              now_ms: float, max_age_ms: float) -> Push:
    """The push in `payload`, checked; PushRefused otherwise. Costs about 0.1 s for a 10,000-point push (the
    canonical bytes): run it off the event loop."""
    if len(payload) > max_bytes:
        raise PushRefused("oversized", [f"(top level): {len(payload):,} bytes, more than the {max_bytes:,} the agent "
                                        "takes (uplink.max_incoming_bytes)"])
    try:
        raw = orjson.loads(payload)
    except (orjson.JSONDecodeError, RecursionError) as exc:
        raise PushRefused("malformed", [f"(top level): not JSON: {quote(str(exc))}"]) from None
    if not isinstance(raw, dict):
        raise PushRefused("malformed", ["(top level): a push is a JSON object"])
    push_id = raw.get("id") if isinstance(raw.get("id"), str) and 0 < len(raw["id"]) <= MAX_ID else None
    revision = raw["revision"] if _integer(raw.get("revision")) and raw["revision"] >= 0 else None
    if retained:
        raise PushRefused("retained", ["a retained push is refused: a configuration is never published with "
                                       "retain (it would be taken again at every reconnect)"], push_id, revision)
    signed = SIG in raw
    kid: str | None = None
    if signed or not allow_unsigned:
        if not signed:
            raise PushRefused("unsigned", ["sig: missing: a configuration from the platform must be signed "
                                           "(remote_config.allow_unsigned is false)"], push_id, revision)
        try:
            raw, kid = verified(payload, trust.keys)
        except SignatureRefused as exc:
            raise PushRefused(exc.kind, [str(exc)], push_id, revision) from None
    else:
        try:
            raw = loads_strict(payload)  # what is checked below is what is applied: no member given twice
        except NotCanonical as exc:
            raise PushRefused("malformed", [str(exc)], push_id, revision) from None
    errors = _shape_errors(raw)
    if errors:
        raise PushRefused("malformed", errors, push_id, revision)
    assert push_id is not None and revision is not None  # the shape says so
    wrong = target_error(raw.get("agent"), raw.get("enterprise"), raw.get("ts"), trust, signed=signed, noun="push")
    if wrong:
        raise PushRefused("wrong_target", [wrong], push_id, revision)
    if raw.get("ts") is not None:
        stale = age_error(raw["ts"], now_ms, max_age_ms)
        if stale:
            raise PushRefused("stale", [stale], push_id, revision)
    not_after = raw.get("not_after")
    if not_after is not None and not_after < now_ms:
        raise PushRefused("expired", [f"not_after: the push expired {(now_ms - not_after) / 1000:.0f}s ago"],
                          push_id, revision)
    return Push(push_id, revision, raw["config"], config_hash(raw["config"]), payload, kid, not_after)


def _shape_errors(raw: dict[str, Any]) -> list[str]:
    errors = []
    for name in raw:
        if name not in MEMBERS:
            errors.append(f"{quote(name)[1:-1] if isinstance(name, str) else quote(name)}: unknown member (a push "
                          f"has {', '.join(sorted(MEMBERS))})")
    if raw.get("v", 1) != 1 or isinstance(raw.get("v"), bool):
        errors.append(f"v: must be 1, not {quote(raw.get('v'))}")
    if not (isinstance(raw.get("id"), str) and 0 < len(raw["id"]) <= MAX_ID):
        errors.append(f"id: required, a string of 1 to {MAX_ID} characters" + _got(raw, "id"))
    if not (_integer(raw.get("revision")) and raw["revision"] >= 1):
        errors.append("revision: required, an integer from 1 to 2^53-1" + _got(raw, "revision"))
    for name in ("not_after", "ts"):
        if raw.get(name) is not None and not _integer(raw[name]):
            errors.append(f"{name}: must be an integer (ms since the epoch)" + _got(raw, name))
    for name in ("agent", "enterprise"):
        if raw.get(name) is not None and not (isinstance(raw[name], str) and len(raw[name]) <= 64):
            errors.append(f"{name}: must be a string of at most 64 characters" + _got(raw, name))
    if not isinstance(raw.get("config"), dict):
        errors.append("config: required, the configuration document (an object, as the YAML file's)"
                      + _got(raw, "config"))
    return errors


def _got(raw: dict[str, Any], name: str) -> str:
    if name not in raw:
        return ""
    value = raw[name]
    if isinstance(value, dict | list):
        return f", not a JSON {'object' if isinstance(value, dict) else 'array'}"
    return f", not {quote(value)}"

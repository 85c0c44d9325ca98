"""Signed messages: the `sig` member an Ed25519 signature over a message's canonical bytes travels in, making it
and checking it. The agent checks the platform's commands (and later configurations) with `verify`; the platform
(and its simulator) signs with `sign` and checks the agent's messages with `verify_payload`.

`verify` never raises anything but SignatureRefused, whose `kind` says which check failed and whose text names
the field, on any input. Nothing here keeps state or logs.
"""

from __future__ import annotations

import reprlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import orjson

from agent.errors import AgentError
from agent.trust.canonical import SIG, NotCanonical, canonical_bytes, loads_strict
from agent.trust.keys import ALG, KID_LENGTH, b64url, b64url_decode, is_key_id, key_id

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SIGNATURE_BYTES = 64
SIG_MEMBERS = ("alg", "kid", "value")

RefusalKind = Literal["unsigned", "malformed", "unknown_kid", "bad_signature", "not_canonical"]
REFUSAL_KINDS: tuple[RefusalKind, ...] = ("unsigned", "malformed", "unknown_kid", "bad_signature", "not_canonical")

_QUOTE = reprlib.Repr()
_QUOTE.maxstring = _QUOTE.maxother = 40
_QUOTE.maxlevel = 1


class SignatureRefused(AgentError):
    """A message whose signature cannot be trusted. `kind` is one of REFUSAL_KINDS:

    - unsigned: no `sig` member;
    - malformed: a `sig` member that is not {"alg": "ed25519", "kid": 16 hex digits, "value": 86 base64url};
    - unknown_kid: signed with a key the verifier does not trust;
    - bad_signature: the signature does not match the message (altered, or signed with another key);
    - not_canonical: the message is outside the signable subset of JSON (agent.trust.canonical).
    """

    def __init__(self, kind: RefusalKind, message: str) -> None:
        self.kind: RefusalKind = kind
        super().__init__(message)


def signature_member(message: Mapping[str, Any], private_key: Ed25519PrivateKey) -> dict[str, str]:
    """The `sig` member for `message` (any `sig` it has is ignored); NotCanonical if it cannot be signed."""
    value = private_key.sign(canonical_bytes(message))
    return {"alg": ALG, "kid": key_id(private_key.public_key()), "value": b64url(value)}


def sign(message: Mapping[str, Any], private_key: Ed25519PrivateKey) -> dict[str, Any]:
    """A copy of `message` carrying its `sig` member (replacing any it had)."""
    return {**{k: v for k, v in message.items() if k != SIG}, SIG: signature_member(message, private_key)}


def sign_payload(message: Mapping[str, Any], private_key: Ed25519PrivateKey) -> bytes:
    """`message` signed and encoded as it is published (UTF-8 JSON; any key order will verify)."""
    return orjson.dumps(sign(message, private_key))


def verify(message: object, keys: Mapping[str, Ed25519PublicKey]) -> str:
    """The key id `message` was signed with, if its `sig` verifies against one of `keys` (by kid); else
    SignatureRefused. `message` is a parsed JSON value: read it with `loads_strict` (or use `verify_payload`),
    so a duplicated member name cannot show the signature one message and the reader another."""
    if not isinstance(message, Mapping):
        raise SignatureRefused("not_canonical", "a signed message is a JSON object")
    if SIG not in message:
        raise SignatureRefused("unsigned", "sig: missing: the message is not signed")
    sig = message[SIG]
    kid, value = read_sig(sig)
    key = keys.get(kid)
    if key is None:
        known = ", ".join(sorted(keys)[:4]) or "none configured"
        raise SignatureRefused("unknown_kid", f"sig.kid: key {kid} is not trusted (trusted: {known})")
    try:
        data = canonical_bytes(message)
    except NotCanonical as exc:
        raise SignatureRefused("not_canonical", f"cannot be signed: {exc}") from None
    from cryptography.exceptions import InvalidSignature  # loaded once a key is used: it costs 8 MB

    try:
        key.verify(signature=value, data=data)
    except InvalidSignature:
        raise SignatureRefused("bad_signature", f"sig.value: the signature does not match the message "
                               f"(key {kid})") from None
    return kid


def verify_payload(payload: bytes, keys: Mapping[str, Ed25519PublicKey]) -> dict[str, Any]:
    """The message in `payload` (UTF-8 JSON) once its signature verifies; SignatureRefused otherwise."""
    try:
        message = loads_strict(payload)
    except NotCanonical as exc:
        raise SignatureRefused("not_canonical", f"cannot be signed: {exc}") from None
    verify(message, keys)
    return message


def read_sig(sig: object) -> tuple[str, bytes]:
    """The key id and the 64 signature bytes of a `sig` member; SignatureRefused ("malformed") naming the field."""
    if not isinstance(sig, Mapping):
        raise SignatureRefused("malformed", "sig: must be an object with alg, kid and value")
    for name in sig:
        if name not in SIG_MEMBERS:
            raise SignatureRefused("malformed", f"sig.{_quote(name)}: unknown member (sig has alg, kid, value)")
    for name in SIG_MEMBERS:
        if name not in sig:
            raise SignatureRefused("malformed", f"sig.{name}: missing")
    if sig["alg"] != ALG or not isinstance(sig["alg"], str):
        raise SignatureRefused("malformed", f"sig.alg: must be {ALG!r}, not {_quote(sig['alg'])}")
    kid = sig["kid"]
    if not is_key_id(kid):
        raise SignatureRefused("malformed", f"sig.kid: must be {KID_LENGTH} lowercase hex digits, not {_quote(kid)}")
    try:
        value = b64url_decode(sig["value"], SIGNATURE_BYTES)
    except ValueError as exc:
        raise SignatureRefused("malformed", f"sig.value: {exc}") from None
    return str(kid), value


def _quote(value: object) -> str:
    """A short, bounded repr of untrusted input."""
    try:
        return _QUOTE.repr(value) if not isinstance(value, str) else _QUOTE.repr(value)[1:-1]
    except Exception:
        return f"<{type(value).__name__}>"

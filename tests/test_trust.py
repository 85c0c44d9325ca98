"""Trust between agent and platform: canonical bytes, Ed25519 signatures and their refusals, key rotation, the
agent's key file and `edge-agent keys`, signed commands in the handler and through a real broker to the agent as
a process, and the signature check fuzzed on any JSON."""

from __future__ import annotations

import json
import os
import re
import stat
import struct
import threading
import time
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped,unused-ignore]
import orjson
import pytest
import yaml
from click.testing import CliRunner
from conftest import ROOT
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from agent.cli.main import main
from agent.config.loader import validate_config_data
from agent.control.commands import CommandHandler, CommandTrust
from agent.errors import ConfigError
from agent.trust.canonical import MAX_DEPTH, NotCanonical, canonical_bytes, format_number, loads_strict
from agent.trust.keys import (
    KEY_FILE,
    KeyFileError,
    TrustedKeys,
    create_key_file,
    generate_private_key,
    key_id,
    load_private_key,
    parse_public_key,
    public_key_text,
)
from agent.trust.signing import SignatureRefused, sign, sign_payload, verify, verify_payload

PROTOCOL = ROOT / "docs" / "protocol.md"
SCHEMAS = ROOT / "docs" / "schemas"


def refusal(message: object, keys: TrustedKeys) -> SignatureRefused:
    with pytest.raises(SignatureRefused) as caught:
        verify(message, keys)
    return caught.value


# -- canonical bytes --------------------------------------------------------------------------------------------


def test_canonical_bytes_order_members_by_utf16_code_units_at_every_level_without_whitespace() -> None:
    message = {"b": 1, "a": {"z": [3, {"y": True, "x": None}], "m": "n"}, "\U0001f600": 2, "\ufb01": 3, "é": 4}
    # U+1F600 is the surrogate pair D83D DE00 in UTF-16: before U+FB01, though after it in code points
    assert canonical_bytes(message) == ('{"a":{"m":"n","z":[3,{"x":null,"y":true}]},"b":1,"é":4,"\U0001f600":2,'
                                        '"\ufb01":3}').encode()


def test_canonical_bytes_leave_out_only_the_top_level_sig() -> None:
    assert canonical_bytes({"sig": {"alg": "x"}, "a": {"sig": 1}}) == b'{"a":{"sig":1}}'
    assert canonical_bytes({"sig": "anything"}) == b"{}"


def test_canonical_strings_are_escaped_as_json_stringify_escapes_them() -> None:
    text = "".join(chr(c) for c in range(0x20)) + '"\\/\x7f\u2028\u2029é中'
    expected = ('"\\u0000\\u0001\\u0002\\u0003\\u0004\\u0005\\u0006\\u0007\\b\\t\\n\\u000b\\f\\r\\u000e\\u000f'
                '\\u0010\\u0011\\u0012\\u0013\\u0014\\u0015\\u0016\\u0017\\u0018\\u0019\\u001a\\u001b\\u001c'
                '\\u001d\\u001e\\u001f\\"\\\\/\x7f\u2028\u2029é中"')
    assert canonical_bytes({"t": text}) == ('{"t":' + expected + "}").encode("utf-8")


# RFC 8785 appendix B: IEEE 754 bit patterns and the text ECMAScript writes for them
RFC8785_NUMBERS = {
    "0000000000000000": "0", "8000000000000000": "0", "0000000000000001": "5e-324", "8000000000000001": "-5e-324",
    "7fefffffffffffff": "1.7976931348623157e+308", "ffefffffffffffff": "-1.7976931348623157e+308",
    "4340000000000000": "9007199254740992", "c340000000000000": "-9007199254740992",
    "4430000000000000": "295147905179352830000", "44b52d02c7e14af5": "9.999999999999997e+22",
    "44b52d02c7e14af6": "1e+23", "44b52d02c7e14af7": "1.0000000000000001e+23",
    "444b1ae4d6e2ef4e": "999999999999999700000", "444b1ae4d6e2ef4f": "999999999999999900000",
    "444b1ae4d6e2ef50": "1e+21", "3eb0c6f7a0b5ed8c": "9.999999999999997e-7", "3eb0c6f7a0b5ed8d": "0.000001",
    "41b3de4355555553": "333333333.3333332", "41b3de4355555554": "333333333.33333325",
    "41b3de4355555555": "333333333.3333333", "41b3de4355555556": "333333333.3333334",
    "41b3de4355555557": "333333333.33333343", "becbf647612f3696": "-0.0000033333333333333333",
    "43143ff3c1cb0959": "1424953923781206.2",
}


@pytest.mark.parametrize(("bits", "text"), RFC8785_NUMBERS.items())
def test_numbers_are_written_as_ecmascript_writes_them(bits: str, text: str) -> None:
    value = struct.unpack(">d", bytes.fromhex(bits))[0]
    assert format_number(value) == text
    assert canonical_bytes({"n": value}) == b'{"n":' + text.encode() + b"}"


def test_a_number_is_the_same_however_it_was_spelled() -> None:
    spellings = [b'{"n": 12}', b'{"n": 12.0}', b'{"n": 1.2e1}', b'{"n": 120E-1}', b'{"n":12.000}']
    assert {canonical_bytes(loads_strict(s)) for s in spellings} == {b'{"n":12}'}
    assert canonical_bytes(loads_strict(b'{"n": -0.0, "m": 1e-7, "k": 0.1}')) == b'{"k":0.1,"m":1e-7,"n":0}'


def nested(depth: int) -> dict[str, Any]:
    message: dict[str, Any] = {}
    inner = message
    for _ in range(depth - 1):
        inner["n"] = {}
        inner = inner["n"]
    return message


@pytest.mark.parametrize(("message", "error"), [
    ({"a": [1, {"b": 2**53}]}, "a[1].b: integer beyond"),
    ({"a": -(2**53)}, "a: integer beyond"),
    ({"a": {"b": float("nan")}}, "a.b: nan is not a JSON number"),
    ({"a": float("-inf")}, "a: -inf is not a JSON number"),
    ({"a": {1: "x"}}, "a: member name 1 is not a string"),
    ({"a": ["ok", "\ud800"]}, "a[1]: text with a lone surrogate"),
    ({"a": {"k\udfff": 1}}, "a.k\\udfff: text with a lone surrogate"),
    ({"a": (1, 2)}, "a: a tuple is not a JSON value"),
    (nested(MAX_DEPTH + 1), f"nested deeper than {MAX_DEPTH} levels"),
    ([1], "(top level): a signed message is a JSON object"),
])
def test_canonical_bytes_refuse_what_two_readers_could_take_differently(message: Any, error: str) -> None:
    with pytest.raises(NotCanonical, match=re.escape(error)):
        canonical_bytes(message)


def test_the_deepest_allowed_nesting_and_the_largest_exact_integers_pass() -> None:
    assert canonical_bytes(nested(MAX_DEPTH)).count(b"{") == MAX_DEPTH
    assert canonical_bytes({"a": 2**53 - 1, "b": -(2**53 - 1)}) == b'{"a":9007199254740991,"b":-9007199254740991}'


@pytest.mark.parametrize(("payload", "error"), [
    (b'{"id": "a", "cmd": "status", "id": "b"}', "id: member name given twice"),
    (b'{"a": {"x": 1, "x": 2}}', "x: member name given twice"),
    (b'{"a": NaN}', "NaN is not a JSON number"),
    (b'{"a": -Infinity}', "-Infinity is not a JSON number"),
    (b'{"a": "\xff"}', "not UTF-8"),
    (b'{"a": ', "not JSON"),
    (b'["a"]', "a signed message is a JSON object"),
    (b'{"a": 1' + b"0" * 5000 + b"}", "not JSON"),
])
def test_strict_reading_refuses_duplicates_and_non_numbers(payload: bytes, error: str) -> None:
    with pytest.raises(NotCanonical, match=re.escape(error)):
        loads_strict(payload)


# -- signing and verifying --------------------------------------------------------------------------------------


def test_a_signed_message_verifies_after_any_reserialisation() -> None:
    key = generate_private_key()
    keys = TrustedKeys([key.public_key()])
    message = {"v": 1, "seq": 7, "readings": [{"point": "GT-201", "value": 27.5, "ts": 1764331200000}], "hist": False}
    signed = sign(message, key)
    assert signed["sig"]["kid"] == key_id(key.public_key()) and len(signed["sig"]["value"]) == 86
    reordered = json.dumps(dict(reversed(list(signed.items()))), indent=3).replace("27.5", "2.75e1").encode()
    assert verify_payload(reordered, keys) == {**message, "sig": signed["sig"]}
    assert verify_payload(sign_payload(message, key), keys)["seq"] == 7


def test_each_refusal_has_its_kind_and_a_short_text_naming_the_field() -> None:
    key, stranger = generate_private_key(), generate_private_key()
    keys = TrustedKeys([key.public_key()])
    good = sign({"id": "c1", "cmd": "status"}, key)
    cases: list[tuple[object, str, str]] = [
        ({"id": "c1", "cmd": "status"}, "unsigned", "sig: missing"),
        ({**good, "sig": "abc"}, "malformed", "sig: must be an object"),
        ({**good, "sig": {**good["sig"], "alg": "rsa"}}, "malformed", "sig.alg: must be 'ed25519', not rsa"),
        ({**good, "sig": {**good["sig"], "kid": "ABCDEF0123456789"}}, "malformed", "sig.kid: must be 16 lowercase"),
        ({**good, "sig": {**good["sig"], "value": good["sig"]["value"] + "="}}, "malformed",
         "sig.value: not base64url"),
        ({**good, "sig": {**good["sig"], "value": good["sig"]["value"][:-1] + "B"}}, "malformed",
         "sig.value: not base64url"),  # the same bytes spelt with unused bits set
        ({**good, "sig": {"alg": "ed25519", "kid": good["sig"]["kid"]}}, "malformed", "sig.value: missing"),
        ({**good, "sig": {**good["sig"], "extra": 1}}, "malformed", "sig.extra: unknown member"),
        (sign({"id": "c1", "cmd": "status"}, stranger), "unknown_kid",
         f"sig.kid: key {key_id(stranger.public_key())} is not trusted (trusted: {key_id(key.public_key())})"),
        ({**good, "cmd": "reset"}, "bad_signature", "sig.value: the signature does not match the message"),
        ({**good, "n": float("nan")}, "not_canonical", "cannot be signed: n: nan is not a JSON number"),
        ([good], "not_canonical", "a signed message is a JSON object"),
    ]
    for message, kind, text in cases:
        refused = refusal(message, keys)
        assert (refused.kind, str(refused)[:len(text)]) == (kind, text), message
        assert len(str(refused)) < 160
    assert verify(good, keys) == key_id(key.public_key())


def test_a_signature_made_for_another_key_of_the_same_id_does_not_verify() -> None:
    key, other = generate_private_key(), generate_private_key()
    forged = sign({"id": "c1"}, other)
    forged["sig"]["kid"] = key_id(key.public_key())
    assert refusal(forged, TrustedKeys([key.public_key()])).kind == "bad_signature"


def test_rotation_trusts_both_keys_while_listed_and_the_kid_picks_the_key() -> None:
    old, new = generate_private_key(), generate_private_key()
    both = TrustedKeys.from_texts([public_key_text(old.public_key()), public_key_text(new.public_key())])
    message = {"id": "r1", "cmd": "status"}
    assert verify(sign(message, old), both) == key_id(old.public_key())
    assert verify(sign(message, new), both) == key_id(new.public_key())
    only_new = TrustedKeys([new.public_key()])
    assert refusal(sign(message, old), only_new).kind == "unknown_kid"
    assert verify(sign(message, new), only_new) == key_id(new.public_key())


def test_public_keys_are_read_only_in_their_one_spelling() -> None:
    key = generate_private_key().public_key()
    text = public_key_text(key)
    assert len(text) == 43 and parse_public_key(text) == key
    for bad in (text + "=", text[:-1], text[:-1] + "/", " " + text, text.replace(text[-1], "B")):
        if bad != text:
            with pytest.raises(ValueError, match="not base64url"):
                parse_public_key(bad)
    with pytest.raises(ValueError, match=r"\[1\]: not base64url"):
        TrustedKeys.from_texts([text, "short"])


# -- the protocol page and the schema ---------------------------------------------------------------------------


def signatures_section() -> str:
    text = PROTOCOL.read_text(encoding="utf-8")
    return text[text.index("## Signatures"):text.index("\n## ", text.index("## Signatures") + 5)]


def test_the_protocol_pages_test_vector_and_canonical_example_hold() -> None:
    section = signatures_section()
    seed = re.search(r"private key \(seed\)\s*`([0-9a-f]{64})`", section)
    assert seed is not None
    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(seed.group(1)))
    public = re.search(r"public key\s*`([A-Za-z0-9_-]{43})`, key id `([0-9a-f]{16})`", section)
    assert public is not None and public.groups() == (public_key_text(key.public_key()), key_id(key.public_key()))
    example = json.loads(re.search(r"<!-- example: cmd -->\n```json\n(.*?)\n```", section, re.DOTALL).group(1))  # type: ignore[union-attr]
    texts = re.findall(r"<!-- canonical (input|bytes) -->\n```text\n(.*?)\n```", section, re.DOTALL)
    assert [kind for kind, _ in texts] == ["input", "bytes", "bytes"]
    assert canonical_bytes(loads_strict(texts[0][1].encode())) == texts[1][1].encode()
    assert canonical_bytes(example) == texts[2][1].encode()
    assert sign(example, key) == example, "Ed25519 is deterministic: the page shows the one signature"
    keys = TrustedKeys.from_texts(re.findall(r"keys: \[([A-Za-z0-9_-]{43})\]", section))
    assert verify(example, keys) == public.group(2)


def test_the_sig_schema_is_bundled_in_the_cmd_schema_and_checks_signed_commands() -> None:
    sig_schema = json.loads((SCHEMAS / "sig.schema.json").read_text(encoding="utf-8"))
    cmd_schema = json.loads((SCHEMAS / "cmd.schema.json").read_text(encoding="utf-8"))
    assert cmd_schema["$defs"]["sig"] == {k: v for k, v in sig_schema.items() if k != "$schema"}
    assert cmd_schema["properties"]["sig"]["$ref"] == sig_schema["$id"]
    validator = jsonschema.Draft202012Validator(cmd_schema)
    key = generate_private_key()
    signed = sign({"v": 1, "id": "s", "cmd": "status", "ts": 1, "agent": "a", "enterprise": "e"}, key)
    assert list(validator.iter_errors(signed)) == []
    assert list(jsonschema.Draft202012Validator(sig_schema).iter_errors(signed["sig"])) == []
    assert list(validator.iter_errors({**signed, "sig": {**signed["sig"], "kid": "xyz"}}))
    assert list(validator.iter_errors({k: v for k, v in signed.items() if k != "ts"})), "signed: ts required"


# -- the key file and `edge-agent keys` -------------------------------------------------------------------------


def test_the_key_file_is_0600_whatever_the_umask_and_never_replaced_without_force(tmp_path: Path) -> None:
    old_umask = os.umask(0)
    try:
        path, key = create_key_file(tmp_path / "state")
    finally:
        os.umask(old_umask)
    assert path == tmp_path / "state" / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert key_id(load_private_key(path).public_key()) == key_id(key.public_key())
    before = path.read_bytes()
    with pytest.raises(KeyFileError, match=re.escape(f"{path} exists: kept (--force replaces it")):
        create_key_file(tmp_path / "state")
    assert path.read_bytes() == before
    _, replaced = create_key_file(tmp_path / "state", force=True)
    assert path.read_bytes() != before and key_id(load_private_key(path).public_key()) == key_id(
        replaced.public_key())
    assert sorted(p.name for p in path.parent.iterdir()) == [KEY_FILE], "no temporary file is left behind"


def test_key_creations_racing_leave_exactly_one_whole_key(tmp_path: Path) -> None:
    start = threading.Barrier(8)
    made: list[Ed25519PrivateKey] = []
    refused: list[str] = []

    def create() -> None:
        start.wait()
        try:
            made.append(create_key_file(tmp_path)[1])
        except KeyFileError as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=create) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(made) == 1 and len(refused) == 7
    assert key_id(load_private_key(tmp_path / KEY_FILE).public_key()) == key_id(made[0].public_key())
    assert sorted(p.name for p in tmp_path.iterdir()) == [KEY_FILE]


def test_a_dangling_link_at_the_key_path_is_not_followed(tmp_path: Path) -> None:
    (tmp_path / KEY_FILE).symlink_to(tmp_path / "elsewhere.pem")
    with pytest.raises(KeyFileError, match="exists"):
        create_key_file(tmp_path)
    assert not (tmp_path / "elsewhere.pem").exists()


def test_a_key_file_others_can_read_or_of_another_kind_is_refused(tmp_path: Path) -> None:
    path, _ = create_key_file(tmp_path)
    path.chmod(0o640)
    with pytest.raises(KeyFileError, match="mode 0640 lets others read the private key: chmod 600"):
        load_private_key(path)
    rsa_like = tmp_path / "ec.pem"
    rsa_like.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    rsa_like.chmod(0o600)
    with pytest.raises(KeyFileError, match="not Ed25519"):
        load_private_key(rsa_like)
    rsa_like.write_bytes(b"not a key")
    with pytest.raises(KeyFileError, match="not an unencrypted PEM private key"):
        load_private_key(rsa_like)
    with pytest.raises(KeyFileError, match="create it with `edge-agent keys init`"):
        load_private_key(tmp_path / "missing.pem")


def test_keys_init_and_show_through_the_cli(tmp_path: Path) -> None:
    runner = CliRunner()
    folder = tmp_path / "state"
    created = runner.invoke(main, ["keys", "init", "--dir", str(folder)])
    assert created.exit_code == 0, created.output
    assert stat.S_IMODE((folder / KEY_FILE).stat().st_mode) == 0o600
    shown = runner.invoke(main, ["keys", "show", "--dir", str(folder), "--json"])
    assert shown.exit_code == 0
    info = json.loads(shown.stdout)
    assert set(info) == {"kid", "public_key", "alg"} and info["alg"] == "ed25519"
    assert key_id(parse_public_key(info["public_key"])) == info["kid"]
    assert info["kid"] in created.stdout and info["public_key"] in created.stdout
    assert f"public key {info['public_key']}" in runner.invoke(main, ["keys", "show", "--dir", str(folder)]).stdout

    again = runner.invoke(main, ["keys", "init", "--dir", str(folder)])
    assert again.exit_code == 2
    assert again.stderr.strip() == (f"edge-agent: {folder / KEY_FILE} exists: kept (--force replaces it, and the "
                                    "platform must then be given the new public key)")
    forced = runner.invoke(main, ["keys", "init", "--dir", str(folder), "--force"])
    assert forced.exit_code == 0 and info["kid"] not in forced.stdout

    missing = runner.invoke(main, ["keys", "show", "--dir", str(tmp_path / "none")])
    assert missing.exit_code == 2 and len(missing.stderr.strip().splitlines()) == 1


def test_keys_default_to_the_folder_of_the_configured_store(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump({"agent": {"id": "a1", "enterprise": "e1"},
                                      "store": {"path": str(tmp_path / "data" / "store.db")}}))
    runner = CliRunner()
    assert runner.invoke(main, ["keys", "init", "--config", str(config)]).exit_code == 0
    assert (tmp_path / "data" / KEY_FILE).exists()
    assert runner.invoke(main, ["keys", "show", "--config", str(config)]).exit_code == 0
    broken = runner.invoke(main, ["keys", "show", "--config", str(tmp_path / "absent.yaml")])
    assert broken.exit_code == 2 and "--dir" in broken.stderr


# -- configuration ----------------------------------------------------------------------------------------------


def config_with(remote: dict[str, Any]) -> Any:
    return validate_config_data({"agent": {"id": "a1", "enterprise": "e1"}, "remote_config": remote},
                                source="t", base_dir=None)


def test_remote_config_validates_each_key_with_its_path() -> None:
    good = public_key_text(generate_private_key().public_key())
    assert config_with({}).remote_config.keys == [] and not config_with({}).remote_config.require_signed_cmd
    cfg = config_with({"keys": [good], "require_signed_cmd": True, "confirm_within": "5m"}).remote_config
    assert cfg.keys == [good] and cfg.confirm_within == 300 and cfg.keep_revisions == 10 and not cfg.allow_unsigned
    for remote, error in [
        ({"keys": [good, "abc"]}, "remote_config.keys[1]: not base64url (unpadded) of 32 bytes"),
        ({"keys": [good, good]}, "remote_config.keys: keys[1] is the same key as keys[0]"),
        ({"keys": [good, 5]}, "remote_config.keys[1]:"),
        ({"require_signed_cmd": True}, "require_signed_cmd needs at least one key"),
    ]:
        with pytest.raises(ConfigError) as caught:
            config_with(remote)
        assert any(line.startswith(error) or error in line for line in caught.value.errors), caught.value.errors


# -- signed commands in the handler -----------------------------------------------------------------------------

AGENT, ENTERPRISE = "ipc-01", "150625000123"


def handler(keys: list[Ed25519PrivateKey], require: bool = False) -> tuple[CommandHandler, list[str]]:
    done: list[str] = []

    def state(value: str) -> dict[str, Any]:
        done.append(f"state {value}")
        return {"production_state": value}

    def reset(alarm: str) -> dict[str, Any]:
        done.append(f"reset {alarm}")
        return {"alarm": alarm}

    trust = CommandTrust(TrustedKeys([k.public_key() for k in keys]), require, AGENT, ENTERPRISE)
    return CommandHandler(reset, state, lambda: {"ok": 1}, trust=trust), done


def signed(key: Ed25519PrivateKey, **body: Any) -> bytes:
    return sign_payload({"v": 1, "ts": int(time.time() * 1000), "agent": AGENT, "enterprise": ENTERPRISE, **body},
                        key)


def test_a_signed_command_runs_and_a_tampered_one_changes_nothing() -> None:
    key = generate_private_key()
    h, done = handler([key])
    assert h.handle(signed(key, id="h1", cmd="set_production_state", state="halted"))["ok"]
    tampered = orjson.loads(signed(key, id="h2", cmd="set_production_state", state="halted"))
    tampered["state"] = "normal"
    answer = h.handle(orjson.dumps(tampered))
    assert not answer["ok"] and answer["id"] == "h2" and answer["error"].startswith("sig.value: the signature")
    assert done == ["state halted"]
    assert h.signature_refused["bad_signature"] == 1 and h.refused == 1


def test_require_signed_refuses_unsigned_platform_commands_but_not_local_ones() -> None:
    key = generate_private_key()
    h, done = handler([key], require=True)
    unsigned = h.handle(orjson.dumps({"id": "u1", "cmd": "reset", "alarm": "GT-1/high"}))
    assert unsigned == {"v": 1, "id": "u1", "cmd": "reset", "ok": False,
                        "error": "sig: missing: the platform's commands must be signed "
                                 "(remote_config.require_signed_cmd)"}
    local = h.handle(orjson.dumps({"id": "u1", "cmd": "reset", "alarm": "GT-1/high"}), "local")
    assert local["ok"] and done == ["reset GT-1/high"]
    assert h.signature_refused["unsigned"] == 1


def test_without_require_signed_an_unsigned_command_runs_and_a_bad_signature_is_still_refused() -> None:
    key, stranger = generate_private_key(), generate_private_key()
    h, done = handler([key])
    assert h.handle(orjson.dumps({"id": "p1", "cmd": "set_production_state", "state": "halted"}))["ok"]
    strange = h.handle(signed(stranger, id="p2", cmd="set_production_state", state="normal"))
    assert not strange["ok"] and "is not trusted" in strange["error"]
    local = h.handle(signed(stranger, id="l1", cmd="reset", alarm="GT-1/high"), "local")
    assert not local["ok"], "a signature that is present is checked whoever sends it"
    assert done == ["state halted"] and h.signature_refused["unknown_kid"] == 2


def test_a_signed_command_must_name_this_agent_and_carry_ts() -> None:
    key = generate_private_key()
    h, _ = handler([key])
    other = h.handle(sign_payload({"v": 1, "id": "o1", "cmd": "status", "ts": int(time.time() * 1000),
                                   "agent": "ipc-02", "enterprise": ENTERPRISE}, key))
    assert other["error"] == "agent: the command is for 'ipc-02', this is 'ipc-01'"
    anyone = h.handle(sign_payload({"v": 1, "id": "o2", "cmd": "status", "ts": int(time.time() * 1000)}, key))
    assert anyone["error"] == "agent: required in a signed command (whom it is for)"
    undated = h.handle(sign_payload({"v": 1, "id": "o3", "cmd": "status", "agent": AGENT,
                                     "enterprise": ENTERPRISE}, key))
    assert undated["error"].startswith("ts: required in a signed command")
    unsigned_elsewhere = h.handle(orjson.dumps({"id": "o4", "cmd": "status", "enterprise": "x"}))
    assert unsigned_elsewhere["error"] == "enterprise: the command is for 'x', this is '150625000123'"
    assert h.handle(signed(key, id="o5", cmd="status"))["ok"]


def test_a_duplicated_member_cannot_show_the_signature_one_command_and_run_another() -> None:
    key = generate_private_key()
    h, done = handler([key])
    good = signed(key, id="d1", cmd="set_production_state", state="halted")
    # a reader that keeps the last of two equal names would run "normal"; the signature covers "halted"
    doubled = good[:-1] + b',"state":"normal"}'
    answer = h.handle(doubled)
    assert not answer["ok"] and answer["error"] == "cannot be signed: state: member name given twice in one object"
    assert done == [] and h.signature_refused["not_canonical"] == 1


def test_a_replayed_signed_id_gets_the_first_result_even_resigned_by_a_new_key() -> None:
    old, new = generate_private_key(), generate_private_key()
    h, done = handler([old, new])
    body = {"v": 1, "id": "r1", "cmd": "set_production_state", "state": "halted", "ts": int(time.time() * 1000),
            "agent": AGENT, "enterprise": ENTERPRISE}
    first = h.handle(sign_payload(body, old))
    assert first["ok"]
    assert h.handle(sign_payload(body, old)) == first
    assert h.handle(sign_payload(body, new)) == first, "the same command under a rotated key is the same command"
    assert done == ["state halted"]


def test_a_signed_command_with_a_bad_type_is_refused_for_its_field_after_its_signature() -> None:
    key = generate_private_key()
    h, done = handler([key])
    answer = h.handle(signed(key, id="t1", cmd="set_production_state", state=["halted"]))
    assert not answer["ok"] and answer["error"].startswith("state: must be")
    assert done == [] and sum(h.signature_refused.values()) == 0


# -- fuzzing: any JSON, never anything but the refusal ----------------------------------------------------------

FUZZ_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
FUZZ_KEYS = TrustedKeys([FUZZ_KEY.public_key()])
_REAL_SIG = sign({"id": "x"}, FUZZ_KEY)["sig"]

texts = st.text(max_size=6) | st.sampled_from(["\ud800", "a\udfff", "sig", "alg", "kid", "value", "ed25519"])
scalars = (st.none() | st.booleans() | st.integers() | st.floats() | texts
           | st.integers(min_value=-(2**70), max_value=2**70))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(texts, inner, max_size=4), max_leaves=24)
sig_members = st.fixed_dictionaries({}, optional={
    "alg": st.just("ed25519") | json_values,
    "kid": st.just(_REAL_SIG["kid"]) | st.from_regex(r"\A[0-9a-f]{16}\Z") | json_values,
    "value": st.just(_REAL_SIG["value"]) | st.from_regex(r"\A[A-Za-z0-9_-]{86}\Z") | json_values,
    "extra": json_values,
})
messages = st.dictionaries(texts, json_values, max_size=5).flatmap(
    lambda body: st.one_of(st.just(body), (sig_members | json_values).map(lambda sig: {**body, "sig": sig})))


@given(messages | json_values)
def test_verify_never_raises_anything_but_a_refusal_on_any_json(message: Any) -> None:
    try:
        verify(message, FUZZ_KEYS)
    except SignatureRefused as exc:
        assert exc.kind in ("unsigned", "malformed", "unknown_kid", "bad_signature", "not_canonical")
        assert 0 < len(str(exc)) < 200


@given(st.binary(max_size=300) | messages.map(lambda m: json.dumps(m).encode("utf-8", "surrogatepass")))
def test_verify_payload_never_raises_anything_but_a_refusal_on_any_bytes(payload: bytes) -> None:
    try:
        verify_payload(payload, FUZZ_KEYS)
    except SignatureRefused as exc:
        assert 0 < len(str(exc)) < 200


@given(st.dictionaries(texts, json_values, max_size=5))
def test_whatever_can_be_signed_verifies_after_a_trip_through_json_text(body: dict[str, Any]) -> None:
    try:
        message = sign(body, FUZZ_KEY)
    except NotCanonical:
        return
    assert verify_payload(json.dumps(message, sort_keys=True, indent=1).encode(), FUZZ_KEYS)


@given(messages)
def test_the_command_handler_answers_every_signed_looking_command_once_and_never_raises(body: Any) -> None:
    h, done = handler([FUZZ_KEY], require=True)
    try:
        payload = orjson.dumps(body)
    except orjson.JSONEncodeError:
        return
    answer = h.handle(payload)
    assert not answer["ok"] and done == [], "nothing random is both signed and a valid command"


# -- the agent as a process, through a real broker --------------------------------------------------------------


@pytest.mark.timeout(120)
def test_the_agent_answers_only_correctly_signed_platform_commands(
    tmp_path: Path, broker: Any, agent_process: Any
) -> None:
    from test_scenarios import AGENT as SITE_AGENT
    from test_scenarios import ENTERPRISE as SITE_ENTERPRISE
    from test_scenarios import site, start_all

    platform_key, stranger = generate_private_key(), generate_private_key()
    data = site([], broker.port, tmp_path,
                remote_config={"keys": [public_key_text(platform_key.public_key())], "require_signed_cmd": True})
    platform, agent = start_all(data, broker, agent_process)

    def send(body: dict[str, Any]) -> dict[str, Any]:
        platform.command(SITE_ENTERPRISE, SITE_AGENT, body)
        result = platform.result_of(body["id"], 15)
        assert result is not None, f"no result for {body['id']}\n{agent.log()[-2000:]}"
        return result

    def status(cmd_id: str) -> dict[str, Any]:
        return {"v": 1, "id": cmd_id, "cmd": "status", "ts": int(time.time() * 1000), "agent": SITE_AGENT,
                "enterprise": SITE_ENTERPRISE}

    unsigned = send(status("u1"))
    assert not unsigned["ok"] and unsigned["error"].startswith("sig: missing"), unsigned
    foreign = send(sign(status("w1"), stranger))
    assert not foreign["ok"] and foreign["error"].startswith(f"sig.kid: key {key_id(stranger.public_key())} is "
                                                             "not trusted"), foreign
    altered = sign(status("w2"), platform_key)
    altered["ts"] += 1
    tampered = send(altered)
    assert not tampered["ok"] and tampered["error"].startswith("sig.value: the signature does not match"), tampered

    good = sign(status("g1"), platform_key)
    first = send(good)
    assert first["ok"] and first["result"]["agent"] == SITE_AGENT, first
    platform.command(SITE_ENTERPRISE, SITE_AGENT, good)  # the broker, or anyone on it, replays it
    assert platform.wait_for(lambda p: sum(1 for r in p.command_results() if r["id"] == "g1") == 2, 15)
    assert [r for r in platform.command_results() if r["id"] == "g1"] == [first, first]
    assert "Traceback" not in agent.log()
    assert agent.stop() == 0
    platform.stop()

"""The hash chain and the agent's signatures over what it stores: sealing in the store (one chain over every kind,
the head across a reopen and a damaged file, the same seal on every send), the verifier a platform runs (order of
arrival, duplicates, a rewritten, dropped, injected or forked message), the schemas, and `edge-agent verify` on a
real store file changed by hand."""

from __future__ import annotations

import itertools
import json
import re
import sqlite3
import zlib
from array import array
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner
from conftest import ROOT
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.cli.main import main
from agent.core import KIND_ALARM, KIND_DATA, KIND_QUALITY
from agent.messages import frame
from agent.seal import Sealer
from agent.store import Store
from agent.store.outbox import CHAIN_HEAD
from agent.trust.canonical import loads_strict
from agent.trust.chain import ChainVerifier, Head, check_message, entry_bytes, entry_hash
from agent.trust.keys import TrustedKeys, create_key_file, generate_private_key, public_key_text
from agent.trust.keys import b64url as b64
from agent.trust.signing import sign
from simulators.platform import _FastDataCheck, load_validators

SCHEMAS = ROOT / "docs" / "schemas"
T0 = 1_764_331_200_000
IDENTITY = b'"agent":"ipc-01","enterprise":"150625000123",'
DATA = IDENTITY + b'"readings":[{"point":"LT-101","ts":%d,"value":%s,"quality":"good"}]}'
ALARM = IDENTITY + (b'"id":"GT-201/high","point":"GT-201","type":"high","level":1,"state":"raised","value":27.5,'
                    b'"limit":25.0,"unit":"%%LEL","ts":%d}')
QUALITY = IDENTITY + b'"day":"2025-11-28","from":1764259200000,"to":1764345600000,"devices":[]}'


def data_body(n: int, value: str = "12.5") -> bytes:
    return DATA % (T0 + n, value.encode())


def published(store: Store, seq: int, hist: bool = False) -> dict[str, Any]:
    """A stored message as the uplink publishes it, parsed as a platform parses it."""
    row = store.db.execute("SELECT enc, body FROM outbox WHERE seq = ?", (seq,)).fetchone()
    body = zlib.decompress(row[1]) if row[0] == 1 else row[1]
    return loads_strict(frame(seq, hist, body))


def fill(store: Store, n: int = 6) -> list[int]:
    """Data, an alarm event and a daily report, in one chain."""
    seqs = []
    for i in range(n):
        if i % 3 == 1:
            seqs.append(store.append(KIND_ALARM, 1, ALARM % (T0 + i), created=T0 + i))
        elif i % 3 == 2:
            seqs.append(store.append(KIND_QUALITY, 0, QUALITY))
        else:
            seqs.append(store.append(KIND_DATA, 1, data_body(i)))
    return seqs


TOPIC = {KIND_ALARM: "alarm", KIND_DATA: "data", KIND_QUALITY: "quality"}


def topics(store: Store) -> dict[int, str]:
    return {seq: TOPIC[kind] for seq, kind in store.db.execute("SELECT seq, kind FROM outbox")}


# -- sealing in the store ---------------------------------------------------------------------------------------


def test_every_kind_shares_one_chain_each_naming_the_message_stored_before_it(tmp_path: Path) -> None:
    key = generate_private_key()
    with Store(tmp_path / "s.db") as store:
        store.sealer = Sealer(key)
        seqs = fill(store)
        kinds = topics(store)
        messages = [published(store, seq) for seq in seqs]
        head = store.chain_head()
    assert messages[0]["chain"] == {"start": "new"}
    for before, message in itertools.pairwise(messages):
        link = message["chain"]
        assert link["prev_seq"] == before["seq"] and link["prev_topic"] == kinds[before["seq"]]
        assert link["prev_hash"] == b64(entry_hash(entry_bytes(before)))
    keys = TrustedKeys([key.public_key()])
    assert all(check_message(m, keys).kid == Sealer(key).kid for m in messages)
    assert head == Head(seqs[-1], kinds[seqs[-1]], entry_hash(entry_bytes(messages[-1])))


def test_the_seal_is_stored_once_so_a_live_send_and_a_replay_carry_the_same(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        store.sealer = Sealer(generate_private_key())
        seq = store.append(KIND_DATA, 1, data_body(1))
        live, replay = published(store, seq, hist=False), published(store, seq, hist=True)
        assert [r.body for r in store.fetch(0)] == [r.body for r in store.fetch(0)]
    assert live["hist"] is False and replay["hist"] is True
    assert {k: v for k, v in live.items() if k != "hist"} == {k: v for k, v in replay.items() if k != "hist"}
    assert entry_bytes(live) == entry_bytes(replay)  # hist is outside what the hash and the signature cover


def test_the_chain_head_survives_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with Store(path) as store:
        first = fill(store, 3)
        head = store.chain_head()
    with Store(path) as store:
        seq = store.append(KIND_DATA, 1, data_body(9))
        message = published(store, seq)
    assert head is not None and head.seq == first[-1]
    assert message["chain"]["prev_seq"] == first[-1]


def test_a_damaged_store_file_starts_a_declared_chain_and_seq_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with Store(path) as store:
        before = fill(store, 3)
    with open(path, "r+b") as f:
        f.write(b"\x13\x37" * 4096)
    with Store(path) as store:
        assert store.recovered is not None and store.chain_head() is None
        seq = store.append(KIND_DATA, 1, data_body(5))
        after = store.append(KIND_DATA, 1, data_body(6))
        assert published(store, seq)["chain"] == {"start": "recovered"}
        assert published(store, after)["chain"]["prev_seq"] == seq
    assert seq > before[-1]


def test_without_a_key_the_chain_is_kept_unsigned(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        seqs = fill(store, 3)
        kinds = topics(store)
        messages = [published(store, seq) for seq in seqs]
    assert all("sig" not in m and "chain" in m for m in messages)
    verifier = ChainVerifier()
    for seq, message in zip(seqs, messages, strict=True):
        assert verifier.add(message, kinds[seq]) == []
    assert verifier.verified == 3 and verifier.missing() == []


def test_a_message_rolled_back_with_its_transaction_leaves_the_head_where_it_was(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        fill(store, 2)
        head = store.chain_head()
        for n in (7, 9):
            with pytest.raises(RuntimeError), store.transaction():
                store.append(KIND_DATA, 1, data_body(n))
                raise RuntimeError("the disk refused")
            seq = store.append(KIND_DATA, 1, data_body(n + 1))  # straight after: nothing else read the head
            assert head is not None and published(store, seq)["chain"]["prev_seq"] == head.seq
            head = store.chain_head()
            assert head is not None and head.seq == seq


def test_two_writers_on_one_store_keep_one_chain(tmp_path: Path) -> None:
    # two writers of one file (the daemon refuses a second one, agent.store.lock; a tool may still open it): each
    # message must still name the one stored just before it, whoever stored that
    with Store(tmp_path / "s.db") as one, Store(tmp_path / "s.db") as other:
        seqs = [(one if n % 3 else other).append(KIND_DATA, 1, data_body(n)) for n in range(7)]
        links = [published(one, seq)["chain"].get("prev_seq") for seq in seqs]
    assert seqs == sorted(seqs) and links == [None, *seqs[:-1]]


def test_a_store_file_replaced_while_running_starts_a_declared_chain(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        fill(store, 3)
        assert store.recover_if_corrupt(sqlite3.DatabaseError("database disk image is malformed"))
        seq = store.append(KIND_DATA, 1, data_body(5))
        after = store.append(KIND_DATA, 1, data_body(6))
        assert published(store, seq)["chain"] == {"start": "recovered"}
        assert published(store, after)["chain"]["prev_seq"] == seq


# -- the verifier a platform runs -------------------------------------------------------------------------------


@pytest.fixture
def sealed(tmp_path: Path) -> tuple[list[tuple[dict[str, Any], str]], Any]:
    """Eight sealed messages (as published) with their topics, and the key that signed them."""
    key = generate_private_key()
    with Store(tmp_path / "s.db") as store:
        store.sealer = Sealer(key)
        seqs = fill(store, 8)
        kinds = topics(store)
        return [(published(store, seq), kinds[seq]) for seq in seqs], key


def test_messages_in_any_order_with_duplicates_verify_intact(sealed: Any) -> None:
    messages, key = sealed
    verifier = ChainVerifier(TrustedKeys([key.public_key()]))
    order = [5, 6, 7, 0, 3, 1, 2, 4, 6, 0]  # a live message first, then the backlog, repeats among them
    for i in order:
        assert verifier.add(*messages[i]) == []
    assert verifier.verified == 8 and verifier.duplicates == 2 and verifier.missing() == []
    assert verifier.restarts == [(messages[0][0]["seq"], "new")]


def test_a_rewritten_message_fails_its_signature_and_its_successors_link(sealed: Any) -> None:
    messages, key = sealed
    changed = dict(messages[3][0], readings=[{**messages[3][0]["readings"][0], "value": 99.0}])
    signed = ChainVerifier(TrustedKeys([key.public_key()]))
    for message, topic in [messages[4], (changed, messages[3][1])]:
        found = signed.add(message, topic)
    assert [f.kind for f in found] == ["bad_signature"]
    unsigned = ChainVerifier()  # without the key, the next message's link still shows it
    unsigned.add(*messages[4])
    found = unsigned.add(changed, messages[3][1])
    assert [f.kind for f in found] == ["broken_link"] and found[0].seq == messages[4][0]["seq"]


def test_a_dropped_message_is_a_link_that_never_arrives(sealed: Any) -> None:
    messages, key = sealed
    verifier = ChainVerifier(TrustedKeys([key.public_key()]))
    for i in (0, 1, 2, 4, 5):
        assert verifier.add(*messages[i]) == []
    assert [(f.seq, f.kind) for f in verifier.missing()] == [(messages[3][0]["seq"], "missing")]


def test_an_injected_message_is_refused_unsigned_by_a_foreign_key_or_forked(sealed: Any) -> None:
    messages, key = sealed
    keys = TrustedKeys([key.public_key()])
    forged = {**messages[7][0], "seq": messages[7][0]["seq"] + 1,
              "chain": {**messages[7][0]["chain"], "prev_seq": messages[7][0]["seq"],
                        "prev_hash": b64(entry_hash(entry_bytes(messages[7][0])))}}
    forged.pop("sig")
    verifier = ChainVerifier(keys)
    for message, topic in messages:
        verifier.add(message, topic)
    assert [f.kind for f in verifier.add(forged, "data")] == ["unsigned"]
    assert [f.kind for f in verifier.add(sign(forged, generate_private_key()), "data")] == ["unknown_kid"]
    # without signatures, a second successor of one message is a fork: one of the two is not the agent's
    chain_only = ChainVerifier()
    for message, topic in messages[:4]:
        chain_only.add(message, topic)
    rival = {**messages[3][0], "seq": messages[3][0]["seq"] + 50}
    rival.pop("sig")
    assert "fork" in [f.kind for f in chain_only.add(rival, messages[3][1])]
    again = {**messages[2][0], "readings": [], "sig": messages[2][0].get("sig")}
    assert [f.kind for f in chain_only.add(again, "data")] == ["conflict"]  # another content, one seq


def test_the_verifier_refuses_a_malformed_chain_member_naming_the_field(sealed: Any) -> None:
    messages, _ = sealed
    message = messages[2][0]
    cases = {
        "chain.prev_hash": {**message["chain"], "prev_hash": "short"},
        "chain.prev_seq": {**message["chain"], "prev_seq": message["seq"]},
        "chain.prev_topic": {**message["chain"], "prev_topic": "status"},
        "chain.start": {"start": "because"},
        "chain.extra": {**message["chain"], "extra": 1},
    }
    for field, chain in cases.items():
        found = ChainVerifier().add({**message, "chain": chain}, "data")
        assert [f.kind for f in found] == ["malformed"] and found[0].text.startswith(field), (field, found)
    assert [f.kind for f in ChainVerifier().add({k: v for k, v in message.items() if k != "chain"}, "data")] \
        == ["unchained"]


# -- schemas ------------------------------------------------------------------------------------------------------


def test_the_chain_and_sig_schemas_are_bundled_in_every_stored_messages_schema() -> None:
    chain = json.loads((SCHEMAS / "chain.schema.json").read_text(encoding="utf-8"))
    sig = json.loads((SCHEMAS / "sig.schema.json").read_text(encoding="utf-8"))
    for name in ("data", "data-v2", "alarm", "quality"):
        schema = json.loads((SCHEMAS / f"{name}.schema.json").read_text(encoding="utf-8"))
        assert schema["$defs"]["chain"] == {k: v for k, v in chain.items() if k != "$schema"}, name
        assert schema["$defs"]["sig"] == {k: v for k, v in sig.items() if k != "$schema"}, name
        assert schema["properties"]["chain"]["$ref"] == chain["$id"]
        assert schema["properties"]["sig"]["$ref"] == sig["$id"]


def test_sealed_messages_pass_their_schemas_and_the_fast_data_check_stays_strict(sealed: Any) -> None:
    messages, _ = sealed
    validators = load_validators()
    for message, topic in messages:
        assert list(validators[topic].iter_errors(message)) == [], topic
    data = [m for m, topic in messages if topic == "data"][-1]  # one that names its predecessor
    fast = _FastDataCheck()
    assert fast(data)
    odd: list[Any] = [None, [], "x", {}, {"start": "new", "prev_seq": 1}, {"start": "later"},
                      {**data["chain"], "prev_seq": -1}, {**data["chain"], "prev_seq": True},
                      {**data["chain"], "prev_topic": "health"}, {**data["chain"], "prev_hash": "A" * 43},
                      {**data["chain"], "prev_hash": data["chain"]["prev_hash"] + "\n"}]
    sigs: list[Any] = [None, {}, {**data["sig"], "alg": "rsa"}, {**data["sig"], "kid": "ABCDEF0123456789"},
                       {**data["sig"], "value": data["sig"]["value"][:-1] + "B"}, {**data["sig"], "x": 1}]
    variants = [{**data, "chain": c} for c in odd] + [{**data, "sig": s} for s in sigs]
    for variant in variants:
        if fast(variant):
            assert validators["data"].is_valid(variant), variant


# -- edge-agent verify ---------------------------------------------------------------------------------------------


def sealed_store(tmp_path: Path, n: int = 8) -> tuple[Path, list[int]]:
    """A store with the agent's key file beside it, as installed, holding `n` sealed messages."""
    _, key = create_key_file(tmp_path)
    path = tmp_path / "store.db"
    with Store(path) as store:
        store.sealer = Sealer(key)
        return path, fill(store, n)


def run_verify(*args: str) -> Any:
    return CliRunner().invoke(main, ["verify", *args])


def test_verify_passes_an_intact_store_with_its_key_file(tmp_path: Path) -> None:
    path, seqs = sealed_store(tmp_path)
    result = run_verify("--store", str(path), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["intact"] and report["verified"] == len(seqs) and report["head"] == seqs[-1]
    assert report["signatures"].startswith("checked with key") and len(report["kids"]) == 1
    assert report["archive"] == {**report["archive"], "chunks": 0, "damaged_count": 0}


def test_verify_finds_a_message_rewritten_in_the_file_and_names_its_seq(tmp_path: Path) -> None:
    path, seqs = sealed_store(tmp_path)
    target = seqs[3]  # data, zlib-compressed, as the agent keeps it
    db = sqlite3.connect(path)
    body = zlib.decompress(db.execute("SELECT body FROM outbox WHERE seq = ?", (target,)).fetchone()[0])
    assert b'"value":12.5' in body
    db.execute("UPDATE outbox SET body = ? WHERE seq = ?", (zlib.compress(body.replace(b"12.5", b"2.5")), target))
    db.commit()
    db.close()
    result = run_verify("--store", str(path))
    assert result.exit_code == 1
    assert f"BREAK seq {target} (bad_signature)" in result.output
    unsigned = run_verify("--store", str(path), "--json")  # the key file read: every message must be signed
    kinds = {(b["seq"], b["kind"]) for b in json.loads(unsigned.output)["breaks"]}
    assert (target, "bad_signature") in kinds


def test_verify_finds_a_message_deleted_from_the_file_and_names_its_seq(tmp_path: Path) -> None:
    path, seqs = sealed_store(tmp_path)
    db = sqlite3.connect(path)
    db.execute("DELETE FROM outbox WHERE seq = ?", (seqs[4],))
    db.commit()
    db.close()
    result = run_verify("--store", str(path), "--json")
    assert result.exit_code == 1
    assert [(b["seq"], b["kind"]) for b in json.loads(result.output)["breaks"]] == [(seqs[4], "missing")]
    # the newest message deleted: the chain's head names it
    db = sqlite3.connect(path)
    db.execute("DELETE FROM outbox WHERE seq = ?", (seqs[-1],))
    db.commit()
    db.close()
    breaks = json.loads(run_verify("--store", str(path), "--json").output)["breaks"]
    assert (seqs[-1], "missing") in [(b["seq"], b["kind"]) for b in breaks]


def test_verify_accepts_what_the_store_let_go_by_its_own_rules(tmp_path: Path) -> None:
    path, seqs = sealed_store(tmp_path)
    with Store(path) as store:
        store.ack(seqs[:4])
        store.write_chunks([], mark=seqs[3])  # the archive took the acknowledged data up to here
        store.expire(T0 + 10)  # and the alarm events and reports past retention
        left = {s for (s,) in store.db.execute("SELECT seq FROM outbox")}
    assert left and len(left) < len(seqs)
    result = run_verify("--store", str(path), "--json")
    report = json.loads(result.output)
    assert result.exit_code == 0, report["breaks"]
    assert report["left_the_store"] >= 1


def test_verify_checks_against_a_registered_public_key_and_refuses_bad_input(tmp_path: Path) -> None:
    path, _ = sealed_store(tmp_path)
    other = public_key_text(generate_private_key().public_key())
    result = run_verify("--store", str(path), "--public-key", other, "--json")
    assert result.exit_code == 1 and {b["kind"] for b in json.loads(result.output)["breaks"]} == {"unknown_kid"}
    assert run_verify("--store", str(path), "--public-key", "not-a-key").exit_code == 2
    assert run_verify("--store", str(tmp_path / "absent.db")).exit_code == 2
    (tmp_path / "not-a-store.db").write_bytes(b"hello" * 100)
    assert run_verify("--store", str(tmp_path / "not-a-store.db")).exit_code == 2
    (tmp_path / "agent-key.pem").chmod(0o644)  # a key file others may read is not used: the chain alone is checked
    result = run_verify("--store", str(path), "--json")
    assert result.exit_code == 0 and json.loads(result.output)["signatures"].startswith("not checked")


def test_verify_reports_a_damaged_archive_chunk_and_says_what_chunks_cannot_prove(tmp_path: Path) -> None:
    path, _ = sealed_store(tmp_path)
    from agent.store.chunks import encode_chunk

    with Store(path) as store:
        chunk = encode_chunk([T0, T0 + 1, T0 + 2], array("d", [1.0, 2.0, 3.0]), [0, 0, 0])
        store.write_chunks([("LT-101", T0, T0 + 2, 3, chunk)], mark=None)
        store.db.execute("UPDATE archive SET count = 4")
    result = run_verify("--store", str(path), "--json")
    report = json.loads(result.output)
    assert result.exit_code == 1 and report["archive"]["damaged_count"] == 1
    assert "not that they are unchanged" in report["archive"]["limits"]
    assert run_verify("--store", str(path), "--no-archive").exit_code == 0


def test_a_head_that_names_another_message_is_a_break(tmp_path: Path) -> None:
    path, seqs = sealed_store(tmp_path)
    with Store(path) as store:
        head = store.chain_head()
        assert head is not None
        store.set_meta(CHAIN_HEAD, Head(head.seq, head.topic, bytes(32)).text())
    breaks = json.loads(run_verify("--store", str(path), "--json").output)["breaks"]
    assert [(b["seq"], b["kind"]) for b in breaks] == [(seqs[-1], "broken_link")]


def test_entry_bytes_leave_out_hist_and_sig_and_write_large_integers_as_doubles() -> None:
    message = {"v": 1, "seq": 3, "hist": True, "sig": {"alg": "ed25519"}, "value": 2**60 + 1, "x": 12.0}
    assert entry_bytes(message) == b'{"seq":3,"v":1,"value":1152921504606847000,"x":12}'  # as JavaScript writes it
    assert float(orjson.loads(entry_bytes(message))["value"]) == float(2**60 + 1)  # the same double


# -- the protocol page ---------------------------------------------------------------------------------------------


def test_the_protocol_pages_chain_examples_verify_with_the_test_key_and_show_their_entry_bytes() -> None:
    text = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")
    section = text[text.index("## Tamper-evident messages"):text.index("\n## ", text.index("## Tamper-evident"))]
    seed = re.search(r"private key \(seed\)\s*`([0-9a-f]{64})`", text)
    assert seed is not None
    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(seed.group(1)))
    examples = [(kind, json.loads(body)) for kind, body in
                re.findall(r"<!-- example: ([\w-]+) -->\n```json\n(.*?)\n```", section, re.DOTALL)]
    assert [kind for kind, _ in examples] == ["alarm", "data"]
    verifier = ChainVerifier(TrustedKeys([key.public_key()]))
    for kind, example in reversed(examples):  # the later one first, as a backlog may come
        assert verifier.add(example, kind) == []
    assert verifier.missing() == [] and verifier.restarts == [(examples[0][1]["seq"], "new")]
    shown = re.search(r"<!-- entry bytes -->\n```text\n(.*?)\n```", section, re.DOTALL)
    assert shown is not None and entry_bytes(examples[0][1]) == shown.group(1).encode()
    digest = entry_hash(shown.group(1).encode())
    assert f"`{digest.hex()}`" in section and f"`{b64(digest)}`" in section
    assert examples[1][1]["chain"]["prev_hash"] == b64(digest)
    # the agent, given the alarm event's body, seals it exactly so (Ed25519 is deterministic)
    alarm = examples[0][1]
    body = orjson.dumps({k: v for k, v in alarm.items() if k not in ("v", "seq", "hist", "chain", "sig")})[1:]
    sealed, _ = Sealer(key).seal("alarm", alarm["seq"], body, None, "new")
    assert loads_strict(frame(alarm["seq"], False, sealed))["sig"] == alarm["sig"]

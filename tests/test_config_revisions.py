"""The pieces of remote configuration on their own: revision files (atomic, the last N kept, damage named), what
a configuration from afar may name on this machine, a push read and checked (each refusal by its kind), and the
pipeline and poller taking a new point table between two polls without losing a reading or an alarm state."""

from __future__ import annotations

import copy
import hashlib
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from agent.config.confine import confinement_errors, own_folders, with_local_fields
from agent.config.loader import validate_config_data
from agent.config.models import AgentConfig
from agent.config.revisions import Revision, RevisionError, RevisionFiles, config_hash
from agent.control.commands import CommandTrust
from agent.control.pushes import PushRefused, read_push
from agent.core import GOOD, ReadingBatch
from agent.pipeline.ingest import Pipeline
from agent.pipeline.poller import Poller
from agent.store import Store
from agent.trust.keys import TrustedKeys, generate_private_key
from agent.trust.signing import sign_payload

NOW = 1_750_000_000_000  # ms


def revision(n: int, payload: bytes = b'{"config":{}}') -> Revision:
    return Revision(n, "platform", config_hash({}), payload, "0123456789abcdef", f"p{n}", NOW)


def test_a_revision_file_is_whole_private_and_read_back(tmp_path: Path) -> None:
    files = RevisionFiles(tmp_path, keep=3)
    path = files.save(revision(12, '{"config":{"x":"é"}}'.encode()))
    assert path.name == "r0000000012.json" and (path.stat().st_mode & 0o777) == 0o600
    assert files.load(12) == revision(12, '{"config":{"x":"é"}}'.encode())
    assert not [p for p in files.folder.iterdir() if p.name.endswith(".tmp")], "no temporary file is left"
    (files.folder / ".r0000000013.abc.tmp").write_text("half")  # a write cut short by a power loss
    assert files.numbers() == [12], "a temporary file is never taken for a revision"


def test_only_the_newest_revisions_and_the_protected_ones_are_kept(tmp_path: Path) -> None:
    files = RevisionFiles(tmp_path, keep=3)
    for n in (1, 2, 5, 7, 9, 11):
        files.save(revision(n))
    assert files.prune({2}) == [1, 5]
    assert files.numbers() == [2, 7, 9, 11]


def test_a_damaged_or_misnamed_revision_file_is_named_not_taken(tmp_path: Path) -> None:
    files = RevisionFiles(tmp_path)
    files.save(revision(3))
    files.path(3).write_bytes(b'{"revision": 3, "source": "platform"')
    with pytest.raises(RevisionError, match=r"r0000000003\.json: not a revision file"):
        files.load(3)
    files.path(4).write_bytes(revision(5).envelope())
    with pytest.raises(RevisionError, match="holds revision 5, not 4"):
        files.load(4)
    with pytest.raises(RevisionError, match="No such file"):
        files.load(6)


def running_config(tmp_path: Path) -> AgentConfig:
    return validate_config_data({"agent": {"id": "ipc-01", "enterprise": "e1"},
                                 "store": {"path": str(tmp_path / "state" / "store.db")},
                                 "control": {"socket": str(tmp_path / "run" / "control.sock")}},
                                source="<running>", base_dir=tmp_path / "etc")


def pushed(tmp_path: Path, running: AgentConfig, **parts: Any) -> AgentConfig:
    data = with_local_fields({"agent": {"id": "ipc-01", "enterprise": "e1"}, **parts}, running)
    return validate_config_data(data, source="config", base_dir=tmp_path / "etc")


def test_a_configuration_from_afar_names_files_only_in_the_agents_folders(tmp_path: Path) -> None:
    running = running_config(tmp_path)
    folders = own_folders(tmp_path / "etc" / "agent.yaml", running)
    assert folders == [tmp_path / "etc", tmp_path / "state"]
    inside = pushed(tmp_path, running, uplink={"username": "u", "password_file": "mqtt-password",
                                               "tls": {"ca": str(tmp_path / "state" / "ca.pem")}})
    assert confinement_errors(inside, running, folders) == []
    credential = pushed(tmp_path, running, uplink={"username": "u",
                                                   "password_file": "${CREDENTIALS_DIRECTORY}/mqtt"})
    assert confinement_errors(credential, running, folders) == []
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "link").symlink_to("/etc/shadow")
    for where in ("/etc/shadow", "../../etc/shadow", "link", "${CREDENTIALS_DIRECTORY}/../../etc/shadow"):
        outside = pushed(tmp_path, running, uplink={"username": "u", "password_file": where})
        errors = confinement_errors(outside, running, folders)
        assert len(errors) == 1 and errors[0].startswith("uplink.password_file: "), (where, errors)


def test_a_configuration_from_afar_keeps_the_store_the_socket_and_the_identity(tmp_path: Path) -> None:
    running = running_config(tmp_path)
    folders = own_folders(tmp_path / "etc" / "agent.yaml", running)
    left_out = pushed(tmp_path, running)
    assert (left_out.store.path, left_out.control.socket) == (running.store.path, running.control.socket)
    moved = validate_config_data({"agent": {"id": "ipc-02", "enterprise": "e1"},
                                  "store": {"path": str(tmp_path / "elsewhere.db")}},
                                 source="config", base_dir=tmp_path / "etc")
    errors = confinement_errors(moved, running, folders)
    assert [e.split(":")[0] for e in errors] == ["agent.id", "store.path", "control.socket"]


def test_serial_ports_from_afar_are_devices_or_network_urls(tmp_path: Path) -> None:
    running = running_config(tmp_path)
    folders = own_folders(tmp_path / "etc" / "agent.yaml", running)

    def rtu(port: str) -> list[str]:
        config = pushed(tmp_path, running, channels=[{
            "id": "bus", "driver": "modbus_rtu", "port": port,
            "devices": [{"id": "d", "unit": 1, "points": [{"id": "P1", "table": "holding", "address": 0}]}]}])
        return confinement_errors(config, running, folders)

    assert rtu("/dev/ttyUSB0") == [] and rtu("socket://10.0.0.5:4001") == [] and rtu("rfc2217://h:1") == []
    for port in ("spy:///dev/ttyUSB0?file=/etc/passwd", "/etc/passwd", "ttyUSB0", "/dev/../etc/passwd"):
        errors = rtu(port)
        assert len(errors) == 1 and errors[0].startswith("channels[0].port: "), (port, errors)


# --- a push, read and checked --------------------------------------------------------------------------------

KEY = generate_private_key()
TRUST = CommandTrust(TrustedKeys([KEY.public_key()]), agent="ipc-01", enterprise="e1")


def message(**members: Any) -> dict[str, Any]:
    return {"v": 1, "id": "p-1", "revision": 3, "ts": NOW, "agent": "ipc-01", "enterprise": "e1",
            "config": {"agent": {"id": "ipc-01", "enterprise": "e1"}}, **members}


def read(payload: bytes, *, retained: bool = False, allow_unsigned: bool = False) -> Any:
    return read_push(payload, retained=retained, trust=TRUST, allow_unsigned=allow_unsigned, max_bytes=1 << 20,
                     now_ms=NOW, max_age_ms=600_000)


def refused(payload: bytes, **options: Any) -> PushRefused:
    with pytest.raises(PushRefused) as caught:
        read(payload, **options)
    return caught.value


def test_a_signed_push_is_read_with_its_key_and_the_hash_of_its_configuration() -> None:
    push = read(sign_payload(message(not_after=NOW + 1), KEY))
    assert (push.id, push.revision, push.not_after) == ("p-1", 3, NOW + 1)
    assert push.kid is not None and push.hash == config_hash(message()["config"])


@pytest.mark.parametrize(("kind", "payload", "first_error"), [
    ("oversized", b"{" + b" " * (1 << 20) + b"}", "(top level): 1,048,578 bytes, more than the 1,048,576"),
    ("malformed", b"\xff", "(top level): not JSON"),
    ("malformed", b"[]", "(top level): a push is a JSON object"),
    ("unsigned", orjson.dumps(message()), "sig: missing"),
    ("unknown_kid", sign_payload(message(), generate_private_key()), "sig.kid: key "),
    ("bad_signature", orjson.dumps({**orjson.loads(sign_payload(message(), KEY)), "revision": 4}),
     "sig.value: the signature does not match"),
    ("not_canonical", sign_payload(message(), KEY).replace(b'"v":1,', b'"v":1,"v":1,'),
     "cannot be signed: v: member name given twice"),
    ("malformed", sign_payload(message(revision=0), KEY), "revision: required, an integer from 1"),
    ("malformed", sign_payload(message(config=[]), KEY), "config: required, the configuration document"),
    ("malformed", sign_payload(message(id=""), KEY), "id: required, a string of 1 to 128"),
    ("malformed", sign_payload(message(v=2), KEY), "v: must be 1, not 2"),
    ("wrong_target", sign_payload(message(agent="ipc-02"), KEY), "agent: the push is for 'ipc-02'"),
    ("wrong_target", sign_payload({k: v for k, v in message().items() if k != "ts"}, KEY), "ts: required"),
    ("stale", sign_payload(message(ts=NOW - 700_000), KEY), "ts is 700s old"),
    ("expired", sign_payload(message(not_after=NOW - 5000), KEY), "not_after: the push expired 5s ago"),
])
def test_each_refusal_has_its_kind_and_names_the_field(kind: str, payload: bytes, first_error: str) -> None:
    exc = refused(payload)
    assert exc.kind == kind and exc.errors[0].startswith(first_error), (exc.kind, exc.errors)


def test_a_refusal_carries_what_could_be_read_of_the_id_and_revision() -> None:
    exc = refused(orjson.dumps(message()), retained=True)
    assert (exc.kind, exc.id, exc.revision) == ("retained", "p-1", 3)
    assert (refused(b"nonsense").id, refused(orjson.dumps(message(id=["x"]))).id) == (None, None)


def test_an_unsigned_push_is_taken_only_when_allowed_and_a_signature_present_is_checked_anyway() -> None:
    assert read(orjson.dumps(message()), allow_unsigned=True).kid is None
    forged = orjson.dumps({**orjson.loads(sign_payload(message(), KEY)), "revision": 9})
    assert refused(forged, allow_unsigned=True).kind == "bad_signature"
    twice = b'{"v":1,"id":"p","id":"q","revision":3,"config":{}}'
    assert refused(twice, allow_unsigned=True).kind == "malformed"


# --- a new point table between two polls ----------------------------------------------------------------------


def table_config(tmp_path: Path, points: list[str], limits: dict[str, dict[str, float]]) -> AgentConfig:
    def point(pid: str, n: int) -> dict[str, Any]:
        out: dict[str, Any] = {"id": pid, "table": "holding", "address": 2 * n, "type": "float32"}
        if pid in limits:
            out["limits"] = limits[pid]
        return out

    return validate_config_data({
        "agent": {"id": "ipc-01", "enterprise": "e1"}, "store": {"path": str(tmp_path / "store.db")},
        "channels": [{"id": "a", "driver": "modbus_tcp", "host": "127.0.0.1", "port": 1,
                      "devices": [{"id": "d1", "unit": 1, "points": [point(p, n) for n, p in enumerate(points)]}]},
                     {"id": "b", "driver": "modbus_tcp", "host": "127.0.0.1", "port": 2,
                      "devices": [{"id": "d2", "unit": 2, "points": [point("B1", 0)]}]}],
    }, source="<test>", base_dir=None)


def test_a_new_table_keeps_alarms_and_last_values_of_kept_points_and_clears_removed_alarms(tmp_path: Path) -> None:
    limits = {"P1": {"high": 10.0}, "P2": {"high": 10.0}}
    old = table_config(tmp_path, ["P1", "P2", "P3"], limits)
    with Store(tmp_path / "store.db") as store:
        pipeline = Pipeline(old, store)
        ts = int(time.time() * 1000)
        pipeline.ingest(ReadingBatch(ts, [0, 1, 2], [20.0, 20.0, 1.0], [GOOD, GOOD, GOOD]))
        assert pipeline.alarm_states() == {"P1/high": "raised", "P2/high": "raised"}
        for slot in pipeline.table.devices:
            pipeline.polled(slot, ts)
        new = table_config(tmp_path, ["P0", "P1", "P3"], {"P1": {"high": 10.0}})  # P2 gone, P0 new, P1 moved
        events = pipeline.reconfigure(Pipeline.prepare(new), ts + 1, "removed (revision 2)")
        assert [(e.id, e.state, e.message) for e in events] == [("P2/high", "cleared", "removed (revision 2)")]
        assert pipeline.alarm_states() == {"P1/high": "raised"}, "no raised twice, no clear of a kept alarm"
        assert store.alarm_states() == {"P1/high": "raised"}
        assert pipeline.last_value[pipeline.table.by_id["P1"].index] == 20.0
        assert pipeline.quality[pipeline.table.by_id["P0"].index] != GOOD, "a new point starts never read"
        rates = {r["device"]: r["hour"]["expected"] for r in pipeline.judge.online_rates(ts + 1)}
        assert rates == {"d1": 0, "d2": 1}, "an unchanged device keeps counting its online rate"
        pipeline.ingest(ReadingBatch(ts + 2, [1, 2], [5.0, 1.0], [GOOD, GOOD]))
        assert [e.state for e in pipeline.alarms.evaluate(ReadingBatch(ts + 3, [1], [5.0], [GOOD]))] == [], \
            "the kept alarm cleared once, by its own rule"
        pipeline.archive_flush()
        kept = dict(store.db.execute("SELECT p.id, sum(a.count) FROM archive a JOIN point p ON p.key = a.point "
                                     "GROUP BY p.id"))
        assert kept == {"P1": 2, "P2": 1, "P3": 2}, "the readings gathered before the change are archived too"


def test_the_poller_hands_kept_devices_their_new_slots_and_retires_the_others(tmp_path: Path) -> None:
    old = table_config(tmp_path, ["P1", "P2"], {})
    with Store(tmp_path / "store.db") as store:
        pipeline = Pipeline(old, store)
        poller = Poller(pipeline.table, pipeline.ingest)
        a, b = poller.devices
        a.polls, b.polls = 7, 9
        new = table_config(tmp_path, ["P0", "P1", "P2"], {})
        new = new.model_copy(update={"channels": [new.channels[1], new.channels[0]]})  # b first now
        parts = Pipeline.prepare(new)
        poller.reconfigure(parts.table, keep={"b"})
        kept_b, fresh_a = poller.devices
        assert kept_b is b and b.polls == 9 and b.slot.indices == [0] and not b.retired
        assert fresh_a is not a and fresh_a.polls == 0 and fresh_a.slot.indices == [1, 2, 3] and a.retired


def test_a_document_without_a_sig_member_hashes_as_its_canonical_bytes() -> None:
    document = {"b": 1.0, "a": [1, "é"]}
    assert config_hash(document) == "sha256:" + hashlib.sha256('{"a":[1,"é"],"b":1}'.encode()).hexdigest()
    assert config_hash(copy.deepcopy(document)) == config_hash({"a": [1, "é"], "b": 1})


def test_the_protocol_pages_push_verifies_validates_and_has_the_hash_of_its_trial_result() -> None:
    import json
    import re

    from agent.trust.keys import parse_public_key
    from agent.trust.signing import verify_payload

    page = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text(encoding="utf-8")
    examples = [(kind, json.loads(body)) for kind, body in
                re.findall(r"<!-- example: (config-[\w]+) -->\n```json\n(.*?)\n```", page, re.DOTALL)]
    pushes = [e for kind, e in examples if kind == "config-set"]
    trial = next(e for kind, e in examples if kind == "config-result" and e["state"] == "trial")
    assert len(pushes) == 1
    rfc8032 = TrustedKeys([parse_public_key("11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo")])
    verify_payload(json.dumps(pushes[0], ensure_ascii=False).encode(), rfc8032)
    trust = CommandTrust(rfc8032, agent="ipc-01", enterprise="150625000123")
    push = read_push(json.dumps(pushes[0]).encode(), retained=False, trust=trust, allow_unsigned=False,
                     max_bytes=1 << 20, now_ms=pushes[0]["ts"], max_age_ms=600_000)
    assert (push.id, push.revision, push.hash) == (trial["id"], trial["revision"], trial["hash"])
    validate_config_data(push.config, source="config", base_dir=Path("/etc/edge-agent"))

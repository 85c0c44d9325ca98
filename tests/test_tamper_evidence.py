"""Tamper evidence with the real processes: a synthetic plant over Modbus TCP, the agent as its own process with its
key in its state folder, a real mosquitto, and the platform simulator verifying every message against the agent's
registered public key. The chain holds across an outage and a restart; a message rewritten in the store file while
the agent is stopped, a message another broker client publishes on the agent's topic, and a dropped one are caught.
"""

from __future__ import annotations

import sqlite3
import time
import zlib
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import pytest
from conftest import wait_until
from paho.mqtt.enums import CallbackAPIVersion
from test_store_and_forward import PREFIX, site, start_plant

from agent.trust.keys import create_key_file, generate_private_key, key_id, public_key_text
from agent.trust.signing import sign
from simulators.platform import ChainReport, PlatformSimulator

AGENT = "000000000000/bench"


def keyed_platform(broker: Any, store_folder: Path) -> tuple[PlatformSimulator, str]:
    """The agent's key made as install.sh makes it, and a platform that registered its public key."""
    _, key = create_key_file(store_folder)
    platform = PlatformSimulator("127.0.0.1", broker.port, PREFIX,
                                 agent_keys={AGENT: public_key_text(key.public_key())})
    platform.start()
    return platform, key_id(key.public_key())


def chain_of(platform: PlatformSimulator) -> ChainReport:
    report = platform.report().agent("bench").chain
    assert report is not None
    return report


def publish(port: int, topic: str, payload: bytes) -> None:
    """Publish as another client of the broker would (QoS 1, acknowledged)."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"intruder-{time.monotonic_ns()}")
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.mark.timeout(240)
def test_chain_and_signatures_verify_end_to_end_across_an_outage_and_a_restart(
    tmp_path: Path, broker: Any, plant: Any, agent_process: Any
) -> None:
    sim = start_plant(plant, 200, 0.2)
    platform, kid = keyed_platform(broker, tmp_path)
    store = tmp_path / "store.db"
    config = site(sim.ports["bench"], broker.port, store, points=200, interval=0.2)
    agent = agent_process(config).start()
    assert platform.wait_for(lambda p: len(p.readings()) >= 2000, 30), agent.log()[-2000:]
    broker.stop()
    sim.call(sim.sim.set_value, "P00010", 97.0)  # alarm events stored during the outage, in the same chain
    wait_until(lambda: "alarm P00010/high raised" in agent.log(), 20, "an alarm raised while the broker is down")
    sim.call(sim.sim.release, "P00010")
    time.sleep(1.0)  # the scenario: more readings stored while the broker is down
    reports_before = len(platform.health())
    broker.start()

    def replayed(p: PlatformSimulator) -> bool:  # the backlog delivered: a health report sent since says so
        reports = p.health()[reports_before:]  # none yet when the replay comes before the first report
        return p.report().agent("bench").hist_messages > 0 and bool(reports) and reports[-1]["backlog"]["messages"] <= 3

    assert platform.wait_for(replayed, 60), agent.log()[-2000:]
    assert agent.stop_seen_by(platform) == 0
    agent = agent_process(config).start()  # a restart: the chain goes on from the stored head
    assert platform.wait_for(agent.seen_online_by, 30), agent.log()[-2000:]
    seen = platform.report().agent("bench").seq_max or 0
    assert platform.wait_for(lambda p: (p.report().agent("bench").seq_max or 0) > seen + 10, 30)
    assert agent.stop_seen_by(platform) == 0
    report = platform.report().agent("bench")
    chain = chain_of(platform)
    assert chain.breaks == [] and chain.missing == [], chain.breaks[:5] + chain.missing[:5]
    assert chain.kids == {kid} and chain.restarts == [(1, "new")]
    assert chain.verified == report.messages - report.duplicates and report.gaps == []
    assert report.hist_messages > 0 and any(a["hist"] for a in platform.alarms())  # the replay was verified too
    health = platform.health()[-1]
    assert health["chain"]["signed"] is True and health["chain"]["kid"] == kid
    assert platform.schema_errors() == []
    platform.stop()


@pytest.mark.timeout(240)
def test_a_store_message_rewritten_on_disk_is_caught_when_the_agent_replays_it(
    tmp_path: Path, broker: Any, plant: Any, agent_process: Any
) -> None:
    sim = start_plant(plant, 100, 0.2)
    platform, _ = keyed_platform(broker, tmp_path)
    store = tmp_path / "store.db"
    config = site(sim.ports["bench"], broker.port, store, points=100, interval=0.2, shutdown_drain=1)
    agent = agent_process(config).start()
    assert platform.wait_for(lambda p: len(p.readings()) >= 500, 30), agent.log()[-2000:]
    broker.stop()
    time.sleep(2.0)  # the scenario: a backlog is stored while the broker is down
    assert agent.stop() == 0
    db = sqlite3.connect(store)  # the agent is stopped: someone on site edits a stored message
    seq, body = db.execute("SELECT seq, body FROM outbox WHERE kind = 1 AND acked = 0 ORDER BY seq DESC "
                           "LIMIT 1 OFFSET 3").fetchone()
    message = orjson.loads(b"{" + zlib.decompress(body))
    message["readings"][0]["value"] = 1234.5
    text = orjson.dumps(message)[1:]
    db.execute("UPDATE outbox SET body = ? WHERE seq = ?", (zlib.compress(text), seq))
    db.commit()
    db.close()
    broker.start()
    agent = agent_process(config).start()
    assert platform.wait_for(lambda p: any(f.seq == seq for f in chain_of(p).breaks), 60), agent.log()[-2000:]
    assert agent.stop_seen_by(platform) == 0
    chain = chain_of(platform)
    assert [(f.seq, f.kind) for f in chain.breaks] == [(seq, "bad_signature")]
    assert [f.seq for f in chain.missing] == [seq]  # its successor names the message the agent sealed
    assert all(r.value != 1234.5 for r in platform.readings()), "the rewritten message must not be kept"
    platform.stop()


@pytest.mark.timeout(180)
def test_a_message_forged_by_another_broker_client_is_caught_and_not_kept(
    tmp_path: Path, broker: Any, plant: Any, agent_process: Any
) -> None:
    sim = start_plant(plant, 100, 0.2)
    platform, _ = keyed_platform(broker, tmp_path)
    genuine: list[dict[str, Any]] = []
    platform.on_message = lambda topic, msg: genuine.append(msg) if topic.endswith("/data") and "sig" in msg \
        else None
    config = site(sim.ports["bench"], broker.port, tmp_path / "store.db", points=100, interval=0.2)
    agent = agent_process(config).start()
    assert platform.wait_for(lambda p: len(genuine) >= 5, 30), agent.log()[-2000:]
    topic = f"{PREFIX}/{AGENT}/data"
    original = genuine[-1]
    ahead = original["seq"] + 100_000
    altered = {**original, "seq": ahead, "readings": [{**original["readings"][0], "value": 55.5}]}
    unsigned = {k: v for k, v in altered.items() if k != "sig"} | {"seq": ahead + 1}
    foreign = sign({**altered, "seq": ahead + 2}, generate_private_key())
    replaced = {**original, "readings": [{**original["readings"][0], "value": 55.5}]}  # same seq, other content
    for forged in (altered, unsigned, foreign, replaced):
        publish(broker.port, topic, orjson.dumps(forged))

    def caught(p: PlatformSimulator) -> bool:
        return {(f.seq, f.kind) for f in chain_of(p).breaks} >= {
            (ahead, "bad_signature"), (ahead + 1, "unsigned"), (ahead + 2, "unknown_kid"),
            (original["seq"], "bad_signature")}

    assert platform.wait_for(caught, 30), chain_of(platform).breaks
    assert agent.stop_seen_by(platform) == 0
    assert all(r.value != 55.5 for r in platform.readings()), "a forged reading must not be kept"
    assert platform.report().agent("bench").seq_max < ahead
    platform.stop()


@pytest.mark.timeout(120)
def test_without_a_key_the_agent_runs_says_so_once_and_its_chain_still_verifies(
    tmp_path: Path, broker: Any, plant: Any, agent_process: Any
) -> None:
    sim = start_plant(plant, 100, 0.2)
    platform = PlatformSimulator("127.0.0.1", broker.port, PREFIX, verify_chains=True)
    platform.start()
    config = site(sim.ports["bench"], broker.port, tmp_path / "store.db", points=100, interval=0.2)
    agent = agent_process(config).start()
    assert platform.wait_for(lambda p: len(p.readings()) >= 1000 and bool(p.health()), 30), agent.log()[-2000:]
    assert agent.stop_seen_by(platform) == 0
    health = platform.health()[-1]["chain"]
    assert health["signed"] is False and health["kid"] is None and "agent-key.pem" in health["unsigned_reason"]
    assert agent.log().count("chained but not signed") == 1
    chain = chain_of(platform)
    assert chain.intact and chain.kids == frozenset() and chain.verified > 0
    platform.stop()

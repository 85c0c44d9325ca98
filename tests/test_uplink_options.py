"""Uplink options against a real mosquitto: MQTT 5, TLS with a private CA, user name and password, and the last
will. The platform simulator listens on a plain listener of the same broker.
"""

from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import Mosquitto, free_port, wait_until

from agent.config.loader import validate_config_data
from agent.store import Store
from simulators.platform import PlatformSimulator

POINTS = [{"id": "LT-1", "address": 0, "type": "float32", "unit": "m"},
          {"id": "LT-2", "address": 2, "type": "float32", "unit": "m"}]


def plant_config() -> Any:
    return validate_config_data({
        "agent": {"id": "ipc-9", "enterprise": "E1"},
        "channels": [{"id": "c1", "driver": "modbus_tcp", "host": "127.0.0.1", "port": 502,
                      "devices": [{"id": "d1", "interval": 0.3, "points": POINTS}]}],
    }, source="test", base_dir=None)


def agent_config(plant_port: int, store: Path, **uplink: Any) -> dict[str, Any]:
    return {
        "agent": {"id": "ipc-9", "enterprise": "E1"},
        "uplink": {"prefix": "t", "reconnect_min": 0.2, "reconnect_max": 1, "keepalive": 5,
                   "batch": {"max_delay": 0.3}, **uplink},
        "store": {"path": str(store), "shutdown_drain": 3},
        "channels": [{"id": "c1", "driver": "modbus_tcp", "host": "127.0.0.1", "port": plant_port,
                      "devices": [{"id": "d1", "interval": 0.3, "points": [dict(p) for p in POINTS]}]}],
    }


def delivered(platform: PlatformSimulator, count: int = 10, timeout: float = 30) -> bool:
    return platform.wait_for(lambda p: len(p.readings()) >= count, timeout)


def stored_readings(store: Path) -> int:
    """Readings waiting in the store, read beside the running agent; 0 while the agent has not set it up yet."""
    try:
        with Store(store, readonly=True) as s:
            return s.backlog().readings
    except sqlite3.Error:
        return 0


def check_clean_run(platform: PlatformSimulator, agent: Any, store: Path) -> None:
    assert agent.stop_seen_by(platform) == 0
    report = platform.report().agent("ipc-9")
    assert report.gaps == [] and report.seq_min == 1
    assert platform.schema_errors() == []
    with Store(store) as s:
        assert s.backlog().messages == 0


@pytest.mark.timeout(60)
def test_mqtt5_delivers_the_same_contract(tmp_path: Path, broker: Mosquitto, plant: Any, agent_process: Any) -> None:
    sim = plant(plant_config())
    platform = PlatformSimulator("127.0.0.1", broker.port, "t")
    platform.start()
    store = tmp_path / "s.db"
    agent = agent_process(agent_config(sim.ports["c1"], store, port=broker.port, protocol="5")).start()
    assert delivered(platform), agent.log()[-2000:]
    check_clean_run(platform, agent, store)
    platform.stop()


def make_certificates(folder: Path) -> None:
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=edge-agent test CA")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=localhost")
    (folder / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf")


@pytest.mark.timeout(90)
def test_tls_with_a_private_ca(tmp_path: Path, plant: Any, agent_process: Any) -> None:
    make_certificates(tmp_path)
    tls_port = free_port()
    broker = Mosquitto(tmp_path, listeners=(
        f"listener {tls_port} 127.0.0.1\nallow_anonymous true\ncafile {tmp_path}/ca.pem\n"
        f"certfile {tmp_path}/server.pem\nkeyfile {tmp_path}/server.key\n"
    )).start()
    try:
        sim = plant(plant_config())
        platform = PlatformSimulator("127.0.0.1", broker.port, "t")
        platform.start()
        store = tmp_path / "s.db"
        agent = agent_process(agent_config(sim.ports["c1"], store, port=tls_port,
                                           tls={"ca": str(tmp_path / "ca.pem")})).start()
        assert delivered(platform), agent.log()[-2000:]
        check_clean_run(platform, agent, store)
        platform.stop()
    finally:
        broker.stop()


@pytest.mark.timeout(90)
def test_wrong_password_is_refused_and_kept_then_the_right_one_delivers_all(
    tmp_path: Path, plant: Any, agent_process: Any
) -> None:
    secured = free_port()
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(tmp_path / "passwd"), "ipc-9", "s3cret"], check=True,
                   capture_output=True, timeout=30)
    (tmp_path / "passwd").chmod(0o644)
    broker = Mosquitto(tmp_path, listeners=(
        f"listener {secured} 127.0.0.1\nallow_anonymous false\npassword_file {tmp_path}/passwd\n"
    )).start()
    try:
        sim = plant(plant_config())
        platform = PlatformSimulator("127.0.0.1", broker.port, "t")
        platform.start()
        store = tmp_path / "s.db"
        config = agent_config(sim.ports["c1"], store, port=secured, username="ipc-9", password="wrong")
        agent = agent_process(config).start()
        wait_until(lambda: "broker refused the connection: Not authorized" in agent.log()
                   and stored_readings(store) > 0, 20, "the broker's refusal in the agent's log, readings in its store")
        assert agent.stop() == 0
        assert "broker refused the connection: Not authorized" in agent.log()
        assert platform.readings() == []
        with Store(store) as s:
            kept = s.backlog().readings
        assert kept > 0, "readings taken while refused must stay in the store"
        config["uplink"]["password"] = "s3cret"
        agent = agent_process(config).start()
        assert platform.wait_for(lambda p: any(r.hist for r in p.readings()) and len(p.readings()) >= kept, 30)
        check_clean_run(platform, agent, store)
        platform.stop()
    finally:
        broker.stop()


@pytest.mark.timeout(60)
def test_killed_agent_is_reported_offline_by_its_last_will(
    tmp_path: Path, broker: Mosquitto, plant: Any, agent_process: Any
) -> None:
    sim = plant(plant_config())
    platform = PlatformSimulator("127.0.0.1", broker.port, "t")
    platform.start()
    agent = agent_process(agent_config(sim.ports["c1"], tmp_path / "s.db", port=broker.port)).start()
    assert platform.wait_for(lambda p: any(s["online"] for s in p.statuses()), 20), agent.log()[-2000:]
    agent.kill9()
    assert platform.wait_for(lambda p: p.statuses()[-1]["online"] is False, 15)
    last = platform.statuses()[-1]
    assert "ts" not in last and last["agent"] == "ipc-9"
    platform.stop()


@pytest.mark.timeout(30)
def test_run_with_a_broken_config_exits_2_naming_the_field(tmp_path: Path, agent_process: Any) -> None:
    config = agent_config(502, tmp_path / "s.db", port=1883)
    config["channels"][0]["devices"][0]["points"][1]["order"] = "ABDC"
    agent = agent_process(config).start()
    assert agent.proc.wait(20) == 2
    assert "channels[0].devices[0].points[1].order: 'ABDC' is not one of" in agent.log()
    assert "Traceback" not in agent.log()


@pytest.mark.timeout(90)
def test_password_file_is_read_when_connecting_and_until_it_exists_readings_wait_in_the_store(
    tmp_path: Path, plant: Any, agent_process: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    secured = free_port()
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(tmp_path / "passwd"), "ipc-9", "s3cret-20261128"],
                   check=True, capture_output=True, timeout=30)
    (tmp_path / "passwd").chmod(0o644)
    broker = Mosquitto(tmp_path, listeners=(
        f"listener {secured} 127.0.0.1\nallow_anonymous false\npassword_file {tmp_path}/passwd\n"
    )).start()
    credentials = tmp_path / "credentials"  # what systemd's LoadCredential= makes, named by the same variable
    credentials.mkdir()
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    try:
        sim = plant(plant_config())
        platform = PlatformSimulator("127.0.0.1", broker.port, "t")
        platform.start()
        store = tmp_path / "s.db"
        agent = agent_process(agent_config(sim.ports["c1"], store, port=secured, username="ipc-9",
                                           password_file="${CREDENTIALS_DIRECTORY}/mqtt-password")).start()
        wait_until(lambda: f"password_file {credentials}/mqtt-password: No such file or directory" in agent.log()
                   and stored_readings(store) > 0, 20, "the missing password file in the log, readings in the store")
        assert platform.readings() == []
        (credentials / "mqtt-password").write_text("s3cret-20261128\n")
        assert platform.wait_for(lambda p: any(r.hist for r in p.readings()) and len(p.readings()) >= 10, 30), \
            agent.log()[-2000:]
        check_clean_run(platform, agent, store)
        platform.stop()
        assert "Traceback" not in agent.log() and "20261128" not in agent.log()
    finally:
        broker.stop()

"""`edge-agent doctor` and `support-bundle` against real parts: a mosquitto (plain, and TLS with a private CA), a
Modbus simulator, a dead port, the agent as a real process for the bundle."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import Mosquitto, free_port, wait_until
from test_scenarios import GAS, modbus_channel, site
from test_uplink_options import make_certificates

from agent.config.loader import validate_config_data

SECRET = "s3cr3t-20261128"


def doctor(config: dict[str, Any], folder: Path, *args: str) -> tuple[int, dict[str, dict[str, Any]]]:
    path = folder / "doctor.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True))
    run = subprocess.run([sys.executable, "-m", "agent", "doctor", "--config", str(path), "--json", *args],
                         capture_output=True, text=True, timeout=60)
    report = json.loads(run.stdout)
    assert SECRET not in run.stdout + run.stderr
    return run.returncode, {c["name"]: c for c in report["checks"]}


def test_an_unreachable_broker_fails_with_a_hint(tmp_path: Path) -> None:
    code, checks = doctor(site([], free_port(), tmp_path), tmp_path, "--no-devices")
    assert code == 1
    assert checks["config"]["verdict"] == "ok" and checks["store"]["verdict"] in ("ok", "warn")
    assert checks["broker DNS"]["verdict"] == "ok"
    assert checks["broker TCP"]["verdict"] == "fail" and checks["broker TCP"]["hint"]


@pytest.mark.timeout(90)
def test_a_wrong_ca_fails_the_tls_check_and_the_right_one_logs_in(tmp_path: Path) -> None:
    make_certificates(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    make_certificates(other)  # a CA that did not sign the broker's certificate
    tls_port = free_port()
    broker = Mosquitto(tmp_path, listeners=(
        f"listener {tls_port} 127.0.0.1\nallow_anonymous false\npassword_file {tmp_path}/passwd\n"
        f"cafile {tmp_path}/ca.pem\ncertfile {tmp_path}/server.pem\nkeyfile {tmp_path}/server.key\n"))
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(tmp_path / "passwd"), "agent", SECRET], check=True)
    broker.start()
    try:
        config = site([], tls_port, tmp_path)
        config["uplink"].update({"tls": {"ca": str(other / "ca.pem")}, "username": "agent", "password": SECRET})
        code, checks = doctor(config, tmp_path, "--no-devices")
        assert code == 1 and checks["broker TCP"]["verdict"] == "ok"
        assert checks["broker TLS"]["verdict"] == "fail" and "CA" in checks["broker TLS"]["hint"]
        config["uplink"]["tls"]["ca"] = str(tmp_path / "ca.pem")
        config["uplink"]["password"] = "wrong"
        code, checks = doctor(config, tmp_path, "--no-devices")
        assert checks["broker TLS"]["verdict"] == "ok" and checks["broker MQTT"]["verdict"] == "fail"
        config["uplink"]["password"] = SECRET
        code, checks = doctor(config, tmp_path, "--no-devices")
        assert checks["broker MQTT"]["verdict"] == "ok", checks
    finally:
        broker.stop()


@pytest.mark.timeout(90)
def test_each_device_is_read_once_a_dead_one_fails_and_the_bundle_holds_no_secret(
    tmp_path: Path, broker: Any, sims: Any, agent_process: Any
) -> None:
    from simulators.modbus import PlantSimulator

    live = modbus_channel([GAS])
    sim = sims.start(PlantSimulator(validate_config_data(site([live], 1, tmp_path), source="t", base_dir=None),
                                    ports={"c1": 0}))
    live["port"] = sim.ports["c1"]
    dead = {"id": "c2", "driver": "modbus_tcp", "host": "127.0.0.1", "port": free_port(),
            "devices": [{"id": "d2", "timeout": 0.3, "points": [{"id": "PT-9", "address": 0}]}]}
    config = site([live, dead], broker.port, tmp_path)
    code, checks = doctor(config, tmp_path)
    assert code == 1
    assert checks["device c1/d1"]["verdict"] == "ok" and checks["device c2/d2"]["verdict"] == "fail"
    assert checks["broker MQTT"]["verdict"] == "ok"

    config["uplink"]["password"] = SECRET  # anonymous broker: the password is only there to be redacted
    config["uplink"]["username"] = "agent"
    agent = agent_process(config).start()
    wait_until(lambda: Path(config["control"]["socket"]).exists(), 30, f"the control socket\n{agent.log()[-2000:]}")
    out = tmp_path / "bundle.tar.gz"
    run = subprocess.run([sys.executable, "-m", "agent", "support-bundle", "--config", str(agent.config_path),
                          "--output", str(out)], capture_output=True, text=True, timeout=90)
    assert run.returncode == 0, run.stderr
    with tarfile.open(out) as tar:
        files = {Path(m.name).name: tar.extractfile(m).read().decode() for m in tar.getmembers()}  # type: ignore[union-attr]
    assert set(files) >= {"config.yaml", "doctor.json", "versions.json", "journal.txt", "status.json",
                          "channels.json", "buffer.json"}
    assert all(SECRET not in text for text in files.values())
    assert "redacted" in files["config.yaml"]
    assert json.loads(files["status.json"])["ok"] and json.loads(files["channels.json"])["ok"]
    assert agent.stop() == 0

"""The demo a new user runs first: every part starts, data flow, and it reports that nothing was lost."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from simulators.demo import DEFAULT_CONFIG, find_mosquitto

PROTOCOLS = {"modbus_tcp", "modbus_rtu", "opcua", "dlt645"}  # the demo site uses all four


def run_demo(tmp_path: Path, *args: str) -> tuple[str, dict[str, Any]]:
    """Run `edge-agent demo` for 12 s; its output, and the summary it wrote as JSON."""
    summary = tmp_path / "summary.json"
    result = subprocess.run(
        [sys.executable, "-m", "agent", "demo", "--duration", "12", "--summary-json", str(summary), *args],
        capture_output=True, text=True, timeout=110,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout, json.loads(summary.read_text(encoding="utf-8"))


def assert_everything_delivered(summary: dict[str, Any]) -> None:
    assert summary["ok"] is True, summary["problems"]
    assert summary["problems"] == []
    assert summary["agent_exit_code"] == 0
    assert summary["counts"]["stored"] > 0
    assert summary["counts"]["lost"] == 0
    assert summary["lost_seq"] == []
    assert summary["counts"]["schema_errors"] == 0
    assert set(summary["valid_readings"]) == PROTOCOLS
    assert all(count > 0 for count in summary["valid_readings"].values()), summary["valid_readings"]


@pytest.mark.timeout(120)
def test_demo_uses_mosquitto_when_installed_delivers_everything_and_exits_0(tmp_path: Path) -> None:
    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed: run the README's test command, which installs it")
    stdout, summary = run_demo(tmp_path)
    assert summary["broker"] == "mosquitto"
    assert "broker: mosquitto on 127.0.0.1:" in stdout
    assert_everything_delivered(summary)
    assert "nothing lost" in stdout
    # the demo plays a frozen gas detector and a garbled frame, and shows each device's online rate
    assert summary["reasons"].get("frozen", 0) > 0 and summary["reasons"].get("spike", 0) > 0, summary["reasons"]
    assert "readings not good: frozen" in stdout and "online rate (last hour)" in stdout
    assert summary["online"] and all(rate is None or 0 <= rate <= 1 for rate in summary["online"].values())


@pytest.mark.timeout(120)
def test_demo_with_the_embedded_amqtt_broker_delivers_everything_and_exits_0(tmp_path: Path) -> None:
    stdout, summary = run_demo(tmp_path, "--broker", "embedded")
    assert summary["broker"] == "amqtt"
    assert "broker: amqtt (built in) on 127.0.0.1:" in stdout
    assert_everything_delivered(summary)
    assert "nothing lost" in stdout


@pytest.mark.timeout(60)
def test_embedded_broker_refuses_a_site_speaking_mqtt_5_before_starting_anything(tmp_path: Path) -> None:
    site = yaml.safe_load(DEFAULT_CONFIG.read_text(encoding="utf-8"))
    site["uplink"]["protocol"] = "5"  # amqtt speaks MQTT 3.1.1 only
    config = tmp_path / "site.yaml"
    config.write_text(yaml.safe_dump(site, allow_unicode=True), encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "agent", "demo", "--duration", "5", "--broker", "embedded", "--config", str(config)],
        capture_output=True, text=True, timeout=50,
    )
    assert result.returncode == 1
    assert "MQTT 3.1.1 only" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.timeout(30)
def test_demo_refuses_a_malformed_broker_address() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "agent", "demo", "--duration", "5", "--broker", "localhost"],
        capture_output=True, text=True, timeout=25,
    )
    assert result.returncode == 1
    assert "--broker must be HOST:PORT" in result.stderr


@pytest.mark.timeout(600)
def test_the_demo_runs_from_a_runtime_only_install_of_the_checkout(tmp_path: Path) -> None:
    """What scripts/demo.sh installs — the agent and its tooling, no test extras — runs the demo to exit 0, from a
    folder outside the checkout (a new user's first command)."""
    root = Path(__file__).resolve().parent.parent
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    install = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check",
                              str(root), str(root / "devtools")], capture_output=True, text=True, timeout=400)
    assert install.returncode == 0, install.stderr[-3000:]
    has_test_tools = subprocess.run([str(venv / "bin" / "python"), "-c", "import pytest"], capture_output=True)
    assert has_test_tools.returncode != 0, "a runtime-only install must not carry the test extras"
    summary = tmp_path / "summary.json"
    run = subprocess.run([str(venv / "bin" / "edge-agent"), "demo", "--duration", "30", "--summary-json",
                          str(summary)], capture_output=True, text=True, timeout=150, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert_everything_delivered(json.loads(summary.read_text(encoding="utf-8")))


@pytest.mark.timeout(180)
def test_the_field_commands_answer_against_the_demo_site(tmp_path: Path) -> None:
    """points, channels, buffer, doctor and support-bundle against the agent the demo runs, with the demo's own
    configuration (all four protocols)."""
    import re
    import time

    demo = subprocess.Popen([sys.executable, "-m", "agent", "demo", "--duration", "60"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert demo.stdout is not None
    try:
        workdir = None
        for line in demo.stdout:  # the demo names its folder when it starts the agent
            found = re.search(r"agent: pid \d+, log (\S+)/agent\.log", line)
            if found:
                workdir = Path(found.group(1))
                break
        assert workdir is not None, "the demo did not start the agent"
        config = str(workdir / "agent.yaml")

        def ask(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "agent", *args, "--config", config], capture_output=True,
                                  text=True, timeout=60)

        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:  # until every protocol's device has answered once
            run = ask("channels", "--json")
            if run.stdout and all(d["last_good_ts"] for c in json.loads(run.stdout)["channels"]
                                  for d in c["devices"]):
                break
            time.sleep(0.5)
        channels = json.loads(ask("channels", "--json").stdout)["channels"]
        assert {c["driver"] for c in channels} == PROTOCOLS
        points = json.loads(ask("points", "--json").stdout)
        assert points["count"] > 10 and any(p["quality"] == "good" for p in points["points"])
        buffer = ask("buffer", "--json")
        assert json.loads(buffer.stdout)["store"]["path"].endswith("store.db")
        doctor = json.loads(ask("doctor", "--json").stdout)
        names = {c["name"]: c["verdict"] for c in doctor["checks"]}
        assert names["config"] == "ok" and names["broker MQTT"] == "ok", doctor
        bundle = subprocess.run([sys.executable, "-m", "agent", "support-bundle", "--config", config, "--output",
                                 str(tmp_path / "b.tar.gz")], capture_output=True, text=True, timeout=90)
        assert bundle.returncode == 0, bundle.stderr
    finally:
        demo.terminate()
        demo.wait(60)

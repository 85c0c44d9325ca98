"""End to end: the plant simulator over Modbus TCP → the agent as a real process → a real mosquitto →
the platform simulator. Every message is checked against the schemas in docs/schemas by the platform.
"""

from __future__ import annotations

import copy
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.config.loader import load_config
from agent.store import Store
from simulators.platform import PlatformSimulator

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "example.yaml"
INTERVAL = 0.5

# engineering values set in the simulator, and what the platform must see
VALUES: dict[str, Any] = {
    "LT-101": 5.25, "TT-101": 130.0, "PT-101": 0.5, "LT-102": 3.75, "TT-102": 23.4, "PT-102": 0.8,
    "FT-101": 1234.56, "XV-101": True, "XS-101": False,
    "GT-201": 3.5, "GT-202": 0.0, "GT-203": 12.5, "GT-204": 2.5, "GT-201-F": True, "GT-202-F": False,
}


def site(ports: dict[str, int], broker_port: int, store: Path, **uplink: Any) -> dict[str, Any]:
    """The example site, pointed at the simulator and the test broker, with short intervals."""
    data = yaml.safe_load(EXAMPLE.read_text())
    data = copy.deepcopy(data)
    data["uplink"].pop("tls", None)  # the test broker is plain MQTT on loopback
    data["uplink"].update({"host": "127.0.0.1", "port": broker_port, "health_interval": 2,
                           "reconnect_min": 0.2, "reconnect_max": 1, "batch": {"max_readings": 500, "max_delay": 0.3},
                           **uplink})
    data["store"] = {"path": str(store), "shutdown_drain": 5}
    for channel in data["channels"]:
        channel["port"] = ports[channel["id"]]
        for device in channel["devices"]:
            device["interval"] = INTERVAL
            device["timeout"] = 0.5
            device["comm_loss"] = 2
            device["backoff_max"] = 1
    return data


def hold_values(plant: Any) -> None:
    for point, value in VALUES.items():
        plant.call(plant.sim.set_value, point, value)


@pytest.fixture
def running(tmp_path: Path, broker: Any, plant: Any, agent_process: Any) -> Any:
    """A plant holding VALUES, a platform subscribed, and an agent not yet started."""
    sim = plant(load_config(EXAMPLE))
    hold_values(sim)
    platform = PlatformSimulator("127.0.0.1", broker.port, "hjq")
    platform.start()
    store = tmp_path / "store.db"
    agent = agent_process(site(sim.ports, broker.port, store))
    yield sim, platform, agent, store
    platform.stop()


def per_point(platform: PlatformSimulator) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for reading in platform.readings():
        out.setdefault(reading.point, []).append(reading)
    return out


def assert_nothing_lost(platform: PlatformSimulator, store: Path) -> None:
    report = platform.report()
    agent = report.agent("ipc-01")
    assert agent is not None, "nothing arrived"
    assert platform.schema_errors() == []
    assert agent.seq_min == 1
    assert agent.gaps == []
    with Store(store) as s:
        assert s.backlog().messages == 0, "messages left undelivered in the store"
        assert s.last_seq() == agent.seq_max


def assert_no_missing_poll(platform: PlatformSimulator, points: list[str], slack: float = 2.6) -> None:
    """Consecutive sample times of each point are about one interval apart: no poll went missing."""
    for point, readings in per_point(platform).items():
        if point not in points:
            continue
        stamps = sorted({r.ts for r in readings})
        gaps = [b - a for a, b in itertools.pairwise(stamps) if b - a > INTERVAL * 1000 * slack]
        assert gaps == [], f"{point}: sample times jump by {gaps} ms"


@pytest.mark.timeout(90)
def test_platform_receives_every_reading_with_its_value_and_quality(running: Any) -> None:
    _, platform, agent, store = running
    agent.start()
    assert platform.wait_for(lambda p: all(len(v) >= 8 for v in per_point(p).values())
                             and len(per_point(p)) == len(VALUES), 30), agent.log()[-3000:]
    assert agent.stop_seen_by(platform) == 0
    latest = {point: readings[-1] for point, readings in per_point(platform).items()}
    for point, expected in VALUES.items():
        got = latest[point]
        if isinstance(expected, bool):
            assert got.value is expected, point
        else:
            assert got.value == pytest.approx(expected, rel=1e-6, abs=1e-9), point
        assert got.quality == ("uncertain" if point == "TT-101" else "good"), point
    assert_nothing_lost(platform, store)
    assert_no_missing_poll(platform, list(VALUES))
    alarms = {(a["id"], a["state"]) for a in platform.alarms()}
    assert ("TT-101/high", "raised") in alarms and ("TT-101/high_high", "raised") in alarms
    raised = next(a for a in platform.alarms() if a["id"] == "TT-101/high_high")
    assert (raised["value"], raised["limit"], raised["unit"], raised["level"]) == (130.0, 55.0, "°C", 2)
    statuses = platform.statuses()
    assert statuses[0]["online"] is True and statuses[-1]["online"] is False
    # the same readings are kept on site, and `edge-agent history` reads them back with no daemon
    for point in ("LT-101", "XV-101", "TT-101"):
        result = subprocess.run([sys.executable, "-m", "agent", "history", point, "--since", "10m",
                                 "--store", str(store), "--json"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        kept = [(r["ts"], r["value"], r["quality"]) for r in json.loads(result.stdout)["readings"]]
        sent = sorted((r.ts, r.value, r.quality) for r in per_point(platform)[point])
        assert [k[0] for k in kept] == [s[0] for s in sent], point
        for (_, kv, kq), (_, sv, sq) in zip(kept, sent, strict=True):
            assert kq == sq and (kv == sv if isinstance(sv, bool) else kv == pytest.approx(sv, rel=1e-6))
    assert platform.health(), "no health message"
    assert {c["id"]: c["link"] for c in platform.health()[-1]["channels"]} == {"tankfarm": "up", "gas-controller": "up"}


@pytest.mark.timeout(150)
def test_broker_outage_of_20s_loses_nothing_and_replays_as_hist(running: Any, broker: Any) -> None:
    _, platform, agent, store = running
    agent.start()
    assert platform.wait_for(lambda p: len(p.readings()) >= 60, 30), agent.log()[-3000:]
    outage_start = int(time.time() * 1000)
    broker.stop()
    time.sleep(20)  # the scenario: the broker stays down for 20 s
    outage_end = int(time.time() * 1000)
    broker.start()
    assert platform.wait_for(lambda p: p.connected, 20)

    def caught_up(p: PlatformSimulator) -> bool:
        return any(r.ts > outage_end + 2000 and not r.hist for r in p.readings()) and not p.report().has_gaps

    assert platform.wait_for(caught_up, 40), agent.log()[-3000:]
    assert agent.stop_seen_by(platform) == 0
    assert_nothing_lost(platform, store)
    assert_no_missing_poll(platform, list(VALUES))
    window = [r for r in platform.readings() if outage_start + 1500 < r.ts < outage_end - 1500]
    assert len(window) >= len(VALUES) * 30, "the outage window is not covered"
    assert all(r.hist for r in window), "readings stored during the outage must arrive flagged hist"


@pytest.mark.timeout(120)
def test_kill_9_and_restart_leaves_no_gap_in_seq(running: Any) -> None:
    _, platform, agent, store = running
    agent.start()
    assert platform.wait_for(lambda p: seq_max(p) >= 6, 30), agent.log()[-3000:]
    agent.kill9()
    killed_at = seq_max(platform)
    agent.start()
    assert platform.wait_for(lambda p: seq_max(p) >= killed_at + 6, 30), agent.log()[-3000:]
    assert agent.stop_seen_by(platform) == 0
    assert_nothing_lost(platform, store)
    assert "Traceback" not in agent.log()


@pytest.mark.timeout(120)
def test_device_that_stops_answering_gives_bad_readings_and_comm_loss_until_it_recovers(running: Any) -> None:
    sim, platform, agent, store = running
    agent.start()
    assert platform.wait_for(lambda p: len(per_point(p).get("GT-201", [])) >= 3, 30), agent.log()[-3000:]
    sim.call(sim.sim.set_channel_down, "gas-controller", True)

    def raised(p: PlatformSimulator) -> bool:
        seen = {(a["id"], a["state"]) for a in p.alarms()}
        return {("GT-201/comm_loss", "raised"), ("GT-204/comm_loss", "raised")} <= seen

    assert platform.wait_for(raised, 30), agent.log()[-3000:]
    bad = [r for r in per_point(platform)["GT-201"] if r.quality == "bad"]
    assert bad and all(r.value is None for r in bad)
    tank = [r for r in per_point(platform)["LT-101"] if r.ts > bad[0].ts]
    assert tank and all(r.quality == "good" for r in tank), "the other channel must go on"
    sim.call(sim.sim.set_channel_down, "gas-controller", False)

    def cleared(p: PlatformSimulator) -> bool:
        return ("GT-201/comm_loss", "cleared") in {(a["id"], a["state"]) for a in p.alarms()}

    assert platform.wait_for(cleared, 30), agent.log()[-3000:]
    assert platform.wait_for(lambda p: per_point(p)["GT-201"][-1].quality == "good", 10)
    assert agent.stop_seen_by(platform) == 0
    assert_nothing_lost(platform, store)
    assert "channel gas-controller device gds1: not answering" in agent.log()


def seq_max(platform: PlatformSimulator) -> int:
    agents = platform.report().agents
    return max((r.seq_max or 0 for r in agents.values()), default=0)


@pytest.mark.timeout(60)
def test_a_store_the_service_cannot_write_stops_the_start_with_the_reason(
    tmp_path: Path, broker: Any, agent_process: Any
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    ports = {c["id"]: 1 for c in yaml.safe_load(EXAMPLE.read_text())["channels"]}
    agent = agent_process(site(ports, broker.port, blocker / "store.db")).start()
    assert agent.proc is not None
    code = agent.proc.wait(30)
    agent.proc = None
    log = agent.log()
    assert code == 1, log
    assert "cannot use" in log and "memory_fallback" in log and "Traceback" not in log, log

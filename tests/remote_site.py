"""A site for the remote-configuration tests: a synthetic Modbus plant of a few channels, a real mosquitto, the
platform simulator (which signs pushes) and the agent as a process, with helpers to read what arrived."""

from __future__ import annotations

import copy
import itertools
import json
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from conftest import ROOT, wait_until

from agent.config.loader import validate_config_data
from simulators.modbus import synthetic_data
from simulators.platform import PlatformSimulator

AGENT = "bench"
ENTERPRISE = "000000000000"
PREFIX = "edge"
INTERVAL = 0.5


def plant_data(points: int = 60, channels: int = 3, per_device: int = 20, interval: float = INTERVAL) -> dict[str, Any]:
    """The whole plant: what the simulator serves (an agent's configuration may read only part of it)."""
    return synthetic_data(points, interval=interval, port=1, per_device=per_device, channels=channels)


def start_plant(plant: Any, data: dict[str, Any]) -> Any:
    return plant(validate_config_data(copy.deepcopy(data), source="<plant>", base_dir=None))


def site(data: dict[str, Any], sim: Any, broker_port: int, store: Path, key: str, **remote: Any) -> dict[str, Any]:
    """The agent's configuration of `data` (a plant_data), pointed at the simulator and the broker."""
    out = copy.deepcopy(data)
    for channel in out["channels"]:
        channel["port"] = sim.ports[channel["id"]]
        for device in channel["devices"]:
            device["timeout"] = 0.5
            device["comm_loss"] = 3
            device["backoff_max"] = 1
    # MQTT 5: the agent sees the retain flag of a push from its first delivery
    out["uplink"] = {"host": "127.0.0.1", "port": broker_port, "prefix": PREFIX, "health_interval": 1, "protocol": "5",
                     "reconnect_min": 0.2, "reconnect_max": 1, "batch": {"max_readings": 500, "max_delay": 0.3}}
    out["store"] = {"path": str(store), "shutdown_drain": 5}
    out["control"] = {"socket": str(store.parent / "control.sock")}
    out["remote_config"] = {"keys": [key], "confirm_within": 10, **remote}
    return out


def platform_for(broker_port: int) -> PlatformSimulator:
    platform = PlatformSimulator("127.0.0.1", broker_port, PREFIX)
    platform.start()
    return platform


def push(platform: PlatformSimulator, config: dict[str, Any], revision: int, **kwargs: Any) -> dict[str, Any]:
    answer = platform.push_config(ENTERPRISE, AGENT, config, revision, **kwargs)
    assert answer is not None, f"no config/result for revision {revision}"
    return answer


def final_result(platform: PlatformSimulator, push_id: str, timeout: float = 60) -> dict[str, Any]:
    """The result that ends a trial (applied or rolled_back)."""
    found: list[dict[str, Any]] = []

    def ended(p: PlatformSimulator) -> bool:
        found[:] = [r for r in p.config_results(push_id) if r["state"] in ("applied", "rolled_back")]
        return bool(found)

    assert platform.wait_for(ended, timeout), f"no end of the trial of {push_id}: {platform.config_results(push_id)}"
    return found[0]


def edge_agent(*args: str, timeout: float = 150) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def show(config_path: Path) -> dict[str, Any]:
    done = edge_agent("config", "show", "--json", "--config", str(config_path))
    assert done.returncode == 0, done.stderr
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


def points_of(data: dict[str, Any], channels: Iterable[str]) -> list[str]:
    wanted = set(channels)
    return [p["id"] for c in data["channels"] if c["id"] in wanted for d in c["devices"] for p in d["points"]]


def longest_gaps(platform: PlatformSimulator, points: Iterable[str], since: int, until: int) -> dict[str, float]:
    """Per point, the longest time (s) between two readings sampled within [since, until] (ms)."""
    wanted = set(points)
    stamps: dict[str, list[int]] = {p: [] for p in wanted}
    for reading in platform.readings():
        if reading.point in wanted and since <= reading.ts <= until:
            stamps[reading.point].append(reading.ts)
    out = {}
    for point, times in stamps.items():
        times = sorted(set(times))
        out[point] = max((b - a for a, b in itertools.pairwise(times)), default=float("inf")) / 1000
    return out


def wait_online(agent: Any, platform: PlatformSimulator, timeout: float = 40) -> None:
    wait_until(lambda: agent.seen_online_by(platform), timeout, f"the agent online\n{agent.log()[-3000:]}")


def seq_complete(platform: PlatformSimulator) -> bool:
    agents = platform.report().agents.values()
    return bool(agents) and all(a.seq_min == 1 and a.missing == 0 for a in agents)

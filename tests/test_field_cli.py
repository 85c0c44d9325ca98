"""The field engineer's commands against the agent as a real process: `points`, `channels` and `buffer` answer
over the control socket, as a table and as JSON, and exit 1 when what they show is bad (a dead device, readings
piling up while the broker is away)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, wait_until
from test_scenarios import GAS, modbus_channel, site

from agent.config.loader import validate_config_data


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, timeout=30)


def as_json(*args: str) -> tuple[int, dict[str, Any]]:
    run = cli(*args, "--json")
    return run.returncode, json.loads(run.stdout)


@pytest.mark.timeout(120)
def test_points_channels_and_buffer_show_a_dead_device_and_a_growing_backlog(
    tmp_path: Path, sims: Any, agent_process: Any
) -> None:
    from simulators.modbus import PlantSimulator

    live = modbus_channel([GAS])
    sim = sims.start(PlantSimulator(validate_config_data(site([live], 1, tmp_path), source="t", base_dir=None),
                                    ports={"c1": 0}))
    live["port"] = sim.ports["c1"]
    dead = {"id": "c2", "driver": "modbus_tcp", "host": "127.0.0.1", "port": free_port(),
            "devices": [{"id": "d2", "interval": 0.3, "timeout": 0.3, "backoff_max": 0.6,
                         "points": [{"id": "PT-9", "address": 0, "unit": "MPa"}]}]}
    data = site([live, dead], free_port(), tmp_path)  # no broker there: the backlog grows
    agent = agent_process(data).start()
    config = str(agent.config_path)
    wait_until(lambda: cli("points", "--config", config, "--json").returncode in (0, 1)
               and any(p["quality"] == "good" for p in as_json("points", "--config", config)[1]["points"]),
               30, f"a good reading through the control socket\n{agent.log()[-2000:]}")

    code, points = as_json("points", "--config", config)
    by_id = {p["point"]: p for p in points["points"]}
    assert code == 1 and by_id["GT-201"]["quality"] == "good" and by_id["PT-9"]["quality"] in ("bad", "never read")
    assert by_id["GT-201"]["unit"] == "%LEL" and by_id["GT-201"]["age_s"] is not None
    code, only_live = as_json("points", "--config", config, "--device", "d1")
    assert code == 0 and [p["point"] for p in only_live["points"]] == ["GT-201"]
    code, bad = as_json("points", "--config", config, "--bad")
    assert code == 1 and [p["point"] for p in bad["points"]] == ["PT-9"]
    table = cli("points", "--config", config)
    assert table.returncode == 1 and "GT-201" in table.stdout and "PT-9" in table.stdout

    code, channels = as_json("channels", "--config", config)
    devices = {d["id"]: (c, d) for c in channels["channels"] for d in c["devices"]}
    assert code == 1, "a dead device is a bad report"
    assert devices["d1"][1]["state"] == "ok" and devices["d1"][1]["round_trip_ms"] is not None
    assert devices["d2"][1]["state"] == "failing" and devices["d2"][1]["failures"] >= 1
    assert devices["d2"][1]["last_error"] and devices["d2"][0]["link"] == "down"
    assert "d2" in cli("channels", "--config", config).stdout

    wait_until(lambda: as_json("buffer", "--config", config, "--max-age", "1")[0] == 1, 20,
               "readings waiting longer than a second for the missing broker")
    code, report = as_json("buffer", "--config", config, "--max-age", "1")
    assert report["backlog"]["readings"] > 0 and any("wait" in p for p in report["problems"])
    code, calm = as_json("buffer", "--config", config, "--max-age", "3600")
    assert code == 0 and calm["problems"] == []
    assert cli("buffer", "--config", config).returncode == 0
    assert agent.stop() == 0


def test_the_commands_say_so_when_no_agent_runs(tmp_path: Path) -> None:
    for command in ("points", "channels", "buffer"):
        run = cli(command, "--socket", str(tmp_path / "none.sock"))
        assert run.returncode == 1 and "no agent answers" in run.stderr, run.stderr

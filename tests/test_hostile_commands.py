"""Hostile `cmd` messages against the agent as a real process, through a real mosquitto: nothing published on
`cmd` wedges the uplink, runs again because it was retained, or changes the production state it should not.
Data keep flowing with no seq gap and the next valid command is answered.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import now_ms, processed_past, wait_until
from test_scenarios import AGENT, ENTERPRISE, GAS, command, modbus_channel, site, start_all

from agent.config.loader import validate_config_data
from simulators.platform import PlatformSimulator

TOPIC = f"sc/{ENTERPRISE}/{AGENT}/cmd"


def plant(tmp_path: Path, sims: Any) -> dict[str, Any]:
    from simulators.modbus import PlantSimulator

    channel = modbus_channel([GAS])
    sim = sims.start(PlantSimulator(validate_config_data(site([channel], 1, tmp_path), source="t", base_dir=None),
                                    ports={"c1": 0}))
    channel["port"] = sim.ports["c1"]
    return channel


def publish(platform: PlatformSimulator, payload: bytes, *, retain: bool = False) -> None:
    client = platform._client
    assert client is not None
    client.publish(TOPIC, payload, qos=1, retain=retain).wait_for_publish(10)


def nested_state(cmd_id: str, depth: int = 1000) -> bytes:
    return (b'{"v": 1, "id": "' + cmd_id.encode() + b'", "cmd": "set_production_state", "state": '
            + b"[" * depth + b"]" * depth + b"}")


@pytest.mark.timeout(120)
def test_a_deeply_nested_command_plain_and_retained_never_wedges_the_uplink(
    tmp_path: Path, broker: Any, sims: Any, agent_process: Any
) -> None:
    channel = plant(tmp_path, sims)
    platform, agent = start_all(site([channel], broker.port, tmp_path), broker, agent_process)
    publish(platform, nested_state("deep-1"))
    assert platform.wait_for(lambda p: any(r["id"] == "deep-1" and not r["ok"] for r in p.command_results()), 15), \
        agent.log()[-2000:]
    mark = now_ms()
    wait_until(lambda: processed_past(platform, mark, "GT-201"), 20, "readings after the hostile command, no gap")
    assert command(platform, "after-1", cmd="status")["ok"], "the next command is answered"

    # retained: the broker hands it again at every (re)subscription, flagged retained; it must be refused then. (Its
    # first, live delivery carries no retain flag under MQTT 3.1.1 and cannot be told from a live command.)
    publish(platform, nested_state("deep-2"), retain=True)
    publish(platform, b'{"v": 1, "id": "ret-1", "cmd": "set_production_state", "state": "halted"}', retain=True)
    assert platform.wait_for(lambda p: any(r["id"] == "ret-1" for r in p.command_results()), 15)
    assert command(platform, "live-1", cmd="set_production_state", state="normal")["ok"]
    assert agent.stop() == 0
    agent = agent_process(site([channel], broker.port, tmp_path)).start()  # resubscribes: gets both retained
    assert platform.wait_for(
        lambda p: any(r["id"] == "ret-1" and not r["ok"] and "retained" in r["error"] for r in p.command_results())
        and any(r["id"] == "deep-2" and not r["ok"] for r in p.command_results()), 30), agent.log()[-2000:]
    mark = now_ms()
    wait_until(lambda: processed_past(platform, mark, "GT-201"), 20, "readings after the restart, no seq gap")
    status = command(platform, "after-2", cmd="status")
    assert status["ok"] and status["result"]["production_state"] == "normal", "a retained command never ran"
    assert "Traceback" not in agent.log()
    publish(platform, b"", retain=True)  # clear the retained message for the broker's next test
    assert agent.stop() == 0
    platform.stop()


@pytest.mark.timeout(120)
def test_a_replayed_command_does_not_run_again_after_a_restart(
    tmp_path: Path, broker: Any, sims: Any, agent_process: Any
) -> None:
    channel = plant(tmp_path, sims)
    data = site([channel], broker.port, tmp_path)
    platform, agent = start_all(data, broker, agent_process)
    assert command(platform, "h1", cmd="set_production_state", state="halted", ts=now_ms())["ok"]
    assert command(platform, "n1", cmd="set_production_state", state="normal", ts=now_ms())["ok"]
    assert agent.stop() == 0
    agent = agent_process(data).start()
    assert platform.wait_for(lambda p: sum(1 for s in p.statuses() if s.get("online")) >= 2, 30)
    platform.command(ENTERPRISE, AGENT, {"id": "h1", "cmd": "set_production_state", "state": "halted",
                                         "ts": now_ms() - 1})
    assert platform.wait_for(lambda p: sum(1 for r in p.command_results() if r["id"] == "h1") >= 2, 15)
    again = [r for r in platform.command_results() if r["id"] == "h1"][-1]
    assert not again["ok"] and "already used" in again["error"], "a replayed id is not done again"
    stale = command(platform, "h2", cmd="set_production_state", state="halted", ts=now_ms() - 3_600_000)
    assert not stale["ok"] and "old" in stale["error"]
    status = command(platform, "s1", cmd="status")
    assert status["result"]["production_state"] == "normal"
    assert agent.stop() == 0
    platform.stop()


@pytest.mark.timeout(60)
def test_with_mqtt_5_a_retained_command_is_refused_from_its_first_delivery(
    tmp_path: Path, broker: Any, sims: Any, agent_process: Any
) -> None:
    channel = plant(tmp_path, sims)
    data = site([channel], broker.port, tmp_path)
    data["uplink"]["protocol"] = "5"
    platform, agent = start_all(data, broker, agent_process)
    publish(platform, b'{"v": 1, "id": "r5", "cmd": "set_production_state", "state": "halted"}', retain=True)
    assert platform.wait_for(lambda p: any(r["id"] == "r5" for r in p.command_results()), 15)
    answer = next(r for r in platform.command_results() if r["id"] == "r5")
    assert not answer["ok"] and "retained" in answer["error"]
    assert command(platform, "s5", cmd="status")["result"]["production_state"] == "normal"
    assert agent.stop() == 0
    platform.stop()

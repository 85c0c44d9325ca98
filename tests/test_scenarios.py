"""Each domain scenario, played by a simulator against the agent as a real process, gives exactly the expected
events at the platform simulator; and the platform's commands (reset, production state) work end to end.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
from conftest import now_ms, processed_past

from agent.config.loader import validate_config_data
from simulators.platform import PlatformSimulator

ENTERPRISE, AGENT = "150625000123", "ipc-07"


def site(channels: list[dict[str, Any]], broker_port: int, tmp: Path, **extra: Any) -> dict[str, Any]:
    return {
        "agent": {"id": AGENT, "enterprise": ENTERPRISE},
        "uplink": {"host": "127.0.0.1", "port": broker_port, "prefix": "sc", "reconnect_min": 0.2,
                   "reconnect_max": 1, "health_interval": 5, "batch": {"max_delay": 0.3}},
        "store": {"path": str(tmp / "store.db"), "shutdown_drain": 5},
        "control": {"socket": str(tmp / "control.sock")},
        "channels": channels,
        **extra,
    }


def modbus_channel(points: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": "c1", "driver": "modbus_tcp", "host": "127.0.0.1", "port": 502,
            "devices": [{"id": "d1", "interval": 0.3, "timeout": 0.5, "points": points}]}


def events(platform: PlatformSimulator, point: str) -> list[tuple[str, str]]:
    return [(a["type"], a["state"]) for a in platform.alarms() if a["point"] == point]


def online(platform: PlatformSimulator) -> bool:
    return any(s.get("online") for s in platform.statuses())


def start_all(data: dict[str, Any], broker: Any, agent_process: Any) -> tuple[PlatformSimulator, Any]:
    platform = PlatformSimulator("127.0.0.1", broker.port, "sc")
    platform.start()
    agent = agent_process(data).start()
    assert platform.wait_for(online, 30), agent.log()[-2000:]
    return platform, agent


def command(platform: PlatformSimulator, cmd_id: str, **body: Any) -> dict[str, Any]:
    platform.command(ENTERPRISE, AGENT, {"id": cmd_id, **body})
    result = platform.result_of(cmd_id, 15)
    assert result is not None, f"no result for {cmd_id}"
    return result


GAS = {"id": "GT-201", "table": "input", "address": 0, "scale": 0.1, "unit": "%LEL", "domain": "gas",
       "range": [0, 100], "gas": {"kind": "combustible"}, "limits": {"deadband": 1, "delay": 1}}


@pytest.mark.timeout(150)
def test_gas_leak_raises_both_levels_latches_and_is_reset_by_the_platform(
    tmp_path: Path, broker: Any, sims: Any, agent_process: Any
) -> None:
    from simulators.modbus import PlantSimulator

    channel = modbus_channel([GAS])
    sim = sims.start(PlantSimulator(validate_config_data(site([channel], 1, tmp_path), source="t", base_dir=None),
                                    ports={"c1": 0}))
    channel["port"] = sim.ports["c1"]
    platform, agent = start_all(site([channel], broker.port, tmp_path), broker, agent_process)
    early = command(platform, "early", cmd="reset", alarm="GT-201/high")
    assert not early["ok"] and "not raised" in early["error"]
    sims.loop.run(sim.run_scenario("gas_leak", speed=4))
    ended = now_ms()  # the value is back below both limits: a clear (no delay) would be due by the next reading
    assert platform.wait_for(lambda p: any(r.point == "GT-201" and r.value < 20 for r in p.readings()[-5:]), 20)
    assert platform.wait_for(lambda p: processed_past(p, ended, "GT-201"), 20), agent.log()[-2000:]
    assert events(platform, "GT-201") == [("high", "raised"), ("high_high", "raised")], "latched: no clear"
    assert command(platform, "r1", cmd="reset", alarm="GT-201/high_high")["ok"]
    assert command(platform, "r2", cmd="reset", alarm="GT-201/high")["ok"]
    again = command(platform, "r2", cmd="reset", alarm="GT-201/high")
    assert again["ok"], "a repeated command id gets its first result, not a second reset"
    assert platform.wait_for(lambda p: len(events(p, "GT-201")) >= 4, 10)
    assert agent.stop() == 0
    assert events(platform, "GT-201") == [("high", "raised"), ("high_high", "raised"),
                                          ("high_high", "reset"), ("high", "reset")]
    raised = [a for a in platform.alarms() if a["state"] == "raised"]
    assert [(a["limit"], a["unit"], a["level"]) for a in raised] == [(25.0, "%LEL", 1), (50.0, "%LEL", 2)]
    assert platform.schema_errors() == []
    platform.stop()


@pytest.mark.timeout(120)
def test_detector_fault_is_reported_apart_from_the_concentration_alarms(
    tmp_path: Path, broker: Any, sims: Any, agent_process: Any
) -> None:
    from simulators.modbus import PlantSimulator

    fault = {"id": "GT-201-F", "table": "input", "address": 8, "type": "bool", "bit": 0, "fault_of": "GT-201"}
    channel = modbus_channel([GAS, fault])
    sim = sims.start(PlantSimulator(validate_config_data(site([channel], 1, tmp_path), source="t", base_dir=None),
                                    ports={"c1": 0}))
    channel["port"] = sim.ports["c1"]
    platform, agent = start_all(site([channel], broker.port, tmp_path), broker, agent_process)
    sims.loop.run(sim.run_scenario("detector_fault", speed=5))
    ended = now_ms()  # any other event of the scenario is due by then, a limit alarm one on-delay later
    assert platform.wait_for(lambda p: len(events(p, "GT-201")) >= 2, 10)
    due = ended + GAS["limits"]["delay"] * 1000
    assert platform.wait_for(lambda p: processed_past(p, due, "GT-201", "GT-201-F"), 15), agent.log()[-2000:]
    assert agent.stop() == 0
    assert events(platform, "GT-201") == [("fault", "raised"), ("fault", "cleared")]
    assert events(platform, "GT-201-F") == []
    assert platform.schema_errors() == []
    platform.stop()


@pytest.mark.timeout(150)
def test_tank_overfill_with_a_fast_rise_gives_rate_then_both_levels_each_cleared_once(
    tmp_path: Path, broker: Any, sims: Any, agent_process: Any
) -> None:
    from simulators.modbus import PlantSimulator

    level = {"id": "LT-101", "address": 0, "type": "float32", "unit": "m", "range": [0, 10],
             "limits": {"high": 8.5, "high_high": 9.2, "deadband": 0.05, "rate_rise": 10, "rate_window": 10}}
    channel = modbus_channel([level])
    sim = sims.start(PlantSimulator(validate_config_data(site([channel], 1, tmp_path), source="t", base_dir=None),
                                    ports={"c1": 0}))
    channel["port"] = sim.ports["c1"]
    platform, agent = start_all(site([channel], broker.port, tmp_path), broker, agent_process)
    sims.loop.run(sim.run_scenario("tank_overfill", speed=2))
    ended = now_ms()
    assert platform.wait_for(lambda p: ("high", "cleared") in events(p, "LT-101"), 20)
    # the rate is settled once a whole rate window of readings has followed the scenario's last move
    due = ended + level["limits"]["rate_window"] * 1000
    assert platform.wait_for(lambda p: processed_past(p, due, "LT-101"), 30), agent.log()[-2000:]
    assert agent.stop() == 0
    got = events(platform, "LT-101")
    for kind in ("rate", "high", "high_high"):
        assert [s for k, s in got if k == kind] == ["raised", "cleared"], got
    assert got.index(("rate", "raised")) < got.index(("high", "raised")) < got.index(("high_high", "raised"))
    assert got.index(("high_high", "cleared")) < got.index(("high", "cleared"))
    rate = next(a for a in platform.alarms() if a["type"] == "rate")
    assert rate["unit"] == "m/min" and rate["value"] >= 10 and rate["limit"] == 10
    platform.stop()


@pytest.mark.timeout(150)
def test_crowding_in_a_red_zone_over_its_duration(tmp_path: Path, broker: Any, sims: Any, agent_process: Any) -> None:
    from simulators.opcua import OpcUaSimulator

    channel = {"id": "loc", "driver": "opcua", "endpoint": "opc.tcp://127.0.0.1:4840/edge",
               "devices": [{"id": "zones", "interval": 0.5, "points": [
                   {"id": "HC-Z1", "node": "ns=2;s=Zone.Z1.HeadCount", "domain": "personnel", "unit": "人"}]}]}
    zones = [{"id": "Z1", "name": "罐区", "head_count": "HC-Z1", "limit": 6, "color": "red", "duration": 3}]
    config = validate_config_data(site([channel], 1, tmp_path, zones=zones), source="t", base_dir=None)
    sim = sims.start(OpcUaSimulator(config, folder=tmp_path / "opcua"))
    channel.update(sim.channel_overrides()["loc"])
    platform, agent = start_all(site([channel], broker.port, tmp_path, zones=zones), broker, agent_process)
    sims.loop.run(sim.run_scenario("crowding", speed=5))
    assert platform.wait_for(lambda p: len(events(p, "HC-Z1")) >= 2, 15), agent.log()[-2000:]
    assert agent.stop() == 0
    assert events(platform, "HC-Z1") == [("crowding", "raised"), ("crowding", "cleared")]
    raised = platform.alarms()[0]
    assert (raised["zone"], raised["color"], raised["limit"]) == ("Z1", "red", 6.0) and raised["value"] > 6
    assert platform.schema_errors() == []
    platform.stop()


@pytest.mark.timeout(150)
def test_production_during_an_ordered_shutdown_raises_halt_violation(
    tmp_path: Path, broker: Any, sims: Any, agent_process: Any
) -> None:
    from simulators.dlt645 import Dlt645BusSimulator

    channel = {"id": "meters", "driver": "dlt645", "port": "/dev/null", "baudrate": 9600,
               "devices": [{"id": "M1", "address": "000000000001", "interval": 0.5, "points": [
                   {"id": "EP-M1", "di": "00010000"}, {"id": "PW-M1", "di": "02030000"}]}]}
    power = {"meters": [{"id": "M1", "active_power": "PW-M1", "total_energy": "EP-M1", "idle_kw": 5,
                         "delay": 3, "daily_energy": "EP-M1.day"}]}
    config = validate_config_data(site([channel], 1, tmp_path, power=power), source="t", base_dir=None)
    sim = sims.start(Dlt645BusSimulator(config, folder=tmp_path))
    channel.update(sim.channel_overrides()["meters"])
    platform, agent = start_all(site([channel], broker.port, tmp_path, power=power), broker, agent_process)
    bad = command(platform, "s0", cmd="set_production_state", state="stopped")
    assert not bad["ok"] and "state" in bad["error"]
    assert command(platform, "s1", cmd="status")["result"]["production_state"] == "normal", "a refusal changes nothing"
    assert command(platform, "s2", cmd="set_production_state", state="halted")["ok"]
    sims.loop.run(sim.run_scenario("production_during_shutdown", speed=3))
    # released, the meter would go back to its production load, a new violation while halted: it keeps idling
    sims.loop.call(sim.set_value, "PW-M1", sim.idle_kw)
    ended = now_ms()
    assert platform.wait_for(lambda p: len(events(p, "PW-M1")) >= 2, 15), agent.log()[-2000:]
    due = ended + power["meters"][0]["delay"] * 1000  # a second violation would be due by then
    assert platform.wait_for(lambda p: processed_past(p, due, "PW-M1"), 15), agent.log()[-2000:]
    assert agent.stop() == 0
    assert events(platform, "PW-M1") == [("halt_violation", "raised"), ("halt_violation", "cleared")]
    daily = [r for r in platform.readings() if r.point == "EP-M1.day"]
    assert daily and daily[-1].value > 0 and all(b.value >= a.value for a, b in itertools.pairwise(daily))
    platform.stop()


@pytest.mark.timeout(90)
def test_malformed_and_unknown_commands_get_an_error_result_and_change_nothing(
    tmp_path: Path, broker: Any, sims: Any, agent_process: Any
) -> None:
    from simulators.modbus import PlantSimulator

    channel = modbus_channel([GAS])
    sim = sims.start(PlantSimulator(validate_config_data(site([channel], 1, tmp_path), source="t", base_dir=None),
                                    ports={"c1": 0}))
    channel["port"] = sim.ports["c1"]
    platform, agent = start_all(site([channel], broker.port, tmp_path), broker, agent_process)
    assert "unknown command 'explode'" in command(platform, "u1", cmd="explode")["error"]
    assert "alarm: required field is missing" in command(platform, "u2", cmd="reset")["error"]
    assert "no alarm 'NOPE/high'" in command(platform, "u3", cmd="reset", alarm="NOPE/high")["error"]
    assert "unknown field" in command(platform, "u4", cmd="status", extra=1)["error"]
    client0 = platform._client
    assert client0 is not None
    client0.publish(f"sc/{ENTERPRISE}/{AGENT}/cmd", b'{"v": 1, "id": 42, "cmd": "status"}', qos=1)
    assert platform.wait_for(lambda p: any(r["id"] is None and r["error"].startswith("id:")
                                           for r in p.command_results()), 10), "a numeric id is a bad id"
    client = platform._client
    assert client is not None
    client.publish(f"sc/{ENTERPRISE}/{AGENT}/cmd", b"{not json", qos=1)
    assert platform.wait_for(lambda p: any(r["id"] is None and "not JSON" in r["error"]
                                           for r in p.command_results()), 10)
    status = command(platform, "u5", cmd="status")
    assert status["ok"] and status["result"]["production_state"] == "normal" and status["result"]["alarms"] == []
    assert platform.schema_errors() == []
    assert agent.stop() == 0
    platform.stop()


@pytest.mark.timeout(120)
def test_field_engineer_lists_and_resets_a_latched_alarm_with_the_cli(
    tmp_path: Path, broker: Any, sims: Any, agent_process: Any
) -> None:
    import subprocess
    import sys

    from simulators.modbus import PlantSimulator

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "agent", *args, "--socket", str(tmp_path / "control.sock")],
                              capture_output=True, text=True, timeout=60)

    channel = modbus_channel([GAS])
    sim = sims.start(PlantSimulator(validate_config_data(site([channel], 1, tmp_path), source="t", base_dir=None),
                                    ports={"c1": 0}))
    channel["port"] = sim.ports["c1"]
    assert "no agent answers" in cli("alarms", "list").stderr
    platform, agent = start_all(site([channel], broker.port, tmp_path), broker, agent_process)
    sims.loop.call(sim.set_value, "GT-201", 30.0)
    assert platform.wait_for(lambda p: ("high", "raised") in events(p, "GT-201"), 15)
    sims.loop.call(sim.set_value, "GT-201", 2.0)
    assert platform.wait_for(lambda p: any(r.point == "GT-201" and r.value < 3 for r in p.readings()[-3:]), 10)
    assert agent.stop() == 0  # a restart keeps the latched alarm, without raising it again
    restarted = now_ms()
    agent = agent_process(site([channel], broker.port, tmp_path)).start()
    assert platform.wait_for(lambda p: sum(1 for s in p.statuses() if s.get("online")) >= 2, 30)
    due = restarted + GAS["limits"]["delay"] * 1000  # a raise from the restored state would be due by then
    assert platform.wait_for(lambda p: processed_past(p, due, "GT-201"), 20), agent.log()[-2000:]
    assert events(platform, "GT-201") == [("high", "raised")]
    listed = cli("alarms", "list")
    assert listed.returncode == 0 and "GT-201/high\tlatched" in listed.stdout
    refused = cli("alarms", "reset", "GT-201/low")
    assert refused.returncode == 1 and "no alarm 'GT-201/low'" in refused.stderr
    done = cli("alarms", "reset", "GT-201/high")
    assert done.returncode == 0, done.stderr
    assert platform.wait_for(lambda p: ("high", "reset") in events(p, "GT-201"), 10)
    status = cli("status")
    assert status.returncode == 0 and "alarms raised: none" in status.stdout and "uplink: connected" in status.stdout
    assert agent.stop() == 0
    platform.stop()

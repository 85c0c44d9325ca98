"""Data quality judged at the edge, against the agent as a real process, a Modbus simulator and the platform
simulator on a real mosquitto: a frozen value, a single-sample spike on a tank level (no high-high from it), a
confirmed step (accepted), a transmitter stuck at its range end, and a device answering every other poll.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import now_ms

from agent.config.loader import validate_config_data
from simulators.platform import PlatformSimulator

ENTERPRISE, AGENT = "150625000123", "ipc-dq"

LEVEL = {"id": "LT-101", "address": 0, "type": "float32", "unit": "m", "range": [0, 10],
         "limits": {"high_high": 9.0}, "quality": {"max_step": 2.0}}
TEMPERATURE = {"id": "TI-101", "address": 2, "type": "float32", "unit": "°C", "range": [0, 200],
               "quality": {"frozen_after": "2s", "epsilon": 0.001}}
PRESSURE = {"id": "PT-101", "address": 4, "type": "float32", "unit": "MPa", "range": [0, 10],
            "quality": {"range_end_delay": "1s"}}
FLOW = {"id": "FT-201", "address": 0, "type": "float32", "unit": "m3/h", "range": [0, 100]}


def site(broker_port: int, modbus_port: int, tmp: Path) -> dict[str, Any]:
    return {
        "agent": {"id": AGENT, "enterprise": ENTERPRISE},
        "uplink": {"host": "127.0.0.1", "port": broker_port, "prefix": "dq", "reconnect_min": 0.2,
                   "reconnect_max": 1, "health_interval": 2, "batch": {"max_delay": 0.2}},
        "store": {"path": str(tmp / "store.db"), "shutdown_drain": 5},
        "control": {"socket": str(tmp / "control.sock")},
        "channels": [{"id": "c1", "driver": "modbus_tcp", "host": "127.0.0.1", "port": modbus_port, "devices": [
            {"id": "d1", "unit": 1, "interval": 0.3, "timeout": 0.5, "points": [LEVEL, TEMPERATURE, PRESSURE]},
            {"id": "d2", "unit": 2, "interval": 0.5, "timeout": 0.2, "retries": 0, "points": [FLOW]},
        ]}],
    }


def readings(platform: PlatformSimulator, point: str, since: int = 0) -> list[Any]:
    return [r for r in platform.readings() if r.point == point and r.ts >= since]


def events(platform: PlatformSimulator, point: str) -> list[tuple[str, str]]:
    return [(a["type"], a["state"]) for a in platform.alarms() if a["point"] == point]


def online_of(report: dict[str, Any], device: str) -> dict[str, Any] | None:
    return next((d for d in report.get("online", []) if d["device"] == device), None)


@pytest.mark.timeout(180)
def test_frozen_spike_step_range_end_and_online_rate_judged_at_the_edge(
    tmp_path: Path, broker: Any, sims: Any, agent_process: Any
) -> None:
    from simulators.modbus import PlantSimulator

    sim = sims.start(PlantSimulator(validate_config_data(site(1, 1, tmp_path), source="t", base_dir=None),
                                    ports={"c1": 0}))
    platform = PlatformSimulator("127.0.0.1", broker.port, "dq")
    platform.start()
    sims.loop.call(sim.set_device_flaky, "c1", "d2", 2)  # from the first poll: every other request goes unanswered
    agent = agent_process(site(broker.port, sim.ports["c1"], tmp_path)).start()
    assert platform.wait_for(lambda p: readings(p, "LT-101"), 30), agent.log()[-2000:]

    # a value frozen (value and noise held): uncertain `frozen` after frozen_after, a data_quality alarm; it moves
    # again: cleared
    sims.loop.call(sim.set_value, "TI-101", 42.0)
    assert platform.wait_for(lambda p: any(r.reason == "frozen" for r in readings(p, "TI-101")), 20)
    assert platform.wait_for(lambda p: ("data_quality", "raised") in events(p, "TI-101"), 10)
    frozen = [r for r in readings(platform, "TI-101") if r.reason == "frozen"]
    assert all(r.quality == "uncertain" and r.value == 42.0 for r in frozen)
    sims.loop.call(sim.set_value, "TI-101", 43.5)
    assert platform.wait_for(lambda p: ("data_quality", "cleared") in events(p, "TI-101"), 10)

    # one garbled sample on the tank level, far above high-high: delivered `uncertain` with `spike`, no alarm
    sims.loop.call(sim.set_value, "LT-101", 5.0)
    held = now_ms()
    assert platform.wait_for(lambda p: len([r for r in readings(p, "LT-101", held) if r.value == 5.0]) >= 3, 10)
    sims.loop.call(sim.spike_once, "LT-101", 9.8)
    assert platform.wait_for(lambda p: any(r.value == 9.8 for r in readings(p, "LT-101")), 10)
    spike = [r for r in readings(platform, "LT-101") if r.value == 9.8]
    assert [(r.quality, r.reason) for r in spike] == [("uncertain", "spike")]
    after = spike[0].ts
    assert platform.wait_for(lambda p: len(readings(p, "LT-101", after + 1)) >= 3, 10)
    assert all(r.value == 5.0 and r.quality == "good" and r.reason is None
               for r in readings(platform, "LT-101", after + 1))
    assert ("high_high", "raised") not in events(platform, "LT-101"), "a single garbled frame raised high-high"

    # a real step to the same height: the first sample is a spike, the next confirms it: accepted, and alarmed
    sims.loop.call(sim.set_value, "LT-101", 9.5)
    assert platform.wait_for(lambda p: ("high_high", "raised") in events(p, "LT-101"), 10), agent.log()[-2000:]
    assert platform.wait_for(lambda p: len([r for r in readings(p, "LT-101") if r.value == 9.5]) >= 2, 10)
    step = [r for r in readings(platform, "LT-101") if r.value == 9.5]
    assert (step[0].quality, step[0].reason) == ("uncertain", "spike")
    assert all(r.quality == "good" for r in step[1:]) and len(step) >= 2

    # a transmitter stuck at the bottom of its range: `range_end` after range_end_delay, a data_quality alarm
    sims.loop.call(sim.set_value, "PT-101", 0.0)
    assert platform.wait_for(lambda p: any(r.reason == "range_end" for r in readings(p, "PT-101")), 10)
    assert platform.wait_for(lambda p: ("data_quality", "raised") in events(p, "PT-101"), 10)

    # the device answering every other poll: its online rate is about half, in health, by the platform's count too
    def rate_known(p: PlatformSimulator) -> bool:
        reports = p.health()
        found = online_of(reports[-1], "d2") if reports else None
        return found is not None and found["hour"]["expected"] >= 16

    assert platform.wait_for(rate_known, 30)
    d2 = online_of(platform.health()[-1], "d2")
    assert d2 is not None and 0.4 <= d2["hour"]["rate"] <= 0.6, d2
    d1 = online_of(platform.health()[-1], "d1")
    assert d1 is not None and d1["hour"]["rate"] > 0.5, d1  # frozen, spike and range end readings count as misses
    flow = readings(platform, "FT-201")
    good = sum(r.quality == "good" for r in flow)
    assert 0.35 <= good / len(flow) <= 0.65, (good, len(flow))
    assert all(r.reason == "comm" for r in flow if r.quality == "bad")

    assert agent.stop() == 0
    assert platform.schema_errors() == []
    platform.stop()

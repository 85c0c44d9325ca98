"""One run of the agent, as a real process, during which every hostile input arrives at once: commands nested
a thousand levels deep (plain and retained), an oversized message, a peer flooding an RTU-over-TCP channel, and
an OPC UA server stamping a value a day ahead. The agent keeps delivering every reading with no seq gap, the
rising OPC UA values raise their alarm, memory stays flat, and the next valid command is answered."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import free_port, now_ms, processed_past, wait_until
from test_hostile_commands import nested_state, publish
from test_link_bounds import FLOOD, wait_port_listening
from test_scenarios import GAS, command, modbus_channel, site, start_all

from agent.config.loader import validate_config_data

OPCUA_POINT = {"id": "TI-101", "node": "ns=2;i=1001", "range": [0, 200], "limits": {"high": 95}}


@pytest.mark.timeout(180)
def test_every_hostile_input_at_once_costs_nothing_of_what_the_agent_delivers(
    tmp_path: Path, broker: Any, sims: Any, agent_process: Any
) -> None:
    from simulators.modbus import PlantSimulator
    from simulators.opcua import OpcUaSimulator

    modbus = modbus_channel([GAS])
    plant = sims.start(PlantSimulator(validate_config_data(site([modbus], 1, tmp_path), source="t", base_dir=None),
                                      ports={"c1": 0}))
    modbus["port"] = plant.ports["c1"]
    opcua = {"id": "dcs", "driver": "opcua", "endpoint": "opc.tcp://127.0.0.1:4840/edge",
             "devices": [{"id": "watched", "mode": "subscribe", "interval": 0.2, "publishing_interval": 0.1,
                          "points": [OPCUA_POINT]}]}
    server = sims.start(OpcUaSimulator(validate_config_data(site([opcua], 1, tmp_path), source="t", base_dir=None),
                                       folder=tmp_path, period=3600))
    opcua["endpoint"] = server.channel_overrides()["dcs"]["endpoint"]
    flood_port = free_port()
    flood = subprocess.Popen([sys.executable, "-c", FLOOD, str(flood_port), "60"])
    flooded = {"id": "nport", "driver": "modbus_rtu_tcp", "host": "127.0.0.1", "port": flood_port,
               "devices": [{"id": "g9", "unit": 9, "interval": 0.5, "timeout": 0.3,
                            "points": [{"id": "GT-901", "table": "input", "address": 0}]}]}
    try:
        wait_port_listening(flood_port)
        sims.loop.call(server.set_value, "TI-101", 50.0)
        platform, agent = start_all(site([modbus, opcua, flooded], broker.port, tmp_path), broker, agent_process)
        assert agent.proc is not None
        process = psutil.Process(agent.proc.pid)
        start = now_ms()
        wait_until(lambda: processed_past(platform, start, "GT-201")
                   and any(r.point == "TI-101" and r.value == 50.0 for r in platform.readings()), 30,
                   f"readings of both devices\n{agent.log()[-2000:]}")
        rss_before = process.memory_info().rss

        publish(platform, nested_state("deep-plain"))
        publish(platform, nested_state("deep-retained"), retain=True)
        publish(platform, b'{"v": 1, "id": "huge", "cmd": "status", "pad": "' + b"x" * 2_000_000 + b'"}')
        sims.loop.call(server.set_clock, 86_400)  # one value stamped a day ahead ...
        sims.loop.call(server.set_value, "TI-101", 60.0)
        time.sleep(1)  # the future-stamped value is the scenario: it must be on the wire before the clock returns
        sims.loop.call(server.set_clock, 0)
        for value in (80.0, 96.0, 99.0):  # ... then rising values with correct times, past the high limit
            sims.loop.call(server.set_value, "TI-101", value)
            wait_until(lambda v=value: any(r.point == "TI-101" and r.value == v for r in platform.readings()), 20,
                       f"TI-101 = {value} at the platform")
        wait_until(lambda: any(a["point"] == "TI-101" and a["type"] == "high" and a["state"] == "raised"
                               for a in platform.alarms()), 20, "the high alarm of the rising OPC UA values")

        mark = now_ms()
        wait_until(lambda: processed_past(platform, mark, "GT-201"), 30,
                   f"readings after every hostile input, no seq gap\n{agent.log()[-3000:]}")
        assert command(platform, "next", cmd="status")["ok"], "the next valid command is answered"
        refused = {r["id"]: r for r in platform.command_results()}
        assert not refused["deep-plain"]["ok"] and not refused["deep-retained"]["ok"]
        assert "huge" not in refused, "an oversized message is dropped unread"
        growth = (process.memory_info().rss - rss_before) / 1e6
        assert growth < 40, f"RSS grew {growth:.0f} MB"
        wait_until(lambda: any((h.get("counters") or {}).get("oversized_dropped", 0) >= 1
                               and (h.get("counters") or {}).get("commands_refused", 0) >= 2
                               for h in platform.health()), 20, "health counts what was refused")
        devices = {d["id"]: d for h in platform.health()[-1:] for c in h["channels"] for d in c["devices"]}
        assert devices["watched"]["untrusted_timestamps"] >= 1
        assert devices["g9"]["state"] == "failing", "the flooded channel's device is bad, not silent"
        publish(platform, b"", retain=True)
        assert agent.stop() == 0
        report = platform.report()
        assert all(a.missing == 0 for a in report.agents.values()), report
        assert "Traceback" not in agent.log()
        platform.stop()
    finally:
        flood.kill()
        flood.wait(5)



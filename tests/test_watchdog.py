"""systemd's watchdog: the agent says it is alive only while its loop turns and readings go through the pipeline.
The agent as a real process, talking to a real datagram socket in the place of systemd's."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from test_scenarios import GAS, modbus_channel, site

from agent.app.systemd import Watchdog
from agent.config.loader import validate_config_data


def test_the_watchdog_stops_pinging_when_the_pipeline_stalls_and_resumes_when_it_moves() -> None:
    pings: list[float] = []
    progress = [0]

    async def main() -> tuple[int, int, int]:
        loop = asyncio.get_running_loop()
        dog = Watchdog(0.1, lambda: progress[0], stall=0.3, notify=lambda state: pings.append(loop.time()))
        task = asyncio.create_task(dog.run())
        for _ in range(10):  # moving: a reading every 50 ms
            progress[0] += 1
            await asyncio.sleep(0.05)
        moving = len(pings)
        await asyncio.sleep(0.6)  # stalled: no reading for twice the stall bound
        cut = len(pings)
        await asyncio.sleep(0.3)
        stalled = len(pings) - cut
        progress[0] += 1
        await asyncio.sleep(0.2)
        task.cancel()
        return moving, stalled, len(pings) - cut - stalled

    moving, stalled, again = asyncio.run(main())
    assert moving >= 5, "pings every half period while readings flow"
    assert stalled == 0, "no ping while the pipeline makes no progress"
    assert again >= 1, "pings again once it moves"


class FakeSystemd:
    """A datagram socket where the agent's sd_notify messages arrive, with their arrival times."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)

    def collect(self, seconds: float) -> list[tuple[float, str]]:
        out: list[tuple[float, str]] = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            with contextlib.suppress(TimeoutError):
                out.append((time.monotonic(), self.sock.recv(256).decode()))
        return out

    def close(self) -> None:
        self.sock.close()


@pytest.mark.timeout(90)
def test_a_running_agent_pings_and_a_stopped_loop_does_not(
    tmp_path: Path, broker: Any, sims: Any, agent_process: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from simulators.modbus import PlantSimulator

    channel = modbus_channel([GAS])
    sim = sims.start(PlantSimulator(validate_config_data(site([channel], 1, tmp_path), source="t", base_dir=None),
                                    ports={"c1": 0}))
    channel["port"] = sim.ports["c1"]
    systemd = FakeSystemd(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(systemd.path))
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    agent = agent_process(site([channel], broker.port, tmp_path)).start()
    try:
        first = systemd.collect(4)
        states = [s for _, s in first]
        assert "READY=1" in states, agent.log()[-2000:]
        assert states.count("WATCHDOG=1") >= 4, states
        assert agent.proc is not None
        os.kill(agent.proc.pid, signal.SIGSTOP)  # the loop blocked: nothing may say it is alive
        frozen = systemd.collect(2.5)
        os.kill(agent.proc.pid, signal.SIGCONT)
        assert not [s for _, s in frozen if s == "WATCHDOG=1"]
        after = systemd.collect(2)
        assert [s for _, s in after].count("WATCHDOG=1") >= 2, "alive again once the loop turns"
        assert agent.stop() == 0
    finally:
        systemd.close()

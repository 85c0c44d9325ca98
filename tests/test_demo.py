"""The demo a new user runs first: every part starts, data flow, and it reports that nothing was lost."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.timeout(120)
def test_demo_with_the_embedded_broker_delivers_everything_and_exits_0() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "agent", "demo", "--duration", "12", "--broker", "embedded"],
        capture_output=True, text=True, timeout=110,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "the embedded broker" in result.stdout
    assert "nothing lost" in result.stdout
    assert "seq gaps (lost)" in result.stdout
    for protocol in ("modbus_tcp", "modbus_rtu", "opcua", "dlt645"):  # config/demo.yaml uses all four
        line = next(line for line in result.stdout.splitlines() if f"valid readings via {protocol}" in line)
        assert int(line.split("│")[-2].strip()) > 0, line


@pytest.mark.timeout(30)
def test_demo_refuses_a_malformed_broker_address() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "agent", "demo", "--duration", "5", "--broker", "localhost"],
        capture_output=True, text=True, timeout=25,
    )
    assert result.returncode == 1
    assert "--broker must be HOST:PORT" in result.stderr

"""`edge-agent probe dlt645` as a field engineer runs it (a real process on a real pty) against the meter simulator:
a read, discovery, --json, and a clear message and exit code for every way it can fail."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config.loader import validate_config_data
from agent.config.models import AgentConfig
from simulators.dlt645 import Dlt645BusSimulator

ROOT = Path(__file__).resolve().parent.parent
# read DI 00010000 of meter 123456789012, worked by hand in tests/test_dlt645.py (checksum 68H), 4 wake-up bytes
READ_ENERGY = "fe fe fe fe 68 12 90 78 56 34 12 68 11 04 33 33 34 33 68 16"


class SimThread:
    """The simulator on its own event loop in a thread, so the probe can run as a child process meanwhile."""

    def __init__(self, config: AgentConfig, folder: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="meters")
        self.sim = Dlt645BusSimulator(config, folder=folder, response_delay=0.02, seed=5)
        self.thread.start()
        self._run(self.sim.start())

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(20)

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        async def invoke() -> Any:
            return fn(*args, **kwargs)

        return self._run(invoke())

    def port(self, channel: str = "bus") -> str:
        return str(self.sim.paths[channel])

    def stop(self) -> None:
        try:
            self._run(self.sim.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


def site(*addresses: str) -> AgentConfig:
    devices = [{"id": f"m{n}", "address": address,
                "points": [{"id": f"E{n}", "di": "00010000"}, {"id": f"P{n}", "di": "02030000"}]}
               for n, address in enumerate(addresses, 1)]
    return validate_config_data({"agent": {"id": "t", "enterprise": "e"}, "channels": [
        {"id": "bus", "driver": "dlt645", "port": "/dev/null", "baudrate": 19200, "devices": devices}]},
        source="test", base_dir=None)


@pytest.fixture
def meters(tmp_path: Path) -> Iterator[Callable[..., SimThread]]:
    started: list[SimThread] = []

    def make(*addresses: str) -> SimThread:
        folder = tmp_path / f"bus{len(started)}"
        started.append(SimThread(site(*addresses), folder))
        return started[-1]

    yield make
    for sim in started:
        sim.stop()


def probe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", "probe", "dlt645", *args], capture_output=True,
                          text=True, timeout=30, cwd=ROOT)


def as_json(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout + result.stderr
    parsed: dict[str, Any] = json.loads(lines[0])
    return parsed


@pytest.mark.timeout(60)
def test_probe_reads_a_value_with_its_unit(meters: Callable[..., SimThread]) -> None:
    bus = meters("123456789012", "000000000002")
    bus.call(bus.sim.set_value, "P1", -12.3456)
    result = probe(bus.port(), "--address", "123456789012", "--di", "02030000", "--baud", "19200")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "meter 123456789012 DI 02030000 total active power: -12.3456 kW"


@pytest.mark.timeout(60)
def test_probe_json_carries_value_quality_request_frame_and_address(meters: Callable[..., SimThread]) -> None:
    bus = meters("123456789012")
    energy = bus.call(bus.sim.value, "E1")
    result = probe(bus.port(), "--address", "123456789012", "--di", "00010000", "--baud", "19200", "--json")
    assert result.returncode == 0, result.stderr
    answer = as_json(result)
    assert answer["quality"] == "good" and answer["unit"] == "kWh" and answer["address"] == "123456789012"
    assert answer["value"] == pytest.approx(energy, abs=0.05)
    assert answer["request"] == READ_ENERGY
    frame = bytes.fromhex(answer["frame"])
    assert frame[:10] == bytes.fromhex("68 12 90 78 56 34 12 68 91 08") and frame[-1] == 0x16


@pytest.mark.timeout(60)
def test_probe_discovers_the_address_of_the_only_meter(meters: Callable[..., SimThread]) -> None:
    bus = meters("681668166816")
    result = probe(bus.port(), "--discover", "--baud", "19200")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("meter address 681668166816")
    answer = as_json(probe(bus.port(), "--discover", "--baud", "19200", "--json"))
    assert answer["address"] == answer["value"] == "681668166816" and answer["quality"] == "good"
    assert answer["request"] == "fe fe fe fe 68 aa aa aa aa aa aa 68 13 00 df 16"


@pytest.mark.timeout(60)
def test_probe_failures_say_what_failed_and_exit_1(meters: Callable[..., SimThread], tmp_path: Path) -> None:
    bus = meters("123456789012", "000000000002")
    port = bus.port()
    read = ("--address", "123456789012", "--di", "00010000", "--baud", "19200", "--timeout", "0.3")

    bus.call(bus.sim.set_meter_dead, "bus", "m1", True)
    dead = probe(port, *read)
    answer = as_json(probe(port, *read, "--json"))
    bus.call(bus.sim.set_meter_dead, "bus", "m1", False)
    assert dead.returncode == 1 and "no reply within" in dead.stderr and "meter 123456789012" in dead.stderr
    assert answer["kind"] == "timeout" and answer["quality"] == "bad" and answer["request"] == READ_ENERGY

    unknown = probe(port, "--address", "123456789012", "--di", "04000401", "--baud", "19200", "--json")
    assert unknown.returncode == 1
    answer = as_json(unknown)
    assert answer["kind"] == "error_reply" and answer["error_bits"] == ["no data requested"]
    assert answer["error_code"] == 2 and "no data requested" in answer["error"]

    for fault, kind, words in (("bad_checksum", "checksum", "checksum"),
                               ("truncated", "truncated", "truncated reply"),
                               ("wrong_address", "wrong_reply", "ignored a reply from meter 000000000002")):
        bus.call(bus.sim.inject, "bus", fault)
        text = probe(port, *read)
        bus.call(bus.sim.inject, "bus", fault)
        answer = as_json(probe(port, *read, "--json"))
        assert text.returncode == 1 and words in text.stderr, (fault, text.stderr)
        assert answer["kind"] == kind and words in answer["error"], (fault, answer)

    missing = probe(str(tmp_path / "ttyUSB9"), *read)
    assert missing.returncode == 1 and "cannot open serial port" in missing.stderr and "ttyUSB9" in missing.stderr
    collision = probe(port, "--discover", "--baud", "19200", "--timeout", "0.3")
    assert collision.returncode == 1 and "several meters" in collision.stderr
    # after all that the bus still answers
    assert probe(port, *read).returncode == 0


@pytest.mark.timeout(60)
def test_probe_rejects_bad_arguments_with_exit_2(tmp_path: Path) -> None:
    port = str(tmp_path / "ttyS0")  # never opened: the arguments are checked first
    cases = [
        (["--address", "12345", "--di", "00010000"], "12 decimal digits"),
        (["--address", "123456789012", "--di", "0001"], "8 hex digits"),
        (["--address", "123456789012", "--di", "0001000G"], "8 hex digits"),
        (["--address", "123456789012"], "give --address and --di"),
        (["--address", "123456789012", "--di", "00010000", "--baud", "fast"], "--baud must be a whole number"),
        (["--address", "123456789012", "--di", "00010000", "--parity", "X"], "--parity"),
        (["--address", "123456789012", "--di", "00010000", "--timeout", "0"], "--timeout"),
        (["--address", "123456789012", "--di", "04000401", "--format", "4;2"], "--format"),
        (["--discover", "--address", "123456789012"], "leave out --address"),
    ]
    for args, words in cases:
        result = probe(port, *args)
        assert result.returncode == 2 and words in result.stderr, (args, result.stderr)
    answer = as_json(probe(port, "--address", "12345", "--di", "00010000", "--json"))
    assert answer["kind"] == "arguments" and "12 decimal digits" in answer["error"]
    unknown_option = probe(port, "--address", "123456789012", "--frobnicate", "--json")
    assert unknown_option.returncode == 2 and as_json(unknown_option)["kind"] == "arguments"

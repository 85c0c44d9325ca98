"""`edge-agent probe modbus` against the simulators, over every URL form: a pty for rtu://, TCP sockets for
rtu+tcp:// and tcp://; the `--json` shape, and a plain message and a non-zero exit for every kind of failure.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from agent.cli.main import main
from agent.config.loader import validate_config_data
from agent.config.models import AgentConfig
from simulators.modbus_rtu import RtuBusSimulator


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def site(*channels: dict[str, Any]) -> AgentConfig:
    return validate_config_data({"agent": {"id": "t", "enterprise": "e"}, "channels": list(channels)},
                                source="test", base_dir=None)


def controller(unit: int) -> dict[str, Any]:
    return {"id": f"g{unit}", "unit": unit, "points": [
        {"id": f"GT-{unit}", "address": 0, "type": "float32", "order": "CDAB", "domain": "gas", "unit": "%LEL",
         "range": [0, 100]},
        {"id": f"N-{unit}", "address": 2, "type": "uint16"},
        {"id": f"M-{unit}", "address": 3, "type": "uint16"},
        {"id": f"ALM-{unit}", "table": "coil", "address": 0, "type": "bool"},
        {"id": f"FLT-{unit}", "table": "coil", "address": 1, "type": "bool"},
        {"id": f"RUN-{unit}", "table": "coil", "address": 2, "type": "bool"},
    ]}


CONFIG = site(
    {"id": "bus", "driver": "modbus_rtu", "port": "/dev/null", "baudrate": 19200, "parity": "E",
     "devices": [controller(1), controller(2)]},
    {"id": "nport", "driver": "modbus_rtu_tcp", "host": "127.0.0.1", "port": 4001, "devices": [controller(5)]},
)


class BusThread:
    """The RTU simulator on its own event loop in a thread, since the probe runs its own loop."""

    def __init__(self, config: AgentConfig, folder: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="rtu bus")
        self.sim = RtuBusSimulator(config, folder=folder, seed=3)

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(20)

    def call(self, fn: Any, *args: Any) -> Any:
        async def invoke() -> Any:
            return fn(*args)

        return self.run(invoke())

    def start(self) -> BusThread:
        self.thread.start()
        self.run(self.sim.start())
        return self

    def stop(self) -> None:
        try:
            self.run(self.sim.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


@pytest.fixture
def bus(tmp_path: Path) -> Iterator[BusThread]:
    thread = BusThread(CONFIG, tmp_path).start()
    thread.call(thread.sim.set_value, "GT-1", 12.5)
    thread.call(thread.sim.set_value, "N-1", 4660)
    thread.call(thread.sim.set_value, "M-1", 7)
    thread.call(thread.sim.set_value, "FLT-1", True)
    thread.call(thread.sim.set_value, "GT-5", 3.25)
    thread.call(thread.sim.set_value, "ALM-5", True)
    thread.call(thread.sim.set_slave_dead, "bus", "g2", True)
    yield thread
    thread.stop()


def rtu_url(bus: BusThread) -> str:
    return f"rtu://{bus.sim.channel_overrides()['bus']['port']}?baud=19200&parity=E&stopbits=1"


def tcp_url(bus: BusThread) -> str:
    return f"rtu+tcp://127.0.0.1:{bus.sim.channel_overrides()['nport']['port']}"


def probe(*args: str) -> Result:
    return CliRunner().invoke(main, ["probe", "modbus", *args], catch_exceptions=False)


def probe_json(*args: str) -> tuple[int, dict[str, Any]]:
    result = probe(*args, "--json")
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout
    return result.exit_code, json.loads(lines[0])


def words(value: float, order: str) -> list[int]:
    """The two registers of a float32 in a byte order, worked out here rather than by the agent's codec."""
    a, b, c, d = struct.pack(">f", value)
    wire = {"ABCD": (a, b, c, d), "CDAB": (c, d, a, b), "BADC": (b, a, d, c), "DCBA": (d, c, b, a)}[order]
    return [wire[0] << 8 | wire[1], wire[2] << 8 | wire[3]]


# --- answers ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_a_typed_value_over_a_serial_port_with_its_line_settings_in_the_url(bus: BusThread) -> None:
    code, answer = probe_json(rtu_url(bus), "--unit", "1", "--address", "0", "--type", "float32", "--order", "CDAB")
    assert code == 0, answer
    assert answer["value"] == pytest.approx(12.5)
    assert answer["quality"] == "good"
    assert answer["raw"] == words(12.5, "CDAB")
    assert "values" not in answer

    result = probe(rtu_url(bus), "--unit", "1", "--address", "0", "--type", "float32", "--order", "CDAB")
    assert result.exit_code == 0
    assert "float32 CDAB = 12.5" in result.stdout
    assert "0x" in result.stdout  # the raw registers beside the value


@pytest.mark.timeout(30)
def test_several_registers_without_a_type_are_a_list_and_one_register_is_a_number(bus: BusThread) -> None:
    code, answer = probe_json(rtu_url(bus), "--unit", "1", "--address", "2", "--count", "2")
    assert code == 0, answer
    assert answer["values"] == [4660, 7] and answer["raw"] == [4660, 7]
    assert "value" not in answer

    code, answer = probe_json(rtu_url(bus), "--unit", "1", "--address", "2")
    assert code == 0
    assert answer["value"] == 4660 and answer["raw"] == [4660]

    readable = probe(rtu_url(bus), "--unit", "1", "--address", "2", "--count", "2").stdout
    assert "2: 4660 (0x1234)" in readable and "3: 7 (0x0007)" in readable


@pytest.mark.timeout(30)
def test_bits_and_registers_over_rtu_frames_on_tcp(bus: BusThread) -> None:
    code, answer = probe_json(tcp_url(bus), "--unit", "5", "--table", "coil", "--address", "0")
    assert code == 0, answer
    assert answer["value"] is True and answer["raw"] == [1]

    code, answer = probe_json(tcp_url(bus), "--unit", "5", "--table", "coil", "--address", "0", "--count", "3")
    assert code == 0
    assert answer["values"] == [True, False, False] and answer["raw"] == [1, 0, 0]

    code, answer = probe_json(tcp_url(bus), "--unit", "5", "--address", "0", "--count", "2", "--type", "float32",
                              "--order", "CDAB")
    assert code == 0
    assert answer["value"] == pytest.approx(3.25)


@pytest.mark.timeout(30)
def test_serial_bits_read_the_same_through_the_port(bus: BusThread) -> None:
    code, answer = probe_json(rtu_url(bus), "--unit", "1", "--table", "coil", "--address", "0", "--count", "2")
    assert code == 0, answer
    assert answer["values"] == [False, True]


@pytest.mark.timeout(30)
def test_modbus_tcp_through_the_tcp_driver(plant: Any) -> None:
    config = site({"id": "plc", "driver": "modbus_tcp", "host": "127.0.0.1", "port": 502, "devices": [
        {"id": "p1", "unit": 1, "points": [{"id": "LT-101", "address": 10, "type": "float32", "unit": "m",
                                            "range": [0, 20]}]}]})
    served = plant(config)
    served.call(served.sim.set_value, "LT-101", 8.75)
    url = f"tcp://127.0.0.1:{served.ports['plc']}"
    code, answer = probe_json(url, "--unit", "1", "--address", "10", "--type", "float32")
    assert code == 0, answer
    assert answer["value"] == pytest.approx(8.75)
    assert answer["raw"] == words(8.75, "ABCD")

    code, answer = probe_json(url, "--unit", "1", "--address", "1000")
    assert code == 1
    assert answer["failure"] == "exception" and answer["exception"] == 2


# --- failures --------------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_a_dead_slave_is_a_timeout(bus: BusThread) -> None:
    code, answer = probe_json(rtu_url(bus), "--unit", "2", "--address", "0", "--timeout", "0.3")
    assert code == 1
    assert answer["failure"] == "timeout" and answer["quality"] == "bad"
    assert "timeout: no reply within 0.3s from unit 2" in answer["error"]

    result = probe(rtu_url(bus), "--unit", "2", "--address", "0", "--timeout", "0.3")
    assert result.exit_code == 1
    assert result.stderr.startswith("edge-agent probe: timeout")


@pytest.mark.timeout(30)
def test_an_exception_reply_gives_its_code_and_name(bus: BusThread) -> None:
    code, answer = probe_json(rtu_url(bus), "--unit", "1", "--address", "300")
    assert code == 1
    assert answer["failure"] == "exception"
    assert answer["exception"] == 2 and answer["exception_name"] == "illegal data address"
    assert "Modbus exception 2 (illegal data address)" in answer["error"]


@pytest.mark.timeout(30)
def test_a_bad_crc_is_reported_as_such(bus: BusThread) -> None:
    bus.call(bus.sim.inject_fault, "bus", "g1", "bad_crc")
    code, answer = probe_json(rtu_url(bus), "--unit", "1", "--address", "0")
    assert code == 1
    assert answer["failure"] == "crc" and "CRC error" in answer["error"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("scheme", ["tcp", "rtu+tcp"])
def test_a_refused_connection_names_the_endpoint(scheme: str) -> None:
    port = free_port()
    code, answer = probe_json(f"{scheme}://127.0.0.1:{port}", "--address", "0")
    assert code == 1
    assert answer["failure"] == "refused"
    assert answer["error"] == f"connection refused by 127.0.0.1:{port}"


@pytest.mark.timeout(30)
def test_a_missing_serial_port_says_it_cannot_open_it(tmp_path: Path) -> None:
    code, answer = probe_json(f"rtu://{tmp_path}/ttyNOPE", "--address", "0")
    assert code == 1
    assert answer["failure"] == "connection" and "cannot open serial port" in answer["error"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("url", ["http://127.0.0.1:502", "tcp://:502", "rtu+tcp://127.0.0.1", "rtu://host/dev/tty",
                                 "rtu:///dev/ttyS0?speed=9600", "rtu:///dev/ttyS0?baud=fast", "tcp://h:99999"])
def test_a_bad_url_exits_2_and_says_which_forms_work(url: str) -> None:
    code, answer = probe_json(url, "--address", "0")
    assert code == 2
    assert answer["failure"] == "url" and answer["error"].startswith(f"bad URL {url!r}")
    result = probe(url, "--address", "0")
    assert result.exit_code == 2 and "bad URL" in result.stderr


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--table", "bogus"], "'bogus' is not one of"),
        (["--type", "float32", "--count", "3"], "--type float32 takes 2 register(s)"),
        (["--table", "coil", "--type", "int16"], "--type can only be bool"),
        (["--type", "bool"], "needs `bit`"),
        (["--unit", "0"], "unit"),
        (["--count", "126"], "--count must be 1..125"),
    ],
)
def test_bad_arguments_exit_2_with_one_json_object(args: list[str], expected: str) -> None:
    code, answer = probe_json("rtu:///dev/ttyS0", "--address", "0", *args)
    assert code == 2
    assert answer["failure"] == "argument" and expected in answer["error"], answer

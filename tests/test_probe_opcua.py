"""`edge-agent probe opcua` against the OPC UA simulator run as its own process (`python -m simulators.opcua`):
reading, browsing, --json, security, and a clear message with a non-zero exit for every failure.
"""

from __future__ import annotations

import json
import queue
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from agent.cli.main import main

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Served:
    endpoint: str
    server_cert: Path
    client_cert: Path
    client_key: Path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    folder = tmp_path_factory.mktemp("opcua-cli")
    proc = subprocess.Popen(
        [sys.executable, "-m", "simulators.opcua", "--port", "0", "--folder", str(folder), "--period", "3600",
         "--user", "operator:s3cret"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    out = proc.stdout
    threading.Thread(target=lambda: [lines.put(line) for line in out], daemon=True).start()
    try:
        first = [lines.get(timeout=30).split() for _ in range(3)]
    except queue.Empty:
        proc.kill()
        raise AssertionError(f"the simulator did not start: {proc.communicate(timeout=5)[1]}") from None
    try:
        assert first[0][0] == "listening" and first[1][:2] == ["server", "certificate"], first
        yield Served(first[0][1], Path(first[1][2]), Path(first[2][2]), Path(first[2][4]))
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def probe(*args: str) -> Result:
    return CliRunner().invoke(main, ["probe", "opcua", *args])


def one_json(result: Result) -> dict[str, Any]:
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout
    data = json.loads(lines[0])
    assert isinstance(data, dict)
    return data


@pytest.mark.timeout(60)
def test_probe_reads_a_node_readably_and_as_json(served: Served) -> None:
    result = probe(served.endpoint, "--node", "ns=2;s=Zone.1.Limit")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == "ns=2;s=Zone.1.Limit = 10"
    assert "data type  Int32" in result.stdout
    assert "status     Good (good)" in result.stdout
    assert "source ts  20" in result.stdout

    data = one_json(probe(served.endpoint, "--node", "ns=2;i=1001", "--json"))
    assert data["quality"] == "good" and data["status"] == "Good" and data["data_type"] == "Double"
    assert 78.0 <= data["value"] <= 86.0  # TI-101's band
    assert isinstance(data["source_ts"], int) and data["source_ts"] > 1_600_000_000_000

    name = one_json(probe(served.endpoint, "--node", "ns=2;s=Zone.1.Name", "--json"))
    assert name["value"] == "1#反应区" and name["data_type"] == "String"


@pytest.mark.timeout(60)
def test_probe_browses_the_objects_folder_and_a_folder_of_variables(served: Served) -> None:
    result = probe(served.endpoint, "--browse")
    assert result.exit_code == 0, result.output
    assert "children of i=85 (Objects)" in result.stdout
    assert "1:PersonnelLocation" in result.stdout and "1:DCS" in result.stdout

    data = one_json(probe(served.endpoint, "--browse", "ns=1;s=edge-sim:DCS", "--json"))
    children = {c["node"]: c for c in data["children"]}
    assert children["ns=2;i=1001"]["browse_name"] == "2:TI-101"
    assert children["ns=2;i=1001"]["node_class"] == "Variable"
    assert isinstance(children["ns=2;i=1001"]["value"], float)
    assert children["ns=2;i=1010"]["value"] is True

    readable = probe(served.endpoint, "--browse", "ns=1;s=edge-sim:PersonnelLocation/Zone.1")
    assert "ns=2;s=Zone.1.Limit" in readable.stdout and "10 (Int32)" in readable.stdout


@pytest.mark.timeout(60)
def test_probe_names_a_missing_node(served: Served) -> None:
    result = probe(served.endpoint, "--node", "ns=2;s=No.Such.Node")
    assert result.exit_code == 1
    assert "ns=2;s=No.Such.Node" in result.stderr and "BadNodeIdUnknown" in result.stderr
    data = one_json(probe(served.endpoint, "--node", "ns=2;s=No.Such.Node", "--json"))
    assert data["status"] == "BadNodeIdUnknown" and data["quality"] == "bad" and data["failure"] == "node"
    browse = probe(served.endpoint, "--browse", "ns=2;s=No.Such.Node", "--json")
    assert browse.exit_code == 1 and one_json(browse)["status"] == "BadNodeIdUnknown"


@pytest.mark.timeout(60)
def test_probe_says_connection_refused_and_timeout() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = probe(f"opc.tcp://127.0.0.1:{port}", "--node", "ns=2;i=1001")
    assert result.exit_code == 1 and "connection refused" in result.stderr
    assert one_json(probe(f"opc.tcp://127.0.0.1:{port}", "--node", "ns=2;i=1001", "--json"))["failure"] == "refused"

    with socket.socket() as silent:  # accepts connections (the kernel does) but never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        endpoint = f"opc.tcp://127.0.0.1:{silent.getsockname()[1]}"
        result = probe(endpoint, "--node", "ns=2;i=1001", "--timeout", "0.5")
        assert result.exit_code == 1 and "no answer within 0.5s" in result.stderr
        data = one_json(probe(endpoint, "--node", "ns=2;i=1001", "--timeout", "0.5", "--json"))
        assert data["failure"] == "timeout" and data["quality"] == "bad"


@pytest.mark.timeout(60)
def test_probe_reads_with_basic256sha256_and_says_what_security_refused(served: Served) -> None:
    secured = ["--security", "Basic256Sha256", "--mode", "SignAndEncrypt", "--cert", str(served.client_cert),
               "--key", str(served.client_key)]
    data = one_json(probe(served.endpoint, "--node", "ns=2;s=Zone.1.Limit", *secured,
                          "--server-cert", str(served.server_cert), "--json"))
    assert data["value"] == 10

    pinned_wrong = probe(served.endpoint, "--node", "ns=2;s=Zone.1.Limit", *secured,
                         "--server-cert", str(served.client_cert), "--json")
    assert pinned_wrong.exit_code == 1
    failure = one_json(pinned_wrong)
    assert failure["failure"] == "security" and "security rejected" in failure["error"]

    login = probe(served.endpoint, "--node", "ns=2;s=Zone.1.Limit", *secured, "--username", "operator",
                  "--password", "guess")
    assert login.exit_code == 1 and "BadUserAccessDenied" in login.stderr
    right = probe(served.endpoint, "--node", "ns=2;s=Zone.1.Limit", "--username", "operator", "--password", "s3cret")
    assert right.exit_code == 0, right.output


@pytest.mark.timeout(60)
def test_probe_refuses_bad_arguments_with_exit_2() -> None:
    endpoint = "opc.tcp://127.0.0.1:4840"
    cases = [
        [endpoint],
        [endpoint, "--node", "ns=2;i=1", "--browse"],
        [endpoint, "--node", "Zone.1.HeadCount"],
        ["tcp://127.0.0.1:4840", "--node", "ns=2;i=1"],
        [endpoint, "--node", "ns=2;i=1", "--security", "Basic256Sha256"],
        [endpoint, "--node", "ns=2;i=1", "--mode", "Sign"],
        [endpoint, "--node", "ns=2;i=1", "--password", "x"],
        [endpoint, "--node", "ns=2;i=1", "--timeout", "0"],
        [endpoint, "--node", "ns=2;i=1", "--bogus"],
    ]
    for args in cases:
        result = probe(*args, "--json")
        assert result.exit_code == 2, (args, result.output)
        data = one_json(result)
        assert data["failure"] == "argument" and data["error"], args
    plain = probe(endpoint)
    assert plain.exit_code == 2 and "give either --node NODEID or --browse [NODEID]" in plain.stderr


@pytest.mark.timeout(60)
def test_probe_runs_as_the_installed_command(served: Served) -> None:
    done = subprocess.run([sys.executable, "-m", "agent", "probe", "opcua", served.endpoint, "--node",
                           "ns=2;i=1010", "--json"], capture_output=True, text=True, cwd=ROOT, timeout=50)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["value"] is True and data["data_type"] == "Boolean"

"""The systemd unit: systemd-analyze accepts it and rates its sandbox at most 2.5 (of 10), and the sandbox keeps
what the agent needs (serial ports, its state and runtime directories, sd_notify).

`systemd-analyze security --offline=yes` reads the unit file alone, so it needs no running systemd.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT

UNIT = ROOT / "systemd" / "edge-agent.service"
MAX_EXPOSURE = 2.5
INSTALLED_COMMAND = "/opt/edge-agent/venv/bin/edge-agent"  # where systemd/install.sh puts it
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze is not installed (apt-get install systemd; scripts/test.sh installs it "
    "when run as root)")


def exposure(unit: Path) -> float:
    """The "Overall exposure level" systemd-analyze gives the unit file (0 safest, 10 most exposed)."""
    assert ANALYZE is not None
    run = subprocess.run([ANALYZE, "security", "--offline=yes", "--no-pager", str(unit)],
                         capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", run.stdout)
    assert match, f"no exposure level in systemd-analyze's answer (exit {run.returncode}):\n{run.stdout}\n{run.stderr}"
    return float(match.group(1))


def verify_problems(unit: Path, workdir: Path) -> list[str]:
    """What `systemd-analyze verify` says about the unit: every line naming the unit file, and a failed exit.

    A copy is checked, its commands pointed at an existing program: verify refuses a unit whose ExecStart is
    missing, and the agent is installed in /opt/edge-agent only on a plant PC. verify exits 0 on an unknown key
    or a bad value, warning only, so its warnings count as problems.
    """
    assert ANALYZE is not None
    stand_in = shutil.which("true") or "/bin/true"
    copy = workdir / unit.name
    copy.write_text(unit.read_text().replace(INSTALLED_COMMAND, stand_in))
    run = subprocess.run([ANALYZE, "verify", "--man=no", str(copy)], capture_output=True, text=True, timeout=60)
    problems = [line for line in (run.stdout + run.stderr).splitlines() if unit.name in line]
    return problems + ([f"systemd-analyze verify exited {run.returncode}"] if run.returncode else [])


def settings(unit: Path) -> dict[str, list[str]]:
    """The [Service] section's settings, each key with its values in order (a key may be given several times)."""
    section = ""
    out: dict[str, list[str]] = {}
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and line and not line.startswith(("#", ";")) and "=" in line:
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


@needs_analyze
def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    assert verify_problems(UNIT, tmp_path) == []


@needs_analyze
def test_the_sandbox_rates_at_most_2_5() -> None:
    score = exposure(UNIT)
    assert score <= MAX_EXPOSURE, (
        f"systemd-analyze security --offline=yes {UNIT}: exposure {score} > {MAX_EXPOSURE}; its table names each "
        "setting that adds to it")


def test_the_sandbox_keeps_what_the_agent_needs() -> None:
    unit = settings(UNIT)
    assert unit["Type"] == ["notify"]
    assert "AF_UNIX" in unit.get("RestrictAddressFamilies", ["AF_UNIX"])[-1].split(), \
        "sd_notify and the control socket are Unix sockets"
    assert "dialout" in unit["SupplementaryGroups"][0].split(), "serial ports belong to the dialout group"
    assert unit.get("PrivateDevices", ["no"])[-1] in ("no", "false", "0", "off"), "PrivateDevices hides serial ports"
    assert unit.get("DevicePolicy") == ["closed"]
    for driver in ("char-ttyS", "char-ttyUSB", "char-ttyACM"):
        assert f"{driver} rw" in unit.get("DeviceAllow", []), f"{driver} must stay reachable"
    assert unit["StateDirectory"] == ["edge-agent"], "the store, /var/lib/edge-agent, must stay writable"
    assert unit["RuntimeDirectory"] == ["edge-agent"], "the control socket, /run/edge-agent, must stay writable"
    assert unit["ConfigurationDirectory"] == ["edge-agent"]
    assert unit["MemoryMax"] == ["512M"]

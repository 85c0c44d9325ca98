"""The offline bundle (scripts/bundle.sh) installs with the network cut: into a fresh virtual environment with
pip --no-index, and as a service with its install.sh (upgrade keeps the configuration and the store; uninstall
keeps them unless --purge). The network is cut for real (a network namespace) where the machine allows it."""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from conftest import ROOT


def offline(cmd: list[str]) -> list[str]:
    """`cmd` in a new network namespace with no interface up (root and unshare), else as it is."""
    if os.geteuid() == 0 and shutil.which("unshare"):
        probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
        if probe.returncode == 0:
            return ["unshare", "-n", *cmd]
    return cmd


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle")
    run = subprocess.run([str(ROOT / "scripts" / "bundle.sh"), "--out", str(out)], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    archives = list(out.glob("edge-agent-*.tar.gz"))
    assert len(archives) == 1
    with tarfile.open(archives[0]) as tar:
        tar.extractall(out, filter="data")
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    return folder


@pytest.mark.timeout(600)
def test_the_bundle_installs_into_a_fresh_venv_with_no_network(bundle: Path, tmp_path: Path) -> None:
    names = sorted(p.name for p in bundle.iterdir())
    assert names == ["README.md", "edge-agent.service", "example.yaml", "install.sh", "wheels"]
    assert not [w for w in (bundle / "wheels").iterdir() if w.name.startswith(("edge_agent_devtools", "pymodbus"))]
    subprocess.run(["python3", "-m", "venv", str(tmp_path / "venv")], check=True)
    pip = [str(tmp_path / "venv" / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check"]
    run = subprocess.run(offline([*pip, "--no-index", "--find-links", str(bundle / "wheels"), "edge-agent"]),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    agent = str(tmp_path / "venv" / "bin" / "edge-agent")
    check = subprocess.run([agent, "config", "check", str(bundle / "example.yaml")], capture_output=True, text=True)
    assert check.returncode == 0 and "valid" in check.stdout, check.stdout + check.stderr
    demo = subprocess.run([agent, "demo"], capture_output=True, text=True)
    assert demo.returncode == 2 and "pip install ./devtools" in demo.stderr, "the product carries no demo"


@pytest.mark.timeout(600)
@pytest.mark.skipif(os.geteuid() != 0, reason="install.sh creates the service user: root only")
def test_install_sh_installs_upgrades_and_uninstalls_keeping_config_and_store(bundle: Path, tmp_path: Path) -> None:
    places = {"EDGE_AGENT_PREFIX": tmp_path / "opt", "EDGE_AGENT_CONF_DIR": tmp_path / "etc",
              "EDGE_AGENT_STATE_DIR": tmp_path / "var", "EDGE_AGENT_UNIT_DIR": tmp_path / "units",
              "EDGE_AGENT_BIN_DIR": tmp_path / "bin", "EDGE_AGENT_COMPLETION_DIR": tmp_path / "completion",
              "EDGE_AGENT_CACHE_DIR": tmp_path / "cache"}
    (tmp_path / "bin").mkdir()
    (tmp_path / "completion").mkdir()
    env = {**os.environ, **{k: str(v) for k, v in places.items()}}

    def install(*args: str) -> str:
        run = subprocess.run(offline([str(bundle / "install.sh"), *args]), env=env, capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        return run.stdout

    install()
    config = tmp_path / "etc" / "agent.yaml"
    assert config.exists() and (tmp_path / "units" / "edge-agent.service").exists()
    assert oct(config.stat().st_mode & 0o777) == "0o640"
    assert "complete" in (tmp_path / "completion" / "edge-agent").read_text(), "bash completion installed"
    assert (tmp_path / "bin" / "edge-agent").is_symlink()
    assert subprocess.run([str(tmp_path / "opt" / "venv" / "bin" / "edge-agent"), "--version"]).returncode == 0
    config.write_text(config.read_text() + "# this site's edits\n")
    (tmp_path / "var" / "store.db").write_bytes(b"the site's store")
    assert "kept" in install()  # an upgrade
    assert config.read_text().endswith("# this site's edits\n")
    assert (tmp_path / "var" / "store.db").read_bytes() == b"the site's store"
    assert subprocess.run([str(tmp_path / "opt" / "venv" / "bin" / "edge-agent"), "--version"]).returncode == 0
    (tmp_path / "cache").mkdir()  # made by systemd (CacheDirectory) at the first start
    (tmp_path / "cache" / "config-parsed.json").write_text("a copy of what agent.yaml held")
    install("--uninstall")
    assert not (tmp_path / "opt").exists() and not (tmp_path / "units" / "edge-agent.service").exists()
    assert not (tmp_path / "cache").exists(), "the kept parse goes with the program"
    assert config.exists() and (tmp_path / "var" / "store.db").exists()
    install("--uninstall", "--purge")
    assert not config.exists() and not (tmp_path / "var").exists()

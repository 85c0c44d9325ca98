"""One daemon a store: a second `edge-agent run` on the same store is refused at its start, naming the store and
the process that holds it, and the first goes on delivering; the lock goes with its holder however it ends, and a
lock that cannot be made never stops the daemon."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT
from test_store_and_forward import PREFIX, site, start_plant

from agent.errors import StoreError
from agent.store.lock import StoreLock
from simulators.platform import PlatformSimulator

HOLD = "import sys, time; from pathlib import Path; from agent.store.lock import StoreLock\n" \
       "with StoreLock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(60)\n"
TRY = "\n".join(["import sys", "from pathlib import Path", "from agent.errors import StoreError",
                 "from agent.store.lock import StoreLock", "try:", "    StoreLock(Path(sys.argv[1])).__enter__()",
                 "except StoreError:", "    sys.exit(3)", ""])


@pytest.mark.timeout(120)
def test_a_second_agent_on_the_same_store_is_refused_and_the_first_goes_on(
    tmp_path: Path, broker: Any, plant: Any, agent_process: Any
) -> None:
    sim = start_plant(plant, 50, 0.2)
    platform = PlatformSimulator("127.0.0.1", broker.port, PREFIX)
    platform.start()
    first = agent_process(site(sim.ports["bench"], broker.port, tmp_path / "store.db", points=50, interval=0.2))
    first.start()
    assert platform.wait_for(lambda p: len(p.readings()) >= 200, 30), first.log()[-2000:]
    second = subprocess.run([sys.executable, "-m", "agent", "run", "--config", str(first.config_path)],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert second.returncode == 1, second.stderr
    assert f"store {tmp_path / 'store.db'} is in use by another agent (pid {first.proc.pid})" in second.stderr
    seen = len(platform.readings())
    assert platform.wait_for(lambda p: len(p.readings()) >= seen + 200, 30), first.log()[-2000:]
    assert first.stop_seen_by(platform) == 0
    platform.stop()


def test_the_lock_goes_with_its_holder_even_on_kill_9(tmp_path: Path) -> None:
    store = tmp_path / "store.db"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(store)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(StoreError, match=rf"in use by another agent \(pid {holder.pid}\)"), StoreLock(store):
            pass
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        with StoreLock(store) as lock:
            assert lock.path.read_text().strip() == str(os.getpid())
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)


def refused_elsewhere(store: Path) -> bool:
    """Whether another process is refused the lock of `store` now."""
    probe = subprocess.run([sys.executable, "-c", TRY, str(store)], capture_output=True, text=True, timeout=60,
                           cwd=ROOT)
    assert probe.returncode in (0, 3), probe.stderr
    return probe.returncode == 3


def test_the_lock_holds_while_the_daemon_opens_and_closes_the_same_file(tmp_path: Path) -> None:
    # a configuration may name a file of the state folder as a secret, read at each connection
    store = tmp_path / "store.db"
    with StoreLock(store) as lock:
        assert refused_elsewhere(store)
        lock.path.read_bytes()
        with open(lock.path, "rb"):
            pass
        assert refused_elsewhere(store)
    assert not refused_elsewhere(store)


def test_a_store_reached_through_a_link_shares_the_lock_of_the_file_it_names(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    store = tmp_path / "real" / "store.db"
    (tmp_path / "store.db").symlink_to(store)
    with StoreLock(store):
        assert refused_elsewhere(tmp_path / "store.db")


def _wait_after(ready: Any) -> None:
    ready.set()
    time.sleep(30)


def test_a_forked_child_does_not_keep_the_lock(tmp_path: Path) -> None:
    import multiprocessing

    store = tmp_path / "store.db"
    context = multiprocessing.get_context("fork")  # as the configuration loader's child is made
    with StoreLock(store):
        ready = context.Event()
        child = context.Process(target=_wait_after, args=(ready,))
        child.start()
        assert ready.wait(30)  # the child runs: what it does at its fork is done
    try:
        with StoreLock(store):  # the parent let go; its child, still running, closed its copy at the fork
            assert child.is_alive()
    finally:
        child.kill()
        child.join(10)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_a_lock_file_another_user_made_still_guards_the_store() -> None:
    # a manual run as root left the file; the service, another user, can only read it
    folder = Path(tempfile.mkdtemp(prefix="edge-agent-lock-"))
    try:
        folder.chmod(0o755)
        store = folder / "store.db"
        umask = os.umask(0o027)  # as the unit's: the file must still be readable by others
        try:
            lock = StoreLock(store).__enter__()
        finally:
            os.umask(umask)
        try:
            assert stat.S_IMODE(lock.path.stat().st_mode) == 0o644
            pid = os.fork()
            if pid == 0:  # the child: another user, asking for the lock root holds
                code = 1
                try:
                    os.setgid(65534)
                    os.setuid(65534)
                    with StoreLock(store):
                        code = 0
                except StoreError:
                    code = 3
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
        finally:
            lock.__exit__(None, None, None)
        assert os.waitstatus_to_exitcode(status) == 3, "another user must be refused a held lock"
    finally:
        shutil.rmtree(folder)


def test_a_lock_that_cannot_be_made_never_stops_the_daemon(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING), StoreLock(Path("/proc/edge-agent-test/store.db")):
        pass
    assert "running without it" in caplog.text

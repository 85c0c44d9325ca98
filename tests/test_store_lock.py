"""One daemon a store: a second `edge-agent run` on the same store is refused at its start, naming the store and
the process that holds it, and the first goes on delivering; the lock goes with its holder however it ends, and a
lock that cannot be made never stops the daemon."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
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
            assert lock.path.read_text().strip().isdigit()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)


def test_a_forked_child_does_not_keep_the_lock(tmp_path: Path) -> None:
    import multiprocessing

    store = tmp_path / "store.db"
    context = multiprocessing.get_context("fork")  # as the configuration loader's child is made
    with StoreLock(store):
        child = context.Process(target=time.sleep, args=(30,))
        child.start()
    try:
        with StoreLock(store):  # the parent let go; its child, still running, never held it
            assert child.is_alive()
    finally:
        child.kill()
        child.join(10)


def test_a_lock_that_cannot_be_made_never_stops_the_daemon(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING), StoreLock(Path("/proc/edge-agent-test/store.db")):
        pass
    assert "running without it" in caplog.text

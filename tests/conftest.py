"""Shared test fixtures: a real mosquitto on a free loopback port, and the agent as a real process."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
# every configuration the project ships: site examples, the demo site, each driver's sample
SHIPPED_CONFIGS = sorted([*(ROOT / "config").glob("*.yaml"), ROOT / "devtools" / "simulators" / "demo.yaml",
                          *(ROOT / "agent" / "drivers").glob("*/sample.yaml")])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def now_ms() -> int:
    """The wall clock in ms: what the agent stamps a reading with when the device gives no time of its own."""
    return int(time.time() * 1000)


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `condition()` every 50 ms until it holds; fail saying `what` was awaited once `timeout` s pass."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            pytest.fail(f"not within {timeout:g} s: {what}")
        time.sleep(0.05)


def processed_past(platform: Any, ts: int, *points: str) -> bool:
    """True once the platform holds a reading of each of `points` sampled after `ts` (ms) and no data or alarm
    message is missing below it (seq from 1, no gap).

    The agent stores the alarm events a reading causes before the data message holding that reading
    (agent/pipeline/ingest.py), so every event due from the readings up to `ts` has then arrived: a check that
    an alarm was *not* raised is judged on readings the agent has demonstrably processed.
    """
    readings = platform.readings()
    if not all(any(r.point == point and r.ts > ts for r in readings) for point in points):
        return False
    agents = platform.report().agents.values()
    return bool(agents) and all(a.seq_min == 1 and a.missing == 0 for a in agents)


class Mosquitto:
    """A mosquitto process on a fixed port, which a test may stop and start again."""

    def __init__(self, workdir: Path, port: int | None = None, listeners: str = "") -> None:
        """`listeners` adds configuration text (more listeners, TLS, passwords) after the plain one."""
        self.port = port or free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.conf = workdir / f"mosquitto-{self.port}.conf"
        # persistence keeps the platform's session (its subscription and queued messages) over a restart
        self.conf.write_text(
            f"per_listener_settings true\nlistener {self.port} 127.0.0.1\nallow_anonymous true\n"
            f"persistence true\npersistence_location {workdir}/\npersistence_file mosquitto-{self.port}.db\n"
            "max_inflight_messages 0\nmax_queued_messages 200000\n"
            + ("user root\n" if os.geteuid() == 0 else "")
            + listeners
        )

    def start(self) -> Mosquitto:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        log = open(self.workdir / f"mosquitto-{self.port}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([binary, "-c", str(self.conf)], stdout=log, stderr=log)
        wait_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    if not (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()):
        pytest.fail("mosquitto is not installed: run the README's test command, which installs it")
    mosq = Mosquitto(tmp_path).start()
    yield mosq
    mosq.stop()


class AgentProcess:
    """`edge-agent run` as a child process, with its log in a file."""

    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        self.workdir = workdir
        self.config_path = workdir / "agent.yaml"
        self.config_path.write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False))
        self.log_path = workdir / "agent.log"
        self.agent_id = (config.get("agent") or {}).get("id")
        self.started_ms = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.started_ms = now_ms()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(self.config_path)],
            stdout=log, stderr=log, env=env, cwd=ROOT,
        )
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 20) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                raise AssertionError(f"agent did not stop on SIGTERM within {timeout}s\n{self.log()[-3000:]}") from None
        code = self.proc.returncode
        self.proc = None
        return int(code)

    def seen_online_by(self, platform: Any) -> bool:
        """True once `platform` has the online status of this run of the agent: connected, about to send."""
        return any(s["agent"] == self.agent_id and s["online"] is True and s.get("started", -1) >= self.started_ms
                   for s in platform.statuses())

    def stop_seen_by(self, platform: Any, timeout: float = 20) -> int:
        """`stop`, then wait until `platform` has the offline status the agent sent on its way out.

        A clean stop sends it after its drain, once the broker has acknowledged everything stored, and the broker
        hands messages on in order: whatever the platform lacks then was never delivered.
        """
        since = now_ms()
        code = self.stop(timeout)
        if code == 0:
            wait_until(lambda: any(s["agent"] == self.agent_id and s["online"] is False and s.get("ts", -1) >= since
                                   for s in platform.statuses()),
                       timeout, f"the offline status of agent {self.agent_id} at the platform after a clean stop\n"
                       f"{self.log()[-2000:]}")
        return code


@pytest.fixture
def agent_process(tmp_path: Path) -> Iterator[Any]:
    started: list[AgentProcess] = []

    def make(config: dict[str, Any]) -> AgentProcess:
        proc = AgentProcess(config, tmp_path)
        started.append(proc)
        return proc

    yield make
    for proc in started:
        if proc.proc is not None and proc.proc.poll() is None:
            proc.proc.kill()
            proc.proc.wait(5)


class PlantThread:
    """The Modbus plant simulator on its own event loop in a thread, so the test body stays synchronous."""

    def __init__(self, config: Any, ports: dict[str, int] | None = None) -> None:
        import asyncio
        import threading

        from simulators.modbus import PlantSimulator

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="plant")
        self.sim = PlantSimulator(config, ports=ports if ports is not None else {c.id: 0 for c in config.channels})

    def _run(self, coro: Any, timeout: float = 20) -> Any:
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Any, *args: Any) -> Any:
        async def invoke() -> Any:
            return fn(*args)

        return self._run(invoke())

    def start(self) -> PlantThread:
        self.thread.start()
        self._run(self.sim.start())
        return self

    @property
    def ports(self) -> dict[str, int]:
        return dict(self.sim.ports)

    def stop(self) -> None:
        try:
            self._run(self.sim.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


@pytest.fixture
def plant() -> Iterator[Any]:
    started: list[PlantThread] = []

    def make(config: Any, ports: dict[str, int] | None = None) -> PlantThread:
        thread = PlantThread(config, ports).start()
        started.append(thread)
        return thread

    yield make
    for thread in started:
        thread.stop()


class LoopThread:
    """An event loop in a thread, for simulators a synchronous test drives (`run` a coroutine, `call` a function)."""

    def __init__(self) -> None:
        import asyncio
        import threading

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="simulators")
        self.thread.start()

    def run(self, coro: Any, timeout: float = 120) -> Any:
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Any, *args: Any) -> Any:
        async def invoke() -> Any:
            result = fn(*args)
            if hasattr(result, "__await__"):
                result = await result
            return result

        return self.run(invoke())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def sims() -> Iterator[Any]:
    """Start simulators on a loop thread: `sims.start(sim)` returns it started; all are stopped at the end."""
    thread = LoopThread()
    started: list[Any] = []

    class Starter:
        loop = thread

        def start(self, sim: Any) -> Any:
            thread.run(sim.start())
            started.append(sim)
            return sim

    yield Starter()
    for sim in reversed(started):
        # a simulator that fails to stop must not hide the test's own result
        with contextlib.suppress(Exception):
            thread.run(sim.stop(), 30)
    thread.close()


# hypothesis (tests/test_fuzz_store.py): a bounded run in the normal suite, 20,000 examples a test with EDGE_FUZZ=long
from hypothesis import settings as _fuzz_settings  # noqa: E402

_fuzz_settings.register_profile("edge", max_examples=200, deadline=None, database=None, print_blob=True)
_fuzz_settings.register_profile("edge-long", max_examples=20_000, deadline=None, database=None, print_blob=True)
_fuzz_settings.load_profile("edge-long" if os.environ.get("EDGE_FUZZ") == "long" else "edge")

"""Startup benchmark: seconds from starting the agent's process to its first poll, for the benchmark's synthetic
plant (1,000 points to a device, each device on its own TCP connection, every rule on) written as JSON, as YAML
parsed afresh, and as the same YAML again with the parse kept from the start before (the service's cache
folder, agent.config.parse_cache). Prints figures; asserts nothing.

    python -m bench.startup [--points 100000] [--repeat 5] [--json]

The first poll is the first TCP connection any device's listener here accepts: the agent connects when it polls,
so it is seen from outside, with no log to read. Each listener accepts and never answers; the agent is killed once
seen. The three forms run in turns, each in a fresh folder (a new store), the cache folder kept between turns.
A file of under a million characters (about 4,000 points) is never kept: both YAML forms then time a parse.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from agent.config.parse_cache import CACHE_ENV, FILE_NAME, MIN_CHARS
from simulators.modbus import synthetic_data

PER_DEVICE = 1000
FORMS = ("json", "yaml", "yaml_kept")
TIMEOUT_S = 120.0


def document(points: int, ports: list[int], store: Path) -> dict[str, Any]:
    """The benchmark's plant of `points` (a device of 1,000 a channel, one port a channel), every rule on, as
    `python -m bench` runs the agent."""
    data = synthetic_data(points, interval=1.0, port=1, store=str(store), per_device=PER_DEVICE,
                          channels=len(ports))
    for channel, port in zip(data["channels"], ports, strict=True):
        channel["port"] = port
        for device in channel["devices"]:
            for point in device["points"]:
                point["limits"].update({"rate_rise": 500.0, "rate_window": 30.0, "deadband": 0.5})
    data["log_level"] = "warning"
    return data


def _drain(listeners: list[socket.socket]) -> None:
    """Close the connections a killed agent left waiting, so that only the next agent's are seen."""
    for listener in listeners:
        while True:
            try:
                connection, _ = listener.accept()
            except BlockingIOError:
                break
            connection.close()


def _first_poll(listeners: list[socket.socket], agent: subprocess.Popen[bytes], started: float) -> float:
    """Seconds from `started` to the first connection any listener is offered."""
    with selectors.DefaultSelector() as selector:
        for listener in listeners:
            selector.register(listener, selectors.EVENT_READ)
        while time.monotonic() - started < TIMEOUT_S:
            if selector.select(0.05):
                return time.monotonic() - started
            if agent.poll() is not None:
                raise SystemExit(f"bench.startup: the agent exited with {agent.returncode} before it polled")
    raise SystemExit(f"bench.startup: no poll within {TIMEOUT_S:g} s")


def _run(form: str, config: Path, listeners: list[socket.socket], root: Path) -> float:
    """One start of the agent on `config`; seconds to its first poll."""
    cache = root / "cache"
    for old in (root / "store").iterdir():  # a new store each start
        old.unlink()
    if form == "yaml":
        (cache / FILE_NAME).unlink(missing_ok=True)
    _drain(listeners)
    env = {**os.environ, CACHE_ENV: str(cache)}
    started = time.monotonic()
    agent = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(config)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        seconds = _first_poll(listeners, agent, started)
    finally:
        agent.send_signal(signal.SIGKILL)
        agent.wait(30)
    if form == "yaml" and len(config.read_text()) >= MIN_CHARS:
        # the loader's child keeps the parse (of a file large enough) once it has answered: wait until it is there
        deadline = time.monotonic() + TIMEOUT_S
        while not (cache / FILE_NAME).exists():
            if time.monotonic() > deadline:  # the next form would time a parse and call it a kept one
                raise SystemExit(f"bench.startup: no parse kept in {cache} within {TIMEOUT_S:g} s")
            time.sleep(0.1)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.startup", description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=100_000, help="points (default 100000)")
    parser.add_argument("--repeat", type=int, default=5, help="turns of the three forms (default 5)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if args.points < 1 or args.repeat < 1:
        parser.error("--points and --repeat must be positive")
    root = Path(tempfile.mkdtemp(prefix="edge-agent-startup-"))
    (root / "cache").mkdir()
    (root / "store").mkdir()
    listeners = []
    for _ in range(-(-args.points // PER_DEVICE)):  # a device a connection, as in `python -m bench --devices`
        listener = socket.create_server(("127.0.0.1", 0), backlog=256)
        listener.setblocking(False)
        listeners.append(listener)
    data = document(args.points, [listener.getsockname()[1] for listener in listeners], root / "store" / "store.db")
    configs = {"json": root / "agent.json", "yaml": root / "agent.yaml", "yaml_kept": root / "agent.yaml"}
    configs["json"].write_text(json.dumps(data))
    configs["yaml"].write_text(yaml.safe_dump(data, sort_keys=False))
    runs: dict[str, list[float]] = {form: [] for form in FORMS}
    try:
        for turn in range(args.repeat):
            for form in FORMS:
                runs[form].append(_run(form, configs[form], listeners, root))
                if not args.json:
                    print(f"turn {turn + 1}: {form:<10} {runs[form][-1]:6.2f} s to the first poll", flush=True)
    finally:
        for listener in listeners:
            listener.close()
    spread = {f"first_poll_s_{form}": [round(min(v), 2), round(max(v), 2)] for form, v in runs.items()}
    result: dict[str, Any] = {f"first_poll_s_{form}": round(statistics.median(v), 2) for form, v in runs.items()}
    result.update(spread=spread, points=args.points, repeat=args.repeat)
    if args.json:
        print(json.dumps(result))
    else:
        for form in FORMS:
            low, high = spread[f"first_poll_s_{form}"]
            print(f"{form:<10} {result[f'first_poll_s_{form}']:6.2f} s ({low:.2f}..{high:.2f}), median of "
                  f"{args.repeat}")
        print(f"files in {root}")


if __name__ == "__main__":
    main()

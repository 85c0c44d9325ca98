"""Benchmark: a synthetic plant of N points, a mosquitto and the agent as separate processes; prints the
delivered rate, the agent's CPU time per reading, its peak RSS and the alarm latency.

    python -m bench [--points 10000] [--interval 1] [--duration 30] [--json]

The plant simulator runs in this process (it must know when it crosses a limit); a subscriber here counts
what the broker delivers. Alarm latency: the simulator sets a point above its high limit → the `raised`
event arrives at the subscriber. Not part of the test suite: the figures depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import psutil
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from simulators.modbus import PlantSimulator, synthetic_config, synthetic_data

PREFIX = "bench"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), 0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"bench: nothing listens on 127.0.0.1:{port}")


class Subscriber:
    """Counts delivered readings and timestamps alarm events, on paho's network thread."""

    def __init__(self, port: int) -> None:
        self.lock = threading.Lock()
        self.readings = 0
        self.messages = 0
        self.raised: dict[str, float] = {}
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-sub-{os.getpid()}")
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(f"{PREFIX}/#", qos=1)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.time()
        leaf = msg.topic.rsplit("/", 1)[-1]
        if leaf == "data":
            count = len(orjson.loads(msg.payload)["readings"])
            with self.lock:
                self.readings += count
                self.messages += 1
        elif leaf == "alarm":
            event = orjson.loads(msg.payload)
            if event["state"] == "raised" and event["type"] == "high" and not event["hist"]:
                with self.lock:
                    self.raised.setdefault(event["point"], now)

    def count(self) -> int:
        with self.lock:
            return self.readings

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the kernel's high-water mark of the resident set."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return psutil.Process(pid).memory_info().rss / 1e6


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[rank]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="edge-agent-bench-"))
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(mosquitto).exists():
        raise SystemExit("bench: mosquitto is required (apt-get install mosquitto)")
    broker_port = free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(f"listener {broker_port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    "max_queued_messages 100000\n")
    procs: list[subprocess.Popen[bytes]] = []
    broker_log = open(workdir / "mosquitto.log", "wb")  # noqa: SIM115
    procs.append(subprocess.Popen([mosquitto, "-c", str(conf)], stdout=broker_log, stderr=broker_log))
    wait_port(broker_port)

    config = synthetic_config(args.points, interval=args.interval, port=1, per_device=args.per_device)
    plant = PlantSimulator(config, ports={c.id: 0 for c in config.channels})
    await plant.start()
    data = synthetic_data(args.points, interval=args.interval, port=1, per_device=args.per_device,
                          uplink_port=broker_port, store=str(workdir / "store.db"))
    data["uplink"]["prefix"] = PREFIX
    data["log_level"] = "warning"
    for channel in data["channels"]:
        channel["port"] = plant.ports[channel["id"]]
    agent_yaml = workdir / "agent.yaml"
    agent_yaml.write_text(yaml.safe_dump(data, sort_keys=False))

    sub = Subscriber(broker_port)
    agent_log = open(workdir / "agent.log", "wb")  # noqa: SIM115
    agent = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(agent_yaml)],
                             stdout=agent_log, stderr=agent_log)
    procs.append(agent)
    proc = psutil.Process(agent.pid)
    try:
        await asyncio.sleep(args.warmup)
        if agent.poll() is not None:
            raise SystemExit(f"bench: the agent exited; see {workdir / 'agent.log'}")
        cpu0 = sum(proc.cpu_times()[:2])
        count0 = sub.count()
        t0 = time.monotonic()
        crossed: dict[str, float] = {}
        ids = [p.id for _, _, p in config.points()]
        rng = random.Random(1)
        pending_release: list[tuple[float, str]] = []
        while time.monotonic() - t0 < args.duration:
            # a point crosses its limits every half second; each goes back to normal 2 s later
            point = rng.choice(ids)
            if point not in crossed:
                plant.set_value(point, 96.0)
                crossed[point] = time.time()
                pending_release.append((time.monotonic() + 2.0, point))
            await asyncio.sleep(0.5)
            while pending_release and pending_release[0][0] <= time.monotonic():
                plant.release(pending_release.pop(0)[1])
        elapsed = time.monotonic() - t0
        delivered = sub.count() - count0
        cpu = sum(proc.cpu_times()[:2]) - cpu0
        rss = peak_rss_mb(agent.pid)
        await asyncio.sleep(2.0)  # late alarm events still count towards latency
        latencies = [(sub.raised[p] - t) * 1000 for p, t in crossed.items() if p in sub.raised]
        missing = len(crossed) - len(latencies)
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(30)
        except subprocess.TimeoutExpired:
            agent.kill()
        sub.stop()
        await plant.stop()
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(10)
    result = {
        "readings_per_s": round(delivered / elapsed, 1),
        "cpu_us_per_reading": round(cpu / max(delivered, 1) * 1e6, 2),
        "peak_rss_mb": round(rss, 1),
        "alarm_latency_p50_ms": round(percentile(latencies, 50), 1),
        "alarm_latency_p99_ms": round(percentile(latencies, 99), 1),
    }
    if not args.json:
        print(f"points {args.points} at {args.interval:g}s, "
              f"measured over {elapsed:.1f}s after {args.warmup:g}s warm-up")
        print(f"delivered           {result['readings_per_s']:>10,.1f} readings/s")
        print(f"agent CPU           {result['cpu_us_per_reading']:>10.2f} µs per reading "
              f"({cpu / elapsed * 100:.1f}% of one core)")
        print(f"agent peak RSS      {result['peak_rss_mb']:>10.1f} MB")
        print(f"alarm latency       p50 {result['alarm_latency_p50_ms']:.1f} ms, "
              f"p99 {result['alarm_latency_p99_ms']:.1f} ms over {len(latencies)} crossings"
              + (f" ({missing} without an event)" if missing else ""))
        print(f"files in {workdir}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=10_000, help="points in the synthetic plant (default 10000)")
    parser.add_argument("--interval", type=float, default=1.0, help="poll interval in seconds (default 1)")
    parser.add_argument("--duration", type=float, default=30.0, help="measured seconds (default 30)")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds before measuring (default 5)")
    parser.add_argument("--per-device", type=int, default=1000, help="points per Modbus unit (default 1000)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if args.points < 1 or args.interval <= 0 or args.duration <= 0:
        parser.error("--points, --interval and --duration must be positive")
    result = asyncio.run(run(args))
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()

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


def io_counters(pid: int) -> tuple[int, int]:
    """(write syscalls, bytes sent to the storage layer) of a process, from /proc/PID/io."""
    fields = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return int(fields["syscw"]), int(fields["write_bytes"])


def archive_bytes_per_reading(store_path: Path) -> float:
    """Pages the history archive occupies (table and index) per reading it holds."""
    import sqlite3

    db = sqlite3.connect(f"file:{store_path}?mode=ro", uri=True)
    try:
        size = db.execute("SELECT coalesce(sum(pgsize), 0) FROM dbstat WHERE name IN "
                          "('archive', 'archive_by_end', 'point', 'sqlite_autoindex_point_1')").fetchone()[0]
        readings = db.execute("SELECT coalesce(sum(count), 0) FROM archive").fetchone()[0]
    finally:
        db.close()
    return size / readings if readings else float("nan")


def store_backlog(store_path: Path) -> int:
    import sqlite3

    db = sqlite3.connect(f"file:{store_path}?mode=ro", uri=True, timeout=5)
    try:
        return int(db.execute("SELECT coalesce(sum(count), 0) FROM outbox WHERE acked = 0").fetchone()[0])
    finally:
        db.close()


class Broker:
    def __init__(self, workdir: Path) -> None:
        mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(mosquitto).exists():
            raise SystemExit("bench: mosquitto is required (apt-get install mosquitto)")
        self.port = free_port()
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                             "max_queued_messages 100000\n")
        self.cmd = [mosquitto, "-c", str(self.conf)]
        self.log = open(workdir / "mosquitto.log", "ab")  # noqa: SIM115
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=self.log)
        wait_port(self.port)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


async def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="edge-agent-bench-"))
    broker = Broker(workdir)
    broker.start()
    config = synthetic_config(args.points, interval=args.interval, port=1, per_device=args.per_device)
    plant = PlantSimulator(config, ports={c.id: 0 for c in config.channels})
    await plant.start()
    store_path = workdir / "store.db"
    data = synthetic_data(args.points, interval=args.interval, port=1, per_device=args.per_device,
                          uplink_port=broker.port, store=str(store_path))
    data["uplink"].update({"prefix": PREFIX, "reconnect_min": 0.2, "reconnect_max": 1})
    if args.all_rules:
        # every rule that applies to a process value is evaluated: limits, on-delay, rate of change
        for channel in data["channels"]:
            for device in channel["devices"]:
                for point in device["points"]:
                    point["limits"].update({"rate_rise": 500.0, "rate_window": 30.0, "deadband": 0.5})
    data["log_level"] = "warning"
    for channel in data["channels"]:
        channel["port"] = plant.ports[channel["id"]]
    agent_yaml = workdir / "agent.yaml"
    agent_yaml.write_text(yaml.safe_dump(data, sort_keys=False))

    sub = Subscriber(broker.port)
    agent_log = open(workdir / "agent.log", "wb")  # noqa: SIM115
    agent = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(agent_yaml)],
                             stdout=agent_log, stderr=agent_log)
    proc = psutil.Process(agent.pid)
    drain_rate = float("nan")
    drained = 0
    try:
        await asyncio.sleep(args.warmup)
        if agent.poll() is not None:
            raise SystemExit(f"bench: the agent exited; see {workdir / 'agent.log'}")
        # 1. steady state: delivery, CPU, disk writes, alarm latency
        cpu0 = sum(proc.cpu_times()[:2])
        io0 = io_counters(agent.pid)
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
        io1 = io_counters(agent.pid)
        await asyncio.sleep(2.0)  # late alarm events still count towards latency
        latencies = [(sub.raised[p] - t) * 1000 for p, t in crossed.items() if p in sub.raised]
        missing = len(crossed) - len(latencies)
        # 2. an outage, then the backlog drains while live data go on
        if args.outage > 0:
            broker.stop()
            await asyncio.sleep(args.outage)
            drained = store_backlog(store_path)
            broker.start()
            t_up = time.monotonic()
            while time.monotonic() - t_up < 300:
                await asyncio.sleep(0.2)
                if store_backlog(store_path) < args.points * args.interval:  # only live data left in flight
                    break
            drain_s = time.monotonic() - t_up
            drain_rate = drained / drain_s
        rss = peak_rss_mb(agent.pid)
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(60)
        except subprocess.TimeoutExpired:
            agent.kill()
        sub.stop()
        await plant.stop()
        broker.stop()
    result = {
        "readings_per_s": round(delivered / elapsed, 1),
        "cpu_us_per_reading": round(cpu / max(delivered, 1) * 1e6, 2),
        "peak_rss_mb": round(rss, 1),
        "alarm_latency_p50_ms": round(percentile(latencies, 50), 1),
        "alarm_latency_p99_ms": round(percentile(latencies, 99), 1),
        "backlog_drain_readings_per_s": round(drain_rate, 1),
        "bytes_per_retained_reading": round(archive_bytes_per_reading(store_path), 2),
        "disk_writes_per_s": round((io1[0] - io0[0]) / elapsed, 1),
        "disk_write_kb_per_s": round((io1[1] - io0[1]) / elapsed / 1024, 1),
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
        print(f"disk writes         {result['disk_writes_per_s']:>10.1f} write calls/s, "
              f"{result['disk_write_kb_per_s']:.1f} KiB/s to storage")
        if args.outage > 0:
            print(f"backlog drain       {result['backlog_drain_readings_per_s']:>10,.1f} readings/s "
                  f"({drained:,} readings after a {args.outage:g}s outage, beside live data)")
        print(f"history on disk     {result['bytes_per_retained_reading']:>10.2f} bytes per retained reading")
        print(f"files in {workdir}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=10_000, help="points in the synthetic plant (default 10000)")
    parser.add_argument("--interval", type=float, default=1.0, help="poll interval in seconds (default 1)")
    parser.add_argument("--duration", type=float, default=30.0, help="measured seconds (default 30)")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds before measuring (default 5)")
    parser.add_argument("--per-device", type=int, default=1000, help="points per Modbus unit (default 1000)")
    parser.add_argument("--outage", type=float, default=20.0,
                        help="seconds of broker outage before measuring the backlog drain (0: skip; default 20)")
    parser.add_argument("--limits-only", dest="all_rules", action="store_false",
                        help="only four-level limits on each point (default: limits and rate of change)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if args.points < 1 or args.interval <= 0 or args.duration <= 0:
        parser.error("--points, --interval and --duration must be positive")
    result = asyncio.run(run(args))
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()

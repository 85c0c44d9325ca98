"""Benchmark: a synthetic plant of N points, a mosquitto and the agent as separate processes; prints the
delivered rate, the agent's CPU time per reading, its peak RSS, the alarm latency, polls done, the loop's longest
stall, the delivery lag and the bytes on the wire per reading.

    python -m bench [--points 10000] [--interval 1] [--duration 30] [--repeat 3] [--json]
    python -m bench --devices 200 --points-per-device 1000   # one TCP connection per device
    python -m bench --config-push [--points 10000]             # a signed configuration push, applied live
    python -m bench --unsigned   # the agent without its key: stored messages chained, not signed

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
from simulators.platform import payload_json

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
    """Counts delivered readings, their payload bytes and lag, timestamps alarm events and keeps health reports,
    on paho's network thread."""

    def __init__(self, port: int) -> None:
        self.lock = threading.Lock()
        self.readings = 0
        self.messages = 0
        self.payload_bytes = 0
        self.lags: list[float] = []  # ms from the oldest reading of a live message to its arrival
        self.health: list[tuple[float, dict[str, Any]]] = []  # (arrival, report)
        self.first_live: float | None = None  # monotonic time the first live reading arrived
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
            message = payload_json(msg.payload)  # either version, compressed or not
            if message.get("v") == 2:
                count = sum(len(group["v"]) for group in message["g"])
                times = [t for group in message["g"] for t in (group["t"] if isinstance(group["t"], list)
                                                                else [group["t"]])]
            else:
                count = len(message["readings"])
                times = [r["ts"] for r in message["readings"]]
            oldest = min(times) if times and not message["hist"] else None
            with self.lock:
                if self.first_live is None and oldest is not None:
                    self.first_live = time.monotonic()
                self.readings += count
                self.messages += 1
                self.payload_bytes += len(msg.payload)
                if oldest is not None:
                    self.lags.append(now * 1000 - oldest)
        elif leaf == "health":
            with self.lock:
                self.health.append((now, orjson.loads(msg.payload)))
        elif leaf == "alarm":
            event = orjson.loads(msg.payload)
            if event["state"] == "raised" and event["type"] == "high" and not event["hist"]:
                with self.lock:
                    self.raised.setdefault(event["point"], now)

    def count(self) -> int:
        with self.lock:
            return self.readings

    def mark(self) -> tuple[int, int, int]:
        """(readings, payload bytes, lags seen) so far."""
        with self.lock:
            return self.readings, self.payload_bytes, len(self.lags)

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def stop_agent(agent: subprocess.Popen[bytes]) -> None:
    """SIGTERM, as systemd stops it; killed if it is not gone within a minute."""
    agent.send_signal(signal.SIGTERM)
    try:
        agent.wait(60)
    except subprocess.TimeoutExpired:
        agent.kill()


def write_config(workdir: Path, data: dict[str, Any], form: str) -> Path:
    """The agent's configuration file, as YAML (as most plants write it) or as JSON (read by the JSON reader)."""
    if form == "json":
        path = workdir / "agent.json"
        path.write_text(json.dumps(data))
    else:
        path = workdir / "agent.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def channel_sum(report: dict[str, Any], key: str) -> int:
    return sum(int(c.get(key, 0)) for c in report.get("channels", []))


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
    shape = {"per_device": args.per_device, "channels": args.channels}
    config = synthetic_config(args.points, interval=args.interval, port=1, **shape)
    plant = PlantSimulator(config, ports={c.id: 0 for c in config.channels})
    await plant.start()
    store_path = workdir / "store.db"
    if not args.unsigned:  # as installed: the agent's key beside its store, so every stored message is signed
        from agent.trust.keys import create_key_file

        create_key_file(workdir)
    data = synthetic_data(args.points, interval=args.interval, port=1, uplink_port=broker.port,
                          store=str(store_path), **shape)
    data["uplink"].update({"prefix": PREFIX, "reconnect_min": 0.2, "reconnect_max": 1, "health_interval": 5,
                           "encoding": "json" if args.wire == "json" else "compact",
                           "compress": args.wire == "compressed"})
    if args.all_rules:
        # every rule that applies to a process value is evaluated: limits, on-delay, rate of change
        for channel in data["channels"]:
            for device in channel["devices"]:
                for point in device["points"]:
                    point["limits"].update({"rate_rise": 500.0, "rate_window": 30.0, "deadband": 0.5})
    data["log_level"] = "warning"
    for channel in data["channels"]:
        channel["port"] = plant.ports[channel["id"]]
    agent_yaml = write_config(workdir, data, args.config_format)

    sub = Subscriber(broker.port)
    agent_log = open(workdir / "agent.log", "wb")  # noqa: SIM115
    started = time.monotonic()
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
        count0, bytes0, lags0 = sub.mark()
        health0 = len(sub.health)
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
        count1, bytes1, lags1 = sub.mark()
        delivered = count1 - count0
        cpu = sum(proc.cpu_times()[:2]) - cpu0
        io1 = io_counters(agent.pid)
        polls = poll_figures(sub, health0, args.interval)
        with sub.lock:
            lags = sub.lags[lags0:lags1]
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
        stop_agent(agent)
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
        "skipped_polls": polls["skipped"],
        "polls_expected": polls["expected"],
        "polls_done": polls["done"],
        "max_loop_stall_ms": polls["max_stall_ms"],
        "lag_p99_ms": round(percentile(lags, 99), 1),
        "wire_bytes_per_reading": round((bytes1 - bytes0) / max(delivered, 1), 2),
        "startup_s": round(sub.first_live - started, 2) if sub.first_live is not None else float("nan"),
    }
    if not args.json:
        print(f"points {args.points} at {args.interval:g}s ({args.wire} `data`, "
              f"{'chained, unsigned' if args.unsigned else 'chained and signed'}), "
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
        print(f"polls               {result['polls_done']:>10,} done of {result['polls_expected']:,} expected, "
              f"{result['skipped_polls']:,} skipped (over {polls['window_s']:.0f}s of health reports)")
        print(f"loop                {result['max_loop_stall_ms']:>10.1f} ms longest stall")
        print(f"delivery lag        {result['lag_p99_ms']:>10.1f} ms p99 (oldest reading of each live message)")
        print(f"wire                {result['wire_bytes_per_reading']:>10.2f} bytes of `data` payload per reading")
        print(f"startup             {result['startup_s']:>10.2f} s from the agent's start to its first reading "
              "delivered")
        print(f"files in {workdir}")
    return result


def poll_figures(sub: Subscriber, first: int, interval: float) -> dict[str, Any]:
    """Polls done and skipped, and the loop's longest stall, between the first health report of the window and
    the last one (reports come every 5 s; the counters are the agent's own since it started)."""
    with sub.lock:
        reports = sub.health[max(0, first - 1):]
    if len(reports) < 2:
        return {"expected": 0, "done": 0, "skipped": 0, "max_stall_ms": float("nan"), "window_s": 0.0}
    (_, a), (_, b) = reports[0], reports[-1]
    done = channel_sum(b, "polls") - channel_sum(a, "polls")
    skipped = channel_sum(b, "skipped_polls") - channel_sum(a, "skipped_polls")
    window = (b["ts"] - a["ts"]) / 1000
    devices = sum(len(c.get("devices", [])) for c in b.get("channels", []))
    return {"expected": round(window / interval * devices), "done": done, "skipped": skipped,
            "max_stall_ms": max(float(r.get("max_loop_stall_ms", 0.0)) for _, r in reports[1:]),
            "window_s": window}


async def config_push(args: argparse.Namespace) -> dict[str, Any]:
    """`--config-push`: a plant of --points (13 devices to 10,000 points, on 10 channels), the agent running it,
    and a signed push of the same configuration with one channel's limits changed. Measures the time from the
    push to its `config/result` (the agent applied it, on trial), the longest gap between two readings of a point
    on the unchanged channels around it, and the loop's longest stall meanwhile (from the health reports)."""
    import copy
    import itertools
    import logging

    from simulators.platform import PlatformSimulator

    logging.getLogger("pymodbus").setLevel(logging.WARNING)  # the plant's clients going away at the end
    workdir = Path(tempfile.mkdtemp(prefix="edge-agent-bench-push-"))
    broker = Broker(workdir)
    broker.start()
    per_device = max(1, -(-args.points // 13))
    shape = {"per_device": per_device, "channels": min(10, -(-args.points // per_device))}
    config = synthetic_config(args.points, interval=args.interval, port=1, **shape)
    plant = PlantSimulator(config, ports={c.id: 0 for c in config.channels})
    await plant.start()
    platform = PlatformSimulator("127.0.0.1", broker.port, PREFIX, validate=False)
    platform.start()
    data = synthetic_data(args.points, interval=args.interval, port=1, uplink_port=broker.port,
                          store=str(workdir / "store.db"), **shape)
    data["uplink"].update({"prefix": PREFIX, "health_interval": 1, "max_incoming_bytes": 16 * 1_048_576,
                           "batch": {"max_readings": 5000, "max_delay": 0.9}})
    data["remote_config"] = {"keys": [platform.config_public_key()], "confirm_within": 10}
    for channel in data["channels"]:
        channel["port"] = plant.ports[channel["id"]]
    agent_yaml = write_config(workdir, data, args.config_format)
    agent_log = open(workdir / "agent.log", "wb")  # noqa: SIM115
    agent = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(agent_yaml)],
                             stdout=agent_log, stderr=agent_log)
    try:
        await asyncio.sleep(args.warmup)
        if agent.poll() is not None:
            raise SystemExit(f"bench: the agent exited; see {workdir / 'agent.log'}")
        new = copy.deepcopy(data)
        for point in new["channels"][-1]["devices"][-1]["points"]:
            point["limits"] = {"high": 92, "high_high": 97}
        baseline = [float(h.get("max_loop_stall_ms", 0.0)) for h in platform.health()[2:]]  # past the start
        health_before = len(platform.health())
        began = time.time()
        answer = await asyncio.to_thread(platform.push_config, "000000000000", "bench", new, 1, timeout=60)
        answered = time.time()
        if answer is None or answer["state"] != "trial":
            raise SystemExit(f"bench: the push was not applied: {answer}; see {workdir / 'agent.log'}")
        await asyncio.sleep(4.0)  # readings from after the apply, and a health report covering it
        changed = {c.id for c in config.channels[-1:]}
        stamps: dict[str, list[int]] = {}
        for reading in platform.readings():
            if (began - 3) * 1000 <= reading.ts <= (answered + 3) * 1000:
                stamps.setdefault(reading.point, []).append(reading.ts)
        unchanged = [p.id for ch, _, p in config.points() if ch.id not in changed]
        gaps = [max((b - a for a, b in itertools.pairwise(t)), default=0) / 1000
                for t in (sorted(stamps.get(p, [])) for p in unchanged)]
        stalls = [float(h.get("max_loop_stall_ms", 0.0)) for h in platform.health()[health_before:]]
    finally:
        stop_agent(agent)
        platform.stop()
        await plant.stop()
        broker.stop()
    result = {"points": args.points, "interval_s": args.interval, "config_push_s": round(answered - began, 3),
              "config_push_max_gap_s": round(max(gaps, default=float("nan")), 3),
              "config_push_max_stall_ms": round(max(stalls, default=float("nan")), 1),
              "steady_max_stall_ms": round(max(baseline, default=float("nan")), 1),
              "config_push_points_without_readings": sum(1 for p in unchanged if len(stamps.get(p, [])) < 2)}
    if not args.json:
        print(f"config push of {args.points} points ({len(config.channels)} channels, one changed), "
              f"polled every {args.interval:g}s")
        print(f"push → config/result {result['config_push_s']:>10.3f} s (target ≤ 5 s)")
        print(f"longest reading gap  {result['config_push_max_gap_s']:>10.3f} s on unchanged channels "
              f"(target ≤ one interval, {args.interval:g} s, plus the poll's lateness)")
        print(f"loop                 {result['config_push_max_stall_ms']:>10.1f} ms longest stall meanwhile "
              f"({result['steady_max_stall_ms']:.1f} ms before the push)")
        print(f"files in {workdir}")
    return result


SPREAD_KEYS = ("readings_per_s", "cpu_us_per_reading", "peak_rss_mb", "alarm_latency_p99_ms", "skipped_polls",
               "max_loop_stall_ms", "lag_p99_ms", "wire_bytes_per_reading", "startup_s")


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each figure over the runs, and each figure's spread (lowest, highest)."""
    out: dict[str, Any] = {}
    for key in runs[0]:
        values = sorted(float(r[key]) for r in runs)
        middle = values[len(values) // 2] if len(values) % 2 else (values[len(values) // 2 - 1]
                                                                     + values[len(values) // 2]) / 2
        out[key] = round(middle, 2)
    out["repeat"] = len(runs)
    out["spread"] = {key: [min(float(r[key]) for r in runs), max(float(r[key]) for r in runs)] for key in runs[0]}
    return out


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
    parser.add_argument("--devices", type=int, default=None,
                        help="the plant as N devices, each on its own TCP connection (with --points-per-device)")
    parser.add_argument("--points-per-device", type=int, default=None, metavar="M",
                        help="points of each device with --devices (default 1000)")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="run N times; print the median of each figure and its spread (default 1)")
    parser.add_argument("--wire", choices=("compact", "compressed", "json"), default="compact",
                        help="the agent's `data` encoding: compact (contract version 2, the default here), compact "
                        "and compressed, or json (version 1, the agent's own default)")
    parser.add_argument("--unsigned", action="store_true",
                        help="run the agent without its key: messages chained, not signed (default: signed)")
    parser.add_argument("--config-format", choices=("yaml", "json"), default="yaml",
                        help="the agent's configuration file as YAML (default) or JSON (faster to load at scale)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--config-push", action="store_true",
                        help="measure a signed configuration push instead: time to its config/result, the longest "
                        "reading gap on unchanged channels and the loop's longest stall meanwhile")
    args = parser.parse_args()
    if args.config_push:
        pushed = asyncio.run(config_push(args))
        if args.json:
            print(json.dumps(pushed))
        return
    args.channels = 1
    if args.devices is not None or args.points_per_device is not None:
        if args.devices is None or args.devices < 1 or args.devices > 255:
            parser.error("--devices must be 1 to 255 (Modbus unit ids), given with --points-per-device")
        args.per_device = args.points_per_device or 1000
        args.points = args.devices * args.per_device
        args.channels = args.devices
    if args.points < 1 or args.interval <= 0 or args.duration <= 0 or args.repeat < 1:
        parser.error("--points, --interval, --duration and --repeat must be positive")
    runs = []
    for n in range(args.repeat):
        if args.repeat > 1 and not args.json:
            print(f"--- run {n + 1} of {args.repeat}")
        runs.append(asyncio.run(run(args)))
    if args.repeat > 1 and not args.json:
        summary = summarise(runs)
        print(f"--- median of {args.repeat} runs (spread: lowest..highest)")
        for key in SPREAD_KEYS:
            low, high = summary["spread"][key]
            print(f"{key:<24} {summary[key]:>12,.2f}   ({low:,.2f}..{high:,.2f})")
    if args.json:
        print(json.dumps(runs[0] if args.repeat == 1 else summarise(runs)))


if __name__ == "__main__":
    main()

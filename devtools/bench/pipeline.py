"""Pipeline benchmark: CPU per reading of the agent's pipeline alone (decode aside): the data-quality rules, the
alarm engine with every process-value rule, the archive buffer, and each message encoded, sealed, signed and
stored in a real SQLite file, for the benchmark's synthetic plant. No network, no other process: the figure moves
only with the code, so two trees compare within a few per cent where the end-to-end run spreads by 10. Prints
figures; asserts nothing.

    python -m bench.pipeline [--points 10000] [--seconds 60] [--repeat 3] [--json]

Each device's poll is a batch of 1,000 readings of one sample time: float32 values (as the plant's registers
hold them) on a random walk of ±0.25 a poll, from a start between 20 and 80 (the range is 0..100). A poll fills
two messages of the default 500 readings, stored as they fill; what is left at the end of each second is stored
then, as `batch.max_delay` would. The first 40 s fill the rate windows and are not counted; CPU is the process's
own time over the next --seconds of polls.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from array import array
from pathlib import Path
from typing import Any

from agent.app.agent_key import load_sealer
from agent.config.loader import validate_config_data
from agent.core import GOOD, ReadingBatch
from agent.pipeline.ingest import Pipeline
from agent.store import Store
from agent.trust.keys import create_key_file
from simulators.modbus import synthetic_data

PER_DEVICE = 1000
WARM_S = 40


def _pipeline(points: int, folder: Path) -> Pipeline:
    data = synthetic_data(points, interval=1.0, port=1, store=str(folder / "store.db"), per_device=PER_DEVICE)
    data["uplink"]["encoding"] = "compact"
    for channel in data["channels"]:  # every rule, as `python -m bench` runs the agent
        for device in channel["devices"]:
            for point in device["points"]:
                point["limits"].update({"rate_rise": 500.0, "rate_window": 30.0, "deadband": 0.5})
    config = validate_config_data(data, source="<bench>", base_dir=None)
    store = Store(config.store.path)
    store.open()
    create_key_file(folder)  # signed, as the agent installed with its key
    store.sealer = load_sealer(folder)
    return Pipeline(config, store)


def _polls(points: int, rng: random.Random) -> list[list[list[float]]]:
    """Eight seconds of polls (reused in turn): per second, per device, its values as float32 gives them."""
    state = [rng.uniform(20, 80) for _ in range(points)]
    seconds = []
    for _ in range(8):
        devices = []
        for first in range(0, points, PER_DEVICE):
            values = array("f")
            for i in range(first, min(first + PER_DEVICE, points)):
                state[i] += rng.uniform(-0.25, 0.25)
                values.append(state[i])
            devices.append(values.tolist())
        seconds.append(devices)
    return seconds


def _run(pipeline: Pipeline, polls: list[list[list[float]]], start_ms: int, seconds: int) -> int:
    readings = 0
    for s in range(seconds):
        for d, values in enumerate(polls[s % len(polls)]):
            first = d * PER_DEVICE
            n = len(values)
            pipeline.ingest(ReadingBatch(start_ms + s * 1000 + d * 10, list(range(first, first + n)), list(values),
                                         [GOOD] * n))
            readings += n
        pipeline.flush()
    return readings


def measure(points: int, seconds: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="edge-agent-bench-pipeline-") as folder:
        pipeline = _pipeline(points, Path(folder))
        polls = _polls(points, random.Random(1))
        start = int(time.time() * 1000)
        _run(pipeline, polls, start, WARM_S)
        began = time.process_time()
        readings = _run(pipeline, polls, start + WARM_S * 1000, seconds)
        cpu = time.process_time() - began
        pipeline.store.close()
    return {"cpu_us_per_reading": round(cpu / readings * 1e6, 3), "readings": readings}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=10_000)
    parser.add_argument("--seconds", type=int, default=60, help="seconds of polls counted (after 40 s of warm-up)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the medians and spreads as one JSON object")
    args = parser.parse_args()
    if args.points < 1 or args.seconds < 1 or args.repeat < 1:
        parser.error("--points, --seconds and --repeat must be at least 1")
    runs = [measure(args.points, args.seconds)["cpu_us_per_reading"] for _ in range(args.repeat)]
    result: dict[str, Any] = {"cpu_us_per_reading": statistics.median(runs),
                              "spread": {"cpu_us_per_reading": [min(runs), max(runs)]}, "repeat": args.repeat}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"pipeline CPU per reading  {result['cpu_us_per_reading']:.3f} µs   ({min(runs):.3f}..{max(runs):.3f}, "
              f"{args.repeat} runs of {args.seconds} s at {args.points:,} points)")


if __name__ == "__main__":
    main()

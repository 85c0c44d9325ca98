"""Alarm-storm benchmark: milliseconds the pipeline takes for one device poll while every point's alarms stand
raised (high and high_high: two a point) and one point of the poll changes state, so its events are stored with
the states of every raised alarm. In process, a real SQLite file, no network. Prints figures; asserts nothing.

    python -m bench.storm [--points 50000] [--polls 60] [--repeat 3] [--json]

What an event batch costs grows with the alarms raised (their states are saved with it); this shows how much.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from array import array
from pathlib import Path

from agent.config.loader import validate_config_data
from agent.core import ReadingBatch
from agent.pipeline.ingest import Pipeline
from agent.store import Store
from simulators.modbus import synthetic_data

PER_DEVICE = 1000
ABOVE, NORMAL = 97.0, 50.0  # the synthetic points' limits are high 90, high_high 95


def _poll(device: int, values: list[float], ts: int) -> ReadingBatch:
    first = device * PER_DEVICE
    return ReadingBatch(ts, list(range(first, first + PER_DEVICE)), array("f", values).tolist(), [0] * PER_DEVICE)


def run(points: int, polls: int) -> tuple[float, float]:
    """The median milliseconds of `polls` device polls, each with exactly one point changing state (a point not
    cleared before goes back to normal) while every other stays raised; and the events a poll stored."""
    folder = Path(tempfile.mkdtemp(prefix="edge-agent-storm-"))
    data = synthetic_data(points, interval=1.0, port=1, store=str(folder / "store.db"), per_device=PER_DEVICE)
    config = validate_config_data(data, source="<storm>", base_dir=None)
    store = Store(config.store.path)
    store.open()
    pipeline = Pipeline(config, store)
    devices = points // PER_DEVICE
    values = [[ABOVE] * PER_DEVICE for _ in range(devices)]  # what each point reads: every alarm raised
    ts = int(time.time() * 1000)
    for device in range(devices):
        pipeline.ingest(_poll(device, values[device], ts))
    pipeline.flush()
    took = []
    events = pipeline.events_out
    for k in range(polls):
        ts += 1000
        device, point = k % devices, (k // devices) % PER_DEVICE
        values[device][point] = NORMAL if values[device][point] == ABOVE else ABOVE
        batch = _poll(device, values[device], ts)
        started = time.perf_counter()
        pipeline.ingest(batch)
        took.append((time.perf_counter() - started) * 1000)
    store.close()
    return statistics.median(took), (pipeline.events_out - events) / polls


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.storm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=50_000, help="points, all raised (default 50000)")
    parser.add_argument("--polls", type=int, default=60, help="device polls measured (default 60)")
    parser.add_argument("--repeat", type=int, default=3, help="runs; the median is printed (default 3)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if args.points < PER_DEVICE or args.polls < 1 or args.repeat < 1:
        parser.error(f"--points must be at least {PER_DEVICE}; --polls and --repeat positive")
    logging.disable(logging.WARNING)  # a line an alarm would be most of the time
    measured = [run(args.points, args.polls) for _ in range(args.repeat)]
    runs = [ms for ms, _ in measured]
    result = {"poll_ms_in_storm": round(statistics.median(runs), 1), "spread": [round(min(runs), 1),
              round(max(runs), 1)], "events_per_poll": measured[0][1], "raised": 2 * args.points,
              "repeat": args.repeat}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.points} points, {2 * args.points} alarms raised: {result['poll_ms_in_storm']} ms a device poll "
              f"with one point changing state, {result['events_per_poll']:g} events stored a poll "
              f"({result['spread'][0]}..{result['spread'][1]}), median of {args.repeat}")


if __name__ == "__main__":
    main()

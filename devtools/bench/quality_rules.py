"""Data-quality rules benchmark: CPU per reading of `QualityRules.check` on 1,000-reading batches of a 10,000-point
table, and the memory the rules hold per point. Prints figures; asserts nothing.

    python -m bench.quality_rules [--points 10000] [--batch 1000] [--repeat 5] [--json]

Cases, each timed with timeit (best of --repeat, each run long enough to last about 0.2 s):
  moving      every value moved a little since the last poll, inside its range (the usual case: the fast path)
  still       every value the same as the last poll, frozen_after not yet reached
  resting     gas detectors at 0 in clean air (their resting value, at the bottom of their range)
  bad         a device that does not answer: every reading bad
  spikes      one reading in 100 jumps by most of its range (the careful path for those)
Memory: tracemalloc's count of the bytes the QualityRules object allocates for the table, after a first batch of
every device, divided by the points (the table and the configuration are not counted); for devices of --batch
points and for devices of 20 points (some state is per device).
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import timeit
import tracemalloc
from typing import Any

from agent.config.loader import validate_config_data
from agent.config.points import PointTable
from agent.core import BAD, GOOD, ReadingBatch
from agent.rules.quality import QualityRules


def plant(points: int, per_device: int, domain: str) -> dict[str, Any]:
    devices = []
    for d in range(points // per_device):
        devices.append({"id": f"d{d}", "points": [
            {"id": f"P{d}-{k}", "address": k % 60000, "unit": "%LEL" if domain == "gas" else "m", "domain": domain,
             "range": [0, 100]} for k in range(per_device)]})
    return {"agent": {"id": "bench", "enterprise": "e"},
            "channels": [{"id": "c", "driver": "modbus_tcp", "host": "127.0.0.1", "devices": devices}]}


def batches(table: PointTable, case: str, size: int, ts: int) -> ReadingBatch:
    indices = table.devices[0].indices[:size]
    n = len(indices)
    if case == "bad":
        return ReadingBatch(ts, list(indices), [None] * n, [BAD] * n)
    if case == "resting":
        return ReadingBatch(ts, list(indices), [0.0] * n, [GOOD] * n)
    base = [50.0 + (k % 7) for k in range(n)]
    if case == "still":
        return ReadingBatch(ts, list(indices), base, [GOOD] * n)
    values = [v + random.uniform(-0.5, 0.5) for v in base]
    if case == "spikes":
        for k in range(0, n, 100):
            values[k] = 99.0 if base[k] < 50 else 1.0
    return ReadingBatch(ts, list(indices), values, [GOOD] * n)


def time_case(config: Any, case: str, size: int, repeat: int) -> float:
    """Best CPU time per reading, in microseconds, of check() on fresh copies of one case's batch."""
    table = PointTable(config)
    rules = QualityRules(table, config)
    ts = 1_764_331_200_000
    warm = batches(table, "still" if case in ("moving", "spikes", "still") else case, size, ts)
    rules.check(warm)
    prepared = [batches(table, case, size, ts + 1000 * (k + 1)) for k in range(64)]
    clock = [0]

    def run() -> None:
        batch = prepared[clock[0] % len(prepared)]
        clock[0] += 1
        rules.check(ReadingBatch(batch.ts, batch.indices, list(batch.values), list(batch.qualities)))

    timer = timeit.Timer(run)
    number, _ = timer.autorange()
    number = max(number, 20)
    best = min(timer.repeat(repeat=repeat, number=number)) / number
    return best / size * 1e6


def memory_per_point(config: Any) -> float:
    table = PointTable(config)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    rules = QualityRules(table, config)
    ts = 1_764_331_200_000
    for slot, device in enumerate(table.devices):
        n = len(device.indices)
        rules.check(ReadingBatch(ts, list(device.indices), [50.0] * n, [GOOD] * n))
        rules.expected(slot, ts)
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    del rules
    return grown / len(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=1_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    random.seed(1)
    hazard = validate_config_data(plant(args.points, args.batch, "hazard"), source="bench", base_dir=None)
    gas = validate_config_data(plant(args.points, args.batch, "gas"), source="bench", base_dir=None)
    figures: dict[str, Any] = {"points": args.points, "batch": args.batch}
    for case in ("moving", "still", "bad", "spikes"):
        figures[f"{case}_us_per_reading"] = round(time_case(hazard, case, args.batch, args.repeat), 3)
    figures["resting_us_per_reading"] = round(time_case(gas, "resting", args.batch, args.repeat), 3)
    figures["bytes_per_point"] = round(memory_per_point(hazard), 1)
    small = validate_config_data(plant(args.points, 20, "hazard"), source="bench", base_dir=None)
    figures["bytes_per_point_20_a_device"] = round(memory_per_point(small), 1)
    if args.json:
        print(json.dumps(figures))
        return
    for key, value in figures.items():
        print(f"{key:28} {value}")


if __name__ == "__main__":
    main()

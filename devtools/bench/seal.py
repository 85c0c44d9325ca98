"""Sealing benchmark: CPU per reading of chaining and signing the messages the agent stores (agent.seal), on the
bodies its encoders write for the synthetic plant, with a signature on every message or on one in N. Prints figures;
asserts nothing.

    python -m bench.seal [--points 10000] [--batch 500] [--every 1,10,100] [--repeat 5] [--json]

A 500-reading body of the plant's random-walk float32 values, one of integral values (a register read with scale
1.0: `12.0`, the slower road of the encoder) and an alarm event, each encoded once; then, timed with timeit (best of
--repeat runs of about 0.2 s each), the seal of each: its chain alone, and with an Ed25519 signature on one message
in N (N=1: every message). The `store` figure adds what the store does beside the seal for every message (the head
read from and written to meta, zlib, the row), on a real SQLite file, beside the same store with sealing switched off.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import timeit
from pathlib import Path
from typing import Any

from agent.config.points import PointTable
from agent.core import GOOD, KIND_DATA, AlarmEvent, ReadingBatch
from agent.messages import DataEncoder, alarm_body, identity_fields
from agent.seal import Sealer
from agent.store import Store
from agent.trust.chain import Head
from agent.trust.keys import generate_private_key
from simulators.modbus import synthetic_config

HEAD = Head(41, "data", bytes(32))


def bodies(points: int, batch: int) -> dict[str, tuple[bytes, int, str]]:
    """(body, readings, topic) by case name."""
    config = synthetic_config(points, interval=1.0, port=1, per_device=min(points, 1000))
    table = PointTable(config)
    identity = identity_fields(config.agent.id, config.agent.enterprise)
    rng = random.Random(1)
    indices = list(table.devices[0].indices[:batch])
    walk = [rng.uniform(0, 100) for _ in indices]
    integral = [float(round(v)) for v in walk]
    out: dict[str, tuple[bytes, int, str]] = {}
    for encoding in ("compact", "json"):
        encoder = DataEncoder(identity, table, encoding)
        for name, values in (("walk", walk), ("integral", integral)):
            body, count = encoder.body([ReadingBatch(1_764_331_200_000, indices, values, [GOOD] * len(indices))])
            out[f"{encoding} {name}"] = (body, count, "data")
    event = AlarmEvent("P00010", "high", 1, "raised", 96.0, 90.0, "m", 1_764_331_200_000, "above 90 m")
    out["alarm event"] = (alarm_body(identity, event), 1, "alarm")
    return out


def per_message(action: Any, repeat: int) -> float:
    """Seconds one call of `action` takes: the best of `repeat` timeit runs."""
    timer = timeit.Timer(action)
    number, _ = timer.autorange()
    return min(timer.repeat(repeat=repeat, number=number)) / number


def run(args: argparse.Namespace) -> dict[str, Any]:
    key = generate_private_key()
    chain_only, signed = Sealer(), Sealer(key)
    results: dict[str, Any] = {}
    for name, (body, count, topic) in bodies(args.points, args.batch).items():
        chain = per_message(lambda: chain_only.seal(topic, 42, body, HEAD), args.repeat)  # noqa: B023
        sign = per_message(lambda: signed.seal(topic, 42, body, HEAD), args.repeat) - chain  # noqa: B023
        row = {"readings": count, "body_bytes": len(body), "chain_us_per_reading": round(chain / count * 1e6, 3)}
        for n in args.every:
            row[f"sign_1_in_{n}_us_per_reading"] = round((chain + sign / n) / count * 1e6, 3)
        results[name] = row
    with tempfile.TemporaryDirectory() as folder:
        body, count, _ = bodies(args.points, args.batch)["compact walk"]
        for label, sealer in (("store unsealed", None), ("store chain", chain_only), ("store signed", signed)):
            with Store(Path(folder) / f"{label}.db") as store:
                if sealer is None:  # the store as it was before messages were sealed, for comparison
                    store._seal = lambda kind, seq, body: body  # type: ignore[method-assign]
                else:
                    store.sealer = sealer
                seconds = per_message(lambda: store.append(KIND_DATA, count, body), args.repeat)
            results[label] = {"readings": count, "us_per_reading": round(seconds / count * 1e6, 3)}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.seal", description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=10_000, help="points in the synthetic plant (default 10000)")
    parser.add_argument("--batch", type=int, default=500, help="readings in a data message (default 500)")
    parser.add_argument("--every", default="1,10,100",
                        help="sign one message in N, for each N listed (default 1,10,100)")
    parser.add_argument("--repeat", type=int, default=5, help="timeit runs, the best taken (default 5)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    args.every = [int(n) for n in args.every.split(",")]
    if args.points < 1 or args.batch < 1 or args.repeat < 1 or min(args.every) < 1:
        parser.error("--points, --batch, --repeat and --every must be positive")
    results = run(args)
    if args.json:
        print(json.dumps(results))
        return
    print(f"sealing, µs of CPU per reading (messages of {args.batch} readings, {args.points} points)")
    for name, row in results.items():
        figures = ", ".join(f"{k.removesuffix('_us_per_reading').replace('_', ' ')} {v}" for k, v in row.items()
                            if k.endswith("us_per_reading"))
        print(f"  {name:<18} {figures}")


if __name__ == "__main__":
    main()

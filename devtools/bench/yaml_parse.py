"""YAML parse benchmark: where the first start of a large YAML configuration goes, reader by reader. The benchmark's
synthetic plant (1,000 points to a device, every rule on: `bench.startup`'s) is parsed in this process
by each reader in turn; prints the median seconds of --repeat runs of each, and asserts nothing.

    python -m bench.yaml_parse [--points 100000] [--repeat 3] [--json]

What is timed, each from the file's text in memory:
- `libyaml_raw`: libyaml alone, every parser event made and thrown away in C (PyYAML's `raw_parse`): the floor of
  any reader built on libyaml;
- `libyaml_events`: the same events as PyYAML hands them to Python (an object and two marks each), nothing built;
- `agent_loader`: the agent's own loader (`agent.config.yaml_stream`), the values built from those events;
- `json`: the same document written as JSON, read by the standard library, for scale.
Readers outside the agent's dependencies are timed too when they are installed (`rapidyaml`, `yaml_rs`); they read
YAML 1.2, not the YAML 1.1 every configuration is written for (docs/decisions/yaml-loader.md).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from agent.config import yaml_stream
from bench.startup import PER_DEVICE, document


def _raw(text: str) -> None:
    yaml.CSafeLoader(text).raw_parse()


def _events(text: str) -> None:
    loader = yaml.CSafeLoader(text)
    try:
        while loader.check_event():
            loader.get_event()
    finally:
        loader.dispose()


def _other_readers() -> dict[str, Callable[[str], Any]]:
    """Readers that are not the agent's dependencies, when this environment has them."""
    found: dict[str, Callable[[str], Any]] = {}
    try:
        ryml: Any = importlib.import_module("ryml")
        found["rapidyaml_tree"] = lambda text: ryml.parse_in_arena(text.encode())
        found["rapidyaml_to_python_via_json"] = lambda text: json.loads(
            ryml.emit_json_malloc(tree := ryml.parse_in_arena(text.encode()), tree.root_id()))
    except ImportError:
        pass
    try:
        yaml_rs: Any = importlib.import_module("yaml_rs")
        found["yaml_rs"] = yaml_rs.loads
    except ImportError:
        pass
    return found


def _time(read: Callable[[str], Any], text: str) -> float:
    gc.collect()
    gc.set_threshold(50_000, 20, 100)  # as in the loader's child
    began = time.perf_counter()
    read(text)
    seconds = time.perf_counter() - began
    gc.set_threshold(700, 10, 10)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.yaml_parse", description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=100_000, help="points (default 100000)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each reader (default 3)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if args.points < 1 or args.repeat < 1:
        parser.error("--points and --repeat must be positive")
    with tempfile.TemporaryDirectory(prefix="edge-agent-yaml-") as folder:
        data = document(args.points, [1502] * -(-args.points // PER_DEVICE), Path(folder) / "store.db")
    yaml_text = yaml.safe_dump(data, sort_keys=False)
    json_text = json.dumps(data)
    if yaml_stream.load(yaml_text) != data:
        raise SystemExit("bench.yaml_parse: the agent's loader read the file otherwise than it was written")
    readers: dict[str, tuple[Callable[[str], Any], str]] = {
        "libyaml_raw": (_raw, yaml_text),
        "libyaml_events": (_events, yaml_text),
        "agent_loader": (yaml_stream.load, yaml_text),
        "json": (json.loads, json_text),
    }
    readers.update({name: (read, yaml_text) for name, read in _other_readers().items()})
    runs: dict[str, list[float]] = {name: [] for name in readers}
    for _ in range(args.repeat):
        for name, (read, text) in readers.items():  # in turns, so a noisy moment spreads over every reader
            runs[name].append(_time(read, text))
    result: dict[str, Any] = {f"{name}_s": round(statistics.median(v), 3) for name, v in runs.items()}
    result.update(spread={f"{name}_s": [round(min(v), 3), round(max(v), 3)] for name, v in runs.items()},
                  points=args.points, yaml_mb=round(len(yaml_text.encode()) / 1e6, 1),
                  json_mb=round(len(json_text.encode()) / 1e6, 1), repeat=args.repeat)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.points:,} points: YAML {result['yaml_mb']} MB, JSON {result['json_mb']} MB")
    for name, seconds in runs.items():
        print(f"{name:<30} {statistics.median(seconds):6.3f} s ({min(seconds):.3f}..{max(seconds):.3f}), median of "
              f"{args.repeat}")


if __name__ == "__main__":
    main()

"""The house rules of the code, checked on the source: the core is a leaf, every import points down the layers
(docs/architecture.md), no module imports itself round a cycle, and the product never imports its tooling."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from conftest import ROOT

AGENT = ROOT / "agent"

# lowest first; a module may import only from its own layer or a lower one
LAYERS: list[tuple[str, ...]] = [
    ("agent.core", "agent.errors"),
    ("agent.config.base", "agent.config.yaml_stream", "agent.rules.gas",  # gas: the standard's set points
     "agent.trust"),  # keys and signatures: the configuration validates keys, control checks signed commands
    ("agent.drivers",),
    ("agent.config",),  # the whole configuration: it gathers the drivers' channel models
    ("agent.rules", "agent.messages", "agent.compact", "agent.seal"),
    ("agent.store",),
    ("agent.pipeline", "agent.uplink"),
    ("agent.control",),
    ("agent.app",),
    ("agent.cli", "agent.__main__"),
]
# stages of one layer that must not reach into each other
APART = [("agent.pipeline", "agent.uplink")]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> Iterator[str]:
    """Every module this file imports, anywhere in it (functions and TYPE_CHECKING blocks too)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            # `from agent.drivers import registry` imports the module agent.drivers.registry
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                if (ROOT / Path(*candidate.split("."))).with_suffix(".py").exists():
                    yield candidate


def layer_of(module: str) -> int:
    best, rank = -1, -1
    for n, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), n
    assert rank >= 0, f"{module} is in no layer of docs/architecture.md"
    return rank


def graph() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for path in sorted(AGENT.rglob("*.py")):
        name = module_name(path)
        out[name] = {m for m in imports(path) if m == "agent" or m.startswith(("agent.", "simulators", "bench"))}
    return out


def test_the_core_and_the_errors_import_nothing_of_ours() -> None:
    g = graph()
    assert g["agent.core"] == set() and g["agent.errors"] == set()


def test_the_product_never_imports_its_tooling() -> None:
    bad = {(m, i) for m, deps in graph().items() for i in deps if i.startswith(("simulators", "bench"))}
    assert not bad


def test_every_import_points_down_the_layers() -> None:
    upward = []
    for module, deps in graph().items():
        for dep in deps:
            if dep != "agent" and layer_of(dep) > layer_of(module):
                upward.append(f"{module} -> {dep}")
    assert not upward, "\n".join(upward)


def test_pipeline_and_uplink_stay_apart() -> None:
    crossing = [f"{m} -> {d}" for m, deps in graph().items() for d in deps for a, b in APART
                if (m.startswith(a) and d.startswith(b)) or (m.startswith(b) and d.startswith(a))]
    assert not crossing, "\n".join(crossing)


def test_no_import_cycle() -> None:
    full = graph()
    g = {m: {d for d in deps if d in full} for m, deps in full.items()}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, path: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(g[node]):
            if nxt == node or nxt.startswith(node + "."):
                continue  # a package's __init__ importing its own modules is loading, not depending
            if state.get(nxt) == 1:
                cycle.extend([*path, node, nxt])
                return True
            if state.get(nxt) is None and visit(nxt, [*path, node]):
                return True
        state[node] = 2
        return False

    for node in sorted(g):
        if state.get(node) is None and visit(node, []):
            break
    assert not cycle, " -> ".join(cycle)

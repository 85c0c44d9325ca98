"""The streaming YAML loader gives what PyYAML's safe loader gives, and names mistakes with their line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import ROOT, SHIPPED_CONFIGS

from agent.config import yaml_stream


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_configs_load_as_with_pyyaml(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert yaml_stream.load(text) == yaml.safe_load(text)


def test_scalars_anchors_and_merge_keys() -> None:
    text = "a: &d {k: 1, m: 3}\nb:\n  <<: *d\n  k: 5\nc: [yes, ~, 0x10, 1.5e3, '07', 2026-11-28]\ne: *d\n"
    assert yaml_stream.load(text) == yaml.safe_load(text)
    assert yaml_stream.load("") is None


@pytest.mark.parametrize(
    ("text", "problem", "line"),
    [
        ("a: 1\nb: 2\na: 3\n", "duplicate key 'a'", 3),
        ("a: *nowhere\n", "undefined alias", 1),
        ("a: 1\n---\nb: 2\n", "single document", 2),
        ("a: !!python/object:os.system x\n", "python/object", 1),
    ],
)
def test_mistakes_are_errors_with_their_line(text: str, problem: str, line: int) -> None:
    with pytest.raises(yaml.YAMLError) as info:
        yaml_stream.load(text)
    assert problem in str(info.value)
    assert info.value.problem_mark is not None  # type: ignore[attr-defined]
    assert info.value.problem_mark.line + 1 == line  # type: ignore[attr-defined]


def _laughs(levels: int, width: int = 10) -> str:
    """A billion-laughs document: each level is a list of `width` aliases of the one below."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for n in range(1, levels + 1):
        lines.append(f"a{n}: &a{n} [" + ", ".join([f"*a{n - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def _merged_laughs(levels: int) -> str:
    """The same growth through merge keys alone: each level merges the one below into two fresh mappings."""
    lines = ["m0: &m0 {k: [x, x, x, x, x, x, x, x, x, x]}"]
    for n in range(1, levels + 1):
        lines.append(f"m{n}: &m{n} {{a: {{<<: *m{n - 1}}}, b: {{<<: *m{n - 1}}}, c: {{<<: *m{n - 1}}}}}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("text", [_laughs(9), _merged_laughs(20)], ids=["aliases", "merge-keys"])
def test_aliases_that_expand_the_document_past_the_cap_are_refused_with_their_line(text: str) -> None:
    with pytest.raises(yaml.YAMLError) as info:
        yaml_stream.load(text)
    assert "aliases" in str(info.value) and "expand" in str(info.value)
    mark = info.value.problem_mark  # type: ignore[attr-defined]
    assert mark is not None and 1 < mark.line + 1 <= text.count("\n")


def test_a_few_aliases_and_merge_keys_still_load() -> None:
    text = _laughs(2) + "d: &d {interval: 1s, timeout: 2s}\ndevices: [{<<: *d, id: a}, {<<: *d, id: b}]\n"
    assert yaml_stream.load(text) == yaml.safe_load(text)


def test_an_alias_inside_its_own_anchor_is_refused() -> None:
    with pytest.raises(yaml.YAMLError, match="recursive") as info:
        yaml_stream.load("a: 1\nb: &b [1, *b]\n")
    assert info.value.problem_mark.line + 1 == 2  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "text",
    ["a: " + "[" * 100 + "]" * 100 + "\n", "a: " + "{k: " * 100 + "1" + "}" * 100 + "\n",
     "a: " + "[" * 995 + "]" * 995 + "\n",
     "".join("  " * n + "k:\n" for n in range(100)) + "  " * 100 + "k: 1\n"],
    ids=["flow-list", "flow-mapping", "995-levels", "block"],
)
def test_nesting_deeper_than_the_bound_is_an_error_with_its_line(text: str) -> None:
    with pytest.raises(yaml.YAMLError, match="nested deeper than 64") as info:
        yaml_stream.load(text)
    assert info.value.problem_mark is not None  # type: ignore[attr-defined]


def test_nesting_up_to_the_bound_loads() -> None:
    text = "a: " + "[" * 63 + "]" * 63 + "\n"
    assert yaml_stream.load(text) == yaml.safe_load(text)


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("a: 1\nb: 2026-13-45\n", 2),  # no 13th month
        ("a: 1\nb: " + "1" * 5000 + "\n", 2),  # more digits than Python converts
        ("a: !!bool maybe\n", 1),
        ("a: !!int hunter2\n", 1),
        ("a: !!float hunter2\n", 1),
        ("a: !!binary hunter2\n", 1),
        ("a: !!timestamp hunter2\n", 1),
    ],
)
def test_scalars_that_cannot_be_built_are_errors_with_their_line_not_quoting_them(text: str, line: int) -> None:
    with pytest.raises(yaml.YAMLError) as info:
        yaml_stream.load(text)
    assert info.value.problem_mark.line + 1 == line  # type: ignore[attr-defined]
    assert "hunter2" not in str(info.value) and "maybe" not in str(info.value)


@pytest.mark.parametrize("text", ["a: !!python/object:os.system {x: 1}\n", "a: !!set {x: 1}\n",
                                  "a: !!omap [x: 1]\n", "a: !custom [1]\n"])
def test_tags_on_collections_are_refused_as_safe_load_refuses_them(text: str) -> None:
    with pytest.raises(yaml.YAMLError, match="unsupported tag"):
        yaml_stream.load(text)

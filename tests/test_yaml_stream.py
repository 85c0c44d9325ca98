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

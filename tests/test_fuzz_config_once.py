"""Fuzz the validation of equal parts once (agent.config.sharing.validated_once): whatever the points' limits,
gas and data-quality mappings, alike or only nearly alike, loading a document gives exactly what validating each
part where it stands gives (the same configuration, or the same error lines at the same paths), and leaves the
document as it was. A long run: EDGE_FUZZ=long pytest this file."""

from __future__ import annotations

import copy
import random
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from agent.config.base import DataQuality, GasDetector, Limits
from agent.config.loader import format_validation_error, validate_config_data
from agent.config.models import AgentConfig
from agent.errors import ConfigError

TWINS = [[0, 0.0, -0.0, False], [1, 1.0, True], [2, 2.0], [90, 90.0], [95, 95.0]]
"""Values equal in Python (a model may still tell them apart: -0.0 keeps its sign)."""
ALIKE = st.sampled_from([0.0, -0.0, *(v for twins in TWINS for v in twins), "1", "5s", None])
VALUES = ALIKE | ALIKE | ALIKE | ALIKE | ALIKE | ALIKE | st.one_of(
    st.integers(-3, 120), st.floats(),
    st.sampled_from(["x", "-0.0", "combustible", "toxic", "oxygen", "H2S", "frozen", "spike"]),
    st.lists(st.sampled_from(["frozen", "spike", "range_end", "at_rest", 1, None]), max_size=3),
    st.dictionaries(st.sampled_from(["high", "a"]), st.integers(0, 2), max_size=1),
)


def twin(value: Any, rnd: random.Random) -> Any:
    """A value equal to this one in Python, maybe of another type or sign."""
    for twins in TWINS:
        if any(type(value) is type(t) and value == t for t in twins):
            return rnd.choice(twins)
    return value


def mappings(model: type[Any]) -> st.SearchStrategy[dict[Any, Any]]:
    keys = st.sampled_from(list(model.model_fields)) | st.sampled_from(["junk", 0])
    return st.dictionaries(keys, VALUES, max_size=3)


POOL = st.fixed_dictionaries({"limits": st.lists(mappings(Limits), min_size=1, max_size=4),
                              "gas": st.lists(mappings(GasDetector), min_size=1, max_size=3),
                              "quality": st.lists(mappings(DataQuality), min_size=1, max_size=3)})
POINT = st.fixed_dictionaries({"twin": st.booleans()}, optional={
    "limits": st.integers(0, 3), "gas": st.integers(0, 2), "quality": st.integers(0, 2), "range": st.just([0, 100]),
    "unit": st.sampled_from(["%LEL", "ppm", "%VOL"])})


def document(pool: dict[str, list[dict[Any, Any]]], points: list[dict[str, Any]], rnd: random.Random) -> dict[str, Any]:
    """Points whose mappings are copies (equal, not the same object) of a few from the pool, or nearly."""
    built = []
    for i, point in enumerate(points):
        item: dict[str, Any] = {"id": f"P{i}", "address": i}
        for name, choice in point.items():
            if name in pool:
                mapping = copy.deepcopy(pool[name][choice % len(pool[name])])
                if point["twin"] and mapping:  # one value swapped for its twin: all else alike
                    key = rnd.choice(list(mapping))
                    mapping[key] = twin(mapping[key], rnd)
                item[name] = mapping
            elif name != "twin":
                item[name] = choice
        built.append(item)
    return {"agent": {"id": "a", "enterprise": "e"}, "channels": [{
        "id": "c", "driver": "modbus_tcp", "host": "127.0.0.1", "devices": [{"id": "d", "points": built}]}]}


def same_as_each_validated(data: dict[str, Any]) -> None:
    before = copy.deepcopy(data)
    try:
        expected: str | list[str] = AgentConfig.model_validate(data).model_dump_json()
    except ValidationError as exc:
        expected = format_validation_error(exc)[:100]
    try:
        got: str | list[str] = validate_config_data(data, source="t", base_dir=None).model_dump_json()
    except ConfigError as exc:
        got = exc.errors
    assert got == expected
    assert data == before


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(POOL, st.lists(POINT, min_size=1, max_size=12), st.randoms(use_true_random=False))
def test_parts_validated_once_give_what_each_validated_gives(pool: dict[str, Any], points: list[Any],
                                                             rnd: random.Random) -> None:
    same_as_each_validated(document(pool, points, rnd))


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.dictionaries(st.sampled_from(["low", "high", "deadband"]), ALIKE, max_size=2), min_size=1,
                max_size=2),
       st.lists(st.fixed_dictionaries({"twin": st.booleans(), "limits": st.integers(0, 1)}), min_size=2, max_size=8),
       st.randoms(use_true_random=False))
def test_limits_nearly_alike_are_each_what_they_say(limits: list[Any], points: list[Any], rnd: random.Random) -> None:
    same_as_each_validated(document({"limits": limits}, points, rnd))

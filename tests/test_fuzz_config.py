"""Fuzz the configuration loader with crafted files; a long run (20,000 examples a test): EDGE_FUZZ=long pytest
this file.

Whatever the text, `parse_config` returns a configuration or raises ConfigError whose lines are short text, with
bounded memory, and no error line quotes a secret. Inputs: arbitrary text; YAML-ish documents built from the
models' own field names with random nesting, anchors, aliases, merge keys and odd scalars; and the shipped
configurations with values replaced, deleted, shared (aliases) or wrapped. Example counts come from the
hypothesis profiles in tests/conftest.py.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import math
import tracemalloc
import typing
from typing import Any

import pytest
import yaml
from conftest import SHIPPED_CONFIGS
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from agent.config import yaml_stream
from agent.config.base import Model
from agent.config.loader import parse_config
from agent.config.models import AgentConfig
from agent.errors import ConfigError

MAX_PEAK_BYTES = 64 * 1024 * 1024  # far above what any example here needs; an expansion bomb needs gigabytes
MAX_LINE = 2000
SECRET_TEXT, SECRET_NUMBER = "Zq7xW9pL", 73914265


def _field_names() -> list[str]:
    names: set[str] = set()
    todo: list[type[Model]] = [Model]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        names.update(cls.model_fields)
    return sorted(names)


FIELDS = _field_names()
ODD_SCALARS = [
    ".nan", ".NaN", ".inf", "-.inf", "+.inf", "1.0e+400", "-1.0e+400", "9" * 400, "-" + "9" * 400, "7" * 5000,
    "0x7fffffffffffffff", "0o17", "0b101", "1_000", "190:20:30", "2026-11-28", "2026-13-45", "2026-02-30",
    "2026-11-28T25:61:00Z", "2026-11-28 10:00:00 +8", "~", "null", "yes", "No", "on", "''", '""', "'07'",
    '"\\u00e9\\x00\\t"', '"\\ud800"', "!!int x", "!!float y", "!!bool maybe", "!!binary abc", "!!timestamp z",
    "!!str 5", "!!null a", "!!python/object:os.system x", "!custom v", "<<", "=", "-1", "0", "1e3", "1.5e+3",
    "500ms", "5s", "2m", "1h", "30d", "-5s", "5 years", "'" + "x" * 3000 + "'", "modbus_tcp", "opcua", "dlt645",
    "float32", "holding", "ns=2;i=1", "opc.tcp://h:4840", "combustible", "toxic", "oxygen", "H2S", "%LEL",
]
SECRET_FORMS = [SECRET_TEXT, str(SECRET_NUMBER), f"!{SECRET_TEXT}", f"*{SECRET_TEXT}", f"&{SECRET_TEXT} x",
                f"!!int {SECRET_TEXT}", f"!!timestamp {SECRET_TEXT}", f"!!binary {SECRET_TEXT}", f"[{SECRET_TEXT}]",
                f"{{{SECRET_TEXT}: 1, {SECRET_TEXT}: 2}}", f"{SECRET_NUMBER}.5", f"0x{SECRET_NUMBER}",
                f"!!python/name:{SECRET_TEXT}", f"'{SECRET_TEXT}'"]
ANCHORS = ["a0", "a1", "a2", "a3"]


def loads_or_refuses(text: str) -> AgentConfig | ConfigError:
    """parse_config's promise: a configuration or one ConfigError of short lines, in bounded memory."""
    tracemalloc.start()
    try:
        outcome: AgentConfig | ConfigError = parse_config(text)
    except ConfigError as exc:
        outcome = exc
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < MAX_PEAK_BYTES, f"{peak / 1e6:.0f} MB to load {len(text)} characters"
    if isinstance(outcome, ConfigError):
        assert outcome.errors and all(isinstance(line, str) and line for line in outcome.errors)
        assert all(len(line) <= MAX_LINE for line in outcome.errors), max(outcome.errors, key=len)[:300]
    else:
        assert isinstance(outcome, AgentConfig)
    return outcome


def shown(outcome: AgentConfig | ConfigError) -> str:
    return " ".join(outcome.errors) if isinstance(outcome, ConfigError) else repr(outcome)


# --- arbitrary text -----------------------------------------------------------------------------------------


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=3000) | st.text(st.characters(blacklist_categories=()), max_size=300))
def test_arbitrary_text_loads_or_is_refused(text: str) -> None:
    loads_or_refuses(text)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_read_as_text_load_or_are_refused(data: bytes) -> None:
    loads_or_refuses(data.decode("utf-8", errors="replace"))
    loads_or_refuses(data.decode("latin-1"))


# --- YAML-ish documents: the models' field names, nesting, anchors, aliases, merge keys, odd scalars -------------

WORD = "abcdefghijklmnopqrstuvwxyzABCXYZ0123456789_.-"
key = st.sampled_from([*FIELDS, "<<", "x", "1", "~", "? x", "'a b'", "- k"]) | st.text(WORD, min_size=1, max_size=12)
scalar = st.one_of(
    st.sampled_from(ODD_SCALARS),
    st.sampled_from(FIELDS),
    st.integers().map(str),
    st.floats().map(lambda f: repr(f) if math.isfinite(f) else str(f)),
    st.text(WORD, min_size=1, max_size=16),
)
alias = st.sampled_from(ANCHORS).map(lambda a: f"*{a}")
anchor = st.sampled_from(["", "", "", *(f"&{a} " for a in ANCHORS)])


def _collections(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    pairs = st.lists(st.tuples(key, children), max_size=5)
    return st.tuples(anchor, st.one_of(
        st.lists(children, max_size=6).map(lambda xs: "[" + ", ".join(xs) + "]"),
        pairs.map(lambda kv: "{" + ", ".join(f"{k}: {v}" for k, v in kv) + "}"),
        st.tuples(pairs, st.lists(alias, min_size=1, max_size=3)).map(
            lambda p: "{" + ", ".join([f"<<: [{', '.join(p[1])}]", *(f"{k}: {v}" for k, v in p[0])]) + "}"),
    )).map("".join)


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


@st.composite
def laughs(draw: st.DrawFn) -> str:
    """A chain of anchored lists, each aliasing the one before `width` times (or merging it into mappings)."""
    levels, width = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    merge = draw(st.booleans())
    out = ["l0: &l0 [x, y, z]" if not merge else "l0: &l0 {k: [x, y, z]}"]
    for n in range(1, levels + 1):
        if merge:
            out.append(f"l{n}: &l{n} {{" + ", ".join(f"m{i}: {{<<: *l{n - 1}}}" for i in range(width)) + "}")
        else:
            out.append(f"l{n}: &l{n} [" + ", ".join([f"*l{n - 1}"] * width) + "]")
    where = draw(st.sampled_from(FIELDS))
    return "\n".join(out) + f"\n{where}: *l{levels}\n"


node = st.recursive(scalar | alias | st.integers(1, 1500).map(_deep), _collections, max_leaves=24)
PRELUDE = "agent: {id: a1, enterprise: e1}\n"


@st.composite
def documents(draw: st.DrawFn) -> str:
    lines = [PRELUDE] if draw(st.booleans()) else []
    for k, v in draw(st.lists(st.tuples(key, node), max_size=8)):
        lines.append(f"{k}: {v}\n")
    if draw(st.booleans()):
        lines.insert(draw(st.integers(0, len(lines))), draw(laughs()))
    return "".join(lines)


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(documents())
def test_yaml_ish_documents_load_or_are_refused(text: str) -> None:
    loads_or_refuses(text)


def _expanded(value: Any, budget: int) -> int:
    """Values in `value` with every alias written out, counting no further than `budget`."""
    count, todo = 0, [value]
    while todo and count <= budget:
        item = todo.pop()
        count += 1
        if isinstance(item, dict):
            todo.extend(item.keys())
            todo.extend(item.values())
        elif isinstance(item, list):
            todo.extend(item)
    return count


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(documents())
def test_what_the_yaml_reader_returns_is_bounded_by_what_is_written(text: str) -> None:
    try:
        value = yaml_stream.load(text)
    except yaml.YAMLError:
        return
    bound = yaml_stream.ALIAS_ALLOWANCE + 2 * len(text)  # a written value takes at least one character
    assert _expanded(value, bound) <= bound


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(documents(), st.sampled_from(SECRET_FORMS), st.booleans())
def test_no_error_quotes_a_password_however_it_is_written(text: str, secret: str, opcua: bool) -> None:
    if opcua:
        where = ("channels: [{id: c, driver: opcua, endpoint: 'opc.tcp://h:4840', username: u, password: " + secret
                 + ", devices: [{id: d, points: [{id: p, node: 'ns=2;i=1'}]}]}]\n")
    else:
        where = f"uplink:\n  username: u\n  password: {secret}\n"
    outcome = loads_or_refuses(PRELUDE + where + "\n".join(line for line in text.splitlines()
                                                          if not line.startswith(("agent:", "uplink:", "channels:"))))
    assert SECRET_TEXT not in shown(outcome) and str(SECRET_NUMBER) not in shown(outcome)


# --- the shipped configurations, mutated ----------------------------------------------------------------------


SEEDS = [yaml.safe_load(path.read_text(encoding="utf-8")) for path in SHIPPED_CONFIGS]
for _seed in SEEDS:  # every seed carries secrets to leak
    _seed.setdefault("uplink", {}).update(username="u", password=SECRET_TEXT)
    for _channel in _seed.get("channels", []):
        if _channel.get("driver") == "opcua":
            _channel.update(username="u", password=SECRET_TEXT)

odd_value = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(),
    st.integers(min_value=-(10**600), max_value=10**600),
    st.sampled_from([math.nan, math.inf, -math.inf, 0, -1, 10**400, "", "5s", "1e400", "9" * 400, "nan", "-inf",
                     True, False, None, [], {}, "0x10", "modbus_tcp", "float32", "combustible", "H2S", "%LEL"]),
    st.text(max_size=40),
    st.dates(),
    st.datetimes(timezones=st.just(dt.UTC)),
    st.binary(max_size=8),
    st.lists(st.floats(allow_nan=True) | st.integers(), max_size=3),
    st.dictionaries(st.sampled_from(FIELDS), st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
                    max_size=3),
)


def _places(data: Any) -> list[tuple[Any, Any]]:
    """Every (container, key or index) in the data, each container once (shared ones are aliases)."""
    out: list[tuple[Any, Any]] = []
    seen: set[int] = set()
    todo = [data]
    while todo:
        item = todo.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        pairs = item.items() if isinstance(item, dict) else enumerate(item) if isinstance(item, list) else ()
        for k, v in pairs:
            out.append((item, k))
            todo.append(v)
    return out[::-1]  # the deepest first: hypothesis favours the first, and a point's fields are the most varied


@st.composite
def mutated(draw: st.DrawFn) -> str:
    data = copy.deepcopy(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 5))):
        places = _places(data)
        container, k = draw(st.sampled_from(places))
        op = draw(st.sampled_from(["replace", "replace", "replace", "delete", "share", "wrap", "add"]))
        if op == "replace":
            container[k] = draw(odd_value)
        elif op == "delete":
            del container[k]
        elif op == "share":  # the same object in two places: yaml.safe_dump writes an anchor and an alias
            source, sk = draw(st.sampled_from(places))
            assume(source[sk] != SECRET_TEXT)  # the password as a site's name is no longer a secret
            container[k] = source[sk]
        elif op == "wrap":
            container[k] = draw(st.sampled_from([[container[k]], {"x": container[k]}, [container[k]] * 3]))
        elif isinstance(container, dict):
            container[draw(st.sampled_from(FIELDS))] = draw(odd_value)
        else:
            container.append(draw(odd_value))
    try:
        return yaml.safe_dump(data, allow_unicode=True, sort_keys=False)
    except (yaml.YAMLError, ValueError, RecursionError):  # e.g. a list made to hold itself; not our loader's input
        assume(False)
        raise AssertionError("unreachable") from None


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(mutated())
def test_mutated_shipped_configurations_load_or_are_refused_without_quoting_a_password(text: str) -> None:
    outcome = loads_or_refuses(text)
    assert SECRET_TEXT not in shown(outcome)


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_every_seed_with_its_secrets_is_valid(path: Any) -> None:
    seed = SEEDS[SHIPPED_CONFIGS.index(path)]
    outcome = loads_or_refuses(yaml.safe_dump(seed, allow_unicode=True, sort_keys=False))
    assert isinstance(outcome, AgentConfig), shown(outcome)
    assert SECRET_TEXT not in repr(outcome)
    assert typing.cast(Any, outcome).uplink.password == SECRET_TEXT


# --- JSON, read by its own fast path --------------------------------------------------------------------------

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=30)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["agent", "uplink", "channels", "store", "x"]), _json_values, max_size=4),
       st.text(max_size=40))
def test_json_documents_and_their_damaged_forms_load_or_are_refused(document: dict[str, Any], tail: str) -> None:
    text = json.dumps(document)
    loads_or_refuses(text)
    loads_or_refuses(text[: len(text) // 2] + tail)  # cut and garbled
    loads_or_refuses("{" + text[1:].replace(",", ", \"agent\": 1,", 1))  # a key given twice, maybe

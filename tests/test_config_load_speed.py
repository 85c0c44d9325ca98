"""The shortcuts that load a large configuration fast give what the long way gives: every relative path
resolved, the same errors at the same paths, hostile nesting refused."""

from __future__ import annotations

import copy
import itertools
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT
from pydantic import BaseModel, Field, ValidationError

from agent.config.base import CREDENTIALS, Limits
from agent.config.loader import format_validation_error, load_config, parse_config, validate_config_data
from agent.config.models import AgentConfig
from agent.config.sharing import validated_once
from agent.config.yaml_stream import MAX_DEPTH
from agent.errors import ConfigError

OPCUA_SAMPLE = ROOT / "agent" / "drivers" / "opcua" / "sample.yaml"


def every_path(value: Any, where: str = "") -> list[tuple[str, Path]]:
    """Every Path anywhere in a configuration, found the long way: every field of every model and list."""
    if isinstance(value, Path):
        return [(where, value)]
    if isinstance(value, list | tuple):
        return [found for i, item in enumerate(value) for found in every_path(item, f"{where}[{i}]")]
    if isinstance(value, BaseModel):
        return [found for name in type(value).model_fields
                for found in every_path(getattr(value, name), f"{where}.{name}")]
    return []


def test_every_relative_path_is_taken_from_the_config_folder(tmp_path: Path) -> None:
    text = OPCUA_SAMPLE.read_text(encoding="utf-8").replace("/etc/edge-agent/", "etc/").replace(
        "path: /var/lib/edge-agent/store.db", "path: data/store.db").replace(
        "password: CHANGE-ME", "password_file: secrets/dcs")
    text += "control: {socket: run/control.sock}\n"
    text = text.replace("tls: {ca: etc/ca.pem}", "tls: {ca: etc/ca.pem, cert: etc/me.pem, key: etc/me.key}\n"
                        "  username: u\n  password_file: '${CREDENTIALS_DIRECTORY}/mqtt'\n")
    path = tmp_path / "agent.yaml"
    path.write_text(text, encoding="utf-8")
    found = every_path(load_config(path))
    relative = {where for where, p in found if not str(p).startswith(CREDENTIALS)}
    # each kind of path field is in the file, relative
    assert {".store.path", ".control.socket", ".uplink.tls.ca", ".uplink.tls.cert", ".uplink.tls.key",
            ".channels[0].certificate", ".channels[0].private_key", ".channels[0].server_certificate",
            ".channels[0].password_file"} <= relative
    for where, p in found:
        if where == ".uplink.password_file":
            assert str(p) == f"{CREDENTIALS}/mqtt"  # systemd's folder: known only at connect time
        else:
            assert p.is_absolute() and p.is_relative_to(tmp_path.resolve()), (where, p)


TOO_DEEP = f"JSON: mappings and lists nested deeper than {MAX_DEPTH} levels"


def nested(levels: int) -> Any:
    """`levels` containers one in another, mappings and lists in turn; the outermost is a mapping."""
    value: Any = 1
    for n in range(levels - 1):
        value = [value] if n % 2 == 0 else {"k": value}
    return {"x": value}


def json_errors(document: Any) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(json.dumps(document))
    return caught.value.errors


def test_json_nesting_is_refused_one_level_past_the_bound_and_not_at_it() -> None:
    assert json_errors(nested(MAX_DEPTH + 1)) == [TOO_DEEP]
    assert TOO_DEEP not in json_errors(nested(MAX_DEPTH))  # read, then refused by validation


def test_a_deep_branch_among_many_shallow_ones_is_found() -> None:
    wide: dict[str, Any] = {"p": [{"id": f"P{i}", "limits": {"high": 1}} for i in range(20_000)]}
    wide["p"][-1]["limits"] = nested(MAX_DEPTH - 2)
    assert json_errors(wide) == [TOO_DEEP]
    wide["p"][-1]["limits"] = nested(MAX_DEPTH - 3)
    assert TOO_DEEP not in json_errors(wide)


@pytest.mark.parametrize("levels", [MAX_DEPTH + 1, 900, 100_000])
def test_hostile_json_nesting_gets_the_same_clear_error(levels: int) -> None:
    text = '{"x": ' + '[{"k": ' * (levels // 2) + "1" + "}]" * (levels // 2) + "}"
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    assert caught.value.errors == [TOO_DEEP]


def plant(limits: list[Any], **point: Any) -> dict[str, Any]:
    """A document of one Modbus device with a point for each of `limits` (a mapping, or whatever is given)."""
    return {"agent": {"id": "a", "enterprise": "e"}, "channels": [{
        "id": "c", "driver": "modbus_tcp", "host": "127.0.0.1", "devices": [{"id": "d", "points": [
            {"id": f"P{i}", "address": i, "limits": lim, **point} for i, lim in enumerate(limits)]}]}]}


def long_way(data: dict[str, Any]) -> str | list[str]:
    """What validating each part where it stands gives: the configuration as JSON, or the error lines."""
    try:
        return AgentConfig.model_validate(data).model_dump_json()
    except ValidationError as exc:
        return format_validation_error(exc)


def loaded(data: dict[str, Any]) -> str | list[str]:
    try:
        return validate_config_data(data, source="t", base_dir=None).model_dump_json()
    except ConfigError as exc:
        return exc.errors


def test_bad_limits_among_a_thousand_equal_good_ones_are_reported_at_their_own_path() -> None:
    good, bad = {"high": 90, "high_high": 95, "deadband": 0.5}, {"high": 95, "high_high": 90, "deadband": 0.5}
    limits = [dict(good) for _ in range(1000)]
    limits[500] = dict(bad)
    limits[998] = dict(bad)
    data = plant(limits)
    before = copy.deepcopy(data)
    expected = "limits must rise low_low < low < high < high_high, but high=95.0 >= high_high=90.0"
    assert loaded(data) == [f"channels[0].devices[0].points[{i}].limits: {expected}" for i in (500, 998)]
    assert loaded(data) == long_way(data)
    assert data == before  # the caller's document is left as it was


def test_equal_limits_are_validated_once_and_held_once() -> None:
    data = plant([{"high": 90, "delay": "5s"} for _ in range(1000)])
    config = validate_config_data(data, source="t", base_dir=None)
    first = config.points()[0][2].limits
    assert first is not None and first.delay == 5.0 and first.model_fields_set == {"high", "delay"}
    assert all(point.limits is first for _, _, point in config.points())
    assert all(type(p["limits"]) is dict for p in data["channels"][0]["devices"][0]["points"])


@pytest.mark.parametrize("values", [
    [-0.0, 0.0, -0.0],  # equal in Python, not to the model: its sign is kept
    [1, 1.0, True, "1"],  # equal in Python or alike; a model may take one and refuse another
    [float("nan"), 5, float("inf")],
])
def test_mappings_that_only_look_alike_are_each_validated_as_written(values: list[Any]) -> None:
    data = plant([{"low": v} for v in values] + [{"low": v} for v in values])
    assert loaded(data) == long_way(data)
    if all(type(v) is float for v in values) and not any(math.isnan(v) for v in values):
        signs = [math.copysign(1, p.limits.low) for _, _, p in validate_config_data(  # type: ignore[union-attr]
            data, source="t", base_dir=None).points()]
        assert signs == [math.copysign(1, v) for v in values] * 2


def test_a_document_with_a_validator_reading_raw_points_is_left_to_the_long_way() -> None:
    data = {"agent": {"id": "a", "enterprise": "e"}, "channels": [{
        "id": "m", "driver": "dlt645", "port": "/dev/ttyS0", "devices": [{"id": "meter", "address": "000000000001",
                                                                          "points": [
            {"id": f"E{i}", "di": "00010000", "limits": {"high": 90}} for i in range(3)]}]}]}
    assert validated_once(AgentConfig, data) is data  # DL/T 645 points are read before the model does
    assert loaded(data) == long_way(data)


class _Part(BaseModel):
    n: int = Field(strict=True)  # takes 1, refuses True and 1.0, all three equal in Python


class _Item(BaseModel):
    part: _Part | None = None


class _Document(BaseModel):
    items: list[_Item]


def test_values_equal_in_python_but_of_other_types_are_not_taken_for_each_other() -> None:
    data = {"items": [{"part": {"n": 1}}, {"part": {"n": True}}, {"part": {"n": 1.0}}, {"part": {"n": 1}}]}
    shortcut = validated_once(_Document, data)
    assert shortcut["items"][0]["part"] is shortcut["items"][3]["part"]  # the equal ones: one instance
    with pytest.raises(ValidationError) as caught:
        _Document.model_validate(shortcut)
    assert [e["loc"] for e in caught.value.errors()] == [("items", 1, "part", "n"), ("items", 2, "part", "n")]


LEVELS = ("low_low", "low", "high", "high_high")


def first_out_of_order(given: dict[str, float]) -> str | None:
    """The rule said plainly: the first two given levels, going up, of which the lower is not below the higher."""
    present = [(name, given[name]) for name in LEVELS if given.get(name) is not None]
    for (name_a, a), (name_b, b) in itertools.pairwise(present):
        if a >= b:
            return f"limits must rise low_low < low < high < high_high, but {name_a}={a} >= {name_b}={b}"
    return None


@pytest.mark.parametrize("values", list(itertools.product([None, 1.0, 2.0, 3.0], repeat=4)))
def test_limits_out_of_order_name_the_first_pair_that_does_not_rise(values: tuple[float | None, ...]) -> None:
    given = {name: v for name, v in zip(LEVELS, values, strict=True) if v is not None}
    expected = first_out_of_order(given)
    if expected is None:
        limits = Limits.model_validate(given)
        assert limits.any() == bool(given)
    else:
        with pytest.raises(ValidationError, match=re.escape(expected)):
            Limits.model_validate(given)


@pytest.mark.parametrize("name", ["high_high", "high", "low", "low_low", "rate_rise", "rate_fall"])
def test_any_limit_or_rate_makes_limits_that_raise(name: str) -> None:
    assert Limits.model_validate({name: 5.0}).any()
    assert not Limits.model_validate({"deadband": 1, "delay": 2, "rate_window": 30}).any()

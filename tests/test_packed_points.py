"""Packed points (agent.config.packed): a running agent's configuration holds each device's points as columns.
They must stand for the list they were made from in every way the agent uses it, and cost a fraction of it."""

from __future__ import annotations

import json
import pickle
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from conftest import SHIPPED_CONFIGS

from agent.app.channels import changed_channels
from agent.config.loader import load_config, load_config_apart, parse_config
from agent.config.models import AgentConfig
from agent.config.packed import PackedPoints, pack_points
from simulators.modbus import synthetic_data


def synthetic(points: int = 2000, **change: Any) -> str:
    data = synthetic_data(points, interval=1.0, port=1, per_device=500, channels=2)
    for channel in data["channels"]:
        for device in channel["devices"]:
            for point in device["points"]:
                point["limits"].update({"rate_rise": 500.0, "rate_window": 30.0, "deadband": 0.5})
    for point_id, fields in change.items():
        point = next(p for c in data["channels"] for d in c["devices"] for p in d["points"] if p["id"] == point_id)
        point.update(fields)
    return json.dumps(data)


def packed(text: str) -> AgentConfig:
    config = parse_config(text)
    pack_points(config)
    return config


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_every_point_comes_back_as_it_was(path: Path) -> None:
    plain, config = load_config(path), load_config(path)
    pack_points(config)
    assert config == plain and plain == config
    for (_, _, a), (_, _, b) in zip(plain.points(), config.points(), strict=True):
        assert type(a) is type(b) and a == b
        assert a.model_dump() == b.model_dump()
        assert a.model_fields_set == b.model_fields_set  # what the file said, not the defaults
        assert a.model_dump_json(exclude_unset=True) == b.model_dump_json(exclude_unset=True)


def test_a_sequence_like_the_list() -> None:
    plain, config = parse_config(synthetic()), packed(synthetic())
    points, before = config.channels[0].devices[1].points, plain.channels[0].devices[1].points
    assert isinstance(points, PackedPoints)
    assert len(points) == len(before) == 500
    assert points[0] == before[0] and points[-1] == before[-1] and points[7:9] == before[7:9]
    assert [p.id for p in points] == [p.id for p in before]
    with pytest.raises(IndexError):
        points[500]
    assert points[3].address == before[3].address and points[3].limits is points[4].limits  # shared, as before


def test_a_round_trip_through_pickle_is_equal_and_ten_times_smaller() -> None:
    plain, config = parse_config(synthetic()), packed(synthetic())
    data = pickle.dumps(config, protocol=pickle.HIGHEST_PROTOCOL)
    assert pickle.loads(data) == plain
    assert len(data) * 5 < len(pickle.dumps(plain, protocol=pickle.HIGHEST_PROTOCOL))


def test_a_single_point_changed_is_a_changed_channel() -> None:
    old = packed(synthetic())
    new = packed(synthetic(P00700={"limits": {"high": 91, "high_high": 95}}))
    assert old != new
    keep, restart = changed_channels(old, new)
    assert keep == {"bench0"} and [c.id for c in restart] == ["bench1"]  # P00700: bench1's second device
    moved = packed(synthetic(P00100={"address": 60000}))  # a field that differs anyway: the columns compared
    assert old != moved and changed_channels(old, moved)[0] == {"bench1"}
    assert changed_channels(old, packed(synthetic())) == ({"bench0", "bench1"}, [])
    assert changed_channels(old, parse_config(synthetic()))[0] == {"bench0", "bench1"}  # packed against a list


def test_points_of_several_classes_stay_a_list() -> None:
    config = parse_config(synthetic(200))
    device = config.channels[0].devices[0]
    mixed = [*device.points[:2], device.points[2].model_copy(update={"address": 999})]
    assert PackedPoints.pack(mixed) is not mixed  # one class: packed
    other = type("OtherPoint", (type(device.points[0]),), {})
    odd = other.model_construct(**device.points[0].__dict__)
    assert PackedPoints.pack([*device.points[:2], odd]) == [*device.points[:2], odd]
    assert isinstance(PackedPoints.pack([*device.points[:2], odd]), list)


def test_the_daemon_loads_its_configuration_packed(tmp_path: Path) -> None:
    path = tmp_path / "site.json"
    path.write_text(synthetic())
    config = load_config_apart(path)
    assert all(isinstance(d.points, PackedPoints) for c in config.channels for d in c.devices)
    assert config == load_config(path)


def test_packed_points_cost_a_fraction_of_the_models() -> None:
    text = synthetic(10_000)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        plain = parse_config(text)
        models = tracemalloc.get_traced_memory()[0] - base
        base = tracemalloc.get_traced_memory()[0]
        config = packed(text)
        columns = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert config == plain
    assert columns < models / 3, (columns, models)

"""Block planning: neighbouring addresses of one device share a request, within the protocol's limits."""

from __future__ import annotations

from typing import Any

from agent.drivers.modbus.codec import ModbusDevice, plan_blocks


def device(points: list[dict[str, Any]], **kw: Any) -> ModbusDevice:
    return ModbusDevice.model_validate({"id": "d", "points": points, **kw})


def spans(dev: ModbusDevice) -> list[tuple[str, int, int]]:
    return [(b.table, b.start, b.count) for b in plan_blocks(dev)]


def test_neighbours_merge_and_tables_stay_apart() -> None:
    dev = device([
        {"id": "a", "address": 0, "type": "float32"},
        {"id": "b", "address": 2, "type": "float64"},
        {"id": "c", "address": 6, "type": "uint16"},
        {"id": "d", "address": 0, "table": "input"},
        {"id": "e", "address": 3, "table": "coil", "type": "bool"},
        {"id": "f", "address": 1, "table": "coil", "type": "bool"},
    ])
    assert spans(dev) == [("holding", 0, 7), ("input", 0, 1), ("coil", 1, 3)]


def test_a_gap_wider_than_max_gap_splits_the_block() -> None:
    points = [{"id": "a", "address": 0}, {"id": "b", "address": 10}, {"id": "c", "address": 30}]
    assert spans(device(points, max_gap=9)) == [("holding", 0, 11), ("holding", 30, 1)]
    assert spans(device(points, max_gap=0)) == [("holding", 0, 1), ("holding", 10, 1), ("holding", 30, 1)]


def test_blocks_never_exceed_125_registers_nor_split_a_value() -> None:
    points = [{"id": f"p{i}", "address": 2 * i, "type": "float32"} for i in range(200)]
    blocks = plan_blocks(device(points))
    assert [(b.start, b.count) for b in blocks] == [(0, 124), (124, 124), (248, 124), (372, 28)]
    assert sorted(i for b in blocks for i in b.points()) == list(range(200))


def test_bit_blocks_are_capped_at_2000() -> None:
    points = [{"id": f"c{i}", "address": i, "table": "discrete", "type": "bool"} for i in range(2500)]
    assert spans(device(points)) == [("discrete", 0, 2000), ("discrete", 2000, 500)]


def test_bits_of_one_register_share_it() -> None:
    points = [{"id": f"b{i}", "address": 8, "table": "input", "type": "bool", "bit": i} for i in range(16)]
    assert spans(device(points)) == [("input", 8, 1)]


def test_smaller_device_limit_is_honoured() -> None:
    points = [{"id": f"p{i}", "address": i} for i in range(100)]
    assert spans(device(points, max_registers=40)) == [("holding", 0, 40), ("holding", 40, 40), ("holding", 80, 20)]

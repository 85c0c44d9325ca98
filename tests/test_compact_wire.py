"""The compact `data` encoding (contract version 2) beside version 1: the same readings come back from both, with
every value kind, qualities and reasons, subsets, device times and slices; a reading costs at most 15 bytes; the
store keeps the point maps its messages need; and the agent as a process delivers every reading in it, through a
real mosquitto to the platform simulator, compressed or not, across a restart with another point list."""

from __future__ import annotations

import random
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import pytest
from conftest import wait_until
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import ValidationError

from agent.compact import PREFIX, parse_map
from agent.config.loader import parse_config
from agent.config.models import UplinkConfig
from agent.config.points import PointTable
from agent.core import BAD, GOOD, KIND_DATA, UNCERTAIN, ReadingBatch
from agent.messages import DataEncoder, data_body, frame, identity_fields, read_readings
from agent.store import Store
from agent.store.maps import MAX_KEPT
from simulators.modbus import synthetic_config, synthetic_data
from simulators.platform import DataDecoder, PlatformSimulator, count_readings, load_validators

T0 = 1_764_331_200_000
IDENTITY = identity_fields("ipc-01", "150625000123")
SITE = """
agent: {id: ipc-01, enterprise: "150625000123"}
channels:
  - id: c1
    driver: modbus_tcp
    host: 127.0.0.1
    devices:
      - id: d1
        points:
          - {id: LT-101, address: 0, type: float32}
          - {id: LT-102, address: 2, type: float32}
          - {id: FT-103, address: 4, type: float64}
          - {id: CT-104, address: 8, type: uint64}
          - {id: XV-105, table: coil, address: 0, type: bool}
      - id: d2
        unit: 2
        points:
          - {id: PT-201, address: 0, type: int16}
          - {id: PT-202, address: 1, type: float32}
          - {id: EP-203, address: 3, type: float32}
power:
  meters:
    - {id: M1, active_power: PT-202, total_energy: EP-203, idle_kw: 1, daily_energy: EP-M1.day}
"""


def site_table() -> PointTable:
    """Two devices of every value kind, and a derived point (daily energy) as the pipeline adds it."""
    table = PointTable(parse_config(SITE))
    table.add_derived("EP-M1.day", "kWh", "power", "M1")
    return table


def f32(value: float) -> float:
    return float(struct.unpack("<f", struct.pack("<f", value))[0])


def both(table: PointTable, batches: list[ReadingBatch]) -> tuple[list[Any], list[Any], DataEncoder]:
    """The readings of the batches read back from a version 1 body and from a compact one."""
    v1, n1 = data_body(IDENTITY, table.points, batches)
    encoder = DataEncoder(IDENTITY, table, "compact")
    v2, n2 = encoder.body(batches)
    assert v2.startswith(PREFIX) and n1 == n2 == sum(len(b) for b in batches)
    maps = {encoder.map_id: parse_map(encoder.map_message())}
    one, two = read_readings(v1), read_readings(v2, maps.get)
    assert one is not None and two is not None
    return one, two, encoder


def rows(table: PointTable, encoder: DataEncoder, batches: list[ReadingBatch]) -> list[Any]:
    """What the platform simulator reads from both published versions (with reasons): they must agree."""
    decoder = DataDecoder()
    decoder.add_map(encoder.map_message())
    compact = decoder.rows(frame(7, False, encoder.body(batches)[0]))
    plain = decoder.rows(frame(7, False, data_body(IDENTITY, table.points, batches)[0]))
    assert sorted(compact, key=repr) == sorted(plain, key=repr)
    return compact


def test_every_value_kind_reads_back_as_version_1_does() -> None:
    table = site_table()
    batch = ReadingBatch(T0, list(range(8)), [f32(12.53), f32(-0.001234567), 1 / 3, 2**63 + 11, True, -7,
                                              f32(1e-30), f32(3.4e38)], [GOOD] * 8)
    one, two, _ = both(table, [batch])
    assert two == one
    assert [v for _, _, v, _ in two] == [12.53, -0.001234567, 0.333333333333, 2**63 + 11, True, -7, 1e-30, 3.4e38]


def test_bad_and_uncertain_readings_keep_their_quality_and_reason() -> None:
    table = site_table()
    batch = ReadingBatch(T0, list(range(8)), [None, 5.0, 2.5, None, False, 1, 2.0, 3.0],
                         [BAD, UNCERTAIN, GOOD, BAD, GOOD, UNCERTAIN, GOOD, BAD],
                         reasons=["comm", "out_of_range", None, None, None, "frozen", None, "spike"])
    one, two, encoder = both(table, [batch])
    assert two == one
    assert [q for _, _, _, q in two] == [BAD, UNCERTAIN, GOOD, BAD, GOOD, UNCERTAIN, GOOD, BAD]
    got = {point: (quality, reason) for point, _, _, quality, reason in rows(table, encoder, [batch])}
    assert got["LT-101"] == ("bad", "comm") and got["CT-104"] == ("bad", None) and got["LT-102"] == ("uncertain",
                                                                                                    "out_of_range")
    assert got["FT-103"] == ("good", None) and got["EP-203"] == ("bad", "spike")
    body = orjson.loads(frame(7, False, encoder.body([batch])[0]))
    assert body["q"] == [[0, 0, 2, "comm"], [0, 1, 1, "out_of_range"], [0, 3, 2], [1, 0, 1, "frozen"],
                         [1, 2, 2, "spike"]]


def test_version_1_carries_a_reason_only_on_readings_that_are_not_good() -> None:
    table = site_table()
    batch = ReadingBatch(T0, [0, 1, 2], [1.0, None, 3.0], [GOOD, BAD, UNCERTAIN], reasons=[None, "comm", "spike"])
    body = orjson.loads(b"{" + data_body(IDENTITY, table.points, [batch])[0])
    assert body["readings"] == [
        {"point": "LT-101", "ts": T0, "value": 1.0, "quality": "good"},
        {"point": "LT-102", "ts": T0, "value": None, "quality": "bad", "reason": "comm"},
        {"point": "FT-103", "ts": T0, "value": 3.0, "quality": "uncertain", "reason": "spike"},
    ]
    assert load_validators()["data"].is_valid({"v": 1, "seq": 1, "hist": False, **body})
    flagged_good = b'"readings":[{"point":"P","ts":1,"value":1,"quality":"good","reason":"spike"}]}'
    unknown = b'"readings":[{"point":"P","ts":1,"value":1,"quality":"bad","reason":"gremlins"}]}'
    assert read_readings(flagged_good) is None and read_readings(unknown) is None


def test_subsets_device_times_slices_and_derived_points_read_back() -> None:
    table = site_table()
    subset = ReadingBatch(T0, [7, 0, 3], [1.5, 2.5, 9], [GOOD, UNCERTAIN, GOOD])  # OPC UA style data changes
    shared = ReadingBatch(T0, [5, 6, 7], [1, 2.0, 3.0], [GOOD] * 3, stamps=[T0 - 5] * 3)
    distinct = ReadingBatch(T0, [0, 1, 2, 3], [1.0, 2.0, 3.0, 4], [GOOD, BAD, GOOD, GOOD],
                            stamps=[T0 - 40, T0 - 30, T0 - 20, T0 - 10], reasons=[None, "device_ts", None, None])
    grouped = ReadingBatch(T0, list(range(8)) * 2, [float(i) for i in range(16)], [GOOD] * 16,
                           stamps=[T0 - 1000] * 8 + [T0] * 8)
    poll = ReadingBatch(T0 + 1000, [5, 6, 7, 8], [3, 4.0, 5.0, 6.25], [GOOD] * 4)  # the meter and its daily energy
    whole = ReadingBatch(T0 + 2000, list(range(5)), [1.0, 2.0, 3.0, 4, True], [GOOD] * 5)
    batches = [subset, shared, distinct, grouped, poll, whole.slice(0, 2), whole.slice(2, 5)]
    one, two, encoder = both(table, batches)
    assert sorted(two, key=repr) == sorted(one, key=repr)
    rows(table, encoder, batches)
    groups = orjson.loads(frame(1, False, encoder.body(batches)[0]))["g"]
    shapes = [(g["d"], g["t"], g["o"]) for g in groups]
    assert shapes == [
        (1, T0, 2), (0, T0, [0, 3]),  # a subset: one group per device, offsets listed unless consecutive
        (1, T0 - 5, 0),  # one device time for all: a single t
        (0, [T0 - 40, T0 - 30, T0 - 20, T0 - 10], 0),  # every reading its own time: a t list
        (0, T0 - 1000, 0), (1, T0 - 1000, 0), (0, T0, 0), (1, T0, 0),  # few distinct times: groups per time
        (1, T0 + 1000, 0), (2, T0 + 1000, 0),  # the derived point is a device of its own in the map
        (0, T0 + 2000, 0), (0, T0 + 2000, 2),  # slices of one poll
    ]


def test_a_reading_costs_at_most_15_bytes_at_10000_points() -> None:
    table = PointTable(synthetic_config(10_000, interval=1.0, port=1, per_device=1000))
    rng = random.Random(7)
    values = [rng.uniform(0, 100) for _ in range(10_000)]
    encoder = DataEncoder(IDENTITY, table, "compact")
    plain = DataEncoder(IDENTITY, table, "json")
    sizes: dict[str, int] = {"compact": 0, "compressed": 0, "json": 0}
    readings = 0
    for poll in range(5):  # random walks at full float32 precision, cut in messages of 500 as the pipeline does
        values = [f32(v + rng.gauss(0, 0.5)) for v in values]
        for device in range(10):
            batch = ReadingBatch(T0 + poll * 1000, list(range(device * 1000, device * 1000 + 1000)),
                                 values[device * 1000:device * 1000 + 1000], [GOOD] * 1000)
            for part in (batch.slice(0, 500), batch.slice(500, 1000)):
                payload = frame(1_000_000 + readings, False, encoder.body([part])[0])
                sizes["compact"] += len(payload)
                sizes["compressed"] += len(zlib.compress(payload, 6))
                sizes["json"] += len(frame(1, False, plain.body([part])[0]))
                readings += 500
                assert count_readings(payload) == 500
    per_reading = {name: size / readings for name, size in sizes.items()}
    assert per_reading["compact"] <= 15, per_reading
    assert per_reading["compressed"] < per_reading["compact"] < per_reading["json"] / 5, per_reading


def test_a_compact_body_is_framed_as_version_2_and_needs_its_map() -> None:
    table = site_table()
    encoder = DataEncoder(IDENTITY, table, "compact")
    body, _ = encoder.body([ReadingBatch(T0, [0, 1], [1.0, 2.0], [GOOD, GOOD])])
    message = orjson.loads(frame(42, True, body))
    assert (message["v"], message["seq"], message["hist"], message["map"]) == (2, 42, True, encoder.map_id)
    assert load_validators()["data-v2"].is_valid(message)
    assert load_validators()["map"].is_valid(orjson.loads(encoder.map_message()))
    assert orjson.loads(frame(42, True, data_body(IDENTITY, table.points, [])[0]))["v"] == 1
    assert read_readings(body) is None, "without its map a compact body cannot be read"
    assert read_readings(body, {"000000000000": [["LT-101", "LT-102"]]}.get) is None
    assert DataEncoder(IDENTITY, table).map_id is None and DataEncoder(IDENTITY, table).map_message() == b""
    with pytest.raises(ValueError, match="unknown data encoding"):
        DataEncoder(IDENTITY, table, "xml")


def test_the_map_id_names_the_map_and_changes_with_the_point_list() -> None:
    first = DataEncoder(IDENTITY, site_table(), "compact")
    assert first.map_id == DataEncoder(IDENTITY, site_table(), "compact").map_id
    other = PointTable(parse_config(SITE.replace("LT-102", "LT-109")))
    assert DataEncoder(IDENTITY, other, "compact").map_id != first.map_id
    tampered = first.map_message().replace(b"LT-102", b"LT-109")
    assert parse_map(tampered) is None, "a map whose content no longer matches its id is refused"


def test_compress_is_refused_without_the_compact_encoding() -> None:
    with pytest.raises(ValidationError, match="compress goes with encoding: compact"):
        UplinkConfig(compress=True)
    assert UplinkConfig(encoding="compact", compress=True).compress
    assert UplinkConfig().encoding == "json"


# --- the store keeps the maps its messages need --------------------------------------------------------------

def store_compact(store: Store, encoder: DataEncoder, ts: int, values: list[float]) -> int:
    body, count = encoder.body([ReadingBatch(ts, list(range(len(values))), values, [GOOD] * len(values))])
    with store.transaction():
        return store.append(KIND_DATA, count, body)


def test_the_store_publishes_the_maps_of_its_backlog_and_reads_them_back(tmp_path: Path) -> None:
    table = site_table()
    old = DataEncoder(IDENTITY, table, "compact")
    new = DataEncoder(IDENTITY, PointTable(parse_config(SITE.replace("LT-102", "LT-109"))), "compact")
    assert old.map_id is not None and new.map_id is not None
    with Store(tmp_path / "s.db") as store:
        store.register_map(old.map_id, old.map_message())
        first = store_compact(store, old, T0, [1.0, 2.0])
        assert store.maps_to_publish() == [(old.map_id, old.map_message())]
    with Store(tmp_path / "s.db") as store:  # a restart with another point list, the backlog not yet sent
        store.register_map(new.map_id, new.map_message())
        store_compact(store, new, T0 + 1000, [3.0, 4.0])
        assert [m for m, _ in store.maps_to_publish()] == [old.map_id, new.map_id]
        assert [(s.ts, s.value) for s in store.history("LT-102", T0, T0 + 5000)] == [(T0, 2.0)]
        assert [(s.ts, s.value) for s in store.history("LT-109", T0, T0 + 5000)] == [(T0 + 1000, 4.0)]
        assert [(s.ts, s.value) for s in store.history("LT-101", T0, T0 + 5000)] == [(T0, 1.0), (T0 + 1000, 3.0)]
        store.ack([first])  # delivered: its map need not be published again
        assert [m for m, _ in store.maps_to_publish()] == [new.map_id]
        store.register_map(None)  # back to version 1: no map in use
        assert store.maps_to_publish() == [(new.map_id, new.map_message())], "still needed by its backlog"
    with Store(tmp_path / "s.db", readonly=True) as store:  # the history command reads compact bodies too
        assert [(s.ts, s.value) for s in store.history("LT-102", T0, T0 + 5000)] == [(T0, 2.0)]


def test_the_store_keeps_the_last_maps_and_older_ones_still_in_use(tmp_path: Path) -> None:
    encoders = [DataEncoder(IDENTITY, PointTable(parse_config(SITE.replace("LT-102", f"LT-2{n:02d}"))), "compact")
                for n in range(MAX_KEPT + 3)]
    with Store(tmp_path / "s.db") as store:
        for n, encoder in enumerate(encoders):
            assert encoder.map_id is not None
            store.register_map(encoder.map_id, encoder.map_message())
            if n == 1:
                store_compact(store, encoder, T0, [1.0, 2.0])  # written with the second map, never delivered
        kept = {e.map_id for e in encoders if store.point_map(str(e.map_id)) is not None}
        assert kept == {e.map_id for e in encoders[-MAX_KEPT:]} | {encoders[1].map_id}
        assert [(s.ts, s.value) for s in store.history("LT-201", T0, T0)] == [(T0, 2.0)]
        assert [m for m, _ in store.maps_to_publish()] == [encoders[1].map_id, encoders[-1].map_id]


def test_a_store_replaced_while_running_is_told_the_map_again(tmp_path: Path) -> None:
    encoder = DataEncoder(IDENTITY, site_table(), "compact")
    assert encoder.map_id is not None
    with Store(tmp_path / "s.db") as store:
        store.register_map(encoder.map_id, encoder.map_message())
        store._move_aside(RuntimeError("test"))
        store._open_file()
        store._after_recovery()
        assert store.maps_to_publish() == [(encoder.map_id, encoder.map_message())]


def test_damaged_map_records_read_as_no_map(tmp_path: Path) -> None:
    encoder = DataEncoder(IDENTITY, site_table(), "compact")
    assert encoder.map_id is not None
    with Store(tmp_path / "s.db") as store:
        store.register_map(encoder.map_id, encoder.map_message())
        seq = store_compact(store, encoder, T0, [1.0])
        store.set_meta(f"map:{encoder.map_id}", b"{not json")
        store.set_meta("maps", "[[1, 2, 3]]")
        assert store.maps_to_publish() == []
        assert store.point_map(encoder.map_id) is None
        assert [s for s, _ in store.data_rows_after(0)] == [seq]
        assert store.history("LT-101", T0, T0) == []


# --- the agent as a process: a real mosquitto, a Modbus plant, the platform simulator --------------------------

PREFIX_TOPIC = "cw"


def site(plant_port: int, broker_port: int, store: Path, points: int, **uplink: Any) -> dict[str, Any]:
    data = synthetic_data(points, interval=0.5, port=plant_port, per_device=points, uplink_port=broker_port,
                          store=str(store))
    data["uplink"].update({"prefix": PREFIX_TOPIC, "reconnect_min": 0.2, "reconnect_max": 1, "keepalive": 5,
                           "batch": {"max_readings": 500, "max_delay": 0.3}, **uplink})
    data["store"].update({"shutdown_drain": 10})
    return data


def delivered_from_1(platform: PlatformSimulator) -> bool:
    agents = platform.report().agents.values()
    return bool(agents) and all(a.seq_min == 1 and a.missing == 0 for a in agents)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("compress", [False, True])
def test_the_agent_delivers_every_reading_compact(
    tmp_path: Path, broker: Any, plant: Any, agent_process: Any, compress: bool
) -> None:
    sim = plant(synthetic_config(200, interval=0.5, port=1, per_device=200), {"bench": 0})
    topics: list[str] = []
    platform = PlatformSimulator("127.0.0.1", broker.port, PREFIX_TOPIC, on_message=lambda t, m: topics.append(t))
    platform.start()
    first_bytes: set[tuple[str, bytes]] = set()  # what the wire carries, beside what the platform decoded
    listener = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="cw-raw")
    listener.on_message = lambda c, u, m: first_bytes.add((m.topic.split("/")[3], bytes(m.payload[:1])))
    listener.connect("127.0.0.1", broker.port)
    listener.subscribe(f"{PREFIX_TOPIC}/#", qos=1)
    listener.loop_start()
    store = tmp_path / "store.db"
    agent = agent_process(site(sim.ports["bench"], broker.port, store, 200, encoding="compact",
                               compress=compress)).start()
    assert platform.wait_for(lambda p: len(p.readings()) >= 2000 and delivered_from_1(p), 60), agent.log()[-3000:]
    assert agent.stop_seen_by(platform) == 0
    assert platform.schema_errors() == [] and platform.waiting_for_maps() == 0
    report = platform.report().agent("bench")
    assert report.seq_min == 1 and report.missing == 0
    with Store(store) as s:
        assert s.backlog().messages == 0 and s.last_seq() == report.seq_max
        [(map_id, _)] = s.maps_to_publish()
    assert list(platform.maps()) == [("000000000000", "bench", map_id)]
    readings = platform.readings()
    assert {r.point for r in readings} == {f"P{i:05d}" for i in range(200)}
    assert all(r.quality == "good" and isinstance(r.value, float) and 0 <= r.value <= 100 for r in readings)
    first = next(topic for topic in topics if "/map/" in topic or topic.endswith("/data"))
    assert first.endswith(f"/map/{map_id}"), "the map comes before any data"
    listener.disconnect()
    listener.loop_stop()
    start = b"x" if compress else b"{"  # a zlib stream, or JSON
    assert {(leaf, head) for leaf, head in first_bytes if leaf in ("data", "map")} == {("data", start), ("map", start)}
    assert ("status", b"{") in first_bytes, "status, health and alarms are never compressed"
    assert "Traceback" not in agent.log()
    platform.stop()


@pytest.mark.timeout(180)
def test_a_backlog_written_with_an_old_point_list_still_decodes_after_a_restart(
    tmp_path: Path, broker: Any, plant: Any, agent_process: Any
) -> None:
    sim = plant(synthetic_config(100, interval=0.5, port=1, per_device=100), {"bench": 0})
    store = tmp_path / "store.db"
    broker.stop()  # the first run stores everything: the platform is out of reach
    first = agent_process(site(sim.ports["bench"], broker.port, store, 100, encoding="compact",
                               compress=True)).start()

    def stored_readings() -> int:
        try:
            with Store(store, readonly=True) as s:
                return s.backlog().readings
        except Exception:  # not created yet
            return 0

    wait_until(lambda: stored_readings() >= 1000, 60, f"1000 readings stored\n{first.log()[-2000:]}")
    assert first.stop() == 0
    broker.start()
    platform = PlatformSimulator("127.0.0.1", broker.port, PREFIX_TOPIC)
    platform.start()
    # the second run polls 60 of the 100 points: another map, while the backlog still refers to the first
    second = agent_process(site(sim.ports["bench"], broker.port, store, 60, encoding="compact")).start()
    since = int(time.time() * 1000)

    def replayed_and_live(p: PlatformSimulator) -> bool:
        readings = p.readings()
        return (delivered_from_1(p) and any(r.hist and r.point == "P00099" for r in readings)
                and any(not r.hist and r.ts > since + 1000 for r in readings))

    assert platform.wait_for(replayed_and_live, 90), second.log()[-3000:]
    assert second.stop_seen_by(platform) == 0
    assert platform.schema_errors() == [] and platform.waiting_for_maps() == 0
    assert len(platform.maps()) == 2
    live = {r.point for r in platform.readings() if r.ts > since + 1000}
    assert live == {f"P{i:05d}" for i in range(60)}
    with Store(store) as s:
        assert s.backlog().messages == 0
        assert s.last_seq() == platform.report().agent("bench").seq_max
    platform.stop()

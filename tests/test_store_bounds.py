"""The store under stress, on real SQLite files: damaged files, the seq reserve, disk bounds and retention."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import time
from pathlib import Path

import pytest

from agent.core import KIND_ALARM, KIND_DATA
from agent.errors import StoreError
from agent.store import Store
from agent.store.chunks import ArchiveBuffer
from agent.store.upkeep import Upkeep, UpkeepConfig


def fill(store: Store, messages: int, readings: int = 500) -> list[int]:
    body = b'"agent":"a","enterprise":"e","readings":[' + b",".join(
        b'{"point":"P%d","ts":%d,"value":%d.123456,"quality":"good"}' % (i, i, i * 7919 % 1000)
        for i in range(readings)) + b"]}"
    with store.transaction():
        return [store.append(KIND_DATA, readings, body) for _ in range(messages)]


def test_a_damaged_file_is_moved_aside_and_seq_continues(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    with Store(path) as store:
        fill(store, 3)
        assert store.last_seq() == 3
    with open(path, "r+b") as f:  # overwrite the header and the first pages with garbage
        f.write(b"\x13\x37" * 4096)
    with Store(path) as store:
        assert store.recovered is not None
        kept = Path(store.recovered["moved_to"])
        assert kept.exists() and kept.name.startswith("store.db.corrupt-")
        assert store.append(KIND_DATA, 1, b"x") > 3, "seq must never go back, even in a new file"
        assert store.backlog().messages == 1


def test_corruption_found_while_running_is_recovered(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    store = Store(path).open()
    fill(store, 50)
    store.sync()
    with open(path, "r+b") as f:
        f.seek(0)
        f.write(b"garbage!" * 16)
    err = None
    try:
        store.db.execute("SELECT count(*) FROM outbox").fetchone()
        Store(path).open()  # a second look at the damaged header
    except sqlite3.DatabaseError as exc:
        err = exc
    if err is None:  # the open connection may still answer from its cache: force a read of the file
        err = sqlite3.DatabaseError("database disk image is malformed")
    assert store.recover_if_corrupt(err)
    assert store.append(KIND_DATA, 1, b"y") > 50
    store.close()
    assert any(p.name.startswith("store.db.corrupt-") for p in tmp_path.iterdir())


def test_an_unusable_path_stops_the_start_with_the_reason(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with pytest.raises(StoreError, match=r"not-a-folder.*memory_fallback"):
        Store(blocker / "store.db").open()


def test_an_unusable_path_falls_back_to_memory_only_when_configured_and_says_why(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with Store(blocker / "store.db", memory_fallback=True) as store:
        assert store.fallback_reason is not None and "not-a-folder" in store.fallback_reason
        assert store.append(KIND_DATA, 1, b"z") == 1


def test_the_store_and_its_seq_reserve_are_not_world_readable(tmp_path: Path) -> None:
    old = os.umask(0o022)  # as a shell would leave it: the modes must come from the code, not the umask
    try:
        with Store(tmp_path / "store.db") as store:
            fill(store, 1)
            store.sync()
            files = [store.path, store.seq_file, Path(f"{store.path}-wal")]
            modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in files if f.exists()}
    finally:
        os.umask(old)
    assert len(modes) == 3 and all(mode & 0o007 == 0 and mode & 0o020 == 0 for mode in modes.values()), modes


def upkeep(store: Store, max_bytes: int) -> Upkeep:
    return Upkeep(store, UpkeepConfig(max_bytes=max_bytes, min_free_bytes=0, retention_s=30 * 86400,
                                      sync_interval=1))


def test_over_the_cap_history_goes_first_then_oldest_telemetry_never_alarms(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        keys = store.point_keys([f"P{i}" for i in range(200)])
        buffer = ArchiveBuffer()
        for t in range(60):
            buffer.add_many(list(keys), [t * 1000] * 200, [float(t * i % 97) for i in range(200)], [0] * 200)
        store.write_chunks(list(buffer.take()), mark=0)
        with store.transaction():
            alarms = [store.append(KIND_ALARM, 1, b'"id":"P1/high"}') for _ in range(20)]
        seqs = fill(store, 40)
        cap = store.used_bytes() // 2
        keeper = upkeep(store, cap)
        keeper.enforce_bounds()
        assert store.used_bytes() <= cap
        assert store.archive_stats()[0] == 0, "delivered history goes before undelivered telemetry"
        assert keeper.pruned == 60 * 200
        left = [r.seq for r in store.fetch(0, limit=1000)]
        assert all(a in left for a in alarms), "alarm events are never evicted"
        evicted = [s for s in seqs if s not in left]
        assert evicted == seqs[: len(evicted)] and evicted, "the oldest telemetry goes first"
        assert keeper.evicted == 500 * len(evicted)
        assert int(store.meta("evicted_readings")) == keeper.evicted


def test_a_store_full_of_alarms_keeps_them_all(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        with store.transaction():
            for _ in range(500):
                store.append(KIND_ALARM, 1, b'"id":"P1/high","pad":"' + b"x" * 500 + b'"}')
        keeper = upkeep(store, 1000)
        keeper.enforce_bounds()
        assert keeper.full_of_alarms
        assert store.backlog().messages == 500


def test_retention_expires_old_history_and_delivered_alarms_only(tmp_path: Path) -> None:
    now = int(time.time() * 1000)
    day = 86_400_000
    with Store(tmp_path / "s.db") as store:
        buffer = ArchiveBuffer()
        buffer.add("P", now - 40 * day, 1.0, 0)
        store.write_chunks(list(buffer.take()), 0)
        buffer.add("P", now - day, 2.0, 0)
        store.write_chunks(list(buffer.take()), 0)
        old_delivered = store.append(KIND_ALARM, 1, b'"a":1}', created=now - 40 * day)
        store.append(KIND_ALARM, 1, b'"a":2}', created=now - 40 * day)  # never delivered: kept
        store.ack([old_delivered])
        upkeep(store, 1 << 40).expire()
        assert [s.value for s in store.history("P", 0, now)] == [2.0]
        assert [r["a"] for r in store.alarm_history(0, now)] == [2]


def test_a_damaged_message_is_set_aside_and_blocks_nothing(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        seqs = fill(store, 3)
        body = store.db.execute("SELECT body FROM outbox WHERE seq = ?", (seqs[1],)).fetchone()[0]
        store.db.execute("UPDATE outbox SET body = ? WHERE seq = ?", (body[:20] + b"\xff" + body[21:], seqs[1]))
        assert [r.seq for r in store.fetch(0)] == [seqs[0], seqs[2]]
        assert [r.seq for r in store.fetch(0)] == [seqs[0], seqs[2]]  # set aside once, not retried
        assert int(store.meta("damaged_messages")) == 1
        assert [s for s, _ in store.data_rows_after(0)] == [seqs[0], seqs[2]]


def test_history_lands_on_the_right_points_after_the_file_was_replaced(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = Store(path).open()
    store.point_keys(["A", "B"])
    buffer = ArchiveBuffer()
    buffer.add_many(["Z", "A", "B"], [1000, 1000, 1000], [100.0, 1.0, 2.0], [0, 0, 0])
    assert store.recover_if_corrupt(sqlite3.DatabaseError("database disk image is malformed"))
    store.point_keys(["Z", "A", "B"])
    store.write_chunks(list(buffer.take()), mark=0)
    assert [(p, [s.value for s in store.history(p, 0, 9999)]) for p in "ZAB"] == [
        ("Z", [100.0]), ("A", [1.0]), ("B", [2.0])]
    assert store.archive_stats()[0] == 3
    store.close()


def test_a_file_that_replaced_a_damaged_one_still_knows_the_on_off_points(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db").open()
    store.point_keys(["PUMP-RUN", "LT-101"], frozenset({"PUMP-RUN"}))
    assert store.recover_if_corrupt(sqlite3.DatabaseError("database disk image is malformed"))
    assert store.point_is_bool("PUMP-RUN") is True  # history reads its archive back as true/false, not 1.0/0.0
    buffer = ArchiveBuffer()
    buffer.add_many(["PUMP-RUN", "LT-101"], [1000, 1000], [True, 2.5], [0, 0])
    store.write_chunks(list(buffer.take()), mark=0)
    assert [s.value for s in store.history("PUMP-RUN", 0, 9999)] == [True]
    assert store.point_is_bool("LT-101") is False
    store.close()


def test_a_full_disk_is_not_taken_for_a_damaged_store(tmp_path: Path) -> None:
    import os
    import subprocess



    disk = tmp_path / "small"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small file system")
    try:
        with Store(disk / "s.db") as store:
            seqs = fill(store, 5, readings=20)
        with open(disk / "filler", "wb") as f:  # the disk fills up while the agent is stopped
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        with Store(disk / "s.db", memory_fallback=True) as store:
            assert store.recovered is None, "a full disk must never move a healthy store aside"
            if store.fallback_reason is None:  # it could open after all: the backlog is there
                assert [r.seq for r in store.fetch(0)] == seqs
        assert not [p for p in disk.iterdir() if "corrupt" in p.name]
        (disk / "filler").unlink()
        with Store(disk / "s.db") as store:
            assert [r.seq for r in store.fetch(0)] == seqs, "once space is back, nothing was lost"
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_retention_in_steps_drops_every_old_chunk_a_few_at_a_time(tmp_path: Path) -> None:
    now = int(time.time() * 1000)
    day = 86_400_000
    with Store(tmp_path / "s.db") as store:
        buffer = ArchiveBuffer()
        for k in range(25):  # 25 old points' chunks, one recent
            buffer.add(f"P{k}", now - 40 * day, float(k), 0)
        buffer.add("R", now - day, 99.0, 0)
        store.write_chunks(list(buffer.take()), 0)
        keeper = upkeep(store, 1 << 40)
        steps = []
        original = store.expire

        def counted(before: int, limit: int | None = None) -> tuple[int, int]:
            steps.append(limit)
            return original(before, limit)

        store.expire = counted  # type: ignore[method-assign]
        asyncio.run(keeper.expire_in_steps(chunks=10))
        assert steps == [10, 10, 10]  # 25 old chunks: 10, 10, then 5 (fewer than asked: the last step)
        assert keeper.expired == 25
        assert store.archive_stats()[0] == 1
        assert [s.value for s in store.history("R", 0, now)] == [99.0]
        assert store.history("P7", 0, now) == []

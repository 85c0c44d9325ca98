"""The SQLite outbox: seq never goes back, acknowledged messages leave, the rest survive a reopen."""

from __future__ import annotations

from pathlib import Path

from agent.core import KIND_ALARM, KIND_DATA
from agent.store import Store


def test_seq_keeps_rising_across_reopen_even_when_everything_was_acknowledged(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    with Store(path) as store:
        seqs = [store.append(KIND_DATA, 1, b"x") for _ in range(5)]
        store.ack(seqs)
        assert store.backlog().messages == 0
    with Store(path) as store:
        assert store.last_seq() == 5
        assert store.append(KIND_DATA, 1, b"y") == 6


def test_only_acknowledged_messages_leave(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        with store.transaction():
            seqs = [store.append(KIND_DATA, 10, b"%d" % i) for i in range(10)]
        store.ack([seqs[0], seqs[1], seqs[2], seqs[5], seqs[9]])
        left = [row.seq for row in store.fetch(0, limit=100)]
        assert left == [4, 5, 7, 8, 9]
        assert store.backlog().readings == 50


def test_fetch_filters_by_kind_and_range(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        kinds = [KIND_DATA, KIND_ALARM, KIND_DATA, KIND_ALARM, KIND_DATA]
        for kind in kinds:
            store.append(kind, 1, b"b")
        assert [r.seq for r in store.fetch(0, kind=KIND_ALARM)] == [2, 4]
        assert [r.seq for r in store.fetch(1, upto=3)] == [2, 3]
        assert [r.seq for r in store.fetch(0, limit=2)] == [1, 2]


def test_a_failed_transaction_stores_nothing(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        try:
            with store.transaction():
                store.append(KIND_DATA, 1, b"a")
                raise RuntimeError("disk trouble")
        except RuntimeError:
            pass
        assert store.backlog().messages == 0

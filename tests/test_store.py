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


def test_alarm_states_saved_are_always_those_last_committed(tmp_path: Path) -> None:
    """Saves write only what changed, yet the table always holds the states of the last committed save: through
    rolled-back transactions, a reopen, and rows changed behind the store's back by another connection."""
    import random
    import sqlite3

    rng = random.Random(7)
    path = tmp_path / "s.db"
    committed: dict[str, str] = {}
    store = Store(path).open()
    try:
        for step in range(300):
            states = dict(committed)
            for _ in range(rng.randint(0, 6)):
                alarm = f"P{rng.randrange(40)}/{rng.choice(['high', 'low', 'data_quality'])}"
                if rng.random() < 0.3:
                    states.pop(alarm, None)
                else:
                    states[alarm] = rng.choice(["raised", "latched", "acked"])
            fate = rng.random()
            if fate < 0.15:  # the transaction that stores the events fails: nothing of it stands
                try:
                    with store.transaction():
                        store.save_alarm_states(states)
                        raise RuntimeError("the event insert failed")
                except RuntimeError:
                    pass
            else:
                with store.transaction():
                    store.save_alarm_states(states)
                committed = states
            if fate > 0.97:  # the same store reopened
                store.close()
                store.open()
            if 0.9 < fate <= 0.92:  # the file changed by another hand: the next reopen must not trust its memory
                store.close()
                with sqlite3.connect(path) as other:
                    other.execute("DELETE FROM alarm_state WHERE id IN (SELECT id FROM alarm_state LIMIT 3)")
                other.close()
                store.open()
                store.save_alarm_states(committed)  # outside a transaction: each statement commits itself
            assert store.alarm_states() == committed, f"step {step}"
    finally:
        store.close()


def test_an_alarm_state_save_writes_only_what_changed(tmp_path: Path) -> None:
    import sqlite3

    with Store(tmp_path / "s.db") as store:
        states = {f"P{i}/high": "raised" for i in range(1000)}
        with store.transaction():
            store.save_alarm_states(states)
        before = store.db.total_changes
        states["P5/high"] = "latched"
        del states["P6/high"]
        states["P2000/low"] = "raised"
        with store.transaction():
            store.save_alarm_states(states)
        assert store.db.total_changes - before == 3  # one replaced, one deleted, one added: not 2,000 rows
        assert store.alarm_states() == states
        # a damaged file replaced by a fresh one while running: the next save writes every state again
        assert store.recover_if_corrupt(sqlite3.DatabaseError("database disk image is malformed"))
        states["P7/high"] = "latched"
        with store.transaction():
            store.save_alarm_states(states)
        assert store.alarm_states() == states

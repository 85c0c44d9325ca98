"""`edge-agent history` with wrong questions: each gets a clear answer and a non-zero exit, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent.cli.main import main
from agent.store import Store
from agent.store.chunks import ArchiveBuffer
from agent.store.history import HistoryError, parse_time, read_history


def history(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", "history", *args], capture_output=True, text=True,
                          timeout=60)


def test_missing_store_unknown_point_and_bad_time_are_explained(tmp_path: Path) -> None:
    result = history("LT-1", "--store", str(tmp_path / "none.db"))
    assert result.returncode == 2 and "no store at" in result.stderr
    with Store(tmp_path / "s.db") as store:
        store.point_keys(["LT-1"])
    result = history("LT-9", "--store", str(tmp_path / "s.db"))
    assert result.returncode == 2 and "point 'LT-9' has no readings" in result.stderr
    result = history("LT-1", "--store", str(tmp_path / "s.db"), "--since", "yesterday-ish")
    assert result.returncode == 2 and "is not a time" in result.stderr
    result = history("LT-1", "--store", str(tmp_path / "s.db"), "--since", "1h", "--until", "2h")
    assert result.returncode == 2 and "--since is after --until" in result.stderr
    for r in (result,):
        assert "Traceback" not in r.stderr


def test_history_of_a_point_without_readings_in_the_window_is_empty_not_an_error(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        store.point_keys(["LT-1"])
    result = history("LT-1", "--store", str(tmp_path / "s.db"), "--json")
    assert result.returncode == 0
    assert '"readings": []' in result.stdout


def one_line_refusal(result: subprocess.CompletedProcess[str], says: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("edge-agent: ")
    assert says in result.stderr, result.stderr


def test_a_time_beyond_what_the_store_can_hold_is_refused_not_a_traceback(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        store.point_keys(["LT-101"])
    # used to die with OverflowError: Python int too large to convert to SQLite INTEGER
    result = history("LT-101", "--store", str(tmp_path / "s.db"), "--until", "99999999999999999999999")
    one_line_refusal(result, "out of range")


@pytest.mark.parametrize(("option", "text", "says"), [
    ("--until", "99999999999999999999999", "out of range"),  # epoch ms past int64
    ("--until", "9223372036854775808", "out of range"),
    ("--until", "253402300800000", "out of range"),  # 10000-01-01
    ("--until", "9" * 5000, "out of range"),  # int() refuses so many digits
    ("--since", "99999999999999999999d", "out of range"),  # a duration ago before the year 1
    ("--since", "9" * 400 + ".5d", "out of range"),  # a duration that is infinite as a float
    ("--since", "0001-01-01T00:00:00+14:00", "out of range"),  # ISO, before the year 1 in UTC
    ("--until", "9999-12-31T23:59:59-14:00", "out of range"),  # ISO, after 9999 in UTC
    ("--since", "yesterday-ish", "is not a time"),
    ("--since", "2026-13-01", "is not a time"),
    ("--since", "1e400h", "is not a time"),
    ("--since", "-5", "is not a time"),
    ("--since", "١٢٣٤٥٦٧٨٩٠١٢٣", "is not a time"),  # digits, but not ASCII ones
    ("--since", "", "is not a time"),
])
def test_every_out_of_range_or_malformed_time_is_one_line_and_exit_2(
        tmp_path: Path, option: str, text: str, says: str) -> None:
    with Store(tmp_path / "s.db") as store:
        store.point_keys(["LT-101"])
    result = CliRunner().invoke(main, ["history", "LT-101", "--store", str(tmp_path / "s.db"), option, text])
    assert result.exit_code == 2, (result.output, result.exception)
    assert result.stderr.count("\n") == 1 and says in result.stderr
    assert len(result.stderr) < 200  # a long argument is cut short in the message


def test_the_ends_of_the_calendar_are_valid_times() -> None:
    assert parse_time("253402300799999") == 253_402_300_799_999
    assert parse_time("0001-01-01T00:00:00+00:00") == -62_135_596_800_000
    assert parse_time("9999-12-31T23:59:59.999+00:00") == 253_402_300_799_999


def test_a_store_path_that_is_no_store_is_explained(tmp_path: Path) -> None:
    (tmp_path / "text.db").write_text("hello, not a database\n")
    one_line_refusal(history("LT-1", "--store", str(tmp_path / "text.db")), "file is not a database")
    (tmp_path / "empty.db").write_bytes(b"")
    one_line_refusal(history("LT-1", "--store", str(tmp_path / "empty.db")), "is not an agent store")
    os.mkfifo(tmp_path / "fifo")  # SQLite would wait on it for ever
    one_line_refusal(history("LT-1", "--store", str(tmp_path / "fifo")), "not a regular file")
    one_line_refusal(history("LT-1", "--store", "/dev/null"), "not a regular file")
    one_line_refusal(history("LT-1", "--store", str(tmp_path / ("a" * 5000))), "cannot read")
    (tmp_path / "dir").mkdir()
    result = history("LT-1", "--store", str(tmp_path / "dir"))
    assert result.returncode == 2 and "is a directory" in result.stderr and "Traceback" not in result.stderr
    with pytest.raises(HistoryError, match="is a directory"):  # a configuration's store.path can be one
        read_history(tmp_path / "dir", "LT-1", 0, 1)


def test_a_store_path_sqlite_would_read_as_another_file_is_refused_and_nothing_is_created(tmp_path: Path) -> None:
    with Store(tmp_path / "s#1.db") as store:
        store.point_keys(["LT-1"])
    one_line_refusal(history("LT-1", "--store", str(tmp_path / "s#1.db")), "must not hold")
    assert not (tmp_path / "s").exists()  # file:…/s#1.db?mode=ro used to open (and create) …/s read-write


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode")
def test_an_unreadable_store_is_explained(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        store.point_keys(["LT-1"])
    (tmp_path / "s.db").chmod(0)
    one_line_refusal(history("LT-1", "--store", str(tmp_path / "s.db")), "cannot read")


def test_a_point_argument_that_is_not_text_is_explained(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        store.point_keys(["LT-1"])
    with pytest.raises(HistoryError, match="not a point id"):
        read_history(tmp_path / "s.db", "LT-\udcff", 0, 1)  # how Python hands over argv bytes that are not UTF-8


def test_a_damaged_chunk_costs_its_readings_only(tmp_path: Path) -> None:
    base = 1_764_331_200_000
    with Store(tmp_path / "s.db") as store:
        for start in (base, base + 60_000):
            buffer = ArchiveBuffer()
            buffer.add_many(["LT-1"] * 2, [start, start + 1000], [1.0, 2.0], [0, 0])
            store.write_chunks(list(buffer.take()), mark=0)
        store.db.execute("UPDATE archive SET chunk = substr(chunk, 1, 10) WHERE start = ?", (base,))
    result = history("LT-1", "--store", str(tmp_path / "s.db"), "--since", str(base - 1),
                     "--until", str(base + 120_000), "--json")
    assert result.returncode == 0, result.stderr
    assert [r["ts"] for r in json.loads(result.stdout)["readings"]] == [base + 60_000, base + 61_000]
    assert "Traceback" not in result.stderr
    damaged = [line for line in result.stderr.splitlines() if "damaged" in line]
    assert len(damaged) == 1 and f"LT-1 from {base}" in damaged[0]

"""`edge-agent history` with wrong questions: each gets a clear answer and a non-zero exit, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from agent.store import Store


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

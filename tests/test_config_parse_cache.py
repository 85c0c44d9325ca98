"""The parse of a large YAML file kept in the service's cache folder: read back only for the very text it came from,
never when damaged or stale, never when JSON would change it, and what it gives validates to what the YAML gives."""

from __future__ import annotations

import datetime
import json
import math
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config import loader, parse_cache, yaml_stream
from agent.config.loader import load_config, load_config_apart
from simulators.modbus import synthetic_data


def big_file(tmp_path: Path, name: str = "agent.yaml", points: int = 500) -> Path:
    """A file above the size worth keeping (the tests' own, below, but for the check run as its own process)."""
    data = synthetic_data(points, interval=1.0, port=1502, store=str(tmp_path / "store.db"))
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    assert len(path.read_text()) >= parse_cache.MIN_CHARS, "the file must be large enough to be kept"
    return path


class Parses:
    """Counts the YAML parses (the real one runs)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        real = yaml_stream.load

        def counted(text: str, secret_keys: Any = ()) -> Any:
            self.count += 1
            return real(text, secret_keys)

        monkeypatch.setattr(yaml_stream, "load", counted)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    folder.mkdir()
    monkeypatch.setenv(parse_cache.CACHE_ENV, f"{folder}:{tmp_path / 'other'}")  # the first of several is used
    monkeypatch.setattr(parse_cache, "MIN_CHARS", 50_000)  # files of 500 points are kept: quicker tests
    return folder / parse_cache.FILE_NAME


def test_an_unchanged_file_is_parsed_once_and_read_back_the_same(tmp_path: Path, cache: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path = big_file(tmp_path)
    parses = Parses(monkeypatch)
    first = load_config(path)
    assert parses.count == 1 and cache.exists()
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600  # it holds what the file holds, passwords too
    again = load_config(path)
    assert parses.count == 1, "read back, not parsed"
    assert again.model_dump() == first.model_dump()
    # one character changed: parsed again, and the entry now names the new text
    path.write_text(path.read_text().replace("synthetic plant", "synthetic works", 1))
    changed = load_config(path)
    assert parses.count == 2 and changed.agent.name.startswith("synthetic works")
    assert load_config(path).agent.name.startswith("synthetic works") and parses.count == 2


@pytest.mark.parametrize("damage", ["flip", "truncate", "header", "empty", "other_reader"])
def test_a_damaged_or_foreign_entry_means_a_parse(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch,
                                                  damage: str) -> None:
    path = big_file(tmp_path)
    expected = load_config(path).model_dump()
    raw = cache.read_bytes()
    head, _, body = raw.partition(b"\n")
    if damage == "flip":  # a byte of the document changed: still JSON, another document
        at = body.index(b'"address":2') + len(b'"address":')
        cache.write_bytes(head + b"\n" + body[:at] + b"3" + body[at + 1:])
    elif damage == "truncate":
        cache.write_bytes(raw[: len(raw) // 2])
    elif damage == "header":
        cache.write_bytes(b"not json\n" + body)
    elif damage == "empty":
        cache.write_bytes(b"")
    else:  # written by another version of the reader
        cache.write_bytes(head.replace(b'"reader":"', b'"reader":"x') + b"\n" + body)
    parses = Parses(monkeypatch)
    assert load_config(path).model_dump() == expected
    assert parses.count == 1
    assert load_config(path).model_dump() == expected and parses.count == 1, "the entry was written anew"


@pytest.mark.parametrize("document", [
    {"value": math.nan},
    {"value": math.inf},
    {"when": datetime.date(2026, 11, 30)},
    {1: "a key that is not text"},
    {"big": 1 << 70},
    {"raw": b"bytes"},
])
def test_a_document_json_would_change_is_not_kept(cache: Path, document: dict[Any, Any]) -> None:
    text = "x" * parse_cache.MIN_CHARS
    parse_cache.keep(text, document)
    assert not cache.exists()
    parse_cache.keep(text, {"value": 1.5, "list": [None, True, "t"]})
    assert parse_cache.recall(text) == {"value": 1.5, "list": [None, True, "t"]}
    assert parse_cache.recall(text + " ") is None


def test_nothing_is_kept_without_a_cache_folder_or_for_a_small_file(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parse_cache, "MIN_CHARS", 50_000)
    monkeypatch.delenv(parse_cache.CACHE_ENV, raising=False)
    path = big_file(tmp_path)
    before = set(tmp_path.rglob("*"))
    load_config(path)
    assert set(tmp_path.rglob("*")) == before
    folder = tmp_path / "cache"
    folder.mkdir()
    monkeypatch.setenv(parse_cache.CACHE_ENV, str(folder))
    load_config(ROOT / "config" / "example.yaml")
    assert not list(folder.iterdir())


def test_a_folder_it_cannot_write_only_means_a_parse_next_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parse_cache, "MIN_CHARS", 50_000)
    monkeypatch.setenv(parse_cache.CACHE_ENV, str(tmp_path / "missing" / "folder"))
    path = big_file(tmp_path)
    parses = Parses(monkeypatch)
    assert load_config(path).model_dump() == load_config(path).model_dump()
    assert parses.count == 2
    assert not list(tmp_path.glob("missing"))


def test_the_daemon_keeps_the_parse_after_it_has_its_answer(tmp_path: Path, cache: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """`load_config_apart`: the child answers first, then keeps the parse; the next start reads it back."""
    path = big_file(tmp_path)
    first = load_config_apart(path)
    deadline = time.monotonic() + 30
    while not cache.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cache.exists()

    def no_parse(text: str, secret_keys: Any = ()) -> Any:
        raise AssertionError("parsed although the entry was there")

    monkeypatch.setattr(yaml_stream, "load", no_parse)  # the fork inherits it
    # were the child to fail, the daemon would load the file itself: that must not hide it here
    monkeypatch.setattr(loader, "load_config", lambda *a, **k: pytest.fail("the child gave no answer"))
    assert load_config_apart(path) == first


def test_a_json_file_or_a_running_daemon_leaves_no_entry_and_uses_none(tmp_path: Path, cache: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A reload in a running daemon (a child of a process with threads) neither reads nor writes an entry; a JSON
    file removes the entry an earlier YAML file left (it may hold that file's passwords)."""
    path = big_file(tmp_path)
    parses = Parses(monkeypatch)
    load_config(path, kept=False)
    assert not cache.exists() and parses.count == 1
    load_config(path)
    assert cache.exists() and parses.count == 2
    load_config(path, kept=False)
    assert parses.count == 3, "not read back in a running daemon's child"
    as_json = tmp_path / "agent.json"
    as_json.write_text(json.dumps(yaml.safe_load(path.read_text())))
    load_config(as_json)
    assert not cache.exists()


def test_the_check_before_a_start_keeps_the_parse_for_the_start(tmp_path: Path, cache: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """systemd runs `edge-agent config check` before `run`, with the same cache folder: a changed file is parsed
    by the check, and the start reads the check's parse."""
    monkeypatch.setattr(parse_cache, "MIN_CHARS", 1_000_000)  # the process below keeps files of its size only
    path = big_file(tmp_path, points=6500)
    env = {**os.environ, parse_cache.CACHE_ENV: str(cache.parent)}
    result = subprocess.run([sys.executable, "-m", "agent", "config", "check", str(path)], capture_output=True,
                            text=True, env=env, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert cache.exists()
    monkeypatch.setattr(loader, "parse_document", lambda *a, **k: pytest.fail("parsed although checked"))
    assert load_config(path).agent.id == "bench"


TEXT = "y" * parse_cache.MIN_CHARS
JSONISH = st.recursive(st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 63) - 1) | st.floats(allow_nan=False,
                       allow_infinity=False) | st.text(max_size=8),
                       lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                   max_size=4), max_leaves=25)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=st.dictionaries(st.text(max_size=6), JSONISH, max_size=5), cut=st.integers(0, 400),
       junk=st.binary(max_size=40), mode=st.sampled_from(["cut", "insert", "replace_body", "raw"]))
def test_whatever_the_entry_holds_it_gives_the_document_kept_or_nothing(
        cache: Path, document: dict[str, Any], cut: int, junk: bytes, mode: str) -> None:
    """The entry is read from disk: any bytes in it give the document kept for this very text, or None, and never
    raise."""
    parse_cache.keep(TEXT, document)
    raw = cache.read_bytes()
    assert parse_cache.recall(TEXT) == document
    if mode == "cut":
        raw = raw[:cut % (len(raw) + 1)]
    elif mode == "insert":
        at = cut % (len(raw) + 1)
        raw = raw[:at] + junk + raw[at:]
    elif mode == "replace_body":
        raw = raw.partition(b"\n")[0] + b"\n" + junk
    else:
        raw = junk
    cache.write_bytes(raw)
    back = parse_cache.recall(TEXT)
    assert back is None or back == document

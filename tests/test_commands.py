"""The command handler on its own: one answer per request, errors that name the field, ids not reused."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson

from agent.control.commands import CommandHandler, CommandIds
from agent.store import Store


def handler(ids: CommandIds | None = None) -> tuple[CommandHandler, list[str]]:
    done: list[str] = []

    def reset(alarm: str) -> dict[str, Any]:
        done.append(f"reset {alarm}")
        return {"alarm": alarm}

    def state(value: str) -> dict[str, Any]:
        done.append(f"state {value}")
        return {"production_state": value}

    return CommandHandler(reset, state, lambda: {"ok": 1}, ids=ids), done


def ask(h: CommandHandler, **body: Any) -> dict[str, Any]:
    return h.handle(orjson.dumps(body))


def test_a_repeated_id_is_answered_again_without_doing_it_twice() -> None:
    h, done = handler()
    first = ask(h, id="a", cmd="reset", alarm="GT-1/high")
    assert ask(h, id="a", cmd="reset", alarm="GT-1/high") == first
    assert done == ["reset GT-1/high"]


def test_an_id_reused_for_another_command_is_refused() -> None:
    h, done = handler()
    ask(h, id="j", cmd="reset", alarm="GT-1/high")
    answer = ask(h, id="j", cmd="set_production_state", state="halted")
    assert not answer["ok"] and "already used for another command" in answer["error"]
    assert done == ["reset GT-1/high"]


def test_errors_name_the_field() -> None:
    h, _ = handler()
    assert ask(h, id="1", cmd=5)["error"].startswith("cmd:")
    assert ask(h, id="2", cmd="set_production_state", state="off")["error"].startswith("state: 'off' is not one of")
    assert ask(h, cmd="status")["error"] == "id: required field is missing"
    assert h.handle(b"\xff\xfe")["error"].startswith("not JSON")
    assert h.handle(b"[1]")["error"] == "a command is a JSON object"
    assert h.handle(b"x" * 70_000)["error"].startswith("command of 70000 bytes")


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def test_a_deeply_nested_value_is_answered_with_a_bounded_error_not_an_exception() -> None:
    h, done = handler()
    for field in (b"state", b"cmd", b"v", b"alarm", b"id", b"other"):
        head = b'{"id": "n1", "cmd": "set_production_state", "state": "halted", "'
        body = head + field + b'": ' + nested(1000) + b"}"
        answer = h.handle(body)
        assert not answer["ok"] and answer["error"].startswith(f"{field.decode()}: must be"), answer
        assert len(answer["error"]) < 200
    assert done == [], "a refused command changes nothing"
    assert h.refused == 6


def test_errors_quote_what_they_got_in_a_bounded_form() -> None:
    h, _ = handler()
    answer = ask(h, id="q", cmd="set_production_state", state="x" * 10_000)
    assert not answer["ok"] and len(answer["error"]) < 200 and "..." in answer["error"]
    answer = ask(h, id="q2", cmd="y" * 10_000)
    assert not answer["ok"] and len(answer["error"]) < 300


def test_a_retained_command_is_refused_and_not_done() -> None:
    h, done = handler()
    answer = h.handle(orjson.dumps({"id": "r", "cmd": "set_production_state", "state": "halted"}), retained=True)
    assert not answer["ok"] and "retained" in answer["error"]
    assert done == []


def test_a_command_too_old_or_too_far_ahead_is_refused() -> None:
    h, done = handler()
    now = time.time() * 1000
    old = ask(h, id="o", cmd="reset", alarm="GT-1/high", ts=int(now - 11 * 60_000))
    ahead = ask(h, id="f", cmd="reset", alarm="GT-1/high", ts=int(now + 11 * 60_000))
    fresh = ask(h, id="n", cmd="reset", alarm="GT-1/high", ts=int(now - 60_000))
    assert "old" in old["error"] and "ahead" in ahead["error"] and fresh["ok"]
    assert done == ["reset GT-1/high"]


def test_local_users_cannot_set_the_production_state_nor_claim_a_platform_id() -> None:
    h, done = handler()
    local = h.handle(orjson.dumps({"id": "p1", "cmd": "set_production_state", "state": "normal"}), "local")
    assert not local["ok"] and "only taken from the platform" in local["error"]
    h.handle(orjson.dumps({"id": "p2", "cmd": "reset", "alarm": "GT-1/high"}), "local")
    platform = ask(h, id="p2", cmd="set_production_state", state="halted")
    assert platform["ok"], "the local user's id p2 is not the platform's"
    assert done == ["reset GT-1/high", "state halted"]


def test_used_command_ids_survive_a_restart(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        h, done = handler(store)
        first = ask(h, id="k", cmd="set_production_state", state="halted")
    with Store(tmp_path / "s.db") as store:
        h, done = handler(store)
        assert ask(h, id="k", cmd="set_production_state", state="halted") == first
        other = ask(h, id="k", cmd="set_production_state", state="normal")
        assert not other["ok"] and "already used" in other["error"]
        assert done == [], "the restarted agent did not do it again"

"""The command handler on its own: one answer per request, errors that name the field, ids not reused."""

from __future__ import annotations

from typing import Any

import orjson

from agent.control.commands import CommandHandler


def handler() -> tuple[CommandHandler, list[str]]:
    done: list[str] = []

    def reset(alarm: str) -> dict[str, Any]:
        done.append(f"reset {alarm}")
        return {"alarm": alarm}

    def state(value: str) -> dict[str, Any]:
        done.append(f"state {value}")
        return {"production_state": value}

    return CommandHandler(reset, state, lambda: {"ok": 1}), done


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

"""`edge-agent config show|apply|rollback`: which configuration revision runs, where it came from and who signed
it; a local file applied on trial through the running agent's control socket; going back to an earlier revision.

`show` reads the store and the state folder (no daemon needed); `apply` and `rollback` ask the running agent.
Every failure is one clear line on stderr: exit 2 for bad input (an invalid file, a revision not kept), 1 when the
agent cannot be asked or refuses for another reason.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import click

from agent.cli.base import _CONFIG_OPTION, _SOCKET_OPTION, EXIT_BAD_INPUT, _fail, _print_config_errors, _socket_of
from agent.config.loader import load_config
from agent.config.revisions import RevisionError, RevisionFiles, file_hash
from agent.errors import ConfigError

MAX_FILE_BYTES = 16 * 1_048_576
APPLY_TIMEOUT = 120.0  # a 10,000-point file is validated and applied in a few seconds


def describe(config_path: Path) -> dict[str, Any]:
    """What `config show --json` prints: the active revision, the trial, the bootstrap file's standing, the
    revisions kept. Reads, never writes."""
    try:
        data = config_path.read_bytes()
        boot = load_config(config_path)
    except OSError as exc:
        _fail(f"{config_path}: {exc.strerror or exc}")
    except ConfigError as exc:
        _print_config_errors(exc)
        sys.exit(EXIT_BAD_INPUT)
    boot_hash = file_hash(data)
    active, highest = _recorded(boot.store.path)
    files = RevisionFiles(boot.store.path.resolve().parent, boot.remote_config.keep_revisions)
    kept = []
    for number in files.numbers():
        try:
            kept.append(files.load(number).summary())
        except RevisionError as exc:
            kept.append({"revision": number, "error": str(exc)})
    bootstrap: dict[str, Any] = {"path": str(config_path), "revision": boot.revision, "hash": boot_hash}
    if active is None:
        bootstrap.update(in_use=True, why="no revision is recorded yet: the file is taken at start")
        out: dict[str, Any] = {"revision": boot.revision, "source": "file", "hash": boot_hash, "kid": None,
                               "id": None, "since": None, "trial": None, "previous": None}
    else:
        out = {key: active.get(key) for key in ("revision", "source", "hash", "kid", "id", "since", "previous")}
        until = active.get("trial_until")
        out["trial"] = None if until is None else {"until": until, "previous": (active.get("previous") or {})
                                                   .get("revision")}
        if active.get("source") == "file":
            same = active.get("hash") == boot_hash
            bootstrap.update(in_use=same, why="in use" if same else
                             "changed since it was taken: a restart or SIGHUP takes it")
        elif boot.revision > int(active.get("revision", 0)):
            bootstrap.update(in_use=False, why=f"its revision {boot.revision} is above the active one: a restart "
                                                "or SIGHUP takes it")
        else:
            bootstrap.update(in_use=False, why=f"not in use: its revision {boot.revision} is not above the active "
                                               f"revision {active.get('revision')} from the {active.get('source')} "
                                               "(raise its `revision`, or `edge-agent config apply` it)")
    out["bootstrap"] = bootstrap
    out["highest"] = highest
    out["kept"] = kept
    return out


def _recorded(store_path: Path) -> tuple[dict[str, Any] | None, int]:
    """The active revision recorded in the store (read only), and the highest revision taken."""
    if not store_path.exists():
        return None, 0
    try:
        db = sqlite3.connect(f"{store_path.absolute().as_uri()}?mode=ro", uri=True, timeout=5)
        try:
            rows = dict(db.execute("SELECT key, value FROM meta WHERE key IN ('config_active', 'config_highest')"))
        finally:
            db.close()
    except sqlite3.Error as exc:
        _fail(f"{store_path}: cannot read the store: {exc}", 1)
    try:
        active = json.loads(rows["config_active"]) if "config_active" in rows else None
    except (TypeError, ValueError):
        active = None
    highest = rows.get("config_highest", 0)
    return (active if isinstance(active, dict) else None), (highest if isinstance(highest, int) else 0)


def _when(ms: object) -> str:
    if not isinstance(ms, int):
        return "?"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))


@click.command("show")
@_CONFIG_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (revision, source, hash, ...).")
def config_show(config_path: Path, as_json: bool) -> None:
    """Which configuration revision is active, where it came from (file, platform, local) and who signed it, its
    hash, whether it is on trial, the bootstrap file's standing, and the revisions kept to roll back to."""
    info = describe(config_path)
    if as_json:
        click.echo(json.dumps(info, ensure_ascii=False))
        return
    source = {"file": "the bootstrap file", "platform": "the platform", "local": "a local `config apply`"}.get(
        str(info["source"]), str(info["source"]))
    signed = f", signed by key {info['kid']}" if info.get("kid") else ""
    click.echo(f"active: revision {info['revision']} from {source}{signed}")
    click.echo(f"hash: {info['hash']}")
    if info.get("since"):
        click.echo(f"since: {_when(info['since'])}")
    trial = info.get("trial")
    click.echo(f"trial: until {_when(trial['until'])}, else back to revision {trial['previous']}" if trial else
               "trial: no (confirmed)")
    previous = info.get("previous")
    if previous:
        click.echo(f"previous: revision {previous.get('revision')} ({previous.get('source')})")
    boot = info["bootstrap"]
    click.echo(f"bootstrap file: {boot['path']}, revision {boot['revision']}: {boot['why']}")
    kept = " ".join(str(k["revision"]) for k in info["kept"]) or "none"
    click.echo(f"kept revisions: {kept} (a push must be above {max(info['highest'], int(info['revision']))})")


def _ask_long(socket: Path, request: dict[str, Any]) -> dict[str, Any]:
    from agent.control.socket import ask

    try:
        return asyncio.run(ask(socket, request, timeout=APPLY_TIMEOUT))
    except (ConnectionError, TimeoutError) as exc:
        _fail(str(exc) or "the agent did not answer in time", 1)


def _answered(answer: dict[str, Any]) -> None:
    """Exit on a refusal: 2 when the input was at fault, 1 otherwise."""
    if answer.get("ok"):
        return
    errors = answer.get("errors") or [answer.get("error") or "refused"]
    kind = answer.get("kind")
    if len(errors) == 1:
        _fail(str(errors[0]), EXIT_BAD_INPUT if kind in ("invalid", "old_revision", "malformed") else 1)
    click.echo(f"edge-agent: refused, {len(errors)} error(s):", err=True)
    for line in errors:
        click.echo(f"  {line}", err=True)
    sys.exit(EXIT_BAD_INPUT if kind in ("invalid", "old_revision", "malformed") else 1)


@click.command("apply")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@_CONFIG_OPTION
@_SOCKET_OPTION
def config_apply(file: Path, config_path: Path, socket: Path | None) -> None:
    """Apply FILE to the running agent, on trial: validated like a push (every error with its path), kept as a
    revision, and rolled back by itself if the uplink or most devices fail within remote_config.confirm_within.
    FILE's `revision`, if it has one, must be above the active one; without, it takes the next."""
    try:
        with file.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        _fail(f"{file}: {exc.strerror or exc}")
    if len(data) > MAX_FILE_BYTES:
        _fail(f"{file}: larger than {MAX_FILE_BYTES:,} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        _fail(f"{file}: not UTF-8 text")
    answer = _ask_long(_socket_of(config_path, socket), {"cmd": "config_apply", "text": text, "name": str(file)})
    _answered(answer)
    click.echo(f"revision {answer['revision']} applied, on trial ({answer.get('hash', '')}); "
               "`edge-agent config show` tells when it is confirmed")


@click.command("rollback")
@click.argument("revision", required=False)
@_CONFIG_OPTION
@_SOCKET_OPTION
def config_rollback(revision: str | None, config_path: Path, socket: Path | None) -> None:
    """Go back to the previous configuration revision, or to REVISION (a kept one, or `file` for the bootstrap
    file), at once and without a trial."""
    target: int | str | None = None
    if revision is not None:
        if revision == "file":
            target = "file"
        elif revision.isdigit():
            target = int(revision)
        else:
            _fail(f"revision: a kept revision's number or `file`, not {revision[:40]!r}")
    answer = _ask_long(_socket_of(config_path, socket), {"cmd": "config_rollback", "revision": target})
    _answered(answer)
    click.echo(f"back to revision {answer['revision']} ({answer.get('hash', '')})")

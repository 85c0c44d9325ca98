"""`edge-agent verify`: check the local store against the seals of its messages (agent.store.audit), the way the
platform checks what it receives. Exit 0 when intact, 1 when a break is found (each named by its seq), 2 for bad
input. Reads the store only: safe beside a running agent.
"""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from agent.cli.base import EXIT_BAD_INPUT, _fail, _print_config_errors, main
from agent.config.loader import load_config
from agent.errors import ConfigError
from agent.trust.keys import KeyFileError, TrustedKeys, key_id, key_path, load_private_key

if TYPE_CHECKING:
    from agent.store.audit import Audit

_URI_SYNTAX = frozenset("?#%")


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("/etc/edge-agent/agent.yaml"), show_default=True, help="Configuration whose store to check.")
@click.option("--store", "store_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Check this store file instead of the configuration's.")
@click.option("--public-key", "public_keys", multiple=True, metavar="KEY",
              help="The agent's public key as registered with the platform (base64url; repeatable). Default: the "
              "key file beside the store, when this user can read it; without a key only the chain is checked.")
@click.option("--no-archive", is_flag=True, help="Skip reading every archive chunk (the longest part on a big store).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def verify(config_path: Path, store_path: Path | None, public_keys: tuple[str, ...], no_archive: bool,
           as_json: bool) -> None:
    """Check every message still in the store against its seal: signature, chain, head; and the archive's chunks.

    Exit 0 when intact, 1 when a message was changed, taken out or put in (named by its seq), 2 for bad input.
    """
    from agent.store.audit import audit_store

    if store_path is None:
        try:
            store_path = load_config(config_path).store.path
        except ConfigError as exc:
            _print_config_errors(exc)
            sys.exit(EXIT_BAD_INPUT)
    if _URI_SYNTAX.intersection(str(store_path)):
        _fail(f"cannot read {store_path}: a store path must not hold '?', '#' or '%'")
    if not store_path.is_file():
        _fail(f"no store file at {store_path} (is this the agent's store.path?)")
    keys, signatures = _keys(public_keys, store_path.parent)
    try:
        audit = audit_store(store_path, keys, signatures, archive=not no_archive)
    except sqlite3.DatabaseError as exc:
        _fail(f"{store_path} is not an agent store, or cannot be read: {exc}")
    except OSError as exc:
        _fail(f"cannot read {store_path}: {exc.strerror or exc}")
    if as_json:
        click.echo(json.dumps(audit.as_dict(), ensure_ascii=False))
    else:
        _print(audit)
    sys.exit(0 if audit.intact else 1)


def _keys(texts: tuple[str, ...], folder: Path) -> tuple[TrustedKeys | None, str]:
    """The keys to check signatures with, and how they were found (or why there are none)."""
    if texts:
        try:
            keys = TrustedKeys.from_texts(texts)
        except ValueError as exc:
            _fail(f"--public-key{exc}")
        return keys, f"checked with key {', '.join(keys)} (--public-key)"
    path = key_path(folder)
    if not path.exists():
        return None, f"not checked: no key file {path} (give --public-key, the key registered with the platform)"
    try:
        public = load_private_key(path).public_key()
    except KeyFileError as exc:
        return None, f"not checked: {exc} (give --public-key, the key registered with the platform)"
    return TrustedKeys([public]), f"checked with key {key_id(public)} (key file {path})"


def _print(audit: Audit) -> None:
    from agent.store.audit import ARCHIVE_LIMITS

    click.echo(f"store {audit.path}: {audit.messages} message(s), chain head seq {audit.head}")
    click.echo(f"signatures: {audit.signatures}")
    starts = ", ".join(f"seq {seq} ({why})" for seq, why in audit.restarts) or "none in the store"
    click.echo(f"chain: {audit.verified} message(s) verified; chain starts: {starts}; {audit.left} predecessor(s) "
               "left the store by its own rules (delivered and archived, evicted, past retention: the platform "
               "holds them)" + (f"; {audit.before_chain} stored before the chain began" if audit.before_chain else ""))
    if audit.archive is not None:
        a = audit.archive
        click.echo(f"archive: {a.chunks} chunk(s), {a.readings} reading(s) readable, {a.damaged_count} damaged "
                   f"({ARCHIVE_LIMITS})")
        for line in a.damaged:
            click.echo(f"DAMAGED chunk {line}")
    for finding in audit.breaks:
        where = f"seq {finding.seq}" if finding.seq is not None else "store"
        click.echo(f"BREAK {where} ({finding.kind}): {finding.text}")
    if audit.break_count > len(audit.breaks):
        click.echo(f"... and {audit.break_count - len(audit.breaks)} more break(s)")
    click.echo("intact" if audit.intact else f"NOT INTACT: {audit.break_count} break(s)", err=not audit.intact)

"""`edge-agent keys`: the agent's own Ed25519 key pair, created once on the plant PC and its public half shown
for registration with the platform. Nothing here prints or copies the private key.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from click.core import ParameterSource

from agent.cli.base import EXIT_BAD_INPUT, _fail, _print_config_errors
from agent.config.loader import load_config
from agent.errors import ConfigError
from agent.trust.keys import (
    ALG,
    DEFAULT_KEY_DIR,
    KEY_FILE,
    KeyFileError,
    create_key_file,
    key_id,
    key_path,
    load_private_key,
    public_key_text,
)

_DIR_OPTION = click.option(
    "--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=None,
    help=f"Folder of the key file {KEY_FILE} (default: the folder of the configuration's store, or "
    f"{DEFAULT_KEY_DIR} when there is no configuration).")
_CONFIG_OPTION = click.option(
    "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
    default=Path("/etc/edge-agent/agent.yaml"), show_default=True,
    help="Configuration whose store folder holds the key (when --dir is not given).")


@click.group()
def keys() -> None:
    """The agent's signing key: create it, show its public key for the platform."""


def _key_dir(directory: Path | None, config_path: Path) -> Path:
    """--dir, else the store's folder of the configuration, else the default state folder (no configuration)."""
    if directory is not None:
        return directory
    given = click.get_current_context().get_parameter_source("config_path") is not ParameterSource.DEFAULT
    if not given and not config_path.exists():
        return DEFAULT_KEY_DIR
    try:
        return load_config(config_path).store.path.parent
    except ConfigError as exc:
        _print_config_errors(exc)
        click.echo("edge-agent: give --dir to name the key's folder without the configuration", err=True)
        sys.exit(EXIT_BAD_INPUT)


@keys.command("init")
@_DIR_OPTION
@_CONFIG_OPTION
@click.option("--force", is_flag=True, help="Replace an existing key (the platform must then be given the new one).")
def keys_init(directory: Path | None, config_path: Path, force: bool) -> None:
    """Create the agent's key pair: the private key in a file only its owner reads (0600)."""
    folder = _key_dir(directory, config_path)
    try:
        path, key = create_key_file(folder, force=force)
    except KeyFileError as exc:
        _fail(str(exc))
    public = key.public_key()
    click.echo(f"created {path}")
    click.echo(f"kid        {key_id(public)}")
    click.echo(f"public key {public_key_text(public)}")
    click.echo("register the public key with the platform (edge-agent keys show --json prints it again)", err=True)


@keys.command("show")
@_DIR_OPTION
@_CONFIG_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: kid, public_key, alg.")
def keys_show(directory: Path | None, config_path: Path, as_json: bool) -> None:
    """Print the agent's public key and key id, to register with the platform."""
    path = key_path(_key_dir(directory, config_path))
    try:
        public = load_private_key(path).public_key()
    except KeyFileError as exc:
        _fail(str(exc))
    if as_json:
        click.echo(json.dumps({"kid": key_id(public), "public_key": public_key_text(public), "alg": ALG}))
        return
    click.echo(f"kid        {key_id(public)}")
    click.echo(f"public key {public_key_text(public)}")
    click.echo(f"alg        {ALG}")
    click.echo(f"file       {path}")

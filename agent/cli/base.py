"""What every `edge-agent` command shares: the command group, failing with one clear line (exit 2 for bad
input), the config-or-socket options, and asking the running agent over its control socket.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from agent import __version__
from agent.config.loader import load_config
from agent.errors import ConfigError

EXIT_BAD_INPUT = 2


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    click.echo(f"edge-agent: {message}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edge-agent")
def main() -> None:
    """Edge monitoring agent: field devices → local alarms → durable store → MQTT to the county platform."""


def _print_config_errors(exc: ConfigError) -> None:
    click.echo(f"{exc.source}: {len(exc.errors)} error(s)", err=True)
    for line in exc.errors:
        click.echo(f"  {line}", err=True)


def _socket_of(config_path: Path, socket: Path | None) -> Path:
    if socket is not None:
        return socket
    try:
        return load_config(config_path).control.socket
    except ConfigError as exc:
        _print_config_errors(exc)
        sys.exit(EXIT_BAD_INPUT)


def _ask(socket: Path, request: dict[str, Any]) -> dict[str, Any]:
    from agent.control.socket import ask

    try:
        return asyncio.run(ask(socket, request))
    except ConnectionError as exc:
        _fail(str(exc), 1)
        raise AssertionError("unreachable") from None


_CONFIG_OPTION = click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
                              default=Path("/etc/edge-agent/agent.yaml"), show_default=True,
                              help="Configuration of the running agent (for its control socket).")
_SOCKET_OPTION = click.option("--socket", type=click.Path(path_type=Path), default=None,
                              help="Control socket of the running agent (instead of --config).")

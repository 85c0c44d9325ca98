"""`edge-agent probe`: ask one device one question, with no daemon and no config file, for field engineers.

Each protocol's probe is a module of this package defining a click command named `command`; the group
finds them itself, so adding a protocol's probe touches one file.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import sys
from typing import Any, NoReturn

import click


class _ProbeGroup(click.Group):
    """Imports a protocol's probe only when it is asked for (the OPC UA stack alone weighs 20 MB)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(info.name for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_"))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.list_commands(ctx):
            return None
        command = getattr(importlib.import_module(f"{__name__}.{cmd_name}"), "command", None)
        return command if isinstance(command, click.Command) else None


@click.group(cls=_ProbeGroup)
def probe() -> None:
    """Read a device directly: prints a readable answer, or one JSON object with --json; non-zero exit on failure."""


def emit(result: dict[str, Any], as_json: bool, readable: str) -> None:
    """Print a probe's answer: one JSON object, or the readable text."""
    if as_json:
        click.echo(json.dumps(result, ensure_ascii=False))
    else:
        click.echo(readable)


def fail(message: str, as_json: bool, code: int = 1, **details: Any) -> NoReturn:
    """Report a failed probe (what failed, plainly) and exit non-zero."""
    if as_json:
        click.echo(json.dumps({"error": message, "quality": "bad", **details}, ensure_ascii=False))
    else:
        click.echo(f"edge-agent probe: {message}", err=True)
    sys.exit(code)

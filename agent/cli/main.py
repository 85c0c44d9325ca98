"""The `edge-agent` command: run the daemon, check and describe configurations, run the demo.

Every failure is one clear message on stderr and a non-zero exit code (2 for bad input); no tracebacks
for mistakes a user can make.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import sys
from pathlib import Path

import click

from agent.cli import config_revisions
from agent.cli.base import (
    _CONFIG_OPTION,
    _SOCKET_OPTION,
    EXIT_BAD_INPUT,
    _ask,
    _fail,
    _print_config_errors,
    _socket_of,
    main,
)
from agent.cli.keys import keys
from agent.config.loader import config_schema, load_config, load_config_apart, secret_file_warnings
from agent.errors import AgentError, ConfigError

__all__ = ["main"]


def _setup_logging(level: str) -> None:
    from agent.app.logs import setup

    setup(level)


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Configuration file (YAML).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default=None,
              help="Override the configuration's log level.")
def run(config_path: Path, log_level: str | None) -> None:
    """Run the agent until SIGTERM or Ctrl-C (what is not yet delivered stays in the store)."""
    from agent.app.daemon import Agent

    try:
        config = load_config_apart(config_path)
    except ConfigError as exc:
        _print_config_errors(exc)
        sys.exit(EXIT_BAD_INPUT)
    _setup_logging(log_level or config.log_level)
    logging.getLogger("asyncua").setLevel(logging.WARNING)
    try:
        asyncio.run(Agent(config, config_path).run())
    except (OSError, AgentError) as exc:
        _fail(f"cannot run: {exc}", 1)
    except ExceptionGroup as group:  # a task failed: name it plainly, the log has the traceback
        logging.getLogger("agent").exception("the agent stopped on an error")
        _fail(f"stopped on an error: {'; '.join(repr(e) for e in group.exceptions)}", 1)


@main.group()
def config() -> None:
    """Check configuration files, print their schema, show, apply and roll back the running one's revisions."""


for _command in (config_revisions.config_show, config_revisions.config_apply, config_revisions.config_rollback):
    config.add_command(_command)


@config.command("check")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def config_check(file: Path) -> None:
    """Validate FILE; print every error with its path and exit 2, or exit 0 when valid.

    A secret file this user cannot read is a warning, not an error: the agent reads it when it connects.
    """
    try:
        cfg = load_config(file)
    except ConfigError as exc:
        _print_config_errors(exc)
        sys.exit(EXIT_BAD_INPUT)
    points = sum(len(d.points) for ch in cfg.channels for d in getattr(ch, "devices", []))
    click.echo(f"{file}: valid ({len(cfg.channels)} channel(s), {points} point(s), version {cfg.version})")
    for line in secret_file_warnings(cfg):
        click.echo(f"{file}: warning: {line}", err=True)


@config.command("schema")
def config_schema_cmd() -> None:
    """Print the JSON Schema of the configuration file."""
    click.echo(json.dumps(config_schema(), indent=2, ensure_ascii=False))


@main.command()
@click.option("--duration", type=click.FloatRange(min=5), default=None,
              help="Stop by itself after this many seconds (default: run until Ctrl-C).")
@click.option("--broker", default=None, metavar="HOST:PORT",
              help="Use this MQTT broker; `embedded` starts the built-in one (default: mosquitto if installed, "
              "else the built-in one).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Site to simulate (default: the demo site shipped with the demo).")
@click.option("--summary-json", type=click.Path(dir_okay=False, path_type=Path), default=None, metavar="PATH",
              help="Also write the summary to PATH as one JSON object (counts, valid readings per protocol, ok).")
def demo(duration: float | None, broker: str | None, config_path: Path | None, summary_json: Path | None) -> None:
    """Run simulators, a broker, the agent and the platform simulator together; report what arrived."""
    try:  # the demo ships apart from the product (the devtools distribution); never a static import
        demo_module = importlib.import_module("simulators.demo")
    except ImportError as exc:
        _fail(f"the demo is not installed (module {exc.name} is missing): install the edge-agent-devtools "
              "distribution beside edge-agent (from a checkout: pip install ./devtools)", EXIT_BAD_INPUT)
    try:
        ok = bool(demo_module.run_demo(duration=duration, broker=broker, config_path=config_path,
                                       summary_json=summary_json))
    except demo_module.DemoError as exc:
        _fail(str(exc), 1)
    sys.exit(0 if ok else 1)


@main.command()
@click.argument("point")
@click.option("--since", default="1h", show_default=True,
              help="Start: a duration ago (30m, 2h, 7d), an ISO time, or epoch milliseconds.")
@click.option("--until", default="now", show_default=True, help="End, in the same forms as --since.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("/etc/edge-agent/agent.yaml"), show_default=True,
              help="Configuration whose store to read.")
@click.option("--store", "store_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Read this store file instead of the configuration's.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def history(point: str, since: str, until: str, config_path: Path, store_path: Path | None, as_json: bool) -> None:
    """Print the readings of POINT kept on site (no daemon needed; safe beside a running agent)."""
    from agent.store.history import HistoryError, as_dict, as_line, parse_time, read_history

    try:
        if store_path is None:
            try:
                store_path = load_config(config_path).store.path
            except ConfigError as exc:
                _print_config_errors(exc)
                sys.exit(EXIT_BAD_INPUT)
        start, end = parse_time(since), parse_time(until)
        samples = read_history(store_path, point, start, end)
    except HistoryError as exc:
        _fail(str(exc))
    if as_json:
        click.echo(json.dumps({"point": point, "since": start, "until": end,
                               "readings": [as_dict(s) for s in samples]}))
        return
    for sample in samples:
        click.echo(as_line(sample))
    click.echo(f"{len(samples)} reading(s) of {point}", err=True)


@main.command()
@_CONFIG_OPTION
@_SOCKET_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def status(config_path: Path, socket: Path | None, as_json: bool) -> None:
    """Ask the running agent how it is: uplink, channels, production state, raised alarms."""
    answer = _ask(_socket_of(config_path, socket), {"cmd": "status"})
    if as_json or not answer.get("ok"):
        click.echo(json.dumps(answer, ensure_ascii=False))
        sys.exit(0 if answer.get("ok") else 1)
    r = answer["result"]
    revision = f", revision {r['config_revision']} {str(r['config_hash'])[:19]}" if "config_revision" in r else ""
    click.echo(f"agent {r['enterprise']}/{r['agent']} {r['version']} (config {r['config_version']}{revision}), "
               f"up {r['uptime_s']} s, production {r['production_state']}")
    trial = (r.get("config") or {}).get("trial")
    if trial:
        click.echo(f"configuration revision {trial['revision']} on trial, {trial['ends_in_s']:.0f} s left, else back "
                   f"to revision {trial['previous']}")
    click.echo(f"uplink: {'connected' if r['uplink']['connected'] else 'DISCONNECTED'}"
               + (f" ({r['uplink']['last_error']})" if r["uplink"]["last_error"] else "")
               + f"; backlog {r['backlog']['messages']} message(s), {r['backlog']['readings']} reading(s)")
    for ch in r["channels"]:
        devices = ", ".join(f"{d['id']} {d['state']}" + (f" ({d['last_error']})" if d["last_error"] else "")
                            for d in ch["devices"])
        click.echo(f"channel {ch['id']}: link {ch['link']}; {devices}")
    click.echo(f"points: {r['points']['good']} good, {r['points']['uncertain']} uncertain, {r['points']['bad']} bad")
    click.echo("alarms raised: " + (", ".join(f"{a['id']} ({a['state']})" for a in r["alarms"]) or "none"))


@main.group()
def alarms() -> None:
    """List and reset the running agent's alarms."""


@alarms.command("list")
@_CONFIG_OPTION
@_SOCKET_OPTION
def alarms_list(config_path: Path, socket: Path | None) -> None:
    """Print the alarms raised now (latched ones wait for a reset)."""
    answer = _ask(_socket_of(config_path, socket), {"cmd": "status"})
    raised = answer["result"]["alarms"] if answer.get("ok") else []
    for alarm in raised:
        click.echo(f"{alarm['id']}\t{alarm['state']}")
    if not raised:
        click.echo("no alarm raised", err=True)


@alarms.command("reset")
@click.argument("alarm_id")
@_CONFIG_OPTION
@_SOCKET_OPTION
def alarms_reset(alarm_id: str, config_path: Path, socket: Path | None) -> None:
    """Reset a latched alarm (e.g. GT-201/high) whose condition is gone; it is reported as a `reset` event."""
    answer = _ask(_socket_of(config_path, socket), {"cmd": "reset", "alarm": alarm_id})
    if not answer.get("ok"):
        _fail(str(answer.get("error")), 1)
    click.echo(f"{alarm_id}: reset")


def _add_probe() -> None:
    from agent.cli.probe import probe

    main.add_command(probe)
    main.add_command(keys)


_add_probe()
# the field engineer's commands register themselves on `main` (points, channels, buffer, doctor, support-bundle,
# verify)
import agent.cli.doctor  # noqa: E402
import agent.cli.field  # noqa: E402
import agent.cli.support  # noqa: E402
import agent.cli.verify  # noqa: E402, F401

if __name__ == "__main__":
    main()

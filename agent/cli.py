"""The `edge-agent` command: run the daemon, check and describe configurations, run the demo.

Every failure is one clear message on stderr and a non-zero exit code (2 for bad input); no tracebacks
for mistakes a user can make.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path

import click

from agent import __version__
from agent.config import ConfigError, config_schema, load_config

EXIT_BAD_INPUT = 2


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    click.echo(f"edge-agent: {message}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edge-agent")
def main() -> None:
    """Edge monitoring agent: field devices → local alarms → durable store → MQTT to the county platform."""


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Configuration file (YAML).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default=None,
              help="Override the configuration's log level.")
def run(config_path: Path, log_level: str | None) -> None:
    """Run the agent until SIGTERM or Ctrl-C (what is not yet delivered stays in the store)."""
    from agent.daemon import Agent

    try:
        config = load_config(config_path)
    except ConfigError as exc:
        _print_config_errors(exc)
        sys.exit(EXIT_BAD_INPUT)
    _setup_logging(log_level or config.log_level)
    logging.getLogger("pymodbus").setLevel(logging.WARNING)
    try:
        asyncio.run(Agent(config).run())
    except OSError as exc:
        _fail(f"cannot run: {exc}", 1)


@main.group()
def config() -> None:
    """Check configuration files and print their schema."""


def _print_config_errors(exc: ConfigError) -> None:
    click.echo(f"{exc.source}: {len(exc.errors)} error(s)", err=True)
    for line in exc.errors:
        click.echo(f"  {line}", err=True)


@config.command("check")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def config_check(file: Path) -> None:
    """Validate FILE; print every error with its path and exit 2, or exit 0 when valid."""
    try:
        cfg = load_config(file)
    except ConfigError as exc:
        _print_config_errors(exc)
        sys.exit(EXIT_BAD_INPUT)
    points = sum(len(d.points) for ch in cfg.channels for d in getattr(ch, "devices", []))
    click.echo(f"{file}: valid ({len(cfg.channels)} channel(s), {points} point(s), version {cfg.version})")


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
              help="Site to simulate (default: config/example.yaml shipped with the agent).")
def demo(duration: float | None, broker: str | None, config_path: Path | None) -> None:
    """Run simulators, a broker, the agent and the platform simulator together; report what arrived."""
    from agent.demo import DemoError, run_demo

    try:
        ok = run_demo(duration=duration, broker=broker, config_path=config_path)
    except DemoError as exc:
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
    from agent.history import HistoryError, as_dict, as_line, parse_time, read_history

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


def _add_probe() -> None:
    from agent.probe import probe

    main.add_command(probe)


_add_probe()

if __name__ == "__main__":
    main()

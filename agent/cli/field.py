"""What a field engineer reaches for first on site: `points`, `channels` and `buffer` ask the running agent over
its control socket (read-only questions); each prints a table on a terminal or one JSON object with `--json`,
and exits 1 when what it reports is bad, so a script can tell.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from agent.cli.base import _CONFIG_OPTION, _SOCKET_OPTION, _ask, _fail, _socket_of, main

if TYPE_CHECKING:
    from rich.table import Table

BACKLOG_TOO_OLD_S = 600.0  # an undelivered reading older than this means the uplink is not keeping up
STORE_NEARLY_FULL = 0.9  # share of store.max_mb


def _query(config_path: Path, socket: Path | None, request: dict[str, Any]) -> dict[str, Any]:
    answer = _ask(_socket_of(config_path, socket), request)
    if not answer.get("ok"):
        _fail(f"the agent answered: {answer.get('error')}", 1)
    result: dict[str, Any] = answer["result"]
    return result


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _when(ms: int | None) -> str:
    return "-" if not ms else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))


def _emit(data: dict[str, Any], table: Table | None, as_json: bool, bad: bool) -> None:
    if as_json:
        click.echo(json.dumps({**data, "bad": bad}, ensure_ascii=False))
    else:
        from rich.console import Console

        assert table is not None
        Console().print(table)
    sys.exit(1 if bad else 0)


def _table(title: str, **options: Any) -> Table:
    """A rich table; rich is imported here, not when the daemon starts (it never prints tables)."""
    from rich.table import Table

    return Table(title=title, **options)


def _points_table(result: dict[str, Any]) -> Table:
    table = _table(title=f"{result['count']} point(s)")
    right = ("value", "age", "online 1h", "online 1d")
    for column in ("point", "device", "value", "unit", "quality", "age", "online 1h", "online 1d", "alarms"):
        table.add_column(column, justify="right" if column in right else "left")
    for p in result["points"]:
        style = {"good": "", "uncertain": "yellow"}.get(p["quality"], "red")
        value = "-" if p["value"] is None else str(p["value"])
        table.add_row(p["point"], f"{p['channel']}/{p['device']}", value, p["unit"], p["quality"], _age(p["age_s"]),
                      _rate(p.get("online_hour")), _rate(p.get("online_day")), ", ".join(p["alarms"]), style=style)
    return table


def _rate(rate: float | None) -> str:
    """An online rate as a percentage ('-' before the first poll)."""
    return "-" if rate is None else f"{rate * 100:.1f}%"


@main.command()
@click.option("--device", default=None, help="Only the points of this device.")
@click.option("--bad", "only_bad", is_flag=True, help="Only points not good (uncertain, bad, never read).")
@click.option("--watch", is_flag=True, help="Refresh in place every second until Ctrl-C (a live view).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_CONFIG_OPTION
@_SOCKET_OPTION
def points(device: str | None, only_bad: bool, watch: bool, as_json: bool, config_path: Path,
           socket: Path | None) -> None:
    """Every point's last value, quality, age, unit and raised alarms.

    \b
    Examples:
      edge-agent points --bad                 what is not good right now
      edge-agent points --device plc1 --watch a live view of one device
    Exits 1 when a point shown is not good.
    """
    request = {"cmd": "points", "device": device, "bad": only_bad}
    if watch and not as_json:
        from rich.live import Live

        with Live(_points_table(_query(config_path, socket, request)), refresh_per_second=2) as live:
            try:
                while True:
                    time.sleep(1)
                    live.update(_points_table(_query(config_path, socket, request)))
            except KeyboardInterrupt:
                pass
        return
    result = _query(config_path, socket, request)
    if device is not None and not result["points"]:
        _fail(f"no device {device!r} in the running configuration", 2)
    bad = any(p["quality"] != "good" for p in result["points"])
    _emit(result, None if as_json else _points_table(result), as_json, bad)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_CONFIG_OPTION
@_SOCKET_OPTION
def channels(as_json: bool, config_path: Path, socket: Path | None) -> None:
    """Per channel and device: link, state, last good read, consecutive failures, round trip, back-off, errors.

    \b
    Example:
      edge-agent channels --config /etc/edge-agent/agent.yaml
    Exits 1 when a link is down or a device is not answering.
    """
    result = _query(config_path, socket, {"cmd": "channels"})
    table = _table("channels")
    for column in ("channel", "link", "device", "state", "last good", "failures", "round trip", "back-off",
                   "polls/errors", "last error"):
        table.add_column(column)
    bad = False
    for ch in result["channels"]:
        for d in ch["devices"]:
            failing = d["state"] == "failing" or (ch["enabled"] and ch["link"] == "down")
            bad = bad or failing
            rtt = "-" if d["round_trip_ms"] is None else f"{d['round_trip_ms']:.0f} ms"
            table.add_row(f"{ch['id']} ({ch['driver']})", ch["link"], d["id"], d["state"], _when(d["last_good_ts"]),
                          str(d["failures"]), rtt, f"{d['backoff_s']:.0f} s" if d["backoff_s"] else "-",
                          f"{d['polls']}/{d['errors']}", d["last_error"] or "", style="red" if failing else "")
    _emit(result, table, as_json, bad)


@main.command()
@click.option("--max-age", type=click.FloatRange(min=0), default=BACKLOG_TOO_OLD_S, show_default=True,
              help="Seconds an undelivered reading may wait before it counts as a problem.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_CONFIG_OPTION
@_SOCKET_OPTION
def buffer(max_age: float, as_json: bool, config_path: Path, socket: Path | None) -> None:
    """The store: backlog and its oldest age, size against the cap, what was dropped, the archive, last sync.

    \b
    Example:
      edge-agent buffer --json
    Exits 1 when readings wait longer than --max-age, the store is over 90 % of its cap, telemetry was evicted,
    or it runs in memory only.
    """
    r = _query(config_path, socket, {"cmd": "buffer"})
    backlog, store, dropped, archive = r["backlog"], r["store"], r["dropped"], r["archive"]
    problems = []
    if (backlog["oldest_age_s"] or 0) > max_age:
        problems.append(f"readings wait {_age(backlog['oldest_age_s'])} for the broker")
    if store["used_mb"] > STORE_NEARLY_FULL * store["cap_mb"]:
        problems.append(f"the store is at {store['used_mb']:.0f} of {store['cap_mb']:.0f} MB")
    if dropped["evicted_readings"]:
        problems.append(f"{dropped['evicted_readings']} undelivered readings were evicted for space")
    if store["memory_only"]:
        problems.append(f"memory only: {store['memory_only']}")
    table = _table("buffer", show_header=False)
    table.add_column("what")
    table.add_column("value")
    rows = [
        ("backlog", f"{backlog['messages']} message(s), {backlog['readings']} reading(s), oldest "
                    f"{_age(backlog['oldest_age_s'])}"),
        ("store", f"{store['path']}: {store['used_mb']} MB of {store['cap_mb']:.0f} MB; disk free "
                  f"{store['disk_free_mb']} MB (keeps {store['min_free_mb']:.0f})"),
        ("dropped", f"evicted {dropped['evicted_readings']}, pruned {dropped['pruned_readings']}, damaged messages "
                    f"{dropped['damaged_messages']}"),
        ("archive", f"{archive['readings']} reading(s), "
                    f"{_when(archive['oldest_ts'])} .. {_when(archive['newest_ts'])}"),
        ("last sync", _age(r["last_sync_age_s"]) + " ago"),
    ]
    for what, value in rows:
        table.add_row(what, value)
    for problem in problems:
        table.add_row("[red]problem[/]", f"[red]{problem}[/]")
    _emit({**r, "problems": problems}, table, as_json, bool(problems))

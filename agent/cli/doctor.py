"""`edge-agent doctor`: every check a field engineer makes first, each one line with a verdict and a hint. It
reads the configuration and asks the outside world (broker, devices, systemd); it never disturbs the running
agent: its MQTT session uses another client id, and a serial bus the agent polls is not opened again.
"""

from __future__ import annotations

import asyncio
import datetime
import grp
import json
import os
import pwd
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click

from agent.cli.base import _CONFIG_OPTION, main
from agent.config.loader import load_config
from agent.config.models import AgentConfig
from agent.errors import ConfigError

SERVICE_USER = "edge-agent"
TIMEOUT = 5.0


@dataclass
class Check:
    name: str
    verdict: str  # ok, warn, fail, skip
    detail: str
    hint: str = ""


def _run(cmd: list[str]) -> str | None:
    """A command's output, or None when it is not there or fails (timedatectl, systemctl)."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def check_store(config: AgentConfig) -> list[Check]:
    cfg = config.store
    folder = cfg.path.parent
    target = cfg.path if cfg.path.exists() else folder
    if not folder.exists():
        return [Check("store", "fail", f"{folder} does not exist", "create it, or install.sh does (StateDirectory)")]
    if not os.access(target, os.W_OK):
        return [Check("store", "fail", f"{target} is not writable by {pwd.getpwuid(os.geteuid()).pw_name}",
                      f"run doctor as the service user (sudo -u {SERVICE_USER}) or fix the folder's owner")]
    usage = shutil.disk_usage(folder)
    used = cfg.path.stat().st_size if cfg.path.exists() else 0
    free_mb, used_mb = usage.free / 1e6, used / 1e6
    detail = f"{cfg.path}: {used_mb:.0f} MB used, {free_mb:.0f} MB free on the disk, cap {cfg.max_mb:.0f} MB"
    if free_mb < cfg.min_free_mb:
        return [Check("store", "fail", detail, f"below store.min_free_mb ({cfg.min_free_mb:.0f}): free the disk")]
    if free_mb - cfg.min_free_mb < cfg.max_mb - used_mb:
        return [Check("store", "warn", detail, "the disk fills before the store reaches its cap: lower "
                      "store.max_mb, or history is pruned early")]
    return [Check("store", "ok", detail)]


def check_clock() -> list[Check]:
    now = datetime.datetime.now(datetime.UTC)
    if now.year < 2025:
        return [Check("clock", "fail", f"the system clock says {now:%Y-%m-%d}", "set the time: readings carry it")]
    synced = _run(["timedatectl", "show", "-p", "NTPSynchronized", "--value"])
    if synced is None:
        return [Check("clock", "skip", f"{now:%Y-%m-%d %H:%M:%S} UTC; timedatectl does not answer here",
                      "check NTP by hand: readings carry the agent's time")]
    if synced != "yes":
        return [Check("clock", "warn", "NTP is not synchronised", "timedatectl set-ntp true, or point chrony at the "
                      "site's time server: readings carry the agent's time")]
    return [Check("clock", "ok", f"NTP synchronised, {now:%Y-%m-%d %H:%M:%S} UTC")]


def check_broker(config: AgentConfig) -> list[Check]:
    cfg = config.uplink
    where = f"{cfg.host}:{cfg.port}"
    try:
        addresses = {str(info[4][0]) for info in socket.getaddrinfo(cfg.host, cfg.port, type=socket.SOCK_STREAM)}
    except OSError as exc:
        return [Check("broker DNS", "fail", f"{cfg.host}: {exc}", "check uplink.host and the PC's DNS settings")]
    checks = [Check("broker DNS", "ok", f"{cfg.host} is {', '.join(sorted(addresses))}")]
    try:
        with socket.create_connection((cfg.host, cfg.port), timeout=TIMEOUT) as sock:
            checks.append(Check("broker TCP", "ok", f"{where} accepts connections"))
            if cfg.tls is not None:
                context = ssl.create_default_context(cafile=str(cfg.tls.ca) if cfg.tls.ca else None)
                if cfg.tls.cert is not None:
                    context.load_cert_chain(str(cfg.tls.cert), str(cfg.tls.key) if cfg.tls.key else None)
                if cfg.tls.insecure:
                    context.check_hostname = False
                with context.wrap_socket(sock, server_hostname=cfg.host) as tls:
                    checks.append(Check("broker TLS", "ok", f"{tls.version()} with the configured CA"))
    except ssl.SSLError as exc:
        checks.append(Check("broker TLS", "fail", f"{where}: {exc.reason or exc}",
                            "uplink.tls.ca must be the CA that signed the broker's certificate, and uplink.host "
                            "a name in it"))
        return checks
    except (OSError, ValueError) as exc:
        if len(checks) == 1:
            checks.append(Check("broker TCP", "fail", f"{where}: {exc}", "check uplink.host/port, the firewall and "
                                "that the broker runs"))
        else:
            checks.append(Check("broker TLS", "fail", f"{where}: {exc}", "check uplink.tls (files readable?)"))
        return checks
    checks.append(_mqtt_connack(config))
    return checks


def _mqtt_connack(config: AgentConfig) -> Check:
    """CONNECT with the agent's credentials under another client id (the running agent's session stays)."""
    from agent.uplink.session import new_client

    cfg = config.uplink
    client_id = f"{cfg.client_id or f'{config.agent.enterprise}-{config.agent.id}'}-doctor"
    try:
        client = new_client(cfg, client_id)
    except (OSError, ValueError) as exc:
        return Check("broker MQTT", "fail", str(exc), "check uplink.tls and the password file")
    answer: list[str] = []
    done = threading.Event()

    def on_connect(c: object, userdata: object, flags: object, rc: object, props: object = None) -> None:
        answer.append(str(rc))
        done.set()

    client.on_connect = on_connect
    try:
        client.connect(cfg.host, cfg.port, keepalive=30)
        client.loop_start()
        done.wait(TIMEOUT)
    except OSError as exc:
        return Check("broker MQTT", "fail", str(exc), "")
    finally:
        client.disconnect()
        client.loop_stop()
    if not answer:
        return Check("broker MQTT", "fail", f"no CONNACK within {TIMEOUT:.0f}s", "is it an MQTT broker?")
    if answer[0] != "Success":
        return Check("broker MQTT", "fail", f"the broker refused: {answer[0]}",
                     "check uplink.username and the password (file); the broker's ACL for this agent")
    return Check("broker MQTT", "ok", f"CONNACK accepted as {cfg.username or 'anonymous'} (client {client_id})")


def _agent_running(config: AgentConfig) -> bool:
    if not config.control.socket.exists():
        return False
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(1)
        try:
            sock.connect(str(config.control.socket))
            return True
        except OSError:
            return False


def check_devices(config: AgentConfig) -> list[Check]:
    running = _agent_running(config)
    checks: list[Check] = []
    for channel in config.channels:
        if not channel.enabled:
            continue
        port = getattr(channel, "port", None)
        if isinstance(port, str):  # a serial bus
            checks.extend(_check_serial(channel.id, port))
            if running:
                checks.append(Check(f"channel {channel.id}", "skip", "the running agent polls this bus; a second "
                                    "master would disturb it", "see `edge-agent channels`"))
                continue
        checks.extend(asyncio.run(_read_each_device(channel)))
    return checks


async def _read_each_device(channel: Any) -> list[Check]:
    """One read of each device of a channel, on one connection, closed afterwards."""
    from agent.drivers import registry

    driver = registry.get(channel.driver).factory(channel)
    checks = []
    try:
        for device in getattr(channel, "devices", []):
            name = f"device {channel.id}/{device.id}"
            started = time.monotonic()
            try:
                read = await asyncio.wait_for(driver.read(device), TIMEOUT + device.timeout)
            except (OSError, TimeoutError, EOFError) as exc:
                checks.append(Check(name, "fail", str(exc) or type(exc).__name__,
                                    "check the address, the unit id, the cabling and the device's settings"))
                continue
            took = (time.monotonic() - started) * 1000
            good = sum(v is not None for v in read.values)
            if good == 0:
                checks.append(Check(name, "fail", "; ".join(read.errors) or "no value", "`edge-agent probe` it"))
            elif read.errors:
                checks.append(Check(name, "warn", f"{good} of {len(read.values)} points; {'; '.join(read.errors)}",
                                    "check the failing points' addresses"))
            else:
                checks.append(Check(name, "ok", f"{good} point(s) read in {took:.0f} ms"))
    finally:
        await driver.close()
    return checks


def _check_serial(channel: str, port: str) -> list[Check]:
    name = f"serial {channel}"
    if not os.path.exists(port):
        return [Check(name, "fail", f"{port} does not exist", "is the adapter plugged in? `ls /dev/serial/by-id/`")]
    st = os.stat(port)
    group = grp.getgrgid(st.st_gid).gr_name
    try:
        user = pwd.getpwnam(SERVICE_USER)
    except KeyError:
        return [Check(name, "warn", f"{port} (group {group}); no user {SERVICE_USER} here", "run install.sh")]
    groups = {g.gr_name for g in grp.getgrall() if SERVICE_USER in g.gr_mem} | {grp.getgrgid(user.pw_gid).gr_name}
    if st.st_mode & 0o006 == 0o006 or (group in groups and st.st_mode & 0o060 == 0o060):
        return [Check(name, "ok", f"{port} is open to {SERVICE_USER} (group {group})")]
    return [Check(name, "fail", f"{port} (group {group}, mode {st.st_mode & 0o777:o}) is not open to {SERVICE_USER}",
                  f"usermod -a -G {group} {SERVICE_USER}, then restart the service")]


def check_unit() -> list[Check]:
    if not Path("/run/systemd/system").is_dir():
        return [Check("service", "skip", "systemd does not run here", "")]
    active = _run(["systemctl", "is-active", "edge-agent"])
    if active != "active":
        return [Check("service", "fail", f"edge-agent is {active or 'not active'}",
                      "systemctl status edge-agent; journalctl -u edge-agent -n 50")]
    fed = _run(["systemctl", "show", "edge-agent", "-p", "WatchdogTimestampMonotonic", "--value"])
    if fed in (None, "", "0"):
        return [Check("service", "warn", "active; the watchdog was never fed", "is WatchdogSec set in the unit?")]
    return [Check("service", "ok", "active, the watchdog fed")]


def diagnose(config_path: Path, *, devices: bool = True) -> tuple[list[Check], AgentConfig | None]:
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        return [Check("config", "fail", f"{exc.source}: {len(exc.errors)} error(s): {'; '.join(exc.errors[:3])}",
                      f"edge-agent config check {config_path}")], None
    checks = [Check("config", "ok", f"{config_path}: {len(config.channels)} channel(s), "
                    f"{sum(1 for _ in config.points())} point(s)")]
    steps: list[Callable[[], list[Check]]] = [lambda: check_store(config), check_clock,
                                               lambda: check_broker(config), check_unit]
    if devices:
        steps.insert(3, lambda: check_devices(config))
    for step in steps:
        checks.extend(step())
    return checks, config


@main.command()
@_CONFIG_OPTION
@click.option("--no-devices", is_flag=True, help="Skip reading each device once.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def doctor(config_path: Path, no_devices: bool, as_json: bool) -> None:
    """Check what an engineer checks first: configuration, store, clock, broker (DNS, TCP, TLS, MQTT login),
    each device once, serial ports, the service and its watchdog.

    \b
    Example:
      sudo -u edge-agent edge-agent doctor --config /etc/edge-agent/agent.yaml
    Exits 1 when a check fails.
    """
    checks, _ = diagnose(config_path, devices=not no_devices)
    failed = any(c.verdict == "fail" for c in checks)
    if as_json:
        click.echo(json.dumps({"ok": not failed, "checks": [asdict(c) for c in checks]}, ensure_ascii=False))
    else:
        marks = {"ok": "[green]ok  [/]", "warn": "[yellow]warn[/]", "fail": "[red]FAIL[/]", "skip": "[dim]skip[/]"}
        from rich.console import Console

        console = Console(highlight=False)
        for c in checks:
            console.print(f"{marks[c.verdict]} {c.name}: {c.detail}" + (f"\n       [dim]→ {c.hint}[/]" if c.hint
                                                                           and c.verdict != "ok" else ""))
    sys.exit(1 if failed else 0)


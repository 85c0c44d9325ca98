"""`edge-agent demo`: a whole site on one machine — the plant simulator, a broker, the agent as its own process
and the platform simulator — with live readings and alarms on screen and a delivery summary at the end.

It never touches a real device or a remote host: everything listens on 127.0.0.1, in a temporary folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from amqtt.plugins.base import BaseAuthPlugin  # type: ignore[import-untyped]
from rich.console import Console
from rich.table import Table

from agent.config.base import parse_duration
from agent.config.loader import load_config
from agent.config.models import AgentConfig
from agent.errors import ConfigError
from agent.store import Store
from agent.trust.keys import create_key_file, public_key_text

HERE = Path(__file__).resolve().parent
DEFAULT_CONFIG = HERE / "demo.yaml"
# the longest scenario (crowding in a zone) at speed 1, in seconds
LONGEST_SCENARIO = 125.0
# where Debian and Ubuntu install mosquitto, outside an ordinary user's PATH
MOSQUITTO_PATHS = ("/usr/sbin/mosquitto",)


class DemoError(Exception):
    """The demo could not be set up (no broker, a busy port, a bad site file)."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _wait_port(host: str, port: int, timeout: float, process: asyncio.subprocess.Process | None = None,
                     log: Path | None = None) -> None:
    """Return once something accepts connections on host:port; fail early if `process`, meant to listen, ends."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection(host, port)
            writer.close()
            return
        except OSError:
            if process is not None and process.returncode is not None:
                raise DemoError(f"the broker exited with code {process.returncode}; see {log}") from None
            if time.monotonic() > deadline:
                raise DemoError(f"nothing listens on {host}:{port} after {timeout:g}s") from None
            await asyncio.sleep(0.1)


def find_mosquitto() -> str | None:
    """The mosquitto program, or None when it is not installed."""
    return shutil.which("mosquitto") or next((p for p in MOSQUITTO_PATHS if Path(p).exists()), None)


@dataclass(frozen=True)
class _Broker:
    """The broker the demo uses: where it listens, and what the screen and the summary call it."""

    host: str
    port: int
    name: str  # mosquitto, amqtt, or the HOST:PORT given with --broker
    shown: str


class _AcceptEveryClient(BaseAuthPlugin):  # type: ignore[misc]  # amqtt ships no type information
    """amqtt authentication for the demo: every client is let in, and none is marked anonymous.

    amqtt's own AnonymousAuthPlugin marks every session anonymous, and amqtt queues nothing for an offline anonymous
    session, so the platform simulator's persistent session would miss what the agent sends while it reconnects.
    """

    async def authenticate(self, *, session: Any) -> bool:
        return True


def _amqtt_config(port: int) -> dict[str, Any]:
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {f"{_AcceptEveryClient.__module__}.{_AcceptEveryClient.__qualname__}": {}},
    }


@contextlib.asynccontextmanager
async def _running_broker(broker_arg: str | None, site: AgentConfig, workdir: Path) -> AsyncIterator[_Broker]:
    """The user's broker (--broker HOST:PORT), else mosquitto when installed, else amqtt (--broker embedded)."""
    if broker_arg and broker_arg != "embedded":
        host, _, port_text = broker_arg.rpartition(":")
        if not host or not port_text.isdigit():
            raise DemoError(f"--broker must be HOST:PORT, got {broker_arg!r}")
        await _wait_port(host, int(port_text), 10)
        yield _Broker(host, int(port_text), broker_arg, f"broker {broker_arg}")
        return
    port = _free_port()
    mosquitto = None if broker_arg == "embedded" else find_mosquitto()
    if mosquitto:
        conf = workdir / "mosquitto.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        cmd = [mosquitto, "-c", str(conf)]
        broker = _Broker("127.0.0.1", port, "mosquitto", "mosquitto")
    else:
        if site.uplink.protocol != "3.1.1":
            raise DemoError(f"the built-in broker (amqtt) speaks MQTT 3.1.1 only, and this site's uplink uses MQTT "
                            f"{site.uplink.protocol}: install mosquitto, or give --broker HOST:PORT")
        conf = workdir / "amqtt.yaml"
        conf.write_text(yaml.safe_dump(_amqtt_config(port)), encoding="utf-8")
        cmd = [sys.executable, "-m", "amqtt.scripts.broker_script", "-c", str(conf)]
        why = "" if broker_arg else "; mosquitto is not installed"
        broker = _Broker("127.0.0.1", port, "amqtt", f"amqtt (built in{why})")
    log = workdir / "broker.log"
    with open(log, "wb") as out:
        process = await asyncio.create_subprocess_exec(*cmd, stdout=out, stderr=out)
    try:
        await _wait_port(broker.host, broker.port, 20, process, log)
        yield broker
    finally:
        if process.returncode is None:
            process.terminate()
        await process.wait()


class _Screen:
    """Live view: alarms as they arrive, a table of the latest values every few seconds."""

    def __init__(self, console: Console, units: dict[str, str]) -> None:
        self.console = console
        self.units = units
        self.latest: dict[str, tuple[Any, str, bool]] = {}
        self.lock = threading.Lock()
        self.messages = 0

    def on_message(self, topic: str, message: dict[str, Any]) -> None:
        leaf = topic.rsplit("/", 1)[-1]
        with self.lock:
            self.messages += 1
            if leaf == "data":
                for r in message["readings"]:
                    self.latest[r["point"]] = (r["value"], r["quality"], bool(message["hist"]))
            elif leaf == "alarm":
                style = "bold red" if message["state"] == "raised" else "green"
                limit = "" if message["limit"] is None else f" (limit {message['limit']:g})"
                value = "—" if message["value"] is None else f"{message['value']}"
                self.console.print(
                    f"[{style}]ALARM {message['state']:>7}[/] {message['id']:<22} level {message['level']}  "
                    f"value {value} {message['unit']}{limit}  seq {message['seq']}"
                )
            elif leaf == "result":
                outcome = "[green]ok[/]" if message.get("ok") else f"[yellow]refused[/]: {message.get('error')}"
                self.console.print(f"[magenta]agent → platform[/] {message.get('id')} {message.get('cmd')}: {outcome}")
            elif leaf == "status":
                self.console.print(f"[cyan]status[/] online={message.get('online')}")

    def table(self) -> Table:
        table = Table(title="latest readings at the platform", show_lines=False)
        for column in ("point", "value", "unit", "quality"):
            table.add_column(column)
        with self.lock:
            for point in sorted(self.latest):
                value, quality, _ = self.latest[point]
                shown = f"{value:.3f}" if isinstance(value, float) else str(value)
                style = {"good": "green", "uncertain": "yellow", "bad": "red"}.get(quality, "")
                table.add_row(point, shown, self.units.get(point, ""), f"[{style}]{quality}[/]")
        return table


def site_duration(value: Any) -> float:
    return float(parse_duration(value))


class _Plant:
    """Every simulator the site needs, started and stopped together."""

    def __init__(self, site: AgentConfig, workdir: Path, speed: float) -> None:
        from simulators.dlt645 import Dlt645BusSimulator
        from simulators.modbus import PlantSimulator
        from simulators.modbus_rtu import RtuBusSimulator
        from simulators.opcua import OpcUaSimulator

        self.drivers = {c.id: c.driver for c in site.channels}
        used = set(self.drivers.values())
        self.tcp = PlantSimulator(site, ports={c.id: 0 for c in site.channels if c.driver == "modbus_tcp"},
                                  speed=speed) if "modbus_tcp" in used else None
        self.sims: list[Any] = [sim for sim in (
            RtuBusSimulator(site, folder=workdir, speed=speed) if used & {"modbus_rtu", "modbus_rtu_tcp"} else None,
            OpcUaSimulator(site, folder=workdir / "opcua", speed=speed) if "opcua" in used else None,
            Dlt645BusSimulator(site, folder=workdir, speed=speed) if "dlt645" in used else None,
        ) if sim is not None]
        self.overrides: dict[str, dict[str, Any]] = {}
        self.scenario_names: list[str] = []

    async def start(self) -> None:
        if self.tcp is not None:
            await self.tcp.start()
            for channel_id, port in self.tcp.ports.items():
                self.overrides[channel_id] = {"host": "127.0.0.1", "port": port}
        for sim in self.sims:
            await sim.start()
            self.overrides.update(sim.channel_overrides())

    def start_scenarios(self) -> list[asyncio.Task[None]]:
        tasks = []
        for sim in ([self.tcp] if self.tcp is not None else []) + self.sims:
            for name in sim.scenarios():
                tasks.append(sim.start_scenario(name, loop=True))
                self.scenario_names.append(name)
        return tasks

    async def stop(self) -> None:
        for sim in reversed(self.sims):
            with contextlib.suppress(Exception):
                await sim.stop()
        if self.tcp is not None:
            await self.tcp.stop()


class _PlatformDesk:
    """What an operator at the county platform does in the demo: order a shutdown, reset latched gas alarms."""

    def __init__(self, platform: Any, enterprise: str, agent: str, console: Console) -> None:
        self.platform = platform
        self.enterprise = enterprise
        self.agent = agent
        self.console = console
        self.sent = 0
        self.last_sent = 0.0

    def send(self, body: dict[str, Any]) -> None:
        self.sent += 1
        self.last_sent = time.monotonic()
        cmd_id = f"demo-{self.sent}"
        self.platform.command(self.enterprise, self.agent, {"id": cmd_id, **body})
        self.console.print(f"[magenta]platform → agent[/] {cmd_id}: {body}")

    def reset_latched(self) -> None:
        """Ask for a reset of every gas alarm still raised; the agent refuses while the gas is there."""
        states: dict[str, str] = {}
        for event in self.platform.alarms():
            states[event["id"]] = event["state"]
        answered = {r.get("id") for r in self.platform.command_results()}
        waiting = [n for n in range(1, self.sent + 1) if f"demo-{n}" not in answered]
        if waiting and time.monotonic() - self.last_sent < 15:
            return  # one round at a time; a command lost in a reconnect is given up after 15 s
        for alarm_id, state in sorted(states.items()):
            if state == "raised" and alarm_id.rsplit("/", 1)[1] in ("high", "high_high", "low", "low_low") \
                    and alarm_id.startswith("GT-"):
                self.send({"cmd": "reset", "alarm": alarm_id})


def run_demo(*, duration: float | None, broker: str | None, config_path: Path | None,
             summary_json: Path | None = None) -> bool:
    """Run the demo; True when the platform received every message the agent stored.

    With `summary_json`, the summary is also written there as one JSON object (see `_summary`).
    """
    if summary_json is not None and not summary_json.parent.is_dir():
        raise DemoError(f"--summary-json: there is no folder {summary_json.parent}")
    return asyncio.run(_demo(duration, broker, config_path or DEFAULT_CONFIG, summary_json))


async def _stop_agent(agent: asyncio.subprocess.Process) -> None:
    """Stop the agent as systemd does (SIGTERM), then give its last acknowledged messages time to arrive."""
    if agent.returncode is None:
        agent.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(agent.wait(), 30)
    except TimeoutError:
        agent.kill()
        await agent.wait()
    await asyncio.sleep(1.0)


async def _demo(duration: float | None, broker_arg: str | None, config_path: Path, summary_json: Path | None) -> bool:
    from simulators.platform import PlatformSimulator, PlatformSimulatorError

    console = Console(highlight=False)
    try:
        site = load_config(config_path)
    except ConfigError as exc:
        raise DemoError(f"{exc.source}: " + "; ".join(exc.errors)) from None
    workdir = Path(tempfile.mkdtemp(prefix="edge-agent-demo-"))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    # everything started is stopped in reverse order, whatever happens: agent, platform, plant, broker
    async with contextlib.AsyncExitStack() as started:
        # 1. the broker
        broker = await started.enter_async_context(_running_broker(broker_arg, site, workdir))
        console.print(f"[bold]broker[/]: {broker.shown} on {broker.host}:{broker.port}")

        # 2. the plant: one simulator per protocol the site uses
        speed = 1.0 if duration is None else max(1.0, LONGEST_SCENARIO / (0.6 * duration))
        plant = _Plant(site, workdir, speed)
        await plant.start()
        started.push_async_callback(plant.stop)
        for channel_id, where in plant.overrides.items():
            shown = where.get("endpoint") or (f"{where['host']}:{where['port']}" if "host" in where else where["port"])
            console.print(f"[bold]plant[/]: channel {channel_id} ({plant.drivers[channel_id]}) at {shown}")

        # 3. the agent, as the daemon runs it; the demo compresses time on both sides alike
        data = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        data["uplink"] = {**data.get("uplink", {}), "host": broker.host, "port": broker.port, "health_interval": 10,
                          "tls": None, "username": None, "password": None}
        data["store"] = {"path": str(workdir / "store.db"), "shutdown_drain": 5}
        data["control"] = {"socket": str(workdir / "control.sock")}
        for channel in data["channels"]:
            channel.update(plant.overrides.get(channel["id"], {}))
        for zone in data.get("zones", []):
            zone["duration"] = site_duration(zone.get("duration", 60.0)) / speed
        for meter in data.get("power", {}).get("meters", []):
            meter["delay"] = site_duration(meter.get("delay", 900.0)) / speed
        agent_config = workdir / "agent.yaml"
        agent_config.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
        prefix = data["uplink"].get("prefix", "edge")

        units = {p.id: p.unit for _, _, p in site.points()}
        screen = _Screen(console, units)
        # the agent's key, as install.sh makes it, registered with the platform, which verifies every message
        _, key = create_key_file(workdir)
        platform = PlatformSimulator(broker.host, broker.port, prefix, on_message=screen.on_message,
                                     agent_keys={f"{site.agent.enterprise}/{site.agent.id}":
                                                 public_key_text(key.public_key())})
        try:
            await asyncio.to_thread(platform.start)
        except PlatformSimulatorError as exc:
            raise DemoError(f"platform simulator: {exc}") from None
        started.push_async_callback(asyncio.to_thread, platform.stop)
        with open(workdir / "agent.log", "wb") as agent_log:
            agent = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "agent", "run", "--config", str(agent_config),
                stdout=agent_log, stderr=agent_log, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        started.push_async_callback(_stop_agent, agent)
        console.print(f"[bold]agent[/]: pid {agent.pid}, log {workdir / 'agent.log'}")
        scenarios = plant.start_scenarios()
        for task in scenarios:
            started.callback(task.cancel)
        console.print(f"[bold]scenarios[/]: {', '.join(plant.scenario_names)} (speed ×{speed:.1f}); "
                      + (f"stopping after {duration:g}s" if duration else "Ctrl-C to stop"))
        commands = _PlatformDesk(platform, site.agent.enterprise, site.agent.id, console)
        # the agent listens for commands once it is online
        online = await asyncio.to_thread(platform.wait_for, lambda p: any(s.get("online") for s in p.statuses()), 30)
        if online and site.power.meters:
            commands.send({"cmd": "set_production_state", "state": "halted"})  # an ordered shutdown, to be watched

        began = time.monotonic()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 10.0 if duration is None or duration > 30 else 5.0)
            if agent.returncode is not None:
                console.print(f"[red]the agent exited with code {agent.returncode}[/]; see {workdir / 'agent.log'}")
                break
            console.print(screen.table())
            commands.reset_latched()
            if duration is not None and time.monotonic() - began >= duration:
                break
    return _summary(console, platform, workdir, agent.returncode, site, broker, summary_json)


# the summary's counts: JSON key, and the words of the table on screen
_COUNTS = (
    ("stored", "messages stored by the agent (seq)"),
    ("readings", "readings received by the platform"),
    ("alarms_raised", "alarms raised"),
    ("alarms_cleared", "alarms cleared"),
    ("alarms_reset", "alarms reset by the platform"),
    ("commands_answered", "commands answered"),
    ("replayed", "messages replayed (hist)"),
    ("duplicates", "duplicates (dropped by seq)"),
    ("still_in_store", "still in the agent's store"),
    ("lost", "seq gaps (lost)"),
    ("schema_errors", "schema errors"),
    ("chain_breaks", "breaks in the agent's signed chain"),
)
LOST_SEQ_LISTED = 100


def _summary(console: Console, platform: Any, workdir: Path, agent_rc: int | None, site: AgentConfig,
             broker: _Broker, summary_json: Path | None) -> bool:
    """Print what arrived and whether anything was lost; with `summary_json`, write the same as one JSON object:
    {"ok", "broker", "agent_exit_code", "files", "counts": {key: n for each of _COUNTS},
    "valid_readings": {driver: n}, "reasons": {reason: readings not good for it}, "online": {channel/device:
    online rate over the last hour, from the last health}, "lost_seq": [the first LOST_SEQ_LISTED],
    "problems": [sentences]}.
    """
    report = platform.report()
    with Store(workdir / "store.db") as store:
        last_seq = store.last_seq()
        stored = {row.seq for row in store.fetch(0, limit=10_000_000)}
    received: set[int] = set()
    readings = raised = cleared = duplicates = hist = 0
    for agent in report.agents.values():
        readings += agent.readings
        raised += agent.alarms_raised
        cleared += agent.alarms_cleared
        duplicates += agent.duplicates
        hist += agent.hist_messages
        if agent.seq_min is not None:
            received |= set(range(agent.seq_min, agent.seq_max + 1)) - set(agent.gaps)
    lost = sorted(set(range(1, last_seq + 1)) - received - stored)
    schema_errors = platform.schema_errors()
    counts = {
        "stored": last_seq,
        "readings": readings,
        "alarms_raised": raised,
        "alarms_cleared": cleared,
        "alarms_reset": sum(1 for a in platform.alarms() if a["state"] == "reset"),
        "commands_answered": len(platform.command_results()),
        "replayed": hist,
        "duplicates": duplicates,
        "still_in_store": len(stored),
        "lost": len(lost),
        "schema_errors": len(schema_errors),
        # a link to a message still in the agent's store is no break: it is on its way
        "chain_breaks": sum(1 for f in report.chain_breaks if not (f.kind == "missing" and f.seq in stored)),
    }
    driver_of = {p.id: ch.driver for ch, _, p in site.points()}
    valid_readings = dict.fromkeys(sorted({ch.driver for ch in site.channels}), 0)
    for reading in platform.readings():
        driver = driver_of.get(reading.point)
        if driver is not None and reading.quality != "bad":
            valid_readings[driver] += 1

    # data quality as the platform saw it: why readings were not good, and each device's online rate (last hour)
    reasons: dict[str, int] = {}
    for reading in platform.readings():
        if reading.reason is not None:
            reasons[reading.reason] = reasons.get(reading.reason, 0) + 1
    reports = platform.health()
    online = {f"{d['channel']}/{d['device']}": d["hour"]["rate"] for d in reports[-1].get("online", [])} \
        if reports else {}

    problems = []
    if lost:
        problems.append(f"missing seq {lost[:10]}")
    if agent_rc != 0:
        problems.append(f"agent exit code {agent_rc}")
    if last_seq == 0:
        problems.append("the agent stored nothing")
    silent = [driver for driver, count in valid_readings.items() if count == 0]
    if silent:
        problems.append(f"no valid reading via {', '.join(silent)}")
    if schema_errors:
        problems.append(f"schema errors, e.g. {schema_errors[0]}")
    if counts["chain_breaks"]:
        problems.append(f"the agent's chain is broken, e.g. {report.chain_breaks[0].text}")

    table = Table(title="demo summary")
    table.add_column("what")
    table.add_column("count", justify="right")
    for key, words in _COUNTS:
        table.add_row(words, str(counts[key]))
    for driver, count in valid_readings.items():
        table.add_row(f"valid readings via {driver}", str(count))
    for reason, count in sorted(reasons.items()):
        table.add_row(f"readings not good: {reason}", str(count))
    for device, rate in online.items():
        table.add_row(f"online rate (last hour) {device}", "-" if rate is None else f"{rate * 100:.1f} %")
    console.print(table)
    if summary_json is not None:
        summary = {"ok": not problems, "broker": broker.name, "agent_exit_code": agent_rc, "files": str(workdir),
                   "counts": counts, "valid_readings": valid_readings, "reasons": reasons, "online": online,
                   "lost_seq": lost[:LOST_SEQ_LISTED], "problems": problems}
        try:
            summary_json.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        except OSError as exc:
            raise DemoError(f"--summary-json: cannot write {summary_json}: {exc.strerror}") from None
    if problems:
        console.print(f"[bold red]FAILED[/]: {'; '.join(problems)} (files in {workdir})")
        return False
    console.print(f"[bold green]nothing lost[/] (files in {workdir})")
    return True

"""`edge-agent demo`: a whole site on one machine — the plant simulator, a broker, the agent as its own process
and the platform simulator — with live readings and alarms on screen and a delivery summary at the end.

It never touches a real device or a remote host: everything listens on 127.0.0.1, in a temporary folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from agent.config.base import parse_duration
from agent.config.models import AgentConfig, ConfigError, load_config
from agent.store import Store

HERE = Path(__file__).resolve().parent
DEFAULT_CONFIG = HERE / "demo.yaml"
# the longest scenario (crowding in a zone) at speed 1, in seconds
LONGEST_SCENARIO = 125.0


class DemoError(Exception):
    """The demo could not be set up (no broker, a busy port, a bad site file)."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _wait_port(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection(host, port)
            writer.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise DemoError(f"nothing listens on {host}:{port} after {timeout:g}s") from None
            await asyncio.sleep(0.1)


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


def run_demo(*, duration: float | None, broker: str | None, config_path: Path | None) -> bool:
    """Run the demo; True when the platform received every message the agent stored."""
    return asyncio.run(_demo(duration, broker, config_path or DEFAULT_CONFIG))


async def _demo(duration: float | None, broker_arg: str | None, config_path: Path) -> bool:
    from simulators.platform import PlatformSimulator, PlatformSimulatorError

    console = Console(highlight=False)
    try:
        site = load_config(config_path)
    except ConfigError as exc:
        raise DemoError(f"{exc.source}: " + "; ".join(exc.errors)) from None
    workdir = Path(tempfile.mkdtemp(prefix="edge-agent-demo-"))
    children: list[asyncio.subprocess.Process] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    # 1. the broker
    if broker_arg and broker_arg != "embedded":
        host, _, port_text = broker_arg.rpartition(":")
        if not host or not port_text.isdigit():
            raise DemoError(f"--broker must be HOST:PORT, got {broker_arg!r}")
        broker_host, broker_port, broker_name = host, int(port_text), f"broker {broker_arg}"
    else:
        broker_host, broker_port = "127.0.0.1", _free_port()
        mosquitto = shutil.which("mosquitto") or next(
            (p for p in ("/usr/sbin/mosquitto",) if Path(p).exists()), None)
        log = open(workdir / "broker.log", "wb")  # noqa: SIM115
        if mosquitto and broker_arg != "embedded":
            conf = workdir / "mosquitto.conf"
            conf.write_text(f"listener {broker_port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
            cmd = [mosquitto, "-c", str(conf)]
            broker_name = "mosquitto"
        else:
            cmd = [sys.executable, "-m", "simulators.broker", "--host", "127.0.0.1", "--port", str(broker_port)]
            broker_name = "the embedded broker" + ("" if broker_arg else " (mosquitto is not installed)")
        children.append(await asyncio.create_subprocess_exec(*cmd, stdout=log, stderr=log))
    await _wait_port(broker_host, broker_port, 10)
    console.print(f"[bold]broker[/]: {broker_name} on {broker_host}:{broker_port}")

    # 2. the plant: one simulator per protocol the site uses
    speed = 1.0 if duration is None else max(1.0, LONGEST_SCENARIO / (0.6 * duration))
    plant = _Plant(site, workdir, speed)
    await plant.start()
    for channel_id, where in plant.overrides.items():
        shown = where.get("endpoint") or (f"{where['host']}:{where['port']}" if "host" in where else where["port"])
        console.print(f"[bold]plant[/]: channel {channel_id} ({plant.drivers[channel_id]}) at {shown}")

    # 3. the agent, as the daemon runs it; the demo compresses time on both sides alike
    data = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    data["uplink"] = {**data.get("uplink", {}), "host": broker_host, "port": broker_port, "health_interval": 10,
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
    platform = PlatformSimulator(broker_host, broker_port, prefix, on_message=screen.on_message)
    try:
        await asyncio.to_thread(platform.start)
    except PlatformSimulatorError as exc:
        raise DemoError(f"platform simulator: {exc}") from None
    agent_log = open(workdir / "agent.log", "wb")  # noqa: SIM115
    agent = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", "run", "--config", str(agent_config),
        stdout=agent_log, stderr=agent_log, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    console.print(f"[bold]agent[/]: pid {agent.pid}, log {workdir / 'agent.log'}")
    scenarios = plant.start_scenarios()
    console.print(f"[bold]scenarios[/]: {', '.join(plant.scenario_names)} (speed ×{speed:.1f}); "
                  + (f"stopping after {duration:g}s" if duration else "Ctrl-C to stop"))
    commands = _PlatformDesk(platform, site.agent.enterprise, site.agent.id, console)
    # the agent listens for commands once it is online
    online = await asyncio.to_thread(platform.wait_for, lambda p: any(s.get("online") for s in p.statuses()), 30)
    if online and site.power.meters:
        commands.send({"cmd": "set_production_state", "state": "halted"})  # an ordered shutdown, to be watched

    started = time.monotonic()
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 10.0 if duration is None or duration > 30 else 5.0)
            if agent.returncode is not None:
                console.print(f"[red]the agent exited with code {agent.returncode}[/]; see {workdir / 'agent.log'}")
                break
            console.print(screen.table())
            commands.reset_latched()
            if duration is not None and time.monotonic() - started >= duration:
                break
    finally:
        for task in scenarios:
            task.cancel()
        if agent.returncode is None:
            agent.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(agent.wait(), 30)
        except TimeoutError:
            agent.kill()
            await agent.wait()
        await asyncio.sleep(1.0)  # the last acknowledged messages reach the platform
        await asyncio.to_thread(platform.stop)
        await plant.stop()
        for child in children:
            if child.returncode is None:
                child.terminate()
                await child.wait()
    return _summary(console, platform, workdir, agent.returncode, site)


def _summary(console: Console, platform: Any, workdir: Path, agent_rc: int | None, site: AgentConfig) -> bool:
    report = platform.report()
    with Store(workdir / "store.db") as store:
        last_seq = store.last_seq()
        stored = {row.seq for row in store.fetch(0, limit=10_000_000)}
    received: set[int] = set()
    table = Table(title="demo summary")
    table.add_column("what")
    table.add_column("count", justify="right")
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
    rows = [
        ("messages stored by the agent (seq)", last_seq),
        ("readings received by the platform", readings),
        ("alarms raised", raised),
        ("alarms cleared", cleared),
        ("alarms reset by the platform", sum(1 for a in platform.alarms() if a["state"] == "reset")),
        ("commands answered", len(platform.command_results())),
        ("messages replayed (hist)", hist),
        ("duplicates (dropped by seq)", duplicates),
        ("still in the agent's store", len(stored)),
        ("seq gaps (lost)", len(lost)),
        ("schema errors", len(platform.schema_errors())),
    ]
    driver_of = {p.id: ch.driver for ch, _, p in site.points()}
    by_protocol = dict.fromkeys(sorted({ch.driver for ch in site.channels}), 0)
    for reading in platform.readings():
        driver = driver_of.get(reading.point)
        if driver is not None and reading.quality != "bad":
            by_protocol[driver] += 1
    rows += [(f"valid readings via {driver}", count) for driver, count in by_protocol.items()]
    for what, count in rows:
        table.add_row(what, str(count))
    console.print(table)
    silent = [driver for driver, count in by_protocol.items() if count == 0]
    ok = not lost and agent_rc == 0 and last_seq > 0 and not platform.schema_errors() and not silent
    if ok:
        console.print(f"[bold green]nothing lost[/] (files in {workdir})")
    else:
        why = []
        if lost:
            why.append(f"missing seq {lost[:10]}")
        if agent_rc != 0:
            why.append(f"agent exit code {agent_rc}")
        if last_seq == 0:
            why.append("the agent stored nothing")
        if silent:
            why.append(f"no valid reading via {', '.join(silent)}")
        if platform.schema_errors():
            why.append(f"schema errors, e.g. {platform.schema_errors()[0]}")
        console.print(f"[bold red]FAILED[/]: {'; '.join(why)} (files in {workdir})")
    return ok

"""The platform's broker as docs/operations.md sets it up: a real mosquitto with the documented configuration and
ACL (read from the document, so the two cannot drift apart), where an agent publishes only under its own root and
reads only its own commands, and the agent itself runs under that ACL.

Every refusal is shown against a positive control: the allowed message sent after the refused one arrives, the
refused one never does (the broker hands one publisher's messages on in order).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import pytest
from conftest import ROOT, Mosquitto, free_port, now_ms, wait_port, wait_until
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

DOC = ROOT / "docs" / "operations.md"
PREFIX = "hjq"
AGENT_A = ("150625000123", "ipc-01")
AGENT_B = ("150625000456", "ipc-01")  # the same agent id in another enterprise
AGENT_LEAVES = ("data", "alarm", "status", "health", "cmd/result", "config/result")
TIMEOUT = 10.0


def account(agent: tuple[str, str]) -> str:
    return f"{agent[0]}-{agent[1]}"


def root(agent: tuple[str, str]) -> str:
    return f"{PREFIX}/{agent[0]}/{agent[1]}"


def doc_example(name: str) -> str:
    """The fenced block between `<!-- example: NAME -->` and `<!-- /example -->` in docs/operations.md."""
    match = re.search(rf"<!-- example: {re.escape(name)} -->\s*```[a-z]*\n(.*?)```\s*<!-- /example -->",
                      DOC.read_text(encoding="utf-8"), re.DOTALL)
    assert match, f"docs/operations.md lost its example block {name!r}"
    return match.group(1)


def make_certificates(folder: Path, names: list[str]) -> None:
    """A CA, the broker's certificate for 127.0.0.1, and one client certificate per name (CN = the name)."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)

    key = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=platform test CA")
    (folder / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, ext in [("server", ["-extfile", "server.ext"]), *((n, []) for n in names)]:
        cn = "localhost" if name == "server" else name
        openssl("req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "2", *ext)


@dataclass
class SecuredBroker:
    """mosquitto with the documented listener and ACL on `port`; `identity` is how accounts prove who they are."""

    port: int
    identity: str  # "password" or "certificate"
    certs: Path
    passwords: dict[str, str]

    def client(self, name: str, protocol: int = mqtt.MQTTv5) -> Client:
        return Client(self, name, protocol)

    def agent_uplink(self, name: str) -> dict[str, Any]:
        """The agent's `uplink` settings for this broker, as the document tells a site to write them."""
        tls: dict[str, Any] = {"ca": str(self.certs / "ca.pem")}
        if self.identity == "certificate":
            return {"port": self.port, "protocol": "5",
                    "tls": {**tls, "cert": str(self.certs / f"{name}.pem"), "key": str(self.certs / f"{name}.key")}}
        return {"port": self.port, "protocol": "5", "tls": tls, "username": name, "password": self.passwords[name]}


class Client:
    """One account's paho client on the secured listener: what it received, and the broker's answers."""

    def __init__(self, broker: SecuredBroker, name: str, protocol: int) -> None:
        self.name = name
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{name}-{uuid.uuid4().hex[:8]}",
                                  protocol=protocol)
        if broker.identity == "certificate":
            self.client.tls_set(ca_certs=str(broker.certs / "ca.pem"), certfile=str(broker.certs / f"{name}.pem"),
                                keyfile=str(broker.certs / f"{name}.key"))
        else:
            self.client.tls_set(ca_certs=str(broker.certs / "ca.pem"))
            self.client.username_pw_set(name, broker.passwords[name])
        self.lock = threading.Lock()
        self.messages: list[tuple[str, bytes]] = []
        self.acks: dict[int, list[ReasonCode]] = {}
        self.connected = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: rc.is_failure or self.connected.set()
        self.client.on_message = self._on_message
        self.client.on_publish = lambda c, u, mid, rc, p: self._acked(mid, [rc])
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self._acked(mid, list(rcs))
        self.client.connect("127.0.0.1", broker.port, keepalive=30)
        self.client.loop_start()
        if not self.connected.wait(TIMEOUT):
            self.close()
            pytest.fail(f"{name} could not connect to the secured listener")

    def _on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append((message.topic, bytes(message.payload)))

    def _acked(self, mid: int, codes: list[ReasonCode]) -> None:
        with self.lock:
            self.acks[mid] = codes

    def _answer(self, mid: int, what: str) -> list[ReasonCode]:
        wait_until(lambda: mid in self.acks, TIMEOUT, f"the broker's answer to {self.name}'s {what}")
        with self.lock:
            return self.acks.pop(mid)

    def publish(self, topic: str, payload: bytes) -> ReasonCode:
        """Publish at QoS 1 and return the broker's PUBACK reason code."""
        info = self.client.publish(topic, payload, qos=1)
        return self._answer(info.mid, f"publish on {topic}")[0]

    def subscribe(self, topic: str) -> ReasonCode:
        """Subscribe at QoS 1 and return the broker's SUBACK reason code."""
        _, mid = self.client.subscribe(topic, qos=1)
        assert mid is not None
        return self._answer(mid, f"subscription to {topic}")[0]

    def received(self, topic: str) -> list[bytes]:
        with self.lock:
            return [payload for t, payload in self.messages if t == topic]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture(params=["password", "certificate"])
def secured(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SecuredBroker]:
    """mosquitto with the document's configuration and ACL, paths moved into tmp_path, on a free loopback port."""
    if not (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()):
        pytest.fail("mosquitto is not installed: run the README's test command, which installs it")
    identity = str(request.param)
    names = ["platform", account(AGENT_A), account(AGENT_B)]
    (tmp_path / "certs").mkdir()
    make_certificates(tmp_path / "certs", names if identity == "certificate" else [])
    passwords = {name: f"pw-{uuid.uuid4().hex[:12]}" for name in names}
    if identity == "password":
        passwd = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
        for i, name in enumerate(names):
            subprocess.run([passwd, *(["-c"] if i == 0 else []), "-b", str(tmp_path / "passwd"), name,
                            passwords[name]], check=True, capture_output=True, timeout=30)
    (tmp_path / "acl").write_text(doc_example("mosquitto acl"))
    conf = doc_example("mosquitto.conf with passwords" if identity == "password"
                       else "mosquitto.conf with client certificates")
    port = free_port()
    conf = conf.replace("/etc/mosquitto/", f"{tmp_path}/").replace("listener 8883\n", f"listener {port} 127.0.0.1\n")
    broker = Mosquitto(tmp_path, listeners=conf).start()
    try:
        wait_port(port)
        yield SecuredBroker(port, identity, tmp_path / "certs", passwords)
    finally:
        broker.stop()


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    opened: list[Client] = []
    yield opened
    for client in opened:
        client.close()


def test_the_documented_generator_writes_the_documented_acl(tmp_path: Path) -> None:
    acl = doc_example("mosquitto acl")
    platform_part = acl[:acl.index("\n# agent ")]
    (tmp_path / "acl").write_text(platform_part)
    (tmp_path / "agents.txt").write_text("".join(f"{e} {a}\n" for e, a in (AGENT_A, AGENT_B)))
    script = doc_example("mosquitto acl generator").replace("/etc/mosquitto/", f"{tmp_path}/")
    subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, check=True, timeout=30)
    assert (tmp_path / "acl").read_text() == acl


def test_an_agent_publishes_under_its_own_root(secured: SecuredBroker, clients: list[Client]) -> None:
    platform = secured.client("platform")
    clients.append(platform)
    assert not platform.subscribe(f"{PREFIX}/#").is_failure
    agent = secured.client(account(AGENT_A))
    clients.append(agent)
    for leaf in AGENT_LEAVES:
        code = agent.publish(f"{root(AGENT_A)}/{leaf}", leaf.encode())
        assert not code.is_failure, f"{leaf}: {code}"
    for leaf in AGENT_LEAVES:
        wait_until(lambda leaf=leaf: platform.received(f"{root(AGENT_A)}/{leaf}") == [leaf.encode()], TIMEOUT,
                   f"the agent's {leaf} at the platform")


@pytest.mark.parametrize("protocol", [mqtt.MQTTv311, mqtt.MQTTv5], ids=["mqtt3.1.1", "mqtt5"])
def test_an_agent_cannot_publish_into_another_agents_root(
    secured: SecuredBroker, clients: list[Client], protocol: int
) -> None:
    platform = secured.client("platform")
    clients.append(platform)
    assert not platform.subscribe(f"{PREFIX}/#").is_failure
    intruder = secured.client(account(AGENT_A), protocol)
    clients.append(intruder)
    topic = f"{root(AGENT_B)}/alarm"
    code = intruder.publish(topic, b"forged")
    if protocol == mqtt.MQTTv5:
        # what makes the agent keep a refused message (agent/uplink/session.py)
        assert code.is_failure and code.getName() == "Not authorized", code
    else:
        # MQTT 3.1.1 cannot say it: acknowledged like a delivered message (why the document asks for MQTT 5)
        assert not code.is_failure, code
    owner = secured.client(account(AGENT_B), protocol)
    clients.append(owner)
    assert not owner.publish(topic, b"genuine").is_failure
    wait_until(lambda: platform.received(topic) != [], TIMEOUT, "the owner's own alarm at the platform")
    assert platform.received(topic) == [b"genuine"]


def test_an_agent_cannot_send_commands_to_another_agent(secured: SecuredBroker, clients: list[Client]) -> None:
    target = secured.client(account(AGENT_B))
    clients.append(target)
    topic = f"{root(AGENT_B)}/cmd"
    assert not target.subscribe(topic).is_failure
    intruder = secured.client(account(AGENT_A))
    clients.append(intruder)
    assert intruder.publish(topic, b'{"cmd": "reset", "forged": true}').is_failure
    platform = secured.client("platform")
    clients.append(platform)
    assert not platform.publish(topic, b'{"cmd": "status"}').is_failure
    wait_until(lambda: target.received(topic) != [], TIMEOUT, "the platform's command at its agent")
    assert target.received(topic) == [b'{"cmd": "status"}']


def test_an_agent_cannot_read_another_agents_commands(secured: SecuredBroker, clients: list[Client]) -> None:
    owner = secured.client(account(AGENT_B))
    clients.append(owner)
    assert not owner.subscribe(f"{root(AGENT_B)}/cmd").is_failure
    spy = secured.client(account(AGENT_A))
    clients.append(spy)
    # mosquitto's acl_file grants any subscription and checks each message as it hands it on: what counts is
    # that nothing reaches the spy that the ACL does not let it read
    spy.subscribe(f"{root(AGENT_B)}/cmd")
    spy.subscribe(f"{PREFIX}/#")
    assert not spy.subscribe(f"{root(AGENT_A)}/cmd").is_failure
    platform = secured.client("platform")
    clients.append(platform)
    assert not platform.publish(f"{root(AGENT_B)}/cmd", b"for B").is_failure
    assert not platform.publish(f"{root(AGENT_A)}/cmd", b"for A").is_failure
    wait_until(lambda: owner.received(f"{root(AGENT_B)}/cmd") == [b"for B"], TIMEOUT, "B's command at B")
    wait_until(lambda: spy.received(f"{root(AGENT_A)}/cmd") != [], TIMEOUT, "A's own command at A")
    # one copy per matching subscription (hjq/# and its own cmd), all of them its own
    assert set(spy.messages) == {(f"{root(AGENT_A)}/cmd", b"for A")}, spy.messages


@pytest.mark.timeout(90)
def test_the_agent_runs_under_the_documented_acl(
    secured: SecuredBroker, clients: list[Client], tmp_path: Path, agent_process: Any
) -> None:
    """Everything the agent sends passes the ACL: status, its readings, an alarm, health, a command's result."""
    platform = secured.client("platform")
    clients.append(platform)
    assert not platform.subscribe(f"{PREFIX}/#").is_failure
    enterprise, agent_id = AGENT_A
    nothing_there = free_port()  # the device never answers: bad readings and a comm_loss alarm, never silence
    agent = agent_process({
        "agent": {"id": agent_id, "enterprise": enterprise},
        "uplink": {"host": "127.0.0.1", "prefix": PREFIX, "health_interval": 1, "reconnect_min": 0.2,
                   "reconnect_max": 1, "batch": {"max_delay": 0.3}, **secured.agent_uplink(account(AGENT_A))},
        "store": {"path": str(tmp_path / "store.db"), "shutdown_drain": 2},
        "control": {"socket": str(tmp_path / "control.sock")},
        "channels": [{"id": "c1", "driver": "modbus_tcp", "host": "127.0.0.1", "port": nothing_there,
                      "devices": [{"id": "d1", "interval": 0.3, "timeout": 0.2, "comm_loss": 1, "backoff_max": 0.5,
                                   "points": [{"id": "LT-1", "address": 0, "type": "float32", "unit": "m"}]}]}],
    }).start()
    mine = root(AGENT_A)

    def last(leaf: str) -> dict[str, Any] | None:
        got = platform.received(f"{mine}/{leaf}")
        return orjson.loads(got[-1]) if got else None

    for leaf in ("status", "data", "alarm", "health"):
        wait_until(lambda leaf=leaf: last(leaf) is not None, 30,
                   f"the agent's {leaf} at the platform (its log: {agent.log_path})")
    status = last("status")
    assert status is not None and status["online"] is True
    # the agent subscribes to its commands before it sends readings or health, so it listens by now; the command
    # is sent again (same id, answered once) should the agent have been reconnecting at that moment
    command = orjson.dumps({"v": 1, "id": "acl-1", "cmd": "status", "ts": now_ms()})

    def answered() -> bool:
        return any(orjson.loads(p).get("id") == "acl-1" for p in platform.received(f"{mine}/cmd/result"))

    for _attempt in range(15):
        assert not platform.publish(f"{mine}/cmd", command).is_failure
        wait_for = time.monotonic() + 2
        while not answered() and time.monotonic() < wait_for:
            time.sleep(0.05)
        if answered():
            break
    else:
        pytest.fail(f"no result of the command at the platform in 30 s\n{agent.log()[-2000:]}")
    seen = len(platform.received(f"{mine}/health"))
    wait_until(lambda: len(platform.received(f"{mine}/health")) > seen, 30, "a health report after the command")
    health = last("health")
    assert health is not None and health["counters"]["refused"] == 0, health
    assert agent.stop() == 0

"""OPC UA plant simulator: an asyncua server that looks like a personnel-location system (zone head counts) and a
DCS (temperatures, pressures, levels), with security, users, bad statuses, a wrong clock, restarts and scripted
scenarios.

It serves the nodes of every `opcua` channel of a configuration, or a fixed address space on its own. Clients may
read, browse and subscribe but never write: values change only through this module's own API.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import ipaddress
import json
import logging
import math
import random
import socket
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from asyncua import ua
from asyncua.common.utils import ServiceError
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.server import Server
from asyncua.server.user_managers import UserManager
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.object_ids import ObjectIds
from asyncua.ua.status_codes import StatusCodes
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.config.loader import load_config
from agent.config.models import AgentConfig
from agent.drivers.opcua.driver import CLIENT_URI, OpcUaChannel, OpcUaPoint
from simulators.plant import Done, Plant, add_arguments, run_command, serve_until_stopped
from simulators.scenario import ramp

log = logging.getLogger("simulators.opcua")  # not __main__ when run with -m

SERVER_URI = "urn:edge-agent:simulator"
SCENARIOS = ("crowding", "process_upset")
PULL = 0.05
"""Share of the distance to the band's centre a walked value recovers each tick (mean reversion)."""

Kind = Literal["int", "float", "bool", "str"]
Status = Literal["good", "uncertain", "bad"]
_VARIANT: dict[str, ua.VariantType] = {"int": ua.VariantType.Int32, "float": ua.VariantType.Double,
                                       "bool": ua.VariantType.Boolean, "str": ua.VariantType.String}
_DATA_TYPE = {"int": ObjectIds.Int32, "float": ObjectIds.Double, "bool": ObjectIds.Boolean, "str": ObjectIds.String}
_STATUS = {"good": StatusCodes.Good, "uncertain": StatusCodes.UncertainLastUsableValue,
           "bad": StatusCodes.BadSensorFailure}


# --- certificates --------------------------------------------------------------------------------------


def make_certificate(
    cert_path: Path,
    key_path: Path,
    *,
    uri: str,
    common_name: str,
    server: bool,
    hostnames: Iterable[str] = (),
    days: int = 3650,
) -> tuple[Path, Path]:
    """Write a self-signed OPC UA application instance certificate (RSA 2048, SHA-256) and its key.

    The certificate is DER when `cert_path` ends in .der, PEM otherwise; the key is PEM (PKCS#8). The subject
    alternative name carries `uri` (OPC UA peers check it against the application URI) and the host names.
    """
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    names = list(dict.fromkeys(["localhost", socket.gethostname(), *hostnames]))
    alt: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri), *(x509.DNSName(n) for n in names)]
    alt.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edge-agent")])
    now = dt.datetime.now(dt.UTC)
    usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH] if server \
        else [ExtendedKeyUsageOID.CLIENT_AUTH]
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=True, key_encipherment=True,
                                     data_encipherment=True, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    encoding = serialization.Encoding.DER if cert_path.suffix.lower() == ".der" else serialization.Encoding.PEM
    cert_path.write_bytes(cert.public_bytes(encoding))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


def client_certificate(folder: Path, name: str = "client", uri: str = CLIENT_URI) -> tuple[Path, Path]:
    """A client certificate and key in `folder` (`{name}-cert.pem`, `{name}-key.pem`), made once and then reused."""
    cert, key = folder / f"{name}-cert.pem", folder / f"{name}-key.pem"
    if not (cert.exists() and key.exists()):
        make_certificate(cert, key, uri=uri, common_name=f"edge-agent {name}", server=False)
    return cert, key


def _certificate_der(path: Path) -> bytes:
    raw = path.read_bytes()
    cert = x509.load_pem_x509_certificate(raw) if b"-----BEGIN" in raw else x509.load_der_x509_certificate(raw)
    return cert.public_bytes(serialization.Encoding.DER)


# --- the served address space --------------------------------------------------------------------------


@dataclass(eq=False)
class _Node:
    """One variable: its id, where it hangs, and the value the simulator serves."""

    nodeid: str
    name: str
    folder: tuple[str, ...]
    kind: Kind
    value: Any
    low: float = 0.0
    high: float = 0.0
    limits: tuple[float | None, float | None, float] = (None, None, 0.0)
    """(high, high_high, deadband) of the point, for scenarios."""
    domain: str = "hazard"
    walk: bool = True
    state: float = 0.0
    held: bool = False
    status: Status = "good"
    served_kind: Kind | None = None
    """The kind the server's variable has now (None before it exists)."""
    stamp: dt.datetime | None = None
    """Source timestamp of the value last written to the server."""

    def sample(self, rnd: Callable[[], float]) -> None:
        """One step of a bounded, mean-reverting random walk inside [low, high]."""
        if self.held or not self.walk or self.kind in ("bool", "str"):
            return
        center, half = (self.low + self.high) / 2, (self.high - self.low) / 2
        # with noise at most ±step/2 and PULL of the gap recovered per tick, |x - center| <= half forever
        self.state += PULL * (center - self.state) + 2 * PULL * half * (rnd() - 0.5)
        self.value = round(self.state) if self.kind == "int" else self.state


def _band(point: OpcUaPoint) -> tuple[float, float]:
    """The band a point wanders in when nothing happens: inside its range and below its first limits."""
    low, high = point.range if point.range is not None else (0.0, 100.0)
    limits = point.limits
    if limits is not None:
        low_limit = limits.low if limits.low is not None else limits.low_low
        high_limit = limits.high if limits.high is not None else limits.high_high
        if low_limit is not None:
            low = max(low, low_limit + limits.deadband)
        if high_limit is not None:
            high = min(high, high_limit - limits.deadband)
            if point.domain == "personnel":  # crowds are rare: a zone mostly holds a fraction of its limit
                low, high = max(low, 0.1 * high_limit), min(high, 0.6 * high_limit)
    if low >= high:
        low, high = high - 1.0, high
    width = high - low
    return low + 0.2 * width, low + 0.8 * width


_ZONES = (("1", "1#反应区", 10), ("2", "罐区", 8), ("3", "装卸区", 12), ("4", "中控室", 15))
_DCS = (
    # numeric id, tag, name, unit, band, high, high_high
    (1001, "TI-101", "1#反应釜温度", "°C", (78.0, 86.0), 95.0, 105.0),
    (1002, "PI-101", "1#反应釜压力", "MPa", (0.42, 0.58), 0.8, 0.95),
    (1003, "LI-101", "1#储罐液位", "m", (4.0, 6.0), 8.5, 9.2),
    (1004, "TI-102", "2#反应釜温度", "°C", (60.0, 70.0), 85.0, 95.0),
    (1005, "FI-101", "进料流量", "m³/h", (11.0, 14.0), 20.0, 24.0),
)


def default_nodes() -> list[_Node]:
    """The address space served stand-alone: four personnel zones and a small DCS unit, all in ns=2."""
    nodes: list[_Node] = []
    for zone, name, limit in _ZONES:
        folder = ("PersonnelLocation", f"Zone.{zone}")
        count = _Node(f"ns=2;s=Zone.{zone}.HeadCount", "HeadCount", folder, "int", 0, low=0.1 * limit,
                      high=0.6 * limit, limits=(float(limit), None, 0.0), domain="personnel")
        nodes.append(count)
        nodes.append(_Node(f"ns=2;s=Zone.{zone}.Limit", "Limit", folder, "int", limit, walk=False))
        nodes.append(_Node(f"ns=2;s=Zone.{zone}.Name", "Name", folder, "str", name, walk=False))
    nodes.append(_Node("ns=2;s=Site.HeadCount", "HeadCount", ("PersonnelLocation",), "int", 0, walk=False))
    for number, tag, _name, _unit, (low, high), hi, hihi in _DCS:
        nodes.append(_Node(f"ns=2;i={number}", tag, ("DCS",), "float", (low + high) / 2, low=low, high=high,
                           limits=(hi, hihi, 0.0)))
    nodes.append(_Node("ns=2;i=1010", "P-101.Running", ("DCS",), "bool", True, walk=False))
    return nodes


def _raw(point: OpcUaPoint, value: float) -> float:
    """An engineering value of `point` as the server holds it (before the agent's scale and offset)."""
    if point.scale == 0 or (point.scale, point.offset) == (1.0, 0.0):
        return value
    return (value - point.offset) / point.scale


def _canonical(node: str) -> str:
    return str(ua.NodeId.from_string(node).to_string())


def _standard(identifier: int) -> ua.NodeId:
    """The node id of a standard node (namespace 0), e.g. a data type."""
    return ua.NodeId(ua.Int32(identifier), ua.Int16(0))


def _status(code: int) -> ua.StatusCode:
    return ua.StatusCode(ua.UInt32(code))


class _Users(UserManager):
    """asyncua's user manager: the configured users with their passwords, and anonymous unless refused."""

    def __init__(self, users: dict[str, str], anonymous: bool) -> None:
        self.users = users
        self.anonymous = anonymous

    def get_user(self, iserver: Any, username: str | None = None, password: str | None = None,
                 certificate: Any = None) -> User | None:
        if username is None:
            return User(role=UserRole.User) if self.anonymous else None
        if self.users.get(username) == password:
            return User(role=UserRole.User, name=username)
        return None


# --- the simulator -------------------------------------------------------------------------------------


class OpcUaSimulator(Plant):
    """An OPC UA server on `host:port` (0 picks a free port, kept across restarts) at `path`.

    With a configuration it serves a variable for every node of its `opcua` channels (integers for the personnel
    domain, doubles otherwise); without one, `default_nodes()`. Endpoints: None (unless `allow_none` is False) and
    Basic256Sha256 Sign and SignAndEncrypt with a certificate made in `folder` at the first start. Logins: the
    configuration's usernames and `users`, and anonymous unless `anonymous` is False. `trusted`, when given, lists
    the only client certificates accepted (others get BadCertificateUntrusted); when None any client certificate is.
    `stop` drops every connection and the port refuses; `start` listens again on the same port, values and statuses
    kept.
    """

    SCENARIOS = SCENARIOS
    WALK_TASK = "opcua walk"

    def __init__(
        self,
        config: AgentConfig | None,
        *,
        folder: Path,
        port: int = 0,
        host: str = "127.0.0.1",
        path: str = "/edge",
        allow_none: bool = True,
        users: dict[str, str] | None = None,
        anonymous: bool = True,
        trusted: Iterable[Path] | None = None,
        period: float = 1.0,
        speed: float = 1.0,
        seed: int | None = None,
    ) -> None:
        super().__init__(period=period, speed=speed)
        self.config = config
        self.folder = Path(folder)
        self.host = host
        self.port = port
        self.path = path if path.startswith("/") or not path else f"/{path}"
        self.allow_none = allow_none
        self.anonymous = anonymous
        self.users = dict(users or {})
        self.trusted = None if trusted is None else list(trusted)
        self.changes: list[tuple[str, Any]] = []
        """(node id, value) of every set_value, scenarios included, in order."""
        self._rng = random.Random(seed)
        self._nodes: dict[str, _Node] = {}
        self._points: dict[str, tuple[_Node, OpcUaPoint]] = {}
        self._channels: list[OpcUaChannel] = []
        self._server: Server | None = None
        self._trusted_der: set[bytes] = set()
        self.clock_offset = dt.timedelta(0)
        """How far the server's clock is off: added to the source and server timestamps of every value written."""
        if config is None:
            for node in default_nodes():
                self._nodes[node.nodeid] = node
        else:
            self._from_config(config)
        for node in self._nodes.values():
            node.state = float(node.value) if node.kind in ("int", "float") else 0.0
            if node.walk and node.kind in ("int", "float"):
                node.state = self._rng.uniform(node.low, node.high)
                node.value = round(node.state) if node.kind == "int" else node.state
        self._site_total()

    def _from_config(self, config: AgentConfig) -> None:
        for channel in config.channels:
            if not isinstance(channel, OpcUaChannel):
                continue
            self._channels.append(channel)
            if channel.username is not None:
                self.users.setdefault(channel.username, channel.password or "")
            for device in channel.devices:
                for point in device.points:
                    key = _canonical(point.node)
                    node = self._nodes.get(key)
                    if node is None:
                        # the server holds raw values: engineering = raw * scale + offset happens in the agent
                        low, high = sorted(_raw(point, v) for v in _band(point))
                        node = _Node(key, point.id, (channel.id, device.id),
                                     "int" if point.domain == "personnel" else "float", 0, low=low, high=high,
                                     domain=point.domain)
                        limits = point.limits
                        if limits is not None:
                            first, second = (None if v is None else _raw(point, v)
                                             for v in (limits.high, limits.high_high))
                            node.limits = (first, second, limits.deadband / abs(point.scale or 1.0))
                        self._nodes[key] = node
                    self._points[point.id] = (node, point)
        for zone in config.zones:  # a quiet zone holds well under its crowding limit
            served = self._points.get(zone.head_count)
            if served is not None:
                served[0].low, served[0].high = 0.1 * zone.limit, 0.7 * zone.limit

    # --- lifecycle ---

    @property
    def endpoint(self) -> str:
        """The endpoint URL clients use (the real port once started)."""
        return f"opc.tcp://{self.host}:{self.port}{self.path}"

    @property
    def server_certificate(self) -> Path:
        return self.folder / "server-cert.der"

    @property
    def server_key(self) -> Path:
        return self.folder / "server-key.pem"

    def client_certificate(self, name: str = "client") -> tuple[Path, Path]:
        """A client certificate and key in the simulator's folder, for the agent, the probe or a test."""
        return client_certificate(self.folder, name)

    def channel_overrides(self) -> dict[str, dict[str, Any]]:
        """Per `opcua` channel id, the config fields the agent must use to reach this simulator."""
        out: dict[str, dict[str, Any]] = {}
        for channel in self._channels:
            fields: dict[str, Any] = {"endpoint": self.endpoint}
            if channel.security != "None":
                cert, key = self.client_certificate()
                fields.update(certificate=str(cert), private_key=str(key),
                              server_certificate=str(self.server_certificate))
            out[channel.id] = fields
        return out

    async def _open(self) -> None:
        """Listen (again, on the same port after a stop); values and statuses survive a restart."""
        if self.port == 0:
            with socket.socket() as sock:
                sock.bind((self.host, 0))
                self.port = int(sock.getsockname()[1])
        if not (self.server_certificate.exists() and self.server_key.exists()):
            await asyncio.to_thread(make_certificate, self.server_certificate, self.server_key, uri=SERVER_URI,
                                    common_name="edge-agent OPC UA simulator", server=True, hostnames=[self.host])
        if self.trusted is not None:
            self._trusted_der = {await asyncio.to_thread(_certificate_der, p) for p in self.trusted}
        server = await self._build()
        try:
            await server.start()
        except OSError as exc:
            raise OSError(f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from None
        self._server = server
        log.info("listening on %s", self.endpoint)

    async def _close(self) -> None:
        """Stop serving: every connection drops and the port refuses."""
        server, self._server = self._server, None
        if server is not None:
            await server.stop()
            log.info("stopped %s", self.endpoint)

    @property
    def running(self) -> bool:
        return self._server is not None

    async def _build(self) -> Server:
        server = Server(user_manager=_Users(self.users, self.anonymous))
        await server.init()
        server.disable_clock()  # its task makes stop() wait up to a second; the walk keeps the time instead
        server.set_endpoint(self.endpoint)
        server.set_server_name("edge-agent OPC UA plant simulator")
        server.product_uri = "urn:edge-agent:simulator"
        await server.set_application_uri(SERVER_URI)
        policies = [ua.SecurityPolicyType.Basic256Sha256_Sign, ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt]
        if self.allow_none:
            policies.insert(0, ua.SecurityPolicyType.NoSecurity)
        server.set_security_policy(policies)
        server.set_identity_tokens([ua.AnonymousIdentityToken, ua.UserNameIdentityToken])
        await server.load_certificate(str(self.server_certificate))
        await server.load_private_key(str(self.server_key))
        if self.trusted is not None:
            server.set_certificate_validator(self._check_client)
        top = max((ua.NodeId.from_string(n).NamespaceIndex for n in self._nodes), default=2)
        for index in range(2, top + 1):
            await server.register_namespace(f"urn:edge-agent:simulator:ns{index}")
        folders: dict[tuple[str, ...], Any] = {(): server.nodes.objects}
        for node in self._nodes.values():
            parent = folders[()]
            for depth in range(1, len(node.folder) + 1):
                path = node.folder[:depth]
                if path not in folders:
                    folder_id = ua.NodeId(ua.String("edge-sim:" + "/".join(path)), ua.Int16(1))
                    folders[path] = await parent.add_folder(folder_id, ua.QualifiedName(path[-1], 1))
                parent = folders[path]
            nodeid = ua.NodeId.from_string(node.nodeid)
            await parent.add_variable(nodeid, ua.QualifiedName(node.name, nodeid.NamespaceIndex),
                                      ua.Variant(node.value, _VARIANT[node.kind]),
                                      datatype=_standard(_DATA_TYPE[node.kind]))
            node.served_kind = node.kind
            datavalue = self._datavalue(node)
            await server.write_attribute_value(nodeid, datavalue)
            node.stamp = datavalue.SourceTimestamp
        return server

    async def _check_client(self, cert: x509.Certificate, app: ua.ApplicationDescription) -> None:
        if cert.public_bytes(serialization.Encoding.DER) not in self._trusted_der:
            log.info("refused untrusted client certificate %s", cert.subject.rfc4514_string())
            raise ServiceError(StatusCodes.BadCertificateUntrusted)

    # --- values ---

    def _node(self, key: str) -> _Node:
        served = self._points.get(key)
        if served is not None:
            return served[0]
        try:
            node = self._nodes.get(_canonical(key))
        except Exception:
            node = None
        if node is None:
            raise ValueError(f"no point or node {key!r} is served")
        return node

    def nodes(self) -> list[str]:
        """Every served variable's node id."""
        return list(self._nodes)

    def _now(self) -> ua.DateTime:
        return ua.DateTime.now(dt.UTC) + self.clock_offset

    def _datavalue(self, node: _Node) -> ua.DataValue:
        now = self._now()
        value = node.value
        if node.kind == "int":
            value = int(value)
        elif node.kind == "float":
            value = float(value)
        return ua.DataValue(ua.Variant(value, _VARIANT[node.kind]), _status(_STATUS[node.status]),
                            SourceTimestamp=now, ServerTimestamp=now)

    async def _write(self, node: _Node) -> None:
        server = self._server
        if server is None:
            return
        nodeid = ua.NodeId.from_string(node.nodeid)
        if node.served_kind != node.kind:
            # a variable refuses a value of another type; a bad write empties it so its new DataType applies
            await server.write_attribute_value(nodeid, ua.DataValue(ua.Variant(_standard(_DATA_TYPE[node.kind]))),
                                               AttributeIds.DataType)
            await server.write_attribute_value(
                nodeid, ua.DataValue(StatusCode=_status(StatusCodes.BadWaitingForInitialData)))
            node.served_kind = node.kind
        datavalue = self._datavalue(node)
        await server.write_attribute_value(nodeid, datavalue)
        node.stamp = datavalue.SourceTimestamp

    def _schedule(self, node: _Node) -> Awaitable[None]:
        if self._server is None:
            return Done()
        return self._own(asyncio.get_running_loop().create_task(self._write(node), name=f"opcua write {node.nodeid}"))

    def set_value(self, key: str, value: float | bool | str) -> Awaitable[None]:
        """Serve `value` at a point (by id, in its engineering unit) or a node (by id, as the raw server value) and
        hold it until `release`; await the result to know it is written. A number on an integer node is rounded;
        a bool or a str changes the variable's type."""
        node = self._node(key)
        served = self._points.get(key)
        if served is not None and isinstance(value, int | float) and not isinstance(value, bool):
            value = _raw(served[1], value)
            if node.kind == "int" and abs(value - round(value)) < 1e-9:
                value = round(value)
        if isinstance(value, bool):
            node.kind = "bool"
        elif isinstance(value, str):
            node.kind = "str"
        elif isinstance(value, int | float):
            if node.kind in ("bool", "str"):
                node.kind = "int" if isinstance(value, int) else "float"
            value = round(value) if node.kind == "int" else float(value)
            node.state = float(value)
        else:
            raise ValueError(f"cannot serve {value!r}: give a number, a bool or a str")
        node.value = value
        node.held = True
        self.changes.append((node.nodeid, value))
        if node.domain == "personnel":
            self._site_total()
        return self._schedule(node)

    def value(self, key: str) -> Any:
        """The value served now at a point (in its engineering unit) or a node (raw)."""
        node = self._node(key)
        served = self._points.get(key)
        if served is not None and node.kind in ("int", "float"):
            point = served[1]
            return node.value * point.scale + point.offset if (point.scale, point.offset) != (1.0, 0.0) \
                else node.value
        return node.value

    def set_clock(self, offset: float) -> None:
        """Run the server's clock `offset` seconds ahead (negative: behind) of the real time, as a DCS whose clock
        was set wrong or stepped back; values written from now on carry it. 0 puts the clock right again."""
        self.clock_offset = dt.timedelta(seconds=offset)

    def source_timestamp(self, key: str) -> dt.datetime | None:
        """The source timestamp the server holds for a point or node (None before the first write)."""
        return self._node(key).stamp

    def release(self, key: str) -> None:
        """Let a held value walk again, from where it is."""
        self._node(key).held = False

    def set_status(self, key: str, status: Status) -> Awaitable[None]:
        """Serve a point or node with status good, uncertain (UncertainLastUsableValue) or bad (BadSensorFailure)."""
        if status not in _STATUS:
            raise ValueError(f"status must be one of {', '.join(_STATUS)}, not {status!r}")
        node = self._node(key)
        node.status = status
        return self._schedule(node)

    def walk(self) -> None:
        """Move every walked value one step (held ones stay)."""
        rnd = self._rng.random
        for node in self._nodes.values():
            node.sample(rnd)
        self._site_total()

    def _site_total(self) -> None:
        site = self._nodes.get("ns=2;s=Site.HeadCount")
        if site is not None and not site.held:
            site.value = sum(int(n.value) for n in self._nodes.values()
                             if n.nodeid.endswith(".HeadCount") and n is not site and n.kind == "int")

    async def _tick(self, elapsed: float) -> None:
        self.walk()
        server = self._server
        if server is not None:
            await server.write_attribute_value(_standard(ObjectIds.Server_ServerStatus_CurrentTime),
                                               ua.DataValue(ua.Variant(self._now(), ua.VariantType.DateTime)))
        # every node is written each tick, as a DCS scan would: source timestamps say the value is fresh
        for node in list(self._nodes.values()):
            try:
                await self._write(node)
            except Exception:  # one refused write must not stop the plant
                log.exception("writing %s", node.nodeid)

    # --- scenarios ---

    def scenarios(self) -> list[str]:
        return list(SCENARIOS)

    def _first(self, what: str, match: Callable[[_Node], bool]) -> _Node:
        for node in self._nodes.values():
            if node.walk and node.kind in ("int", "float") and match(node):
                return node
        raise ValueError(f"no {what} is served")

    async def _ramp(self, node: _Node, target: float, seconds: float, pace: float) -> None:
        async for value in ramp(float(node.value), target, seconds, pace):
            await self.set_value(node.nodeid, value)

    async def crowding(self, *, speed: float | None = None, hold: float | None = None) -> None:
        """The first personnel zone with a limit fills past it, stays crowded (people come and go, always above
        the limit) for longer than its on-delay and the ministry's one minute, then empties again."""
        pace = speed or self.speed
        node, limit, delay, deadband = self._crowding_target()
        crowd = math.floor(limit) + 3
        hold = hold if hold is not None else max(75.0, 1.5 * delay + 10.0)
        back = min((node.low + node.high) / 2, limit - deadband - 1)
        try:
            log.info("scenario crowding: %s rises past its limit %g", node.nodeid, limit)
            await self._ramp(node, crowd, 10.0, pace)
            loop = asyncio.get_running_loop()
            until = loop.time() + hold / pace
            while loop.time() < until:
                await asyncio.sleep(min(2.0 / pace, max(0.0, until - loop.time())))
                await self.set_value(node.nodeid, crowd + self._rng.choice((-1, 0, 1)))
            log.info("scenario crowding: %s falls back to %g", node.nodeid, back)
            await self._ramp(node, back, 15.0, pace)
        finally:
            self.release(node.nodeid)
        log.info("scenario crowding: done")

    async def process_upset(self, *, speed: float | None = None) -> None:
        """The first process value with high and high_high limits rises past both, holds, and recovers."""
        pace = speed or self.speed
        node = self._first("process value with high and high_high limits",
                           lambda n: n.domain != "personnel" and None not in n.limits[:2])
        high, high_high, deadband = node.limits
        assert high is not None and high_high is not None
        margin = max(0.1 * (high_high - high), 2 * deadband)
        try:
            log.info("scenario process_upset: %s rises past high %g", node.nodeid, high)
            await self._ramp(node, min(high + margin, (high + high_high) / 2), 20.0, pace)
            await asyncio.sleep(15.0 / pace)
            log.info("scenario process_upset: %s rises past high_high %g", node.nodeid, high_high)
            await self._ramp(node, high_high + margin, 10.0, pace)
            await asyncio.sleep(15.0 / pace)
            await self._ramp(node, (node.low + node.high) / 2, 20.0, pace)
        finally:
            self.release(node.nodeid)
        log.info("scenario process_upset: done")

    def _crowding_target(self) -> tuple[_Node, float, float, float]:
        """The head count to crowd: a configured zone's (its limit and duration), else a point with a high limit."""
        config = self.config
        if config is not None:
            served = {p.id: p for _, _, p in config.points() if isinstance(p, OpcUaPoint)}
            for zone in config.zones:
                point = served.get(zone.head_count)
                if point is not None and point.node in self._nodes:
                    return self._nodes[point.node], float(zone.limit), zone.duration, 0.0
        node = self._first("personnel head count with a high limit",
                           lambda n: n.domain == "personnel" and (n.limits[0] or n.limits[1]) is not None)
        high, high_high, deadband = node.limits
        limit = high if high is not None else high_high
        assert limit is not None
        delay = max((p.limits.delay for p in self._point_configs(node) if p.limits is not None), default=0.0)
        return node, limit, delay, deadband

    def _point_configs(self, node: _Node) -> list[OpcUaPoint]:
        return [p for ch in self._channels for d in ch.devices for p in d.points if _canonical(p.node) == node.nodeid]


# --- command line --------------------------------------------------------------------------------------


def _arguments(argv: Iterable[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m simulators.opcua", description=__doc__)
    parser.add_argument("--config", type=Path, help="serve the opcua channels of this agent configuration")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=4840, help="TCP port (0 = a free one)")
    parser.add_argument("--path", default="/edge", help="endpoint path")
    parser.add_argument("--folder", type=Path, help="where certificates are made (default: a new temporary folder)")
    parser.add_argument("--user", action="append", default=[], metavar="NAME:PASSWORD", help="accept this login")
    parser.add_argument("--no-anonymous", action="store_true", help="refuse anonymous logins")
    parser.add_argument("--secure-only", action="store_true", help="offer no endpoint without security")
    parser.add_argument("--trust", type=Path, action="append", metavar="CERT",
                        help="accept only these client certificates (default: any)")
    add_arguments(parser, SCENARIOS)
    args = parser.parse_args(None if argv is None else list(argv))
    for user in args.user:
        if ":" not in user:
            parser.error(f"--user {user!r}: give NAME:PASSWORD")
    return args


async def _serve(args: argparse.Namespace) -> None:
    config = load_config(args.config) if args.config is not None else None
    folder = args.folder or Path(tempfile.mkdtemp(prefix="opcua-sim-"))
    users = dict(u.split(":", 1) for u in args.user)
    sim = OpcUaSimulator(config, folder=folder, port=args.port, host=args.host, path=args.path,
                         allow_none=not args.secure_only, users=users, anonymous=not args.no_anonymous,
                         trusted=args.trust, period=args.period, speed=args.speed, seed=args.seed)

    def announce() -> Iterator[str]:
        cert, key = sim.client_certificate()
        yield f"listening {sim.endpoint}"
        yield f"server certificate {sim.server_certificate}"
        yield f"client certificate {cert} key {key}"
        for channel, fields in sim.channel_overrides().items():
            yield f"channel {channel} {json.dumps(fields, ensure_ascii=False)}"

    await serve_until_stopped(sim, args, announce)


def main(argv: Iterable[str] | None = None) -> int:
    args = _arguments(argv)
    return run_command(args, lambda: asyncio.run(_serve(args)), quiet="asyncua")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())

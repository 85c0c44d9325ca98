"""OPC UA driver (asyncua): one client session per channel; a device is a group of nodes read together, in one
Read request per poll (`poll`) or through one data-change subscription (`subscribe`).

asyncua weighs 22 MB, so it is imported only inside functions: loading the driver registry never pulls it in.
The driver never reconnects in the background: a lost link or a failed request closes the session, and the next
poll opens a new one and re-creates the subscriptions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from agent.config.base import ChannelBase, DeviceBase, Duration, PointBase, Secret, SecretFile, read_secret
from agent.core import BAD, GOOD, UNCERTAIN, DeviceRead
from agent.drivers import registry
from agent.errors import LinkError

if TYPE_CHECKING:
    from asyncua import ua
    from asyncua.client.client import Client

log = logging.getLogger(__name__)

# agent.pipeline.decode's qualities; importing decode here would be circular (decode → points → config → drivers)
NODE_ID_PATTERN = (
    r"^(ns=\d{1,5};)?(i=\d{1,10}|s=.+|b=[A-Za-z0-9+/=]+"
    r"|g=[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12})$"
)
CLIENT_URI = "urn:edge-agent:client"
"""Application URI of the agent when it has no certificate (a certificate's own URI wins)."""

SESSION_TIMEOUT_MS = 120_000
"""How long the server keeps the session of an agent that vanished without closing it."""

Security = Literal["None", "Basic256Sha256"]
SecurityMode = Literal["Sign", "SignAndEncrypt"]

# what a field engineer should check when the server answers a connect with one of these
STATUS_HINTS = {
    "BadUserAccessDenied": "wrong username or password, or the server wants another user",
    "BadIdentityTokenInvalid": "the server does not accept this kind of login",
    "BadIdentityTokenRejected": "the server does not accept this kind of login (anonymous or username)",
    "BadCertificateUntrusted": "the server does not trust the client certificate: add it to the server's trust list",
    "BadCertificateInvalid": "the server rejected the client certificate as invalid",
    "BadCertificateUriInvalid": "the client certificate's URI does not match the application URI",
    "BadCertificateTimeInvalid": "a certificate is expired or not yet valid",
    "BadSecurityChecksFailed": "security rejected: a certificate or key mismatch, or the client is not trusted",
    "BadSecurityPolicyRejected": "the server does not offer this security policy",
    "BadSecurityModeRejected": "the server does not offer this security mode",
    "BadNodeIdUnknown": "no such node on the server",
    "BadNodeIdInvalid": "the node id is not valid on the server",
    "BadTooManySessions": "the server has no free session",
    "BadNotReadable": "the node cannot be read by this user",
}


class OpcUaError(LinkError):
    """The OPC UA link failed; the message says what failed, `status` is the OPC UA status name if there is one
    and `kind` one word for it: refused, timeout, security, login, node, file or connection."""

    def __init__(self, message: str, status: str | None = None, kind: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind or _kind_of(status)


def _kind_of(status: str | None) -> str:
    if status is None:
        return "connection"
    if status.startswith(("BadCertificate", "BadSecurity", "BadNonce", "BadApplicationSignature")):
        return "security"
    if status.startswith(("BadUser", "BadIdentity")):
        return "login"
    if status.startswith(("BadNodeId", "BadNotReadable", "BadAttributeId", "BadBrowse")):
        return "node"
    return "connection"


class OpcUaPoint(PointBase):
    """One variable node; its value must be a number or a bool."""

    node: str = Field(
        pattern=NODE_ID_PATTERN,
        description="NodeId of the variable, e.g. ns=2;s=Zone1.HeadCount or ns=2;i=1001.",
    )


class OpcUaDevice(DeviceBase):
    """A group of nodes read together every `interval`."""

    mode: Literal["poll", "subscribe"] = Field(
        "poll",
        description="poll: read every node each interval, in one Read request. subscribe: the server reports "
        "data changes through a subscription; each interval yields only the points that changed.",
    )
    publishing_interval: Duration | None = Field(
        None, gt=0, le=3600, description="subscribe: how often the server sends changes; the interval when omitted."
    )
    points: list[OpcUaPoint] = Field(min_length=1, description="Nodes read from this server as one device.")

    @model_validator(mode="after")
    def _publishing_only_when_subscribed(self) -> OpcUaDevice:
        if self.publishing_interval is not None and self.mode != "subscribe":
            raise ValueError("publishing_interval is only for mode: subscribe")
        return self


class OpcUaChannel(ChannelBase):
    """One OPC UA server (a DCS, a personnel-location system, a gateway), one session."""

    driver: Literal["opcua"]
    endpoint: str = Field(
        pattern=r"^opc\.tcp://[^/\s]+(/\S*)?$", description="Server endpoint, e.g. opc.tcp://10.0.0.5:4840/path."
    )
    security: Security = Field("None", description="Security policy: None or Basic256Sha256.")
    mode: SecurityMode | None = Field(
        None, description="Message security with Basic256Sha256: Sign or SignAndEncrypt (the default)."
    )
    certificate: Path | None = Field(
        None, description="Client certificate file (PEM or DER), required with Basic256Sha256. Use absolute paths."
    )
    private_key: Path | None = Field(None, description="Private key of the client certificate (PEM or DER).")
    server_certificate: Path | None = Field(
        None, description="Pin the server's certificate (PEM or DER); any server certificate is accepted when omitted."
    )
    username: str | None = Field(None, min_length=1, description="User name; anonymous login when omitted.")
    password: Secret | None = Field(None, description="Password of `username` (better: `password_file`).")
    password_file: SecretFile | None = Field(
        None, description="File holding the password of `username`, read at each connection (its final line break "
        "dropped); may start with ${CREDENTIALS_DIRECTORY}/ (systemd's LoadCredential=). Not with `password`.",
    )
    timeout: Duration = Field(
        5.0, gt=0, le=60, description="Longest wait to connect and open a session, and for any request to answer."
    )
    timestamps: Literal["source", "server", "poll"] = Field(
        "source",
        description="Sample time of a reading: the server's source timestamp (falling back to its server timestamp, "
        "then the poll time), its server timestamp, or the poll time (for servers that stamp only on change).",
    )
    devices: list[OpcUaDevice] = Field(min_length=1, description="Node groups read through this session.")

    @model_validator(mode="after")
    def _security_complete(self) -> OpcUaChannel:
        if self.security == "None":
            extra = [n for n in ("mode", "certificate", "private_key", "server_certificate") if getattr(self, n)]
            if extra:
                raise ValueError(f"{', '.join(extra)} only apply with security: Basic256Sha256")
        elif self.certificate is None or self.private_key is None:
            raise ValueError("security Basic256Sha256 needs `certificate` and `private_key` (the client's own pair)")
        if self.password is not None and self.password_file is not None:
            raise ValueError("give password or password_file, not both")
        if (self.password is not None or self.password_file is not None) and self.username is None:
            raise ValueError("password is given but username is not")
        return self


# --- connecting ----------------------------------------------------------------------------------------


def _link_noise(record: logging.LogRecord) -> bool:
    """False for asyncua's traceback of a dropped link: the driver reports that itself, once, in plain words."""
    exc = record.exc_info[1] if record.exc_info else None
    return not isinstance(exc, OSError | TimeoutError)


def _quiet_asyncua() -> None:
    """asyncua logs every publish at INFO and each lost link with a traceback; keep errors unless configured."""
    logger = logging.getLogger("asyncua")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.ERROR)
    session = logging.getLogger("asyncua.client.ua_session.UaSession")
    if _link_noise not in session.filters:
        session.addFilter(_link_noise)


def status_name(code: Any) -> str:
    """The OPC UA name of a status code (an int or a ua.StatusCode), e.g. BadNodeIdUnknown."""
    from asyncua import ua

    status = code if isinstance(code, ua.StatusCode) else ua.StatusCode(ua.UInt32(int(code)))
    return str(status.name)


def describe(exc: BaseException, endpoint: str, timeout: float) -> OpcUaError:
    """Turn what asyncua or the socket raised into one clear line."""
    from asyncua.ua.uaerrors import UaError, UaStatusCodeError

    if isinstance(exc, OpcUaError):
        return exc
    if isinstance(exc, ConnectionRefusedError):
        return OpcUaError(f"{endpoint}: connection refused (is the server running, is the port right?)", kind="refused")
    if isinstance(exc, TimeoutError):
        return OpcUaError(f"{endpoint}: no answer within {timeout:g}s", kind="timeout")
    if isinstance(exc, UaStatusCodeError):
        name = status_name(exc.code)
        hint = STATUS_HINTS.get(name)
        return OpcUaError(f"{endpoint}: {name}" + (f" ({hint})" if hint else ""), name)
    if isinstance(exc, UaError):
        text = str(exc)
        if text.startswith("No matching endpoints"):
            return OpcUaError(f"{endpoint}: security rejected: the server offers no such endpoint ({text})",
                              kind="security")
        if "certificate mismatch" in text:
            return OpcUaError(f"{endpoint}: security rejected: the server's certificate is not the pinned one",
                              kind="security")
        return OpcUaError(f"{endpoint}: {text}")
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc) or type(exc).__name__
        return OpcUaError(f"{endpoint}: {reason}")
    return OpcUaError(f"{endpoint}: {type(exc).__name__}: {exc}")


def _read_pem_or_der(path: Path, what: str) -> tuple[bytes, str]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise OpcUaError(f"{what} {path}: {exc.strerror or exc}", kind="file") from None
    return data, ("pem" if b"-----BEGIN" in data else "der")


def _load_pair(certificate: Path, private_key: Path) -> tuple[bytes, bytes, str, str]:
    """Certificate as DER, key as given, key format, and the certificate's application URI; checks they load."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    raw, fmt = _read_pem_or_der(certificate, "client certificate")
    try:
        cert = x509.load_pem_x509_certificate(raw) if fmt == "pem" else x509.load_der_x509_certificate(raw)
    except ValueError as exc:
        raise OpcUaError(f"client certificate {certificate}: not a PEM or DER certificate ({exc})",
                         kind="file") from None
    key, key_fmt = _read_pem_or_der(private_key, "private key")
    try:
        loaded = (serialization.load_pem_private_key(key, None) if key_fmt == "pem"
                  else serialization.load_der_private_key(key, None))
    except (ValueError, TypeError) as exc:
        raise OpcUaError(f"private key {private_key}: not an unencrypted PEM or DER key ({exc})", kind="file") \
            from None
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if loaded.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise OpcUaError(f"private key {private_key} does not belong to certificate {certificate}", kind="file")
    uri = CLIENT_URI
    with contextlib.suppress(x509.ExtensionNotFound):
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier)
        if uris:
            uri = uris[0]  # servers check that the session's application URI is the certificate's
    return cert.public_bytes(serialization.Encoding.DER), key, key_fmt, uri


def _load_server_certificate(path: Path) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    raw, fmt = _read_pem_or_der(path, "server certificate")
    try:
        cert = x509.load_pem_x509_certificate(raw) if fmt == "pem" else x509.load_der_x509_certificate(raw)
    except ValueError as exc:
        raise OpcUaError(f"server certificate {path}: not a PEM or DER certificate ({exc})", kind="file") from None
    return cert.public_bytes(serialization.Encoding.DER)


async def connect(
    endpoint: str,
    *,
    security: Security = "None",
    mode: SecurityMode | None = None,
    certificate: Path | None = None,
    private_key: Path | None = None,
    server_certificate: Path | None = None,
    username: str | None = None,
    password: str | None = None,
    timeout: float = 5.0,
) -> Client:
    """Open a session with the server within `timeout`; raise OpcUaError saying what failed."""
    from asyncua import ua
    from asyncua.client.client import Client
    from asyncua.crypto import security_policies, uacrypto
    from asyncua.ua.uaerrors import UaError

    _quiet_asyncua()
    # the agent owns reconnecting (on the next poll); the client only watches the link (a read every few s)
    client = Client(endpoint, timeout=timeout, watchdog_intervall=max(1.0, timeout), auto_reconnect=False)
    client.name = client.description = "edge-agent"
    client.session_timeout = SESSION_TIMEOUT_MS
    client.application_uri = CLIENT_URI
    client.product_uri = "urn:edge-agent"
    if username is not None:
        client.set_user(username)
        client.set_password(password or "")
    try:
        async with asyncio.timeout(timeout):
            if security == "Basic256Sha256":
                if certificate is None or private_key is None:
                    raise OpcUaError("security Basic256Sha256 needs a client certificate and its private key")
                cert, key, key_fmt, uri = await asyncio.to_thread(_load_pair, certificate, private_key)
                client.application_uri = uri
                # without a pinned certificate asyncua asks the server for its own first
                await client.set_security(
                    security_policies.SecurityPolicyBasic256Sha256,
                    uacrypto.CertProperties(cert, "der"),
                    uacrypto.CertProperties(key, key_fmt),
                    mode=getattr(ua.MessageSecurityMode, mode or "SignAndEncrypt"),
                )
                if server_certificate is not None:
                    pinned = await asyncio.to_thread(_load_server_certificate, server_certificate)
                    # checked here: a server sent a message for another key drops it silently, a timeout says nothing
                    if client.security_policy.peer_certificate != pinned:
                        raise OpcUaError(f"{endpoint}: security rejected: the server's certificate is not the pinned "
                                         f"server_certificate {server_certificate}", kind="security")
            await client.connect()
    except BaseException as exc:
        client.disconnect_socket()
        if not isinstance(exc, Exception):
            raise
        error = describe(exc, endpoint, timeout)
        if isinstance(exc, UaError) and str(exc).startswith("No matching endpoints"):
            offer = f"Basic256Sha256 {mode or 'SignAndEncrypt'}" if security == "Basic256Sha256" else "None"
            error = OpcUaError(f"{endpoint}: security rejected: the server offers no endpoint with security {offer}",
                               kind="security")
        elif username is None and error.status in ("BadUserAccessDenied", "BadIdentityTokenRejected"):
            error = OpcUaError(f"{endpoint}: {error.status} (the server refuses anonymous login: give a username "
                               "and password)", error.status)
        raise error from None
    return client


async def disconnect(client: Client, timeout: float = 2.0) -> None:
    """Close the session politely when the link is up, and the socket in any case; never raises."""
    try:
        async with asyncio.timeout(timeout):
            await client.disconnect()
    except Exception as exc:  # a dead link cannot be closed politely; the socket goes anyway
        log.debug("closing the OPC UA session: %r", exc)
    finally:
        client.disconnect_socket()


# --- one poll ------------------------------------------------------------------------------------------


def _ms(stamp: datetime | None) -> int | None:
    if stamp is None:
        return None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    if stamp.year <= 1601 or stamp.year >= 9999:
        return None  # DateTime 0 (and the maximum) mean "no timestamp" (Part 6, 5.2.2.5)
    return int(stamp.timestamp() * 1000)


@dataclass(slots=True)
class Sample:
    """One value as the agent takes it: raw value (or None), sample time in ms, quality, and an error if bad."""

    value: Any
    ts: int
    quality: int
    error: str | None = None


def convert(dv: ua.DataValue, point: OpcUaPoint, now_ms: int, timestamps: str = "source") -> Sample:
    """A DataValue from the server → what the pipeline takes; a string or a missing node is bad, with why."""
    status = dv.StatusCode
    source, server = _ms(dv.SourceTimestamp), _ms(dv.ServerTimestamp)
    if timestamps == "source":
        ts = source if source is not None else server if server is not None else now_ms
    elif timestamps == "server":
        ts = server if server is not None else now_ms
    else:
        ts = now_ms
    where = f"point {point.id} node {point.node}"
    if status is not None and status.is_bad():
        name = str(status.name)
        hint = STATUS_HINTS.get(name)
        return Sample(None, ts, BAD, f"{where}: {name}" + (f" ({hint})" if hint else ""))
    quality = UNCERTAIN if status is not None and status.is_uncertain() else GOOD
    variant = dv.Value
    value = variant.Value if variant is not None else None
    if isinstance(value, bool):
        return Sample(value, ts, quality)
    if isinstance(value, int | float):
        return Sample(value, ts, quality)
    kind = variant.VariantType.name if variant is not None else "nothing"
    shown = "no value" if value is None else f"a {kind}{' array' if isinstance(value, list) else ''}"
    return Sample(None, ts, BAD, f"{where}: {shown}, not a number or bool")


def _read_params(points: list[OpcUaPoint]) -> ua.ReadParameters:
    from asyncua import ua
    from asyncua.ua.attribute_ids import AttributeIds

    params = ua.ReadParameters()
    params.TimestampsToReturn = ua.TimestampsToReturn.Both  # the server timestamp is the fallback
    for point in points:
        rv = ua.ReadValueId()
        rv.NodeId = ua.NodeId.from_string(point.node)
        rv.AttributeId = AttributeIds.Value
        params.NodesToRead.append(rv)
    return params


@dataclass(eq=False)
class _Watch:
    """One subscription of one device on one session; its notifications land in `pending`."""

    positions: dict[str, list[int]]
    subscription: Any = None
    pending: dict[int, Any] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    lost: str | None = None

    # asyncua calls these from its own tasks; they only record, so the publish loop is never held up

    def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
        for pos in self.positions.get(node.nodeid.to_string(), ()):
            self.pending[pos] = data.monitored_item.Value

    def status_change_notification(self, status: Any) -> None:
        code = getattr(status, "Status", None)
        if code is not None and code.is_bad():
            self.lost = str(code.name)


@dataclass(eq=False)
class _Device:
    device: OpcUaDevice
    params: Any = None
    watch: _Watch | None = None
    # what the last read returned per position: (value, status, source ts), to drop news repeated as it was
    last: dict[int, tuple[Any, int, int | None]] = field(default_factory=dict)


class OpcUaDriver:
    """One session with one server; devices are read in turn through it, never two requests at once."""

    def __init__(self, channel: OpcUaChannel) -> None:
        self.channel = channel
        self._client: Client | None = None
        self._devices = {d.id: _Device(d) for d in channel.devices}
        self._dropping: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        client = self._client
        return client is not None and client.state.value == "connected"

    async def open(self) -> None:
        if self.connected:
            return
        await self.close()
        ch = self.channel
        password = ch.password
        if ch.password_file is not None:  # read at each connection: a credential may change while the agent runs
            try:
                password = read_secret(ch.password_file)
            except OSError as exc:
                raise OpcUaError(f"{ch.endpoint}: password_file {exc}", kind="file") from None
        self._client = await connect(
            ch.endpoint, security=ch.security, mode=ch.mode, certificate=ch.certificate, private_key=ch.private_key,
            server_certificate=ch.server_certificate, username=ch.username, password=password, timeout=ch.timeout,
        )
        client = self._client

        async def drop() -> None:
            if self._client is client:  # not a newer session opened meanwhile
                await self.close()

        async def lost(exc: Exception) -> None:
            # close at once, not at the next poll: asyncua would otherwise retry its publish loop every second
            if self._client is client and (self._dropping is None or self._dropping.done()):
                log.warning("channel %s: link to %s lost (%s)", ch.id, ch.endpoint, exc or type(exc).__name__)
                self._dropping = asyncio.get_running_loop().create_task(drop(), name=f"opcua drop {ch.id}")

        client.connection_lost_callback = lost
        log.info("channel %s: session open with %s (security %s)", ch.id, ch.endpoint, ch.security)

    async def close(self) -> None:
        dropping = self._dropping
        if dropping is not None and dropping is not asyncio.current_task() and not dropping.done():
            await asyncio.shield(dropping)  # the same client is being closed already
        client, self._client = self._client, None
        for state in self._devices.values():
            state.watch = None
        if client is not None:
            await disconnect(client)

    async def read(self, device: DeviceBase) -> DeviceRead:
        from asyncua.ua.uaerrors import UaError

        assert isinstance(device, OpcUaDevice)
        state = self._devices[device.id]
        attempts = device.retries + 1
        for attempt in range(attempts):
            reused = self.connected
            await self.open()
            try:
                async with asyncio.timeout(device.timeout):
                    if device.mode == "subscribe":
                        return await self._watch(state)
                    return await self._poll(state)
            except (OSError, TimeoutError, UaError) as exc:
                # the session is suspect after any failed request: a fresh one is cheap, a wedged one is not
                await self.close()
                error = describe(exc, self.channel.endpoint, device.timeout)
                # only a link that was already open may just be stale (e.g. the server restarted in between)
                if not reused or attempt == attempts - 1:
                    raise error from None
                log.info("channel %s: %s; reconnecting", self.channel.id, error)
        raise AssertionError("unreachable")

    async def _read_all(self, state: _Device) -> tuple[DeviceRead, list[Any]]:
        client = self._client
        assert client is not None
        points = state.device.points
        if state.params is None:
            state.params = _read_params(points)
        results = await client.uaclient.read(state.params)
        if len(results) != len(points):
            raise OpcUaError(f"{self.channel.endpoint}: {len(results)} results for {len(points)} nodes read")
        now_ms = int(time.time() * 1000)
        mode = self.channel.timestamps
        samples = [convert(dv, p, now_ms, mode) for dv, p in zip(results, points, strict=True)]
        read = DeviceRead(
            [s.value for s in samples],
            [s.error for s in samples if s.error is not None],
            timestamps=[s.ts for s in samples],
            qualities=[s.quality for s in samples],
        )
        return read, results

    async def _poll(self, state: _Device) -> DeviceRead:
        read, _ = await self._read_all(state)
        return read

    async def _subscribe(self, state: _Device) -> _Watch:
        from asyncua import ua

        client = self._client
        assert client is not None
        device = state.device
        old, state.watch = state.watch, None
        if old is not None and old.subscription is not None:
            with contextlib.suppress(Exception):
                await old.subscription.delete()
        positions: dict[str, list[int]] = {}
        for pos, point in enumerate(device.points):
            positions.setdefault(ua.NodeId.from_string(point.node).to_string(), []).append(pos)
        watch = _Watch(positions)
        interval_ms = (device.publishing_interval or device.interval) * 1000
        params = ua.CreateSubscriptionParameters()
        params.RequestedPublishingInterval = interval_ms
        # a keep-alive at least every ~5 s lets the client notice a dead subscription soon
        keepalive = max(1, math.ceil(5000 / interval_ms))
        params.RequestedMaxKeepAliveCount = keepalive
        params.RequestedLifetimeCount = max(3 * keepalive, math.ceil(60000 / interval_ms))
        params.MaxNotificationsPerPublish = 0
        params.PublishingEnabled = True
        params.Priority = 0
        watch.subscription = await client.create_subscription(params, watch)
        nodes = [client.get_node(n) for n in positions]
        results = await watch.subscription.subscribe_data_change(nodes, sampling_interval=interval_ms)
        for key, result in zip(positions, results, strict=True):
            if isinstance(result, ua.StatusCode):
                for pos in positions[key]:
                    point = device.points[pos]
                    name = str(result.name)
                    hint = STATUS_HINTS.get(name)
                    watch.failed[pos] = f"point {point.id} node {point.node}: {name}" + (f" ({hint})" if hint else "")
        state.watch = watch
        log.info("channel %s device %s: subscribed to %d node(s) every %g ms (%d refused)", self.channel.id,
                 device.id, len(positions), interval_ms, len(watch.failed))
        return watch

    async def _watch(self, state: _Device) -> DeviceRead:
        watch = state.watch
        if watch is not None and watch.lost is not None:
            log.info("channel %s device %s: subscription lost (%s); subscribing again", self.channel.id,
                     state.device.id, watch.lost)
        if watch is None or watch.lost is not None:  # None: never subscribed, or the session was closed
            watch = await self._subscribe(state)
            # after (re)subscribing, the whole device once: what changed while unwatched is news too
            read, results = await self._read_all(state)
            watch.pending.clear()
            state.last = {pos: _key(dv) for pos, dv in enumerate(results)}
            for pos, error in watch.failed.items():
                if read.values[pos] is not None:  # subscribing failed although the node reads: keep it bad
                    read.values[pos] = None
                    assert read.qualities is not None
                    read.qualities[pos] = BAD
                    read.errors.append(error)
            return read
        return self._changes(state, watch)

    def _changes(self, state: _Device, watch: _Watch) -> DeviceRead:
        points = state.device.points
        now_ms = int(time.time() * 1000)
        pending, watch.pending = watch.pending, {}
        positions: list[int] = []
        values: list[Any] = []
        stamps: list[int] = []
        qualities: list[int] = []
        errors: list[str] = []
        for pos in sorted(pending):
            dv = pending[pos]
            key = _key(dv)
            if key == state.last.get(pos):
                continue  # the same value, status and source timestamp again (a re-created subscription)
            # an older source timestamp is news too: a monitored item's queue is in sampling order, so the last
            # news is the current value whatever its time says (a clock stepped back); decode checks the time
            state.last[pos] = key
            sample = convert(dv, points[pos], now_ms, self.channel.timestamps)
            positions.append(pos)
            values.append(sample.value)
            stamps.append(sample.ts)
            qualities.append(sample.quality)
            if sample.error is not None:
                errors.append(sample.error)
        for pos, error in watch.failed.items():  # a node that cannot be watched stays bad, and says why
            positions.append(pos)
            values.append(None)
            stamps.append(now_ms)
            qualities.append(BAD)
            errors.append(error)
        return DeviceRead(values, errors, positions=positions, timestamps=stamps, qualities=qualities)


def _key(dv: Any) -> tuple[Any, int, int | None]:
    variant = dv.Value
    value = variant.Value if variant is not None else None
    status = dv.StatusCode
    return (repr(value), int(status.value) if status is not None else 0, _ms(dv.SourceTimestamp))


registry.register("opcua", OpcUaChannel, OpcUaDriver)

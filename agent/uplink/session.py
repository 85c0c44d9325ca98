"""One MQTT connection: a fresh paho client wired to the asyncio loop through its socket callbacks (no network
thread), with its in-flight map. paho's callbacks stay in this module; none of them lets an exception out
(`suppress_exceptions`), and none runs agent work: acknowledgements and commands are handed to the uplink.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import threading
import zlib
from collections.abc import Callable
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.config.base import read_secret
from agent.config.models import UplinkConfig
from agent.core import KIND_DATA, KIND_NAMES
from agent.messages import frame
from agent.store.outbox import Row

log = logging.getLogger(__name__)

# uplink.compress: zlib's default level, 6: about 0.2 µs a compact reading, a tenth fewer bytes than level 1
COMPRESS_LEVEL = 6


class Owner(Protocol):
    """What a session needs of the uplink that owns it (agent.uplink.uplink.Uplink)."""

    cfg: UplinkConfig
    client_id: str
    refused: int

    def topic(self, leaf: str) -> str: ...

    def offline_payload(self, *, with_ts: bool) -> bytes: ...

    def acked(self, seq: int) -> None: ...

    def rouse(self) -> None: ...

    def command_arrived(self, payload: bytes, *, retained: bool) -> None: ...

    def config_arrived(self, payload: bytes, *, retained: bool) -> None: ...


class Session:
    """One connection: a paho client wired to the event loop, with its in-flight map."""

    def __init__(self, uplink: Owner) -> None:
        self.uplink = uplink
        self.loop = asyncio.get_running_loop()
        cfg = uplink.cfg
        self.client = new_client(cfg, uplink.client_id)
        # our own window is the bound; a little room on top for status and health messages
        self.client.max_inflight_messages_set(cfg.inflight + 8)
        self.client.max_queued_messages_set(0)
        # paho logs an exception raised in one of our callbacks instead of re-raising it into its read loop
        self.client.suppress_exceptions = True
        self.client.will_set(uplink.topic("status"), uplink.offline_payload(with_ts=False), qos=1, retain=True)
        self.connected: asyncio.Future[None] = self.loop.create_future()
        self.closed = asyncio.Event()
        self.inflight: dict[int, int] = {}  # paho mid -> seq (only store messages)
        self.hist_mids: set[int] = set()  # the backlog's share of the in-flight window
        self.other_mids: dict[int, asyncio.Future[None]] = {}
        self.sock: socket.socket | None = None
        c = self.client
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.on_message = self._on_message
        c.on_socket_open = self._threadsafe(self._sock_open)
        c.on_socket_close = self._threadsafe(self._sock_close)
        c.on_socket_register_write = self._threadsafe(self._sock_want_write)
        c.on_socket_unregister_write = self._threadsafe(self._sock_done_write)

    def _threadsafe(self, fn: Callable[[Any], None]) -> Callable[[mqtt.Client, Any, Any], None]:
        # connect() runs in an executor thread, so socket callbacks may arrive off the loop
        def callback(client: mqtt.Client, userdata: Any, sock: Any) -> None:
            self.loop.call_soon_threadsafe(fn, sock)

        return callback

    def _sock_open(self, sock: Any) -> None:
        self.sock = sock
        self.loop.add_reader(sock, self._read)

    def _sock_close(self, sock: Any) -> None:
        with contextlib.suppress(Exception):
            self.loop.remove_reader(sock)
            self.loop.remove_writer(sock)

    def _sock_want_write(self, sock: Any) -> None:
        with contextlib.suppress(Exception):
            self.loop.add_writer(sock, self._write)

    def _sock_done_write(self, sock: Any) -> None:
        with contextlib.suppress(Exception):
            self.loop.remove_writer(sock)

    def _read(self) -> None:
        self.client.loop_read()

    def _write(self) -> None:
        self.client.loop_write()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any) -> None:
        if self.connected.done():
            return
        if rc.is_failure:
            self.connected.set_exception(ConnectionRefusedError(f"broker refused the connection: {rc}"))
        else:
            self.connected.set_result(None)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any) -> None:
        if not self.connected.done():
            self.connected.set_exception(ConnectionError(f"disconnected before CONNACK: {rc}"))
        if not self.closed.is_set():
            log.warning("uplink: disconnected from %s:%d (%s)", self.uplink.cfg.host, self.uplink.cfg.port, rc)
        self.closed.set()
        self.uplink.rouse()

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, rc: ReasonCode, props: Any) -> None:
        seq = self.inflight.pop(mid, None)
        self.hist_mids.discard(mid)
        if seq is not None:
            if rc.is_failure:
                # v5 broker refused it (e.g. quota, not authorised): keep it stored, resend on the next connection
                log.error("uplink: broker refused message seq %d: %s", seq, rc)
                self.uplink.refused += 1
            else:
                self.uplink.acked(seq)
            self.uplink.rouse()  # room in the window
            return
        waiter = self.other_mids.pop(mid, None)
        if waiter is not None and not waiter.done():
            if rc.is_failure:  # a v5 broker refused it (e.g. not authorised for the topic)
                waiter.set_exception(ConnectionError(f"the broker refused it: {rc}"))
            else:
                waiter.set_result(None)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        # only queued here: a command runs in its own task, never inside paho's read callback
        if message.topic == self.uplink.topic("cmd"):
            self.uplink.command_arrived(bytes(message.payload), retained=bool(message.retain))
        elif message.topic == self.uplink.topic("config/set"):
            self.uplink.config_arrived(bytes(message.payload), retained=bool(message.retain))

    async def connect(self) -> None:
        cfg = self.uplink.cfg
        kwargs: dict[str, Any] = {}
        if cfg.protocol == "5":
            kwargs["clean_start"] = True
            # the broker must not send what the agent would drop anyway (room for the topic and the header)
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.MaximumPacketSize = cfg.max_incoming_bytes + 4096
            kwargs["properties"] = props
        # paho's connect blocks (DNS, TCP, TLS): in a daemon thread, so a stop never waits for a dead broker's
        # connect timeout (an executor thread would be joined at exit)
        opened: asyncio.Future[None] = self.loop.create_future()

        def attempt() -> None:
            error: BaseException | None = None
            try:
                self.client.connect(cfg.host, cfg.port, keepalive=round(cfg.keepalive), **kwargs)
            except BaseException as exc:
                error = exc
            with contextlib.suppress(RuntimeError):  # the loop is gone: a stop abandoned this attempt
                self.loop.call_soon_threadsafe(_settle, opened, error)

        threading.Thread(target=attempt, name="mqtt connect", daemon=True).start()
        await opened
        await asyncio.wait_for(self.connected, cfg.connect_timeout)

    def subscribe_commands(self, topic: str) -> None:
        """Subscribe to a topic of requests from the platform (`cmd`, `config/set`)."""
        if self.uplink.cfg.protocol == "5":
            # keep the retain flag on live deliveries too, so a retained request is refused from its first delivery
            options = SubscribeOptions(qos=1, retainAsPublished=True)
            self.client.subscribe(topic, options=options)
        else:
            self.client.subscribe(topic, qos=1)

    def publish_stored(self, row: Row, hist: bool) -> bool:
        topic = self.uplink.topic(KIND_NAMES.get(row.kind, "data"))
        payload = frame(row.seq, hist, row.body)
        if row.kind == KIND_DATA and self.uplink.cfg.compress:
            payload = zlib.compress(payload, COMPRESS_LEVEL)
        info = self.client.publish(topic, payload, qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return False
        self.inflight[info.mid] = row.seq
        if hist:
            self.hist_mids.add(info.mid)
        return True

    def publish_other(self, topic: str, payload: bytes, retain: bool = False) -> asyncio.Future[None]:
        """Publish a live message (status, health, a command result); the future resolves at its PUBACK."""
        waiter: asyncio.Future[None] = self.loop.create_future()
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        if info.rc == mqtt.MQTT_ERR_SUCCESS:
            self.other_mids[info.mid] = waiter
        else:
            waiter.set_exception(ConnectionError(mqtt.error_string(info.rc)))
        return waiter

    async def misc(self) -> None:
        while not self.closed.is_set():
            self.client.loop_misc()  # keepalive pings and the PINGRESP deadline
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.closed.wait(), 1.0)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
        if self.sock is not None:
            self._sock_close(self.sock)
        self.closed.set()
        self.uplink.rouse()


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return  # the waiter was cancelled (a stop)
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def new_client(cfg: UplinkConfig, client_id: str) -> mqtt.Client:
    """A paho client with the uplink's protocol, credentials and TLS (the session's, and `edge-agent doctor`'s
    own, which uses another client id so it never disturbs the running agent's session)."""
    v5 = cfg.protocol == "5"
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
        clean_session=None if v5 else True,
        reconnect_on_failure=False,
    )
    # connect() blocks its thread (DNS, TCP, TLS): it must give up in bounded time
    client.connect_timeout = cfg.connect_timeout
    if cfg.username is not None:
        password: str | None = cfg.password
        if cfg.password_file is not None:  # read at each connection: a credential may change while we run
            try:
                password = read_secret(cfg.password_file)
            except OSError as exc:  # the uplink logs it and retries; polling and storing go on
                raise OSError(f"password_file {exc}") from None
        client.username_pw_set(cfg.username, password)
    if cfg.tls is not None:
        client.tls_set(
            ca_certs=str(cfg.tls.ca) if cfg.tls.ca else None,
            certfile=str(cfg.tls.cert) if cfg.tls.cert else None,
            keyfile=str(cfg.tls.key) if cfg.tls.key else None,
            cert_reqs=ssl.CERT_REQUIRED,
        )
        client.tls_insecure_set(cfg.tls.insecure)
    return client

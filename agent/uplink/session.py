"""The uplink: publishes what the store holds to the platform's MQTT broker, QoS 1, and marks PUBACKs.

paho-mqtt runs on this asyncio loop through its socket callbacks (no network thread), and a fresh paho
client serves each connection, so paho never re-sends on its own: after a reconnect, whatever was not
acknowledged is replayed from the store, flagged `hist`. paho's callbacks never leave this module. The
uplink never writes to the store except to delete acknowledged messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sqlite3
import ssl
import time
from collections.abc import Callable
from typing import Any

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

from agent.config.models import AgentIdentity, UplinkConfig
from agent.store.db import Row, Store
from agent.uplink.messages import KIND_ALARM, KIND_DATA, encode, frame

log = logging.getLogger(__name__)


class _Session:
    """One connection: a paho client wired to the event loop, with its in-flight map."""

    def __init__(self, uplink: Uplink) -> None:
        self.uplink = uplink
        self.loop = asyncio.get_running_loop()
        cfg = uplink.cfg
        v5 = cfg.protocol == "5"
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=uplink.client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if v5 else True,
            reconnect_on_failure=False,
        )
        # our own window is the bound; a little room on top for status and health messages
        self.client.max_inflight_messages_set(cfg.inflight + 8)
        self.client.max_queued_messages_set(0)
        # connect() blocks an executor thread; a stop waits for it, so it must give up in bounded time
        self.client.connect_timeout = cfg.connect_timeout
        if cfg.username is not None:
            self.client.username_pw_set(cfg.username, cfg.password)
        if cfg.tls is not None:
            self.client.tls_set(
                ca_certs=str(cfg.tls.ca) if cfg.tls.ca else None,
                certfile=str(cfg.tls.cert) if cfg.tls.cert else None,
                keyfile=str(cfg.tls.key) if cfg.tls.key else None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
            self.client.tls_insecure_set(cfg.tls.insecure)
        self.client.will_set(uplink.topic("status"), uplink.offline_payload(with_ts=False), qos=1, retain=True)
        self.connected: asyncio.Future[None] = self.loop.create_future()
        self.closed = asyncio.Event()
        self.inflight: dict[int, int] = {}  # paho mid -> seq (only store messages)
        self.hist_mids: set[int] = set()  # the backlog's share of the in-flight window
        self.other_mids: dict[int, asyncio.Future[None]] = {}
        self.room = asyncio.Event()
        self.room.set()
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
        self.room.set()

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
            self.room.set()
            return
        waiter = self.other_mids.pop(mid, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        uplink = self.uplink
        if message.topic != uplink.topic("cmd") or uplink.on_command is None:
            return
        result = uplink.on_command(bytes(message.payload))
        self.publish_other(uplink.topic("cmd/result"), orjson.dumps(result))

    async def connect(self) -> None:
        cfg = self.uplink.cfg
        kwargs: dict[str, Any] = {}
        if cfg.protocol == "5":
            kwargs["clean_start"] = True
        await self.loop.run_in_executor(
            None, lambda: self.client.connect(cfg.host, cfg.port, keepalive=round(cfg.keepalive), **kwargs)
        )
        await asyncio.wait_for(self.connected, cfg.connect_timeout)

    def publish_stored(self, row: Row, hist: bool) -> bool:
        topic = self.uplink.topic("alarm" if row.kind == KIND_ALARM else "data")
        info = self.client.publish(topic, frame(row.seq, hist, row.body), qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return False
        self.inflight[info.mid] = row.seq
        if hist:
            self.hist_mids.add(info.mid)
        return True

    def publish_other(self, topic: str, payload: bytes, retain: bool = False) -> asyncio.Future[None]:
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


class Uplink:
    def __init__(
        self,
        cfg: UplinkConfig,
        identity: AgentIdentity,
        store: Store,
        *,
        version: str,
        config_version: str,
        health: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.cfg = cfg
        self.identity = identity
        self.store = store
        self.version = version
        self.config_version = config_version
        self.health = health
        self.on_command: Callable[[bytes], dict[str, Any]] | None = None
        self.started = int(time.time() * 1000)
        self.root = f"{cfg.prefix}/{identity.enterprise}/{identity.id}"
        self.client_id = cfg.client_id or f"{identity.enterprise}-{identity.id}"
        self._wake = asyncio.Event()
        self._session: _Session | None = None
        self._pending_acks: list[int] = []
        self._stopping = False
        self._stopped = asyncio.Event()
        self.published = 0
        self.delivered = 0
        self.refused = 0
        self.connects = 0
        self.last_error: str | None = None

    # --- used by the rest of the agent -----------------------------------------------------------------

    def topic(self, leaf: str) -> str:
        return f"{self.root}/{leaf}"

    @property
    def connected(self) -> bool:
        s = self._session
        return s is not None and s.connected.done() and not s.connected.exception() and not s.closed.is_set()

    def wake(self) -> None:
        """New messages are in the store."""
        self._wake.set()

    def acked(self, seq: int) -> None:
        self._pending_acks.append(seq)
        self.delivered += 1
        if len(self._pending_acks) >= 256:
            self.flush_acks()

    def flush_acks(self) -> None:
        if not self._pending_acks:
            return
        try:
            self.store.ack(self._pending_acks)
        except sqlite3.DatabaseError as exc:
            if not self.store.recover_if_corrupt(exc):
                log.error("uplink: cannot mark %d acknowledged messages: %s", len(self._pending_acks), exc)
                return  # kept, marked at the next flush
        self._pending_acks = []

    def offline_payload(self, *, with_ts: bool) -> bytes:
        msg: dict[str, Any] = {"online": False, "agent": self.identity.id, "enterprise": self.identity.enterprise}
        if with_ts:
            msg["ts"] = int(time.time() * 1000)
        return encode(msg)

    def online_payload(self) -> bytes:
        return encode({
            "online": True,
            "agent": self.identity.id,
            "enterprise": self.identity.enterprise,
            "version": self.version,
            "config_version": self.config_version,
            "started": self.started,
            "ts": int(time.time() * 1000),
        })

    # --- the connection loop ------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, publish, reconnect with capped exponential backoff; until cancelled or stopped."""
        delay = self.cfg.reconnect_min
        while not self._stopping:
            try:
                session = _Session(self)
            except (OSError, ValueError) as exc:  # e.g. a TLS file missing: keep polling, retry later
                self.last_error = f"cannot set up the connection: {exc}"
                log.error("uplink: %s; retry in %.1fs", self.last_error, delay)
                await self._sleep_unless_stopping(delay)
                delay = min(delay * 2, self.cfg.reconnect_max)
                continue
            self._session = session
            try:
                await session.connect()
            except (OSError, TimeoutError, ConnectionError) as exc:
                self.last_error = str(exc) or type(exc).__name__
                log.warning("uplink: cannot connect to %s:%d: %s; retry in %.1fs",
                            self.cfg.host, self.cfg.port, self.last_error, delay)
                session.close()
                await self._sleep_unless_stopping(delay)
                delay = min(delay * 2, self.cfg.reconnect_max)
                continue
            delay = self.cfg.reconnect_min
            self.connects += 1
            self.last_error = None
            log.info("uplink: connected to %s:%d as %s", self.cfg.host, self.cfg.port, self.client_id)
            try:
                await self._serve(session)
            finally:
                self.flush_acks()
                session.close()
            if not self._stopping:
                await self._sleep_unless_stopping(delay)

    async def _sleep_unless_stopping(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopped.wait(), seconds)

    async def _serve(self, session: _Session) -> None:
        session.publish_other(self.topic("status"), self.online_payload(), retain=True)
        if self.on_command is not None:
            session.client.subscribe(self.topic("cmd"), qos=1)
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(session.misc()), tg.create_task(self._send(session))]
            if self.health is not None:
                tasks.append(tg.create_task(self._health(session)))
            await session.closed.wait()
            for task in tasks:
                task.cancel()

    async def _send(self, session: _Session) -> None:
        """Send until the session closes; a store failure pauses sending, never ends the connection."""
        while not session.closed.is_set():
            try:
                await self._send_from(session)
            except sqlite3.DatabaseError as exc:
                if not self.store.recover_if_corrupt(exc):
                    log.error("uplink: reading the store failed: %s; retrying in 1s", exc)
                    await asyncio.sleep(1.0)

    async def _send_from(self, session: _Session) -> None:
        """Live messages as they come; the backlog (stored before this connection) beside them, rate-bounded."""
        boundary = self.store.last_seq()
        live_after = boundary
        alarm_after = 0
        data_after = 0
        backlog_alarms_done = backlog_data_done = boundary == 0
        tokens = float(self.cfg.backlog_rate)
        last = time.monotonic()
        window = self.cfg.inflight
        loop = asyncio.get_running_loop()
        next_ack_flush = loop.time() + 0.2
        while not session.closed.is_set():
            self._wake.clear()
            progressed = False
            room = window - len(session.inflight)
            if room > 0:
                rows = self.store.fetch(live_after, limit=room)
                for row in rows:
                    if not session.publish_stored(row, hist=False):
                        break
                    live_after = row.seq
                    progressed = True
                    self.published += 1
            now = time.monotonic()
            tokens = min(float(self.cfg.backlog_rate), tokens + (now - last) * self.cfg.backlog_rate)
            last = now
            room = window - len(session.inflight)
            # the backlog may use what live traffic leaves of the window: half of it, and at most 16 messages
            # (8,000 readings) in flight, which keeps a drain's memory small and is plenty on any real link
            backlog_cap = max(1, min(window // 2, 16))
            backlog_room = min(room, backlog_cap - len(session.hist_mids)) if room > 0 else 0
            if backlog_room > 0 and tokens > 0 and not (backlog_alarms_done and backlog_data_done):
                if not backlog_alarms_done:
                    rows = self.store.fetch(alarm_after, upto=boundary, kind=KIND_ALARM, limit=backlog_room)
                    if len(rows) < backlog_room:
                        backlog_alarms_done = True
                else:
                    rows = self.store.fetch(data_after, upto=boundary, kind=KIND_DATA, limit=backlog_room)
                    if len(rows) < backlog_room:
                        backlog_data_done = True
                for row in rows:
                    if tokens <= 0 or not session.publish_stored(row, hist=True):
                        if row.kind == KIND_ALARM:
                            backlog_alarms_done = False
                        else:
                            backlog_data_done = False
                        break
                    tokens -= row.readings
                    if row.kind == KIND_ALARM:
                        alarm_after = row.seq
                    else:
                        data_after = row.seq
                    progressed = True
                    self.published += 1
                if backlog_alarms_done and backlog_data_done:
                    log.info("uplink: backlog up to seq %d handed to the broker", boundary)
            if loop.time() >= next_ack_flush:
                self.flush_acks()
                next_ack_flush = loop.time() + 0.2
            if progressed and len(session.inflight) < window:
                await asyncio.sleep(0)
                continue
            session.room.clear()
            wait_wake = asyncio.ensure_future(self._wake.wait())
            wait_room = asyncio.ensure_future(session.room.wait())
            timeout = 0.2
            if not (backlog_alarms_done and backlog_data_done) and tokens <= 0:
                timeout = min(timeout, -tokens / self.cfg.backlog_rate + 0.01)
            try:
                await asyncio.wait({wait_wake, wait_room}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            finally:
                wait_wake.cancel()
                wait_room.cancel()

    async def _health(self, session: _Session) -> None:
        assert self.health is not None
        while True:
            await asyncio.sleep(self.cfg.health_interval)
            try:
                payload = encode(self.health())
            except Exception:
                log.exception("uplink: building the health message failed")
                continue
            session.publish_other(self.topic("health"), payload)

    # --- clean stop --------------------------------------------------------------------------------

    async def drain(self, timeout: float) -> None:
        """Wait (up to timeout) until everything stored is acknowledged."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self.wake()
        while loop.time() < deadline and self.connected:
            self.flush_acks()
            if self.store.backlog().messages == 0:
                return
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        """Say `online: false` (retained), disconnect cleanly so the will is not sent, end `run`."""
        self._stopping = True
        self._stopped.set()
        session = self._session
        if session is not None and self.connected:
            try:
                waiter = session.publish_other(self.topic("status"), self.offline_payload(with_ts=True), retain=True)
                await asyncio.wait_for(waiter, 2.0)
            except (TimeoutError, ConnectionError) as exc:
                log.warning("uplink: offline status not acknowledged: %s", exc)
            self.flush_acks()
            session.close()
        self.flush_acks()
        self.wake()

"""The uplink: publishes what the store holds to the platform's MQTT broker, QoS 1, and marks PUBACKs; takes
the platform's commands and answers them.

A fresh connection (agent.uplink.session) serves each attempt, so paho never re-sends on its own: after a
reconnect, whatever was not acknowledged is replayed from the store, flagged `hist`, on the schedule of
agent.uplink.sender. On every connection the point maps of compact messages go first, retained, and data wait
until the broker has them. The uplink never writes to the store except to mark acknowledged messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
import zlib
from collections import deque
from collections.abc import Callable
from typing import Any

import orjson

from agent.config.models import AgentIdentity, UplinkConfig
from agent.core import KIND_ALARM
from agent.messages import encode
from agent.store import Store
from agent.uplink.sender import EVENT_KINDS, Sender
from agent.uplink.session import COMPRESS_LEVEL, Session

log = logging.getLogger(__name__)

COMMAND_QUEUE = 32  # commands waiting for their turn; more at once are refused unanswered (counted)
MAX_RESULTS = 32  # results (config/result) waiting for a connection; the oldest go beyond it


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
        # (payload, retained) -> the result to publish on cmd/result
        self.on_command: Callable[[bytes, bool], dict[str, Any]] | None = None
        # (payload, retained): a configuration push, handed over at once (it answers on config/result itself)
        self.on_config: Callable[[bytes, bool], None] | None = None
        self.config_revision: int | None = None  # reported in the online status with its hash
        self.config_hash: str | None = None
        self.started = int(time.time() * 1000)
        self.root = f"{cfg.prefix}/{identity.enterprise}/{identity.id}"
        self.client_id = cfg.client_id or f"{identity.enterprise}-{identity.id}"
        self._woken = False  # messages stored since the sending loop last looked
        self._napping: asyncio.Future[None] | None = None  # the sending loop's wait (`_nap`)
        self._session: Session | None = None
        self._commands: asyncio.Queue[tuple[bytes, bool]] = asyncio.Queue(COMMAND_QUEUE)
        self._pending_acks: list[int] = []
        self._stopping = False
        self._stopped = asyncio.Event()
        self.published = 0
        self.delivered = 0
        self.refused = 0
        self.connects = 0
        self.commands_dropped = 0
        self.oversized_dropped = 0
        self.last_error: str | None = None
        # results published apart from commands (config/result), kept until the broker has them, over reconnects
        self._results: deque[tuple[str, bytes]] = deque()
        self._results_waiting = asyncio.Event()
        self._maps_changed = False

    # --- used by the rest of the agent -----------------------------------------------------------------

    def topic(self, leaf: str) -> str:
        return f"{self.root}/{leaf}"

    @property
    def connected(self) -> bool:
        s = self._session
        return s is not None and s.connected.done() and not s.connected.exception() and not s.closed.is_set()

    def wake(self) -> None:
        """New messages are in the store."""
        self._woken = True
        self.rouse()

    def rouse(self) -> None:
        """Something the sending loop waits for happened (messages stored, room in the window, the session
        closed): end its nap."""
        napping = self._napping
        if napping is not None and not napping.done():
            napping.set_result(None)

    async def _nap(self, timeout: float) -> None:
        """Until `rouse` or `timeout`: one future and one timer, where waiting on two events would take two tasks
        a turn (a turn every message at 10,000 readings a second)."""
        loop = asyncio.get_running_loop()
        self._napping = loop.create_future()
        timer = loop.call_later(timeout, self.rouse)
        try:
            await self._napping
        finally:
            self._napping = None
            timer.cancel()

    def command_arrived(self, payload: bytes, *, retained: bool) -> None:
        """From paho's read callback: queue the command; it runs in the command task, not in the callback."""
        if len(payload) > self.cfg.max_incoming_bytes:
            self.oversized_dropped += 1
            log.warning("uplink: a command of %d bytes (more than uplink.max_incoming_bytes, %d) dropped unread",
                        len(payload), self.cfg.max_incoming_bytes)
            return
        try:
            self._commands.put_nowait((bytes(payload), retained))
        except asyncio.QueueFull:
            self.commands_dropped += 1
            log.warning("uplink: %d commands already waiting; one of %d bytes dropped unanswered",
                        COMMAND_QUEUE, len(payload))

    def config_arrived(self, payload: bytes, *, retained: bool) -> None:
        """From paho's read callback: a configuration push, handed over (it is checked and queued there)."""
        if self.on_config is not None:
            self.on_config(payload, retained)

    def send_result(self, leaf: str, message: dict[str, Any]) -> None:
        """Publish `message` on `leaf` (e.g. config/result) once connected, again after a reconnect until the broker
        has acknowledged it; the oldest is dropped beyond MAX_RESULTS waiting."""
        self._results.append((leaf, orjson.dumps(message)))
        while len(self._results) > MAX_RESULTS:
            dropped = self._results.popleft()
            log.warning("uplink: %d results waiting for the broker; the oldest, on %s, dropped", MAX_RESULTS,
                        dropped[0])
        self._results_waiting.set()

    def drop_results(self, keep: Callable[[bytes], bool]) -> None:
        """Forget waiting results `keep` says no to (a trial result overtaken by its rollback)."""
        self._results = deque(r for r in self._results if keep(r[1]))

    def reconfigure(self, cfg: UplinkConfig) -> bool:
        """New uplink settings; when the connection's own changed (broker, credentials, TLS, topics...) the session
        is closed and the next one connects with them. True when it reconnects."""
        old, self.cfg = self.cfg, cfg
        self.root = f"{cfg.prefix}/{self.identity.enterprise}/{self.identity.id}"
        self.client_id = cfg.client_id or f"{self.identity.enterprise}-{self.identity.id}"
        reconnect = old.model_copy(update={"batch": cfg.batch, "health_interval": cfg.health_interval,
                                           "backlog_rate": cfg.backlog_rate}) != cfg
        session = self._session
        if reconnect and session is not None and not session.closed.is_set():
            log.info("uplink: new settings; reconnecting to %s:%d", cfg.host, cfg.port)
            session.close()
        self.wake()
        return reconnect

    def maps_changed(self) -> None:
        """A new point map is in use: published (retained) before any data written with it."""
        self._maps_changed = True
        self.wake()

    def republish_status(self) -> None:
        """The online status again (a new configuration revision)."""
        session = self._session
        if session is not None and self.connected:
            self._confirm(session.publish_other(self.topic("status"), self.online_payload(), retain=True),
                          "online status")

    def counters(self) -> dict[str, int]:
        return {"published": self.published, "delivered": self.delivered, "refused": self.refused,
                "connects": self.connects, "commands_dropped": self.commands_dropped,
                "oversized_dropped": self.oversized_dropped}

    def acked(self, seq: int) -> None:
        self._pending_acks.append(seq)
        self.delivered += 1
        if len(self._pending_acks) >= 256:
            self.flush_acks()

    def flush_acks(self) -> None:
        if not self._pending_acks:
            return
        acks = self._pending_acks
        if self.store.attempt(f"marking {len(acks)} acknowledged messages", lambda: self.store.ack(acks)) is None:
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
            **({"config_revision": self.config_revision, "config_hash": self.config_hash}
               if self.config_revision is not None else {}),
            "started": self.started,
            "ts": int(time.time() * 1000),
        })

    # --- the connection loop ------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, publish, reconnect with capped exponential backoff; until cancelled or stopped."""
        delay = self.cfg.reconnect_min
        while not self._stopping:
            try:
                session = Session(self)
            except (OSError, ValueError) as exc:  # e.g. a TLS or password file missing: keep polling, retry later
                error = f"cannot set up the connection: {exc}"
                if error != self.last_error:  # once per change, not at every retry
                    log.error("uplink: %s; retrying, logged again when it changes", error)
                self.last_error = error
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

    async def _serve(self, session: Session) -> None:
        self._confirm(session.publish_other(self.topic("status"), self.online_payload(), retain=True), "online status")
        if self.on_command is not None:
            session.subscribe_commands(self.topic("cmd"))
        if self.on_config is not None:
            session.subscribe_commands(self.topic("config/set"))
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(session.misc()), tg.create_task(self._send(session)),
                     tg.create_task(self._run_commands(session)), tg.create_task(self._send_results(session))]
            if self.health is not None:
                tasks.append(tg.create_task(self._health(session)))
            await session.closed.wait()
            for task in tasks:
                task.cancel()

    def _confirm(self, waiter: asyncio.Future[None], what: str) -> None:
        """A live message's PUBACK, or its failure, is logged (a closed connection loses a live message)."""
        def done(future: asyncio.Future[None]) -> None:
            if not future.cancelled() and future.exception() is not None:
                log.warning("uplink: %s not delivered: %s", what, future.exception())

        waiter.add_done_callback(done)

    async def _run_commands(self, session: Session) -> None:
        """Answer queued commands one at a time, each result published on `cmd/result`."""
        while True:
            payload, retained = await self._commands.get()
            if self.on_command is None:
                continue
            try:
                result = self.on_command(payload, retained)
            except Exception:  # the handler answers every input itself; this is a bug, and must not end the task
                log.exception("uplink: the command handler failed")
                continue
            self._confirm(session.publish_other(self.topic("cmd/result"), orjson.dumps(result)),
                          f"result of command {result.get('id')!r}")

    async def _send_results(self, session: Session) -> None:
        """Publish the waiting results in order; each leaves the queue once the broker has it."""
        while True:
            self._results_waiting.clear()
            for leaf, payload in list(self._results):
                waiter = session.publish_other(self.topic(leaf), payload)
                try:
                    await waiter
                except ConnectionError as exc:
                    log.warning("uplink: a result on %s not delivered: %s; sent again after a reconnect", leaf, exc)
                    return
                with contextlib.suppress(ValueError):
                    self._results.remove((leaf, payload))
            await self._results_waiting.wait()

    async def _send(self, session: Session) -> None:
        """Send until the session closes, the point maps first; a store failure pauses sending, never ends the
        connection."""
        delay = self.cfg.reconnect_min
        while not await self._publish_maps(session):
            if session.closed.is_set():
                return
            # data the platform could not decode must not go; health and commands carry on meanwhile
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(session.closed.wait(), delay)
            delay = min(delay * 2, self.cfg.reconnect_max)
        while not session.closed.is_set():
            try:
                await self._send_from(session)
            except sqlite3.DatabaseError as exc:
                if not self.store.recover_if_corrupt(exc):
                    log.error("uplink: reading the store failed: %s; retrying in 1s", exc)
                    await asyncio.sleep(1.0)

    async def _publish_maps(self, session: Session) -> bool:
        """Publish, retained, the point map in use and every map an unacknowledged message was written with;
        True once the broker has acknowledged them all (at once when there are none)."""
        maps = self.store.attempt("reading the point maps", self.store.maps_to_publish)
        if maps is None:
            return False
        waiters = []
        for map_id, message in maps:
            payload = zlib.compress(message, COMPRESS_LEVEL) if self.cfg.compress else message
            waiter = session.publish_other(self.topic(f"map/{map_id}"), payload, retain=True)
            self._confirm(waiter, f"point map {map_id}")
            waiters.append(waiter)
        if not waiters:
            return True
        closed: asyncio.Future[Any] = asyncio.ensure_future(session.closed.wait())
        try:
            for waiter in waiters:
                await asyncio.wait({waiter, closed}, return_when=asyncio.FIRST_COMPLETED)
                if not waiter.done() or waiter.exception() is not None:
                    return False
        finally:
            closed.cancel()
        return True

    async def _send_from(self, session: Session) -> None:
        """Live messages as they come; the backlog (stored before this connection) beside them, rate-bounded."""
        loop = asyncio.get_running_loop()
        plan = Sender(self.store.last_seq(), self.cfg.inflight, self.cfg.backlog_rate, time.monotonic())
        next_ack_flush = loop.time() + 0.2
        while not session.closed.is_set():
            self._woken = False
            if self._maps_changed:
                self._maps_changed = False
                if not await self._publish_maps(session):
                    self._maps_changed = True  # data written with the new map wait until the broker has it
                    await asyncio.sleep(self.cfg.reconnect_min)
                    continue
            progressed = False
            room = plan.live_room(len(session.inflight))
            if room > 0:
                for row in self.store.fetch(plan.live_after, upto=self.store.hold_after, limit=room):
                    if not session.publish_stored(row, hist=False):
                        break
                    plan.live_sent(row.seq)
                    progressed = True
                    self.published += 1
            plan.refill(time.monotonic())
            request = plan.backlog_request(len(session.inflight), len(session.hist_mids))
            if request is not None:
                kinds = EVENT_KINDS if request.kind == KIND_ALARM else (request.kind,)
                held = self.store.hold_after
                upto = request.upto if held is None else min(request.upto, held)
                rows = self.store.fetch(request.after, upto=upto, kinds=kinds, limit=request.limit)
                plan.backlog_fetched(request, len(rows), held)
                for row in rows:
                    if not plan.may_send_backlog() or not session.publish_stored(row, hist=True):
                        plan.backlog_held(row.kind)
                        break
                    plan.backlog_sent(row.kind, row.seq, row.readings)
                    progressed = True
                    self.published += 1
                if plan.backlog_done:
                    log.info("uplink: backlog up to seq %d handed to the broker", plan.boundary)
            if loop.time() >= next_ack_flush:
                self.flush_acks()
                next_ack_flush = loop.time() + 0.2
            if progressed and len(session.inflight) < plan.window:
                await asyncio.sleep(0)
                continue
            if not self._woken and not session.closed.is_set():
                await self._nap(plan.wait_timeout())  # the session rouses it when the window has room again

    async def _health(self, session: Session) -> None:
        assert self.health is not None
        while True:
            await asyncio.sleep(self.cfg.health_interval)
            try:
                payload = encode(self.health())
            except Exception:
                log.exception("uplink: building the health message failed")
                continue
            self._confirm(session.publish_other(self.topic("health"), payload), "health")

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

"""A small MQTT 3.1.1/5.0 broker on asyncio, so `edge-agent demo` and the tests run with nothing but Python.

For demos and tests only, never production: it keeps nothing on disk, has no TLS, and accepts any user and password.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import secrets
import signal
from collections import deque
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

log = logging.getLogger(__name__)

# Control packet types.
CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH = 8, 9, 10, 11, 12, 13, 14, 15

# MQTT 5 reason codes used here.
RC_SUCCESS = 0x00
RC_DISCONNECT_WITH_WILL = 0x04
RC_NO_SUBSCRIPTION_EXISTED = 0x11
RC_MALFORMED = 0x81
RC_PROTOCOL_ERROR = 0x82
RC_UNSUPPORTED_VERSION = 0x84
RC_CLIENT_ID_NOT_VALID = 0x85
RC_BAD_AUTH_METHOD = 0x8C
RC_SERVER_SHUTTING_DOWN = 0x8B
RC_KEEPALIVE_TIMEOUT = 0x8D
RC_SESSION_TAKEN_OVER = 0x8E
RC_TOPIC_FILTER_INVALID = 0x8F
RC_TOPIC_NAME_INVALID = 0x90
RC_PACKET_ID_NOT_FOUND = 0x92
RC_TOPIC_ALIAS_INVALID = 0x94
RC_PACKET_TOO_LARGE = 0x95
RC_QUOTA_EXCEEDED = 0x97
RC_SHARED_SUBSCRIPTIONS_UNSUPPORTED = 0x9E
RC_SUBSCRIPTION_IDS_UNSUPPORTED = 0xA1

# MQTT 5 property identifiers used here.
P_SUBSCRIPTION_ID, P_SESSION_EXPIRY, P_ASSIGNED_CLIENT_ID, P_AUTH_METHOD = 0x0B, 0x11, 0x12, 0x15
P_WILL_DELAY, P_RECEIVE_MAXIMUM = 0x18, 0x21
P_TOPIC_ALIAS, P_USER_PROPERTY, P_MAXIMUM_PACKET_SIZE = 0x23, 0x26, 0x27
P_SUBSCRIPTION_IDS_AVAILABLE, P_SHARED_SUBSCRIPTIONS_AVAILABLE = 0x29, 0x2A

_BYTE_PROPS = frozenset({0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A})
_U16_PROPS = frozenset({0x13, 0x21, 0x22, 0x23})
_U32_PROPS = frozenset({0x02, 0x11, 0x18, 0x27})
_STRING_PROPS = frozenset({0x03, 0x08, 0x12, 0x15, 0x1A, 0x1C, 0x1F})
_BINARY_PROPS = frozenset({0x09, 0x16})
_REPEATABLE_PROPS = frozenset({P_USER_PROPERTY, P_SUBSCRIPTION_ID})

MAX_REMAINING_LENGTH = 268_435_455  # the largest value a 4-byte variable byte integer holds
# The fixed header flags each packet type must carry (PUBLISH's carry DUP/QoS/RETAIN and are checked apart).
_REQUIRED_FLAGS = {PUBREL: 0x2, SUBSCRIBE: 0x2, UNSUBSCRIBE: 0x2}
_CONNECT_TIMEOUT = 10.0
_CLOSE_GRACE = 5.0
_PINGRESP = b"\xd0\x00"


class _ProtocolViolation(Exception):
    """The peer broke the protocol; its connection is closed (with this reason code if it speaks MQTT 5)."""

    def __init__(self, message: str, reason: int = RC_PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.reason = reason


class _Malformed(_ProtocolViolation):
    def __init__(self, message: str) -> None:
        super().__init__(message, RC_MALFORMED)


class _Cursor:
    """Reads MQTT data types from one packet body, raising _Malformed when the body ends early."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise _Malformed("packet ends in the middle of a field")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def rest(self) -> bytes:
        return self.take(self.remaining())

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def varint(self) -> int:
        value = 0
        for shift in (0, 7, 14, 21):
            byte = self.u8()
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
        raise _Malformed("variable byte integer longer than 4 bytes")

    def binary(self) -> bytes:
        return self.take(self.u16())

    def string(self) -> str:
        try:
            text = self.binary().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _Malformed("string is not valid UTF-8") from exc
        if "\x00" in text:
            raise _Malformed("string contains U+0000")
        return text


@dataclass(slots=True)
class _Properties:
    """The MQTT 5 properties of one packet: raw bytes per property, and the values of the integer ones."""

    encoded: list[tuple[int, bytes]] = field(default_factory=list)
    ints: dict[int, int] = field(default_factory=dict)

    def __contains__(self, prop: int) -> bool:
        return any(pid == prop for pid, _ in self.encoded)

    def without(self, *props: int) -> bytes:
        return b"".join(raw for pid, raw in self.encoded if pid not in props)


def _read_properties(cur: _Cursor) -> _Properties:
    block = _Cursor(cur.take(cur.varint()))
    props = _Properties()
    seen: set[int] = set()
    while block.remaining():
        start = block.pos
        pid = block.varint()
        if pid in seen and pid not in _REPEATABLE_PROPS:
            raise _ProtocolViolation(f"property 0x{pid:02x} appears twice")
        seen.add(pid)
        if pid in _BYTE_PROPS:
            props.ints[pid] = block.u8()
        elif pid in _U16_PROPS:
            props.ints[pid] = block.u16()
        elif pid in _U32_PROPS:
            props.ints[pid] = block.u32()
        elif pid == P_SUBSCRIPTION_ID:
            props.ints[pid] = block.varint()
        elif pid in _STRING_PROPS:
            block.string()
        elif pid in _BINARY_PROPS:
            block.binary()
        elif pid == P_USER_PROPERTY:
            block.string()
            block.string()
        else:
            raise _Malformed(f"unknown property 0x{pid:02x}")
        props.encoded.append((pid, block.data[start : block.pos]))
    return props


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if not n:
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)


def _packet(first_byte: int, *parts: bytes) -> bytes:
    return b"".join((bytes((first_byte,)), _varint(sum(map(len, parts))), *parts))


def _string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return len(raw).to_bytes(2, "big") + raw


def _valid_topic_name(topic: str) -> bool:
    return bool(topic) and "+" not in topic and "#" not in topic


def _valid_topic_filter(topic_filter: str) -> bool:
    if not topic_filter:
        return False
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


def _matches(filter_levels: tuple[str, ...], topic_levels: list[str]) -> bool:
    # Topics starting with $ (such as $SYS) are not matched by a filter starting with a wildcard.
    if topic_levels[0].startswith("$") and filter_levels[0] in ("+", "#"):
        return False
    for i, level in enumerate(filter_levels):
        if level == "#":
            return True
        if i >= len(topic_levels) or (level != "+" and level != topic_levels[i]):
            return False
    return len(filter_levels) == len(topic_levels)


@dataclass(slots=True, frozen=True)
class _Message:
    """An application message as routed: `topic_field` is the topic already encoded for the wire."""

    topic: str
    topic_field: bytes
    payload: bytes
    qos: int
    retain: bool
    properties: bytes  # MQTT 5 PUBLISH properties to forward; empty when published over 3.1.1


@dataclass(slots=True)
class _Subscription:
    levels: tuple[str, ...]
    qos: int
    no_local: bool = False
    retain_as_published: bool = False


class _Connection:
    """One client connection: reads and handles its packets, and queues what is delivered to it."""

    def __init__(self, broker: EmbeddedBroker, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.broker = broker
        self.reader = reader
        self.transport = writer.transport
        self.task: asyncio.Task[None] | None = None
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.client_id = ""
        self.version = 4
        self.connected = False
        self.closed = False
        self.keepalive = 0
        self.will: _Message | None = None
        self.subscriptions: dict[str, _Subscription] = {}
        self.window = broker.max_inflight
        self.max_send_size = MAX_REMAINING_LENGTH + 5
        self._outbox: deque[tuple[_Message, int, bool, int]] = deque()
        self._outbox_bytes = 0
        self._inflight: set[int] = set()
        self._last_id = 0
        self._awaiting_release: set[int] = set()

    def __str__(self) -> str:
        return f"client {self.client_id!r} ({self.peer})" if self.client_id else f"connection {self.peer}"

    async def run(self) -> None:
        try:
            await self._serve()
        except _ProtocolViolation as exc:
            log.debug("%s: %s; closing the connection", self, exc)
            self.close(exc.reason)
        except TimeoutError:
            log.debug("%s: nothing received within the keepalive (or CONNECT) timeout", self)
            self.close(RC_KEEPALIVE_TIMEOUT)
        except (asyncio.IncompleteReadError, ConnectionError):
            log.debug("%s: connection lost", self)
        except Exception:
            # A bug here must cost one connection, never the broker.
            log.exception("%s: unexpected error; closing the connection", self)
        finally:
            self.close()

    async def _serve(self) -> None:
        async with asyncio.timeout(_CONNECT_TIMEOUT):
            packet_type, flags, body = await self._read_packet()
        self._on_connect(flags, body)
        deadline = self.keepalive * 1.5 if self.keepalive else None
        while not self.closed:
            async with asyncio.timeout(deadline):
                packet_type, flags, body = await self._read_packet()
            self._dispatch(packet_type, flags, body)

    async def _read_packet(self) -> tuple[int, int, bytes]:
        first = (await self.reader.readexactly(1))[0]
        packet_type, flags = first >> 4, first & 0x0F
        # Checked before reading the rest, so garbage is refused at its first byte.
        if not self.connected and packet_type != CONNECT:
            raise _ProtocolViolation("the first packet must be CONNECT")
        if packet_type == 0:
            raise _Malformed("packet type 0 is reserved")
        if packet_type != PUBLISH and flags != _REQUIRED_FLAGS.get(packet_type, 0):
            raise _Malformed(f"wrong fixed header flags for packet type {packet_type}")
        length = 0
        for shift in (0, 7, 14, 21):
            byte = (await self.reader.readexactly(1))[0]
            length |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
        else:
            raise _Malformed("remaining length longer than 4 bytes")
        if length > self.broker.max_packet_size:
            raise _ProtocolViolation(f"packet of {length} bytes exceeds the limit", RC_PACKET_TOO_LARGE)
        body = await self.reader.readexactly(length) if length else b""
        return packet_type, flags, body

    def _dispatch(self, packet_type: int, flags: int, body: bytes) -> None:
        if packet_type == PUBLISH:
            self._on_publish(flags, body)
        elif packet_type == PUBACK:
            self._on_puback(body)
        elif packet_type == PUBREL:
            self._on_pubrel(body)
        elif packet_type == SUBSCRIBE:
            self._on_subscribe(body)
        elif packet_type == UNSUBSCRIBE:
            self._on_unsubscribe(body)
        elif packet_type == PINGREQ:
            if body:
                raise _Malformed("PINGREQ has a body")
            self.send(_PINGRESP)
        elif packet_type == DISCONNECT:
            self._on_disconnect(body)
        else:
            raise _ProtocolViolation(f"unexpected packet type {packet_type} from a client")

    def _on_connect(self, flags: int, body: bytes) -> None:
        cur = _Cursor(body)
        name, level = cur.string(), cur.u8()
        if name not in ("MQTT", "MQIsdp"):
            raise _ProtocolViolation(f"unknown protocol name {name!r}")
        if (name, level) not in (("MQTT", 4), ("MQTT", 5), ("MQIsdp", 3)):
            self.send(_packet(0x20, b"\x00\x01"))  # 3.1.1 "unacceptable protocol version", understood by all
            raise _ProtocolViolation(f"unsupported protocol level {level}", RC_UNSUPPORTED_VERSION)
        self.version = 5 if level == 5 else 4
        connect_flags = cur.u8()
        will_flag, will_qos, will_retain = connect_flags & 0x04, (connect_flags >> 3) & 0x03, connect_flags & 0x20
        password_flag, username_flag = connect_flags & 0x40, connect_flags & 0x80
        if connect_flags & 0x01:
            raise _Malformed("reserved CONNECT flag is set")
        if will_qos == 3 or (not will_flag and (will_qos or will_retain)):
            raise _Malformed("invalid will QoS or retain flag")
        if self.version == 4 and password_flag and not username_flag:
            raise _Malformed("password without user name")
        keepalive = cur.u16()
        props = _read_properties(cur) if self.version == 5 else _Properties()
        client_id = cur.string()
        will = None
        if will_flag:
            will_props = _read_properties(cur) if self.version == 5 else _Properties()
            will_topic, will_payload = cur.string(), cur.binary()
            if not _valid_topic_name(will_topic):
                raise _ProtocolViolation("invalid will topic", RC_TOPIC_NAME_INVALID)
            will = _Message(
                will_topic,
                _string(will_topic),
                will_payload,
                will_qos,
                bool(will_retain),
                will_props.without(P_WILL_DELAY),
            )
        if username_flag:
            cur.string()
        if password_flag:
            cur.binary()
        if cur.remaining():
            raise _Malformed("bytes after the CONNECT payload")

        if P_AUTH_METHOD in props:
            self._refuse(RC_BAD_AUTH_METHOD, "enhanced authentication is not supported")
        if props.ints.get(P_RECEIVE_MAXIMUM) == 0 or props.ints.get(P_MAXIMUM_PACKET_SIZE) == 0:
            raise _ProtocolViolation("receive maximum and maximum packet size must not be 0")
        connack_props = bytearray()
        if not client_id:
            if self.version == 4 and not connect_flags & 0x02:
                self._refuse(RC_CLIENT_ID_NOT_VALID, "empty client id needs a clean session")
            client_id = f"auto-{secrets.token_hex(8)}"
            connack_props += bytes((P_ASSIGNED_CLIENT_ID,)) + _string(client_id)
        self.client_id = client_id
        self.keepalive = keepalive
        self.will = will
        self.window = min(self.broker.max_inflight, props.ints.get(P_RECEIVE_MAXIMUM, 65535))
        self.max_send_size = props.ints.get(P_MAXIMUM_PACKET_SIZE, self.max_send_size)

        self.broker._attach(self)
        self.connected = True
        if self.version == 5:
            if props.ints.get(P_SESSION_EXPIRY, 0):
                connack_props += bytes((P_SESSION_EXPIRY,)) + (0).to_bytes(4, "big")  # sessions end on close
            connack_props += bytes((P_MAXIMUM_PACKET_SIZE,)) + self.broker.max_packet_size.to_bytes(4, "big")
            connack_props += bytes((P_SUBSCRIPTION_IDS_AVAILABLE, 0, P_SHARED_SUBSCRIPTIONS_AVAILABLE, 0))
            self.send(_packet(0x20, b"\x00\x00", _varint(len(connack_props)), bytes(connack_props)))
        else:
            self.send(_packet(0x20, b"\x00\x00"))
        log.debug("%s connected (MQTT %s, keepalive %ss)", self, "5.0" if self.version == 5 else "3.1.1", keepalive)

    def _refuse(self, reason: int, message: str) -> None:
        if self.version == 5:
            self.send(_packet(0x20, bytes((0, reason)), b"\x00"))
        else:  # 3.1.1 return codes: 0x02 identifier rejected, 0x05 not authorized
            self.send(_packet(0x20, bytes((0, 0x02 if reason == RC_CLIENT_ID_NOT_VALID else 0x05))))
        raise _ProtocolViolation(message, reason)

    def _on_publish(self, flags: int, body: bytes) -> None:
        qos, retain = (flags >> 1) & 0x03, bool(flags & 0x01)
        if qos == 3:
            raise _Malformed("PUBLISH with QoS 3")
        if qos == 0 and flags & 0x08:
            raise _Malformed("DUP set on a QoS 0 PUBLISH")
        cur = _Cursor(body)
        topic = cur.string()
        topic_field = body[: cur.pos]
        packet_id = cur.u16() if qos else 0
        if qos and not packet_id:
            raise _Malformed("PUBLISH with packet id 0")
        properties = b""
        if self.version == 5:
            props = _read_properties(cur)
            if P_TOPIC_ALIAS in props:
                raise _ProtocolViolation("topic aliases are not supported", RC_TOPIC_ALIAS_INVALID)
            if P_SUBSCRIPTION_ID in props:
                raise _ProtocolViolation("a client must not send a subscription identifier in PUBLISH")
            properties = props.without()
        if not _valid_topic_name(topic):
            raise _ProtocolViolation(f"invalid topic name {topic!r}", RC_TOPIC_NAME_INVALID)
        message = _Message(topic, topic_field, cur.rest(), qos, retain, properties)
        ack = packet_id.to_bytes(2, "big") + (b"\x00\x00" if self.version == 5 else b"")
        if qos == 0:
            self.broker._publish(message, self)
        elif qos == 1:
            self.broker._publish(message, self)
            self.send(_packet(0x40, ack))
        else:
            # A resent QoS 2 packet id that was not yet released is answered again but routed only once.
            if packet_id not in self._awaiting_release:
                self._awaiting_release.add(packet_id)
                self.broker._publish(message, self)
            self.send(_packet(0x50, ack))

    def _on_puback(self, body: bytes) -> None:
        self._inflight.discard(_Cursor(body).u16())
        self._pump()

    def _on_pubrel(self, body: bytes) -> None:
        packet_id = _Cursor(body).u16()
        known = packet_id in self._awaiting_release
        self._awaiting_release.discard(packet_id)
        if self.version == 5:
            reason = RC_SUCCESS if known else RC_PACKET_ID_NOT_FOUND
            self.send(_packet(0x70, packet_id.to_bytes(2, "big"), bytes((reason, 0))))
        else:
            self.send(_packet(0x70, packet_id.to_bytes(2, "big")))

    def _on_subscribe(self, body: bytes) -> None:
        cur = _Cursor(body)
        packet_id = cur.u16()
        if self.version == 5 and P_SUBSCRIPTION_ID in _read_properties(cur):
            raise _ProtocolViolation("subscription identifiers are not supported", RC_SUBSCRIPTION_IDS_UNSUPPORTED)
        requests: list[tuple[str, int]] = []
        while cur.remaining():
            requests.append((cur.string(), cur.u8()))
        if not packet_id or not requests:
            raise _ProtocolViolation("SUBSCRIBE needs a packet id and at least one topic filter")
        codes = bytearray()
        new: list[_Subscription] = []
        for topic_filter, options in requests:
            qos, retain_handling = options & 0x03, (options >> 4) & 0x03
            reserved = options & (0xC0 if self.version == 5 else 0xFC)
            if qos == 3 or retain_handling == 3 or reserved:
                raise _Malformed(f"invalid subscription options 0x{options:02x}")
            if self.version == 5 and topic_filter.startswith("$share/"):
                codes.append(RC_SHARED_SUBSCRIPTIONS_UNSUPPORTED)
                continue
            if not _valid_topic_filter(topic_filter):
                codes.append(RC_TOPIC_FILTER_INVALID if self.version == 5 else 0x80)
                continue
            existed = topic_filter in self.subscriptions
            subscription = _Subscription(
                tuple(topic_filter.split("/")), min(qos, 1), bool(options & 0x04), bool(options & 0x08)
            )
            self.subscriptions[topic_filter] = subscription
            codes.append(subscription.qos)
            if retain_handling == 0 or (retain_handling == 1 and not existed):
                new.append(subscription)
        properties = b"\x00" if self.version == 5 else b""
        self.send(_packet(0x90, packet_id.to_bytes(2, "big"), properties, bytes(codes)))
        for subscription in new:
            for message in list(self.broker._retained.values()):
                if _matches(subscription.levels, message.topic.split("/")):
                    self.deliver(message, min(message.qos, subscription.qos), retain=True)

    def _on_unsubscribe(self, body: bytes) -> None:
        cur = _Cursor(body)
        packet_id = cur.u16()
        if self.version == 5:
            _read_properties(cur)
        filters: list[str] = []
        while cur.remaining():
            filters.append(cur.string())
        if not packet_id or not filters:
            raise _ProtocolViolation("UNSUBSCRIBE needs a packet id and at least one topic filter")
        codes = bytes(
            RC_SUCCESS if self.subscriptions.pop(f, None) is not None else RC_NO_SUBSCRIPTION_EXISTED for f in filters
        )
        if self.version == 5:
            self.send(_packet(0xB0, packet_id.to_bytes(2, "big"), b"\x00", codes))
        else:
            self.send(_packet(0xB0, packet_id.to_bytes(2, "big")))

    def _on_disconnect(self, body: bytes) -> None:
        reason = RC_SUCCESS
        if self.version == 5 and body:
            cur = _Cursor(body)
            reason = cur.u8()
            if cur.remaining():
                _read_properties(cur)
        if reason != RC_DISCONNECT_WITH_WILL:
            self.will = None
        log.debug("%s disconnected", self)
        self.close()

    def deliver(self, message: _Message, qos: int, retain: bool) -> None:
        """Queue one message for this client; drop the client if it is too far behind."""
        if self.closed:
            return
        size = len(message.payload) + len(message.topic_field) + len(message.properties) + 16
        self._outbox.append((message, qos, retain, size))
        self._outbox_bytes += size
        self._pump()
        behind = self._outbox_bytes + self.transport.get_write_buffer_size()
        if behind > self.broker.max_queued_bytes:
            log.warning("%s is %d bytes behind; disconnecting it", self, behind)
            self.close(RC_QUOTA_EXCEEDED, abort=True)

    def _pump(self) -> None:
        # One FIFO for QoS 0 and 1 keeps delivery in publish order; QoS 1 waits for a free in-flight slot.
        while self._outbox and not self.closed:
            message, qos, retain, size = self._outbox[0]
            if qos and len(self._inflight) >= self.window:
                return
            self._outbox.popleft()
            self._outbox_bytes -= size
            packet_id = self._next_packet_id() if qos else 0
            parts = [message.topic_field, packet_id.to_bytes(2, "big")] if qos else [message.topic_field]
            if self.version == 5:
                parts += (_varint(len(message.properties)), message.properties)
            parts.append(message.payload)
            data = _packet(0x30 | qos << 1 | retain, *parts)
            if len(data) > self.max_send_size:
                # MQTT 5: a message larger than the client accepts is discarded as if delivered.
                self._inflight.discard(packet_id)
                continue
            self.transport.write(data)

    def _next_packet_id(self) -> int:
        packet_id = self._last_id
        while True:
            packet_id = packet_id % 65535 + 1
            if packet_id not in self._inflight:
                break
        self._last_id = packet_id
        self._inflight.add(packet_id)
        return packet_id

    def send(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)

    def close(self, reason: int | None = None, *, abort: bool = False) -> None:
        """Close the connection once: tell an MQTT 5 client why, publish the will if still armed."""
        if self.closed:
            return
        if reason is not None and self.connected and self.version == 5:
            self.send(_packet(0xE0, bytes((reason,)), b"\x00"))
        self.closed = True
        if abort:
            self.transport.abort()
        else:
            self.transport.close()
            # A peer that never reads would keep a closing transport open forever.
            asyncio.get_running_loop().call_later(_CLOSE_GRACE, self.transport.abort)
        self._outbox.clear()
        self._outbox_bytes = 0
        self.broker._detach(self)
        will, self.will = self.will, None
        if will is not None:
            log.debug("%s: publishing its will on %r", self, will.topic)
            self.broker._publish(will, None)
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()


class EmbeddedBroker:
    """An in-process MQTT broker, started and stopped with `async with` (or `start()` / `stop()`).

    `port=0` binds a free port; read the bound one from `port` after start. Bind one address (not a name
    that resolves to several), since `port` reports the first socket's port.

    Choices worth knowing:
    - Sessions are always clean: session-present is 0 and nothing survives a disconnect.
    - QoS 2 publishes are accepted with their PUBREC/PUBREL/PUBCOMP handshake (each packet id is routed
      once), but subscriptions are granted at most QoS 1, so nothing is delivered at QoS 2.
    - MQTT 5: properties are parsed and checked, and PUBLISH properties are forwarded to MQTT 5 subscribers.
      Not supported, and said so in CONNACK or SUBACK: shared subscriptions, subscription identifiers, topic
      aliases, enhanced authentication. Will Delay and Message Expiry are ignored (wills go out at once).
    - A subscriber more than `max_queued_bytes` behind is disconnected (its will is published), so memory
      stays bounded; publishers never wait for subscribers.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 1883,
        *,
        max_queued_bytes: int = 64 * 1024 * 1024,
        max_packet_size: int = 16 * 1024 * 1024,
        max_inflight: int = 1024,
    ) -> None:
        """`max_queued_bytes`: a subscriber further behind is disconnected. `max_packet_size`: larger
        packets close the sender's connection. `max_inflight`: unacknowledged QoS 1 deliveries per client."""
        if not 0 < max_inflight <= 65535:
            raise ValueError("max_inflight must be between 1 and 65535")
        self.host = host
        self.max_queued_bytes = max_queued_bytes
        self.max_packet_size = min(max_packet_size, MAX_REMAINING_LENGTH)
        self.max_inflight = max_inflight
        self._port = port
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._clients: dict[str, _Connection] = {}
        self._retained: dict[str, _Message] = {}

    @property
    def port(self) -> int:
        """The bound port once started (the configured one before)."""
        return self._port

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("the broker is already started")
        # A larger stream limit means fewer read pauses with large payloads.
        self._server = await asyncio.start_server(self._accept, self.host, self._port, limit=1 << 20)
        self._port = self._server.sockets[0].getsockname()[1]
        log.info("MQTT broker listening on %s:%d", self.host, self._port)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for connection in list(self._connections):
            connection.will = None  # a will announces a client's failure, not the broker's shutdown
            connection.close(RC_SERVER_SHUTTING_DOWN, abort=True)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()
        self._retained.clear()
        log.info("MQTT broker on %s:%d stopped", self.host, self._port)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = _Connection(self, reader, writer)
        self._connections.add(connection)
        task = asyncio.create_task(connection.run(), name=f"mqtt-connection {connection.peer}")
        connection.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _attach(self, connection: _Connection) -> None:
        previous = self._clients.get(connection.client_id)
        if previous is not None:
            log.debug("%s: a new connection took over its client id", previous)
            previous.close(RC_SESSION_TAKEN_OVER)
        self._clients[connection.client_id] = connection

    def _detach(self, connection: _Connection) -> None:
        self._connections.discard(connection)
        if self._clients.get(connection.client_id) is connection:
            del self._clients[connection.client_id]

    def _publish(self, message: _Message, sender: _Connection | None) -> None:
        """Store a retained message and queue the message to every matching subscriber, synchronously."""
        if message.retain:
            if message.payload:
                self._retained[message.topic] = message
            else:
                self._retained.pop(message.topic, None)
        topic_levels = message.topic.split("/")
        for client in list(self._clients.values()):  # a client may be dropped while routing
            qos = -1
            retain_as_published = False
            for subscription in client.subscriptions.values():
                if subscription.no_local and client is sender:
                    continue
                if _matches(subscription.levels, topic_levels):
                    qos = max(qos, subscription.qos)
                    retain_as_published = retain_as_published or subscription.retain_as_published
            if qos >= 0:
                client.deliver(message, min(message.qos, qos), message.retain and retain_as_published)


async def _run_until_signalled(host: str, port: int) -> None:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    async with EmbeddedBroker(host, port) as broker:
        print(f"listening on {host}:{broker.port}", flush=True)
        await stopping.wait()


def main(argv: list[str] | None = None) -> None:
    """Run the broker in the foreground until SIGINT or SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m simulators.broker", description="Embedded MQTT broker for demos and tests (not production)."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=1883, help="port to bind, 0 for any free one (default 1883)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log connections and protocol errors")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_run_until_signalled(args.host, args.port))


if __name__ == "__main__":
    main()

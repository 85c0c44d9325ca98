"""The embedded broker, driven by real paho-mqtt clients (and raw sockets where a client must misbehave)."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from simulators.broker import EmbeddedBroker

WAIT = 10.0  # upper bound for anything that should happen promptly
QUIET = 0.5  # how long "nothing arrives" is watched
PROTOCOLS = [
    pytest.param(MQTTProtocolVersion.MQTTv311, id="mqtt311"),
    pytest.param(MQTTProtocolVersion.MQTTv5, id="mqtt5"),
]

pytestmark = pytest.mark.timeout(30)


@contextlib.contextmanager
def running_broker(**options: Any) -> Iterator[EmbeddedBroker]:
    """An EmbeddedBroker on a free loopback port, served by an event loop in a background thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="broker-loop", daemon=True)
    thread.start()
    broker = EmbeddedBroker("127.0.0.1", 0, **options)
    try:
        asyncio.run_coroutine_threadsafe(broker.start(), loop).result(WAIT)
        yield broker
    finally:
        asyncio.run_coroutine_threadsafe(broker.stop(), loop).result(WAIT)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(WAIT)
        loop.close()


@pytest.fixture
def port() -> Iterator[int]:
    with running_broker() as broker:
        yield broker.port


class Peer:
    """A paho client on its own network thread; what it receives is queued for the test to inspect."""

    def __init__(
        self,
        port: int,
        protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv311,
        client_id: str = "",
        will: tuple[str, bytes, int, bool] | None = None,
    ) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.subacks: queue.Queue[list[Any]] = queue.Queue()
        self.pubacks: queue.Queue[tuple[int, Any]] = queue.Queue()
        self.connected = threading.Event()
        self.connack_properties: Any = None
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda _c, _u, message: self.messages.put(message)
        self.client.on_subscribe = lambda _c, _u, _mid, codes, _p: self.subacks.put(list(codes))
        self.client.on_unsubscribe = lambda _c, _u, _mid, codes, _p: self.subacks.put(list(codes))
        self.client.on_publish = lambda _c, _u, mid, code, _p: self.pubacks.put((mid, code))
        if will is not None:
            self.client.will_set(*will)
        self.client.connect("127.0.0.1", port, keepalive=60)
        self.client.loop_start()
        assert self.connected.wait(WAIT), "no CONNACK"

    def _on_connect(self, _c: Any, _u: Any, _flags: Any, code: Any, properties: Any) -> None:
        assert not code.is_failure
        self.connack_properties = properties
        self.connected.set()

    def subscribe(self, topic: str, qos: int = 1, options: SubscribeOptions | None = None) -> list[Any]:
        self.client.subscribe(topic, 0 if options else qos, options=options)
        return self.subacks.get(timeout=WAIT)

    def unsubscribe(self, topic: str) -> None:
        self.client.unsubscribe(topic)
        self.subacks.get(timeout=WAIT)

    def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, properties: Any = None
    ) -> mqtt.MQTTMessageInfo:
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        info.wait_for_publish(WAIT)
        return info

    def receive(self) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=WAIT)

    def receive_until(self, last_topic: str) -> list[mqtt.MQTTMessage]:
        received = []
        while (message := self.receive()).topic != last_topic:
            received.append(message)
        return received

    def assert_nothing_received(self) -> None:
        with pytest.raises(queue.Empty):
            self.messages.get(timeout=QUIET)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def peers() -> Iterator[list[Peer]]:
    opened: list[Peer] = []
    yield opened
    for peer in opened:
        peer.close()


def connect_peer(peers: list[Peer], port: int, **options: Any) -> Peer:
    peer = Peer(port, **options)
    peers.append(peer)
    return peer


# Raw MQTT 3.1.1 packets, written from the spec, for clients that must misbehave.


def encode_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def encode_string(text: str) -> bytes:
    raw = text.encode()
    return len(raw).to_bytes(2, "big") + raw


def connect_packet(client_id: str, keepalive: int = 60, will: tuple[str, bytes] | None = None) -> bytes:
    flags, payload = 0x02, encode_string(client_id)
    if will is not None:
        flags |= 0x04 | 0x08  # will at QoS 1
        payload += encode_string(will[0]) + len(will[1]).to_bytes(2, "big") + will[1]
    body = encode_string("MQTT") + bytes((4, flags)) + keepalive.to_bytes(2, "big") + payload
    return b"\x10" + encode_length(len(body)) + body


def subscribe_packet(topic_filter: str, qos: int) -> bytes:
    body = (1).to_bytes(2, "big") + encode_string(topic_filter) + bytes((qos,))
    return b"\x82" + encode_length(len(body)) + body


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "connection closed early"
        data += chunk
    return data


def raw_client(port: int, client_id: str, keepalive: int = 60, will: tuple[str, bytes] | None = None) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    sock.sendall(connect_packet(client_id, keepalive, will))
    assert recv_exactly(sock, 4) == b"\x20\x02\x00\x00"  # CONNACK accepted, no session present
    return sock


def closed_by_broker(sock: socket.socket) -> bool:
    """True once the broker has closed the connection (after whatever it sent before)."""
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_subscriber_receives_at_the_lower_of_publish_and_subscription_qos(
    port: int, peers: list[Peer], protocol: MQTTProtocolVersion
) -> None:
    subscriber = connect_peer(peers, port, protocol=protocol)
    publisher = connect_peer(peers, port, protocol=protocol)
    assert subscriber.subscribe("plant/q1", qos=1) == [1]
    assert subscriber.subscribe("plant/q0", qos=0) == [0]
    payload = bytes(range(256)) * 80  # 20 KB, like a batch of readings

    publisher.publish("plant/q1", b"qos0", qos=0)
    publisher.publish("plant/q1", payload, qos=1)
    publisher.publish("plant/q0", b"downgraded", qos=1)

    received = [subscriber.receive() for _ in range(3)]
    assert [(m.topic, m.payload, m.qos) for m in received] == [
        ("plant/q1", b"qos0", 0),
        ("plant/q1", payload, 1),
        ("plant/q0", b"downgraded", 0),
    ]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_qos1_publisher_receives_puback(port: int, peers: list[Peer], protocol: MQTTProtocolVersion) -> None:
    publisher = connect_peer(peers, port, protocol=protocol)

    info = publisher.publish("plant/data", b"{}", qos=1)

    assert info.is_published()
    mid, code = publisher.pubacks.get(timeout=WAIT)
    assert mid == info.mid
    assert not code.is_failure


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_qos2_publish_completes_and_is_delivered_once_at_qos1(
    port: int, peers: list[Peer], protocol: MQTTProtocolVersion
) -> None:
    subscriber = connect_peer(peers, port, protocol=protocol)
    publisher = connect_peer(peers, port, protocol=protocol)
    assert subscriber.subscribe("plant/exact", qos=2) == [1]  # granted QoS 1 at most

    assert publisher.publish("plant/exact", b"once", qos=2).is_published()

    message = subscriber.receive()
    assert (message.payload, message.qos) == (b"once", 1)
    subscriber.assert_nothing_received()


def test_wildcards_match_levels_and_leading_wildcards_skip_dollar_topics(port: int, peers: list[Peer]) -> None:
    levels = connect_peer(peers, port)
    everything = connect_peer(peers, port, protocol=MQTTProtocolVersion.MQTTv5)
    system = connect_peer(peers, port)
    for peer, filters in ((levels, ["plant/+/temp", "alarm/#"]), (everything, ["#", "+/info"]), (system, ["$SYS/#"])):
        for topic_filter in [*filters, "end"]:
            peer.subscribe(topic_filter)
    publisher = connect_peer(peers, port)
    topics = ["plant/a/temp", "plant/a/b/temp", "plant/temp", "alarm", "alarm/x/y", "other/info", "$SYS/info"]

    for topic in [*topics, "end"]:
        publisher.publish(topic, topic.encode())

    assert [m.topic for m in levels.receive_until("end")] == ["plant/a/temp", "alarm", "alarm/x/y"]
    assert [m.topic for m in everything.receive_until("end")] == topics[:-1]  # "other/info" only once
    assert [m.topic for m in system.receive_until("end")] == ["$SYS/info"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_unsubscribe_stops_delivery(port: int, peers: list[Peer], protocol: MQTTProtocolVersion) -> None:
    subscriber = connect_peer(peers, port, protocol=protocol)
    publisher = connect_peer(peers, port, protocol=protocol)
    subscriber.subscribe("plant/data")
    subscriber.unsubscribe("plant/data")

    publisher.publish("plant/data", b"x")

    subscriber.assert_nothing_received()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_retained_message_is_delivered_on_subscribe_with_retain_flag(
    port: int, peers: list[Peer], protocol: MQTTProtocolVersion
) -> None:
    publisher = connect_peer(peers, port, protocol=protocol)
    live = connect_peer(peers, port, protocol=protocol)
    live.subscribe("agent/status")

    publisher.publish("agent/status", b'{"online": true}', qos=1, retain=True)
    late = connect_peer(peers, port, protocol=protocol)
    late.subscribe("agent/+")

    retained = late.receive()
    assert (retained.topic, retained.payload, retained.retain) == ("agent/status", b'{"online": true}', True)
    forwarded = live.receive()
    assert (forwarded.payload, forwarded.retain) == (b'{"online": true}', False)  # live delivery clears it


def test_empty_retained_payload_deletes_the_retained_message(port: int, peers: list[Peer]) -> None:
    publisher = connect_peer(peers, port)
    publisher.publish("agent/status", b"online", retain=True)
    publisher.publish("agent/status", b"", retain=True)

    late = connect_peer(peers, port)
    late.subscribe("agent/status")

    late.assert_nothing_received()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_last_will_is_published_when_the_socket_closes_without_disconnect(
    port: int, peers: list[Peer], protocol: MQTTProtocolVersion
) -> None:
    watcher = connect_peer(peers, port)
    watcher.subscribe("agent/status")
    dying = Peer(port, protocol=protocol, will=("agent/status", b'{"online": false}', 1, True))

    dying.client.loop_stop()
    dying_socket = dying.client.socket()
    assert dying_socket is not None
    dying_socket.close()

    will = watcher.receive()
    assert (will.topic, will.payload) == ("agent/status", b'{"online": false}')
    late = connect_peer(peers, port)
    late.subscribe("agent/status")
    assert late.receive().payload == b'{"online": false}'  # the will was retained


def test_clean_disconnect_discards_the_last_will(port: int, peers: list[Peer]) -> None:
    watcher = connect_peer(peers, port)
    watcher.subscribe("agent/status")
    leaving = Peer(port, will=("agent/status", b"gone", 1, False))

    leaving.close()

    watcher.assert_nothing_received()


def test_last_will_is_published_when_keepalive_expires(port: int, peers: list[Peer]) -> None:
    watcher = connect_peer(peers, port)
    watcher.subscribe("agent/status")

    with raw_client(port, "silent", keepalive=1, will=("agent/status", b"timed out")) as silent:
        will = watcher.receive()  # after 1.5 × keepalive without a packet
        assert will.payload == b"timed out"
        assert closed_by_broker(silent)


def test_pingreq_is_answered_with_pingresp(port: int) -> None:
    with raw_client(port, "pinger") as sock:
        sock.sendall(b"\xc0\x00")
        assert recv_exactly(sock, 2) == b"\xd0\x00"


def test_second_connection_with_the_same_client_id_disconnects_the_first(port: int, peers: list[Peer]) -> None:
    with raw_client(port, "ipc-01") as first:
        second = connect_peer(peers, port, client_id="ipc-01")

        assert closed_by_broker(first)
        second.subscribe("still/working")
        second.publish("still/working", b"yes")
        assert second.receive().payload == b"yes"


def test_mqtt5_publish_properties_are_forwarded_to_mqtt5_subscribers(port: int, peers: list[Peer]) -> None:
    subscriber = connect_peer(peers, port, protocol=MQTTProtocolVersion.MQTTv5)
    subscriber.subscribe("plant/data")
    publisher = connect_peer(peers, port, protocol=MQTTProtocolVersion.MQTTv5)
    properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]  # paho leaves it untyped
    properties.ContentType = "application/json"
    properties.UserProperty = [("schema", "v1")]

    publisher.publish("plant/data", b"{}", properties=properties)

    received: Any = subscriber.receive().properties
    assert (received.ContentType, received.UserProperty) == ("application/json", [("schema", "v1")])


def test_mqtt5_no_local_subscription_skips_the_clients_own_messages(port: int, peers: list[Peer]) -> None:
    peer = connect_peer(peers, port, protocol=MQTTProtocolVersion.MQTTv5)
    peer.subscribe("cmd/#", options=SubscribeOptions(qos=1, noLocal=True))
    other = connect_peer(peers, port, protocol=MQTTProtocolVersion.MQTTv5)

    peer.publish("cmd/own", b"mine")
    other.publish("cmd/other", b"theirs")

    assert peer.receive().payload == b"theirs"
    peer.assert_nothing_received()


def test_mqtt5_client_without_id_is_assigned_one(port: int, peers: list[Peer]) -> None:
    peer = connect_peer(peers, port, protocol=MQTTProtocolVersion.MQTTv5)

    assert peer.connack_properties.AssignedClientIdentifier


GARBAGE = [
    pytest.param(b"", b"\xde\xad\xbe\xef" * 4, id="garbage-instead-of-connect"),
    pytest.param(connect_packet("bad-length"), b"\x30\xff\xff\xff\xff\x01", id="remaining-length-over-4-bytes"),
    pytest.param(connect_packet("bad-utf8"), b"\x30\x05\x00\x02\xc3\x28x", id="topic-not-utf8"),
    pytest.param(connect_packet("bad-type"), b"\x00\x00", id="reserved-packet-type"),
    pytest.param(connect_packet("bad-flags"), b"\x80\x02\x00\x01", id="subscribe-with-wrong-flags"),
    pytest.param(connect_packet("short"), b"\x82\x03\x00\x01\x00", id="subscribe-cut-short"),
    pytest.param(connect_packet("twice"), connect_packet("twice"), id="second-connect"),
]


@pytest.mark.parametrize(("hello", "garbage"), GARBAGE)
def test_malformed_packet_closes_only_that_connection(
    port: int, peers: list[Peer], hello: bytes, garbage: bytes
) -> None:
    subscriber = connect_peer(peers, port)
    subscriber.subscribe("plant/data")
    publisher = connect_peer(peers, port)

    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as bad:
        if hello:
            bad.sendall(hello)
            assert recv_exactly(bad, 4) == b"\x20\x02\x00\x00"
        bad.sendall(garbage)
        assert closed_by_broker(bad)

    publisher.publish("plant/data", b"after")
    assert subscriber.receive().payload == b"after"


def test_subscriber_too_far_behind_is_disconnected_and_others_keep_working(peers: list[Peer]) -> None:
    with running_broker(max_queued_bytes=1 << 20) as broker:
        watcher = connect_peer(peers, broker.port)
        watcher.subscribe("agent/status")
        publisher = connect_peer(peers, broker.port)
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # small, so the broker's queue fills
        stalled.settimeout(WAIT)
        stalled.connect(("127.0.0.1", broker.port))
        with stalled:
            stalled.sendall(connect_packet("stalled", will=("agent/status", b"stalled dropped")))
            assert recv_exactly(stalled, 4) == b"\x20\x02\x00\x00"
            stalled.sendall(subscribe_packet("bulk", 0))
            assert recv_exactly(stalled, 5) == b"\x90\x03\x00\x01\x00"

            for _ in range(1000):  # 20 MB, far more than socket buffers and the 1 MB limit hold
                publisher.client.publish("bulk", b"x" * 20_000, qos=0)
            assert publisher.publish("bulk", b"last", qos=1).is_published()

            assert watcher.receive().payload == b"stalled dropped"
            assert closed_by_broker(stalled)
        for peer in peers:
            peer.close()
        peers.clear()


def test_async_context_manager_binds_a_free_port_and_releases_it() -> None:
    async def scenario() -> int:
        async with EmbeddedBroker(host="127.0.0.1", port=0) as broker:
            reader, writer = await asyncio.open_connection("127.0.0.1", broker.port)
            writer.write(connect_packet("async"))
            assert await reader.readexactly(4) == b"\x20\x02\x00\x00"
            writer.close()
            return broker.port

    bound = asyncio.run(scenario())

    assert bound > 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", bound), timeout=WAIT).close()


def test_command_line_broker_announces_its_address_and_stops_on_sigterm(peers: list[Peer]) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "simulators.broker", "--host", "127.0.0.1", "--port", "0"],
        cwd=Path(__file__).resolve().parents[1],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        assert line.startswith("listening on 127.0.0.1:")
        peer = connect_peer(peers, int(line.rsplit(":", 1)[1]))
        peer.subscribe("cli/check")
        peer.publish("cli/check", b"ok")
        assert peer.receive().payload == b"ok"

        process.send_signal(signal.SIGTERM)
        assert process.wait(WAIT) == 0
    finally:
        process.kill()
        process.wait(WAIT)

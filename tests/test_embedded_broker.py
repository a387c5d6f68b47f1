"""The embedded demo/test MQTT broker: its codec, paho clients, raw sockets and the real uplink."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties
from paho.mqtt.subscribeoptions import SubscribeOptions

from meter_gateway.drivers.backoff import BackoffPolicy
from meter_gateway.drivers.reading import Reading
from meter_gateway.gateway import mqtt_contract as contract
from meter_gateway.gateway import mqtt_packets as mp
from meter_gateway.gateway.embedded_broker import BrokerThread
from meter_gateway.gateway.local_broker import ENV_MOSQUITTO, LocalBroker, find_mosquitto
from meter_gateway.gateway.outbox import AsyncOutbox
from meter_gateway.gateway.uplink import Protocol, Uplink, UplinkConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def broker() -> Iterator[BrokerThread]:
    with BrokerThread() as running:
        yield running


def wait_until(cond: Callable[[], object], within: float = 5.0, what: str = "condition") -> None:
    end = time.monotonic() + within
    while not cond():
        assert time.monotonic() < end, f"{what} not reached within {within} s"
        time.sleep(0.01)


# -- clients -----------------------------------------------------------------------------------


@dataclass
class Got:
    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass
class Paho:
    """A threaded paho client that records what happens to it (``broker``: anything with host/port)."""

    broker: BrokerThread | LocalBroker
    version: MQTTProtocolVersion = mqtt.MQTTv5
    client_id: str = field(default_factory=lambda: f"t-{uuid.uuid4().hex[:8]}")
    will: tuple[str, bytes, bool] | None = None
    messages: list[Got] = field(default_factory=list)
    connack: Any = None
    connack_props: Any = None
    granted: list[int] = field(default_factory=list)
    acks: dict[int, int] = field(default_factory=dict)  # mid -> PUBACK reason code
    disconnect_reason: int | None = None

    def __post_init__(self) -> None:
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.gone = threading.Event()
        self.lock = threading.Lock()
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=self.version,
            reconnect_on_failure=False,
        )
        if self.will is not None:
            self.client.will_set(self.will[0], self.will[1], qos=1, retain=self.will[2])
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        self.client.on_disconnect = self._on_disconnect

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any = None) -> None:
        self.connack, self.connack_props = reason, props
        self.connected.set()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self.lock:
            self.messages.append(Got(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain)))

    def _on_subscribe(self, client: Any, userdata: Any, mid: Any, codes: Any, props: Any = None) -> None:
        self.granted = [c.value if hasattr(c, "value") else int(c) for c in codes]
        self.subscribed.set()

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any = None) -> None:
        self.acks[mid] = int(reason.value)

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any = None) -> None:
        self.disconnect_reason = int(reason.value)
        self.gone.set()

    def start(self, keepalive: int = 30) -> Paho:
        self.client.connect(self.broker.host, self.broker.port, keepalive=keepalive)
        self.client.loop_start()
        assert self.connected.wait(5), "no CONNACK"
        return self

    def subscribe(self, *topics: str | tuple[str, SubscribeOptions]) -> list[int]:
        self.subscribed.clear()
        subs = [t if isinstance(t, tuple) else (t, SubscribeOptions(qos=1)) for t in topics]
        if self.version != mqtt.MQTTv5:
            self.client.subscribe([(t, o.QoS) for t, o in subs])
        else:
            self.client.subscribe(subs)
        assert self.subscribed.wait(5), "no SUBACK"
        return self.granted

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> int | None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if qos == 0:
            return None
        wait_until(lambda: info.mid in self.acks, what="PUBACK")
        return self.acks[info.mid]

    def got(self, topic: str | None = None) -> list[Got]:
        with self.lock:
            return [m for m in self.messages if topic is None or m.topic == topic]

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def paho(broker: BrokerThread) -> Iterator[Callable[..., Paho]]:
    made: list[Paho] = []

    def make(**kwargs: Any) -> Paho:
        client = Paho(broker, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        client.stop()


class Raw:
    """A blocking socket speaking MQTT through the codec, for what paho will not send."""

    def __init__(self, broker: BrokerThread, *, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket()
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect((broker.host, broker.port))
        self.sock.settimeout(5)
        self.reader = mp.PacketReader()
        self.pending: list[mp.RawPacket] = []

    def connect(self, client_id: str, version: int = mp.MQTT_5, **kwargs: Any) -> mp.RawPacket:
        self.sock.sendall(mp.encode_connect(mp.Connect(version, client_id, True, 30, **kwargs)))
        connack = self.next()
        assert connack.type is mp.PacketType.CONNACK
        return connack

    def next(self) -> mp.RawPacket:
        while not self.pending:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed by the broker")
            self.pending += self.reader.feed(data)
        return self.pending.pop(0)

    def closed(self) -> bool:
        """Read until the broker closes; True if it did (packets on the way are skipped)."""
        try:
            while True:
                self.next()
        except ConnectionError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw(broker: BrokerThread) -> Iterator[Callable[..., Raw]]:
    made: list[Raw] = []

    def make(target: BrokerThread | None = None, **kwargs: Any) -> Raw:
        client = Raw(target or broker, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


# -- codec -------------------------------------------------------------------------------------

_text = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00+#"), min_size=1, max_size=30)
_props = st.lists(
    st.one_of(
        st.tuples(st.just(mp.Prop.CONTENT_TYPE), _text),
        st.tuples(st.just(mp.Prop.CORRELATION_DATA), st.binary(max_size=20)),
        st.tuples(st.just(mp.Prop.MESSAGE_EXPIRY_INTERVAL), st.integers(0, 2**32 - 1)),
        st.tuples(st.just(mp.Prop.USER_PROPERTY), st.tuples(_text, _text)),
    ),
    max_size=4,
    unique_by=lambda p: p[0] if p[0] != mp.Prop.USER_PROPERTY else object(),
).map(lambda items: mp.Properties(tuple(items)))


@st.composite
def publishes(draw: st.DrawFn) -> mp.Publish:
    qos = draw(st.integers(0, 1))
    return mp.Publish(
        topic=draw(_text),
        payload=draw(st.binary(max_size=300)),
        qos=qos,
        retain=draw(st.booleans()),
        dup=qos > 0 and draw(st.booleans()),
        packet_id=draw(st.integers(1, 65535)) if qos else None,
        properties=draw(_props),
    )


@given(msgs=st.lists(publishes(), min_size=1, max_size=6), cuts=st.lists(st.integers(1, 50), max_size=200))
@settings(max_examples=150, deadline=None)
def test_packets_fed_in_random_chunks_decode_to_what_was_encoded(msgs: list[mp.Publish], cuts: list[int]) -> None:
    stream = b"".join(mp.encode_publish(m, mp.MQTT_5) for m in msgs)
    reader = mp.PacketReader()
    packets: list[mp.RawPacket] = []
    pos = 0
    for n in [*cuts, len(stream)]:
        packets += reader.feed(stream[pos : pos + n])
        pos += n
    assert [mp.decode_publish(p.flags, p.body, mp.MQTT_5) for p in packets] == msgs


def test_connect_and_subscribe_fed_byte_by_byte_round_trip() -> None:
    will = mp.Publish("gw/status", b"offline", 1, True, properties=mp.Properties(((mp.Prop.CONTENT_TYPE, "json"),)))
    connect = mp.Connect(mp.MQTT_5, "gw-1", True, 30, mp.Properties(((mp.Prop.RECEIVE_MAXIMUM, 20),)), will, "u", b"p")
    sub = mp.Subscribe(7, (mp.SubscriptionRequest("a/+/c", 1, True, True, 2), mp.SubscriptionRequest("#", 0)))
    stream = mp.encode_connect(connect) + mp.encode_subscribe(sub, mp.MQTT_5)
    reader = mp.PacketReader()
    got = [p for i in range(len(stream)) for p in reader.feed(stream[i : i + 1])]
    assert [p.type for p in got] == [mp.PacketType.CONNECT, mp.PacketType.SUBSCRIBE]
    assert mp.decode_connect(got[0].body) == connect
    assert mp.decode_subscribe(got[1].body, mp.MQTT_5) == sub
    v311 = mp.Connect(mp.MQTT_311, "old", False, 60)
    assert mp.decode_connect(mp.encode_connect(v311)[2:]) == v311


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x30\xff\xff\xff\xff\x01", mp.MALFORMED),  # remaining length of 5 bytes
        (b"\x80\x05\x00\x01\x00\x01a", mp.MALFORMED),  # SUBSCRIBE with flags 0, not 2
        (b"\x00\x00", mp.MALFORMED),  # packet type 0
        (b"\x30\xff\xff\x7f", mp.PACKET_TOO_LARGE),  # 2 MB announced, never buffered
    ],
)
def test_framing_errors_are_malformed_packets(data: bytes, reason: int) -> None:
    with pytest.raises(mp.MalformedPacket) as err:
        mp.PacketReader(max_size=1024 * 1024).feed(data)
    assert err.value.reason == reason


@pytest.mark.parametrize(
    "decode",
    [
        lambda: mp.decode_publish(0b0110, b"\x00\x01a", mp.MQTT_5),  # QoS 3
        lambda: mp.decode_publish(0, b"\x00\x05ab", mp.MQTT_5),  # string past the end
        lambda: mp.decode_publish(0, b"\x00\x02\xff\xfe\x00", mp.MQTT_5),  # not UTF-8
        lambda: mp.decode_publish(0, b"\x00\x03a/#\x00", mp.MQTT_5),  # wildcard in a topic name
        lambda: mp.decode_publish(0, b"\x00\x01a\x02\x7f\x00", mp.MQTT_5),  # unknown property
        lambda: mp.decode_subscribe(b"\x00\x01\x00\x00\x01a\x30", mp.MQTT_5),  # Retain Handling 3
        lambda: mp.decode_subscribe(b"\x00\x01\x00\x01a\x04", mp.MQTT_311),  # 3.1.1 reserved bits
        lambda: mp.decode_subscribe(b"\x00\x01\x00", mp.MQTT_5),  # no filter
        lambda: mp.decode_connect(b"\x00\x04MQTT\x05\x03\x00\x1e\x00\x00\x00"),  # reserved flag
    ],
)
def test_bad_bodies_are_malformed_packets(decode: Callable[[], object]) -> None:
    with pytest.raises(mp.MalformedPacket):
        decode()


@pytest.mark.parametrize(
    ("topic_filter", "topic", "match"),
    [
        ("a/+/c", "a/b/c", True),
        ("a/+/c", "a/b/d", False),
        ("a/+", "a/b/c", False),
        ("a/#", "a", True),
        ("a/#", "a/b/c", True),
        ("#", "$SYS/x", False),
        ("+/x", "$SYS/x", False),
        ("$SYS/#", "$SYS/x", True),
        ("+/+", "/x", True),
        ("a", "a/b", False),
    ],
)
def test_topic_matching(topic_filter: str, topic: str, match: bool) -> None:
    assert mp.topic_matches(topic_filter, topic) is match


def test_invalid_filters_are_spotted() -> None:
    assert all(mp.valid_topic_filter(f) for f in ("#", "a/+/b", "+", "a/#", "/"))
    assert not any(mp.valid_topic_filter(f) for f in ("", "a#", "a/#/b", "a+/b", "a/b+"))


# -- paho against the broker -------------------------------------------------------------------


def test_mqtt5_connack_announces_the_brokers_limits(paho: Callable[..., Paho]) -> None:
    client = paho().start()
    assert client.connack == 0
    props = client.connack_props
    assert props.ReceiveMaximum >= 1
    assert props.TopicAliasMaximum == 0
    assert props.MaximumQoS == 1
    assert props.RetainAvailable == 1
    assert props.SharedSubscriptionAvailable == 0
    anonymous = paho(client_id="").start()
    assert anonymous.connack_props.AssignedClientIdentifier.startswith("embedded-")


def test_mqtt31_is_refused_with_the_311_return_code(paho: Callable[..., Paho], raw: Callable[..., Raw]) -> None:
    old = paho(version=mqtt.MQTTv31)
    old.client.connect(old.broker.host, old.broker.port)
    old.client.loop_start()
    assert old.connected.wait(5)
    assert old.connack.getName() == "Unsupported protocol version"
    conn = raw()
    conn.sock.sendall(b"\x10\x0e\x00\x06MQIsdp\x03\x02\x00\x1e\x00\x00")
    assert conn.next().body == b"\x00\x01"  # 3.1.1 return code 1: what the uplink's fallback looks for
    assert conn.closed()


def test_mqtt311_client_publishes_and_receives(paho: Callable[..., Paho]) -> None:
    sub = paho(version=mqtt.MQTTv311).start()
    assert sub.subscribe("t/311") == [1]
    pub = paho(version=mqtt.MQTTv311).start()
    assert pub.publish("t/311", b"hello") == 0
    wait_until(lambda: sub.got("t/311"))
    assert sub.got() == [Got("t/311", b"hello", 1, False)]


def test_qos1_puback_says_whether_anyone_subscribed(paho: Callable[..., Paho]) -> None:
    pub = paho().start()
    assert pub.publish("nobody/here", b"x") == 0x10  # no matching subscribers: still a success
    sub = paho().start()
    sub.subscribe("somebody/here")
    assert pub.publish("somebody/here", b"y") == 0
    wait_until(sub.got, what="delivery")
    assert sub.got()[0].qos == 1


def test_qos2_subscription_is_granted_qos1_and_qos0_stays_qos0(paho: Callable[..., Paho]) -> None:
    sub = paho().start()
    assert sub.subscribe(("q/two", SubscribeOptions(qos=2)), ("q/zero", SubscribeOptions(qos=0))) == [1, 0]
    pub = paho().start()
    pub.publish("q/zero", b"a", qos=1)
    pub.publish("q/two", b"b", qos=0)
    wait_until(lambda: len(sub.got()) == 2)
    assert {(m.topic, m.qos) for m in sub.got()} == {("q/zero", 0), ("q/two", 0)}


def test_wildcards_deliver_once_per_client(paho: Callable[..., Paho]) -> None:
    sub = paho().start()
    sub.subscribe("site/+/meter/#", "site/north/meter/7")
    other = paho().start()
    other.subscribe("site/south/#")
    pub = paho().start()
    for topic in ("site/north/meter/7", "site/south/meter/1/energy", "site/north/other", "site/south/meter"):
        pub.publish(topic, topic.encode())
    wait_until(lambda: len(other.got()) == 2)
    time.sleep(0.1)
    assert [m.topic for m in sub.got()] == ["site/north/meter/7", "site/south/meter/1/energy", "site/south/meter"]
    assert [m.topic for m in other.got()] == ["site/south/meter/1/energy", "site/south/meter"]


def test_retained_messages_are_delivered_on_subscribe_and_deleted_by_empty_payload(
    paho: Callable[..., Paho], broker: BrokerThread
) -> None:
    pub = paho().start()
    pub.publish("r/a", b"one", retain=True)
    pub.publish("r/a", b"two", retain=True)  # replaces
    pub.publish("r/b", b"three", retain=True)
    early = paho().start()
    early.subscribe("r/#")
    wait_until(lambda: len(early.got()) == 2)
    assert sorted((m.topic, m.payload, m.retain) for m in early.got()) == [
        ("r/a", b"two", True),
        ("r/b", b"three", True),
    ]
    pub.publish("r/a", b"live", retain=True)
    wait_until(lambda: len(early.got()) == 3)
    assert early.got()[-1] == Got("r/a", b"live", 1, False)  # established subscription: retain cleared

    pub.publish("r/a", b"", retain=True)
    assert broker.call(lambda b: b.retained_topics) == ["r/b"]
    late = paho().start()
    late.subscribe("r/#")
    wait_until(late.got)
    time.sleep(0.1)
    assert [(m.topic, m.payload) for m in late.got()] == [("r/b", b"three")]


def test_retained_messages_expire(raw: Callable[..., Raw]) -> None:
    now = [1000.0]
    with BrokerThread(clock=lambda: now[0]) as clocked:
        pub = Paho(clocked).start()
        try:
            props = PahoProperties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.MessageExpiryInterval = 60
            info = pub.client.publish("exp/a", b"short-lived", qos=1, retain=True, properties=props)
            wait_until(lambda: info.mid in pub.acks)
            now[0] += 20
            early = raw(clocked)
            early.connect("early")
            early.sock.sendall(mp.encode_subscribe(mp.Subscribe(1, (mp.SubscriptionRequest("exp/#", 1),)), mp.MQTT_5))
            assert early.next().type is mp.PacketType.SUBACK
            got = early.next()
            msg = mp.decode_publish(got.flags, got.body, mp.MQTT_5)
            assert (msg.payload, msg.retain) == (b"short-lived", True)
            assert msg.properties.get_int(mp.Prop.MESSAGE_EXPIRY_INTERVAL) == 40  # what is left of it
            now[0] += 41
            late = Paho(clocked).start()
            late.subscribe("exp/#")
            time.sleep(0.2)
            assert late.got() == []
            late.stop()
        finally:
            pub.stop()


def test_retain_handling_2_and_retain_as_published(paho: Callable[..., Paho]) -> None:
    pub = paho().start()
    pub.publish("cmd/x", b"stale", retain=True)
    sub = paho().start()
    sub.subscribe(("cmd/#", SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND)))
    keep = paho().start()
    keep.subscribe(("cmd/#", SubscribeOptions(qos=1, retainAsPublished=True)))
    wait_until(keep.got, what="retained delivery to the RH 0 subscriber")
    pub.publish("cmd/x", b"fresh", retain=True)
    wait_until(lambda: sub.got() and len(keep.got()) == 2)
    assert sub.got() == [Got("cmd/x", b"fresh", 1, False)]  # never the stale one
    assert [(m.payload, m.retain) for m in keep.got()] == [(b"stale", True), (b"fresh", True)]


def test_no_local_keeps_a_clients_own_messages_away(paho: Callable[..., Paho]) -> None:
    me = paho().start()
    me.subscribe(("loop/#", SubscribeOptions(qos=1, noLocal=True)))
    other = paho().start()
    other.subscribe("loop/#")
    assert me.publish("loop/a", b"mine") == 0  # someone else matched
    wait_until(other.got)
    other.publish("loop/b", b"theirs")
    wait_until(me.got)
    time.sleep(0.1)
    assert [m.payload for m in me.got()] == [b"theirs"]
    assert [m.payload for m in other.got()] == [b"mine", b"theirs"]  # no No Local: its own comes back


def test_last_will_is_published_when_a_connection_dies(
    paho: Callable[..., Paho], broker: BrokerThread, raw: Callable[..., Raw]
) -> None:
    watcher = paho().start()
    watcher.subscribe("wills/#")
    conn = raw()
    conn.connect("dying", will=mp.Publish("wills/dying", b"offline", 1, True))
    conn.sock.close()  # no DISCONNECT
    wait_until(watcher.got, what="the Will")
    assert watcher.got() == [Got("wills/dying", b"offline", 1, False)]
    late = paho().start()
    late.subscribe("wills/#")
    wait_until(late.got, what="the retained Will")
    assert late.got()[0].retain

    polite = paho(will=("wills/polite", b"offline", False)).start()
    polite.stop()  # a normal DISCONNECT discards the Will
    raw2 = raw()
    raw2.connect("says-goodbye-with-will", will=mp.Publish("wills/asked", b"bye", 0, False))
    raw2.sock.sendall(b"\xe0\x01\x04")  # MQTT 5 DISCONNECT 0x04: disconnect with Will message
    wait_until(lambda: watcher.got("wills/asked"), what="the Will asked for")
    time.sleep(0.1)
    assert not watcher.got("wills/polite")


def test_keepalive_timeout_closes_and_sends_the_will(
    paho: Callable[..., Paho], broker: BrokerThread, raw: Callable[..., Raw]
) -> None:
    watcher = paho().start()
    watcher.subscribe("ka/#")
    conn = raw()
    conn.sock.sendall(
        mp.encode_connect(mp.Connect(mp.MQTT_311, "silent", True, 1, will=mp.Publish("ka/x", b"gone", 1)))
    )
    assert conn.next().type is mp.PacketType.CONNACK
    started = time.monotonic()
    assert conn.closed()  # 1.5 x keepalive of silence
    assert 1.3 < time.monotonic() - started < 3.0
    wait_until(lambda: watcher.got("ka/x"), what="the Will after a keepalive timeout")
    assert broker.call(lambda b: b.stats.keepalive_timeouts) == 1


def test_session_takeover_disconnects_the_older_connection(paho: Callable[..., Paho], broker: BrokerThread) -> None:
    watcher = paho().start()
    watcher.subscribe("gw/#")
    first = paho(client_id="same-id", will=("gw/status", b"lost", True)).start()
    first.subscribe("gw/cmd")
    second = paho(client_id="same-id").start()
    assert first.gone.wait(5)
    assert first.disconnect_reason == 0x8E  # session taken over
    wait_until(lambda: watcher.got("gw/status"), what="the old connection's Will")
    second.subscribe("gw/cmd")
    watcher.publish("gw/cmd", b"go")
    wait_until(second.got)
    assert not first.got()
    assert broker.call(lambda b: b.stats.takeovers) == 1


def test_persistent_session_requests_get_a_clean_session_and_are_told_so(
    broker: BrokerThread, raw: Callable[..., Raw]
) -> None:
    conn = raw()
    props = mp.Properties(((mp.Prop.SESSION_EXPIRY_INTERVAL, 3600),))
    conn.sock.sendall(mp.encode_connect(mp.Connect(mp.MQTT_5, "keeps", False, 30, props)))
    connack = conn.next()
    assert connack.body[:2] == b"\x00\x00"  # Session Present 0, success
    cur = mp._Cursor(connack.body[2:])
    assert cur.properties("CONNACK").get_int(mp.Prop.SESSION_EXPIRY_INTERVAL) == 0
    raw311 = raw()
    assert raw311.connect("keeps-311", mp.MQTT_311).body == b"\x00\x00"


def test_qos2_publish_is_refused_clearly(
    paho: Callable[..., Paho], broker: BrokerThread, raw: Callable[..., Raw]
) -> None:
    v5 = raw()
    v5.connect("q2-v5")
    v5.sock.sendall(mp.encode_publish(mp.Publish("q2/t", b"x", 1, packet_id=1), mp.MQTT_5).replace(b"\x32", b"\x34", 1))
    reply = v5.next()
    assert reply.type is mp.PacketType.DISCONNECT
    assert reply.body[0] == 0x9B  # QoS not supported
    assert v5.closed()
    v3 = raw()
    v3.connect("q2-v3", mp.MQTT_311)
    v3.sock.sendall(
        mp.encode_publish(mp.Publish("q2/t", b"x", 1, packet_id=1), mp.MQTT_311).replace(b"\x32", b"\x34", 1)
    )
    assert v3.closed()
    assert paho().start().publish("q2/t", b"still up") == 0x10


def test_malformed_packet_closes_only_that_client(
    paho: Callable[..., Paho], broker: BrokerThread, raw: Callable[..., Raw]
) -> None:
    sub = paho().start()
    sub.subscribe("alive/#")
    bad = raw()
    bad.connect("garbler")
    bad.sock.sendall(b"\x82\x04\x00\x01\x00\x09")  # SUBSCRIBE whose filter runs past the packet
    reply = bad.next()
    assert reply.type is mp.PacketType.DISCONNECT
    assert reply.body[0] == 0x81
    assert bad.closed()
    worse = raw()
    worse.sock.sendall(b"\xff\xff\xff\xff\xff\xff")  # not even a CONNECT
    assert worse.closed()
    pub = paho().start()
    assert pub.publish("alive/yes", b"1") == 0
    wait_until(sub.got)
    assert broker.call(lambda b: b.stats.malformed) == 2


def test_a_packet_over_the_maximum_size_closes_the_client(broker: BrokerThread, raw: Callable[..., Raw]) -> None:
    big = raw()
    big.connect("big")
    big.sock.sendall(b"\x30\xff\xff\x7f")  # a 2 MB PUBLISH announced; the broker's limit is 1 MB
    reply = big.next()
    assert (reply.type, reply.body[0]) == (mp.PacketType.DISCONNECT, 0x95)
    assert big.closed()


def test_a_client_that_does_not_read_is_dropped_not_buffered(raw: Callable[..., Raw]) -> None:
    with BrokerThread(queue_limit=8) as small:
        slow = raw(small, rcvbuf=4096)
        slow.connect("slow")
        slow.sock.sendall(mp.encode_subscribe(mp.Subscribe(1, (mp.SubscriptionRequest("flood", 0),)), mp.MQTT_5))
        assert slow.next().type is mp.PacketType.SUBACK
        pub = Paho(small).start()
        try:
            payload = b"x" * 60_000
            for _ in range(400):
                pub.publish("flood", payload, qos=0)
                if small.call(lambda b: b.stats.slow_clients_dropped):
                    break
            wait_until(lambda: small.call(lambda b: b.stats.slow_clients_dropped) == 1, what="slow client dropped")
            assert pub.publish("flood", b"after", qos=1) == 0x10  # the broker lives on; nobody left
        finally:
            pub.stop()
            slow.close()


# -- the gateway's uplink through the embedded broker ---------------------------------------------

FAST: dict[str, Any] = {
    "reconnect": BackoffPolicy(initial=0.05, maximum=0.3),
    "refused_backoff": BackoffPolicy(initial=0.05, maximum=0.2),
    "keepalive": 10,
}


@pytest.mark.asyncio
@pytest.mark.parametrize("protocol", [Protocol.AUTO, Protocol.V311])
async def test_gateway_readings_reach_a_subscriber_through_the_embedded_broker(
    broker: BrokerThread, paho: Callable[..., Paho], tmp_path: Path, protocol: Protocol
) -> None:
    topics = contract.Topics("gw-e")
    sub = await asyncio.to_thread(lambda: paho().start())
    await asyncio.to_thread(sub.subscribe, topics.readings, topics.status)
    box = await AsyncOutbox.open(tmp_path / "outbox.sqlite", synchronous="NORMAL")
    uplink = Uplink(UplinkConfig(gateway_id="gw-e", host=broker.host, port=broker.port, protocol=protocol, **FAST), box)
    task = asyncio.create_task(uplink.run())
    try:
        readings = [
            Reading(
                f"{i % 3:012d}", "energy.import", 100.0 + i, "kWh", gateway_time=1_700_000_000.5 + i, slot=900.0 * i
            )
            for i in range(250)
        ]
        await box.add(readings)
        loop = asyncio.get_running_loop()
        end = loop.time() + 10
        while box.depth:
            assert loop.time() < end, "outbox not drained"
            await asyncio.sleep(0.02)
        end = loop.time() + 5
        while len(contract.reading_ids([contract.decode_batch(m.payload) for m in sub.got(topics.readings)])) < 250:
            assert loop.time() < end, "readings did not reach the subscriber"
            await asyncio.sleep(0.02)
        batches = [contract.decode_batch(m.payload) for m in sub.got(topics.readings)]
        values = sorted(r.value for b in batches for r in b.readings)
        assert values == [100.0 + i for i in range(250)]
        assert uplink.stats.protocol == ("5" if protocol is Protocol.AUTO else "3.1.1")
        assert contract.decode_status(sub.got(topics.status)[0].payload).state == "online"
        assert not uplink.stats.failures
    finally:
        await asyncio.wait_for(uplink.stop(), 10)
        await task
        await box.close()
    offline = [contract.decode_status(m.payload).state for m in sub.got(topics.status)]
    assert offline[-1] == "offline"


@pytest.mark.asyncio
async def test_gateway_command_subscription_skips_retained_and_own_messages(
    broker: BrokerThread, paho: Callable[..., Paho], tmp_path: Path
) -> None:
    topics = contract.Topics("gw-c")
    headend = await asyncio.to_thread(lambda: paho().start())
    await asyncio.to_thread(headend.publish, f"{topics.base}/commands/stale", b"old", retain=True)
    got: list[tuple[str, bytes, bool]] = []
    box = await AsyncOutbox.open(tmp_path / "outbox.sqlite", synchronous="NORMAL")
    uplink = Uplink(
        UplinkConfig(gateway_id="gw-c", host=broker.host, port=broker.port, **FAST),
        box,
        on_command=lambda m: got.append((m.topic, m.payload, m.retained)),
    )
    task = asyncio.create_task(uplink.run())
    try:
        loop = asyncio.get_running_loop()
        end = loop.time() + 5
        while not uplink.connected or not broker.call(lambda b: "meter-gateway-gw-c" in b.sessions):
            assert loop.time() < end
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)  # the SUBSCRIBE follows the status publish
        assert await uplink.publish(f"{topics.base}/commands/echo", b"self")  # No Local: not delivered back
        await asyncio.to_thread(headend.publish, f"{topics.base}/commands/live", b"new")
        end = loop.time() + 5
        while not got:
            assert loop.time() < end, "command did not arrive"
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        assert got == [(f"{topics.base}/commands/live", b"new", False)]
    finally:
        await asyncio.wait_for(uplink.stop(), 10)
        await task
        await box.close()


# -- selection and the demo ------------------------------------------------------------------------


def test_local_broker_falls_back_to_the_embedded_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_MOSQUITTO, "none")
    assert find_mosquitto() is None
    with LocalBroker() as local:
        assert local.kind == "embedded"
        assert "embedded" in local.description
        probe = Paho(local).start()
        assert probe.publish("x", b"y") == 0x10
        probe.stop()
    monkeypatch.setenv(ENV_MOSQUITTO, "/nonexistent/mosquitto")
    assert find_mosquitto() is None
    with pytest.raises(FileNotFoundError):
        LocalBroker(kind="mosquitto")


def test_demo_runs_on_the_embedded_broker_without_mosquitto() -> None:
    env = {**os.environ, ENV_MOSQUITTO: "none"}
    proc = subprocess.run(
        [sys.executable, "-m", "meter_gateway.gateway.cli", "demo", "--duration", "8"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "demo: MQTT broker: embedded Python MQTT broker" in proc.stdout
    assert "mosquitto (" not in proc.stdout
    summary = proc.stdout.splitlines()[-1]
    assert "reached the broker" in summary
    assert int(summary.split()[1]) > 0  # "demo: N readings in ..."

"""Sans-I/O MQTT 3.1.1 / 5.0 packet codec for the embedded demo broker (gateway/embedded_broker.py).

No sockets, no asyncio, no clocks: bytes in, packet objects out, and back. Packets are framed by
their Remaining Length (MQTT 5 §2.1.4, 3.1.1 §2.2.3), never by scanning. Only what the demo broker
needs is covered: CONNECT, PUBLISH, SUBSCRIBE, UNSUBSCRIBE, PUBACK, DISCONNECT in, and CONNACK,
PUBLISH, PUBACK, SUBACK, UNSUBACK, PINGRESP, DISCONNECT out (plus the client side of CONNECT and
SUBSCRIBE, so tests can speak raw MQTT). Every decoding problem raises ``MalformedPacket``
carrying the MQTT 5 reason code the broker should answer with.

References: OASIS MQTT Version 5.0 (2019), OASIS MQTT Version 3.1.1 (2014).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

__all__ = [
    "MQTT_5",
    "MQTT_311",
    "Connect",
    "Disconnect",
    "MalformedPacket",
    "PacketReader",
    "PacketType",
    "Prop",
    "Properties",
    "PubAck",
    "Publish",
    "RawPacket",
    "Subscribe",
    "SubscriptionRequest",
    "Unsubscribe",
    "UnsupportedProtocol",
    "decode_connect",
    "decode_disconnect",
    "decode_puback",
    "decode_publish",
    "decode_subscribe",
    "decode_unsubscribe",
    "encode_connack",
    "encode_connect",
    "encode_disconnect",
    "encode_pingresp",
    "encode_puback",
    "encode_publish",
    "encode_suback",
    "encode_subscribe",
    "encode_unsuback",
    "topic_matches",
    "valid_topic_filter",
    "valid_topic_name",
]

MQTT_311 = 4  # protocol level byte of CONNECT
MQTT_5 = 5
MAX_REMAINING_LENGTH = 268_435_455  # four-byte Variable Byte Integer (§1.5.5)

# MQTT 5 reason codes the codec raises with (§2.4)
MALFORMED = 0x81
PROTOCOL_ERROR = 0x82
PACKET_TOO_LARGE = 0x95


class MalformedPacket(Exception):
    """The peer sent bytes that are not a valid packet; ``reason`` is the MQTT 5 reason code."""

    def __init__(self, text: str, reason: int = MALFORMED) -> None:
        super().__init__(text)
        self.reason = reason


class PacketType(enum.IntEnum):
    CONNECT = 1
    CONNACK = 2
    PUBLISH = 3
    PUBACK = 4
    PUBREC = 5
    PUBREL = 6
    PUBCOMP = 7
    SUBSCRIBE = 8
    SUBACK = 9
    UNSUBSCRIBE = 10
    UNSUBACK = 11
    PINGREQ = 12
    PINGRESP = 13
    DISCONNECT = 14
    AUTH = 15


# Fixed-header flags every packet but PUBLISH must carry (§2.1.3)
_REQUIRED_FLAGS = {t: (2 if t in (6, 8, 10) else 0) for t in range(1, 16) if t != 3}


class Prop(enum.IntEnum):
    """MQTT 5 property identifiers (§2.2.2.2)."""

    PAYLOAD_FORMAT_INDICATOR = 0x01
    MESSAGE_EXPIRY_INTERVAL = 0x02
    CONTENT_TYPE = 0x03
    RESPONSE_TOPIC = 0x08
    CORRELATION_DATA = 0x09
    SUBSCRIPTION_IDENTIFIER = 0x0B
    SESSION_EXPIRY_INTERVAL = 0x11
    ASSIGNED_CLIENT_IDENTIFIER = 0x12
    SERVER_KEEP_ALIVE = 0x13
    AUTHENTICATION_METHOD = 0x15
    AUTHENTICATION_DATA = 0x16
    REQUEST_PROBLEM_INFORMATION = 0x17
    WILL_DELAY_INTERVAL = 0x18
    REQUEST_RESPONSE_INFORMATION = 0x19
    RESPONSE_INFORMATION = 0x1A
    SERVER_REFERENCE = 0x1C
    REASON_STRING = 0x1F
    RECEIVE_MAXIMUM = 0x21
    TOPIC_ALIAS_MAXIMUM = 0x22
    TOPIC_ALIAS = 0x23
    MAXIMUM_QOS = 0x24
    RETAIN_AVAILABLE = 0x25
    USER_PROPERTY = 0x26
    MAXIMUM_PACKET_SIZE = 0x27
    WILDCARD_SUBSCRIPTION_AVAILABLE = 0x28
    SUBSCRIPTION_IDENTIFIER_AVAILABLE = 0x29
    SHARED_SUBSCRIPTION_AVAILABLE = 0x2A


class _Kind(enum.Enum):
    BYTE = 1
    U16 = 2
    U32 = 4
    VARINT = 5
    UTF8 = 6
    BINARY = 7
    PAIR = 8


_PROP_KIND: dict[int, _Kind] = {
    Prop.PAYLOAD_FORMAT_INDICATOR: _Kind.BYTE,
    Prop.MESSAGE_EXPIRY_INTERVAL: _Kind.U32,
    Prop.CONTENT_TYPE: _Kind.UTF8,
    Prop.RESPONSE_TOPIC: _Kind.UTF8,
    Prop.CORRELATION_DATA: _Kind.BINARY,
    Prop.SUBSCRIPTION_IDENTIFIER: _Kind.VARINT,
    Prop.SESSION_EXPIRY_INTERVAL: _Kind.U32,
    Prop.ASSIGNED_CLIENT_IDENTIFIER: _Kind.UTF8,
    Prop.SERVER_KEEP_ALIVE: _Kind.U16,
    Prop.AUTHENTICATION_METHOD: _Kind.UTF8,
    Prop.AUTHENTICATION_DATA: _Kind.BINARY,
    Prop.REQUEST_PROBLEM_INFORMATION: _Kind.BYTE,
    Prop.WILL_DELAY_INTERVAL: _Kind.U32,
    Prop.REQUEST_RESPONSE_INFORMATION: _Kind.BYTE,
    Prop.RESPONSE_INFORMATION: _Kind.UTF8,
    Prop.SERVER_REFERENCE: _Kind.UTF8,
    Prop.REASON_STRING: _Kind.UTF8,
    Prop.RECEIVE_MAXIMUM: _Kind.U16,
    Prop.TOPIC_ALIAS_MAXIMUM: _Kind.U16,
    Prop.TOPIC_ALIAS: _Kind.U16,
    Prop.MAXIMUM_QOS: _Kind.BYTE,
    Prop.RETAIN_AVAILABLE: _Kind.BYTE,
    Prop.USER_PROPERTY: _Kind.PAIR,
    Prop.MAXIMUM_PACKET_SIZE: _Kind.U32,
    Prop.WILDCARD_SUBSCRIPTION_AVAILABLE: _Kind.BYTE,
    Prop.SUBSCRIPTION_IDENTIFIER_AVAILABLE: _Kind.BYTE,
    Prop.SHARED_SUBSCRIPTION_AVAILABLE: _Kind.BYTE,
}

PropValue = int | str | bytes | tuple[str, str]


@dataclass(frozen=True, slots=True)
class Properties:
    """MQTT 5 properties in wire order; User Property may repeat, nothing else may (§2.2.2.2)."""

    items: tuple[tuple[int, PropValue], ...] = ()

    def get(self, prop: Prop) -> PropValue | None:
        for key, value in self.items:
            if key == prop:
                return value
        return None

    def get_int(self, prop: Prop) -> int | None:
        value = self.get(prop)
        return value if isinstance(value, int) else None

    def without(self, *props: Prop) -> Properties:
        return Properties(tuple((k, v) for k, v in self.items if k not in props))

    def with_(self, prop: Prop, value: PropValue) -> Properties:
        return Properties((*self.without(prop).items, (prop, value)))

    def __contains__(self, prop: object) -> bool:
        return any(k == prop for k, _ in self.items)


# -- primitive readers and writers -------------------------------------------------------------


class _Cursor:
    """Reads primitives from one packet body; running past its end is a malformed packet."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n > self.remaining():
            raise MalformedPacket(f"{what} runs past the end of the packet")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def byte(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        value: int = struct.unpack(">H", self.take(2, what))[0]
        return value

    def u32(self, what: str) -> int:
        value: int = struct.unpack(">I", self.take(4, what))[0]
        return value

    def varint(self, what: str) -> int:
        value = 0
        for i in range(4):
            b = self.byte(what)
            value |= (b & 0x7F) << (7 * i)
            if not b & 0x80:
                return value
        raise MalformedPacket(f"{what}: variable byte integer longer than 4 bytes")

    def binary(self, what: str) -> bytes:
        return self.take(self.u16(what), what)

    def utf8(self, what: str) -> str:
        raw = self.binary(what)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedPacket(f"{what} is not valid UTF-8") from None
        if "\x00" in text:  # §1.5.4: U+0000 is not allowed
            raise MalformedPacket(f"{what} contains U+0000")
        return text

    def properties(self, what: str) -> Properties:
        length = self.varint(f"{what} property length")
        inner = _Cursor(self.take(length, f"{what} properties"))
        items: list[tuple[int, PropValue]] = []
        seen: set[int] = set()
        while inner.remaining():
            key = inner.varint(f"{what} property id")
            kind = _PROP_KIND.get(key)
            if kind is None:
                raise MalformedPacket(f"{what}: unknown property 0x{key:02x}")
            if key in seen and key != Prop.USER_PROPERTY:
                raise MalformedPacket(f"{what}: property 0x{key:02x} given twice", PROTOCOL_ERROR)
            seen.add(key)
            name = f"{what} property 0x{key:02x}"
            value: PropValue
            if kind is _Kind.BYTE:
                value = inner.byte(name)
            elif kind is _Kind.U16:
                value = inner.u16(name)
            elif kind is _Kind.U32:
                value = inner.u32(name)
            elif kind is _Kind.VARINT:
                value = inner.varint(name)
            elif kind is _Kind.UTF8:
                value = inner.utf8(name)
            elif kind is _Kind.BINARY:
                value = inner.binary(name)
            else:
                value = (inner.utf8(name), inner.utf8(name))
            items.append((key, value))
        return Properties(tuple(items))


def _varint(value: int) -> bytes:
    if not 0 <= value <= MAX_REMAINING_LENGTH:
        raise ValueError(f"variable byte integer out of range: {value}")
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        out.append(b | 0x80 if value else b)
        if not value:
            return bytes(out)


def _binary(data: bytes) -> bytes:
    if len(data) > 0xFFFF:
        raise ValueError("string or binary longer than 65535 bytes")
    return struct.pack(">H", len(data)) + data


def _utf8(text: str) -> bytes:
    return _binary(text.encode("utf-8"))


def _properties(props: Properties) -> bytes:
    body = bytearray()
    for key, value in props.items:
        body += _varint(key)
        kind = _PROP_KIND[key]
        if kind is _Kind.BYTE and isinstance(value, int):
            body.append(value)
        elif kind is _Kind.U16 and isinstance(value, int):
            body += struct.pack(">H", value)
        elif kind is _Kind.U32 and isinstance(value, int):
            body += struct.pack(">I", value)
        elif kind is _Kind.VARINT and isinstance(value, int):
            body += _varint(value)
        elif kind is _Kind.UTF8 and isinstance(value, str):
            body += _utf8(value)
        elif kind is _Kind.BINARY and isinstance(value, bytes):
            body += _binary(value)
        elif kind is _Kind.PAIR and isinstance(value, tuple):
            body += _utf8(value[0]) + _utf8(value[1])
        else:
            raise ValueError(f"property 0x{key:02x} has a value of the wrong type: {value!r}")
    return _varint(len(body)) + bytes(body)


def _packet(ptype: PacketType, flags: int, body: bytes) -> bytes:
    return bytes([(ptype << 4) | flags]) + _varint(len(body)) + body


# -- framing ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RawPacket:
    type: PacketType
    flags: int
    body: bytes


class PacketReader:
    """Cuts a byte stream into packets by Remaining Length; feed it whatever the socket gave.

    ``max_size`` bounds a whole packet (fixed header included): a longer one raises
    ``MalformedPacket`` with reason 0x95 before its body is buffered.
    """

    def __init__(self, max_size: int = 1024 * 1024) -> None:
        self.max_size = max_size
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[RawPacket]:
        self._buf += data
        return list(self._drain())

    def _drain(self) -> Iterator[RawPacket]:
        while len(self._buf) >= 2:
            length = 0
            header = 0
            for i in range(4):
                if 1 + i >= len(self._buf):
                    return  # the length is not complete yet
                b = self._buf[1 + i]
                length |= (b & 0x7F) << (7 * i)
                if not b & 0x80:
                    header = 2 + i
                    break
            else:
                raise MalformedPacket("remaining length longer than 4 bytes")
            if header + length > self.max_size:
                raise MalformedPacket(
                    f"packet of {header + length} bytes exceeds the maximum of {self.max_size}", PACKET_TOO_LARGE
                )
            if len(self._buf) < header + length:
                return
            first = self._buf[0]
            ptype, flags = first >> 4, first & 0x0F
            if ptype == 0:
                raise MalformedPacket("packet type 0 is reserved")
            if ptype != PacketType.PUBLISH and flags != _REQUIRED_FLAGS[ptype]:
                raise MalformedPacket(f"{PacketType(ptype).name} with reserved flags 0x{flags:x}")
            body = bytes(self._buf[header : header + length])
            del self._buf[: header + length]
            yield RawPacket(PacketType(ptype), flags, body)


# -- topics -------------------------------------------------------------------------------------


def valid_topic_name(topic: str) -> bool:
    return bool(topic) and "+" not in topic and "#" not in topic and len(topic.encode()) <= 0xFFFF


def valid_topic_filter(topic_filter: str) -> bool:
    if not topic_filter:
        return False
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic`` matches ``topic_filter``; wildcards never match a leading ``$`` level (§4.7.2)."""
    filt = topic_filter.split("/")
    name = topic.split("/")
    if topic.startswith("$") and filt[0] in ("+", "#"):
        return False
    for i, level in enumerate(filt):
        if level == "#":
            return True  # also matches the parent level itself: "a/#" matches "a"
        if i >= len(name):
            return False
        if level not in ("+", name[i]):
            return False
    return len(filt) == len(name)


# -- packets ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Publish:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int | None = None
    properties: Properties = field(default_factory=Properties)


@dataclass(frozen=True, slots=True)
class Connect:
    version: int
    client_id: str
    clean_start: bool
    keepalive: int
    properties: Properties = field(default_factory=Properties)
    will: Publish | None = None
    username: str | None = None
    password: bytes | None = None


@dataclass(frozen=True, slots=True)
class SubscriptionRequest:
    topic_filter: str
    qos: int
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0


@dataclass(frozen=True, slots=True)
class Subscribe:
    packet_id: int
    requests: tuple[SubscriptionRequest, ...]
    properties: Properties = field(default_factory=Properties)


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    packet_id: int
    topic_filters: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PubAck:
    packet_id: int
    reason: int = 0


@dataclass(frozen=True, slots=True)
class Disconnect:
    reason: int = 0
    properties: Properties = field(default_factory=Properties)


class UnsupportedProtocol(MalformedPacket):
    """CONNECT for a protocol name/level we do not speak: answer CONNACK 0x01 (3.1.1) / 0x84 (5)."""

    def __init__(self, text: str, level: int) -> None:
        super().__init__(text, 0x84)
        self.level = level


def decode_connect(body: bytes) -> Connect:
    cur = _Cursor(body)
    name = cur.utf8("protocol name")
    level = cur.byte("protocol level")
    if name != "MQTT" or level not in (MQTT_311, MQTT_5):  # MQIsdp (3.1) is not spoken
        raise UnsupportedProtocol(f"protocol {name!r} level {level} is not MQTT 3.1.1 or 5.0", level)
    flags = cur.byte("connect flags")
    if flags & 0x01:
        raise MalformedPacket("CONNECT reserved flag is set")
    will_flag, will_qos, will_retain = bool(flags & 0x04), (flags >> 3) & 0x03, bool(flags & 0x20)
    has_password, has_username = bool(flags & 0x40), bool(flags & 0x80)
    if not will_flag and (will_qos or will_retain):
        raise MalformedPacket("CONNECT has Will QoS/Retain without a Will")
    if will_qos == 3:
        raise MalformedPacket("CONNECT Will QoS 3")
    if level == MQTT_311 and has_password and not has_username:
        raise MalformedPacket("CONNECT has a password without a user name")
    keepalive = cur.u16("keep alive")
    props = cur.properties("CONNECT") if level == MQTT_5 else Properties()
    client_id = cur.utf8("client identifier")
    will = None
    if will_flag:
        will_props = cur.properties("Will") if level == MQTT_5 else Properties()
        topic = cur.utf8("Will topic")
        if not valid_topic_name(topic):
            raise MalformedPacket(f"Will topic {topic!r} is not a valid topic name", 0x90)
        will = Publish(topic, cur.binary("Will payload"), will_qos, will_retain, properties=will_props)
    username = cur.utf8("user name") if has_username else None
    password = cur.binary("password") if has_password else None
    if cur.remaining():
        raise MalformedPacket("CONNECT has bytes after its payload")
    return Connect(level, client_id, bool(flags & 0x02), keepalive, props, will, username, password)


def decode_publish(flags: int, body: bytes, version: int) -> Publish:
    qos = (flags >> 1) & 0x03
    if qos == 3:
        raise MalformedPacket("PUBLISH with QoS 3")
    dup = bool(flags & 0x08)
    if dup and qos == 0:
        raise MalformedPacket("PUBLISH QoS 0 with DUP set")
    cur = _Cursor(body)
    topic = cur.utf8("topic name")
    packet_id = None
    if qos:
        packet_id = cur.u16("packet identifier")
        if packet_id == 0:
            raise MalformedPacket("PUBLISH packet identifier 0")
    props = cur.properties("PUBLISH") if version == MQTT_5 else Properties()
    if "+" in topic or "#" in topic:
        raise MalformedPacket(f"PUBLISH topic {topic!r} contains a wildcard", 0x90)
    payload = cur.take(cur.remaining(), "payload")
    return Publish(topic, payload, qos, bool(flags & 0x01), dup, packet_id, props)


def _subscribe_options(byte: int, version: int) -> tuple[int, bool, bool, int]:
    qos = byte & 0x03
    if qos == 3:
        raise MalformedPacket("SUBSCRIBE requests QoS 3")
    if version == MQTT_5:
        if byte & 0xC0:
            raise MalformedPacket("SUBSCRIBE options reserved bits set")
        handling = (byte >> 4) & 0x03
        if handling == 3:
            raise MalformedPacket("SUBSCRIBE Retain Handling 3")
        return qos, bool(byte & 0x04), bool(byte & 0x08), handling
    if byte & 0xFC:
        raise MalformedPacket("SUBSCRIBE (3.1.1) requested QoS reserved bits set")
    return qos, False, False, 0


def decode_subscribe(body: bytes, version: int) -> Subscribe:
    cur = _Cursor(body)
    packet_id = cur.u16("packet identifier")
    if packet_id == 0:
        raise MalformedPacket("SUBSCRIBE packet identifier 0")
    props = cur.properties("SUBSCRIBE") if version == MQTT_5 else Properties()
    requests = []
    while cur.remaining():
        topic_filter = cur.utf8("topic filter")
        qos, no_local, rap, handling = _subscribe_options(cur.byte("subscription options"), version)
        requests.append(SubscriptionRequest(topic_filter, qos, no_local, rap, handling))
    if not requests:
        raise MalformedPacket("SUBSCRIBE without any topic filter", PROTOCOL_ERROR)
    return Subscribe(packet_id, tuple(requests), props)


def decode_unsubscribe(body: bytes, version: int) -> Unsubscribe:
    cur = _Cursor(body)
    packet_id = cur.u16("packet identifier")
    if packet_id == 0:
        raise MalformedPacket("UNSUBSCRIBE packet identifier 0")
    if version == MQTT_5:
        cur.properties("UNSUBSCRIBE")
    filters = []
    while cur.remaining():
        filters.append(cur.utf8("topic filter"))
    if not filters:
        raise MalformedPacket("UNSUBSCRIBE without any topic filter", PROTOCOL_ERROR)
    return Unsubscribe(packet_id, tuple(filters))


def decode_puback(body: bytes, version: int) -> PubAck:
    cur = _Cursor(body)
    packet_id = cur.u16("packet identifier")
    reason = 0
    if version == MQTT_5 and cur.remaining():
        reason = cur.byte("reason code")
        if cur.remaining():
            cur.properties("PUBACK")
    if cur.remaining():
        raise MalformedPacket("PUBACK has trailing bytes")
    return PubAck(packet_id, reason)


def decode_disconnect(body: bytes, version: int) -> Disconnect:
    if version != MQTT_5:
        if body:
            raise MalformedPacket("DISCONNECT (3.1.1) has a body")
        return Disconnect()
    cur = _Cursor(body)
    reason = cur.byte("reason code") if cur.remaining() else 0
    props = cur.properties("DISCONNECT") if cur.remaining() else Properties()
    if cur.remaining():
        raise MalformedPacket("DISCONNECT has trailing bytes")
    return Disconnect(reason, props)


# -- encoders -----------------------------------------------------------------------------------


def encode_connack(session_present: bool, code: int, version: int, props: Properties | None = None) -> bytes:
    body = bytes([1 if session_present else 0, code])
    if version == MQTT_5:
        body += _properties(props or Properties())
    return _packet(PacketType.CONNACK, 0, body)


def encode_publish(msg: Publish, version: int) -> bytes:
    if msg.qos and msg.packet_id is None:
        raise ValueError("a QoS > 0 PUBLISH needs a packet identifier")
    body = bytearray(_utf8(msg.topic))
    if msg.qos:
        body += struct.pack(">H", msg.packet_id)
    if version == MQTT_5:
        body += _properties(msg.properties)
    body += msg.payload
    flags = (0x08 if msg.dup else 0) | (msg.qos << 1) | (0x01 if msg.retain else 0)
    return _packet(PacketType.PUBLISH, flags, bytes(body))


def encode_puback(packet_id: int, reason: int, version: int) -> bytes:
    body = struct.pack(">H", packet_id)
    if version == MQTT_5 and reason:
        body += bytes([reason])  # reason 0 without properties may be omitted (§3.4.2.1)
    return _packet(PacketType.PUBACK, 0, body)


def encode_suback(packet_id: int, codes: Sequence[int], version: int) -> bytes:
    body = struct.pack(">H", packet_id)
    if version == MQTT_5:
        body += _properties(Properties())
    return _packet(PacketType.SUBACK, 0, body + bytes(codes))


def encode_unsuback(packet_id: int, codes: Sequence[int], version: int) -> bytes:
    body = struct.pack(">H", packet_id)
    if version == MQTT_5:
        body += _properties(Properties()) + bytes(codes)
    return _packet(PacketType.UNSUBACK, 0, body)


def encode_pingresp() -> bytes:
    return _packet(PacketType.PINGRESP, 0, b"")


def encode_disconnect(reason: int, reason_string: str | None = None) -> bytes:
    """MQTT 5 only: a 3.1.1 server has no DISCONNECT to send; it just closes the connection."""
    props = Properties(((Prop.REASON_STRING, reason_string),)) if reason_string else Properties()
    return _packet(PacketType.DISCONNECT, 0, bytes([reason]) + _properties(props))


def encode_connect(connect: Connect) -> bytes:
    """The client side, for tests that speak raw MQTT to the broker."""
    will = connect.will
    flags = (0x02 if connect.clean_start else 0) | (0x80 if connect.username is not None else 0)
    flags |= 0x40 if connect.password is not None else 0
    if will is not None:
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
    body = bytearray(_utf8("MQTT") + bytes([connect.version, flags]) + struct.pack(">H", connect.keepalive))
    if connect.version == MQTT_5:
        body += _properties(connect.properties)
    body += _utf8(connect.client_id)
    if will is not None:
        if connect.version == MQTT_5:
            body += _properties(will.properties)
        body += _utf8(will.topic) + _binary(will.payload)
    if connect.username is not None:
        body += _utf8(connect.username)
    if connect.password is not None:
        body += _binary(connect.password)
    return _packet(PacketType.CONNECT, 0, bytes(body))


def encode_subscribe(sub: Subscribe, version: int) -> bytes:
    body = bytearray(struct.pack(">H", sub.packet_id))
    if version == MQTT_5:
        body += _properties(sub.properties)
    for r in sub.requests:
        options = r.qos
        if version == MQTT_5:
            options |= (0x04 if r.no_local else 0) | (0x08 if r.retain_as_published else 0) | (r.retain_handling << 4)
        body += _utf8(r.topic_filter) + bytes([options])
    return _packet(PacketType.SUBSCRIBE, 2, bytes(body))

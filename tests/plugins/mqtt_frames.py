"""Just enough MQTT framing for test proxies that watch a client talk to a real broker.

A proxy has to cut the byte stream into whole packets (fixed header + Remaining Length,
MQTT 5 §2.1 / 3.1.1 §2.2) and read a few fields: the protocol level of CONNECT, the topic,
packet id and payload of PUBLISH, the packet id and reason of PUBACK. Everything else passes
through untouched as the bytes that came in. Nothing here builds packets or checks them beyond
what reading those fields needs: mosquitto and the gateway's client are what is under test.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

MQTT_311 = 4  # the protocol level byte of CONNECT
MQTT_5 = 5


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


class FrameError(ValueError):
    """The stream is not MQTT (bad length encoding, a packet past the size limit, a short field)."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One whole packet: ``raw`` is exactly the bytes received, to forward unchanged."""

    type: int
    flags: int
    body: bytes
    raw: bytes


@dataclass(frozen=True, slots=True)
class Publish:
    topic: str
    packet_id: int | None  # None for QoS 0
    payload: bytes


@dataclass(frozen=True, slots=True)
class PubAck:
    packet_id: int
    reason: int  # 0 (success) when absent, as in MQTT 3.1.1 and short MQTT 5 PUBACKs


class FrameReader:
    """Feed it bytes as they arrive, in any chunks; it returns the packets completed so far."""

    def __init__(self, max_size: int = 16 * 1024 * 1024) -> None:
        self.max_size = max_size
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        frames: list[Frame] = []
        while True:
            header = _remaining_length(self._buf)
            if header is None:
                return frames
            length, header_size = header
            if length > self.max_size:
                raise FrameError(f"packet of {length} bytes announced, the limit is {self.max_size}")
            end = header_size + length
            if len(self._buf) < end:
                return frames
            raw = bytes(self._buf[:end])
            del self._buf[:end]
            frames.append(Frame(raw[0] >> 4, raw[0] & 0x0F, raw[header_size:], raw))


def _remaining_length(buf: bytearray) -> tuple[int, int] | None:
    """(Remaining Length, bytes of fixed header) once the fixed header is complete, else None."""
    value = 0
    for i in range(1, min(len(buf), 5)):
        value |= (buf[i] & 0x7F) << (7 * (i - 1))
        if not buf[i] & 0x80:
            return value, i + 1
    if len(buf) >= 5:
        raise FrameError("Remaining Length longer than four bytes")
    return None


def _varint(body: bytes, pos: int) -> tuple[int, int]:
    """A Variable Byte Integer at ``pos``: (value, position after it)."""
    value = 0
    for i in range(4):
        if pos + i >= len(body):
            break
        value |= (body[pos + i] & 0x7F) << (7 * i)
        if not body[pos + i] & 0x80:
            return value, pos + i + 1
    raise FrameError("bad Variable Byte Integer")


def _u16(body: bytes, pos: int) -> int:
    if pos + 2 > len(body):
        raise FrameError("packet ends inside a two-byte field")
    return int.from_bytes(body[pos : pos + 2], "big")


def connect_level(body: bytes) -> int:
    """The protocol level of a CONNECT body: 4 for MQTT 3.1.1, 5 for MQTT 5."""
    name_len = _u16(body, 0)
    if 2 + name_len >= len(body):
        raise FrameError("CONNECT ends before its protocol level")
    return body[2 + name_len]


def parse_publish(flags: int, body: bytes, level: int) -> Publish:
    """Topic, packet id and payload of a PUBLISH; MQTT 5 properties are skipped."""
    topic_len = _u16(body, 0)
    pos = 2 + topic_len
    if pos > len(body):
        raise FrameError("PUBLISH ends inside its topic")
    topic = body[2:pos].decode("utf-8", errors="strict")
    packet_id = None
    if (flags >> 1) & 0x03:
        packet_id = _u16(body, pos)
        pos += 2
    if level >= MQTT_5:
        props_len, pos = _varint(body, pos)
        pos += props_len
        if pos > len(body):
            raise FrameError("PUBLISH ends inside its properties")
    return Publish(topic, packet_id, body[pos:])


def parse_puback(body: bytes, level: int) -> PubAck:
    """Packet id and reason code of a PUBACK (an MQTT 5 PUBACK may leave the reason out)."""
    packet_id = _u16(body, 0)
    reason = body[2] if level >= MQTT_5 and len(body) > 2 else 0
    return PubAck(packet_id, reason)

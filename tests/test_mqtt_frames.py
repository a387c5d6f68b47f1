"""The fault tests' MQTT framing helper (tests/plugins/mqtt_frames.py), on packets written out
by hand from the MQTT 5.0 and 3.1.1 specifications."""

from __future__ import annotations

import pytest

from tests.plugins.mqtt_frames import (
    MQTT_5,
    MQTT_311,
    FrameError,
    FrameReader,
    PacketType,
    PubAck,
    Publish,
    connect_level,
    parse_puback,
    parse_publish,
)

# CONNECT, MQTT 5: name "MQTT", level 5, flags clean start, keepalive 30, no properties, id "gw"
CONNECT_5 = bytes.fromhex("10 0f 0004 4d515454 05 02 001e 00 0002 6777")
CONNECT_311 = bytes.fromhex("10 0e 0004 4d515454 04 02 001e 0002 6777")
# PUBLISH QoS 1 to "a/b", packet id 7, properties: Content Type "json" (0x03), payload "{}"
PUBLISH_5 = bytes.fromhex("32 11 0003 612f62 0007 07 03 0004 6a736f6e 7b7d")
PUBACK_5_SHORT = bytes.fromhex("40 02 0007")  # success, reason left out
PUBACK_5_REFUSED = bytes.fromhex("40 04 0007 87 00")  # 0x87 not authorized, no properties


def test_packets_split_anywhere_come_out_whole_and_byte_exact() -> None:
    stream = CONNECT_5 + PUBLISH_5 + PUBACK_5_SHORT + PUBACK_5_REFUSED
    reader = FrameReader()
    frames = [f for i in range(len(stream)) for f in reader.feed(stream[i : i + 1])]
    assert [f.type for f in frames] == [PacketType.CONNECT, PacketType.PUBLISH, PacketType.PUBACK, PacketType.PUBACK]
    assert b"".join(f.raw for f in frames) == stream
    assert connect_level(frames[0].body) == MQTT_5
    assert parse_publish(frames[1].flags, frames[1].body, MQTT_5) == Publish("a/b", 7, b"{}")
    assert parse_puback(frames[2].body, MQTT_5) == PubAck(7, 0)
    assert parse_puback(frames[3].body, MQTT_5) == PubAck(7, 0x87)


def test_mqtt_311_has_no_properties_and_qos0_no_packet_id() -> None:
    payload = b"x" * 200  # Remaining Length 205 takes two bytes
    publish = bytes.fromhex("30 cd 01 0003 612f62") + payload
    frames = FrameReader().feed(CONNECT_311 + publish + bytes.fromhex("40 02 0009"))
    assert connect_level(frames[0].body) == MQTT_311
    assert parse_publish(frames[1].flags, frames[1].body, MQTT_311) == Publish("a/b", None, payload)
    assert parse_puback(frames[2].body, MQTT_311) == PubAck(9, 0)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\x30\xff\xff\xff\xff\x01", "longer than four bytes"),
        (b"\x30\xff\xff\x7f", "limit is 1024"),  # 2 MB announced: refused before it is buffered
    ],
)
def test_a_stream_that_is_not_mqtt_is_an_error(data: bytes, why: str) -> None:
    with pytest.raises(FrameError, match=why):
        FrameReader(max_size=1024).feed(data)


def test_a_publish_cut_short_is_an_error() -> None:
    with pytest.raises(FrameError):
        parse_publish(0b0010, bytes.fromhex("0003 612f"), MQTT_5)

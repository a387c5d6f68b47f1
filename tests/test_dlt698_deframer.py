"""The streaming deframer: whole, byte by byte, random chunks, noise, glued, truncated, bad CRCs;
link fragment reassembly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meter_gateway.protocols.dlt698.deframer import Deframer, Discarded, Reassembler, ack_frame, fragment_apdu
from meter_gateway.protocols.dlt698.errors import LocalProtocolError, RemoteProtocolError
from meter_gateway.protocols.dlt698.frame import (
    Control,
    FragmentHeader,
    FragmentType,
    Frame,
    ServerAddress,
    parse_frame,
)

VECTORS = json.loads((Path(__file__).parent / "vectors" / "dlt698.json").read_text("utf-8"))["vectors"]
RAW = [bytes.fromhex(v["hex"]) for v in VECTORS]
STREAM = b"".join(RAW)


def frames_of(events: list[Frame | Discarded]) -> list[Frame]:
    return [e for e in events if isinstance(e, Frame)]


def feed_chunks(chunks: list[bytes]) -> list[Frame | Discarded]:
    d = Deframer()
    out: list[Frame | Discarded] = []
    for chunk in chunks:
        out += d.feed(chunk)
    assert d.buffered == 0
    return out


def test_whole_stream_glued() -> None:
    events = Deframer().feed(STREAM)
    assert [f.encode() for f in frames_of(events)] == RAW
    assert not [e for e in events if isinstance(e, Discarded)]


def test_byte_by_byte() -> None:
    events = feed_chunks([bytes((b,)) for b in STREAM])
    assert [f.encode() for f in frames_of(events)] == RAW


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=97), min_size=1, max_size=400))
def test_random_chunks(sizes: list[int]) -> None:
    chunks, pos, i = [], 0, 0
    while pos < len(STREAM):
        size = sizes[i % len(sizes)]
        chunks.append(STREAM[pos : pos + size])
        pos += size
        i += 1
    assert [f.encode() for f in frames_of(feed_chunks(chunks))] == RAW


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(range(len(RAW))), st.binary(max_size=12)), min_size=1, max_size=8))
def test_noise_between_frames(parts: list[tuple[int, bytes]]) -> None:
    stream = b"".join(noise.replace(b"\x68", b"\x00") + RAW[i] for i, noise in parts)
    got = [f.encode() for f in frames_of(Deframer().feed(stream))]
    assert got == [RAW[i] for i, _ in parts]


def test_preamble_counted_not_noise() -> None:
    d = Deframer()
    events = d.feed(b"\xfe\xfe\xfe\xfe" + RAW[0])
    assert frames_of(events)[0].encode() == RAW[0]
    assert d.preamble_bytes == 4
    assert not [e for e in events if isinstance(e, Discarded)]


@pytest.mark.parametrize(("offset", "reason"), [(-3, "bad_fcs"), (-1, "bad_end"), (12, "bad_hcs")])
def test_corrupt_frame_then_good_one(offset: int, reason: str) -> None:
    bad = bytearray(RAW[1])
    bad[offset] ^= 0x01
    events = Deframer().feed(bytes(bad) + RAW[2])
    assert frames_of(events)[0].encode() == RAW[2]
    assert reason in [e.reason for e in events if isinstance(e, Discarded)]


def test_truncated_then_good_one() -> None:
    # all at once: the truncated candidate is "complete" with the next frame's bytes and fails FCS
    events = Deframer().feed(RAW[1][:-5] + RAW[2])
    assert [f.encode() for f in frames_of(events)] == [RAW[2]]
    assert next(e.reason for e in events if isinstance(e, Discarded)) == "bad_fcs"


def test_half_frame_is_held() -> None:
    d = Deframer()
    assert d.feed(RAW[5][:10]) == []
    assert d.buffered == 10
    (frame,) = d.feed(RAW[5][10:])
    assert isinstance(frame, Frame)
    assert d.buffered == 0


def test_bad_length_gives_up_one_byte() -> None:
    events = Deframer(max_frame_length=64).feed(b"\x68\xff\x3f" + RAW[0])
    assert frames_of(events)[0].encode() == RAW[0]
    assert events[0] == Discarded("bad_length", b"\x68", events[0].detail)  # type: ignore[union-attr]


def test_parse_frame_errors() -> None:
    bad = bytearray(RAW[0])
    bad[12] ^= 0xFF
    with pytest.raises(RemoteProtocolError, match="HCS"):
        parse_frame(bytes(bad))
    with pytest.raises(RemoteProtocolError, match="truncated"):
        parse_frame(RAW[0][:-2])
    with pytest.raises(RemoteProtocolError, match="unexpected bytes"):
        parse_frame(RAW[0] + b"\x00")
    with pytest.raises(RemoteProtocolError, match="starts with"):
        parse_frame(b"\x10\x20")


def test_scrambled_frame_round_trip() -> None:
    p59 = next(bytes.fromhex(v["hex"]) for v in VECTORS if v["id"] == "P59")
    frame = parse_frame(p59)
    assert frame.control.scrambled
    assert frame.apdu.hex() == "0501154000020000"
    assert frame.encode() == p59


def _fragments(apdu: bytes, size: int) -> list[Frame]:
    address = ServerAddress.parse("000000000002")
    control = Control(3, from_server=True, prm=True, fragment=True)
    return [Frame(control, address, 16, h.wire + chunk) for h, chunk in fragment_apdu(apdu, size)]


def test_reassembly_with_acks() -> None:
    apdu = bytes(range(200))
    frames = _fragments(apdu, 64)
    assert [f.fragment.type for f in frames] == [  # type: ignore[union-attr]
        FragmentType.START,
        FragmentType.MIDDLE,
        FragmentType.MIDDLE,
        FragmentType.LAST,
    ]
    r = Reassembler()
    acks = []
    for frame in frames[:-1]:
        got = r.feed(frame)
        assert got.apdu is None
        assert got.ack is not None
        acks.append(got.ack)
    # a repeated fragment (our ACK was lost) is acknowledged again, not appended
    again = r.feed(frames[2])
    assert again.duplicate
    assert again.ack == acks[-1]
    done = r.feed(frames[-1])
    assert done.apdu == apdu
    assert done.ack is None
    assert [a.seq for a in acks] == [0, 1, 2]
    ack = ack_frame(frames[0], acks[0])
    assert ack.fragment == FragmentHeader(0, FragmentType.ACK)
    assert not ack.control.from_server
    assert parse_frame(ack.encode()) == ack


def test_reassembly_out_of_order() -> None:
    frames = _fragments(bytes(100), 30)
    r = Reassembler()
    r.feed(frames[0])
    with pytest.raises(RemoteProtocolError, match="out of order"):
        r.feed(frames[2])
    with pytest.raises(RemoteProtocolError, match="out of order"):
        Reassembler().feed(frames[1])


def test_fragment_vectors() -> None:
    p30 = parse_frame(next(bytes.fromhex(v["hex"]) for v in VECTORS if v["id"] == "P30"))
    assert p30.fragment == FragmentHeader(0x105, FragmentType.START)
    got = Reassembler().feed(p30)
    assert got.ack == FragmentHeader(0x105, FragmentType.ACK)
    p31 = parse_frame(next(bytes.fromhex(v["hex"]) for v in VECTORS if v["id"] == "P31"))
    with pytest.raises(LocalProtocolError):
        Reassembler().feed(p31)


def test_fragment_header_limits() -> None:
    with pytest.raises(LocalProtocolError):
        FragmentHeader(4096, FragmentType.START).wire  # noqa: B018
    with pytest.raises(LocalProtocolError):
        fragment_apdu(b"abc", 10)


def test_frame_inside_a_frame_is_not_split_out() -> None:
    """P76 forwards P77 whole inside an octet-string: fed byte by byte, P76 still wins."""
    p76 = next(bytes.fromhex(v["hex"]) for v in VECTORS if v["id"] == "P76")
    events = feed_chunks([bytes((b,)) for b in p76])
    assert [f.encode() for f in frames_of(events)] == [p76]


def test_truncated_long_frame_then_short_one_needs_expire() -> None:
    """A short frame inside a truncated long frame's declared extent waits for the caller's
    silence timer (it could be a forwarded frame); expire() then recovers it."""
    long_frame = max(RAW, key=len)
    d = Deframer()
    events = d.feed(long_frame[:20] + RAW[1])
    assert frames_of(events) == []
    events = d.expire()
    assert [f.encode() for f in frames_of(events)] == [RAW[1]]
    assert "truncated" in [e.reason for e in events if isinstance(e, Discarded)]
    assert d.buffered == 0

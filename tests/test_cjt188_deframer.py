"""CJ/T 188 streaming deframer: whole, byte by byte, random chunks, noise, FE runs, glued, truncated."""

from __future__ import annotations

import datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from meter_gateway.protocols.cjt188.deframer import Deframer, Discarded
from meter_gateway.protocols.cjt188.frame import Address, Frame
from meter_gateway.protocols.cjt188.messages import ReadReply, ReadRequest, WriteRequest
from meter_gateway.protocols.cjt188.status import Status

METER = Address.parse("78330011223344")
READ = ReadRequest(0x10, METER, 0x901F, 1).encode()
VALVE = WriteRequest.valve(0x10, METER, open_valve=False, ser=2).encode()
REPLY = ReadReply.build(
    0x20,
    METER,
    0x901F,
    {
        "heat.settlement": 1.5,
        "heat.total": 2.25,
        "power.heat": 3,
        "flow.rate": 0.0123,
        "volume.total": 10,
        "temperature.supply": 60.5,
        "temperature.return": 40.25,
        "time.working_hours": 1234,
        "meter.time": datetime.datetime(2024, 1, 2, 3, 4, 5),
        "status": Status.build("closed", battery_low=True),
    },
    ser=3,
).encode()
FRAMES = [READ, VALVE, REPLY]


def frames_of(events: list[Frame | Discarded]) -> list[bytes]:
    return [e.encode() for e in events if isinstance(e, Frame)]


def feed_all(deframer: Deframer, chunks: list[bytes]) -> list[Frame | Discarded]:
    events: list[Frame | Discarded] = []
    for chunk in chunks:
        events += deframer.feed(chunk)
    return events


def test_whole_and_byte_by_byte() -> None:
    stream = b"\xfe\xfe\xfe\xfe" + READ + b"\xfe\xfe" + VALVE + REPLY
    deframer = Deframer()
    events = deframer.feed(stream)
    assert frames_of(events) == FRAMES
    assert not [e for e in events if isinstance(e, Discarded)]
    assert deframer.preamble_bytes == 6
    deframer = Deframer()
    assert frames_of(feed_all(deframer, [bytes((b,)) for b in stream])) == FRAMES
    assert deframer.buffered == 0


def test_noise_and_resync_after_bad_candidates() -> None:
    bad_checksum = bytearray(READ)
    bad_checksum[-2] ^= 0xFF
    bad_end = bytearray(VALVE)
    bad_end[-1] = 0x17
    stream = b"\x01\x02" + bytes(bad_checksum) + b"\x68\x10" + bytes(bad_end) + REPLY + b"\x00"
    events = Deframer(max_data_length=0x64).feed(stream)
    assert frames_of(events) == [REPLY]
    reasons = {e.reason for e in events if isinstance(e, Discarded)}
    assert {"noise", "bad_checksum", "bad_end"} <= reasons
    detail = next(e.detail for e in events if isinstance(e, Discarded) and e.reason == "bad_checksum")
    assert detail.startswith("checksum expected")


def test_glued_and_truncated_frames() -> None:
    deframer = Deframer()
    # a cut-off heat reply (L=2EH) stalls only until a complete frame is behind it
    events = deframer.feed(REPLY[:20] + VALVE)
    assert events == [Discarded("truncated", REPLY[:20], "truncated after 20 bytes (L=46)"), *events[1:]]
    assert frames_of(events) == [VALVE]
    assert frames_of(deframer.feed(READ + REPLY[:20])) == [READ]
    assert deframer.buffered == 20  # half a frame is held ...
    assert frames_of(deframer.feed(REPLY[20:])) == [REPLY]  # ... and completed
    assert deframer.reset() == b""
    # a cut-off header whose L byte lands inside the next frame: resynchronised, frame kept
    events = Deframer().feed(READ[:9] + VALVE + READ)
    assert frames_of(events) == [VALVE, READ]


def test_length_over_the_cap_is_bad_length() -> None:
    raw = bytearray(READ)
    raw[10] = 0x70
    events = Deframer().feed(bytes(raw) + READ)
    assert frames_of(events) == [READ]
    assert any(isinstance(e, Discarded) and e.reason == "bad_length" for e in events)


noise = st.binary(max_size=12).map(lambda b: b.replace(b"\x68", b"\x00"))


@settings(max_examples=150, deadline=None)
@given(
    parts=st.lists(st.tuples(noise, st.integers(0, 4), st.sampled_from(FRAMES)), min_size=1, max_size=6),
    cuts=st.lists(st.integers(1, 40), max_size=30),
)
def test_random_chunks_with_noise_and_fe_runs(parts: list[tuple[bytes, int, bytes]], cuts: list[int]) -> None:
    stream = b"".join(n + b"\xfe" * fe + frame for n, fe, frame in parts)
    chunks, pos = [], 0
    for cut in cuts:
        chunks.append(stream[pos : pos + cut])
        pos += cut
    chunks.append(stream[pos:])
    deframer = Deframer()
    events = feed_all(deframer, chunks)
    assert frames_of(events) == [frame for _, _, frame in parts]
    assert deframer.buffered == 0
    assert all(e.reason == "noise" for e in events if isinstance(e, Discarded))

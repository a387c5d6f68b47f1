"""DL/T 645 frame layer, deframer, messages and the decode CLI, against the shared public vectors."""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meter_gateway.gateway.cli import decode_cmd
from meter_gateway.protocols.dlt645.deframer import Deframer, Discarded
from meter_gateway.protocols.dlt645.edition import Edition
from meter_gateway.protocols.dlt645.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from meter_gateway.protocols.dlt645.frame import BROADCAST, WILDCARD, Address, Control, Frame, parse_frame
from meter_gateway.protocols.dlt645.functions import infer_edition
from meter_gateway.protocols.dlt645.messages import (
    Ack,
    BroadcastTime,
    ChangeBaudReply,
    ChangeBaudRequest,
    ChangePasswordReply,
    ChangePasswordRequest,
    ClearEventsRequest,
    ClearMaxDemandRequest,
    ClearMeterRequest,
    ErrorReply,
    FreezeRequest,
    Password,
    ReadAddressReply,
    ReadAddressRequest,
    ReadFollowUpRequest,
    ReadReply,
    ReadRequest,
    RemoteControlReply,
    RemoteControlRequest,
    RereadRequest,
    WriteAddressRequest,
    WriteRequest,
    parse_message,
)
from meter_gateway.protocols.dlt645.remote_control import RemoteCommand
from tests.plugins.vectors import load_vectors

VECTORS = load_vectors()
E7, E97 = Edition.DLT645_2007, Edition.DLT645_1997
FIELDS = [
    "edition",
    "address",
    "control",
    "di",
    "value",
    "unit",
    "date",
    "weekday",
    "time",
    "error_code",
    "status_word",
    "relay",
    "password_level",
    "operator",
    "command",
    "n1",
    "valid_until",
    "broadcast_time",
    "meter_address",
]


def _expected(vector: dict[str, Any]) -> dict[str, Any]:
    return {key: vector[key] for key in FIELDS if key in vector}


def _check(decoded: dict[str, Any], vector: dict[str, Any]) -> None:
    for key, want in _expected(vector).items():
        got = decoded.get(key)
        if isinstance(want, float):
            assert got == pytest.approx(want), (vector["id"], key)
        else:
            assert got == want, (vector["id"], key, got)


@pytest.mark.parametrize("vector", VECTORS, ids=[v["id"] for v in VECTORS])
def test_vector_decodes_through_library(vector: dict[str, Any]) -> None:
    raw = bytes.fromhex(vector["hex"])
    events = Deframer().feed(raw)
    assert len(events) == 1
    frame = events[0]
    assert isinstance(frame, Frame)
    edition = Edition.parse(vector["edition"])
    assert infer_edition(frame.control.function) is edition
    decoded = decode_cmd.decode(vector["hex"], edition)[0]
    _check(decoded, vector)
    # Every frame, request or reply, re-encodes byte for byte (preamble aside).
    message = parse_message(frame, edition)
    assert message.encode(edition) == raw.lstrip(b"\xfe")
    assert frame.encode(preamble=len(raw) - len(raw.lstrip(b"\xfe"))) == raw


def test_all_vectors_through_cli_in_one_string() -> None:
    text = " ".join(v["hex"] for v in VECTORS)
    proc = subprocess.run(
        [sys.executable, "-m", "meter_gateway.gateway.cli", "decode", text], capture_output=True, text=True, check=True
    )
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == len(VECTORS)
    for line, vector in zip(lines, VECTORS, strict=True):
        _check(json.loads(line), vector)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("68 61 01 00 00 00 00 68 91 08 33 33 34 33 59 33 33 33 8B 16", "checksum expected 8A found 8B"),
        ("68 61 01 00 00 00 00 68 91 08 33 33 34 33", "truncated after 14 bytes"),
        ("12 34 56", "not a frame at the start: found 12, expected 68"),
        ("68 61 01 00 00 00 00 68 91 08 33 33 34 33 59 33 33 33 8A 17", "end byte expected 16 found 17"),
        ("68 6", "odd number of hex digits"),
        ("68 zz", "not hex"),
        ("FE FE", "only FE preamble bytes"),
        ("68 61 01 00 00 00 00 68 1F 00 51 16", "is not a function of either edition"),
    ],
)
def test_cli_rejects_bad_input_with_one_clear_line(text: str, message: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "meter_gateway.gateway.cli", "decode", text], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert message in lines[0]


# Shaped as the public captures of head-end and concentrator traffic: 4 FE, password level 02 with
# 000000, operator 00000000, N1 = 1A trip / 1B close permit, N2 = 00 and N3..N8 = 00 (no validity).
CAPTURED_TRIP = "FE FE FE FE 68 61 01 00 00 00 00 68 1C 10 35 33 33 33 33 33 33 33 4D 33 33 33 33 33 33 33 AA 16"
CAPTURED_CLOSE_PERMIT = (
    "FE FE FE FE 68 61 01 00 00 00 00 68 1C 10 35 33 33 33 33 33 33 33 4E 33 33 33 33 33 33 33 AB 16"
)


@pytest.mark.parametrize(("text", "command"), [(CAPTURED_TRIP, "trip"), (CAPTURED_CLOSE_PERMIT, "close-permit")])
def test_captured_remote_control_without_validity_time_decodes_with_a_warning(text: str, command: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "meter_gateway.gateway.cli", "decode", text], capture_output=True, text=True, check=False
    )
    assert (proc.returncode, proc.stderr) == (0, "")
    decoded = json.loads(proc.stdout)
    assert decoded["command"] == command
    assert (decoded["address"], decoded["password_level"], decoded["operator"]) == ("000000000161", 2, "00000000")
    assert (decoded["n2"], decoded["valid_until"]) == (0, None)
    [warning] = decoded["warnings"]
    assert "N3..N8 is all zero" in warning


def test_a_bad_frame_beside_a_captured_one_does_not_hide_it() -> None:
    bad = "68 61 01 00 00 00 00 68 91 08 33 33 34 33 59 33 33 33 8B 16"  # checksum off by one
    proc = subprocess.run(
        [sys.executable, "-m", "meter_gateway.gateway.cli", "decode", f"{CAPTURED_TRIP} {bad} {CAPTURED_CLOSE_PERMIT}"],
        capture_output=True,
        text=True,
        check=False,
    )
    commands = [json.loads(line).get("command") for line in proc.stdout.splitlines()]
    assert "trip" in commands
    assert "close-permit" in commands
    assert "checksum expected 8A found 8B" in proc.stdout + proc.stderr


def test_a_remote_control_without_validity_time_parses_but_is_never_encoded() -> None:
    [frame] = Deframer().feed(bytes.fromhex(CAPTURED_TRIP))
    assert isinstance(frame, Frame)
    request = parse_message(frame, E7)
    assert isinstance(request, RemoteControlRequest)
    assert (request.command, request.valid_until) == (RemoteCommand.TRIP, None)
    with pytest.raises(LocalProtocolError, match="needs a validity time"):
        request.encode(E7)
    # a validity time that is there but is no date is still the peer's error
    garbled = Frame(frame.address, frame.control, frame.data[:10] + bytes.fromhex("00 00 00 32 13 26"))
    with pytest.raises(RemoteProtocolError, match="is not a date and time"):
        parse_message(garbled, E7)


def test_cli_pretty_and_forced_edition() -> None:
    assert decode_cmd.main(["--pretty", VECTORS[1]["hex"]]) == 0
    # Forcing the wrong edition is an error stated as such, not a silent misreading.
    with pytest.raises(decode_cmd.DecodeError, match="not a DL/T 645-1997"):
        decode_cmd.decode(VECTORS[1]["hex"], E97)


# --- frame layer -------------------------------------------------------------------------------


def test_address_printing_and_validation() -> None:
    address = Address.parse("151230011061")
    assert address.wire == bytes.fromhex("611001301215")
    assert str(address) == "151230011061"
    assert BROADCAST.is_broadcast
    assert WILDCARD.is_wildcard
    assert Address.parse("AAAAAA011061").matches(address)
    assert not Address.parse("AAAAAA011062").matches(address)
    for bad in ("15123001106", "1512300110611", "15123001106F"):
        with pytest.raises(LocalProtocolError):
            Address.parse(bad)


def test_control_structure() -> None:
    control = Control.from_byte(0xB1)
    assert (control.from_meter, control.abnormal, control.follow_up, control.function) == (True, False, True, 0x11)
    assert Control.from_byte(0xDC).abnormal
    assert all(Control.from_byte(b).byte == b for b in range(256))
    with pytest.raises(LocalProtocolError):
        Control(0x20)


def test_checksum_byte_0x16_and_data_0x68_are_framed_by_length() -> None:
    # Search a payload whose checksum is 0x16 and whose scrambled data contains 0x68 and 0x16.
    for extra in range(256):
        frame = Frame(Address.parse("000000000001"), Control(0x11, from_meter=True), bytes([0x35, 0xE3, extra]))
        raw = frame.encode()
        if raw[-2] == 0x16:
            break
    else:  # pragma: no cover - the loop always finds one
        pytest.fail("no payload with checksum 16")
    assert 0x68 in raw[10:-2]
    assert 0x16 in raw[10:-2]
    assert Deframer().feed(raw) == [frame]
    assert parse_frame(raw) == frame


# --- messages: round trips for every function of both editions ------------------------------------

addresses = st.binary(min_size=6, max_size=6).map(Address)
dis7 = st.integers(0, 0xFFFFFFFF)
dis97 = st.integers(0, 0xFFFF)
hex_digits = st.text("0123456789ABCDEF", min_size=1, max_size=1)
operators = st.lists(hex_digits, min_size=8, max_size=8).map("".join)
passwords = st.builds(Password, st.integers(0, 9), st.lists(hex_digits, min_size=6, max_size=6).map("".join))
times = st.datetimes(datetime.datetime(2000, 1, 1), datetime.datetime(2099, 12, 31, 23, 59, 59)).map(
    lambda d: d.replace(microsecond=0)
)
minutes = times.map(lambda d: d.replace(second=0))
bauds = st.sampled_from([600, 1200, 2400, 4800, 9600, 19200])
byte = st.integers(0, 255)


def _messages(edition: Edition) -> st.SearchStrategy[Any]:
    di = dis7 if edition is E7 else dis97
    common = [
        st.builds(BroadcastTime, addresses, times),
        st.builds(ReadRequest, addresses, di),
        st.builds(ReadReply, addresses, di, st.binary(max_size=40), st.booleans()),
        st.builds(WriteAddressRequest, addresses, addresses),
        st.builds(ChangeBaudRequest, addresses, bauds),
        st.builds(ChangeBaudReply, addresses, bauds),
        st.builds(ChangePasswordRequest, addresses, passwords, passwords),
        st.builds(ChangePasswordReply, addresses, passwords),
        st.builds(ErrorReply, addresses, st.sampled_from([0x11, 0x14, 0x01, 0x04]), byte),
    ]
    if edition is E7:
        return st.one_of(
            *common,
            st.builds(ReadRequest, addresses, di, byte),
            st.builds(ReadRequest, addresses, di, byte, minutes),
            st.builds(ReadFollowUpRequest, addresses, di, byte),
            st.builds(ReadReply, addresses, di, st.binary(max_size=40), st.booleans(), byte),
            st.builds(ReadAddressRequest, addresses),
            st.builds(ReadAddressReply, addresses, addresses),
            st.builds(WriteRequest, addresses, di, passwords, operators, st.binary(max_size=30)),
            st.builds(FreezeRequest, addresses, *[st.integers(0, 99)] * 4),
            st.builds(ClearMaxDemandRequest, addresses, passwords, operators),
            st.builds(ClearMeterRequest, addresses, passwords, operators),
            st.builds(ClearEventsRequest, addresses, passwords, operators, dis7),
            st.builds(
                RemoteControlRequest, addresses, passwords, operators, st.sampled_from(RemoteCommand), byte, times
            ),
            st.builds(RemoteControlReply, addresses, st.none() | st.integers(0, 0xFFFF)),
            st.builds(ErrorReply, addresses, st.just(0x1C), st.integers(0, 0xFFFF), st.just(True)),
            st.builds(Ack, addresses, st.sampled_from([0x14, 0x15, 0x16, 0x19, 0x1A, 0x1B])),
        )
    return st.one_of(
        *common,
        st.builds(ReadFollowUpRequest, addresses, di, st.just(0)),
        st.builds(RereadRequest, addresses),
        st.builds(WriteRequest, addresses, di, passwords, st.just("00000000"), st.binary(max_size=30)),
        st.builds(ClearMaxDemandRequest, addresses),
        st.builds(Ack, addresses, st.sampled_from([0x04, 0x0A, 0x10])),
    )


@pytest.mark.parametrize("edition", [E7, E97], ids=["2007", "1997"])
@settings(max_examples=400, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_every_message_round_trips(edition: Edition, data: st.DataObject) -> None:
    message = data.draw(_messages(edition))
    raw = message.encode(edition, preamble=data.draw(st.integers(0, 4)))
    [frame] = Deframer().feed(raw)
    assert isinstance(frame, Frame)
    parsed = parse_message(frame, edition)
    assert type(parsed) is type(message)
    assert parsed.encode(edition) == message.encode(edition)
    assert parsed == message


def test_messages_refuse_the_other_edition_and_bad_values() -> None:
    address = Address.parse("000000000001")
    with pytest.raises(LocalProtocolError, match="does not exist in DL/T 645-1997"):
        RemoteControlRequest(address).encode(E97)
    with pytest.raises(LocalProtocolError):
        ReadRequest(address, 0x1_0000).encode(E97)
    with pytest.raises(LocalProtocolError):
        ChangeBaudRequest(address, 1000).encode(E7)
    with pytest.raises(LocalProtocolError):
        FreezeRequest(address, 100).encode(E7)
    assert "digits='******'" in repr(Password(4, "123456"))


def test_remote_control_error_word_and_plain_error_byte() -> None:
    address = Address.parse("000000000001")
    word = Frame(address, Control(0x1C, from_meter=True, abnormal=True), (0x0400 | 0x0008).to_bytes(2, "little"))
    reply = parse_message(word, E7)
    assert isinstance(reply, ErrorReply)
    assert reply.word
    assert reply.flags == ("authentication_failed", "validity_expired")
    single = parse_message(Frame(address, Control(0x1C, from_meter=True, abnormal=True), b"\x04"), E7)
    assert isinstance(single, ErrorReply)
    assert single.flags == ("password_unauthorised",)
    status = parse_message(Frame(address, Control(0x1C, from_meter=True), b"\x34\x12"), E7)
    assert status == RemoteControlReply(address, 0x1234)


def test_garbled_payloads_raise_remote_protocol_error() -> None:
    address = Address.parse("000000000001")
    cases = [
        Frame(address, Control(0x1C), b"\x02" * 15),  # remote control one byte short
        Frame(address, Control(0x1C), b"\x02" * 8 + b"\x99\x00" + b"\x00" * 6),  # undefined N1
        Frame(address, Control(0x08), bytes.fromhex("61 99 10 05 06 17")),  # second 61
        Frame(address, Control(0x11, from_meter=True), b"\x00"),  # DI cut short
        Frame(address, Control(0x1F), b""),  # no such function
        Frame(address, Control(0x17, from_meter=True), b"\x03"),  # two baud bits
    ]
    for frame in cases:
        with pytest.raises(RemoteProtocolError):
            parse_message(frame, E7)


# --- deframer ----------------------------------------------------------------------------------

reply_frames = st.builds(
    Frame,
    addresses,
    st.builds(Control, st.integers(0, 0x1F), st.booleans(), st.booleans(), st.booleans()),
    st.binary(max_size=60),
)
noise = st.binary(max_size=20).map(lambda b: b.replace(b"\x68", b"\x00"))


def _frames_of(events: list[Frame | Discarded]) -> list[Frame]:
    return [e for e in events if isinstance(e, Frame)]


@settings(max_examples=300)
@given(
    frames=st.lists(st.tuples(reply_frames, st.integers(0, 6), noise), min_size=1, max_size=6),
    cuts=st.lists(st.integers(1, 30), max_size=40),
)
def test_deframer_same_frames_whole_bytewise_and_chunked(
    frames: list[tuple[Frame, int, bytes]], cuts: list[int]
) -> None:
    stream = b"".join(noise_ + frame.encode(preamble) for frame, preamble, noise_ in frames)
    expected = [frame for frame, _, _ in frames]

    whole = Deframer(max_data_length=255)
    assert _frames_of(whole.feed(stream)) == expected

    bytewise = Deframer(max_data_length=255)
    got: list[Frame] = []
    for i in range(len(stream)):
        got += _frames_of(bytewise.feed(stream[i : i + 1]))
    assert got == expected

    chunked = Deframer(max_data_length=255)
    got, pos = [], 0
    for cut in [*cuts, len(stream)]:
        got += _frames_of(chunked.feed(stream[pos : pos + cut]))
        pos += cut
        if pos >= len(stream):
            break
    got += _frames_of(chunked.feed(stream[pos:]))
    assert got == expected


@settings(max_examples=500)
@given(data=st.binary(max_size=600), chunk=st.integers(1, 64))
def test_arbitrary_bytes_never_raise_and_never_grow_the_buffer(data: bytes, chunk: int) -> None:
    deframer = Deframer()
    for i in range(0, len(data), chunk):
        for event in deframer.feed(data[i : i + chunk]):
            assert isinstance(event, Frame | Discarded)
        assert deframer.buffered <= deframer.buffer_limit


@settings(max_examples=300)
@given(data=st.binary(max_size=300))
def test_parsers_raise_only_protocol_errors(data: bytes) -> None:
    for edition in (E7, E97):
        try:
            frame = parse_frame(data)
            parse_message(frame, edition)
        except ProtocolError:
            pass


def test_resync_after_bad_checksum_bad_end_bad_length_and_truncation() -> None:
    good = Frame(
        Address.parse("000000000161"), Control(0x11, from_meter=True), bytes.fromhex("00 00 01 00 26 00 00 00")
    )
    raw = good.encode()
    bad_cs = bytearray(raw)
    bad_cs[-2] ^= 1
    bad_end = bytearray(raw)
    bad_end[-1] = 0x17
    bad_len = bytearray(raw)
    bad_len[9] = 0xF0
    truncated = raw[:14]
    stream = bytes(bad_cs) + raw + bytes(bad_end) + raw + bytes(bad_len) + raw + truncated + raw
    deframer = Deframer()
    events = deframer.feed(stream)
    assert _frames_of(events) == [good] * 4
    reasons = {e.reason for e in events if isinstance(e, Discarded)}
    # the truncated frame is complete in length once the next frame arrives, so it fails its checksum
    assert {"bad_checksum", "bad_end", "bad_length"} <= reasons
    assert deframer.buffered == 0


def test_truncated_frame_followed_by_new_frame_is_not_held_back() -> None:
    # A reply cut off mid-frame, then a complete new reply: the new one must come out at once,
    # even though the truncated frame's length byte claims more bytes than have arrived.
    long = Frame(Address.parse("000000000001"), Control(0x11, from_meter=True), bytes(100))
    short = Frame(Address.parse("000000000002"), Control(0x11, from_meter=True), bytes(6))
    deframer = Deframer()
    events = deframer.feed(long.encode()[:30] + short.encode(preamble=2))
    assert _frames_of(events) == [short]
    assert any(isinstance(e, Discarded) and e.reason == "truncated" for e in events)


def test_preamble_is_not_noise_and_reset_drops_stale_input() -> None:
    frame = Frame(Address.parse("000000000001"), Control(0x13, from_meter=True), bytes(6))
    deframer = Deframer()
    events = deframer.feed(b"\xfe" * 4 + frame.encode())
    assert events == [frame]
    assert deframer.preamble_bytes == 4
    assert deframer.feed(b"\x01\x02\xfe") == [Discarded("noise", b"\x01\x02")]
    deframer.feed(frame.encode()[:5])
    assert deframer.reset() == frame.encode()[:5]
    assert deframer.buffered == 0


def test_edition_di_length_and_hash_are_per_member_constants() -> None:
    assert (E7.di_length, E97.di_length) == (4, 2)
    assert Edition("2007") is E7
    assert Edition.parse("dlt645-1997") is E97
    table = {E7: "seven", E97: "ninety-seven"}
    assert table[Edition("2007")] == "seven"
    assert table[Edition("1997")] == "ninety-seven"
    assert len({E7, E97, Edition("2007")}) == 2


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([(E7, 0x91), (E97, 0x81), (E7, 0x81), (E97, 0x91), (E7, 0xB1), (E7, 0x92)]),
    st.binary(max_size=12),
    st.booleans(),
)
def test_plain_read_reply_fast_path_is_the_general_parser(
    case: tuple[Edition, int], data: bytes, interned: bool
) -> None:
    """parse_message's shortcut for 91/81 gives exactly what ReadReply.parse gives (or its error)."""
    edition, byte = case
    control = Control.from_byte(byte)
    if not interned:  # an equal Control built by hand takes the general path: same result
        control = Control(control.function, control.from_meter, control.abnormal, control.follow_up)
    frame = Frame(Address.parse("000000000161"), control, data)
    try:
        expected: object = ReadReply.parse(frame, edition)
    except RemoteProtocolError as exc:
        expected = str(exc)
    try:
        found: object = parse_message(frame, edition)
    except RemoteProtocolError as exc:
        found = str(exc)
    if byte in ({0x91, 0xB1, 0x92} if edition is E7 else {0x81}):
        assert found == expected
        if isinstance(found, ReadReply) and byte in {0x91, 0x81}:
            assert found.seq is None
            assert not found.more
            assert found.encode(edition) == frame.encode()
    else:  # not a read reply of this edition
        assert found == f"control code {byte:02X} is not a DL/T 645-{edition.value} reply function"


def test_deframer_accepts_any_bytes_like_chunk_and_keeps_partial_input() -> None:
    frame = Frame(Address.parse("000000000001"), Control(0x11, from_meter=True), bytes.fromhex("33333433"))
    wire = b"\xfe\xfe" + frame.encode()
    for chunk_type in (bytes, bytearray, memoryview):
        deframer = Deframer()
        assert deframer.feed(chunk_type(wire[:9])) == []
        assert deframer.buffered == 7  # the two preamble bytes are counted, not held
        assert deframer.feed(chunk_type(wire[9:])) == [frame]
        assert (deframer.buffered, deframer.preamble_bytes) == (0, 2)
    deframer = Deframer()
    events = deframer.feed(b"\xfe\x01\xfe" + frame.encode())
    assert events == [Discarded("noise", b"\x01"), frame]
    assert deframer.preamble_bytes == 2


def test_a_known_address_is_shared_by_the_frames_that_carry_it() -> None:
    mine = Address.parse("000012345678")
    other = Address.parse("000012345679")
    deframer = Deframer()
    deframer.know(mine)
    data = b"".join(Frame(a, Control(0x11, from_meter=True), bytes(4)).encode(2) for a in (mine, other))
    frames = [e for e in deframer.feed(data) if isinstance(e, Frame)]
    assert [f.address for f in frames] == [mine, other]
    assert frames[0].address is mine  # the caller's object, not a decoded copy
    assert frames[1].address is not other  # unknown ones are decoded as before

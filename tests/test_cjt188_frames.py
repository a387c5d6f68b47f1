"""CJ/T 188 frame layer and describe(), against the shared public vectors (tests/vectors/cjt188.json)."""

from __future__ import annotations

import re
from typing import Any

import pytest

from meter_gateway.protocols.cjt188.describe import describe_frame, looks_like_cjt188, safe_describe
from meter_gateway.protocols.cjt188.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from meter_gateway.protocols.cjt188.frame import WILDCARD, Address, Control, Frame, checksum, parse_frame
from meter_gateway.protocols.cjt188.identifiers import DiOrder, di_bytes, di_from
from meter_gateway.protocols.cjt188.messages import ReadReply, ReadRequest, parse_message
from tests.plugins.vectors import load_vectors

VECTORS = load_vectors("cjt188")
GOOD = [v for v in VECTORS if v["checksum_ok"]]
BAD = [v for v in VECTORS if not v["checksum_ok"]]
CHECKSUM_ERROR = re.compile(r"checksum expected [0-9A-F]{2} found [0-9A-F]{2}")


def order_of(vector: dict[str, Any]) -> DiOrder:
    """The vectors say per frame how its DI was sent: 90 1F / 81 0A, or 1F 90 / 0A 81."""
    return "swapped" if vector["data_hex"][:4] in ("1F90", "0A81") else "standard"


def test_every_vector_names_its_source() -> None:
    assert all(v["source"] for v in VECTORS)
    assert len(GOOD) == 8
    assert len(BAD) == 2


@pytest.mark.parametrize("vector", GOOD, ids=[v["id"] for v in GOOD])
def test_good_vectors_decode_with_their_fields(vector: dict[str, Any]) -> None:
    frame = parse_frame(bytes.fromhex(vector["hex"]))
    assert f"{frame.meter_type:02X}" == vector["meter_type"]
    assert str(frame.address) == vector["address"]
    assert str(frame.control) == vector["control"]
    assert len(frame.data) == vector["length"]
    assert frame.data.hex().upper() == vector["data_hex"]
    order = order_of(vector)
    message = parse_message(frame, order)
    assert isinstance(message, ReadRequest | ReadReply)
    assert message.di in (0x901F, 0x810A)
    assert message.ser == frame.data[2]
    # re-encoding gives the same bytes (preamble aside)
    assert message.encode(order) == bytes.fromhex(vector["hex"]).lstrip(b"\xfe")
    described = describe_frame(bytes.fromhex(vector["hex"]), order)
    assert described["address"] == vector["address"]
    assert described["di"] in ("901F", "810A")
    assert "warnings" not in described
    assert looks_like_cjt188(bytes.fromhex(vector["hex"]))


def test_vector_claims() -> None:
    by_id = {v["id"]: v for v in VECTORS}
    c1 = parse_message(parse_frame(bytes.fromhex(by_id["C1"]["hex"])), "standard")
    c2 = parse_message(parse_frame(bytes.fromhex(by_id["C2"]["hex"])), "swapped")
    assert c1 == c2 == ReadRequest(0x10, WILDCARD, 0x901F, 1)
    # the checksum cannot tell the two orders apart (the reason di_order is a setting)
    assert bytes.fromhex(by_id["C1"]["hex"])[-2] == bytes.fromhex(by_id["C2"]["hex"])[-2]
    assert parse_message(parse_frame(bytes.fromhex(by_id["C3"]["hex"]))) == ReadRequest(0x10, WILDCARD, 0x901F, 0x90)
    c5 = parse_message(parse_frame(bytes.fromhex(by_id["C5"]["hex"])), "swapped")
    assert isinstance(c5, ReadReply)
    assert str(c5.meter_address) == "20260324152900"
    c7 = describe_frame(bytes.fromhex(by_id["C7"]["hex"]), "swapped")
    assert c7["meter_address"] == "78330123456789"
    assert c7["manufacturer"] == "7833"
    assert c7["function"] == "read-address"


@pytest.mark.parametrize("vector", BAD, ids=[v["id"] for v in BAD])
def test_bad_vectors_are_rejected_naming_expected_and_found(vector: dict[str, Any]) -> None:
    raw = bytes.fromhex(vector["hex"])
    with pytest.raises(RemoteProtocolError, match=CHECKSUM_ERROR) as caught:
        parse_frame(raw)
    body = raw.lstrip(b"\xfe")
    assert f"found {body[-2]:02X}" in str(caught.value)
    assert f"expected {checksum(body[:-2]):02X}" in str(caught.value)
    assert not looks_like_cjt188(raw)
    assert CHECKSUM_ERROR.search(safe_describe(raw)["error"])


def test_c9_payload_decodes_as_claimed_once_its_checksum_is_fixed() -> None:
    raw = bytearray(bytes.fromhex(next(v for v in VECTORS if v["id"] == "C9")["hex"]).lstrip(b"\xfe"))
    raw[-2] = checksum(raw[:-2])
    described = describe_frame(bytes(raw), "swapped")
    values = {v["quantity"]: v for v in described["values"]}
    assert values["volume.total"]["value"] == 556677.0
    assert values["volume.total"]["unit"] == "m3"
    assert values["volume.settlement"]["value"] == 556677.0
    assert values["meter.time"]["value"] == "2015-05-11T22:01:31"
    assert described["status"] == {"st": "8421", "valve": "closed", "battery_low": False}


def test_public_example_frames() -> None:
    """Frames published with the standard's description (redisant / csdn posts, see catalogue [S2] [S8])."""
    reply = bytes.fromhex(
        "FEFEFEFE6810180212202000008116901F00000200002C000200002C0000000000000000FF8516".replace(" ", "")
    )
    described = describe_frame(reply)
    assert described["address"] == "00002020120218"
    assert [v["value"] for v in described["values"]] == [2.0, 2.0, None]  # a clock-less meter sends zeros
    valve = describe_frame(bytes.fromhex("FEFEFEFE68106905900515337804 04A017015550 16".replace(" ", "")))
    assert valve["di"] == "A017"
    assert valve["values"] == [{"quantity": "valve.command", "value": "open"}]
    any_meter = describe_frame(bytes.fromhex("FEFEFEFE68AAAAAAAAAAAAAAAA0303810A004916"))
    assert any_meter["meter_type_name"] == "any"
    assert any_meter["di"] == "810A"


def test_parse_frame_errors_are_clear() -> None:
    good = ReadRequest(0x10, Address.parse("78330011223344"), 0x901F, 5).encode()
    with pytest.raises(RemoteProtocolError, match="end byte expected 16 found 17"):
        parse_frame(good[:-1] + b"\x17")
    with pytest.raises(RemoteProtocolError, match="bad length: L=3 needs 16 bytes, got 15"):
        parse_frame(good[:-1])
    with pytest.raises(RemoteProtocolError, match="bad length: 1 unexpected bytes"):
        parse_frame(good + b"\x00")
    with pytest.raises(RemoteProtocolError, match="starts with 69"):
        parse_frame(b"\x69" + good[1:])
    with pytest.raises(RemoteProtocolError, match="only FE"):
        parse_frame(b"\xfe\xfe")
    with pytest.raises(RemoteProtocolError, match="empty"):
        parse_frame(b"")
    with pytest.raises(RemoteProtocolError, match="truncated"):
        parse_frame(good[:5])


def test_encoder_is_strict() -> None:
    address = Address.parse("78330011223344")
    with pytest.raises(LocalProtocolError):
        Frame(0x10, address, Control(0x04), bytes(0x33)).encode()  # writes: L <= 32H
    Frame(0x10, address, Control(0x04), bytes(0x32)).encode()
    with pytest.raises(LocalProtocolError):
        Frame(0x10, address, Control(0x01, from_meter=True), bytes(0x65)).encode()  # L <= 64H
    with pytest.raises(LocalProtocolError):
        Address.parse("7833001122334")
    with pytest.raises(LocalProtocolError):
        Address.parse("7833001122334F")
    with pytest.raises(LocalProtocolError):
        Control(0x40)
    with pytest.raises(LocalProtocolError):
        di_bytes(0x10000)
    with pytest.raises(LocalProtocolError):
        di_bytes(0x901F, "little")  # type: ignore[arg-type]
    with pytest.raises(ProtocolError):
        ReadRequest(0x10, address, 0x901F, 256).encode()


def test_address_and_control() -> None:
    address = Address.parse("78330011223344")
    assert address.wire == bytes.fromhex("44332211003378")
    assert address.manufacturer == "7833"
    assert not address.is_wildcard
    assert WILDCARD.matches(address)
    assert Address.parse("AAAAAAAAAAAAAA") == WILDCARD
    control = Control.from_byte(0xC4)
    assert (control.function, control.from_meter, control.abnormal) == (0x04, True, True)
    assert control.byte == 0xC4
    assert di_bytes(0x901F) == b"\x90\x1f"
    assert di_bytes(0x901F, "swapped") == b"\x1f\x90"
    assert di_from(b"\x0a\x81", "swapped") == 0x810A


def test_looks_like_tells_645_and_698_apart() -> None:
    dlt645 = bytes.fromhex("68010000000000681104333333338016".replace(" ", ""))
    dlt645 = dlt645[:-2] + bytes((checksum(dlt645[:-2]),)) + b"\x16"
    assert not looks_like_cjt188(dlt645)
    dlt698 = bytes.fromhex("681700432505000000000000105B0501004001020000ED0316")
    assert not looks_like_cjt188(dlt698)
    assert not looks_like_cjt188(b"")
    assert not looks_like_cjt188(b"\x68" * 20)
    # an address byte A5 of 68H: still CJ/T 188, since it is not also a valid DL/T 645 frame
    odd = ReadRequest(0x10, Address.parse("00680011223344"), 0x901F, 0).encode(preamble=2)
    assert looks_like_cjt188(odd)

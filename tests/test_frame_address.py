"""Address keeps the printed form it was parsed from, without a second copy per meter."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from meter_gateway.protocols.dlt645.frame import Address


def test_parsed_canonical_text_is_shared_not_copied() -> None:
    text = "".join(["0000", "0000", "0161"])  # built at run time: not a shared constant
    address = Address.parse(text)
    assert str(address) is text
    assert address.wire == bytes.fromhex("610100000000")


@pytest.mark.parametrize(
    ("text", "printed"),
    [
        (" 000000000161 ", "000000000161"),
        ("0000 0000 0161", "000000000161"),
        ("aaaaaa011061", "AAAAAA011061"),
        ("999999999999", "999999999999"),
    ],
)
def test_non_canonical_text_prints_canonically(text: str, printed: str) -> None:
    address = Address.parse(text)
    assert str(address) == printed
    assert str(address) == str(Address(address.wire))  # same as an address built from the wire


def test_printed_form_does_not_take_part_in_equality_or_hashing() -> None:
    parsed = Address.parse("151230011061")
    from_wire = Address(parsed.wire)
    assert parsed == from_wire
    assert hash(parsed) == hash(from_wire)
    assert repr(parsed) == repr(from_wire) == "Address('151230011061')"
    assert {parsed: 1}[from_wire] == 1


def test_copies_keep_the_printed_form() -> None:
    parsed = Address.parse("aaaaaa011061")
    assert str(pickle.loads(pickle.dumps(parsed))) == "AAAAAA011061"
    replaced = dataclasses.replace(parsed, wire=bytes.fromhex("010000000000"))
    assert str(replaced) == "000000000001"  # a new wire never keeps the old text

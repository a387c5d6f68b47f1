"""The pure register value codec: layouts, scales, round trips, and its two error kinds."""

from __future__ import annotations

import math
import struct
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meter_gateway.protocols.modbus import (
    BYTE_ORDERS,
    DATA_TYPES,
    LocalValueError,
    ModbusValueError,
    RemoteValueError,
    ValueCodec,
)

INT_RANGES = {
    "u16": (0, 2**16 - 1),
    "i16": (-(2**15), 2**15 - 1),
    "u32": (0, 2**32 - 1),
    "i32": (-(2**31), 2**31 - 1),
    "u64": (0, 2**64 - 1),
    "i64": (-(2**63), 2**63 - 1),
}


# -- known layouts: the four names vendor manuals use -------------------------------------------


# 230.1 as float32 is 0x4366199A: bytes A=43 B=66 C=19 D=9A
@pytest.mark.parametrize(
    ("word_order", "byte_order", "registers", "layout"),
    [
        ("big", "big", [0x4366, 0x199A], "ABCD"),
        ("little", "big", [0x199A, 0x4366], "CDAB"),
        ("big", "little", [0x6643, 0x9A19], "BADC"),
        ("little", "little", [0x9A19, 0x6643], "DCBA"),
    ],
)
def test_float32_layouts_match_vendor_names(
    word_order: str, byte_order: str, registers: list[int], layout: str
) -> None:
    codec = ValueCodec("float32", byte_order=byte_order, word_order=word_order)
    assert codec.layout == layout
    assert codec.encode(230.1) == registers
    assert codec.decode(registers) == 230.1  # the value the meter meant, not 230.10000610351562


def test_u64_word_order_reverses_all_four_registers() -> None:
    value = 0x0102030405060708
    assert ValueCodec("u64").encode(value) == [0x0102, 0x0304, 0x0506, 0x0708]
    assert ValueCodec("u64", word_order="little").encode(value) == [0x0708, 0x0506, 0x0304, 0x0102]
    assert ValueCodec("u64", word_order="little", byte_order="little").layout == "HGFEDCBA"


def test_signed_16_bit_and_byte_swap() -> None:
    assert ValueCodec("i16").decode([0xFFFE]) == -2
    assert ValueCodec("i16", byte_order="little").decode([0xFEFF]) == -2
    assert ValueCodec("u16").decode([0xFFFE]) == 65534


def test_float64_round_trips_exactly() -> None:
    codec = ValueCodec("float64", word_order="little")
    assert codec.count == 4
    assert codec.decode(codec.encode(123456789.123456)) == 123456789.123456


# -- scale --------------------------------------------------------------------------------------


def test_scale_is_applied_in_decimal() -> None:
    volts = ValueCodec("u16", scale=0.1)
    assert volts.decode([2301]) == 230.1  # not 230.10000000000002
    kw = ValueCodec("i32", scale=0.001)
    assert kw.decode(kw.encode(-1.234)) == -1.234
    assert kw.encode(-1.234) == [0xFFFF, 0xFB2E]  # -1234 W
    energy = ValueCodec("u32", word_order="little", scale=0.01)
    assert energy.decode(energy.encode(1234567.89)) == 1234567.89
    # a float register with a multiplier (CHINT-style x0.1 V)
    chint = ValueCodec("float32", scale=0.1)
    assert chint.decode(ValueCodec("float32").encode(2301.0)) == 230.1


def test_unscaled_integers_stay_integers() -> None:
    value = ValueCodec("u32").decode([0x0001, 0x0000])
    assert value == 65536
    assert isinstance(value, int)
    assert isinstance(ValueCodec("u16", scale=0.5).decode([3]), float)


def test_integer_encoding_rounds_to_the_nearest_step() -> None:
    codec = ValueCodec("u16", scale=0.1)
    assert codec.encode(230.14) == [2301]
    assert codec.encode(230.16) == [2302]


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_from_a_meter_is_bad_data(bad: float) -> None:
    codec = ValueCodec("float32", scale=0.001)
    registers = codec.encode(bad)
    with pytest.raises(RemoteValueError) as info:
        codec.decode(registers)
    assert isinstance(info.value, ModbusValueError)
    assert info.value.value == bad or (math.isnan(bad) and math.isnan(info.value.value))
    assert "7FC0" in str(info.value) or "7F80" in str(info.value) or "FF80" in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"type": "float16"}, "unknown data type 'float16'"),
        ({"type": "u16", "word_order": "middle"}, "word_order must be 'big' or 'little'"),
        ({"type": "u16", "byte_order": "BIG"}, "byte_order"),
        ({"type": "u16", "scale": 0}, "non-zero"),
        ({"type": "u16", "scale": math.nan}, "finite"),
        ({"type": "u16", "scale": True}, "must be a number"),
    ],
)
def test_bad_codec_definitions_are_local_errors(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(LocalValueError, match=match):
        ValueCodec(**kwargs)  # type: ignore[arg-type]


def test_misuse_is_a_local_error() -> None:
    codec = ValueCodec("u32")
    with pytest.raises(LocalValueError, match="takes 2 register"):
        codec.decode([1])
    with pytest.raises(LocalValueError, match=r"0\.\.65535"):
        codec.decode([1, 70000])
    with pytest.raises(LocalValueError, match="does not fit u32"):
        codec.encode(-1)
    with pytest.raises(LocalValueError, match="does not fit u16"):
        ValueCodec("u16", scale=0.1).encode(6553.6)
    with pytest.raises(LocalValueError, match="cannot encode nan"):
        ValueCodec("i16").encode(math.nan)
    with pytest.raises(LocalValueError, match="does not fit float32"):
        ValueCodec("float32").encode(1e39)
    with pytest.raises(LocalValueError, match="not a number"):
        ValueCodec("u16").encode("12")  # type: ignore[arg-type]


# -- round trips -------------------------------------------------------------------------------

orders = st.sampled_from(BYTE_ORDERS)


@given(
    type_=st.sampled_from(sorted(INT_RANGES)),
    word_order=orders,
    byte_order=orders,
    data=st.data(),
)
def test_integer_round_trip_all_orders(type_: str, word_order: str, byte_order: str, data: st.DataObject) -> None:
    low, high = INT_RANGES[type_]
    value = data.draw(st.integers(low, high))
    codec = ValueCodec(type_, byte_order=byte_order, word_order=word_order)
    registers = codec.encode(value)
    assert len(registers) == codec.count
    assert all(0 <= r <= 0xFFFF for r in registers)
    assert codec.decode(registers) == value


@given(value=st.floats(width=32, allow_nan=False, allow_infinity=False), word_order=orders, byte_order=orders)
def test_float32_round_trip_all_orders(value: float, word_order: str, byte_order: str) -> None:
    codec = ValueCodec("float32", byte_order=byte_order, word_order=word_order)
    decoded = codec.decode(codec.encode(value))
    # the decoded number is the same float32 (in its shortest decimal form)
    assert struct.pack(">f", decoded) == struct.pack(">f", value)


@given(value=st.floats(allow_nan=False, allow_infinity=False), word_order=orders, byte_order=orders)
def test_float64_round_trip_all_orders(value: float, word_order: str, byte_order: str) -> None:
    codec = ValueCodec("float64", byte_order=byte_order, word_order=word_order)
    assert codec.decode(codec.encode(value)) == value


@given(
    raw=st.integers(-(2**31), 2**31 - 1),
    scale=st.sampled_from([0.1, 0.01, 0.001, 0.0001, 10, 0.5]),
    word_order=orders,
)
def test_scaled_integer_round_trip(raw: int, scale: float, word_order: str) -> None:
    codec = ValueCodec("i32", word_order=word_order, scale=scale)
    registers = ValueCodec("i32", word_order=word_order).encode(raw)
    value = codec.decode(registers)
    assert codec.encode(value) == registers  # the scaled value encodes back to the same raw


def test_all_types_are_covered() -> None:
    assert set(DATA_TYPES) == {*INT_RANGES, "float32", "float64"}


@given(
    type_=st.sampled_from(DATA_TYPES),
    word_order=orders,
    byte_order=orders,
    scale=st.sampled_from([1, 0.1, 0.001, 10]),
    before=st.lists(st.integers(0, 0xFFFF), max_size=6),
    after=st.lists(st.integers(0, 0xFFFF), max_size=6),
    data=st.data(),
)
def test_decode_at_reads_a_value_where_it_lies_in_a_reply(
    type_: str, word_order: str, byte_order: str, scale: float, before: list[int], after: list[int], data: st.DataObject
) -> None:
    """A meter read decodes each value from the reply's register bytes (decode_at): the same
    value, or the same error, as decoding that value's registers alone."""
    codec = ValueCodec(type_, byte_order=byte_order, word_order=word_order, scale=scale)
    registers = data.draw(st.lists(st.integers(0, 0xFFFF), min_size=codec.count, max_size=codec.count))
    block = [*before, *registers, *after]
    wire = struct.pack(f">{len(block)}H", *block)

    def outcome(decode: Callable[[], int | float]) -> tuple[str, object]:
        try:
            return "value", decode()
        except RemoteValueError as e:
            return "error", str(e)

    kind, expected = outcome(lambda: codec.decode(registers))
    got_kind, got = outcome(lambda: codec.decode_at(wire, 2 * len(before)))
    assert got_kind == kind
    if kind == "error":
        assert got == expected
        return
    assert isinstance(got, int | float)
    assert got == expected or (math.isnan(got) and math.isnan(float(expected)))  # type: ignore[arg-type]
    assert type(got) is type(expected)


def test_decode_at_past_the_reply_is_a_local_error() -> None:
    with pytest.raises(LocalValueError, match="takes 2 register"):
        ValueCodec("u32").decode_at(b"\x00\x01\x00", 0)
    with pytest.raises(LocalValueError, match="takes 1 register"):
        ValueCodec("u16").decode_at(b"\x00\x01", 2)

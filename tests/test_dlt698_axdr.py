"""A-XDR Data: round trip for every type, tolerant decoding (non-minimal lengths flagged)."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meter_gateway.protocols.dlt698.axdr import (
    COMDCB,
    MS,
    OAD,
    OMD,
    RCSD,
    ROAD,
    RSD,
    SID,
    SIDMAC,
    TI,
    TSA,
    BitString,
    Data,
    DataType,
    Date,
    DateTime,
    DateTimeS,
    Ints,
    Region,
    ScalerUnit,
    Selector1,
    Selector2,
    SelectorLast,
    SelectorLastMS,
    SelectorRangeMS,
    SelectorTimeMS,
    Time,
    data_bytes,
    parse_data,
    plain,
)
from meter_gateway.protocols.dlt698.errors import LocalProtocolError, RemoteProtocolError
from meter_gateway.protocols.dlt698.frame import AddressType, ServerAddress

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
oads = st.builds(OAD, u16, u8, u8)
dts = st.builds(DateTimeS, u16, u8, u8, u8, u8, u8)
addresses = st.builds(
    ServerAddress, st.binary(min_size=1, max_size=16), st.sampled_from(list(AddressType)), st.integers(0, 3)
)
tsas = st.builds(TSA, st.one_of(st.none(), addresses))
simple_numbers = st.sampled_from([DataType.UNSIGNED, DataType.LONG_UNSIGNED])
region_ends = st.builds(Data, st.just(DataType.UNSIGNED), u8)
regions = st.builds(Region, st.integers(0, 3), region_ends, region_ends)
ms_values = st.one_of(
    st.sampled_from([MS(0), MS(1)]),
    st.builds(MS, st.just(2), st.lists(u8, max_size=4).map(tuple)),
    st.builds(MS, st.just(3), st.lists(tsas, max_size=3).map(tuple)),
    st.builds(MS, st.just(4), st.lists(u16, max_size=4).map(tuple)),
    st.builds(MS, st.sampled_from([5, 6, 7]), st.lists(regions, max_size=3).map(tuple)),
)
roads = st.builds(ROAD, oads, st.lists(oads, max_size=4).map(tuple))
csds = st.one_of(oads, roads)
tis = st.builds(TI, st.integers(0, 5), u16)


def _int(tag: DataType, size: int, signed: bool) -> st.SearchStrategy[Data]:
    bits = size * 8
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    return st.builds(Data, st.just(tag), st.integers(lo, hi))


scalars = st.one_of(
    st.just(Data(DataType.NULL, None)),
    st.builds(Data, st.just(DataType.BOOL), st.booleans()),
    st.builds(lambda bits: Data(DataType.BIT_STRING, BitString.from_bits(bits)), st.text("01", max_size=40)),
    _int(DataType.DOUBLE_LONG, 4, True),
    _int(DataType.DOUBLE_LONG_UNSIGNED, 4, False),
    _int(DataType.INTEGER, 1, True),
    _int(DataType.LONG, 2, True),
    _int(DataType.UNSIGNED, 1, False),
    _int(DataType.LONG_UNSIGNED, 2, False),
    _int(DataType.LONG64, 8, True),
    _int(DataType.LONG64_UNSIGNED, 8, False),
    _int(DataType.ENUM, 1, False),
    _int(DataType.OI, 2, False),
    st.builds(Data, st.sampled_from([DataType.OCTET_STRING, DataType.MAC, DataType.RN]), st.binary(max_size=140)),
    st.builds(Data, st.just(DataType.VISIBLE_STRING), st.text(st.characters(max_codepoint=127), max_size=40)),
    st.builds(Data, st.just(DataType.UTF8_STRING), st.text(max_size=20)),
    st.builds(Data, st.just(DataType.FLOAT32), st.floats(width=32, allow_nan=False)),
    st.builds(Data, st.just(DataType.FLOAT64), st.floats(allow_nan=False)),
    st.builds(Data, st.just(DataType.DATE_TIME), st.builds(DateTime, u16, u8, u8, u8, u8, u8, u8, u16)),
    st.builds(Data, st.just(DataType.DATE), st.builds(Date, u16, u8, u8, u8)),
    st.builds(Data, st.just(DataType.TIME), st.builds(Time, u8, u8, u8)),
    st.builds(Data, st.just(DataType.DATE_TIME_S), dts),
    st.builds(Data, st.just(DataType.OAD), oads),
    st.builds(Data, st.just(DataType.ROAD), roads),
    st.builds(Data, st.just(DataType.OMD), st.builds(OMD, u16, u8, u8)),
    st.builds(Data, st.just(DataType.TI), tis),
    st.builds(Data, st.just(DataType.TSA), tsas),
    st.builds(Data, st.just(DataType.REGION), regions),
    st.builds(Data, st.just(DataType.SCALER_UNIT), st.builds(ScalerUnit, st.integers(-128, 127), u8)),
    st.builds(Data, st.just(DataType.CSD), csds),
    st.builds(Data, st.just(DataType.MS), ms_values),
    st.builds(Data, st.just(DataType.SID), st.builds(SID, st.integers(0, 2**32 - 1), st.binary(max_size=8))),
    st.builds(
        Data,
        st.just(DataType.SID_MAC),
        st.builds(SIDMAC, st.builds(SID, st.integers(0, 2**32 - 1), st.binary(max_size=8)), st.binary(max_size=8)),
    ),
    st.builds(Data, st.just(DataType.COMDCB), st.builds(COMDCB, u8, u8, u8, u8, u8)),
    st.builds(Data, st.just(DataType.RCSD), st.builds(RCSD, st.lists(csds, max_size=4).map(tuple))),
)
rsds = st.one_of(
    st.just(RSD(0)),
    st.builds(lambda o, d: RSD(1, Selector1(o, d)), oads, scalars),
    st.builds(lambda o, a, b, c: RSD(2, Selector2(o, a, b, c)), oads, scalars, scalars, scalars),
    st.builds(
        lambda items: RSD(3, tuple(items)), st.lists(st.builds(Selector2, oads, scalars, scalars, scalars), max_size=2)
    ),
    st.builds(lambda n, t, m: RSD(n, SelectorTimeMS(t, m)), st.sampled_from([4, 5]), dts, ms_values),
    st.builds(
        lambda n, a, b, t, m: RSD(n, SelectorRangeMS(a, b, t, m)), st.sampled_from([6, 7, 8]), dts, dts, tis, ms_values
    ),
    st.builds(lambda n: RSD(9, SelectorLast(n)), u8),
    st.builds(lambda n, m: RSD(10, SelectorLastMS(n, m)), u8, ms_values),
)


@st.composite
def _scalars_and_rsds(draw: st.DrawFn) -> Data:
    # composite: keeps hypothesis from building a 50 kB repr of the strategy tree
    return draw(st.one_of(scalars, st.builds(Data, st.just(DataType.RSD), rsds)))


values = st.recursive(
    _scalars_and_rsds(),
    lambda children: st.builds(
        Data, st.sampled_from([DataType.ARRAY, DataType.STRUCTURE]), st.lists(children, max_size=5).map(tuple)
    ),
    max_leaves=8,
)


@settings(max_examples=400, deadline=None)
@given(values)
def test_round_trip(data: Data) -> None:
    raw = data_bytes(data)
    decoded, warnings = parse_data(raw)
    assert decoded == data
    assert warnings == ()
    assert data_bytes(decoded) == raw


def test_every_type_is_covered() -> None:
    """Each DataType tag is in the strategies above (a new tag must get a round-trip test)."""
    import inspect

    source = inspect.getsource(inspect.getmodule(test_round_trip))  # type: ignore[arg-type]
    missing = [t.name for t in DataType if f"DataType.{t.name}" not in source]
    assert missing == []


def test_tag_numbers() -> None:
    """Tag numbers checked against the vectors and 600888/dlt698 (model/data.hpp)."""
    expected = {
        "NULL": 0,
        "ARRAY": 1,
        "STRUCTURE": 2,
        "BOOL": 3,
        "BIT_STRING": 4,
        "DOUBLE_LONG": 5,
        "DOUBLE_LONG_UNSIGNED": 6,
        "OCTET_STRING": 9,
        "VISIBLE_STRING": 10,
        "UTF8_STRING": 12,
        "INTEGER": 15,
        "LONG": 16,
        "UNSIGNED": 17,
        "LONG_UNSIGNED": 18,
        "LONG64": 20,
        "LONG64_UNSIGNED": 21,
        "ENUM": 22,
        "FLOAT32": 23,
        "FLOAT64": 24,
        "DATE_TIME": 25,
        "DATE": 26,
        "TIME": 27,
        "DATE_TIME_S": 28,
        "OI": 80,
        "OAD": 81,
        "ROAD": 82,
        "OMD": 83,
        "TI": 84,
        "TSA": 85,
        "MAC": 86,
        "RN": 87,
        "REGION": 88,
        "SCALER_UNIT": 89,
        "RSD": 90,
        "CSD": 91,
        "MS": 92,
        "SID": 93,
        "SID_MAC": 94,
        "COMDCB": 95,
        "RCSD": 96,
    }
    assert {t.name: int(t) for t in DataType} == expected


def test_non_minimal_length_is_accepted_and_flagged() -> None:
    data, warnings = parse_data(bytes.fromhex("0A820007") + b"ABCDEFG")
    assert data == Data(DataType.VISIBLE_STRING, "ABCDEFG")
    assert len(warnings) == 1
    assert "non-minimal" in warnings[0]
    assert data_bytes(data) == bytes.fromhex("0A07") + b"ABCDEFG"  # encoding is minimal


def test_long_length_encoding() -> None:
    data = Data(DataType.OCTET_STRING, bytes(300))
    assert data_bytes(data)[:4] == bytes.fromhex("09820" + "12C")


@pytest.mark.parametrize(
    "raw",
    ["", "07", "0601", "0103111111", "0A05414243", "FF", "0A8500", "5C09", "5A0B", "5B02"],
)
def test_garbage_raises_remote_error(raw: str) -> None:
    with pytest.raises(RemoteProtocolError):
        parse_data(bytes.fromhex(raw))


def test_deep_nesting_refused() -> None:
    with pytest.raises(RemoteProtocolError, match="deeper"):
        parse_data(b"\x01\x01" * 40 + b"\x00")


@pytest.mark.parametrize(
    "data",
    [
        Data(DataType.UNSIGNED, 256),
        Data(DataType.LONG, -40000),
        Data(DataType.BOOL, 1),
        Data(DataType.VISIBLE_STRING, "é"),
        Data(DataType.NULL, 0),
        Data(DataType.BIT_STRING, BitString(9, b"\x00")),
    ],
)
def test_encoder_is_strict(data: Data) -> None:
    with pytest.raises(LocalProtocolError):
        data_bytes(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_fuzz_only_protocol_errors(raw: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        parse_data(raw)


def test_bit_string_numbering() -> None:
    bits = BitString(16, bytes.fromhex("0800"))
    assert bits.bit(4)
    assert str(bits) == "0000100000000000"


# Data nested through Region, MS (regions) and RSD selectors, innermost value null: (prefix,
# suffix) per level. Decoding these reset the nesting depth at MS, and never counted it at Region
# and RSD, so a few hundred levels in one frame raised RecursionError (found by `python -m fuzz
# dlt698`, through describe's plain() first).
NESTINGS = {
    "region": (b"\x58\x00", b"\x00"),
    "ms_regions": (b"\x5c\x05\x01\x00", b"\x00"),
    "rsd_selector1": (b"\x5a\x01\x00\x10\x02\x00", b""),
    "rsd_selector2": (b"\x5a\x02\x00\x10\x02\x00", b"\x00\x00"),
    "rsd_selector4_ms": (b"\x5a\x04\x07\xea\x0c\x07\x00\x00\x00\x05\x01\x00", b"\x00"),
    "array_in_region": (b"\x58\x00\x01\x01", b"\x00"),
}


def _nested(kind: str, levels: int) -> bytes:
    prefix, suffix = NESTINGS[kind]
    return prefix * levels + b"\x00" + suffix * levels


@pytest.mark.parametrize("kind", sorted(NESTINGS))
def test_nesting_through_every_container_is_bounded(kind: str) -> None:
    assert parse_data(_nested(kind, 8))[0].type in (DataType.REGION, DataType.MS, DataType.RSD)
    with pytest.raises(RemoteProtocolError, match="nested deeper than 32"):
        parse_data(_nested(kind, 400))


def test_deeply_nested_value_in_a_response_frame_is_refused_not_a_crash() -> None:
    from meter_gateway.protocols.dlt698.describe import describe
    from meter_gateway.protocols.dlt698.frame import Control, Frame, ServerAddress

    head = bytes.fromhex("8501010010020001")  # GET-Response-Normal, PIID 1, 00100200, Data:
    apdu = head + _nested("ms_regions", 300) + b"\x00\x00"  # no FollowReport, no TimeTag
    frame = Frame(Control(3, from_server=True), ServerAddress.parse("000000000001"), 0, apdu).encode()
    described = describe(frame)  # what `meter-gateway decode` prints for it
    assert "nested deeper than 32" in described["error"]


_INTEGER_RANGES = {
    DataType.INTEGER: (-(2**7), 2**7 - 1),
    DataType.UNSIGNED: (0, 2**8 - 1),
    DataType.LONG: (-(2**15), 2**15 - 1),
    DataType.LONG_UNSIGNED: (0, 2**16 - 1),
    DataType.DOUBLE_LONG: (-(2**31), 2**31 - 1),
    DataType.DOUBLE_LONG_UNSIGNED: (0, 2**32 - 1),
    DataType.LONG64: (-(2**63), 2**63 - 1),
    DataType.LONG64_UNSIGNED: (0, 2**64 - 1),
    DataType.ENUM: (0, 2**8 - 1),
    DataType.OI: (0, 2**16 - 1),
}


@st.composite
def integer_sequences(draw: st.DrawFn) -> Data:
    """An array or structure of integers of one type (what meters mostly send), sometimes with one
    element of another type: both must decode the same whichever way the decoder reads them."""
    tag = draw(st.sampled_from(sorted(_INTEGER_RANGES)))
    low, high = _INTEGER_RANGES[tag]
    items = [Data(tag, v) for v in draw(st.lists(st.integers(low, high), max_size=70))]
    if items and draw(st.booleans()):
        other = draw(st.sampled_from([DataType.UNSIGNED, DataType.LONG, DataType.NULL, DataType.OCTET_STRING]))
        value = {DataType.UNSIGNED: 7, DataType.LONG: -7, DataType.NULL: None, DataType.OCTET_STRING: b"\x07"}[other]
        items[draw(st.integers(0, len(items) - 1))] = Data(other, value)
    return Data(draw(st.sampled_from([DataType.ARRAY, DataType.STRUCTURE])), tuple(items))


@settings(max_examples=300, deadline=None)
@given(integer_sequences())
def test_integer_sequences_round_trip(data: Data) -> None:
    raw = data_bytes(data)
    assert parse_data(raw) == (data, ())
    decoded = parse_data(raw)[0]
    tags = {element.type for element in data.value}
    # one representation: every non-empty sequence of one integer type is an Ints, nothing else is
    assert isinstance(decoded.value, Ints) == (len(tags) == 1 and tags <= set(_INTEGER_RANGES))
    assert hash(decoded) == hash(data)
    assert data_bytes(decoded) == raw
    for cut in range(len(raw)):  # every truncation is a protocol error, never a short value
        with pytest.raises(RemoteProtocolError):
            parse_data(raw[:cut])


def test_truncated_integer_array_says_which_element() -> None:
    with pytest.raises(RemoteProtocolError, match="truncated long_unsigned at offset 9"):
        parse_data(bytes.fromhex("0103 1208FF 1208FA 1200"))


def test_non_minimal_length_of_an_integer_array_is_flagged() -> None:
    data, warnings = parse_data(bytes.fromhex("018103 1208FF 1208FA 1208F9"))
    assert data == Data(DataType.ARRAY, tuple(Data(DataType.LONG_UNSIGNED, v) for v in (0x08FF, 0x08FA, 0x08F9)))
    assert len(warnings) == 1
    assert "non-minimal" in warnings[0]


@pytest.mark.parametrize("count", [44, 64, 65, 300])
def test_long_integer_arrays_decode_whole(count: int) -> None:
    # 300 elements: more than one length byte and more than the runs read in one struct call
    data = Data(DataType.ARRAY, tuple(Data(DataType.DOUBLE_LONG, -i) for i in range(count)))
    raw = data_bytes(data)
    assert parse_data(raw) == (data, ())
    assert parse_data(raw) == (data, ())  # again with the unpacker compiled by the first


def test_an_integer_array_is_its_integers() -> None:
    data, _ = parse_data(bytes.fromhex("0103 1208FF 1208FA 1208F9"))
    ints = data.value
    assert isinstance(ints, Ints)
    assert (ints.tag, ints.values) == (DataType.LONG_UNSIGNED, (0x08FF, 0x08FA, 0x08F9))
    as_data = tuple(Data(DataType.LONG_UNSIGNED, v) for v in ints.values)
    # a sequence of Data, equal (both ways) to the tuple of them, with its hash
    assert len(ints) == 3
    assert (ints[1], ints[-1], ints[1:]) == (as_data[1], as_data[-1], as_data[1:])
    assert tuple(ints) == as_data
    assert list(ints) == list(as_data)
    assert ints == as_data
    assert as_data == ints
    assert ints == list(as_data)
    assert data == Data(DataType.ARRAY, as_data)
    assert Data(DataType.ARRAY, as_data) == data
    assert hash(data) == hash(Data(DataType.ARRAY, as_data))
    assert ints != as_data[:2]
    assert ints != Ints(DataType.LONG, ints.values)
    assert ints != "x"
    assert repr(data) == repr(Data(DataType.ARRAY, as_data))
    assert plain(data) == [0x08FF, 0x08FA, 0x08F9]
    assert Ints(DataType.LONG_UNSIGNED, ints.values) == ints


def test_mixed_and_empty_sequences_stay_tuples() -> None:
    mixed, _ = parse_data(bytes.fromhex("0202 1208FF 1108"))
    assert type(mixed.value) is tuple
    assert mixed.value == (Data(DataType.LONG_UNSIGNED, 0x08FF), Data(DataType.UNSIGNED, 8))
    empty, _ = parse_data(bytes.fromhex("0100"))
    assert empty.value == ()


def test_ints_are_encoded_strictly() -> None:
    assert data_bytes(Data(DataType.ARRAY, Ints(DataType.LONG, (-1, 2)))) == bytes.fromhex("0102 10FFFF 100002")
    with pytest.raises(LocalProtocolError, match="outside"):
        data_bytes(Data(DataType.ARRAY, Ints(DataType.UNSIGNED, (256,))))
    with pytest.raises(LocalProtocolError, match="one integer type"):
        Ints(DataType.OCTET_STRING, (1,))

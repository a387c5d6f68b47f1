"""DL/T 645 value formats: exact decoding, exact inverses, and only ProtocolErrors on bad input."""

from __future__ import annotations

import contextlib
import datetime
import math
from decimal import Decimal
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meter_gateway.protocols.dlt645.catalogue import default_catalogue
from meter_gateway.protocols.dlt645.edition import Edition
from meter_gateway.protocols.dlt645.errors import LocalProtocolError, RemoteProtocolError
from meter_gateway.protocols.dlt645.formats import (
    MeterDate,
    _Bcd,
    _decimal_number,
    _lookup,
    decode_field,
    encode_field,
    format_length,
    format_names,
    is_signed,
    json_fields,
    json_value,
)


def _catalogue_formats() -> list[str]:
    found: set[str] = set(format_names())
    for edition in Edition:
        for item in default_catalogue().items(edition):
            if item.format:
                found.add(item.format)
            found.update(spec.format for spec in item.fields)
    return sorted(found)


CATALOGUE_FORMATS = _catalogue_formats()


@pytest.mark.parametrize(
    ("fmt", "wire", "value"),
    [
        ("XXXXXX.XX", "26000000", 0.26),  # vector A2
        ("XXXXXX.XX", "26010000", 1.26),  # vector A4
        ("XXXXXX.XX", "99999999", 999999.99),
        ("XXX.X", "0110", 100.1),  # vector A6
        ("XXX", "0001", 100),  # vector K5 (1997)
        ("XX.XXXX", "122500", 0.2512),  # vector A10
        ("±XX.XXXX", "122580", -0.2512),  # vector S1: sign in the top bit of the last byte
        ("±X.XXX", "0105", 0.501),  # vector A11
        ("±XXX.XXX", "000580", -0.5),
        ("±XXXXXX.XX", "99999979", 799999.99),
        ("XX.XX", "0050", 50.0),
        ("XXXXXX", "563412", 123456),
        ("NNNN", "5000", 80),  # a binary word, not BCD (vector F2)
        ("NN", "FF", 255),
        ("NNNNNNNN", "01000000", "00000001"),
        ("NNNNNNNN", "FFFFFFFF", "FFFFFFFF"),
        ("NNNNNNNNNNNN", "610100000000", "000000000161"),
        ("YYMMDDWW", "01110116", MeterDate(datetime.date(2016, 1, 11), 1)),  # vector D2
        ("hhmmss", "555321", datetime.time(21, 53, 55)),  # vector D4
        ("YYMMDDhhmm", "5923311224", datetime.datetime(2024, 12, 31, 23, 59)),
        ("YYMMDDhhmmss", "585923290224", datetime.datetime(2024, 2, 29, 23, 59, 58)),
        ("YYMMDDhhmm", "0000000000", None),  # never happened
        ("MMDDhhmm", "30083112", "--12-31T08:30"),
        ("MMDDhhmm", "00000000", None),
    ],
)
def test_known_values_decode_and_encode_back(fmt: str, wire: str, value: object) -> None:
    raw = bytes.fromhex(wire)
    assert format_length(fmt) == len(raw)
    assert decode_field(fmt, raw) == value
    assert type(decode_field(fmt, raw)) is type(value)
    assert encode_field(fmt, value) == raw


def test_decimal_values_are_exact_and_encoding_rounds_the_decimal_value() -> None:
    assert decode_field("XXXXXX.XX", bytes.fromhex("29000000")) == 0.29
    assert encode_field("XXXXXX.XX", 0.1 + 0.2) == bytes.fromhex("30000000")
    assert encode_field("XXXXXX.XX", Decimal("0.285")) == bytes.fromhex("28000000")  # half-even
    assert encode_field("XXXXXX.XX", 0.295) == bytes.fromhex("30000000")  # repr 0.295, not 0.29499..
    assert encode_field("XX.XXXX", 12) == bytes.fromhex("000012")
    assert encode_field("±XX.XXXX", -0.0) == bytes.fromhex("000000")  # no negative zero on the wire
    assert decode_field("±XX.XXXX", bytes.fromhex("000080")) == 0


@pytest.mark.parametrize(
    ("fmt", "value"),
    [
        ("XXXXXX.XX", 1_000_000),
        ("XXXXXX.XX", -0.01),  # unsigned
        ("±XXX.XXX", 800),  # the top digit shares its byte with the sign bit
        ("XXX", 1000),
        ("XX.XX", float("nan")),
        ("XX.XX", float("inf")),
        ("XX.XX", True),
        ("XX.XX", "1.5"),
        ("NNNN", 65536),
        ("NNNN", -1),
        ("NN", 1.0),
        ("NNNNNNNN", "1234567"),
        ("NNNNNNNN", "1234567G"),
        ("NNNNNNNN", 12345678),
        ("YYMMDDWW", datetime.date(2100, 1, 1)),
        ("YYMMDDWW", MeterDate(datetime.date(2016, 1, 11), 7)),
        ("YYMMDDWW", "11/01/2016"),
        ("hhmmss", datetime.time(1, 2, 3, tzinfo=datetime.UTC)),
        ("YYMMDDhhmm", datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)),
        ("YYMMDDhhmm", datetime.date(2024, 1, 1)),
        ("MMDDhhmm", "--13-01T00:00"),
        ("MMDDhhmm", "12-01 00:00"),
    ],
)
def test_values_that_do_not_fit_are_local_errors(fmt: str, value: object) -> None:
    with pytest.raises(LocalProtocolError):
        encode_field(fmt, value)


@pytest.mark.parametrize("fmt", ["", "XX.", "X.X.X", "YYMMDD", "X" * 17, "ssmmhh"])
def test_unknown_formats_are_local_errors(fmt: str) -> None:
    with pytest.raises(LocalProtocolError, match="format"):
        format_length(fmt)
    with pytest.raises(LocalProtocolError):
        decode_field(fmt, b"\x00")


@pytest.mark.parametrize(
    ("fmt", "wire"),
    [
        ("XXXXXX.XX", "2A000000"),  # invalid BCD nibble
        ("XXX.X", "FFFF"),
        ("XXX", "0010"),  # a fourth digit in a three-digit format
        ("±XX.XXXX", "0000FA"),
        ("YYMMDDWW", "07110116"),  # weekday 7
        ("YYMMDDWW", "01311316"),  # month 13
        ("hhmmss", "006024"),  # 24:60
        ("YYMMDDhhmm", "0000300216"),  # 30 February
        ("YYMMDDhhmmss", "FFFFFFFFFFFF"),
        ("MMDDhhmm", "00003102"),  # 31 February
    ],
)
def test_bad_bytes_are_remote_errors(fmt: str, wire: str) -> None:
    with pytest.raises(RemoteProtocolError, match=fmt.lstrip("±")[:2]):
        decode_field(fmt, bytes.fromhex(wire))


def test_wrong_length_is_a_remote_error() -> None:
    with pytest.raises(RemoteProtocolError, match="needs 4 bytes, got 3"):
        decode_field("XXXXXX.XX", b"\x00\x00\x00")


def test_signedness_is_part_of_the_format_name() -> None:
    assert is_signed("±XX.XXXX")
    assert not is_signed("XX.XXXX")
    assert not is_signed("NNNN")
    assert decode_field("XX.XXXX", bytes.fromhex("122500")) == 0.2512
    # An unsigned format never guesses a sign: 0x80 is the digits 8 and 0 there.
    assert decode_field("XX.XXXX", bytes.fromhex("122580")) == 80.2512


def test_dates_keep_the_meters_weekday_and_compute_a_missing_one() -> None:
    wrong_weekday = MeterDate(datetime.date(2016, 1, 11), 3)
    assert decode_field("YYMMDDWW", encode_field("YYMMDDWW", wrong_weekday)) == wrong_weekday
    assert encode_field("YYMMDDWW", datetime.date(2016, 1, 10)) == bytes.fromhex("00100116")  # Sunday
    assert encode_field("YYMMDDWW", "2016-01-11") == bytes.fromhex("01110116")
    assert encode_field("hhmmss", "21:53:55") == bytes.fromhex("555321")
    assert encode_field("hhmmss", datetime.time(21, 53, 55, 999_999)) == bytes.fromhex("555321")
    stamp = datetime.datetime(2024, 2, 29, 23, 59, 58)
    assert encode_field("YYMMDDhhmm", stamp) == bytes.fromhex("5923290224")  # seconds dropped
    assert encode_field("YYMMDDhhmmss", None) == bytes(6)


def test_json_helpers() -> None:
    date = MeterDate(datetime.date(2016, 1, 11), 1)
    assert json_value(date) == "2016-01-11"
    assert json_fields(date) == {"date": "2016-01-11", "weekday": 1}
    assert json_value(datetime.time(21, 53, 55)) == "21:53:55"
    assert json_fields(datetime.time(21, 53, 55)) == {"time": "21:53:55"}
    assert json_value(datetime.datetime(2024, 1, 2, 3, 4)) == "2024-01-02T03:04:00"
    assert json_value(0.26) == 0.26
    assert json_value(None) is None
    assert json_fields(0.26) == {}


@st.composite
def _format_and_bytes(draw: st.DrawFn) -> tuple[str, bytes]:
    fmt = draw(st.sampled_from(CATALOGUE_FORMATS))
    return fmt, draw(st.binary(min_size=format_length(fmt), max_size=format_length(fmt)))


@settings(max_examples=400, deadline=None)
@given(_format_and_bytes())
def test_any_bytes_decode_or_raise_remote_error_and_valid_bytes_round_trip(case: tuple[str, bytes]) -> None:
    fmt, raw = case
    try:
        value = decode_field(fmt, raw)
    except RemoteProtocolError:
        return
    encoded = encode_field(fmt, value)
    assert decode_field(fmt, encoded) == value
    negative_zero = is_signed(fmt) and raw[-1] & 0x80 and value == 0
    if not negative_zero:
        assert encoded == raw


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(CATALOGUE_FORMATS), st.binary(max_size=12))
def test_any_length_raises_nothing_but_protocol_errors(fmt: str, raw: bytes) -> None:
    if len(raw) != format_length(fmt):
        with pytest.raises(RemoteProtocolError, match="needs"):
            decode_field(fmt, raw)
        return
    with contextlib.suppress(RemoteProtocolError):
        decode_field(fmt, raw)


_ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.decimals(),
    st.text(max_size=16),
    st.binary(max_size=8),
    st.dates(),
    st.times(),
    st.datetimes(),
    st.builds(MeterDate, st.dates(), st.integers(-2, 9)),
)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(CATALOGUE_FORMATS), _ANY_VALUE)
def test_encoding_anything_gives_the_format_length_or_a_local_error(fmt: str, value: object) -> None:
    try:
        raw = encode_field(fmt, value)
    except LocalProtocolError:
        return
    assert len(raw) == format_length(fmt)
    decode_field(fmt, raw)  # whatever we encode, we can read back


@st.composite
def _numeric_value(draw: st.DrawFn) -> tuple[str, int, int]:
    fmt = draw(st.sampled_from([f for f in CATALOGUE_FORMATS if f.lstrip("±").startswith("X")]))
    whole, _, fraction = fmt.lstrip("±").partition(".")
    digits = len(whole) + len(fraction)
    limit = 10**digits
    if is_signed(fmt) and digits == 2 * format_length(fmt):
        limit = 8 * 10 ** (digits - 1)
    low = -(limit - 1) if is_signed(fmt) else 0
    return fmt, draw(st.integers(low, limit - 1)), len(fraction)


@settings(max_examples=300, deadline=None)
@given(_numeric_value())
def test_every_representable_number_round_trips_exactly(case: tuple[str, int, int]) -> None:
    fmt, scaled, decimals = case
    value = scaled / 10**decimals if decimals else scaled
    raw = encode_field(fmt, value)
    assert len(raw) == format_length(fmt)
    assert decode_field(fmt, raw) == value
    assert encode_field(fmt, Decimal(scaled).scaleb(-decimals)) == raw


@settings(max_examples=200, deadline=None)
@given(st.datetimes(min_value=datetime.datetime(2000, 1, 1), max_value=datetime.datetime(2099, 12, 31)))
def test_datetimes_round_trip_at_their_resolution(stamp: datetime.datetime) -> None:
    assert decode_field("YYMMDDhhmmss", encode_field("YYMMDDhhmmss", stamp)) == stamp.replace(microsecond=0)
    minute = stamp.replace(second=0, microsecond=0)
    assert decode_field("YYMMDDhhmm", encode_field("YYMMDDhhmm", stamp)) == minute
    assert decode_field("YYMMDDWW", encode_field("YYMMDDWW", stamp)) == MeterDate.of(stamp.date())
    assert decode_field("hhmmss", encode_field("hhmmss", stamp.time())) == stamp.time().replace(microsecond=0)


# -- the fast numeric encoder against its definition (Decimal on the shortest repr) ------------

NUMERIC_FORMATS = [
    *(f for f in CATALOGUE_FORMATS if f.lstrip("±").startswith("X")),
    "X" * 16,
    "±" + "X" * 15 + ".X",
    "XXXXXXXX.XXXXXXXX",
    "±X.XXXXXXX",
]


def _bcd(fmt: str) -> _Bcd:
    found = _lookup(fmt)
    assert isinstance(found, _Bcd)
    return found


def _outcome(fmt: str, value: object) -> bytes | str:
    try:
        return encode_field(fmt, value)
    except LocalProtocolError as exc:
        return str(exc)


def _outcome_by_definition(fmt: str, value: object) -> bytes | str:
    with mock.patch.object(_Bcd, "_fast_number", return_value=None):
        return _outcome(fmt, value)


def _nudged(value: float, steps: int) -> float:
    for _ in range(abs(steps)):
        value = math.nextafter(value, math.copysign(math.inf, steps))
    return value


@st.composite
def _number_for(draw: st.DrawFn) -> tuple[str, object]:
    fmt = draw(st.sampled_from(NUMERIC_FORMATS))
    decimals = _bcd(fmt).decimals
    scale = 10**decimals
    ties = st.integers(-(10**13), 10**13).map(lambda k: (k + 0.5) / scale)  # the .5 cases
    grid = st.integers(-(10**14), 10**14).map(lambda k: k / scale)  # what a decode gives
    near = st.builds(_nudged, st.one_of(ties, grid), st.integers(-3, 3))
    value = draw(
        st.one_of(
            ties,
            grid,
            near,
            st.floats(),  # any float: huge, tiny, negative, nan, inf, -0.0
            st.floats(-(2.0**41) / scale, 2.0**41 / scale),  # both sides of the fast path's limit
            st.integers(),
            st.integers(-(10**17), 10**17),
        )
    )
    return fmt, value


@settings(max_examples=3000, deadline=None)
@given(_number_for())
def test_the_fast_number_path_is_the_decimal_definition(case: tuple[str, object]) -> None:
    fmt, value = case
    bcd = _bcd(fmt)
    fast = bcd._fast_number(value)
    if fast is not None:
        assert fast == _decimal_number(fmt, bcd.decimals, value)
    assert _outcome(fmt, value) == _outcome_by_definition(fmt, value)


@pytest.mark.parametrize(
    ("fmt", "value"),
    [("XXXXXX.XX", 2.675), ("XXXXXX.XX", 0.125), ("XXXXXX.XX", 1.005), ("±XX.XXXX", -0.00005), ("XXX", 2.5)],
)
def test_values_near_a_tie_take_the_decimal_definition(fmt: str, value: float) -> None:
    assert _bcd(fmt)._fast_number(value) is None
    assert _outcome(fmt, value) == _outcome_by_definition(fmt, value)


@pytest.mark.parametrize(("fmt", "value"), [("XXXXXX.XX", 1234.56), ("±XX.XXXX", -1.2345), ("XXX.X", 231)])
def test_ordinary_numbers_take_the_fast_path(fmt: str, value: float) -> None:
    assert _bcd(fmt)._fast_number(value) is not None


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(NUMERIC_FORMATS), st.data())
def test_bcd_bytes_are_the_digits_low_byte_first_with_the_sign_on_top(fmt: str, data: st.DataObject) -> None:
    bcd = _bcd(fmt)
    limit = 8 * 10 ** (bcd.digits - 1) if bcd.signed and bcd.digits == 2 * bcd.length else 10**bcd.digits
    number = data.draw(st.integers(-(limit - 1) if bcd.signed else 0, limit - 1))
    expected = bytearray(bytes.fromhex(f"{abs(number):0{2 * bcd.length}d}")[::-1])
    if number < 0:
        expected[-1] |= 0x80
    assert encode_field(fmt, Decimal(number).scaleb(-bcd.decimals)) == expected

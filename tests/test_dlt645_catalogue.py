"""The DL/T 645 data-identifier catalogue: vectors, blocks, records, mapping between editions."""

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meter_gateway.protocols.dlt645.catalogue import Catalogue, DataItem, DecodedValue, default_catalogue, load_items
from meter_gateway.protocols.dlt645.edition import Edition
from meter_gateway.protocols.dlt645.errors import LocalProtocolError, RemoteProtocolError
from meter_gateway.protocols.dlt645.formats import MeterDate, decode_field, encode_field, format_length, is_signed
from tests.plugins.vectors import load_vectors

E07 = Edition.DLT645_2007
E97 = Edition.DLT645_1997
CANONICAL_UNITS = {"kWh", "kvarh", "kVAh", "V", "A", "kW", "kvar", "kVA", "Hz", "", "°", "°C", "min",
                   "imp/kWh", "imp/kvarh", "CNY", None}  # fmt: skip
ALL_ITEMS = [item for edition in Edition for item in default_catalogue().items(edition)]


def _energy(*values: str) -> bytes:
    """XXXXXX.XX values given as printed digits (zero-padded to 8), in wire order."""
    return b"".join(bytes.fromhex(v.rjust(8, "0"))[::-1] for v in values)


# -- the shared vectors ---------------------------------------------------------------------------

FIELD_KEYS = ("date", "weekday", "time", "status_word", "relay")


def _vector_data(vector: dict[str, Any]) -> tuple[Edition, int, bytes] | None:
    """The edition, DI and data bytes (offset removed, DI stripped) of a vector's frame."""
    frame = bytes.fromhex(vector["hex"]).lstrip(b"\xfe")
    length = frame[9]
    data = bytes((b - 0x33) & 0xFF for b in frame[10 : 10 + length])
    edition = Edition.parse(vector["edition"])
    if len(data) <= edition.di_length:
        return None  # a request, or a reply without data
    di = int.from_bytes(data[: edition.di_length], "little")
    return edition, di, data[edition.di_length :]


def _data_vectors() -> list[dict[str, Any]]:
    return [v for v in load_vectors() if "di" in v and _vector_data(v) is not None]


def test_every_data_vector_is_checked() -> None:
    expected = [v for v in load_vectors() if "di" in v and ("value" in v or any(k in v for k in FIELD_KEYS))]
    assert expected, "the shared vectors hold DI replies"
    assert {v["id"] for v in expected} <= {v["id"] for v in _data_vectors()}


@pytest.mark.parametrize("vector", _data_vectors(), ids=lambda v: v["id"])
def test_vectors_decode_to_their_value_unit_and_fields(vector: dict[str, Any]) -> None:
    found = _vector_data(vector)
    assert found is not None
    edition, di, data = found
    assert edition.format_di(di) == vector["di"]
    decoded = default_catalogue().decode(edition, di, data)
    assert len(decoded) == 1
    value = decoded[0]
    assert value.item is not None
    assert value.di == di
    if "value" in vector:
        assert value.value == vector["value"]
        assert type(value.value) is type(vector["value"])
    if "unit" in vector:
        assert value.unit == vector["unit"]
    for key in FIELD_KEYS:
        if key in vector:
            assert value.fields[key] == vector[key], key


# -- blocks, records, series ------------------------------------------------------------------------


def test_a_block_yields_one_value_per_member_present() -> None:
    catalogue = default_catalogue()
    four_tariffs = _energy("00001234", "00000100", "00000200", "00000300", "00000400")
    decoded = catalogue.decode(E07, 0x0001FF00, four_tariffs)
    assert [d.di for d in decoded] == [0x00010000, 0x00010100, 0x00010200, 0x00010300, 0x00010400]
    assert [d.value for d in decoded] == [12.34, 1.0, 2.0, 3.0, 4.0]
    assert [d.quantity for d in decoded] == [
        "energy.active.import.total",
        *(f"energy.active.import.t{t}" for t in range(1, 5)),
    ]
    assert all(d.unit == "kWh" for d in decoded)
    eight_tariffs = four_tariffs + _energy("5", "6", "7", "8")
    assert [d.value for d in catalogue.decode(E07, 0x0001FF00, eight_tariffs)][-1] == 0.08


def test_a_partial_or_excess_block_is_a_remote_error() -> None:
    catalogue = default_catalogue()
    with pytest.raises(RemoteProtocolError, match=r"0001FF00 .*2 byte\(s\) left after 1 member"):
        catalogue.decode(E07, 0x0001FF00, _energy("1") + b"\x00\x00")
    with pytest.raises(RemoteProtocolError, match="more than"):
        catalogue.decode(E07, 0x0001FF00, bytes(4 * 65))
    with pytest.raises(RemoteProtocolError, match="more than"):
        catalogue.decode(E07, 0x0201FF00, bytes(8))  # three voltages take 6


def test_a_bad_member_names_the_member() -> None:
    voltages = bytes.fromhex("3402") + bytes.fromhex("FF02") + bytes.fromhex("3502")
    with pytest.raises(RemoteProtocolError, match=r"0201FF00 .*member 02010200 .*not valid BCD"):
        default_catalogue().decode(E07, 0x0201FF00, voltages)


def test_status_word_block_and_bits() -> None:
    words = b"".join(w.to_bytes(2, "little") for w in (0x0014, 0, 0x1150, 0x0001, 0, 0, 0x0200))
    decoded = default_catalogue().decode(E07, 0x040005FF, words)
    assert [d.quantity for d in decoded] == [f"status.word{n}" for n in range(1, 8)]
    word1, _, word3, word4, _, _, word7 = (d.fields for d in decoded)
    assert word1["clock_battery_low"] is True
    assert word1["active_power_reverse"] is True
    assert word3 == word3 | {
        "status_word": 0x1150,
        "relay": "open",
        "relay_command": "open",
        "pre_trip_alarm": False,
        "prepaid": "energy",
        "keep_power": True,
    }
    assert word4["loss_of_voltage"] is True
    assert word7["cover_open"] is True


def test_prepaid_type_values() -> None:
    catalogue = default_catalogue()
    kinds = [catalogue.decode(E07, 0x04000503, (n << 8).to_bytes(2, "little"))[0].fields["prepaid"] for n in range(4)]
    assert kinds == ["none", "energy", "money", 3]  # 11 is reserved: shown as the raw state


def test_maximum_demand_record_has_its_time_as_timestamp() -> None:
    catalogue = default_catalogue()
    raw = bytes.fromhex("563412") + bytes.fromhex("3015110324")  # 12.3456 kW at 2024-03-11 15:30
    (decoded,) = catalogue.decode(E07, 0x01010000, raw)
    assert decoded.quantity == "demand.active.import.max"
    assert decoded.value == 12.3456
    assert decoded.unit == "kW"
    assert decoded.timestamp == datetime.datetime(2024, 3, 11, 15, 30)
    assert decoded.fields == {"demand": 12.3456, "time": "2024-03-11T15:30:00"}
    (never,) = catalogue.decode(E07, 0x01010100, bytes(8))
    assert never.quantity == "demand.active.import.max.t1"
    assert never.timestamp is None
    assert never.value == 0.0
    block = catalogue.decode(E07, 0x0101FF00, raw + bytes(8))
    assert [d.di for d in block] == [0x01010000, 0x01010100]


def test_trip_record() -> None:
    raw = (
        bytes.fromhex("050403020124")  # 2024-01-02 03:04:05
        + bytes.fromhex("FFFFFFFF")  # local automatic trip: operator code FFFFFFFF
        + _energy("00123456", "00000001", "1", "2", "3", "4")
    )
    catalogue = default_catalogue()
    (decoded,) = catalogue.decode(E07, 0x1D00FF01, raw)
    assert decoded.quantity == "event.trip.last"
    assert decoded.timestamp == datetime.datetime(2024, 1, 2, 3, 4, 5)
    assert decoded.value == "2024-01-02T03:04:05"
    assert decoded.fields["operator"] == "FFFFFFFF"
    assert decoded.fields["energy.active.import.total"] == 1234.56
    assert decoded.fields["energy.reactive.q4.total"] == 0.04
    assert decoded.fields["nth"] == 1
    (third,) = catalogue.decode(E07, 0x1D00FF03, raw)
    assert third.fields["nth"] == 3
    assert third.quantity == "event.trip.last"
    assert catalogue.require(E07, 0x1E00FF01).quantity == "event.close.last"
    (count,) = catalogue.decode(E07, 0x1D000001, bytes.fromhex("120000"))
    assert (count.quantity, count.value) == ("event.trip.count", 12)
    with pytest.raises(RemoteProtocolError, match="needs 34 bytes"):
        catalogue.decode(E07, 0x1D00FF01, raw[:-1])


def test_daily_frozen_series() -> None:
    catalogue = default_catalogue()
    (freeze,) = catalogue.decode(E07, 0x05060001, bytes.fromhex("0000010524"))
    assert freeze.quantity == "frozen.daily.time"
    assert freeze.timestamp == datetime.datetime(2024, 5, 1)
    decoded = catalogue.decode(E07, 0x05060102, _energy("00100000", "1", "2", "3", "4"))
    assert [d.quantity for d in decoded] == [
        "frozen.daily.energy.active.import.total",
        *(f"frozen.daily.energy.active.import.t{t}" for t in range(1, 5)),
    ]
    assert decoded[0].value == 1000.0
    assert all(d.di == 0x05060102 and d.fields == {"nth": 2} for d in decoded)
    assert decoded[1].name == "Daily frozen forward active energy (freeze -2), tariff 1"
    assert catalogue.get(E07, 0x0506003E) is not None
    assert catalogue.get(E07, 0x0506003F) is None  # 62 freezes
    with pytest.raises(RemoteProtocolError, match="whole member"):
        catalogue.decode(E07, 0x05060101, bytes(6))


# -- unknown and bad input ----------------------------------------------------------------------------


def test_unknown_di_decodes_to_raw_hex() -> None:
    (decoded,) = default_catalogue().decode(E07, 0x04A00101, b"\x12\xab")
    assert decoded == DecodedValue(0x04A00101, None, "unknown", None, "12AB", None, None, {})
    assert default_catalogue().get(E07, 0x04A00101) is None


def test_unknown_di_is_a_local_error_to_require_or_encode() -> None:
    with pytest.raises(LocalProtocolError, match="04A00101 is unknown"):
        default_catalogue().require(E07, 0x04A00101)
    with pytest.raises(LocalProtocolError):
        default_catalogue().encode(E97, 0x1234, 1)


def test_wrong_length_and_bad_bcd_name_the_di() -> None:
    catalogue = default_catalogue()
    with pytest.raises(RemoteProtocolError, match=r"00010000 \(Forward active energy, total\): needs 4 bytes"):
        catalogue.decode(E07, 0x00010000, b"\x00\x00\x00")
    with pytest.raises(RemoteProtocolError, match=r"9010 .*not valid BCD"):
        catalogue.decode(E97, 0x9010, b"\x0a\x00\x00\x00")
    with pytest.raises(RemoteProtocolError, match="no data"):
        catalogue.decode(E07, 0x0001FF00, b"")


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(ALL_ITEMS), st.binary(max_size=80))
def test_arbitrary_data_raises_nothing_but_remote_errors(item: DataItem, raw: bytes) -> None:
    try:
        decoded = default_catalogue().decode(item.edition, item.di, raw)
    except RemoteProtocolError:
        return
    assert decoded
    assert all(isinstance(d, DecodedValue) and d.item is not None for d in decoded)


# -- encoding ---------------------------------------------------------------------------------------

_SAMPLES: dict[str, object] = {
    "YYMMDDWW": MeterDate.of(datetime.date(2024, 5, 6)),
    "hhmmss": datetime.time(12, 34, 56),
    "YYMMDDhhmm": datetime.datetime(2024, 5, 6, 7, 8),
    "YYMMDDhhmmss": datetime.datetime(2024, 5, 6, 7, 8, 9),
    "MMDDhhmm": "--05-06T07:08",
    "NN": 0x5A,
    "NNNN": 0x1234,
    "NNNNNNNN": "00001234",
    "NNNNNNNNNNNN": "000000000161",
}


def _sample(fmt: str) -> bytes:
    """Valid, non-trivial bytes of ``fmt``."""
    if fmt in _SAMPLES:
        return encode_field(fmt, _SAMPLES[fmt])
    digits = sum(c == "X" for c in fmt)
    text = ("1234567890123456"[:digits]).rjust(2 * format_length(fmt), "0")
    raw = bytearray(bytes.fromhex(text)[::-1])
    if is_signed(fmt):
        raw[-1] |= 0x80
    return bytes(raw)


def _item_sample(item: DataItem) -> tuple[bytes, object]:
    """Data bytes for a whole item and the value `Catalogue.encode` takes for them."""
    if item.kind == "value":
        assert item.format is not None
        raw = _sample(item.format)
        return raw, decode_field(item.format, raw)
    if item.kind == "record":
        raws = {spec.name: _sample(spec.format) for spec in item.fields}
        values = {spec.name: decode_field(spec.format, raws[spec.name]) for spec in item.fields}
        return b"".join(raws.values()), values
    if item.kind == "series":
        raws_list = [_sample(spec.format) for spec in item.fields]
        return b"".join(raws_list), [decode_field(s.format, r) for s, r in zip(item.fields, raws_list, strict=True)]
    parts = [_item_sample(default_catalogue().require(item.edition, m)) for m in item.members]
    return b"".join(raw for raw, _ in parts), [value for _, value in parts]


@pytest.mark.parametrize("edition", list(Edition))
def test_every_item_decodes_and_encodes_back(edition: Edition) -> None:
    catalogue = default_catalogue()
    for item in catalogue.items(edition):
        raw, value = _item_sample(item)
        decoded = catalogue.decode(edition, item.di, raw)
        expected_count = len(item.members) if item.kind == "block" else len(item.fields) or 1
        if item.kind == "record":
            expected_count = 1
        assert len(decoded) == expected_count, item.di_text
        assert catalogue.encode(edition, item.di, value) == raw, item.di_text
        if item.kind == "value":  # the JSON-friendly value encodes too (what the CLI shows)
            assert catalogue.encode(edition, item.di, decoded[0].value) == raw, item.di_text
        if item.kind == "record":
            fields = {spec.name: decoded[0].fields[spec.name] for spec in item.fields}
            assert catalogue.encode(edition, item.di, fields) == raw, item.di_text


def test_encoding_blocks_takes_as_many_members_as_the_meter_has() -> None:
    catalogue = default_catalogue()
    assert catalogue.encode(E07, 0x0001FF00, [12.34, 1]) == _energy("00001234", "00000100")
    assert catalogue.encode(E97, 0x901F, [0.01]) == _energy("00000001")
    with pytest.raises(LocalProtocolError, match="1 to 64"):
        catalogue.encode(E07, 0x0001FF00, [])
    with pytest.raises(LocalProtocolError, match="sequence"):
        catalogue.encode(E07, 0x0001FF00, 12.34)
    with pytest.raises(LocalProtocolError, match="missing"):
        catalogue.encode(E07, 0x01010000, {"demand": 1.0})
    with pytest.raises(LocalProtocolError, match=r"02010100 \(Voltage, phase 1\): XXX.X"):
        catalogue.encode(E07, 0x02010100, 1000.0)
    assert catalogue.encode(E07, 0x02030000, -0.2512) == bytes.fromhex("122580")  # vector S1 data


# -- catalogue content ----------------------------------------------------------------------------------


def test_every_entry_length_matches_its_format_fields_or_members() -> None:
    catalogue = default_catalogue()
    for item in ALL_ITEMS:
        assert item.source, item.di_text
        if item.kind == "value":
            assert item.format is not None
            assert item.length == format_length(item.format), item.di_text
        elif item.kind in {"record", "series"}:
            assert item.format is None
            assert item.length == sum(format_length(spec.format) for spec in item.fields), item.di_text
        else:
            members = [catalogue.require(item.edition, m) for m in item.members]
            assert all(m.kind != "block" for m in members)
            assert item.length == sum(m.length for m in members), item.di_text


def test_units_are_canonical_and_quantities_unique() -> None:
    for edition in Edition:
        seen: dict[tuple[str, int | None], str] = {}
        for item in default_catalogue().items(edition):
            assert item.unit in CANONICAL_UNITS, item.di_text
            assert all(spec.unit in CANONICAL_UNITS for spec in item.fields), item.di_text
            quantities = [item.quantity] if item.quantity else []
            if item.kind == "series":
                quantities += [spec.quantity for spec in item.fields if spec.quantity]
            for quantity in quantities:
                key = (quantity, item.nth)
                assert key not in seen, f"{quantity} is read by both {seen[key]} and {item.di_text}"
                seen[key] = item.di_text


@pytest.mark.parametrize(
    "quantity",
    [
        *(f"energy.active.{d}.{t}" for d in ("import", "export", "combined") for t in ("total", "t1", "t4")),
        "energy.reactive.combined1.total",
        "energy.reactive.combined2.total",
        *(f"energy.reactive.q{q}.total" for q in range(1, 5)),
        "energy.reactive.q3.t2",
        "demand.active.import.max",
        "demand.active.import.max.t4",
        *(f"voltage.l{p}" for p in range(1, 4)),
        *(f"current.{p}" for p in ("l1", "l2", "l3", "n")),
        *(f"power.{k}.{p}" for k in ("active", "reactive", "apparent") for p in ("total", "l1", "l2", "l3")),
        *(f"power_factor.{p}" for p in ("total", "l1", "l2", "l3")),
        "frequency",
        "clock.date",
        "clock.time",
        *(f"status.word{n}" for n in range(1, 8)),
        "frozen.daily.time",
        "frozen.daily.energy.active.import.total",
        "frozen.daily.energy.active.import.t4",
        "event.trip.count",
        "event.trip.last",
        "event.close.count",
        "event.close.last",
    ],
)
def test_the_2007_catalogue_reads_the_canonical_quantities(quantity: str) -> None:
    item = default_catalogue().by_quantity(E07, quantity)
    assert item is not None, quantity
    assert item.nth in {None, 1}  # the most recent of a family


def test_by_quantity() -> None:
    catalogue = default_catalogue()
    assert catalogue.require(E07, 0x00010000) is catalogue.by_quantity(E07, "energy.active.import.total")
    frozen = catalogue.by_quantity(E07, "frozen.daily.energy.active.import.t1")
    assert frozen is not None
    assert frozen.di == 0x05060101
    blocks = catalogue.by_quantity(E07, "energy.active.import.all")
    assert blocks is not None
    assert blocks.di == 0x0001FF00
    assert catalogue.by_quantity(E97, "frequency") is None
    assert catalogue.by_quantity(E07, "no.such.quantity") is None


@pytest.mark.parametrize(
    ("di97", "di07"),
    [
        (0x9010, 0x00010000),
        (0x9014, 0x00010400),
        (0x901F, 0x0001FF00),
        (0x9020, 0x00020000),
        (0x9130, 0x00050000),  # 1997 quadrant order is I, IV, II, III
        (0x9140, 0x00080000),
        (0x9150, 0x00060000),
        (0x9160, 0x00070000),
        (0xA010, 0x01010000),
        (0xA011, 0x01010100),
        (0xB611, 0x02010100),
        (0xB613, 0x02010300),
        (0xB61F, 0x0201FF00),
        (0xB621, 0x02020100),
        (0xB630, 0x02030000),
        (0xB633, 0x02030300),
        (0xB640, 0x02040000),
        (0xB650, 0x02060000),
        (0xC010, 0x04000101),
        (0xC011, 0x04000102),
        (0xC032, 0x04000402),
        (0xB214, 0x0280000A),
    ],
)
def test_1997_and_2007_map_both_ways(di97: int, di07: int) -> None:
    catalogue = default_catalogue()
    assert catalogue.equivalent(di97, E97, E07) == di07
    assert catalogue.equivalent(di07, E07, E97) == di97


def test_items_without_an_equivalent_map_to_none() -> None:
    catalogue = default_catalogue()
    assert catalogue.equivalent(0x9110, E97, E07) is None  # 正向无功 has no fixed 2007 meaning
    assert catalogue.equivalent(0xB010, E97, E07) is None  # the 2007 demand record carries its time
    assert catalogue.equivalent(0x02800002, E07, E97) is None  # no frequency in 1997
    assert catalogue.equivalent(0x04A00101, E07, E97) is None  # unknown
    assert catalogue.equivalent(0x00010000, E07, E07) == 0x00010000


def test_1997_demand_time_has_no_year() -> None:
    (decoded,) = default_catalogue().decode(E97, 0xB010, bytes.fromhex("30083112"))
    assert decoded.value == "--12-31T08:30"
    assert decoded.timestamp is None
    assert decoded.quantity == "demand.active.import.max.time"


# -- the loader ---------------------------------------------------------------------------------------

_GOOD = """
edition = "2007"
[[items]]
di = "0001{t:02X}00"
tariffs = [0, 2]
name = "E {tariff_name}"
quantity = "e.{tariff}"
format = "XXXXXX.XX"
unit = "kWh"
source = "test"
[[items]]
di = "0001FF00"
name = "block"
members = { di = "0001{t:02X}00", tariffs = [0, 2] }
source = "test"
"""


def test_load_items_expands_families_and_sizes_blocks() -> None:
    items = load_items(_GOOD)
    assert [i.di for i in items] == [0x00010000, 0x00010100, 0x00010200, 0x0001FF00]
    assert items[1].name == "E tariff 1"
    assert items[1].quantity == "e.t1"
    assert items[3].length == 12
    assert items[3].members == (0x00010000, 0x00010100, 0x00010200)
    catalogue = Catalogue.from_items(items)
    assert [d.value for d in catalogue.decode(E07, 0x0001FF00, _energy("1", "2"))] == [0.01, 0.02]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            ('source = "test"\n[[items]]\ndi = "0001FF00"', 'source = ""\n[[items]]\ndi = "0001FF00"'),
            "source",
        ),
        (('unit = "kWh"', 'unit = "kWh"\ncolour = "red"'), "unknown keys"),
        (('format = "XXXXXX.XX"', 'format = "XXYY"'), "format"),
        (("tariffs = [0, 2]\nname", "tariffs = [0, 2]\nphases = [0, 1]\nname"), "not"),
        (('di = "0001FF00"', 'di = "00010100"'), "twice"),
        (('di = "0001FF00"', 'di = "001FF00"'), "hex digits"),
        (("tariffs = [0, 2] }", "tariffs = [0, 3] }"), "00010300 is not defined"),
        (('edition = "2007"', 'edition = "2010"'), "edition"),
        (("[[items]]", "[[items]"), "TOML"),
    ],
)
def test_bad_table_files_are_local_errors(change: tuple[str, str], message: str) -> None:
    old, new = change
    assert old in _GOOD
    with pytest.raises(LocalProtocolError, match=message):
        load_items(_GOOD.replace(old, new, 1), "bad.toml")


def test_records_need_the_fields_they_name() -> None:
    record = """
edition = "1997"
[[items]]
di = "A010"
name = "r"
fields = [{ name = "a", format = "XX.XX" }]
value = "b"
source = "test"
"""
    with pytest.raises(LocalProtocolError, match="no field 'b'"):
        load_items(record)


def test_decoded_values_are_json_friendly() -> None:
    import json

    catalogue = default_catalogue()
    samples: list[DecodedValue] = []
    for di in (0x04000101, 0x04000102, 0x01010000, 0x1D00FF01, 0x040005FF, 0x05060101):
        raw, _ = _item_sample(catalogue.require(E07, di))
        samples += catalogue.decode(E07, di, raw)
    for value in samples:
        json.dumps({"value": value.value, "fields": value.fields})
        assert isinstance(value.fields, Mapping)


def test_repeated_decodes_of_a_number_match_the_first_and_still_name_bad_bytes() -> None:
    """Numeric DIs decode the same every time, each decode with fields of its own, and bytes that
    do not fit are named with their DI."""
    packaged = default_catalogue()
    cases = [
        (E07, 0x00010000, _energy("26"), b"\x0a\x00\x00\x00"),
        (E97, 0x9010, _energy("123456"), b"\x00\x00\xf0\x00"),
        (E07, 0x02010100, bytes.fromhex("2002"), bytes.fromhex("2a02")),  # voltage, XXX.X
        (E07, 0x00000000, bytes.fromhex("00000080"), bytes.fromhex("0000008a")),  # signed: -0.00
        (E07, 0x00000100, bytes.fromhex("34120090"), bytes.fromhex("3412009a")),  # signed: -100001234
        (E07, 0x7E000001, _energy("7"), b"\x00\x00\x00\xa0"),  # made up, with nth
    ]
    nth_item = DataItem(E07, 0x7E000001, "Test energy (-1)", "XXXXXX.XX", 4, "kWh", "test.energy", nth=1)
    catalogue = Catalogue.from_items(
        [nth_item, *(packaged.require(edition, di) for edition, di, _, _ in cases if di != nth_item.di)]
    )
    for edition, di, raw, bad in cases:
        first = catalogue.decode(edition, di, raw)
        again = catalogue.decode(edition, di, bytearray(raw))
        assert again == first
        if di != nth_item.di:
            assert first == packaged.decode(edition, di, raw)
        assert again[0] is not first[0]
        assert again[0].fields is not first[0].fields  # each decode hands out its own fields
        again[0].fields["scribble"] = 1
        assert "scribble" not in catalogue.decode(edition, di, raw)[0].fields
        for wrong in (bad, raw[:-1], raw + b"\x00", b""):
            with pytest.raises(RemoteProtocolError, match=edition.format_di(di)):
                catalogue.decode(edition, di, wrong)
    assert catalogue.decode(E07, 0x00000100, bytes.fromhex("34120090"))[0].value == -100012.34
    [nth] = catalogue.decode(E07, nth_item.di, _energy("7"))
    assert (nth.value, nth.unit, nth.timestamp, nth.fields) == (0.07, "kWh", None, {"nth": 1})


def is_bcd(fmt: str) -> bool:
    """A numeric format (the others are dates, times and binary words): ``±?X+(.X+)?``."""
    return re.fullmatch(r"±?X+(\.X+)?", fmt) is not None


NUMERIC_BLOCKS = [
    item
    for item in ALL_ITEMS
    if item.kind == "block"
    and all(
        (m := default_catalogue().require(item.edition, di)).kind == "value" and m.format and is_bcd(m.format)
        for di in item.members
    )
]


def _outcome(catalogue: Catalogue, item: DataItem, raw: bytes) -> list[DecodedValue] | str:
    """The decoded values, or the error's text."""
    try:
        return catalogue.decode(item.edition, item.di, raw)
    except RemoteProtocolError as exc:
        return str(exc)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(NUMERIC_BLOCKS), st.data())
def test_a_numeric_block_decodes_as_its_members_do(item: DataItem, data: st.DataObject) -> None:
    """A block of numbers gives each whole member present as that member's own decode would;
    a partial member, excess bytes, no data or bytes that are not BCD are errors naming the block."""
    catalogue = default_catalogue()
    members = [catalogue.require(item.edition, m) for m in item.members]
    count = data.draw(st.integers(1, len(members)))
    parts = [_sample(m.format or "") for m in members[:count]]
    raw = b"".join(parts)
    decoded = catalogue.decode(item.edition, item.di, raw)
    expected = [v for m, part in zip(members, parts, strict=False) for v in catalogue.decode(m.edition, m.di, part)]
    assert decoded == expected
    broken = data.draw(st.sampled_from([raw[:-1], raw + b"\x00", b"", raw[:-1] + b"\xaa"]))
    with pytest.raises(RemoteProtocolError, match=item.di_text):
        catalogue.decode(item.edition, item.di, broken)


def test_the_forward_energy_block_gives_total_and_tariffs() -> None:
    """Forward active energy, total and tariffs: the poll's usual read."""
    assert any(i.edition is E07 and i.di == 0x0001FF00 for i in NUMERIC_BLOCKS)
    catalogue = default_catalogue()
    raw = _energy("1", "2", "3", "4", "5")
    first = catalogue.decode(E07, 0x0001FF00, raw)
    assert [v.value for v in first] == [0.01, 0.02, 0.03, 0.04, 0.05]
    assert [v.di for v in first] == [0x00010000, 0x00010100, 0x00010200, 0x00010300, 0x00010400]
    assert catalogue.decode(E07, 0x0001FF00, raw) == first


def test_reply_parts_are_a_blocks_members_or_the_item_each_with_its_encoder() -> None:
    catalogue = default_catalogue()
    block = catalogue.require(E07, 0x0001FF00)
    parts = catalogue.reply_parts(E07, block.di)
    assert parts is not None
    assert [item.di for item, _ in parts] == list(block.members)
    assert catalogue.reply_parts(E07, block.di) is parts  # kept per DI
    for item, encode in parts[:5]:
        assert encode(1234.56) == catalogue.encode(E07, item.di, 1234.56)
    with pytest.raises(LocalProtocolError, match=r"^00010000 \(.+\): XXXXXX\.XX: 1000000 is out of range$"):
        parts[0][1](1_000_000)
    [(record, encode)] = catalogue.reply_parts(E07, 0x01010000) or ()
    assert record.kind == "record"
    raw, value = _item_sample(record)
    assert encode(value) == raw
    with pytest.raises(LocalProtocolError, match=r"^01010000 .*record fields missing"):
        encode({})
    assert catalogue.reply_parts(E07, 0x7E7E7E7E) is None


def test_reply_parts_of_a_block_stop_at_the_first_member_the_catalogue_lacks() -> None:
    energy = [
        DataItem(E07, 0x7E000000 + t, f"Test energy t{t}", "XXXXXX.XX", 4, "kWh", f"test.energy.t{t}") for t in range(3)
    ]
    members = (0x7E000000, 0x7E000001, 0x7E00DEAD, 0x7E000002)
    block = DataItem(E07, 0x7E00FF00, "Test block", None, 16, "kWh", "test.energy.all", members, kind="block")
    catalogue = Catalogue.from_items([*energy, block])
    parts = catalogue.reply_parts(E07, block.di)
    assert parts is not None
    assert [item.di for item, _ in parts] == [0x7E000000, 0x7E000001]

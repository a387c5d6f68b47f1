"""CJ/T 188 messages and catalogue: round trips of every frame the gateway sends and every reply a
meter (or a simulator) sends, both DI byte orders; tolerant decoding; the catalogue's sources."""

from __future__ import annotations

import datetime
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meter_gateway.protocols.cjt188.catalogue import Catalogue, default_catalogue
from meter_gateway.protocols.cjt188.describe import describe_frame
from meter_gateway.protocols.cjt188.errors import LocalProtocolError, RemoteProtocolError
from meter_gateway.protocols.cjt188.frame import WILDCARD, Address, Frame, parse_frame
from meter_gateway.protocols.cjt188.functions import Function, function_name
from meter_gateway.protocols.cjt188.messages import (
    ErrorReply,
    Message,
    ReadReply,
    ReadRequest,
    WriteReply,
    WriteRequest,
    next_ser,
    parse_message,
)
from meter_gateway.protocols.cjt188.status import Status
from meter_gateway.protocols.cjt188.tables import read_data_file

CATALOGUE = default_catalogue()
addresses = st.lists(st.integers(0, 99), min_size=7, max_size=7).map(
    lambda pairs: Address(bytes((p // 10) << 4 | p % 10 for p in pairs))
)
orders = st.sampled_from(["standard", "swapped"])
sers = st.integers(0, 255)
water_types = st.sampled_from([0x10, 0x11, 0x12, 0x13, 0x30])
heat_types = st.sampled_from([0x20, 0x21])
times = st.datetimes(datetime.datetime(2000, 1, 1), datetime.datetime(2099, 12, 31, 23, 59, 59)).map(
    lambda t: t.replace(microsecond=0)
)
cents = st.integers(0, 99_999_999)  # XXXXXX.XX as hundredths
statuses = st.integers(0, 0xFFFF).map(Status)


def round_trip(message: Message, order: str, preamble: int = 2) -> Message:
    raw = message.encode(order, preamble)  # type: ignore[arg-type]
    return parse_message(parse_frame(raw), order)  # type: ignore[arg-type]


# --- what the gateway sends -----------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(t=water_types | heat_types, address=addresses, ser=sers, order=orders)
def test_read_current_data_round_trip(t: int, address: Address, ser: int, order: str) -> None:
    request = ReadRequest.current_data(t, address, ser)
    assert round_trip(request, order) == request
    frame = request.to_frame(order)  # type: ignore[arg-type]
    assert frame.control.byte == 0x01
    assert frame.data[:2] == (b"\x90\x1f" if order == "standard" else b"\x1f\x90")


@settings(max_examples=50, deadline=None)
@given(ser=sers, order=orders)
def test_read_address_round_trip(ser: int, order: str) -> None:
    request = ReadRequest.meter_address(ser)
    assert request.address == WILDCARD
    assert request.to_frame().control.byte == 0x03
    assert round_trip(request, order) == request


@settings(max_examples=100, deadline=None)
@given(t=water_types, address=addresses, ser=sers, order=orders, open_valve=st.booleans())
def test_valve_round_trip(t: int, address: Address, ser: int, order: str, open_valve: bool) -> None:
    request = WriteRequest.valve(t, address, open_valve, ser=ser)
    assert request.data == (b"\x55" if open_valve else b"\x99")
    parsed = round_trip(request, order)
    assert parsed == request
    assert isinstance(parsed, WriteRequest)
    assert parsed.values().by_quantity() == {"valve.command": "open" if open_valve else "close"}


@settings(max_examples=100, deadline=None)
@given(t=water_types | heat_types, address=addresses, ser=sers, order=orders, when=times)
def test_set_time_round_trip(t: int, address: Address, ser: int, order: str, when: datetime.datetime) -> None:
    request = WriteRequest.standard_time(t, address, when, ser=ser)
    parsed = round_trip(request, order)
    assert parsed == request
    assert isinstance(parsed, WriteRequest)
    assert parsed.values().values[0].timestamp == when
    assert len(request.to_frame().data) == 10  # DI SER + 7 bytes YYYYMMDDhhmmss


@settings(max_examples=50, deadline=None)
@given(address=addresses, ser=sers, sequence=st.integers(0, 255), amount=cents, order=orders)
def test_purchase_round_trip(address: Address, ser: int, sequence: int, amount: int, order: str) -> None:
    request = WriteRequest.purchase(0x10, address, sequence, str(Decimal(amount).scaleb(-2)), ser=ser)
    parsed = round_trip(request, order)
    assert isinstance(parsed, WriteRequest)
    values = parsed.values().by_quantity()
    assert values == {"purchase.sequence": sequence, "purchase.amount": amount / 100}


def test_write_address_and_sync_use_their_functions() -> None:
    new = Address.parse("78330011223345")
    request = WriteRequest.new_address(0x10, Address.parse("78330011223344"), new, ser=9)
    assert request.to_frame().control.byte == 0x15
    assert round_trip(request, "standard") == request
    assert request.values().by_quantity() == {"meter.address": "78330011223345"}
    sync = WriteRequest.build(0x10, WILDCARD, 0xA016, {"volume.total": (12.34, "m3")}, ser=1)
    assert sync.to_frame().control.byte == 0x16
    assert sync.data == bytes.fromhex("341200002C")


def test_strict_write_encoding() -> None:
    with pytest.raises(LocalProtocolError, match="does not fit"):
        WriteRequest.purchase(0x10, WILDCARD, 1, 1_000_000)
    with pytest.raises(LocalProtocolError, match="naive"):
        WriteRequest.standard_time(0x10, WILDCARD, datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC))
    with pytest.raises(LocalProtocolError, match="missing"):
        WriteRequest.build(0x10, WILDCARD, 0xA013, {"purchase.sequence": 1})
    with pytest.raises(LocalProtocolError, match="unknown fields"):
        WriteRequest.build(0x10, WILDCARD, 0xA011, {"settlement.day": 1, "x": 2})
    with pytest.raises(LocalProtocolError, match="unknown"):
        WriteRequest.build(0x10, WILDCARD, 0xA0FF, {})
    with pytest.raises(LocalProtocolError, match="no CJ/T 188 unit code"):
        WriteRequest.build(0x10, WILDCARD, 0xA016, {"volume.total": (1, "gallon")})


# --- what a meter sends ---------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    t=water_types,
    address=addresses,
    ser=sers,
    order=orders,
    total=cents,
    settled=cents,
    unit=st.sampled_from(["m3", "L"]),
    when=times,
    status=statuses,
)
def test_water_gas_current_data_reply_round_trip(
    t: int,
    address: Address,
    ser: int,
    order: str,
    total: int,
    settled: int,
    unit: str,
    when: datetime.datetime,
    status: Status,
) -> None:
    values = {
        "volume.total": (str(Decimal(total).scaleb(-2)), unit),
        "volume.settlement": str(Decimal(settled).scaleb(-2)),
        "meter.time": when,
        "status": status,
    }
    reply = ReadReply.build(t, address, 0x901F, values, ser=ser)
    assert len(reply.to_frame().data) == 0x16
    parsed = round_trip(reply, order)
    assert parsed == reply
    assert isinstance(parsed, ReadReply)
    decoded = parsed.values()
    assert decoded.warnings == []
    got = decoded.by_quantity()
    factor = Decimal("0.001") if unit == "L" else Decimal(1)
    assert got["volume.total"] == float(Decimal(total).scaleb(-2) * factor)
    assert got["volume.settlement"] == settled / 100
    assert got["meter.time"] == when.isoformat()
    assert got["status"] == status.word
    assert got["valve.state"] == status.valve
    assert got["battery.low"] == status.battery_low


@settings(max_examples=100, deadline=None)
@given(
    t=heat_types,
    address=addresses,
    ser=sers,
    order=orders,
    numbers=st.lists(cents, min_size=5, max_size=5),
    temps=st.lists(st.integers(0, 999_999), min_size=2, max_size=2),
    hours=st.integers(0, 999_999),
    gj=st.booleans(),
    when=times,
    status=statuses,
)
def test_heat_current_data_reply_round_trip(
    t: int,
    address: Address,
    ser: int,
    order: str,
    numbers: list[int],
    temps: list[int],
    hours: int,
    gj: bool,
    when: datetime.datetime,
    status: Status,
) -> None:
    kind = "heat" if t == 0x20 else "cooling"
    energy_unit = "GJ" if gj else "kWh"
    values: dict[str, object] = {
        f"{kind}.settlement": (str(Decimal(numbers[0]).scaleb(-2)), energy_unit),
        f"{kind}.total": (str(Decimal(numbers[1]).scaleb(-2)), energy_unit),
        "power.heat": str(Decimal(numbers[2]).scaleb(-2)),
        "flow.rate": str(Decimal(numbers[3]).scaleb(-4)),
        "volume.total": str(Decimal(numbers[4]).scaleb(-2)),
        "temperature.supply": str(Decimal(temps[0]).scaleb(-2)),
        "temperature.return": str(Decimal(temps[1]).scaleb(-2)),
        "time.working_hours": hours,
        "meter.time": when,
        "status": status,
    }
    reply = ReadReply.build(t, address, 0x901F, values, ser=ser)
    assert len(reply.to_frame().data) == 0x2E
    parsed = round_trip(reply, order)
    assert parsed == reply
    assert isinstance(parsed, ReadReply)
    decoded = parsed.values()
    assert decoded.warnings == []
    got = {v.quantity: (v.value, v.unit) for v in decoded.values}
    assert got[f"{kind}.total"] == (numbers[1] / 100, energy_unit)
    assert got["power.heat"] == (numbers[2] / 100, "kW")
    assert got["flow.rate"] == (numbers[3] / 10_000, "m3/h")
    assert got["temperature.supply"] == (temps[0] / 100, "degC")
    assert got["time.working_hours"] == (hours, "h")
    assert got["status"][0] == status.word


@settings(max_examples=50, deadline=None)
@given(address=addresses, ser=sers, order=orders, t=water_types)
def test_address_reply_round_trip(address: Address, ser: int, order: str, t: int) -> None:
    reply = ReadReply(t, address, 0x810A, ser)
    assert reply.to_frame().control.byte == 0x83
    parsed = round_trip(reply, order)
    assert isinstance(parsed, ReadReply)
    assert parsed.meter_address == address


@settings(max_examples=100, deadline=None)
@given(
    address=addresses,
    ser=sers,
    order=orders,
    status=statuses,
    di=st.sampled_from([0xA017, 0xA015, 0xA010, 0xA018, 0xA016]),
)
def test_write_acks_with_st_round_trip(address: Address, ser: int, order: str, status: Status, di: int) -> None:
    ack = WriteReply.ack(0x10, address, di, ser=ser, status=status)
    assert ack.to_frame().control.byte == {0xA018: 0x95, 0xA016: 0x96}.get(di, 0x84)
    parsed = round_trip(ack, order)
    assert parsed == ack
    assert isinstance(parsed, WriteReply)
    assert parsed.status == status
    plain = WriteReply.ack(0x10, address, di, ser=ser)
    assert round_trip(plain, order) == plain
    purchase = WriteReply.ack(0x10, address, 0xA013, ser=ser, values={"purchase.sequence": 3, "purchase.amount": 5})
    parsed_purchase = round_trip(purchase, order)
    assert isinstance(parsed_purchase, WriteReply)
    assert parsed_purchase.values().by_quantity() == {"purchase.sequence": 3, "purchase.amount": 5.0}


@settings(max_examples=100, deadline=None)
@given(
    address=addresses,
    ser=sers,
    order=orders,
    status=statuses,
    code=st.sampled_from(list(Function)),
    with_di=st.booleans(),
)
def test_abnormal_replies_round_trip(
    address: Address, ser: int, order: str, status: Status, code: Function, with_di: bool
) -> None:
    reply = ErrorReply(0x10, address, code, ser, status, 0x901F if with_di else None)
    assert reply.to_frame().control.byte == 0xC0 | code
    assert round_trip(reply, order) == reply


def test_abnormal_reply_describe_shows_st() -> None:
    reply = ErrorReply(0x10, WILDCARD, Function.WRITE_DATA, 7, Status.build("abnormal", battery_low=True))
    described = describe_frame(reply.encode())
    assert described["control"] == "C4"
    assert described["result"] == "refused"
    assert described["status"] == {"st": "0007", "valve": "abnormal", "battery_low": True}
    with pytest.raises(RemoteProtocolError, match="abnormal reply"):
        parse_message(Frame(0x10, WILDCARD, reply.control(), b"\x07\x00"))


# --- the catalogue ----------------------------------------------------------------------------------


def test_catalogue_has_the_standard_dis_each_with_a_source() -> None:
    expected = {
        0x901F: Function.READ_DATA,
        0x8102: Function.READ_DATA,
        0x8103: Function.READ_DATA,
        0x8104: Function.READ_DATA,
        0x8105: Function.READ_DATA,
        0x8106: Function.READ_KEY_VERSION,
        0x810A: Function.READ_ADDRESS,
        0xA010: Function.WRITE_DATA,
        0xA011: Function.WRITE_DATA,
        0xA012: Function.WRITE_DATA,
        0xA013: Function.WRITE_DATA,
        0xA014: Function.WRITE_DATA,
        0xA015: Function.WRITE_DATA,
        0xA016: Function.WRITE_SYNC_DATA,
        0xA017: Function.WRITE_DATA,
        0xA018: Function.WRITE_ADDRESS,
        0xA019: Function.WRITE_DATA,
        **dict.fromkeys(range(0xD120, 0xD12C), Function.READ_DATA),
    }
    items = {item.di: item for item in CATALOGUE.items()}
    assert set(items) == set(expected)
    for di, function in expected.items():
        assert items[di].function is function
        assert "CJ/T 188-2004" in items[di].source
    assert items[0xD12B].nth == 12
    assert items[0xD120].name == "history data, 1 month(s) ago"


def test_units_meter_types_and_status() -> None:
    assert CATALOGUE.units[0x2C].symbol == "m3"
    assert CATALOGUE.units[0x0B].symbol == "kJ"  # not GJ: 11H is GJ (unit-code table, see [S7])
    assert CATALOGUE.units[0x11].symbol == "GJ"
    assert CATALOGUE.units[0x0A].factor == Decimal(100_000)
    assert CATALOGUE.meter_type_name(0x13) == "reclaimed_water"
    assert CATALOGUE.meter_class(0x19) == "water"
    assert CATALOGUE.meter_type_name(0x19) == "other_water"
    assert CATALOGUE.meter_class(0x99) == "unknown"
    assert Status(0x0005).bits() == {"valve": "closed", "battery_low": True}
    assert Status(0x0003).valve == "abnormal"
    assert Status.build("closed", other=0x8420).word == 0x8421
    assert function_name(0x21) == "vendor-21"
    assert function_name(0x02) == "unknown-02"
    assert next_ser(255) == 0


def test_tolerant_decoding() -> None:
    meter = Address.parse("78330011223344")
    heat_values = ReadReply.build(0x20, meter, 0x901F, {
        "heat.settlement": 1, "heat.total": 2, "power.heat": 3, "flow.rate": 4, "volume.total": 5,
        "temperature.supply": 6, "temperature.return": 7, "time.working_hours": 8,
        "meter.time": datetime.datetime(2024, 5, 6, 7, 8, 9), "status": 0,
    }).data  # fmt: skip
    # a heat layout from a meter that says it is a water meter: decoded, with a warning
    decoded = CATALOGUE.decode_reply(0x901F, 0x10, heat_values)
    assert decoded.by_quantity()["heat.total"] == 2.0
    assert "heat layout" in decoded.warnings[0]
    # not BCD: None and a warning; unknown unit code: raw value, a warning
    water = bytes.fromhex("FFFFFFFF2C00010000EE") + bytes(7) + b"\x00\x00"
    decoded = CATALOGUE.decode_reply(0x901F, 0x10, water)
    got = decoded.by_quantity()
    assert got["volume.total"] is None
    assert got["volume.settlement"] == 1.0
    assert len(decoded.warnings) == 2
    # extra bytes are kept and reported; unknown DIs give their hex
    decoded = CATALOGUE.decode_reply(0x8103, 0x10, b"\x15\x99")
    assert decoded.by_quantity() == {"settlement.day": 15}
    assert "extra" in decoded.warnings[0]
    assert CATALOGUE.decode_reply(0x1234, 0x10, b"\x01").values[0].value == "01"
    with pytest.raises(RemoteProtocolError):
        CATALOGUE.decode_reply(0x8102, 0x10, b"\x01")


def test_catalogue_loader_checks_its_table() -> None:
    text = read_data_file()
    assert Catalogue.from_text(text).get(0x901F) is not None
    with pytest.raises(LocalProtocolError, match="source"):
        Catalogue.from_text(text.replace('source = "CJ/T 188-2004 Table 7', 'source = "" # ', 1))
    with pytest.raises(LocalProtocolError, match="format"):
        Catalogue.from_text(text.replace('format = "XXXX.XXXX"', 'format = "XXXX.XXX"', 1))
    with pytest.raises(LocalProtocolError, match="TOML"):
        Catalogue.from_text("[[items]")


def test_describe_hides_keys_and_reads_other_dis() -> None:
    key = WriteRequest.build(0x10, WILDCARD, 0xA014, {"key.version": 2, "key": "00112233445566FF"})
    described = describe_frame(key.encode())
    assert "00112233445566FF" not in str(described)
    prices = ReadReply.build(0x10, WILDCARD, 0x8102, {
        "price.1": 2.5, "price.1.limit": 10, "price.2": 3.75, "price.2.limit": 20, "price.3": 5,
    })  # fmt: skip
    described = describe_frame(prices.encode("swapped"), "swapped")
    assert [v["value"] for v in described["values"]] == [2.5, 10, 3.75, 20, 5.0]
    purchase = ReadReply.build(0x10, WILDCARD, 0x8105, {
        "purchase.sequence": 4, "purchase.amount": 100, "purchase.total": 300, "purchase.balance": 12.5,
        "status": {"valve": "closed", "battery_low": False},
    })  # fmt: skip
    described = describe_frame(purchase.encode())
    assert described["status"]["valve"] == "closed"
    assert described["values"][-1] == {"quantity": "purchase.balance", "value": 12.5, "unit": "yuan"}
    history = ReadReply.build(0x20, WILDCARD, 0xD123, {"heat.settlement": (1.5, "MWh")})
    described = describe_frame(history.encode())
    assert described["values"][0]["value"] == 1500.0
    assert described["values"][0]["unit"] == "kWh"
    assert described["values"][0]["nth"] == 4

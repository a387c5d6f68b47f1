"""APDUs a client sends and the value-carrying responses round-trip; request builders, readings,
describe and looks_like_dlt698."""

from __future__ import annotations

import dataclasses
import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meter_gateway.protocols.dlt698 import requests as rq
from meter_gateway.protocols.dlt698.apdu import (
    ActionRequest,
    Apdu,
    ConnectRequest,
    FollowReport,
    GetRecord,
    GetRequestNormal,
    GetRequestNormalList,
    GetRequestRecord,
    GetResponseNormal,
    GetResponseNormalList,
    LinkRequest,
    LinkResponse,
    Piid,
    ReportNotificationList,
    ReportResponseList,
    ReportResponseRecordList,
    ResultNormal,
    SecurityRequest,
    ServerApdu,
    SetRequestNormal,
    SetRequestNormalList,
    TimeTag,
    Verification,
    parse_apdu,
)
from meter_gateway.protocols.dlt698.axdr import OAD, OMD, RCSD, TI, Data, DataType, DateTime, DateTimeS, array
from meter_gateway.protocols.dlt698.catalogue import default_catalogue, describe_oad, scale
from meter_gateway.protocols.dlt698.dar import dar_name
from meter_gateway.protocols.dlt698.describe import describe, looks_like_dlt698
from meter_gateway.protocols.dlt698.errors import LocalProtocolError, ProtocolError
from meter_gateway.protocols.dlt698.frame import AddressType, ServerAddress, parse_frame

METER = ServerAddress.parse("000000000001")
WHEN = datetime.datetime(2026, 10, 7, 15, 0, 0)
oads = st.builds(OAD, st.integers(0, 0xFFFF), st.integers(0, 0xFF), st.integers(0, 0xFF))
piids = st.builds(Piid, st.integers(0, 63), st.booleans())
timetags = st.one_of(st.none(), st.just(TimeTag(DateTimeS(2026, 1, 2, 3, 4, 5), TI(1, 5))))
small_data = st.one_of(
    st.builds(Data, st.just(DataType.LONG_UNSIGNED), st.integers(0, 0xFFFF)),
    st.builds(Data, st.just(DataType.OCTET_STRING), st.binary(max_size=8)),
    st.just(Data(DataType.NULL, None)),
)

client_apdus = st.one_of(
    st.builds(lambda p, o, t: GetRequestNormal(piid=p, oad=o, timetag=t), piids, oads, timetags),
    st.builds(
        lambda p, o, t: GetRequestNormalList(piid=p, oads=tuple(o), timetag=t),
        piids,
        st.lists(oads, max_size=6),
        timetags,
    ),
    st.builds(lambda p, o, d: SetRequestNormal(piid=p, oad=o, data=d), piids, oads, small_data),
    st.builds(
        lambda p, items: SetRequestNormalList(piid=p, items=tuple(items)),
        piids,
        st.lists(st.tuples(oads, small_data), max_size=4),
    ),
    st.builds(lambda p, o, d: ActionRequest(piid=p, omd=OMD(*o), data=d), piids, oads, small_data),
    st.builds(lambda p, o: ReportResponseList(piid=p, oads=tuple(o)), piids, st.lists(oads, max_size=4)),
    st.builds(lambda p, o: ReportResponseRecordList(piid=p, oads=tuple(o)), piids, st.lists(oads, max_size=4)),
)


@settings(max_examples=200, deadline=None)
@given(client_apdus)
def test_client_apdus_round_trip(apdu: Apdu) -> None:
    raw = apdu.encode()
    decoded = parse_apdu(raw)
    assert decoded == apdu
    assert decoded.encode() == raw
    assert not decoded.warnings


results = st.one_of(
    st.builds(ResultNormal, oads, small_data),
    st.builds(lambda o, dar: ResultNormal(o, dar=dar), oads, st.integers(0, 255)),
)
follow_reports = st.one_of(st.none(), st.builds(lambda r: FollowReport(tuple(r)), st.lists(results, max_size=2)))
server_piids = st.builds(Piid, st.integers(0, 63), st.booleans(), st.booleans())

# the responses that carry a meter's values, which the decoder builds without their __init__
value_responses = st.one_of(
    st.builds(
        lambda p, r, f, t: GetResponseNormal(piid=p, result=r, follow_report=f, timetag=t),
        server_piids,
        results,
        follow_reports,
        timetags,
    ),
    *(
        st.builds(
            lambda p, r, f, t, cls=cls: cls(piid=p, results=tuple(r), follow_report=f, timetag=t),
            server_piids,
            st.lists(results, max_size=4),
            follow_reports,
            timetags,
        )
        for cls in (GetResponseNormalList, ReportNotificationList)
    ),
)


@settings(max_examples=200, deadline=None)
@given(value_responses)
def test_value_responses_round_trip(apdu: ServerApdu) -> None:
    raw = apdu.encode()
    decoded = parse_apdu(raw)
    assert isinstance(decoded, ServerApdu)
    assert type(decoded) is type(apdu)
    assert decoded == apdu
    assert hash(decoded) == hash(apdu)
    assert repr(decoded) == repr(apdu)
    assert decoded.encode() == raw
    assert not decoded.warnings
    assert dataclasses.replace(decoded, timetag=None) == dataclasses.replace(apdu, timetag=None)
    if apdu.timetag is None:  # the TimeTag presence byte left off the end: tolerated, with a warning
        short = parse_apdu(raw[:-1])
        assert short == apdu
        assert short.warnings == ("TimeTag presence byte missing at the end of the APDU",)


def _round_trip(frame_bytes: bytes) -> Apdu:
    frame = parse_frame(frame_bytes)
    apdu = parse_apdu(frame.apdu)
    assert apdu.encode() == frame.apdu
    return apdu


def test_get_normal_list_builder_and_readings() -> None:
    targets = [OAD.parse(t) for t in ("00100200", "20000200", "20010200", "20040200")]
    frame = rq.get(METER, targets, piid=5, client=16)
    apdu = _round_trip(frame.encode())
    assert isinstance(apdu, GetRequestNormalList)
    assert list(apdu.oads) == targets
    response = GetResponseNormalList(
        piid=Piid(5),
        results=(
            ResultNormal(targets[0], array(*(Data(DataType.DOUBLE_LONG_UNSIGNED, v) for v in (123456, 100000, 23456)))),
            ResultNormal(targets[1], array(*(Data(DataType.LONG_UNSIGNED, v) for v in (2301, 2302, 2303)))),
            ResultNormal(targets[2], dar=6),
            ResultNormal(targets[3], array(*(Data(DataType.DOUBLE_LONG, v) for v in (12345, 4000, 4000, 4345)))),
        ),
    )
    readings = rq.readings(parse_apdu(response.encode()))
    got = {r.quantity: (r.value, r.unit) for r in readings}
    assert got["energy.active.import.total"] == (1234.56, "kWh")
    assert got["energy.active.import.t2"] == (234.56, "kWh")
    assert got["voltage.l3"] == (230.3, "V")
    assert got["power.active.total"] == (1234.5, "W")
    power = next(r for r in readings if r.quantity == "power.active.total")
    assert power.canonical == (1.2345, "kW")
    assert rq.failures(response) == [(targets[2], 6)]
    assert dar_name(6) == "object does not exist"


def test_set_clock() -> None:
    apdu = _round_trip(rq.set_clock(METER, WHEN).encode())
    assert isinstance(apdu, SetRequestNormal)
    assert str(apdu.oad) == "40000200"
    assert apdu.data == Data(DataType.DATE_TIME_S, DateTimeS(2026, 10, 7, 15, 0, 0))


def test_broadcast_time_matches_vector_p61_layout() -> None:
    frame = rq.broadcast_time(datetime.datetime(2017, 6, 5, 10, 24, 12), piid=1)
    raw = frame.encode()
    assert frame.address.type is AddressType.BROADCAST
    assert raw[4] == 0xC0
    assert raw[5] == 0xAA
    apdu = _round_trip(raw)
    assert isinstance(apdu, ActionRequest)
    assert str(apdu.omd) == "40007F00"
    # the APDU of vector P61 exactly (its PIID is 1)
    assert parse_frame(raw).apdu.hex().upper() == "07010140007F001C07E106050A180C00"


def test_relay_and_keep_power() -> None:
    trip = _round_trip(rq.relay_trip(METER, power_off_minutes=0).encode())
    assert isinstance(trip, ActionRequest)
    assert str(trip.omd) == "80008100"
    close = _round_trip(rq.relay_close(METER, close_now=True).encode())
    assert isinstance(close, ActionRequest)
    assert str(close.omd) == "80008200"
    keep = _round_trip(rq.keep_power(METER, True).encode())
    assert isinstance(keep, ActionRequest)
    assert str(keep.omd) == "80017F00"


def test_get_record_daily_freeze_selectors() -> None:
    columns = [OAD.parse("20210200"), OAD.parse("00100200")]
    one = _round_trip(
        rq.get_record(
            METER, OAD.parse("50040200"), rq.freeze_at(datetime.datetime(2016, 1, 20)), columns, piid=3
        ).encode()
    )
    assert isinstance(one, GetRequestRecord)
    # Appendix D.3.3 (vector get_record_request) with the same PIID
    assert one.encode().hex().upper() == "0503035004020001202102001C07E00114000000020020210200000010020000"
    span = rq.freezes_between(datetime.datetime(2026, 10, 1), datetime.datetime(2026, 10, 8), TI(3, 1))
    two = _round_trip(rq.get_record(METER, OAD.parse("50040200"), span, columns).encode())
    assert isinstance(two, GetRequestRecord)
    assert two.record == GetRecord(OAD.parse("50040200"), span, RCSD(tuple(columns)))


def test_security_plaintext_rn() -> None:
    inner = rq.get(METER, [OAD.parse("00100200"), OAD.parse("20000200"), OAD.parse("20040200")], piid=0, client=16)
    rn = bytes.fromhex("087406EFE4E8900CDA5D3EC56DF93D3A")
    wrapped = rq.secured(inner, rn)
    apdu = _round_trip(wrapped.encode())
    assert isinstance(apdu, SecurityRequest)
    assert apdu.verification == Verification(1, rn=rn)
    assert isinstance(apdu.inner, GetRequestNormalList)
    # vector P71's APDU, byte for byte
    assert wrapped.apdu.hex().upper() == (
        "10001105020003001002002000020020040200000110087406EFE4E8900CDA5D3EC56DF93D3A"
    )
    with pytest.raises(LocalProtocolError):
        rq.secured(inner, b"")


def test_connect_request() -> None:
    apdu = _round_trip(rq.connect(METER, timeout=100, apdu_max=1024).encode())
    assert isinstance(apdu, ConnectRequest)
    assert apdu.encode().hex().upper() == (  # Appendix D.2 with our defaults for version and conformance
        "020000160000000000000000".replace("00160000000000000000", "0016" + "FF" * 8)
        + "FF" * 16
        + "04000400010400"
        + "00000064"
        + "0000"
    )


def test_link_response_answers_login() -> None:
    login_frame = parse_frame(bytes.fromhex("681E008105220300000000004271010000003C07E70705030F1811000080FA16"))
    login = parse_apdu(login_frame.apdu)
    assert isinstance(login, LinkRequest)
    received = datetime.datetime(2023, 7, 5, 15, 24, 17, 500000)
    answer = rq.link_response(login_frame, login, received, received + datetime.timedelta(milliseconds=2))
    raw = answer.encode()
    apdu = _round_trip(raw)
    assert isinstance(apdu, LinkResponse)
    assert apdu.request_time == login.time
    assert apdu.receive_time == DateTime(2023, 7, 5, 3, 15, 24, 17, 500)
    assert answer.control.byte == 0x01  # DIR 0, PRM 0, link management: as vector P72
    assert str(answer.address) == "000000000322"


def test_report_response() -> None:
    report = ReportNotificationList(
        piid=Piid(9), results=(ResultNormal(OAD.parse("30110200"), Data(DataType.NULL, None)),)
    )
    frame = parse_frame(rq.request_frame(METER, report.encode()).encode())
    answer = rq.report_response(frame, report)
    apdu = _round_trip(answer.encode())
    assert apdu == ReportResponseList(piid=Piid(9), oads=(OAD.parse("30110200"),))
    assert answer.control.byte == 0x03


def test_catalogue() -> None:
    cat = default_catalogue()
    assert cat.oad_for("energy.active.import.total") == OAD.parse("00100201")
    assert cat.oad_for("voltage.l2") == OAD.parse("20000202")
    assert cat.oad_for("energy.active.import.l1.total") == OAD.parse("00110201")
    assert describe_oad("00100201")["source"]
    for item in cat:
        assert "DL/T 698.45-2017" in item.source
    assert scale(123456, -2) == 1234.56
    assert scale(5, 2) == 500
    status = cat.readings(
        OAD.parse("20140203"),
        Data(
            DataType.BIT_STRING,
            __import__("meter_gateway.protocols.dlt698.axdr", fromlist=["BitString"]).BitString.from_bits(
                "0000100000000000"
            ),
        ),
    )
    assert status[0].fields is not None
    assert status[0].fields["relay"] == "open"
    purse = cat.readings(
        OAD.parse("202C0200"),
        Data(DataType.STRUCTURE, (Data(DataType.DOUBLE_LONG_UNSIGNED, 12345), Data(DataType.DOUBLE_LONG_UNSIGNED, 7))),
    )
    assert [(r.quantity, r.value) for r in purse] == [
        ("prepaid.money.remaining", 123.45),
        ("prepaid.money.purchase.count", 7),
    ]


def test_looks_like_dlt698_tells_645_apart() -> None:
    dlt645 = bytes.fromhex("68010000000000681104333334331516")  # a DL/T 645 read (checksum irrelevant here)
    assert not looks_like_dlt698(dlt645)
    assert not looks_like_dlt698(b"\x68\x17")
    assert looks_like_dlt698(b"\xfe\xfe" + rq.get(METER, [OAD.parse("40010200")]).encode())


def test_describe_security_wrapped() -> None:
    raw = bytes.fromhex(
        "683500430502000020114310F42B10001105020003001002002000020020040200000110087406EFE4E8900CDA5D3EC56DF93D3A2B8B16"
    )
    out = describe(raw)
    assert out["service"] == "SECURITY-Request"
    assert out["inner_choice"] == "GetRequestNormalList"
    assert out["oads"] == ["00100200", "20000200", "20040200"]


def test_describe_rejects_garbage() -> None:
    with pytest.raises(ProtocolError):
        describe(b"\x68\x00")

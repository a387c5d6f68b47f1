"""The ``dlt698`` fuzz target: DL/T 698.45 bytes from a meter, as far into the gateway as they go.

Base inputs are byte streams of near-valid frames built with our own encoders: every response,
report and request APDU the gateway meets (GET/SET/ACTION responses of every choice,
REPORT-Notification, LINK, CONNECT, SECURITY-Request/Response with plaintext inside, ERROR-Response,
RELEASE, PROXY), with PIID, FollowReport and TimeTag trailers, values typed after the OAD catalogue
(or any A-XDR Data, or Data nested hundreds of levels deep through every container type),
sometimes split into link-layer fragments, sometimes scrambled (+33H), between noise and FE
wake-up bytes; and the frames and APDUs of ``tests/vectors/dlt698.json``. A quarter of the base
inputs are bare APDUs; in half the executions of a stream, :func:`repair` makes the HCS and FCS of
the mutated frames right again so the mutations reach the APDU decoder.

One execution: the streaming Deframer fed in random chunks (with the caller's silence timer,
``expire``, now and then), checking that it never holds a frame's worth of bytes, that no frame
exceeds its limit and that every input byte is accounted for (a frame, a discard or a wake-up
byte); fragments through the Reassembler (and the ACK frames it asks for); every APDU through
parse_apdu, oads_of, the catalogue's readings and record readings (canonical units too), the
failures list, describe_frame / describe_apdu, the REPORT-Response and LINK-Response builders;
the same bytes through an exchange awaiting a GET answer and through the bus's idle line; and the
whole input through ``describe`` and ``meter-gateway decode``'s frame splitter.
"""

from __future__ import annotations

import datetime
import functools
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from fuzz.targets import Guard, InvariantBroken, Target

VECTORS = Path(__file__).resolve().parent.parent / "tests" / "vectors" / "dlt698.json"
WHEN = datetime.datetime(2026, 12, 7, 10, 0, 0)

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
_INT_RANGES = {  # DataType value -> (low, high)
    5: (-(2**31), 2**31 - 1),
    6: (0, 2**32 - 1),
    15: (-128, 127),
    16: (-(2**15), 2**15 - 1),
    17: (0, 0xFF),
    18: (0, 0xFFFF),
    20: (-(2**63), 2**63 - 1),
    21: (0, 2**64 - 1),
    22: (0, 0xFF),
    80: (0, 0xFFFF),
}
_CATALOGUE_TYPES = {
    "double-long": 5,
    "double-long-unsigned": 6,
    "integer": 15,
    "long": 16,
    "unsigned": 17,
    "long-unsigned": 18,
    "long64": 20,
    "long64-unsigned": 21,
    "enum": 22,
}


@functools.cache
def _vectors() -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
    """(whole frames, bare APDUs) of the shared vector file."""
    raw = json.loads(VECTORS.read_text())
    frames = tuple(bytes.fromhex(v["hex"]) for v in raw["vectors"] if "hex" in v)
    apdus = tuple(bytes.fromhex(v["apdu_hex"]) for v in raw.get("apdu_vectors", ()))
    return frames, apdus


@functools.cache
def _catalogue_oads() -> tuple[Any, ...]:
    from meter_gateway.protocols.dlt698.axdr import OAD
    from meter_gateway.protocols.dlt698.catalogue import default_catalogue

    return tuple(OAD(item.oi, item.attribute, 0) for item in default_catalogue())


def _int(tag: int) -> st.SearchStrategy[Any]:
    from meter_gateway.protocols.dlt698.axdr import Data, DataType

    low, high = _INT_RANGES[tag]
    edges = st.sampled_from(sorted({low, high, 0, 1, low + 1, high - 1}))
    return st.builds(Data, st.just(DataType(tag)), edges | st.integers(low, high))


@functools.cache
def _strategies() -> dict[str, st.SearchStrategy[Any]]:
    """The A-XDR building blocks (built once: the axdr import is lazy like the other targets')."""
    from meter_gateway.protocols.dlt698 import axdr as x
    from meter_gateway.protocols.dlt698.frame import AddressType, ServerAddress

    dt = x.DataType
    oads = st.builds(x.OAD, u16, u8, u8)
    dts = st.builds(x.DateTimeS, u16, u8, u8, u8, u8, u8)
    good_dts = st.builds(
        x.DateTimeS,
        st.integers(2000, 2099),
        st.integers(1, 12),
        st.integers(1, 28),
        st.integers(0, 23),
        st.integers(0, 59),
        st.integers(0, 59),
    )
    tis = st.builds(x.TI, st.integers(0, 6), u16)
    addresses = st.builds(
        ServerAddress, st.binary(min_size=1, max_size=8), st.sampled_from(list(AddressType)[:3]), st.integers(0, 3)
    )
    tsas = st.builds(x.TSA, st.none() | addresses)
    roads = st.builds(x.ROAD, oads, st.lists(oads, max_size=3).map(tuple))
    csds = oads | roads
    ms = st.one_of(
        st.sampled_from((x.MS(0), x.MS(1))),
        st.builds(x.MS, st.just(2), st.lists(u8, max_size=3).map(tuple)),
        st.builds(x.MS, st.just(3), st.lists(tsas, max_size=2).map(tuple)),
        st.builds(x.MS, st.just(4), st.lists(u16, max_size=3).map(tuple)),
    )
    small = st.one_of(*(_int(t) for t in _INT_RANGES), st.just(x.NULL))
    scalars = st.one_of(
        small,
        st.builds(x.Data, st.just(dt.BOOL), st.booleans()),
        st.integers(0, 40).flatmap(
            lambda n: st.builds(
                x.Data,
                st.just(dt.BIT_STRING),
                st.builds(x.BitString, st.just(n), st.binary(min_size=(n + 7) // 8, max_size=(n + 7) // 8)),
            )
        ),
        st.builds(x.Data, st.just(dt.OCTET_STRING), st.binary(max_size=12) | st.binary(min_size=128, max_size=140)),
        st.builds(x.Data, st.just(dt.VISIBLE_STRING), st.text(st.characters(max_codepoint=127), max_size=8)),
        st.builds(x.Data, st.just(dt.UTF8_STRING), st.text(max_size=6)),
        st.builds(x.Data, st.just(dt.FLOAT32), st.floats(width=32)),
        st.builds(x.Data, st.just(dt.FLOAT64), st.floats()),
        st.builds(x.Data, st.just(dt.DATE_TIME), st.builds(x.DateTime, u16, u8, u8, u8, u8, u8, u8, u16)),
        st.builds(x.Data, st.just(dt.DATE), st.builds(x.Date, u16, u8, u8, u8)),
        st.builds(x.Data, st.just(dt.TIME), st.builds(x.Time, u8, u8, u8)),
        st.builds(x.Data, st.just(dt.DATE_TIME_S), good_dts | dts),
        st.builds(x.Data, st.just(dt.OAD), oads),
        st.builds(x.Data, st.just(dt.ROAD), roads),
        st.builds(x.Data, st.just(dt.OMD), st.builds(x.OMD, u16, u8, u8)),
        st.builds(x.Data, st.just(dt.TI), tis),
        st.builds(x.Data, st.just(dt.TSA), tsas),
        st.builds(x.Data, st.sampled_from((dt.MAC, dt.RN)), st.binary(max_size=8)),
        st.builds(x.Data, st.just(dt.REGION), st.builds(x.Region, st.integers(0, 3), small, small)),
        st.builds(x.Data, st.just(dt.SCALER_UNIT), st.builds(x.ScalerUnit, st.integers(-128, 127), u8)),
        st.builds(x.Data, st.just(dt.CSD), csds),
        st.builds(x.Data, st.just(dt.MS), ms),
        st.builds(x.Data, st.just(dt.SID), st.builds(x.SID, st.integers(0, 2**32 - 1), st.binary(max_size=4))),
        st.builds(
            x.Data,
            st.just(dt.SID_MAC),
            st.builds(
                x.SIDMAC, st.builds(x.SID, st.integers(0, 2**32 - 1), st.binary(max_size=4)), st.binary(max_size=4)
            ),
        ),
        st.builds(x.Data, st.just(dt.COMDCB), st.builds(x.COMDCB, u8, u8, u8, u8, u8)),
        st.builds(x.Data, st.just(dt.RCSD), st.builds(x.RCSD, st.lists(csds, max_size=3).map(tuple))),
        st.builds(x.Data, st.just(dt.RSD), st.builds(lambda o, d: x.RSD(1, x.Selector1(o, d)), oads, small)),
        st.builds(
            x.Data,
            st.just(dt.RSD),
            st.builds(lambda a, b: x.RSD(7, x.SelectorRangeMS(a, b, x.TI(1, 15), x.MS(1))), dts, dts),
        ),
    )
    values = st.recursive(
        scalars,
        lambda inner: st.builds(
            x.Data, st.sampled_from((dt.ARRAY, dt.STRUCTURE)), st.lists(inner, max_size=4).map(tuple)
        ),
        max_leaves=6,
    )
    return {"oads": oads, "dts": dts, "tis": tis, "addresses": addresses, "csds": csds, "values": values}


@st.composite
def _value_for(draw: st.DrawFn, oad: Any) -> Any:
    """A value as a meter would send it for ``oad`` (typed after the catalogue), or any Data."""
    from meter_gateway.protocols.dlt698 import axdr as x
    from meter_gateway.protocols.dlt698.catalogue import default_catalogue

    item = default_catalogue().get(oad)
    if item is None or draw(st.integers(0, 9)) == 0:
        return draw(_strategies()["values"])
    tag = _CATALOGUE_TYPES.get(item.type)
    if item.layout == "status_words":
        element = st.builds(
            x.Data,
            st.just(x.DataType.BIT_STRING),
            st.builds(x.BitString, st.just(16), st.binary(min_size=2, max_size=2)),
        )
    elif item.type == "date_time_s":
        element = st.builds(x.Data, st.just(x.DataType.DATE_TIME_S), _strategies()["dts"])
    elif item.type == "octet-string":
        element = st.builds(x.Data, st.just(x.DataType.OCTET_STRING), st.binary(max_size=8))
    elif tag is not None:
        element = _int(tag)
    else:
        element = _strategies()["values"]
    if oad.index or item.layout in ("none", "record"):
        return draw(element)
    kind = x.DataType.STRUCTURE if item.layout == "structure" else x.DataType.ARRAY
    return x.Data(kind, tuple(draw(st.lists(element, max_size=draw(st.sampled_from((5, 20)))))))


@st.composite
def _oad(draw: st.DrawFn) -> Any:
    from meter_gateway.protocols.dlt698.axdr import OAD

    if draw(st.integers(0, 4)) == 0:
        return draw(_strategies()["oads"])
    oi, attribute, _ = draw(st.sampled_from(_catalogue_oads()))
    feature = draw(st.sampled_from((0, 0, 0, 1, 7))) << 5
    return OAD(oi, attribute | feature, draw(st.sampled_from((0, 0, 1, 2, 3, 4, 5, 13, 200))))


@st.composite
def _result_normal(draw: st.DrawFn) -> Any:
    from meter_gateway.protocols.dlt698.apdu import ResultNormal

    oad = draw(_oad())
    if draw(st.integers(0, 5)) == 0:
        return ResultNormal(oad, None, draw(u8))
    return ResultNormal(oad, draw(_value_for(oad)))


@st.composite
def _result_record(draw: st.DrawFn) -> Any:
    from meter_gateway.protocols.dlt698.apdu import ResultRecord
    from meter_gateway.protocols.dlt698.axdr import OAD, RCSD, ROAD, Data, DataType

    record = draw(st.sampled_from((OAD(0x5004, 2, 0), OAD(0x5002, 2, 0), OAD(0x5006, 2, 0))) | _oad())
    columns: list[Any] = [OAD(0x2021, 2, 0)] if draw(st.booleans()) else []
    columns += draw(st.lists(_oad(), max_size=3))
    if draw(st.integers(0, 3)) == 0:
        columns.append(ROAD(draw(_oad()), tuple(draw(st.lists(_oad(), max_size=3)))))
    rcsd = RCSD(tuple(columns))
    if draw(st.integers(0, 5)) == 0:
        return ResultRecord(record, rcsd, dar=draw(u8))
    rows = []
    for _ in range(draw(st.integers(0, 3)) if columns else 0):  # rows without columns do not decode
        row = []
        for column in columns:
            if isinstance(column, ROAD):
                row.append(Data(DataType.ARRAY, tuple(draw(_value_for(sub)) for sub in column.oads)))
            else:
                row.append(draw(_value_for(column)))
        rows.append(tuple(row))
    return ResultRecord(record, rcsd, tuple(rows))


def _trailers(draw: st.DrawFn, server: bool) -> dict[str, Any]:
    from meter_gateway.protocols.dlt698.apdu import FollowReport, Piid, TimeTag

    out: dict[str, Any] = {"piid": Piid(draw(st.integers(0, 63)), draw(st.booleans()), draw(st.booleans()))}
    if draw(st.integers(0, 3)) == 0:
        out["timetag"] = TimeTag(draw(_strategies()["dts"]), draw(_strategies()["tis"]))
    if server and draw(st.integers(0, 3)) == 0:
        if draw(st.booleans()):
            out["follow_report"] = FollowReport(tuple(draw(st.lists(_result_normal(), max_size=2))))
        else:
            out["follow_report"] = FollowReport(tuple(draw(st.lists(_result_record(), max_size=2))), records=True)
    if not server:
        out["piid"] = out["piid"]._replace(acd=False)
    return out


def _dar() -> st.SearchStrategy[int]:
    return st.sampled_from((0, 1, 3, 4, 255)) | u8


@st.composite
def _server_apdu(draw: st.DrawFn) -> Any:
    """A response or report APDU (what a meter sends), any choice."""
    from meter_gateway.protocols.dlt698 import apdu as a
    from meter_gateway.protocols.dlt698.axdr import OMD

    t = _trailers(draw, server=True)
    oad = draw(_oad())
    omd = OMD(oad.oi, oad.attribute, oad.index)

    def action_result() -> Any:
        return a.ActionResult(omd, draw(_dar()), draw(st.none() | _strategies()["values"]))

    kind = draw(st.integers(0, 18))
    normals = st.lists(_result_normal(), max_size=4).map(tuple)
    records = st.lists(_result_record(), max_size=2).map(tuple)
    builders: list[Callable[[], Any]] = [
        lambda: a.GetResponseNormal(result=draw(_result_normal()), **t),
        lambda: a.GetResponseNormalList(results=draw(normals), **t),
        lambda: a.GetResponseRecord(result=draw(_result_record()), **t),
        lambda: a.GetResponseRecordList(results=draw(records), **t),
        lambda: a.GetResponseNext(last=draw(st.booleans()), block=draw(u16), results=draw(normals), **t),
        lambda: a.GetResponseNext(last=True, block=draw(u16), results=draw(records), records=True, **t),
        lambda: a.GetResponseNext(last=False, block=draw(u16), dar=draw(_dar()), **t),
        lambda: a.GetResponseMD5(oad=oad, md5=draw(st.binary(max_size=16)), **t),
        lambda: a.SetResponseNormal(oad=oad, dar=draw(_dar()), **t),
        lambda: a.SetResponseNormalList(results=(a.SetResult(oad, draw(_dar())),) * draw(st.integers(0, 3)), **t),
        lambda: a.SetThenGetResponseNormalList(
            results=(a.SetThenGetResult(oad, draw(_dar()), draw(_result_normal())),), **t
        ),
        lambda: a.ActionResponseNormal(result=action_result(), **t),
        lambda: a.ActionResponseNormalList(results=(action_result(), action_result()), **t),
        lambda: a.ActionThenGetResponseNormalList(
            results=(a.ActionThenGetResult(omd, draw(_dar()), None, draw(_result_normal())),), **t
        ),
        lambda: a.ReportNotificationList(results=draw(normals), **t),
        lambda: a.ReportNotificationRecordList(results=draw(records), **t),
        lambda: a.ReportNotificationTransData(port=oad, frames=(draw(st.binary(max_size=20)),), **t),
        lambda: a.ConnectResponse(
            factory=a.FactoryVersion("ABCD", "V1.0", "260101", "H1.0", "260101", "EXTRA123"),
            version=0x16,
            protocol_conformance=draw(st.binary(min_size=8, max_size=8)),
            function_conformance=b"\xff" * 16,
            send_max=512,
            receive_max=512,
            window=1,
            apdu_max=1024,
            timeout=7200,
            result=draw(st.sampled_from((0, 1, 5, 255))),
            server_rn=draw(st.none() | st.binary(max_size=8)),
            server_signature=b"",
            **t,
        ),
        lambda: a.ReleaseResponse(result=draw(u8), **t),
    ]
    return builders[kind]()


@st.composite
def _client_apdu(draw: st.DrawFn) -> Any:
    """A request (our own, heard back on a shared bus) or a client's answer."""
    from meter_gateway.protocols.dlt698 import apdu as a
    from meter_gateway.protocols.dlt698 import requests as rq
    from meter_gateway.protocols.dlt698.axdr import OMD, RSD, SelectorLast

    t = _trailers(draw, server=False)
    oad = draw(_oad())
    kind = draw(st.integers(0, 7))
    builders: list[Callable[[], Any]] = [
        lambda: a.GetRequestNormal(oad=oad, **t),
        lambda: a.GetRequestNormalList(oads=tuple(draw(st.lists(_oad(), max_size=4))), **t),
        lambda: a.GetRequestRecord(record=a.GetRecord(oad, rq.freeze_at(WHEN), draw(_result_record()).rcsd), **t),
        lambda: a.GetRequestRecord(
            record=a.GetRecord(oad, RSD(9, SelectorLast(draw(u8))), draw(_result_record()).rcsd)
        ),
        lambda: a.SetRequestNormal(oad=oad, data=draw(_value_for(oad)), **t),
        lambda: a.ActionRequest(omd=OMD(oad.oi, oad.attribute, 0), data=draw(_strategies()["values"]), **t),
        lambda: a.ReportResponseList(oads=(oad,), **t),
        lambda: a.ConnectRequest(**t),
    ]
    return builders[kind]()


# How a Data value can hold another (prefix, suffix around the inner value): array, structure,
# Region, MS of regions, RSD selectors 1, 2, 3 and 4 (whose MS holds regions). Nesting them deeply
# is what a stack-exhaustion bug needs and byte mutations alone never build.
_NESTINGS = (
    (b"\x01\x01", b""),
    (b"\x02\x01", b""),
    (b"\x58\x00", b"\x00"),
    (b"\x5c\x05\x01\x00", b"\x00"),
    (b"\x5a\x01\x00\x10\x02\x00", b""),
    (b"\x5a\x02\x00\x10\x02\x00", b"\x00\x00"),
    (b"\x5a\x03\x01\x00\x10\x02\x00", b"\x00\x00"),
    (b"\x5a\x04\x07\xea\x0c\x07\x00\x00\x00\x05\x01\x00", b"\x00"),
)


@st.composite
def _deep_data(draw: st.DrawFn) -> bytes:
    pattern = draw(st.lists(st.sampled_from(_NESTINGS), min_size=1, max_size=3))
    count = draw(st.sampled_from((20, 40, 200, 400, 700)) | st.integers(1, 700))
    levels = [pattern[i % len(pattern)] for i in range(count)]
    return b"".join(p for p, _ in levels) + b"\x00" + b"".join(s for _, s in reversed(levels))


@st.composite
def _apdu(draw: st.DrawFn) -> tuple[bytes, str]:
    """An APDU's bytes and who sends it: ``response``, ``report``, ``link`` (a LINK-Request) or
    ``request``."""
    from meter_gateway.protocols.dlt698 import apdu as a
    from meter_gateway.protocols.dlt698.axdr import DateTime

    kind = draw(
        st.sampled_from(("response",) * 6 + ("report", "link", "request", "security", "error", "vector", "deep"))
    )
    if kind == "deep":  # a GET-Response whose value nests through every container the Data types have
        oad = draw(_oad())
        nested = draw(_deep_data())
        return bytes((133, 1, draw(st.integers(0, 63)))) + oad.wire + b"\x01" + nested + b"\x00\x00", "response"
    if kind == "vector":
        return draw(st.sampled_from(_vectors()[1])), draw(st.sampled_from(("response", "request")))
    if kind == "link":
        when = DateTime(draw(u16), draw(u8), draw(u8), draw(u8), draw(u8), draw(u8), draw(u8), draw(u16))
        piid = a.Piid(draw(st.integers(0, 63)), draw(st.booleans()))
        return a.LinkRequest(
            piid=piid, kind=draw(st.sampled_from((0, 1, 2, 3))), heartbeat=draw(u16), time=when
        ).encode(), kind
    if kind == "request":
        return draw(_client_apdu()).encode(), kind
    if kind == "error":
        return a.ErrorResponse(
            piid=a.Piid(draw(st.integers(0, 63))), error=draw(st.sampled_from((1, 2, 255)))
        ).encode(), "response"
    if kind == "security":
        inner = draw(_server_apdu()).encode()
        choice = draw(st.integers(0, 3))
        mac = draw(st.none() | st.binary(min_size=4, max_size=4))
        if choice == 0:
            return a.SecurityResponse(data=inner, mac=mac).encode(), "response"
        if choice == 1:
            return a.SecurityResponse(data=draw(st.binary(max_size=40)), encrypted=True, mac=mac).encode(), "response"
        if choice == 2:
            return a.SecurityResponse(dar=draw(_dar()), mac=mac).encode(), "response"
        request = draw(_client_apdu()).encode()
        verification = a.Verification(1, rn=draw(st.binary(min_size=16, max_size=16)))
        return a.SecurityRequest(data=request, verification=verification).encode(), "request"
    if kind == "report":
        t = _trailers(draw, server=True)
        if draw(st.booleans()):
            return a.ReportNotificationList(
                results=tuple(draw(st.lists(_result_normal(), max_size=3))), **t
            ).encode(), kind
        records = tuple(draw(st.lists(_result_record(), max_size=2)))
        return a.ReportNotificationRecordList(results=records, **t).encode(), kind
    return draw(_server_apdu()).encode(), "response"


_ROLES = {  # who sends it -> (function, DIR, PRM)
    "response": (3, True, True),
    "report": (3, True, False),
    "link": (1, True, False),
    "request": (3, False, True),
}


def _awaiting(meter: Any, apdu: bytes) -> Any:
    """What the request that ``apdu`` answers expects (None if no request gets that answer)."""
    from meter_gateway.protocols.dlt698 import apdu as a
    from meter_gateway.protocols.dlt698.errors import ProtocolError
    from meter_gateway.protocols.dlt698.exchange import Expect, Identity

    try:
        decoded = a.parse_apdu(apdu)
    except ProtocolError:  # a vector or a nesting bomb: no request is answered by it
        return None
    plain = decoded.inner if isinstance(decoded, a.SecurityResponse) else decoded
    piid = getattr(plain, "piid", None)
    if plain is None or piid is None or not 130 <= plain.TAG <= 135:
        return None
    return Expect(meter, Identity(plain.TAG, plain.CHOICE, piid.seq), isinstance(decoded, a.SecurityResponse))


@st.composite
def _stream(draw: st.DrawFn) -> tuple[Any, bytes]:
    from meter_gateway.protocols.dlt698 import requests as rq
    from meter_gateway.protocols.dlt698.axdr import OAD
    from meter_gateway.protocols.dlt698.deframer import fragment_apdu
    from meter_gateway.protocols.dlt698.exchange import Expect
    from meter_gateway.protocols.dlt698.frame import Control, Frame, ServerAddress

    meter = draw(st.sampled_from((ServerAddress.parse("000000000001"), ServerAddress.parse("123456789012"))))
    max_frame_length = draw(st.sampled_from((2048, 2048, 2048, 300)))
    expect: Any = None
    parts: list[bytes] = []
    for _ in range(draw(st.integers(1, 3))):
        if draw(st.integers(0, 3)) == 0:
            parts.append(draw(st.binary(max_size=16) | st.just(b"\xfe" * 4)))  # noise or wake-up bytes
        if draw(st.integers(0, 9)) == 0:
            parts.append(draw(st.sampled_from(_vectors()[0])))
            continue
        apdu, role = draw(_apdu())
        function, from_server, prm = _ROLES[role]
        if draw(st.integers(0, 15)) == 0:
            from_server, prm = draw(st.booleans()), draw(st.booleans())
        scrambled = draw(st.integers(0, 5)) == 0
        address = meter if draw(st.integers(0, 3)) else draw(_strategies()["addresses"])
        client = draw(st.sampled_from((0, 0, 0x10, 0xFF)))
        if expect is None and role == "response" and address is meter:
            expect = _awaiting(meter, apdu)
        preamble = draw(st.integers(0, 4))
        if len(apdu) > 2 and draw(st.integers(0, 6)) == 0:
            size = draw(st.integers(max(1, len(apdu) // 6), len(apdu) - 1))
            control = Control(function, from_server, prm, fragment=True, scrambled=scrambled)
            for header, chunk in fragment_apdu(apdu, size):
                parts.append(Frame(control, address, client, header.wire + chunk).encode(preamble))
        else:
            control = Control(function, from_server, prm, scrambled=scrambled)
            parts.append(Frame(control, address, client, apdu).encode(preamble))
    if expect is None:
        expect = Expect.of(rq.get(meter, [OAD(0x0010, 2, 0)], piid=draw(st.integers(1, 63))))
    return (max_frame_length, expect), b"".join(parts)


@st.composite
def _base(draw: st.DrawFn) -> tuple[Any, bytes]:
    """A byte stream of frames (context: deframer limit and the awaited answer), or, a quarter of
    the time, one bare APDU (context None) so every mutation lands in the APDU decoder."""
    if draw(st.integers(0, 3)):
        return draw(_stream())
    return None, draw(_apdu())[0]


def _deframe(max_frame_length: int, data: bytes, rng: random.Random) -> list[Any]:
    from meter_gateway.protocols.dlt698.deframer import REASONS, Deframer, Discarded

    deframer = Deframer(max_frame_length)
    frames: list[Any] = []
    accounted = 0

    def take(events: list[Any]) -> None:
        nonlocal accounted
        for event in events:
            if isinstance(event, Discarded):
                if event.reason not in REASONS or not event.data:
                    raise InvariantBroken(f"discard {event.reason!r} of {len(event.data)} bytes")
                accounted += len(event.data)
                continue
            size = 11 + len(event.address.wire) + len(event.data)  # 68 L L C AF SA CA HCS HCS data FCS FCS 16
            if size > max_frame_length:
                raise InvariantBroken(f"frame of {size} bytes from a deframer limited to {max_frame_length}")
            accounted += size
            frames.append(event)

    pos = 0
    while pos < len(data):  # arbitrary chunking, as bytes trickle in from a serial port
        step = rng.choice((1, 2, 7, 13, 64, 300, len(data)))
        take(deframer.feed(data[pos : pos + step]))
        pos += step
        if deframer.buffered >= max_frame_length:
            raise InvariantBroken(f"deframer holds {deframer.buffered} bytes, limit {max_frame_length}")
        if rng.random() < 0.03:
            take(deframer.expire())  # the caller's silence timer fired between chunks
    take(deframer.expire())
    if deframer.buffered:
        raise InvariantBroken(f"expire left {deframer.buffered} bytes held")
    if accounted + deframer.preamble_bytes != len(data):
        raise InvariantBroken(
            f"{len(data)} bytes in, {accounted} in frames and discards + {deframer.preamble_bytes} wake-up bytes"
        )
    return frames


def _readings(apdu: Any) -> None:
    """What the driver and the report path take from an APDU: readings in canonical units, DARs,
    record rows, FollowReport results."""
    from meter_gateway.protocols.dlt698 import apdu as a
    from meter_gateway.protocols.dlt698 import requests as rq
    from meter_gateway.protocols.dlt698.catalogue import default_catalogue

    catalogue = default_catalogue()
    for reading in rq.readings(apdu, catalogue):
        _ = reading.canonical
    rq.failures(apdu)
    inner = rq.unwrap(apdu)
    records: tuple[Any, ...] = ()
    if isinstance(inner, a.GetResponseRecord):
        records = (inner.result,)
    elif isinstance(inner, a.GetResponseRecordList | a.ReportNotificationRecordList) or (
        isinstance(inner, a.GetResponseNext) and inner.records
    ):
        records = inner.results
    follow = getattr(inner, "follow_report", None)
    if follow is not None:
        records += tuple(r for r in follow.results if isinstance(r, a.ResultRecord))
        for result in follow.results:
            if isinstance(result, a.ResultNormal) and result.data is not None:
                for reading in catalogue.readings(result.oad, result.data):
                    _ = reading.canonical
    for record in records:
        for row in catalogue.record_readings(record):
            for reading in row:
                _ = reading.canonical


def _use_apdu(guard: Guard, frame: Any, raw: bytes) -> None:
    from meter_gateway.protocols.dlt698 import apdu as a
    from meter_gateway.protocols.dlt698 import requests as rq
    from meter_gateway.protocols.dlt698.describe import describe_apdu

    apdu = guard(a.parse_apdu, raw)
    if apdu is None:
        return
    guard(a.oads_of, apdu)
    guard(_readings, apdu)
    guard(describe_apdu, apdu)
    if isinstance(apdu, a.ReportNotificationList | a.ReportNotificationRecordList):
        guard(lambda: rq.report_response(frame, apdu).encode())
    elif isinstance(apdu, a.LinkRequest):
        guard(lambda: rq.link_response(frame, apdu, WHEN, WHEN).encode())


def _answer(reply: Any) -> Any:
    """The ``decode`` of a GET exchange, as the driver's: the readings and the DARs."""
    from meter_gateway.protocols.dlt698 import requests as rq

    return rq.readings(reply.apdu), rq.failures(reply.apdu)


def _exchange(expect: Any, data: bytes) -> None:
    """The bytes as the answer awaited by a request, then as the bus's idle line hears them."""
    from meter_gateway.protocols.dlt698.describe import describe_apdu
    from meter_gateway.protocols.dlt698.exchange import Dlt698Exchange, Dlt698Line
    from meter_gateway.protocols.exchange import Rejected

    line = Dlt698Line()
    exchange = Dlt698Exchange(line, expect, _answer)
    exchange.begin()
    verdicts = [e for e in exchange.receive(data) if not isinstance(e, Rejected)]
    if len(verdicts) > 1:
        raise InvariantBroken(f"{len(verdicts)} verdicts in one attempt: {verdicts}")
    line.deframer.reset()
    line.hear(data)
    line.deframer.expire()
    for event in line.take_events():
        describe_apdu(event.apdu)


def repair(data: bytes) -> bytes:
    """``data`` with the HCS, FCS and end byte of every frame its length fields outline made
    right again, so a mutation inside a header or an APDU reaches the APDU decoder instead of
    being dropped as bad_fcs."""
    from meter_gateway.protocols.dlt698.crc import crc16
    from meter_gateway.protocols.dlt698.frame import frame_length

    buf = bytearray(data)
    pos = buf.find(0x68)
    while pos >= 0 and pos + 5 <= len(buf):
        total = frame_length(buf, pos)
        hcs_at = pos + 7 + (buf[pos + 4] & 0x0F)
        end = pos + total
        if total < hcs_at - pos + 5 or end > len(buf):
            pos = buf.find(0x68, pos + 1)
            continue
        hcs = crc16(buf[pos + 1 : hcs_at])
        buf[hcs_at : hcs_at + 2] = bytes((hcs & 0xFF, hcs >> 8))
        fcs = crc16(buf[pos + 1 : end - 3])
        buf[end - 3 : end] = bytes((fcs & 0xFF, fcs >> 8, 0x16))
        pos = buf.find(0x68, end)
    return bytes(buf)


def _run(context: Any, data: bytes, rng: random.Random) -> None:
    from meter_gateway.gateway.cli.decode_cmd import decode_all
    from meter_gateway.protocols.dlt698.deframer import Reassembler, ack_frame
    from meter_gateway.protocols.dlt698.describe import describe, describe_frame, looks_like_dlt698
    from meter_gateway.protocols.dlt698.errors import ProtocolError
    from meter_gateway.protocols.dlt698.frame import FUNCTION_DATA, Control, Frame, ServerAddress

    guard = Guard((ProtocolError,))
    if context is None:  # a bare APDU, as reassembled or unwrapped from SECURITY
        sender = ServerAddress(b"\x01\x00\x00\x00\x00\x00")
        frame = Frame(Control(FUNCTION_DATA, from_server=True, prm=False), sender, 0x10, data)
        _use_apdu(guard, frame, data)
        if guard.crashes:
            raise ExceptionGroup("dlt698 APDU entry points", guard.crashes)
        return
    max_frame_length, expect = context
    if rng.random() < 0.5:
        data = repair(data)
    frames = guard(_deframe, max_frame_length, data, rng) or []
    reassembler = Reassembler()
    for frame in frames:
        guard(describe_frame, frame)
        if not frame.control.fragment:
            _use_apdu(guard, frame, frame.apdu)
            continue
        part = guard(reassembler.feed, frame)
        if part is None:
            continue
        if part.ack is not None:
            guard(lambda f=frame, ack=part.ack: ack_frame(f, ack).encode())
        if part.apdu is not None:
            _use_apdu(guard, frame, part.apdu)
    guard(_exchange, expect, data)
    guard(describe, data)
    guard(looks_like_dlt698, data)
    if data:
        strict = Guard(())  # decode_all turns every bad frame into a Failed line: nothing may escape
        strict(decode_all, data.hex())
        guard.crashes += strict.crashes
    if guard.crashes:
        raise ExceptionGroup("dlt698 entry points", guard.crashes)


def target() -> Target:
    from meter_gateway.protocols.dlt698.errors import ProtocolError

    return Target(
        "dlt698",
        "streaming Deframer (random chunking, expire; buffer, frame size and byte accounting checked) + "
        "Reassembler + parse_apdu of every service + catalogue readings / record readings + describe + "
        "Dlt698Exchange / idle line + meter-gateway decode",
        _base(),
        _run,
        (ProtocolError,),
    )

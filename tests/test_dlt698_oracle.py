"""Cross-check with an independent implementation: PyPI ``dlt698`` (Apache-2.0, C++ core with
Python bindings). Test-only: product code never imports it."""

from __future__ import annotations

import pytest

oracle = pytest.importorskip("dlt698")
from dlt698 import codec  # noqa: E402
from dlt698 import protocol as op  # noqa: E402

from meter_gateway.protocols.dlt698 import requests as rq  # noqa: E402
from meter_gateway.protocols.dlt698.apdu import (  # noqa: E402
    ActionRequest,
    GetRequestNormal,
    GetRequestNormalList,
    GetResponseNormalList,
    parse_apdu,
)
from meter_gateway.protocols.dlt698.axdr import OAD, OMD, Data, DataType, plain  # noqa: E402
from meter_gateway.protocols.dlt698.frame import ServerAddress, parse_frame  # noqa: E402

METER = ServerAddress.parse("000000000001")


def _their_address() -> object:
    from dlt698.protocol import link

    return link.ServerAddress(bytes=METER.wire, logical=0, type=link.AddressType.single)


def test_our_get_normal_decodes_with_theirs() -> None:
    raw = rq.get(METER, [OAD(0x4001, 2, 0)], piid=1, client=16).encode()
    frame = codec.decode_frame(raw)
    assert frame.client == 16
    assert frame.server.bytes == METER.wire
    apdu = codec.decode_apdu(frame.payload)
    assert isinstance(apdu, op.GetRequest)
    assert not apdu.list
    assert [(a.oi, a.attribute, a.index) for a in apdu.attributes] == [(0x4001, 2, 0)]
    assert apdu.piid == 1


def test_our_get_normal_list_decodes_with_theirs() -> None:
    oads = [OAD(0x0010, 2, 0), OAD(0x2000, 2, 0), OAD(0x2001, 2, 0), OAD(0x2004, 2, 0)]
    raw = rq.get(METER, oads, piid=7).encode()
    apdu = codec.decode_apdu(codec.decode_frame(raw).payload)
    assert apdu.list
    assert [(a.oi, a.attribute, a.index) for a in apdu.attributes] == [tuple(o) for o in oads]
    assert apdu.piid == 7


def test_our_action_decodes_with_theirs() -> None:
    raw = rq.relay_trip(METER, power_off_minutes=30).encode()
    apdu = codec.decode_apdu(codec.decode_frame(raw).payload)
    assert isinstance(apdu, op.ActionRequest)
    (method,) = apdu.methods
    assert (method.method.oi, method.method.method, method.method.mode) == (0x8000, 129, 0)
    ours = parse_apdu(parse_frame(raw).apdu)
    assert isinstance(ours, ActionRequest)
    assert codec.encode_data(method.parameter) == _data_bytes(ours.data)


def _data_bytes(data: Data) -> bytes:
    from meter_gateway.protocols.dlt698.axdr import data_bytes

    return data_bytes(data)


def test_their_get_requests_decode_with_ours() -> None:
    for oads, expected in (
        ([(0x4001, 2, 0)], GetRequestNormal),
        ([(0x2000, 2, 0), (0x2001, 2, 0)], GetRequestNormalList),
    ):
        request = op.GetRequest(
            attributes=[oracle.Oad(oi=oi, attribute=a, index=i) for oi, a, i in oads], list=len(oads) > 1, piid=3
        )
        frame = op.Frame(control=0x43, server=_their_address(), client=0, payload=codec.encode_apdu(request))
        ours = parse_frame(codec.encode_frame(frame))
        apdu = parse_apdu(ours.apdu)
        assert isinstance(apdu, expected)
        assert apdu.piid.seq == 3
        got = [apdu.oad] if isinstance(apdu, GetRequestNormal) else list(apdu.oads)  # type: ignore[attr-defined]
        assert [tuple(o) for o in got] == oads
        assert apdu.encode() == ours.apdu  # and we re-encode their bytes exactly


def test_their_get_response_decodes_with_ours() -> None:
    voltages = oracle.Data.array([oracle.Data.uint16(v) for v in (2413, 2414, 2415)])
    response = op.GetResponse(
        attributes=[
            op.AttributeResult(attribute=oracle.Oad(oi=0x2000, attribute=2, index=0), result=voltages),
            op.AttributeResult(attribute=oracle.Oad(oi=0x0010, attribute=2, index=0), result=6),
        ],
        list=True,
        piid_acd=2,
    )
    frame = op.Frame(control=0xC3, server=_their_address(), client=0, payload=codec.encode_apdu(response))
    apdu = parse_apdu(parse_frame(codec.encode_frame(frame)).apdu)
    assert isinstance(apdu, GetResponseNormalList)
    assert plain(apdu.results[0].data) == [2413, 2414, 2415]
    assert apdu.results[1].dar == 6
    values = [(r.quantity, r.value, r.unit) for r in rq.readings(apdu)]
    assert values == [("voltage.l1", 241.3, "V"), ("voltage.l2", 241.4, "V"), ("voltage.l3", 241.5, "V")]


def test_their_action_decodes_with_ours() -> None:
    request = op.ActionRequest(
        methods=[
            op.ActionMethod(
                method=oracle.Omd(oi=0x4000, method=127, mode=0),
                parameter=oracle.Data.date_time_s([0x07, 0xE1, 6, 5, 10, 24, 12]),  # the 7 wire bytes
            )
        ],
        piid=1,
    )
    payload = codec.encode_apdu(request)
    apdu = parse_apdu(payload)
    assert isinstance(apdu, ActionRequest)
    assert apdu.omd == OMD(0x4000, 127, 0)
    assert apdu.data.type is DataType.DATE_TIME_S


def test_every_vector_frame_agrees_on_framing() -> None:
    import json
    from pathlib import Path

    vectors = json.loads((Path(__file__).parent / "vectors" / "dlt698.json").read_text("utf-8"))["vectors"]
    for vector in vectors:
        raw = bytes.fromhex(vector["hex"])
        theirs = codec.decode_frame(raw)
        ours = parse_frame(raw)
        assert (theirs.control, theirs.client, theirs.server.bytes, theirs.payload) == (
            ours.control.byte,
            ours.client,
            ours.address.wire,
            ours.data,
        ), vector["id"]

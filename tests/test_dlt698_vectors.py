"""Every frame and Appendix D APDU of tests/vectors/dlt698.json decodes to what the file says."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from meter_gateway.protocols.dlt698.apdu import (
    ActionRequest,
    ActionResponseNormal,
    GetResponseNormal,
    GetResponseNormalList,
    GetResponseRecord,
    LinkRequest,
    SetRequestNormal,
    SetRequestNormalList,
    SetResponseNormal,
    SetResponseNormalList,
    parse_apdu,
)
from meter_gateway.protocols.dlt698.axdr import DataType, plain
from meter_gateway.protocols.dlt698.catalogue import default_catalogue
from meter_gateway.protocols.dlt698.describe import describe, looks_like_dlt698
from meter_gateway.protocols.dlt698.frame import parse_frame

VECTORS = json.loads((Path(__file__).parent / "vectors" / "dlt698.json").read_text("utf-8"))
FRAMES = VECTORS["vectors"]
APDUS = VECTORS["apdu_vectors"]


def _norm(value: Any) -> Any:
    """The vector file's value notation -> our plain() notation."""
    if isinstance(value, list):
        return [_norm(v) for v in value]
    if isinstance(value, dict) and len(value) == 1:
        key, inner = next(iter(value.items()))
        if key in ("array", "structure"):
            return [_norm(v) for v in inner]
        if key == "octets":
            return inner.upper()
        if key in ("enum", "date_time_s"):
            return inner
    return value


def _comparable(value: Any) -> bool:
    """Vector values that carry descriptors (CSD, MS, TSA) use a notation of their own."""
    text = json.dumps(value)
    return not any(key in text for key in ('"CSD"', '"MS"', '"TSA"'))


def test_counts() -> None:
    assert len(FRAMES) == 64
    assert len(APDUS) == 10


@pytest.mark.parametrize("vector", FRAMES, ids=[v["id"] for v in FRAMES])
def test_frame(vector: dict[str, Any]) -> None:
    raw = bytes.fromhex(vector["hex"])
    assert looks_like_dlt698(raw)
    frame = parse_frame(raw)
    assert frame.encode() == raw  # our strict encoder reproduces every public frame
    assert str(frame.address) == vector["server_address"]
    assert frame.client == vector["client_address"]
    if "address_type" in vector:
        assert frame.address.type.name.lower() == vector["address_type"]
    out = describe(raw)
    if vector.get("fragment"):
        assert out["fragment"] is True
        expected = vector["raw"][0]
        assert frame.data[:2].hex() == expected["fragment_format"]
        assert out["fragment_data"] == expected["segment_hex"].upper()
        return
    assert out["service"] == vector["service"]
    if "choice" in vector:
        assert out["choice"] == vector["choice"]
    if "inner_service" in vector:
        assert out["inner_service"] == vector["inner_service"]
        assert out["inner_choice"] == vector["inner_choice"]
    assert out.get("oads", []) == vector.get("oads", [])
    json.dumps(out)  # JSON-able
    apdu = parse_apdu(frame.apdu)
    assert apdu.encode() == frame.apdu
    for expected in vector.get("raw", []):
        _check_raw(apdu, expected)


def _check_raw(apdu: Any, expected: dict[str, Any]) -> None:
    target = expected.get("target")
    match apdu:
        case GetResponseNormal(result=result):
            assert str(result.oad) == target
            assert plain(result.data) == _norm(expected["data"])
        case GetResponseNormalList(results=results):
            found = {str(r.oad): r for r in results}
            assert plain(found[target].data) == _norm(expected["data"])
        case GetResponseRecord(result=rec):
            assert str(rec.oad) == target
            assert [plain(c) for c in rec.rcsd.columns] == [c["oad"] for c in expected["rcsd"]]
            assert [[plain(v) for v in row] for row in rec.rows or ()] == expected["rows"]
        case SetRequestNormal(oad=oad, data=data):
            assert str(oad) == target
            assert plain(data) == _norm(expected["value"])
        case SetRequestNormalList(items=items):
            found = {str(o): d for o, d in items}
            assert plain(found[target]) == _norm(expected["value"])
        case SetResponseNormal(oad=oad, dar=dar):
            assert (str(oad), dar) == (target, expected["DAR"])
        case SetResponseNormalList(results=results):
            assert {str(r.oad): r.dar for r in results}[target] == expected["DAR"]
        case ActionResponseNormal(result=result):
            assert (str(result.omd), result.dar) == (target, expected["DAR"])
            if "return" in expected:
                assert result.data is not None
                assert plain(result.data) == expected["return"]
        case ActionRequest(omd=omd, data=data):
            assert str(omd) == target
            if _comparable(expected["value"]):
                assert plain(data) == _norm(expected["value"])
        case LinkRequest(kind=kind, heartbeat=heartbeat, time=time):
            assert ("login", "heartbeat", "logout")[kind] == expected["link"]
            assert heartbeat == expected["heartbeat_s"]
            assert str(time) == expected["time"]
        case _:
            pytest.fail(f"no raw check for {type(apdu).__name__}")


def test_action_descriptors_p40() -> None:
    """MS of TSAs, CSD with ROAD: the descriptor notation of the vector file, checked by hand."""
    vector = next(v for v in FRAMES if v["id"] == "P40")
    apdu = parse_apdu(parse_frame(bytes.fromhex(vector["hex"])).apdu)
    assert isinstance(apdu, ActionRequest)
    task = apdu.data.value[0].value
    csd = task[3].value[0]
    assert csd.type is DataType.CSD
    assert str(csd.value.oad) == "50040200"
    assert [str(o) for o in csd.value.oads] == ["00300200"]
    ms = task[4].value
    assert ms.choice == 3
    assert [str(t.address) for t in ms.items] == ["010000000000", "020000000000", "030000000000"]
    assert task[5].value == 6


def test_scaled_values() -> None:
    """The claims: 123456 -> 1234.56 kWh, 2413 -> 241.3 V, 4980 -> 4.98 A."""
    cat = default_catalogue()
    p3 = parse_apdu(parse_frame(bytes.fromhex(FRAMES[0]["hex"])).apdu)
    assert isinstance(p3, GetResponseNormal)
    assert p3.result.data is not None
    (reading,) = cat.readings(p3.result.oad, p3.result.data)
    assert (reading.value, reading.unit, reading.quantity) == (1234.56, "kWh", "energy.active.import.total")
    p27 = next(v for v in FRAMES if v["id"] == "P27")
    rec = parse_apdu(parse_frame(bytes.fromhex(p27["hex"])).apdu)
    assert isinstance(rec, GetResponseRecord)
    rows = cat.record_readings(rec.result)
    assert [(r.value, r.unit) for r in rows[0]] == [(1230.0, "kWh"), (240.5, "V"), (4.98, "A")]
    assert [r.quantity for r in rows[1]] == ["energy.active.import.total", "voltage.l1", "current.l1"]


@pytest.mark.parametrize("vector", APDUS, ids=[v["standard_ref"][:30] + v["apdu_hex"][:6] for v in APDUS])
def test_appendix_d(vector: dict[str, Any]) -> None:
    raw = bytes.fromhex(vector["apdu_hex"])
    apdu = parse_apdu(raw)
    decoded = vector["decoded"]
    assert decoded["service"] == apdu.SERVICE
    assert decoded["tag"] == apdu.TAG
    if "choice" in decoded:
        assert decoded["choice"] == apdu.NAME
    piid = decoded["piid"]
    if isinstance(piid, dict):
        assert (apdu.piid.seq, int(apdu.piid.high_priority), int(apdu.piid.acd)) == (  # type: ignore[attr-defined]
            piid["seq"],
            piid["priority"],
            piid["acd"],
        )
    assert apdu.encode() == raw
    assert getattr(apdu, "timetag", None) is None
    assert not apdu.warnings

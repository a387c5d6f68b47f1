"""Describe a DL/T 698.45 frame as a JSON-friendly dict: what ``meter-gateway decode`` prints.

Field names follow ``shared/vectors/dlt698.json``: ``service`` and ``choice`` (the outer APDU),
``inner_service`` / ``inner_choice`` for SECURITY-wrapped plaintext, ``server_address`` (as on
the nameplate), ``address_type``, ``client_address`` (an integer), ``oads`` (8 hex digits each),
``fragment`` for a link-layer fragment, ``values`` (raw A-XDR values with scaled values and units
from the catalogue), ``dar`` per object, and ``warnings`` for anything accepted but irregular.
"""

from __future__ import annotations

from typing import Any

from meter_gateway.protocols.dlt698.apdu import (
    ActionRequest,
    ActionResponseNormal,
    Apdu,
    ConnectRequest,
    ConnectResponse,
    GetRequestRecord,
    GetResponseNormal,
    GetResponseNormalList,
    GetResponseRecord,
    LinkRequest,
    LinkResponse,
    ReportNotificationList,
    SecurityRequest,
    SecurityResponse,
    SetRequestNormal,
    SetRequestNormalList,
    SetResponseNormal,
    SetResponseNormalList,
    oads_of,
    parse_apdu,
)
from meter_gateway.protocols.dlt698.axdr import plain
from meter_gateway.protocols.dlt698.catalogue import Catalogue, default_catalogue
from meter_gateway.protocols.dlt698.dar import dar_name
from meter_gateway.protocols.dlt698.errors import ProtocolError
from meter_gateway.protocols.dlt698.frame import AddressType, Frame, looks_like_frame, parse_frame

__all__ = ["describe", "describe_apdu", "describe_frame", "looks_like_dlt698"]


def looks_like_dlt698(frame_bytes: bytes) -> bool:
    """Whether ``frame_bytes`` is structurally a DL/T 698.45 frame (valid HCS), not a DL/T 645 one.

    Both start with 68; a 645 frame has a second 68 at offset 7 and no header CRC. A 698 frame
    whose byte 7 happens to be 68 is still recognised by its HCS.
    """
    return looks_like_frame(bytes(frame_bytes))


def describe(frame_bytes: bytes, *, catalogue: Catalogue | None = None) -> dict[str, Any]:
    """Decode a whole frame (FE preamble allowed) into a flat dict; raises ProtocolError if invalid."""
    frame = parse_frame(bytes(frame_bytes))
    out = describe_frame(frame, catalogue=catalogue)
    out["hex"] = bytes(frame_bytes).hex(" ").upper()
    return out


def describe_frame(frame: Frame, *, catalogue: Catalogue | None = None) -> dict[str, Any]:
    control = frame.control
    out: dict[str, Any] = {
        "protocol": "DL/T 698.45",
        "server_address": str(frame.address),
        "address_type": frame.address.type.name.lower(),
        "client_address": frame.client,
        "control": str(control),
        "direction": "server-to-client" if control.from_server else "client-to-server",
        "role": control.role,
        "scrambled": control.scrambled,
    }
    if frame.address.logical:
        out["logical_address"] = frame.address.logical
    if frame.address.type is AddressType.BROADCAST:
        out["broadcast"] = True
    fragment = frame.fragment
    if fragment is not None:
        out["fragment"] = True
        out["fragment_seq"] = fragment.seq
        out["fragment_type"] = fragment.type.name.lower()
        out["fragment_data"] = frame.apdu.hex().upper()
        if fragment.reserved:
            out["warnings"] = [f"fragment format reserved bits 12-13 are {fragment.reserved}"]
        return out
    try:
        apdu = parse_apdu(frame.apdu)
    except ProtocolError as exc:
        out["error"] = str(exc)
        out["apdu"] = frame.apdu.hex().upper()
        return out
    out.update(describe_apdu(apdu, catalogue=catalogue))
    return out


def describe_apdu(apdu: Apdu, *, catalogue: Catalogue | None = None) -> dict[str, Any]:
    cat = catalogue or default_catalogue()
    out: dict[str, Any] = {"service": apdu.SERVICE}
    if apdu.CHOICE is not None:
        out["choice"] = apdu.NAME
    piid = getattr(apdu, "piid", None)
    if piid is not None:
        out["piid"] = {"seq": piid.seq, "priority": int(piid.high_priority), "acd": int(piid.acd)}
    inner = apdu.inner if isinstance(apdu, SecurityRequest | SecurityResponse) else None
    if isinstance(apdu, SecurityRequest | SecurityResponse):
        out["encrypted"] = apdu.encrypted
        if isinstance(apdu, SecurityRequest):
            out["verification"] = ("SID_MAC", "RN", "RN_MAC", "SID")[apdu.verification.kind]
        elif apdu.dar is not None:
            out["dar"] = apdu.dar
            out["dar_name"] = dar_name(apdu.dar)
        if inner is not None:
            out["inner_service"] = inner.SERVICE
            if inner.CHOICE is not None:
                out["inner_choice"] = inner.NAME
    body = inner if inner is not None else apdu
    oads = oads_of(body)
    if oads:
        out["oads"] = [str(o) for o in oads]
    out.update(_details(body, cat))
    warnings = list(apdu.warnings)
    if warnings:
        out["warnings"] = warnings
    return out


def _value(cat: Catalogue, oad: Any, data: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"oad": str(oad), "raw": plain(data), "type": data.type.name.lower()}
    item = cat.get(oad)
    if item is not None:
        readings = cat.readings(oad, data)
        entry["name"] = item.element(oad.index)[0]
        entry["readings"] = [
            {
                "oad": str(r.oad),
                "name": r.name,
                **({"quantity": r.quantity} if r.quantity else {}),
                "raw": r.raw,
                "value": r.value,
                **({"unit": r.unit} if r.unit else {}),
                **({"fields": dict(r.fields)} if r.fields else {}),
            }
            for r in readings
        ]
    return entry


def _details(apdu: Apdu, cat: Catalogue) -> dict[str, Any]:
    out: dict[str, Any] = {}
    match apdu:
        case GetResponseNormal(result=result):
            results = [result]
        case GetResponseNormalList(results=results) | ReportNotificationList(results=results):
            pass
        case _:
            results = []
    if results:
        values = []
        for r in results:
            if r.data is not None:
                values.append(_value(cat, r.oad, r.data))
            else:
                values.append({"oad": str(r.oad), "dar": r.dar, "dar_name": dar_name(r.dar or 0)})
        out["values"] = values
    match apdu:
        case GetResponseRecord(result=rec):
            out["rcsd"] = [plain(c) for c in rec.rcsd.columns]
            if rec.rows is not None:
                out["rows"] = [[plain(v) for v in row] for row in rec.rows]
            else:
                out["dar"] = rec.dar
        case GetRequestRecord(record=record):
            out["rsd"] = {"selector": record.rsd.selector, "value": plain(record.rsd.value)}
            out["rcsd"] = [plain(c) for c in record.rcsd.columns]
        case SetRequestNormal(oad=oad, data=data):
            out["values"] = [{"oad": str(oad), "raw": plain(data), "type": data.type.name.lower()}]
        case SetRequestNormalList(items=items):
            out["values"] = [{"oad": str(o), "raw": plain(d), "type": d.type.name.lower()} for o, d in items]
        case SetResponseNormal(oad=oad, dar=dar):
            out["results"] = [{"oad": str(oad), "dar": dar, "dar_name": dar_name(dar)}]
        case SetResponseNormalList(results=set_results):
            out["results"] = [{"oad": str(r.oad), "dar": r.dar, "dar_name": dar_name(r.dar)} for r in set_results]
        case ActionRequest(omd=omd, data=data):
            out["values"] = [{"omd": str(omd), "raw": plain(data), "type": data.type.name.lower()}]
        case ActionResponseNormal(result=ar):
            entry: dict[str, Any] = {"omd": str(ar.omd), "dar": ar.dar, "dar_name": dar_name(ar.dar)}
            if ar.data is not None:
                entry["return"] = plain(ar.data)
            out["results"] = [entry]
        case LinkRequest(kind=kind, heartbeat=heartbeat, time=time):
            out["link"] = ("login", "heartbeat", "logout")[kind] if kind < 3 else kind
            out["heartbeat_s"] = heartbeat
            out["time"] = str(time)
        case LinkResponse(
            result=link_result, clock_trusted=trusted, request_time=t1, receive_time=t2, response_time=t3
        ):
            out.update(
                result=link_result,
                clock_trusted=trusted,
                request_time=str(t1),
                receive_time=str(t2),
                response_time=str(t3),
            )
        case ConnectRequest():
            out.update(
                protocol_version=apdu.version,
                apdu_max=apdu.apdu_max,
                timeout_s=apdu.timeout,
                mechanism=("NullSecurity", "PasswordSecurity", "SymmetrySecurity", "SignatureSecurity")[
                    apdu.mechanism.kind
                ],
            )
        case ConnectResponse():
            out.update(
                protocol_version=apdu.version,
                apdu_max=apdu.apdu_max,
                timeout_s=apdu.timeout,
                connect_result=apdu.result,
                vendor=apdu.factory.vendor,
            )
        case _:
            pass
    return out

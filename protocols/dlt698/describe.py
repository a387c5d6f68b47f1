"""Describe a DL/T 698.45 frame as a JSON-friendly dict: what ``meter-gateway decode`` prints.

Field names follow ``shared/vectors/dlt698.json``: ``service`` and ``choice`` (the outer APDU),
``inner_service`` / ``inner_choice`` for SECURITY-wrapped plaintext, ``server_address`` (as on
the nameplate), ``address_type``, ``client_address`` (an integer), ``oads`` (8 hex digits each),
``fragment`` for a link-layer fragment, ``values`` (raw A-XDR values with scaled values and units
from the catalogue), ``dar`` per object, and ``warnings`` for anything accepted but irregular.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Final

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
from meter_gateway.protocols.dlt698.axdr import Data, plain
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


def _result_value(cat: Catalogue, r: Any) -> dict[str, Any]:
    """One GetResult: its value, or the DAR the meter gave instead."""
    if r.data is not None:
        return _value(cat, r.oad, r.data)
    return {"oad": str(r.oad), "dar": r.dar, "dar_name": dar_name(r.dar or 0)}


def _result_values(results: Iterable[Any], cat: Catalogue) -> dict[str, Any]:
    values = [_result_value(cat, r) for r in results]
    return {"values": values} if values else {}


def _written(key: str, target: Any, data: Data) -> dict[str, Any]:
    """A value a request writes (set) or passes (action), as sent."""
    return {key: str(target), "raw": plain(data), "type": data.type.name.lower()}


def _dar_result(key: str, target: Any, dar: int) -> dict[str, Any]:
    return {key: str(target), "dar": dar, "dar_name": dar_name(dar)}


def _record_response(apdu: GetResponseRecord, cat: Catalogue) -> dict[str, Any]:
    rec = apdu.result
    out: dict[str, Any] = {"rcsd": [plain(c) for c in rec.rcsd.columns]}
    if rec.rows is not None:
        out["rows"] = [[plain(v) for v in row] for row in rec.rows]
    else:
        out["dar"] = rec.dar
    return out


def _record_request(apdu: GetRequestRecord, cat: Catalogue) -> dict[str, Any]:
    record = apdu.record
    return {
        "rsd": {"selector": record.rsd.selector, "value": plain(record.rsd.value)},
        "rcsd": [plain(c) for c in record.rcsd.columns],
    }


def _action_response(apdu: ActionResponseNormal, cat: Catalogue) -> dict[str, Any]:
    ar = apdu.result
    entry = _dar_result("omd", ar.omd, ar.dar)
    if ar.data is not None:
        entry["return"] = plain(ar.data)
    return {"results": [entry]}


def _link_request(apdu: LinkRequest, cat: Catalogue) -> dict[str, Any]:
    kind = apdu.kind
    return {
        "link": ("login", "heartbeat", "logout")[kind] if kind < 3 else kind,
        "heartbeat_s": apdu.heartbeat,
        "time": str(apdu.time),
    }


def _link_response(apdu: LinkResponse, cat: Catalogue) -> dict[str, Any]:
    return {
        "result": apdu.result,
        "clock_trusted": apdu.clock_trusted,
        "request_time": str(apdu.request_time),
        "receive_time": str(apdu.receive_time),
        "response_time": str(apdu.response_time),
    }


def _connect_request(apdu: ConnectRequest, cat: Catalogue) -> dict[str, Any]:
    return {
        "protocol_version": apdu.version,
        "apdu_max": apdu.apdu_max,
        "timeout_s": apdu.timeout,
        "mechanism": ("NullSecurity", "PasswordSecurity", "SymmetrySecurity", "SignatureSecurity")[apdu.mechanism.kind],
    }


def _connect_response(apdu: ConnectResponse, cat: Catalogue) -> dict[str, Any]:
    return {
        "protocol_version": apdu.version,
        "apdu_max": apdu.apdu_max,
        "timeout_s": apdu.timeout,
        "connect_result": apdu.result,
        "vendor": apdu.factory.vendor,
    }


# What each kind of APDU adds to its description beyond service, PIID and OADs; kinds absent add nothing.
_DETAILS: Final[dict[type[Apdu], Callable[[Any, Catalogue], dict[str, Any]]]] = {
    GetResponseNormal: lambda a, cat: _result_values([a.result], cat),
    GetResponseNormalList: lambda a, cat: _result_values(a.results, cat),
    ReportNotificationList: lambda a, cat: _result_values(a.results, cat),
    GetResponseRecord: _record_response,
    GetRequestRecord: _record_request,
    SetRequestNormal: lambda a, cat: {"values": [_written("oad", a.oad, a.data)]},
    SetRequestNormalList: lambda a, cat: {"values": [_written("oad", o, d) for o, d in a.items]},
    SetResponseNormal: lambda a, cat: {"results": [_dar_result("oad", a.oad, a.dar)]},
    SetResponseNormalList: lambda a, cat: {"results": [_dar_result("oad", r.oad, r.dar) for r in a.results]},
    ActionRequest: lambda a, cat: {"values": [_written("omd", a.omd, a.data)]},
    ActionResponseNormal: _action_response,
    LinkRequest: _link_request,
    LinkResponse: _link_response,
    ConnectRequest: _connect_request,
    ConnectResponse: _connect_response,
}


def _details(apdu: Apdu, cat: Catalogue) -> dict[str, Any]:
    details = _DETAILS.get(type(apdu))
    return details(apdu, cat) if details is not None else {}

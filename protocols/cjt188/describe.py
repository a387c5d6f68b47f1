"""Describe a CJ/T 188 frame as a JSON-friendly dict (``meter-gateway decode``), and tell a CJ/T 188
frame from DL/T 645 and DL/T 698.45 by structure alone.

Keys: ``protocol``, ``meter_type`` (two hex digits) with ``meter_type_name``/``meter_class``,
``address`` (printed order) and ``manufacturer``, ``control`` (two hex digits), ``function``,
``direction``, ``abnormal``, ``length``, ``di`` (printed order, as the standard writes it),
``di_order``, ``name``, ``ser``, ``values`` (one dict per value: ``quantity``, ``value``, ``unit``
and extras such as ``raw_value``/``raw_unit``/``unit_code``), ``status`` (ST: ``st`` hex word,
``valve``, ``battery_low``), ``meter_address`` (read-address replies), ``warnings`` and ``hex``.
Keys written with A014 are never printed.
"""

from __future__ import annotations

from typing import Any, Final

from meter_gateway.protocols.cjt188.catalogue import Catalogue, Decoded, default_catalogue
from meter_gateway.protocols.cjt188.errors import ProtocolError
from meter_gateway.protocols.cjt188.frame import END, HEADER_LENGTH, OVERHEAD, PREAMBLE, START, Frame, parse_frame
from meter_gateway.protocols.cjt188.functions import function_name
from meter_gateway.protocols.cjt188.identifiers import DiOrder, di_text
from meter_gateway.protocols.cjt188.messages import (
    ErrorReply,
    OtherMessage,
    ReadReply,
    ReadRequest,
    WriteReply,
    WriteRequest,
    parse_message,
)
from meter_gateway.protocols.cjt188.status import Status

_SECRET_FIELDS: Final = frozenset({"key"})


def describe_frame(
    frame: Frame | bytes | bytearray,
    di_order: DiOrder = "standard",
    *,
    catalogue: Catalogue | None = None,
) -> dict[str, Any]:
    """Decode a frame (or its bytes, FE preamble allowed) fully into a JSON-friendly dict.

    Bytes that are not one valid frame raise :class:`RemoteProtocolError` (e.g. ``checksum
    expected XX found YY``); a frame whose data does not fit is described with ``warnings``.
    """
    catalogue = catalogue or default_catalogue()
    raw: bytes | None = None
    if not isinstance(frame, Frame):
        raw = bytes(frame)
        frame = parse_frame(raw)
    control = frame.control
    out: dict[str, Any] = {
        "protocol": "CJ/T 188",
        "meter_type": f"{frame.meter_type:02X}",
        "meter_type_name": catalogue.meter_type_name(frame.meter_type),
        "meter_class": catalogue.meter_class(frame.meter_type),
        "address": str(frame.address),
        "manufacturer": frame.address.manufacturer,
        "control": str(control),
        "function": function_name(control.function),
        "direction": "meter-to-master" if control.from_meter else "master-to-meter",
        "abnormal": control.abnormal,
        "length": len(frame.data),
    }
    warnings: list[str] = []
    if not catalogue.known_meter_type(frame.meter_type):
        warnings.append(f"meter type {frame.meter_type:02X} is outside the ranges of Table 3")
    message = parse_message(frame, di_order)
    di = None if isinstance(message, OtherMessage) else message.di  # an error reply may carry none
    if di is not None:
        out.update(_identifier(di, di_order, catalogue, warnings))
    match message:
        case ReadRequest(ser=ser):
            out["ser"] = ser
        case ReadReply(ser=ser):
            out["ser"] = ser
            if message.di == 0x810A:
                out["meter_address"] = str(message.address)
            out.update(_values(message.values(catalogue), warnings))
        case WriteRequest(ser=ser):
            out["ser"] = ser
            out.update(_values(message.values(catalogue), warnings))
        case WriteReply(ser=ser):
            out["ser"] = ser
            out.update(_write_reply(message, catalogue.meter_class(frame.meter_type), catalogue, warnings))
            out["result"] = "accepted"
        case ErrorReply(ser=ser, status=status):
            out["ser"] = ser
            out["result"] = "refused"
            out["status"] = _status(status)
        case OtherMessage(data=data):
            out["data"] = data.hex().upper()
        case _:
            pass
    if warnings:
        out["warnings"] = list(dict.fromkeys(warnings))
    if raw is not None:
        out["hex"] = raw.hex(" ").upper()
    return out


def _identifier(di: int, di_order: DiOrder, catalogue: Catalogue, warnings: list[str]) -> dict[str, Any]:
    """The DI of a message as printed, and its name when the catalogue knows it."""
    out: dict[str, Any] = {"di": di_text(di), "di_order": di_order}
    item = catalogue.get(di)
    if item is not None:
        out["name"] = item.name
    else:
        warnings.append(f"data identifier {di_text(di)} is not in the catalogue")
        warnings.append(f"is di_order {di_order!r} right for this meter?")
    return out


def _write_reply(message: WriteReply, meter_class: str, catalogue: Catalogue, warnings: list[str]) -> dict[str, Any]:
    """What a write reply carries beyond its SER: its reply layout's values, or a bare ST word."""
    item = catalogue.get(message.di)
    layout = item.reply_layout(meter_class) if item is not None else ()
    if not layout and len(message.data) == 2:
        return {"status": _status(Status.from_bytes(message.data))}  # meters that add ST to any write
    if message.data or layout:
        return _values(message.values(catalogue), warnings)
    return {}


def _status(status: Status) -> dict[str, Any]:
    return {"st": str(status), **status.bits()}


def _values(decoded: Decoded, warnings: list[str]) -> dict[str, Any]:
    warnings += decoded.warnings
    values: list[dict[str, Any]] = []
    out: dict[str, Any] = {}
    for value in decoded.values:
        if value.quantity == "status":
            out["status"] = {"st": value.fields.get("st"), **{k: v for k, v in value.fields.items() if k != "st"}}
            continue
        if value.quantity in ("valve.state", "battery.low"):
            continue  # shown inside "status"
        shown = "********" if value.quantity in _SECRET_FIELDS else value.value
        entry: dict[str, Any] = {"quantity": value.quantity, "value": shown}
        if value.unit:
            entry["unit"] = value.unit
        entry.update(value.fields)
        values.append(entry)
    if values:
        out["values"] = values
    return out


def looks_like_cjt188(frame: bytes | bytearray | memoryview) -> bool:
    """Whether ``frame`` is structurally one CJ/T 188 frame, and not DL/T 645 or DL/T 698.45.

    CJ/T 188: ``68 T A0..A6 C L ... CS 16``, 13 + L bytes (L at offset 10), sum checksum, T in a
    Table 3 range (10H-49H) or AAH. DL/T 645 has a second 68 at offset 7 and L at offset 9 (12 + L
    bytes); DL/T 698.45 has a 2-byte length at offsets 1-2 counting everything but 68 and 16. A
    frame that is valid both as CJ/T 188 and as DL/T 645 (possible: a CJ/T 188 address byte A5
    can be 68H) is given to DL/T 645, whose frames are far more common on a shared bus.
    """
    raw = bytes(frame).lstrip(bytes((PREAMBLE,)))
    if len(raw) < OVERHEAD or raw[0] != START:
        return False
    length = raw[10]
    total = OVERHEAD + length
    if len(raw) != total or raw[-1] != END or sum(raw[: HEADER_LENGTH + length]) & 0xFF != raw[-2]:
        return False
    if not default_catalogue().known_meter_type(raw[1]):
        return False
    if _is_dlt645(raw):
        return False
    return not _is_dlt698(raw)


def _is_dlt645(raw: bytes) -> bool:
    if len(raw) < 12 or raw[7] != START:
        return False
    length = raw[9]
    return len(raw) == 12 + length and raw[-1] == END and sum(raw[: 10 + length]) & 0xFF == raw[-2]


def _is_dlt698(raw: bytes) -> bool:
    # DL/T 698.45 clause 7.1: 68 L(2 bytes, bits 0-13 the length excluding 68 and 16) C AF ...;
    # its check sequences are CRCs, so the length field is what gives it away.
    return ((raw[1] | raw[2] << 8) & 0x3FFF) == len(raw) - 2


def safe_describe(raw: bytes, di_order: DiOrder = "standard") -> dict[str, Any]:
    """:func:`describe_frame`, with a bad frame described as ``{"error": ...}`` instead of raised."""
    try:
        return describe_frame(raw, di_order)
    except ProtocolError as exc:
        return {"protocol": "CJ/T 188", "error": str(exc), "hex": bytes(raw).hex(" ").upper()}

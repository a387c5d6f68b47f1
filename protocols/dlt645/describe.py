"""Describe a frame as a JSON-friendly dict: what field engineers see from `meter-gateway decode`.

Field names and value conventions follow ``shared/vectors/dlt645.json``: ``edition``, ``address``
(printed order), ``control`` (two hex digits), ``di`` (printed order), ``value`` and ``unit``,
``date``/``weekday``/``time``, ``error_code``, ``status_word`` and ``relay``, ``password_level``,
``operator``, ``command``, ``n1``, ``valid_until`` and ``broadcast_time`` (ISO 8601),
``meter_address``. Passwords are never printed, only their level. What is decoded but not as the
standard has it (a remote-control command with no validity time, N3..N8 all zero, as head-ends
and concentrator firmware send) is described all the same and named in ``warnings``.
"""

from __future__ import annotations

from typing import Any

from meter_gateway.protocols.dlt645.catalogue import Catalogue, default_catalogue
from meter_gateway.protocols.dlt645.edition import Edition
from meter_gateway.protocols.dlt645.error_words import describe_flags
from meter_gateway.protocols.dlt645.formats import json_value
from meter_gateway.protocols.dlt645.frame import Frame
from meter_gateway.protocols.dlt645.functions import function_name
from meter_gateway.protocols.dlt645.messages import (
    Ack,
    BroadcastTime,
    ChangeBaudReply,
    ChangeBaudRequest,
    ChangePasswordReply,
    ChangePasswordRequest,
    ClearEventsRequest,
    ClearMaxDemandRequest,
    ClearMeterRequest,
    ErrorReply,
    FreezeRequest,
    Message,
    ReadAddressReply,
    ReadFollowUpRequest,
    ReadReply,
    ReadRequest,
    RemoteControlReply,
    RemoteControlRequest,
    WriteAddressRequest,
    WriteRequest,
    parse_message,
)


def describe_frame(
    frame: Frame, edition: Edition, *, catalogue: Catalogue | None = None, raw: bytes | None = None
) -> dict[str, Any]:
    """Decode ``frame`` fully (message and values) into a flat, JSON-friendly dict."""
    control = frame.control
    out: dict[str, Any] = {
        "edition": edition.value,
        "address": str(frame.address),
        "control": str(control),
        "function": function_name(edition, control.function),
        "direction": "meter-to-master" if control.from_meter else "master-to-meter",
    }
    if control.from_meter:
        out["abnormal"] = control.abnormal
        out["follow_up"] = control.follow_up
    if raw is not None:
        out["hex"] = raw.hex(" ").upper()
    out.update(describe_message(parse_message(frame, edition), edition, catalogue or default_catalogue()))
    return out


def describe_message(message: Message, edition: Edition, catalogue: Catalogue) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(message, ReadRequest | ReadFollowUpRequest | ReadReply | WriteRequest):
        out["di"] = edition.format_di(message.di)
        item = catalogue.get(edition, message.di)
        if item is not None:
            out["name"] = item.name
            if item.quantity:
                out["quantity"] = item.quantity
    out.update(_describe_request(message, edition))  # each message matches one of the two
    out.update(_describe_reply(message, edition, catalogue))
    return out


def _describe_request(message: Message, edition: Edition) -> dict[str, Any]:
    out: dict[str, Any] = {}
    match message:
        case ReadRequest(count=count, since=since):
            if count is not None:
                out["block_count"] = count
            if since is not None:
                out["since"] = since.isoformat()
        case ReadFollowUpRequest(seq=seq):
            out["seq"] = seq
        case WriteRequest(password=password, operator=operator, value=value):
            out["password_level"] = password.level
            if edition is Edition.DLT645_2007:
                out["operator"] = operator
            out["data"] = value.hex().upper()
        case WriteAddressRequest(new_address=new_address):
            out["new_address"] = str(new_address)
        case BroadcastTime(when=when):
            out["broadcast_time"] = when.isoformat()
        case FreezeRequest(minute=minute, hour=hour, day=day, month=month):
            out["freeze_at"] = {"minute": minute, "hour": hour, "day": day, "month": month}
        case ChangeBaudRequest(baud=baud):
            out["baud_rate"] = baud
        case ChangePasswordRequest(old=old, new=new):
            out["password_level"] = old.level
            out["new_password_level"] = new.level
        case RemoteControlRequest():
            out.update(_describe_remote_control(message))
        case ClearEventsRequest(password=password, operator=operator, event_di=event_di):
            out.update(password_level=password.level, operator=operator, event_di=f"{event_di:08X}")
        case (
            ClearMaxDemandRequest(password=password, operator=operator)
            | ClearMeterRequest(password=password, operator=operator)
        ):
            out.update(password_level=password.level, operator=operator)
        case _:
            pass
    return out


def _describe_reply(message: Message, edition: Edition, catalogue: Catalogue) -> dict[str, Any]:
    out: dict[str, Any] = {}
    match message:
        case ReadReply():
            out.update(_describe_values(message, edition, catalogue))
        case ReadAddressReply(meter_address=meter_address):
            out["meter_address"] = str(meter_address)
        case ChangeBaudReply(baud=baud):
            out["baud_rate"] = baud
        case ChangePasswordReply(new=new):
            out["new_password_level"] = new.level
        case RemoteControlReply(status=status):
            out["result"] = "accepted"
            if status is not None:
                out["execution_status"] = status
        case ErrorReply(code=code, flags=flags, word=word):
            out["error_code"] = code
            out["error"] = describe_flags(flags)
            out["error_flags"] = list(flags)
            if word:
                out["error_word"] = f"{code:04X}"
        case Ack(acked=acked):
            out["result"] = f"{function_name(edition, acked)} accepted"
        case _:
            pass
    return out


def _describe_remote_control(request: RemoteControlRequest) -> dict[str, Any]:
    until = request.valid_until
    out: dict[str, Any] = {
        "password_level": request.password.level,
        "operator": request.operator,
        "command": request.command.label,
        "n1": f"{int(request.command):02X}",
        "n2": request.n2,
        "valid_until": until.isoformat() if until is not None else None,
    }
    if until is None:
        out["warnings"] = [
            "validity time N3..N8 is all zero (no expiry): DL/T 645-2007 6.13 asks for one, and a meter "
            "that checks it refuses the command as expired"
        ]
    return out


def _describe_values(reply: ReadReply, edition: Edition, catalogue: Catalogue) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if reply.seq is not None:
        out["seq"] = reply.seq
    values = catalogue.decode(edition, reply.di, reply.value)
    if len(values) == 1:
        value = values[0]
        out["value"] = json_value(value.value)
        if value.unit:
            out["unit"] = value.unit
        if value.timestamp is not None:
            out["meter_time"] = value.timestamp.isoformat()
        out.update(value.fields)
    else:
        out["values"] = [
            {
                "di": edition.format_di(v.di),
                "name": v.name,
                **({"quantity": v.quantity} if v.quantity else {}),
                "value": json_value(v.value),
                **({"unit": v.unit} if v.unit else {}),
                **({"meter_time": v.timestamp.isoformat()} if v.timestamp is not None else {}),
                **v.fields,
            }
            for v in values
        ]
    return out

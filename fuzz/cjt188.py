"""The ``cjt188`` fuzz target: CJ/T 188 bytes from a water, gas or heat meter, as far into the gateway as they go.

Base inputs are byte streams of near-valid frames built with our own encoders: read replies of
every DI of the catalogue with data laid out for the meter's class or another one (BCD values,
unit codes known and unknown, times, ST words), write acknowledgements, abnormal replies (with and
without DI), requests heard back and vendor frames, in either DI byte order, between noise and FE
wake-up bytes; and the frames of ``tests/vectors/cjt188.json``. A quarter of the base inputs are
bare data fields (after ``DI SER``) for the data decoders; in half the executions of a stream,
:func:`repair` makes the checksums of the mutated frames right again so the mutations get past them.

One execution: the streaming Deframer fed in random chunks, checking that it never holds more than
its ``buffer_limit``, that no frame's data exceeds its limit and that every input byte is
accounted for; every frame through parse_message and the meter-type data decoders (what the
driver's read does with them), describe_frame; the bytes through an exchange awaiting a reply;
and the whole input through parse_frame, describe, looks_like_cjt188 and ``meter-gateway decode``.
"""

from __future__ import annotations

import datetime
import functools
import json
import random
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from fuzz.targets import Guard, InvariantBroken, Target
from meter_gateway.protocols.cjt188.frame import Address

VECTORS = Path(__file__).resolve().parent.parent / "tests" / "vectors" / "cjt188.json"
METER_TYPES = (0x10, 0x11, 0x13, 0x19, 0x20, 0x21, 0x29, 0x30, 0x40, 0x49, 0xAA)
u8 = st.integers(0, 0xFF)
ADDRESS = Address(bytes((0x44, 0x33, 0x22, 0x11, 0x00, 0x33, 0x78)))


@functools.cache
def _vectors() -> tuple[bytes, ...]:
    return tuple(bytes.fromhex(v["hex"]) for v in json.loads(VECTORS.read_text())["vectors"])


@functools.cache
def _dis() -> tuple[int, ...]:
    from meter_gateway.protocols.cjt188.catalogue import default_catalogue

    return tuple(item.di for item in default_catalogue().items())


@st.composite
def _field(draw: st.DrawFn, spec: Any) -> bytes:
    """One field's bytes: valid for its format mostly, sometimes not (non-BCD, bad time, odd valve)."""
    from meter_gateway.protocols.cjt188.catalogue import default_catalogue
    from meter_gateway.protocols.cjt188.formats import bcd_bytes, encode_time, format_length
    from meter_gateway.protocols.cjt188.status import Status

    fmt = spec.format
    length = format_length(fmt)
    if draw(st.integers(0, 15)) == 0:
        raw = draw(st.binary(min_size=length, max_size=length))
    elif fmt == "ST":
        raw = Status(draw(st.sampled_from((0, 1, 3, 4, 0xFFFF)) | st.integers(0, 0xFFFF))).to_bytes()
    elif fmt in ("NN", "HEX8"):
        raw = draw(st.binary(min_size=length, max_size=length))
    elif fmt == "VALVE":
        raw = bytes((draw(st.sampled_from((0x55, 0x99))),))
    elif fmt == "YYYYMMDDhhmmss":
        when = draw(st.datetimes(datetime.datetime(1900, 1, 1), datetime.datetime(2099, 12, 31)))
        raw = draw(st.sampled_from((encode_time(when.replace(microsecond=0)), bytes(7))))
    else:  # BCD, ADDRESS too
        digits = 2 * length
        raw = bcd_bytes(draw(st.sampled_from((0, 10**digits - 1)) | st.integers(0, 10**digits - 1)), length)
    if spec.coded:
        raw += bytes((draw(st.sampled_from(sorted(default_catalogue().units)) | u8),))
    return raw


@st.composite
def _layout_data(draw: st.DrawFn, layout: tuple[Any, ...]) -> bytes:
    data = b"".join(draw(_field(spec)) for spec in layout)
    cut = draw(st.integers(0, 9))
    if cut == 0:
        data = data[: draw(st.integers(0, len(data)))]  # a short reply: partial, or refused
    elif cut == 1:
        data += draw(st.binary(min_size=1, max_size=4))  # extra bytes
    return data


@st.composite
def _message(draw: st.DrawFn, meter_type: int, address: Any) -> Any:
    from meter_gateway.protocols.cjt188 import messages as m
    from meter_gateway.protocols.cjt188.catalogue import CLASSES, default_catalogue
    from meter_gateway.protocols.cjt188.frame import Control
    from meter_gateway.protocols.cjt188.functions import Function
    from meter_gateway.protocols.cjt188.status import Status

    catalogue = default_catalogue()
    di = draw(st.sampled_from(_dis()) if draw(st.integers(0, 7)) else st.integers(0, 0xFFFF))
    item = catalogue.get(di)
    ser = draw(u8)
    kind = draw(st.sampled_from(("read_reply",) * 5 + ("write_reply", "error", "read", "write", "other")))
    if kind == "read_reply":
        meter_class = catalogue.meter_class(meter_type)
        if draw(st.integers(0, 4)) == 0:
            meter_class = draw(st.sampled_from(CLASSES))  # a layout of another class: tolerated with a warning
        layout = item.reply_layout(meter_class) if item is not None else ()
        data = draw(_layout_data(layout)) if layout else draw(st.binary(max_size=12))
        return m.ReadReply(meter_type, address, di, ser, data)
    if kind == "write_reply":
        choice = draw(st.integers(0, 2))
        if choice == 0:
            return m.WriteReply.ack(meter_type, address, di, ser=ser, status=Status(draw(st.integers(0, 0xFFFF))))
        layout = item.reply_layout(catalogue.meter_class(meter_type)) if item is not None else ()
        data = draw(_layout_data(layout)) if choice == 1 and layout else b""
        return m.WriteReply(meter_type, address, di, ser, data)
    if kind == "error":
        code = draw(st.sampled_from(list(Function)))
        return m.ErrorReply(meter_type, address, code, ser, Status(draw(st.integers(0, 0xFFFF))),
                            draw(st.none() | st.just(di)))  # fmt: skip
    if kind == "read":
        return m.ReadRequest(meter_type, address, di, ser)
    if kind == "write":
        data = draw(_layout_data(item.request)) if item is not None and item.request else draw(st.binary(max_size=8))
        return m.WriteRequest(meter_type, address, di, ser, data[:47])
    control = Control(draw(st.integers(0x20, 0x3F) | st.integers(0, 0x3F)), draw(st.booleans()), draw(st.booleans()))
    return m.OtherMessage(meter_type, address, control, draw(st.binary(max_size=20)))


@st.composite
def _stream(draw: st.DrawFn) -> tuple[Any, bytes]:
    from meter_gateway.protocols.cjt188 import messages as m
    from meter_gateway.protocols.cjt188.exchange import Expect
    from meter_gateway.protocols.cjt188.frame import Address
    from meter_gateway.protocols.cjt188.identifiers import di_bytes
    from meter_gateway.protocols.cjt188.status import Status

    order = draw(st.sampled_from(("standard", "swapped")))
    meter_type = draw(st.sampled_from(METER_TYPES) | u8)
    meter = draw(st.sampled_from((Address.parse("00000000000001"), Address.parse("78330011223344"))))
    max_data_length = draw(st.sampled_from((0x64, 255)))
    expect: Any = None
    parts: list[bytes] = []
    for _ in range(draw(st.integers(1, 3))):
        if draw(st.integers(0, 3)) == 0:
            parts.append(draw(st.binary(max_size=16) | st.just(b"\xfe" * 4)))  # noise or wake-up bytes
        if draw(st.integers(0, 7)) == 0:
            parts.append(draw(st.sampled_from(_vectors())))
            continue
        address = meter if draw(st.integers(0, 3)) else Address(draw(st.binary(min_size=7, max_size=7)))
        message = draw(_message(meter_type, address))
        sent_order = order if draw(st.integers(0, 7)) else draw(st.sampled_from(("standard", "swapped")))
        frame = message.to_frame(sent_order)
        if expect is None and isinstance(message, m.ReadReply | m.WriteReply | m.ErrorReply) and address is meter:
            di = message.di if message.di is not None else 0x901F
            expect = Expect(meter_type, meter, message.function(), di_bytes(di, order), message.ser)
        parts.append(frame.encode(draw(st.integers(0, 4))) if len(frame.data) <= 0x64 else _unchecked(frame))
    if expect is None:
        expect = Expect.of(m.ReadRequest.current_data(meter_type, meter, draw(u8)), order)
    if draw(st.integers(0, 15)) == 0:  # an abnormal reply to the awaited request
        status = Status(draw(st.integers(0, 0xFFFF)))
        reply = m.ErrorReply(meter_type, meter, expect.function, expect.ser, status)
        parts.append(reply.encode(order))
    return (max_data_length, order, expect), b"".join(parts)


@st.composite
def _base(draw: st.DrawFn) -> tuple[Any, bytes]:
    """A byte stream of frames (context: deframer limit, DI order, the awaited reply), or, a
    quarter of the time, the data field after ``DI SER`` of one reply (context: DI and meter type)
    so every mutation lands in the meter-type data decoders."""
    from meter_gateway.protocols.cjt188.catalogue import default_catalogue

    if draw(st.integers(0, 3)):
        return draw(_stream())
    catalogue = default_catalogue()
    item = catalogue.get(draw(st.sampled_from(_dis())))
    assert item is not None
    meter_type = draw(st.sampled_from(METER_TYPES) | u8)
    layout = item.reply_layout(catalogue.meter_class(meter_type)) or item.request
    return ("field", item.di, meter_type), draw(_layout_data(layout))


def _unchecked(frame: Any) -> bytes:
    """A frame longer than the standard's L caps (Frame.encode refuses; vendor meters send them)."""
    from meter_gateway.protocols.cjt188.frame import checksum

    body = bytes((0x68, frame.meter_type, *frame.address.wire, frame.control.byte, len(frame.data))) + frame.data
    return body + bytes((checksum(body), 0x16))


def _deframe(max_data_length: int, data: bytes, rng: random.Random) -> list[Any]:
    from meter_gateway.protocols.cjt188.deframer import REASONS, Deframer, Discarded
    from meter_gateway.protocols.cjt188.frame import OVERHEAD

    deframer = Deframer(max_data_length)
    frames: list[Any] = []
    accounted = 0
    pos = 0
    while pos < len(data):  # arbitrary chunking, as bytes trickle in from a serial port
        step = rng.choice((1, 2, 7, 13, 64, len(data)))
        for event in deframer.feed(data[pos : pos + step]):
            if isinstance(event, Discarded):
                if event.reason not in REASONS or not event.data:
                    raise InvariantBroken(f"discard {event.reason!r} of {len(event.data)} bytes")
                accounted += len(event.data)
                continue
            if len(event.data) > max_data_length:
                raise InvariantBroken(f"frame with {len(event.data)} data bytes from a {max_data_length} deframer")
            accounted += OVERHEAD + len(event.data)
            frames.append(event)
        pos += step
        if deframer.buffered > deframer.buffer_limit:
            raise InvariantBroken(f"deframer holds {deframer.buffered} > {deframer.buffer_limit} bytes")
    if accounted + deframer.preamble_bytes + deframer.buffered != len(data):
        raise InvariantBroken(
            f"{len(data)} bytes in, {accounted} in frames and discards + {deframer.preamble_bytes} wake-up bytes"
            f" + {deframer.buffered} held"
        )
    return frames


def _values(message: Any) -> Any:
    """What the driver's read takes from a reply: the decoded values, refused as it refuses them."""
    from meter_gateway.protocols.cjt188 import messages as m
    from meter_gateway.protocols.cjt188.errors import RemoteProtocolError

    if isinstance(message, m.ErrorReply):
        return message.status.bits()
    if isinstance(message, m.OtherMessage | m.ReadRequest):
        return None
    if isinstance(message, m.WriteReply):
        _ = message.status
    decoded = message.values()
    decoded.by_quantity()
    for value in decoded.values:
        if not isinstance(value.value, int | float | str | bool | type(None)):
            raise InvariantBroken(f"{value.quantity}: value {value.value!r} is not JSON-able")
        if value.value is None or ("unit_code" in value.fields and value.unit is None):
            raise RemoteProtocolError("the driver reads it again")
    return decoded.values


def _exchange(expect: Any, order: str, data: bytes) -> None:
    from meter_gateway.protocols.cjt188.exchange import Cjt188Exchange, Cjt188Line
    from meter_gateway.protocols.exchange import Rejected

    exchange = Cjt188Exchange(Cjt188Line(), expect, _values, order)  # type: ignore[arg-type]
    exchange.begin()
    verdicts = [e for e in exchange.receive(data) if not isinstance(e, Rejected)]
    if len(verdicts) > 1:
        raise InvariantBroken(f"{len(verdicts)} verdicts in one attempt: {verdicts}")


def repair(data: bytes) -> bytes:
    """``data`` with the checksum and end byte of every frame its length bytes outline made right
    again, so a mutation inside a frame reaches the message and data decoders instead of being
    dropped as bad_checksum."""
    buf = bytearray(data)
    pos = buf.find(0x68)
    while pos >= 0 and pos + 11 <= len(buf):
        end = pos + 13 + buf[pos + 10]
        if end > len(buf):
            pos = buf.find(0x68, pos + 1)
            continue
        buf[end - 2 : end] = bytes((sum(buf[pos : end - 2]) & 0xFF, 0x16))
        pos = buf.find(0x68, end)
    return bytes(buf)


def _run(context: Any, data: bytes, rng: random.Random) -> None:
    from meter_gateway.gateway.cli.decode_cmd import decode_all
    from meter_gateway.protocols.cjt188 import messages as m
    from meter_gateway.protocols.cjt188.describe import describe_frame, looks_like_cjt188, safe_describe
    from meter_gateway.protocols.cjt188.errors import ProtocolError
    from meter_gateway.protocols.cjt188.frame import parse_frame

    if context[0] == "field":
        _, di, meter_type = context
        guard = Guard((ProtocolError,))
        for message in (
            m.ReadReply(meter_type, ADDRESS, di, 1, data),
            m.WriteRequest(meter_type, ADDRESS, di, 1, data),
        ):
            guard(_values, message)
            if len(data) <= 250:
                guard(describe_frame, message.to_frame(), "standard")
        if guard.crashes:
            raise ExceptionGroup("cjt188 data decoders", guard.crashes)
        return
    max_data_length, order, expect = context
    if rng.random() < 0.5:
        data = repair(data)
    guard = Guard((ProtocolError,))
    for frame in guard(_deframe, max_data_length, data, rng) or ():
        guard(describe_frame, frame, order)
        message = guard(m.parse_message, frame, order)
        if message is not None:
            guard(_values, message)
    guard(_exchange, expect, order, data)
    guard(parse_frame, data)
    guard(describe_frame, data, order)
    strict = Guard(())  # these turn every bad input into an answer: nothing may escape
    strict(safe_describe, data, order)
    strict(looks_like_cjt188, data)
    if data:
        strict(decode_all, data.hex())
    crashes = guard.crashes + strict.crashes
    if crashes:
        raise ExceptionGroup("cjt188 entry points", crashes)


def target() -> Target:
    from meter_gateway.protocols.cjt188.errors import ProtocolError

    return Target(
        "cjt188",
        "streaming Deframer (random chunking; buffer, data length and byte accounting checked) + "
        "parse_message (both DI orders) + the catalogue's meter-type decoders + describe + "
        "Cjt188Exchange + meter-gateway decode",
        _base(),
        _run,
        (ProtocolError,),
    )

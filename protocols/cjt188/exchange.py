"""Recognising the one CJ/T 188 reply a request expects, among everything a shared bus carries.

Sans-I/O (see :mod:`protocols.exchange`): a :class:`Cjt188Exchange` is made per request and given
the bytes that arrive after it; it deframes them by length (:class:`~.deframer.Deframer`) and
accepts only a frame that answers *this* request:

* direction bit D7 = from the meter (a frame in request direction is our own request heard
  back: ``echo``);
* the meter type T and the address the request went to; an ``AA`` type or ``AA`` address bytes
  in the request accept any (how 810A discovery learns the meter's real type and address,
  clause 7 Table 7), else ``wrong_address``;
* the request's function (C D5..D0), the same DI (as its two wire bytes, so the per-meter
  ``di_order`` needs no decoding here) and the same SER (clause 7.1: the meter echoes it), else
  ``wrong_function``. An abnormal reply (D6 set) carries ``SER ST`` or ``DI SER ST``: its SER,
  and its DI when present, must match too.

A reply that fails those checks but answers a request recently made on the same bus (by any
driver: the :class:`Cjt188Line` of the bus keeps them, with the bus's SER counter) is ``late``
instead: a reply that missed its own deadline. SER makes that reliable: a late reply to an
identical earlier read carries the earlier SER and is never taken for the answer.

An abnormal reply from the right meter for the right request is a
:class:`~protocols.exchange.Refusal` with ST decoded (valve state, battery; the status word is the
refusal's code); a matching frame whose payload does not parse, or whose content the caller's
``decode`` rejects, is :class:`~protocols.exchange.Unusable`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

import msgspec

from meter_gateway.protocols.cjt188 import messages as m
from meter_gateway.protocols.cjt188.deframer import Deframer
from meter_gateway.protocols.cjt188.errors import ProtocolError
from meter_gateway.protocols.cjt188.frame import OVERHEAD, WILDCARD_TYPE, Address, Frame
from meter_gateway.protocols.cjt188.functions import function_name
from meter_gateway.protocols.cjt188.identifiers import DiOrder, check_order, di_bytes
from meter_gateway.protocols.cjt188.status import Status
from meter_gateway.protocols.exchange import (
    HISTORY_LENGTH,
    Answer,
    Event,
    Refusal,
    Rejected,
    Rejection,
    RequestHistory,
    Unusable,
    until_verdict,
)

__all__ = ["HISTORY_LENGTH", "Cjt188Exchange", "Cjt188Line", "Expect", "as_message", "status_reasons"]


R = TypeVar("R")


class Expect(msgspec.Struct, frozen=True, gc=False):
    """What answers a request: which meter (type and address), function, DI and SER.

    ``di`` is the DI's two bytes as sent (the meter's ``di_order`` already applied). A msgspec
    Struct: one is built per request and kept in the bus's history.
    """

    meter_type: int  # AA: any type
    address: Address  # AA bytes are wildcards
    function: int
    di: bytes
    ser: int

    @classmethod
    def of(cls, request: m.ReadRequest | m.WriteRequest, di_order: DiOrder = "standard") -> Expect:
        """What answers ``request`` when it is sent to a meter in ``di_order``."""
        return cls(request.meter_type, request.address, request.function(), di_bytes(request.di, di_order), request.ser)

    def from_meter(self, frame: Frame) -> bool:
        """Whether ``frame`` comes from a meter this request addressed."""
        return (self.meter_type in (WILDCARD_TYPE, frame.meter_type)) and self.address.matches(frame.address)

    def answered_by(self, frame: Frame) -> bool:
        """Whether ``frame`` (a reply) has this request's meter, function, DI and SER."""
        if frame.control.function != self.function or not self.from_meter(frame):
            return False
        data = frame.data
        if frame.control.abnormal:
            if len(data) == 3:  # SER ST
                return data[0] == self.ser
            if len(data) == 5:  # DI SER ST
                return data[:2] == self.di and data[2] == self.ser
            return False
        return len(data) >= 3 and data[:2] == self.di and data[2] == self.ser


class Cjt188Line(RequestHistory[Expect]):
    """What the CJ/T 188 exchanges of one bus share: the requests recently made on it (newest
    last), the bus's SER counter, and its deframer (one transaction runs at a time and each
    attempt starts by resetting it)."""

    def __init__(self, history: int = HISTORY_LENGTH) -> None:
        super().__init__(history)
        self._ser = 0
        # vendor replies can exceed the standard's L <= 64H: accept any L a frame can carry
        self.deframer = Deframer(max_data_length=255)

    def know(self, address: Address) -> None:
        """A meter on this bus: its replies share the caller's Address object."""
        self.deframer.know(address)

    def next_ser(self) -> int:
        """The SER of the next request on this bus (clause 7.1: +1 modulo 256 per exchange)."""
        self._ser = m.next_ser(self._ser)
        return self._ser

    def answers_earlier(self, frame: Frame, current: Expect) -> bool:
        return self.answered_earlier(current, lambda e: e.answered_by(frame))


def as_message(message: m.Message) -> m.Message:
    """The ``decode`` of an exchange whose caller wants the parsed message itself."""
    return message


def status_reasons(status: Status) -> tuple[str, ...]:
    """ST as reason names for a refusal: ``valve_abnormal``, ``valve_closed``, ``battery_low``,
    ``vendor_bits_XXXX`` (D3-D15 set); ``abnormal_reply`` when ST says nothing more."""
    reasons: list[str] = []
    valve = status.valve
    if valve != "open":
        reasons.append(f"valve_{valve}")
    if status.battery_low:
        reasons.append("battery_low")
    vendor = status.word & 0xFFF8
    if vendor:
        reasons.append(f"vendor_bits_{vendor:04X}")
    return tuple(reasons) or ("abnormal_reply",)


class Cjt188Exchange(Generic[R]):
    """The :class:`~protocols.exchange.ReplyExchange` of one CJ/T 188 request.

    ``decode`` turns the accepted normal reply (a ReadReply or WriteReply) into what the caller
    wants; a :class:`~protocols.cjt188.errors.ProtocolError` from it makes the reply Unusable, so
    a value that does not decode is read again instead of handed on.
    """

    def __init__(self, line: Cjt188Line, expect: Expect, decode: Callable[[m.Message], R], di_order: DiOrder) -> None:
        self.line = line
        self.expect = expect
        self.decode = decode
        self.di_order = check_order(di_order)
        line.note(expect)

    def begin(self) -> None:
        self.line.deframer.reset()

    def receive(self, data: bytes) -> list[Event[R]]:
        return until_verdict(self.line.deframer.feed(data), self._consider)

    def _consider(self, frame: Frame) -> Event[R]:
        size = OVERHEAD + len(frame.data)
        control = frame.control
        expect = self.expect
        who = f"{frame.meter_type:02X}/{frame.address}"
        if not control.from_meter:
            return Rejected(Rejection.ECHO, size, f"request {control} to {who}")
        if not expect.answered_by(frame):
            if self.line.answers_earlier(frame, expect):
                return Rejected(Rejection.LATE, size, f"reply {control} from {who}")
            if not expect.from_meter(frame):
                asked = f"{expect.meter_type:02X}/{expect.address}"
                return Rejected(Rejection.WRONG_ADDRESS, size, f"reply from {who}, asked {asked}")
            return Rejected(Rejection.WRONG_FUNCTION, size, self._mismatch(frame))
        try:
            message = m.parse_message(frame, self.di_order)
        except ProtocolError as exc:
            return Unusable(f"meter {who}: reply {control}: {exc}")
        if isinstance(message, m.ErrorReply):
            status = message.status
            battery = "low" if status.battery_low else "normal"
            text = (
                f"meter {frame.address} refused {function_name(message.code)}:"
                f" ST {status} (valve {status.valve}, battery {battery})"
            )
            return Refusal(text, status.word, status_reasons(status))
        try:
            return Answer(self.decode(message))
        except ProtocolError as exc:
            return Unusable(f"meter {who}: reply {control}: {exc}")

    def _mismatch(self, frame: Frame) -> str:
        expect = self.expect
        asked = f"function {expect.function:02X} DI {expect.di.hex().upper()} SER {expect.ser:02X}"
        data = frame.data
        if frame.control.abnormal:
            got = f"abnormal reply {frame.control} with SER {data[-3]:02X}" if len(data) >= 3 else "abnormal reply"
        elif len(data) >= 3:
            got = f"reply {frame.control} for DI {data[:2].hex().upper()} SER {data[2]:02X}"
        else:
            got = f"reply {frame.control} of {len(data)} data bytes"
        return f"{got}, asked {asked}"

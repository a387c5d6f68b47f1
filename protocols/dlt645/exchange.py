"""Recognising the one DL/T 645 reply a request expects, among everything a shared RS-485 bus carries.

Sans-I/O (see :mod:`protocols.exchange`): a :class:`Dlt645Exchange` is made per request and given
the bytes that arrive after it; it deframes them by length (:class:`~protocols.dlt645.deframer.Deframer`)
and accepts only a frame that answers *this* request:

* direction bit D7 = reply (a frame in request direction is our own request heard back: ``echo``);
* the address the request went to (an ``AA`` wildcard request accepts the address it stands for,
  which is how 0x13 discovery learns the meter's real address), else ``wrong_address``;
* the request's function code (D4..D0) and, for reads, the same data identifier and (2007
  follow-ups) the same SEQ, else ``wrong_function``.

A reply that fails those checks but answers a request recently made on the same bus (by any
driver: the :class:`Dlt645Line` of the bus keeps them) is ``late`` instead: a reply that missed its
own deadline, not a misbehaving meter. DL/T 645 has no transaction id, so a late reply to an
*identical* earlier request is indistinguishable from the answer and is accepted; that is harmless
(same question, same meaning) and the engine flushes stale input before every attempt.

An abnormal reply (D6 set, e.g. 0xD1, 0xDC) from the right meter for the right function is a
:class:`~protocols.exchange.Refusal` with the error word and its decoded flag names; a matching
frame whose payload does not parse, or whose content the caller's ``decode`` rejects, is
:class:`~protocols.exchange.Unusable`. Abnormal replies carry no data identifier, so one cannot be
told from a late refusal of an earlier read of the same function; the flush before each request
keeps that rare.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

import msgspec

from meter_gateway.protocols.dlt645 import messages as m
from meter_gateway.protocols.dlt645.deframer import Deframer
from meter_gateway.protocols.dlt645.edition import Edition
from meter_gateway.protocols.dlt645.error_words import describe_flags
from meter_gateway.protocols.dlt645.errors import ProtocolError
from meter_gateway.protocols.dlt645.frame import OVERHEAD, Address, Frame
from meter_gateway.protocols.dlt645.functions import function_name
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

__all__ = ["HISTORY_LENGTH", "Dlt645Exchange", "Dlt645Line", "Expect", "as_message"]

R = TypeVar("R")


class Expect(msgspec.Struct, frozen=True, gc=False):
    """What answers a request: who, which function, and for reads which DI (and 2007 SEQ).

    A msgspec Struct, as CJ/T 188's is: one is built per request and kept in the bus's history,
    and a Struct is cheaper to build than a frozen dataclass.
    """

    address: Address  # the request's address; AA bytes are wildcards
    function: int  # the request's function code; the reply carries the same in D4..D0
    di: int | None = None
    seq: int | None = None  # 2007 read follow-up (0x12) sequence number

    def answered_by(self, frame: Frame, edition: Edition) -> bool:
        """Whether ``frame`` (a reply) has this request's address, function, DI and SEQ."""
        if frame.control.function != self.function or not self.address.matches(frame.address):
            return False
        if frame.control.abnormal or self.di is None:
            return True
        data = frame.data
        n = edition.di_length
        if len(data) < n or int.from_bytes(data[:n], "little") != self.di:
            return False
        return self.seq is None or (len(data) > n and data[-1] == self.seq)


class Dlt645Line(RequestHistory[Expect]):
    """What the exchanges of one bus share: the requests recently made on it, newest last, and
    the bus's deframer (one transaction runs at a time and each attempt starts by resetting it)."""

    def __init__(self, history: int = HISTORY_LENGTH) -> None:
        super().__init__(history)
        self.deframer = Deframer(max_data_length=255)
        # FE wake-up bytes a request to every meter of the line (a broadcast, a wildcard) goes out
        # with: the most any of its meters needs
        self.wake = 0

    def know(self, address: Address) -> None:
        """A meter on this bus: its replies share the caller's Address object."""
        self.deframer.know(address)

    def answers_earlier(self, frame: Frame, edition: Edition, current: Expect) -> bool:
        return self.answered_earlier(current, lambda e: e.answered_by(frame, edition))


def as_message(message: m.Message) -> m.Message:
    """The ``decode`` of an exchange whose caller wants the parsed message itself."""
    return message


class Dlt645Exchange(Generic[R]):
    """The :class:`~protocols.exchange.ReplyExchange` of one DL/T 645 request.

    ``decode`` turns the accepted reply (any normal reply: a ReadReply, an Ack...) into what the
    caller wants; a :class:`~protocols.dlt645.errors.ProtocolError` from it makes the reply
    Unusable, so a value that does not decode is read again instead of handed on.
    """

    def __init__(self, line: Dlt645Line, edition: Edition, expect: Expect, decode: Callable[[m.Message], R]) -> None:
        self.line = line
        self.edition = edition
        self.expect = expect
        self.decode = decode
        line.note(expect)

    def begin(self) -> None:
        self.line.deframer.reset()

    def receive(self, data: bytes) -> list[Event[R]]:
        return until_verdict(self.line.deframer.feed(data), self._consider)

    def _consider(self, frame: Frame) -> Event[R]:
        size = OVERHEAD + len(frame.data)
        control = frame.control
        edition = self.edition
        expect = self.expect
        if not control.from_meter:
            return Rejected(Rejection.ECHO, size, f"request {control} to {frame.address}")
        if not expect.answered_by(frame, edition):
            if self.line.answers_earlier(frame, edition, expect):
                return Rejected(Rejection.LATE, size, f"reply {control} from {frame.address}")
            if not expect.address.matches(frame.address):
                return Rejected(Rejection.WRONG_ADDRESS, size, f"reply from {frame.address}, asked {expect.address}")
            return Rejected(Rejection.WRONG_FUNCTION, size, self._mismatch(frame))
        try:
            message = m.parse_message(frame, edition)
        except ProtocolError as exc:
            return Unusable(f"meter {frame.address}: reply {control}: {exc}")
        if isinstance(message, m.ErrorReply):
            what = function_name(edition, message.failed)
            text = f"meter {frame.address} refused {what}: {describe_flags(message.flags)} (error {message.code:#x})"
            return Refusal(text, message.code, message.flags)
        try:
            return Answer(self.decode(message))
        except ProtocolError as exc:
            return Unusable(f"meter {frame.address}: reply {control}: {exc}")

    def _mismatch(self, frame: Frame) -> str:
        n = self.edition.di_length
        got = f"reply {frame.control}"
        if self.expect.di is not None and len(frame.data) >= n:
            got += f" for DI {self.edition.format_di(int.from_bytes(frame.data[:n], 'little'))}"
            return f"{got}, asked {self.edition.format_di(self.expect.di)}"
        return f"{got}, asked function {self.expect.function:02X}"

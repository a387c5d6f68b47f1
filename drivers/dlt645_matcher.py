"""Recognising the one DL/T 645 reply a request expects, among everything a shared RS-485 bus carries.

The bus (:mod:`drivers.bus`) feeds a matcher the bytes that arrive after a request; the matcher
deframes them by length (:class:`~protocols.dlt645.deframer.Deframer`) and accepts only a frame that
answers *this* request:

* direction bit D7 = reply (a frame in request direction is our own request heard back: ``echo``);
* the address the request went to (an ``AA`` wildcard request accepts the address it stands for,
  which is how 0x13 discovery learns the meter's real address), else ``wrong_address``;
* the request's function code (D4..D0) and, for reads, the same data identifier and (2007
  follow-ups) the same SEQ, else ``wrong_function``.

A reply that fails those checks but answers a request recently made on the same bus (by any
driver: the history is kept per bus) is counted ``late`` instead: it is a reply that missed its
own deadline, not a misbehaving meter. DL/T 645 has no transaction id, so a late reply to an
*identical* earlier request is indistinguishable from the answer and is accepted; that is
harmless (same question, same meaning) and the bus flushes stale input before every attempt.

An abnormal reply (D6 set, e.g. 0xD1, 0xDC) from the right meter for the right function raises
:class:`~drivers.errors.MeterRefused` with the error word and its decoded flag names (no retry);
a matching frame whose payload does not parse raises :class:`~drivers.errors.BadReply` (retried).
Abnormal replies carry no data identifier, so one cannot be told from a late refusal of an
earlier read of the same function; the bus's input flush before each request keeps that rare.
"""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import Callable
from typing import Final

import msgspec

from meter_gateway.drivers.bus import Rejection, RejectionLog
from meter_gateway.drivers.errors import BadReply, MeterRefused
from meter_gateway.protocols.dlt645 import messages as m
from meter_gateway.protocols.dlt645.deframer import Deframer, Discarded
from meter_gateway.protocols.dlt645.edition import Edition
from meter_gateway.protocols.dlt645.error_words import describe_flags
from meter_gateway.protocols.dlt645.errors import ProtocolError
from meter_gateway.protocols.dlt645.frame import _SUB_33, END, OVERHEAD, PREAMBLE, START, Address, Frame
from meter_gateway.protocols.dlt645.functions import function_name

__all__ = ["Dlt645Matcher", "Expect", "ReplyHistory", "history_for"]

HISTORY_LENGTH: Final = 32  # requests remembered per bus for telling late replies from strangers


class Expect(msgspec.Struct, frozen=True, gc=False):
    """What answers a request: who, which function, and for reads which DI (and 2007 SEQ).

    A msgspec Struct: one is built per request, and it costs a sixth of a frozen dataclass.
    """

    address: Address  # the request's address; AA bytes are wildcards
    function: int  # the request's function code; the reply carries the same in D4..D0
    di: int | None = None
    seq: int | None = None  # 2007 read follow-up (0x12) sequence number

    def answered_by(self, frame: Frame, edition: Edition) -> bool:
        """Whether ``frame`` (a reply) has this request's address, function, DI and SEQ."""
        wire = self.address.wire
        if frame.control.function != self.function:
            return False
        if wire != frame.address.wire and (0xAA not in wire or not self.address.matches(frame.address)):
            return False
        if frame.control.abnormal or self.di is None:
            return True
        data = frame.data
        n = edition.di_length
        if len(data) < n or int.from_bytes(data[:n], "little") != self.di:
            return False
        return self.seq is None or (len(data) > n and data[-1] == self.seq)


class ReplyHistory:
    """The last requests made on one bus, newest last; and the bus's one deframer.

    The bus runs one transaction at a time and every matcher resets the deframer before its
    attempt, so the matchers of one bus can share it (and its cache of decoded addresses)
    instead of building one per request.
    """

    def __init__(self, size: int = HISTORY_LENGTH) -> None:
        self._recent: deque[Expect] = deque(maxlen=size)
        self.deframer = Deframer(max_data_length=255)

    def note(self, expect: Expect) -> None:
        self._recent.append(expect)

    def answers_earlier(self, frame: Frame, edition: Edition, current: Expect) -> bool:
        return any(e != current and e.answered_by(frame, edition) for e in self._recent)


_histories: weakref.WeakKeyDictionary[object, ReplyHistory] = weakref.WeakKeyDictionary()


def history_for(bus: object) -> ReplyHistory:
    """The request history of ``bus`` (created on first use, dropped with the bus)."""
    history = _histories.get(bus)
    if history is None:
        history = _histories[bus] = ReplyHistory()
    return history


class Dlt645Matcher(RejectionLog):
    """A :class:`drivers.bus.ReplyMatcher` for one DL/T 645 request; returns the parsed reply.

    ``check`` may inspect an accepted reply and raise BadReply (e.g. data that does not decode),
    which makes the bus retry instead of handing garbage to the caller.
    """

    def __init__(
        self,
        edition: Edition,
        expect: Expect,
        *,
        history: ReplyHistory | None = None,
        check: Callable[[m.Message], None] | None = None,
    ) -> None:
        self._rejections = []  # RejectionLog's state, set here: this runs once per request
        self.edition = edition
        self.expect = expect
        self.history = history
        self.check = check
        # a plain read (2007 6.2, 1997 5.1): its normal reply is one frame, 0x80 | function, DI, value
        plain = m.ReadRequest.FUNCTIONS[edition] == expect.function
        self._plain_read = plain and expect.di is not None and expect.seq is None
        if history is not None:
            history.note(expect)
            self._deframer = history.deframer
        else:
            self._deframer = Deframer(max_data_length=255)

    def reset(self) -> None:
        self._deframer.reset()

    def feed(self, data: bytes) -> m.Message | None:
        if self._plain_read and not self._deframer.buffered:
            whole = self._whole_read_reply(data)
            if whole is not None:
                return whole
        for event in self._deframer.feed(data):
            if isinstance(event, Discarded):
                self.reject(Rejection.GARBAGE, len(event.data), f"{event.reason} {event.detail}".strip())
                continue
            reply = self._consider(event)
            if reply is not None:
                return reply
        return None

    def _whole_read_reply(self, data: bytes) -> m.ReadReply | None:
        """The usual case of a poll, recognised without deframing: ``data`` is exactly the normal
        one-frame reply to this read (after FE wake-up bytes), as a TCP link delivers it. Returns
        what the deframer path returns for the same bytes; None leaves anything else to that path
        (tests/test_dlt645_matcher.py holds the two to the same answers)."""
        n = len(data)
        start = data.find(START)
        if start < 0 or data.count(PREAMBLE, 0, start) != start:
            return None
        expect = self.expect
        edition = self.edition
        di_end = start + 10 + edition.di_length
        if (
            n < di_end + 2
            or data[start + 8] != 0x80 | expect.function
            or data[start + 7] != START
            or start + OVERHEAD + data[start + 9] != n
            or data[start + 9] > self._deframer.max_data_length
            or data[n - 1] != END
            or data[start + 1 : start + 7] != expect.address.wire
            or sum(data[start : n - 2]) & 0xFF != data[n - 2]
        ):
            return None
        payload = data[start + 10 : n - 2].translate(_SUB_33)
        if int.from_bytes(payload[: di_end - start - 10], "little") != expect.di:
            return None
        self._deframer.preamble_bytes += start
        reply = m.ReadReply(expect.address, expect.di, payload[di_end - start - 10 :], False, None)
        if self.check is not None:
            self.check(reply)
        return reply

    def _consider(self, frame: Frame) -> m.Message | None:
        size = OVERHEAD + len(frame.data)
        control = frame.control
        if not control.from_meter:
            self.reject(Rejection.ECHO, size, f"request {control} to {frame.address}")
            return None
        expect = self.expect
        if not expect.answered_by(frame, self.edition):
            if self.history is not None and self.history.answers_earlier(frame, self.edition, expect):
                self.reject(Rejection.LATE, size, f"reply {control} from {frame.address}")
            elif not expect.address.matches(frame.address):
                self.reject(Rejection.WRONG_ADDRESS, size, f"reply from {frame.address}, asked {expect.address}")
            else:
                self.reject(Rejection.WRONG_FUNCTION, size, self._describe_mismatch(frame))
            return None
        try:
            message = m.parse_message(frame, self.edition)
        except ProtocolError as exc:
            raise BadReply(f"meter {frame.address}: reply {control}: {exc}") from exc
        if isinstance(message, m.ErrorReply):
            what = function_name(self.edition, message.failed)
            raise MeterRefused(
                f"meter {frame.address} refused {what}: {describe_flags(message.flags)} (error {message.code:#x})",
                code=message.code,
                reasons=message.flags,
            )
        if self.check is not None:
            self.check(message)
        return message

    def _describe_mismatch(self, frame: Frame) -> str:
        n = self.edition.di_length
        got = f"reply {frame.control}"
        if self.expect.di is not None and len(frame.data) >= n:
            got += f" for DI {self.edition.format_di(int.from_bytes(frame.data[:n], 'little'))}"
            return f"{got}, asked {self.edition.format_di(self.expect.di)}"
        return f"{got}, asked function {self.expect.function:02X}"

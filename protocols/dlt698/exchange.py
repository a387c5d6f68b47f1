"""Recognising the one DL/T 698.45 response a request expects, among everything a shared bus carries.

Sans-I/O (see :mod:`protocols.exchange`): a :class:`Dlt698Exchange` is made per request and given
the bytes that arrive after it; it deframes them by length
(:class:`~protocols.dlt698.deframer.Deframer`) and accepts only the frame that answers *this*
request (DL/T 698.45-2017 clause 5 for the link frame, clause 6.3.4 for PIID):

* DIR = 1 and PRM = 1 (a server's response; DIR 0 is our own request heard back: ``echo``);
* from the server address the request went to (a wildcard request, e.g. address discovery with
  40010200, accepts any address it stands for), else ``wrong_address``;
* the response service and choice of the request's (GET 5 -> 133, SET 6 -> 134, ACTION 7 -> 135,
  CONNECT 2 -> 130, RELEASE 3 -> 131; the choice is the request's, or GET-Response-Next when a long
  GET answer starts a block transfer) and its PIID sequence number, else ``wrong_function``. A
  request sent in SECURITY must be answered in SECURITY; the identity is read from the plaintext
  inside. A ciphertext request (pass-through of an APDU secured by the
  head-end) cannot be matched on PIID: any SECURITY-Response from its meter answers it.

A response that fails those checks but answers a request recently made on the same bus (any
driver's: the bus's :class:`Dlt698Line` keeps them, and hands out PIIDs so recent requests never
share one) is ``late``: a response that missed its deadline. Bytes that make no frame are
``garbage``.

Frames the server sends on its own (DIR 1, PRM 0) do not end the exchange and are not rejections:
REPORT-Notification frames and LINK-Requests (login, heartbeat, logout of a terminal or a meter
that opens with a login), and the FollowReport trailer of any response, are given to the caller as
:class:`MeterEvent` values through the line (:meth:`Dlt698Line.take_events`), for it to acknowledge
and publish once the transaction is over. They are harvested even behind the verdict in the same
bytes. Bytes that arrive with no request in flight (the bus's idle line) go to
:meth:`Dlt698Line.hear`, which keeps the same frames the same way.

Refusals (final, not retried): ERROR-Response (clause 6.3.15), SECURITY-Response carrying a DAR,
CONNECT-Response with a result other than 0, and a DAR other than success on SET, ACTION,
GET-Record and GET-Next. A GET Normal / NormalList answers per OAD (some data, some DARs): that is
an Answer and the caller reads the DARs. A matching frame whose APDU does not parse, or whose
content the caller's ``decode`` rejects, is :class:`~protocols.exchange.Unusable`. Link-layer
fragmentation (clause 5) is not used: the driver keeps APDUs within one frame and long GETs use
application-layer GET-Next blocks, so a fragment frame from the meter is Unusable with that reason.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Generic, NamedTuple, TypeVar

from meter_gateway.protocols.dlt698 import apdu as ap
from meter_gateway.protocols.dlt698.dar import dar_info, dar_name
from meter_gateway.protocols.dlt698.deframer import Deframer, Discarded
from meter_gateway.protocols.dlt698.errors import ProtocolError, RemoteProtocolError
from meter_gateway.protocols.dlt698.frame import FUNCTION_LINK, Frame, ServerAddress
from meter_gateway.protocols.exchange import (
    HISTORY_LENGTH,
    Answer,
    Event,
    Refusal,
    Rejected,
    Rejection,
    RequestHistory,
    Unusable,
    garbage,
)

__all__ = [
    "EVENT_BACKLOG",
    "HISTORY_LENGTH",
    "Dlt698Exchange",
    "Dlt698Line",
    "Expect",
    "MeterEvent",
    "Reply",
    "as_reply",
]

EVENT_BACKLOG: Final = 256  # unsolicited frames kept per bus until a driver takes them
_GET_RESPONSE: Final = 133
_FRAME_OVERHEAD: Final = 12  # 68 L L C AF CA HCS HCS FCS FCS 16, with the SA bytes added per frame
_ERROR_TEXT: Final = {1: "APDU cannot be parsed", 2: "service not supported", 255: "other error"}
_CONNECT_TEXT: Final = {
    1: "password error",
    2: "symmetric decryption error",
    3: "asymmetric decryption error",
    4: "signature error",
    5: "protocol version mismatch",
    255: "other error",
}

R = TypeVar("R")


class Identity(NamedTuple):
    """What pairs a response with its request: response tag, choice and PIID sequence number."""

    tag: int
    choice: int | None
    piid: int | None


class Expect(NamedTuple):
    """What answers one request (see the module docstring)."""

    address: ServerAddress  # the request's server address (A nibbles: wildcard)
    identity: Identity | None  # None: a ciphertext request, matched by address only
    secured: bool = False  # the request went in SECURITY: the response must come back in it

    @classmethod
    def of(cls, request: Frame) -> Expect:
        """The expectation of the request ``request`` (its APDU says service, choice and PIID)."""
        apdu = ap.parse_apdu(request.apdu)
        secured = isinstance(apdu, ap.SecurityRequest)
        if isinstance(apdu, ap.SecurityRequest):
            if apdu.inner is None:
                return cls(request.address, None, True)
            apdu = apdu.inner
        piid = getattr(apdu, "piid", None)
        if not 2 <= apdu.TAG <= 7 or piid is None:
            raise RemoteProtocolError(f"{apdu.SERVICE or type(apdu).__name__} is not a request that gets a response")
        return cls(request.address, Identity(apdu.TAG + 128, apdu.CHOICE, piid.seq), secured)

    def answered_by(self, address: ServerAddress, identity: Identity | None, secured: bool) -> bool:
        if not self.address.matches(address) or secured != self.secured:
            return False
        wanted = self.identity
        if wanted is None:
            return True
        if identity == wanted:
            return True
        # a long GET answer of any kind starts an application-layer block transfer (clause 6.1):
        # GET-Response-Next, same PIID
        return identity is not None and wanted.tag == _GET_RESPONSE and identity == (_GET_RESPONSE, 5, wanted.piid)


class Reply(NamedTuple):
    """An accepted response: who sent it, the plaintext APDU (for a ciphertext SECURITY-Response,
    the SecurityResponse itself) and the SECURITY wrapper when there was one (its ``mac``)."""

    address: ServerAddress
    apdu: ap.Apdu
    security: ap.SecurityResponse | None = None

    @property
    def mac(self) -> bytes | None:
        return self.security.mac if self.security is not None else None


def as_reply(reply: Reply) -> Reply:
    """The ``decode`` of an exchange whose caller wants the Reply itself."""
    return reply


@dataclass(frozen=True, slots=True)
class MeterEvent:
    """Something a server sent on its own: ``report`` (REPORT-Notification, to acknowledge),
    ``follow_report`` (the FollowReport trailer of a response; nothing to acknowledge) or ``link``
    (a LINK-Request: login, heartbeat or logout, to answer with a LINK-Response)."""

    kind: str
    frame: Frame
    apdu: ap.Apdu  # ReportNotification*, LinkRequest, or the response that carried the FollowReport

    @property
    def address(self) -> ServerAddress:
        return self.frame.address


class Dlt698Line(RequestHistory[Expect]):
    """What the DL/T 698.45 exchanges of one bus share: recent requests, PIIDs, the deframer (one
    transaction runs at a time; each attempt resets it) and the unsolicited frames not yet taken."""

    def __init__(self, history: int = HISTORY_LENGTH) -> None:
        super().__init__(history)
        self._piid = 0
        self.deframer = Deframer()
        self._events: deque[MeterEvent] = deque(maxlen=EVENT_BACKLOG)
        self.events_dropped = 0  # unsolicited frames pushed out of a full backlog

    def next_piid(self) -> int:
        """The next PIID sequence number, 1..63 in turn: the 32 remembered requests never share one."""
        self._piid = self._piid % 63 + 1
        return self._piid

    def know(self, address: ServerAddress) -> None:
        self.deframer.know(address)

    def answers_earlier(
        self, address: ServerAddress, identity: Identity | None, secured: bool, current: Expect
    ) -> bool:
        return self.answered_earlier(current, lambda e: e.answered_by(address, identity, secured))

    def add_event(self, event: MeterEvent) -> None:
        if len(self._events) == self._events.maxlen:
            self.events_dropped += 1
        self._events.append(event)

    @property
    def pending_events(self) -> int:
        return len(self._events)

    def take_events(self) -> list[MeterEvent]:
        """The unsolicited frames seen since the last call, oldest first."""
        events = list(self._events)
        self._events.clear()
        return events

    def hear(self, data: bytes) -> list[Rejected]:
        """Bytes that arrived with no request in flight: frames servers send on their own are
        kept as during an exchange; the rest is returned as rejections (garbage, our own request
        heard back, a response nobody waits for any more: late)."""
        out: list[Rejected] = []
        for item in self.deframer.feed(data):
            if isinstance(item, Discarded):
                out.append(garbage(item))
            elif item.control.from_server and not item.control.prm:
                rejected = _unsolicited(self, item)
                if rejected is not None:
                    out.append(rejected)
            else:
                kind = Rejection.LATE if item.control.from_server else Rejection.ECHO
                out.append(Rejected(kind, _size(item), f"{item.control} from {item.address} on the idle line"))
        return out


def _size(frame: Frame) -> int:
    return _FRAME_OVERHEAD + len(frame.address.wire) + len(frame.data)


def _unsolicited(line: Dlt698Line, frame: Frame) -> Rejected | None:
    """Keep a frame a server sent on its own (DIR 1, PRM 0) as a :class:`MeterEvent` of ``line``;
    one that is no LINK-Request or REPORT-Notification is a rejection."""
    try:
        apdu = ap.parse_apdu(frame.apdu) if not frame.control.fragment else None
    except ProtocolError as exc:
        apdu = None
        detail = f"unsolicited frame from {frame.address}: {exc}"
    else:
        detail = f"unsolicited fragment from {frame.address}"
    if isinstance(apdu, ap.LinkRequest) and frame.control.function == FUNCTION_LINK:
        line.add_event(MeterEvent("link", frame, apdu))
        return None
    if isinstance(apdu, ap.ReportNotificationList | ap.ReportNotificationRecordList):
        line.add_event(MeterEvent("report", frame, apdu))
        return None
    if apdu is not None:
        detail = f"unsolicited {apdu.SERVICE} from {frame.address}"
    return Rejected(Rejection.WRONG_FUNCTION, _size(frame), detail)


def _identity(apdu: ap.Apdu) -> Identity | None:
    piid = getattr(apdu, "piid", None)
    if piid is None:
        return None
    return Identity(apdu.TAG, apdu.CHOICE, piid.seq)


class Dlt698Exchange(Generic[R]):
    """The :class:`~protocols.exchange.ReplyExchange` of one DL/T 698.45 request.

    ``decode`` turns the accepted :class:`Reply` into what the caller wants; a
    :class:`~protocols.dlt698.errors.ProtocolError` from it makes the reply Unusable, so a value
    that does not decode is read again instead of handed on.
    """

    def __init__(self, line: Dlt698Line, expect: Expect, decode: Callable[[Reply], R]) -> None:
        self.line = line
        self.expect = expect
        self.decode = decode
        line.note(expect)

    def begin(self) -> None:
        self.line.deframer.reset()

    def receive(self, data: bytes) -> list[Event[R]]:
        events: list[Event[R]] = []
        decided = False
        for item in self.line.deframer.feed(data):
            if isinstance(item, Discarded):
                if not decided:
                    events.append(garbage(item))
                continue
            if item.control.from_server and not item.control.prm:
                rejected = _unsolicited(self.line, item)
                if rejected is not None and not decided:
                    events.append(rejected)
                continue
            if decided:
                continue  # the next attempt's stale input; only unsolicited frames are kept from it
            event = self._consider(item)
            events.append(event)
            decided = not isinstance(event, Rejected)
        return events

    def _consider(self, frame: Frame) -> Event[R]:
        size = _size(frame)
        expect = self.expect
        if not frame.control.from_server:
            return Rejected(Rejection.ECHO, size, f"request {frame.control} to {frame.address}")
        if frame.control.fragment:
            if expect.address.matches(frame.address):
                return Unusable(f"meter {frame.address}: link-layer fragment frames are not supported")
            return Rejected(Rejection.WRONG_ADDRESS, size, f"fragment from {frame.address}")
        try:
            apdu = ap.parse_apdu(frame.apdu)
        except ProtocolError as exc:
            if expect.address.matches(frame.address):
                return Unusable(f"meter {frame.address}: response APDU: {exc}")
            return Rejected(Rejection.WRONG_ADDRESS, size, f"unparsable response from {frame.address}")
        secured = isinstance(apdu, ap.SecurityResponse)
        security = apdu if isinstance(apdu, ap.SecurityResponse) else None
        plain = security.inner if security is not None and security.inner is not None else apdu
        identity = _identity(plain) if security is None or security.inner is not None else None
        if (
            isinstance(plain, ap.ErrorResponse)
            and expect.identity is not None
            and expect.address.matches(frame.address)
            and plain.piid.seq == expect.identity.piid
        ):
            # an ERROR-Response names the PIID of what it refuses, not the service, and comes in
            # plaintext even to a secured request (the meter could not open it)
            text = _ERROR_TEXT.get(plain.error, f"error {plain.error}")
            return Refusal(f"meter {frame.address} answered ERROR-Response: {text}", plain.error, ("error_response",))
        if not expect.answered_by(frame.address, identity, secured):
            if self.line.answers_earlier(frame.address, identity, secured, expect):
                return Rejected(Rejection.LATE, size, f"{apdu.SERVICE} from {frame.address}")
            if not expect.address.matches(frame.address):
                return Rejected(Rejection.WRONG_ADDRESS, size, f"response from {frame.address}, asked {expect.address}")
            return Rejected(Rejection.WRONG_FUNCTION, size, self._mismatch(apdu, identity))
        if security is not None and security.dar is not None:
            return Refusal(
                f"meter {frame.address} refused the secured request: {dar_name(security.dar)} (DAR {security.dar})",
                security.dar,
                (_dar_key(security.dar),),
            )
        refusal = self._refused(frame.address, plain)
        if refusal is not None:
            return refusal
        if isinstance(plain, ap.ServerApdu) and plain.follow_report is not None:
            self.line.add_event(MeterEvent("follow_report", frame, plain))
        try:
            return Answer(self.decode(Reply(frame.address, plain, security)))
        except ProtocolError as exc:
            return Unusable(f"meter {frame.address}: {apdu.SERVICE}: {exc}")

    @staticmethod
    def _refused(address: ServerAddress, apdu: ap.Apdu) -> Refusal | None:
        dar: int | None = None
        match apdu:
            case ap.ConnectResponse(result=result) if result != 0:
                text = _CONNECT_TEXT.get(result, f"result {result}")
                return Refusal(
                    f"meter {address} refused the association: {text} (it speaks version {apdu.version:04X})",
                    result,
                    ("connect_refused",),
                    apdu,
                )
            case ap.SetResponseNormal(dar=d) if d != 0:
                dar = d
            case ap.ActionResponseNormal(result=result) if result.dar != 0:
                dar = result.dar
            case ap.GetResponseRecord(result=result) if result.dar is not None:
                dar = result.dar
            case ap.GetResponseNext(dar=d) if d is not None:
                dar = d
        if dar is None:
            return None
        return Refusal(f"meter {address} refused {apdu.SERVICE}: {dar_name(dar)} (DAR {dar})", dar, (_dar_key(dar),))

    def _mismatch(self, apdu: ap.Apdu, identity: Identity | None) -> str:
        got = apdu.NAME or apdu.SERVICE
        if identity is not None and identity.piid is not None:
            got += f" PIID {identity.piid}"
        wanted = self.expect.identity
        if wanted is None:
            return f"{got}, asked a SECURITY-Response"
        return f"{got}, asked service {wanted.tag} choice {wanted.choice} PIID {wanted.piid}"


def _dar_key(code: int) -> str:
    info = dar_info(code)
    return info.key if info is not None else f"dar_{code}"

"""The seam between a protocol's reply recognition and the transaction engine that drives a wire.

A protocol supplies, for each request it sends, a sans-I/O *exchange*: an object that is given
the bytes that arrive after the request and says what they are. It does no I/O, keeps no time
and knows nothing of retries, so it can be tested with bytes alone; the engine
(:mod:`drivers.transaction`) owns the deadline, the retries and the input flush.

What an exchange reports, in arrival order:

* :class:`Rejected`: bytes that are not the answer: our own request heard back (``echo``), a
  reply to one of our earlier requests that missed its deadline (``late``), a stranger (a reply
  from another meter, ``wrong_address``; for another function or data item, ``wrong_function``),
  or bytes that make no frame (``garbage``);
* and at most one verdict, which ends the attempt: :class:`Answer` (the reply, decoded),
  :class:`Refusal` (the meter answered with an error: final, not retried) or :class:`Unusable`
  (the right reply whose content does not parse or decode: the engine tries again).

Every protocol (DL/T 645, DL/T 698.45, CJ/T 188, ...) implements :class:`ReplyExchange` in its
own package; the engine needs nothing else from it.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Generic, Protocol, TypeVar

from meter_gateway.protocols.deframing import Discarded

__all__ = [
    "HISTORY_LENGTH",
    "Answer",
    "Event",
    "Refusal",
    "Rejected",
    "Rejection",
    "ReplyExchange",
    "RequestHistory",
    "Unusable",
    "Verdict",
    "garbage",
    "until_verdict",
]

HISTORY_LENGTH: Final = 32  # requests remembered per bus for telling late replies from strangers

R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)
F = TypeVar("F")
X = TypeVar("X")


class Rejection(enum.StrEnum):
    ECHO = "echo"  # our own request heard back (RS-485 adapters that hear themselves)
    WRONG_ADDRESS = "wrong_address"  # a valid reply from another meter
    WRONG_FUNCTION = "wrong_function"  # right meter, wrong function code / data identifier
    GARBAGE = "garbage"  # bytes that do not form a valid frame (noise, bad checksum)
    LATE = "late"  # a reply to an earlier request of ours


@dataclass(frozen=True, slots=True)
class Rejected:
    """Bytes that are not the answer to the request in flight."""

    kind: Rejection
    size: int  # bytes
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}" if self.detail else str(self.kind)


@dataclass(frozen=True, slots=True)
class Answer(Generic[R_co]):
    """The reply to the request, as the exchange's caller asked to have it decoded."""

    reply: R_co


@dataclass(frozen=True, slots=True)
class Refusal:
    """The meter answered the request with an error (e.g. a DL/T 645 abnormal reply)."""

    text: str  # one line for logs and operators
    code: int  # the raw error word or exception code
    reasons: tuple[str, ...] = ()  # the code's decoded flag names
    # the refusing answer, for a caller that can act on it (the version a CONNECT-Response names)
    answer: object = None


@dataclass(frozen=True, slots=True)
class Unusable:
    """The reply that answers the request, but its content does not parse or decode."""

    text: str


Verdict = Answer[R] | Refusal | Unusable
Event = Rejected | Answer[R] | Refusal | Unusable


class ReplyExchange(Protocol[R_co]):
    """One request's reply recognition (see the module docstring)."""

    def begin(self) -> None:
        """A new attempt starts (the first and every retry): forget any partial input."""
        ...

    def receive(self, data: bytes) -> Sequence[Event[R_co]]:
        """What ``data`` (the next bytes after the request) holds; a verdict, if any, comes last."""
        ...


def garbage(discarded: Discarded) -> Rejected:
    """What the deframer threw away, as the exchange reports it."""
    return Rejected(Rejection.GARBAGE, len(discarded.data), f"{discarded.reason} {discarded.detail}".strip())


def until_verdict(items: Iterable[F | Discarded], consider: Callable[[F], Event[R]]) -> list[Event[R]]:
    """The events of deframed ``items``: garbage for what was discarded, ``consider(frame)`` for
    each frame, up to and including the first verdict (whatever follows it is the next attempt's
    stale input)."""
    events: list[Event[R]] = []
    for item in items:
        if isinstance(item, Discarded):
            events.append(garbage(item))
            continue
        event = consider(item)
        events.append(event)
        if not isinstance(event, Rejected):
            break
    return events


class RequestHistory(Generic[X]):
    """The requests recently made on one bus, newest last: what tells a reply to one of our
    earlier requests (an attempt given up on, answered late) from a stranger's."""

    __slots__ = ("_recent",)

    def __init__(self, history: int = HISTORY_LENGTH) -> None:
        self._recent: deque[X] = deque(maxlen=history)

    def note(self, expect: X) -> None:
        self._recent.append(expect)

    def answered_earlier(self, current: X, answers: Callable[[X], bool]) -> bool:
        """Whether a reply answers one of the remembered requests other than ``current``."""
        return any(e is not current and answers(e) for e in self._recent)

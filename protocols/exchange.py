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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

__all__ = ["Answer", "Event", "Refusal", "Rejected", "Rejection", "ReplyExchange", "Unusable", "Verdict"]

R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)


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

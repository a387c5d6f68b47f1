"""The counters of one bus, exported by the gateway (see ``Bus.snapshot``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Final

from meter_gateway.protocols.exchange import Rejected, Rejection

__all__ = ["BusCounters"]

# what each rejection adds to, whether it counts its bytes (else 1), and whether it means a bad
# reply rather than silence (an echo or a late reply says nothing about the meter asked)
_REJECTIONS: Final = {
    Rejection.ECHO: ("echo_ignored", False, False),
    Rejection.LATE: ("late_replies", False, False),
    Rejection.GARBAGE: ("garbage_bytes", True, True),
    Rejection.WRONG_ADDRESS: ("mismatched", False, True),
    Rejection.WRONG_FUNCTION: ("mismatched", False, True),
}


@dataclass(slots=True)
class BusCounters:
    sent: int = 0  # requests written (retries included)
    ok: int = 0  # transactions that ended with an answer
    retries: int = 0
    timeouts: int = 0  # attempts that ended at the deadline without an accepted reply
    echo_ignored: int = 0
    mismatched: int = 0  # replies for another address or function
    garbage_bytes: int = 0
    stale_bytes_flushed: int = 0
    late_replies: int = 0
    link_down: int = 0  # transactions failed because the link was down
    no_answer: int = 0  # transactions failed with NoAnswer after all attempts
    bad_reply: int = 0  # transactions failed with BadReply after all attempts
    refused: int = 0  # the meter answered with an error
    offline_skipped: int = 0  # failed fast: meter offline, not due for a probe
    probes: int = 0  # single attempts on offline meters
    unsolicited: int = 0  # frames meters sent on their own (reports, LINK login/heartbeat), heard idle or not

    def rejected(self, r: Rejected) -> bool:
        """Count one rejection; return True if it means a bad reply rather than silence."""
        name, by_size, bad = _REJECTIONS[r.kind]
        setattr(self, name, getattr(self, name) + (r.size if by_size else 1))
        return bad

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

"""The counters of one bus, exported by the gateway (see ``Bus.snapshot``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["BusCounters"]


@dataclass(slots=True)
class BusCounters:
    sent: int = 0  # requests written (retries included)
    ok: int = 0  # transactions (exchanges and jobs) that ended with an answer
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
    jobs: int = 0  # run() jobs started
    jobs_failed: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

"""Jittered, capped exponential backoff for reconnects and transaction retries.

Jitter keeps hundreds of links that failed together (a switch reboot, a power dip on a cabinet)
from retrying in lock-step; the cap bounds how long a returning device waits to be noticed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    """``initial`` is the first delay, each later one is ``factor`` times the last, never above
    ``maximum``; every delay is then spread by +/- ``jitter`` (a fraction), staying <= maximum."""

    initial: float = 0.5
    maximum: float = 30.0
    factor: float = 2.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.initial < 0 or self.maximum < self.initial:
            raise ValueError(f"backoff needs 0 <= initial <= maximum, got {self.initial}, {self.maximum}")
        if self.factor < 1:
            raise ValueError(f"backoff factor must be >= 1, got {self.factor}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"backoff jitter must be in [0, 1), got {self.jitter}")


# One generator for every link's and bus's jitter unless a test passes its own: a Random carries
# its whole state table, and a gateway has hundreds of links and buses.
_JITTER = random.Random()


class Backoff:
    """The delay sequence of one retrying thing (one link, one transaction)."""

    __slots__ = ("_attempt", "_rng", "policy")

    def __init__(self, policy: BackoffPolicy | None = None, *, rng: random.Random | None = None) -> None:
        self.policy = policy or BackoffPolicy()
        self._rng = rng or _JITTER
        self._attempt = 0

    @property
    def attempt(self) -> int:
        """How many delays have been handed out since the last reset."""
        return self._attempt

    def next(self) -> float:
        p = self.policy
        # the exponent is bounded so a link down for weeks cannot overflow the float
        base = min(p.maximum, p.initial * p.factor ** min(self._attempt, 64))
        self._attempt += 1
        spread = base * p.jitter
        delay = base + self._rng.uniform(-spread, spread)
        if delay > p.maximum:
            # reflect rather than clip, so links stuck at the cap stay spread out too
            delay = 2 * p.maximum - delay
        return max(0.0, delay)

    def reset(self) -> None:
        self._attempt = 0

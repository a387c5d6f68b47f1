"""The simulated wall clock shared by every simulated meter of one process.

Simulated time runs at ``speed`` times real (monotonic) time from an anchor and can be set or
stepped: tests reach a midnight by :meth:`SimClock.advance` instead of waiting. Times are naive
local times, as a DL/T 645 meter keeps them. Each meter adds its own drift on top (see
:class:`simulators.dlt645_meter.Dlt645Meter`).
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable


class SimClock:
    """``now() = anchor + (monotonic() - anchor_monotonic) * speed``; settable and steppable."""

    __slots__ = ("_anchor", "_anchor_mono", "_monotonic", "speed")

    def __init__(
        self,
        start: datetime.datetime | None = None,
        speed: float = 1.0,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if speed < 0:
            raise ValueError(f"clock speed must be >= 0, got {speed}")
        self.speed = float(speed)
        self._monotonic = monotonic
        self._anchor = (start or datetime.datetime.now()).replace(tzinfo=None)  # meters keep naive local time
        self._anchor_mono = monotonic()

    def now(self) -> datetime.datetime:
        elapsed = (self._monotonic() - self._anchor_mono) * self.speed
        return self._anchor + datetime.timedelta(seconds=elapsed)

    def set(self, dt: datetime.datetime) -> None:
        """Jump to ``dt`` (naive local time); time keeps running at ``speed`` from there."""
        self._anchor = dt.replace(tzinfo=None)
        self._anchor_mono = self._monotonic()

    def advance(self, seconds: float) -> None:
        """Step simulated time forward (or back, when negative) by ``seconds``."""
        self._anchor += datetime.timedelta(seconds=seconds)

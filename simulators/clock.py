"""The simulated wall clock shared by every simulated meter of one process.

Simulated time runs at ``speed`` times real (monotonic) time from an anchor and can be set or
stepped: tests reach a midnight by :meth:`SimClock.advance` instead of waiting. Times are naive
local times, as a DL/T 645 meter keeps them, in the zone ``tz`` the meters are installed in (the
gateway's ``gateway.timezone``; None: this machine's zone). A meter's clock does not follow the
machine's: a demo of Shanghai meters on a UTC host must still show Shanghai time. Each meter adds
its own drift on top (see :class:`simulators.dlt645_meter.Dlt645Meter`).
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable


def _local(dt: datetime.datetime, tz: datetime.tzinfo | None) -> datetime.datetime:
    """``dt`` as a naive wall time in ``tz``: an aware time is converted, a naive one is taken as is."""
    if dt.tzinfo is not None:
        dt = dt.astimezone(tz)
    return dt.replace(tzinfo=None)


class SimClock:
    """``now() = anchor + (monotonic() - anchor_monotonic) * speed``; settable and steppable."""

    __slots__ = ("_anchor", "_anchor_mono", "_monotonic", "speed", "tz")

    def __init__(
        self,
        start: datetime.datetime | None = None,
        speed: float = 1.0,
        *,
        tz: datetime.tzinfo | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """``start``: the first simulated time (naive: local to ``tz``); default the current
        wall time in ``tz``."""
        if speed < 0:
            raise ValueError(f"clock speed must be >= 0, got {speed}")
        self.speed = float(speed)
        self.tz = tz
        self._monotonic = monotonic
        self._anchor = _local(start or datetime.datetime.now(datetime.UTC), tz)
        self._anchor_mono = monotonic()

    def now(self) -> datetime.datetime:
        elapsed = (self._monotonic() - self._anchor_mono) * self.speed
        return self._anchor + datetime.timedelta(seconds=elapsed)

    def set(self, dt: datetime.datetime) -> None:
        """Jump to ``dt`` (naive: local to ``tz``); time keeps running at ``speed`` from there."""
        self._anchor = _local(dt, self.tz)
        self._anchor_mono = self._monotonic()

    def advance(self, seconds: float) -> None:
        """Step simulated time forward (or back, when negative) by ``seconds``."""
        self._anchor += datetime.timedelta(seconds=seconds)

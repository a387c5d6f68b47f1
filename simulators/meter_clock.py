"""A simulated meter's own clock, and the one instant each request is answered from.

Every simulated meter with a clock (DL/T 645, DL/T 698.45, CJ/T 188) keeps it the same way: the
shared :class:`~simulators.clock.SimClock` plus an offset that time-setting commands change plus
``drift_ppm`` of drift since the offset was set. A real meter answers a request from one reading
of its clock, so while a request is handled "now" is pinned to the request's time.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import TypeVar

from meter_gateway.simulators.clock import SimClock

__all__ = ["MeterClock"]

A = TypeVar("A")
R = TypeVar("R")


class MeterClock:
    """Mixin for a simulated meter: ``clock``, ``drift_ppm``, ``requests`` and ``_request_now``
    are set by the meter's ``__init__``, which calls :meth:`_start_clock`; the meter's
    ``_catch_up`` brings its registers to the meter's present time."""

    clock: SimClock
    drift_ppm: float
    requests: int
    _offset: float  # meter clock minus simulated time, at _drift_anchor
    _drift_anchor: datetime.datetime
    _request_now: datetime.datetime | None

    def _start_clock(self) -> datetime.datetime:
        """Start the meter's clock on simulated time; returns simulated time now."""
        sim_now = self.clock.now()
        self._offset = 0.0
        self._drift_anchor = sim_now
        return sim_now

    def _catch_up(self) -> None:
        raise NotImplementedError

    @property
    def clock_offset(self) -> float:
        """Seconds the meter clock is ahead of simulated time now (its set offset plus drift)."""
        if not self.drift_ppm:  # most meters: no timedelta maths per value read
            return self._offset
        elapsed = (self._sim_now() - self._drift_anchor).total_seconds()
        return self._offset + elapsed * self.drift_ppm * 1e-6

    @clock_offset.setter
    def clock_offset(self, seconds: float) -> None:
        self._offset = float(seconds)
        self._drift_anchor = self.clock.now()

    def _sim_now(self) -> datetime.datetime:
        """Simulated time; one reading serves a whole request (a meter answers from one instant)."""
        return self._request_now or self.clock.now()

    def meter_time(self) -> datetime.datetime:
        offset = self.clock_offset
        now = self._sim_now()
        return now + datetime.timedelta(seconds=offset) if offset else now

    def set_meter_time(self, when: datetime.datetime) -> None:
        """What a time-setting command does: registers run to the old time, then the clock moves
        (and registers catch up to the new time: a step forward over midnight freezes)."""
        self._catch_up()
        sim = self.clock.now()
        self._offset = (when - sim).total_seconds()
        self._drift_anchor = sim
        self._catch_up()

    def _answering(self, now: datetime.datetime | None, answer: Callable[[A], R], request: A) -> R:
        """``answer(request)`` with the meter's "now" pinned to ``now`` (default: the clock's), counted."""
        self.requests += 1
        self._request_now = now or self.clock.now()
        try:
            return answer(request)
        finally:
            self._request_now = None

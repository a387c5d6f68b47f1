"""What the drivers of the byte protocols (DL/T 645, DL/T 698.45, CJ/T 188) do alike when they
turn a meter's answer into :class:`~drivers.reading.Reading` values: a decoded value as a
reading's value, the plausibility check behind ``OUT_OF_RANGE``, and the meter's wall clock.

These meters keep naive local time (no zone, no UTC offset on the wire); ``tz`` is the zone the
meter is set to, None for the host's own.
"""

from __future__ import annotations

import datetime
import math

__all__ = ["from_meter_time", "plain_value", "plausible", "to_meter_time"]


def plain_value(value: object) -> int | float | str:
    """A decoded value as a reading carries it: a flag as 0/1, a number as it is, anything else
    (a date, a bit string, a structure) as its text."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float | str):
        return value
    return str(value)


def plausible(value: float, bounds: tuple[float, float]) -> bool:
    """Whether ``value`` is a finite number within ``bounds`` (else the reading is OUT_OF_RANGE)."""
    low, high = bounds
    return math.isfinite(value) and low <= value <= high


def to_meter_time(when: float, tz: datetime.tzinfo | None) -> datetime.datetime:
    """Unix time as the meter's naive local wall time, to the nearest second."""
    return datetime.datetime.fromtimestamp(round(when), tz).replace(tzinfo=None)


def from_meter_time(local: datetime.datetime, tz: datetime.tzinfo | None) -> float:
    """A meter's naive local wall time as unix time (``tz`` None: the host's zone)."""
    return local.replace(tzinfo=tz).timestamp() if tz is not None else local.timestamp()

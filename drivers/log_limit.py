"""Rate-limited log lines for conditions that repeat in a loop (a refusing meter, a dead link).

One line per kind per interval; the lines held back are counted and the next line carries
``suppressed=N``. Drivers use it directly; the daemon's ``gateway.logs.log_limited`` is this same
limiter, so a kind is limited once however many modules report it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["REPEAT_INTERVAL", "RateLimiter", "limited_kind_ended", "log_limited", "logfmt_value"]

# Seconds between two lines of one repeating kind (the first occurrence is logged at once).
REPEAT_INTERVAL = 60.0


@dataclass(slots=True)
class _Window:
    opened: float
    suppressed: int = 0


class RateLimiter:
    """One line per kind per ``interval`` seconds; the lines that were held back are counted.

    The caller still counts every event in its metrics; this only keeps the journal readable when a
    bus produces garbage hundreds of times a second.
    """

    def __init__(self, interval: float = REPEAT_INTERVAL, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._windows: dict[str, _Window] = {}

    def allow(self, kind: str) -> int | None:
        """None to stay quiet; else the number of events suppressed since the last line of ``kind``."""
        now = self._clock()
        w = self._windows.get(kind)
        if w is None or now - w.opened >= self.interval:
            suppressed = 0 if w is None else w.suppressed
            self._windows[kind] = _Window(now)
            return suppressed
        w.suppressed += 1
        return None

    def log(
        self, logger: logging.Logger, level: int, kind: str, msg: str, *args: object, exc_info: bool = False
    ) -> bool:
        """Log ``msg`` unless ``kind`` was logged within the interval; adds the field ``suppressed=N``."""
        if not logger.isEnabledFor(level):
            return False
        suppressed = self.allow(kind)
        if suppressed is None:
            return False
        # {"fields": ...} is how the gateway's formatters take structured fields (gateway.logs.fields)
        extra = {"fields": {"suppressed": suppressed}} if suppressed else None
        logger.log(level, msg, *args, exc_info=exc_info, extra=extra)
        return True

    def forget(self, kind: str) -> None:
        """The condition behind ``kind`` ended: its next occurrence is logged at once."""
        self._windows.pop(kind, None)


# The process's one limiter: every warning or error that can repeat in a loop goes through
# ``log_limited``, so a condition that lasts is one line when it starts and then one line with a
# count per interval, never one per occurrence.
_LIMITER = RateLimiter()


def log_limited(logger: logging.Logger, level: int, kind: str, msg: str, *args: object, exc_info: bool = False) -> bool:
    """``logger.log(level, msg, *args)`` at most once per :data:`REPEAT_INTERVAL` for ``kind``
    (a short name unique in the process, e.g. ``"outbox.refused"`` or ``"link_lost:bus-a"``); the
    line after a quiet spell carries ``suppressed=N``. Returns whether the line was written."""
    return _LIMITER.log(logger, level, kind, msg, *args, exc_info=exc_info)


def limited_kind_ended(kind: str) -> None:
    """Reset ``kind`` once its condition clears, so a new episode is reported at once."""
    _LIMITER.forget(kind)


def logfmt_value(value: object) -> str:
    """``value`` as one logfmt value: bare when it can be, else double-quoted and escaped, so a
    message like ``"event=x error=%s"`` stays parseable whatever the error says."""
    text = str(value)
    if text and text.isprintable() and not any(c in text for c in ' ="\\'):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'

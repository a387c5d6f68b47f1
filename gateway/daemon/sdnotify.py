"""A tiny sd_notify(3) client: readiness, status, reload, stop and watchdog messages to systemd.

No dependency: the protocol is one datagram of newline-separated KEY=VALUE lines to the AF_UNIX
socket named by $NOTIFY_SOCKET (a path, or an abstract name written with a leading '@').
Everything is a no-op when $NOTIFY_SOCKET is unset, so the daemon runs the same in a terminal.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

__all__ = ["Notifier", "run_watchdog", "watchdog_interval"]

log = logging.getLogger(__name__)


def watchdog_interval(environ: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of $WATCHDOG_USEC, per sd_watchdog_enabled(3)).

    None when the watchdog is off, malformed, or meant for another process ($WATCHDOG_PID).
    """
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    wd_pid = env.get("WATCHDOG_PID")
    if wd_pid is not None and wd_pid != str(os.getpid() if pid is None else pid):
        return None
    return int(usec) / 1_000_000 / 2


class Notifier:
    """Sends notifications; silently does nothing when not started by systemd with Type=notify."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        self._address: str | bytes | None = None
        if raw.startswith("@"):
            self._address = b"\0" + raw[1:].encode()
        elif raw.startswith("/"):
            self._address = raw
        elif raw:
            log.warning("event=sd_notify_ignored reason=unsupported_address notify_socket=%r", raw)
        self._sock: socket.socket | None = None
        self.failures = 0

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, *lines: str) -> bool:
        """Send one datagram; False when disabled or the send failed (never raises: systemd is optional)."""
        if self._address is None:
            return False
        try:
            if self._sock is None:
                # non-blocking: a full socket queue must drop a message, never stall the event loop
                flags = socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                self._sock = socket.socket(socket.AF_UNIX, flags)
            self._sock.sendto("\n".join(lines).encode(), self._address)
        except OSError as exc:
            self.failures += 1
            if self.failures == 1:  # one clear line; systemd itself will act if it misses pings
                log.warning("event=sd_notify_failed error=%r", str(exc))
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def reloading(self) -> bool:
        # Type=notify-reload (systemd 253) needs MONOTONIC_USEC with RELOADING=1; older ones ignore it.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


async def run_watchdog(
    notifier: Notifier,
    interval: float | None,
    alive: Callable[[], bool] = lambda: True,
) -> None:
    """Ping WATCHDOG=1 every ``interval`` seconds while ``alive()`` holds; run as a task, cancel to stop.

    The pings come from the event loop itself, so a stalled loop stops them; ``alive`` adds the
    checks the loop cannot see (e.g. the poll scheduler made progress recently). A failed check
    only skips that ping: systemd restarts us if they stay missing for WatchdogSec.
    """
    if interval is None or not notifier.enabled:
        return
    skipped = False
    while True:
        try:
            ok = alive()
        except Exception:
            log.exception("event=watchdog_check_failed")
            ok = False
        if ok:
            notifier.watchdog()
            if skipped:
                log.info("event=watchdog_resumed")
        elif not skipped:
            log.error("event=watchdog_withheld reason=liveness_check_failed")
        skipped = not ok
        await asyncio.sleep(interval)

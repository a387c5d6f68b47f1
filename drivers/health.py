"""Per-meter health: online / degraded / offline from consecutive failed transactions.

An offline meter is probed at most once per ``probe_interval``; in between, its transactions fail
fast with MeterOffline without touching the wire, so one dead meter cannot eat its bus's time in
reply timeouts. Only answers count: a failed transaction on a link that is down says nothing
about the meter behind it, and a refusal (abnormal reply, Modbus exception) proves the meter is
alive.

A link that stays down (or never opened) past ``link_down_after`` is another matter: nothing
behind it can be read, so the owner of the links reports it (:meth:`HealthBook.link_down`) and its
meters go offline with reason :data:`LINK_DOWN`. Those meters are not held back for a probe: their
reads fail at once on the link anyway, and the first read after the link returns brings them back.
"""

from __future__ import annotations

import enum
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from meter_gateway.drivers.errors import BadReply, DriverError, MeterRefused, NoAnswer
from meter_gateway.drivers.log_limit import logfmt_value

log = logging.getLogger(__name__)


class MeterState(enum.StrEnum):
    UNKNOWN = "unknown"  # no transaction finished yet
    ONLINE = "online"
    DEGRADED = "degraded"
    OFFLINE = "offline"


LINK_DOWN = "link_down"  # the reason of a meter offline because its link is down


class MeterOffline(NoAnswer):
    """The meter is offline and not due for a probe; nothing was sent."""

    kind = "offline"

    def __init__(self, meter_id: str, retry_in: float) -> None:
        super().__init__(f"meter {meter_id} is offline; next probe in {max(retry_in, 0.0):.1f} s")
        self.meter_id = meter_id
        self.retry_in = retry_in


@dataclass(frozen=True, slots=True)
class HealthPolicy:
    degraded_after: int = 1  # consecutive failed transactions
    offline_after: int = 3
    probe_interval: float = 60.0  # seconds between attempts on an offline meter
    link_down_after: float = 30.0  # seconds a link may be down before its meters are offline

    def __post_init__(self) -> None:
        if not 1 <= self.degraded_after <= self.offline_after:
            raise ValueError("health policy needs 1 <= degraded_after <= offline_after")
        if self.probe_interval < 0 or self.link_down_after < 0:
            raise ValueError("health policy probe_interval and link_down_after must be >= 0")


@dataclass(frozen=True, slots=True)
class StateChange:
    meter_id: str
    old: MeterState
    new: MeterState
    failures: int  # consecutive failures at the time of the change
    reason: str  # the error that caused a downgrade, "" for a recovery
    at: float  # the health clock's time


@dataclass(slots=True)
class MeterHealth:
    """A meter with a run of failures (degraded, offline, or online with failures below
    ``degraded_after``). A meter without failures is only its state in the book."""

    meter_id: str
    state: MeterState = MeterState.UNKNOWN
    failures: int = 0  # consecutive
    last_error: str = ""
    next_probe_at: float = 0.0  # meaningful while offline


class HealthBook:
    """Health of every meter the gateway talks to (one book can serve many buses).

    ``on_change`` is called synchronously on each state change; it must not block (the gateway
    queues the publication). ``clock`` is monotonic seconds, injectable for tests.

    Memory: with 10,000 meters this is a per-meter cost, so a meter without failures (unknown or
    online: nearly all of them) is stored as its shared ``MeterState`` member alone; a
    :class:`MeterHealth` exists only while a meter has a run of failures.
    """

    def __init__(
        self,
        policy: HealthPolicy | None = None,
        *,
        on_change: Callable[[StateChange], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy or HealthPolicy()
        self._on_change = on_change
        self._clock = clock
        self._meters: dict[str, MeterState | MeterHealth] = {}

    def get(self, meter_id: str) -> MeterHealth:
        """The meter's health (a copy for a meter without failures; unknown meters are added)."""
        h = self._meters.setdefault(meter_id, MeterState.UNKNOWN)
        return MeterHealth(meter_id, h) if isinstance(h, MeterState) else h

    def state(self, meter_id: str) -> MeterState:
        h = self._meters.setdefault(meter_id, MeterState.UNKNOWN)
        return h if isinstance(h, MeterState) else h.state

    def forget(self, meter_id: str) -> None:
        """Drop a meter that left the configuration (it no longer counts in any state)."""
        self._meters.pop(meter_id, None)

    def states(self) -> dict[str, MeterState]:
        return {m: h if isinstance(h, MeterState) else h.state for m, h in self._meters.items()}

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys((s.value for s in MeterState), 0)
        for h in self._meters.values():
            out[(h if isinstance(h, MeterState) else h.state).value] += 1
        return out

    def check(self, meter_id: str) -> None:
        """Raise MeterOffline if the meter is offline and not due; no side effects."""
        h = self._meters.setdefault(meter_id, MeterState.UNKNOWN)
        if isinstance(h, MeterHealth) and h.state is MeterState.OFFLINE:
            now = self._clock()
            if now < h.next_probe_at:
                raise MeterOffline(meter_id, h.next_probe_at - now)

    def begin(self, meter_id: str) -> bool:
        """Admit a transaction that is about to touch the wire; return True if it is a probe of an
        offline meter (the caller then makes a single attempt). Raise MeterOffline if not due."""
        h = self._meters.setdefault(meter_id, MeterState.UNKNOWN)
        if not isinstance(h, MeterHealth) or h.state is not MeterState.OFFLINE or h.last_error == LINK_DOWN:
            return False
        self.check(meter_id)
        # the probe slot is taken now, so transactions queued behind this one fail fast
        h.next_probe_at = self._clock() + self.policy.probe_interval
        return True

    def record(self, meter_id: str, error: BaseException | None) -> None:
        """Account for a finished transaction: None for success, else the error it ended with."""
        if error is None or isinstance(error, MeterRefused):
            self._success(meter_id)
        elif isinstance(error, MeterOffline):
            return
        elif isinstance(error, NoAnswer | BadReply):
            self._failure(meter_id, error)
        # LinkDown, ConfigurationError and anything else say nothing about the meter

    def link_down(self, meter_id: str) -> None:
        """The meter's link has been down longer than ``link_down_after`` (the caller measures it):
        offline with reason :data:`LINK_DOWN`, unless already offline. Not probe-gated (see the
        module docstring); a success brings it back online."""
        h = self._meters.get(meter_id, MeterState.UNKNOWN)
        if isinstance(h, MeterState):
            h = self._meters[meter_id] = MeterHealth(meter_id, h)
        elif h.state is MeterState.OFFLINE:
            return
        old = h.state
        h.state = MeterState.OFFLINE
        h.last_error = LINK_DOWN
        h.next_probe_at = -math.inf
        self._changed(meter_id, old, h.state, failures=h.failures, reason=LINK_DOWN)

    def _success(self, meter_id: str) -> None:
        h = self._meters.get(meter_id, MeterState.UNKNOWN)
        if h is MeterState.ONLINE:
            return  # the usual case: nothing to change
        old = h if isinstance(h, MeterState) else h.state
        self._meters[meter_id] = MeterState.ONLINE  # a run of failures ends: no MeterHealth kept
        self._changed(meter_id, old, MeterState.ONLINE, failures=0, reason="")

    def _failure(self, meter_id: str, error: DriverError) -> None:
        h = self._meters.get(meter_id, MeterState.UNKNOWN)
        if isinstance(h, MeterState):
            h = self._meters[meter_id] = MeterHealth(meter_id, h)
        h.failures += 1
        h.last_error = str(error)
        p = self.policy
        old = h.state
        if h.failures >= p.offline_after:
            if old is not MeterState.OFFLINE:
                h.next_probe_at = self._clock() + p.probe_interval
            h.state = MeterState.OFFLINE
        elif h.failures >= p.degraded_after:
            h.state = MeterState.DEGRADED
        self._changed(meter_id, old, h.state, failures=h.failures, reason=h.last_error)

    def _changed(self, meter_id: str, old: MeterState, new: MeterState, *, failures: int, reason: str) -> None:
        if old is new:
            return
        change = StateChange(meter_id, old, new, failures, reason, self._clock())
        log.debug(
            "event=meter_health meter=%s from=%s to=%s reason=%s",
            logfmt_value(meter_id),
            old.value,
            new.value,
            logfmt_value(reason or "-"),
        )
        if self._on_change is not None:
            try:
                self._on_change(change)
            except Exception:
                # a broken subscriber must not break acquisition
                log.exception("event=state_callback_crashed meter=%s", logfmt_value(meter_id))

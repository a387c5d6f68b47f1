"""Scheduled meter clock checks and DL/T 645 time sync.

On every :class:`~gateway.schedule.TimeSyncSchedule` slot (``[time_sync] interval`` +
``offset``) :class:`TimeSyncJob` reads each DL/T 645 meter's clock and records its drift
(meter minus gateway). The gateway instant a reading stands for is the middle of the read's
round trip (``(t0 + t1) / 2``); the meter reports whole seconds, truncated, so half a second is
added to what it says. Clock reads go at ``Priority.COMMAND``, one meter at a time per bus, so
the read is not stuck behind queued polls (which would skew the midpoint) and polls still run
between meters.

A meter whose drift exceeds ``max_drift`` gets one log line, and is corrected with the 0x08
time-sync command, which DL/T 645 restricts (2007 clause 6.1 notes; 1997 clause 5.5 notes, as
quoted in public concentrator code: "仅当从站的日历和时钟与主站的时差在±5min以内时执行校时
命令 ... 不能在午夜0时和23时校时 ... 每天只允许校对一次"):

* only a drift within ±5 min (:data:`BROADCAST_LIMIT`) is corrected by 0x08; a meter further
  off ignores it and needs a password write of its clock (04000101/04000102), which is an
  operator's decision: the job raises an alarm (``stats.alarms``, one warning line) and sends
  nothing addressed to that meter (a broadcast for its bus reaches it too; it ignores it);
* never around midnight, when meters freeze: 2007 forbids the 5 min either side of the meter's
  midnight, 1997 the hours 23 and 0. The meter's midnight may be up to 5 min from ours, so
  the job keeps 5 min more away (:func:`sync_allowed`) and defers the sync to the window's end;
* at most once a day per meter: the last sync per meter is kept in the cursor store, so a
  restart does not sync twice. A broadcast reaches every meter of its edition on the bus, so it
  is sent only when none of them was synced that day.

``mode = "broadcast"`` sends one broadcast per bus and edition that has a meter to correct;
``mode = "unicast"`` sends 0x08 to each such meter's own address. Either way the corrected
meters' clocks are read again and a meter still off is logged as ignoring the sync.

If most meters (at least 3) are beyond the ±5 min limit, it is more likely that the gateway's
clock is wrong than all of them: nothing is sent and ``gateway_clock_suspect`` is counted. A
``clock_trusted`` callback (e.g. "NTP is synchronised") can veto syncs too: a billing meter must
never be set from a clock nobody vouches for.

Modbus meters have no time-sync command we use; they are skipped (logged once).

Clock-suspect readings: :meth:`TimeSyncJob.clock_suspect` says whether a meter's last measured
skew (meter minus gateway, whoever is wrong) exceeds ``suspect_drift`` by more than the
measurement's uncertainty, so the poller can OR ``Quality.CLOCK_SUSPECT`` into that meter's
readings. The threshold defaults to :data:`BROADCAST_LIMIT` (the drift at which the job already
raises an alarm); ``[time_sync] suspect_drift`` sets it. The
last drift is reloaded from the cursor store on start. A step of the gateway's own clock (wall
time against the monotonic clock, by more than ``max_drift``) triggers a measurement of every
meter at once (no sync is sent by it), so readings are flagged from the step on, not from the
next scheduled run a day later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, tzinfo
from typing import TYPE_CHECKING, Final, Protocol

from meter_gateway.drivers.bus import Bus, Priority
from meter_gateway.drivers.errors import DriverError
from meter_gateway.gateway.cursors import CursorStore, TimeSyncRecord
from meter_gateway.gateway.schedule import TimeSyncSchedule
from meter_gateway.protocols.dlt645.edition import Edition

if TYPE_CHECKING:
    from meter_gateway.gateway.config import Config

__all__ = [
    "BROADCAST_LIMIT",
    "BroadcastFn",
    "ClockDriver",
    "Measurement",
    "SyncReport",
    "TimeSyncJob",
    "TimeSyncStats",
    "sync_allowed",
]

log = logging.getLogger("meter_gateway")

BROADCAST_LIMIT: Final = 300.0  # ±5 min: the most a 0x08 time sync may correct (see module doc)
# Seconds either side of the meter's midnight when 0x08 must not be sent, by edition.
MIDNIGHT_GUARD: Final = {Edition.DLT645_2007: (300.0, 300.0), Edition.DLT645_1997: (3600.0, 3600.0)}
TRUNCATION: Final = 0.5  # meters report whole seconds, truncated: on average half a second behind
DRIFT_SAMPLES: Final = 4096  # recent |drift| values kept for histograms
SUSPECT_MIN_METERS: Final = 3
DAY: Final = 86400.0


class ClockDriver(Protocol):
    """What the job needs of a meter driver (drivers.dlt645_driver.Dlt645Driver)."""

    meter_id: str
    bus: Bus
    edition: Edition

    async def read_clock(self, *, priority: int = Priority.POLL) -> float: ...

    async def sync_time(self, when: float, *, priority: int = Priority.COMMAND) -> None: ...


BroadcastFn = Callable[[Bus, float, Edition, tzinfo | None], Awaitable[None]]


def sync_allowed(now: float, tz: tzinfo, edition: Edition, margin: float = BROADCAST_LIMIT) -> float | None:
    """None when a 0x08 time sync may be sent at ``now``; else the gateway time it may be sent
    again. ``margin`` widens the forbidden window by how far a meter's midnight may be from ours."""
    before, after = MIDNIGHT_GUARD[edition]
    local = datetime.fromtimestamp(now, tz)
    midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
    since = (local - midnight).total_seconds()
    if since < after + margin:
        return midnight.timestamp() + after + margin
    nxt = datetime.combine(local.date() + timedelta(days=1), datetime.min.time(), tzinfo=tz)
    if nxt.timestamp() - now <= before + margin:
        return nxt.timestamp() + after + margin
    return None


@dataclass(frozen=True, slots=True)
class Measurement:
    meter: str
    drift: float  # meter minus gateway, seconds
    uncertainty: float  # half the read's round trip plus the meter's 1 s resolution / 2
    at: float  # gateway time the drift stands for


@dataclass
class TimeSyncStats:
    runs: int = 0
    measured: int = 0
    syncs: int = 0  # 0x08 commands sent (broadcasts + unicasts)
    broadcasts: int = 0
    unicasts: int = 0
    corrected: int = 0  # meters read back within max_drift after a sync
    ineffective: int = 0  # meters still off after a sync (ignored it)
    deferred: int = 0  # runs whose syncs waited for the midnight window to pass
    gateway_clock_suspect: int = 0
    clock_suspect_meters: int = 0  # meters whose readings are flagged CLOCK_SUSPECT now
    failures: dict[str, int] = field(default_factory=dict)  # clock reads / sends failed, by kind
    skipped: dict[str, int] = field(default_factory=dict)  # syncs not sent, by reason
    last_drift: dict[str, float] = field(default_factory=dict)
    drifts: deque[float] = field(default_factory=lambda: deque(maxlen=DRIFT_SAMPLES))  # recent |drift|
    alarms: dict[str, float] = field(default_factory=dict)  # meter -> drift beyond BROADCAST_LIMIT

    def fail(self, kind: str) -> None:
        self.failures[kind] = self.failures.get(kind, 0) + 1

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + n

    def summary(self) -> dict[str, float]:
        """Count, mean, median, 95th percentile and maximum of the recent |drift| samples."""
        values = sorted(self.drifts)
        if not values:
            return {"count": 0}
        p95 = values[min(len(values) - 1, int(0.95 * len(values)))]
        return {
            "count": len(values),
            "mean": statistics.fmean(values),
            "p50": statistics.median(values),
            "p95": p95,
            "max": values[-1],
        }


@dataclass
class SyncReport:
    """What one run did."""

    measured: dict[str, Measurement] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # meter -> error kind
    sent: list[str] = field(default_factory=list)  # "bus:<name>:<edition>" or "meter:<id>"
    corrected: list[str] = field(default_factory=list)
    ineffective: list[str] = field(default_factory=list)
    alarms: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # meter -> reason no sync was sent
    deferred_until: float | None = None


class TimeSyncJob:
    """Clock checks and time sync on the ``[time_sync]`` schedule; see the module doc.

    ``drivers`` maps meter ids to DL/T 645 drivers, ``buses`` bus names to buses (broadcasts),
    ``clock`` is gateway unix time. ``cursors`` keeps the last sync per meter (once-a-day rule
    across restarts). ``broadcast`` defaults to :func:`drivers.dlt645_driver.broadcast_time`.
    """

    def __init__(
        self,
        config: Config,
        drivers: Mapping[str, ClockDriver],
        buses: Mapping[str, Bus],
        clock: Callable[[], float],
        *,
        cursors: CursorStore | None = None,
        broadcast: BroadcastFn | None = None,
        clock_trusted: Callable[[], bool] | None = None,
        tick: float = 1.0,
        suspect_drift: float | None = None,
    ) -> None:
        self.config = config
        self.buses = buses
        self.clock = clock
        self.cursors = cursors
        self.clock_trusted = clock_trusted
        self.tick = tick
        self.stats = TimeSyncStats()
        self.tz = config.gateway.zone()
        ts = config.time_sync
        self.enabled = ts is not None and ts.enabled
        self.mode = ts.mode if ts is not None else "broadcast"
        self.max_drift = float(ts.max_drift) if ts is not None else 5.0
        self.interval = int(ts.interval) if ts is not None else 86400
        self.offset = float(ts.offset) if ts is not None else 0.0
        if suspect_drift is None:
            suspect_drift = float(ts.suspect_drift) if ts is not None else BROADCAST_LIMIT
        self.suspect_drift = suspect_drift
        self._broadcast = broadcast
        synced: list[str] = []
        for m in config.meters:
            if not m.protocol.startswith("dlt645"):
                log.info("event=time_sync_skipped meter=%s reason='%s meters have no time sync'", m.id, m.protocol)
            elif m.id in drivers:
                synced.append(m.id)
        # usually every driver given, in config order: share that mapping (10,000 entries) then
        self.drivers: Mapping[str, ClockDriver] = (
            drivers if synced == list(drivers) else {meter: drivers[meter] for meter in synced}
        )
        self._synced_at: dict[str, float] = {}
        self._last: dict[str, Measurement] = {}  # latest clock read per meter (incl. read-backs)
        self._suspect: frozenset[str] = frozenset()
        self._loaded = False

    # -- clock-suspect readings ---------------------------------------------------------------

    def clock_suspect(self, meter_id: str) -> bool:
        """True while ``meter_id``'s last measured skew exceeds ``suspect_drift`` (beyond the
        measurement's uncertainty): its readings should carry ``Quality.CLOCK_SUSPECT``."""
        return meter_id in self._suspect

    @property
    def suspect_meters(self) -> frozenset[str]:
        return self._suspect

    def _record(self, m: Measurement) -> None:
        self._last[m.meter] = m
        self.stats.last_drift[m.meter] = m.drift
        self._update_suspect()

    def _update_suspect(self) -> None:
        now = {meter for meter, m in self._last.items() if abs(m.drift) - m.uncertainty > self.suspect_drift}
        for meter in sorted(now - self._suspect):
            log.warning(
                "event=clock_suspect meter=%s drift=%+.1fs threshold=%.0fs action=flag_readings",
                meter,
                self._last[meter].drift,
                self.suspect_drift,
            )
        for meter in sorted(self._suspect - now):
            log.info("event=clock_suspect_cleared meter=%s drift=%+.1fs", meter, self._last[meter].drift)
        self._suspect = frozenset(now)
        self.stats.clock_suspect_meters = len(self._suspect)

    # -- running ------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        if not self.enabled:
            log.info("event=time_sync_disabled")
            return
        await self.load()
        schedule = TimeSyncSchedule(self.interval, self.clock(), offset=min(self.offset, self.interval - 1))
        deferred: float | None = None
        base = self.clock() - time.monotonic()
        while not stop.is_set():
            now = self.clock()
            if abs((now - time.monotonic()) - base) > max(self.max_drift, 1.0):
                log.warning(
                    "event=gateway_clock_step step=%+.1fs action=measure_meter_clocks", now - time.monotonic() - base
                )
                base = now - time.monotonic()
                try:
                    await self.check_clocks()
                except Exception:
                    log.exception("event=time_sync_crashed")
            due = schedule.next_due(now) is not None
            if deferred is not None and (now >= deferred or deferred - now > DAY):  # or the clock went back
                due, deferred = True, None
            if due:
                try:
                    report = await self.sync_once()
                except Exception:  # a bad run must not end time sync for good
                    log.exception("event=time_sync_crashed")
                else:
                    deferred = report.deferred_until
            wake = schedule.next_time() if deferred is None else min(deferred, schedule.next_time())
            delay = min(self.tick, max(0.0, wake - self.clock()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)

    async def load(self) -> None:
        if self._loaded or self.cursors is None:
            return
        self._loaded = True
        records = await asyncio.to_thread(self.cursors.load_time_sync)
        self._synced_at = {m: r.synced_at for m, r in records.items() if r.synced_at is not None}
        for meter, r in records.items():
            if meter in self.drivers and r.drift is not None and meter not in self._last:
                self._last[meter] = Measurement(meter, r.drift, 0.0, r.measured_at or 0.0)
        self._update_suspect()

    async def check_clocks(self) -> SyncReport:
        """Measure every meter's drift now (e.g. after a gateway clock step); never syncs."""
        await self.load()
        report = SyncReport()
        await self._measure_all(list(self.drivers), report)
        await self._persist(report)
        return report

    async def sync_once(self) -> SyncReport:
        """Measure every meter's drift and correct what may be corrected, now."""
        await self.load()
        self.stats.runs += 1
        report = SyncReport()
        await self._measure_all(list(self.drivers), report)
        candidates = self._candidates(report)
        await self._correct(candidates, report)
        await self._persist(report)
        return report

    # -- measuring ----------------------------------------------------------------------------

    async def measure(self, meter: str) -> Measurement:
        """One clock read of ``meter``: its drift from the gateway clock (raises DriverError)."""
        driver = self.drivers[meter]
        t0 = self.clock()
        meter_time = await driver.read_clock(priority=Priority.COMMAND)
        t1 = self.clock()
        mid = (t0 + t1) / 2
        return Measurement(meter, meter_time + TRUNCATION - mid, (t1 - t0) / 2 + TRUNCATION, mid)

    async def _measure_all(self, meters: Sequence[str], report: SyncReport) -> None:
        by_bus: dict[str, list[str]] = {}
        for meter in meters:
            by_bus.setdefault(self.drivers[meter].bus.name, []).append(meter)

        async def one_bus(group: list[str]) -> None:
            for meter in group:
                try:
                    m = await self.measure(meter)
                except DriverError as exc:
                    report.failed[meter] = exc.kind
                    self.stats.fail(exc.kind)
                    log.debug("event=clock_read_failed meter=%s kind=%s detail=%s", meter, exc.kind, exc)
                    continue
                report.measured[meter] = m
                self.stats.measured += 1
                self.stats.drifts.append(abs(m.drift))
                self._record(m)

        await asyncio.gather(*(one_bus(g) for g in by_bus.values()))

    # -- deciding -----------------------------------------------------------------------------

    def _candidates(self, report: SyncReport) -> list[str]:
        """Meters to correct now; everything else over max_drift is logged with the reason."""
        now = self.clock()
        measured = report.measured
        beyond = [m for m, x in measured.items() if abs(x.drift) > BROADCAST_LIMIT]
        for meter in measured:
            if meter not in beyond:
                self.stats.alarms.pop(meter, None)
        suspect = len(measured) >= SUSPECT_MIN_METERS and len(beyond) * 2 > len(measured)
        if suspect:
            self.stats.gateway_clock_suspect += 1
            log.error(
                "event=gateway_clock_suspect meters=%d beyond_limit=%d action=no_time_sync",
                len(measured),
                len(beyond),
            )
        trusted = self.clock_trusted() if self.clock_trusted is not None else True
        window_end = None
        editions = {self.drivers[m].edition for m in measured}
        for edition in editions:
            end = sync_allowed(now, self.tz, edition)
            if end is not None:
                window_end = end if window_end is None else max(window_end, end)
        today = datetime.fromtimestamp(now, self.tz).date()
        out: list[str] = []
        for meter, x in sorted(measured.items()):
            if abs(x.drift) <= self.max_drift:
                continue
            reason = None
            if meter in beyond:
                reason = "beyond_limit"
                report.alarms.append(meter)
                self.stats.alarms[meter] = x.drift
            elif suspect:
                reason = "gateway_clock_suspect"
            elif not trusted:
                reason = "gateway_clock_untrusted"
            elif window_end is not None:
                reason = "midnight_window"
            elif self._synced_today(meter, now, today):
                reason = "already_synced_today"
            action: str = self.mode
            if reason is None:
                out.append(meter)
            else:
                report.skipped[meter] = reason
                self.stats.skip(reason)
                action = "none"
            level = logging.WARNING if reason == "beyond_limit" else logging.INFO
            why = "" if reason is None else f" reason={reason}"
            if reason == "beyond_limit":
                why += " (0x08 corrects at most 5 min: needs a password write of the clock)"
            log.log(
                level,
                "event=clock_drift meter=%s drift=%+.1fs uncertainty=%.1fs max_drift=%.0fs action=%s%s",
                meter,
                x.drift,
                x.uncertainty,
                self.max_drift,
                action,
                why,
            )
        if window_end is not None and any(r == "midnight_window" for r in report.skipped.values()):
            self.stats.deferred += 1
            report.deferred_until = window_end
        return out

    def _synced_today(self, meter: str, now: float, today: date) -> bool:
        at = self._synced_at.get(meter)
        return at is not None and at <= now and datetime.fromtimestamp(at, self.tz).date() == today

    # -- correcting ---------------------------------------------------------------------------

    async def _correct(self, candidates: list[str], report: SyncReport) -> None:
        if not candidates:
            return
        if self.mode == "unicast":
            for meter in candidates:
                try:
                    await self.drivers[meter].sync_time(self.clock(), priority=Priority.COMMAND)
                except DriverError as exc:
                    self.stats.fail(exc.kind)
                    log.warning("event=time_sync_failed meter=%s kind=%s detail=%s", meter, exc.kind, exc)
                    continue
                self.stats.syncs += 1
                self.stats.unicasts += 1
                self._synced_at[meter] = self.clock()
                report.sent.append(f"meter:{meter}")
            sent = [m for m in candidates if f"meter:{m}" in report.sent]
        else:
            sent = await self._broadcast_all(candidates, report)
        await self._verify(sent, report)

    async def _broadcast_all(self, candidates: list[str], report: SyncReport) -> list[str]:
        groups: dict[tuple[str, Edition], list[str]] = {}
        for meter in candidates:
            d = self.drivers[meter]
            groups.setdefault((d.bus.name, d.edition), []).append(meter)
        now = self.clock()
        today = datetime.fromtimestamp(now, self.tz).date()
        broadcast = self._broadcast or _driver_broadcast
        sent: list[str] = []
        for (bus_name, edition), meters in groups.items():
            reached = [m for m, d in self.drivers.items() if d.bus.name == bus_name and d.edition is edition]
            if any(self._synced_today(m, now, today) for m in reached):
                for m in meters:
                    report.skipped[m] = "bus_synced_today"
                self.stats.skip("bus_synced_today", len(meters))
                log.info("event=time_sync_skipped bus=%s reason=bus_synced_today meters=%d", bus_name, len(meters))
                continue
            bus = self.buses.get(bus_name) or self.drivers[meters[0]].bus
            try:
                await broadcast(bus, self.clock(), edition, self.tz)
            except DriverError as exc:
                self.stats.fail(exc.kind)
                log.warning("event=time_sync_failed bus=%s kind=%s detail=%s", bus_name, exc.kind, exc)
                continue
            self.stats.syncs += 1
            self.stats.broadcasts += 1
            at = self.clock()
            for m in reached:
                self._synced_at[m] = at
            report.sent.append(f"bus:{bus_name}:{edition.value}")
            log.info("event=time_sync_broadcast bus=%s edition=%s meters_off=%d", bus_name, edition.value, len(meters))
            sent.extend(meters)
        return sent

    async def _verify(self, meters: list[str], report: SyncReport) -> None:
        """Read the synced meters' clocks again: 0x08 gets no reply, this is the only proof."""
        for meter in meters:
            try:
                m = await self.measure(meter)
            except DriverError as exc:
                self.stats.fail(exc.kind)
                continue
            self._record(m)
            report.measured[meter] = m
            if abs(m.drift) <= self.max_drift:
                report.corrected.append(meter)
                self.stats.corrected += 1
            else:
                report.ineffective.append(meter)
                self.stats.ineffective += 1
                log.warning("event=time_sync_ignored meter=%s drift_after=%+.1fs mode=%s", meter, m.drift, self.mode)

    async def _persist(self, report: SyncReport) -> None:
        if self.cursors is None:
            return
        records = {
            meter: TimeSyncRecord(self._synced_at.get(meter), m.drift, m.at) for meter, m in report.measured.items()
        }
        for meter, at in self._synced_at.items():
            records.setdefault(meter, TimeSyncRecord(at, None, None))
        try:
            await asyncio.to_thread(self.cursors.save_time_sync, records)
        except Exception:  # a state file problem must not stop clock checks
            log.exception("event=cursor_save_failed kind=time_sync")


async def _driver_broadcast(bus: Bus, when: float, edition: Edition, tz: tzinfo | None) -> None:
    from meter_gateway.drivers.dlt645_driver import broadcast_time

    await broadcast_time(bus, when, edition, tz)

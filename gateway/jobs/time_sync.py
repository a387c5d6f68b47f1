"""Scheduled meter clock checks and time sync, for every protocol that can TIME_SYNC.

On every :class:`~gateway.schedule.TimeSyncSchedule` slot (``[time_sync] interval`` +
``offset``) :class:`TimeSyncJob` reads the clock of each meter whose protocol can set its time
(``registry.capable(protocol, Can.TIME_SYNC)``: DL/T 645, DL/T 698.45, CJ/T 188) through the
driver's ``read_clock`` and records its drift
(meter minus gateway). The gateway instant a reading stands for is the middle of the read's
round trip (``(t0 + t1) / 2``); the meter reports whole seconds, truncated, so half a second is
added to what it says. Clock reads go at ``Priority.COMMAND``, one meter at a time per bus, so
the read is not stuck behind queued polls (which would skew the midpoint) and polls still run
between meters.

A meter whose drift exceeds ``max_drift`` gets one log line, and is corrected: by its
protocol's broadcast (the registry's ``MeterProtocol.broadcast_time``: DL/T 645 0x08 to
999999999999, DL/T 698.45 ACTION 4000-127) or by the driver's ``sync_time`` (unicast: DL/T 645
0x08 to the meter, DL/T 698.45 SET 40000200, CJ/T 188). The same policy holds for every
protocol; it comes from DL/T 645, which restricts 0x08 (2007 clause 6.1 notes; 1997 clause 5.5
notes, as quoted in public concentrator code: "仅当从站的日历和时钟与主站的时差在±5min以内时执行校时
命令 ... 不能在午夜0时和23时校时 ... 每天只允许校对一次"):

* only a drift within ±5 min (:data:`BROADCAST_LIMIT`) is corrected by 0x08; a meter further
  off ignores it and needs a password write of its clock (04000101/04000102), which is an
  operator's decision: the job raises an alarm (``stats.alarms``, one warning line) and sends
  nothing addressed to that meter (a broadcast for its bus reaches it too; it ignores it);
* never around midnight, when meters freeze: 2007 forbids the 5 min either side of the meter's
  midnight, 1997 the hours 23 and 0 (the registry's ``midnight_guard``, 5 min unless a protocol
  says otherwise: a DL/T 698.45 meter freezes at midnight too). The meter's midnight may be up
  to 5 min from ours, so the job keeps 5 min more away (:func:`sync_allowed`) and defers the sync to the window's end;
* at most once a day per meter: the last sync per meter is kept in the cursor store, so a
  restart does not sync twice. A broadcast reaches every meter of its protocol on the bus, so it
  is sent only when none of them was synced that day.

``mode = "broadcast"`` sends one broadcast per bus and protocol that has a meter to correct
(meters of a protocol without a broadcast are set one by one); ``mode = "unicast"`` sets each
such meter by its own address. Either way the corrected meters' clocks are read again and a
meter still off is logged as ignoring the sync.

If most meters (at least 3) are beyond the ±5 min limit, it is more likely that the gateway's
clock is wrong than all of them: nothing is sent and ``gateway_clock_suspect`` is counted. A
``clock_trusted`` callback (e.g. "NTP is synchronised") can veto syncs too: a billing meter must
never be set from a clock nobody vouches for.

Meters whose protocol cannot TIME_SYNC (Modbus) are skipped (logged once).

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

from meter_gateway.drivers import registry
from meter_gateway.drivers.bus import Bus, Priority
from meter_gateway.drivers.errors import DriverError
from meter_gateway.gateway.daemon.schedule import TimeSyncSchedule
from meter_gateway.gateway.store.cursors import CursorStore, TimeSyncRecord

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

BROADCAST_LIMIT: Final = 300.0  # ±5 min: the most a time sync may correct (see module doc)
TRUNCATION: Final = 0.5  # meters report whole seconds, truncated: on average half a second behind
DRIFT_SAMPLES: Final = 4096  # recent |drift| values kept for histograms
SUSPECT_MIN_METERS: Final = 3
DAY: Final = 86400.0


class ClockDriver(Protocol):
    """What the job needs of a meter driver: the same for every protocol that can TIME_SYNC."""

    meter_id: str
    bus: Bus

    async def read_clock(self, *, priority: int = Priority.POLL) -> float: ...

    async def sync_time(self, when: float, *, priority: int = Priority.COMMAND) -> None: ...


# (bus, when, tz): set every meter of one protocol on the bus (registry ``broadcast_time``)
BroadcastFn = Callable[[Bus, float, tzinfo | None], Awaitable[None]]


def sync_allowed(now: float, tz: tzinfo, protocol: str, margin: float = BROADCAST_LIMIT) -> float | None:
    """None when a meter of ``protocol`` may have its clock set at ``now``; else the gateway time
    it may be set again. ``margin`` widens the forbidden window by how far a meter's midnight may
    be from ours."""
    before = after = registry.get(protocol).midnight_guard
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
    syncs: int = 0  # time-set commands sent (broadcasts + unicasts)
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
    sent: list[str] = field(default_factory=list)  # "bus:<name>:<protocol>" or "meter:<id>"
    corrected: list[str] = field(default_factory=list)
    ineffective: list[str] = field(default_factory=list)
    alarms: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # meter -> reason no sync was sent
    deferred_until: float | None = None


class TimeSyncJob:
    """Clock checks and time sync on the ``[time_sync]`` schedule; see the module doc.

    ``drivers`` maps meter ids to drivers (those whose protocol cannot TIME_SYNC are left out),
    ``buses`` bus names to buses (broadcasts), ``clock`` is gateway unix time. ``cursors`` keeps
    the last sync per meter (once-a-day rule across restarts). ``broadcasts`` maps protocol
    names to broadcast functions, overriding the registry's ``broadcast_time``.
    """

    def __init__(
        self,
        config: Config,
        drivers: Mapping[str, ClockDriver],
        buses: Mapping[str, Bus],
        clock: Callable[[], float],
        *,
        cursors: CursorStore | None = None,
        broadcasts: Mapping[str, BroadcastFn] | None = None,
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
        self._broadcasts: dict[str, BroadcastFn | None] = dict(broadcasts or {})
        synced: list[str] = []
        # meter -> protocol name; the strings are the config's, shared, not copied per meter
        self._protocol: dict[str, str] = {}
        for m in config.meters:
            if not registry.capable(m.protocol, registry.Can.TIME_SYNC):
                log.info("event=time_sync_skipped meter=%s reason='%s meters have no time sync'", m.id, m.protocol)
            elif m.id in drivers:
                synced.append(m.id)
                self._protocol[m.id] = m.protocol
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

    def _not_now(self, meter: str, window_end: float | None, now: float, today: date) -> str | None:
        """Why a meter the gateway may correct is not corrected now, or None."""
        if window_end is not None:
            return "midnight_window"
        if self._synced_today(meter, now, today):
            return "already_synced_today"
        return None

    def _midnight_window_end(self, now: float, protocols: set[str]) -> float | None:
        """When the latest midnight guard of ``protocols`` ends, or None outside every guard."""
        ends = [end for protocol in protocols if (end := sync_allowed(now, self.tz, protocol)) is not None]
        return max(ends) if ends else None

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
        window_end = self._midnight_window_end(now, {self._protocol[m] for m in measured})
        today = datetime.fromtimestamp(now, self.tz).date()
        out: list[str] = []
        for meter, x in sorted(measured.items()):
            if abs(x.drift) <= self.max_drift:
                continue
            if meter in beyond:
                report.alarms.append(meter)
                self.stats.alarms[meter] = x.drift
            if meter in beyond:
                reason: str | None = "beyond_limit"
            elif suspect or not trusted:
                reason = "gateway_clock_suspect" if suspect else "gateway_clock_untrusted"
            else:
                reason = self._not_now(meter, window_end, now, today)
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
                why += " (a time sync corrects at most 5 min: needs a password write of the clock)"
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
            sent = await self._unicast_all(candidates, report)
        else:
            one_by_one = [m for m in candidates if self._broadcaster(self._protocol[m]) is None]
            sent = await self._broadcast_all([m for m in candidates if m not in one_by_one], report)
            sent += await self._unicast_all(one_by_one, report)
        await self._verify(sent, report)

    def _broadcaster(self, protocol: str) -> BroadcastFn | None:
        if protocol not in self._broadcasts:
            self._broadcasts[protocol] = registry.get(protocol).broadcaster()
        return self._broadcasts[protocol]

    async def _unicast_all(self, meters: list[str], report: SyncReport) -> list[str]:
        sent: list[str] = []
        for meter in meters:
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
            sent.append(meter)
        return sent

    async def _broadcast_all(self, candidates: list[str], report: SyncReport) -> list[str]:
        groups: dict[tuple[str, str], list[str]] = {}
        for meter in candidates:
            groups.setdefault((self.drivers[meter].bus.name, self._protocol[meter]), []).append(meter)
        now = self.clock()
        today = datetime.fromtimestamp(now, self.tz).date()
        sent: list[str] = []
        for (bus_name, protocol), meters in groups.items():
            broadcast = self._broadcaster(protocol)
            assert broadcast is not None  # the caller sends the others one by one
            reached = [m for m, d in self.drivers.items() if d.bus.name == bus_name and self._protocol[m] == protocol]
            if any(self._synced_today(m, now, today) for m in reached):
                for m in meters:
                    report.skipped[m] = "bus_synced_today"
                self.stats.skip("bus_synced_today", len(meters))
                log.info("event=time_sync_skipped bus=%s reason=bus_synced_today meters=%d", bus_name, len(meters))
                continue
            bus = self.buses.get(bus_name) or self.drivers[meters[0]].bus
            try:
                await broadcast(bus, self.clock(), self.tz)
            except DriverError as exc:
                self.stats.fail(exc.kind)
                log.warning("event=time_sync_failed bus=%s kind=%s detail=%s", bus_name, exc.kind, exc)
                continue
            self.stats.syncs += 1
            self.stats.broadcasts += 1
            at = self.clock()
            for m in reached:
                self._synced_at[m] = at
            report.sent.append(f"bus:{bus_name}:{protocol}")
            log.info("event=time_sync_broadcast bus=%s protocol=%s meters_off=%d", bus_name, protocol, len(meters))
            sent.extend(meters)
        return sent

    async def _verify(self, meters: list[str], report: SyncReport) -> None:
        """Read the synced meters' clocks again: a broadcast gets no reply, this is the only proof."""
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

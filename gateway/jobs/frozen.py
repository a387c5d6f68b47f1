"""Frozen reads and backfill: each meter's midnight freeze (or monthly settlement), and what
outages made us miss.

:class:`FrozenJob` runs beside the poller. Every meter of ``[daily_frozen]`` whose protocol
keeps frozen records (``registry.capable(protocol, Can.FROZEN)``: DL/T 645-2007, DL/T 698.45,
CJ/T 188) has its newest freeze read ``delay`` + a per-meter share of ``spread`` after local
midnight (:class:`~gateway.schedule.DailyFrozenSchedule`; monthly meters only on their
settlement dates, see "Freeze calendars") and committed to the outbox with
``Quality.FROZEN`` and ``meter_time`` = the freeze time the meter reports, so the reading id
(``meter/quantity/m<freeze time>``) is the same however often the freeze is read: a re-read
dedupes in the outbox.

Owed freezes
    A freeze is *owed* from the moment the schedule hands it out until its readings are
    committed. Freezes the schedule skipped (the gateway was down: the persisted cursor lags;
    the clock stepped forward) are owed as backfill, up to ``backfill_days`` back. A read that
    fails (meter offline, bus down, garbled reply) leaves the freeze owed: it is retried with
    backoff (``retry_base`` doubling up to ``retry_max``) and committed as backfill
    (``FROZEN | BACKFILLED``) when it succeeds. Owed freezes are kept in the cursor store, so a
    restart loses none. A freeze first read more than ``late_after`` (1 h) after its read time
    (the gateway was down at midnight) is flagged ``BACKFILLED`` too. Backfill reads run at
    ``Priority.BACKFILL`` (behind live polls), one read at a time per bus.

Which record
    The job asks every protocol the same way: the driver's ``read_frozen_day(day, quantities)``
    gives the freeze taken at the meter's midnight starting ``day``, or [] when the meter has
    no such record. How the driver finds it is the protocol's business (DL/T 698.45 selects by
    freeze time; DL/T 645-2007 numbers its records and probes, see
    ``Dlt645Driver.read_frozen_day``; CJ/T 188 counts the settlement back from the meter's
    clock, ``Cjt188Driver.read_frozen_day``). An empty answer for a day the gateway's calendar says is
    frozen is checked against the meter's own clock: a meter that has not reached that midnight
    yet (its clock is behind, or the gateway's clock jumped ahead) is asked again later; one
    that is past it and has no record has lost the day (it was unpowered, or the record is
    older than the meter keeps).

Freeze calendars
    Electricity meters freeze every midnight. A protocol that can also ``Can.SETTLEMENT``
    (CJ/T 188 water, gas and heat meters) keeps monthly records instead, taken at 00:00 of the
    meter's settlement day (its 8103 item) and kept 12 months back: of the days the schedule
    hands out, only the meter's settlement dates are owed, and backfill reaches back over the
    12 settlements the meter keeps (``backfill_days`` is for daily freezes). The settlement day
    is the meter's: it is read (:meth:`SettlementReader.read_settlement_day`) before that
    meter's first plan; until then what the schedule handed out is held (and the saved cursor
    kept before it, so a restart hands it out again). A meter never seen before has its newest
    settlement read at once, as a daily meter has its newest freeze.

Poll slots
    For poll groups with ``backfill = true``, :meth:`FrozenJob.note_missed` takes the poll
    schedule's missed slots. A missed slot that starts exactly at a freeze instant (local
    midnight; for a monthly meter, a settlement instant once its settlement day is known) is
    filled from that freeze: its energies carry ``slot`` = the missed slot. Other
    slots, and quantities a meter does not freeze (voltages, powers...), cannot be filled;
    they are counted (``slots_unfillable``). docs/backfill.md has the whole story.

Meters whose protocol keeps no frozen records (Modbus, DL/T 645-1997) are skipped, each logged
once.
"""

from __future__ import annotations

import asyncio
import calendar
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import TYPE_CHECKING, Final, Protocol

import msgspec

from meter_gateway.drivers import registry
from meter_gateway.drivers.bus import Priority
from meter_gateway.drivers.errors import BadReply, ConfigurationError, DriverError, MeterRefused
from meter_gateway.drivers.reading import Quality, Reading
from meter_gateway.gateway.daemon.schedule import (
    MAX_FROZEN_DAYS,
    DailyFrozenSchedule,
    MissedSlots,
    freeze_time,
    latest_freeze_date,
)
from meter_gateway.gateway.store.cursors import MAX_OWED_PER_METER, CursorStore, OwedFreeze

if TYPE_CHECKING:
    from collections.abc import Callable

    from meter_gateway.drivers.bus import Bus
    from meter_gateway.gateway.config import Config
    from meter_gateway.gateway.store.outbox import AddResult

__all__ = ["FrozenJob", "FrozenReader", "FrozenStats", "ReadingSink", "SettlementReader"]

log = logging.getLogger("meter_gateway")

# a meter clock this little past the freeze's midnight may not have written the record yet
FREEZE_SETTLE: Final = 60.0
MAX_REFUSALS: Final = 3  # a freeze the meter keeps refusing (not "no data") is given up after this
DEFAULT_DELAY: Final = 300.0
DEFAULT_SPREAD: Final = 600.0
DEFAULT_BACKFILL_DAYS: Final = 7


class FrozenReader(Protocol):
    """What the job needs of a meter driver: the same for every protocol that can FROZEN
    (Dlt645Driver, Dlt698Driver). ``read_clock`` tells "not frozen yet" from "lost"."""

    meter_id: str
    bus: Bus

    def frozen_quantities(self) -> tuple[str, ...]: ...

    async def read_frozen_day(
        self, day: date, quantities: Sequence[str], *, priority: int = Priority.POLL
    ) -> list[Reading]: ...

    async def read_clock(self, *, priority: int = Priority.POLL) -> float: ...


class SettlementReader(FrozenReader, Protocol):
    """A driver of a ``Can.SETTLEMENT`` protocol (Cjt188Driver): its records are monthly, on the
    meter's settlement day (``settlement_day``: as last read, None before)."""

    settlements_kept: int  # how many settlements back the meter keeps (CJ/T 188: 12)

    def settlement_dates(self, first: date, last: date) -> list[date] | None:
        """The meter's settlement dates from ``first`` to ``last``, oldest first; None while its
        settlement day has not been read."""
        ...

    async def read_settlement_day(self, *, priority: int = Priority.POLL) -> int: ...


class ReadingSink(Protocol):
    """Where readings are committed: in the daemon, the reading sink bound to the frozen source
    (gateway/daemon/sink.py: clock-suspect flag, metrics, then the outbox); any AsyncOutbox fits."""

    async def add(self, readings: Iterable[Reading]) -> AddResult: ...


@dataclass
class FrozenStats:
    frozen_reads: int = 0  # freezes read on time and committed
    backfilled_days: int = 0  # freezes committed as backfill (missed or retried)
    backfill_failures: int = 0  # failed read attempts of backfill freezes
    read_failures: dict[str, int] = field(default_factory=dict)  # failed attempts by kind (live and backfill)
    lost_days: int = 0  # freezes given up: no longer in the meter, or beyond backfill_days
    rereads: int = 0  # freezes read again whose readings the outbox already had (not counted above)
    committed: int = 0  # readings newly committed
    duplicates: int = 0  # readings the outbox already had (a freeze read twice)
    not_yet: int = 0  # reads that found the meter had not taken the freeze yet (its clock is behind ours)
    slots_filled: int = 0  # missed poll slots filled from a freeze
    slots_unfillable: int = 0  # missed poll slots of backfill groups that no freeze can fill
    skipped_meters: dict[str, str] = field(default_factory=dict)  # meter -> why it has no frozen reads
    owed: int = 0  # freezes owed right now

    def fail(self, kind: str, *, backfill: bool) -> None:
        self.read_failures[kind] = self.read_failures.get(kind, 0) + 1
        if backfill:
            self.backfill_failures += 1


@dataclass
class _Owed:
    backfill: bool
    fills: dict[str, int] = field(default_factory=dict)  # poll group -> missed slot it fills
    attempts: int = 0
    retry_at: float = float("-inf")
    parked: bool = False  # beyond backfill_days by the current clock: not read, not deleted


@dataclass
class _Pending:
    """Days a monthly meter's schedule handed out before its settlement day was known."""

    first: date
    last: date
    backfill: bool
    newest: bool  # the meter's first plan: its newest settlement is owed too
    attempts: int = 0
    retry_at: float = float("-inf")


@dataclass(frozen=True, slots=True)
class _Outcome:
    kind: str  # ok | not_yet | gone | failed | unsupported
    records: Mapping[date, list[Reading]] = field(default_factory=dict)
    error: DriverError | None = None


class FrozenJob:
    """Daily frozen reads, their retries and backfill; see the module doc.

    ``drivers`` maps meter ids to drivers (meters missing from it, or whose protocol cannot
    FROZEN, are skipped);
    ``outbox`` takes the readings; ``clock`` is gateway unix time; ``cursors`` persists the
    schedule cursor and the owed freezes. ``tick`` bounds each sleep (the clock may be stepped).
    """

    def __init__(
        self,
        config: Config,
        drivers: Mapping[str, FrozenReader],
        outbox: ReadingSink,
        clock: Callable[[], float],
        cursors: CursorStore,
        *,
        tick: float = 1.0,
        save_every: float = 30.0,
        retry_base: float = 60.0,
        retry_max: float = 3600.0,
        shutdown_grace: float = 5.0,
        late_after: float = 3600.0,
    ) -> None:
        self.config = config
        self.drivers = drivers
        self.outbox = outbox
        self.clock = clock
        self.cursors = cursors
        self.tick = tick
        self.save_every = save_every
        self.retry_base = retry_base
        self.retry_max = retry_max
        self.shutdown_grace = shutdown_grace
        self.late_after = late_after
        self.stats = FrozenStats()
        self.tz = config.gateway.zone()
        daily = config.daily_frozen
        self.daily_enabled = daily is not None and daily.enabled
        self.delay = float(daily.delay) if daily is not None else DEFAULT_DELAY
        self.spread = float(daily.spread) if daily is not None else DEFAULT_SPREAD
        self.backfill_days = daily.backfill_days if daily is not None else DEFAULT_BACKFILL_DAYS
        self._quantities: dict[str, tuple[str, ...]] = {}
        self._group_quantities = {g.name: tuple(g.quantities) for g in config.poll_groups if g.backfill}
        # every driver's meter classified once here (Config.meter() scans the meter list, and the
        # job asks per meter and day): later a driver's meter not skipped is readable
        protocols = {m.id: m.protocol for m in config.meters}
        for meter_id in drivers:
            self._readable(meter_id, protocols.get(meter_id, "unknown"))
        self._monthly_meters = frozenset(
            m for m in drivers if registry.capable(protocols.get(m, ""), registry.Can.SETTLEMENT)
        )
        self._daily_meters = (
            [m.id for m in config.group_meters(daily) if self._readable(m.id)]
            if daily is not None and self.daily_enabled
            else []
        )
        self.schedule: DailyFrozenSchedule | None = None
        self._owed: dict[str, dict[date, _Owed]] = {}
        self._dirty: set[tuple[str, date]] = set()
        self._tasks: dict[str, asyncio.Task[None]] = {}  # bus name -> the read in flight there
        self._wake = asyncio.Event()
        self._last_save = float("-inf")
        self._loaded = False
        self._pending: dict[str, _Pending] = {}  # monthly meters whose settlement day is not known yet
        self._fresh: set[str] = set()  # monthly meters with no saved cursor: their newest settlement is owed
        self._cursor_moved = False  # the schedule handed something out: save its cursors

    # -- which meters -------------------------------------------------------------------------

    def _readable(self, meter_id: str, protocol: str | None = None) -> bool:
        """Whether a meter keeps frozen records we can read; logs the reason once when not."""
        if meter_id in self.stats.skipped_meters:
            return False
        if protocol is None:
            if meter_id in self.drivers:
                return True  # classified at start
            try:
                protocol = self.config.meter(meter_id).protocol
            except KeyError:
                protocol = "unknown"
        reason = None
        if not registry.capable(protocol, registry.Can.FROZEN):
            title = registry.PROTOCOLS[protocol].title if protocol in registry.PROTOCOLS else protocol
            reason = f"{title} meters keep no frozen records"
        elif meter_id not in self.drivers:
            reason = "no driver"
        if reason is None:
            return True
        self.stats.skipped_meters[meter_id] = reason
        log.info("event=frozen_skipped meter=%s reason=%r", meter_id, reason)
        return False

    def _frozen_quantities(self, meter_id: str) -> tuple[str, ...]:
        qs = self._quantities.get(meter_id)
        if qs is None:
            qs = self._quantities[meter_id] = tuple(self.drivers[meter_id].frozen_quantities())
        return qs

    def _monthly(self, meter_id: str) -> bool:
        """Whether the meter's records are monthly settlements (``Can.SETTLEMENT``)."""
        return meter_id in self._monthly_meters

    def _settlements(self, meter_id: str) -> SettlementReader:
        return self.drivers[meter_id]  # type: ignore[return-value]  # a Can.SETTLEMENT protocol's driver

    def _is_freeze(self, meter_id: str, day: date) -> bool:
        """Whether the meter keeps a record of ``day`` (False when that is not known yet)."""
        if not self._monthly(meter_id):
            return True
        return self._settlements(meter_id).settlement_dates(day, day) == [day]

    # -- owed freezes -------------------------------------------------------------------------

    def owed(self) -> dict[str, list[date]]:
        """Freezes owed per meter, oldest first (for status and tests)."""
        return {m: sorted(days) for m, days in self._owed.items() if days}

    def _add(self, meter: str, day: date, *, backfill: bool, fills: Mapping[str, int] | None = None) -> None:
        if meter in self.stats.skipped_meters:  # found unable to freeze: do not ask it again every day
            return
        days = self._owed.setdefault(meter, {})
        item = days.get(day)
        if item is None:
            item = days[day] = _Owed(backfill)
        else:
            item.backfill = item.backfill or backfill
            item.parked = False
        if fills:
            item.fills.update(fills)
        self._dirty.add((meter, day))
        while len(days) > MAX_OWED_PER_METER:  # by count, never by the clock
            oldest = min(days)
            self._settle(meter, oldest, lost="too many owed freezes")

    def _settle(self, meter: str, day: date, *, lost: str | None = None) -> None:
        item = self._owed.get(meter, {}).pop(day, None)
        self._dirty.add((meter, day))
        if lost is not None and item is not None:
            self.stats.lost_days += 1
            log.warning("event=frozen_lost meter=%s day=%s reason=%r", meter, day.isoformat(), lost)

    def note_missed(self, missed: Iterable[MissedSlots]) -> None:
        """Missed poll slots (``PollSchedule.take_missed()``; also a slot whose live read
        failed) of groups with ``backfill = true``: those at a freeze instant get filled."""
        for m in missed:
            quantities = self._group_quantities.get(m.group)
            if quantities is None:
                continue
            fillable: list[tuple[date, int]] = []
            if self._readable(m.meter):
                frozen = set(self._frozen_quantities(m.meter))
                if frozen.intersection(quantities):
                    fillable = [(d, s) for d, s in self._freeze_slots(m) if self._is_freeze(m.meter, d)]
            window = self._window_start(self.clock(), m.meter)
            kept = [(d, s) for d, s in fillable if d >= window]
            for day, slot in kept:
                self._add(m.meter, day, backfill=True, fills={m.group: slot})
            self.stats.slots_unfillable += m.count - len(kept)
            log.info(
                "event=backfill_slots group=%s meter=%s missed=%d from_freezes=%d unfillable=%d",
                m.group,
                m.meter,
                m.count,
                len(kept),
                m.count - len(kept),
            )

    def _freeze_slots(self, m: MissedSlots) -> list[tuple[date, int]]:
        """(freeze date, slot) for the missed slots that start at a freeze instant."""
        first_day = datetime.fromtimestamp(m.first, self.tz).date()
        last_day = datetime.fromtimestamp(m.last, self.tz).date()
        first_day = max(first_day, last_day - timedelta(days=MAX_FROZEN_DAYS))  # older ones are gone anyway
        out: list[tuple[date, int]] = []
        day = first_day
        while day <= last_day:
            t = freeze_time(day, self.tz)
            if t == int(t) and m.first <= t <= m.last and (int(t) - m.first) % m.interval == 0:
                out.append((day, int(t)))
            day += timedelta(days=1)
        return out

    def _window_start(self, now: float, meter: str | None = None) -> date:
        """The oldest freeze backfill still reads at ``now`` (for ``meter``: a monthly meter's
        reach back is the 12 settlements it keeps, not ``backfill_days``)."""
        latest = latest_freeze_date(now, self.tz)
        if meter is not None and self._monthly(meter) and meter in self.drivers:
            return _months_back(latest, self._settlements(meter).settlements_kept) + timedelta(days=1)
        return latest - timedelta(days=max(1, min(self.backfill_days, MAX_FROZEN_DAYS)) - 1)

    def _plan_monthly(
        self, meter: str, first: date, last: date, now: float, *, backfill: bool, newest: bool = False
    ) -> None:
        """Owe a monthly meter's settlement dates among the days ``first`` .. ``last`` the
        schedule handed out; held in ``_pending`` until its settlement day is known."""
        driver = self._settlements(meter)
        days = driver.settlement_dates(first, last)
        if days is None:
            held = self._pending.get(meter)
            if held is None:
                self._pending[meter] = _Pending(first, last, backfill, newest)
            else:
                held.first, held.last = min(held.first, first), max(held.last, last)
                held.backfill = held.backfill or backfill
                held.newest = held.newest or newest
            return
        late = dict.fromkeys(days, backfill)
        if newest:
            # the newest settlement on or before last (settlement dates are at most 31 days apart)
            for latest in (driver.settlement_dates(last - timedelta(days=30), last) or [])[-1:]:
                late.setdefault(latest, True)  # settled before we first looked: read late
        window = self._window_start(now, meter)
        lost = [d for d in late if d < window]
        if lost:
            self.stats.lost_days += len(lost)
            log.warning(
                "event=frozen_lost meter=%s first=%s days=%d reason='older than the %d settlements a meter keeps'",
                meter,
                min(lost).isoformat(),
                len(lost),
                driver.settlements_kept,
            )
        for day in sorted(late):
            if day >= window:
                self._add(meter, day, backfill=late[day])
        if first < last and any(d >= window for d in late):
            log.info(
                "event=frozen_backfill_planned meter=%s first=%s last=%s settlements=%d",
                meter,
                first.isoformat(),
                last.isoformat(),
                sum(d >= window for d in late),
            )

    # -- running ------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set; in-flight reads get ``shutdown_grace`` seconds to commit,
        and the cursors are saved on the way out."""
        await self.load()
        try:
            while not stop.is_set():
                self._wake.clear()
                now = self.clock()
                self.step(now)
                dirty = self._dirty or self._cursor_moved
                if dirty and time.monotonic() - self._last_save >= self.save_every:
                    await self.save()
                await self._sleep(stop, self._delay(self.clock()))
        finally:
            await self._drain()
            await self.save()

    async def load(self) -> None:
        """Restore the schedule cursor and owed freezes (once)."""
        if self._loaded:
            return
        self._loaded = True
        now = self.clock()
        resume = await asyncio.to_thread(self.cursors.load_frozen, now, self.tz)
        owed = await asyncio.to_thread(self.cursors.load_owed)
        for o in owed:
            if o.meter in self.drivers and self._readable(o.meter):
                item = self._owed.setdefault(o.meter, {}).setdefault(o.day, _Owed(o.backfill))
                item.fills.update(o.fills)
                item.attempts = o.attempts
            else:
                self._dirty.add((o.meter, o.day))  # a meter no longer configured: drop its rows
        self._fresh = {m for m in self._daily_meters if m not in resume and self._monthly(m)}
        if self._daily_meters:
            self.schedule = DailyFrozenSchedule(
                self._daily_meters,
                self.tz,
                now,
                delay=self.delay,
                spread=self.spread,
                resume={m: d for m, d in resume.items() if m in self._daily_meters},
            )
        if owed or resume:
            log.info(
                "event=frozen_resumed cursors=%d owed=%d",
                len(resume),
                sum(len(d) for d in self._owed.values()),
            )

    def step(self, now: float) -> None:
        """Take what the schedule hands out and start reads that are due (no waiting)."""
        if self.schedule is not None:
            for due in self.schedule.next_due(now):
                self._cursor_moved = True
                # first read more than late_after after its time (the gateway was down): backfill
                late = now > due.at + self.late_after
                if self._monthly(due.meter):
                    newest = due.meter in self._fresh
                    self._fresh.discard(due.meter)
                    self._plan_monthly(due.meter, due.freeze_date, due.freeze_date, now, backfill=late, newest=newest)
                else:
                    self._add(due.meter, due.freeze_date, backfill=late)
            window = self._window_start(now)
            for missed in self.schedule.take_missed():
                if self._monthly(missed.meter):
                    self._plan_monthly(missed.meter, missed.first, missed.last, now, backfill=True)
                    continue
                first = max(missed.first, window)
                lost = (first - missed.first).days
                if lost > 0:
                    self.stats.lost_days += lost
                    log.warning(
                        "event=frozen_lost meter=%s first=%s days=%d reason='older than backfill_days=%d'",
                        missed.meter,
                        missed.first.isoformat(),
                        lost,
                        self.backfill_days,
                    )
                day = first
                while day <= missed.last:
                    self._add(missed.meter, day, backfill=True)
                    day += timedelta(days=1)
                if first <= missed.last:
                    log.info(
                        "event=frozen_backfill_planned meter=%s first=%s last=%s",
                        missed.meter,
                        first.isoformat(),
                        missed.last.isoformat(),
                    )
        self._dispatch(now)
        self.stats.owed = sum(len(d) for d in self._owed.values())

    def _dispatch(self, now: float) -> None:
        self._dispatch_learning(now)
        ready: dict[str, tuple[tuple[bool, date, str], str, date]] = {}
        for meter, days in self._owed.items():
            driver = self.drivers.get(meter)
            if driver is None:
                continue
            bus = driver.bus.name
            if bus in self._tasks:
                continue
            window = self._window_start(now, meter)
            for day, item in days.items():
                if day < window:
                    if not item.parked:
                        item.parked = True
                        log.warning(
                            "event=frozen_out_of_reach meter=%s day=%s backfill_days=%d",
                            meter,
                            day.isoformat(),
                            self.backfill_days,
                        )
                    continue
                item.parked = False
                if item.retry_at > now + self.retry_max:  # the clock stepped back: do not wait it out
                    item.retry_at = now
                if item.retry_at > now:
                    continue
                key = (item.backfill, day, meter)
                if bus not in ready or key < ready[bus][0]:
                    ready[bus] = (key, meter, day)
        for bus, (_, meter, day) in ready.items():
            task = asyncio.create_task(self._read(meter, day), name=f"frozen:{meter}:{day.isoformat()}")
            self._tasks[bus] = task
            task.add_done_callback(self._done)

    def _dispatch_learning(self, now: float) -> None:
        """Read the settlement day of monthly meters with handed-out days held for it (before
        their bus's freeze reads: their plan waits on it)."""
        for meter, held in self._pending.items():
            driver = self.drivers.get(meter)
            if driver is None or driver.bus.name in self._tasks:
                continue
            if held.retry_at > now + self.retry_max:  # the clock stepped back
                held.retry_at = now
            if held.retry_at > now:
                continue
            task = asyncio.create_task(self._learn(meter), name=f"frozen:{meter}:settlement-day")
            self._tasks[driver.bus.name] = task
            task.add_done_callback(self._done)

    async def _learn(self, meter: str) -> None:
        """One read of a monthly meter's settlement day; then what was held for it is planned."""
        held = self._pending.get(meter)
        if held is None:
            return
        driver = self._settlements(meter)
        now = self.clock()
        try:
            settlement_day = await driver.read_settlement_day(priority=Priority.BACKFILL)
        except ConfigurationError as exc:
            self.stats.skipped_meters[meter] = str(exc)
            self._pending.pop(meter, None)
            log.warning("event=frozen_skipped meter=%s reason=%r", meter, str(exc))
            return
        except DriverError as exc:
            self.stats.fail(exc.kind, backfill=True)
            held.attempts += 1
            held.retry_at = now + min(self.retry_base * 2 ** (held.attempts - 1), self.retry_max)
            level = logging.WARNING if held.attempts == 1 else logging.DEBUG
            log.log(
                level,
                "event=settlement_day_read_failed meter=%s kind=%s attempts=%d retry_in=%.0f detail=%s",
                meter,
                exc.kind,
                held.attempts,
                held.retry_at - now,
                exc,
            )
            return
        except Exception:  # one meter's bad read must not end the job
            log.exception("event=settlement_day_read_crashed meter=%s", meter)
            held.attempts += 1
            held.retry_at = now + self.retry_max
            return
        self._pending.pop(meter, None)
        log.info("event=settlement_day meter=%s day=%d", meter, settlement_day)
        self._plan_monthly(meter, held.first, held.last, now, backfill=held.backfill, newest=held.newest)

    def _done(self, task: asyncio.Task[None]) -> None:
        for bus, t in list(self._tasks.items()):
            if t is task:
                del self._tasks[bus]
        self._wake.set()

    def _delay(self, now: float) -> float:
        times = [self.schedule.next_time() or now + self.tick] if self.schedule is not None else []
        for meter, days in self._owed.items():
            driver = self.drivers.get(meter)
            # a bus with a read under way waits for that read's end, which wakes the loop: its
            # owed days' past retry times would otherwise make it spin until then
            if driver is None or driver.bus.name in self._tasks:
                continue
            window = self._window_start(now, meter)
            times.extend(i.retry_at for d, i in days.items() if d >= window)
        for meter, held in self._pending.items():
            driver = self.drivers.get(meter)
            if driver is not None and driver.bus.name not in self._tasks:
                times.append(held.retry_at)
        soonest = min(times, default=now + self.tick)
        return min(self.tick, max(0.0, soonest - now))

    async def _sleep(self, stop: asyncio.Event, seconds: float) -> None:
        waiters = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._wake.wait())}
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

    async def _drain(self) -> None:
        tasks = list(self._tasks.values())
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=self.shutdown_grace)
        for t in pending:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def save(self) -> None:
        """Persist the schedule cursor and the owed freezes that changed."""
        dirty, self._dirty = self._dirty, set()
        owed: list[OwedFreeze] = []
        settled: list[tuple[str, date]] = []
        for meter, day in dirty:
            item = self._owed.get(meter, {}).get(day)
            if item is None:
                settled.append((meter, day))
            else:
                owed.append(OwedFreeze(meter, day, item.backfill, dict(item.fills), item.attempts))
        cursors = self.schedule.cursors() if self.schedule is not None else {}
        for meter, held in self._pending.items():  # not planned yet: a restart hands them out again
            if held.newest:
                cursors.pop(meter, None)  # still never planned: a restart starts it afresh
            elif meter in cursors:
                cursors[meter] = min(cursors[meter], held.first)
        moved, self._cursor_moved = self._cursor_moved, False
        try:
            await asyncio.to_thread(self.cursors.save_frozen, cursors, owed=owed, settled=settled)
        except Exception:  # the state file is worth retrying, never worth stopping frozen reads
            self._dirty |= dirty
            self._cursor_moved = self._cursor_moved or moved
            log.exception("event=cursor_save_failed kind=frozen")
            return
        self._last_save = time.monotonic()

    # -- one freeze ---------------------------------------------------------------------------

    async def _read(self, meter: str, day: date) -> None:
        item = self._owed.get(meter, {}).get(day)
        if item is None:
            return
        now = self.clock()
        try:
            outcome = await self._locate(meter, day, now, Priority.BACKFILL if item.backfill else Priority.POLL)
            await self._finish(meter, day, item, outcome, now)
        except Exception:  # one meter's bad day must not end the job
            log.exception("event=frozen_read_crashed meter=%s day=%s", meter, day.isoformat())
            self._retry_later(meter, day, item, now, "internal", None)

    async def _locate(self, meter: str, day: date, now: float, priority: int) -> _Outcome:
        """Read the meter's record of ``day``; without one, whether it is still to come."""
        driver = self.drivers[meter]
        quantities = self._frozen_quantities(meter)
        if not quantities:
            return _Outcome("unsupported")
        if day > latest_freeze_date(now, self.tz):
            return _Outcome("not_yet")  # our clock went back: that midnight is still to come
        try:
            readings = await driver.read_frozen_day(day, quantities, priority=priority)
        except ConfigurationError as exc:
            return _Outcome("unsupported", error=exc)
        except DriverError as exc:
            return _Outcome("failed", error=exc)
        if readings:
            stamp = readings[0].meter_time
            got = datetime.fromtimestamp(stamp, self.tz).date() if stamp is not None else None
            if got != day:
                return _Outcome("failed", error=BadReply(f"asked for the freeze of {day}, the meter gave {got}"))
            return _Outcome("ok", {day: readings})
        try:
            meter_now = await driver.read_clock(priority=priority)
        except DriverError as exc:
            return _Outcome("failed", error=exc)
        if meter_now < freeze_time(day, self.tz) + FREEZE_SETTLE:
            self.stats.not_yet += 1
            log.info("event=frozen_not_yet meter=%s day=%s meter_clock=%.0f", meter, day.isoformat(), meter_now)
            return _Outcome("not_yet")
        return _Outcome("gone")

    async def _finish(self, meter: str, day: date, item: _Owed, outcome: _Outcome, now: float) -> None:
        # every record read that is owed gets committed, the wanted one or a neighbour
        for got, readings in outcome.records.items():
            owed = self._owed.get(meter, {}).get(got)
            if owed is None:
                continue
            result = await self.outbox.add(self._stamped(readings, owed))
            self.stats.committed += result.committed
            self.stats.duplicates += result.duplicates
            if result.refused or result.invalid:
                self._retry_later(meter, got, owed, now, "outbox_refused", None)
                continue
            self._committed(meter, got, owed, fresh=result.committed > 0)
        if outcome.kind == "ok":
            return
        if outcome.kind == "not_yet":
            item.retry_at = now + self.retry_base
            return
        if outcome.kind == "gone":
            self._settle(meter, day, lost="not in the meter (never taken, or older than it keeps)")
            return
        if outcome.kind == "unsupported":
            reason = str(outcome.error) if outcome.error is not None else "no quantities the meter freezes"
            self.stats.skipped_meters[meter] = reason
            log.warning("event=frozen_skipped meter=%s reason=%r", meter, reason)
            for d in list(self._owed.get(meter, {})):
                self._settle(meter, d)
            return
        error = outcome.error
        kind = error.kind if error is not None else "error"
        if isinstance(error, MeterRefused) and item.attempts + 1 >= MAX_REFUSALS:
            self.stats.fail(kind, backfill=item.backfill)
            self._settle(meter, day, lost=f"refused {MAX_REFUSALS} times: {error}")
            return
        self._retry_later(meter, day, item, now, kind, error)

    def _stamped(self, readings: Sequence[Reading], item: _Owed) -> list[Reading]:
        quality = Quality.FROZEN | (Quality.BACKFILLED if item.backfill else Quality.GOOD)
        slot_of: dict[str, int] = {}
        for group, slot in item.fills.items():
            for q in self._group_quantities.get(group, ()):
                slot_of.setdefault(q, slot)
        return [
            msgspec.structs.replace(r, quality=r.quality | quality, slot=slot_of.get(r.quantity, r.slot))
            for r in readings
        ]

    def _committed(self, meter: str, day: date, item: _Owed, *, fresh: bool) -> None:
        if not fresh:
            self.stats.rereads += 1
        elif item.backfill:
            self.stats.backfilled_days += 1
        else:
            self.stats.frozen_reads += 1
        filled = len(item.fills)
        self.stats.slots_filled += filled
        log.info(
            "event=frozen_committed meter=%s day=%s backfill=%s new=%s attempts=%d slots_filled=%d",
            meter,
            day.isoformat(),
            item.backfill,
            fresh,
            item.attempts + 1,
            filled,
        )
        self._settle(meter, day)

    def _retry_later(  # noqa: PLR0917 (private, called from three places)
        self, meter: str, day: date, item: _Owed, now: float, kind: str, error: Exception | None
    ) -> None:
        self.stats.fail(kind, backfill=item.backfill)
        item.attempts += 1
        item.backfill = True  # whatever is read after a failed attempt is read late
        item.retry_at = now + min(self.retry_base * 2 ** (item.attempts - 1), self.retry_max)
        self._dirty.add((meter, day))
        level = logging.WARNING if item.attempts == 1 else logging.DEBUG
        log.log(
            level,
            "event=frozen_read_failed meter=%s day=%s kind=%s attempts=%d retry_in=%.0f detail=%s",
            meter,
            day.isoformat(),
            kind,
            item.attempts,
            item.retry_at - now,
            error,
        )


def _months_back(day: date, months: int) -> date:
    """The same day ``months`` months earlier (the month's last day when it is shorter)."""
    year, month = divmod(day.year * 12 + day.month - 1 - months, 12)
    last = calendar.monthrange(year, month + 1)[1]
    return date(year, month + 1, min(day.day, last))

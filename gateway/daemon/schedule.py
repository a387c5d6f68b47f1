"""When to read what: clock-aligned poll slots, daily frozen reads, time syncs, backfill plans.

Pure: nothing here reads a clock or sleeps. The caller passes unix time (``now``, seconds, UTC
based) into every call and sleeps until :meth:`PollSchedule.next_time` itself.

Alignment
    A group with interval ``I`` (whole seconds) has slots starting at every multiple of ``I``
    seconds since the unix epoch (1970-01-01T00:00Z). Intervals that divide a day (10 s, 1 m,
    15 m, 1 h, 1 d ...) therefore start at :00 of the UTC day and repeat identically every day
    (and at :00 of every local day in zones whose offset is a multiple of the interval, e.g. 15 m
    slots in whole-hour and half-hour zones). Intervals that do not divide a day (7 m, 25 h) are
    still aligned to the epoch, so they drift against midnight from day to day, but every gateway
    and every restart computes the same slot starts. Slots are identified by their start time.

Spread
    Each meter reads a slot at ``slot + offset``, where ``offset`` is a fixed fraction (from a
    hash of the meter id, stable across processes and restarts) of ``spread * interval``, so
    hundreds of meters on a bus do not all ask at :00:00. The read window of a slot ends when the
    next slot starts; a slot whose window passed without being handed out is *missed*.

Clock steps
    A step back never hands out a slot again: each (group, meter) remembers the next slot it
    owes, and waits for the clock to get there. A step back larger than ``resync_after``
    (default 6 h) means the earlier clock was wrong (e.g. a gateway without RTC booted in the
    future and NTP corrected it); waiting that out would stop polling, so the schedule restarts
    from the current slot and counts a clock reset. A step forward makes the skipped slots
    missed, reported as one :class:`MissedSlots` range per (group, meter) so the gateway can
    backfill them.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import struct
from array import array
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta, tzinfo
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from meter_gateway.gateway.config import Config

__all__ = [
    "BackfillPlan",
    "DailyFrozenSchedule",
    "Due",
    "FrozenBackfill",
    "FrozenDue",
    "GroupPlan",
    "MissedDays",
    "MissedSlots",
    "PollSchedule",
    "TimeSyncSchedule",
    "freeze_time",
    "frozen_index",
    "latest_freeze_date",
    "plan_backfill",
    "plan_daily_backfill",
    "slot_start",
    "spread_fraction",
]

DEFAULT_RESYNC_AFTER: Final = 6 * 3600.0
# How late a due read may be handed out so that reads due close together share one wake-up of
# the poller (timer slack): a spread fleet of 1,000 meters a second would otherwise wake it for
# nearly every meter. Never more than half the gap a group leaves between its last offset and the
# end of its read window, so a read the slack delays cannot miss its slot.
MAX_TIMER_SLACK: Final = 0.005
MAX_FROZEN_DAYS: Final = 62  # DL/T 645-2007 meters keep the last 62 daily freezes


def slot_start(t: float, interval: int) -> int:
    """Start of the slot of ``interval`` seconds that contains ``t``."""
    return math.floor(t / interval) * interval


def spread_fraction(meter_id: str) -> float:
    """A fixed number in [0, 1) for a meter id: the same in every process (unlike ``hash``)."""
    digest = hashlib.blake2b(meter_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


@dataclass(frozen=True, slots=True)
class GroupPlan:
    """A poll group as the schedule needs it."""

    name: str
    interval: int  # whole seconds
    meters: tuple[str, ...]
    spread: float = 0.0  # fraction of the interval meters' reads are spread over, [0, 1)
    backfill: bool = False

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise ValueError(f"poll group {self.name}: interval must be >= 1 s, got {self.interval}")
        if not 0 <= self.spread < 1:
            raise ValueError(f"poll group {self.name}: spread must be in [0, 1), got {self.spread}")

    def offset(self, meter_id: str) -> float:
        """Seconds after the slot start at which ``meter_id`` reads this group."""
        return spread_fraction(meter_id) * self.spread * self.interval

    @classmethod
    def from_config(cls, config: Config) -> list[GroupPlan]:
        return [
            cls(
                name=g.name,
                interval=int(g.interval),
                meters=tuple(m.id for m in config.group_meters(g)),
                spread=g.spread,
                backfill=g.backfill,
            )
            for g in config.poll_groups
        ]


@dataclass(frozen=True, slots=True, order=True)
class Due:
    """Read ``group``'s quantities from ``meter`` for the slot starting at ``slot``, at ``at``."""

    at: float
    group: str
    meter: str
    slot: int
    interval: int

    @property
    def deadline(self) -> int:
        """End of the slot's window: a read that has not started by then is missed."""
        return self.slot + self.interval

    def expired(self, now: float) -> bool:
        return now >= self.deadline


@dataclass(frozen=True, slots=True)
class MissedSlots:
    """Consecutive slots ``first`` .. ``last`` (slot starts, inclusive) of a (group, meter) that
    were never handed out."""

    group: str
    meter: str
    first: int
    last: int
    interval: int

    @property
    def count(self) -> int:
        return (self.last - self.first) // self.interval + 1

    def slots(self) -> range:
        return range(self.first, self.last + 1, self.interval)


def _order_key(t: float) -> int:
    """A non-negative int that sorts like the float ``t`` (its IEEE 754 bits, sign-folded)."""
    bits: int = _INT64.unpack(_FLOAT64.pack(t))[0]
    return bits | _SIGN if bits >= 0 else ~bits & _MASK64


_FLOAT64: Final = struct.Struct("<d")
_INT64: Final = struct.Struct("<q")
_SIGN: Final = 1 << 63
_MASK64: Final = (1 << 64) - 1


def _sorted_unique(meters: tuple[str, ...]) -> tuple[str, ...]:
    members = tuple(sorted(set(meters)))
    return meters if members == meters else members  # the plan's own tuple when it already is


class PollSchedule:
    """Hands out (group, meter, slot) reads as their time comes; see the module doc.

    ``resume`` maps (group, meter) to the next slot owed, from :meth:`cursors` of the schedule
    this one replaces (config reload), so a reload neither repeats nor skips slots. Without it a
    (group, meter) starts with the slot in progress, read at once if its time has passed.

    Memory: with 10,000 meters this is a per-meter cost, so each (group, meter) is an index into
    two arrays (its read offset and the next slot it is owed, 16 bytes) and one int in the heap
    that orders the reads by time: ``_order_key(slot + offset)`` with the group and meter
    indexes in its low bits. Groups are indexed by name and meters by id, so reads due at the
    same time come out in the order (group, meter) tuples would sort in.
    """

    def __init__(
        self,
        groups: Iterable[GroupPlan],
        now: float,
        *,
        resume: Mapping[tuple[str, str], int] | None = None,
        resync_after: float = DEFAULT_RESYNC_AFTER,
    ) -> None:
        self.groups: dict[str, GroupPlan] = {}
        for g in groups:
            if g.name in self.groups:
                raise ValueError(f"duplicate poll group {g.name!r}")
            self.groups[g.name] = g
        self.resync_after = resync_after
        self.missed_total = 0  # slots, not ranges
        self._missed: list[MissedSlots] = []
        self.clock_resets = 0
        self._high_water = now
        self._plans = [self.groups[name] for name in sorted(self.groups)]
        self._members = [_sorted_unique(g.meters) for g in self._plans]
        self._offsets = [
            array("d", (g.offset(m) for m in members)) for g, members in zip(self._plans, self._members, strict=True)
        ]
        self._slots = [array("q", bytes(8 * len(members))) for members in self._members]
        self._meter_bits = max((len(members) for members in self._members), default=0).bit_length()
        self._index_bits = self._meter_bits + len(self._plans).bit_length()
        self._heap: list[int] = []
        self.slack = min([MAX_TIMER_SLACK, *(g.interval * (1 - g.spread) / 2 for g in self._plans)])
        self._start(now, resume or {})

    def _key(self, at: float, gi: int, mi: int) -> int:
        return (_order_key(at) << self._index_bits) | (gi << self._meter_bits) | mi

    def _start(self, now: float, resume: Mapping[tuple[str, str], int]) -> None:
        heap = self._heap
        heap.clear()
        for gi, g in enumerate(self._plans):
            current = slot_start(now, g.interval)
            offsets, slots = self._offsets[gi], self._slots[gi]
            for mi, meter in enumerate(self._members[gi]):
                slot = resume.get((g.name, meter))
                if slot is None or slot % g.interval:
                    slot = current  # new, or its interval changed: start with the slot in progress
                slots[mi] = slot
                heap.append(self._key(slot + offsets[mi], gi, mi))
        heapq.heapify(heap)

    def _top(self) -> tuple[float, int, int] | None:
        """(read time, group index, meter index) of the earliest read, or None with no meters."""
        if not self._heap:
            return None
        low = self._heap[0] & ((1 << self._index_bits) - 1)
        gi, mi = low >> self._meter_bits, low & ((1 << self._meter_bits) - 1)
        return self._slots[gi][mi] + self._offsets[gi][mi], gi, mi

    def next_due(self, now: float) -> list[Due]:
        """Reads whose time has come, oldest first; each (group, meter, slot) is returned once.
        Slots whose window has already passed are not returned but recorded as missed."""
        if now < self._high_water - self.resync_after:
            self.clock_resets += 1
            self._high_water = now
            self._start(now, {})
        self._high_water = max(self._high_water, now)
        out: list[Due] = []
        heap = self._heap
        while (top := self._top()) is not None and top[0] <= now:
            at, gi, mi = top
            g, meter, slots = self._plans[gi], self._members[gi][mi], self._slots[gi]
            slot = slots[mi]
            if now >= slot + g.interval:
                current = slot_start(now, g.interval)
                missed = MissedSlots(g.name, meter, slot, current - g.interval, g.interval)
                self._missed.append(missed)
                self.missed_total += missed.count
                nxt = current
            else:
                out.append(Due(at, g.name, meter, slot, g.interval))
                nxt = slot + g.interval
            slots[mi] = nxt
            heapq.heapreplace(heap, self._key(nxt + self._offsets[gi][mi], gi, mi))
        out.sort()
        return out

    def next_time(self) -> float | None:
        """When the next read falls due (None with no meters)."""
        top = self._top()
        return None if top is None else top[0]

    def wake_time(self, now: float) -> float | None:
        """When to call :meth:`next_due` again after a call at ``now`` (None with no meters): the
        next read's time, but not sooner than :attr:`slack` after ``now``, so reads due within
        the slack of each other are handed out together, at most :attr:`slack` late."""
        top = self._top()
        return None if top is None else max(top[0], now + self.slack)

    def take_missed(self) -> list[MissedSlots]:
        """Missed ranges recorded since the last call."""
        missed, self._missed = self._missed, []
        return missed

    def cursors(self) -> dict[tuple[str, str], int]:
        """The next slot each (group, meter) is owed; pass as ``resume`` to a replacement."""
        return {
            (g.name, meter): slot
            for g, members, slots in zip(self._plans, self._members, self._slots, strict=True)
            for meter, slot in zip(members, slots, strict=True)
        }


# ---------------------------------------------------------------------------------------------
# Backfill of interval data


@dataclass(frozen=True, slots=True)
class BackfillPlan:
    """Slots to read back from ``meter``'s memory for ``group``, oldest first; ``dropped`` older
    missing slots are past the cap and will not be fetched (report them as lost)."""

    meter: str
    group: str
    slots: tuple[int, ...]
    dropped: int


def plan_backfill(
    last_committed: Mapping[tuple[str, str], int | None],
    groups: Iterable[GroupPlan],
    now: float,
    *,
    max_slots: int = 2880,
    max_age: float | None = None,
) -> list[BackfillPlan]:
    """Missing past slots of every backfill group, per (meter, group).

    ``last_committed`` maps (meter, group) to the start of the newest slot committed to the
    outbox. Missing are the slots after it up to, not including, the slot in progress (the live
    schedule reads that one). A meter with nothing committed has no history to fill and is left
    out. At most ``max_slots`` (the newest) per meter and group, and none older than ``max_age``
    seconds, are planned: a meter's memory is finite and the oldest records go first.
    """
    plans: list[BackfillPlan] = []
    for g in groups:
        if not g.backfill:
            continue
        current = slot_start(now, g.interval)
        oldest_allowed = -math.inf if max_age is None else now - max_age
        for meter in dict.fromkeys(g.meters):
            last = last_committed.get((meter, g.name))
            if last is None:
                continue
            first = slot_start(last, g.interval) + g.interval
            missing = range(first, current, g.interval)
            if not missing:
                continue
            kept = [s for s in missing[-max_slots:] if max_slots > 0 and s >= oldest_allowed]
            plans.append(BackfillPlan(meter, g.name, tuple(kept), len(missing) - len(kept)))
    return plans


# ---------------------------------------------------------------------------------------------
# Daily frozen data
#
# Meters freeze their registers at local midnight; a freeze is named by the local date whose
# midnight it happened at (its values are the totals at the end of the previous day). DL/T
# 645-2007 keeps the last 62 (05060001..0506003E: 1 = the newest).


def freeze_time(freeze_date: date, tz: tzinfo) -> float:
    """Unix time of the local midnight that starts ``freeze_date``."""
    return datetime(freeze_date.year, freeze_date.month, freeze_date.day, tzinfo=tz).timestamp()


def latest_freeze_date(now: float, tz: tzinfo, delay: float = 0.0) -> date:
    """The newest freeze that is ``delay`` seconds old at ``now``."""
    d = datetime.fromtimestamp(now, tz).date()
    if now < freeze_time(d, tz) + delay:
        d -= timedelta(days=1)
    return d


def frozen_index(freeze_date: date, latest: date) -> int:
    """The meter's record number of a freeze: 1 for ``latest``, 2 for the day before, ..."""
    return (latest - freeze_date).days + 1


@dataclass(frozen=True, slots=True, order=True)
class FrozenDue:
    at: float
    meter: str
    freeze_date: date


@dataclass(frozen=True, slots=True)
class MissedDays:
    """Freezes ``first`` .. ``last`` (inclusive) of ``meter`` that the schedule skipped (the
    gateway was down, or the clock stepped); backfill reads them from the meter's memory."""

    meter: str
    first: date
    last: date

    @property
    def count(self) -> int:
        return (self.last - self.first).days + 1


class DailyFrozenSchedule:
    """Reads each meter's newest daily freeze once, ``delay`` plus a per-meter share of
    ``spread`` seconds after local midnight in ``tz`` (the meters' clock zone). Clock steps are
    handled as in :class:`PollSchedule`."""

    def __init__(
        self,
        meters: Iterable[str],
        tz: tzinfo,
        now: float,
        *,
        delay: float = 300.0,
        spread: float = 600.0,
        resume: Mapping[str, date] | None = None,
        resync_after: float = DEFAULT_RESYNC_AFTER,
    ) -> None:
        self.tz = tz
        self.delay = delay
        self.spread = spread
        self.resync_after = resync_after
        self.clock_resets = 0
        self._meters = tuple(dict.fromkeys(meters))
        self._missed: list[MissedDays] = []
        self._high_water = now
        self._next: dict[str, date] = {}
        self._start(now, resume or {})

    def _start(self, now: float, resume: Mapping[str, date]) -> None:
        for meter in self._meters:
            owed = resume.get(meter)
            # without history, start with the newest freeze (read at once); older ones are backfill's
            self._next[meter] = owed if owed is not None else self._latest(meter, now)

    def read_time(self, meter: str, freeze_date: date) -> float:
        return freeze_time(freeze_date, self.tz) + self.delay + spread_fraction(meter) * self.spread

    def _latest(self, meter: str, now: float) -> date:
        """The newest freeze whose read time for ``meter`` has come."""
        return latest_freeze_date(now, self.tz, self.delay + spread_fraction(meter) * self.spread)

    def next_due(self, now: float) -> list[FrozenDue]:
        if now < self._high_water - self.resync_after:
            self.clock_resets += 1
            self._high_water = now
            self._start(now, {})
        self._high_water = max(self._high_water, now)
        out: list[FrozenDue] = []
        for meter in self._meters:
            owed = self._next[meter]
            latest = self._latest(meter, now)
            if latest < owed:
                continue
            if latest > owed:
                self._missed.append(MissedDays(meter, owed, latest - timedelta(days=1)))
            out.append(FrozenDue(self.read_time(meter, latest), meter, latest))
            self._next[meter] = latest + timedelta(days=1)
        out.sort()
        return out

    def next_time(self) -> float | None:
        return min((self.read_time(m, d) for m, d in self._next.items()), default=None)

    def take_missed(self) -> list[MissedDays]:
        missed, self._missed = self._missed, []
        return missed

    def cursors(self) -> dict[str, date]:
        return dict(self._next)


@dataclass(frozen=True, slots=True)
class FrozenBackfill:
    """Freezes to read back from ``meter``, oldest first (they leave its memory first);
    ``dropped`` missing older ones are no longer in the meter."""

    meter: str
    dates: tuple[date, ...]
    dropped: int


def plan_daily_backfill(
    last_committed: Mapping[str, date | None],
    meters: Iterable[str],
    now: float,
    tz: tzinfo,
    *,
    delay: float = 300.0,
    max_days: int = MAX_FROZEN_DAYS,
    initial_days: int = 0,
) -> list[FrozenBackfill]:
    """Missing daily freezes per meter, before the newest one (the live schedule's).

    ``last_committed`` maps a meter to its newest committed freeze date. A meter with none gets
    its ``initial_days`` freezes before the newest. At most ``max_days`` back from the newest
    freeze are planned (capped at the 62 a DL/T 645-2007 meter keeps).
    """
    max_days = min(max_days, MAX_FROZEN_DAYS)
    latest = latest_freeze_date(now, tz, delay)
    oldest_kept = latest - timedelta(days=max_days - 1)
    plans: list[FrozenBackfill] = []
    for meter in dict.fromkeys(meters):
        last = last_committed.get(meter)
        first = latest - timedelta(days=initial_days) if last is None else last + timedelta(days=1)
        if first >= latest:
            continue
        missing = [first + timedelta(days=i) for i in range((latest - first).days)]
        kept = tuple(d for d in missing if d >= oldest_kept)
        plans.append(FrozenBackfill(meter, kept, len(missing) - len(kept)))
    return plans


# ---------------------------------------------------------------------------------------------
# Time synchronisation


class TimeSyncSchedule:
    """One clock sync per ``interval`` (aligned like poll slots), ``offset`` seconds into it.
    Missed syncs are not caught up (only the newest matters); a step back does not repeat one."""

    def __init__(
        self, interval: int, now: float, *, offset: float = 0.0, resync_after: float = DEFAULT_RESYNC_AFTER
    ) -> None:
        if interval < 1 or not 0 <= offset < interval:
            raise ValueError(f"time sync needs interval >= 1 s and 0 <= offset < interval, got {interval}, {offset}")
        self.interval = interval
        self.offset = offset
        self.resync_after = resync_after
        self.clock_resets = 0
        self._high_water = now
        self._next = slot_start(now, interval)  # a sync at start-up if this slot's time has come

    def next_due(self, now: float) -> int | None:
        """The slot to sync for now, or None; each slot at most once."""
        if now < self._high_water - self.resync_after:
            self.clock_resets += 1
            self._high_water = now
            self._next = slot_start(now, self.interval)
        self._high_water = max(self._high_water, now)
        if now < self._next + self.offset:
            return None
        slot = slot_start(now - self.offset, self.interval)
        self._next = slot + self.interval
        return slot

    def next_time(self) -> float:
        return self._next + self.offset

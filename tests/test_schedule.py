"""Poll slot planning, missed slots, clock steps, backfill plans, daily freezes and time sync."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, date, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meter_gateway.gateway.config import load_config
from meter_gateway.gateway.daemon.schedule import (
    MAX_TIMER_SLACK,
    DailyFrozenSchedule,
    Due,
    GroupPlan,
    MissedSlots,
    PollSchedule,
    TimeSyncSchedule,
    freeze_time,
    frozen_index,
    latest_freeze_date,
    plan_backfill,
    plan_daily_backfill,
    slot_start,
    spread_fraction,
)

SHANGHAI = ZoneInfo("Asia/Shanghai")
T0 = datetime(2026, 3, 10, 8, 0, tzinfo=UTC).timestamp()  # a quarter-hour boundary
METERS = tuple(f"meter-{i:03d}" for i in range(20))


def run(schedule: PollSchedule, start: float, end: float, step: float) -> list[Due]:
    """Everything handed out while time walks from ``start`` to ``end``."""
    out: list[Due] = []
    t = start
    while t <= end:
        out += schedule.next_due(t)
        t += step
    return out


def keys(dues: list[Due]) -> list[tuple[str, str, int]]:
    return [(d.group, d.meter, d.slot) for d in dues]


# -- alignment and spread ---------------------------------------------------------------------


def test_slots_align_to_the_clock() -> None:
    g = GroupPlan("billing", 900, METERS, spread=0.1)
    s = PollSchedule([g], T0 + 1)
    dues = run(s, T0 + 1, T0 + 3 * 900 + 90, 5)
    assert {d.slot for d in dues} == {T0, T0 + 900, T0 + 1800, T0 + 2700}
    for d in dues:
        assert d.slot % 900 == 0
        assert datetime.fromtimestamp(d.slot, UTC).minute in (0, 15, 30, 45)
        assert d.slot <= d.at < d.slot + 0.1 * 900
        assert d.deadline == d.slot + 900


def test_slot_start_for_interval_not_dividing_a_day() -> None:
    # 7 minutes: aligned to the epoch, so the same in every process, not to midnight
    assert slot_start(7 * 60 * 1000 + 5, 420) == 7 * 60 * 1000
    midnight = datetime(2026, 3, 10, tzinfo=UTC).timestamp()
    assert slot_start(midnight, 420) != midnight


def test_each_slot_is_handed_out_once() -> None:
    g = GroupPlan("live", 10, METERS[:5], spread=0.5)
    s = PollSchedule([g], T0)
    dues = run(s, T0, T0 + 600, 0.7)
    counts = Counter(keys(dues))
    assert max(counts.values()) == 1
    assert len(counts) == 5 * 60  # every slot of every meter: none lost either
    assert s.take_missed() == []


def test_spread_is_deterministic_and_spreads() -> None:
    g = GroupPlan("g", 60, tuple(f"m{i}" for i in range(200)), spread=0.5)
    offsets = [g.offset(m) for m in g.meters]
    assert all(0 <= o < 30 for o in offsets)
    assert offsets == [GroupPlan("g", 60, g.meters, spread=0.5).offset(m) for m in g.meters]
    per_second = Counter(int(o) for o in offsets)
    assert len(per_second) >= 25  # 200 meters over 30 s: not a stampede
    assert max(per_second.values()) <= 20
    assert spread_fraction("meter-1") == spread_fraction("meter-1")
    assert spread_fraction("meter-1") != spread_fraction("meter-2")


def test_zero_spread_reads_at_slot_start() -> None:
    s = PollSchedule([GroupPlan("g", 60, METERS, spread=0.0)], T0)
    dues = s.next_due(T0)
    assert len(dues) == len(METERS)
    assert {d.at for d in dues} == {T0}


def test_next_time_is_the_earliest_due() -> None:
    g = GroupPlan("g", 60, METERS, spread=0.5)
    s = PollSchedule([g], T0)
    first = s.next_time()
    assert first == min(T0 + g.offset(m) for m in METERS)
    assert s.next_due(first - 0.001) == []
    assert len(s.next_due(first)) >= 1


def test_wake_time_coalesces_close_reads_without_missing_a_slot() -> None:
    """Walking the clock by wake_time: a thousand meters spread over a second share a few hundred
    wake-ups, none is handed out more than the slack late, and none misses its slot, even with a
    spread that leaves almost no room before the window's end."""
    meters = tuple(f"m{i:04d}" for i in range(1000))
    for spread in (0.5, 0.999):
        g = GroupPlan("g", 1, meters, spread=spread)
        s = PollSchedule([g], T0)
        assert 0 < s.slack <= MAX_TIMER_SLACK
        assert s.slack <= (1 - spread) / 2
        t, wakes, dues = T0, 0, []
        while t < T0 + 3:
            got = s.next_due(t)
            for d in got:
                assert d.at <= t <= d.at + s.slack + 1e-9
            dues += got
            wakes += 1
            nxt = s.wake_time(t)
            assert nxt is not None
            assert nxt >= t + s.slack
            t = nxt
        assert s.missed_total == 0
        assert Counter(d.meter for d in dues if d.slot < T0 + 3) == dict.fromkeys(meters, 3)
        assert wakes <= 3 * (1 / s.slack + 1)
    assert PollSchedule([], T0).wake_time(T0) is None


def test_start_mid_slot_reads_current_slot_at_once() -> None:
    s = PollSchedule([GroupPlan("g", 900, ("a",), spread=0.0)], T0 + 400)
    assert keys(s.next_due(T0 + 400)) == [("g", "a", T0)]


def test_two_groups_are_independent() -> None:
    s = PollSchedule([GroupPlan("fast", 10, ("a",)), GroupPlan("slow", 60, ("a",))], T0)
    dues = run(s, T0, T0 + 59, 1)
    assert Counter(d.group for d in dues) == {"fast": 6, "slow": 1}


def test_invalid_group() -> None:
    with pytest.raises(ValueError, match="spread"):
        GroupPlan("g", 60, ("a",), spread=1.0)
    with pytest.raises(ValueError, match="interval"):
        GroupPlan("g", 0, ("a",))
    with pytest.raises(ValueError, match="duplicate"):
        PollSchedule([GroupPlan("g", 60, ()), GroupPlan("g", 10, ())], T0)


# -- missed slots and clock steps -------------------------------------------------------------


def test_stalled_loop_misses_slots_and_says_which() -> None:
    g = GroupPlan("g", 60, ("a", "b"), spread=0.0)
    s = PollSchedule([g], T0)
    assert len(s.next_due(T0)) == 2  # slot T0 read
    dues = s.next_due(T0 + 60 * 4 + 10)  # stalled for four minutes
    assert keys(dues) == [("g", "a", T0 + 240), ("g", "b", T0 + 240)]
    missed = sorted(s.take_missed(), key=lambda m: m.meter)
    assert [(m.meter, m.first, m.last, m.count) for m in missed] == [
        ("a", T0 + 60, T0 + 180, 3),
        ("b", T0 + 60, T0 + 180, 3),
    ]
    assert list(missed[0].slots()) == [T0 + 60, T0 + 120, T0 + 180]
    assert s.missed_total == 6
    assert s.take_missed() == []


def test_late_but_within_window_is_not_missed() -> None:
    s = PollSchedule([GroupPlan("g", 60, ("a",), spread=0.0)], T0)
    s.next_due(T0)
    assert keys(s.next_due(T0 + 60 + 59)) == [("g", "a", T0 + 60)]  # late, window still open
    assert s.take_missed() == []


def test_clock_jump_forward_marks_skipped_slots_missed() -> None:
    g = GroupPlan("billing", 900, ("a",), spread=0.1)
    s = PollSchedule([g], T0)
    before = run(s, T0, T0 + 900 + 90, 10)
    assert [d.slot for d in before] == [T0, T0 + 900]
    jumped = T0 + 900 + 3 * 3600 + 1  # NTP steps the clock 3 h forward
    after = s.next_due(jumped + g.offset("a"))
    assert [d.slot for d in after] == [T0 + 900 + 3 * 3600]
    (missed,) = s.take_missed()
    assert (missed.first, missed.last, missed.count) == (T0 + 1800, T0 + 900 + 3 * 3600 - 900, 11)
    assert s.clock_resets == 0


def test_clock_jump_back_does_not_rerun_slots() -> None:
    g = GroupPlan("g", 60, METERS[:3], spread=0.3)
    s = PollSchedule([g], T0)
    dues = run(s, T0, T0 + 600, 1)
    dues += run(s, T0 + 600 - 3600, T0 + 900 + 20, 7)  # clock stepped back one hour, then runs on
    counts = Counter(keys(dues))
    assert max(counts.values()) == 1
    for m in METERS[:3]:
        slots = sorted(slot for _, meter, slot in counts if meter == m)
        assert slots == list(range(int(T0), int(T0) + 900 + 1, 60))  # contiguous, no gap either
    assert s.take_missed() == []
    assert s.clock_resets == 0


def test_huge_jump_back_resets_instead_of_stopping() -> None:
    g = GroupPlan("g", 60, ("a",), spread=0.0)
    wrong = T0 + 5 * 365 * 86400  # booted with a clock five years ahead
    s = PollSchedule([g], wrong)
    assert [d.slot for d in s.next_due(wrong)] == [slot_start(wrong, 60)]
    dues = s.next_due(T0)  # NTP corrects it
    assert [d.slot for d in dues] == [T0]
    assert s.clock_resets == 1
    assert [d.slot for d in run(s, T0 + 1, T0 + 120, 1)] == [T0 + 60, T0 + 120]


def test_resume_continues_without_repeat_or_gap() -> None:
    groups = [GroupPlan("g", 60, ("a", "b"), spread=0.2)]
    s1 = PollSchedule(groups, T0)
    first = run(s1, T0, T0 + 300, 1)
    s2 = PollSchedule(groups, T0 + 301, resume=s1.cursors())
    second = run(s2, T0 + 301, T0 + 600 + 15, 1)
    combined = Counter(keys(first + second))
    assert max(combined.values()) == 1
    assert len(combined) == 2 * 11
    # a changed interval does not inherit misaligned cursors
    s3 = PollSchedule([GroupPlan("g", 7, ("a",))], T0 + 301, resume={("g", "a"): int(T0) + 600})
    assert s3.cursors()[("g", "a")] == slot_start(T0 + 301, 7)


def test_expired() -> None:
    d = Due(T0 + 1, "g", "a", int(T0), 60)
    assert not d.expired(T0 + 59.9)
    assert d.expired(T0 + 60)


# -- backfill of interval data ------------------------------------------------------------------


def test_plan_backfill_lists_missing_slots() -> None:
    g = GroupPlan("billing", 900, ("a", "b", "c"), backfill=True)
    other = GroupPlan("live", 10, ("a",), backfill=False)
    now = T0 + 4 * 900 + 100  # slot in progress: T0 + 3600
    last = {("a", "billing"): int(T0), ("b", "billing"): int(T0) + 2700, ("a", "live"): int(T0)}
    plans = plan_backfill(last, [g, other], now)
    by_meter = {p.meter: p for p in plans}
    assert set(by_meter) == {"a"}  # b is up to date, c has no history, live does not backfill
    assert by_meter["a"].group == "billing"
    assert by_meter["a"].slots == (T0 + 900, T0 + 1800, T0 + 2700)
    assert by_meter["a"].dropped == 0


def test_plan_backfill_caps() -> None:
    g = GroupPlan("billing", 900, ("a",), backfill=True)
    now = T0 + 100 * 900
    (plan,) = plan_backfill({("a", "billing"): int(T0)}, [g], now, max_slots=10)
    assert plan.slots == tuple(range(int(T0) + 90 * 900, int(T0) + 100 * 900, 900))
    assert plan.dropped == 89
    (plan,) = plan_backfill({("a", "billing"): int(T0)}, [g], now, max_age=3600)
    assert plan.slots[0] >= now - 3600
    assert len(plan.slots) + plan.dropped == 99


def test_plan_backfill_after_clock_back_plans_nothing() -> None:
    g = GroupPlan("billing", 900, ("a",), backfill=True)
    assert plan_backfill({("a", "billing"): int(T0) + 9000}, [g], T0) == []


# -- daily frozen data ---------------------------------------------------------------------------


def shanghai(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> float:
    return datetime(year, month, day, hour, minute, tzinfo=SHANGHAI).timestamp()


def test_latest_freeze_date_uses_meter_zone_and_delay() -> None:
    assert latest_freeze_date(shanghai(2026, 3, 10, 0, 3), SHANGHAI, 300) == date(2026, 3, 9)
    assert latest_freeze_date(shanghai(2026, 3, 10, 0, 5), SHANGHAI, 300) == date(2026, 3, 10)
    # 16:10 UTC is already 00:10 next day in Shanghai
    utc = datetime(2026, 3, 9, 16, 10, tzinfo=UTC).timestamp()
    assert latest_freeze_date(utc, SHANGHAI, 300) == date(2026, 3, 10)
    assert latest_freeze_date(utc, ZoneInfo("UTC"), 300) == date(2026, 3, 9)


def test_freeze_time_across_dst() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    # 2026-03-29 is 23 hours long in Berlin
    assert freeze_time(date(2026, 3, 30), berlin) - freeze_time(date(2026, 3, 29), berlin) == 23 * 3600
    assert freeze_time(date(2026, 3, 29), berlin) == datetime(2026, 3, 28, 23, 0, tzinfo=UTC).timestamp()


def test_frozen_index() -> None:
    assert frozen_index(date(2026, 3, 10), date(2026, 3, 10)) == 1
    assert frozen_index(date(2026, 1, 8), date(2026, 3, 10)) == 62


def test_daily_frozen_reads_once_per_day_after_delay() -> None:
    meters = ("a", "b", "c")
    start = shanghai(2026, 3, 10, 12, 0)
    s = DailyFrozenSchedule(meters, SHANGHAI, start, delay=300, spread=600)
    first = s.next_due(start)  # start-up: today's freeze at once
    assert {(d.meter, d.freeze_date) for d in first} == {(m, date(2026, 3, 10)) for m in meters}
    assert s.next_due(start + 3600) == []
    nxt = s.next_time()
    assert nxt is not None
    assert shanghai(2026, 3, 11, 0, 5) <= nxt < shanghai(2026, 3, 11, 0, 15)
    reads = []
    t = shanghai(2026, 3, 11, 0, 0)
    while t < shanghai(2026, 3, 11, 1, 0):
        reads += s.next_due(t)
        t += 20
    assert sorted(d.meter for d in reads) == list(meters)
    assert {d.freeze_date for d in reads} == {date(2026, 3, 11)}
    for d in reads:
        assert shanghai(2026, 3, 11, 0, 5) <= d.at < shanghai(2026, 3, 11, 0, 15)
    assert s.take_missed() == []


def test_daily_frozen_jump_forward_and_back() -> None:
    start = shanghai(2026, 3, 10, 12, 0)
    s = DailyFrozenSchedule(("a",), SHANGHAI, start, delay=300, spread=0)
    s.next_due(start)
    later = shanghai(2026, 3, 14, 1, 0)  # down (or clock stepped) for four days
    assert [d.freeze_date for d in s.next_due(later)] == [date(2026, 3, 14)]
    (missed,) = s.take_missed()
    assert (missed.first, missed.last, missed.count) == (date(2026, 3, 11), date(2026, 3, 13), 3)
    # the clock steps back past midnight: the 14th is not read again
    assert s.next_due(shanghai(2026, 3, 13, 23, 0)) == []
    assert s.next_due(shanghai(2026, 3, 14, 2, 0)) == []
    assert [d.freeze_date for d in s.next_due(shanghai(2026, 3, 15, 0, 6))] == [date(2026, 3, 15)]


def test_plan_daily_backfill() -> None:
    now = shanghai(2026, 3, 10, 6, 0)  # newest freeze: 2026-03-10 (the live schedule's)
    plans = plan_daily_backfill(
        {"a": date(2026, 3, 6), "b": date(2026, 3, 10), "c": None},
        ("a", "b", "c"),
        now,
        SHANGHAI,
        initial_days=2,
    )
    by_meter = {p.meter: p for p in plans}
    assert set(by_meter) == {"a", "c"}
    assert by_meter["a"].dates == (date(2026, 3, 7), date(2026, 3, 8), date(2026, 3, 9))
    assert by_meter["c"].dates == (date(2026, 3, 8), date(2026, 3, 9))


def test_plan_daily_backfill_is_capped_at_62_days() -> None:
    now = shanghai(2026, 6, 1, 6, 0)
    (plan,) = plan_daily_backfill({"a": date(2026, 1, 1)}, ("a",), now, SHANGHAI, max_days=400)
    assert len(plan.dates) == 61  # plus the newest, read live: the meter's 62 records
    assert plan.dates[0] == date(2026, 4, 1)
    assert plan.dates[-1] == date(2026, 5, 31)
    assert frozen_index(plan.dates[0], date(2026, 6, 1)) == 62
    assert plan.dropped == (date(2026, 4, 1) - date(2026, 1, 2)).days


# -- time sync -------------------------------------------------------------------------------------


def test_time_sync_once_per_interval_with_offset() -> None:
    s = TimeSyncSchedule(3600, T0 + 10, offset=420)
    assert s.next_due(T0 + 10) is None
    assert s.next_time() == T0 + 420
    assert s.next_due(T0 + 420) == T0
    assert s.next_due(T0 + 500) is None
    assert s.next_due(T0 + 3600 + 419) is None
    assert s.next_due(T0 + 3600 + 420) == T0 + 3600


def test_time_sync_clock_steps() -> None:
    s = TimeSyncSchedule(3600, T0, offset=0)
    assert s.next_due(T0) == T0
    assert s.next_due(T0 + 5 * 3600 + 5) == T0 + 5 * 3600  # forward: one sync, no catching up
    assert s.next_due(T0 + 5 * 3600 - 100) is None  # back: no repeat
    assert s.next_due(T0 + 5 * 3600 + 10) is None
    assert s.next_due(T0 + 6 * 3600) == T0 + 6 * 3600
    with pytest.raises(ValueError, match="offset"):
        TimeSyncSchedule(60, T0, offset=60)


def test_group_plans_from_config() -> None:
    config = load_config(Path(__file__).resolve().parent.parent / "config" / "demo.toml")
    plans = GroupPlan.from_config(config)
    assert [p.name for p in plans] == [g.name for g in config.poll_groups]
    for plan, group in zip(plans, config.poll_groups, strict=True):
        assert plan.interval == 10
        assert plan.meters == tuple(m.id for m in config.group_meters(group))
        assert plan.spread == group.spread
    assert sorted(m for p in plans for m in p.meters) == sorted(m.id for m in config.meters)


# -- the compact heap against the plain one ----------------------------------------------------


class _TupleHeapSchedule:
    """The straightforward PollSchedule (a heap of (at, group, meter, slot) tuples) that the
    compact one replaced to save ~80 bytes a meter: same inputs must give the same outputs."""

    def __init__(self, groups: list[GroupPlan], now: float, resume: dict[tuple[str, str], int]) -> None:
        import heapq

        self.heapq = heapq
        self.groups = {g.name: g for g in groups}
        self.missed: list[MissedSlots] = []
        self.high_water = now
        self.heap: list[tuple[float, str, str, int]] = []
        self.start(now, resume)

    def start(self, now: float, resume: dict[tuple[str, str], int]) -> None:
        self.heap.clear()
        for g in self.groups.values():
            for meter in dict.fromkeys(g.meters):
                slot = resume.get((g.name, meter))
                if slot is None or slot % g.interval:
                    slot = slot_start(now, g.interval)
                self.heap.append((slot + g.offset(meter), g.name, meter, slot))
        self.heapq.heapify(self.heap)

    def next_due(self, now: float) -> list[Due]:
        if now < self.high_water - 6 * 3600.0:
            self.high_water = now
            self.start(now, {})
        self.high_water = max(self.high_water, now)
        out = []
        while self.heap and self.heap[0][0] <= now:
            at, name, meter, slot = self.heapq.heappop(self.heap)
            g = self.groups[name]
            if now >= slot + g.interval:
                current = slot_start(now, g.interval)
                self.missed.append(MissedSlots(name, meter, slot, current - g.interval, g.interval))
                self.heapq.heappush(self.heap, (current + g.offset(meter), name, meter, current))
                continue
            out.append(Due(at, name, meter, slot, g.interval))
            self.heapq.heappush(self.heap, (slot + g.interval + g.offset(meter), name, meter, slot + g.interval))
        out.sort()
        return out

    def next_time(self) -> float | None:
        return self.heap[0][0] if self.heap else None


@settings(max_examples=60, deadline=None)
@given(
    groups=st.lists(
        st.tuples(
            st.sampled_from([1, 7, 60, 900]),
            st.sampled_from([0.0, 0.5, 0.9]),
            st.lists(st.sampled_from([f"m{i}" for i in range(12)]), max_size=8),
        ),
        max_size=3,
    ),
    steps=st.lists(st.one_of(st.floats(0, 50), st.floats(-30, 0), st.sampled_from([3000.0, -30000.0])), max_size=40),
    resume_shift=st.sampled_from([None, -900, 0, 900, 3]),
)
def test_compact_heap_hands_out_what_a_tuple_heap_would(
    groups: list[tuple[int, float, list[str]]], steps: list[float], resume_shift: int | None
) -> None:
    plans = [GroupPlan(f"g{i}", interval, tuple(meters), spread) for i, (interval, spread, meters) in enumerate(groups)]
    now = T0 + 13.25
    resume = (
        {}
        if resume_shift is None
        else {(p.name, m): slot_start(now, p.interval) + resume_shift for p in plans for m in p.meters[::2]}
    )
    compact = PollSchedule(plans, now, resume=resume)
    plain = _TupleHeapSchedule(plans, now, resume)
    for step in [0.0, *steps]:
        now += step
        assert compact.next_due(now) == plain.next_due(now)
        assert compact.take_missed() == plain.missed
        plain.missed = []
        assert compact.next_time() == plain.next_time()
        assert compact.cursors() == {(name, meter): slot for _, name, meter, slot in plain.heap}


def test_read_times_sort_like_floats_across_zero_and_magnitudes() -> None:
    times = [-1e9, -3.5, -1e-300, -0.0, 0.0, 1e-300, 0.5, 1.0, 1_773_129_600.0, 1_773_129_600.0000002, 4e9]
    s = PollSchedule([GroupPlan("g", 1, ("a",))], -2e9)
    assert [s._key(t, 0, 0) for t in times] == sorted(s._key(t, 0, 0) for t in times)
    assert len({s._key(t, 0, 0) for t in times if t != 0}) == len(times) - 2

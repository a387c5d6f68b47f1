"""The durable outbox on real SQLite files: order, dedupe, crash safety, budget, full disk."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meter_gateway.drivers.reading import Quality, Reading
from meter_gateway.gateway.cli import outbox_cmd
from meter_gateway.gateway.store import outbox_schema
from meter_gateway.gateway.store.outbox import AsyncOutbox, Outbox, OutboxError, OverflowPolicy, SchemaError
from meter_gateway.gateway.store.outbox_sizing import largest_budget, min_partition_bytes, wal_bound, wal_limit
from tests.plugins.tmpfs import small_tmpfs

ROOT = Path(__file__).resolve().parents[1]


def readings(n: int, *, start: int = 0, meter: str = "000000000001", quantity: str = "energy.import") -> list[Reading]:
    return [
        Reading(
            meter, quantity, 1000.0 + i / 8, "kWh", gateway_time=1_700_000_000.0 + i, slot=1_700_000_000.0 + 900 * i
        )
        for i in range(start, start + n)
    ]


class StepClock:
    """A gateway clock a test can step like NTP or an operator would."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "outbox.sqlite"


@pytest.fixture
def outbox(db: Path) -> Iterator[Outbox]:
    box = Outbox.open(db)
    yield box
    box.close()


def test_commit_peek_ack_keep_row_order(outbox: Outbox) -> None:
    first, second = readings(5), readings(5, start=5)
    assert outbox.add(first).committed == 5
    assert outbox.add(second).committed == 5
    rows = outbox.peek(0, 100)
    assert [r.row_id for r in rows] == list(range(1, 11))
    assert [r.reading_id for r in rows] == [r.id for r in first + second]
    assert rows[3].reading() == first[3]  # stored exactly, id and all

    assert outbox.ack([2, 3, 7]) == 3
    assert outbox.ack([2]) == 0  # already delivered: nothing left to delete
    left = outbox.peek(0, 100)
    assert [r.row_id for r in left] == [1, 4, 5, 6, 8, 9, 10]
    assert [r.row_id for r in outbox.peek(5, 2)] == [6, 8]
    assert outbox.depth == 7
    got = outbox.get(first[0].id)
    assert got is not None
    assert got.row_id == 1
    assert outbox.get(8) == left[4]
    assert outbox.get(2) is None
    stats = outbox.stats()
    assert stats.counters["committed"] == 10
    assert stats.counters["delivered"] == 3


def test_values_keep_their_type_and_quality_flags(outbox: Outbox) -> None:
    mixed = [
        Reading("m1", "relay.state", 1, "", 1.0, slot=60.0),
        Reading("m1", "serial", "A1B2", "", 1.0, slot=60.0),
        Reading("m1", "energy", 12.5, "kWh", 1.0, meter_time=55.0, quality=Quality.FROZEN | Quality.CLOCK_SUSPECT),
    ]
    outbox.add(mixed)
    back = [r.reading() for r in outbox.peek()]
    assert back == mixed
    assert [type(r.value) for r in back] == [int, str, float]
    assert back[2].quality == Quality.FROZEN | Quality.CLOCK_SUSPECT


def test_bad_readings_are_counted_and_the_rest_of_the_batch_is_kept(
    outbox: Outbox, caplog: pytest.LogCaptureFixture
) -> None:
    good = readings(2)
    odd = [
        Reading("m1", "voltage.l1", float("nan"), "V", 1.0, slot=60.0),  # a float32 register holding NaN
        Reading("m1", "power", float("-inf"), "kW", 1.0, slot=60.0),
        Reading("m1", "pulses", 2**70, "", 1.0, slot=60.0),
    ]
    broken = [
        Reading("m1", "energy", None, "kWh", 1.0, slot=60.0),  # type: ignore[arg-type]
        Reading("m1", "energy2", 1.0, "kWh", float("nan"), slot=60.0),
        Reading("m1", "energy3", b"\x01", "kWh", 1.0, slot=60.0),  # type: ignore[arg-type]
    ]
    result = outbox.add([good[0], *broken, *odd, good[1]])
    assert (result.committed, result.invalid) == (5, 3)
    values = [r.value for r in outbox.peek()]
    assert values[1:4] == ["NaN", "-Infinity", str(2**70)]  # carried as text, not lost
    assert [r.reading_id for r in outbox.peek()] == [good[0].id, *(r.id for r in odd), good[1].id]
    assert outbox.stats().counters["invalid"] == 3
    assert outbox.stats().totals["invalid"] == 3
    assert len([r for r in caplog.records if "event=outbox_refused_invalid" in r.getMessage()]) == 1


def test_duplicates_are_ignored_counted_and_leave_no_gap_in_row_numbers(outbox: Outbox) -> None:
    batch = readings(4)
    assert outbox.add(batch).committed == 4
    result = outbox.add([batch[1], batch[1], *readings(2, start=4), batch[3]])
    assert (result.committed, result.duplicates) == (2, 3)
    # row numbers stay consecutive, so a gap seen by the head-end always means loss
    assert [r.row_id for r in outbox.peek()] == [1, 2, 3, 4, 5, 6]
    assert outbox.stats().counters["duplicates"] == 3


@pytest.mark.parametrize("whole_batch", [True, False], ids=["one-insert", "group-by-group"])
def test_group_commit_results_per_group_whichever_way_it_inserts(
    outbox: Outbox, monkeypatch: pytest.MonkeyPatch, whole_batch: bool
) -> None:
    # Far from the budget a write inserts all its groups at once; near it, group by group with
    # a budget check before each. Both must give every caller the same answer.
    monkeypatch.setattr(Outbox, "_roomy", lambda self, n, depth: whole_batch)
    stored = readings(2)
    outbox.add(stored)
    batch = readings(6, start=2)
    twice = readings(1, start=8)[0]
    groups = [
        batch[:3],
        [batch[0], stored[1], *batch[3:5], batch[3]],  # one from group 1, one stored, one twice
        [twice, twice, batch[5]],  # the same object twice is one row
        [],
    ]
    results, _ = outbox.write(groups, [])
    assert [(r.committed, r.duplicates) for r in results] == [(3, 0), (2, 3), (2, 1), (0, 0)]
    rows = outbox.peek()
    assert [r.row_id for r in rows] == list(range(1, 10))
    assert [r.reading_id for r in rows] == [r.id for r in (*stored, *batch[:5], twice, batch[5])]
    assert outbox.stats().counters["duplicates"] == 4


@pytest.mark.parametrize("whole_batch", [True, False], ids=["whole-batch", "group-by-group"])
def test_rows_spanning_several_insert_statements_keep_order_values_and_gap_free_ids(
    outbox: Outbox, monkeypatch: pytest.MonkeyPatch, whole_batch: bool
) -> None:
    # Rows go in as multi-row INSERT statements of a bounded size; a batch of 2.5 statements'
    # worth, with duplicates across statement boundaries and every value type, must come back
    # exactly, in order, under consecutive row ids.
    monkeypatch.setattr(Outbox, "_roomy", lambda self, n, depth: whole_batch)
    values: list[float | int | str] = [1000.0 + i / 7 for i in range(100)] + list(range(-30, 30)) + ["0x1F", "NaN"]
    batch = [
        Reading(
            f"{i % 9:012d}",
            f"q.{i}",
            v,
            "kWh",
            gateway_time=1_700_000_000.123456789 + i,
            meter_time=None if i % 3 else 1.5e9 + i / 3,
            slot=1_700_000_000.0 if i % 3 else None,
        )
        for i, v in enumerate(values)
    ]
    first = outbox.add(batch[:70])
    assert first.committed == 70
    groups = [batch[60:130], batch[125:]]  # 10 stored again, then 5 within this write
    results, _ = outbox.write(groups, [])
    assert [(r.committed, r.duplicates) for r in results] == [(60, 10), (32, 5)]
    rows = outbox.peek(limit=1000)
    assert [r.row_id for r in rows] == list(range(1, len(batch) + 1))
    assert [r.reading() for r in rows] == batch
    assert [type(r.value) for r in rows] == [type(v) for v in values]


def test_stored_ids_are_found_at_every_group_size_with_few_prepared_lookups(outbox: Outbox) -> None:
    # The "already stored?" lookup is padded to power-of-two sizes (sqlite3 keeps each distinct
    # statement it prepared, and one per group size took 3 MiB); padding must not change results.
    from meter_gateway.gateway.store.outbox import _lookup_sql

    sizes = (1, 2, 3, 63, 64, 65, 127, 300, 511, 512, 513, 600)
    stored = readings(600)
    assert outbox.add(stored).committed == 600
    for n in sizes:
        known = stored[: n // 2]
        new = readings(n - n // 2, quantity=f"new.{n}")
        batch = [r for pair in zip(new, known, strict=False) for r in pair] + new[len(known) :]
        result = outbox.add(batch)
        assert (result.committed, result.duplicates) == (len(new), len(known)), n
    rows = outbox.peek(limit=10_000)
    assert [r.row_id for r in rows] == list(range(1, len(rows) + 1))  # no gaps, nothing twice
    assert len({r.reading_id for r in rows}) == len(rows) == 600 + sum(n - n // 2 for n in sizes)
    assert _lookup_sql.cache_info().currsize <= 10  # sizes 1, 2, 4 ... 512


def test_page_caches_are_capped_per_role(outbox: Outbox, tmp_path: Path) -> None:
    # SQLite's default page cache is 2 MiB per connection, filled by the open-time quick_check
    # and kept: the writer keeps 512 KiB (random reading-id index inserts), every other
    # connection 128 KiB (bench memory).
    from meter_gateway.gateway.store.cursors import CursorStore
    from meter_gateway.gateway.store.sqlite_check import CACHE_KIB, SMALL_CACHE_KIB

    reader = outbox.open_reader()
    cursors = CursorStore.open(tmp_path / "schedule.sqlite")
    try:
        assert outbox._conn.execute("PRAGMA cache_size").fetchone() == (-CACHE_KIB,)
        assert reader._conn.execute("PRAGMA cache_size").fetchone() == (-SMALL_CACHE_KIB,)
        assert cursors._conn.execute("PRAGMA cache_size").fetchone() == (-SMALL_CACHE_KIB,)
        assert (CACHE_KIB, SMALL_CACHE_KIB) == (512, 128)
    finally:
        reader.close()
        cursors.close()


def test_survives_reopen_with_counters_and_without_reusing_row_numbers(db: Path) -> None:
    box = Outbox.open(db)
    box.add(readings(10))
    box.ack([1, 2, 3])
    instance = box.instance
    box.close()

    box = Outbox.open(db)
    try:
        assert [r.row_id for r in box.peek()] == list(range(4, 11))
        assert box.instance == instance
        totals = box.stats().totals
        assert (totals["committed"], totals["delivered"]) == (10, 3)
        box.ack(range(4, 11))
        assert box.depth == 0
        box.add(readings(1, start=50))
        assert [r.row_id for r in box.peek()] == [11]  # never reused, even with the table empty
    finally:
        box.close()


def test_second_writer_on_the_same_file_is_refused(db: Path, outbox: Outbox) -> None:
    with pytest.raises(OutboxError, match="in use"):
        Outbox.open(db)


def test_bad_settings_are_clear_errors(db: Path) -> None:
    with pytest.raises(OutboxError, match="synchronous"):
        Outbox.open(db, synchronous="sometimes")
    with pytest.raises(OutboxError, match="overflow policy"):
        Outbox.open(db, overflow_policy="drop-newest")
    with pytest.raises(OutboxError, match="budget"):
        Outbox.open(db, budget_bytes=1000)
    with pytest.raises(OutboxError, match="does not exist"):
        Outbox.open(db.parent / "missing" / "o.sqlite")


@pytest.mark.parametrize("mode", ["NORMAL", "FULL", "EXTRA"])
def test_wal_mode_and_synchronous_setting_are_applied(db: Path, mode: str) -> None:
    box = Outbox.open(db, synchronous=mode)
    try:
        conn = box._conn
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == {"NORMAL": 1, "FULL": 2, "EXTRA": 3}[mode]
    finally:
        box.close()


_WRITER = """
import sys, time
from meter_gateway.drivers.reading import Reading
from meter_gateway.gateway.store.outbox import Outbox
box = Outbox.open(sys.argv[1], synchronous="FULL")
batch = 0
while True:
    rs = [Reading("m%03d" % (i % 50), "energy", float(i), "kWh", time.time(), slot=float(batch * 1000 + i))
          for i in range(200)]
    # one writer turn: every third one also acks the 50 lowest undelivered rows
    acks = [r.row_id for r in box.peek(0, 50)] if batch % 3 == 2 else []
    (result,), counts = box.write([rs], [acks])
    assert result.committed == 200 and counts == [len(acks)], (result, counts)
    print(batch, box.last_row_id, flush=True)
    batch += 1
"""


def _after_turns(turns: int) -> tuple[list[int], int]:
    """(rows left, rows delivered) once the _WRITER's first ``turns`` turns committed."""
    delivered = 50 * (turns // 3)
    return list(range(delivered + 1, 200 * turns + 1)), delivered


@pytest.mark.parametrize("stop_after", [10, 25, 40])
def test_sigkill_mid_stream_loses_nothing_committed(db: Path, stop_after: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(db)], stdout=subprocess.PIPE, env=env, text=True, cwd=ROOT
    )
    assert proc.stdout is not None
    reported: list[tuple[int, int]] = []
    try:
        for line in proc.stdout:
            batch, last_row = map(int, line.split())
            reported.append((batch, last_row))
            if batch >= stop_after:
                break
    finally:
        proc.send_signal(signal.SIGKILL)  # mid-stream: the writer is in its next transaction
        proc.wait(timeout=10)
        proc.stdout.close()
    last_batch, last_row = reported[-1]

    box = Outbox.open(db)
    try:
        assert box._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        # every turn the writer saw committed is there; only its acks removed rows
        assert box.last_row_id >= last_row
        rows = box.peek(0, 1_000_000)
        ids = {r.reading_id for r in rows}
        # acks delete the lowest rows, 50 at a time in every third turn (maybe in the turn
        # that was running when the writer died too)
        acked_max = 50 * ((last_batch + 2) // 3)
        for batch in range(last_batch + 1):
            for i in range(200):
                row_number = batch * 200 + i + 1
                if row_number > acked_max:
                    assert f"m{i % 50:03d}/energy/s{batch * 1000 + i}" in ids
        assert box.depth == len(ids)
        # A turn's acks and adds are one transaction: the file holds exactly the state after
        # the last turn reported, or after the one that was running, never half of it; and the
        # lifetime counters say exactly that much.
        turns = box.last_row_id // 200
        assert turns in (last_batch + 1, last_batch + 2)
        left, delivered = _after_turns(turns)
        assert [r.row_id for r in rows] == left
        totals = box.stats().totals
        assert (totals["committed"], totals["delivered"]) == (200 * turns, delivered)
    finally:
        box.close()


def test_clock_steps_never_delete_undelivered_rows(db: Path) -> None:
    clock = StepClock()
    box = Outbox.open(db, clock=clock)
    try:
        box.add(readings(3))
        clock.now += 10 * 365 * 86400  # NTP finally reaches a gateway that booted in 2023
        box.add(readings(3, start=3))
        clock.now = 0.0  # RTC battery dead: back to 1970
        box.add(readings(3, start=6))
        assert [r.row_id for r in box.peek()] == list(range(1, 10))
        oldest = box.oldest_undelivered()
        assert oldest == (1, 1_700_000_000.0)
        assert box.stats().oldest_age(0.0) == 0.0  # never negative
        assert box.stats().oldest_age(1_700_000_060.0) == 60.0
        box.ack([4, 5, 6])  # only acks remove rows, by row number, whatever the clock says
        assert [r.row_id for r in box.peek()] == [1, 2, 3, 7, 8, 9]
    finally:
        box.close()
    clock.now = 4_000_000_000.0
    box = Outbox.open(db, clock=clock)
    try:
        assert box.depth == 6
    finally:
        box.close()


def test_drop_oldest_goes_by_row_order_not_by_clock(db: Path) -> None:
    clock = StepClock(2_000_000_000.0)
    box = Outbox.open(db, budget_bytes=256 * 1024, overflow_policy=OverflowPolicy.DROP_OLDEST, clock=clock)
    try:
        n = 0
        while box.stats().counters["overflow_dropped"] == 0:
            clock.now -= 1000.0  # each batch looks "older" by the clock than the one before
            box.add(readings(200, start=n))
            n += 200
            assert n < 20_000, "budget never reached"
        rows = box.peek(0, 1_000_000)
        dropped = box.stats().counters["overflow_dropped"]
        # the lowest row numbers (first acquired) went, although their added_at is the latest
        assert rows[0].row_id == dropped + 1
        assert [r.row_id for r in rows] == list(range(dropped + 1, n + 1))
    finally:
        box.close()


def test_budget_refuse_new_keeps_committed_rows_and_counts_refused(db: Path) -> None:
    budget = 256 * 1024
    box = Outbox.open(db, budget_bytes=budget)
    try:
        n = 0
        refused = 0
        while refused == 0:
            result = box.add(readings(200, start=n))
            refused = result.refused
            n += 200
            assert n < 20_000, "budget never reached"
        stats = box.stats()
        assert stats.counters["refused"] == refused
        assert stats.counters["overflow_dropped"] == 0
        assert stats.live_bytes <= budget + 64 * 1024  # approximate: checked per batch
        rows = box.peek(0, 1_000_000)
        assert [r.row_id for r in rows] == list(range(1, len(rows) + 1))  # nothing old lost
        assert rows[0].reading_id == readings(1)[0].id
        # still full: later batches are (all but a partly filled page's worth) refused
        later = [box.add(readings(50, start=n + 50 * k)) for k in range(6)]
        assert sum(r.committed for r in later) < 50
        assert box.stats().live_bytes <= budget + 64 * 1024
        # deliveries free room: new readings are taken again
        box.ack(r.row_id for r in rows[: len(rows) // 2])
        assert box.add(readings(50, start=n + 300)).committed == 50
        assert box.stats().totals["refused"] == refused + sum(r.refused for r in later)
    finally:
        box.close()


def test_full_disk_holds_readings_in_memory_and_recovers(db: Path, caplog: pytest.LogCaptureFixture) -> None:
    box = Outbox.open(db, page_limit=40, hold_limit=1000)
    try:
        n = 0
        while box.held == 0:
            result = box.add(readings(100, start=n))
            n += 100
            assert n < 50_000, "page limit never reached"
        assert result.committed == 0
        assert box.storage_alarm == "disk full"
        assert box.stats().counters["disk_full_events"] == 1
        committed_before = box.depth
        # still full: more readings are held, in order, up to the hold limit; beyond it refused
        for k in range(12):
            box.add(readings(100, start=n + 100 * k))
        assert box.held == 1000
        assert box.stats().counters["refused"] == 100 * 13 - 1000
        assert box.stats().counters["disk_full_events"] == 1  # one event, not one per batch
        assert "event=outbox_unavailable" in caplog.text
        # acks still work while full (deleting needs no new pages)
        assert box.ack([1, 2]) == 2

        box.set_page_limit(None)  # space comes back
        box.retry_held()
        assert box.held == 0
        assert box.storage_alarm is None
        assert box.depth == committed_before - 2 + 1000
        ids = [r.reading_id for r in box.peek(0, 1_000_000)]
        expected_tail = [r.id for r in readings(1000, start=n - 100)]
        assert ids[-1000:] == expected_tail  # held readings kept acquisition order
        assert box.stats().totals["disk_full_events"] == 1  # persisted once the disk took writes
    finally:
        box.close()


def test_real_full_filesystem_is_survived(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "fs", "1m") as fs:
        box = Outbox.open(fs / "outbox.sqlite", synchronous="FULL", hold_limit=100_000)
        try:
            filler = fs / "filler"
            free = os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize
            filler.write_bytes(b"\0" * max(0, free - 256 * 1024))
            n = 0
            while box.held == 0:
                box.add(readings(200, start=n))
                n += 200
                assert n < 100_000, "filesystem never filled"
            assert box.storage_alarm == "disk full"
            depth = box.depth
            filler.unlink()  # an operator frees space; no restart
            box.retry_held()
            assert box.storage_alarm is None
            assert box.depth == depth + 200
            assert box._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        finally:
            box.close()


def test_migrations_from_v1_to_current(db: Path) -> None:
    conn = sqlite3.connect(db, isolation_level=None)
    assert outbox_schema.migrate(conn, target=1) == 0
    assert outbox_schema.version(conn) == 1
    conn.execute(
        "INSERT INTO readings (reading_id, meter_id, quantity, value, unit, gateway_time, meter_time, slot, "
        "quality, added_at) VALUES ('m/e/s60', 'm', 'e', 7, 'kWh', 61.0, NULL, 60.0, 0, 61.0)"
    )
    conn.close()

    box = Outbox.open(db)
    try:
        assert box.schema_version == outbox_schema.CURRENT == 5
        assert len(box.instance) == 32
        assert [r.reading_id for r in box.peek()] == ["m/e/s60"]
        assert box.stats().totals == dict.fromkeys(outbox_schema.COUNTER_NAMES, 0)
        box.add(readings(1))
        assert [r.row_id for r in box.peek()] == [1, 2]
    finally:
        box.close()


def test_each_migration_step_is_atomic_and_ordered(db: Path) -> None:
    conn = sqlite3.connect(db, isolation_level=None)
    for target in range(1, outbox_schema.CURRENT + 1):
        assert outbox_schema.migrate(conn, target=target) == target - 1
    assert outbox_schema.migrate(conn) == outbox_schema.CURRENT  # nothing left to do
    conn.close()


def test_newer_schema_is_refused(db: Path) -> None:
    conn = sqlite3.connect(db, isolation_level=None)
    outbox_schema.migrate(conn)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(SchemaError, match="newer"):
        Outbox.open(db)


@pytest.mark.asyncio
async def test_async_facade_group_commits_off_the_event_loop(db: Path) -> None:
    threads: set[str] = set()

    def clock() -> float:
        threads.add(threading.current_thread().name)
        return time.time()

    box = await AsyncOutbox.open(db, clock=clock)
    try:
        waiter = asyncio.create_task(box.wait_for_rows(0))
        results = await asyncio.gather(*(box.add(readings(1, start=i)) for i in range(300)))
        await asyncio.wait_for(waiter, 1.0)
        assert sum(r.committed for r in results) == 300
        assert box.depth == 300
        assert threads
        assert all(name.startswith("outbox") for name in threads)
        rows = await box.peek(0, 1000)
        assert [r.row_id for r in rows] == list(range(1, 301))
        counts = await asyncio.gather(box.ack([1, 2]), box.ack([3]), box.ack([1]))
        assert list(counts) == [2, 1, 0]
        assert (await box.stats()).depth == 297
    finally:
        await box.close()


@pytest.mark.asyncio
async def test_commit_interval_gathers_a_trickle_of_adds_into_few_transactions(tmp_path: Path) -> None:
    # Polls finish one by one: without an interval nearly every add is its own transaction (and
    # fsync). With one, adds arriving within it share the next commit, and none waits much longer.
    async def trickle(interval: float) -> tuple[int, float]:
        box = await AsyncOutbox.open(tmp_path / f"outbox-{interval}.sqlite", commit_interval=interval)
        writes = 0
        write = box.outbox.write

        def counting(*args: object) -> object:
            nonlocal writes
            writes += 1
            return write(*args)  # type: ignore[arg-type]

        box.outbox.write = counting  # type: ignore[method-assign]
        slowest = 0.0
        loop = asyncio.get_running_loop()

        async def add(i: int) -> None:
            nonlocal slowest
            await asyncio.sleep(i * 0.002)
            started = loop.time()
            result = await box.add(readings(4, start=4 * i))
            assert result.committed == 4
            slowest = max(slowest, loop.time() - started)

        try:
            await asyncio.gather(*(add(i) for i in range(50)))  # over ~100 ms
            assert box.depth == 200
        finally:
            await box.close()
        return writes, slowest

    eager, _ = await trickle(0.0)
    gathered, slowest = await trickle(0.025)
    assert gathered <= 8 < eager  # ~100 ms / 25 ms, against about one per add
    assert slowest < 0.025 + 0.5  # the interval plus a commit, with room for a loaded machine


@pytest.mark.asyncio
async def test_async_facade_recovers_from_full_disk_without_new_readings(db: Path) -> None:
    box = await AsyncOutbox.open(db, page_limit=40, retry_interval=0.05)
    try:
        n = 0
        while box.outbox.held == 0:
            await box.add(readings(100, start=n))
            n += 100
        assert box.storage_alarm == "disk full"
        depth = box.depth
        await box.set_page_limit(None)
        for _ in range(200):
            if box.storage_alarm is None:
                break
            await asyncio.sleep(0.01)
        assert box.storage_alarm is None
        assert box.depth == depth + 100
    finally:
        await box.close()


def test_readonly_view_and_cli(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    box = Outbox.open(db)
    try:
        box.add(readings(5))
        box.ack([1])
        assert outbox_cmd.main(["stats", str(db), "--json"]) == 0
        data = json.loads(capsys.readouterr().out)
        assert (data["depth"], data["last_row_id"], data["oldest_row_id"]) == (4, 5, 2)
        assert data["totals"]["delivered"] == 1

        assert outbox_cmd.main(["stats", str(db)]) == 0
        assert "4 rows" in capsys.readouterr().out

        assert outbox_cmd.main(["list", str(db), "--after", "2", "--limit", "2", "--json"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert [json.loads(line)["row_id"] for line in lines] == [3, 4]

        rid = readings(5)[4].id
        assert outbox_cmd.main(["show", str(db), rid]) == 0
        assert rid in capsys.readouterr().out
        assert outbox_cmd.main(["show", str(db), "1"]) == 1  # delivered: gone
        assert "no undelivered row" in capsys.readouterr().err
    finally:
        box.close()
    assert outbox_cmd.main(["stats", str(db.parent / "nope.sqlite")]) == 1
    assert "no outbox" in capsys.readouterr().err


# -- issue 20: a bounded WAL, the over-budget state, held readings in bounded transactions ------


def test_wal_stays_within_its_bound_while_a_reader_peeks(db: Path) -> None:
    """Steady traffic (commits, peeks on the reader's connection, acks) on a 1 MiB budget: the
    -wal file never outgrows ``wal_bound`` (SQLite's default auto-checkpoint let it reach ~4 MiB,
    a whole small state partition)."""
    budget = 1024 * 1024
    box = Outbox.open(db, budget_bytes=budget, synchronous="NORMAL")
    reader = box.open_reader()
    wal = Path(f"{db}-wal")
    high = 0
    try:
        n = 0
        for _ in range(1500):
            box.add(readings(12, start=n))
            n += 12
            rows = reader.peek(0, 100)
            high = max(high, wal.stat().st_size)
            box.ack(r.row_id for r in rows[: len(rows) - 6])  # a small backlog stays behind
            high = max(high, wal.stat().st_size)
        assert box.depth >= 6
    finally:
        reader.close()
        box.close()
    assert high <= wal_bound(budget), f"WAL reached {high} bytes, bound {wal_bound(budget)}"
    assert high >= wal_limit(budget) // 2  # the traffic did exercise the WAL


def test_minimum_state_partition_for_a_budget() -> None:
    mib = 1024 * 1024
    assert wal_limit(512 * mib) == 4 * mib  # SQLite's own default at the default budget
    assert wal_limit(mib) == 128 * 1024
    assert min_partition_bytes(mib) == 4 * mib  # a 1 MiB outbox fits a 4 MiB partition
    assert min_partition_bytes(2 * mib) > 4 * mib
    assert min_partition_bytes(4 * mib) == 8 * mib
    assert min_partition_bytes(5 * mib) > 8 * mib
    assert largest_budget(8 * mib) == 4 * mib
    assert largest_budget(4 * mib) == mib
    assert largest_budget(2 * mib) == 0
    need = min_partition_bytes(512 * mib, meters=10_000)
    assert 512 * mib + 12 * mib <= need <= 530 * mib  # the WAL and the other files: a small share
    assert min_partition_bytes(mib, meters=10_000) > min_partition_bytes(mib)


def test_over_budget_is_said_once_and_clears_when_deliveries_free_room(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    box = Outbox.open(db, budget_bytes=256 * 1024)
    try:
        n = 0
        with caplog.at_level("INFO", logger="meter_gateway.gateway.store.outbox"):
            while not box.over_budget:
                assert box.add(readings(20, start=n)).refused == 0  # over budget before any refusal
                n += 20
                assert n < 20_000, "never over budget"
            box.add(readings(20, start=n))  # still over: not said again
            rows = box.peek(0, 1_000_000)
            box.ack(r.row_id for r in rows[:20])  # a little freed: stays over (hysteresis)
            assert box.over_budget
            box.ack(r.row_id for r in rows[20:])
            assert not box.over_budget
        messages = [r.getMessage() for r in caplog.records]
        assert sum("event=outbox_over_budget" in m for m in messages) == 1
        assert sum("event=outbox_within_budget" in m for m in messages) == 1
    finally:
        box.close()
    again = Outbox.open(db, budget_bytes=64 * 1024 * 1024)
    try:
        assert not again.over_budget
    finally:
        again.close()


def test_a_large_held_backlog_commits_in_bounded_transactions(db: Path, caplog: pytest.LogCaptureFixture) -> None:
    budget = 1024 * 1024
    box = Outbox.open(db, budget_bytes=budget, page_limit=12, hold_limit=10_000)
    try:
        n = 0
        while box.held == 0:
            box.add(readings(50, start=n))
            n += 50
        first_held = n - 50
        with caplog.at_level("INFO", logger="meter_gateway.gateway.store.outbox"):
            for _ in range(30):
                box.add(readings(100, start=n))
                n += 100
            held = box.held
            assert held > 4 * box.transaction_rows
            box.set_page_limit(None)  # space returns
            wal_before = box.wal_high_water
            result = box.add(readings(5, start=n))  # the new readings go in after the backlog
            n += 5
        assert result.committed == 5
        assert box.held == 0
        assert box.storage_alarm is None
        ids = [r.reading_id for r in box.peek(0, 1_000_000)]
        assert ids[-(held + 5) :] == [r.id for r in readings(held + 5, start=first_held)]
        assert box.wal_high_water <= max(wal_before, wal_bound(budget))
        ok = [r.getMessage() for r in caplog.records if "event=outbox_storage_ok" in r.getMessage()]
        assert len(ok) == 1
        assert f"committed_held={held}" in ok[0]
        assert all(r.levelname == "INFO" for r in caplog.records if "outbox_storage_ok" in r.getMessage())
    finally:
        box.close()


# -- one transaction per writer turn --------------------------------------------------------------


class Statements:
    """The SQL an outbox's connection runs, as SQLite traces it (failed statements included)."""

    def __init__(self, box: Outbox) -> None:
        self.sql: list[str] = []
        box._conn.set_trace_callback(self.sql.append)

    def count(self, prefix: str) -> int:
        return sum(s.startswith(prefix) for s in self.sql)


def test_a_writer_turn_commits_its_acks_and_adds_in_one_transaction(db: Path) -> None:
    box = Outbox.open(db, synchronous="FULL")
    try:
        assert box.add(readings(100)).committed == 100
        statements = Statements(box)
        results, counts = box.write(
            [readings(50, start=100), readings(30, start=150)], [[1, 2, 3], list(range(10, 20))]
        )
        assert [r.committed for r in results] == [50, 30]
        assert counts == [3, 10]
        # one transaction, so one fsync of the WAL, for the whole turn
        assert (statements.count("BEGIN"), statements.count("COMMIT")) == (1, 1)
        assert box.depth == 100 + 80 - 13
        assert (box.stats().counters["committed"], box.stats().counters["delivered"]) == (180, 13)
    finally:
        box.close()
    again = Outbox.open(db)
    try:
        rows = [r.row_id for r in again.peek(0, 1000)]
        assert rows == [4, 5, 6, 7, 8, 9, *range(20, 181)]
        assert (again.stats().totals["committed"], again.stats().totals["delivered"]) == (180, 13)
    finally:
        again.close()


@pytest.mark.asyncio
async def test_adds_and_acks_arriving_together_share_one_commit(db: Path) -> None:
    box = await AsyncOutbox.open(db, commit_interval=0.2)
    try:
        await box.add(readings(100))  # a write just happened: what comes next waits for the interval
        statements = Statements(box.outbox)
        results = await asyncio.gather(
            box.add(readings(10, start=100)), box.ack([1, 2]), box.add(readings(5, start=110)), box.ack([50])
        )
        assert [results[0].committed, results[1], results[2].committed, results[3]] == [10, 2, 5, 1]
        assert statements.count("COMMIT") == 1
        assert box.depth == 100 + 15 - 3
    finally:
        await box.close()


def test_a_full_disk_turn_still_commits_its_acks(db: Path, caplog: pytest.LogCaptureFixture) -> None:
    # The turn's one transaction fails on its inserts; its deletes, which need no new pages and
    # free space, then commit alone, and its adds are held as before.
    box = Outbox.open(db, page_limit=40, hold_limit=10_000)
    reader = box.open_reader()
    try:
        n = 0
        while box.held == 0:
            box.add(readings(100, start=n))
            n += 100
            assert n < 50_000, "page limit never reached"
        depth, held = box.depth, box.held
        statements = Statements(box)
        (result,), counts = box.write([readings(100, start=n)], [[1, 2, 3], [7]])
        assert counts == [3, 1]
        assert (result.committed, result.held) == (0, held + 100)
        assert box.pending_acks == 0
        assert box.depth == depth - 4
        assert statements.count("COMMIT") == 1  # the acks' own transaction
        assert [r.row_id for r in reader.peek(0, 10)] == [4, 5, 6, 8, 9, 10, 11, 12, 13, 14]  # committed
        # one storage episode: the acks' commit in between neither ended nor restarted it
        assert box.storage_alarm == "disk full"
        assert box.stats().counters["disk_full_events"] == 1
        assert box.stats().counters["delivered"] == 4
        assert caplog.text.count("event=outbox_unavailable") == 1
        assert "outbox_storage_ok" not in caplog.text

        box.set_page_limit(None)  # space comes back
        box.retry_held()
        assert (box.held, box.storage_alarm) == (0, None)
        assert box.depth == depth - 4 + held + 100
        rows = box.peek(0, 1_000_000)
        assert [r.row_id for r in rows] == [4, 5, 6, *range(8, n + 101)]
    finally:
        reader.close()
        box.close()


def test_the_budget_sees_the_room_freed_by_the_acks_of_the_same_turn(db: Path) -> None:
    box = Outbox.open(db, budget_bytes=256 * 1024)
    try:
        n = 0
        while box.add(readings(200, start=n)).refused == 0:
            n += 200
            assert n < 20_000, "budget never reached"
        n += 200
        assert box.add(readings(200, start=n)).refused > 0  # full: without deliveries, refused
        n += 200
        rows = box.peek(0, 1_000_000)
        delivered = [r.row_id for r in rows[: len(rows) // 2]]
        statements = Statements(box)
        (result,), counts = box.write([readings(200, start=n)], [delivered])
        assert counts == [len(delivered)]
        assert (result.committed, result.refused) == (200, 0)
        assert statements.count("COMMIT") == 1
    finally:
        box.close()


def test_the_wal_is_reused_in_place_without_a_truncating_checkpoint_per_cycle(db: Path) -> None:
    # The automatic checkpoint restarts the log at the next commit and SQLite cuts the file back
    # to its limit; truncating it to nothing as well would make the commits after it grow the
    # file again. Only a log that could not restart (a reader holds it) is checkpointed here.
    budget = 1024 * 1024
    box = Outbox.open(db, budget_bytes=budget)
    wal = Path(f"{db}-wal")
    statements = Statements(box)
    sizes: list[int] = []
    try:
        n = 0
        for _ in range(400):
            box.write([readings(20, start=n)], [list(range(n - 39, n - 19))] if n >= 40 else [])
            n += 20
            sizes.append(wal.stat().st_size)
        assert box.depth == 40
        assert statements.count("PRAGMA wal_checkpoint") == 0  # (close() checkpoints)
    finally:
        box.close()
    restarts = sum(a > wal_limit(budget) >= b for a, b in itertools.pairwise(sizes))
    assert restarts >= 3  # the traffic went through several checkpoints
    assert max(sizes) <= wal_bound(budget)
    assert min(sizes[sizes.index(max(sizes)) :]) > 0  # never cut to nothing


# -- one row per read (schema v4) ----------------------------------------------------------------


def read_of(meter: str, slot: float, quantities: int = 10, *, value: float = 1.0) -> list[Reading]:
    """The readings one read of ``meter`` returns: one gateway time, one slot, many quantities."""
    return [Reading(meter, f"q{k}", value + k, "kWh", gateway_time=slot + 0.25, slot=slot) for k in range(quantities)]


def write_v3_outbox(path: Path, rows: list[Reading], *, delivered: range = range(0)) -> str:
    """An outbox file as the schema-v3 gateway left it: ``rows`` committed one row per reading
    (row i + 1 for rows[i]), those in ``delivered`` acked. Returns its instance id."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        outbox_schema.migrate(conn, target=3)
        conn.executemany(
            "INSERT INTO readings (reading_id, meter_id, quantity, value, unit, gateway_time, meter_time, slot, "
            "quality, added_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    r.id,
                    r.meter_id,
                    r.quantity,
                    r.value,
                    r.unit,
                    r.gateway_time,
                    r.meter_time,
                    r.slot,
                    int(r.quality),
                    9.0,
                )
                for r in rows
            ],
        )
        conn.executemany("DELETE FROM readings WHERE row_id = ?", [(i,) for i in delivered])
        conn.execute("UPDATE counters SET value = ? WHERE name = 'committed'", (len(rows),))
        (instance,) = conn.execute("SELECT value FROM meta WHERE key = 'instance'").fetchone()
        return str(instance)
    finally:
        conn.close()


def test_a_read_is_one_row_and_its_readings_keep_ids_and_row_numbers(outbox: Outbox, db: Path) -> None:
    reads = [read_of(f"{m:012d}", 1_700_000_000.0) for m in range(3)]
    result = outbox.add([r for read in reads for r in read])
    assert (result.committed, outbox.depth, outbox.last_row_id) == (30, 30, 30)
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM reads").fetchone() == (3,)
        assert conn.execute("SELECT count(*), min(row_id), max(row_id) FROM readings").fetchone() == (30, 1, 30)
    records = outbox.peek_records(0, 1000)
    assert [(r.first_row, r.last_row, r.n) for r in records] == [(1, 10, 10), (11, 20, 10), (21, 30, 10)]
    assert [row.reading_id for rec in records for row in rec.rows()] == [r.id for read in reads for r in read]
    assert [row.reading() for row in outbox.peek(0, 1000)] == [r for read in reads for r in read]

    # a re-acquired read is a duplicate as a whole; a read of other quantities in the same slot is not
    again = outbox.add(reads[1] + read_of("000000000001", 1_700_000_000.0, 12))
    assert (again.committed, again.duplicates) == (2, 20)
    assert [row.quantity for row in outbox.peek(30, 10)] == ["q10", "q11"]

    # single rows acked out of a read: the read's other readings stay, numbered as before
    assert outbox.ack([5, 6, 15]) == 3
    assert outbox.ack([5]) == 0
    assert [r.row_id for r in outbox.peek(0, 12)] == [1, 2, 3, 4, 7, 8, 9, 10, 11, 12, 13, 14]
    assert [r.row_id for r in outbox.peek(4, 3)] == [7, 8, 9]
    assert [rec.row_ids() for rec in outbox.peek_records(6, 12)][:2] == [
        [7, 8, 9, 10],
        [11, 12, 13, 14, 16, 17, 18, 19, 20],
    ]
    assert outbox.get(reads[0][6].id) == outbox.get(7)
    assert outbox.get(reads[0][5].id) is None
    assert outbox.ack(range(1, 33)) == 29
    assert (outbox.depth, outbox.last_row_id, outbox.oldest_undelivered()) == (0, 32, None)
    assert outbox.add(read_of("000000000009", 1_700_000_900.0, 1)).committed == 1
    assert [r.row_id for r in outbox.peek()] == [33]  # never reused after the deletes


def test_an_old_schema_file_is_migrated_on_open_with_its_rows_ids_and_numbers(db: Path) -> None:
    old = [*read_of("000000000001", 1_700_000_000.0, 4), *read_of("000000000002", 1_700_000_000.0, 3)]
    old.append(Reading("000000000003", "voltage", "NaN", "V", gateway_time=1_700_000_001.0, meter_time=1_699_999_999.0))
    instance = write_v3_outbox(db, old, delivered=range(2, 4))
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM readings WHERE row_id = 8")  # the newest row delivered: the sequence is ahead
    box = Outbox.open(db)
    try:
        assert (box.schema_version, box.instance) == (outbox_schema.CURRENT, instance)
        assert (box.depth, box.last_row_id) == (5, 8)
        rows = box.peek()
        assert [(r.row_id, r.reading_id) for r in rows] == [(i + 1, old[i].id) for i in (0, 3, 4, 5, 6)]
        assert [r.reading() for r in rows] == [old[i] for i in (0, 3, 4, 5, 6)]
        assert box.stats().totals["committed"] == 8
        # the rows of one read became one record; each reading is still found by its id
        assert [rec.n for rec in box.peek_records()] == [2, 3]
        assert box.get(old[4].id) == rows[2]
        # re-acquired readings (delivered or not) are duplicates; new ones number on after the sequence
        result = box.add([old[0], old[5], Reading("000000000003", "voltage", 230.0, "V", 1_700_000_002.0, slot=0.0)])
        assert (result.committed, result.duplicates) == (1, 2)
        assert [r.row_id for r in box.peek(7)] == [9]
    finally:
        box.close()

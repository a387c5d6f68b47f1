"""The schedule cursor store: a real SQLite file in tmp_path, reopened as a restart would."""

from __future__ import annotations

import asyncio
import datetime
import sqlite3
from contextlib import closing
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from meter_gateway.gateway.daemon.schedule import GroupPlan, PollSchedule, freeze_time
from meter_gateway.gateway.store.cursors import CursorStore, CursorStoreError, OwedFreeze, TimeSyncRecord, autosave_poll

TZ = ZoneInfo("Asia/Shanghai")
T0 = freeze_time(datetime.date(2026, 3, 14), TZ) + 10 * 3600  # 2026-03-14 10:00 local
D = datetime.date


def test_poll_cursors_survive_a_restart_and_the_schedule_reports_the_outage(tmp_path: Path) -> None:
    groups = [GroupPlan("fast", 900, ("m1", "m2"))]
    schedule = PollSchedule(groups, T0)
    assert {d.meter for d in schedule.next_due(T0 + 600)} == {"m1", "m2"}
    store = CursorStore.open(tmp_path / "schedule.sqlite")
    store.save_poll(schedule.cursors())
    store.close()

    later = T0 + 3 * 86400  # three days down
    store = CursorStore.open(tmp_path / "schedule.sqlite")
    resume = store.load_poll(later)  # looked up in the file, while the store is open
    assert resume == schedule.cursors()
    restarted = PollSchedule(groups, later, resume=resume)
    store.close()
    with pytest.raises(CursorStoreError, match="closed"):
        resume.get(("fast", "m1"))
    restarted.next_due(later)
    missed = restarted.take_missed()
    assert {m.meter for m in missed} == {"m1", "m2"}
    assert all(m.count == 3 * 96 - 1 for m in missed)  # every 15 min slot but the one in progress


def test_cursors_from_a_clock_that_was_ahead_are_ignored_but_not_deleted(tmp_path: Path) -> None:
    store = CursorStore.open(tmp_path / "schedule.sqlite")
    try:
        future = int(T0) + 30 * 86400  # saved while the gateway clock was a month ahead
        store.save_poll({("fast", "m1"): future - future % 900, ("fast", "m2"): int(T0) - int(T0) % 900})
        store.save_frozen({"m1": D(2026, 4, 14), "m2": D(2026, 3, 15)})
        assert store.load_poll(T0) == {("fast", "m2"): int(T0) - int(T0) % 900}
        assert store.load_frozen(T0, TZ) == {"m2": D(2026, 3, 15)}
        # the month passes (or the clock goes back to where it was): the rows are still there
        assert ("fast", "m1") in store.load_poll(T0 + 30 * 86400)
        assert store.load_frozen(T0 + 30 * 86400, TZ)["m1"] == D(2026, 4, 14)
    finally:
        store.close()


def test_owed_freezes_are_upserted_and_settled_in_one_save(tmp_path: Path) -> None:
    path = tmp_path / "schedule.sqlite"
    store = CursorStore.open(path)
    a = OwedFreeze("m1", D(2026, 3, 15), backfill=True, fills={"energy15": 1773504000}, attempts=2)
    b = OwedFreeze("m1", D(2026, 3, 16), backfill=False)
    store.save_frozen({"m1": D(2026, 3, 17)}, owed=[a, b])
    store.save_frozen({}, owed=[OwedFreeze("m1", D(2026, 3, 16), backfill=True, attempts=1)], settled=[("m1", a.day)])
    store.close()
    store = CursorStore.open(path)
    try:
        assert store.load_owed() == [OwedFreeze("m1", D(2026, 3, 16), backfill=True, fills={}, attempts=1)]
        assert store.load_frozen(T0 + 3 * 86400, TZ) == {"m1": D(2026, 3, 17)}
    finally:
        store.close()


def test_time_sync_records_keep_fields_not_given(tmp_path: Path) -> None:
    store = CursorStore.open(tmp_path / "schedule.sqlite")
    try:
        store.save_time_sync({"m1": TimeSyncRecord(T0, 12.5, T0)})
        store.save_time_sync({"m1": TimeSyncRecord(None, 0.5, T0 + 60), "m2": TimeSyncRecord(None, -3.0, T0)})
        assert store.load_time_sync() == {
            "m1": TimeSyncRecord(T0, 0.5, T0 + 60),
            "m2": TimeSyncRecord(None, -3.0, T0),
        }
    finally:
        store.close()


def test_the_store_is_wal_and_survives_an_unreadable_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "schedule.sqlite"
    store = CursorStore.open(path)
    store.save_poll({("fast", "m1"): 900})
    store.close()
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    path.write_bytes(b"this is not a database" * 100)
    store = CursorStore.open(path)
    try:
        assert store.load_poll(T0) == {}  # fresh: only backfill is lost, and it says so
        store.save_poll({("fast", "m1"): 1800})
        assert store.load_poll(T0) == {("fast", "m1"): 1800}
    finally:
        store.close()
    assert store.quarantined is not None
    assert store.quarantined.name.startswith("schedule.sqlite.corrupt-")
    assert store.quarantined.read_bytes().startswith(b"this is not")
    assert any("cursor_store_unreadable" in r.message for r in caplog.records)


def test_a_damaged_page_the_open_does_not_touch_is_found_and_quarantined(tmp_path: Path) -> None:
    # A damaged time_sync page would otherwise fail load_time_sync on every start: a crash loop.
    path = tmp_path / "schedule.sqlite"
    store = CursorStore.open(path)
    store.save_poll({("fast", "m1"): 900})
    store.save_time_sync({f"m{i:04d}": TimeSyncRecord(T0, 1.0, T0) for i in range(400)})
    store.close()
    with closing(sqlite3.connect(path)) as conn:
        (root,) = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'time_sync'").fetchone()
        (page_size,) = conn.execute("PRAGMA page_size").fetchone()
    raw = bytearray(path.read_bytes())
    raw[(root - 1) * page_size] = 0x07  # not a b-tree page type
    path.write_bytes(bytes(raw))
    first = CursorStore.open(path)
    try:
        assert first.quarantined is not None
        assert first.load_time_sync() == {}
        assert first.load_poll(T0) == {}
    finally:
        first.close()
    aside = first.quarantined
    second = CursorStore.open(path)  # the fresh file is sound: no second quarantine
    try:
        assert second.quarantined is None
    finally:
        second.close()
    assert aside.read_bytes() == bytes(raw)  # kept as it was, for forensics


def test_a_store_from_a_newer_gateway_is_refused_not_discarded(tmp_path: Path) -> None:
    path = tmp_path / "schedule.sqlite"
    CursorStore.open(path).close()
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(CursorStoreError, match="newer"):
        CursorStore.open(path)
    assert path.exists()
    with pytest.raises(CursorStoreError, match="does not exist"):
        CursorStore.open(tmp_path / "missing" / "schedule.sqlite")


@pytest.mark.asyncio
async def test_autosave_saves_at_start_periodically_and_at_stop(tmp_path: Path) -> None:
    store = CursorStore.open(tmp_path / "schedule.sqlite")
    try:
        cursors = {("fast", "m1"): 900}
        stop = asyncio.Event()
        task = asyncio.create_task(autosave_poll(store, lambda: cursors, stop, every=3600))
        await asyncio.sleep(0.05)
        assert store.load_poll(T0) == {("fast", "m1"): 900}
        cursors[("fast", "m1")] = 1800
        stop.set()
        await asyncio.wait_for(task, 5)
        assert store.load_poll(T0) == {("fast", "m1"): 1800}  # saved on the way out, not an hour later
        # periodic: only cursors that moved are written
        stop = asyncio.Event()
        before = store.saves
        task = asyncio.create_task(autosave_poll(store, lambda: cursors, stop, every=0.02))
        await asyncio.sleep(0.1)
        assert store.saves - before == 1  # the first save; nothing moved since
        for slot in (2700, 3600, 4500):
            cursors[("fast", "m1")] = slot
            end = asyncio.get_running_loop().time() + 5
            while store.load_poll(T0 + 86400) != {("fast", "m1"): slot}:
                assert asyncio.get_running_loop().time() < end
                await asyncio.sleep(0.01)
        stop.set()
        await asyncio.wait_for(task, 5)
        assert store.saves - before == 4
    finally:
        store.close()

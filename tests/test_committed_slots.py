"""Issue 19 item 9, the parts: the outbox's committed-slot mark (written with the readings, kept
through acks, never moved back, absent for refused readings) and the resume cursors a restart
takes from it and the saved schedule cursors. Real SQLite files; the crash itself is in
tests/faults/test_kill_and_broker.py."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from meter_gateway.drivers.reading import Reading
from meter_gateway.gateway.daemon.schedule import GroupPlan, PollSchedule
from meter_gateway.gateway.store.cursors import CursorStore, ResumeCursors
from meter_gateway.gateway.store.outbox import AsyncOutbox, Outbox, OverflowPolicy, SlotMark

SLOT = 1_800_000_000
METER = "000000000001"


def read_of(slot: int, meter: str = METER) -> list[Reading]:
    return [
        Reading(meter, q, 230.0 + i, "V", gateway_time=slot + 1.0, slot=float(slot))
        for i, q in enumerate(("voltage.l1", "voltage.l2"))
    ]


def test_the_mark_commits_with_the_readings_and_outlives_their_delivery(tmp_path: Path) -> None:
    db = tmp_path / "outbox.sqlite"
    box = Outbox.open(db)
    try:
        assert box.add(read_of(SLOT), mark=SlotMark("fast", METER, SLOT)).committed == 2
        assert box.add(read_of(SLOT + 60), mark=SlotMark("fast", METER, SLOT + 60)).committed == 2
        box.add(read_of(SLOT + 120))  # a read without a mark (a command's read_now) leaves it alone
        # a late commit of an older slot does not move the mark back
        box.add(read_of(SLOT - 60), mark=SlotMark("fast", METER, SLOT - 60))
        box.ack(row.row_id for row in box.peek())
        assert box.depth == 0
    finally:
        box.close()
    conn = sqlite3.connect(db)  # what the next process finds in the file
    try:
        assert conn.execute("SELECT grp, meter, slot FROM committed_slots").fetchall() == [("fast", METER, SLOT + 60)]
    finally:
        conn.close()
    again = Outbox.open(db)
    try:
        assert again.committed_slots() == {("fast", METER): SLOT + 60}
    finally:
        again.close()


@pytest.mark.asyncio
async def test_refused_readings_leave_no_mark(tmp_path: Path) -> None:
    # a budget so small that the first read fills it: refuse-new turns the next ones away
    box = await AsyncOutbox.open(
        tmp_path / "outbox.sqlite", budget_bytes=64 * 1024, overflow_policy=OverflowPolicy.REFUSE_NEW
    )
    try:
        slot, marked = SLOT, None
        for _ in range(1000):
            many = [r for m in range(20) for r in read_of(slot, f"{m:012d}")]
            result = await box.add(many, mark=SlotMark("fast", METER, slot))
            if result.refused:
                break
            marked, slot = slot, slot + 60
        assert result.refused
        assert (await box.committed_slots())[("fast", METER)] == marked
    finally:
        await box.close()


def test_a_restart_resumes_after_the_later_of_the_mark_and_the_saved_cursor(tmp_path: Path) -> None:
    store = CursorStore.open(tmp_path / "schedule.sqlite")
    try:
        # m1: the cursor save lagged the commit (the crash case); m2: the cursor is ahead (a slot
        # read and failed, nothing committed); m3: only a mark; m4: a mark from a wrong clock
        store.save_poll({("fast", "m1"): SLOT, ("fast", "m2"): SLOT + 180})
        now = SLOT + 90.0
        committed = {("fast", "m1"): SLOT + 60, ("fast", "m2"): SLOT, ("fast", "m3"): SLOT, ("fast", "m4"): SLOT * 2}
        resume = ResumeCursors(store.load_poll(now), committed, {"fast": 60}, now + 3600)
        assert dict(resume) == {("fast", "m1"): SLOT + 120, ("fast", "m2"): SLOT + 180, ("fast", "m3"): SLOT + 60}
        schedule = PollSchedule([GroupPlan("fast", 60, ("m1", "m2", "m3", "m4"))], now, resume=resume)
    finally:
        store.close()
    cursors = schedule.cursors()
    assert cursors[("fast", "m1")] == SLOT + 120  # the committed slot SLOT + 60 is not read again
    assert cursors[("fast", "m4")] == SLOT + 60  # the slot in progress
    due = schedule.next_due(now)
    assert {(d.meter, d.slot) for d in due} == {("m3", SLOT + 60), ("m4", SLOT + 60)}

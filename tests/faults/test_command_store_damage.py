"""A damaged commands.sqlite or audit.sqlite must not stop remote control (no crash loop).

Real files damaged on disk between two runs of the real CommandService, simulated DL/T 645
meters behind a real TCP bus that count every remote-control frame they receive: the service
starts, a new command runs, a command from before the damage never reaches a meter again, and a
second start does not quarantine again.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from meter_gateway.gateway.commands.states import CommandEvent
from meter_gateway.gateway.store.audit import QUARANTINE_STATE, AuditError, AuditLog
from meter_gateway.gateway.store.commands import RESET_ACK_BASE, RESET_CLOCK_MARGIN, CommandStore, MeterPlan
from meter_gateway.simulators.dlt645_meter import Dlt645Meter
from tests.faults.test_commands_faults import CountingMeter, counting_bus
from tests.test_command_exec import audit_of, dlt_rig, envelope, mid

PAGE = 4096


def zeroed_header(raw: bytearray) -> bytearray:
    raw[:100] = bytes(100)
    return raw


def truncated(raw: bytearray) -> bytearray:
    return raw[: len(raw) // 2]


def flipped_pages(raw: bytearray) -> bytearray:
    for page in range(1, len(raw) // PAGE):  # every b-tree page header after the first page
        for i in range(8):
            raw[page * PAGE + i] ^= 0xA5
    return raw


DAMAGE: dict[str, Callable[[bytearray], bytearray]] = {
    "zeroed_header": zeroed_header,
    "truncated": truncated,
    "flipped_pages": flipped_pages,
}


def damage(path: Path, how: Callable[[bytearray], bytearray]) -> None:
    assert not Path(f"{path}-wal").exists()  # a clean stop checkpointed everything into the file
    path.write_bytes(bytes(how(bytearray(path.read_bytes()))))


def frames(meter: Dlt645Meter) -> int:
    assert isinstance(meter, CountingMeter)
    return meter.control_frames


def moved(directory: Path, name: str) -> list[Path]:
    """Quarantined main files (not their -wal/-shm)."""
    return [p for p in directory.glob(f"{name}.corrupt-*") if not p.name.endswith(("-wal", "-shm"))]


def quarantined(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.ERROR and f"event={event}" in r.getMessage()]


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", list(DAMAGE))
async def test_damaged_command_store_is_quarantined_and_old_commands_never_run_again(
    tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with counting_bus(1) as handle, dlt_rig(tmp_path, handle) as rig:
        (meter,) = handle.meters
        await rig.start()
        old = envelope("disconnect", [mid(meter)])
        await rig.send(old)
        assert (await rig.finished(old.id, [mid(meter)]))[mid(meter)].state == "verified"
        assert frames(meter) == 1
        await rig.halt()
        store = tmp_path / "commands.sqlite"
        damage(store, DAMAGE[kind])

        # start on the damaged store: quarantined, fresh store, the service runs
        caplog.clear()
        service = await rig.start()
        before = len(rig.acks)
        await rig.send(old)  # the head-end re-delivers the command from before the damage
        acks = await rig.new_acks(before)
        assert rig.task is not None
        assert not rig.task.done()
        lines = quarantined(caplog, "command_store_quarantined")
        assert len(lines) == 1
        reset_at = float(lines[0].getMessage().split("reset_at=")[1].split()[0])
        (aside,) = moved(tmp_path, "commands.sqlite")
        assert f"moved_to={aside}" in lines[0].getMessage()
        rejected = [a for a in acks if a.command == old.id and a.state == "rejected"]
        assert [(a.reason, a.meter) for a in rejected] == [("store_reset", None)]
        # numbered above whatever the head-end saw for this id before the damage
        assert min(a.seq for a in acks if a.command == old.id) > RESET_ACK_BASE
        assert frames(meter) == 1  # never reached the meter
        assert service.stats.rejected.get("store_reset") == 1

        # a new disconnect of the meter that is already open: read first, nothing sent
        again = envelope("disconnect", [mid(meter)])
        await rig.send(again)
        final = (await rig.finished(again.id, [mid(meter)]))[mid(meter)]
        assert (final.state, final.relay) == ("verified", "open")
        assert "nothing sent" in (final.detail or "")
        assert frames(meter) == 1
        # a new reconnect operates the meter
        back = envelope("reconnect", [mid(meter)])
        await rig.send(back)
        final = (await rig.finished(back.id, [mid(meter)]))[mid(meter)]
        assert (final.state, final.relay) == ("verified", "armed")
        assert frames(meter) == 2
        assert meter.relay_armed
        await rig.halt()

        # second start: no new quarantine, the reset is remembered
        caplog.clear()
        await rig.start()
        before = len(rig.acks)
        await rig.send(old)  # its seq is below the newer commands' now: replayed
        acks = await rig.new_acks(before)
        assert [a.reason for a in acks if a.state == "rejected"] == ["replayed"]
        # a new seq does not help a command issued before the reset: reset_at was persisted
        late = envelope("disconnect", [mid(meter)], now=reset_at - 1)
        before = len(rig.acks)
        await rig.send(late)
        acks = await rig.new_acks(before)
        assert [a.reason for a in acks if a.state == "rejected"] == ["store_reset"]
        assert quarantined(caplog, "command_store_quarantined") == []
        assert moved(tmp_path, "commands.sqlite") == [aside]
        assert frames(meter) == 2
        await rig.halt()
    with audit_of(rig) as audit:
        assert audit.verify() is None  # the audit log was not damaged: one unbroken chain
        refused = [r.detail or "" for r in audit.query(command=old.id) if r.state == "rejected"]
        assert refused
        assert refused[0].startswith("store_reset")


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", list(DAMAGE))
async def test_damaged_audit_log_is_quarantined_and_remote_control_goes_on(
    tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with counting_bus(1) as handle, dlt_rig(tmp_path, handle) as rig:
        (meter,) = handle.meters
        await rig.start()
        old = envelope("disconnect", [mid(meter)])
        await rig.send(old)
        assert (await rig.finished(old.id, [mid(meter)]))[mid(meter)].state == "verified"
        with audit_of(rig) as audit:
            old_head = audit.head()
        assert old_head is not None
        await rig.halt()
        damage(tmp_path / "audit.sqlite", DAMAGE[kind])

        caplog.clear()
        await rig.start()
        back = envelope("reconnect", [mid(meter)])
        await rig.send(back)
        final = (await rig.finished(back.id, [mid(meter)]))[mid(meter)]
        assert (final.state, final.relay) == ("verified", "armed")
        assert frames(meter) == 2
        # the command store is intact: a re-delivery is a duplicate, not run again
        before = len(rig.acks)
        await rig.send(old)
        await rig.new_acks(before)
        assert frames(meter) == 2
        assert len(quarantined(caplog, "audit_log_quarantined")) == 1
        assert quarantined(caplog, "command_store_quarantined") == []
        await rig.halt()

        caplog.clear()
        await rig.start()
        await rig.halt()
        assert quarantined(caplog, "audit_log_quarantined") == []
    (aside,) = moved(tmp_path, "audit.sqlite")
    with audit_of(rig) as audit:
        assert audit.verify() is None  # the fresh chain is intact and starts with the break
        first = audit.query()[0]
        assert (first.seq, first.state, first.prev_hash) == (1, QUARANTINE_STATE, "0" * 64)
        assert aside.name in (first.detail or "")
        assert audit.breaks() == [first]
        states = {r.state for r in audit.query(command=back.id)}
        assert {"accepted", "verified"} <= states
        assert any(r.state == "duplicate" for r in audit.query(command=old.id))
    assert "no record readable" in (first.detail or "") or f"hash {old_head.hash}" in (first.detail or "")


def test_the_fresh_audit_log_names_the_old_chains_head(tmp_path: Path) -> None:
    """An index page damaged, the table still readable: the break record carries the old head,
    to be matched against a copy of it kept elsewhere."""
    path = tmp_path / "audit.sqlite"
    with AuditLog.open(path) as log:
        for i in range(20):
            log.append(at=1_800_000_000.0 + i, state="accepted", command=f"c{i}", meter=f"m{i}")
        head = log.head()
    assert head is not None
    with sqlite3.connect(path) as conn:
        root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'audit_meter'").fetchone()[0]
    conn.close()

    def index_page(raw: bytearray) -> bytearray:
        raw[(root - 1) * PAGE : (root - 1) * PAGE + 8] = b"\xff" * 8
        return raw

    damage(path, index_page)
    with AuditLog.open(path, clock=lambda: 1_800_000_100.0) as log:
        assert log.quarantined is not None
        (first,) = log.breaks()
        assert (first.seq, first.at) == (1, 1_800_000_100.0)
        assert f"its last readable record: seq {head.seq} hash {head.hash}" in (first.detail or "")
        assert log.verify() is None
    # the moved file is kept as it was: its records (the table, not the damaged index) still verify
    with AuditLog.open(log.quarantined, readonly=True) as old:
        assert old.verify() is None
        assert old.head() == head


def test_verifying_an_unreadable_log_is_an_audit_error(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite"
    with AuditLog.open(path) as log:
        for i in range(200):
            log.append(at=1_800_000_000.0 + i, state="accepted", detail="x" * 100)
    damage(path, flipped_pages)
    with AuditLog.open(path, readonly=True) as log, pytest.raises(AuditError, match="cannot read"):
        log.verify()


@pytest.mark.asyncio
async def test_salvaged_replay_state_still_refuses_old_commands(tmp_path: Path) -> None:
    """Only the executions' page is damaged: the per-key seq and the command ids are read from
    the quarantined file, so a replay is ``replayed`` and an old id under a new seq ``store_reset``."""
    async with counting_bus(1) as handle, dlt_rig(tmp_path, handle) as rig:
        (meter,) = handle.meters
        await rig.start()
        old = envelope("disconnect", [mid(meter)])
        await rig.send(old)
        assert (await rig.finished(old.id, [mid(meter)]))[mid(meter)].state == "verified"
        await rig.halt()
        store = tmp_path / "commands.sqlite"
        with sqlite3.connect(store) as conn:
            root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'executions'").fetchone()[0]
        conn.close()

        def executions_page(raw: bytearray) -> bytearray:
            raw[(root - 1) * PAGE : (root - 1) * PAGE + 8] = b"\xff" * 8
            return raw

        damage(store, executions_page)
        await rig.start()
        before = len(rig.acks)
        await rig.send(old)
        acks = await rig.new_acks(before)
        assert [a.reason for a in acks if a.state == "rejected"] == ["replayed"]
        # same id, newer seq, issued after the reset: still refused (the id is known to have run)
        same_id = envelope("disconnect", [mid(meter)], command_id=old.id, now=time.time() + 1)
        before = len(rig.acks)
        await rig.send(same_id)
        acks = await rig.new_acks(before)
        assert [a.reason for a in acks if a.state == "rejected"] == ["store_reset"]
        assert frames(meter) == 1
        await rig.halt()


def test_reset_caution_ends_when_no_old_command_can_be_valid(tmp_path: Path) -> None:
    path = tmp_path / "commands.sqlite"
    CommandStore.open(path, "gw-1").close()
    damage(path, zeroed_header)
    store = CommandStore.open(path, "gw-1", clock=lambda: 1_800_000_000.0)
    try:
        assert store.quarantined is not None
        assert (store.reset_at, store.reset_caution) == (1_800_000_000.0, True)
        new = envelope("relay_status", ["m1"], now=1_800_000_001.0, expires=60)
        assert store.predates_reset(new) is None
        assert [a.state for a in store.accept(new, 1_800_000_001.0, [MeterPlan("m1", CommandEvent.ADMIT)])][:2] == [
            "received",
            "accepted",
        ]
        store.prune(1_800_000_000.0 + 86400, 86400, 3600)
        assert store.reset_caution  # the clock margin has not passed
        store.prune(1_800_000_000.0 + 86400 + RESET_CLOCK_MARGIN, 86400, 3600)
        assert not store.reset_caution
    finally:
        store.close()
    store = CommandStore.open(path, "gw-1")
    try:  # both remembered over a restart, and the file was not quarantined again
        assert (store.quarantined, store.reset_at, store.reset_caution) == (None, 1_800_000_000.0, False)
        old = envelope("relay_status", ["m1"], now=1_799_999_999.0, expires=60)
        assert "before the command store was reset" in (store.predates_reset(old) or "")
    finally:
        store.close()


def test_a_fresh_audit_log_is_not_a_quarantine(tmp_path: Path) -> None:
    with AuditLog.open(tmp_path / "audit.sqlite") as log:
        assert log.quarantined is None
        assert log.count() == 0
    (tmp_path / "empty.sqlite").write_bytes(b"")
    with AuditLog.open(tmp_path / "empty.sqlite") as log:  # truncated to nothing: a quarantine too
        assert log.quarantined is not None
        assert [r.state for r in log.breaks()] == [QUARANTINE_STATE]

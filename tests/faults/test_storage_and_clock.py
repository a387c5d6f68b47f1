"""Storage and clock faults (docs/reliability.md): a full disk under the running daemon, a damaged
or incomplete outbox at start, and the wall clock stepped under the poller, the outbox and the
time-sync job. Real parts throughout: SQLite files, a tmpfs, mosquitto, Modbus and DL/T 645
simulators on TCP, the daemon as a subprocess scraped over HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import closing
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import pytest_asyncio

from meter_gateway.drivers.backoff import BackoffPolicy
from meter_gateway.drivers.bus import Bus, BusSettings
from meter_gateway.drivers.dlt645_driver import Dlt645Driver
from meter_gateway.drivers.meter_models import Dlt645Model, load_model
from meter_gateway.drivers.reading import Quality, Reading
from meter_gateway.drivers.tcp_link import TcpLink
from meter_gateway.drivers.transport import TcpSettings
from meter_gateway.gateway.config import load_config
from meter_gateway.gateway.daemon.app import Gateway
from meter_gateway.gateway.jobs.time_sync import BROADCAST_LIMIT, TimeSyncJob
from meter_gateway.gateway.store.cursors import CursorStore
from meter_gateway.gateway.store.outbox import AsyncOutbox, Outbox, OutboxDamaged
from meter_gateway.gateway.store.outbox_sizing import MIB, wal_bound
from meter_gateway.gateway.uplink.contract import decode_batch
from meter_gateway.protocols.dlt645.edition import Edition
from meter_gateway.simulators.modbus_meter import ModbusSimServer, SimulatedMeter
from tests.faults import scale
from tests.plugins.broker import Broker, Subscriber
from tests.plugins.ports import free_port
from tests.plugins.simulators import SimBusFactory, SimBusHandle
from tests.plugins.tmpfs import small_tmpfs
from tests.test_daemon import TOPICS, config_text, start_daemon, stop_daemon, wait_until
from tests.test_daemon import scrape as scrape_or_raise

LOG = "meter_gateway.gateway.store.outbox"
ROOT = Path(__file__).resolve().parents[2]


def with_outbox(text: str, budget_mb: float, policy: str = "pause_polling") -> str:
    """A daemon config with its [outbox] budget and overflow policy set."""
    return f'{text}\n[outbox]\nbudget_mb = {budget_mb:g}\noverflow_policy = "{policy}"\n'


def status_of(config: Path) -> tuple[int, dict[str, object], str]:
    """`meter-gateway status --json` as an operator runs it: exit status, document, text."""
    cmd = [sys.executable, "-m", "meter_gateway.gateway.cli", "status", "-c", str(config)]
    done = subprocess.run([*cmd, "--json"], capture_output=True, text=True, check=False, cwd=ROOT, timeout=30)
    text = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT, timeout=30).stdout
    return done.returncode, json.loads(done.stdout or "{}"), text


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "level=error" in line or line.startswith("Traceback")]


def scrape(port: int) -> dict[str, float]:
    """The daemon's metrics; empty until its HTTP server listens."""
    try:
        return scrape_or_raise(port)
    except OSError:
        return {}


def readings(n: int, *, start: int = 0, meter: str = "old-meter") -> list[Reading]:
    return [
        Reading(meter, "energy.active.import.total", 1000.0 + i, "kWh", gateway_time=1.7e9 + i, slot=1.7e9 + 900 * i)
        for i in range(start, start + n)
    ]


def make_outbox(path: Path, n: int) -> str:
    """An outbox of ``n`` undelivered readings, closed cleanly; returns its instance id."""
    box = Outbox.open(path, synchronous="NORMAL")
    try:
        for i in range(0, n, 1000):
            box.add(readings(min(1000, n - i), start=i))
        return box.instance
    finally:
        box.close()


def flip_page_headers(raw: bytearray, page_size: int = 4096) -> None:
    for page in range(2, len(raw) // page_size, 3):
        raw[page * page_size] ^= 0xFF  # the b-tree page type byte


def zero_header(raw: bytearray) -> None:
    raw[:100] = bytes(100)


DAMAGE: dict[str, Callable[[Path], object]] = {
    "flipped_bytes": lambda p: p.write_bytes(_damaged(p, flip_page_headers)),
    "zeroed_header": lambda p: p.write_bytes(_damaged(p, zero_header)),
    "truncated": lambda p: os.truncate(p, p.stat().st_size // 2),
}


def _damaged(path: Path, how: Callable[[bytearray], None]) -> bytes:
    raw = bytearray(path.read_bytes())
    how(raw)
    return bytes(raw)


# -- 6. a damaged outbox at start --------------------------------------------------------------


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_outbox_is_quarantined_and_a_fresh_one_started(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "outbox.sqlite"
    old_instance = make_outbox(db, scale(5_000, 200_000))
    DAMAGE[damage](db)
    damaged = db.read_bytes()
    with caplog.at_level(logging.WARNING, logger=LOG):
        started = time.monotonic()
        box = Outbox.open(db)
        detected_in = time.monotonic() - started
    try:
        assert detected_in <= 5.0
        assert box.quarantined is not None
        assert box.quarantined.name.startswith("outbox.sqlite.corrupt-20")  # UTC timestamp
        assert box.quarantined.read_bytes() == damaged  # kept as found, for forensics
        assert box.depth == 0
        assert box.instance != old_instance  # row numbers restart: the head-end is told
        assert box.stats().counters["quarantined"] == 1
        assert box.stats().quarantined == str(box.quarantined)
        lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(lines) == 1
        assert "event=outbox_quarantined" in lines[0]
        assert str(box.quarantined) in lines[0]
        # the fresh outbox works and hands out only what was committed to it
        assert box.add(readings(3, meter="new-meter")).committed == 3
        assert {r.meter_id for r in box.peek()} == {"new-meter"}
        assert [r.row_id for r in box.peek()] == [1, 2, 3]
    finally:
        box.close()
    again = Outbox.open(db)  # no crash loop: the fresh file passes the check
    try:
        assert again.quarantined is None
        assert again.depth == 3
    finally:
        again.close()
    assert len(list(tmp_path.glob("outbox.sqlite.corrupt-*"))) == 1


def test_open_check_stops_at_its_budget_on_a_large_outbox(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    db = tmp_path / "outbox.sqlite"
    make_outbox(db, 1)
    rows = scale(300_000, 1_000_000)
    with closing(sqlite3.connect(db)) as conn, conn:  # bulk rows in one statement: seconds, not minutes
        conn.execute(
            "WITH RECURSIVE n(i) AS (SELECT 2 UNION ALL SELECT i + 1 FROM n WHERE i <= ?) "
            "INSERT INTO readings (reading_id, meter_id, quantity, value, unit, gateway_time, slot, quality, added_at) "
            "SELECT 'r' || i, printf('%012d', i % 2000), 'energy.active.import.total', 1000.0 + i, 'kWh', "
            "1.7e9 + i, 1.7e9 + 900 * (i / 2000), 0, 1.7e9 FROM n",
            (rows,),
        )
    with closing(sqlite3.connect(db)) as conn:
        started = time.monotonic()
        assert conn.execute("PRAGMA quick_check").fetchall() == [("ok",)]
        full_check = time.monotonic() - started
    budget = full_check / 10  # the interrupt must come long before the check would end
    with caplog.at_level(logging.WARNING, logger=LOG):
        started = time.monotonic()
        box = Outbox.open(db, check_budget=budget)
        opened_in = time.monotonic() - started
    try:
        assert box.quarantined is None  # an incomplete check is not damage
        assert box.depth == rows + 1  # the one make_outbox wrote
    finally:
        box.close()
    assert any("event=outbox_check_incomplete" in r.getMessage() for r in caplog.records)
    print(
        f"\nquick_check of {rows} rows: {full_check:.2f} s in full;"
        f" open with a {budget:.3f} s budget: {opened_in:.2f} s"
    )


def crash_image(db: Path, into: Path, *, wal: bool, shm: bool) -> None:
    """The files a SIGKILL would leave behind (copied while the writer holds them open)."""
    shutil.copy(db, into)
    if wal:
        shutil.copy(f"{db}-wal", f"{into}-wal")
    if shm:
        shutil.copy(f"{db}-shm", f"{into}-shm")


def test_missing_wal_after_a_clean_stop_loses_nothing(tmp_path: Path) -> None:
    db = tmp_path / "outbox.sqlite"
    make_outbox(db, 3_000)
    for suffix in ("-wal", "-shm"):  # a clean close checkpoints and truncates the WAL
        with contextlib.suppress(FileNotFoundError):
            assert Path(f"{db}{suffix}").stat().st_size == 0 or suffix == "-shm"
            Path(f"{db}{suffix}").unlink()
    box = Outbox.open(db)
    try:
        assert box.depth == 3_000
        assert box.counters["wal_lost"] == 0
        assert box.quarantined is None
    finally:
        box.close()


@pytest.mark.parametrize("keep_shm", [True, False], ids=["shm_kept", "shm_lost_too"])
def test_missing_wal_after_a_crash(tmp_path: Path, keep_shm: bool, caplog: pytest.LogCaptureFixture) -> None:
    """What SQLite does: the main file is opened as last checkpointed, silently. With the -shm
    still there the outbox sees the commits it lost and renumbers under a new instance id; with
    both gone nothing is left to tell (docs/outbox.md)."""
    live = tmp_path / "live.sqlite"
    box = Outbox.open(live, synchronous="FULL")
    try:
        box.add(readings(2_000))
        box._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # what the auto-checkpoint does
        box.add(readings(500, start=2_000))  # committed, only in the WAL
        old_instance = box.instance
        image = tmp_path / "outbox.sqlite"
        crash_image(live, image, wal=False, shm=keep_shm)
    finally:
        box.close()
    with caplog.at_level(logging.WARNING, logger=LOG):
        after = Outbox.open(image)
    try:
        assert after.quarantined is None  # the main file is sound: what it holds is delivered
        assert after.depth == 2_000  # the 500 WAL-only readings are gone
        assert [r.reading_id for r in after.peek(limit=2_000)] == [r.id for r in readings(2_000)]
        assert after.last_row_id == 2_000  # the sequence went back: 2001.. will be handed out again
        if keep_shm:
            assert after.counters["wal_lost"] == 1
            assert after.instance != old_instance  # so a reused row number is under a new instance
            assert any("event=outbox_wal_lost" in r.getMessage() for r in caplog.records)
        else:
            assert after.counters["wal_lost"] == 0
            assert after.instance == old_instance  # undetectable: documented in docs/outbox.md
    finally:
        after.close()


def test_a_reader_keeping_wal_and_shm_after_a_clean_stop_is_no_false_alarm(tmp_path: Path) -> None:
    db = tmp_path / "outbox.sqlite"
    box = Outbox.open(db)
    box.add(readings(3_000))
    with closing(sqlite3.connect(db)) as reader:  # e.g. `meter-gateway outbox stats` at that moment
        reader.execute("SELECT count(*) FROM readings").fetchone()
        box.close()  # the -wal (truncated) and -shm stay: the reader still has them open
        assert Path(f"{db}-shm").exists()
        again = Outbox.open(db)
        try:
            assert again.counters["wal_lost"] == 0
            assert again.depth == 3_000
        finally:
            again.close()


def test_crash_with_wal_intact_replays_every_commit(tmp_path: Path) -> None:
    live = tmp_path / "live.sqlite"
    box = Outbox.open(live, synchronous="FULL")
    try:
        box.add(readings(2_000))
        box._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        box.add(readings(500, start=2_000))
        image = tmp_path / "outbox.sqlite"
        crash_image(live, image, wal=True, shm=True)
    finally:
        box.close()
    after = Outbox.open(image)
    try:
        assert after.depth == 2_500
        assert after.counters["wal_lost"] == 0
    finally:
        after.close()


@pytest_asyncio.fixture
async def modbus_sim() -> AsyncIterator[ModbusSimServer]:
    meters = {unit: SimulatedMeter("sim-3ph", start=time.time()) for unit in (1, 2, 3, 4)}
    server = ModbusSimServer(meters, transport="tcp", host="127.0.0.1", port=0)
    await server.start()
    yield server
    await server.stop()


def delivered(sub: Subscriber) -> tuple[set[str], set[tuple[str, int]]]:
    """Reading ids and (outbox instance, row) pairs the subscriber received."""
    ids: set[str] = set()
    rows: set[tuple[str, int]] = set()
    for m in sub.snapshot(TOPICS.readings):
        batch = decode_batch(m.payload)
        for r in batch.readings:
            ids.add(r.id)
            rows.add((batch.outbox, r.row))
    return ids, rows


@pytest.mark.asyncio
async def test_daemon_started_on_a_damaged_outbox_publishes_nothing_from_it(
    tmp_path: Path, mosquitto: Broker, modbus_sim: ModbusSimServer
) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(config_text(tmp_path, mosquitto, modbus_sim.address[1], units=(1, 2), metrics_port=free_port()))
    (tmp_path / "state").mkdir()
    db = tmp_path / "state" / "outbox.sqlite"
    make_outbox(db, 5_000)
    DAMAGE["flipped_bytes"](db)
    sub = Subscriber(mosquitto, [TOPICS.readings]).start()
    proc = await start_daemon(config)
    try:
        await wait_until(lambda: len(delivered(sub)[0]) >= 20, 20, "fresh readings", proc)
    finally:
        code, err = await stop_daemon(proc)
        sub.stop()
    assert code == 0, err[-3000:]
    ids, _ = delivered(sub)
    assert {i.split("/")[0] for i in ids} <= {"mb-1", "mb-2"}  # nothing from the damaged file
    assert err.count("event=outbox_quarantined") == 1
    assert len(list(db.parent.glob("outbox.sqlite.corrupt-*"))) == 1


# -- 6b. damage that appears while the daemon runs ---------------------------------------------


@pytest.mark.asyncio
async def test_damage_found_while_open_is_said_once_and_quarantined_at_the_next_open(tmp_path: Path) -> None:
    db = tmp_path / "outbox.sqlite"
    make_outbox(db, 20_000)
    box = await AsyncOutbox.open(db)
    heard: list[str] = []
    box.on_damage = heard.append
    try:
        assert len(await box.peek(0, 10)) == 10
        DAMAGE["flipped_bytes"](db)  # under the open outbox, as a failing card would
        for _ in range(2):
            with pytest.raises(OutboxDamaged):
                await box.peek(0, 20_000)
        assert len(heard) == 1  # told once, however often it is hit
        assert box.damaged is not None
        assert "malformed" in box.damaged
        assert (tmp_path / "outbox.sqlite.damaged").is_file()
    finally:
        await box.close()
    reopen_moves_it_aside(db)


def reopen_moves_it_aside(db: Path) -> None:
    """The next open of a file marked damaged moves it aside even without its check (which might
    miss what SQLite hit), once."""
    tmp_path = db.parent
    fresh = Outbox.open(db, check_budget=0)
    try:
        assert fresh.quarantined is not None
        assert fresh.counters["quarantined"] == 1
        assert fresh.depth == 0
    finally:
        fresh.close()
    assert not (tmp_path / "outbox.sqlite.damaged").exists()
    assert len(list(tmp_path.glob("outbox.sqlite.corrupt-*"))) == 1
    again = Outbox.open(db)  # no second quarantine, no crash loop
    try:
        assert again.quarantined is None
    finally:
        again.close()


@pytest.mark.asyncio
async def test_daemon_exits_for_a_restart_when_its_outbox_is_damaged_under_it(
    tmp_path: Path, mosquitto: Broker, modbus_sim: ModbusSimServer
) -> None:
    """Damage under the running daemon: one ERROR line, exit 75 (systemd's Restart=on-failure
    restarts it), and the restarted daemon quarantines the file and delivers fresh readings."""
    config = tmp_path / "gateway.toml"
    config.write_text(config_text(tmp_path, mosquitto, modbus_sim.address[1], units=(1, 2), metrics_port=free_port()))
    (tmp_path / "state").mkdir()
    db = tmp_path / "state" / "outbox.sqlite"
    make_outbox(db, 20_000)
    mosquitto.stop()  # the backlog stays put until the damage is in place
    proc = await start_daemon(config)
    sub: Subscriber | None = None
    try:
        await asyncio.sleep(2.0)  # open, checked, polling
        assert proc.returncode is None
        DAMAGE["flipped_bytes"](db)
        mosquitto.start()  # the uplink reads the backlog and hits the damage
        code, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == os.EX_TEMPFAIL, err.decode()[-3000:]
        text = err.decode()
        assert text.count("event=outbox_damaged ") == 1, text[-3000:]
        assert "Traceback" not in text
        assert (db.parent / "outbox.sqlite.damaged").is_file()

        sub = Subscriber(mosquitto, [TOPICS.readings]).start()
        proc = await start_daemon(config)
        await wait_until(lambda: {i.split("/")[0] for i in delivered(sub)[0]} >= {"mb-1", "mb-2"}, 20, "fresh", proc)
    finally:
        code, err_text = await stop_daemon(proc)
        if sub is not None:
            sub.stop()
    assert code == 0, err_text[-3000:]
    assert err_text.count("event=outbox_quarantined") == 1
    assert len(list(db.parent.glob("outbox.sqlite.corrupt-*"))) == 1
    assert not (db.parent / "outbox.sqlite.damaged").exists()


# -- 5. a full disk under the running daemon ---------------------------------------------------


def fill(fs: Path) -> Path:
    """Fill the filesystem to the last block (ENOSPC ends it)."""
    filler = fs / "filler"
    # the suppress is outermost: close() flushes what the last write left buffered, and fails too
    with contextlib.suppress(OSError), filler.open("wb") as f:
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    return filler


@pytest.mark.asyncio
async def test_daemon_rides_out_a_full_disk_and_recovers_without_restart(
    tmp_path: Path, mosquitto: Broker, modbus_sim: ModbusSimServer
) -> None:
    with small_tmpfs(tmp_path / "fs", "4m") as fs:
        metrics_port = free_port()
        config = tmp_path / "gateway.toml"
        config.write_text(
            with_outbox(
                config_text(fs, mosquitto, modbus_sim.address[1], units=(1, 2, 3, 4), metrics_port=metrics_port), 1
            )
        )
        sub = Subscriber(mosquitto, [TOPICS.readings]).start()
        proc = await start_daemon(config)
        try:
            await wait_until(
                lambda: scrape(metrics_port).get("meter_gateway_readings_committed_total", 0) > 30, 20, "commits", proc
            )
            before = scrape(metrics_port)
            full_at = time.monotonic()
            filler = fill(fs)
            full_wall = time.time()
            await wait_until(lambda: scrape(metrics_port).get("meter_gateway_outbox_disk_full") == 1, 10, "alarm", proc)
            alarm_after = time.monotonic() - full_at
            stalled = scrape(metrics_port)["meter_gateway_readings_committed_total"]
            await asyncio.sleep(scale(3, 30))
            # 2. the daemon is running and says why it cannot commit: the status file is still
            # written (in place) on the full disk; two status periods after the disk filled
            status_path = fs / "state" / "status.json"
            await wait_until(
                lambda: json.loads(status_path.read_bytes()).get("updated_at", 0) > full_wall + 5.0,
                15,
                "a status file written after the disk filled",
                proc,
            )
            code, doc, text = await asyncio.to_thread(status_of, config)
            assert code == 0, text
            assert doc["running"] is True
            daemon = doc["daemon"]
            assert isinstance(daemon, dict)
            assert daemon["outbox"]["storage_alarm"] == "disk full"
            assert daemon["outbox"]["held"] > 0
            assert "DISK FULL" in text
            during = scrape(metrics_port)
            # held in memory, not lost and not refused: new readings go on being acquired
            assert (
                during["meter_gateway_readings_acquired_total"] > before["meter_gateway_readings_acquired_total"] + 20
            )
            assert during["meter_gateway_readings_committed_total"] == stalled
            assert during.get("meter_gateway_outbox_refused_total", 0) == 0
            assert proc.returncode is None
            filler.unlink()  # an operator frees space; no restart
            recovered_at = time.monotonic()
            await wait_until(lambda: scrape(metrics_port).get("meter_gateway_outbox_disk_full") == 0, 10, "clear", proc)
            recovery = time.monotonic() - recovered_at
            await wait_until(
                lambda: (
                    scrape(metrics_port)["meter_gateway_readings_committed_total"]
                    >= during["meter_gateway_readings_acquired_total"]
                ),
                10,
                "held readings committed",
                proc,
            )
            await asyncio.sleep(2.0)
        finally:
            code, err = await stop_daemon(proc)
            await asyncio.sleep(0.5)
            sub.stop()
        assert code == 0, err[-3000:]
        # one ERROR line when the condition starts, one INFO line when it clears; no tracebacks
        assert err.count('event=outbox_unavailable reason="disk full"') == 1
        errors = error_lines(err)
        assert not [e for e in errors if e.startswith("Traceback")], err[-3000:]
        assert len(errors) == len({e.split("event=")[-1].split(" ")[0] for e in errors}), errors  # none repeated
        assert len(errors) <= 2, errors  # the outbox's, and at most the poll cursors' save (same disk)
        cleared = [line for line in err.splitlines() if "event=outbox_storage_ok" in line]
        assert len(cleared) == 1
        assert "level=info" in cleared[0]
        _, rows = delivered(sub)
        with closing(sqlite3.connect(fs / "state" / "outbox.sqlite")) as db:
            left = {row for (row,) in db.execute("SELECT row_id FROM readings")}
            (instance,) = db.execute("SELECT value FROM meta WHERE key = 'instance'").fetchone()
            (last,) = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'readings'").fetchone()
        sent = {row for inst, row in rows if inst == instance}
        # every row ever committed is at the broker or still in the outbox: no gap, nothing lost
        assert sent | left == set(range(1, last + 1))
    print(f"\ndisk full: alarm after {alarm_after:.2f} s, cleared {recovery:.2f} s after space returned")
    assert alarm_after <= 2.5  # one poll cycle (1 s) + one metrics refresh (1 s) + scrape


# -- 7. the wall clock stepped -----------------------------------------------------------------


class SteppableClock:
    """Wall clock with an offset the test steps, as NTP or an operator would."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def test_outbox_clock_steps_delete_and_skip_nothing(tmp_path: Path) -> None:
    clock = SteppableClock()
    box = Outbox.open(tmp_path / "outbox.sqlite", clock=clock, overflow_policy="drop-oldest")
    try:
        box.add(readings(50))
        clock.offset += 86400  # +24 h
        box.add(readings(50, start=50))
        clock.offset -= 86400 + 3600  # then 1 h behind
        box.add(readings(50, start=100))
        assert box.depth == 150
        assert [r.row_id for r in box.peek(limit=1000)] == list(range(1, 151))
        assert (box.stats().oldest_age(clock()) or 0) >= 0  # never negative after a step back
        drained = 0
        while rows := box.peek(limit=20):  # a drain with steps in the middle of it
            clock.offset += 86400 if drained % 40 == 0 else -3600
            drained += box.ack(r.row_id for r in rows)
        assert drained == 150
        assert box.counters["overflow_dropped"] == 0
    finally:
        box.close()


@pytest.mark.asyncio
async def test_gateway_clock_steps_during_a_drain_lose_nothing_and_leave_timeouts_alone(
    tmp_path: Path, broker_factory: object, modbus_sim: ModbusSimServer
) -> None:
    # persistence: a message the broker acknowledged just before it stops still reaches the
    # (persistent-session) subscriber after the restart; the gateway has deleted it by then
    broker: Broker = broker_factory(persistence=True)  # type: ignore[operator]
    config = load_config(
        _with_state(config_text(tmp_path, broker, modbus_sim.address[1], units=(1, 2, 3), metrics_port=9))
    )
    sub = Subscriber(broker, [TOPICS.readings], client_id="clock-sub", clean=False).start()
    clock = SteppableClock()
    gateway = Gateway(config, clock=clock)
    stop = asyncio.Event()
    task = asyncio.create_task(gateway.run(stop))
    try:
        await wait_until(lambda: gateway.stats.committed > 20, 15, "first commits")
        await broker.astop()  # a backlog builds up
        await asyncio.sleep(2.0)
        clock.offset += 86400  # +24 h while the uplink is down
        await asyncio.sleep(1.5)
        await broker.astart()
        reconnect_from = time.monotonic()
        await wait_until(lambda: gateway.uplink is not None and gateway.uplink.stats.connected, 15, "reconnect")
        reconnect = time.monotonic() - reconnect_from
        clock.offset -= 86400 + 3600  # -1 h during the drain
        await wait_until(lambda: gateway.outbox is not None and gateway.outbox.depth < 10, 15, "drained")
        await asyncio.sleep(1.5)
        snap = gateway.buses["modbus-a"].snapshot()
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
        await asyncio.sleep(0.5)
        sub.stop()
    assert snap.get("timeouts", 0) == 0  # reply timeouts run on the monotonic clock
    assert reconnect < 5.0  # the uplink's backoff did not jump by a day
    _, rows = delivered(sub)
    with closing(sqlite3.connect(tmp_path / "state" / "outbox.sqlite")) as db:
        left = {row for (row,) in db.execute("SELECT row_id FROM readings")}
        (instance,) = db.execute("SELECT value FROM meta WHERE key = 'instance'").fetchone()
        (last,) = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'readings'").fetchone()
    sent = {row for inst, row in rows if inst == instance}
    assert sent | left == set(range(1, last + 1))  # nothing deleted, nothing skipped


def _with_state(text: str) -> Path:
    marker = 'state_dir = "'
    state = Path(text.split(marker, 1)[1].split('"', 1)[0])
    path = state.parent / "gateway.toml"
    path.write_text(text.replace("[metrics]\nenabled = true", "[metrics]\nenabled = false"))
    return path


# -- 7. clock-suspect flag from the time-sync job ----------------------------------------------

TZ = ZoneInfo("Asia/Shanghai")
START = datetime.datetime(2026, 3, 14, 10, 0)


def _dlt_config(state: Path, port: int, n: int, extra: str = "") -> str:
    meters = "".join(
        f'[[meters]]\nid = "m{i}"\nbus = "dlt-a"\nprotocol = "dlt645-2007"\naddress = "{i:012d}"\n'
        f'model = "dlt645-2007-generic"\n\n'
        for i in range(1, n + 1)
    )
    return (
        f'[gateway]\nid = "gw-skew"\ntimezone = "Asia/Shanghai"\nstate_dir = "{state}"\n\n'
        f'[uplink]\nhost = "127.0.0.1"\n\n'
        f'[[buses]]\nname = "dlt-a"\ntype = "tcp"\nhost = "127.0.0.1"\nport = {port}\nprotocol = "dlt645"\n\n'
        f'{meters}[time_sync]\ninterval = "1d"\nmode = "unicast"\nmax_drift = "5s"\n{extra}'
    )


@contextlib.asynccontextmanager
async def dlt_rig(
    sim_bus: SimBusFactory, tmp_path: Path, n: int = 3
) -> AsyncIterator[tuple[SimBusHandle, Path, Callable[[], float], dict[str, Dlt645Driver], Bus]]:
    handle = await sim_bus(n, speed=0.0, start_time=START)
    assert isinstance(handle.endpoint, tuple)
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    cfg = tmp_path / "gw.toml"
    cfg.write_text(_dlt_config(state, handle.endpoint[1], n))

    def meter_clock() -> float:
        return handle.clock.now().replace(tzinfo=TZ).timestamp()

    model = load_model("dlt645-2007-generic")
    assert isinstance(model, Dlt645Model)
    quick = BackoffPolicy(initial=0.01, maximum=0.02)
    link = TcpLink(TcpSettings(*handle.endpoint, no_reply_limit=0, reconnect=BackoffPolicy(initial=0.05, maximum=0.1)))
    bus = Bus("dlt-a", link, settings=BusSettings(reply_timeout=0.3, attempts=2, retry=quick))
    assert await bus.open()
    drivers = {
        f"m{i}": Dlt645Driver(bus, f"m{i}", f"{i:012d}", Edition.DLT645_2007, model, tz=TZ, clock=meter_clock)
        for i in range(1, n + 1)
    }
    try:
        yield handle, cfg, meter_clock, drivers, bus
    finally:
        await bus.close()


@pytest.mark.asyncio
async def test_clock_suspect_follows_the_measured_skew(sim_bus: SimBusFactory, tmp_path: Path) -> None:
    async with dlt_rig(sim_bus, tmp_path) as (handle, cfg, clock, drivers, bus):
        for meter, offset in zip(handle.meters, (400, 30, -BROADCAST_LIMIT - 60), strict=True):
            meter.clock_offset = offset
        store = CursorStore.open(tmp_path / "state" / "schedule.sqlite")
        try:
            job = TimeSyncJob(load_config(cfg), drivers, {"dlt-a": bus}, clock, cursors=store)
            assert not any(job.clock_suspect(m) for m in drivers)  # nothing measured yet
            await job.sync_once()
            assert [m for m in sorted(drivers) if job.clock_suspect(m)] == ["m1", "m3"]
            assert not job.clock_suspect("m2")  # 30 s off: below the threshold (the alarm limit, 300 s)
            assert not job.clock_suspect("unknown-meter")
            # a restarted job knows it before its first clock read (drift kept in the cursor store)
            restarted = TimeSyncJob(load_config(cfg), drivers, {"dlt-a": bus}, clock, cursors=store)
            await restarted.load()
            assert restarted.suspect_meters == {"m1", "m3"}
            assert restarted.stats.clock_suspect_meters == 2  # for the metrics exporter
            handle.meters[0].clock_offset = 0  # an operator set m1's clock
            await restarted.check_clocks()
            assert restarted.suspect_meters == {"m3"}
            tighter = TimeSyncJob(load_config(cfg), drivers, {"dlt-a": bus}, clock, suspect_drift=20.0)
            await tighter.check_clocks()
            assert tighter.suspect_meters == {"m2", "m3"}  # 30 s > 20 s
        finally:
            store.close()
        assert [m.clock_offset for m in handle.meters][::2] == [0, -BROADCAST_LIMIT - 60]


@pytest.mark.asyncio
@pytest.mark.parametrize("step", [86400.0, -3600.0], ids=["plus_24h", "minus_1h"])
async def test_a_gateway_clock_step_flags_every_meter_at_once_and_syncs_none(
    sim_bus: SimBusFactory, tmp_path: Path, step: float, caplog: pytest.LogCaptureFixture
) -> None:
    async with dlt_rig(sim_bus, tmp_path) as (handle, cfg, meter_clock, drivers, bus):
        offset = [0.0]

        def gateway_clock() -> float:  # the meters keep their time; the gateway's is stepped
            return meter_clock() + offset[0]

        job = TimeSyncJob(load_config(cfg), drivers, {"dlt-a": bus}, gateway_clock, tick=0.1)
        stop = asyncio.Event()
        with caplog.at_level(logging.INFO, logger="meter_gateway"):
            task = asyncio.create_task(job.run(stop))
            try:
                await wait_until(lambda: job.stats.runs == 1, 5, "the first scheduled run")
                assert job.suspect_meters == frozenset()
                offset[0] = step
                stepped = time.monotonic()
                await wait_until(lambda: job.suspect_meters == {"m1", "m2", "m3"}, 3, "every meter flagged")
                flagged_in = time.monotonic() - stepped
            finally:
                stop.set()
                await asyncio.wait_for(task, 5)
        assert job.stats.syncs == 0  # measuring after a step never sends a sync
        assert [m.clock_offset for m in handle.meters] == [0, 0, 0]
        assert flagged_in < 1.0
        assert any("event=gateway_clock_step" in r.getMessage() for r in caplog.records)


def test_clock_suspect_is_a_quality_flag_the_outbox_keeps(tmp_path: Path) -> None:
    box = Outbox.open(tmp_path / "outbox.sqlite")
    try:
        flagged = [
            Reading(r.meter_id, r.quantity, r.value, r.unit, r.gateway_time, slot=r.slot, quality=Quality.CLOCK_SUSPECT)
            for r in readings(2)
        ]
        box.add(flagged)
        assert all(Quality.CLOCK_SUSPECT in r.reading().quality for r in box.peek())
    finally:
        box.close()


# -- 5b. a small state partition (issue 20, item 1) ---------------------------------------------


async def wal_high_water(wal: Path, seconds: float, proc: asyncio.subprocess.Process) -> int:
    """The largest the -wal file gets over ``seconds``, sampled every 10 ms."""
    high = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert proc.returncode is None, "the daemon exited"
        with contextlib.suppress(FileNotFoundError):
            high = max(high, os.stat(wal).st_size)  # a stat: cheaper than a thread hop at 10 ms
        await asyncio.sleep(0.01)
    return high


@pytest.mark.asyncio
@pytest.mark.parametrize(("size", "fits", "too_big"), [("4m", 1, 2), ("8m", 4, 5)])
async def test_small_state_partition_keeps_the_wal_bounded_refuses_a_budget_it_cannot_hold_and_heals(
    tmp_path: Path, mosquitto: Broker, modbus_sim: ModbusSimServer, size: str, fits: int, too_big: int
) -> None:
    with small_tmpfs(tmp_path / "fs", size) as fs:
        metrics_port = free_port()
        config = tmp_path / "gateway.toml"
        base = config_text(fs, mosquitto, modbus_sim.address[1], units=(1, 2, 3, 4), metrics_port=metrics_port)

        # a budget the partition cannot hold: one clear line and exit 75 (systemd retries), nothing written
        config.write_text(with_outbox(base, too_big))
        proc = await start_daemon(config)
        code, err = await stop_daemon_when_exited(proc)
        assert code == os.EX_TEMPFAIL, err[-3000:]
        assert len(error_lines(err)) == 1, err[-3000:]
        assert "event=state_partition_too_small" in err
        assert f"set [outbox] budget_mb to at most {fits}" in err
        assert not (fs / "state" / "outbox.sqlite").exists()

        # the largest budget it holds: the WAL stays bounded with the broker up
        config.write_text(with_outbox(base, fits))
        sub = Subscriber(mosquitto, [TOPICS.readings]).start()
        proc = await start_daemon(config)
        try:
            await wait_until(
                lambda: scrape(metrics_port).get("meter_gateway_readings_delivered_total", 0) > 20,
                20,
                "deliveries",
                proc,
            )
            high = await wal_high_water(fs / "state" / "outbox.sqlite-wal", scale(8, 60), proc)
            steady = scrape(metrics_port)
            assert steady["meter_gateway_outbox_disk_full_events_total"] == 0
            assert steady["meter_gateway_readings_committed_total"] > 50

            # the disk fills (another tenant), then space returns: healed without a restart
            filler = fill(fs)
            await wait_until(lambda: scrape(metrics_port).get("meter_gateway_outbox_disk_full") == 1, 10, "alarm", proc)
            await asyncio.sleep(2.0)
            filler.unlink()
            await wait_until(lambda: scrape(metrics_port).get("meter_gateway_outbox_disk_full") == 0, 10, "clear", proc)
            healed = scrape(metrics_port)["meter_gateway_readings_committed_total"]
            await wait_until(
                lambda: scrape(metrics_port)["meter_gateway_readings_committed_total"] > healed + 12,
                10,
                "commits",
                proc,
            )
        finally:
            proc.kill()  # SIGKILL: the restart must not be stuck on what it leaves behind
            await proc.wait()
        restarted = await start_daemon(config)
        try:
            await wait_until(
                lambda: scrape(metrics_port).get("meter_gateway_readings_committed_total", 0) > 12,
                20,
                "restart",
                restarted,
            )
        finally:
            code, err = await stop_daemon(restarted)
            await asyncio.sleep(0.5)
            sub.stop()
        assert code == 0, err[-3000:]
        with closing(sqlite3.connect(fs / "state" / "outbox.sqlite")) as db:
            assert db.execute("PRAGMA quick_check").fetchone()[0] == "ok"
    print(f"\n{size} partition, budget {fits} MiB: WAL high-water {high} bytes (bound {wal_bound(fits * MIB)})")
    assert high <= wal_bound(fits * MIB)


async def stop_daemon_when_exited(proc: asyncio.subprocess.Process, within: float = 20.0) -> tuple[int, str]:
    _, err = await asyncio.wait_for(proc.communicate(), within)
    assert proc.returncode is not None
    return proc.returncode, err.decode()


# -- 5c. overflow policies do what they say (issue 20, item 3) ---------------------------------


def fill_to_budget(path: Path, budget_mb: float, policy: str) -> int:
    """An outbox over its budget (as a long uplink outage leaves it): within its margin, or for
    drop_oldest at the budget itself (its first drop); returns its depth."""
    drop = policy == "drop_oldest"
    box = Outbox.open(path, budget_bytes=int(budget_mb * MIB), synchronous="NORMAL", overflow_policy="drop-oldest")
    try:
        n = 0
        while not box.over_budget or (drop and box.counters["overflow_dropped"] == 0):
            box.add(readings(20, start=n))
            n += 20
        return box.depth
    finally:
        box.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("policy", ["pause_polling", "drop_oldest"])
async def test_overflow_policy_does_what_it_says(
    tmp_path: Path, mosquitto: Broker, modbus_sim: ModbusSimServer, policy: str, caplog: pytest.LogCaptureFixture
) -> None:
    budget_mb = 0.25
    (tmp_path / "state").mkdir()
    depth = fill_to_budget(tmp_path / "state" / "outbox.sqlite", budget_mb, policy)
    await mosquitto.astop()  # the uplink is down: nothing frees room
    config = load_config(
        _with_state(
            with_outbox(
                config_text(tmp_path, mosquitto, modbus_sim.address[1], units=(1, 2, 3, 4), metrics_port=9),
                budget_mb,
                policy,
            )
        )
    )
    gateway = Gateway(config)
    stop = asyncio.Event()
    with caplog.at_level(logging.INFO, logger="meter_gateway"):
        task = asyncio.create_task(gateway.run(stop))
        try:
            await asyncio.sleep(scale(4, 20))  # four poll slots of four meters
            over = gateway.outbox is not None and gateway.outbox.over_budget
            reads = gateway.stats.reads
            stats = await gateway.outbox.stats() if gateway.outbox is not None else None
            if policy == "pause_polling":
                await mosquitto.astart()  # deliveries free room: polling resumes by itself
                await wait_until(lambda: gateway.stats.reads > reads, 30, "polling resumed")
        finally:
            stop.set()
            await asyncio.wait_for(task, 20)
    assert over
    assert stats is not None
    messages = [r.getMessage() for r in caplog.records]
    if policy == "pause_polling":
        assert reads == 0  # no read issued while over budget ...
        assert gateway.stats.paused_slots >= 12  # ... each slot counted as missed (reason outbox_full)
        assert stats.counters["refused"] == 0  # nothing polled only to be refused
        assert stats.depth == depth
        assert sum("event=polling_paused" in m for m in messages) == 1
        assert sum("event=polling_resumed" in m for m in messages) == 1
    else:
        assert reads >= 12  # polling goes on ...
        assert stats.counters["overflow_dropped"] >= 12  # ... and the oldest rows make room, counted
        assert stats.counters["refused"] == 0
        assert not any("event=polling_paused" in m for m in messages)
        # one line when the dropping starts, not one per read (rate-limited)
        assert sum("event=outbox_dropped" in m and "which=oldest_undelivered" in m for m in messages) == 1
    assert not any("event=outbox_refused reason=over_budget" in m for m in messages)

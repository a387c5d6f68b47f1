"""FrozenJob against simulated DL/T 645-2007 meters on a real TCP bus, a real SQLite outbox and a
real cursor store. Time is the simulators' SimClock (standing still unless a test moves it); the
gateway clock is that time read in Asia/Shanghai, plus an offset for gateway clock steps."""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from meter_gateway.drivers.backoff import BackoffPolicy
from meter_gateway.drivers.bus import Bus, BusSettings
from meter_gateway.drivers.dlt645_driver import Dlt645Driver, daily_frozen_quantities
from meter_gateway.drivers.meter_models import Dlt645Model, load_model
from meter_gateway.drivers.reading import Quality
from meter_gateway.drivers.tcp_link import TcpLink
from meter_gateway.drivers.transport import TcpSettings
from meter_gateway.gateway.config import Config, load_config
from meter_gateway.gateway.daemon.schedule import MissedSlots, freeze_time
from meter_gateway.gateway.jobs.frozen import FrozenJob
from meter_gateway.gateway.store.cursors import CursorStore, OwedFreeze
from meter_gateway.gateway.store.outbox import AsyncOutbox, Row
from meter_gateway.protocols.dlt645.edition import Edition
from meter_gateway.simulators.clock import SimClock
from meter_gateway.simulators.faults import Faults
from tests.plugins.daemon import until
from tests.plugins.simulators import SimBusFactory, SimBusHandle

TZ = ZoneInfo("Asia/Shanghai")
QUICK = BackoffPolicy(initial=0.01, maximum=0.02)
DAY = 86400.0


def _model() -> Dlt645Model:
    model = load_model("dlt645-2007-generic")
    assert isinstance(model, Dlt645Model)
    return model


MODEL = _model()
QUANTITIES = daily_frozen_quantities(MODEL)
E_TOTAL = "energy.active.import.total"


def config_text(state: Path, port: int, *, n: int = 1, backfill_days: int = 7) -> str:
    meters = "".join(
        f'[[meters]]\nid = "m{i}"\nbus = "dlt-a"\nprotocol = "dlt645-2007"\naddress = "{i:012d}"\n'
        f'model = "dlt645-2007-generic"\n\n'
        for i in range(1, n + 1)
    )
    return f"""
[gateway]
id = "gw-frozen"
timezone = "Asia/Shanghai"
state_dir = "{state}"

[uplink]
host = "127.0.0.1"

[[buses]]
name = "dlt-a"
type = "tcp"
host = "127.0.0.1"
port = {port}
protocol = "dlt645"

[[buses]]
name = "mb"
type = "tcp"
host = "127.0.0.1"
port = 1
protocol = "modbus-tcp"

{meters}
[[meters]]
id = "mb1"
bus = "mb"
protocol = "modbus"
address = 1
model = "sim-3ph"

[[poll_groups]]
name = "energy15"
interval = "15m"
quantities = ["energy.active.import.total", "voltage.l1"]
backfill = true

[daily_frozen]
delay = "5m"
spread = "10m"
backfill_days = {backfill_days}
"""


@dataclass
class GatewayClock:
    """Gateway unix time: the simulated wall time read in TZ, plus ``step`` (a gateway clock step
    the meters do not see)."""

    sim: SimClock
    step: float = 0.0

    def __call__(self) -> float:
        return self.sim.now().replace(tzinfo=TZ).timestamp() + self.step


@dataclass
class Rig:
    handle: SimBusHandle
    config: Config
    clock: GatewayClock
    bus: Bus
    drivers: dict[str, Dlt645Driver]
    outbox: AsyncOutbox
    state: Path
    jobs: list[FrozenJob] = field(default_factory=list)

    def store(self) -> CursorStore:
        return CursorStore.for_config(self.config)

    def set_day(self, day: datetime.date, at: datetime.time) -> None:
        self.handle.clock.set(datetime.datetime.combine(day, at))

    @asynccontextmanager
    async def running(self, **options: object) -> AsyncIterator[FrozenJob]:
        """A FrozenJob on a freshly opened cursor store, stopped (and its store closed) on exit."""
        store = self.store()
        job = FrozenJob(
            self.config,
            self.drivers,
            self.outbox,
            self.clock,
            store,
            tick=0.01,
            **options,  # type: ignore[arg-type]
        )
        self.jobs.append(job)
        await job.load()  # what the job resumes from is visible to the test at once
        stop = asyncio.Event()
        task = asyncio.create_task(job.run(stop))
        try:
            yield job
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)
            store.close()

    async def rows(self) -> list[Row]:
        return await self.outbox.peek(0, 10_000)


@asynccontextmanager
async def rig(sim_bus: SimBusFactory, tmp_path: Path, *, n: int = 1, backfill_days: int = 7) -> AsyncIterator[Rig]:
    handle = await sim_bus(n, speed=0.0, history_days=10, start_time=datetime.datetime(2026, 3, 14, 10, 0))
    assert isinstance(handle.endpoint, tuple)
    state = tmp_path / "state"
    state.mkdir()
    path = tmp_path / "gw.toml"
    path.write_text(config_text(state, handle.endpoint[1], n=n, backfill_days=backfill_days))
    config = load_config(path)
    clock = GatewayClock(handle.clock)
    link = TcpLink(TcpSettings(*handle.endpoint, no_reply_limit=0, reconnect=BackoffPolicy(initial=0.05, maximum=0.1)))
    bus = Bus("dlt-a", link, settings=BusSettings(reply_timeout=0.2, attempts=2, retry=QUICK))
    assert await bus.open()
    drivers = {
        f"m{i}": Dlt645Driver(bus, f"m{i}", f"{i:012d}", Edition.DLT645_2007, MODEL, tz=TZ, clock=clock)
        for i in range(1, n + 1)
    }
    outbox = await AsyncOutbox.open(tmp_path / "outbox.sqlite")
    try:
        yield Rig(handle, config, clock, bus, drivers, outbox, state)
    finally:
        await outbox.close()
        await bus.close()


def d(day: int) -> datetime.date:
    return datetime.date(2026, 3, day)


def frozen_rows(rows: list[Row], meter: str = "m1") -> dict[tuple[str, datetime.date], Row]:
    """Rows of ``meter`` by (quantity, freeze date)."""
    out = {}
    for r in rows:
        if r.meter_id == meter and r.meter_time is not None:
            out[(r.quantity, datetime.datetime.fromtimestamp(r.meter_time, TZ).date())] = r
    return out


def sim_freeze(rig: Rig, day: datetime.date, meter: int = 0) -> float:
    """The simulated meter's own record of forward active energy at the ``day`` freeze."""
    for f in rig.handle.meters[meter].freezes:
        if f.time.date() == day:
            return round(f.energy["active.import.total"], 2)
    raise LookupError(day)


# -- live reads --------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_freeze_is_read_after_local_midnight_plus_delay(sim_bus: SimBusFactory, tmp_path: Path) -> None:
    async with rig(sim_bus, tmp_path) as r, r.running() as job:
        # a fresh gateway reads the newest freeze (today's) at once; it is 10 h late: backfilled
        await until(lambda: job.stats.backfilled_days == 1)
        assert job.stats.frozen_reads == 0
        r.set_day(d(15), datetime.time(0, 3))  # midnight passed, but not delay + spread
        await asyncio.sleep(0.2)
        assert job.stats.frozen_reads == 0
        assert job.schedule is not None
        read_at = job.schedule.read_time("m1", d(15))
        assert freeze_time(d(15), TZ) + 300 <= read_at < freeze_time(d(15), TZ) + 900
        r.handle.clock.set(datetime.datetime.fromtimestamp(read_at + 1, TZ).replace(tzinfo=None))
        await until(lambda: job.stats.frozen_reads == 1)
        rows = frozen_rows(await r.rows())
    row = rows[(E_TOTAL, d(15))]
    assert row.meter_time == freeze_time(d(15), TZ)
    assert Quality(row.quality) == Quality.FROZEN
    assert row.reading_id == f"m1/{E_TOTAL}/m{int(freeze_time(d(15), TZ))}"
    assert row.value == pytest.approx(sim_freeze(r, d(15)))
    assert {q for q, day in rows if day == d(15)} == set(QUANTITIES)
    assert Quality(rows[(E_TOTAL, d(14))].quality) == Quality.FROZEN | Quality.BACKFILLED
    assert job.stats.owed == 0


# -- outage backfill -----------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_gateway_down_three_days_backfills_three_days_with_stable_ids(
    sim_bus: SimBusFactory, tmp_path: Path
) -> None:
    async with rig(sim_bus, tmp_path) as r:
        async with r.running() as job:
            await until(lambda: job.stats.backfilled_days == 1)  # 14th, read at start-up
        before = len(await r.rows())
        r.set_day(d(17), datetime.time(10, 0))  # the gateway was down for 3 days; the meters froze on
        async with r.running() as job:
            await until(lambda: job.stats.backfilled_days == 3)
            await asyncio.sleep(0.1)
            assert job.stats.backfilled_days == 3
            assert job.stats.frozen_reads == 0
            assert job.stats.lost_days == 0
        rows = await r.rows()
        assert len(rows) - before == 3 * len(QUANTITIES)
        by_day = frozen_rows(rows)
        for day in (d(15), d(16), d(17)):
            row = by_day[(E_TOTAL, day)]
            assert Quality(row.quality) == Quality.FROZEN | Quality.BACKFILLED
            assert row.meter_time == freeze_time(day, TZ)
            assert row.value == pytest.approx(sim_freeze(r, day))
        ids = {row.reading_id for row in rows}

        # the same three days owed again (a cursor lost to a power cut): same ids, all duplicates
        store = r.store()
        store.save_frozen({"m1": d(15)})
        store.close()
        async with r.running() as job:
            await until(lambda: job.stats.rereads == 3)
            assert job.stats.backfilled_days == 0
            assert job.stats.committed == 0
            assert job.stats.duplicates == 3 * len(QUANTITIES)
        assert {row.reading_id for row in await r.rows()} == ids


@pytest.mark.asyncio
async def test_outage_longer_than_backfill_days_reads_only_the_window(sim_bus: SimBusFactory, tmp_path: Path) -> None:
    async with rig(sim_bus, tmp_path, backfill_days=2) as r:
        async with r.running() as job:
            await until(lambda: job.stats.backfilled_days == 1)
        r.set_day(d(19), datetime.time(10, 0))  # 15th..19th missed; the window is the newest 2
        async with r.running() as job:
            await until(lambda: job.stats.backfilled_days == 2)
            await asyncio.sleep(0.1)
            assert job.stats.lost_days == 3
        days = {day for _, day in frozen_rows(await r.rows())}
    assert days == {d(14), d(18), d(19)}


# -- failures ------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_meter_offline_during_the_freeze_read_is_retried_later_even_across_a_restart(
    sim_bus: SimBusFactory, tmp_path: Path
) -> None:
    async with rig(sim_bus, tmp_path) as r:
        faults = r.handle.bus.faults
        faults.per_meter["000000000001"] = Faults(never_answer=True)
        async with r.running(retry_base=60.0) as job:
            await until(lambda: job.stats.read_failures.get("no_answer") == 1)
            assert job.owed() == {"m1": [d(14)]}
            r.handle.clock.advance(30)  # before the retry time: no new attempt
            await asyncio.sleep(0.2)
            assert job.stats.read_failures == {"no_answer": 1}
        assert await r.rows() == []
        # the owed freeze survives the restart; the meter is back
        del faults.per_meter["000000000001"]
        async with r.running(retry_base=60.0) as job:
            assert job.owed() == {"m1": [d(14)]}  # loaded, its retry time not known: tried at once
            await until(lambda: job.stats.backfilled_days == 1)
        rows = frozen_rows(await r.rows())
    assert Quality(rows[(E_TOTAL, d(14))].quality) == Quality.FROZEN | Quality.BACKFILLED


@pytest.mark.asyncio
async def test_failed_read_backs_off_then_succeeds(sim_bus: SimBusFactory, tmp_path: Path) -> None:
    async with rig(sim_bus, tmp_path) as r:
        faults = r.handle.bus.faults
        faults.per_meter["000000000001"] = Faults(never_answer=True)
        async with r.running(retry_base=60.0) as job:
            await until(lambda: job.stats.read_failures.get("no_answer") == 1)
            r.handle.clock.advance(61)
            await until(lambda: job.stats.read_failures.get("no_answer") == 2)  # 2nd attempt, then 120 s
            del faults.per_meter["000000000001"]
            r.handle.clock.advance(100)
            await asyncio.sleep(0.2)
            assert job.stats.backfilled_days == 0
            r.handle.clock.advance(25)
            await until(lambda: job.stats.backfilled_days == 1)
            # both failed attempts count: the first read of the 14th at 10:00 was already late
            assert job.stats.backfill_failures == 2


# -- clock steps ---------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_gateway_clock_steps_forward_and_back_without_reading_wrong_days(
    sim_bus: SimBusFactory, tmp_path: Path
) -> None:
    async with rig(sim_bus, tmp_path) as r, r.running(retry_base=60.0) as job:
        await until(lambda: job.stats.backfilled_days == 1)
        r.clock.step = 2 * DAY  # the gateway clock jumps 2 days ahead; the meters' clocks do not
        await until(lambda: job.stats.not_yet >= 1)
        await asyncio.sleep(0.1)
        assert job.owed() == {"m1": [d(15), d(16)]}  # the meter has not frozen them: waited for
        assert job.stats.backfilled_days == 1
        r.clock.step = 0.0  # NTP steps it back; the 14th, handed out again, is only re-read
        await until(lambda: job.owed() == {"m1": [d(15), d(16)]})  # still owed, nothing deleted by the clock
        await asyncio.sleep(0.2)  # their retries (planned 2 days ahead) are brought back to the clock
        r.set_day(d(16), datetime.time(10, 0))
        await until(lambda: job.stats.backfilled_days == 3)
        assert job.schedule is not None
        assert job.schedule.clock_resets == 1
        rows = await r.rows()
    by_day = frozen_rows(rows)
    assert {day for _, day in by_day} == {d(14), d(15), d(16)}
    for day in (d(15), d(16)):
        assert by_day[(E_TOTAL, day)].value == pytest.approx(sim_freeze(r, day))
    assert len(rows) == 3 * len(QUANTITIES)


@pytest.mark.asyncio
async def test_a_meter_that_skipped_a_midnight_gives_that_day_up_and_reads_the_others(
    sim_bus: SimBusFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with rig(sim_bus, tmp_path) as r:
        async with r.running() as job:
            await until(lambda: job.stats.backfilled_days == 1)
        r.set_day(d(17), datetime.time(10, 0))
        meter = r.handle.meters[0]
        # the meter was unpowered over the 16th's midnight: it has no record of that day
        assert meter.status_word3 == 0  # (any request-like access makes the meter freeze up to now)
        freezes = [f for f in meter.freezes if f.time.date() != d(16)]
        meter.freezes.clear()
        meter.freezes.extend(freezes)
        with caplog.at_level(logging.WARNING, logger="meter_gateway"):
            async with r.running() as job:
                await until(lambda: job.stats.backfilled_days == 2 and job.stats.lost_days == 1)
        by_day = frozen_rows(await r.rows())
    assert {day for _, day in by_day} == {d(14), d(15), d(17)}
    assert by_day[(E_TOTAL, d(15))].value == pytest.approx(sim_freeze(r, d(15)))
    assert any("event=frozen_lost" in rec.message and "2026-03-16" in rec.message for rec in caplog.records)


# -- poll slots ----------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_missed_poll_slots_at_the_freeze_instant_are_filled_from_the_freeze(
    sim_bus: SimBusFactory, tmp_path: Path
) -> None:
    async with rig(sim_bus, tmp_path) as r, r.running() as job:
        await until(lambda: job.stats.backfilled_days == 1)
        midnight = int(freeze_time(d(14), TZ))
        job.note_missed(
            [
                MissedSlots("energy15", "m1", midnight - 4 * 900, midnight + 4 * 900, 900),
                MissedSlots("energy15", "mb1", midnight, midnight, 900),  # Modbus: nothing to fill from
            ]
        )
        await until(lambda: job.stats.slots_filled == 1)
        assert job.stats.slots_unfillable == 8 + 1
        assert "mb1" in job.stats.skipped_meters
        rows = await r.rows()
    by_day = frozen_rows(rows)
    filled = by_day[(E_TOTAL, d(14))]
    # the freeze was already committed (same id): the fill is the same reading, a duplicate
    assert filled.meter_time == midnight
    assert job.stats.duplicates == len(QUANTITIES)
    assert job.stats.rereads == 1


@pytest.mark.asyncio
async def test_filled_slot_carries_the_slot_when_the_freeze_is_first_read_for_it(
    sim_bus: SimBusFactory, tmp_path: Path
) -> None:
    async with rig(sim_bus, tmp_path) as r:
        store = r.store()
        store.save_frozen({"m1": d(15)})  # the 14th was already read before
        store.close()
        async with r.running() as job:
            midnight = int(freeze_time(d(13), TZ))
            job.note_missed([MissedSlots("energy15", "m1", midnight, midnight + 900, 900)])
            await until(lambda: job.stats.slots_filled == 1)
            rows = await r.rows()
    row = frozen_rows(rows)[(E_TOTAL, d(13))]
    assert row.slot == midnight
    assert Quality(row.quality) == Quality.FROZEN | Quality.BACKFILLED
    assert row.value == pytest.approx(sim_freeze(r, d(13)))
    others = [x for x in rows if x.quantity != E_TOTAL]
    assert all(x.slot is None for x in others)  # voltage.l1 is not frozen; other energies are no slot's


# -- persistence -----------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_owed_freezes_and_cursor_are_in_the_store_after_stop(sim_bus: SimBusFactory, tmp_path: Path) -> None:
    async with rig(sim_bus, tmp_path) as r:
        r.handle.bus.faults.per_meter["000000000001"] = Faults(never_answer=True)
        async with r.running() as job:
            await until(lambda: job.stats.read_failures.get("no_answer") == 1)
        store = r.store()
        try:
            assert store.load_frozen(r.clock(), TZ) == {"m1": d(15)}
            owed = store.load_owed()
        finally:
            store.close()
    assert owed == [OwedFreeze("m1", d(14), backfill=True, fills={}, attempts=1)]


@pytest.mark.asyncio
async def test_a_backfill_waiting_on_a_slow_meter_costs_no_cpu(sim_bus: SimBusFactory, tmp_path: Path) -> None:
    """Owed days queued behind a read in progress wait for that read's end: the job must not spin
    on their past retry times (it did, starving the outbox writer of the GIL)."""
    async with rig(sim_bus, tmp_path) as r:
        async with r.running() as job:
            await until(lambda: job.stats.backfilled_days == 1)
        r.set_day(d(17), datetime.time(10, 0))
        r.handle.bus.faults.dribble = 0.004  # a slow serial server: ~0.1 s a reply
        async with r.running() as job:
            wall, cpu = time.monotonic(), time.process_time()
            await until(lambda: job.stats.backfilled_days == 3)
            wall, cpu = time.monotonic() - wall, time.process_time() - cpu
        assert wall > 0.5, "the meter was meant to be slow"
        assert cpu < 0.5 * wall, f"{cpu:.2f} s of CPU in {wall:.2f} s of waiting for the meter"

"""CJ/T 188 settlement-day history as frozen data: the driver's settlement read against simulated
water and heat meters over real TCP, and the real daemon (gateway.daemon.app.Gateway) backfilling a
settlement day it was down across, with a real outbox and cursor store on disk and a broker port
nobody listens on (every reading stays in the outbox for the test to read).

Time is the simulators' SimClock (standing still unless the test moves it); the gateway clock is
that wall time read in Asia/Shanghai, the meters' zone.
"""

from __future__ import annotations

import datetime
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from meter_gateway.drivers.backoff import BackoffPolicy
from meter_gateway.drivers.bus import Bus, BusSettings
from meter_gateway.drivers.cjt188_driver import Cjt188Driver, latest_settlement, settlement_dates
from meter_gateway.drivers.cjt188_model import Cjt188Model
from meter_gateway.drivers.meter_models import load_model
from meter_gateway.drivers.reading import Quality
from meter_gateway.drivers.tcp_link import TcpLink
from meter_gateway.drivers.transport import TcpSettings
from meter_gateway.gateway.config import load_config
from meter_gateway.gateway.daemon.schedule import freeze_time
from meter_gateway.gateway.store.cursors import CursorStore
from meter_gateway.simulators.cjt188_meter import Cjt188Meter
from meter_gateway.simulators.clock import SimClock
from meter_gateway.simulators.links import SimulatedBus
from tests.plugins.daemon import running, until
from tests.plugins.simulators import MetersBusFactory

TZ = ZoneInfo("Asia/Shanghai")
START = datetime.datetime(2026, 3, 14, 10, 0)
QUICK = BackoffPolicy(initial=0.01, maximum=0.02)
D = datetime.date


def model(name: str) -> Cjt188Model:
    loaded = load_model(name)
    assert isinstance(loaded, Cjt188Model)
    return loaded


@dataclass
class SimWallClock:
    sim: SimClock

    def __call__(self) -> float:
        return self.sim.now().replace(tzinfo=TZ).timestamp()


@asynccontextmanager
async def bus_to(sim: SimulatedBus) -> AsyncIterator[Bus]:
    assert isinstance(sim.endpoint, tuple)
    host, port = sim.endpoint
    link = TcpLink(TcpSettings(host, port, no_reply_limit=0, reconnect=BackoffPolicy(initial=0.05, maximum=0.1)))
    bus = Bus("sim", link, settings=BusSettings(reply_timeout=0.3, attempts=2, retry=QUICK))
    assert await bus.open()
    try:
        yield bus
    finally:
        await bus.close()


def settled(sim: Cjt188Meter) -> dict[datetime.date, float]:
    """The simulated meter's own settlement records, as its D12x replies carry them (0.01)."""
    sim.current_values()  # the simulated meter settles lazily, when it is next looked at
    return {day: int(value * 100) / 100 for day, value in sim.settlements}


def test_settlement_calendar_clamps_to_short_months() -> None:
    assert settlement_dates(D(2026, 1, 15), D(2026, 4, 30), 31) == [
        D(2026, 1, 31),
        D(2026, 2, 28),
        D(2026, 3, 31),
        D(2026, 4, 30),
    ]
    assert settlement_dates(D(2026, 3, 2), D(2026, 3, 19), 20) == []
    assert settlement_dates(D(2026, 3, 20), D(2026, 3, 20), 20) == [D(2026, 3, 20)]
    assert latest_settlement(D(2026, 3, 19), 20) == D(2026, 2, 20)
    assert latest_settlement(D(2026, 3, 20), 20) == D(2026, 3, 20)
    assert latest_settlement(D(2026, 1, 5), 20) == D(2025, 12, 20)


@pytest.mark.asyncio
async def test_settlement_reads_equal_the_simulated_meters_records(meters_bus: MetersBusFactory) -> None:
    clock = SimClock(START, 0.0)
    water = Cjt188Meter("00000000000001", "water", clock=clock, settlement_day=5)
    heat = Cjt188Meter("00000000000002", "heat", clock=clock, settlement_day=5)
    sim = await meters_bus([water, heat])
    clock.set(datetime.datetime(2026, 6, 10, 12, 0))  # settled on Apr 5, May 5 and Jun 5 since START
    async with bus_to(sim) as bus:
        w = Cjt188Driver(bus, "w01", water.address_text, model("cjt188-cold-water"), tz=TZ)
        h = Cjt188Driver(bus, "h02", heat.address_text, model("cjt188-heat"), tz=TZ)
        assert w.settlement_dates(D(2026, 4, 1), D(2026, 6, 30)) is None  # not read yet
        assert await w.read_settlement_day() == 5
        assert w.settlement_day == 5
        assert w.settlement_dates(D(2026, 4, 1), D(2026, 6, 30)) == [D(2026, 4, 5), D(2026, 5, 5), D(2026, 6, 5)]
        records = settled(water)
        assert sorted(records) == [D(2026, 4, 5), D(2026, 5, 5), D(2026, 6, 5)]
        # D120 is the newest settlement, D122 the third newest
        assert (await w.read_history(1)).value == records[D(2026, 6, 5)]
        assert (await w.read_history(3)).value == records[D(2026, 4, 5)]

        assert w.frozen_quantities() == ("volume.total",)
        for day in (D(2026, 4, 5), D(2026, 5, 5), D(2026, 6, 5)):
            (r,) = await w.read_frozen_day(day, w.frozen_quantities())
            assert (r.quantity, r.value, r.unit) == ("volume.total", records[day], "m3")
            assert r.meter_time == freeze_time(day, TZ)  # stamped at the settlement instant
            assert r.quality == Quality.GOOD
        assert await w.read_frozen_day(D(2026, 5, 6), ["volume.total"]) == []  # not a settlement date
        assert await w.read_frozen_day(D(2026, 7, 5), ["volume.total"]) == []  # still to come
        assert await w.read_frozen_day(D(2026, 3, 5), ["volume.total"]) == []  # before the meter kept any

        # heat meters keep their heat register at settlement days
        assert h.frozen_quantities() == ("heat.total",)
        (r,) = await h.read_frozen_day(D(2026, 5, 5), h.frozen_quantities())
        assert (r.quantity, r.value, r.unit) == ("heat.total", settled(heat)[D(2026, 5, 5)], "kWh")


@pytest.mark.asyncio
async def test_which_history_record_holds_a_date_is_counted_from_the_meters_clock(
    meters_bus: MetersBusFactory,
) -> None:
    clock = SimClock(START, 0.0)
    water = Cjt188Meter("00000000000001", "water", clock=clock, settlement_day=5)
    water.clock_offset = -2 * 86400  # its clock runs two days behind ours, all along
    sim = await meters_bus([water])
    clock.set(datetime.datetime(2026, 6, 6, 1, 0))  # our Jun 6, its Jun 4: it has not settled Jun 5
    async with bus_to(sim) as bus:
        w = Cjt188Driver(bus, "w01", water.address_text, model("cjt188-cold-water"), tz=TZ)
        records = settled(water)
        assert sorted(records) == [D(2026, 4, 5), D(2026, 5, 5)]
        assert await w.read_frozen_day(D(2026, 6, 5), ["volume.total"]) == []
        # May 5 is its newest settlement (D120), not its second newest as our calendar would say
        (r,) = await w.read_frozen_day(D(2026, 5, 5), ["volume.total"])
        assert r.value == records[D(2026, 5, 5)]
        (r,) = await w.read_frozen_day(D(2026, 4, 5), ["volume.total"])
        assert r.value == records[D(2026, 4, 5)]


def write_config(path: Path, state: Path, broker_port: int, port: int) -> Path:
    path.write_text(f"""
[gateway]
id = "gw-settle"
timezone = "Asia/Shanghai"
state_dir = "{state}"

[uplink]
host = "127.0.0.1"
port = {broker_port}

[metrics]
enabled = false

[[buses]]
name = "water"
type = "tcp"
host = "127.0.0.1"
port = {port}
protocol = "cjt188"
reply_timeout = "300ms"

[[meters]]
id = "w1"
bus = "water"
protocol = "cjt188"
address = "00000000000001"
model = "cjt188-cold-water"

[[meters]]
id = "g2"
bus = "water"
protocol = "cjt188"
address = "00000000000002"
model = "cjt188-gas"

[[poll_groups]]
name = "hourly"
interval = "1h"
quantities = ["volume.total"]
spread = 0

[daily_frozen]
""")
    return path


def settlement_rows(state: Path) -> list[sqlite3.Row]:
    with sqlite3.connect(state / "outbox.sqlite") as conn:
        conn.row_factory = sqlite3.Row
        query = "SELECT * FROM readings WHERE meter_time IS NOT NULL AND quality & ? ORDER BY row_id"
        return conn.execute(query, (int(Quality.FROZEN),)).fetchall()


def by_day(rows: list[sqlite3.Row], meter: str) -> dict[datetime.date, sqlite3.Row]:
    out: dict[datetime.date, sqlite3.Row] = {}
    for r in rows:
        if r["meter_id"] == meter:
            day = datetime.datetime.fromtimestamp(r["meter_time"], TZ).date()
            assert day not in out, f"{meter}: the {day} settlement committed twice"
            out[day] = r
    return out


@pytest.mark.asyncio
async def test_a_settlement_day_missed_while_down_is_backfilled_once(
    meters_bus: MetersBusFactory, unused_port: int, tmp_path: Path
) -> None:
    clock = SimClock(START, 0.0)
    water = Cjt188Meter("00000000000001", "water", clock=clock, settlement_day=20)
    gas = Cjt188Meter("00000000000002", "gas", clock=clock, settlement_day=1)
    sim = await meters_bus([water, gas])
    host_port = sim.endpoint
    assert isinstance(host_port, tuple)
    state = tmp_path / "state"
    config = write_config(tmp_path / "gw.toml", state, unused_port, host_port[1])
    wall = SimWallClock(clock)

    # first start on Mar 21: each meter's settlement day is read (8103), then its newest settlement
    clock.set(datetime.datetime(2026, 3, 21, 9, 0))
    async with running(config, wall) as gw:
        # the gas meter's newest, Mar 1, is lost: the simulated meter kept nothing before START
        await until(
            lambda: gw.frozen is not None and gw.frozen.stats.backfilled_days == 1 and gw.frozen.stats.lost_days == 1
        )
        assert gw.frozen is not None
        assert gw.frozen.owed() == {}
    first = settlement_rows(state)
    assert by_day(first, "w1").keys() == {D(2026, 3, 20)}
    assert by_day(first, "g2") == {}

    # down from Mar 21 to Apr 22: the water meter settled on Apr 20, the gas meter on Apr 1
    clock.set(datetime.datetime(2026, 4, 22, 9, 0))
    async with running(config, wall) as gw:
        await until(lambda: gw.frozen is not None and gw.frozen.stats.backfilled_days == 2)
        assert gw.frozen is not None
        assert gw.frozen.stats.lost_days == 0
        assert gw.frozen.stats.duplicates == 0  # Mar 20 was not read again
        assert gw.frozen.owed() == {}
    rows = settlement_rows(state)
    water_rows, gas_rows = by_day(rows, "w1"), by_day(rows, "g2")
    assert water_rows.keys() == {D(2026, 3, 20), D(2026, 4, 20)}
    assert gas_rows.keys() == {D(2026, 4, 1)}
    for meter_rows, sim_meter in ((water_rows, water), (gas_rows, gas)):
        for day, row in meter_rows.items():
            assert row["quantity"] == "volume.total"
            assert row["value"] == settled(sim_meter)[day]
            assert row["meter_time"] == freeze_time(day, TZ)
            # the id every freeze has: the same on every read, so the head-end dedupes
            assert row["reading_id"] == f"{row['meter_id']}/volume.total/m{int(freeze_time(day, TZ))}"
            assert Quality(row["quality"]) == Quality.FROZEN | Quality.BACKFILLED

    # a third start the same day owes nothing: no settlement is read or committed again
    clock.set(datetime.datetime(2026, 4, 22, 10, 0, 1))  # a new poll slot, to know the daemon ran
    async with running(config, wall) as gw:
        await until(lambda: gw.stats.committed > 0)  # the live poll ran
        assert gw.frozen is not None
        assert gw.frozen.owed() == {}
        assert gw.frozen.stats.committed == gw.frozen.stats.rereads == 0
    assert len(settlement_rows(state)) == len(rows)


@pytest.mark.asyncio
async def test_backfill_reaches_back_over_the_twelve_settlements_a_meter_keeps(
    meters_bus: MetersBusFactory, unused_port: int, tmp_path: Path
) -> None:
    clock = SimClock(START, 0.0)
    water = Cjt188Meter("00000000000001", "water", clock=clock, settlement_day=20)
    gas = Cjt188Meter("00000000000002", "gas", clock=clock, settlement_day=1)
    sim = await meters_bus([water, gas])
    host_port = sim.endpoint
    assert isinstance(host_port, tuple)
    state = tmp_path / "state"
    config = write_config(tmp_path / "gw.toml", state, unused_port, host_port[1])
    wall = SimWallClock(clock)
    async with running(config, wall) as gw:  # Mar 14: nothing settled yet since START
        await until(lambda: gw.frozen is not None and gw.frozen.stats.lost_days == 2)

    # down for 15 months: Mar 20 2026 .. Jun 20 2027 (16 settlements) for the water meter, of
    # which it keeps the last 12; the gas meter settled on Apr 1 2026 .. Jun 1 2027 (15)
    clock.set(datetime.datetime(2027, 6, 22, 9, 0))
    async with running(config, wall) as gw:
        await until(lambda: gw.frozen is not None and gw.frozen.stats.backfilled_days == 24, within=90)
        assert gw.frozen is not None
        assert gw.frozen.stats.lost_days == 4 + 3  # counted by this run's job
        assert gw.frozen.owed() == {}
    rows = settlement_rows(state)
    water_rows, gas_rows = by_day(rows, "w1"), by_day(rows, "g2")
    assert sorted(water_rows) == [D(2026 + (6 + i) // 12, (6 + i) % 12 + 1, 20) for i in range(12)]
    assert sorted(gas_rows) == [D(2026 + (6 + i) // 12, (6 + i) % 12 + 1, 1) for i in range(12)]
    for day, row in water_rows.items():
        assert row["value"] == settled(water)[day]
    for day, row in gas_rows.items():
        assert row["value"] == settled(gas)[day]


@pytest.mark.asyncio
async def test_days_held_for_a_silent_meters_settlement_day_are_handed_out_again_after_a_restart(
    meters_bus: MetersBusFactory, unused_port: int, tmp_path: Path
) -> None:
    """The settlement day (8103) is read before a meter's days are planned; while the meter does
    not answer they are held, and the saved cursor stays before them, so a restart loses none."""
    clock = SimClock(START, 0.0)
    water = Cjt188Meter("00000000000001", "water", clock=clock, settlement_day=20)
    gas = Cjt188Meter("00000000000002", "gas", clock=clock, settlement_day=1)
    sim = await meters_bus([water, gas])
    host_port = sim.endpoint
    assert isinstance(host_port, tuple)
    state = tmp_path / "state"
    config = write_config(tmp_path / "gw.toml", state, unused_port, host_port[1])
    wall = SimWallClock(clock)

    def saved_cursors() -> dict[str, datetime.date]:
        store = CursorStore.for_config(load_config(config))
        try:
            return store.load_frozen(wall(), TZ)
        finally:
            store.close()

    def silent(quiet: bool) -> None:
        water.wake_preamble = 16 if quiet else 0  # a frame after fewer FE bytes goes unheard

    clock.set(datetime.datetime(2026, 3, 21, 9, 0))
    silent(True)
    async with running(config, wall) as gw:  # first start: its settlement day cannot be read
        await until(lambda: gw.frozen is not None and gw.frozen.stats.read_failures.get("no_answer", 0) >= 1)
        await until(lambda: gw.frozen is not None and gw.frozen.stats.lost_days == 1)  # gas: Mar 1 (before START)
    assert "w1" not in saved_cursors()  # never planned: the next start is a first start again
    silent(False)
    async with running(config, wall) as gw:
        await until(lambda: gw.frozen is not None and gw.frozen.stats.backfilled_days == 1)
    assert by_day(settlement_rows(state), "w1").keys() == {D(2026, 3, 20)}  # its newest, as on a first start

    # down across Apr 20; back while the water meter is silent: Mar 22 .. Apr 22 are held for it
    clock.set(datetime.datetime(2026, 4, 22, 9, 0))
    silent(True)
    async with running(config, wall) as gw:
        await until(lambda: gw.frozen is not None and gw.frozen.stats.backfilled_days == 1)  # gas: Apr 1
        await until(lambda: gw.frozen is not None and gw.frozen.stats.read_failures.get("no_answer", 0) >= 1)
    assert saved_cursors()["w1"] == D(2026, 3, 22)
    assert saved_cursors()["g2"] == D(2026, 4, 23)
    silent(False)
    async with running(config, wall) as gw:
        await until(lambda: gw.frozen is not None and gw.frozen.stats.backfilled_days == 1)
        assert gw.frozen is not None
        assert gw.frozen.stats.rereads == 0  # the gas meter's Apr 1 was not read again
    rows = by_day(settlement_rows(state), "w1")
    assert rows.keys() == {D(2026, 3, 20), D(2026, 4, 20)}
    assert rows[D(2026, 4, 20)]["value"] == settled(water)[D(2026, 4, 20)]
    assert saved_cursors()["w1"] == D(2026, 4, 23)


@pytest.mark.asyncio
async def test_a_missed_poll_slot_at_a_settlement_instant_is_filled_from_that_settlement(
    meters_bus: MetersBusFactory, unused_port: int, tmp_path: Path
) -> None:
    clock = SimClock(START, 0.0)
    water = Cjt188Meter("00000000000001", "water", clock=clock, settlement_day=20)
    gas = Cjt188Meter("00000000000002", "gas", clock=clock, settlement_day=1)
    sim = await meters_bus([water, gas])
    host_port = sim.endpoint
    assert isinstance(host_port, tuple)
    state = tmp_path / "state"
    config = write_config(tmp_path / "gw.toml", state, unused_port, host_port[1])
    config.write_text(config.read_text().replace("spread = 0\n", "spread = 0\nbackfill = true\n"))
    wall = SimWallClock(clock)
    clock.set(datetime.datetime(2026, 3, 21, 9, 0))
    async with running(config, wall) as gw:
        await until(lambda: gw.frozen is not None and gw.frozen.stats.backfilled_days == 1)  # w1: Mar 20
        # the gateway's clock steps a month ahead while it runs: the hourly slots in between are
        # missed, and the two at a settlement instant (gas Apr 1, water Apr 20, 00:00) are filled
        clock.set(datetime.datetime(2026, 4, 22, 9, 0))
        await until(lambda: gw.frozen is not None and gw.frozen.stats.slots_filled == 2)
        await until(lambda: gw.frozen is not None and gw.frozen.stats.backfilled_days == 3)
        assert gw.frozen is not None
        assert gw.frozen.owed() == {}
    rows = settlement_rows(state)
    filled = {(r["meter_id"], r["slot"]) for r in rows if r["slot"] is not None}
    assert filled == {("g2", freeze_time(D(2026, 4, 1), TZ)), ("w1", freeze_time(D(2026, 4, 20), TZ))}
    assert by_day(rows, "w1")[D(2026, 4, 20)]["value"] == settled(water)[D(2026, 4, 20)]

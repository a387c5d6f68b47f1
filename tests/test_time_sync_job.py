"""TimeSyncJob against simulated DL/T 645 (and DL/T 698.45) meters on a real TCP bus with a real
cursor store.
Simulated time stands still unless a test moves it; the gateway clock is that time in Shanghai."""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from meter_gateway.drivers.backoff import BackoffPolicy
from meter_gateway.drivers.bus import Bus, BusSettings
from meter_gateway.drivers.dlt645_driver import Dlt645Driver
from meter_gateway.drivers.dlt698_driver import Dlt698Driver
from meter_gateway.drivers.dlt698_model import Dlt698Model
from meter_gateway.drivers.meter_models import Dlt645Model, load_model
from meter_gateway.drivers.tcp_link import TcpLink
from meter_gateway.drivers.transport import TcpSettings
from meter_gateway.gateway.config import Config, load_config
from meter_gateway.gateway.daemon.schedule import freeze_time
from meter_gateway.gateway.jobs.time_sync import BROADCAST_LIMIT, TimeSyncJob, sync_allowed
from meter_gateway.gateway.store.cursors import CursorStore
from meter_gateway.protocols.dlt645.edition import Edition
from meter_gateway.simulators.clock import SimClock
from meter_gateway.simulators.dlt645_meter import Dlt645Meter
from meter_gateway.simulators.dlt698_meter import Dlt698Meter
from tests.plugins.simulators import MetersBusFactory, SimBusFactory, SimBusHandle

TZ = ZoneInfo("Asia/Shanghai")
E7 = Edition.DLT645_2007
QUICK = BackoffPolicy(initial=0.01, maximum=0.02)
START = datetime.datetime(2026, 3, 14, 10, 0)


def _model() -> Dlt645Model:
    model = load_model("dlt645-2007-generic")
    assert isinstance(model, Dlt645Model)
    return model


MODEL = _model()


def config_text(state: Path, port: int, mode: str, n: int) -> str:
    meters = "".join(
        f'[[meters]]\nid = "m{i}"\nbus = "dlt-a"\nprotocol = "dlt645-2007"\naddress = "{i:012d}"\n'
        f'model = "dlt645-2007-generic"\n\n'
        for i in range(1, n + 1)
    )
    return f"""
[gateway]
id = "gw-sync"
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

[time_sync]
interval = "1d"
mode = "{mode}"
max_drift = "5s"
"""


@dataclass
class Rig:
    handle: SimBusHandle
    config: Config
    clock: Callable[[], float]
    bus: Bus
    drivers: dict[str, Dlt645Driver]

    def job(self, store: CursorStore | None = None, **options: object) -> TimeSyncJob:
        return TimeSyncJob(
            self.config,
            self.drivers,
            {"dlt-a": self.bus},
            self.clock,
            cursors=store,
            **options,  # type: ignore[arg-type]
        )

    def offsets(self, *seconds: float) -> None:
        for meter, s in zip(self.handle.meters, seconds, strict=True):
            meter.clock_offset = s

    def offset(self, i: int) -> float:
        return self.handle.meters[i].clock_offset


@asynccontextmanager
async def rig(
    sim_bus: SimBusFactory,
    tmp_path: Path,
    *,
    mode: str = "unicast",
    n: int = 3,
    speed: float = 0.0,
    reply_timeout: float = 0.3,
    **meter_options: object,
) -> AsyncIterator[Rig]:
    handle = await sim_bus(n, speed=speed, start_time=START, **meter_options)
    assert isinstance(handle.endpoint, tuple)
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    path = tmp_path / "gw.toml"
    path.write_text(config_text(state, handle.endpoint[1], mode, n))
    config = load_config(path)

    def clock() -> float:
        return handle.clock.now().replace(tzinfo=TZ).timestamp()

    link = TcpLink(TcpSettings(*handle.endpoint, no_reply_limit=0, reconnect=BackoffPolicy(initial=0.05, maximum=0.1)))
    bus = Bus("dlt-a", link, settings=BusSettings(reply_timeout=reply_timeout, attempts=2, retry=QUICK))
    assert await bus.open()
    drivers = {f"m{i}": Dlt645Driver(bus, f"m{i}", f"{i:012d}", E7, MODEL, tz=TZ, clock=clock) for i in range(1, n + 1)}
    try:
        yield Rig(handle, config, clock, bus, drivers)
    finally:
        await bus.close()


def drift_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "event=clock_drift" in r.getMessage()]


@pytest.mark.asyncio
async def test_unicast_measures_drift_and_corrects_the_meters_that_are_off(
    sim_bus: SimBusFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with rig(sim_bus, tmp_path, mode="unicast") as r:
        r.offsets(60, -20, 2)
        job = r.job()
        assert set(job.drivers) == {"m1", "m2", "m3"}  # the Modbus meter has no time sync
        with caplog.at_level(logging.INFO, logger="meter_gateway"):
            report = await job.sync_once()
        # measured before the sync (the report keeps the read-back drift of corrected meters)
        assert job.stats.drifts[0] == pytest.approx(60, abs=1)
        assert sorted(job.stats.drifts)[:3] == pytest.approx([2, 20, 60], abs=1)
        assert report.sent == ["meter:m1", "meter:m2"]
        assert report.corrected == ["m1", "m2"]
        assert r.offset(0) == pytest.approx(0, abs=1)
        assert r.offset(1) == pytest.approx(0, abs=1)
        assert r.offset(2) == 2  # within max_drift: left alone
        assert r.handle.bus.stats["broadcasts"] == 0
    assert job.stats.unicasts == job.stats.syncs == 2
    assert job.stats.corrected == 2
    assert abs(job.stats.last_drift["m1"]) <= 1
    assert job.stats.last_drift["m3"] == pytest.approx(2, abs=1)
    lines = drift_lines(caplog)
    assert len(lines) == 2
    assert "meter=m1" in lines[0]
    assert "action=unicast" in lines[0]
    assert job.stats.summary()["max"] == pytest.approx(60, abs=1)


@pytest.mark.asyncio
async def test_drift_is_measured_against_the_middle_of_a_slow_read(sim_bus: SimBusFactory, tmp_path: Path) -> None:
    # time runs; each reply leaves the meter 0.8 s after the request: the clock read (date, then
    # time) takes 1.6 s and the meter samples its time 0.8 s in, the middle of the round trip
    async with rig(sim_bus, tmp_path, n=1, speed=1.0, reply_timeout=2.0, turnaround=0.8) as r:
        r.offsets(30)
        m = await r.job().measure("m1")
    assert m.drift == pytest.approx(30, abs=0.65)  # the meter shows whole seconds: +-0.5 s, plus jitter
    assert m.uncertainty == pytest.approx(0.8 + 0.5, abs=0.2)


@pytest.mark.asyncio
async def test_broadcast_sends_one_frame_per_bus_and_corrects_every_meter(
    sim_bus: SimBusFactory, tmp_path: Path
) -> None:
    async with rig(sim_bus, tmp_path, mode="broadcast") as r:
        r.offsets(60, -20, 2)
        job = r.job()
        report = await job.sync_once()
        assert report.sent == ["bus:dlt-a:dlt645-2007"]
        assert r.handle.bus.stats["broadcasts"] == 1
        for i in range(3):
            assert r.offset(i) == pytest.approx(0, abs=1)
        assert sorted(report.corrected) == ["m1", "m2"]
    assert (job.stats.broadcasts, job.stats.unicasts) == (1, 0)


@pytest.mark.asyncio
async def test_drift_beyond_the_broadcast_limit_is_an_alarm_and_not_synced(
    sim_bus: SimBusFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with rig(sim_bus, tmp_path, mode="unicast") as r:
        r.offsets(400, 30, 0)
        job = r.job()
        with caplog.at_level(logging.INFO, logger="meter_gateway"):
            report = await job.sync_once()
        assert report.alarms == ["m1"]
        assert report.skipped == {"m1": "beyond_limit"}
        assert report.sent == ["meter:m2"]
        assert r.offset(0) == 400  # nothing was sent to it
        assert r.offset(1) == pytest.approx(0, abs=1)
    assert job.stats.alarms["m1"] == pytest.approx(400, abs=1)
    assert job.stats.skipped == {"beyond_limit": 1}
    warnings = [line for line in drift_lines(caplog) if "beyond_limit" in line]
    assert len(warnings) == 1
    assert "password write" in warnings[0]


@pytest.mark.asyncio
async def test_most_meters_far_off_means_the_gateway_clock_is_suspect(sim_bus: SimBusFactory, tmp_path: Path) -> None:
    async with rig(sim_bus, tmp_path, mode="broadcast") as r:
        r.offsets(3600, 3600, -3 * BROADCAST_LIMIT)
        job = r.job()
        report = await job.sync_once()
        assert report.sent == []
        assert r.handle.bus.stats["broadcasts"] == 0
    assert job.stats.gateway_clock_suspect == 1
    assert job.stats.alarms.keys() == {"m1", "m2", "m3"}


@pytest.mark.asyncio
async def test_an_untrusted_gateway_clock_measures_but_never_syncs(sim_bus: SimBusFactory, tmp_path: Path) -> None:
    async with rig(sim_bus, tmp_path, mode="unicast", n=1) as r:
        r.offsets(60)
        job = r.job(clock_trusted=lambda: False)
        report = await job.sync_once()
        assert report.skipped == {"m1": "gateway_clock_untrusted"}
        assert r.offset(0) == 60
    assert job.stats.last_drift["m1"] == pytest.approx(60, abs=1)


@pytest.mark.asyncio
async def test_once_a_day_per_meter_also_across_a_restart(sim_bus: SimBusFactory, tmp_path: Path) -> None:
    async with rig(sim_bus, tmp_path, mode="unicast", n=1) as r:
        store = CursorStore.for_config(r.config)
        try:
            r.offsets(60)
            assert (await r.job(store).sync_once()).sent == ["meter:m1"]
            r.handle.clock.advance(3600)
            r.offsets(60)  # drifted again the same day
            again = await r.job(store).sync_once()  # a new job on the same store: a restarted gateway
            assert again.skipped == {"m1": "already_synced_today"}
            assert r.offset(0) == 60
            r.handle.clock.set(datetime.datetime(2026, 3, 15, 10, 0))
            assert (await r.job(store).sync_once()).sent == ["meter:m1"]
            assert r.offset(0) == pytest.approx(0, abs=1)
            assert store.load_time_sync()["m1"].synced_at == pytest.approx(r.clock())
        finally:
            store.close()


@pytest.mark.asyncio
async def test_scheduled_run_defers_past_the_midnight_window(sim_bus: SimBusFactory, tmp_path: Path) -> None:
    async with rig(sim_bus, tmp_path, mode="broadcast", n=1) as r:
        r.handle.clock.set(datetime.datetime(2026, 3, 14, 23, 57))
        r.offsets(60)
        job = r.job(tick=0.01)
        stop = asyncio.Event()
        task = asyncio.create_task(job.run(stop))
        try:
            await _until(lambda: job.stats.runs == 1)  # the day's slot is due at start-up
            assert job.stats.deferred == 1
            assert r.handle.bus.stats["broadcasts"] == 0
            r.handle.clock.set(datetime.datetime(2026, 3, 15, 0, 9))  # still inside (5 min + 5 min margin)
            await asyncio.sleep(0.1)
            assert job.stats.runs == 1
            r.handle.clock.set(datetime.datetime(2026, 3, 15, 0, 10, 1))
            await _until(lambda: job.stats.broadcasts == 1)
            assert r.offset(0) == pytest.approx(0, abs=1)
        finally:
            stop.set()
            await asyncio.wait_for(task, 5)
    assert job.stats.runs == 2


def test_sync_windows_around_midnight_per_edition() -> None:
    midnight = freeze_time(datetime.date(2026, 3, 15), TZ)
    assert sync_allowed(midnight - 3600, TZ, "dlt645-2007") is None
    assert sync_allowed(midnight - 601, TZ, "dlt645-2007") is None
    assert sync_allowed(midnight - 599, TZ, "dlt645-2007") == midnight + 600
    assert sync_allowed(midnight + 599, TZ, "dlt645-2007") == midnight + 600
    assert sync_allowed(midnight + 600, TZ, "dlt645-2007") is None
    # 1997: not in the hours 23 and 0 of the meter, 5 min margin either side
    assert sync_allowed(midnight - 3600 - 301, TZ, "dlt645-1997") is None
    assert sync_allowed(midnight - 3600 - 299, TZ, "dlt645-1997") == midnight + 3900
    assert sync_allowed(midnight + 3899, TZ, "dlt645-1997") == midnight + 3900
    assert sync_allowed(midnight + 3900, TZ, "dlt645-1997") is None


async def _until(cond: Callable[[], bool], within: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not cond():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


@pytest.mark.asyncio
async def test_a_mixed_line_gets_one_broadcast_per_protocol_and_698_meters_are_corrected(
    meters_bus: MetersBusFactory, tmp_path: Path
) -> None:
    """DL/T 645 and DL/T 698.45 meters on one line: each protocol's own broadcast (0x08; ACTION
    4000-127), chosen through the registry, and both read back corrected."""
    clock = SimClock(START, 0.0)
    old = Dlt645Meter("000000000001", clock=clock)
    new = Dlt698Meter("000000000002", clock=clock)
    line = await meters_bus([old, new])
    host, port = line.endpoint  # type: ignore[misc]
    text = config_text(tmp_path, port, "broadcast", 1).replace(
        '[[meters]]\nid = "mb1"',
        '[[meters]]\nid = "p2"\nbus = "dlt-a"\nprotocol = "dlt698"\naddress = "000000000002"\n'
        'model = "dlt698-generic"\n\n[[meters]]\nid = "mb1"',
    )
    path = tmp_path / "gw.toml"
    path.write_text(text)
    config = load_config(path)

    def gateway_clock() -> float:
        return clock.now().replace(tzinfo=TZ).timestamp()

    link = TcpLink(TcpSettings(host, port, no_reply_limit=0, reconnect=BackoffPolicy(initial=0.05, maximum=0.1)))
    bus = Bus("dlt-a", link, settings=BusSettings(reply_timeout=0.5, attempts=2, retry=QUICK))
    assert await bus.open()
    try:
        m698 = load_model("dlt698-generic")
        assert isinstance(m698, Dlt698Model)
        drivers: dict[str, Dlt645Driver | Dlt698Driver] = {
            "m1": Dlt645Driver(bus, "m1", "000000000001", E7, MODEL, tz=TZ, clock=gateway_clock),
            "p2": Dlt698Driver(bus, "p2", "000000000002", m698, tz=TZ, clock=gateway_clock),
        }
        old.clock_offset = 40
        new.set_meter_time(clock.now() - datetime.timedelta(seconds=90))
        job = TimeSyncJob(config, drivers, {"dlt-a": bus}, gateway_clock)
        assert set(job.drivers) == {"m1", "p2"}
        report = await job.sync_once()
    finally:
        await bus.close()
    assert sorted(report.sent) == ["bus:dlt-a:dlt645-2007", "bus:dlt-a:dlt698"]
    assert sorted(report.corrected) == ["m1", "p2"]
    assert (job.stats.broadcasts, job.stats.unicasts) == (2, 0)
    assert abs(old.clock_offset) <= 1
    assert abs(new.clock_offset) <= 1

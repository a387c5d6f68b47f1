"""Valve commands on CJ/T 188 meters through the command service and executor: simulated water and
gas meters on a real TCP bus, real SQLite store and audit files; acks collected from ``publish``
(the daemon and MQTT path are in test_cjt188_daemon.py)."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from meter_gateway.drivers.backoff import BackoffPolicy
from meter_gateway.drivers.bus import Bus, BusSettings
from meter_gateway.drivers.cjt188_driver import Cjt188Driver
from meter_gateway.drivers.cjt188_model import Cjt188Model
from meter_gateway.drivers.meter_models import load_model
from meter_gateway.drivers.tcp_link import TcpLink
from meter_gateway.drivers.transport import TcpSettings
from meter_gateway.gateway.commands.envelope import Params
from meter_gateway.gateway.config import Meter
from meter_gateway.gateway.daemon.meters import MeterRuntime
from meter_gateway.simulators.cjt188_meter import Cjt188Meter
from meter_gateway.simulators.clock import SimClock
from meter_gateway.simulators.faults import Faults
from meter_gateway.simulators.links import SimulatedBus
from tests.plugins.simulators import MetersBusFactory
from tests.test_command_exec import SUPERVISOR, Rig, audit_of, envelope, make_config

START = datetime.datetime(2026, 3, 14, 10, 0, 0)
TZ = datetime.timezone(datetime.timedelta(hours=8))
MODELS = {"water": "cjt188-cold-water", "gas": "cjt188-gas", "heat": "cjt188-heat"}


@asynccontextmanager
async def cjt_rig(tmp_path: Path, sim: SimulatedBus, meters: list[Cjt188Meter], **commands: Any) -> AsyncIterator[Rig]:
    host, port = sim.endpoint  # type: ignore[misc]
    link = TcpLink(TcpSettings(host, port, no_reply_limit=0, reconnect=BackoffPolicy(initial=0.05, maximum=0.1)))
    quick = BackoffPolicy(initial=0.01, maximum=0.02)
    bus = Bus("sim", link, settings=BusSettings(reply_timeout=0.3, attempts=1, retry=quick))
    assert await bus.open()
    configs, runtimes = [], {}
    for meter in meters:
        name = MODELS[meter.meter_class]
        cfg = Meter(
            id=f"w{meter.address_text[-2:]}", bus="sim", protocol="cjt188", address=meter.address_text, model=name
        )
        model = load_model(name)
        assert isinstance(model, Cjt188Model)
        driver = Cjt188Driver(bus, cfg.id, meter.address_text, model, tz=TZ)
        configs.append(cfg)
        runtimes[cfg.id] = MeterRuntime(cfg.id, "sim", "cjt188", driver)  # type: ignore[arg-type]
    rig = Rig(tmp_path, make_config(tmp_path, configs, **commands), runtimes, {"sim": bus})
    try:
        yield rig
    finally:
        if rig.task is not None and not rig.task.done():
            await rig.halt()
        await bus.close()


@pytest.mark.asyncio
async def test_valve_close_then_open_verified_by_reading_st_back(tmp_path: Path, meters_bus: MetersBusFactory) -> None:
    clock = SimClock(START, 1.0)
    water = Cjt188Meter("00000000000001", "water", clock=clock, valve_time=0.3)
    gas = Cjt188Meter("00000000000002", "gas", clock=clock, valve_time=0.3)
    sim = await meters_bus([water, gas])
    async with cjt_rig(tmp_path, sim, [water, gas], verify_window=3.0) as rig:
        await rig.start()
        close = envelope("valve_close", ["w01", "w02"])
        await rig.send(close)
        final = await rig.finished(close.id, ["w01", "w02"])
        assert {a.state for a in final.values()} == {"verified"}
        assert final["w01"].detail == "valve closed (ST 0001)"
        assert not water.valve_open
        assert not gas.valve_open
        assert rig.states(close.id, "w01") == ["queued", "sent", "meter_acknowledged", "verified"]
        reopen = envelope("valve_open", ["w01", "w02"])
        await rig.send(reopen)
        final = await rig.finished(reopen.id, ["w01", "w02"])
        assert {a.state for a in final.values()} == {"verified"}
        assert water.valve_open
        assert gas.valve_open
        with audit_of(rig) as audit:
            assert audit.verify() is None
            closes = audit.query(command=close.id, meter="w01")
            opens = audit.query(command=reopen.id, meter="w01")
        assert {r.action for r in closes} == {"valve_close"}
        assert [r.state for r in closes][-1] == "verified"
        assert {r.action for r in opens} == {"valve_open"}


@pytest.mark.asyncio
async def test_a_stuck_valve_ends_refused_with_valve_abnormal(tmp_path: Path, meters_bus: MetersBusFactory) -> None:
    clock = SimClock(START, 1.0)
    water = Cjt188Meter("00000000000001", "water", clock=clock)
    sim = await meters_bus([water], faults=Faults(stuck_valve=True))
    async with cjt_rig(tmp_path, sim, [water]) as rig:
        await rig.start()
        close = envelope("valve_close", ["w01"])
        await rig.send(close)
        final = (await rig.finished(close.id, ["w01"]))["w01"]
        assert (final.state, final.reason) == ("meter_refused", "valve_abnormal")
        assert "ST 0003" in (final.detail or "")
        assert rig.states(close.id, "w01") == ["queued", "sent", "meter_refused"]  # not retried
        assert water.valve_open  # it never moved


@pytest.mark.asyncio
async def test_relay_actions_and_valves_on_a_heat_meter_are_refused_before_sending(
    tmp_path: Path, meters_bus: MetersBusFactory
) -> None:
    clock = SimClock(START, 1.0)
    water = Cjt188Meter("00000000000001", "water", clock=clock)
    heat = Cjt188Meter("00000000000002", "heat", clock=clock)
    sim = await meters_bus([water, heat])
    async with cjt_rig(tmp_path, sim, [water, heat]) as rig:
        await rig.start()
        cut = envelope("disconnect", ["w01"])
        await rig.send(cut)
        assert (await rig.finished(cut.id, ["w01"]))["w01"].reason == "unsupported"
        shut = envelope("valve_close", ["w02"])
        await rig.send(shut)
        final = (await rig.finished(shut.id, ["w02"]))["w02"]
        assert (final.state, final.detail) == ("rejected", "model cjt188-heat has no valve")
        assert water.requests == heat.requests == 0


@pytest.mark.asyncio
async def test_valve_closes_count_against_the_mass_disconnect_guard(
    tmp_path: Path, meters_bus: MetersBusFactory
) -> None:
    clock = SimClock(START, 1.0)
    sims = [Cjt188Meter(f"0000000000000{i}", "water", clock=clock) for i in range(1, 4)]
    sim = await meters_bus(sims)
    async with cjt_rig(tmp_path, sim, sims, max_disconnects=2) as rig:
        await rig.start()
        close = envelope("valve_close", ["w01", "w02", "w03"])
        await rig.send(close)
        final = await rig.finished(close.id, ["w01", "w02"])
        assert {a.state for a in final.values()} == {"verified"}
        await asyncio.sleep(0.2)
        held = rig.of(close.id, "w03")
        assert [a.state for a in held] == ["held"]
        assert held[0].reason == "mass_disconnect_guard"
        assert sims[2].valve_open
        # opening is never held
        reopen = envelope("valve_open", ["w01", "w02"])
        await rig.send(reopen)
        assert {a.state for a in (await rig.finished(reopen.id, ["w01", "w02"])).values()} == {"verified"}
        # a second person's release lets the held close run
        release = envelope("release", [], key=SUPERVISOR, params=Params(commands=[close.id]))
        await rig.send(release)
        assert (await rig.finished(close.id, ["w03"]))["w03"].state == "verified"
        assert not sims[2].valve_open


@pytest.mark.asyncio
async def test_read_now_and_time_sync_on_a_water_meter(tmp_path: Path, meters_bus: MetersBusFactory) -> None:
    clock = SimClock(START, 1.0)
    water = Cjt188Meter("00000000000001", "water", clock=clock)
    sim = await meters_bus([water])
    async with cjt_rig(tmp_path, sim, [water]) as rig:
        await rig.start()
        read = envelope("read_now", ["w01"])
        await rig.send(read)
        assert (await rig.finished(read.id, ["w01"]))["w01"].state == "verified"
        assert {r.quantity for r in rig.readings} == {
            "volume.total",
            "volume.settlement",
            "valve.state",
            "battery.low",
            "status.word",
        }
        sync = envelope("time_sync", ["w01"])
        await rig.send(sync)
        final = (await rig.finished(sync.id, ["w01"]))["w01"]
        assert final.state == "verified", final.detail


@pytest.mark.asyncio
async def test_a_valve_that_jams_after_acknowledging_ends_unverified_with_valve_abnormal(
    tmp_path: Path, meters_bus: MetersBusFactory
) -> None:
    clock = SimClock(START, 1.0)
    water = Cjt188Meter("00000000000001", "water", clock=clock, jamming_valve=True)
    sim = await meters_bus([water])
    async with cjt_rig(tmp_path, sim, [water], verify_window=3.0) as rig:
        await rig.start()
        close = envelope("valve_close", ["w01"])
        await rig.send(close)
        final = (await rig.finished(close.id, ["w01"]))["w01"]
        # the acknowledgement was normal (ST: still open), the read-back found the valve jammed
        assert (final.state, final.reason) == ("unverified", "valve_abnormal")
        assert rig.states(close.id, "w01") == ["queued", "sent", "meter_acknowledged", "unverified"]
        assert final.detail is not None
        assert final.detail.startswith("read back: valve abnormal")
        assert "ST 0003" in final.detail
        assert water.valve_open  # it never moved

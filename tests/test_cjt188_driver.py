"""The CJ/T 188 driver against simulated water, gas and heat meters on real TCP sockets and a pty
(8N1: ptys refuse even parity), alone and beside DL/T 645 meters on one line."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from meter_gateway.drivers.backoff import BackoffPolicy
from meter_gateway.drivers.bus import Bus, BusSettings
from meter_gateway.drivers.cjt188_driver import Cjt188Driver, discover, from_config
from meter_gateway.drivers.cjt188_model import Cjt188Model
from meter_gateway.drivers.context import DriverContext
from meter_gateway.drivers.dlt645_driver import Dlt645Driver
from meter_gateway.drivers.errors import BadReply, ConfigurationError, MeterRefused, NoAnswer
from meter_gateway.drivers.meter_models import Dlt645Model, load_model
from meter_gateway.drivers.reading import Quality
from meter_gateway.drivers.serial_link import SerialLink
from meter_gateway.drivers.tcp_link import TcpLink
from meter_gateway.drivers.transport import SerialSettings, TcpSettings
from meter_gateway.protocols.dlt645.edition import Edition
from meter_gateway.simulators.cjt188_meter import Cjt188Meter
from meter_gateway.simulators.clock import SimClock
from meter_gateway.simulators.dlt645_meter import Dlt645Meter
from meter_gateway.simulators.faults import Faults
from meter_gateway.simulators.links import SimulatedBus
from tests.plugins.simulators import MetersBusFactory

START = datetime.datetime(2026, 3, 14, 10, 0, 0)
TZ = datetime.timezone(datetime.timedelta(hours=8))
QUICK = BackoffPolicy(initial=0.01, maximum=0.02)
WATER_QTY = ["volume.total", "volume.settlement", "valve.state", "battery.low", "status.word"]


def model(name: str) -> Cjt188Model:
    loaded = load_model(name)
    assert isinstance(loaded, Cjt188Model)
    return loaded


@asynccontextmanager
async def bus_to(sim: SimulatedBus, *, reply_timeout: float = 0.3, attempts: int = 2) -> AsyncIterator[Bus]:
    endpoint = sim.endpoint
    if isinstance(endpoint, tuple):
        link: TcpLink | SerialLink = TcpLink(
            TcpSettings(endpoint[0], endpoint[1], no_reply_limit=0, reconnect=BackoffPolicy(initial=0.05, maximum=0.1))
        )
    else:
        link = SerialLink(SerialSettings(endpoint, baudrate=2400))  # 8N1: ptys refuse parity
    bus = Bus("sim", link, settings=BusSettings(reply_timeout=reply_timeout, attempts=attempts, retry=QUICK))
    assert await bus.open()
    try:
        yield bus
    finally:
        await bus.close()


def sim_meter(address: str, kind: str, clock: SimClock, **options: Any) -> Cjt188Meter:
    return Cjt188Meter(address, kind, clock=clock, **options)


def driver(bus: Bus, sim: Cjt188Meter, model_name: str, **options: Any) -> Cjt188Driver:
    return Cjt188Driver(bus, f"w{sim.address_text[-2:]}", sim.address_text, model(model_name), tz=TZ, **options)


def sim_value(sim: Cjt188Meter, field: str) -> float:
    value = sim.current_values()[field]
    assert isinstance(value, tuple)
    return float(value[0])


@pytest.mark.asyncio
async def test_water_gas_and_heat_readings_in_canonical_quantities(meters_bus: MetersBusFactory) -> None:
    clock = SimClock(START, 0.0)
    water = sim_meter("00000000000001", "water", clock)
    gas = sim_meter("00000000000002", "gas", clock)
    heat = sim_meter("00000000000003", "heat", clock)
    sim = await meters_bus([water, gas, heat])
    async with bus_to(sim) as bus:
        w = driver(bus, water, "cjt188-cold-water")
        readings = await w.read(WATER_QTY, slot=600.0, now=601.0)
        got = {r.quantity: r for r in readings}
        assert [r.quantity for r in readings] == WATER_QTY
        assert got["volume.total"].value == sim_value(water, "volume.total")
        assert got["volume.total"].unit == "m3"
        assert got["valve.state"].value == "open"
        assert got["battery.low"].value == 0
        assert got["status.word"].value == 0
        assert all(r.quality is Quality.GOOD and r.slot == 600.0 for r in readings)
        g = driver(bus, gas, "cjt188-gas")
        [volume] = await g.read(["volume.total"], slot=600.0, now=601.0)
        assert (volume.value, volume.unit) == (sim_value(gas, "volume.total"), "m3")
        h = driver(bus, heat, "cjt188-heat")
        quantities = list(h.model.quantities)
        hr = {r.quantity: r for r in await h.read(quantities, slot=600.0, now=601.0)}
        assert set(hr) == set(quantities)
        assert (hr["heat.total"].value, hr["heat.total"].unit) == (sim_value(heat, "heat.total"), "kWh")
        assert hr["flow.rate"].unit == "m3/h"
        assert hr["power.heat"].unit == "kW"
        assert hr["temperature.supply"].unit == "degC"
        assert hr["time.working_hours"].unit == "h"
        assert water.requests == 1  # every water quantity from one 901F read


@pytest.mark.asyncio
async def test_over_a_pty_at_8n1(meters_bus: MetersBusFactory) -> None:
    clock = SimClock(START, 0.0)
    water = sim_meter("00000000000011", "water", clock)
    sim = await meters_bus([water], kind="pty", baud=2400, bits_per_char=10)
    async with bus_to(sim, reply_timeout=0.5) as bus:
        d = driver(bus, water, "cjt188-cold-water")
        readings = await d.read(["volume.total", "valve.state"], slot=0.0, now=1.0)
        assert [r.value for r in readings] == [sim_value(water, "volume.total"), "open"]
        found = await discover(bus)
        assert (found.meter_type, found.address, found.meter_class) == (0x10, "00000000000011", "water")


@pytest.mark.asyncio
async def test_a_swapped_di_order_meter_needs_its_setting(meters_bus: MetersBusFactory) -> None:
    clock = SimClock(START, 0.0)
    swapped = sim_meter("00000000000021", "water", clock, di_order="swapped")
    sim = await meters_bus([swapped])
    async with bus_to(sim) as bus:
        with pytest.raises(MeterRefused, match="refused read-data"):  # 90 1F names DI 1F90 to it
            await driver(bus, swapped, "cjt188-cold-water").read(["volume.total"], slot=0.0, now=1.0)
        right = driver(bus, swapped, "cjt188-cold-water", di_order="swapped")
        [reading] = await right.read(["volume.total"], slot=0.0, now=1.0)
        assert reading.value == sim_value(swapped, "volume.total")


@pytest.mark.asyncio
async def test_a_slow_waking_meter_is_heard_only_with_its_models_preamble(meters_bus: MetersBusFactory) -> None:
    clock = SimClock(START, 0.0)
    sleepy = sim_meter("00000000000031", "gas", clock, wake_preamble=4, turnaround=0.6)
    sim = await meters_bus([sleepy])
    # the bus's own timeout (0.3 s) is shorter than the meter's turnaround: the model's wins
    async with bus_to(sim, reply_timeout=0.3, attempts=1) as bus:
        with pytest.raises(NoAnswer):
            await driver(bus, sleepy, "cjt188-gas", preamble=2).read(["volume.total"], slot=0.0, now=1.0)
        assert sleepy.unheard == 1
        [reading] = await driver(bus, sleepy, "cjt188-gas").read(["volume.total"], slot=0.0, now=1.0)
        assert reading.value == sim_value(sleepy, "volume.total")


@pytest.mark.asyncio
async def test_valve_close_then_open_read_back(meters_bus: MetersBusFactory) -> None:
    clock = SimClock(START, 0.0)
    water = sim_meter("00000000000041", "water", clock, valve_time=30.0)
    sim = await meters_bus([water])
    async with bus_to(sim) as bus:
        d = driver(bus, water, "cjt188-cold-water")
        ack = await d.set_valve(False)
        assert ack is not None
        assert ack.valve == "open"  # the motor is still running
        assert (await d.read_valve()).state == "open"
        clock.advance(30)
        closed = await d.read_valve()
        assert (closed.state, closed.battery_low, closed.raw) == ("closed", False, 0x0001)
        await d.set_valve(True)
        clock.advance(30)
        assert (await d.read_valve()).state == "open"


@pytest.mark.asyncio
async def test_a_stuck_valve_reports_abnormal(meters_bus: MetersBusFactory) -> None:
    clock = SimClock(START, 0.0)
    water = sim_meter("00000000000051", "water", clock)
    sim = await meters_bus([water], faults=Faults(stuck_valve=True))
    async with bus_to(sim) as bus:
        d = driver(bus, water, "cjt188-cold-water")
        ack = await d.set_valve(False)
        assert ack is not None
        assert ack.valve == "abnormal"
        assert (await d.read_valve()).state == "abnormal"
        [state] = await d.read(["valve.state"], slot=0.0, now=1.0)
        assert state.value == "abnormal"


@pytest.mark.asyncio
async def test_the_heat_meter_has_no_valve_and_the_water_meter_no_heat(meters_bus: MetersBusFactory) -> None:
    clock = SimClock(START, 0.0)
    heat = sim_meter("00000000000061", "heat", clock)
    sim = await meters_bus([heat])
    async with bus_to(sim) as bus:
        d = driver(bus, heat, "cjt188-heat")
        with pytest.raises(ConfigurationError, match="has no valve"):
            await d.set_valve(False)
        with pytest.raises(ConfigurationError, match=r"no data identifier for 'heat\.totl'"):
            await d.read(["heat.totl"], slot=0.0, now=1.0)
        assert heat.requests == 0  # refused before any traffic


@pytest.mark.asyncio
async def test_clock_read_and_time_sync(meters_bus: MetersBusFactory) -> None:
    clock = SimClock(START, 0.0)
    water = sim_meter("00000000000071", "water", clock)
    sim = await meters_bus([water])
    async with bus_to(sim) as bus:
        d = driver(bus, water, "cjt188-cold-water")
        assert await d.read_clock() == START.replace(tzinfo=TZ).timestamp()
        target = START.replace(tzinfo=TZ).timestamp() + 3600
        await d.sync_time(target)
        assert await d.read_clock() == target
        assert water.meter_time() == START + datetime.timedelta(hours=1)


@pytest.mark.asyncio
async def test_water_and_electricity_meters_share_one_line(meters_bus: MetersBusFactory) -> None:
    clock = SimClock(START, 0.0)
    water = sim_meter("00000000000081", "water", clock)
    gas = sim_meter("00000000000082", "gas", clock)
    electricity = Dlt645Meter("000000000001", Edition.DLT645_2007, clock=clock)
    sim = await meters_bus([water, electricity, gas])
    async with bus_to(sim) as bus:
        dlt_model = load_model("dlt645-2007-generic")
        assert isinstance(dlt_model, Dlt645Model)
        e = Dlt645Driver(bus, "e1", "000000000001", Edition.DLT645_2007, dlt_model, tz=TZ)
        w = driver(bus, water, "cjt188-cold-water")
        g = driver(bus, gas, "cjt188-gas")
        results = await asyncio.gather(
            e.read(["energy.active.import.total"], slot=0.0, now=1.0),
            w.read(["volume.total"], slot=0.0, now=1.0),
            g.read(["volume.total"], slot=0.0, now=1.0),
        )
        assert [r[0].unit for r in results] == ["kWh", "m3", "m3"]
        assert results[1][0].value == sim_value(water, "volume.total")
        assert results[2][0].value == sim_value(gas, "volume.total")
        assert bus.counters.mismatched == 0


@pytest.mark.asyncio
async def test_nothing_answers_discovery_on_an_empty_line(meters_bus: MetersBusFactory) -> None:
    clock = SimClock(START, 0.0)
    sim = await meters_bus([Dlt645Meter("000000000009", Edition.DLT645_2007, clock=clock)])
    async with bus_to(sim, attempts=1) as bus:
        with pytest.raises((NoAnswer, BadReply)):
            await discover(bus, reply_timeout=0.3)


def test_from_config_takes_the_meters_options() -> None:
    bus = Bus("offline")
    ctx = DriverContext(
        meter_id="g1",
        protocol="cjt188",
        address="00000000000001",
        bus=bus,
        model=model("cjt188-gas"),
        tz=TZ,
        options={"di_order": "swapped", "preamble": 8},
    )
    built = from_config(ctx)
    assert (built.di_order, built.preamble, built.tz) == ("swapped", 8, TZ)
    assert (from_config(DriverContext("g2", "cjt188", "00000000000002", bus, model("cjt188-gas"))).preamble) == 4
    with pytest.raises(ConfigurationError, match="wildcard"):
        from_config(DriverContext("g3", "cjt188", "AAAAAAAAAAAAAA", bus, model("cjt188-gas")))
    with pytest.raises(ConfigurationError, match="needs a CJ/T 188 model"):
        from_config(DriverContext("g4", "cjt188", "00000000000004", bus, load_model("dlt645-2007-generic")))


class UnknownUnitMeter(Cjt188Meter):
    """Sends its volume with a unit code no table lists (the number would be taken for m3)."""

    def handle(self, received: Any, now: datetime.datetime | None = None) -> list[bytes]:
        out = []
        for reply in super().handle(received, now):
            body = bytearray(reply.lstrip(b"\xfe"))
            if body[10] == 3 + 19:  # a water 901F reply: DI SER + 19 bytes
                body[11 + 3 + 4] = 0x99  # the unit code after volume.total
                body[-2] = sum(body[:-2]) & 0xFF
            out.append(bytes(body))
        return out


@pytest.mark.asyncio
async def test_a_value_in_an_unknown_unit_is_not_handed_on(meters_bus: MetersBusFactory) -> None:
    odd = UnknownUnitMeter("00000000000091", "water", clock=SimClock(START, 0.0))
    sim = await meters_bus([odd])
    async with bus_to(sim, attempts=2) as bus:
        with pytest.raises(BadReply, match=r"unknown unit code for volume\.total \(99\)"):
            await driver(bus, odd, "cjt188-cold-water").read(["volume.total"], slot=0.0, now=1.0)
        assert odd.requests == 2  # read again, then given up

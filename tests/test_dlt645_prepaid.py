"""Issue 19 items 11 and 13: signed DL/T 645 currents are not "out of range", and prepaid balances
and purchase records are read through the real driver from simulated meters over TCP (and, for
the current, from the independent PyPI ``dlt645`` server)."""

from __future__ import annotations

import asyncio
import datetime
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from meter_gateway.drivers.backoff import BackoffPolicy
from meter_gateway.drivers.bus import Bus, BusSettings
from meter_gateway.drivers.dlt645_driver import Dlt645Driver
from meter_gateway.drivers.meter_models import Dlt645Model, load_model
from meter_gateway.drivers.reading import Quality, Reading
from meter_gateway.drivers.tcp_link import TcpLink
from meter_gateway.drivers.transport import TcpSettings
from meter_gateway.protocols.dlt645.edition import Edition
from meter_gateway.simulators.dlt645_meter import Dlt645Meter
from tests.plugins.ports import free_port
from tests.plugins.simulators import SimBusFactory

E7 = Edition.DLT645_2007
TZ = datetime.timezone(datetime.timedelta(hours=8))
NOON = datetime.datetime(2026, 3, 14, 12, 0, 0)
EVENING = datetime.datetime(2026, 3, 14, 18, 0, 0)
BALANCES = [f"prepaid.{kind}.{what}" for kind in ("money", "energy") for what in ("remaining", "overdraft")]
PURCHASE = [
    "prepaid.money.purchase.time",
    "prepaid.money.purchase.count",
    "prepaid.money.purchase.amount",
    "prepaid.money.purchase.total",
]
IMPORT = "energy.active.import.total"
# An installation that only exports: no load, 1.5 A of PV per phase at unity power factor, so at
# solar noon every phase current is exactly 1.5 A flowing out (the meter sends it as -1.5 A).
EXPORTING = {"base_current": 0.0, "peak_current": 0.0, "load_power_factor": 1.0, "pv_peak_current": 1.5}


def generic() -> Dlt645Model:
    model = load_model("dlt645-2007-generic")
    assert isinstance(model, Dlt645Model)
    return model


@asynccontextmanager
async def tcp_bus(endpoint: tuple[str, int] | str) -> AsyncIterator[Bus]:
    assert isinstance(endpoint, tuple)
    link = TcpLink(TcpSettings(endpoint[0], endpoint[1], no_reply_limit=0))
    quick = BackoffPolicy(initial=0.01, maximum=0.02)
    bus = Bus("prepaid", link, settings=BusSettings(reply_timeout=0.5, attempts=2, retry=quick))
    assert await bus.open()
    try:
        yield bus
    finally:
        await bus.close()


def driver_for(bus: Bus, address: str) -> Dlt645Driver:
    return Dlt645Driver(bus, f"m{address[-2:]}", address, E7, generic(), tz=TZ)


async def read(d: Dlt645Driver, quantities: list[str]) -> dict[str, Reading]:
    return {r.quantity: r for r in await d.read(quantities, slot=0.0, now=0.0)}


# -- item 11: signed current ----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_reverse_current_is_good_and_a_real_outlier_is_still_flagged(sim_bus: SimBusFactory) -> None:
    handle = await sim_bus(1, speed=0.0, start_time=NOON, load_settings=EXPORTING)
    meter = handle.meters[0]
    async with tcp_bus(handle.endpoint) as bus:
        readings = await read(driver_for(bus, meter.address_text), ["current.l1", "current.l2", "power.active.total"])
    assert readings["current.l1"].value == -1.5
    assert readings["current.l2"].value == -1.5
    assert readings["current.l1"].unit == "A"
    assert all(r.quality is Quality.GOOD for r in readings.values()), readings
    assert readings["power.active.total"].value < 0  # the meter is exporting, hence the direction bit

    # a value outside its plausible range is still kept and flagged: a meter whose supply runs at
    # 12.5 Hz (40..70 Hz is plausible)
    off_grid = {"nominal_frequency": 12.5, "frequency_noise": 0.0}
    handle = await sim_bus(1, speed=0.0, first_address=2, load_settings=off_grid)
    meter = handle.meters[0]
    async with tcp_bus(handle.endpoint) as bus:
        readings = await read(driver_for(bus, meter.address_text), ["frequency", "current.l1"])
    assert readings["frequency"].value == 12.5
    assert readings["frequency"].quality is Quality.OUT_OF_RANGE
    assert readings["current.l1"].quality is Quality.GOOD


@pytest.mark.asyncio
async def test_a_reverse_current_from_the_independent_dlt645_server_is_good() -> None:
    dlt645 = pytest.importorskip("dlt645")
    port = free_port()
    server = dlt645.MeterServerService.new_tcp_server("127.0.0.1", port)
    server.set_address(bytes.fromhex("070000000000"))  # as on the wire: least significant byte first
    assert server.set_02(0x02020100, -1.5)
    assert server.set_02(0x02020200, 2.25)
    assert server.start()
    try:
        async with tcp_bus(("127.0.0.1", port)) as bus:
            readings = await read(driver_for(bus, "000000000007"), ["current.l1"])
            readings |= await read(driver_for(bus, "000000000007"), ["current.l2"])
    finally:
        await asyncio.to_thread(server.stop)
    assert (readings["current.l1"].value, readings["current.l1"].quality) == (-1.5, Quality.GOOD)
    assert (readings["current.l2"].value, readings["current.l2"].quality) == (2.25, Quality.GOOD)


# -- item 13: prepaid balances --------------------------------------------------------------------


@pytest.mark.asyncio
async def test_remaining_money_falls_by_the_price_of_the_energy_imported(sim_bus: SimBusFactory) -> None:
    handle = await sim_bus(1, speed=0.0, start_time=EVENING, purse=100.0, price=0.8)
    meter = handle.meters[0]
    async with tcp_bus(handle.endpoint) as bus:
        d = driver_for(bus, meter.address_text)
        before = await read(d, [IMPORT, *BALANCES, *PURCHASE, "status.word3"])
        handle.clock.advance(3 * 3600)
        after = await read(d, [IMPORT, *BALANCES, *PURCHASE])
    # an energy-type meter's DIs are "no requested data" on a money-type meter: no reading
    assert not {"prepaid.energy.remaining", "prepaid.energy.overdraft"} & (before.keys() | after.keys())
    remaining = before["prepaid.money.remaining"]
    assert (remaining.value, remaining.unit, remaining.quality) == (100.0, "CNY", Quality.GOOD)
    assert before["prepaid.money.overdraft"].value == 0.0
    assert before["status.word3"].value & 0x0300 == 0x0200  # bits 8-9: money-type prepaid meter
    used = after[IMPORT].value - before[IMPORT].value  # type: ignore[operator]
    assert used > 5.0  # an evening's consumption, or the test proves nothing
    assert after["prepaid.money.remaining"].value == pytest.approx(100.0 - used * 0.8, abs=0.02)
    assert after["prepaid.money.overdraft"].value == 0.0
    # the opening credit is purchase 1, stamped when the account was opened
    purchase = {q.rpartition(".")[2]: after[q] for q in PURCHASE}
    assert purchase["count"].value == 1
    assert (purchase["amount"].value, purchase["amount"].unit) == (100.0, "CNY")
    assert purchase["total"].value == 100.0
    assert purchase["time"].value == EVENING.isoformat()
    # the simulator's own purse agrees with what went over the wire
    assert meter.purse is not None
    own = meter.purse.remaining(meter.load.energy(IMPORT))
    assert own == pytest.approx(after["prepaid.money.remaining"].value, abs=0.01)


@pytest.mark.asyncio
async def test_an_energy_type_meter_counts_down_kwh(sim_bus: SimBusFactory) -> None:
    handle = await sim_bus(1, speed=0.0, start_time=EVENING, purse=50.0, prepaid="energy")
    meter = handle.meters[0]
    async with tcp_bus(handle.endpoint) as bus:
        d = driver_for(bus, meter.address_text)
        before = await read(d, [IMPORT, *BALANCES, "status.word3"])
        handle.clock.advance(2 * 3600)
        after = await read(d, [IMPORT, *BALANCES, "prepaid.money.purchase.count"])
    assert "prepaid.money.remaining" not in before
    assert "prepaid.money.purchase.count" not in after
    assert before["status.word3"].value & 0x0300 == 0x0100  # energy-type
    used = after[IMPORT].value - before[IMPORT].value  # type: ignore[operator]
    remaining = after["prepaid.energy.remaining"]
    assert remaining.unit == "kWh"
    assert remaining.value == pytest.approx(50.0 - used, abs=0.02)


@pytest.mark.asyncio
async def test_without_self_trip_credit_runs_into_overdraft_and_the_supply_stays_on(sim_bus: SimBusFactory) -> None:
    handle = await sim_bus(1, speed=0.0, start_time=EVENING, purse=2.0, price=0.5)
    meter = handle.meters[0]
    async with tcp_bus(handle.endpoint) as bus:
        d = driver_for(bus, meter.address_text)
        start = await read(d, [IMPORT])
        handle.clock.advance(4 * 3600)
        now = await read(d, [IMPORT, *BALANCES])
        relay = await d.read_relay()
    used = now[IMPORT].value - start[IMPORT].value  # type: ignore[operator]
    assert used * 0.5 > 2.0
    assert now["prepaid.money.remaining"].value == 0.0
    assert now["prepaid.money.overdraft"].value == pytest.approx(used * 0.5 - 2.0, abs=0.02)
    assert now["prepaid.money.overdraft"].quality is Quality.GOOD
    assert relay.closed
    assert meter.status_word1 & (1 << 14)  # word 1 bit 14: credit exhausted


@pytest.mark.asyncio
async def test_a_self_tripping_meter_opens_at_zero_credit_and_a_purchase_lets_it_close(sim_bus: SimBusFactory) -> None:
    handle = await sim_bus(1, speed=0.0, start_time=EVENING, purse=2.0, price=0.5, trip_at_zero_credit=True)
    meter = handle.meters[0]
    async with tcp_bus(handle.endpoint) as bus:
        d = driver_for(bus, meter.address_text)
        start = await read(d, [IMPORT])
        assert (await d.read_relay()).closed
        handle.clock.advance(4 * 3600)
        relay = await d.read_relay()
        tripped = await read(d, [IMPORT, *BALANCES])
        handle.clock.advance(3600)  # an open relay: nothing more is used
        later = await read(d, [IMPORT, *BALANCES])

        assert not relay.closed
        assert relay.raw & (1 << 6)  # the meter commanded its own relay open
        used = tripped[IMPORT].value - start[IMPORT].value  # type: ignore[operator]
        # the trip came in the 300 s integration step in which the credit ran out: 4 CNY of energy
        # at 0.5 CNY/kWh, give or take what one step of an evening load costs
        assert 4.0 <= used <= 4.0 + 20.0 * 300 / 3600
        assert tripped["prepaid.money.remaining"].value == 0.0
        overdraft = tripped["prepaid.money.overdraft"].value
        assert isinstance(overdraft, float)
        assert overdraft < 1.0
        assert later[IMPORT].value == tripped[IMPORT].value
        assert later["prepaid.money.overdraft"].value == overdraft
        trip = meter.trips[0]
        assert trip.operator == "FFFFFFFF"
        assert EVENING < trip.time < EVENING + datetime.timedelta(hours=4)

        # a purchase pays the overdraft back and arms the relay; the customer's button closes it
        meter.top_up(20.0)
        armed = await d.read_relay()
        assert (armed.closed, armed.armed) == (False, True)
        assert meter.press_button()
        assert (await d.read_relay()).closed
        bought = await read(d, [*PURCHASE, "prepaid.money.remaining"])
    assert bought["prepaid.money.purchase.count"].value == 2
    assert bought["prepaid.money.purchase.amount"].value == 20.0
    assert bought["prepaid.money.purchase.total"].value == 22.0
    assert bought["prepaid.money.remaining"].value == pytest.approx(20.0 - overdraft, abs=0.01)
    assert meter.purse is not None
    assert meter.purse.purchases[0].before == 0.0  # it was bought in overdraft


@pytest.mark.asyncio
async def test_keep_power_holds_the_supply_on_at_zero_credit(sim_bus: SimBusFactory) -> None:
    handle = await sim_bus(1, speed=0.0, start_time=EVENING, purse=1.0, trip_at_zero_credit=True)
    meter = handle.meters[0]
    meter.keep_power = True
    handle.clock.advance(4 * 3600)
    async with tcp_bus(handle.endpoint) as bus:
        d = driver_for(bus, meter.address_text)
        assert (await d.read_relay()).closed
        assert (await read(d, ["prepaid.money.overdraft"]))["prepaid.money.overdraft"].value > 0  # type: ignore[operator]


def test_a_meter_without_a_purse_refuses_a_purchase() -> None:
    from meter_gateway.simulators.clock import SimClock

    meter = Dlt645Meter("000000000001", clock=SimClock(EVENING, 0.0))
    with pytest.raises(ValueError, match="no prepaid purse"):
        meter.top_up(10.0)
    assert meter.status_word3 & 0x0300 == 0  # not a prepaid meter


# -- the simulator CLI: config keys and the control port ---------------------------------------------


async def _until_ready(stream: asyncio.StreamReader) -> list[str]:
    lines: list[str] = []
    while (line := (await asyncio.wait_for(stream.readline(), 10)).decode().strip()) != "ready":
        assert line, "simulator exited before it was ready"
        lines.append(line)
    return lines


async def _command(port: int, line: str) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(line.encode() + b"\n")
        return (await asyncio.wait_for(reader.readline(), 5)).decode().strip()
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.mark.asyncio
async def test_simulate_cli_trips_at_zero_credit_and_takes_a_topup_on_the_control_port(tmp_path: Path) -> None:
    config = tmp_path / "sim.toml"
    config.write_text(
        '[simulator]\nspeed = 1200.0\nstart = "2026-03-14T18:00:00"\ncontrol_port = 0\n\n'
        '[[bus]]\nprotocol = "dlt645-2007"\nport = 0\nmeters = ["000000000001", "000000000002"]\n'
        "purse = 1.0\nprice = 0.5\ntrip_at_zero_credit = true\n"
    )
    code = "import sys; from meter_gateway.simulators.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, "--config", str(config), stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    try:
        control_line, bus_line = await _until_ready(proc.stdout)
        assert "topup ADDRESS AMOUNT" in control_line
        cport = int(control_line.split()[1].rpartition(":")[2])
        host, _, port = bus_line.split()[3].rpartition(":")
        async with tcp_bus((host, int(port))) as bus:
            d = driver_for(bus, "000000000001")
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 15
            while (await d.read_relay()).closed:  # 2 kWh of an evening load: minutes of meter time
                assert loop.time() < deadline, "the meter never tripped at zero credit"
                await asyncio.sleep(0.1)
            assert (await read(d, ["prepaid.money.remaining"]))["prepaid.money.remaining"].value == 0.0
            assert await _command(cport, "topup 000000000001 abc") == "error topup needs an amount, got 'abc'"
            assert await _command(cport, "topup 000000000009 5") == "error no simulated meter 000000000009"
            assert await _command(cport, "topup 000000000001 50") == "ok topped up 50.00: relay armed"
            assert await _command(cport, "press 000000000001") == "ok relay closed"
            assert (await d.read_relay()).closed
            readings = await read(d, ["prepaid.money.purchase.count", "prepaid.money.remaining"])
        assert readings["prepaid.money.purchase.count"].value == 2
        assert 0 < readings["prepaid.money.remaining"].value <= 50.0  # type: ignore[operator]
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        rc = await asyncio.wait_for(proc.wait(), 10)
    assert rc == 0

"""The DL/T 645 driver against simulated meters on real TCP sockets and a pty (8N1)."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest

from meter_gateway.drivers.backoff import BackoffPolicy
from meter_gateway.drivers.bus import Bus, BusSettings
from meter_gateway.drivers.dlt645_driver import Dlt645Driver, broadcast_time, discover_address, from_meter_time
from meter_gateway.drivers.errors import BadReply, ConfigurationError, MeterRefused, NoAnswer
from meter_gateway.drivers.meter_models import Dlt645Model, load_model
from meter_gateway.drivers.reading import Quality
from meter_gateway.drivers.serial_link import SerialLink
from meter_gateway.drivers.tcp_link import TcpLink
from meter_gateway.drivers.transport import SerialSettings, TcpSettings
from meter_gateway.protocols.dlt645.catalogue import Catalogue, DecodedValue, default_catalogue
from meter_gateway.protocols.dlt645.edition import Edition
from meter_gateway.protocols.dlt645.remote_control import RemoteCommand
from meter_gateway.simulators.dlt645_meter import Dlt645Meter
from meter_gateway.simulators.faults import Faults
from tests.plugins.simulators import SimBusFactory, SimBusHandle

E7 = Edition.DLT645_2007
E97 = Edition.DLT645_1997
TZ = datetime.timezone(datetime.timedelta(hours=8))  # the meters' clock zone in these tests
CAT = default_catalogue()
QUICK = BackoffPolicy(initial=0.01, maximum=0.02)
QTY = ["voltage.l1", "voltage.l2", "voltage.l3"]  # one block read (0201FF00)


def model_of(edition: Edition) -> Dlt645Model:
    model = load_model("dlt645-2007-generic" if edition is E7 else "dlt645-1997-generic")
    assert isinstance(model, Dlt645Model)
    return model


@asynccontextmanager
async def bus_to(handle: SimBusHandle, *, reply_timeout: float = 0.3, attempts: int = 2) -> AsyncIterator[Bus]:
    endpoint = handle.endpoint
    if isinstance(endpoint, tuple):
        link: TcpLink | SerialLink = TcpLink(
            TcpSettings(endpoint[0], endpoint[1], no_reply_limit=0, reconnect=BackoffPolicy(initial=0.05, maximum=0.1))
        )
    else:
        link = SerialLink(SerialSettings(endpoint, baudrate=9600))  # 8N1: ptys refuse parity
    bus = Bus("sim", link, settings=BusSettings(reply_timeout=reply_timeout, attempts=attempts, retry=QUICK))
    assert await bus.open()
    try:
        yield bus
    finally:
        await bus.close()


def driver(bus: Bus, meter: Dlt645Meter, **options: object) -> Dlt645Driver:
    return Dlt645Driver(
        bus,
        f"m{meter.address_text[-2:]}",
        meter.address_text,
        meter.edition,
        model_of(meter.edition),
        tz=TZ,
        **options,  # type: ignore[arg-type]
    )


def sim_values(meter: Dlt645Meter, model: Dlt645Model) -> dict[str, object]:
    """What the simulated meter itself says each of the model's quantities is, now."""
    out = {}
    for p in model.points:
        try:
            raw = meter.value_bytes(p.di)
        except LookupError:
            continue
        out[p.quantity] = CAT.decode(meter.edition, p.di, raw)[0].value
    return out


def meter_unix(meter: Dlt645Meter) -> float:
    return from_meter_time(meter.meter_time(), TZ)


async def until(condition: Callable[[], bool], within: float = 1.0) -> None:
    """Wait for something a no-reply frame causes (nothing comes back to say when)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


# -- reading ---------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_every_quantity_of_the_2007_model_matches_the_meter_using_block_reads(sim_bus: SimBusFactory) -> None:
    # frozen simulated time: the meter's values stand still. A money-type prepaid meter answers
    # every DI of the model except the energy-type prepaid ones ("no requested data": no reading)
    handle = await sim_bus(1, speed=0.0, purse=100.0)
    meter = handle.meters[0]
    model = model_of(E7)
    answered = [q for q in model.quantities if not q.startswith("prepaid.energy.")]
    async with bus_to(handle) as bus:
        d = driver(bus, meter)
        readings = await d.read(model.quantities, slot=1000.0, now=1234.5)
        expected = sim_values(meter, model)
        assert [r.quantity for r in readings] == answered
        assert {r.quantity: r.value for r in readings} == expected
        plan = d.plan(model.quantities)
        assert bus.counters.sent == len(plan) == 20 < len(model.quantities)  # 8 blocks + 12 single DIs
        assert handle.bus.stats["replies"] == 20
    by_q = {r.quantity: r for r in readings}
    energy = by_q["energy.active.import.total"]
    assert (energy.unit, energy.slot, energy.gateway_time, energy.meter_time) == ("kWh", 1000.0, 1234.5, None)
    assert energy.quality is Quality.GOOD
    assert by_q["voltage.l1"].unit == "V"
    assert by_q["power_factor.total"].unit == ""
    assert by_q["clock.date"].value == "2026-03-14"
    assert by_q["status.word3"].value == 0x0200  # bits 8-9: money-type prepaid
    # the simulator's energy register, independently of the wire encoding
    assert energy.value == pytest.approx(meter.load.energy("energy.active.import.total"), abs=0.01)


@pytest.mark.asyncio
async def test_every_quantity_of_the_1997_model_over_a_pty_at_8n1(sim_bus: SimBusFactory) -> None:
    handle = await sim_bus(2, kind="pty", edition=E97, speed=0.0, baud=9600, bits_per_char=10)
    meter = handle.meters[1]
    model = model_of(E97)
    async with bus_to(handle, reply_timeout=0.5) as bus:
        readings = await driver(bus, meter).read(model.quantities, slot=0.0, now=1.0)
    assert {r.quantity: r.value for r in readings} == sim_values(meter, model)
    assert len(readings) == len(model.quantities)
    assert bus.counters.sent == 5 + 10  # 5 blocks, 10 single DIs; every one answered first time
    assert bus.counters.retries == 0


@pytest.mark.asyncio
async def test_out_of_range_values_are_kept_and_flagged(sim_bus: SimBusFactory) -> None:
    handle = await sim_bus(1, speed=0.0)
    meter = handle.meters[0]
    async with bus_to(handle) as bus:
        d = driver(bus, meter)
        readings = await d.read(["frequency", "voltage.l1"], slot=0.0, now=0.0)
    # 50 Hz is plausible; the plausibility rule itself is the meter models' (40..70 Hz)
    assert all(r.quality is Quality.GOOD for r in readings)
    # a reading outside its plausible range keeps its value and gets the flag
    flagged = d._reading(
        "frequency", _decoded(E7, 0x02800002, 12.5), gateway_time=0, slot=0, meter_time=None, quality=Quality.GOOD
    )
    assert flagged.value == 12.5
    assert flagged.quality is Quality.OUT_OF_RANGE


def _decoded(edition: Edition, di: int, value: float) -> DecodedValue:
    return CAT.decode(edition, di, CAT.encode(edition, di, value))[0]


@pytest.mark.asyncio
async def test_a_block_longer_than_one_frame_arrives_via_follow_ups(sim_bus: SimBusFactory) -> None:
    # 63 tariffs: 0001FF00 is 64 x 4 = 256 bytes, more than the 200 a reply frame may carry
    handle = await sim_bus(1, speed=0.0, tariffs=63)
    meter = handle.meters[0]
    quantities = [q for q in model_of(E7).quantities if q.startswith("energy.active.import")]
    async with bus_to(handle) as bus:
        readings = await driver(bus, meter).read(quantities, slot=0.0, now=0.0)
        assert bus.counters.sent == 2  # 0x11, then 0x12 SEQ 1
    assert {r.quantity: r.value for r in readings} == {q: sim_values(meter, model_of(E7))[q] for q in quantities}
    # a meter with little room: three frames, SEQ 1 and 2, each retried correctly under loss
    meter.max_data = 16  # 12 data bytes in the first frame, 11 in each follow-up: 24 frames
    handle.bus.faults.drop_reply = 0.15
    handle.bus.faults.rng.seed(5)
    async with bus_to(handle, reply_timeout=0.1, attempts=5) as bus:
        readings = await driver(bus, meter).read(quantities, slot=0.0, now=0.0)
        assert bus.counters.ok == 1 + 23
        assert bus.counters.sent == bus.counters.ok + bus.counters.retries
        assert bus.counters.retries == handle.bus.stats["drop_reply"] > 0
    assert {r.quantity: r.value for r in readings} == {q: sim_values(meter, model_of(E7))[q] for q in quantities}


@pytest.mark.asyncio
async def test_1997_follow_ups_and_a_lost_one_restarts_the_read(sim_bus: SimBusFactory) -> None:
    handle = await sim_bus(1, edition=E97, speed=0.0)
    meter = handle.meters[0]
    meter.max_data = 10  # 901F (20 bytes) needs three frames: 0x01 then 0x02, 0x02
    quantities = [q for q in model_of(E97).quantities if q.startswith("energy.active.import")]
    expected = {q: sim_values(meter, model_of(E97))[q] for q in quantities}
    async with bus_to(handle) as bus:
        d = driver(bus, meter)
        assert {r.quantity: r.value for r in await d.read(quantities, slot=0.0, now=0.0)} == expected
        assert bus.counters.sent == 3
        # lose the first follow-up's reply once: the meter has moved on, so the read starts over.
        # An active fault makes the simulated bus consult mangle(); the stand-in picks the frame.
        handle.bus.faults.per_meter[meter.address_text] = Faults(drop_reply=1.0)
        sent = bus.counters.sent

        original = handle.bus.mangle

        def lose_second_frame_once(m: Dlt645Meter, request: object, replies: list[bytes]) -> tuple[bytes, float, float]:
            if handle.bus.stats["drop_reply"] == 0 and (handle.bus.stats["frames"] - sent) == 2:
                handle.bus.stats["drop_reply"] += 1
                return b"", 0.0, 0.0
            return replies[0] if len(replies) == 1 else b"".join(replies), 0.0, 0.0

        handle.bus.mangle = lose_second_frame_once  # type: ignore[method-assign,assignment]
        try:
            again = await d.read(quantities, slot=0.0, now=0.0)
        finally:
            handle.bus.mangle = original  # type: ignore[method-assign]
        assert {r.quantity: r.value for r in again} == expected
        assert handle.bus.stats["drop_reply"] == 1
        assert bus.counters.sent - sent == 2 + 3  # 0x01, 0x02 (lost), then 0x01, 0x02, 0x02


@pytest.mark.asyncio
async def test_a_quantity_the_meter_lacks_gives_no_reading(
    sim_bus: SimBusFactory, caplog: pytest.LogCaptureFixture
) -> None:
    handle = await sim_bus(1, speed=0.0, tariffs=2)  # this meter has tariffs 1 and 2 only
    meter = handle.meters[0]
    async with bus_to(handle) as bus:
        d = driver(bus, meter)
        assert await d.read(["energy.active.import.t4"], slot=0.0, now=0.0) == []
        assert bus.counters.refused == 1
        assert bus.counters.sent == 1  # a refusal is an answer: no retry
        readings = await d.read(
            ["energy.active.import.total", "energy.active.import.t3", "voltage.l1", "energy.active.import.t1"],
            slot=0.0, now=0.0,
        )  # fmt: skip
        assert [r.quantity for r in readings] == ["energy.active.import.total", "voltage.l1", "energy.active.import.t1"]
        await d.read(["energy.active.import.t4"], slot=0.0, now=0.0)
    assert sum("event=no_data meter=m01 di=00010400 " in r.message for r in caplog.records) == 1  # logged once
    with pytest.raises(ConfigurationError, match="no data identifier"):
        await d.read(["energy.active.import.t9"], slot=0.0, now=0.0)


@pytest.mark.asyncio
async def test_a_refused_block_falls_back_to_single_reads_and_is_remembered(sim_bus: SimBusFactory) -> None:
    # a meter whose firmware lacks the voltage block 0201FF00 (it answers "no requested data")
    no_block = Catalogue.from_items(item for item in CAT.items(E7) if item.di != 0x0201FF00)
    handle = await sim_bus(1, speed=0.0, catalogue=no_block)
    meter = handle.meters[0]
    async with bus_to(handle) as bus:
        d = driver(bus, meter)
        readings = await d.read(QTY, slot=0.0, now=0.0)
        assert {r.quantity: r.value for r in readings} == {q: sim_values(meter, model_of(E7))[q] for q in QTY}
        assert (bus.counters.sent, bus.counters.refused) == (1 + 3, 1)
        await d.read(QTY, slot=0.0, now=0.0)
        assert (bus.counters.sent, bus.counters.refused) == (1 + 3 + 3, 1)  # no second try of the block


@pytest.mark.asyncio
async def test_a_block_refused_by_one_meter_is_still_read_as_a_block_from_others(sim_bus: SimBusFactory) -> None:
    # drivers of one model share their read plans: one meter's refusal must stay that meter's
    no_block = Catalogue.from_items(item for item in CAT.items(E7) if item.di != 0x0201FF00)
    lacking = await sim_bus(1, speed=0.0, catalogue=no_block)
    full = await sim_bus(1, speed=0.0)
    async with bus_to(lacking) as bus1, bus_to(full) as bus2:
        d_full = driver(bus2, full.meters[0])
        await d_full.read(QTY, slot=0.0, now=0.0)
        assert bus2.counters.sent == 1
        d_lacking = driver(bus1, lacking.meters[0])
        await d_lacking.read(QTY, slot=0.0, now=0.0)
        await d_lacking.read(tuple(QTY), slot=0.0, now=0.0)  # a tuple asks the same as the list
        assert (bus1.counters.sent, bus1.counters.refused) == (1 + 3 + 3, 1)
        await d_full.read(QTY, slot=0.0, now=0.0)
        readings = await driver(bus2, full.meters[0]).read(QTY, slot=0.0, now=0.0)  # a new driver, same model
        assert bus2.counters.sent == 3
        assert {r.quantity: r.value for r in readings} == {q: sim_values(full.meters[0], model_of(E7))[q] for q in QTY}


# -- faults ----------------------------------------------------------------------------------------


async def _both_meters(bus: Bus, handle: SimBusHandle) -> tuple[Dlt645Driver, Dlt645Driver]:
    return driver(bus, handle.meters[0]), driver(bus, handle.meters[1])


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("fault", "outcome", "counter"),
    [
        (Faults(echo_request=1.0), "ok", "echo_ignored"),
        (Faults(noise_burst=1.0), "ok", "garbage_bytes"),
        (Faults(dribble=0.002), "ok", None),
        (Faults(drop_reply=1.0), NoAnswer, "timeouts"),
        (Faults(drop_request=1.0), NoAnswer, "timeouts"),
        (Faults(never_answer=True), NoAnswer, "timeouts"),
        # ~30 bytes x 20 ms cannot beat a 0.3 s deadline, and a retry would only start another trickle
        (Faults(dribble=0.02), (NoAnswer, BadReply), "timeouts"),
        (Faults(wrong_address=1.0), BadReply, "mismatched"),
        (Faults(corrupt_byte=1.0), BadReply, "garbage_bytes"),
        (Faults(truncate_reply=1.0), NoAnswer, None),
    ],
    ids=[
        "echo",
        "noise",
        "dribble",
        "drop_reply",
        "drop_request",
        "silence",
        "slow_dribble",
        "wrong_address",
        "corrupt",
        "truncate",
    ],
)
async def test_each_fault_gives_its_outcome_and_the_bus_keeps_moving(
    sim_bus: SimBusFactory, fault: Faults, outcome: object, counter: str | None
) -> None:
    handle = await sim_bus(2, speed=0.0)
    sick, healthy = handle.meters
    handle.bus.faults.per_meter[sick.address_text] = fault
    async with bus_to(handle) as bus:
        d_sick, d_healthy = await _both_meters(bus, handle)
        if outcome == "ok":
            readings = await d_sick.read(QTY, slot=0.0, now=0.0)
            assert {r.quantity: r.value for r in readings} == {q: sim_values(sick, model_of(E7))[q] for q in QTY}
            assert bus.counters.retries == 0
        else:
            assert isinstance(outcome, type | tuple)
            with pytest.raises(outcome):
                await d_sick.read(QTY, slot=0.0, now=0.0)
            # both attempts made, but for a reply still arriving at its deadline: that ends the turn
            assert bus.counters.sent == (1 if fault.dribble else 2)
        if counter is not None:
            assert getattr(bus.counters, counter) > 0
        if fault.dribble > 0.01:
            await asyncio.sleep(0.8)  # the serial server is still dribbling the second reply out
        # the other meter on the bus is unaffected
        readings = await d_healthy.read(QTY, slot=0.0, now=0.0)
        assert {r.quantity: r.value for r in readings} == {q: sim_values(healthy, model_of(E7))[q] for q in QTY}


@pytest.mark.asyncio
async def test_a_late_reply_is_counted_late_and_never_taken_for_the_next_answer(sim_bus: SimBusFactory) -> None:
    handle = await sim_bus(1, speed=0.0)
    meter = handle.meters[0]
    faults = handle.bus.faults.per_meter[meter.address_text] = Faults(late_reply=0.7)
    async with bus_to(handle, reply_timeout=0.5, attempts=1) as bus:
        d = driver(bus, meter)
        with pytest.raises(NoAnswer):
            await d.read(["voltage.l1"], slot=0.0, now=0.0)
        # the voltage reply lands 0.2 s into the next exchange; its own answer comes at 0.3 s
        faults.late_reply = 0.0
        meter.turnaround = 0.3
        readings = await d.read(["current.l1"], slot=0.0, now=0.0)
        assert [(r.quantity, r.value) for r in readings] == [
            ("current.l1", sim_values(meter, model_of(E7))["current.l1"])
        ]
        assert bus.counters.late_replies == 1
        assert bus.counters.mismatched == 0


@pytest.mark.asyncio
async def test_a_noisy_bus_never_misattributes_a_reading(sim_bus: SimBusFactory) -> None:
    faults = Faults(drop_reply=0.1, wrong_address=0.15, echo_request=0.3, noise_burst=0.3, corrupt_byte=0.1, seed=11)
    handle = await sim_bus(3, speed=0.0, faults=faults)
    wanted = [*QTY, "frequency"]
    good = failed = 0
    async with bus_to(handle, reply_timeout=0.15, attempts=6) as bus:
        drivers = [driver(bus, meter) for meter in handle.meters]
        for _ in range(3):
            for d, meter in zip(drivers, handle.meters, strict=True):
                try:
                    readings = await d.read(wanted, slot=0.0, now=0.0)
                except (NoAnswer, BadReply):
                    failed += 1  # allowed: a transaction may fail; a wrong value may not
                    continue
                truth = sim_values(meter, model_of(E7))
                assert {r.quantity: r.value for r in readings} == {q: truth[q] for q in wanted}
                good += 1
    assert good >= 7
    stats = handle.bus.stats
    c = bus.counters
    assert c.echo_ignored == stats["echo_request"] > 0
    # a reply re-addressed to a neighbour we recently asked is counted late, else mismatched
    assert c.mismatched + c.late_replies >= stats["wrong_address"] > 0
    assert c.garbage_bytes > 0
    assert c.timeouts > 0


# -- addressing --------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_on_a_shared_bus_only_the_addressed_meter_answers(sim_bus: SimBusFactory) -> None:
    handle = await sim_bus(3, speed=0.0)
    async with bus_to(handle, attempts=1) as bus:
        for meter in handle.meters:
            readings = await driver(bus, meter).read(["energy.active.import.total"], slot=0.0, now=0.0)
            assert readings[0].value == sim_values(meter, model_of(E7))["energy.active.import.total"]
            assert readings[0].meter_id == f"m{meter.address_text[-2:]}"
        assert len({m.requests for m in handle.meters}) == 1  # each meter saw exactly its one request
        assert handle.bus.stats["replies"] == 3
        stranger = Dlt645Driver(bus, "x", "000000000099", E7, model_of(E7))
        with pytest.raises(NoAnswer):
            await stranger.read(["frequency"], slot=0.0, now=0.0)
        assert handle.bus.stats["not_for_us"] == 1


@pytest.mark.asyncio
@pytest.mark.parametrize("edition", [E7, E97])
async def test_discovery_on_a_single_meter_link(sim_bus: SimBusFactory, edition: Edition) -> None:
    handle = await sim_bus(1, edition=edition, first_address=314159)
    async with bus_to(handle) as bus:
        assert await discover_address(bus, edition) == "000000314159"
    crowded = await sim_bus(2, edition=edition)
    async with bus_to(crowded, attempts=1) as bus:
        with pytest.raises(NoAnswer):
            await discover_address(bus, edition)


# -- clock -------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_broadcast_and_unicast_time_sync_move_the_meter_clocks(sim_bus: SimBusFactory) -> None:
    handle = await sim_bus(3)  # simulated time runs at real speed from 2026-03-14 10:00
    one, two, three = handle.meters
    async with bus_to(handle) as bus:
        d1, d2 = driver(bus, one), driver(bus, two)
        assert await d1.read_clock() == pytest.approx(meter_unix(one), abs=1.5)
        target = datetime.datetime(2026, 3, 14, 12, 30, 0, tzinfo=TZ).timestamp()
        await broadcast_time(bus, target, E7, TZ)
        await until(lambda: all(abs(meter_unix(m) - target) < 1.5 for m in handle.meters))
        for meter in handle.meters:
            assert meter_unix(meter) == pytest.approx(target, abs=1.5)
        assert await d1.read_clock() == pytest.approx(target, abs=1.5)
        later = target + 3600 * 5
        await d2.sync_time(later)
        assert await d2.read_clock() == pytest.approx(later, abs=1.5)
        assert await d1.read_clock() == pytest.approx(target, abs=1.5)  # only meter 2 was addressed
        assert meter_unix(three) == pytest.approx(target, abs=1.5)
        assert handle.bus.stats["broadcasts"] == 1


@pytest.mark.asyncio
async def test_1997_time_sync_and_clock(sim_bus: SimBusFactory) -> None:
    handle = await sim_bus(1, edition=E97)
    meter = handle.meters[0]
    async with bus_to(handle) as bus:
        d = driver(bus, meter)
        target = datetime.datetime(2025, 12, 31, 23, 59, 50, tzinfo=TZ).timestamp()
        await d.sync_time(target)
        await until(lambda: meter.meter_time().year == 2025)
        assert meter.meter_time().date() == datetime.date(2025, 12, 31)
        assert await d.read_clock() == pytest.approx(target, abs=1.5)
        await broadcast_time(bus, target + 86400, E97, TZ)
        assert await d.read_clock() == pytest.approx(target + 86400, abs=1.5)


@pytest.mark.asyncio
async def test_read_clock_across_midnight_reads_the_date_again(sim_bus: SimBusFactory) -> None:
    handle = await sim_bus(1, speed=0.0)
    meter = handle.meters[0]
    meter.set_meter_time(datetime.datetime(2026, 3, 14, 23, 59, 59))
    async with bus_to(handle) as bus:
        d = driver(bus, meter)
        calls = 0
        original = meter.value_of

        def tick_after_date(item):  # type: ignore[no-untyped-def]
            nonlocal calls
            value = original(item)
            if item.quantity == "clock.date" and calls == 0:
                calls += 1
                handle.clock.advance(2)  # midnight passes between the date and the time read
            return value

        meter.value_of = tick_after_date  # type: ignore[method-assign]
        got = await d.read_clock()
    assert got == datetime.datetime(2026, 3, 15, 0, 0, 1, tzinfo=TZ).timestamp()
    assert bus.counters.sent == 3


# -- remote control and relay ----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_remote_control_and_relay_state(sim_bus: SimBusFactory) -> None:
    handle = await sim_bus(2)
    meter = handle.meters[0]
    async with bus_to(handle) as bus:
        d = driver(bus, meter, password="000000", password_level=2, operator="12345678", clock=lambda: 42.0)

        def valid() -> float:
            return meter_unix(meter) + 300

        status = await d.read_relay()
        assert (status.closed, status.armed, status.keep_power) == (True, False, False)
        assert (status.raw, status.read_at) == (0, 42.0)

        await d.remote_control(RemoteCommand.TRIP, valid())
        assert not meter.relay_closed
        assert meter.trips[0].operator == "12345678"
        status = await d.read_relay()
        assert (status.closed, status.armed, status.raw) == (False, False, 0x50)  # bits 4 and 6

        await d.remote_control(RemoteCommand.DIRECT_CLOSE, valid())
        assert (await d.read_relay()).closed

        await d.remote_control(RemoteCommand.TRIP, valid())
        await d.remote_control(RemoteCommand.CLOSE_PERMIT, valid())
        status = await d.read_relay()
        assert (status.closed, status.armed) == (False, True)
        assert meter.press_button()
        status = await d.read_relay()
        assert (status.closed, status.armed) == (True, False)

        await d.remote_control(RemoteCommand.KEEP_POWER_ON, valid())
        assert (await d.read_relay()).keep_power
        sent = bus.counters.sent
        with pytest.raises(MeterRefused) as refused:
            await d.remote_control(RemoteCommand.TRIP, valid())
        assert "keep_power" in refused.value.reasons
        assert refused.value.code == 1 << 11
        assert bus.counters.sent == sent + 1  # refusals are not retried
        assert meter.relay_closed
        await d.remote_control(RemoteCommand.KEEP_POWER_OFF, valid())
        await d.remote_control(RemoteCommand.TRIP, valid())
        assert not (await d.read_relay()).closed

        with pytest.raises(MeterRefused) as expired:
            await d.remote_control(RemoteCommand.DIRECT_CLOSE, meter_unix(meter) - 60)
        assert expired.value.reasons == ("validity_expired",)
        assert not meter.relay_closed

        wrong = driver(bus, meter, password="999999")
        with pytest.raises(MeterRefused) as denied:
            await wrong.remote_control(RemoteCommand.DIRECT_CLOSE, valid())
        assert denied.value.reasons == ("authentication_failed",)
        low = driver(bus, meter, password="000000", password_level=4)  # level 4 may not switch the relay
        with pytest.raises(MeterRefused):
            await low.remote_control(RemoteCommand.DIRECT_CLOSE, valid())
        assert not meter.relay_closed
        assert bus.counters.refused == 4
        with pytest.raises(ConfigurationError, match="password"):
            await driver(bus, meter).remote_control(RemoteCommand.TRIP, valid())
    assert not handle.meters[1].requests  # nothing went to the neighbour


@pytest.mark.asyncio
async def test_1997_has_no_remote_control_or_relay_and_bad_settings_are_refused(sim_bus: SimBusFactory) -> None:
    handle = await sim_bus(1, edition=E97)
    async with bus_to(handle) as bus:
        d = driver(bus, handle.meters[0], password="000000")
        with pytest.raises(ConfigurationError):
            await d.remote_control(RemoteCommand.TRIP, 2e9)
        with pytest.raises(ConfigurationError):
            await d.read_relay()
        with pytest.raises(ConfigurationError):
            await d.read_frozen_daily(1, ["energy.active.import.total"])
        with pytest.raises(ConfigurationError):
            Dlt645Driver(bus, "x", "0000000001", E97, model_of(E97))
        with pytest.raises(ConfigurationError):
            Dlt645Driver(bus, "x", "000000000001", E7, model_of(E97))
        with pytest.raises(ConfigurationError):
            Dlt645Driver(bus, "x", "000000000001", E97, model_of(E97), password="12")
        with pytest.raises(ConfigurationError):
            Dlt645Driver(bus, "x", "000000000001", E97, model_of(E97), operator="xyz")
    assert bus.counters.sent == 0


# -- frozen data -------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_read_frozen_daily_after_midnights(sim_bus: SimBusFactory) -> None:
    handle = await sim_bus(1, speed=0.0)
    meter = handle.meters[0]
    quantities = ["energy.active.import.total", "energy.active.import.t2", "energy.active.export.total", "voltage.l1"]
    async with bus_to(handle) as bus:
        d = driver(bus, meter, clock=lambda: 99.0)
        assert await d.read_frozen_daily(1, quantities) == []  # no midnight yet
        handle.clock.advance(2 * 86400 + 3600)  # 2026-03-16 11:00: two midnights crossed
        latest = await d.read_frozen_daily(1, quantities)
        older = await d.read_frozen_daily(2, quantities)
        assert await d.read_frozen_daily(3, quantities) == []
        with pytest.raises(ValueError, match=r"1\.\.62"):
            await d.read_frozen_daily(63, quantities)
    assert [r.quantity for r in latest] == quantities[:3]  # voltages are not frozen
    for readings, freeze in ((latest, meter.freezes[0]), (older, meter.freezes[1])):
        assert {r.quantity: r.value for r in readings} == {
            "energy.active.import.total": round(freeze.energy["active.import.total"], 2),
            "energy.active.import.t2": round(freeze.energy["active.import.t2"], 2),
            "energy.active.export.total": round(freeze.energy["active.export.total"], 2),
        }
        stamp = from_meter_time(freeze.time, TZ)
        assert all(r.meter_time == stamp and r.quality is Quality.FROZEN for r in readings)
        assert all(r.gateway_time == 99.0 and r.unit == "kWh" for r in readings)
    assert latest[0].meter_time == datetime.datetime(2026, 3, 16, tzinfo=TZ).timestamp()
    assert older[0].meter_time == datetime.datetime(2026, 3, 15, tzinfo=TZ).timestamp()
    assert float(latest[0].value) > float(older[0].value)  # the load kept consuming in between
    assert latest[0].id != older[0].id

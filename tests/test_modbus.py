"""The Modbus driver against the simulated meter, over real sockets and pseudo-terminals.

The simulator and the driver share only the model file; expected values come from a second,
independent LoadModel with the same seed advanced to the same simulated time.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import socket
import struct
import tty
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import replace

import pytest
import pytest_asyncio
from hypothesis import given, settings
from hypothesis import strategies as st

from meter_gateway.drivers.backoff import BackoffPolicy
from meter_gateway.drivers.errors import BadReply, ConfigurationError, LinkDown, MeterRefused, NoAnswer
from meter_gateway.drivers.meter_models import ModbusModel, ModbusPoint, RelayAccess, load_model
from meter_gateway.drivers.modbus import ModbusLink, ModbusMeter, ReadRequest, decode_block, plan_reads
from meter_gateway.drivers.reading import Quality, Reading
from meter_gateway.drivers.transport import Rs485Settings, SerialSettings, TcpSettings
from meter_gateway.protocols.modbus import ValueCodec
from meter_gateway.simulators.load import LoadModel, LoadSettings
from meter_gateway.simulators.modbus_meter import ModbusSimServer, SimulatedMeter

T0 = 1_700_000_000.0
FAST = BackoffPolicy(initial=0.05, maximum=0.1, jitter=0.1)


def sim_model() -> ModbusModel:
    model = load_model("sim-3ph")
    assert isinstance(model, ModbusModel)
    return model


class ManualClock:
    """Simulated time for the server, moved by the test."""

    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def meters(units: Iterable[int], model: ModbusModel | str = "sim-3ph") -> dict[int, SimulatedMeter]:
    return {u: SimulatedMeter(model, settings=LoadSettings(seed=u), start=T0) for u in units}


def expected(unit: int, at: float, *, relay_open_at: float | None = None) -> dict[str, float]:
    ref = LoadModel(LoadSettings(seed=unit), start=T0)
    if relay_open_at is not None:
        ref.set_relay(False, at=relay_open_at)
    ref.advance(at)
    return ref.values()


def assert_matches(readings: list[Reading], want: Mapping[str, float], model: ModbusModel, variant: str | None) -> None:
    assert readings
    for r in readings:
        p = model.point(r.quantity, variant)
        assert r.unit == p.unit
        assert r.quality is Quality.GOOD, r
        target = want[r.quantity]
        if p.codec is None:
            assert r.value == int(target), r
        elif p.type.startswith("float"):
            assert math.isclose(float(r.value), target, rel_tol=1e-6, abs_tol=1e-6), (r, target)
        else:  # scaled integer: within half a step
            assert abs(float(r.value) - target) <= abs(p.scale) / 2 + 1e-9, (r, target)


def tcp_link(port: int, *, framing: str = "tcp", timeout: float = 1.0, no_reply_limit: int = 3) -> ModbusLink:
    return ModbusLink.build(
        TcpSettings("127.0.0.1", port, connect_timeout=1.0, reconnect=FAST, no_reply_limit=no_reply_limit),
        framing=framing,
        timeout=timeout,
    )


@pytest_asyncio.fixture
async def clock() -> ManualClock:
    return ManualClock(T0 + 3600)


@pytest_asyncio.fixture
async def tcp_sim(clock: ManualClock) -> AsyncIterator[ModbusSimServer]:
    server = ModbusSimServer(meters([1, 2]), transport="tcp", port=0, clock=clock)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest_asyncio.fixture
async def pty_cable() -> AsyncIterator[tuple[str, str]]:
    """Two pseudo-terminals joined like a null-modem cable: bytes written to one slave are read
    from the other. Both ends are tty paths pyserial opens (at 8N1: ptys refuse parity)."""
    m1, s1 = os.openpty()
    m2, s2 = os.openpty()
    for fd in (s1, s2):
        tty.setraw(fd)
    for fd in (m1, m2):
        os.set_blocking(fd, False)
    loop = asyncio.get_running_loop()

    def pump(src: int, dst: int) -> None:
        try:
            data = os.read(src, 4096)
            if data:
                os.write(dst, data)
        except OSError:
            pass  # a side closed or the buffer is full: a cable drops bytes too

    loop.add_reader(m1, pump, m1, m2)
    loop.add_reader(m2, pump, m2, m1)
    try:
        yield os.ttyname(s1), os.ttyname(s2)
    finally:
        loop.remove_reader(m1)
        loop.remove_reader(m2)
        for fd in (m1, m2, s1, s2):
            os.close(fd)


# -- planner (no I/O) --------------------------------------------------------------------------


def spans(plan: list[ReadRequest]) -> list[tuple[int, int, int]]:
    return [(r.function, r.address, r.count) for r in plan]


def test_plan_for_the_sim_model_is_three_reads_per_variant() -> None:
    model = sim_model()
    plain = plan_reads(model.points_for(), max_registers=64, max_bits=16, max_gap=8)
    assert spans(plain) == [(1, 0x0000, 1), (4, 0x0000, 48), (4, 0x0100, 24)]
    ints = plan_reads(model.points_for(None, "int32"), max_registers=64, max_bits=16, max_gap=8)
    assert spans(ints) == [(1, 0x0000, 1), (3, 0x1000, 48), (3, 0x1100, 24)]
    assert sum(len(r.points) for r in plain) == len(model.quantities)


@pytest.mark.parametrize("limit", [2, 10, 32, 47])
def test_plan_respects_the_register_limit(limit: int) -> None:
    model = sim_model()
    plan = plan_reads(model.points_for(), max_registers=limit, max_bits=16, max_gap=8)
    assert all(r.count <= limit for r in plan)
    covered = [p for r in plan for p in r.points]
    assert sorted(p.quantity for p in covered) == sorted(model.quantities)
    for r in plan:
        assert all(r.address <= p.address and p.end <= r.end for p in r.points)
    # the 48-register block needs ceil(48 / limit-rounded-to-whole-points) reads
    input_reads = [r for r in plan if r.function == 4 and r.address < 0x100]
    assert len(input_reads) == math.ceil(48 / (limit - limit % 2))


def test_plan_bridges_gaps_only_up_to_max_gap() -> None:
    model = sim_model()
    pts = model.points_for(["voltage.l1", "voltage.l3"])  # registers 0-1 and 4-5
    assert spans(plan_reads(pts, max_registers=64, max_gap=1)) == [(4, 0, 2), (4, 4, 2)]
    assert spans(plan_reads(pts, max_registers=64, max_gap=2)) == [(4, 0, 6)]
    twice = plan_reads([*pts, *pts], max_registers=64, max_gap=2)
    assert len(twice[0].points) == 2  # asked twice, read once


def test_plan_for_vendor_models() -> None:
    sdm = load_model("eastron-sdm630")
    assert isinstance(sdm, ModbusModel)
    plan = ModbusMeter(tcp_link(1), sdm, unit=1, meter_id="m").plan()
    assert spans(plan) == [(4, 0x0000, 80)]  # one read of the 80-register maximum
    chint = load_model("chint-dtsu666")
    assert isinstance(chint, ModbusModel)
    plan = ModbusMeter(tcp_link(1), chint, unit=1, meter_id="m").plan()
    assert spans(plan) == [(3, 0x101E, 12), (3, 0x2006, 64)]
    voltages = ModbusMeter(tcp_link(1), chint, unit=1, meter_id="m").plan(["voltage.l1", "voltage.l2"])
    assert spans(voltages) == [(3, 0x2006, 4)]


def test_meters_of_one_model_share_their_plans_unless_their_settings_differ() -> None:
    sdm = load_model("eastron-sdm630")
    assert isinstance(sdm, ModbusModel)
    link = tcp_link(1)
    first, second = (ModbusMeter(link, sdm, unit=u, meter_id=f"m{u}") for u in (1, 2))
    wanted = ["voltage.l1", "voltage.l2"]
    assert first.plan(wanted) is second.plan(list(wanted))  # 10,000 meters: one plan, not 10,000
    assert first.plan() is second.plan()
    narrow = ModbusMeter(link, sdm, unit=3, meter_id="m3", max_registers=20)
    assert narrow.plan() is not first.plan()
    assert all(r.count <= 20 for r in narrow.plan())
    assert spans(first.plan()) == [(4, 0x0000, 80)]  # the wider meter's plan is not the narrow one's


@settings(max_examples=150, deadline=None)
@given(
    layout=st.lists(
        st.tuples(st.integers(0, 400), st.sampled_from(["u16", "u32", "float32", "float64"]), st.sampled_from([3, 4])),
        min_size=1,
        max_size=25,
    ),
    max_registers=st.integers(4, 125),
    max_gap=st.integers(0, 20),
)
def test_plan_invariants(layout: list[tuple[int, str, int]], max_registers: int, max_gap: int) -> None:
    points = [
        ModbusPoint(f"voltage.l{i}", function, address, type_, "V", codec=ValueCodec(type_))
        for i, (address, type_, function) in enumerate(layout)
    ]
    plan = plan_reads(points, max_registers=max_registers, max_gap=max_gap)
    assert sorted(id(p) for r in plan for p in r.points) == sorted(id(p) for p in dict.fromkeys(points))
    for r in plan:
        assert 1 <= r.count <= max_registers
        assert r.address == min(p.address for p in r.points)
        assert r.end == max(p.end for p in r.points)
        assert all(p.function == r.function for p in r.points)
        members = sorted(r.points, key=lambda p: p.address)
        reach = members[0].end
        for p in members[1:]:
            assert p.address - reach <= max_gap
            reach = max(reach, p.end)
    # greedy is optimal per function for interval merging: no two reads could be one
    by_function: dict[int, list[ReadRequest]] = {}
    for r in plan:
        by_function.setdefault(r.function, []).append(r)
    for reads in by_function.values():
        for a, b in itertools.pairwise(reads):
            assert b.address - a.end > max_gap or b.end - a.address > max_registers


def test_decode_block_flags_bad_and_implausible_values() -> None:
    model = sim_model()
    pts = model.points_for(["voltage.l1", "voltage.l2", "current.l1", "power_factor.total"])
    f32 = ValueCodec("float32")
    registers = {0: f32.encode(230.5), 2: f32.encode(math.nan), 6: f32.encode(-3.0), 38: f32.encode(1.5)}
    plan = plan_reads(pts, max_registers=64, max_gap=64)
    assert len(plan) == 1
    data = [0] * plan[0].count
    for address, regs in registers.items():
        data[address : address + 2] = regs
    wire = struct.pack(f">{len(data)}H", *data)  # the reply's register bytes, as the exchange hands them over
    readings = {r.quantity: r for r in decode_block(plan[0], wire, meter_id="m1", gateway_time=T0, slot=T0)}
    assert readings["voltage.l1"].quality is Quality.GOOD
    assert readings["voltage.l1"].value == 230.5
    assert readings["voltage.l2"].quality is Quality.OUT_OF_RANGE
    assert math.isnan(float(readings["voltage.l2"].value))
    assert readings["current.l1"].quality is Quality.OUT_OF_RANGE  # negative current
    assert readings["power_factor.total"].quality is Quality.OUT_OF_RANGE  # |PF| > 1
    assert readings["voltage.l1"].id == f"m1/voltage.l1/s{int(T0)}"


# -- end to end ---------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_tcp_read_everything_matches_the_load_model(tcp_sim: ModbusSimServer, clock: ManualClock) -> None:
    model = sim_model()
    link = tcp_link(tcp_sim.port)
    try:
        plain = ModbusMeter(link, model, unit=1, meter_id="m1")
        ints = ModbusMeter(link, model, unit=2, meter_id="m2", variant="int32")
        readings = await plain.read(slot=clock.t, now=clock.t + 0.4)
        assert {r.quantity for r in readings} == set(model.quantities)
        assert all(r.meter_id == "m1" and r.slot == clock.t and r.gateway_time == clock.t + 0.4 for r in readings)
        assert_matches(readings, expected(1, clock.t), model, None)
        assert_matches(await ints.read(slot=clock.t, now=clock.t), expected(2, clock.t), model, "int32")
        assert link.transactions == 6

        clock.t += 2 * 3600  # energy accumulates between polls
        energy = ["energy.active.import.total", "energy.active.import.t1", "energy.active.import.t4"]
        later = await plain.read(energy, slot=clock.t, now=clock.t)
        assert_matches(later, expected(1, clock.t), model, None)
        first = {r.quantity: r.value for r in readings}
        assert float(later[0].value) > float(first["energy.active.import.total"])
    finally:
        await link.close()


@pytest.mark.asyncio
async def test_rtu_over_tcp_several_meters_on_one_bus(clock: ManualClock) -> None:
    model = sim_model()
    async with ModbusSimServer(meters([1, 2, 3]), transport="rtu-over-tcp", port=0, clock=clock) as server:
        link = tcp_link(server.port, framing="rtu")
        try:
            seen = []
            for unit in (1, 2, 3):
                meter = ModbusMeter(link, model, unit=unit, meter_id=f"m{unit}", variant="int32" if unit == 3 else None)
                readings = await meter.read(slot=clock.t, now=clock.t)
                assert_matches(readings, expected(unit, clock.t), model, meter.variant)
                seen.append(next(r.value for r in readings if r.quantity == "voltage.l1"))
            assert len(set(seen)) == 3  # three meters, three installations
        finally:
            await link.close()


@pytest.mark.asyncio
async def test_rtu_on_a_serial_port(pty_cable: tuple[str, str], clock: ManualClock) -> None:
    model = sim_model()
    server_end, client_end = pty_cable
    async with ModbusSimServer(meters([5, 6]), transport="serial", serial_port=server_end, clock=clock):
        link = ModbusLink.build(SerialSettings(client_end, baudrate=9600, parity="N", reconnect=FAST), timeout=1.0)
        try:
            meter = ModbusMeter(link, model, unit=6, meter_id="m6")
            assert_matches(await meter.read(slot=clock.t, now=clock.t), expected(6, clock.t), model, None)
            await meter.set_relay(False)
            assert await meter.read_relay() is False
            await meter.set_relay(True)
            assert await meter.read_relay() is True
            other = ModbusMeter(link, model, unit=5, meter_id="m5", variant="int32")
            assert_matches(await other.read(slot=clock.t, now=clock.t), expected(5, clock.t), model, "int32")
            assert link.stats.bytes_in > 0
            assert link.stats.bytes_out > 0
        finally:
            await link.close()


@pytest.mark.asyncio
async def test_serial_rs485_mode_refused_by_a_pty_is_used_without_it(
    pty_cable: tuple[str, str], clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    server_end, client_end = pty_cable
    async with ModbusSimServer(meters([1]), transport="serial", serial_port=server_end, clock=clock):
        link = ModbusLink.build(SerialSettings(client_end, rs485=Rs485Settings(), reconnect=FAST), timeout=1.0)
        try:
            with caplog.at_level(logging.WARNING, logger="drivers.modbus"):
                readings = await ModbusMeter(link, sim_model(), unit=1, meter_id="m1").read(
                    ["voltage.l1"], slot=T0, now=T0
                )
            assert readings[0].quality is Quality.GOOD
            assert not link.rs485_active
            assert "event=rs485_mode_refused" in caplog.text
        finally:
            await link.close()


@pytest.mark.asyncio
async def test_relay_open_close_and_read_back(tcp_sim: ModbusSimServer, clock: ManualClock) -> None:
    model = sim_model()
    link = tcp_link(tcp_sim.port)
    try:
        meter = ModbusMeter(link, model, unit=1, meter_id="m1")
        assert await meter.read_relay() is True
        opened_at = clock.t
        await meter.set_relay(False)
        assert await meter.read_relay() is False
        clock.t += 3600
        after = {r.quantity: r for r in await meter.read(slot=clock.t, now=clock.t)}
        assert after["relay.state"].value == 0
        assert after["current.l1"].value == 0
        assert after["power.active.total"].value == 0
        assert_matches(list(after.values()), expected(1, clock.t, relay_open_at=opened_at), model, None)
        await meter.set_relay(True)
        assert await meter.read_relay() is True
        assert tcp_sim.meters[1].load.relay_closed
        assert tcp_sim.meters[2].load.relay_closed  # only unit 1 was switched
    finally:
        await link.close()


@pytest.mark.asyncio
async def test_exception_responses_become_meter_refused(
    tcp_sim: ModbusSimServer, caplog: pytest.LogCaptureFixture
) -> None:
    link = tcp_link(tcp_sim.port)
    try:
        # an SDM630 map against the sim: registers 48-79 do not exist there
        sdm = ModbusMeter(link, "eastron-sdm630", unit=1, meter_id="m1", max_registers=40)
        first, refused = sdm.plan()
        assert (first.address, refused.address) == (0, 0x34)
        with caplog.at_level(logging.WARNING, logger="meter_gateway.drivers.modbus"):
            readings = await sdm.read(slot=T0, now=T0)
        # what exists is read; the refused read is split down to its points, each refused alone
        assert {r.quantity for r in readings} == {p.quantity for p in first.points}
        assert sdm.refused == {refused: ()}
        assert "event=modbus_refused meter=m1 unit=1 link=" in caplog.text
        assert 'registers="function 4 registers 52..79" reason="illegal data address (0x02)"' in caplog.text
        assert link.exceptions[2] == 2 * len(refused.points) - 1  # every split refused
        sent = link.transactions
        again = await sdm.read(slot=T0, now=T0)
        assert [r.quantity for r in again] == [r.quantity for r in readings]
        assert link.transactions == sent + 1  # remembered: only the read that works is made
        with pytest.raises(MeterRefused) as info:
            await link.read_registers(1, 4, 0x34, 2)
        assert info.value.code == 2
        assert info.value.reasons == ("illegal data address",)
        assert "function 4 registers 52..53" in str(info.value)
        with pytest.raises(MeterRefused) as info:
            await link.read_registers(1, 4, 0, 65)  # over the sim's 64-register limit
        assert (info.value.code, info.value.reasons) == (3, ("illegal data value",))
        with pytest.raises(MeterRefused, match="illegal data address"):
            await link.write_coil(1, 7, True)  # not the relay coil
        # the link is fine after refusals
        assert len(await link.read_registers(1, 4, 0, 2)) == 2
    finally:
        await link.close()


@pytest.mark.asyncio
async def test_local_misuse_is_a_configuration_error(tcp_sim: ModbusSimServer) -> None:
    link = tcp_link(tcp_sim.port)
    with pytest.raises(ConfigurationError, match=r"1\.\.125"):
        await link.read_registers(1, 3, 0, 126)
    with pytest.raises(ConfigurationError, match="unit id"):
        await link.read_registers(0, 3, 0, 1)
    with pytest.raises(ConfigurationError, match="no relay"):
        await ModbusMeter(link, "eastron-sdm630", unit=1, meter_id="m").set_relay(False)
    with pytest.raises(ConfigurationError, match="not a Modbus model"):
        ModbusMeter(link, "dlt645-2007-generic", unit=1, meter_id="m")
    with pytest.raises(ConfigurationError, match="framed 'rtu'"):
        ModbusLink.build(SerialSettings("/dev/ttyUSB0"), framing="tcp")
    assert link.transactions == 0
    await link.close()


@pytest.mark.asyncio
async def test_server_gone_is_link_down_then_recovers(clock: ManualClock) -> None:
    server = ModbusSimServer(meters([1]), transport="tcp", port=0, clock=clock)
    await server.start()
    port = server.port
    link = tcp_link(port)
    meter = ModbusMeter(link, sim_model(), unit=1, meter_id="m1")
    try:
        assert await meter.read(["voltage.l1"], slot=T0, now=T0)
        await server.stop()
        with pytest.raises(LinkDown):  # the loss, or the first reconnect attempt (made at once)
            await meter.read(["voltage.l1"], slot=T0, now=T0)
        assert not link.connected
        assert link.down_since is not None
        loop = asyncio.get_running_loop()
        await asyncio.sleep(1.0)  # past the bus's link_wait: later in an outage, reads fail fast
        attempts = link.stats.open_attempts
        started = loop.time()
        with pytest.raises(LinkDown, match="is down"):
            await meter.read(["voltage.l1"], slot=T0, now=T0)
        assert loop.time() - started < 0.05
        await asyncio.sleep(0.3)  # the background reconnects keep to the backoff (>= 0.045 s apart): no hammering
        assert link.stats.open_attempts - attempts <= 0.3 / 0.045 + 1
        server = ModbusSimServer(meters([1]), transport="tcp", port=port, clock=clock)
        await server.start()
        assert await link.wait_connected(2.0)  # back within one backoff step
        assert await meter.read(["voltage.l1"], slot=T0, now=T0)
        assert link.connected
        assert link.stats.connects == 2
        assert link.stats.losses >= 1
    finally:
        await link.close()
        await server.stop()


@pytest.mark.asyncio
async def test_connect_refused_is_link_down() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connection refused
        link = tcp_link(port)
        with pytest.raises(LinkDown, match="cannot connect"):
            await link.connect()
    await link.close()


@pytest.mark.asyncio
async def test_silent_meter_is_no_answer_and_half_open_links_are_reset(tcp_sim: ModbusSimServer) -> None:
    link = tcp_link(tcp_sim.port, timeout=0.2, no_reply_limit=2)
    try:
        meter = ModbusMeter(link, sim_model(), unit=9, meter_id="m9")  # nobody answers unit 9
        with pytest.raises(NoAnswer, match="no reply"):
            await meter.read(["voltage.l1"], slot=T0, now=T0)
        assert link.connected
        # a second silence in a row on a link that looks up: assume half-open, drop it
        with pytest.raises(NoAnswer, match="no reply"):
            await meter.read(["voltage.l1"], slot=T0, now=T0)
        assert link.stats.half_open_resets == 1
        assert not link.connected
        assert await link.wait_connected(2.0)  # the link reconnects by itself after one backoff step
        tcp_sim.meters[1].silent = True
        silent = ModbusMeter(link, sim_model(), unit=1, meter_id="m1")
        with pytest.raises(NoAnswer):
            await silent.read(["voltage.l1"], slot=T0, now=T0)
        tcp_sim.meters[1].silent = False
        assert await silent.read(["voltage.l1"], slot=T0, now=T0)
    finally:
        await link.close()


@pytest.mark.asyncio
async def test_cancellation_is_not_turned_into_an_error(tcp_sim: ModbusSimServer) -> None:
    link = tcp_link(tcp_sim.port, timeout=5.0)
    try:
        meter = ModbusMeter(link, sim_model(), unit=9, meter_id="m9")
        await link.connect()
        task = asyncio.create_task(meter.read(["voltage.l1"], slot=T0, now=T0))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with pytest.raises(TimeoutError):  # an outer timeout still works through the driver
            async with asyncio.timeout(0.05):
                await meter.read(["voltage.l1"], slot=T0, now=T0)
        assert await ModbusMeter(link, sim_model(), unit=1, meter_id="m1").read(["frequency"], slot=T0, now=T0)
    finally:
        await link.close()


@pytest.mark.asyncio
async def test_nan_from_the_meter_is_flagged_not_dropped(tcp_sim: ModbusSimServer, clock: ManualClock) -> None:
    tcp_sim.meters[1].overrides["voltage.l2"] = math.nan
    tcp_sim.meters[1].overrides["frequency"] = 0.0
    link = tcp_link(tcp_sim.port)
    try:
        readings = {
            r.quantity: r for r in await ModbusMeter(link, sim_model(), unit=1, meter_id="m1").read(slot=T0, now=T0)
        }
        assert readings["voltage.l2"].quality is Quality.OUT_OF_RANGE
        assert math.isnan(float(readings["voltage.l2"].value))
        assert readings["frequency"].quality is Quality.OUT_OF_RANGE
        assert readings["frequency"].value == 0.0
        assert readings["voltage.l1"].quality is Quality.GOOD
    finally:
        await link.close()


@pytest.mark.asyncio
async def test_configured_word_order_must_match(clock: ManualClock) -> None:
    cdab = sim_model().with_layout(word_order="little")
    async with ModbusSimServer(meters([1], cdab), transport="tcp", port=0, clock=clock) as server:
        link = tcp_link(server.port)
        try:
            right = await ModbusMeter(link, cdab, unit=1, meter_id="m1").read(slot=T0, now=T0)
            assert_matches(right, expected(1, clock.t), cdab, None)
            wrong = await ModbusMeter(link, sim_model(), unit=1, meter_id="m1").read(["voltage.l1"], slot=T0, now=T0)
            assert not math.isclose(float(wrong[0].value), expected(1, clock.t)["voltage.l1"], rel_tol=0.01)
        finally:
            await link.close()


@pytest.mark.asyncio
async def test_simulator_answers_a_hand_made_modbus_tcp_request(tcp_sim: ModbusSimServer, clock: ManualClock) -> None:
    """Independent of our driver and of pymodbus' client: MBAP + FC 04 built by hand."""
    reader, writer = await asyncio.open_connection("127.0.0.1", tcp_sim.port)
    try:
        writer.write(struct.pack(">HHHBBHH", 0x1234, 0, 6, 2, 4, 0x0000, 6))  # unit 2, 6 input registers
        header = await asyncio.wait_for(reader.readexactly(9), 2)
        tid, proto, length, unit, function, nbytes = struct.unpack(">HHHBBB", header)
        assert (tid, proto, length, unit, function, nbytes) == (0x1234, 0, 15, 2, 4, 12)
        v1, v2, v3 = struct.unpack(">fff", await reader.readexactly(12))
        want = expected(2, clock.t)
        assert [v1, v2, v3] == pytest.approx([want["voltage.l1"], want["voltage.l2"], want["voltage.l3"]], rel=1e-6)
        writer.write(struct.pack(">HHHBBHH", 0x1235, 0, 6, 2, 4, 0x0800, 2))  # nothing there
        assert struct.unpack(">HHHBBB", await asyncio.wait_for(reader.readexactly(9), 2))[4:] == (0x84, 0x02)
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.mark.asyncio
async def test_relay_state_that_is_neither_value_is_bad_reply(tcp_sim: ModbusSimServer) -> None:
    """A model that reads the relay state from the wrong register gets a clear BadReply."""
    model = sim_model()
    assert model.relay is not None
    wrong = replace(model, relay=replace(model.relay, read=RelayAccess(function=4, address=0, closed=1, open=0)))
    link = tcp_link(tcp_sim.port)
    try:
        with pytest.raises(BadReply, match="neither closed"):
            await ModbusMeter(link, wrong, unit=1, meter_id="m1").read_relay()
    finally:
        await link.close()


async def _rogue_server(reply: Callable[[bytes], bytes]) -> asyncio.Server:
    """A TCP peer that answers each MBAP request with ``reply(request)``."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                header = await reader.readexactly(7)
                (length,) = struct.unpack(">H", header[4:6])
                request = header + await reader.readexactly(length - 1)
                writer.write(reply(request))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def _mbap(request: bytes, pdu: bytes) -> bytes:
    return request[:4] + struct.pack(">HB", len(pdu) + 1, request[6]) + pdu


@pytest.mark.parametrize(
    ("pdu", "error"),
    [
        (bytes([0x03, 4, 0, 1, 0, 2]), "reply of function 3 to function 4"),  # wrong function
        (bytes([0x04, 2, 0, 1]), "asked for 2 registers at 0, got 1"),  # short
        (bytes([0x84, 0x0B]), None),  # gateway: target device failed to respond
    ],
)
@pytest.mark.asyncio
async def test_replies_that_do_not_fit(pdu: bytes, error: str | None) -> None:
    server = await _rogue_server(lambda request: _mbap(request, pdu))
    port = server.sockets[0].getsockname()[1]
    link = tcp_link(port, timeout=0.5)
    try:
        if error is None:
            with pytest.raises(NoAnswer, match="gateway target device failed to respond"):
                await link.read_registers(1, 4, 0, 2)
        else:
            with pytest.raises(BadReply, match=error):
                await link.read_registers(1, 4, 0, 2)
        assert link.connected  # a bad reply is no reason to drop the link
    finally:
        await link.close()
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("pdu", [b"\x0b\x00", b"\x16\x00", b"\x0c\x00"])
def test_truncated_reply_pdus_are_undecodable_not_a_crash(pdu: bytes) -> None:
    """pymodbus 3.11's decoder let struct.error out of these (found by `python -m fuzz modbus`)."""
    from meter_gateway.drivers.modbus import ReplyDecoder

    assert ReplyDecoder(False).decode(pdu) is None


@pytest.mark.parametrize("pdu", [b"\x0b\x00", b"\x04\x04\x00"])
@pytest.mark.asyncio
async def test_truncated_reply_is_bad_reply_and_keeps_the_link(pdu: bytes) -> None:
    server = await _rogue_server(lambda request: _mbap(request, pdu))
    link = tcp_link(server.sockets[0].getsockname()[1], timeout=0.5)
    try:
        with pytest.raises((BadReply, NoAnswer)):
            await link.read_registers(1, 4, 0, 2)
        assert link.connected
    finally:
        await link.close()
        server.close()
        await server.wait_closed()


async def _scripted_server(framing: str, chunks: Callable[[bytes], list[bytes]]) -> asyncio.Server:
    """A TCP peer that answers each request (MBAP, or an 8-byte RTU read) with ``chunks(request)``,
    written one by one with a pause between them so each arrives on its own."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                if framing == "tcp":
                    header = await reader.readexactly(7)
                    request = header + await reader.readexactly(struct.unpack(">H", header[4:6])[0] - 1)
                else:
                    request = await reader.readexactly(8)
                for chunk in chunks(request):
                    writer.write(chunk)
                    await writer.drain()
                    await asyncio.sleep(0.02)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def _crc(frame: bytes) -> bytes:
    crc = 0xFFFF
    for byte in frame:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc.to_bytes(2, "little")


def _mbap_as(tid: int, unit: int, pdu: bytes) -> bytes:
    return struct.pack(">HHHB", tid, 0, len(pdu) + 1, unit) + pdu


REGISTERS_1_2 = bytes([0x04, 4, 0, 1, 0, 2])  # the reply to a read of 2 input registers: 1, 2


def _tcp_script(kind: str) -> Callable[[bytes], list[bytes]]:
    def chunks(request: bytes) -> list[bytes]:
        tid, unit = struct.unpack(">H", request[:2])[0], request[6]
        answer = _mbap_as(tid, unit, REGISTERS_1_2)
        if kind == "stranger":  # a transaction id never used
            return [_mbap_as(tid ^ 0x4000, unit, REGISTERS_1_2), answer]
        if kind == "late":  # the previous request's answer, again
            return [_mbap_as(tid - 1, unit, REGISTERS_1_2), answer] if tid > 1 else [answer]
        assert kind == "wrong_unit"  # the right transaction id from another unit
        return [_mbap_as(tid, unit + 1, REGISTERS_1_2), answer]

    return chunks


@pytest.mark.parametrize(
    ("kind", "counted"),
    [("stranger", "mismatched"), ("late", "late_replies"), ("wrong_unit", "mismatched")],
)
@pytest.mark.asyncio
async def test_tcp_replies_that_are_not_the_answer_are_counted_and_the_answer_is_taken(kind: str, counted: str) -> None:
    server = await _scripted_server("tcp", _tcp_script(kind))
    link = tcp_link(server.sockets[0].getsockname()[1], timeout=0.5)
    try:
        for _ in range(2):
            assert await link.read_registers(1, 4, 0, 2) == [1, 2]
        counters = link.bus.counters
        assert getattr(counters, counted) == (1 if kind == "late" else 2)
        assert counters.ok == 2
        assert counters.retries == 0
    finally:
        await link.close()
        server.close()
        await server.wait_closed()


@pytest.mark.asyncio
async def test_rtu_reply_with_a_bad_crc_is_garbage_and_the_next_frame_is_the_answer() -> None:
    def chunks(request: bytes) -> list[bytes]:
        good = bytes([request[0]]) + REGISTERS_1_2
        good += _crc(good)
        bad = good[:-1] + bytes([good[-1] ^ 0xFF])
        return [bad, good]

    server = await _scripted_server("rtu", chunks)
    link = tcp_link(server.sockets[0].getsockname()[1], framing="rtu", timeout=0.5)
    try:
        assert await link.read_registers(7, 4, 0, 2) == [1, 2]
        assert link.bus.counters.garbage_bytes == len(REGISTERS_1_2) + 3
        assert link.bus.counters.retries == 0
    finally:
        await link.close()
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("framing", ["tcp", "rtu"])
@pytest.mark.asyncio
async def test_exception_replies_are_counted_by_code(framing: str) -> None:
    def chunks(request: bytes) -> list[bytes]:
        if framing == "tcp":
            return [_mbap_as(struct.unpack(">H", request[:2])[0], request[6], b"\x84\x02")]
        reply = bytes([request[0], 0x84, 0x02])
        return [reply + _crc(reply)]

    server = await _scripted_server(framing, chunks)
    link = tcp_link(server.sockets[0].getsockname()[1], framing=framing, timeout=0.5)
    try:
        with pytest.raises(MeterRefused, match=r"illegal data address \(0x02\)") as refused:
            await link.read_registers(3, 4, 0, 2)
        assert refused.value.code == 2
        assert link.exceptions[2] == 1
        assert sum(link.exceptions.values()) == 1
        assert link.bus.counters.refused == 1
    finally:
        await link.close()
        server.close()
        await server.wait_closed()

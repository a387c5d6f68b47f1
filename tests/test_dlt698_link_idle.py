"""A DL/T 698.45 terminal speaking on an idle line: its LINK login and heartbeats, and reports sent
between requests, are answered at once (the bus's idle listener), over a real TCP socket and a pty,
and a poll that starts meanwhile is not disturbed."""

from __future__ import annotations

import asyncio
import datetime
import gc
import time
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from meter_gateway.drivers.backoff import BackoffPolicy
from meter_gateway.drivers.bus import Bus, BusSettings
from meter_gateway.drivers.dlt698_driver import Dlt698Driver
from meter_gateway.drivers.dlt698_model import Dlt698Model
from meter_gateway.drivers.meter_models import load_model
from meter_gateway.drivers.serial_link import SerialLink
from meter_gateway.drivers.tcp_link import TcpLink
from meter_gateway.drivers.transport import SerialSettings, StreamLink, TcpSettings
from meter_gateway.protocols.dlt698 import apdu as ap
from meter_gateway.protocols.dlt698 import requests as rq
from meter_gateway.protocols.dlt698.exchange import MeterEvent
from meter_gateway.protocols.dlt698.frame import parse_frame
from meter_gateway.simulators.clock import SimClock
from meter_gateway.simulators.dlt698_meter import LINK_HEARTBEAT, LINK_LOGIN, Dlt698Meter
from meter_gateway.simulators.links import SimulatedBus
from tests.plugins.simulators import MetersBusFactory

TZ = datetime.timezone(datetime.timedelta(hours=8))
START = datetime.datetime(2026, 3, 14, 10, 0, 0)
QUICK = BackoffPolicy(initial=0.01, maximum=0.02)
# a heartbeat is answered within this, with no poll due: the gateway does not wait for one
ANSWER_BOUND = 0.25
KINDS = ["tcp", "pty"]


def model() -> Dlt698Model:
    loaded = load_model("dlt698-generic")
    assert isinstance(loaded, Dlt698Model)
    return loaded


def sim(address: str, **options: Any) -> Dlt698Meter:
    return Dlt698Meter(address, clock=SimClock(START, 1.0), **options)


def link_to(sim_bus: SimulatedBus) -> StreamLink:
    endpoint = sim_bus.endpoint
    if isinstance(endpoint, tuple):
        host, port = endpoint
        return TcpLink(TcpSettings(host, port, no_reply_limit=0, reconnect=QUICK))
    return SerialLink(SerialSettings(endpoint, baudrate=9600, reconnect=QUICK))


@asynccontextmanager
async def bus_to(sim_bus: SimulatedBus) -> AsyncIterator[Bus]:
    bus = Bus("line", link_to(sim_bus), settings=BusSettings(reply_timeout=0.5, attempts=2, retry=QUICK))
    assert await bus.open()
    try:
        yield bus
    finally:
        await bus.close()


def driver(bus: Bus, meter: Dlt698Meter) -> Dlt698Driver:
    return Dlt698Driver(bus, f"m{meter.address_text[-2:]}", meter.address_text, model(), tz=TZ)


async def until(condition: Callable[[], bool], within: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        assert loop.time() < deadline, f"not reached within {within} s: {what}"
        await asyncio.sleep(0.005)


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
async def test_a_terminal_logs_in_and_heartbeats_with_no_poll_due(meters_bus: MetersBusFactory, kind: str) -> None:
    terminal = sim("000000000031", login=True, heartbeat=0.1)
    sim_bus = await meters_bus([terminal], kind=kind)
    async with bus_to(sim_bus) as bus:
        d = driver(bus, terminal)
        events: list[MeterEvent] = []
        d.on_event = events.append
        await until(lambda: len(terminal.link_answers) >= 8, 5.0, "a login and 7 heartbeats answered")
        assert bus.counters.ok == 0  # no transaction ran: the idle line answered them all
        sent_after_open = terminal.link_requests_sent
    answers = terminal.link_answers
    assert terminal.logged_in
    assert answers[0].kind == LINK_LOGIN
    assert answers[0].response.result == 0
    assert {a.kind for a in answers[1:]} == {LINK_HEARTBEAT}
    slowest = max(a.latency for a in answers)
    assert slowest < ANSWER_BOUND, f"slowest LINK answer took {slowest:.3f} s"
    # every request the gateway could hear was answered: at most one still in flight, and on a pty
    # the logins sent before the gateway opened the port (the open flushes them)
    lost = sent_after_open - len(answers)
    assert lost <= (1 if kind == "tcp" else 3), f"{lost} LINK-Requests unanswered"
    # the gateway's time, in the terminal's zone, as the receive and response times
    now = datetime.datetime.now(TZ).replace(tzinfo=None)
    stamp = answers[-1].response.response_time
    answered_at = datetime.datetime(stamp.year, stamp.month, stamp.day, stamp.hour, stamp.minute, stamp.second)
    assert abs((now - answered_at).total_seconds()) < 5
    assert [e.kind for e in events[: len(answers)]] == ["link"] * len(answers)
    assert all(isinstance(e.apdu, ap.LinkRequest) for e in events)
    assert bus.counters.unsolicited >= len(answers)
    assert bus.counters.garbage_bytes == 0


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
async def test_a_report_sent_on_an_idle_line_is_acknowledged_and_published(
    meters_bus: MetersBusFactory, kind: str
) -> None:
    meter = sim("000000000041", report=True)
    sim_bus = await meters_bus([meter], kind=kind)
    async with bus_to(sim_bus) as bus:
        d = driver(bus, meter)
        events: list[MeterEvent] = []
        d.on_event = events.append
        await d.trip()
        await d.close(close_now=False)  # armed: the customer's button closes it
        assert not (await d.read_relay()).closed
        await until(lambda: meter._follow_report is None, 2.0, "the relay reports acknowledged")
        events.clear()
        transactions = bus.counters.ok
        assert meter.press_button()  # the relay closes between requests: the meter reports on its own
        report = meter.notify()
        assert report is not None
        sim_bus.emit(report)
        await until(lambda: bool(events), 2.0, "the report published")
        await until(lambda: meter._follow_report is None, 2.0, "the REPORT-Response received")
        assert bus.counters.ok == transactions  # no transaction carried it
    assert [e.kind for e in events] == ["report"]
    assert isinstance(events[0].apdu, ap.ReportNotificationList)
    assert str(events[0].address) == "000000000041"


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
async def test_polls_starting_while_a_terminal_heartbeats_are_not_disturbed(
    meters_bus: MetersBusFactory, kind: str
) -> None:
    terminal = sim("000000000051", login=True, heartbeat=0.02)
    meters = [sim(f"0000000000{n:02d}", seed=n) for n in range(1, 4)]
    sim_bus = await meters_bus([terminal, *meters], kind=kind)
    async with bus_to(sim_bus) as bus:
        driver(bus, terminal)
        drivers = [driver(bus, m) for m in meters]
        await until(lambda: terminal.logged_in, 5.0, "the terminal logged in")
        loop = asyncio.get_running_loop()
        finish = loop.time() + 1.0
        reads = 0
        while loop.time() < finish:
            results = await asyncio.gather(
                *(d.read(["energy.active.import.total"], slot=0.0, now=time.time()) for d in drivers)
            )
            assert all(len(r) == 1 for r in results)
            reads += len(results)
        answered = len(terminal.link_answers)
        await until(lambda: len(terminal.link_answers) > answered, 1.0, "heartbeats still answered")
        c = bus.counters
        assert (c.no_answer, c.bad_reply, c.retries, c.timeouts) == (0, 0, 0, 0)
    assert reads >= 30
    # heartbeats landed inside transactions and between them; all were answered, none waited for
    # the polls to stop
    assert len(terminal.link_answers) >= 20
    slowest = max(a.latency for a in terminal.link_answers)
    assert slowest < 1.0, f"slowest LINK answer took {slowest:.3f} s"


@pytest.mark.asyncio
async def test_garbage_on_the_idle_line_is_counted_and_what_follows_it_still_answered(
    meters_bus: MetersBusFactory,
) -> None:
    terminal = sim("000000000061", login=True, heartbeat=0.2)
    sim_bus = await meters_bus([terminal])
    async with bus_to(sim_bus) as bus:
        driver(bus, terminal)
        await until(lambda: terminal.logged_in, 3.0, "the terminal logged in")
        sim_bus.emit(b"\x01\x02\x03\x04\x05")
        answered = len(terminal.link_answers)
        await until(lambda: len(terminal.link_answers) > answered, 2.0, "the next heartbeat answered")
        await until(lambda: bus.counters.garbage_bytes == 5, 1.0, "the noise counted")
        assert bus.counters.ok == 0


@pytest.mark.asyncio
async def test_without_a_698_driver_the_bus_leaves_idle_input_for_the_next_flush(
    meters_bus: MetersBusFactory,
) -> None:
    terminal = sim("000000000071", login=True, heartbeat=0.05)
    sim_bus = await meters_bus([terminal])
    async with bus_to(sim_bus) as bus:
        await asyncio.sleep(0.3)
        assert terminal.link_answers == []
        assert bus.counters.unsolicited == 0
        link = bus.transport
        assert link is not None
        assert link.flush_input() > 0  # buffered, as before listening existed


def test_the_simulated_terminal_logs_in_until_answered_then_heartbeats() -> None:
    terminal = sim("000000000081", login=True, heartbeat=30)
    frames = []
    for _ in range(2):  # unanswered: the login is repeated at the heartbeat period
        data, wait = terminal.link_request()
        assert wait == 30
        frames.append(parse_frame(data))
    kinds = [ap.parse_apdu(f.apdu) for f in frames]
    assert [k.kind for k in kinds if isinstance(k, ap.LinkRequest)] == [LINK_LOGIN, LINK_LOGIN]
    assert all(f.control.from_server and not f.control.prm for f in frames)
    login = kinds[-1]
    assert isinstance(login, ap.LinkRequest)
    assert login.heartbeat == 30
    now = datetime.datetime(2026, 3, 14, 10, 0, 1)
    assert terminal.handle(rq.link_response(frames[-1], login, now, now)) == []
    assert terminal.logged_in
    assert [a.kind for a in terminal.link_answers] == [LINK_LOGIN]
    heartbeat = ap.parse_apdu(parse_frame(terminal.link_request()[0]).apdu)
    assert isinstance(heartbeat, ap.LinkRequest)
    assert heartbeat.kind == LINK_HEARTBEAT
    assert terminal.notify() is None  # nothing to report
    with pytest.raises(ValueError, match="heartbeat"):
        sim("000000000082", heartbeat=0)


@pytest.mark.asyncio
async def test_a_detached_driver_hears_nothing_and_the_next_driver_for_the_meter_does(
    meters_bus: MetersBusFactory,
) -> None:
    # what the fleet does when a reload drops a meter and keeps its bus, then adds it back
    terminal = sim("000000000051", login=True, heartbeat=0.05)
    sim_bus = await meters_bus([terminal], kind="tcp")
    async with bus_to(sim_bus) as bus:
        first = driver(bus, terminal)
        heard: list[MeterEvent] = []
        first.on_event = heard.append
        await until(lambda: bool(heard), 2.0, "the first driver hears the terminal")
        first.detach()
        gone = weakref.ref(first)
        del first
        gc.collect()
        assert gone() is None  # the bus keeps no detached driver
        heard.clear()
        answered = len(terminal.link_answers)
        await until(lambda: len(terminal.link_answers) >= answered + 3, 2.0, "heartbeats still answered")
        assert heard == []
        second = driver(bus, terminal)
        again: list[MeterEvent] = []
        second.on_event = again.append
        await until(lambda: bool(again), 2.0, "the new driver hears the terminal")
    assert heard == []
    assert all(str(e.address) == "000000000051" for e in again)

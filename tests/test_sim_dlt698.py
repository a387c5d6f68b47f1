"""Simulated DL/T 698.45 meters over real TCP sockets and a pty, driven with the codec's request
builders as a gateway would: reads, freezes, relay control, security, reports, shared buses, faults."""

from __future__ import annotations

import asyncio
import datetime
from typing import Any

import pytest

from meter_gateway.protocols.cjt188 import messages as cj
from meter_gateway.protocols.cjt188.deframer import Deframer as CjDeframer
from meter_gateway.protocols.cjt188.frame import Address as CjAddress
from meter_gateway.protocols.dlt645 import messages as msg645
from meter_gateway.protocols.dlt645.deframer import Deframer as Dlt645Deframer
from meter_gateway.protocols.dlt645.edition import Edition
from meter_gateway.protocols.dlt645.frame import Address as Address645
from meter_gateway.protocols.dlt698 import apdu as ap
from meter_gateway.protocols.dlt698 import requests as rq
from meter_gateway.protocols.dlt698.axdr import OAD, RSD, TI, SelectorLast
from meter_gateway.protocols.dlt698.deframer import Deframer
from meter_gateway.protocols.dlt698.frame import AddressType, Control, Frame, ServerAddress
from meter_gateway.simulators.cjt188_meter import Cjt188Meter
from meter_gateway.simulators.clock import SimClock
from meter_gateway.simulators.dlt645_meter import Dlt645Meter
from meter_gateway.simulators.dlt698_meter import Dlt698Meter
from meter_gateway.simulators.dlt698_test_security import TestOnlySecurity
from meter_gateway.simulators.faults import Faults
from tests.plugins.simulators import ByteClient, MetersBusFactory, pty_exchange

START = datetime.datetime(2026, 3, 14, 10, 0, 0)
A1 = ServerAddress.parse("000000000001")
A2 = ServerAddress.parse("000000000002")
ENERGY = OAD(0x0010, 2, 0)
STATUS3 = OAD(0x2014, 2, 3)


def meter(address: str = "000000000001", clock: SimClock | None = None, **options: Any) -> Dlt698Meter:
    return Dlt698Meter(address, clock=clock or SimClock(START, 0.0), **options)


async def client(bus: Any) -> ByteClient:
    return await ByteClient.connect(bus.endpoint, Deframer())


async def ask(c: ByteClient, request: Frame, wait: float = 1.0) -> ap.Apdu | None:
    reply = await c.request(request.encode(preamble=4), wait)
    return None if reply is None else ap.parse_apdu(reply.apdu)


def values(response: ap.Apdu | None) -> dict[str, Any]:
    assert response is not None
    return {r.quantity: r.value for r in rq.readings(response)}


def relay_of(response: ap.Apdu | None) -> str:
    assert response is not None
    (reading,) = rq.readings(response)
    assert reading.fields is not None
    return str(reading.fields["relay"])


@pytest.mark.asyncio
async def test_reads_are_scaled_and_grow_with_the_load(meters_bus: MetersBusFactory) -> None:
    clock = SimClock(START, 0.0)
    sim = meter(clock=clock)
    bus = await meters_bus([sim])
    c = await client(bus)
    oads = [ENERGY, OAD(0x2000, 2, 0), OAD(0x2004, 2, 1), OAD(0x200F, 2, 0), OAD(0x4000, 2, 0), OAD(0x1234, 2, 0)]
    first = await ask(c, rq.get(A1, oads, piid=3))
    assert isinstance(first, ap.GetResponseNormalList)
    assert first.piid.seq == 3
    got = values(first)
    assert got["energy.active.import.total"] == round(sim.quantity("energy.active.import.total"), 2)
    assert got["energy.active.import.total"] == pytest.approx(
        sum(got[f"energy.active.import.t{t}"] for t in range(1, 5)), abs=0.05
    )
    assert 200.0 < got["voltage.l1"] < 260.0
    assert got["power.active.total"] == pytest.approx(sim.quantity("power.active.total") * 1000, abs=0.1)  # W
    assert 49.5 < got["frequency"] < 50.5
    assert got["clock.datetime"] == "2026-03-14 10:00:00"
    assert rq.failures(first) == [(OAD(0x1234, 2, 0), 6)]  # object does not exist
    clock.advance(2 * 3600)
    later = values(await ask(c, rq.get(A1, [ENERGY])))
    assert later["energy.active.import.total"] > got["energy.active.import.total"] + 0.5
    await c.close()


@pytest.mark.asyncio
async def test_daily_freeze_records_with_selectors_1_2_and_9(meters_bus: MetersBusFactory) -> None:
    clock = SimClock(START, 0.0)
    sim = meter(clock=clock)
    bus = await meters_bus([sim])
    c = await client(bus)
    clock.advance(3 * 86400)
    columns = [OAD(0x2021, 2, 0), ENERGY]
    daily = OAD(0x5004, 2, 0)
    one = await ask(c, rq.get_record(A1, daily, rq.freeze_at(datetime.datetime(2026, 3, 16)), columns))
    assert isinstance(one, ap.GetResponseRecord)
    (row,) = rq.record_readings(one.result)
    frozen = {r.quantity: r.value for r in row}
    assert frozen["frozen.time"] == "2026-03-16 00:00:00"
    expected = next(f for f in sim.daily if f.time == datetime.datetime(2026, 3, 16))
    assert frozen["energy.active.import.total"] == round(expected.energy["energy.active.import.total"], 2)
    span = rq.freezes_between(datetime.datetime(2026, 3, 15), datetime.datetime(2026, 3, 18), TI(3, 1))
    rows = await ask(c, rq.get_record(A1, daily, span, columns))
    assert isinstance(rows, ap.GetResponseRecord)
    table = [{r.quantity: r.value for r in row} for row in rq.record_readings(rows.result)]
    assert [t["frozen.time"] for t in table] == ["2026-03-15 00:00:00", "2026-03-16 00:00:00", "2026-03-17 00:00:00"]
    totals = [t["energy.active.import.total"] for t in table]
    assert totals == sorted(totals)
    assert totals[0] < totals[-1]
    last = await ask(c, rq.get_record(A1, daily, RSD(9, SelectorLast(1)), columns))
    assert isinstance(last, ap.GetResponseRecord)
    assert {r.quantity: r.value for r in rq.record_readings(last.result)[0]}["frozen.time"] == "2026-03-17 00:00:00"
    minutes = await ask(c, rq.get_record(A1, OAD(0x5002, 2, 0), RSD(9, SelectorLast(1)), columns))
    assert isinstance(minutes, ap.GetResponseRecord)
    assert {r.quantity: r.value for r in rq.record_readings(minutes.result)[0]}["frozen.time"] == "2026-03-17 10:00:00"
    await c.close()


@pytest.mark.asyncio
async def test_long_record_reads_come_in_get_response_next_blocks(meters_bus: MetersBusFactory) -> None:
    clock = SimClock(START, 0.0)
    sim = meter(clock=clock)
    bus = await meters_bus([sim])
    c = await client(bus)
    clock.advance(45 * 86400)  # crosses 1 April: one monthly freeze too
    columns = [OAD(0x2021, 2, 0), ENERGY, OAD(0x0020, 2, 0)]
    span = rq.freezes_between(datetime.datetime(2026, 1, 1), datetime.datetime(2026, 6, 1))
    response = await ask(c, rq.get_record(A1, OAD(0x5004, 2, 0), span, columns, piid=9))
    rows: list[Any] = []
    while isinstance(response, ap.GetResponseNext):
        assert response.dar is None
        rows += [row for result in response.results for row in rq.record_readings(result)]  # type: ignore[arg-type]
        if response.last:
            break
        response = await ask(c, rq.request_frame(A1, ap.GetRequestNext(piid=ap.Piid(10), last_block=response.block)))
    assert len(rows) == 45
    times = [next(r.value for r in row if r.quantity == "frozen.time") for row in rows]
    assert times[0] == "2026-03-15 00:00:00"
    assert times[-1] == "2026-04-28 00:00:00"
    monthly = await ask(c, rq.get_record(A1, OAD(0x5006, 2, 0), RSD(9, SelectorLast(1)), columns))
    assert isinstance(monthly, ap.GetResponseRecord)
    assert rq.record_readings(monthly.result)[0][0].value == "2026-04-01 00:00:00"
    await c.close()


@pytest.mark.asyncio
async def test_relay_trip_close_keep_power_and_read_back(meters_bus: MetersBusFactory) -> None:
    clock = SimClock(START, 0.0)
    sim = meter(clock=clock)
    bus = await meters_bus([sim])
    c = await client(bus)
    assert relay_of(await ask(c, rq.get(A1, [STATUS3]))) == "closed"
    tripped = await ask(c, rq.relay_trip(A1))
    assert isinstance(tripped, ap.ActionResponseNormal)
    assert tripped.result.dar == 0
    assert relay_of(await ask(c, rq.get(A1, [STATUS3]))) == "open"
    before = values(await ask(c, rq.get(A1, [ENERGY])))["energy.active.import.total"]
    clock.advance(3600)
    after = values(await ask(c, rq.get(A1, [ENERGY, OAD(0x2004, 2, 1)])))
    assert after["energy.active.import.total"] == before  # no supply, no energy
    assert after["power.active.total"] == 0.0
    closed = await ask(c, rq.relay_close(A1, close_now=True))
    assert isinstance(closed, ap.ActionResponseNormal)
    assert closed.result.dar == 0
    assert relay_of(await ask(c, rq.get(A1, [STATUS3]))) == "closed"
    assert (await ask(c, rq.keep_power(A1, True))).result.dar == 0  # type: ignore[union-attr]
    refused = await ask(c, rq.relay_trip(A1))
    assert isinstance(refused, ap.ActionResponseNormal)
    assert refused.result.dar == 3
    status = rq.readings(await ask(c, rq.get(A1, [STATUS3])))[0]  # type: ignore[arg-type]
    assert status.fields is not None
    assert status.fields["keep_power"] is True
    assert status.fields["relay"] == "closed"
    await ask(c, rq.keep_power(A1, False))
    delayed = await ask(c, rq.relay_trip(A1, alarm_delay=5))
    assert delayed.result.dar == 0  # type: ignore[union-attr]
    assert relay_of(await ask(c, rq.get(A1, [STATUS3]))) == "closed"  # pre-trip alarm first
    clock.advance(5 * 60)
    assert relay_of(await ask(c, rq.get(A1, [STATUS3]))) == "open"
    armed = await ask(c, rq.relay_close(A1, close_now=False))
    assert armed.result.dar == 0  # type: ignore[union-attr]
    assert relay_of(await ask(c, rq.get(A1, [STATUS3]))) == "open"
    assert sim.press_button()
    assert relay_of(await ask(c, rq.get(A1, [STATUS3]))) == "closed"
    await c.close()


@pytest.mark.asyncio
async def test_time_set_and_broadcast_time(meters_bus: MetersBusFactory) -> None:
    clock = SimClock(START, 0.0)
    sims = [meter("000000000001", clock), meter("000000000002", clock)]
    bus = await meters_bus(sims)
    c = await client(bus)
    target = datetime.datetime(2026, 3, 14, 9, 58, 30)
    response = await ask(c, rq.set_clock(A2, target))
    assert isinstance(response, ap.SetResponseNormal)
    assert response.dar == 0
    assert sims[1].meter_time() == target
    assert sims[0].meter_time() == START
    await c.send(rq.broadcast_time(datetime.datetime(2026, 3, 14, 10, 0, 5)).encode(preamble=4))
    assert [e for e in await c.events(0.3) if isinstance(e, Frame)] == []
    assert [s.meter_time() for s in sims] == [datetime.datetime(2026, 3, 14, 10, 0, 5)] * 2
    assert bus.stats["broadcasts"] == 1
    await c.close()


@pytest.mark.asyncio
async def test_wildcard_address_discovery_only_on_a_single_meter_line(meters_bus: MetersBusFactory) -> None:
    single = await meters_bus([meter("000012345678")])
    c = await client(single)
    reply = await c.request(rq.get(ServerAddress.wildcard(), [OAD(0x4001, 2, 0)]).encode(preamble=4))
    assert reply is not None
    assert str(reply.address) == "000012345678"
    assert values(ap.parse_apdu(reply.apdu))["meter.address"] == "000012345678"
    await c.close()
    two = await meters_bus([meter("000000000001"), meter("000000000002")])
    c = await client(two)
    assert await c.request(rq.get(ServerAddress.wildcard(), [OAD(0x4001, 2, 0)]).encode(), 0.3) is None
    assert two.stats["wildcard_unanswered"] == 1
    await c.close()


@pytest.mark.asyncio
async def test_a_shared_bus_with_645_and_188_meters_only_the_addressed_meter_answers(
    meters_bus: MetersBusFactory,
) -> None:
    clock = SimClock(START, 0.0)
    m698 = meter("000000000001", clock)
    m645 = Dlt645Meter("000000000001", Edition.DLT645_2007, clock=clock)  # the same digits on purpose
    m188 = Cjt188Meter("00000000000001", "water", clock=clock)
    bus = await meters_bus([m698, m645, m188])
    c698 = await client(bus)
    reply = await c698.request(rq.get(A1, [ENERGY]).encode(preamble=4))
    assert reply is not None
    assert reply.control.from_server
    await c698.close()
    c645 = await ByteClient.connect(bus.endpoint, Dlt645Deframer())
    read645 = msg645.ReadRequest(Address645.parse("000000000001"), 0x00010000).encode(Edition.DLT645_2007)
    frame645 = await c645.request(read645)
    assert frame645 is not None
    assert frame645.control.byte == 0x91
    await c645.close()
    c188 = await ByteClient.connect(bus.endpoint, CjDeframer())
    frame188 = await c188.request(cj.ReadRequest.current_data(0x10, m188.address, 7).encode(preamble=4))
    assert frame188 is not None
    assert frame188.control.byte == 0x81
    stranger = cj.ReadRequest.current_data(0x10, CjAddress.parse("00000000000002")).encode(preamble=4)
    assert await c188.request(stranger, 0.3) is None
    await c188.close()
    assert (m698.requests, m645.requests, m188.requests) == (1, 1, 1)
    assert bus.stats["not_for_us"] == 1


@pytest.mark.asyncio
async def test_security_plaintext_rn_answered_with_a_mac_and_unwrapped_refused(meters_bus: MetersBusFactory) -> None:
    key = bytes.fromhex("00112233445566778899aabbccddeeff")
    bus = await meters_bus([meter(requires_security=True, security_key=key)])
    c = await client(bus)
    bare = await ask(c, rq.get(A1, [ENERGY]))
    assert rq.failures(bare) == [(ENERGY, 20)]  # type: ignore[arg-type]
    rn = bytes(range(16))
    secured = await ask(c, rq.secured(rq.get(A1, [ENERGY]), rn))
    assert isinstance(secured, ap.SecurityResponse)
    assert secured.data is not None
    assert secured.mac == TestOnlySecurity(key).rn_mac(rn, secured.data)
    assert secured.mac != TestOnlySecurity().rn_mac(rn, secured.data)  # the key matters
    assert values(secured)["energy.active.import.total"] > 0
    await c.close()


@pytest.mark.asyncio
async def test_requires_connect_answers_only_inside_an_association(meters_bus: MetersBusFactory) -> None:
    bus = await meters_bus([meter(requires_connect=True)])
    c = await client(bus)
    assert rq.failures(await ask(c, rq.get(A1, [ENERGY]))) == [(ENERGY, 3)]  # type: ignore[arg-type]
    connected = await ask(c, rq.connect(A1, apdu_max=512))
    assert isinstance(connected, ap.ConnectResponse)
    assert connected.result == 0
    assert connected.apdu_max == 512
    assert "energy.active.import.total" in values(await ask(c, rq.get(A1, [ENERGY])))
    released = await ask(c, rq.request_frame(A1, ap.ReleaseRequest(piid=ap.Piid(2))))
    assert isinstance(released, ap.ReleaseResponse)
    assert released.result == 0
    assert rq.failures(await ask(c, rq.get(A1, [ENERGY]))) == [(ENERGY, 3)]  # type: ignore[arg-type]
    await c.close()


@pytest.mark.asyncio
async def test_remote_control_demands_ciphertext_unless_plaintext_is_accepted(meters_bus: MetersBusFactory) -> None:
    key = b"sim-config-key-1"
    sim = meter(accept_plaintext_control=False, security_key=key)
    bus = await meters_bus([sim])
    c = await client(bus)
    plain = await ask(c, rq.relay_trip(A1))
    assert isinstance(plain, ap.ActionResponseNormal)
    assert plain.result.dar == 20
    wrapped = await ask(c, rq.secured(rq.relay_trip(A1), b"\x01" * 16))
    inner = rq.unwrap(wrapped)  # type: ignore[arg-type]
    assert isinstance(inner, ap.ActionResponseNormal)
    assert inner.result.dar == 20
    forged = await ask(c, TestOnlySecurity(b"another key").sealed(rq.relay_trip(A1), sid=0x81000001))
    assert isinstance(forged, ap.SecurityResponse)
    assert forged.dar == 23
    assert sim.relay_closed
    scheme = TestOnlySecurity(key)
    sealed = await ask(c, scheme.sealed(rq.relay_trip(A1), sid=0x81000002, extra=b"\x00\x01"))
    assert isinstance(sealed, ap.SecurityResponse)
    assert sealed.encrypted
    opened = ap.parse_apdu(scheme.open_response(sealed, 0x81000002, b"\x00\x01"))
    assert isinstance(opened, ap.ActionResponseNormal)
    assert opened.result.dar == 0
    assert not sim.relay_closed
    keep = await ask(c, scheme.sealed(rq.keep_power(A1, True), sid=0x81000003))
    assert isinstance(keep, ap.SecurityResponse)
    assert sim.keep_power
    await c.close()


@pytest.mark.asyncio
async def test_relay_change_is_reported_and_follows_on_the_next_reply(meters_bus: MetersBusFactory) -> None:
    bus = await meters_bus([meter(report=True)])
    c = await client(bus)
    await c.send(rq.relay_trip(A1).encode(preamble=4))
    frames = [e for e in await c.events(1.0, until_frames=2) if isinstance(e, Frame)]
    assert [f.control.role for f in frames] == ["response", "report"]
    report = ap.parse_apdu(frames[1].apdu)
    assert isinstance(report, ap.ReportNotificationList)
    assert relay_of(ap.GetResponseNormal(result=ap.ResultNormal(STATUS3, report.results[0].data.value[2]))) == "open"  # type: ignore[union-attr]
    following = await ask(c, rq.get(A1, [ENERGY]))
    assert isinstance(following, ap.GetResponseNormal)
    assert following.follow_report is not None
    assert following.follow_report.results[0].oad == OAD(0x2014, 2, 0)
    assert (await ask(c, rq.get(A1, [ENERGY]))).follow_report is None  # type: ignore[union-attr]
    # acknowledged at once: nothing rides on the next reply
    await c.send(rq.relay_close(A1, close_now=True).encode())
    frames = [e for e in await c.events(1.0, until_frames=2) if isinstance(e, Frame)]
    notification = ap.parse_apdu(frames[1].apdu)
    assert isinstance(notification, ap.ReportNotificationList)
    ack = rq.report_response(frames[1], notification)
    await c.send(ack.encode())
    assert [e for e in await c.events(0.2) if isinstance(e, Frame)] == []
    assert (await ask(c, rq.get(A1, [ENERGY]))).follow_report is None  # type: ignore[union-attr]
    await c.close()


@pytest.mark.asyncio
async def test_prepaid_purse_falls_with_consumption_and_trips_at_zero(meters_bus: MetersBusFactory) -> None:
    clock = SimClock(START, 0.0)
    sim = meter(clock=clock, purse=20.0, price=1.0, trip_at_zero_credit=True)
    bus = await meters_bus([sim])
    c = await client(bus)
    purse = OAD(0x202C, 2, 0)
    start = values(await ask(c, rq.get(A1, [purse, ENERGY])))
    assert start["prepaid.money.remaining"] == 20.0
    assert start["prepaid.money.purchase.count"] == 1
    clock.advance(3600)
    hour = values(await ask(c, rq.get(A1, [purse, ENERGY])))
    used = hour["energy.active.import.total"] - start["energy.active.import.total"]
    assert hour["prepaid.money.remaining"] == pytest.approx(20.0 - used, abs=0.02)
    assert relay_of(await ask(c, rq.get(A1, [STATUS3]))) == "closed"
    clock.advance(2 * 86400)
    empty = values(await ask(c, rq.get(A1, [purse])))
    assert empty["prepaid.money.remaining"] == 0.0
    assert relay_of(await ask(c, rq.get(A1, [STATUS3]))) == "open"
    word1 = rq.readings(await ask(c, rq.get(A1, [OAD(0x2014, 2, 1)])))[0]  # type: ignore[arg-type]
    assert word1.fields is not None
    assert word1.fields["overdraft"] is True
    await c.close()


@pytest.mark.asyncio
async def test_pty_bus_at_8n1(meters_bus: MetersBusFactory) -> None:
    bus = await meters_bus([meter("000000000001"), meter("000000000002")], kind="pty")
    path = bus.endpoint
    assert isinstance(path, str)
    raw = await asyncio.to_thread(pty_exchange, path, rq.get(A2, [OAD(0x4001, 2, 0)]).encode(preamble=4))
    frames = [e for e in Deframer().feed(raw) if isinstance(e, Frame)]
    assert len(frames) == 1
    assert frames[0].address == A2
    assert values(ap.parse_apdu(frames[0].apdu))["meter.address"] == "000000000002"


@pytest.mark.asyncio
async def test_faults_drop_garble_misaddress_and_late(meters_bus: MetersBusFactory) -> None:
    sims = [meter("000000000001"), meter("000000000002")]
    bus = await meters_bus(sims, faults=Faults(drop_reply=1.0))
    c = await client(bus)
    assert await c.request(rq.get(A1, [ENERGY]).encode(), 0.3) is None
    assert bus.stats["drop_reply"] == 1
    assert sims[0].requests == 1
    bus.faults = Faults(corrupt_byte=1.0, seed=2)
    await c.send(rq.get(A1, [ENERGY]).encode())
    events = await c.events(0.3)
    bus.faults = Faults()  # the next good reply flushes whatever the garbled one left held
    events += await c.events(0.01, until_frames=0)
    await c.send(rq.get(A1, [ENERGY]).encode())
    events += await c.events(0.5, until_frames=1)
    assert len([e for e in events if isinstance(e, Frame)]) == 1
    assert [e for e in events if getattr(e, "reason", None)]
    assert bus.stats["corrupt_byte"] == 1
    bus.faults = Faults(wrong_address=1.0)
    moved = await c.request(rq.get(A1, [ENERGY]).encode())
    assert moved is not None
    assert moved.address != A1
    assert moved.control.from_server
    assert bus.stats["wrong_address"] == 1
    bus.faults = Faults(per_meter={"000000000001": Faults(late_reply=0.3)})
    assert await c.request(rq.get(A1, [ENERGY]).encode(), 0.15) is None
    await c.send(rq.get(A2, [ENERGY]).encode())
    late = [e for e in await c.events(0.6, until_frames=2) if isinstance(e, Frame)]
    assert sorted(str(f.address) for f in late) == ["000000000001", "000000000002"]
    await c.close()


def test_readdress_keeps_a_valid_frame() -> None:
    from meter_gateway.protocols.dlt698.frame import parse_frame
    from meter_gateway.simulators.dlt698_meter import DLT698

    frame = Frame(Control(3, from_server=True), A1, 0, b"\x85\x01\x01\x00\x10\x02\x00\x00\x00\x00")
    moved = parse_frame(DLT698.readdress(frame.encode(preamble=4)))
    assert moved.address.wire[0] == A1.wire[0] ^ 1
    assert moved.address.type is AddressType.SINGLE


@pytest.mark.asyncio
async def test_pypi_dlt698_as_a_client_reads_the_simulated_meter(meters_bus: MetersBusFactory) -> None:
    dlt698 = pytest.importorskip("dlt698")
    from dlt698 import codec
    from dlt698 import protocol as op
    from dlt698.protocol import link

    sim = meter("000000000001")
    bus = await meters_bus([sim])
    c = await client(bus)
    server = link.ServerAddress(bytes=sim.address.wire, logical=0, type=link.AddressType.single)
    oads = [dlt698.Oad(oi=0x0010, attribute=2, index=0), dlt698.Oad(oi=0x4001, attribute=2, index=0)]
    request = op.GetRequest(attributes=oads, list=True, piid=5)
    raw = codec.encode_frame(op.Frame(control=0x43, server=server, client=0, payload=codec.encode_apdu(request)))
    await c.send(raw)
    await c.events(0.5, until_frames=1)
    theirs = codec.decode_frame(bytes(c.raw).lstrip(b"\xfe"))
    assert theirs.server.bytes == sim.address.wire
    response = codec.decode_apdu(theirs.payload)
    assert isinstance(response, op.GetResponse)
    assert response.piid_acd == 5
    energy, address = response.attributes
    assert (energy.attribute.oi, address.attribute.oi) == (0x0010, 0x4001)
    registers = [d.as_uint32() for d in energy.result.value]
    assert registers[0] == round(sim.quantity("energy.active.import.total") * 100)
    assert len(registers) == 5
    assert address.result.as_octet_string() == bytes.fromhex("000000000001")
    await c.close()

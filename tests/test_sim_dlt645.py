"""The simulated DL/T 645 meter, sans-I/O: request frames in, reply bytes out."""

from __future__ import annotations

import datetime

import pytest

from meter_gateway.protocols.dlt645 import messages as m
from meter_gateway.protocols.dlt645.catalogue import default_catalogue
from meter_gateway.protocols.dlt645.edition import Edition
from meter_gateway.protocols.dlt645.frame import BROADCAST, Address, Frame, parse_frame
from meter_gateway.protocols.dlt645.remote_control import RemoteCommand
from meter_gateway.simulators.clock import SimClock
from meter_gateway.simulators.dlt645_meter import Dlt645Meter

E7 = Edition.DLT645_2007
E97 = Edition.DLT645_1997
START = datetime.datetime(2026, 3, 14, 10, 0, 0)
ADDR = "000000000042"
A = Address.parse(ADDR)
CAT = default_catalogue()


@pytest.fixture
def clock() -> SimClock:
    return SimClock(START, speed=0.0)  # frozen time: tests move it explicitly


@pytest.fixture
def meter(clock: SimClock) -> Dlt645Meter:
    return Dlt645Meter(ADDR, E7, clock=clock, seed=7)


def ask(meter: Dlt645Meter, message: m.Message, edition: Edition = E7) -> m.Message | None:
    replies = meter.handle(message.to_frame(edition))
    if not replies:
        return None
    assert len(replies) == 1
    assert replies[0].startswith(b"\xfe" * meter.preamble + b"\x68")
    return m.parse_message(parse_frame(replies[0]), edition)


def read(meter: Dlt645Meter, di: int, edition: Edition = E7) -> list[object]:
    reply = ask(meter, m.ReadRequest(A, di), edition)
    assert isinstance(reply, m.ReadReply), reply
    assert reply.di == di
    return [v.value for v in CAT.decode(edition, di, reply.value)]


def rc(
    meter: Dlt645Meter,
    command: RemoteCommand,
    *,
    level: int = 2,
    password: str = "000000",
    n2: int = 0,
    valid_for: float = 600.0,
) -> m.Message | None:
    valid_until = (meter.meter_time() + datetime.timedelta(seconds=valid_for)).replace(microsecond=0)
    request = m.RemoteControlRequest(A, m.Password(level, password), "12345678", command, n2, valid_until)
    return ask(meter, request)


def word3(meter: Dlt645Meter) -> int:
    value = read(meter, 0x04000503)[0]
    assert isinstance(value, int)
    return value


def test_energy_block_has_total_and_tariffs_consistent(meter: Dlt645Meter) -> None:
    block = read(meter, 0x0001FF00)
    assert len(block) == 5  # total + 4 tariffs
    total, *tariffs = block
    assert isinstance(total, float)
    assert total == pytest.approx(sum(tariffs), abs=0.011)  # type: ignore[arg-type]
    assert read(meter, 0x00010000) == [total]
    assert read(meter, 0x00010300) == [tariffs[2]]


def test_energy_accumulates_with_the_clock(meter: Dlt645Meter, clock: SimClock) -> None:
    before = read(meter, 0x00010000)[0]
    clock.advance(3600)
    after = read(meter, 0x00010000)[0]
    assert isinstance(before, float)
    assert isinstance(after, float)
    assert after > before


def test_instantaneous_values_are_plausible(meter: Dlt645Meter) -> None:
    volts = read(meter, 0x0201FF00)
    assert len(volts) == 3
    assert all(200 < v < 250 for v in volts)  # type: ignore[operator]
    frequency = read(meter, 0x02800002)[0]
    assert 49.5 < frequency < 50.5  # type: ignore[operator]
    assert read(meter, 0x04000401) == [ADDR]


def test_unknown_di_answers_no_requested_data(meter: Dlt645Meter) -> None:
    reply = ask(meter, m.ReadRequest(A, 0x12345678))
    assert isinstance(reply, m.ErrorReply)
    assert reply.failed == 0x11
    assert reply.code == 0x02
    assert "no_requested_data" in reply.flags
    # known to the catalogue but not kept by this meter (no freeze yet)
    reply = ask(meter, m.ReadRequest(A, 0x05060001))
    assert isinstance(reply, m.ErrorReply)
    assert reply.code == 0x02


def test_other_addresses_and_broadcast_reads_get_silence(meter: Dlt645Meter) -> None:
    other = Address.parse("000000000043")
    assert meter.handle(m.ReadRequest(other, 0x00010000).to_frame(E7)) == []
    assert meter.handle(m.ReadRequest(BROADCAST, 0x00010000).to_frame(E7)) == []


def test_long_reply_goes_out_as_follow_up_frames(clock: SimClock) -> None:
    meter = Dlt645Meter(ADDR, E7, clock=clock, tariffs=63)
    first = parse_frame(meter.handle(m.ReadRequest(A, 0x0001FF00).to_frame(E7))[0])
    assert first.control.byte == 0xB1
    head = m.parse_message(first, E7)
    assert isinstance(head, m.ReadReply)
    assert head.more
    assert len(first.data) == 200
    raw = parse_frame(meter.handle(m.ReadFollowUpRequest(A, 0x0001FF00, 1).to_frame(E7))[0])
    assert raw.control.byte == 0x92  # last part: no follow-up flag
    tail = m.parse_message(raw, E7)
    assert isinstance(tail, m.ReadReply)
    assert tail.seq == 1
    assert not tail.more
    values = CAT.decode(E7, 0x0001FF00, head.value + tail.value)
    assert len(values) == 64
    assert values[0].value == pytest.approx(sum(v.value for v in values[1:]), abs=0.011)  # type: ignore[misc]
    assert all(v.value == 0 for v in values[5:])  # tariffs the schedule never uses


def test_remote_control_expired_validity(meter: Dlt645Meter) -> None:
    reply = rc(meter, RemoteCommand.TRIP, valid_for=-60)
    assert isinstance(reply, m.ErrorReply)
    assert reply.word
    assert reply.flags == ("validity_expired",)
    assert meter.relay_closed


@pytest.mark.parametrize(("level", "password"), [(2, "123456"), (4, "000000"), (3, "000000")])
def test_remote_control_wrong_password_or_level(meter: Dlt645Meter, level: int, password: str) -> None:
    reply = rc(meter, RemoteCommand.TRIP, level=level, password=password)
    assert isinstance(reply, m.ErrorReply)
    assert reply.flags == ("authentication_failed",)
    assert meter.relay_closed


def test_trip_opens_relay_and_records_the_event(meter: Dlt645Meter) -> None:
    assert word3(meter) == 0
    reply = rc(meter, RemoteCommand.TRIP)
    assert isinstance(reply, m.RemoteControlReply)
    assert parse_frame(meter._last_reply[0]).control.byte == 0x9C
    assert not meter.relay_closed
    assert word3(meter) & 0x50 == 0x50  # bit4 relay open, bit6 commanded open
    assert read(meter, 0x1D000001) == [1]
    assert read(meter, 0x1D000201) == ["12345678"]
    record = CAT.decode(E7, 0x1D00FF01, meter.value_bytes(0x1D00FF01))[0]
    assert record.timestamp == START
    # with the relay open the energy stops
    before = read(meter, 0x00010000)
    meter.clock.advance(3600)
    assert read(meter, 0x00010000) == before


def test_keep_power_blocks_trip_until_released(meter: Dlt645Meter) -> None:
    assert isinstance(rc(meter, RemoteCommand.KEEP_POWER_ON), m.RemoteControlReply)
    assert meter.keep_power
    assert word3(meter) & (1 << 12)
    reply = rc(meter, RemoteCommand.TRIP)
    assert isinstance(reply, m.ErrorReply)
    assert reply.flags == ("keep_power",)
    assert meter.relay_closed
    assert isinstance(rc(meter, RemoteCommand.KEEP_POWER_OFF), m.RemoteControlReply)
    assert isinstance(rc(meter, RemoteCommand.TRIP), m.RemoteControlReply)
    assert not meter.relay_closed


def test_close_permit_arms_until_the_button(meter: Dlt645Meter) -> None:
    rc(meter, RemoteCommand.TRIP)
    assert isinstance(rc(meter, RemoteCommand.CLOSE_PERMIT), m.RemoteControlReply)
    assert meter.relay_armed
    assert not meter.relay_closed
    assert word3(meter) & 0x50 == 0x10  # still open, no longer commanded open
    assert meter.press_button()
    assert meter.relay_closed
    assert not meter.relay_armed
    assert word3(meter) & 0x50 == 0
    assert read(meter, 0x1E000001) == [1]
    assert read(meter, 0x1E000201) == ["FFFFFFFF"]  # local operation


def test_direct_close_and_alarm(meter: Dlt645Meter) -> None:
    rc(meter, RemoteCommand.TRIP)
    rc(meter, RemoteCommand.DIRECT_CLOSE)
    assert meter.relay_closed
    assert read(meter, 0x1E000201) == ["12345678"]
    rc(meter, RemoteCommand.ALARM_ON)
    assert word3(meter) & 0x80
    rc(meter, RemoteCommand.ALARM_OFF)
    assert not word3(meter) & 0x80


def test_delayed_trip_waits_n2_minutes(meter: Dlt645Meter, clock: SimClock) -> None:
    assert isinstance(rc(meter, RemoteCommand.DELAYED_TRIP, n2=5), m.RemoteControlReply)
    assert meter.relay_closed
    assert word3(meter) & 0xC0 == 0xC0  # commanded open, pre-trip alarm while pending
    clock.advance(4 * 60)
    assert read(meter, 0x1D000001) == [0]
    clock.advance(61)
    assert word3(meter) & 0x50 == 0x50
    assert not meter.relay_closed
    assert read(meter, 0x1D000101) == [(START + datetime.timedelta(minutes=5)).isoformat()]


def test_stuck_relay_accepts_trip_but_never_moves(meter: Dlt645Meter) -> None:
    meter.stuck_relay = True
    assert isinstance(rc(meter, RemoteCommand.TRIP), m.RemoteControlReply)
    assert meter.relay_closed
    assert word3(meter) & 0x50 == 0x40  # commanded open, relay still closed
    assert read(meter, 0x1D000001) == [0]


def test_broadcast_time_sets_the_clock_without_reply(meter: Dlt645Meter) -> None:
    target = datetime.datetime(2026, 3, 14, 10, 7, 30)
    assert meter.handle(m.BroadcastTime(BROADCAST, target).to_frame(E7)) == []
    assert meter.meter_time() == target
    assert read(meter, 0x04000102) == ["10:07:30"]


def test_time_write_needs_the_password(meter: Dlt645Meter) -> None:
    value = CAT.encode(E7, 0x04000102, datetime.time(11, 22, 33))
    bad = ask(meter, m.WriteRequest(A, 0x04000102, m.Password(4, "999999"), "00000001", value))
    assert isinstance(bad, m.ErrorReply)
    assert bad.failed == 0x14
    assert "password_unauthorised" in bad.flags
    good = ask(meter, m.WriteRequest(A, 0x04000102, m.Password(4, "000000"), "00000001", value))
    assert isinstance(good, m.Ack)
    assert meter.meter_time() == datetime.datetime(2026, 3, 14, 11, 22, 33)
    date_value = CAT.encode(E7, 0x04000101, datetime.date(2026, 4, 1))
    assert isinstance(ask(meter, m.WriteRequest(A, 0x04000101, m.Password(4), "00000001", date_value)), m.Ack)
    assert meter.meter_time().date() == datetime.date(2026, 4, 1)


def test_clock_drifts_by_ppm(clock: SimClock) -> None:
    meter = Dlt645Meter(ADDR, E7, clock=clock, drift_ppm=100.0)
    clock.advance(100_000)
    assert meter.clock_offset == pytest.approx(10.0)
    meter.clock_offset = 0.0
    assert meter.meter_time() == clock.now()


def test_daily_freezes_across_simulated_midnights(meter: Dlt645Meter, clock: SimClock) -> None:
    clock.advance(3 * 86400)  # three midnights: 15th, 16th, 17th
    assert read(meter, 0x05060001) == ["2026-03-17T00:00:00"]
    assert read(meter, 0x05060003) == ["2026-03-15T00:00:00"]
    assert isinstance(ask(meter, m.ReadRequest(A, 0x05060004)), m.ErrorReply)
    latest, older = read(meter, 0x05060101), read(meter, 0x05060102)
    assert len(latest) == 5
    assert latest[0] > older[0]  # type: ignore[operator]
    current = read(meter, 0x00010000)[0]
    assert current > latest[0]  # type: ignore[operator]


def test_freezes_keep_62_days(clock: SimClock) -> None:
    meter = Dlt645Meter(ADDR, E7, clock=clock, energy_step=3600.0)  # coarse: 70 days to integrate
    clock.advance(70 * 86400)
    assert read(meter, 0x05060001) == ["2026-05-23T00:00:00"]
    assert len(meter.freezes) == 62
    assert read(meter, 0x0506003E) == [(datetime.datetime(2026, 3, 14) + datetime.timedelta(days=70 - 61)).isoformat()]


def test_dlt645_1997_read(clock: SimClock) -> None:
    meter = Dlt645Meter(ADDR, E97, clock=clock)
    frame = m.ReadRequest(A, 0x9010).to_frame(E97)
    raw = parse_frame(meter.handle(frame)[0])
    assert raw.control.byte == 0x81
    reply = m.parse_message(raw, E97)
    assert isinstance(reply, m.ReadReply)
    assert CAT.decode(E97, 0x9010, reply.value)[0].value == read(meter, 0x9010, E97)[0]
    error = parse_frame(meter.handle(m.ReadRequest(A, 0x1234).to_frame(E97))[0])
    assert error.control.byte == 0xC1
    # a 2007 frame means nothing to a 1997 meter
    assert meter.handle(Frame(A, m.ReadRequest(A, 0).control(E7), b"\x00\x00\x01\x00")) == []


def test_history_days_gives_freezes_from_the_start(clock: SimClock) -> None:
    meter = Dlt645Meter(ADDR, 2007, clock=clock, history_days=5, energy_step=3600.0)
    assert meter.edition is E7
    assert read(meter, 0x05060001) == ["2026-03-14T00:00:00"]
    assert read(meter, 0x05060005) == ["2026-03-10T00:00:00"]
    assert isinstance(ask(meter, m.ReadRequest(A, 0x05060006)), m.ErrorReply)


def test_reread_repeats_the_last_reply_1997(clock: SimClock) -> None:
    meter = Dlt645Meter(ADDR, E97, clock=clock)
    first = meter.handle(m.ReadRequest(A, 0x9010).to_frame(E97))
    assert meter.handle(m.RereadRequest(A).to_frame(E97)) == first


def test_maximum_demand_tracks_the_highest_power_read(meter: Dlt645Meter, clock: SimClock) -> None:
    powers = []
    for _ in range(6):
        powers.append(read(meter, 0x02800004)[0])
        clock.advance(2 * 3600)
    record = CAT.decode(E7, 0x01010000, meter.value_bytes(0x01010000))[0]
    assert record.value == pytest.approx(max(powers), abs=0.0001)  # type: ignore[type-var]
    assert record.timestamp is not None
    block = read(meter, 0x0101FF00)
    assert len(block) == 5


def test_maximum_demand_and_its_time_are_separate_items_in_1997(clock: SimClock) -> None:
    meter = Dlt645Meter(ADDR, E97, clock=clock, seed=7)
    seen = []
    for _ in range(3):
        clock.advance(3600)
        power = read(meter, 0xB630, E97)[0]  # instantaneous active power
        seen.append((power, f"{meter.meter_time():--%m-%dT%H:%M}"))
    highest, at = max(seen)
    [demand] = read(meter, 0xA010, E97)
    assert demand == pytest.approx(highest, abs=0.0001)
    assert read(meter, 0xB010, E97) == [at]  # MMDDhhmm
    assert len(read(meter, 0xB01F, E97)) == 5  # total and four tariffs
    assert isinstance(ask(meter, m.ReadRequest(A, 0xB01E), E97), m.ErrorReply)  # no 14th tariff


def test_follow_up_frames_1997(clock: SimClock) -> None:
    meter = Dlt645Meter(ADDR, E97, clock=clock)
    meter.max_data = 9  # a meter with a small buffer: 901F (5 x 4 bytes) in parts of 7 bytes
    whole = meter.value_bytes(0x901F)
    first = parse_frame(meter.handle(m.ReadRequest(A, 0x901F).to_frame(E97))[0])
    assert first.control.byte == 0xA1
    parts = [first.data[2:]]
    controls = []
    for _ in range(5):
        raw = parse_frame(meter.handle(m.ReadFollowUpRequest(A, 0x901F).to_frame(E97))[0])
        controls.append(raw.control.byte)
        reply = m.parse_message(raw, E97)
        assert isinstance(reply, m.ReadReply)
        assert reply.di == 0x901F
        parts.append(reply.value)
        if not reply.more:
            break
    assert controls == [0xA2, 0x82]
    assert b"".join(parts) == whole
    assert len(CAT.decode(E97, 0x901F, whole)) == 5

"""The CJ/T 188 reply exchange without a bus: bytes and a request in, what they are out; and
hypothesis round-trips of every frame the gateway sends."""

from __future__ import annotations

import datetime
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meter_gateway.protocols.cjt188 import messages as m
from meter_gateway.protocols.cjt188.errors import RemoteProtocolError
from meter_gateway.protocols.cjt188.exchange import Cjt188Exchange, Cjt188Line, Expect, as_message, status_reasons
from meter_gateway.protocols.cjt188.frame import WILDCARD, Address, parse_frame
from meter_gateway.protocols.cjt188.identifiers import DiOrder
from meter_gateway.protocols.cjt188.status import Status
from meter_gateway.protocols.exchange import Answer, Event, Refusal, Rejected, Rejection, Unusable

WATER, GAS = 0x10, 0x30
ADDRESS = Address.parse("00000000000161")
OTHER = Address.parse("00000000000162")
WHEN = datetime.datetime(2026, 3, 14, 10, 0, 0)
CURRENT = {"volume.total": 12.5, "volume.settlement": 3.25, "meter.time": WHEN, "status": Status()}


def exchange(
    request: m.ReadRequest | m.WriteRequest,
    *,
    line: Cjt188Line | None = None,
    order: DiOrder = "standard",
    decode: Callable[[m.Message], object] = as_message,
) -> Cjt188Exchange[object]:
    return Cjt188Exchange(line or Cjt188Line(), Expect.of(request, order), decode, order)


def read(ser: int = 7, address: Address = ADDRESS, meter_type: int = WATER) -> m.ReadRequest:
    return m.ReadRequest.current_data(meter_type, address, ser)


def reply(
    ser: int = 7, *, address: Address = ADDRESS, meter_type: int = WATER, order: DiOrder = "standard", preamble: int = 2
) -> bytes:
    return m.ReadReply.build(meter_type, address, m.DI_CURRENT_DATA, CURRENT, ser=ser).encode(order, preamble)


def kinds(events: list[Event[object]]) -> list[object]:
    return [e.kind if isinstance(e, Rejected) else type(e) for e in events]


def test_the_reply_to_the_request_is_the_answer() -> None:
    [event] = exchange(read()).receive(reply())
    assert isinstance(event, Answer)
    assert isinstance(event.reply, m.ReadReply)
    assert event.reply.values().by_quantity()["volume.total"] == 12.5


def test_a_swapped_di_order_meter_is_matched_in_its_own_order() -> None:
    swapped = reply(order="swapped")
    assert kinds(exchange(read(), order="swapped").receive(swapped)) == [Answer]
    # the same bytes name DI 1F90 to a standard-order request: not its answer
    assert kinds(exchange(read()).receive(swapped)) == [Rejection.WRONG_FUNCTION]


def test_decode_turns_the_answer_into_what_the_caller_wants_or_makes_it_unusable() -> None:
    def volume(message: m.Message) -> object:
        assert isinstance(message, m.ReadReply)
        value = message.values().by_quantity()["volume.total"]
        if value is None:
            raise RemoteProtocolError("901F volume.total: not BCD")
        return value

    assert exchange(read(), decode=volume).receive(reply()) == [Answer(12.5)]
    corrupt = bytearray(reply(preamble=0))
    corrupt[14] = 0xFF  # first volume byte: not BCD
    corrupt[-2] = sum(corrupt[:-2]) & 0xFF
    [event] = exchange(read(), decode=volume).receive(bytes(corrupt))
    assert event == Unusable("meter 10/00000000000161: reply 81: 901F volume.total: not BCD")


@settings(max_examples=200, deadline=None)
@given(
    noise=st.binary(max_size=12).filter(lambda b: 0x68 not in b and 0xFE not in b),
    preamble=st.integers(0, 4),
    cuts=st.lists(st.integers(0, 60), max_size=6),
)
def test_the_answer_is_found_however_the_bytes_are_cut(noise: bytes, preamble: int, cuts: list[int]) -> None:
    data = noise + reply(preamble=preamble)
    ex = exchange(read())
    ex.begin()
    events: list[Event[object]] = []
    start = 0
    for cut in [*sorted(c for c in cuts if c < len(data)), len(data)]:
        events += ex.receive(data[start:cut])
        start = max(start, cut)
    *rejected, verdict = events
    assert isinstance(verdict, Answer)
    assert all(isinstance(e, Rejected) and e.kind is Rejection.GARBAGE for e in rejected)
    assert sum(e.size for e in rejected if isinstance(e, Rejected)) == len(noise)


def test_our_own_request_heard_back_is_an_echo() -> None:
    request = read().encode(preamble=4)
    events = exchange(read()).receive(request + reply())
    assert kinds(events) == [Rejection.ECHO, Answer]
    assert events[0] == Rejected(Rejection.ECHO, 16, "request 01 to 10/00000000000161")


def test_another_meter_another_type_or_another_request_are_strangers() -> None:
    ex = exchange(read())
    other_di = m.ReadReply.build(WATER, ADDRESS, 0x8103, {"settlement.day": 1}, ser=7).encode()
    events = ex.receive(reply(address=OTHER) + reply(meter_type=GAS) + reply(ser=8) + other_di)
    assert events == [
        Rejected(Rejection.WRONG_ADDRESS, 35, "reply from 10/00000000000162, asked 10/00000000000161"),
        Rejected(Rejection.WRONG_ADDRESS, 35, "reply from 30/00000000000161, asked 10/00000000000161"),
        Rejected(Rejection.WRONG_FUNCTION, 35, "reply 81 for DI 901F SER 08, asked function 01 DI 901F SER 07"),
        Rejected(Rejection.WRONG_FUNCTION, 17, "reply 81 for DI 8103 SER 07, asked function 01 DI 901F SER 07"),
    ]


def test_a_reply_to_an_earlier_request_on_the_line_is_late_even_for_the_same_read() -> None:
    line = Cjt188Line()
    exchange(read(ser=6), line=line)  # the same read, asked before: its reply missed the deadline
    current = exchange(read(ser=7), line=line)
    assert kinds(current.receive(reply(ser=6) + reply(ser=7))) == [Rejection.LATE, Answer]
    # on a line that never asked for it, the same bytes are a stranger
    assert kinds(exchange(read(ser=7)).receive(reply(ser=6))) == [Rejection.WRONG_FUNCTION]


def test_the_line_numbers_requests_and_forgets_old_ones() -> None:
    line = Cjt188Line(history=2)
    assert [line.next_ser() for _ in range(3)] == [1, 2, 3]
    for _ in range(252):
        line.next_ser()
    assert line.next_ser() == 0  # modulo 256 (clause 7.1)
    exchange(read(ser=1), line=line)
    exchange(read(ser=2), line=line)
    current = exchange(read(ser=3), line=line)  # pushes ser 1 out
    assert kinds(current.receive(reply(ser=1))) == [Rejection.WRONG_FUNCTION]


@pytest.mark.parametrize("with_di", [False, True], ids=["SER-ST", "DI-SER-ST"])
def test_an_abnormal_reply_is_the_meters_refusal_with_st_decoded(with_di: bool) -> None:
    valve = m.WriteRequest.valve(WATER, ADDRESS, open_valve=False, ser=9)
    st = Status.build(valve="abnormal", battery_low=True)
    refused = m.ErrorReply(WATER, ADDRESS, 0x04, 9, st, m.DI_VALVE if with_di else None).encode()
    [event] = exchange(valve).receive(refused)
    assert event == Refusal(
        "meter 00000000000161 refused write-data: ST 0007 (valve abnormal, battery low)",
        0x0007,
        ("valve_abnormal", "battery_low"),
    )
    # another request's SER: not this request's refusal
    other = m.ErrorReply(WATER, ADDRESS, 0x04, 8, st).encode()
    assert kinds(exchange(valve).receive(other)) == [Rejection.WRONG_FUNCTION]


def test_status_reasons_name_what_st_says() -> None:
    assert status_reasons(Status()) == ("abnormal_reply",)
    assert status_reasons(Status.build(valve="closed")) == ("valve_closed",)
    assert status_reasons(Status(0x0100)) == ("vendor_bits_0100",)


def test_an_abnormal_reply_of_another_shape_is_not_taken_for_the_refusal() -> None:
    valve = m.WriteRequest.valve(WATER, ADDRESS, open_valve=True, ser=3)
    abnormal = m.Control(0x04, from_meter=True, abnormal=True)
    # SER ST (3 bytes) or DI SER ST (5) only: in 4 bytes its SER cannot be found
    odd = m.OtherMessage(WATER, ADDRESS, abnormal, b"\xa0\x17\x03\x00").encode()
    assert kinds(exchange(valve).receive(odd)) == [Rejection.WRONG_FUNCTION]
    short = m.OtherMessage(WATER, ADDRESS, abnormal, b"\x03\x00\x00").encode()
    assert kinds(exchange(valve).receive(short)) == [Refusal]


def test_garbage_is_reported_with_its_size_and_the_answer_still_found() -> None:
    corrupt = bytearray(reply(preamble=0))
    corrupt[-2] ^= 0xFF  # bad checksum
    events = exchange(read()).receive(b"\x01\x02\x03" + bytes(corrupt) + reply())
    assert kinds(events)[-1] is Answer
    garbage = [e for e in events if isinstance(e, Rejected)]
    assert {e.kind for e in garbage} == {Rejection.GARBAGE}
    assert sum(e.size for e in garbage) == 3 + len(corrupt)


def test_a_wildcard_request_accepts_the_meter_that_answers() -> None:
    discover = m.ReadRequest.meter_address(ser=5)
    answer = m.ReadReply(GAS, ADDRESS, m.DI_ADDRESS, 5).encode()
    [event] = exchange(discover).receive(answer)
    assert event == Answer(m.ReadReply(GAS, ADDRESS, m.DI_ADDRESS, 5))
    assert Expect.of(discover).meter_type == 0xAA
    assert Expect.of(discover).address == WILDCARD


def test_begin_drops_partial_input_and_nothing_after_the_verdict_is_taken() -> None:
    ex = exchange(read())
    whole = reply(preamble=0)
    assert ex.receive(whole[:10]) == []
    ex.begin()
    assert kinds(ex.receive(whole + reply(address=OTHER))) == [Answer]


# -- every frame the gateway sends, round-tripped ---------------------------------------------------

addresses = st.binary(min_size=7, max_size=7).map(
    lambda raw: Address(bytes(((b >> 4) % 10) << 4 | (b & 0x0F) % 10 for b in raw))
)
meter_types = st.sampled_from([0x10, 0x11, 0x20, 0x30])
orders = st.sampled_from(["standard", "swapped"])
sers = st.integers(0, 255)


def _round_trip(request: m.ReadRequest | m.WriteRequest, order: DiOrder, preamble: int) -> None:
    raw = request.encode(order, preamble)
    assert raw[:preamble] == b"\xfe" * preamble
    assert m.parse_message(parse_frame(raw), order) == request
    # and the exchange made for it takes its reply, however the bytes arrive
    ex = Cjt188Exchange(Cjt188Line(), Expect.of(request, order), as_message, order)
    if isinstance(request, m.ReadRequest):
        answer: m.Message = m.ReadReply(request.meter_type, request.address, request.di, request.ser)
    else:
        answer = m.WriteReply(request.meter_type, request.address, request.di, request.ser, Status().to_bytes())
    got = ex.receive(raw + answer.encode(order, 2))
    assert kinds(got) == [Rejection.ECHO, Answer]


@settings(max_examples=150, deadline=None)
@given(
    t=meter_types,
    a=addresses,
    ser=sers,
    order=orders,
    preamble=st.integers(0, 16),
    di=st.sampled_from([m.DI_CURRENT_DATA, 0x8103, *range(0xD120, 0xD12C)]),
)
def test_reads_round_trip(t: int, a: Address, ser: int, order: DiOrder, preamble: int, di: int) -> None:
    _round_trip(m.ReadRequest(t, a, di, ser), order, preamble)


@settings(max_examples=50, deadline=None)
@given(ser=sers, order=orders, preamble=st.integers(0, 16))
def test_the_discovery_read_round_trips(ser: int, order: DiOrder, preamble: int) -> None:
    _round_trip(m.ReadRequest.meter_address(ser), order, preamble)


@settings(max_examples=100, deadline=None)
@given(t=meter_types, a=addresses, ser=sers, order=orders, preamble=st.integers(0, 16), open_valve=st.booleans())
def test_valve_commands_round_trip(
    t: int, a: Address, ser: int, order: DiOrder, preamble: int, open_valve: bool
) -> None:
    request = m.WriteRequest.valve(t, a, open_valve, ser)
    _round_trip(request, order, preamble)
    assert request.values().by_quantity()["valve.command"] == ("open" if open_valve else "close")


@settings(max_examples=100, deadline=None)
@given(
    t=meter_types,
    a=addresses,
    ser=sers,
    order=orders,
    preamble=st.integers(0, 16),
    when=st.datetimes(datetime.datetime(2000, 1, 1), datetime.datetime(2099, 12, 31)).map(
        lambda d: d.replace(microsecond=0)
    ),
)
def test_time_writes_round_trip(
    t: int, a: Address, ser: int, order: DiOrder, preamble: int, when: datetime.datetime
) -> None:
    request = m.WriteRequest.standard_time(t, a, when, ser)
    _round_trip(request, order, preamble)
    assert request.values().by_quantity()["meter.time"] == when.isoformat()

"""The DL/T 645 reply exchange without a bus: bytes and a request in, what they are out."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meter_gateway.protocols.dlt645 import messages as m
from meter_gateway.protocols.dlt645.edition import Edition
from meter_gateway.protocols.dlt645.errors import RemoteProtocolError
from meter_gateway.protocols.dlt645.exchange import Dlt645Exchange, Dlt645Line, Expect, as_message
from meter_gateway.protocols.dlt645.frame import WILDCARD, Address, Control, Frame
from meter_gateway.protocols.exchange import Answer, Event, Refusal, Rejected, Rejection, Unusable

E7, E97 = Edition.DLT645_2007, Edition.DLT645_1997
ADDRESS = Address.parse("000000000161")
OTHER = Address.parse("000000000162")
ENERGY = {E7: 0x00010000, E97: 0x9010}
VOLTAGE = {E7: 0x02010100, E97: 0xB611}
VALUE = bytes.fromhex("26000000")  # 0.26 kWh, wire order


def read(edition: Edition, di: int, address: Address = ADDRESS) -> Expect:
    return Expect(address, m.ReadRequest.FUNCTIONS[edition], di)


def exchange(
    expect: Expect,
    edition: Edition = E7,
    *,
    line: Dlt645Line | None = None,
    decode: Callable[[m.Message], object] = as_message,
) -> Dlt645Exchange[object]:
    return Dlt645Exchange(line or Dlt645Line(), edition, expect, decode)


def reply(edition: Edition, di: int, value: bytes = VALUE, *, address: Address = ADDRESS, preamble: int = 4) -> bytes:
    return m.ReadReply(address, di, value).encode(edition, preamble=preamble)


def kinds(events: list[Event[object]]) -> list[object]:
    return [e.kind if isinstance(e, Rejected) else type(e) for e in events]


@pytest.mark.parametrize("edition", [E7, E97], ids=["2007", "1997"])
def test_the_reply_to_the_request_is_the_answer(edition: Edition) -> None:
    di = ENERGY[edition]
    events = exchange(read(edition, di), edition).receive(reply(edition, di))
    assert events == [Answer(m.ReadReply(ADDRESS, di, VALUE))]


def test_decode_turns_the_answer_into_what_the_caller_wants_or_makes_it_unusable() -> None:
    def value_of(message: m.Message) -> bytes:
        assert isinstance(message, m.ReadReply)
        if message.value.startswith(b"\xff"):
            raise RemoteProtocolError("DI 00010000: not BCD")
        return message.value

    expect = read(E7, ENERGY[E7])
    assert exchange(expect, decode=value_of).receive(reply(E7, ENERGY[E7])) == [Answer(VALUE)]
    bad = exchange(expect, decode=value_of).receive(reply(E7, ENERGY[E7], b"\xff\x00\x00\x00"))
    assert bad == [Unusable("meter 000000000161: reply 91: DI 00010000: not BCD")]


@settings(max_examples=300, deadline=None)
@given(
    edition=st.sampled_from([E7, E97]),
    noise=st.binary(max_size=12).filter(lambda b: 0x68 not in b and 0xFE not in b),  # no start, no wake-up
    preamble=st.integers(0, 4),
    cuts=st.lists(st.integers(0, 80), max_size=6),
)
def test_the_answer_is_found_however_the_bytes_are_cut(
    edition: Edition, noise: bytes, preamble: int, cuts: list[int]
) -> None:
    di = ENERGY[edition]
    data = noise + reply(edition, di, preamble=preamble)
    ex = exchange(read(edition, di), edition)
    ex.begin()
    events: list[Event[object]] = []
    start = 0
    for cut in [*sorted(c for c in cuts if c < len(data)), len(data)]:
        events += ex.receive(data[start:cut])
        start = max(start, cut)
    *rejected, verdict = events
    assert verdict == Answer(m.ReadReply(ADDRESS, di, VALUE))
    assert all(isinstance(e, Rejected) and e.kind is Rejection.GARBAGE for e in rejected)
    assert sum(e.size for e in rejected if isinstance(e, Rejected)) == len(noise)


def test_our_own_request_heard_back_is_an_echo() -> None:
    request = m.ReadRequest(ADDRESS, ENERGY[E7]).encode(E7)
    events = exchange(read(E7, ENERGY[E7])).receive(request + reply(E7, ENERGY[E7]))
    assert kinds(events) == [Rejection.ECHO, Answer]
    assert events[0] == Rejected(Rejection.ECHO, len(request), "request 11 to 000000000161")


def test_strangers_another_meter_or_another_data_item_are_told_apart() -> None:
    ex = exchange(read(E7, ENERGY[E7]))
    events = ex.receive(reply(E7, ENERGY[E7], address=OTHER) + reply(E7, VOLTAGE[E7], b"\x20\x22"))
    assert events == [
        Rejected(Rejection.WRONG_ADDRESS, 20, "reply from 000000000162, asked 000000000161"),
        Rejected(Rejection.WRONG_FUNCTION, 18, "reply 91 for DI 02010100, asked 00010000"),
    ]


def test_a_reply_to_an_earlier_request_on_the_line_is_late_not_a_stranger() -> None:
    line = Dlt645Line()
    exchange(read(E7, VOLTAGE[E7]), line=line)  # asked earlier; its reply missed the deadline
    current = exchange(read(E7, ENERGY[E7]), line=line)
    late = reply(E7, VOLTAGE[E7], b"\x20\x22")
    assert kinds(current.receive(late + reply(E7, ENERGY[E7]))) == [Rejection.LATE, Answer]
    # on a line that never asked for it, the same bytes are a stranger
    assert kinds(exchange(read(E7, ENERGY[E7])).receive(late)) == [Rejection.WRONG_FUNCTION]


def test_the_history_forgets_old_requests() -> None:
    line = Dlt645Line(history=2)
    exchange(read(E7, VOLTAGE[E7]), line=line)
    exchange(read(E7, 0x02010200), line=line)
    current = exchange(read(E7, ENERGY[E7]), line=line)  # pushes the voltage read out
    assert kinds(current.receive(reply(E7, VOLTAGE[E7], b"\x20\x22"))) == [Rejection.WRONG_FUNCTION]


def test_a_follow_up_reply_must_carry_the_asked_sequence_number() -> None:
    expect = Expect(ADDRESS, 0x12, 0x0001FF00, seq=2)
    ex = exchange(expect)

    def follow_up(seq: int) -> bytes:
        return m.ReadReply(ADDRESS, 0x0001FF00, b"\x01\x02\x03\x04", seq=seq).encode(E7)

    assert kinds(ex.receive(follow_up(1))) == [Rejection.WRONG_FUNCTION]
    assert ex.receive(follow_up(2)) == [Answer(m.ReadReply(ADDRESS, 0x0001FF00, b"\x01\x02\x03\x04", seq=2))]


def test_an_abnormal_reply_is_the_meters_refusal() -> None:
    refused = m.ErrorReply(ADDRESS, 0x11, 0x02).encode(E7)  # ERR bit 1: no requested data
    [event] = exchange(read(E7, ENERGY[E7])).receive(refused)
    assert isinstance(event, Refusal)
    assert (event.code, event.reasons) == (0x02, ("no_requested_data",))
    assert event.text == "meter 000000000161 refused read: no requested data (error 0x2)"


def test_a_reply_that_does_not_parse_is_unusable() -> None:
    short = Frame(ADDRESS, Control(0x13, from_meter=True), b"\x61\x01\x00\x00").encode()  # 4 of 6 bytes
    [event] = exchange(Expect(WILDCARD, 0x13)).receive(short)
    assert event == Unusable("meter 000000000161: reply 93: read address reply: data field is 4 bytes, expected 6")


def test_garbage_is_reported_with_its_size_and_the_answer_still_found() -> None:
    corrupt = bytearray(reply(E7, ENERGY[E7], preamble=0))
    corrupt[-2] ^= 0xFF  # bad checksum
    events = exchange(read(E7, ENERGY[E7])).receive(b"\x01\x02\x03" + bytes(corrupt) + reply(E7, ENERGY[E7]))
    assert kinds(events)[-1] is Answer
    garbage = [e for e in events if isinstance(e, Rejected)]
    assert {e.kind for e in garbage} == {Rejection.GARBAGE}
    assert sum(e.size for e in garbage) == 3 + len(corrupt)


def test_a_wildcard_request_accepts_the_meter_that_answers() -> None:
    ex = exchange(Expect(WILDCARD, 0x13))
    [event] = ex.receive(m.ReadAddressReply(ADDRESS, ADDRESS).encode(E7))
    assert event == Answer(m.ReadAddressReply(ADDRESS, ADDRESS))


def test_begin_drops_partial_input_of_the_previous_attempt() -> None:
    ex = exchange(read(E7, ENERGY[E7]))
    whole = reply(E7, ENERGY[E7], preamble=0)
    assert ex.receive(whole[:10]) == []
    ex.begin()
    assert ex.receive(whole) == [Answer(m.ReadReply(ADDRESS, ENERGY[E7], VALUE))]


def test_nothing_after_the_verdict_is_taken() -> None:
    ex = exchange(read(E7, ENERGY[E7]))
    events = ex.receive(reply(E7, ENERGY[E7]) + reply(E7, ENERGY[E7], address=OTHER))
    assert kinds(events) == [Answer]

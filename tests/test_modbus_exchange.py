"""The Modbus reply exchange without a bus: bytes and a request in, what they are out.

Frames are built here by hand (MBAP header, RTU CRC-16), independently of the framing under test;
the framing is the driver's (:class:`drivers.modbus.PymodbusFraming`, pymodbus' framers), used
with no link, no bus and no event loop. Every stream is fed whole, byte by byte and in random
chunks (hypothesis): what the exchange makes of it must not depend on how it arrived.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meter_gateway.drivers.modbus import PymodbusFraming
from meter_gateway.protocols.exchange import Answer, Event, Refusal, Rejected, Rejection, Unusable
from meter_gateway.protocols.modbus.exchange import (
    PDU,
    WRITE_COIL,
    WRITE_REGISTER,
    ModbusExchange,
    ModbusLine,
    bits_of,
    echo_of,
    registers_of,
)

UNIT = 7
REGISTERS = [0x1234, 0x0000, 0xFFFF, 0x00C8]


def crc16(data: bytes) -> bytes:
    """Modbus RTU CRC-16 (poly 0xA001, init 0xFFFF), low byte first."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc.to_bytes(2, "little")


def mbap(tid: int, unit: int, pdu: bytes) -> bytes:
    return struct.pack(">HHHB", tid, 0, len(pdu) + 1, unit) + pdu


def rtu(unit: int, pdu: bytes) -> bytes:
    body = bytes((unit,)) + pdu
    return body + crc16(body)


def registers_pdu(values: Sequence[int], function: int = 4) -> bytes:
    return bytes((function, 2 * len(values))) + struct.pack(f">{len(values)}H", *values)


class Rig:
    """One bus's line, the exception codes it counted, and its requests as the driver makes them."""

    def __init__(self, tcp: bool) -> None:
        self.framing = PymodbusFraming(tcp)
        self.exceptions: list[int] = []
        self.line = ModbusLine("bus-1", self.framing, on_exception=self.exceptions.append)

    def ask(
        self,
        pdu: bytes,
        value_of: Callable[[ModbusExchange[object], bytes], object],
        *,
        unit: int = UNIT,
        strict: bool = False,
    ) -> ModbusExchange[object]:
        tid = self.line.next_tid()
        request = self.framing.encode(pdu, unit, tid)
        return ModbusExchange(self.line, request, pdu, unit=unit, tid=tid, value_of=value_of, strict=strict)

    def read(self, address: int = 100, count: int = len(REGISTERS), *, unit: int = UNIT, strict: bool = False):
        return self.ask(PDU.pack(4, address, count), registers_of, unit=unit, strict=strict)  # type: ignore[arg-type]


def whole(exchange: ModbusExchange[object], data: bytes) -> list[Event[object]]:
    exchange.begin()
    return exchange.receive(data)


def in_chunks(exchange: ModbusExchange[object], data: bytes, cuts: Sequence[int]) -> list[Event[object]]:
    """Feed ``data`` cut at ``cuts``, stopping at the verdict as the engine does."""
    exchange.begin()
    events: list[Event[object]] = []
    edges = [0, *sorted(set(cuts)), len(data)]
    for start, end in itertools.pairwise(edges):
        if start == end:
            continue
        events.extend(exchange.receive(data[start:end]))
        if events and not isinstance(events[-1], Rejected):
            break
    return events


def byte_by_byte(exchange: ModbusExchange[object], data: bytes) -> list[Event[object]]:
    return in_chunks(exchange, data, range(1, len(data)))


def kinds(events: Sequence[Event[object]]) -> list[object]:
    return [e.kind if isinstance(e, Rejected) else type(e) for e in events]


def answer(events: Sequence[Event[object]]) -> object:
    assert events
    verdict = events[-1]
    assert isinstance(verdict, Answer), events
    return verdict.reply


# -- Modbus TCP -----------------------------------------------------------------------------------


def test_tcp_answer_whole_and_byte_by_byte() -> None:
    rig = Rig(tcp=True)
    ex = rig.read()
    reply = mbap(ex.tid, UNIT, registers_pdu(REGISTERS))
    assert answer(whole(ex, reply)) == REGISTERS
    assert answer(byte_by_byte(ex, reply)) == REGISTERS


def test_tcp_transaction_ids_count_up_and_wrap() -> None:
    rig = Rig(tcp=True)
    assert [rig.line.next_tid() for _ in range(3)] == [1, 2, 3]
    rig.line.tid = 0xFFFE
    assert [rig.line.next_tid() for _ in range(3)] == [0xFFFF, 1, 2]
    assert Rig(tcp=False).line.next_tid() == 0


def test_tcp_a_late_reply_then_a_stranger_then_the_answer() -> None:
    rig = Rig(tcp=True)
    earlier = rig.read()
    ex = rig.read()
    stream = (
        mbap(earlier.tid, UNIT, registers_pdu([1, 2, 3, 4]))  # missed its deadline: late
        + mbap(999, UNIT, registers_pdu([5, 6, 7, 8]))  # an id we never used: a stranger
        + mbap(ex.tid, UNIT, registers_pdu(REGISTERS))
    )
    for events in (whole(ex, stream), byte_by_byte(ex, stream)):
        assert kinds(events) == [Rejection.LATE, Rejection.WRONG_FUNCTION, Answer]
        assert answer(events) == REGISTERS
        late = events[0]
        assert isinstance(late, Rejected)
        assert late.size == len(mbap(1, UNIT, registers_pdu([1, 2, 3, 4])))


def test_tcp_the_right_id_from_another_unit_or_of_another_function() -> None:
    rig = Rig(tcp=True)
    ex = rig.read()
    assert kinds(whole(ex, mbap(ex.tid, UNIT + 1, registers_pdu(REGISTERS)))) == [Rejection.WRONG_ADDRESS]
    [event] = whole(ex, mbap(ex.tid, UNIT, registers_pdu(REGISTERS, function=3)))
    assert isinstance(event, Unusable)  # the answer (its id), and a wrong one
    assert "reply of function 3 to function 4" in event.text


def test_tcp_what_follows_the_verdict_is_left_for_the_next_attempt() -> None:
    rig = Rig(tcp=True)
    ex = rig.read()
    events = whole(ex, mbap(ex.tid, UNIT, registers_pdu(REGISTERS)) + mbap(ex.tid, UNIT + 1, b"\x84\x02"))
    assert kinds(events) == [Answer]


@pytest.mark.parametrize(
    ("code", "verdict", "reasons"),
    [
        (0x02, Refusal, ("illegal data address",)),
        (0x04, Refusal, ("server device failure",)),
        (0x06, Unusable, None),  # busy: asked again
        (0x0B, Unusable, None),  # the gateway cannot reach the meter: asked again, then silence
        (0x42, Refusal, ("exception 0x42",)),
    ],
)
def test_exception_replies(code: int, verdict: type, reasons: tuple[str, ...] | None) -> None:
    rig = Rig(tcp=True)
    ex = rig.read()
    [event] = whole(ex, mbap(ex.tid, UNIT, bytes((0x84, code))))
    assert isinstance(event, verdict)
    assert ex.exception == code
    assert rig.exceptions == [code]
    if isinstance(event, Refusal):
        assert event.code == code
        assert event.reasons == reasons
        assert "bus-1 unit 7: function 4 registers 100..103" in event.text
    ex.begin()
    assert ex.exception is None  # each attempt's own


def test_a_strict_probe_takes_a_refusal_as_unusable() -> None:
    rig = Rig(tcp=True)
    ex = rig.read(strict=True)
    [event] = whole(ex, mbap(ex.tid, UNIT, b"\x84\x02"))
    assert isinstance(event, Unusable)
    assert "refuses every read" in event.text


def test_replies_that_do_not_fit_the_request_are_unusable() -> None:
    rig = Rig(tcp=True)
    ex = rig.read()
    [short] = whole(ex, mbap(ex.tid, UNIT, registers_pdu(REGISTERS[:2])))
    assert isinstance(short, Unusable)
    assert "asked for 4 registers at 100, got 2" in short.text
    [lying] = whole(ex, mbap(ex.tid, UNIT, b"\x04\x09" + bytes(8)))  # byte count 9, 8 bytes follow
    assert isinstance(lying, Unusable)
    assert "undecodable" in lying.text


def test_bits_are_unpacked_low_bit_first() -> None:
    rig = Rig(tcp=True)
    ex = rig.ask(PDU.pack(2, 10, 10), bits_of)  # type: ignore[arg-type]
    bits = answer(whole(ex, mbap(ex.tid, UNIT, b"\x02\x02\x05\x02")))
    assert bits == [True, False, True, False, False, False, False, False, False, True]


# -- RTU ------------------------------------------------------------------------------------------


def test_rtu_echo_of_a_read_then_its_reply() -> None:
    rig = Rig(tcp=False)
    ex = rig.read()
    request = rtu(UNIT, PDU.pack(4, 100, len(REGISTERS)))
    stream = request + rtu(UNIT, registers_pdu(REGISTERS))
    for events in (whole(ex, stream), byte_by_byte(ex, stream)):
        assert kinds(events) == [Rejection.ECHO, Answer]
        assert answer(events) == REGISTERS


def test_rtu_noise_before_the_reply_is_garbage() -> None:
    rig = Rig(tcp=False)
    ex = rig.read(unit=0x63)
    events = whole(ex, b"\x00" + rtu(0x63, registers_pdu(REGISTERS)))
    assert kinds(events) == [Rejection.GARBAGE, Answer]
    garbage = events[0]
    assert isinstance(garbage, Rejected)
    assert garbage.size == 1
    assert garbage.detail == "before a frame"


def test_rtu_noise_that_looks_like_a_frame_start_costs_the_reply() -> None:
    """pymodbus' RTU framer takes the first offset whose next byte is a function code for a frame
    start; when that frame's CRC fails it discards the whole input. Noise arriving with the reply
    then loses the reply too: the attempt ends without an answer and the engine asks again."""
    rig = Rig(tcp=False)
    ex = rig.read()
    reply = rtu(UNIT, registers_pdu(REGISTERS))
    events = whole(ex, b"\x00" + reply)  # 00 07: unit 0, "function 7", whose CRC fails
    assert kinds(events) == [Rejection.GARBAGE]
    assert sum(e.size for e in events if isinstance(e, Rejected)) == 1 + len(reply)
    assert answer(ex.receive(reply)) == REGISTERS  # the next attempt's reply is taken


def test_rtu_late_replies_and_strangers_by_unit_and_function() -> None:
    rig = Rig(tcp=False)
    rig.read(unit=3)  # an earlier request to unit 3, given up on
    ex = rig.read()
    stream = (
        rtu(3, registers_pdu([1, 2, 3, 4]))  # unit 3's late reply
        + rtu(9, registers_pdu([1, 2, 3, 4]))  # unit 9: nobody asked it
        + rtu(UNIT, registers_pdu([1, 2], function=3))  # our unit, a function not asked lately
        + rtu(UNIT, registers_pdu(REGISTERS))
    )
    for events in (whole(ex, stream), byte_by_byte(ex, stream)):
        assert kinds(events) == [Rejection.LATE, Rejection.WRONG_ADDRESS, Rejection.WRONG_FUNCTION, Answer]


def test_rtu_a_write_is_answered_by_its_echo() -> None:
    rig = Rig(tcp=False)
    coil = rig.ask(PDU.pack(WRITE_COIL, 20, 0xFF00), echo_of)
    assert whole(coil, rtu(UNIT, PDU.pack(WRITE_COIL, 20, 0xFF00))) == [Answer(None)]
    register = rig.ask(PDU.pack(WRITE_REGISTER, 30, 500), echo_of)
    [event] = whole(register, rtu(UNIT, PDU.pack(WRITE_REGISTER, 30, 499)))
    assert isinstance(event, Unusable)
    assert "write register 30=500 echoed 30=499" in event.text


def test_rtu_noise_that_never_forms_a_frame_is_not_kept() -> None:
    rig = Rig(tcp=False)
    ex = rig.read()
    dropped = 0
    for _ in range(50):
        for event in ex.receive(bytes(range(1, 41))):
            assert isinstance(event, Rejected)
            dropped += event.size
    assert len(ex.buffer) <= 2 * (5 + 2 * len(REGISTERS)) + 8 + len(ex.echo)
    assert dropped + len(ex.buffer) == 50 * 40
    assert answer(ex.receive(rtu(UNIT, registers_pdu(REGISTERS)))) == REGISTERS


def test_begin_forgets_a_partial_reply() -> None:
    rig = Rig(tcp=True)
    ex = rig.read()
    reply = mbap(ex.tid, UNIT, registers_pdu(REGISTERS))
    assert ex.receive(reply[:5]) == []
    ex.begin()
    assert answer(ex.receive(reply)) == REGISTERS


# -- any chunking -----------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(tcp=st.booleans(), data=st.data())
def test_the_verdict_does_not_depend_on_how_the_bytes_arrive(tcp: bool, data: st.DataObject) -> None:
    rig = Rig(tcp)
    earlier = rig.read(unit=3)
    ex = rig.read()
    values = data.draw(st.lists(st.integers(0, 0xFFFF), min_size=len(REGISTERS), max_size=len(REGISTERS)))
    if tcp:
        parts = [mbap(earlier.tid, 3, registers_pdu([9] * 4)), mbap(ex.tid, UNIT, registers_pdu(values))]
    else:
        parts = [rtu(3, registers_pdu([9] * 4)), rtu(UNIT, registers_pdu(values))]
    stream = b"".join(parts)
    cuts = data.draw(st.lists(st.integers(1, len(stream) - 1), max_size=12))
    events = in_chunks(ex, stream, cuts)
    assert kinds(events) == [Rejection.LATE, Answer]
    assert answer(events) == values
    assert events == whole(ex, stream)

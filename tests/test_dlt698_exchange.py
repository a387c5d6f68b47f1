"""The DL/T 698.45 reply exchange without a bus: a request and bytes in, what they are out."""

from __future__ import annotations

import datetime

import pytest

from meter_gateway.protocols.dlt698 import apdu as ap
from meter_gateway.protocols.dlt698 import requests as rq
from meter_gateway.protocols.dlt698.axdr import OAD, OMD, RCSD, Data, DataType, DateTime
from meter_gateway.protocols.dlt698.errors import RemoteProtocolError
from meter_gateway.protocols.dlt698.exchange import Dlt698Exchange, Dlt698Line, Expect, Reply, as_reply
from meter_gateway.protocols.dlt698.frame import FUNCTION_LINK, Control, Frame, ServerAddress
from meter_gateway.protocols.exchange import Answer, Event, Refusal, Rejected, Rejection, Unusable

A1 = ServerAddress.parse("000000000001")
A2 = ServerAddress.parse("000000000002")
ENERGY = OAD(0x0010, 2, 0)
VOLTAGE = OAD(0x2000, 2, 0)
RESPONSE = Control(3, from_server=True, prm=True)
REPORT = Control(3, from_server=True, prm=False)


def respond(apdu: ap.Apdu, address: ServerAddress = A1, *, preamble: int = 4) -> bytes:
    return Frame(RESPONSE, address, 0, apdu.encode()).encode(preamble)


def energy(piid: int, value: int = 12345) -> ap.GetResponseNormal:
    return ap.GetResponseNormal(
        piid=ap.Piid(piid), result=ap.ResultNormal(ENERGY, Data(DataType.DOUBLE_LONG_UNSIGNED, value))
    )


def start(request: Frame, line: Dlt698Line | None = None) -> Dlt698Exchange[Reply]:
    exchange = Dlt698Exchange(line or Dlt698Line(), Expect.of(request), as_reply)
    exchange.begin()
    return exchange


def kinds(events: list[Event[Reply]]) -> list[object]:
    return [e.kind if isinstance(e, Rejected) else type(e) for e in events]


def test_the_response_with_the_requests_service_and_piid_is_the_answer() -> None:
    events = start(rq.get(A1, [ENERGY], piid=7)).receive(respond(energy(7)))
    assert kinds(events) == [Answer]
    (answer,) = events
    assert isinstance(answer, Answer)
    assert answer.reply.apdu == energy(7)
    assert answer.reply.address == A1


def test_bytes_arriving_in_pieces_make_one_answer() -> None:
    exchange = start(rq.get(A1, [ENERGY], piid=7))
    data = respond(energy(7))
    assert exchange.receive(data[:9]) == []
    assert kinds(exchange.receive(data[9:])) == [Answer]


def test_echo_stranger_other_service_and_garbage_are_rejected_before_the_answer() -> None:
    request = rq.get(A1, [ENERGY], piid=9)
    other_service = ap.SetResponseNormal(piid=ap.Piid(9), oad=ENERGY, dar=0)
    noise = b"\x01\x02\x03"
    data = request.encode(4) + respond(energy(9), A2) + respond(other_service) + noise + respond(energy(9))
    events = start(request).receive(data)
    assert kinds(events) == [
        Rejection.ECHO,
        Rejection.WRONG_ADDRESS,
        Rejection.WRONG_FUNCTION,
        Rejection.GARBAGE,
        Answer,
    ]


def test_a_response_to_an_earlier_request_on_the_bus_is_late_not_a_mismatch() -> None:
    line = Dlt698Line()
    start(rq.get(A1, [ENERGY], piid=line.next_piid()), line)  # timed out
    current = rq.get(A1, [ENERGY], piid=line.next_piid())
    events = start(current, line).receive(respond(energy(1)) + respond(energy(2)))
    assert kinds(events) == [Rejection.LATE, Answer]


def test_the_line_hands_out_piids_1_to_63_in_turn() -> None:
    line = Dlt698Line()
    seen = [line.next_piid() for _ in range(64)]
    assert seen[:3] == [1, 2, 3]
    assert seen[62] == 63
    assert seen[63] == 1
    assert 0 not in seen


def test_a_wildcard_request_accepts_the_meter_that_answers_it() -> None:
    request = rq.get(ServerAddress.wildcard(6), [OAD(0x4001, 2, 0)], piid=3)
    reply = ap.GetResponseNormal(
        piid=ap.Piid(3),
        result=ap.ResultNormal(OAD(0x4001, 2, 0), Data(DataType.OCTET_STRING, bytes.fromhex("000000000002"))),
    )
    (answer,) = start(request).receive(respond(reply, A2))
    assert isinstance(answer, Answer)
    assert answer.reply.address == A2


@pytest.mark.parametrize(
    ("request_frame", "response", "code"),
    [
        (
            rq.set_clock(A1, datetime.datetime(2026, 3, 14), piid=4),
            ap.SetResponseNormal(piid=ap.Piid(4), oad=OAD(0x4000, 2, 0), dar=3),
            3,
        ),
        (
            rq.keep_power(A1, True, piid=5),
            ap.ActionResponseNormal(piid=ap.Piid(5), result=ap.ActionResult(OMD(0x8001, 127), 20)),
            20,
        ),
        (
            rq.get_record(
                A1,
                OAD(0x5004, 2, 0),
                rq.freezes_between(datetime.datetime(2026, 3, 1), datetime.datetime(2026, 3, 2)),
                [ENERGY],
                piid=6,
            ),
            ap.GetResponseRecord(piid=ap.Piid(6), result=ap.ResultRecord(OAD(0x5004, 2, 0), RCSD((ENERGY,)), dar=6)),
            6,
        ),
    ],
    ids=["set", "action", "record"],
)
def test_a_dar_other_than_success_is_a_refusal(request_frame: Frame, response: ap.Apdu, code: int) -> None:
    (refusal,) = start(request_frame).receive(respond(response))
    assert isinstance(refusal, Refusal)
    assert refusal.code == code
    assert refusal.reasons


def test_per_oad_dars_of_a_get_list_are_an_answer_for_the_caller() -> None:
    request = rq.get(A1, [ENERGY, VOLTAGE], piid=8)
    response = ap.GetResponseNormalList(
        piid=ap.Piid(8), results=(ap.ResultNormal(ENERGY, dar=3), ap.ResultNormal(VOLTAGE, dar=6))
    )
    (answer,) = start(request).receive(respond(response))
    assert isinstance(answer, Answer)
    assert rq.failures(answer.reply.apdu) == [(ENERGY, 3), (VOLTAGE, 6)]


def test_error_response_and_refused_association_are_refusals() -> None:
    (error,) = start(rq.get(A1, [ENERGY], piid=2)).receive(respond(ap.ErrorResponse(piid=ap.Piid(2), error=2)))
    assert isinstance(error, Refusal)
    assert "service not supported" in error.text
    connect = rq.connect(A1, piid=3)
    refused = ap.ConnectResponse(
        piid=ap.Piid(3),
        factory=ap.FactoryVersion("MGSM", "0001", "260314", "0001", "260314", "SIMULATE"),
        version=0x16,
        protocol_conformance=b"\xff" * 8,
        function_conformance=b"\xff" * 16,
        send_max=512,
        receive_max=512,
        window=1,
        apdu_max=512,
        timeout=7200,
        result=1,
    )
    (refusal,) = start(connect).receive(respond(refused))
    assert isinstance(refusal, Refusal)
    assert refusal.code == 1
    assert "password" in refusal.text


def test_a_secured_request_is_answered_by_a_security_response_whose_mac_is_kept() -> None:
    request = rq.secured(rq.get(A1, [ENERGY], piid=11), b"\x11" * 16)
    inner = energy(11).encode()
    secured = ap.SecurityResponse(data=inner, mac=b"\xaa\xbb\xcc\xdd")
    plain_reply = energy(11)  # the same content without SECURITY does not answer a secured request
    events = start(request).receive(respond(plain_reply) + respond(secured))
    assert kinds(events) == [Rejection.WRONG_FUNCTION, Answer]
    answer = events[-1]
    assert isinstance(answer, Answer)
    assert answer.reply.mac == b"\xaa\xbb\xcc\xdd"
    assert answer.reply.apdu == energy(11)


def test_a_ciphertext_request_is_answered_by_any_security_response_of_its_meter() -> None:
    opaque = ap.SecurityRequest(
        data=b"\x01\x02\x03\x04", encrypted=True, verification=ap.Verification(0, sid=1, mac=b"\x00" * 4)
    )
    request = rq.request_frame(A1, opaque)
    refused = ap.SecurityResponse(dar=23)
    (refusal,) = start(request).receive(respond(refused))
    assert isinstance(refusal, Refusal)
    assert refusal.code == 23
    cipher = ap.SecurityResponse(data=b"\x99" * 8, encrypted=True, mac=b"\x01\x02\x03\x04")
    events = start(request).receive(respond(cipher, A2) + respond(cipher))
    assert kinds(events) == [Rejection.WRONG_ADDRESS, Answer]


def test_reports_and_link_requests_are_events_that_do_not_end_the_exchange() -> None:
    line = Dlt698Line()
    request = rq.get(A1, [ENERGY], piid=line.next_piid())
    report = ap.ReportNotificationList(
        piid=ap.Piid(5), results=(ap.ResultNormal(OAD(0x2014, 2, 0), Data(DataType.NULL, None)),)
    )
    login = ap.LinkRequest(piid=ap.Piid(1), kind=1, heartbeat=60, time=DateTime(2026, 3, 14, 6, 10, 0, 0, 0))
    with_follow = ap.GetResponseNormal(
        piid=ap.Piid(1),
        result=energy(1).result,
        follow_report=ap.FollowReport((ap.ResultNormal(OAD(0x2014, 2, 0), Data(DataType.NULL, None)),)),
    )
    data = (
        Frame(REPORT, A2, 0, report.encode()).encode(4)
        + Frame(Control(FUNCTION_LINK, from_server=True, prm=False), A1, 0, login.encode()).encode()
        + respond(with_follow)
        + Frame(REPORT, A1, 0, report.encode()).encode()  # behind the verdict, in the same bytes
    )
    events = start(request, line).receive(data)
    assert kinds(events) == [Answer]
    taken = line.take_events()
    assert [(e.kind, str(e.address)) for e in taken] == [
        ("report", "000000000002"),
        ("link", "000000000001"),
        ("follow_report", "000000000001"),
        ("report", "000000000001"),
    ]
    assert line.take_events() == []


def test_an_unparsable_response_of_the_meter_is_unusable_and_decode_errors_too() -> None:
    request = rq.get(A1, [ENERGY], piid=4)
    (bad,) = start(request).receive(Frame(RESPONSE, A1, 0, b"\x85\x01").encode())
    assert isinstance(bad, Unusable)

    def refuse(reply: Reply) -> Reply:
        raise RemoteProtocolError("value does not decode")

    exchange = Dlt698Exchange(Dlt698Line(), Expect.of(request), refuse)
    exchange.begin()
    (unusable,) = exchange.receive(respond(energy(4)))
    assert isinstance(unusable, Unusable)
    assert "does not decode" in unusable.text


def test_a_fragment_frame_from_the_meter_is_unusable() -> None:
    request = rq.get(A1, [ENERGY], piid=4)
    fragment = Frame(Control(3, from_server=True, prm=True, fragment=True), A1, 0, b"\x00\x00" + b"\x85\x01\x04")
    (event,) = start(request).receive(fragment.encode())
    assert isinstance(event, Unusable)
    assert "fragment" in event.text


def test_begin_drops_partial_input_of_the_previous_attempt() -> None:
    exchange = start(rq.get(A1, [ENERGY], piid=7))
    exchange.receive(respond(energy(7))[:10])
    exchange.begin()
    assert kinds(exchange.receive(respond(energy(7)))) == [Answer]

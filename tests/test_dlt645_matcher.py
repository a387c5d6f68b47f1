"""The DL/T 645 reply matcher's shortcut for a whole plain read reply in one chunk gives the same
answers as the deframer path, for the frame it expects and for anything near it."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meter_gateway.drivers.bus import Rejected
from meter_gateway.drivers.dlt645_matcher import Dlt645Matcher, Expect
from meter_gateway.drivers.errors import DriverError
from meter_gateway.protocols.dlt645 import messages as m
from meter_gateway.protocols.dlt645.deframer import Deframer
from meter_gateway.protocols.dlt645.edition import Edition
from meter_gateway.protocols.dlt645.frame import Address

E7, E97 = Edition.DLT645_2007, Edition.DLT645_1997
ADDRESS = Address.parse("000000000161")
OTHER = Address.parse("000000000162")


def _outcome(matcher: Dlt645Matcher, data: bytes) -> tuple[object, list[Rejected], int, int]:
    try:
        result: object = matcher.feed(data)
    except DriverError as exc:
        result = (type(exc), str(exc))
    deframer = matcher._deframer
    return result, matcher.take_rejections(), deframer.buffered, deframer.preamble_bytes


def _matchers(edition: Edition, di: int, *, checked: bool = False) -> tuple[Dlt645Matcher, Dlt645Matcher]:
    def check(message: m.Message) -> None:
        if isinstance(message, m.ReadReply) and message.value.startswith(b"\xff"):
            raise DriverError("check refused it")  # stands in for a value that does not decode

    expect = Expect(ADDRESS, m.ReadRequest.FUNCTIONS[edition], di)
    fast = Dlt645Matcher(edition, expect, check=check if checked else None)
    slow = Dlt645Matcher(edition, expect, check=check if checked else None)
    slow._plain_read = False  # the deframer path only
    return fast, slow


def _reply(edition: Edition, address: Address, di: int, value: bytes, preamble: int) -> bytes:
    return m.ReadReply(address, di, value).encode(edition, preamble=preamble)


@st.composite
def near_replies(draw: st.DrawFn) -> tuple[Edition, int, bytes]:
    """A plain read reply to the expected read, or one changed a little: another meter, DI,
    function, a byte flipped, cut short, more bytes after it, noise before it."""
    edition = draw(st.sampled_from([E7, E97]))
    dis = [0x00010000, 0x0001FF00, 0x02010100] if edition is E7 else [0x9010, 0x901F]
    di = draw(st.sampled_from(dis))
    value = draw(st.binary(max_size=40))
    address = draw(st.sampled_from([ADDRESS, ADDRESS, OTHER]))
    asked_di = draw(st.sampled_from([di, di, di ^ 0x10]))
    frame = bytearray(_reply(edition, address, asked_di, value, draw(st.integers(0, 4))))
    change = draw(st.sampled_from(["none", "flip", "cut", "extend", "noise", "function", "abnormal"]))
    if change == "flip":
        frame[draw(st.integers(0, len(frame) - 1))] ^= draw(st.integers(1, 255))
    elif change == "cut":
        del frame[draw(st.integers(0, len(frame) - 1)) :]
    elif change == "extend":
        frame += draw(st.binary(min_size=1, max_size=30))
    elif change == "noise":
        frame[:0] = draw(st.binary(min_size=1, max_size=8))
    elif change in ("function", "abnormal"):
        start = frame.index(0x68)
        frame[start + 8] ^= 0x40 if change == "abnormal" else 0x02  # D6 set / another function
        frame[-2] = sum(frame[start:-2]) & 0xFF
    return edition, di, bytes(frame)


@settings(max_examples=600, deadline=None)
@given(near_replies(), st.booleans())
def test_the_whole_reply_shortcut_answers_as_the_deframer_path(case: tuple[Edition, int, bytes], checked: bool) -> None:
    edition, di, data = case
    fast, slow = _matchers(edition, di, checked=checked)
    assert _outcome(fast, data) == _outcome(slow, data)


@pytest.mark.parametrize(("edition", "di"), [(E7, 0x00010000), (E7, 0x0001FF00), (E97, 0x9010)])
@pytest.mark.parametrize("preamble", [0, 4])
def test_the_expected_whole_reply_takes_the_shortcut(edition: Edition, di: int, preamble: int) -> None:
    class NoDeframing(Deframer):
        def feed(self, data: bytes | bytearray | memoryview) -> list:  # type: ignore[type-arg]
            raise AssertionError("the whole expected reply should not need the deframer")

    fast, slow = _matchers(edition, di)
    fast._deframer = NoDeframing(max_data_length=255)
    data = _reply(edition, ADDRESS, di, bytes(range(1, 9)), preamble)
    reply = fast.feed(data)
    assert reply == slow.feed(data) == m.ReadReply(ADDRESS, di, bytes(range(1, 9)))
    assert fast._deframer.preamble_bytes == slow._deframer.preamble_bytes == preamble


def test_a_follow_up_flagged_reply_and_a_follow_up_request_leave_the_shortcut_alone() -> None:
    fast, slow = _matchers(E7, 0x0001FF00)
    more = m.ReadReply(ADDRESS, 0x0001FF00, b"\x01\x02\x03\x04", more=True).encode(E7)
    assert _outcome(fast, more) == _outcome(slow, more)
    follow = Dlt645Matcher(E7, Expect(ADDRESS, 0x12, 0x0001FF00, seq=1))
    assert not follow._plain_read

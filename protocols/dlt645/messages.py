"""Application messages of both editions: builders (message -> frame) and parsers (frame -> message).

Clauses: DL/T 645-2007 clause 6 ("应用层"; 6.1 broadcast time .. 6.13 remote control ...) and
DL/T 645-1997 clause 5. Every message knows its function code per edition; the edition is always
passed in by the caller (a per-meter property), never guessed here.

Requests and replies share one family of dataclasses. ``parse_message`` raises only
:class:`~protocols.dlt645.errors.ProtocolError`: the peer's bad payloads as
:class:`RemoteProtocolError`; a message that cannot be built (a 2007-only function asked of a 1997
meter, a value out of range) as :class:`LocalProtocolError`.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, TypeAlias

from meter_gateway.protocols.dlt645.edition import Edition
from meter_gateway.protocols.dlt645.error_words import error_flags, remote_control_flags
from meter_gateway.protocols.dlt645.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from meter_gateway.protocols.dlt645.formats import decode_field, encode_field
from meter_gateway.protocols.dlt645.frame import (
    BROADCAST,
    WILDCARD,
    Address,
    Control,
    Frame,
    encode_frame,
)
from meter_gateway.protocols.dlt645.remote_control import RemoteCommand

E7 = Edition.DLT645_2007
E97 = Edition.DLT645_1997


# --- small field codecs ---------------------------------------------------------------------------


def _di_bytes(edition: Edition, di: int) -> bytes:
    if not 0 <= di < 1 << (8 * edition.di_length):
        raise LocalProtocolError(f"data identifier {di:X} does not fit DL/T 645-{edition.value}")
    return di.to_bytes(edition.di_length, "little")


def _di_from(edition: Edition, data: bytes) -> int:
    n = edition.di_length
    if len(data) < n:
        raise RemoteProtocolError(f"data field of {len(data)} bytes is too short for a {n}-byte identifier")
    return int.from_bytes(data[:n], "little")


def _hex_digits(raw: bytes) -> str:
    return raw[::-1].hex().upper()


def _digits_bytes(text: str, length: int, what: str) -> bytes:
    if len(text) != 2 * length:
        raise LocalProtocolError(f"{what} must be {2 * length} hex digits, got {text!r}")
    try:
        return bytes.fromhex(text)[::-1]
    except ValueError:
        raise LocalProtocolError(f"{what} must be hex digits, got {text!r}") from None


@dataclass(frozen=True, slots=True)
class Password:
    """A password with its level: wire ``PA P0 P1 P2`` (level first, then 3 bytes, low first)."""

    level: int
    digits: str = "000000"  # printed order, most significant first

    def __post_init__(self) -> None:
        if not 0 <= self.level <= 0xFF:
            raise LocalProtocolError(f"password level {self.level} out of range")
        _digits_bytes(self.digits, 3, "a password")

    def encode(self) -> bytes:
        return bytes((self.level,)) + _digits_bytes(self.digits, 3, "a password")

    @classmethod
    def decode(cls, raw: bytes) -> Password:
        return cls(raw[0], _hex_digits(raw[1:4]))

    def __repr__(self) -> str:  # passwords never end up in logs by accident
        return f"Password(level={self.level}, digits='******')"


def _operator_bytes(operator: str) -> bytes:
    return _digits_bytes(operator, 4, "an operator code")


def _timestamp(raw: bytes, what: str) -> datetime.datetime:
    value = decode_field("YYMMDDhhmmss", raw)
    if not isinstance(value, datetime.datetime):
        raise RemoteProtocolError(f"{what} is all zero")
    return value


def _timestamp_bytes(value: datetime.datetime) -> bytes:
    return encode_field("YYMMDDhhmmss", value)


def _need(data: bytes, length: int, what: str, *, exact: bool = True) -> None:
    if (len(data) != length) if exact else (len(data) < length):
        expect = f"{length}" if exact else f"at least {length}"
        raise RemoteProtocolError(f"{what}: data field is {len(data)} bytes, expected {expect}")


# --- the message family ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Message:
    """Common base: each message knows its function per edition and its data layout."""

    address: Address

    FUNCTIONS: ClassVar[dict[Edition, int]] = {}
    FROM_METER: ClassVar[bool] = False

    def payload(self, edition: Edition) -> bytes:
        return b""

    def function(self, edition: Edition) -> int:
        try:
            return self.FUNCTIONS[edition]
        except KeyError:
            raise LocalProtocolError(f"{type(self).__name__} does not exist in DL/T 645-{edition.value}") from None

    def control(self, edition: Edition) -> Control:
        return Control.from_byte(self.function(edition) | (0x80 if self.FROM_METER else 0))

    def to_frame(self, edition: Edition) -> Frame:
        return Frame(self.address, self.control(edition), self.payload(edition))

    def encode(self, edition: Edition, preamble: int = 0) -> bytes:
        """The message's frame bytes (see :func:`~protocols.dlt645.frame.encode_frame`)."""
        return encode_frame(self.address, self.control(edition).byte, self.payload(edition), preamble)


# Requests (master -> meter)


@dataclass(frozen=True, slots=True)
class BroadcastTime(_Message):
    """0x08 in both editions: ``ss mm hh DD MM YY``; broadcast, no reply (2007 6.1, 1997 5.5)."""

    when: datetime.datetime = datetime.datetime(2000, 1, 1)
    FUNCTIONS: ClassVar[dict[Edition, int]] = {E7: 0x08, E97: 0x08}

    def payload(self, edition: Edition) -> bytes:
        return _timestamp_bytes(self.when)

    @classmethod
    def parse(cls, frame: Frame, edition: Edition) -> BroadcastTime:
        _need(frame.data, 6, "broadcast time")
        return cls(frame.address, _timestamp(frame.data, "broadcast time"))


@dataclass(frozen=True, slots=True)
class ReadRequest(_Message):
    """2007 0x11 ``DI [N [mm hh DD MM YY]]`` (6.2); 1997 0x01 ``DI`` (5.1)."""

    di: int = 0
    count: int | None = None  # 2007 only: number of load-profile blocks
    since: datetime.datetime | None = None  # 2007 only: load-profile start (minute resolution)
    FUNCTIONS: ClassVar[dict[Edition, int]] = {E7: 0x11, E97: 0x01}

    def payload(self, edition: Edition) -> bytes:
        out = _di_bytes(edition, self.di)
        if self.count is not None or self.since is not None:
            if edition is not E7:
                raise LocalProtocolError("block counts and start times exist only in DL/T 645-2007")
            count = 1 if self.count is None else self.count
            if not 0 <= count <= 0xFF:
                raise LocalProtocolError(f"block count {count} out of range")
            out += bytes((count,))
            if self.since is not None:
                out += encode_field("YYMMDDhhmm", self.since)
        return out

    @classmethod
    def parse(cls, frame: Frame, edition: Edition) -> ReadRequest:
        data = frame.data
        n = edition.di_length
        if len(data) not in ((n, n + 1, n + 6) if edition is E7 else (n,)):
            raise RemoteProtocolError(f"read request: data field of {len(data)} bytes")
        since = None
        if len(data) == n + 6:
            value = decode_field("YYMMDDhhmm", data[n + 1 :])
            since = value if isinstance(value, datetime.datetime) else None
        return cls(frame.address, _di_from(edition, data), data[n] if len(data) > n else None, since)


@dataclass(frozen=True, slots=True)
class ReadFollowUpRequest(_Message):
    """2007 0x12 ``DI SEQ`` (6.3); 1997 0x02 ``DI`` (5.2)."""

    di: int = 0
    seq: int = 1
    FUNCTIONS: ClassVar[dict[Edition, int]] = {E7: 0x12, E97: 0x02}

    def payload(self, edition: Edition) -> bytes:
        if not 0 <= self.seq <= 0xFF:
            raise LocalProtocolError(f"follow-up sequence {self.seq} out of range")
        return _di_bytes(edition, self.di) + (bytes((self.seq,)) if edition is E7 else b"")

    @classmethod
    def parse(cls, frame: Frame, edition: Edition) -> ReadFollowUpRequest:
        n = edition.di_length
        _need(frame.data, n + 1 if edition is E7 else n, "read follow-up request")
        return cls(frame.address, _di_from(edition, frame.data), frame.data[n] if edition is E7 else 0)


@dataclass(frozen=True, slots=True)
class RereadRequest(_Message):
    """1997 0x03: repeat the last reply (5.3)."""

    FUNCTIONS: ClassVar[dict[Edition, int]] = {E97: 0x03}

    @classmethod
    def parse(cls, frame: Frame, edition: Edition) -> RereadRequest:
        _need(frame.data, 0, "reread request")
        return cls(frame.address)


@dataclass(frozen=True, slots=True)
class ReadAddressRequest(_Message):
    """2007 0x13 to AAAAAAAAAAAA, no data (6.4): only valid on a single-meter link."""

    address: Address = WILDCARD
    FUNCTIONS: ClassVar[dict[Edition, int]] = {E7: 0x13}

    @classmethod
    def parse(cls, frame: Frame, edition: Edition) -> ReadAddressRequest:
        _need(frame.data, 0, "read address request")
        return cls(frame.address)


@dataclass(frozen=True, slots=True)
class WriteRequest(_Message):
    """2007 0x14 ``DI PA P0..P2 C0..C3 data`` (6.5); 1997 0x04 ``DI PA P0..P2 data`` (5.4)."""

    di: int = 0
    password: Password = Password(0)
    operator: str = "00000000"  # 2007 only
    value: bytes = b""  # already encoded for the identifier (see catalogue.encode)
    FUNCTIONS: ClassVar[dict[Edition, int]] = {E7: 0x14, E97: 0x04}

    def payload(self, edition: Edition) -> bytes:
        operator = _operator_bytes(self.operator) if edition is E7 else b""
        return _di_bytes(edition, self.di) + self.password.encode() + operator + self.value

    @classmethod
    def parse(cls, frame: Frame, edition: Edition) -> WriteRequest:
        n = edition.di_length
        head = n + 4 + (4 if edition is E7 else 0)
        _need(frame.data, head, "write request", exact=False)
        data = frame.data
        operator = _hex_digits(data[n + 4 : n + 8]) if edition is E7 else "00000000"
        return cls(frame.address, _di_from(edition, data), Password.decode(data[n : n + 4]), operator, data[head:])


@dataclass(frozen=True, slots=True)
class WriteAddressRequest(_Message):
    """2007 0x15 / 1997 0x0A to the wildcard address with the new address as data (6.6, 5.6)."""

    address: Address = WILDCARD
    new_address: Address = WILDCARD
    FUNCTIONS: ClassVar[dict[Edition, int]] = {E7: 0x15, E97: 0x0A}

    def payload(self, edition: Edition) -> bytes:
        return self.new_address.wire

    @classmethod
    def parse(cls, frame: Frame, edition: Edition) -> WriteAddressRequest:
        _need(frame.data, 6, "write address request")
        return cls(frame.address, Address(frame.data))


@dataclass(frozen=True, slots=True)
class FreezeRequest(_Message):
    """2007 0x16 ``mm hh DD MM`` (6.7); 99 in a field is its wildcard (``99 99 99 99`` = now)."""

    minute: int = 99
    hour: int = 99
    day: int = 99
    month: int = 99
    FUNCTIONS: ClassVar[dict[Edition, int]] = {E7: 0x16}

    def payload(self, edition: Edition) -> bytes:
        fields = (self.minute, self.hour, self.day, self.month)
        if any(not 0 <= f <= 99 for f in fields):
            raise LocalProtocolError(f"freeze time fields must be 0..99, got {fields}")
        return bytes((f // 10) << 4 | f % 10 for f in fields)

    @classmethod
    def parse(cls, frame: Frame, edition: Edition) -> FreezeRequest:
        _need(frame.data, 4, "freeze request")
        values = []
        for byte in frame.data:
            if byte >> 4 > 9 or byte & 0xF > 9:
                raise RemoteProtocolError(f"freeze time byte {byte:02X} is not BCD")
            values.append((byte >> 4) * 10 + (byte & 0xF))
        return cls(frame.address, *values)


BAUD_CODES = {600: 0x02, 1200: 0x04, 2400: 0x08, 4800: 0x10, 9600: 0x20, 19200: 0x40}
"""Baud-rate feature word Z (2007 clause 6.8 table 5; 1997 5.7 uses the same bits)."""


@dataclass(frozen=True, slots=True)
class ChangeBaudRequest(_Message):
    """2007 0x17 / 1997 0x0C ``Z`` (6.8, 5.7)."""

    baud: int = 2400
    FUNCTIONS: ClassVar[dict[Edition, int]] = {E7: 0x17, E97: 0x0C}

    def payload(self, edition: Edition) -> bytes:
        if self.baud not in BAUD_CODES:
            raise LocalProtocolError(f"baud rate {self.baud} has no DL/T 645 code; use one of {sorted(BAUD_CODES)}")
        return bytes((BAUD_CODES[self.baud],))

    @classmethod
    def parse(cls, frame: Frame, edition: Edition) -> ChangeBaudRequest:
        _need(frame.data, 1, "change baud request")
        return cls(frame.address, _baud_from(frame.data[0]))


def _baud_from(code: int) -> int:
    for baud, bit in BAUD_CODES.items():
        if code == bit:
            return baud
    raise RemoteProtocolError(f"baud-rate code {code:02X} is not one of the standard codes")


@dataclass(frozen=True, slots=True)
class ChangePasswordRequest(_Message):
    """2007 0x18 ``DI old new`` (DI 04000C01..0A names the level, 6.9); 1997 0x0F ``old new`` (5.8)."""

    old: Password = Password(0)
    new: Password = Password(0)
    FUNCTIONS: ClassVar[dict[Edition, int]] = {E7: 0x18, E97: 0x0F}

    def payload(self, edition: Edition) -> bytes:
        di = _di_bytes(E7, 0x04000C01 + self.new.level) if edition is E7 else b""
        return di + self.old.encode() + self.new.encode()

    @classmethod
    def parse(cls, frame: Frame, edition: Edition) -> ChangePasswordRequest:
        skip = 4 if edition is E7 else 0
        _need(frame.data, skip + 8, "change password request")
        data = frame.data[skip:]
        return cls(frame.address, Password.decode(data[:4]), Password.decode(data[4:8]))


@dataclass(frozen=True, slots=True)
class _Privileged(_Message):
    """Commands carrying ``PA P0..P2 C0..C3`` (password and operator code)."""

    password: Password = Password(0)
    operator: str = "00000000"

    def payload(self, edition: Edition) -> bytes:
        return self.password.encode() + _operator_bytes(self.operator)


@dataclass(frozen=True, slots=True)
class ClearMaxDemandRequest(_Privileged):
    """2007 0x19 ``PA P C`` (6.10); 1997 0x10 with no data (5.9)."""

    FUNCTIONS: ClassVar[dict[Edition, int]] = {E7: 0x19, E97: 0x10}

    def payload(self, edition: Edition) -> bytes:
        return _Privileged.payload(self, edition) if edition is E7 else b""

    @classmethod
    def parse(cls, frame: Frame, edition: Edition) -> ClearMaxDemandRequest:
        if edition is E97:
            _need(frame.data, 0, "clear max demand request")
            return cls(frame.address)
        _need(frame.data, 8, "clear max demand request")
        return cls(frame.address, Password.decode(frame.data[:4]), _hex_digits(frame.data[4:8]))


@dataclass(frozen=True, slots=True)
class ClearMeterRequest(_Privileged):
    """2007 0x1A ``PA P C`` (6.11)."""

    FUNCTIONS: ClassVar[dict[Edition, int]] = {E7: 0x1A}

    @classmethod
    def parse(cls, frame: Frame, edition: Edition) -> ClearMeterRequest:
        _need(frame.data, 8, "clear meter request")
        return cls(frame.address, Password.decode(frame.data[:4]), _hex_digits(frame.data[4:8]))


@dataclass(frozen=True, slots=True)
class ClearEventsRequest(_Privileged):
    """2007 0x1B ``PA P C DI`` (6.12); DI FFFFFFFF clears every event record."""

    event_di: int = 0xFFFFFFFF
    FUNCTIONS: ClassVar[dict[Edition, int]] = {E7: 0x1B}

    def payload(self, edition: Edition) -> bytes:
        return _Privileged.payload(self, edition) + _di_bytes(E7, self.event_di)

    @classmethod
    def parse(cls, frame: Frame, edition: Edition) -> ClearEventsRequest:
        _need(frame.data, 12, "clear events request")
        d = frame.data
        return cls(frame.address, Password.decode(d[:4]), _hex_digits(d[4:8]), _di_from(E7, d[8:12]))


@dataclass(frozen=True, slots=True)
class RemoteControlRequest(_Privileged):
    """2007 0x1C ``PA P0..P2 C0..C3 N1 N2 N3..N8`` (6.13 and its 2013 amendment).

    N1 is the command, N2 a command parameter (reserved, or the delay of delayed trips), N3..N8
    the validity time ``ss mm hh DD MM YY``: the meter refuses the command after that instant.

    ``valid_until`` None is what head-ends and concentrator firmware often send: N3..N8 all zero,
    no validity time. It parses (a field decoder shows what is on the wire and
    :mod:`~protocols.dlt645.describe` flags it), but is never encoded: the gateway always sends
    one, so a delayed command cannot act later than its sender meant.
    """

    command: RemoteCommand = RemoteCommand.TRIP
    n2: int = 0
    valid_until: datetime.datetime | None = datetime.datetime(2000, 1, 1)
    FUNCTIONS: ClassVar[dict[Edition, int]] = {E7: 0x1C}

    def payload(self, edition: Edition) -> bytes:
        if not 0 <= self.n2 <= 0xFF:
            raise LocalProtocolError(f"N2 {self.n2} out of range")
        if self.valid_until is None:
            raise LocalProtocolError("a remote control command needs a validity time (N3..N8)")
        return (
            _Privileged.payload(self, edition)
            + bytes((int(self.command), self.n2))
            + _timestamp_bytes(self.valid_until)
        )

    @classmethod
    def parse(cls, frame: Frame, edition: Edition) -> RemoteControlRequest:
        _need(frame.data, 16, "remote control request")
        d = frame.data
        try:
            command = RemoteCommand(d[8])
        except ValueError:
            raise RemoteProtocolError(f"remote control command N1={d[8]:02X} is not defined") from None
        valid = None if not any(d[10:16]) else _timestamp(d[10:16], "remote control validity time")
        return cls(frame.address, Password.decode(d[:4]), _hex_digits(d[4:8]), command, d[9], valid)


# Replies (meter -> master)


@dataclass(frozen=True, slots=True)
class ReadReply(_Message):
    """2007 0x91/0xB1 ``DI data`` and 0x92/0xB2 ``DI data SEQ``; 1997 0x81/0xA1, 0x82/0xA2.

    ``value`` is the raw value bytes (0x33 removed); decode them with the catalogue.
    ``more`` is the follow-up flag: further frames must be read with ReadFollowUpRequest.
    """

    di: int = 0
    value: bytes = b""
    more: bool = False
    seq: int | None = None  # set on 2007 follow-up replies
    FUNCTIONS: ClassVar[dict[Edition, int]] = {E7: 0x11, E97: 0x01}
    FROM_METER: ClassVar[bool] = True

    def control(self, edition: Edition) -> Control:
        function = self.function(edition) + (1 if self.seq is not None else 0)
        return Control(function, from_meter=True, follow_up=self.more)

    def payload(self, edition: Edition) -> bytes:
        seq = b"" if self.seq is None else bytes((self.seq,))
        return _di_bytes(edition, self.di) + self.value + seq

    @classmethod
    def parse(cls, frame: Frame, edition: Edition) -> ReadReply:
        n = edition.di_length
        follow_up_reply = frame.control.function == (0x12 if edition is E7 else 0x02)
        with_seq = follow_up_reply and edition is E7
        _need(frame.data, n + (1 if with_seq else 0), "read reply", exact=False)
        value = frame.data[n:-1] if with_seq else frame.data[n:]
        seq = frame.data[-1] if with_seq else None
        return cls(frame.address, _di_from(edition, frame.data), value, frame.control.follow_up, seq)


@dataclass(frozen=True, slots=True)
class ReadAddressReply(_Message):
    """2007 0x93 with the meter's address as data (6.4)."""

    meter_address: Address = WILDCARD
    FUNCTIONS: ClassVar[dict[Edition, int]] = {E7: 0x13}
    FROM_METER: ClassVar[bool] = True

    def payload(self, edition: Edition) -> bytes:
        return self.meter_address.wire

    @classmethod
    def parse(cls, frame: Frame, edition: Edition) -> ReadAddressReply:
        _need(frame.data, 6, "read address reply")
        return cls(frame.address, Address(frame.data))


@dataclass(frozen=True, slots=True)
class Ack(_Message):
    """A normal reply with no data: write (94/84), write address (95/8A), freeze (96),
    clear demand (99/90), clear meter (9A), clear events (9B)."""

    acked: int = 0x14  # the function acknowledged

    def control(self, edition: Edition) -> Control:
        return Control(self.acked, from_meter=True)

    @classmethod
    def parse(cls, frame: Frame, edition: Edition) -> Ack:
        _need(frame.data, 0, f"reply {frame.control}")
        return cls(frame.address, frame.control.function)


@dataclass(frozen=True, slots=True)
class ChangeBaudReply(_Message):
    """2007 0x97 / 1997 0x8C with the new baud code Z."""

    baud: int = 2400
    FUNCTIONS: ClassVar[dict[Edition, int]] = {E7: 0x17, E97: 0x0C}
    FROM_METER: ClassVar[bool] = True

    def payload(self, edition: Edition) -> bytes:
        return ChangeBaudRequest(self.address, self.baud).payload(edition)

    @classmethod
    def parse(cls, frame: Frame, edition: Edition) -> ChangeBaudReply:
        _need(frame.data, 1, "change baud reply")
        return cls(frame.address, _baud_from(frame.data[0]))


@dataclass(frozen=True, slots=True)
class ChangePasswordReply(_Message):
    """2007 0x98 / 1997 0x8F with the new password."""

    new: Password = Password(0)
    FUNCTIONS: ClassVar[dict[Edition, int]] = {E7: 0x18, E97: 0x0F}
    FROM_METER: ClassVar[bool] = True

    def payload(self, edition: Edition) -> bytes:
        return self.new.encode()

    @classmethod
    def parse(cls, frame: Frame, edition: Edition) -> ChangePasswordReply:
        _need(frame.data, 4, "change password reply")
        return cls(frame.address, Password.decode(frame.data))


@dataclass(frozen=True, slots=True)
class RemoteControlReply(_Message):
    """2007 0x9C: accepted; some meters append a 2-byte execution status word."""

    status: int | None = None
    FUNCTIONS: ClassVar[dict[Edition, int]] = {E7: 0x1C}
    FROM_METER: ClassVar[bool] = True

    def payload(self, edition: Edition) -> bytes:
        return b"" if self.status is None else self.status.to_bytes(2, "little")

    @classmethod
    def parse(cls, frame: Frame, edition: Edition) -> RemoteControlReply:
        if len(frame.data) not in (0, 2):
            raise RemoteProtocolError(f"remote control reply: data field is {len(frame.data)} bytes, expected 0 or 2")
        status = int.from_bytes(frame.data, "little") if frame.data else None
        return cls(frame.address, status)


@dataclass(frozen=True, slots=True)
class ErrorReply(_Message):
    """An abnormal reply (D6 set): 2007 ``ERR`` byte, or for 0xDC a 2-byte error word.

    ``flags`` names every set bit (tables in data/error_words.toml).
    """

    failed: int = 0x11  # the function that failed
    code: int = 0
    word: bool = False  # True when ``code`` is the two-byte remote-control error word
    flags: tuple[str, ...] = field(default=(), compare=False)

    def control(self, edition: Edition) -> Control:
        return Control(self.failed, from_meter=True, abnormal=True)

    def payload(self, edition: Edition) -> bytes:
        return self.code.to_bytes(2 if self.word else 1, "little")

    @classmethod
    def parse(cls, frame: Frame, edition: Edition) -> ErrorReply:
        data = frame.data
        if edition is E7 and frame.control.function == 0x1C and len(data) == 2:
            word = int.from_bytes(data, "little")
            return cls(frame.address, 0x1C, word, True, remote_control_flags(word))
        _need(data, 1, f"abnormal reply {frame.control}")
        return cls(frame.address, frame.control.function, data[0], False, error_flags(edition, data[0]))


Message: TypeAlias = (
    BroadcastTime
    | ReadRequest
    | ReadFollowUpRequest
    | RereadRequest
    | ReadAddressRequest
    | WriteRequest
    | WriteAddressRequest
    | FreezeRequest
    | ChangeBaudRequest
    | ChangePasswordRequest
    | ClearMaxDemandRequest
    | ClearMeterRequest
    | ClearEventsRequest
    | RemoteControlRequest
    | ReadReply
    | ReadAddressReply
    | Ack
    | ChangeBaudReply
    | ChangePasswordReply
    | RemoteControlReply
    | ErrorReply
)

_Parser = Callable[[Frame, Edition], Message]

_REQUESTS: dict[Edition, dict[int, _Parser]] = {
    E7: {
        0x08: BroadcastTime.parse,
        0x11: ReadRequest.parse,
        0x12: ReadFollowUpRequest.parse,
        0x13: ReadAddressRequest.parse,
        0x14: WriteRequest.parse,
        0x15: WriteAddressRequest.parse,
        0x16: FreezeRequest.parse,
        0x17: ChangeBaudRequest.parse,
        0x18: ChangePasswordRequest.parse,
        0x19: ClearMaxDemandRequest.parse,
        0x1A: ClearMeterRequest.parse,
        0x1B: ClearEventsRequest.parse,
        0x1C: RemoteControlRequest.parse,
    },
    E97: {
        0x01: ReadRequest.parse,
        0x02: ReadFollowUpRequest.parse,
        0x03: RereadRequest.parse,
        0x04: WriteRequest.parse,
        0x08: BroadcastTime.parse,
        0x0A: WriteAddressRequest.parse,
        0x0C: ChangeBaudRequest.parse,
        0x0F: ChangePasswordRequest.parse,
        0x10: ClearMaxDemandRequest.parse,
    },
}

_REPLIES: dict[Edition, dict[int, _Parser]] = {
    E7: {
        0x11: ReadReply.parse,
        0x12: ReadReply.parse,
        0x13: ReadAddressReply.parse,
        0x14: Ack.parse,
        0x15: Ack.parse,
        0x16: Ack.parse,
        0x17: ChangeBaudReply.parse,
        0x18: ChangePasswordReply.parse,
        0x19: Ack.parse,
        0x1A: Ack.parse,
        0x1B: Ack.parse,
        0x1C: RemoteControlReply.parse,
    },
    E97: {
        0x01: ReadReply.parse,
        0x02: ReadReply.parse,
        0x03: ReadReply.parse,
        0x04: Ack.parse,
        0x0A: Ack.parse,
        0x0C: ChangeBaudReply.parse,
        0x0F: ChangePasswordReply.parse,
        0x10: Ack.parse,
    },
}


def parse_message(frame: Frame, edition: Edition) -> Message:
    """The application message carried by ``frame``, read with the meter's ``edition``."""
    control = frame.control
    if control.from_meter and control.abnormal:
        return ErrorReply.parse(frame, edition)
    table = _REPLIES if control.from_meter else _REQUESTS
    parser = table[edition].get(control.function)
    if parser is None:
        direction = "reply" if control.from_meter else "request"
        raise RemoteProtocolError(f"control code {control} is not a DL/T 645-{edition.value} {direction} function")
    try:
        return parser(frame, edition)
    except ProtocolError:
        raise
    except (ValueError, IndexError) as exc:  # defensive: a parser bug must not escape as non-ProtocolError
        raise RemoteProtocolError(f"bad payload in {control} frame: {exc}") from exc


__all__ = [
    "BAUD_CODES",
    "BROADCAST",
    "Ack",
    "BroadcastTime",
    "ChangeBaudReply",
    "ChangeBaudRequest",
    "ChangePasswordReply",
    "ChangePasswordRequest",
    "ClearEventsRequest",
    "ClearMaxDemandRequest",
    "ClearMeterRequest",
    "ErrorReply",
    "Message",
    "Password",
    "ReadAddressReply",
    "ReadAddressRequest",
    "ReadFollowUpRequest",
    "ReadReply",
    "ReadRequest",
    "RemoteControlReply",
    "RemoteControlRequest",
    "RereadRequest",
    "WriteAddressRequest",
    "WriteRequest",
    "parse_message",
]

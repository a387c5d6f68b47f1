"""CJ/T 188 link frames: ``[FE..] 68 T A0..A6 C L DATA CS 16``.

CJ/T 188-2004 clause 6.2 ("帧格式", Table 2) and CJ/T 188-2018 clause 6 (data link layer):

* ``68`` start byte; ``T`` meter type (Table 3: 10H-19H water meters, 20H-29H heat meters,
  30H-39H gas meters, 40H-49H other meters; the names are in ``data/cjt188.toml``);
* ``A0..A6`` the address: 14 BCD digits sent least significant byte first (A5 A6 are the
  manufacturer code); ``AAAAAAAAAAAAAA`` addresses any meter (broadcast/wildcard, only for
  one-to-one links), and some tools also send ``T = AA``;
* ``C`` control code (Figure 2): D7 direction (1 = from the meter), D6 communication exception
  (abnormal reply), D5..D0 the function (see :mod:`.functions`);
* ``L`` the data length: at most 64H for reads and 32H for writes (clause 6.2.5); 0 means no data;
* ``CS`` the modulo-256 sum of every byte from the ``68`` up to the byte before ``CS``;
* ``16`` end byte. Senders put 2-4 ``FE`` wake-up bytes before the frame (clause 6.3).

Unlike DL/T 645 there is no second 68 and no +33H offset on the data. Decoding is tolerant
(any meter type, any length up to 255); encoding is strict (the standard's length caps).
Sources: the standard's text as transcribed at juejin.cn/post/7434714229318500379 and
cnblogs.com/cj94/p/18534595 ("CJ/T188-2004 详细介绍").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from meter_gateway.protocols.cjt188.errors import LocalProtocolError, RemoteProtocolError

START: Final = 0x68
END: Final = 0x16
PREAMBLE: Final = 0xFE
HEADER_LENGTH: Final = 11  # 68 T A0..A6 C L
OVERHEAD: Final = 13  # header + CS + 16
MAX_READ_LENGTH: Final = 0x64  # clause 6.2.5: L <= 64H when reading ...
MAX_WRITE_LENGTH: Final = 0x32  # ... and L <= 32H when writing
WILDCARD_TYPE: Final = 0xAA


def checksum(frame_bytes: bytes | bytearray | memoryview) -> int:
    return sum(frame_bytes) & 0xFF


@dataclass(frozen=True, slots=True)
class Address:
    """A meter address: 7 bytes as on the wire (least significant byte first).

    Printed (``str``) most significant byte first, 14 digits, e.g. ``78330011223344`` (the
    first four digits are the manufacturer code A6 A5). ``AA`` bytes are wildcards.
    """

    wire: bytes

    def __post_init__(self) -> None:
        if len(self.wire) != 7:
            raise LocalProtocolError(f"a CJ/T 188 address is 7 bytes, got {len(self.wire)}")

    @classmethod
    def parse(cls, text: str) -> Address:
        """Parse a printed address: exactly 14 decimal digits, ``AA`` bytes allowed as wildcards."""
        digits = text.strip().replace(" ", "").upper()
        if len(digits) != 14:
            raise LocalProtocolError(f"a CJ/T 188 address has 14 digits, got {len(digits)}: {text!r}")
        try:
            raw = bytes.fromhex(digits)
        except ValueError:
            raise LocalProtocolError(f"address {text!r} is not 14 BCD digits") from None
        for byte in raw:
            if byte != 0xAA and ((byte >> 4) > 9 or (byte & 0x0F) > 9):
                raise LocalProtocolError(f"address {text!r} is not BCD (byte {byte:02X})")
        return cls(raw[::-1])

    def __str__(self) -> str:
        return self.wire[::-1].hex().upper()

    def __repr__(self) -> str:
        return f"Address('{self}')"

    @property
    def is_wildcard(self) -> bool:
        """True when any byte is the AA wildcard (all AA: any meter on a one-to-one link)."""
        return 0xAA in self.wire

    @property
    def manufacturer(self) -> str:
        """The manufacturer code A6 A5, printed (clause 6.2.3)."""
        return self.wire[6:4:-1].hex().upper()

    def matches(self, other: Address) -> bool:
        """Whether a frame addressed to ``self`` (maybe with AA wildcards) addresses ``other``."""
        return all(a in (0xAA, b) for a, b in zip(self.wire, other.wire, strict=True))


WILDCARD: Final = Address(b"\xaa" * 7)


@dataclass(frozen=True, slots=True)
class Control:
    """The control byte C: direction D7, communication exception D6, function D5..D0."""

    function: int
    from_meter: bool = False
    abnormal: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.function <= 0x3F:
            raise LocalProtocolError(f"function code {self.function:#x} does not fit in 6 bits")

    @classmethod
    def from_byte(cls, byte: int) -> Control:
        return _CONTROLS[byte]

    @property
    def byte(self) -> int:
        return self.function | (0x80 if self.from_meter else 0) | (0x40 if self.abnormal else 0)

    def __str__(self) -> str:
        return f"{self.byte:02X}"


# All 256 control bytes are decoded once: the deframer's hot path then only indexes a tuple.
_CONTROLS: Final = tuple(Control(b & 0x3F, bool(b & 0x80), bool(b & 0x40)) for b in range(256))

# Functions whose request carries a write (clause 6.2.5 caps their L at 32H): write data,
# write address, write motor-sync data.
_WRITE_FUNCTIONS: Final = frozenset({0x04, 0x15, 0x16})


@dataclass(frozen=True, slots=True)
class Frame:
    """One link frame: meter type T, address, control code and the data field (DI, SER, data)."""

    meter_type: int
    address: Address
    control: Control
    data: bytes = b""

    def __post_init__(self) -> None:
        if not 0 <= self.meter_type <= 0xFF:
            raise LocalProtocolError(f"meter type {self.meter_type!r} is not a byte")
        if len(self.data) > 0xFF:
            raise LocalProtocolError(f"data field of {len(self.data)} bytes does not fit L")

    def encode(self, preamble: int = 0) -> bytes:
        """The frame's bytes, optionally preceded by ``preamble`` FE wake-up bytes.

        Strict: the data field must respect the standard's caps (L <= 64H, and <= 32H for a
        write request), so nothing we send is longer than a conforming meter accepts.
        """
        writing = self.control.function in _WRITE_FUNCTIONS and not self.control.from_meter
        cap = MAX_WRITE_LENGTH if writing else MAX_READ_LENGTH
        if len(self.data) > cap:
            raise LocalProtocolError(f"data field of {len(self.data)} bytes exceeds L <= {cap:02X}H (clause 6.2.5)")
        if not 0 <= preamble <= 16:
            raise LocalProtocolError(f"preamble of {preamble} FE bytes (the standard sends 2 to 4)")
        body = bytearray((START, self.meter_type, *self.address.wire, self.control.byte, len(self.data)))
        body += self.data
        body.append(checksum(body))
        body.append(END)
        return b"\xfe" * preamble + bytes(body)


def parse_frame(raw: bytes | bytearray | memoryview) -> Frame:
    """Parse exactly one complete frame (leading FE bytes allowed); anything else is an error.

    The streaming :class:`~meter_gateway.protocols.cjt188.deframer.Deframer` is the tool for
    byte streams; this is for input known to be one frame, and says precisely what is wrong.
    """
    raw = bytes(raw)
    start = 0
    while start < len(raw) and raw[start] == PREAMBLE:
        start += 1
    body = raw[start:]
    if not body:
        raise RemoteProtocolError("no frame: empty input" if not raw else "only FE preamble bytes")
    if body[0] != START:
        raise RemoteProtocolError(f"not a CJ/T 188 frame: starts with {body[0]:02X}, expected 68")
    if len(body) < HEADER_LENGTH:
        raise RemoteProtocolError(f"truncated after {len(body)} bytes (a frame has at least {OVERHEAD})")
    length = body[10]
    total = OVERHEAD + length
    if len(body) < total:
        raise RemoteProtocolError(f"bad length: L={length} needs {total} bytes, got {len(body)} (truncated)")
    expected = checksum(body[: HEADER_LENGTH + length])
    found = body[HEADER_LENGTH + length]
    if expected != found:
        raise RemoteProtocolError(f"checksum expected {expected:02X} found {found:02X}")
    if body[total - 1] != END:
        raise RemoteProtocolError(f"end byte expected 16 found {body[total - 1]:02X}")
    if len(body) > total:
        raise RemoteProtocolError(f"bad length: {len(body) - total} unexpected bytes after the frame (L={length})")
    return Frame(body[1], Address(body[2:9]), _CONTROLS[body[9]], body[HEADER_LENGTH : HEADER_LENGTH + length])

"""DL/T 645 link frames: ``68 A0..A5 68 C L DATA CS 16``.

Clause references are to DL/T 645-2007 section 4 ("帧格式"); the 1997 edition uses the same frame.
The address is 6 BCD bytes sent least significant byte first and printed most significant first;
every data byte is sent +0x33; CS is the modulo-256 sum of every byte from the first 0x68 up to
the byte before CS. :class:`Frame` holds the data *without* the 0x33 offset.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from meter_gateway.protocols.dlt645.errors import LocalProtocolError, RemoteProtocolError

START: Final = 0x68
END: Final = 0x16
PREAMBLE: Final = 0xFE
OFFSET: Final = 0x33
HEADER_LENGTH: Final = 10  # 68 A0..A5 68 C L
OVERHEAD: Final = 12  # header + CS + 16
MAX_DATA_LENGTH: Final = 255  # L is one byte; the standard caps reads at 200 and writes at 50

_ADD_33: Final = bytes((b + OFFSET) & 0xFF for b in range(256))
_SUB_33: Final = bytes((b - OFFSET) & 0xFF for b in range(256))
_START_BYTE: Final = bytes((START,))


def scramble(data: bytes) -> bytes:
    """Apply the +0x33 transmission offset."""
    return data.translate(_ADD_33)


def unscramble(data: bytes) -> bytes:
    """Remove the +0x33 transmission offset."""
    return data.translate(_SUB_33)


def checksum(frame_bytes: bytes | bytearray | memoryview) -> int:
    return sum(frame_bytes) & 0xFF


@dataclass(frozen=True, slots=True)
class Address:
    """A meter address: 6 bytes as on the wire (least significant byte first).

    Printed (``str``) most significant byte first, e.g. ``000000000161``. ``AA`` bytes are the
    wildcard of shortened addressing; ``999999999999`` is the broadcast address.
    """

    wire: bytes
    # The printed form when parsed from text: the caller's own string when it was already
    # canonical, so configured meters do not each hold a second copy of their address.
    _text: str | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.wire) != 6:
            raise LocalProtocolError(f"an address is 6 bytes, got {len(self.wire)}")

    @classmethod
    def parse(cls, text: str) -> Address:
        """Parse a printed address: exactly 12 decimal digits, or ``A`` wildcard nibbles."""
        digits = text.strip().replace(" ", "").upper()
        if len(digits) != 12:
            raise LocalProtocolError(f"a DL/T 645 address has 12 digits, got {len(digits)}: {text!r}")
        try:
            raw = bytes.fromhex(digits)
        except ValueError:
            raise LocalProtocolError(f"address {text!r} is not 12 BCD digits") from None
        for byte in raw:
            if byte != 0xAA and ((byte >> 4) > 9 or (byte & 0x0F) > 9):
                raise LocalProtocolError(f"address {text!r} is not BCD (byte {byte:02X})")
        address = cls(raw[::-1])
        # 12 characters that fromhex turned into 6 bytes are 12 hex digits: the canonical form
        object.__setattr__(address, "_text", text if text == digits else digits)
        return address

    def __str__(self) -> str:
        return self._text if self._text is not None else self.wire[::-1].hex().upper()

    def __repr__(self) -> str:
        return f"Address('{self}')"

    @property
    def is_broadcast(self) -> bool:
        return self.wire == b"\x99" * 6

    @property
    def is_wildcard(self) -> bool:
        """True when any byte is the AA wildcard (shortened addressing)."""
        return 0xAA in self.wire

    def matches(self, other: Address) -> bool:
        """Whether a frame addressed to ``self`` (maybe with AA wildcards) addresses ``other``."""
        if self.wire == other.wire:
            return True
        return all(a in (0xAA, b) for a, b in zip(self.wire, other.wire, strict=True))


BROADCAST: Final = Address(b"\x99" * 6)
WILDCARD: Final = Address(b"\xaa" * 6)


@dataclass(frozen=True, slots=True)
class Control:
    """The control byte C: direction D7, abnormal reply D6, follow-up frame D5, function D4..D0."""

    function: int
    from_meter: bool = False
    abnormal: bool = False
    follow_up: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.function <= 0x1F:
            raise LocalProtocolError(f"function code {self.function:#x} does not fit in 5 bits")

    @classmethod
    def from_byte(cls, byte: int) -> Control:
        return _CONTROLS[byte]

    @property
    def byte(self) -> int:
        return (
            self.function
            | (0x80 if self.from_meter else 0)
            | (0x40 if self.abnormal else 0)
            | (0x20 if self.follow_up else 0)
        )

    def __str__(self) -> str:
        return f"{self.byte:02X}"


# All 256 control bytes are decoded once: the deframer's hot path then only indexes a tuple.
_CONTROLS: Final = tuple(Control(b & 0x1F, bool(b & 0x80), bool(b & 0x40), bool(b & 0x20)) for b in range(256))


@dataclass(frozen=True, slots=True)
class Frame:
    """One link frame; ``data`` is the data field with the 0x33 offset already removed."""

    address: Address
    control: Control
    data: bytes = b""

    def __post_init__(self) -> None:
        if len(self.data) > MAX_DATA_LENGTH:
            raise LocalProtocolError(f"data field of {len(self.data)} bytes exceeds {MAX_DATA_LENGTH}")

    def encode(self, preamble: int = 0) -> bytes:
        """The frame's bytes, optionally preceded by ``preamble`` FE wake-up bytes."""
        return encode_frame(self.address, self.control.byte, self.data, preamble)


def encode_frame(address: Address, control: int, data: bytes, preamble: int = 0) -> bytes:
    """The bytes of the frame ``address``/``control``/``data`` (offset not yet applied), after
    ``preamble`` FE bytes: what :meth:`Frame.encode` and every message's ``encode`` send."""
    if len(data) > MAX_DATA_LENGTH:
        raise LocalProtocolError(f"data field of {len(data)} bytes exceeds {MAX_DATA_LENGTH}")
    if preamble < 0:
        raise LocalProtocolError(f"a preamble of {preamble} FE bytes")
    head = _START_BYTE + address.wire + bytes((START, control, len(data)))
    body = data.translate(_ADD_33)
    # the checksum of the scrambled data is the plain data's sum plus 0x33 per byte
    total = sum(head) + sum(data) + OFFSET * len(data)
    return b"\xfe" * preamble + head + body + bytes((total & 0xFF, END))


def parse_frame(raw: bytes) -> Frame:
    """Parse exactly one complete frame (leading FE bytes allowed); anything else is an error.

    The streaming :class:`~protocols.dlt645.deframer.Deframer` is the tool for byte streams; this
    is for input that is known to be one frame, and says precisely what is wrong with it.
    """
    start = 0
    while start < len(raw) and raw[start] == PREAMBLE:
        start += 1
    body = raw[start:]
    if not body:
        raise RemoteProtocolError("no frame: empty input" if not raw else "only FE preamble bytes")
    if body[0] != START:
        raise RemoteProtocolError(f"not a DL/T 645 frame: starts with {body[0]:02X}, expected 68")
    if len(body) < HEADER_LENGTH:
        raise RemoteProtocolError(f"truncated after {len(body)} bytes (a frame has at least {OVERHEAD})")
    if body[7] != START:
        raise RemoteProtocolError(f"not a DL/T 645 frame: byte 7 is {body[7]:02X}, expected 68")
    length = body[9]
    total = OVERHEAD + length
    if len(body) < total:
        raise RemoteProtocolError(f"truncated after {len(body)} bytes (length byte L={length} needs {total})")
    expected = checksum(body[: HEADER_LENGTH + length])
    found = body[HEADER_LENGTH + length]
    if expected != found:
        raise RemoteProtocolError(f"checksum expected {expected:02X} found {found:02X}")
    if body[total - 1] != END:
        raise RemoteProtocolError(f"end byte expected 16 found {body[total - 1]:02X}")
    if len(body) > total:
        raise RemoteProtocolError(f"{len(body) - total} unexpected bytes after the frame")
    return Frame(
        Address(bytes(body[1:7])),
        Control.from_byte(body[8]),
        unscramble(bytes(body[HEADER_LENGTH : HEADER_LENGTH + length])),
    )

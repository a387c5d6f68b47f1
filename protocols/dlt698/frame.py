"""DL/T 698.45 link frames: ``[FE..] 68 L L C AF SA.. CA HCS HCS APDU FCS FCS 16``.

DL/T 698.45-2017 clause 5 (数据链路层: frame format, address field, HCS/FCS, link fragmentation):

* L (2 bytes, little-endian): bits 0-13 count the bytes from the first L byte through the last
  FCS byte (everything but 68 and 16). Bit 14 is the length unit (1 = kilobytes) as the lead's
  brief and later profiles describe it; the 2017 text reserves bits 14-15, so we accept the flag
  when decoding and never set it when encoding.
* C: DIR (bit 7, 1 = sent by the server), PRM (bit 6, 1 = the frame belongs to an exchange the
  client started), fragment flag (bit 5), reserved (bit 4), SC (bit 3: link user data sent +0x33),
  function code (bits 0-2: 1 link management, 3 user data). DIR/PRM: 0/1 client request,
  1/1 server response, 1/0 server report or LINK-Request, 0/0 client's answer to a report.
* AF: address type (bits 6-7: single, wildcard, group, broadcast), logical address (bits 4-5),
  SA length - 1 (bits 0-3). SA is BCD sent least significant byte first and printed most
  significant digit first; nibble A is the wildcard; broadcast is the one byte AA.
* CA: client address, one byte (0 = no particular client).
* HCS: CRC over L..CA; FCS: CRC over L..end of the link user data (HCS included), both computed
  on the bytes as sent (after scrambling).
* With the fragment flag set, the user data starts with a 2-byte fragment format field
  (little-endian): bits 0-11 sequence number, bits 14-15 type (0 start, 1 last, 2 ack, 3 middle).

:class:`Frame` holds the link user data *without* the 0x33 offset, fragment header included.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Final, NamedTuple

from meter_gateway.protocols.dlt698.crc import crc16
from meter_gateway.protocols.dlt698.errors import LocalProtocolError, RemoteProtocolError

START: Final = 0x68
END: Final = 0x16
PREAMBLE: Final = 0xFE
OFFSET: Final = 0x33
MAX_LENGTH: Final = 0x3FFF  # the 14-bit length field, in bytes
LENGTH_UNIT_KB: Final = 0x4000
FUNCTION_LINK: Final = 1  # LINK-Request/Response (login, heartbeat, logout)
FUNCTION_DATA: Final = 3  # every other APDU
MIN_FRAME: Final = 12  # 68 L L C AF SA CA HCS HCS FCS FCS 16 with a one-byte SA and no data

_ADD_33: Final = bytes((b + OFFSET) & 0xFF for b in range(256))
_SUB_33: Final = bytes((b - OFFSET) & 0xFF for b in range(256))


def scramble(data: bytes) -> bytes:
    """Apply the SC +0x33 transmission offset."""
    return data.translate(_ADD_33)


def unscramble(data: bytes) -> bytes:
    """Remove the SC +0x33 transmission offset."""
    return data.translate(_SUB_33)


class AddressType(IntEnum):
    """AF bits 6-7."""

    SINGLE = 0
    WILDCARD = 1
    GROUP = 2
    BROADCAST = 3


_BCD_OR_WILDCARD: Final = frozenset("0123456789A")


@dataclass(frozen=True, slots=True)
class ServerAddress:
    """The server address SA with its AF attributes.

    ``wire`` is the address bytes as on the wire (least significant byte first); ``str()`` prints
    it as on a nameplate, most significant digit first (``000000000001``). ``A`` nibbles are
    wildcards (valid with :attr:`AddressType.WILDCARD`).
    """

    wire: bytes
    type: AddressType = AddressType.SINGLE
    logical: int = 0
    _text: str | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 1 <= len(self.wire) <= 16:
            raise LocalProtocolError(f"a server address is 1 to 16 bytes, got {len(self.wire)}")
        if not 0 <= self.logical <= 3:
            raise LocalProtocolError(f"logical address {self.logical} does not fit AF bits 4-5")

    @classmethod
    def parse(cls, text: str, type: AddressType | None = None, logical: int = 0) -> ServerAddress:
        """Parse a printed address (an even number of digits; ``A`` nibbles make it a wildcard)."""
        digits = text.strip().replace(" ", "").upper()
        if not digits or len(digits) % 2 or len(digits) > 32 or not set(digits) <= _BCD_OR_WILDCARD:
            raise LocalProtocolError(f"server address {text!r} is not 2 to 32 BCD digits (A = wildcard)")
        if type is None:
            type = AddressType.WILDCARD if "A" in digits else AddressType.SINGLE
        return cls(bytes.fromhex(digits)[::-1], type, logical)

    @classmethod
    def broadcast(cls) -> ServerAddress:
        """The broadcast address: AF type 3 and the single byte AA."""
        return cls(b"\xaa", AddressType.BROADCAST)

    @classmethod
    def wildcard(cls, length: int = 6) -> ServerAddress:
        """``length`` bytes of AA: any single meter on the line answers (reading an unknown address)."""
        return cls(b"\xaa" * length, AddressType.WILDCARD)

    @property
    def af(self) -> int:
        """The address flag byte AF."""
        return (self.type << 6) | (self.logical << 4) | (len(self.wire) - 1)

    def __str__(self) -> str:
        text = self._text
        if text is None:
            text = self.wire[::-1].hex().upper()
            object.__setattr__(self, "_text", text)
        return text

    def __repr__(self) -> str:
        return f"ServerAddress('{self}', {self.type.name}, logical={self.logical})"

    def matches(self, other: ServerAddress) -> bool:
        """Whether a frame sent to ``self`` (maybe with wildcard nibbles or broadcast) reaches ``other``."""
        if self.type is AddressType.BROADCAST:
            return True
        if len(self.wire) != len(other.wire):
            return False
        for mine, theirs in zip(self.wire, other.wire, strict=True):
            if (mine >> 4) != 0xA and (mine >> 4) != (theirs >> 4):
                return False
            if (mine & 0x0F) != 0xA and (mine & 0x0F) != (theirs & 0x0F):
                return False
        return True

    @classmethod
    def from_wire(cls, af: int, wire: bytes) -> ServerAddress:
        return cls(wire, AddressType(af >> 6), (af >> 4) & 0x03)


@dataclass(frozen=True, slots=True)
class Control:
    """The control byte C. See the module docstring for what DIR and PRM mean together."""

    function: int = FUNCTION_DATA
    from_server: bool = False  # DIR
    prm: bool = True  # PRM: the frame belongs to an exchange started by the client
    fragment: bool = False
    scrambled: bool = False  # SC
    reserved: bool = False  # bit 4: must be 0; only ever True on a decoded frame

    def __post_init__(self) -> None:
        if not 0 <= self.function <= 7:
            raise LocalProtocolError(f"function code {self.function} does not fit in 3 bits")

    @property
    def byte(self) -> int:
        return (
            self.function
            | (0x80 if self.from_server else 0)
            | (0x40 if self.prm else 0)
            | (0x20 if self.fragment else 0)
            | (0x10 if self.reserved else 0)
            | (0x08 if self.scrambled else 0)
        )

    @classmethod
    def from_byte(cls, byte: int) -> Control:
        return _CONTROLS[byte]

    @property
    def role(self) -> str:
        """``request``, ``response``, ``report`` (server-initiated) or ``report-response``."""
        if self.from_server:
            return "response" if self.prm else "report"
        return "request" if self.prm else "report-response"

    def __str__(self) -> str:
        return f"{self.byte:02X}"


_CONTROLS: Final = tuple(
    Control(b & 7, bool(b & 0x80), bool(b & 0x40), bool(b & 0x20), bool(b & 0x08), bool(b & 0x10)) for b in range(256)
)


class FragmentType(IntEnum):
    """Fragment format field bits 14-15 (clause 5, link-layer APDU fragmentation)."""

    START = 0
    LAST = 1
    ACK = 2
    MIDDLE = 3


class FragmentHeader(NamedTuple):
    """The 2-byte fragment format field; ``reserved`` holds bits 12-13 (0 from a conforming peer)."""

    seq: int
    type: FragmentType
    reserved: int = 0

    @property
    def wire(self) -> bytes:
        if not 0 <= self.seq <= 0xFFF:
            raise LocalProtocolError(f"fragment sequence {self.seq} does not fit in 12 bits")
        word = self.seq | (self.type << 14)
        return bytes((word & 0xFF, word >> 8))

    @classmethod
    def from_wire(cls, data: bytes) -> FragmentHeader:
        if len(data) < 2:
            raise RemoteProtocolError("fragment frame without its 2-byte fragment format field")
        word = data[0] | (data[1] << 8)
        return cls(word & 0xFFF, FragmentType(word >> 14), (word >> 12) & 3)


@dataclass(frozen=True, slots=True)
class Frame:
    """One link frame. ``data`` is the link user data with the SC offset removed: the APDU, or
    for a fragment frame the fragment format field followed by the fragment."""

    control: Control
    address: ServerAddress
    client: int = 0
    data: bytes = b""

    def __post_init__(self) -> None:
        if not 0 <= self.client <= 0xFF:
            raise LocalProtocolError(f"client address {self.client} does not fit in one byte")

    @property
    def fragment(self) -> FragmentHeader | None:
        """The fragment format field when the fragment flag is set."""
        return FragmentHeader.from_wire(self.data) if self.control.fragment else None

    @property
    def apdu(self) -> bytes:
        """The APDU bytes (for a fragment frame: this fragment's part of the APDU)."""
        return self.data[2:] if self.control.fragment else self.data

    def encode(self, preamble: int = 0) -> bytes:
        """The frame's bytes, strictly: preceded by ``preamble`` FE wake-up bytes (4 is usual on RS-485)."""
        control = self.control
        if control.reserved:
            raise LocalProtocolError("control bit 4 is reserved and must be 0")
        if control.function not in (FUNCTION_LINK, FUNCTION_DATA):
            raise LocalProtocolError(f"function code {control.function} is not 1 (link) or 3 (user data)")
        address = self.address
        if address.type is AddressType.BROADCAST and address.wire != b"\xaa":
            raise LocalProtocolError("a broadcast server address is the single byte AA")
        length = 9 + len(address.wire) + len(self.data)  # L L C AF SA CA HCS HCS data FCS FCS
        if length > MAX_LENGTH:
            raise LocalProtocolError(f"frame of {length} bytes exceeds the 14-bit length field; fragment the APDU")
        header = bytearray((length & 0xFF, length >> 8, control.byte, address.af))
        header += address.wire
        header.append(self.client)
        hcs = crc16(header)
        header += bytes((hcs & 0xFF, hcs >> 8))
        header += scramble(self.data) if control.scrambled else self.data
        fcs = crc16(header)
        return b"\xfe" * preamble + b"\x68" + bytes(header) + bytes((fcs & 0xFF, fcs >> 8, END))


def frame_length(buf: bytes, pos: int = 0) -> int:
    """The whole frame's size in bytes (68 .. 16) from the L field at ``pos + 1``."""
    word = buf[pos + 1] | (buf[pos + 2] << 8)
    length = word & MAX_LENGTH
    if word & LENGTH_UNIT_KB:
        length *= 1024
    return length + 2


def parse_frame(raw: bytes) -> Frame:
    """Parse exactly one complete frame (leading FE bytes allowed); anything else is an error.

    The streaming :class:`~meter_gateway.protocols.dlt698.deframer.Deframer` is the tool for byte
    streams; this is for input known to be one frame, and says precisely what is wrong with it.
    """
    start = 0
    while start < len(raw) and raw[start] == PREAMBLE:
        start += 1
    body = bytes(raw[start:])
    if not body:
        raise RemoteProtocolError("no frame: empty input" if not raw else "only FE preamble bytes")
    if body[0] != START:
        raise RemoteProtocolError(f"not a DL/T 698.45 frame: starts with {body[0]:02X}, expected 68")
    if len(body) < 5:
        raise RemoteProtocolError(f"truncated after {len(body)} bytes")
    total = frame_length(body)
    sa_len = (body[4] & 0x0F) + 1
    header_end = 6 + sa_len  # index of HCS
    if total < header_end + 5:
        raise RemoteProtocolError(f"length field {total - 2} is too short for a {sa_len}-byte server address")
    if len(body) < total:
        raise RemoteProtocolError(f"truncated after {len(body)} bytes (length field needs {total})")
    hcs = crc16(body[1:header_end])
    found = body[header_end] | (body[header_end + 1] << 8)
    if hcs != found:
        raise RemoteProtocolError(f"HCS expected {hcs:04X} found {found:04X}")
    fcs = crc16(body[1 : total - 3])
    found = body[total - 3] | (body[total - 2] << 8)
    if fcs != found:
        raise RemoteProtocolError(f"FCS expected {fcs:04X} found {found:04X}")
    if body[total - 1] != END:
        raise RemoteProtocolError(f"end byte expected 16 found {body[total - 1]:02X}")
    if len(body) > total:
        raise RemoteProtocolError(f"{len(body) - total} unexpected bytes after the frame")
    return _build(body, 0, total, _address(body, 0))


def _address(buf: bytes, pos: int) -> ServerAddress:
    """The server address of the checked frame at ``pos``, decoded."""
    af = buf[pos + 4]
    try:
        return ServerAddress.from_wire(af, buf[pos + 5 : pos + 6 + (af & 0x0F)])
    except LocalProtocolError as exc:  # pragma: no cover - AF bits always decode
        raise RemoteProtocolError(str(exc)) from None


def _build(buf: bytes, pos: int, total: int, address: ServerAddress) -> Frame:
    """A Frame from a validated candidate and its server address (shared by parse_frame and the
    deframer, which looks the address up in its cache instead of decoding it)."""
    header_end = pos + 7 + (buf[pos + 4] & 0x0F)
    control = _CONTROLS[buf[pos + 3]]
    data = buf[header_end + 2 : pos + total - 3]
    if control.scrambled:
        data = data.translate(_SUB_33)
    # every field of a checked frame is in range (the client address is one byte): the frame is
    # built without Frame.__init__'s checks, each slot set as the frozen dataclass's own init does
    frame = _new_object(Frame)
    _set_control(frame, control)
    _set_address(frame, address)
    _set_client(frame, buf[header_end - 1])
    _set_data(frame, data)
    return frame


_new_object = object.__new__
# the slots' member descriptors
_set_control, _set_address, _set_client, _set_data = (
    vars(Frame)[name].__set__ for name in ("control", "address", "client", "data")
)


def looks_like_frame(buf: bytes) -> bool:
    """Structural test: a 68, a plausible length and a valid HCS (leading FE allowed).

    Tells a DL/T 698.45 frame from a DL/T 645 one (whose byte 7 is a second 68 and whose bytes
    after the first 68 are an address, not a CRC-protected header).
    """
    start = 0
    while start < len(buf) and buf[start] == PREAMBLE:
        start += 1
    if len(buf) - start < MIN_FRAME or buf[start] != START:
        return False
    header_end = start + 6 + (buf[start + 4] & 0x0F) + 1
    if header_end + 2 > len(buf):
        return False
    return crc16(buf[start + 1 : header_end]) == buf[header_end] | (buf[header_end + 1] << 8)

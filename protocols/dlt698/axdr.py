"""A-XDR ``Data`` and the object descriptors of DL/T 698.45-2017 clauses 6.3.1-6.3.3.

A value is a :class:`Data` (tag + Python value). The Python value depends on the tag:

====================================  =============================================
null (0)                              ``None``
array (1), structure (2)              ``tuple[Data, ...]``, or :class:`Ints` when every
                                      element is of one integer type
bool (3)                              ``bool``
bit-string (4)                        :class:`BitString`
integers (5, 6, 15-18, 20-22)         ``int`` (enum 22 too)
octet-string (9), MAC (86), RN (87)   ``bytes``
visible-string (10), UTF8-string (12) ``str`` (visible-string decoded as Latin-1)
float32 (23), float64 (24)            ``float``
date_time (25), date (26), time (27)  :class:`DateTime`, :class:`Date`, :class:`Time`
date_time_s (28)                      :class:`DateTimeS`
OI (80)                               ``int``
OAD (81), ROAD (82), OMD (83)         :class:`OAD`, :class:`ROAD`, :class:`OMD`
TI (84), TSA (85)                     :class:`TI`, :class:`TSA`
Region (88), Scaler_Unit (89)         :class:`Region`, :class:`ScalerUnit`
RSD (90), CSD (91), MS (92)           :class:`RSD`, ``OAD | ROAD``, :class:`MS`
SID (93), SID_MAC (94), COMDCB (95)   :class:`SID`, :class:`SIDMAC`, :class:`COMDCB`
RCSD (96)                             :class:`RCSD`
====================================  =============================================

Integers are big-endian, floats IEEE 754 big-endian. A length ("A-XDR length determinant") below
0x80 is one byte, else 0x80 | n followed by n big-endian bytes. Decoding is tolerant: a
non-minimal length (``82 00 07``) is accepted and a warning recorded; encoding is minimal.

Decoders take ``(buf, pos, warnings)`` and return ``(value, new_pos)``; they raise
:class:`RemoteProtocolError` for anything that does not fit. Encoders append to a bytearray and
raise :class:`LocalProtocolError` for values that do not fit their type.
"""

from __future__ import annotations

import datetime
import math
import struct
from collections.abc import Callable, Iterator, Sequence
from enum import IntEnum
from typing import Any, Final, NamedTuple, overload

from meter_gateway.protocols.dlt698.errors import LocalProtocolError, RemoteProtocolError
from meter_gateway.protocols.dlt698.frame import AddressType, ServerAddress

MAX_DEPTH: Final = 32  # nesting a meter sends is 3 or 4 deep; this stops stack exhaustion


class DataType(IntEnum):
    """Data CHOICE tags (clause 6.3.3, table "Data 数据类型定义")."""

    NULL = 0
    ARRAY = 1
    STRUCTURE = 2
    BOOL = 3
    BIT_STRING = 4
    DOUBLE_LONG = 5
    DOUBLE_LONG_UNSIGNED = 6
    OCTET_STRING = 9
    VISIBLE_STRING = 10
    UTF8_STRING = 12
    INTEGER = 15
    LONG = 16
    UNSIGNED = 17
    LONG_UNSIGNED = 18
    LONG64 = 20
    LONG64_UNSIGNED = 21
    ENUM = 22
    FLOAT32 = 23
    FLOAT64 = 24
    DATE_TIME = 25
    DATE = 26
    TIME = 27
    DATE_TIME_S = 28
    OI = 80
    OAD = 81
    ROAD = 82
    OMD = 83
    TI = 84
    TSA = 85
    MAC = 86
    RN = 87
    REGION = 88
    SCALER_UNIT = 89
    RSD = 90
    CSD = 91
    MS = 92
    SID = 93
    SID_MAC = 94
    COMDCB = 95
    RCSD = 96


# ---- value types -------------------------------------------------------------------------------


class BitString(NamedTuple):
    """``length`` bits; bit 0 is the most significant bit of the first byte (as the standard numbers them)."""

    length: int
    data: bytes

    def bit(self, index: int) -> bool:
        return bool(self.data[index >> 3] & (0x80 >> (index & 7)))

    @classmethod
    def from_bits(cls, bits: str) -> BitString:
        """``BitString.from_bits("0001")``: bit 0 first."""
        value = bytearray((len(bits) + 7) // 8)
        for i, ch in enumerate(bits):
            if ch == "1":
                value[i >> 3] |= 0x80 >> (i & 7)
        return cls(len(bits), bytes(value))

    def __str__(self) -> str:
        return "".join("1" if self.bit(i) else "0" for i in range(self.length))


class DateTime(NamedTuple):
    """date_time (25): 0xFFFF / 0xFF fields mean "not specified". ``weekday`` 0 is Sunday."""

    year: int
    month: int
    day: int
    weekday: int
    hour: int
    minute: int
    second: int
    millisecond: int

    def to_datetime(self) -> datetime.datetime | None:
        try:
            return datetime.datetime(
                self.year, self.month, self.day, self.hour, self.minute, self.second, self.millisecond * 1000
            )
        except ValueError:
            return None

    @classmethod
    def from_datetime(cls, when: datetime.datetime) -> DateTime:
        return cls(
            when.year,
            when.month,
            when.day,
            (when.weekday() + 1) % 7,
            when.hour,
            when.minute,
            when.second,
            when.microsecond // 1000,
        )

    def __str__(self) -> str:
        return (
            f"{self.year:04d}-{self.month:02d}-{self.day:02d} {self.hour:02d}:{self.minute:02d}:{self.second:02d}"
            f".{self.millisecond:03d} (wd {self.weekday})"
        )


class DateTimeS(NamedTuple):
    """date_time_s (28): year (0xFFFF) and other fields (0xFF) may be "not specified"."""

    year: int
    month: int
    day: int
    hour: int
    minute: int
    second: int

    def to_datetime(self) -> datetime.datetime | None:
        try:
            return datetime.datetime(self.year, self.month, self.day, self.hour, self.minute, self.second)
        except ValueError:
            return None

    @classmethod
    def from_datetime(cls, when: datetime.datetime) -> DateTimeS:
        return cls(when.year, when.month, when.day, when.hour, when.minute, when.second)

    def __str__(self) -> str:
        return f"{self.year:04d}-{self.month:02d}-{self.day:02d} {self.hour:02d}:{self.minute:02d}:{self.second:02d}"


class Date(NamedTuple):
    year: int
    month: int
    day: int
    weekday: int

    def __str__(self) -> str:
        return f"{self.year:04d}-{self.month:02d}-{self.day:02d}"


class Time(NamedTuple):
    hour: int
    minute: int
    second: int

    def __str__(self) -> str:
        return f"{self.hour:02d}:{self.minute:02d}:{self.second:02d}"


class OAD(NamedTuple):
    """Object attribute descriptor: OI, attribute byte (bits 5-7 feature, 0-4 attribute id), index."""

    oi: int
    attribute: int
    index: int = 0  # type: ignore[assignment]  # the standard's name; shadows tuple.index on purpose

    @classmethod
    def parse(cls, text: str) -> OAD:
        """``OAD.parse("00100201")``: 8 hex digits as printed."""
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            raw = b""
        if len(raw) != 4:
            raise LocalProtocolError(f"an OAD is 8 hex digits, got {text!r}")
        return cls((raw[0] << 8) | raw[1], raw[2], raw[3])

    @property
    def attribute_id(self) -> int:
        return self.attribute & 0x1F

    @property
    def feature(self) -> int:
        return self.attribute >> 5

    @property
    def wire(self) -> bytes:
        return bytes((self.oi >> 8, self.oi & 0xFF, self.attribute, self.index))

    def __str__(self) -> str:
        return f"{self.oi:04X}{self.attribute:02X}{self.index:02X}"


class OMD(NamedTuple):
    """Object method descriptor: OI, method id, operation mode (0)."""

    oi: int
    method: int
    mode: int = 0

    @classmethod
    def parse(cls, text: str) -> OMD:
        oad = OAD.parse(text)
        return cls(oad.oi, oad.attribute, oad.index)

    def __str__(self) -> str:
        return f"{self.oi:04X}{self.method:02X}{self.mode:02X}"


class ROAD(NamedTuple):
    """Record OAD: a record object (a freeze, an event) and the columns wanted from it."""

    oad: OAD
    oads: tuple[OAD, ...]


class TI(NamedTuple):
    """Time interval: unit (0 s, 1 min, 2 h, 3 day, 4 month, 5 year) and count."""

    unit: int
    interval: int


class TSA(NamedTuple):
    """A target server address as carried in data (AF + SA); ``address`` None for an empty TSA."""

    address: ServerAddress | None


class ScalerUnit(NamedTuple):
    scaler: int
    unit: int


class Region(NamedTuple):
    """unit: 0 [start,end), 1 (start,end], 2 [start,end], 3 (start,end)."""

    unit: int
    start: Data
    end: Data


class MS(NamedTuple):
    """Meter set: 0 none, 1 all, 2 user types (unsigned), 3 addresses (TSA), 4 config numbers
    (long-unsigned), 5 user-type regions, 6 address regions, 7 config-number regions."""

    choice: int
    items: tuple[Any, ...] = ()


class SID(NamedTuple):
    ident: int
    extra: bytes


class SIDMAC(NamedTuple):
    sid: SID
    mac: bytes


class COMDCB(NamedTuple):
    """Serial port control block: baud (enum), parity, data bits, stop bits, flow control."""

    baud: int
    parity: int
    data_bits: int
    stop_bits: int
    flow: int


class Selector1(NamedTuple):
    """Records whose column ``oad`` equals ``value``."""

    oad: OAD
    value: Data


class Selector2(NamedTuple):
    """Records whose column ``oad`` is in [start, end), every ``interval`` (a TI Data or null)."""

    oad: OAD
    start: Data
    end: Data
    interval: Data


class SelectorTimeMS(NamedTuple):
    """Selectors 4 and 5: collection start / store time and a meter set."""

    time: DateTimeS
    ms: MS


class SelectorRangeMS(NamedTuple):
    """Selectors 6, 7, 8: a time range, a step and a meter set."""

    start: DateTimeS
    end: DateTimeS
    interval: TI
    ms: MS


class SelectorLast(NamedTuple):
    """Selector 9: the Nth last record."""

    n: int


class SelectorLastMS(NamedTuple):
    """Selector 10: the last N records of a meter set."""

    n: int
    ms: MS


SelectorValue = (
    Selector1
    | Selector2
    | tuple[Selector2, ...]
    | SelectorTimeMS
    | SelectorRangeMS
    | SelectorLast
    | SelectorLastMS
    | None
)


class RSD(NamedTuple):
    """Row selection descriptor: selector number 0-10 and its parameters."""

    selector: int
    value: SelectorValue = None


CSD = OAD | ROAD


class RCSD(NamedTuple):
    """Record column selection descriptor: the columns of a record query or result."""

    columns: tuple[CSD, ...]


class Ints(Sequence["Data"]):
    """The elements of an array or structure that are all of one integer type, kept as the
    integers: energy registers and phase values, most of what a meter sends, decode without one
    :class:`Data` per element. It is a sequence of :class:`Data` (indexing and iteration build
    them) and equals the tuple of those Data; :attr:`values` are the integers themselves. The
    decoder gives one for every non-empty array or structure of that shape, and the encoder takes
    it like a tuple of Data (checking every value against ``tag``)."""

    __slots__ = ("tag", "values")

    def __init__(self, tag: DataType, values: tuple[int, ...]) -> None:
        if tag not in _FIXED_INT:
            raise LocalProtocolError(f"Ints holds integers of one integer type, not {tag!r}")
        self.tag = tag
        self.values = tuple(values)

    def __len__(self) -> int:
        return len(self.values)

    @overload
    def __getitem__(self, index: int) -> Data: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[Data, ...]: ...

    def __getitem__(self, index: int | slice) -> Data | tuple[Data, ...]:
        if isinstance(index, slice):
            return tuple(Data(self.tag, value) for value in self.values[index])
        return Data(self.tag, self.values[index])

    def __iter__(self) -> Iterator[Data]:
        tag = self.tag
        return (Data(tag, value) for value in self.values)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Ints):
            return self.tag == other.tag and self.values == other.values
        if isinstance(other, tuple | list):
            return tuple(self) == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return repr(tuple(self))


class Data(NamedTuple):
    """One A-XDR Data value: its tag and the Python value (see the module docstring)."""

    type: DataType
    value: Any

    def __repr__(self) -> str:
        return f"Data({self.type.name}, {self.value!r})"


# ---- helpers for building Data -----------------------------------------------------------------

NULL: Final = Data(DataType.NULL, None)


def array(*items: Data) -> Data:
    return Data(DataType.ARRAY, tuple(items))


def structure(*items: Data) -> Data:
    return Data(DataType.STRUCTURE, tuple(items))


# ---- lengths -----------------------------------------------------------------------------------


def decode_length(buf: bytes, pos: int, warnings: list[str]) -> tuple[int, int]:
    try:
        first = buf[pos]
    except IndexError:
        raise RemoteProtocolError(f"truncated: length expected at offset {pos}") from None
    if first < 0x80:
        return first, pos + 1
    count = first & 0x7F
    if count == 0 or count > 4:
        raise RemoteProtocolError(f"length determinant {first:02X} at offset {pos} is not supported")
    end = pos + 1 + count
    if end > len(buf):
        raise RemoteProtocolError(f"truncated length at offset {pos}")
    length = int.from_bytes(buf[pos + 1 : end], "big")
    if length < 0x80 or buf[pos + 1] == 0:
        warnings.append(f"non-minimal length {buf[pos:end].hex(' ').upper()} at offset {pos} for {length}")
    return length, end


def encode_length(out: bytearray, length: int) -> None:
    if length < 0:
        raise LocalProtocolError("negative length")
    if length < 0x80:
        out.append(length)
    elif length < 0x100:
        out += bytes((0x81, length))
    elif length < 0x10000:
        out += bytes((0x82, length >> 8, length & 0xFF))
    else:
        raise LocalProtocolError(f"length {length} is too large for an APDU")


# ---- decoding ----------------------------------------------------------------------------------


def _need(buf: bytes, pos: int, size: int, what: str) -> int:
    end = pos + size
    if end > len(buf):
        raise RemoteProtocolError(f"truncated {what} at offset {pos}: needs {size} bytes, {len(buf) - pos} left")
    return end


def _u8(buf: bytes, pos: int, what: str = "byte") -> int:
    try:
        return buf[pos]
    except IndexError:
        raise RemoteProtocolError(f"truncated {what} at offset {pos}") from None


def _u16(buf: bytes, pos: int) -> int:
    _need(buf, pos, 2, "long-unsigned")
    return (buf[pos] << 8) | buf[pos + 1]


# Decoded OADs are shared, one object per OAD: a gateway asks the same few dozen over and over.
OADS: Final[dict[int, OAD]] = {}
_MAX_OADS: Final = 4096  # bounds what a peer sending arbitrary OADs can make it hold


def oad_of(key: int) -> OAD:
    """The OAD whose four wire bytes read as a big-endian ``key`` (``OADS.get(key)`` first is
    quicker when the OAD has been seen)."""
    oad = OADS.get(key)
    if oad is None:
        if len(OADS) >= _MAX_OADS:
            OADS.clear()
        oad = OADS[key] = OAD(key >> 16, (key >> 8) & 0xFF, key & 0xFF)
    return oad


def decode_oad(buf: bytes, pos: int) -> tuple[OAD, int]:
    end = _need(buf, pos, 4, "OAD")
    return OAD((buf[pos] << 8) | buf[pos + 1], buf[pos + 2], buf[pos + 3]), end


def decode_omd(buf: bytes, pos: int) -> tuple[OMD, int]:
    end = _need(buf, pos, 4, "OMD")
    return OMD((buf[pos] << 8) | buf[pos + 1], buf[pos + 2], buf[pos + 3]), end


def decode_road(buf: bytes, pos: int, warnings: list[str]) -> tuple[ROAD, int]:
    oad, pos = decode_oad(buf, pos)
    count, pos = decode_length(buf, pos, warnings)
    oads = []
    for _ in range(count):
        item, pos = decode_oad(buf, pos)
        oads.append(item)
    return ROAD(oad, tuple(oads)), pos


def decode_csd(buf: bytes, pos: int, warnings: list[str]) -> tuple[CSD, int]:
    choice = _u8(buf, pos, "CSD")
    if choice == 0:
        return decode_oad(buf, pos + 1)
    if choice == 1:
        return decode_road(buf, pos + 1, warnings)
    raise RemoteProtocolError(f"CSD choice {choice} at offset {pos} is not 0 (OAD) or 1 (ROAD)")


def decode_rcsd(buf: bytes, pos: int, warnings: list[str]) -> tuple[RCSD, int]:
    count, pos = decode_length(buf, pos, warnings)
    columns = []
    for _ in range(count):
        csd, pos = decode_csd(buf, pos, warnings)
        columns.append(csd)
    return RCSD(tuple(columns)), pos


def decode_octets(buf: bytes, pos: int, warnings: list[str]) -> tuple[bytes, int]:
    length, pos = decode_length(buf, pos, warnings)
    end = _need(buf, pos, length, "octet-string")
    return buf[pos:end], end


def decode_tsa(buf: bytes, pos: int, warnings: list[str]) -> tuple[TSA, int]:
    content, end = decode_octets(buf, pos, warnings)
    if not content:
        return TSA(None), end
    af = content[0]
    sa = content[1:]
    expected = (af & 0x0F) + 1
    if len(sa) != expected:
        warnings.append(f"TSA at offset {pos}: AF says {expected} address bytes, {len(sa)} present")
        if not 1 <= len(sa) <= 16:
            raise RemoteProtocolError(f"TSA at offset {pos} has {len(sa)} address bytes")
    return TSA(ServerAddress(sa, AddressType(af >> 6), (af >> 4) & 3)), end


def decode_ti(buf: bytes, pos: int) -> tuple[TI, int]:
    end = _need(buf, pos, 3, "TI")
    return TI(buf[pos], (buf[pos + 1] << 8) | buf[pos + 2]), end


def decode_date_time_s(buf: bytes, pos: int) -> tuple[DateTimeS, int]:
    end = _need(buf, pos, 7, "date_time_s")
    b = buf
    return DateTimeS((b[pos] << 8) | b[pos + 1], b[pos + 2], b[pos + 3], b[pos + 4], b[pos + 5], b[pos + 6]), end


def decode_date_time(buf: bytes, pos: int) -> tuple[DateTime, int]:
    end = _need(buf, pos, 10, "date_time")
    b = buf
    return (
        DateTime(
            (b[pos] << 8) | b[pos + 1],
            b[pos + 2],
            b[pos + 3],
            b[pos + 4],
            b[pos + 5],
            b[pos + 6],
            b[pos + 7],
            (b[pos + 8] << 8) | b[pos + 9],
        ),
        end,
    )


def decode_ms(buf: bytes, pos: int, warnings: list[str], depth: int = 0) -> tuple[MS, int]:
    choice = _u8(buf, pos, "MS")
    pos += 1
    if choice in (0, 1):
        return MS(choice), pos
    if choice > 7:
        raise RemoteProtocolError(f"MS choice {choice} at offset {pos - 1} is not defined")
    count, pos = decode_length(buf, pos, warnings)
    items: list[Any] = []
    for _ in range(count):
        item: Any
        if choice == 2:
            item = _u8(buf, pos, "MS user type")
            pos += 1
        elif choice == 3:
            item, pos = decode_tsa(buf, pos, warnings)
        elif choice == 4:
            item = _u16(buf, pos)
            pos += 2
        else:
            item, pos = decode_region(buf, pos, warnings, depth)
        items.append(item)
    return MS(choice, tuple(items)), pos


def _check_depth(depth: int, pos: int) -> None:
    # Region, RSD and MS hold Data too: nesting through them counts like arrays' (stack exhaustion)
    if depth >= MAX_DEPTH:
        raise RemoteProtocolError(f"Data nested deeper than {MAX_DEPTH} at offset {pos}")


def decode_region(buf: bytes, pos: int, warnings: list[str], depth: int) -> tuple[Region, int]:
    _check_depth(depth, pos)
    unit = _u8(buf, pos, "Region")
    start, pos = decode_data(buf, pos + 1, warnings, depth + 1)
    end, pos = decode_data(buf, pos, warnings, depth + 1)
    return Region(unit, start, end), pos


def decode_rsd(buf: bytes, pos: int, warnings: list[str], depth: int = 0) -> tuple[RSD, int]:
    _check_depth(depth, pos)
    selector = _u8(buf, pos, "RSD")
    pos += 1
    value: SelectorValue
    if selector == 0:
        value = None
    elif selector == 1:
        oad, pos = decode_oad(buf, pos)
        data, pos = decode_data(buf, pos, warnings, depth + 1)
        value = Selector1(oad, data)
    elif selector == 2:
        value, pos = _decode_selector2(buf, pos, warnings, depth)
    elif selector == 3:
        count, pos = decode_length(buf, pos, warnings)
        items = []
        for _ in range(count):
            item, pos = _decode_selector2(buf, pos, warnings, depth)
            items.append(item)
        value = tuple(items)
    elif selector in (4, 5):
        when, pos = decode_date_time_s(buf, pos)
        ms, pos = decode_ms(buf, pos, warnings, depth)
        value = SelectorTimeMS(when, ms)
    elif selector in (6, 7, 8):
        start, pos = decode_date_time_s(buf, pos)
        end, pos = decode_date_time_s(buf, pos)
        ti, pos = decode_ti(buf, pos)
        ms, pos = decode_ms(buf, pos, warnings, depth)
        value = SelectorRangeMS(start, end, ti, ms)
    elif selector == 9:
        value = SelectorLast(_u8(buf, pos, "Selector9"))
        pos += 1
    elif selector == 10:
        n = _u8(buf, pos, "Selector10")
        ms, pos = decode_ms(buf, pos + 1, warnings, depth)
        value = SelectorLastMS(n, ms)
    else:
        raise RemoteProtocolError(f"RSD selector {selector} at offset {pos - 1} is not defined")
    return RSD(selector, value), pos


def _decode_selector2(buf: bytes, pos: int, warnings: list[str], depth: int) -> tuple[Selector2, int]:
    oad, pos = decode_oad(buf, pos)
    start, pos = decode_data(buf, pos, warnings, depth + 1)
    end, pos = decode_data(buf, pos, warnings, depth + 1)
    interval, pos = decode_data(buf, pos, warnings, depth + 1)
    return Selector2(oad, start, end, interval), pos


_FIXED_INT: Final[dict[int, tuple[int, bool]]] = {
    DataType.DOUBLE_LONG: (4, True),
    DataType.DOUBLE_LONG_UNSIGNED: (4, False),
    DataType.INTEGER: (1, True),
    DataType.LONG: (2, True),
    DataType.UNSIGNED: (1, False),
    DataType.LONG_UNSIGNED: (2, False),
    DataType.LONG64: (8, True),
    DataType.LONG64_UNSIGNED: (8, False),
    DataType.ENUM: (1, False),
    DataType.OI: (2, False),
}

_TYPES: Final = {int(t): t for t in DataType}


# Decoding looks a type byte up in a per-byte table rather than a dict keyed by the IntEnum
# (whose hash runs Python code), and builds Data with tuple.__new__, skipping the NamedTuple's
# own Python-level __new__: both run for every element of every reply.
_BY_BYTE: Final[tuple[DataType | None, ...]] = tuple(_TYPES.get(b) for b in range(256))
# A fixed-size integer is read with a precompiled big-endian struct: no slice, no keyword call.
_INT_FORMATS: Final = {(1, True): "b", (1, False): "B", (2, True): "h", (2, False): "H",
                       (4, True): "i", (4, False): "I", (8, True): "q", (8, False): "Q"}  # fmt: skip
_Unpack = Callable[[bytes, int], tuple[int, ...]]


class _Fixed(NamedTuple):
    """A fixed-size integer type: its tag, size in bytes, struct code and one-value unpacker."""

    tag: DataType
    size: int
    code: str
    unpack: _Unpack


def _fixed_entry(code: int) -> _Fixed | None:
    tag = _TYPES.get(code)
    if tag is None or tag not in _FIXED_INT:
        return None
    size, signed = _FIXED_INT[tag]
    fmt = _INT_FORMATS[size, signed]
    return _Fixed(tag, size, fmt, struct.Struct(">" + fmt).unpack_from)


_FIXED_BY_BYTE: Final[tuple[_Fixed | None, ...]] = tuple(_fixed_entry(b) for b in range(256))
_new = tuple.__new__
_new_object = object.__new__

# An array or structure of one integer type (energy registers, phase values: most of what a meter
# sends) becomes one Ints: its tags are checked with one strided slice and its values read with
# one struct call; any other sequence is read element by element. The unpackers are compiled on
# first use and kept per (tag, count) up to _MAX_RUN elements (longer runs compile theirs).
_MAX_RUN: Final = 64


class _Run(NamedTuple):
    tags: bytes  # the tag byte every ``stride`` bytes, as the run must read
    stride: int  # bytes per element: tag and value
    size: int  # bytes of the whole run
    unpack: _Unpack  # the values, tags skipped
    tag: DataType  # the elements' type


_RUNS: Final[dict[int, _Run]] = {}  # by count << 8 | tag byte


def _run(code: int, count: int) -> _Run | None:
    """The reader of ``count`` elements of integer type ``code`` (None for other types)."""
    fixed = _FIXED_BY_BYTE[code]
    if fixed is None:
        return None
    stride = 1 + fixed.size
    unpack = struct.Struct(">" + ("x" + fixed.code) * count).unpack_from
    run = _Run(bytes((code,)) * count, stride, stride * count, unpack, fixed.tag)
    if count <= _MAX_RUN:
        _RUNS[count << 8 | code] = run
    return run


def decode_data(buf: bytes, pos: int, warnings: list[str], depth: int = 0) -> tuple[Data, int]:
    """Decode one tagged Data at ``pos``."""
    try:
        code = buf[pos]
    except IndexError:
        raise RemoteProtocolError(f"truncated: Data expected at offset {pos}") from None
    pos += 1
    fixed = _FIXED_BY_BYTE[code]
    if fixed is not None:
        tag, size, _, unpack = fixed
        end = pos + size
        if end > len(buf):
            raise RemoteProtocolError(f"truncated {tag.name.lower()} at offset {pos}")
        return _new(Data, (tag, unpack(buf, pos)[0])), end
    if code in _SEQUENCE_CODES:  # array or structure: its length, then its elements
        if depth >= MAX_DEPTH:
            raise RemoteProtocolError(f"Data nested deeper than {MAX_DEPTH} at offset {pos}")
        n = len(buf)
        count = buf[pos] if pos < n else 0x80  # a one-byte length inline; decode_length does the rest
        if count < 0x80:
            pos += 1
        else:
            count, pos = decode_length(buf, pos, warnings)
        if count > n - pos:  # every element takes at least one byte: refuse before allocating
            what = DataType(code).name.lower()
            raise RemoteProtocolError(f"{what} of {count} elements at offset {pos} exceeds the data")
        if not count:
            return _new(Data, (_BY_BYTE[code], ())), pos
        first = buf[pos]
        run = _RUNS.get(count << 8 | first) or _run(first, count)
        if run is not None:
            tags, stride, size, unpack, tag = run
            end = pos + size
            if end <= n and buf[pos:end:stride] == tags:
                ints = _new_object(Ints)  # Ints without its __init__: this runs for most values
                ints.tag = tag
                ints.values = unpack(buf, pos)
                return _new(Data, (_BY_BYTE[code], ints)), end
        elements, pos = _decode_elements(buf, pos, count, warnings, depth + 1)
        return _new(Data, (_BY_BYTE[code], elements)), pos
    decoder = _DECODER_BY_BYTE[code]
    if decoder is None:
        raise RemoteProtocolError(f"unknown Data type {code} at offset {pos - 1}")
    value, pos = decoder(buf, pos, warnings, depth)
    return _new(Data, (_BY_BYTE[code], value)), pos


_SEQUENCE_CODES: Final = frozenset({int(DataType.ARRAY), int(DataType.STRUCTURE)})


def _decode_elements(buf: bytes, pos: int, count: int, warnings: list[str], depth: int) -> tuple[tuple[Data, ...], int]:
    """The ``count`` elements of an array or structure that is not an :class:`Ints`, one by one."""
    n = len(buf)
    items: list[Data] = []
    append = items.append
    for _ in range(count):
        element = _FIXED_BY_BYTE[buf[pos]] if pos < n else None
        if element is not None:  # an integer among other types: inline, no recursion
            tag, size, _, unpack = element
            pos += 1
            end = pos + size
            if end > n:
                raise RemoteProtocolError(f"truncated {tag.name.lower()} at offset {pos}")
            append(_new(Data, (tag, unpack(buf, pos)[0])))
            pos = end
        else:
            item, pos = decode_data(buf, pos, warnings, depth)
            append(item)
    return tuple(items), pos


def _d_null(buf: bytes, pos: int, w: list[str], d: int) -> tuple[Any, int]:
    return None, pos


def _d_bool(buf: bytes, pos: int, w: list[str], d: int) -> tuple[Any, int]:
    value = _u8(buf, pos, "bool")
    if value not in (0, 1):
        w.append(f"bool value {value:02X} at offset {pos} is not 00 or 01")
    return value != 0, pos + 1


def _d_bits(buf: bytes, pos: int, w: list[str], d: int) -> tuple[Any, int]:
    bits, pos = decode_length(buf, pos, w)
    end = _need(buf, pos, (bits + 7) // 8, "bit-string")
    return BitString(bits, buf[pos:end]), end


def _d_octets(buf: bytes, pos: int, w: list[str], d: int) -> tuple[Any, int]:
    return decode_octets(buf, pos, w)


def _d_visible(buf: bytes, pos: int, w: list[str], d: int) -> tuple[Any, int]:
    raw, end = decode_octets(buf, pos, w)
    return raw.decode("latin-1"), end


def _d_utf8(buf: bytes, pos: int, w: list[str], d: int) -> tuple[Any, int]:
    raw, end = decode_octets(buf, pos, w)
    try:
        return raw.decode("utf-8"), end
    except UnicodeDecodeError:
        w.append(f"UTF8-string at offset {pos} is not valid UTF-8")
        return raw.decode("utf-8", "replace"), end


def _d_float32(buf: bytes, pos: int, w: list[str], d: int) -> tuple[Any, int]:
    end = _need(buf, pos, 4, "float32")
    return struct.unpack_from(">f", buf, pos)[0], end


def _d_float64(buf: bytes, pos: int, w: list[str], d: int) -> tuple[Any, int]:
    end = _need(buf, pos, 8, "float64")
    return struct.unpack_from(">d", buf, pos)[0], end


def _d_date(buf: bytes, pos: int, w: list[str], d: int) -> tuple[Any, int]:
    end = _need(buf, pos, 5, "date")
    return Date((buf[pos] << 8) | buf[pos + 1], buf[pos + 2], buf[pos + 3], buf[pos + 4]), end


def _d_time(buf: bytes, pos: int, w: list[str], d: int) -> tuple[Any, int]:
    end = _need(buf, pos, 3, "time")
    return Time(buf[pos], buf[pos + 1], buf[pos + 2]), end


def _d_scaler_unit(buf: bytes, pos: int, w: list[str], d: int) -> tuple[Any, int]:
    end = _need(buf, pos, 2, "Scaler_Unit")
    return ScalerUnit(int.from_bytes(buf[pos : pos + 1], "big", signed=True), buf[pos + 1]), end


def _d_sid(buf: bytes, pos: int, w: list[str], d: int) -> tuple[Any, int]:
    end = _need(buf, pos, 4, "SID")
    extra, end = decode_octets(buf, end, w)
    return SID(int.from_bytes(buf[pos : pos + 4], "big"), extra), end


def _d_sid_mac(buf: bytes, pos: int, w: list[str], d: int) -> tuple[Any, int]:
    sid, pos = _d_sid(buf, pos, w, d)
    mac, pos = decode_octets(buf, pos, w)
    return SIDMAC(sid, mac), pos


def _d_comdcb(buf: bytes, pos: int, w: list[str], d: int) -> tuple[Any, int]:
    end = _need(buf, pos, 5, "COMDCB")
    return COMDCB(*buf[pos:end]), end


_Decoder = Callable[[bytes, int, list[str], int], tuple[Any, int]]

_DECODERS: Final[dict[DataType, _Decoder]] = {
    DataType.NULL: _d_null,
    DataType.BOOL: _d_bool,
    DataType.BIT_STRING: _d_bits,
    DataType.OCTET_STRING: _d_octets,
    DataType.VISIBLE_STRING: _d_visible,
    DataType.UTF8_STRING: _d_utf8,
    DataType.FLOAT32: _d_float32,
    DataType.FLOAT64: _d_float64,
    DataType.DATE_TIME: lambda b, p, w, d: decode_date_time(b, p),
    DataType.DATE: _d_date,
    DataType.TIME: _d_time,
    DataType.DATE_TIME_S: lambda b, p, w, d: decode_date_time_s(b, p),
    DataType.OAD: lambda b, p, w, d: decode_oad(b, p),
    DataType.ROAD: lambda b, p, w, d: decode_road(b, p, w),
    DataType.OMD: lambda b, p, w, d: decode_omd(b, p),
    DataType.TI: lambda b, p, w, d: decode_ti(b, p),
    DataType.TSA: lambda b, p, w, d: decode_tsa(b, p, w),
    DataType.MAC: _d_octets,
    DataType.RN: _d_octets,
    DataType.REGION: decode_region,
    DataType.SCALER_UNIT: _d_scaler_unit,
    DataType.RSD: decode_rsd,
    DataType.CSD: lambda b, p, w, d: decode_csd(b, p, w),
    DataType.MS: decode_ms,
    DataType.SID: _d_sid,
    DataType.SID_MAC: _d_sid_mac,
    DataType.COMDCB: _d_comdcb,
    DataType.RCSD: lambda b, p, w, d: decode_rcsd(b, p, w),
}

_DECODER_BY_BYTE: Final[tuple[_Decoder | None, ...]] = tuple(
    None if tag is None else _DECODERS.get(tag) for tag in _BY_BYTE
)


def parse_data(raw: bytes) -> tuple[Data, tuple[str, ...]]:
    """Decode exactly one Data from ``raw``; returns it and the decoding warnings."""
    warnings: list[str] = []
    data, end = decode_data(raw, 0, warnings)
    if end != len(raw):
        raise RemoteProtocolError(f"{len(raw) - end} bytes after the Data value")
    return data, tuple(warnings)


# ---- encoding ----------------------------------------------------------------------------------


def _check_int(value: object, size: int, signed: bool, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise LocalProtocolError(f"{what} needs an int, got {type(value).__name__}")
    bits = size * 8
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    if not low <= value <= high:
        raise LocalProtocolError(f"{what} value {value} is outside {low}..{high}")
    return value


def _int_bytes(value: object, size: int, signed: bool, what: str) -> bytes:
    return _check_int(value, size, signed, what).to_bytes(size, "big", signed=signed)


def encode_oad(out: bytearray, oad: OAD) -> None:
    out += _int_bytes(oad.oi, 2, False, "OI")
    out += _int_bytes(oad.attribute, 1, False, "OAD attribute")
    out += _int_bytes(oad.index, 1, False, "OAD index")


def encode_omd(out: bytearray, omd: OMD) -> None:
    out += _int_bytes(omd.oi, 2, False, "OI")
    out += _int_bytes(omd.method, 1, False, "OMD method")
    out += _int_bytes(omd.mode, 1, False, "OMD mode")


def encode_road(out: bytearray, road: ROAD) -> None:
    encode_oad(out, road.oad)
    encode_length(out, len(road.oads))
    for oad in road.oads:
        encode_oad(out, oad)


def encode_csd(out: bytearray, csd: CSD) -> None:
    if isinstance(csd, ROAD):
        out.append(1)
        encode_road(out, csd)
    elif isinstance(csd, OAD):
        out.append(0)
        encode_oad(out, csd)
    else:
        raise LocalProtocolError(f"a CSD is an OAD or a ROAD, got {type(csd).__name__}")


def encode_rcsd(out: bytearray, rcsd: RCSD | tuple[CSD, ...]) -> None:
    columns = rcsd.columns if isinstance(rcsd, RCSD) else rcsd
    encode_length(out, len(columns))
    for csd in columns:
        encode_csd(out, csd)


def encode_octets(out: bytearray, value: bytes) -> None:
    if not isinstance(value, bytes | bytearray):
        raise LocalProtocolError(f"octet-string needs bytes, got {type(value).__name__}")
    encode_length(out, len(value))
    out += value


def encode_tsa(out: bytearray, tsa: TSA) -> None:
    if tsa.address is None:
        out.append(0)
        return
    out.append(len(tsa.address.wire) + 1)
    out.append(tsa.address.af)
    out += tsa.address.wire


def encode_ti(out: bytearray, ti: TI) -> None:
    out += _int_bytes(ti.unit, 1, False, "TI unit")
    out += _int_bytes(ti.interval, 2, False, "TI interval")


def encode_date_time_s(out: bytearray, t: DateTimeS) -> None:
    out += _int_bytes(t.year, 2, False, "year")
    for part in t[1:]:
        out += _int_bytes(part, 1, False, "date_time_s field")


def encode_date_time(out: bytearray, t: DateTime) -> None:
    out += _int_bytes(t.year, 2, False, "year")
    for part in t[1:7]:
        out += _int_bytes(part, 1, False, "date_time field")
    out += _int_bytes(t.millisecond, 2, False, "milliseconds")


def encode_ms(out: bytearray, ms: MS) -> None:
    out += _int_bytes(ms.choice, 1, False, "MS choice")
    if ms.choice in (0, 1):
        return
    if not 2 <= ms.choice <= 7:
        raise LocalProtocolError(f"MS choice {ms.choice} is not defined")
    encode_length(out, len(ms.items))
    for item in ms.items:
        if ms.choice == 2:
            out += _int_bytes(item, 1, False, "MS user type")
        elif ms.choice == 3:
            encode_tsa(out, item)
        elif ms.choice == 4:
            out += _int_bytes(item, 2, False, "MS config number")
        else:
            encode_region(out, item)


def encode_region(out: bytearray, region: Region) -> None:
    out += _int_bytes(region.unit, 1, False, "Region unit")
    encode_data(out, region.start)
    encode_data(out, region.end)


def encode_rsd(out: bytearray, rsd: RSD) -> None:
    out += _int_bytes(rsd.selector, 1, False, "RSD selector")
    value = rsd.value
    match rsd.selector, value:
        case 0, None:
            pass
        case 1, Selector1(oad=oad, value=data):
            encode_oad(out, oad)
            encode_data(out, data)
        case 2, Selector2():
            _encode_selector2(out, value)
        case 3, tuple():
            encode_length(out, len(value))
            for item in value:
                if not isinstance(item, Selector2):
                    raise LocalProtocolError("selector 3 is a sequence of Selector2")
                _encode_selector2(out, item)
        case 4 | 5, SelectorTimeMS(time=when, ms=ms):
            encode_date_time_s(out, when)
            encode_ms(out, ms)
        case 6 | 7 | 8, SelectorRangeMS(start=start, end=end, interval=ti, ms=ms):
            encode_date_time_s(out, start)
            encode_date_time_s(out, end)
            encode_ti(out, ti)
            encode_ms(out, ms)
        case 9, SelectorLast(n=n):
            out += _int_bytes(n, 1, False, "Selector9")
        case 10, SelectorLastMS(n=n, ms=ms):
            out += _int_bytes(n, 1, False, "Selector10")
            encode_ms(out, ms)
        case _:
            raise LocalProtocolError(f"RSD selector {rsd.selector} does not take {type(value).__name__}")


def _encode_selector2(out: bytearray, s: Selector2) -> None:
    encode_oad(out, s.oad)
    encode_data(out, s.start)
    encode_data(out, s.end)
    encode_data(out, s.interval)


def _e_null(out: bytearray, value: Any, depth: int) -> None:
    if value is not None:
        raise LocalProtocolError("null carries no value")


def _e_sequence(out: bytearray, value: Any, depth: int, tag: DataType) -> None:
    if depth >= MAX_DEPTH:
        raise LocalProtocolError(f"Data nested deeper than {MAX_DEPTH}")
    if not isinstance(value, tuple | list | Ints):
        raise LocalProtocolError(f"{tag.name.lower()} needs a tuple of Data")
    encode_length(out, len(value))
    for item in value:
        encode_data(out, item, depth + 1)


def _e_bool(out: bytearray, value: Any, depth: int) -> None:
    if not isinstance(value, bool):
        raise LocalProtocolError("bool needs a bool")
    out.append(1 if value else 0)


def _e_bits(out: bytearray, value: Any, depth: int) -> None:
    if not isinstance(value, BitString) or len(value.data) != (value.length + 7) // 8:
        raise LocalProtocolError("bit-string needs a BitString whose data holds exactly its bits")
    encode_length(out, value.length)
    out += value.data


def _e_visible(out: bytearray, value: Any, depth: int) -> None:
    if not isinstance(value, str) or not value.isascii():
        raise LocalProtocolError("visible-string needs an ASCII str")
    encode_octets(out, value.encode("ascii"))


def _e_utf8(out: bytearray, value: Any, depth: int) -> None:
    if not isinstance(value, str):
        raise LocalProtocolError("UTF8-string needs a str")
    encode_octets(out, value.encode("utf-8"))


def _e_float32(out: bytearray, value: Any, depth: int) -> None:
    if not isinstance(value, float | int) or (math.isfinite(value) and abs(value) > 3.4028234663852886e38):
        raise LocalProtocolError("float32 value out of range")
    out += struct.pack(">f", value)


def _e_float64(out: bytearray, value: Any, depth: int) -> None:
    if not isinstance(value, float | int):
        raise LocalProtocolError("float64 needs a float")
    out += struct.pack(">d", value)


def _e_date(out: bytearray, value: Any, depth: int) -> None:
    out += _int_bytes(value.year, 2, False, "year")
    for part in value[1:]:
        out += _int_bytes(part, 1, False, "date field")


def _e_bytes_of(what: str) -> _Encoder:
    """An encoder for the types that are a fixed run of unsigned bytes (TIME, COMDCB)."""

    def encode(out: bytearray, value: Any, depth: int) -> None:
        for part in value:
            out += _int_bytes(part, 1, False, what)

    return encode


def _e_scaler_unit(out: bytearray, value: Any, depth: int) -> None:
    out += _int_bytes(value.scaler, 1, True, "scaler")
    out += _int_bytes(value.unit, 1, False, "unit")


def _e_sid(out: bytearray, value: Any, depth: int) -> None:
    out += _int_bytes(value.ident, 4, False, "SID")
    encode_octets(out, value.extra)


def _e_sid_mac(out: bytearray, value: Any, depth: int) -> None:
    _e_sid(out, value.sid, depth)
    encode_octets(out, value.mac)


_Encoder = Callable[[bytearray, Any, int], None]

# Array and structure are absent: they carry their tag into the error text, see encode_data.
_ENCODERS: Final[dict[DataType, _Encoder]] = {
    DataType.NULL: _e_null,
    DataType.BOOL: _e_bool,
    DataType.BIT_STRING: _e_bits,
    DataType.OCTET_STRING: lambda o, v, d: encode_octets(o, v),
    DataType.VISIBLE_STRING: _e_visible,
    DataType.UTF8_STRING: _e_utf8,
    DataType.FLOAT32: _e_float32,
    DataType.FLOAT64: _e_float64,
    DataType.DATE_TIME: lambda o, v, d: encode_date_time(o, v),
    DataType.DATE: _e_date,
    DataType.TIME: _e_bytes_of("time field"),
    DataType.DATE_TIME_S: lambda o, v, d: encode_date_time_s(o, v),
    DataType.OAD: lambda o, v, d: encode_oad(o, v),
    DataType.ROAD: lambda o, v, d: encode_road(o, v),
    DataType.OMD: lambda o, v, d: encode_omd(o, v),
    DataType.TI: lambda o, v, d: encode_ti(o, v),
    DataType.TSA: lambda o, v, d: encode_tsa(o, v),
    DataType.MAC: lambda o, v, d: encode_octets(o, v),
    DataType.RN: lambda o, v, d: encode_octets(o, v),
    DataType.REGION: lambda o, v, d: encode_region(o, v),
    DataType.SCALER_UNIT: _e_scaler_unit,
    DataType.RSD: lambda o, v, d: encode_rsd(o, v),
    DataType.CSD: lambda o, v, d: encode_csd(o, v),
    DataType.MS: lambda o, v, d: encode_ms(o, v),
    DataType.SID: _e_sid,
    DataType.SID_MAC: _e_sid_mac,
    DataType.COMDCB: _e_bytes_of("COMDCB field"),
    DataType.RCSD: lambda o, v, d: encode_rcsd(o, v),
}


def encode_data(out: bytearray, data: Data, depth: int = 0) -> None:
    """Append one tagged Data, strictly (minimal lengths, values in range)."""
    tag = data.type
    value = data.value
    out.append(tag)
    fixed = _FIXED_INT.get(tag)
    if fixed is not None:
        out += _int_bytes(value, fixed[0], fixed[1], tag.name.lower())
        return
    if tag is DataType.ARRAY or tag is DataType.STRUCTURE:
        _e_sequence(out, value, depth, tag)
        return
    encoder = _ENCODERS.get(tag)
    if encoder is None:  # pragma: no cover - every DataType has an encoder
        raise LocalProtocolError(f"cannot encode {tag!r}")
    encoder(out, value, depth)


def data_bytes(data: Data) -> bytes:
    """The A-XDR bytes of one Data."""
    out = bytearray()
    encode_data(out, data)
    return bytes(out)


# ---- JSON-able view ----------------------------------------------------------------------------


def plain(value: object) -> Any:
    """A JSON-able form of a Data (or a descriptor): numbers stay numbers, arrays and structures
    become lists, octet-strings hex, descriptors and times their printed form."""
    if isinstance(value, Data):
        value = value.value
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, bytes):
        return value.hex().upper()
    if isinstance(value, OAD | OMD | BitString | DateTime | DateTimeS | Date | Time):
        return str(value)
    if isinstance(value, ROAD):
        return {"oad": str(value.oad), "oads": [str(o) for o in value.oads]}
    if isinstance(value, TSA):
        return None if value.address is None else str(value.address)
    if isinstance(value, RCSD):
        return [plain(c) for c in value.columns]
    if isinstance(value, Ints):
        return list(value.values)
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return [plain(v) for v in value]
    if isinstance(value, tuple):  # the other NamedTuples: field -> plain value
        return {name: plain(getattr(value, name)) for name in getattr(value, "_fields", ())}
    return repr(value)  # pragma: no cover

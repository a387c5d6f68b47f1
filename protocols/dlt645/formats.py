"""DL/T 645 value formats: the byte layouts named in the standard's data tables.

A format is named the way DL/T 645-2007 Appendix A (and DL/T 645-1997 Appendix A) prints it, most
significant digit first. The bytes handled here are the data field *after* the frame layer took
the +0x33 offset off, in wire order: least significant byte first.

Numeric BCD formats are any run of ``X`` with an optional decimal point (``XXXXXX.XX``, ``XXX.X``,
``XXX``, ``XX.XXXX``...): ``ceil(digits / 2)`` bytes of packed BCD. A leading ``±`` marks the
signed variant (``±XX.XXXX``): the standard puts the sign in the top bit of the most significant
byte (0 positive, 1 negative) for power, current, power factor and the combined energies and
demands (2007 Appendix A notes to Tables A.1-A.3). Signedness is part of the format name so the
catalogue states it for every data item; it is never guessed from the bytes.

Other formats:

===================  =====  ===============================================================
name                 bytes  decoded value
===================  =====  ===============================================================
``YYMMDDWW``         4      :class:`MeterDate` (date and the meter's weekday, 0 = Sunday)
``hhmmss``           3      :class:`datetime.time`
``YYMMDDhhmm``       5      naive :class:`datetime.datetime`, or None when all bytes are 0
``YYMMDDhhmmss``     6      naive :class:`datetime.datetime`, or None when all bytes are 0
``MMDDhhmm``         4      ``"--MM-DDThh:mm"`` (ISO 8601 without a year), or None when all 0
``NN`` / ``NNNN``    1 / 2  int: a binary status byte / word (not BCD), little-endian
``NNNNNNNN``         4      str of 8 digits in printed order (operator code)
``NNNNNNNNNNNN``     6      str of 12 digits in printed order (address, meter number)
===================  =====  ===============================================================

Meters report "never happened" (no demand yet, no event yet) as an all-zero timestamp, so those
decode to None instead of failing. Identifier formats (``NNNNNNNN``...) decode to the hex digits
of the bytes: for conforming meters that is the decimal code, and a non-BCD code (some meters
use FFFFFFFF for local operations) is shown as it is rather than losing the whole record.

Decoded numbers are ``int`` for formats without decimals and ``float`` otherwise, computed as the
exact BCD integer divided by a power of ten (the nearest float to the decimal the meter sent).
:func:`encode_field` rounds to the format's resolution on the decimal value (half-even), so
``decode_field(f, encode_field(f, decode_field(f, raw))) == decode_field(f, raw)`` always holds.

Errors: bytes that do not fit the format raise :class:`RemoteProtocolError`; a value that does
not fit, or an unknown format name, raises :class:`LocalProtocolError`. Nothing else escapes.
"""

from __future__ import annotations

import datetime
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Final, Protocol, TypeAlias

from meter_gateway.protocols.dlt645.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "FieldValue",
    "MeterDate",
    "decode_field",
    "encode_field",
    "field_decoder",
    "format_length",
    "format_names",
    "is_signed",
    "json_fields",
    "json_value",
]


@dataclass(frozen=True, slots=True)
class MeterDate:
    """A ``YYMMDDWW`` value: the date and the weekday exactly as the meter keeps them.

    The weekday (0 = Sunday ... 6 = Saturday) is set separately from the date on a meter, so it is
    kept rather than recomputed: a meter whose weekday disagrees with its date shows that.
    """

    date: datetime.date
    weekday: int

    @classmethod
    def of(cls, date: datetime.date) -> MeterDate:
        """The date with the weekday it really has."""
        return cls(date, date.isoweekday() % 7)

    def __str__(self) -> str:
        return self.date.isoformat()


FieldValue: TypeAlias = int | float | str | datetime.datetime | datetime.date | datetime.time | MeterDate | None
"""What :func:`decode_field` returns (and :func:`encode_field` accepts; it also takes Decimal)."""

JsonScalar: TypeAlias = int | float | str | bool | None


class _Format(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def length(self) -> int: ...

    def decode(self, raw: bytes) -> FieldValue: ...

    def encode(self, value: object) -> bytes: ...


def _not_bcd(name: str, raw: bytes) -> RemoteProtocolError:
    return RemoteProtocolError(f"{name}: {raw.hex(' ').upper()} is not valid BCD")


def _bcd_pairs(name: str, raw: bytes) -> list[int]:
    """Each byte as a two-digit decimal number, wire order kept."""
    out = []
    for byte in raw:
        high, low = byte >> 4, byte & 0x0F
        if high > 9 or low > 9:
            raise _not_bcd(name, raw)
        out.append(high * 10 + low)
    return out


def _pairs_to_bcd(pairs: list[int]) -> bytes:
    return bytes((p // 10) << 4 | (p % 10) for p in pairs)


def _check_naive(name: str, value: datetime.datetime | datetime.time) -> None:
    if value.tzinfo is not None:
        raise LocalProtocolError(f"{name}: meter time is local and naive, got an aware {value!r}")


def _year_pair(name: str, year: int) -> int:
    if not 2000 <= year <= 2099:
        raise LocalProtocolError(f"{name}: year {year} does not fit two digits (2000-2099)")
    return year - 2000


# A float's nearest-integer rounding after scaling agrees with the decimal definition
# (_decimal_number) whenever the scaled float is below 2**40 and not within this of a .5 tie:
# repr() and the multiplication each move the value by at most half an ulp, together < 2**-12 at
# that magnitude, so the float and the decimal value lie on the same side of every tie.
_FAST_FLOAT_LIMIT: Final = 2.0**40
_TIE_MARGIN: Final = 1e-3


def _decimal_number(name: str, decimals: int, value: object) -> int:
    """``value`` in units of ``10**-decimals``, rounded half-even on its decimal value (a float's
    shortest repr, so 2.675 rounds as the 2.675 it prints as): the definition :class:`_Bcd`'s
    fast path must agree with, and the path for anything it is not sure of."""
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
        raise LocalProtocolError(f"{name}: needs a number, got {value!r}")
    try:
        exact = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
        if not exact.is_finite():
            raise LocalProtocolError(f"{name}: {value!r} is not a finite number")
        return int(exact.scaleb(decimals).to_integral_value(rounding=ROUND_HALF_EVEN))
    except (InvalidOperation, OverflowError, ValueError):
        raise LocalProtocolError(f"{name}: {value!r} is not a usable number") from None


class _Bcd:
    """Packed BCD number with ``decimals`` digits after the point; optional sign bit."""

    __slots__ = ("_limit", "_scale", "_sign_bit", "decimals", "digits", "length", "name", "signed")

    def __init__(self, name: str, digits: int, decimals: int, signed: bool) -> None:
        self.name = name
        self.length = (digits + 1) // 2
        self.digits = digits
        self.decimals = decimals
        self.signed = signed
        self._scale: int = 10**decimals  # an exact int: number / scale is the correctly rounded float
        self._limit: int = 10**digits
        if signed and digits == 2 * self.length:
            self._limit = 8 * 10 ** (digits - 1)  # the top digit shares its byte with the sign bit
        self._sign_bit = 0x80 << (8 * (self.length - 1))

    def decode(self, raw: bytes) -> FieldValue:
        negative = False
        if self.signed and raw[-1] & 0x80:
            negative = True
            raw = raw[:-1] + bytes((raw[-1] & 0x7F,))
        text = raw[::-1].hex()
        # str.isdigit() is false for the hex letters a-f, so this is the BCD check.
        if not text.isdigit():
            raise _not_bcd(self.name, raw)
        padding = len(text) - self.digits
        if padding and text[:padding].strip("0"):
            raise RemoteProtocolError(f"{self.name}: {raw.hex(' ').upper()} has more than {self.digits} digits")
        number = int(text)
        if negative:
            number = -number
        return number if self.decimals == 0 else number / self._scale

    def encode(self, value: object) -> bytes:
        number = self._fast_number(value)
        if number is None:
            number = _decimal_number(self.name, self.decimals, value)
        if number < 0 and not self.signed:
            raise LocalProtocolError(f"{self.name}: is unsigned, got {value!r}")
        magnitude = abs(number)
        if magnitude >= self._limit:
            raise LocalProtocolError(f"{self.name}: {value!r} is out of range")
        bcd = int(str(magnitude), 16)  # decimal digits read as hex digits are packed BCD
        if number < 0:
            bcd |= self._sign_bit
        return bcd.to_bytes(self.length, "little")

    def _fast_number(self, value: object) -> int | None:
        """What :func:`_decimal_number` gives, without Decimal, for the plain ints and floats it
        is sure of (see _FAST_FLOAT_LIMIT); None for the rest, errors included."""
        if type(value) is int:
            number = value * self._scale
            # Beyond the format's range the definition decides (and words the error).
            return number if -self._limit < number < self._limit else None
        if type(value) is float:
            scaled = value * self._scale  # the scale is a power of ten <= 1e16: exact as a float
            if -_FAST_FLOAT_LIMIT < scaled < _FAST_FLOAT_LIMIT:  # also false for nan
                rounded = round(scaled)
                if abs(abs(scaled - rounded) - 0.5) > _TIE_MARGIN:
                    return rounded
        return None


class _Binary:
    """Little-endian unsigned binary word (status bytes and words)."""

    __slots__ = ("length", "name")

    def __init__(self, name: str, length: int) -> None:
        self.name = name
        self.length = length

    def decode(self, raw: bytes) -> FieldValue:
        return int.from_bytes(raw, "little")

    def encode(self, value: object) -> bytes:
        if isinstance(value, bool) or not isinstance(value, int):
            raise LocalProtocolError(f"{self.name}: needs an int, got {value!r}")
        if not 0 <= value < 1 << (8 * self.length):
            raise LocalProtocolError(f"{self.name}: {value} does not fit {self.length} byte(s)")
        return value.to_bytes(self.length, "little")


_HEX_DIGITS: Final = re.compile(r"[0-9A-Fa-f]+")


class _Digits:
    """An identifier of 2*length digits, printed most significant first."""

    __slots__ = ("length", "name")

    def __init__(self, name: str, length: int) -> None:
        self.name = name
        self.length = length

    def decode(self, raw: bytes) -> FieldValue:
        return raw[::-1].hex().upper()

    def encode(self, value: object) -> bytes:
        if not isinstance(value, str) or len(value) != 2 * self.length or not _HEX_DIGITS.fullmatch(value):
            raise LocalProtocolError(f"{self.name}: needs a string of {2 * self.length} digits, got {value!r}")
        return bytes.fromhex(value)[::-1]


class _DateWeek:
    """``YYMMDDWW``: wire order WW DD MM YY."""

    name = "YYMMDDWW"
    length = 4

    def decode(self, raw: bytes) -> FieldValue:
        weekday, day, month, year = _bcd_pairs(self.name, raw)
        if weekday > 6:
            raise RemoteProtocolError(f"{self.name}: weekday {weekday} is not 0-6")
        try:
            return MeterDate(datetime.date(2000 + year, month, day), weekday)
        except ValueError:
            raise RemoteProtocolError(f"{self.name}: {raw.hex(' ').upper()} is not a date") from None

    def encode(self, value: object) -> bytes:
        if isinstance(value, str):
            value = _parse_iso(self.name, value, datetime.date.fromisoformat)
        if isinstance(value, datetime.datetime):
            _check_naive(self.name, value)
            value = value.date()
        if isinstance(value, datetime.date):
            value = MeterDate.of(value)
        if not isinstance(value, MeterDate):
            raise LocalProtocolError(f"{self.name}: needs a date, got {value!r}")
        if not 0 <= value.weekday <= 6:
            raise LocalProtocolError(f"{self.name}: weekday {value.weekday} is not 0-6")
        date = value.date
        return _pairs_to_bcd([value.weekday, date.day, date.month, _year_pair(self.name, date.year)])


class _Time:
    """``hhmmss``: wire order ss mm hh. Sub-second parts of a value are dropped."""

    name = "hhmmss"
    length = 3

    def decode(self, raw: bytes) -> FieldValue:
        second, minute, hour = _bcd_pairs(self.name, raw)
        try:
            return datetime.time(hour, minute, second)
        except ValueError:
            raise RemoteProtocolError(f"{self.name}: {raw.hex(' ').upper()} is not a time") from None

    def encode(self, value: object) -> bytes:
        if isinstance(value, str):
            value = _parse_iso(self.name, value, datetime.time.fromisoformat)
        if isinstance(value, datetime.datetime):
            _check_naive(self.name, value)
            value = value.time()
        if not isinstance(value, datetime.time):
            raise LocalProtocolError(f"{self.name}: needs a time, got {value!r}")
        _check_naive(self.name, value)
        return _pairs_to_bcd([value.second, value.minute, value.hour])


class _DateTime:
    """``YYMMDDhhmm`` / ``YYMMDDhhmmss``: wire order [ss] mm hh DD MM YY; all zero means None."""

    __slots__ = ("_seconds", "length", "name")

    def __init__(self, name: str, length: int) -> None:
        self.name = name
        self.length = length
        self._seconds = length == 6

    def decode(self, raw: bytes) -> FieldValue:
        if not any(raw):
            return None
        pairs = _bcd_pairs(self.name, raw)
        second = pairs.pop(0) if self._seconds else 0
        minute, hour, day, month, year = pairs
        try:
            return datetime.datetime(2000 + year, month, day, hour, minute, second)
        except ValueError:
            raise RemoteProtocolError(f"{self.name}: {raw.hex(' ').upper()} is not a date and time") from None

    def encode(self, value: object) -> bytes:
        if value is None:
            return bytes(self.length)
        if isinstance(value, str):
            value = _parse_iso(self.name, value, datetime.datetime.fromisoformat)
        if not isinstance(value, datetime.datetime):
            raise LocalProtocolError(f"{self.name}: needs a datetime or None, got {value!r}")
        _check_naive(self.name, value)
        pairs = [value.minute, value.hour, value.day, value.month, _year_pair(self.name, value.year)]
        if self._seconds:
            pairs.insert(0, value.second)
        return _pairs_to_bcd(pairs)


_MONTH_DAY_TIME: Final = re.compile(r"--(\d\d)-(\d\d)T(\d\d):(\d\d)")


class _MonthDayTime:
    """``MMDDhhmm`` (1997 demand and programming times, no year): wire order mm hh DD MM."""

    name = "MMDDhhmm"
    length = 4

    def decode(self, raw: bytes) -> FieldValue:
        if not any(raw):
            return None
        minute, hour, day, month = _bcd_pairs(self.name, raw)
        if not _valid_month_day_time(month, day, hour, minute):
            raise RemoteProtocolError(f"{self.name}: {raw.hex(' ').upper()} is not a month-day time")
        return f"--{month:02d}-{day:02d}T{hour:02d}:{minute:02d}"

    def encode(self, value: object) -> bytes:
        if value is None:
            return bytes(self.length)
        match = _MONTH_DAY_TIME.fullmatch(value) if isinstance(value, str) else None
        if match is None:
            raise LocalProtocolError(f"{self.name}: needs '--MM-DDThh:mm' or None, got {value!r}")
        month, day, hour, minute = (int(g) for g in match.groups())
        if not _valid_month_day_time(month, day, hour, minute):
            raise LocalProtocolError(f"{self.name}: {value!r} is not a month-day time")
        return _pairs_to_bcd([minute, hour, day, month])


def _valid_month_day_time(month: int, day: int, hour: int, minute: int) -> bool:
    try:
        datetime.date(2000, month, day)  # a leap year, so 02-29 is accepted
    except ValueError:
        return False
    return hour < 24 and minute < 60


def _parse_iso(name: str, text: str, parse: Callable[[str], object]) -> object:
    try:
        return parse(text)
    except ValueError:
        raise LocalProtocolError(f"{name}: {text!r} is not ISO 8601") from None


_NUMERIC_NAME: Final = re.compile(r"(±?)(X+)(?:\.(X+))?")

_FIXED: Final[dict[str, _Format]] = {
    "YYMMDDWW": _DateWeek(),
    "hhmmss": _Time(),
    "YYMMDDhhmm": _DateTime("YYMMDDhhmm", 5),
    "YYMMDDhhmmss": _DateTime("YYMMDDhhmmss", 6),
    "MMDDhhmm": _MonthDayTime(),
    "NN": _Binary("NN", 1),
    "NNNN": _Binary("NNNN", 2),
    "NNNNNNNN": _Digits("NNNNNNNN", 4),
    "NNNNNNNNNNNN": _Digits("NNNNNNNNNNNN", 6),
}

_cache: dict[str, _Format] = dict(_FIXED)
_MAX_DIGITS: Final = 16  # DL/T 645 numbers stop at 8 bytes; this also bounds the cache


def _lookup(fmt: str) -> _Format:
    cached = _cache.get(fmt)
    if cached is not None:
        return cached
    match = _NUMERIC_NAME.fullmatch(fmt) if isinstance(fmt, str) else None
    if match is None:
        raise LocalProtocolError(f"unknown DL/T 645 data format {fmt!r}")
    sign, whole, fraction = match.groups()
    digits = len(whole) + len(fraction or "")
    if digits > _MAX_DIGITS:
        raise LocalProtocolError(f"numeric format {fmt!r} has more than {_MAX_DIGITS} digits")
    parsed = _Bcd(fmt, digits, len(fraction or ""), bool(sign))
    _cache[fmt] = parsed
    return parsed


def _encoder(fmt: str) -> Callable[[object], bytes]:
    """``encode_field(fmt, ·)`` with the format looked up once (the catalogue's encoders); an
    unknown format fails when used, as encode_field does."""
    try:
        return _lookup(fmt).encode
    except LocalProtocolError:
        return functools.partial(encode_field, fmt)


def format_length(fmt: str) -> int:
    """Bytes a value of ``fmt`` takes on the wire."""
    return _lookup(fmt).length


def is_signed(fmt: str) -> bool:
    """Whether ``fmt`` carries a sign bit (only the ``±`` numeric formats do)."""
    found = _lookup(fmt)
    return isinstance(found, _Bcd) and found.signed


def format_names() -> tuple[str, ...]:
    """The non-numeric format names (numeric ones are any ``±?X+(.X+)?``)."""
    return tuple(_FIXED)


def field_decoder(fmt: str) -> tuple[int, Callable[[bytes], FieldValue], bool]:
    """``fmt``'s wire length, its decoder of exactly that many ``bytes``, and whether it is a
    number (a plain int or float, no JSON extras): what a catalogue item compiles its decoding
    from once, so decoding a reply does no look-up by format name."""
    found = _lookup(fmt)
    return found.length, found.decode, isinstance(found, _Bcd)


def decode_field(fmt: str, raw: bytes) -> FieldValue:
    """Decode one value of ``fmt`` from ``raw`` (offset removed, least significant byte first)."""
    found = _lookup(fmt)
    if len(raw) != found.length:
        raise RemoteProtocolError(f"{fmt}: needs {found.length} bytes, got {len(raw)}")
    return found.decode(bytes(raw))


def encode_field(fmt: str, value: object) -> bytes:
    """Encode ``value`` as ``fmt`` (the inverse of :func:`decode_field`)."""
    return _lookup(fmt).encode(value)


def json_value(value: object) -> JsonScalar:
    """A decoded value as a JSON scalar: dates, times and datetimes become ISO 8601 text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, MeterDate):
        return value.date.isoformat()
    if isinstance(value, datetime.date | datetime.time):  # datetime is a date
        return value.isoformat()
    return str(value)


def json_fields(value: object) -> dict[str, object]:
    """The JSON extras a decoded value brings: ``date``/``weekday`` for dates, ``time`` for times."""
    if isinstance(value, MeterDate):
        return {"date": value.date.isoformat(), "weekday": value.weekday}
    if isinstance(value, datetime.time):
        return {"time": value.isoformat()}
    return {}

"""CJ/T 188 value formats: the byte layouts named in the standard's data tables.

Named the way CJ/T 188-2004 clause 7 (Tables 5-9, "数据格式") prints them, most significant digit
first; the bytes are in wire order, least significant byte first (clause 6.3: "所有多字节数据域
均先传送低位字节"). No offset is added to CJ/T 188 data (unlike DL/T 645's +33H).

===================  =====  =============================================================
name                 bytes  decoded value
===================  =====  =============================================================
``XXXXXX.XX`` ...    n      packed BCD, any run of ``X`` with an optional point: int or float
``YYYYMMDDhhmmss``   7      naive :class:`datetime.datetime` (the meter's local time), None if 0
``ST``               2      int: the status word ST, D0 in the first byte (Table 10)
``NN``               1      int: a binary byte (purchase sequence, key version)
``HEX8``             8      str: 16 hex digits in wire order (a key; never printed by describe)
``VALVE``            1      str: ``open`` (55H) or ``close`` (99H) (写阀门控制, Table 9)
``ADDRESS``          7      str: an address printed most significant byte first
===================  =====  =============================================================

Decoded numbers are ``int`` for formats without decimals and ``float`` otherwise, computed as the
exact BCD integer divided by a power of ten. :func:`encode_field` rounds to the format's
resolution half-even and refuses values that do not fit: encoding is strict.

Errors: bytes that do not fit raise :class:`RemoteProtocolError`; a value that does not fit, or an
unknown format name, raises :class:`LocalProtocolError`.
"""

from __future__ import annotations

import datetime
import functools
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Final, TypeAlias

from meter_gateway.protocols.cjt188.errors import LocalProtocolError, RemoteProtocolError

FieldValue: TypeAlias = int | float | str | datetime.datetime | None

VALVE_OPEN: Final = 0x55
VALVE_CLOSE: Final = 0x99
_VALVE_NAMES: Final = {VALVE_OPEN: "open", VALVE_CLOSE: "close"}


@dataclass(frozen=True, slots=True)
class _Bcd:
    name: str
    length: int
    decimals: int


_FIXED: Final = {"YYYYMMDDhhmmss": 7, "ST": 2, "NN": 1, "HEX8": 8, "VALVE": 1, "ADDRESS": 7}


@functools.cache
def _bcd(name: str) -> _Bcd | None:
    digits = name.replace(".", "")
    if not digits or set(digits) != {"X"} or name.count(".") > 1 or name.startswith(".") or name.endswith("."):
        return None
    if len(digits) % 2:
        return None
    decimals = len(name) - name.index(".") - 1 if "." in name else 0
    return _Bcd(name, len(digits) // 2, decimals)


def format_length(name: str) -> int:
    """The byte length of format ``name``; LocalProtocolError for an unknown name."""
    if name in _FIXED:
        return _FIXED[name]
    bcd = _bcd(name)
    if bcd is None:
        raise LocalProtocolError(f"unknown CJ/T 188 value format {name!r}")
    return bcd.length


def bcd_digits(name: str, raw: bytes) -> int:
    """The BCD integer of ``raw`` (wire order, least significant byte first)."""
    value = 0
    for byte in reversed(raw):
        high, low = byte >> 4, byte & 0x0F
        if high > 9 or low > 9:
            raise RemoteProtocolError(f"{name}: {raw.hex(' ').upper()} is not valid BCD")
        value = value * 100 + high * 10 + low
    return value


def bcd_bytes(value: int, length: int) -> bytes:
    """``value`` as ``length`` bytes of BCD, least significant byte first."""
    if not 0 <= value < 10 ** (2 * length):
        raise LocalProtocolError(f"{value} does not fit {2 * length} BCD digits")
    out = bytearray()
    for _ in range(length):
        value, pair = divmod(value, 100)
        out.append((pair // 10) << 4 | pair % 10)
    return bytes(out)


def decode_field(name: str, raw: bytes) -> FieldValue:
    """Decode ``raw`` (exactly the format's length) as format ``name``."""
    length = format_length(name)
    if len(raw) != length:
        raise RemoteProtocolError(f"{name}: needs {length} bytes, got {len(raw)}")
    if name == "ST":
        return int.from_bytes(raw, "little")
    if name == "NN":
        return raw[0]
    if name == "HEX8":
        return raw.hex().upper()
    if name == "ADDRESS":
        return raw[::-1].hex().upper()
    if name == "VALVE":
        try:
            return _VALVE_NAMES[raw[0]]
        except KeyError:
            raise RemoteProtocolError(f"valve command {raw[0]:02X} is neither 55H (open) nor 99H (close)") from None
    if name == "YYYYMMDDhhmmss":
        return _decode_time(raw)
    bcd = _bcd(name)
    assert bcd is not None  # format_length accepted it
    number = bcd_digits(name, raw)
    if bcd.decimals == 0:
        return number
    return number / float(10**bcd.decimals)


def _decode_time(raw: bytes) -> datetime.datetime | None:
    if not any(raw):
        return None  # meters that keep no clock send zeros
    second, minute, hour, day, month, year_low, year_high = (bcd_digits("YYYYMMDDhhmmss", bytes((b,))) for b in raw)
    try:
        return datetime.datetime(year_high * 100 + year_low, month, day, hour, minute, second)
    except ValueError as exc:
        raise RemoteProtocolError(f"YYYYMMDDhhmmss: {raw.hex(' ').upper()} is not a valid time ({exc})") from None


def encode_time(when: datetime.datetime) -> bytes:
    """A naive local time as ``YYYYMMDDhhmmss`` (7 BCD bytes, seconds first)."""
    if not isinstance(when, datetime.datetime):
        raise LocalProtocolError(f"YYYYMMDDhhmmss needs a datetime, got {when!r}")
    if when.tzinfo is not None:
        raise LocalProtocolError(f"meter time is local and naive, got an aware {when!r}")
    pairs = (when.second, when.minute, when.hour, when.day, when.month, when.year % 100, when.year // 100)
    return b"".join(bcd_bytes(p, 1) for p in pairs)


def to_decimal(value: object, what: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal | str):
        raise LocalProtocolError(f"{what}: expected a number, got {value!r}")
    try:
        number = Decimal(str(value)) if isinstance(value, float) else Decimal(value)
    except InvalidOperation:
        raise LocalProtocolError(f"{what}: {value!r} is not a number") from None
    if not number.is_finite():
        raise LocalProtocolError(f"{what}: {value!r} is not finite")
    return number


def encode_field(name: str, value: object) -> bytes:
    """Encode ``value`` as format ``name`` (strict: LocalProtocolError if it does not fit)."""
    length = format_length(name)
    if name in {"ST", "NN"}:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << (8 * length):
            raise LocalProtocolError(f"{name}: needs an int of {length} byte(s), got {value!r}")
        return value.to_bytes(length, "little")
    if name in {"HEX8", "ADDRESS"}:
        if not isinstance(value, str) or len(value) != 2 * length:
            raise LocalProtocolError(f"{name}: needs {2 * length} hex digits, got {value!r}")
        try:
            raw = bytes.fromhex(value)
        except ValueError:
            raise LocalProtocolError(f"{name}: {value!r} is not hex") from None
        return raw if name == "HEX8" else raw[::-1]
    if name == "VALVE":
        for code, label in _VALVE_NAMES.items():
            if value == label:
                return bytes((code,))
        raise LocalProtocolError(f"VALVE: needs 'open' or 'close', got {value!r}")
    if name == "YYYYMMDDhhmmss":
        if not isinstance(value, datetime.datetime):
            raise LocalProtocolError(f"{name}: needs a datetime, got {value!r}")
        return encode_time(value)
    bcd = _bcd(name)
    assert bcd is not None
    number = to_decimal(value, name)
    scaled = (number * (Decimal(10) ** bcd.decimals)).quantize(Decimal(1), rounding=ROUND_HALF_EVEN)
    if scaled < 0:
        raise LocalProtocolError(f"{name}: {value!r} is negative (CJ/T 188 BCD is unsigned)")
    if scaled >= 10 ** (2 * bcd.length):
        raise LocalProtocolError(f"{name}: {value!r} does not fit")
    return bcd_bytes(int(scaled), bcd.length)

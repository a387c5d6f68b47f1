"""Modbus register values: numbers <-> lists of 16-bit registers.

A value spans one to four registers. Two independent orders describe how a device lays it out:

``word_order``
    "big": the most significant register comes first (at the lower address);
    "little": the least significant register comes first.
``byte_order``
    "big": each register carries its high byte first (the Modbus norm);
    "little": the two bytes inside every register are swapped.

For a 32-bit value with bytes A (most significant) .. D that gives the four layouts in vendor
manuals: ABCD (big/big), CDAB (word little), BADC (byte little), DCBA (both little).

``scale`` multiplies the decoded number (a meter reporting W is read in kW with scale 0.001). The
multiplication is done in decimal, on the shortest decimal form of the raw value, so 2301 x 0.1 is
230.1 and a float32 230.1 stays 230.1 (not 230.10000610351562): readings are billed, and binary
noise in the last digits would make equal values compare unequal downstream.

Errors: :class:`RemoteValueError` is bad data from a device (a NaN or an infinity where a number
belongs); :class:`LocalValueError` is misuse (unknown type, wrong register count, a value that
does not fit). Both derive from :class:`ModbusValueError`; nothing else escapes.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Final

__all__ = [
    "BYTE_ORDERS",
    "DATA_TYPES",
    "LocalValueError",
    "ModbusValueError",
    "RemoteValueError",
    "ValueCodec",
]


class ModbusValueError(Exception):
    """Base of every error raised by ``protocols.modbus``."""


class RemoteValueError(ModbusValueError):
    """Registers from a device decode to something that is not a usable number (NaN, infinity).

    ``value`` is what they decoded to (scaled), for callers that keep it with a quality flag.
    """

    def __init__(self, message: str, *, value: float) -> None:
        super().__init__(message)
        self.value = value


class LocalValueError(ModbusValueError):
    """The caller asked for something impossible (unknown type or order, wrong count, no fit)."""


@dataclass(frozen=True, slots=True)
class _TypeInfo:
    fmt: str  # struct format character, big-endian
    registers: int
    is_float: bool
    minimum: int = 0
    maximum: int = 0


def _int(fmt: str, registers: int, signed: bool) -> _TypeInfo:
    bits = registers * 16
    if signed:
        return _TypeInfo(fmt, registers, False, -(1 << (bits - 1)), (1 << (bits - 1)) - 1)
    return _TypeInfo(fmt, registers, False, 0, (1 << bits) - 1)


_TYPES: Final[dict[str, _TypeInfo]] = {
    "u16": _int("H", 1, signed=False),
    "i16": _int("h", 1, signed=True),
    "u32": _int("I", 2, signed=False),
    "i32": _int("i", 2, signed=True),
    "u64": _int("Q", 4, signed=False),
    "i64": _int("q", 4, signed=True),
    "float32": _TypeInfo("f", 2, True),
    "float64": _TypeInfo("d", 4, True),
}

DATA_TYPES: Final[tuple[str, ...]] = tuple(_TYPES)
_EXACT_BELOW: Final = 1 << 32
_EXACT_DIGITS: Final = 16
BYTE_ORDERS: Final[tuple[str, ...]] = ("big", "little")


def _shortest_float32(x: float) -> str:
    """The shortest decimal text that reads back as the same float32 (what the device meant)."""
    packed = struct.pack(">f", x)
    for digits in range(6, 10):
        text = f"{x:.{digits}g}"
        try:
            if struct.pack(">f", float(text)) == packed:
                return text
        except OverflowError:
            continue
    return repr(x)


@dataclass(frozen=True, slots=True)
class ValueCodec:
    """How one value is laid out in registers, and its scale. Immutable and cheap to share."""

    type: str
    byte_order: str = "big"
    word_order: str = "big"
    scale: float = 1

    _info: _TypeInfo = field(init=False, repr=False, compare=False)
    _scale: Decimal | None = field(init=False, repr=False, compare=False)
    # made once, used for every value decoded: the register words, the value's own layout, whether
    # the device's orders differ from the canonical big/big, and the scale as an exact fraction
    _words: struct.Struct = field(init=False, repr=False, compare=False)
    _value: struct.Struct = field(init=False, repr=False, compare=False)
    _reordered: bool = field(init=False, repr=False, compare=False)
    _ratio: tuple[int, int] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        info = _TYPES.get(self.type)
        if info is None:
            raise LocalValueError(f"unknown data type {self.type!r} (expected one of {', '.join(DATA_TYPES)})")
        for name, order in (("byte_order", self.byte_order), ("word_order", self.word_order)):
            if order not in BYTE_ORDERS:
                raise LocalValueError(f"{name} must be 'big' or 'little', got {order!r}")
        if isinstance(self.scale, bool) or not isinstance(self.scale, int | float):
            raise LocalValueError(f"scale must be a number, got {self.scale!r}")
        if not math.isfinite(self.scale) or self.scale == 0:
            raise LocalValueError(f"scale must be finite and non-zero, got {self.scale!r}")
        object.__setattr__(self, "_info", info)
        scale = None if self.scale == 1 else Decimal(repr(self.scale))
        object.__setattr__(self, "_scale", scale)
        object.__setattr__(self, "_words", struct.Struct(f">{info.registers}H"))
        object.__setattr__(self, "_value", struct.Struct(">" + info.fmt))
        object.__setattr__(self, "_reordered", self.byte_order != "big" or self.word_order != "big")
        # an integer below _EXACT_BELOW times a scale of at most _EXACT_DIGITS digits is exact in
        # the decimal context (28 digits), so the fraction gives the float the decimal product does
        exact = scale is not None and len(scale.as_tuple().digits) <= _EXACT_DIGITS
        object.__setattr__(self, "_ratio", scale.as_integer_ratio() if exact and scale is not None else None)

    @property
    def count(self) -> int:
        """Registers one value occupies."""
        return self._info.registers

    @property
    def is_float(self) -> bool:
        return self._info.is_float

    @property
    def layout(self) -> str:
        """The vendor-manual name of the byte layout, e.g. ``ABCD`` or ``CDAB``."""
        letters = "ABCDEFGH"[: 2 * self.count]
        return self._to_wire(letters.encode()).decode()

    # -- decoding -----------------------------------------------------------------------------

    def decode(self, registers: Sequence[int]) -> int | float:
        """Decode exactly :attr:`count` registers; ints stay ints unless a scale applies."""
        return self.decode_at(self._pack_registers(registers), 0)

    def decode_at(self, wire: bytes, offset: int) -> int | float:
        """Decode the value whose registers start ``offset`` bytes into ``wire``: registers as a
        reply carries them, each big-endian, in address order. A read's reply is decoded where
        each value lies, without making a list of its registers first."""
        info = self._info
        end = offset + 2 * info.registers
        if offset < 0 or end > len(wire):
            raise LocalValueError(f"{self.type} takes {self.count} register(s) at byte {offset}, got {len(wire)} bytes")
        if self._reordered:
            raw, at = self._from_wire(wire[offset:end]), 0
        else:
            raw, at = wire, offset
        if info.is_float:
            (number,) = self._value.unpack_from(raw, at)
            value = float(number)
            if not math.isfinite(value):
                scaled = value * self.scale if not math.isnan(value) else value
                raise RemoteValueError(
                    f"registers {_hex_words(wire[offset:end])} ({self.type} {self.layout}) decode to {value}",
                    value=scaled,
                )
            text = _shortest_float32(value) if info.fmt == "f" else repr(value)
            if self._scale is None:
                return float(text)
            return float(Decimal(text) * self._scale)
        integer: int = self._value.unpack_from(raw, at)[0]
        if self._scale is None:
            return integer
        ratio = self._ratio
        if ratio is not None and -_EXACT_BELOW < integer < _EXACT_BELOW:
            # int / int is correctly rounded, as float() of the exact decimal product is
            return integer * ratio[0] / ratio[1]
        return float(Decimal(integer) * self._scale)

    # -- encoding -----------------------------------------------------------------------------

    def encode(self, value: float) -> list[int]:
        """Encode a (scaled) number into registers: the inverse of :meth:`decode`.

        Integer types round to the nearest raw step; NaN and infinities are only encodable into
        float types (simulated faulty meters need them).
        """
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise LocalValueError(f"cannot encode {value!r}: not a number")
        info = self._info
        if info.is_float:
            raw_float = float(value) if self._scale is None or not math.isfinite(value) else self._unscale_float(value)
            try:
                data = struct.pack(">" + info.fmt, raw_float)
            except (OverflowError, struct.error) as e:
                raise LocalValueError(f"{value!r} does not fit {self.type}") from e
            return self._to_registers(data)
        if not math.isfinite(value):
            raise LocalValueError(f"cannot encode {value!r} as {self.type}")
        raw = self._unscale_int(value)
        if not info.minimum <= raw <= info.maximum:
            raise LocalValueError(
                f"{value!r} does not fit {self.type} with scale {self.scale} (raw {raw}, "
                f"range {info.minimum}..{info.maximum})"
            )
        return self._to_registers(struct.pack(">" + info.fmt, raw))

    def _unscale_float(self, value: float) -> float:
        assert self._scale is not None
        return float(Decimal(repr(float(value))) / self._scale)

    def _unscale_int(self, value: float) -> int:
        number = Decimal(value) if isinstance(value, int) else Decimal(repr(value))
        if self._scale is not None:
            number = number / self._scale
        try:
            return int(number.quantize(Decimal(1), rounding=ROUND_HALF_EVEN))
        except InvalidOperation as e:  # beyond the decimal context: far outside any type
            raise LocalValueError(f"{value!r} does not fit {self.type}") from e

    # -- register <-> canonical (big-endian) bytes --------------------------------------------

    def _pack_registers(self, registers: Sequence[int]) -> bytes:
        """The registers as a reply carries them (device order, each big-endian), checked."""
        if len(registers) != self._info.registers:
            raise LocalValueError(f"{self.type} takes {self.count} register(s), got {len(registers)}")
        for r in registers:
            if type(r) is not int and (isinstance(r, bool) or not isinstance(r, int)):
                raise LocalValueError(f"register values are 0..65535, got {r!r}")
        try:
            return self._words.pack(*registers)
        except struct.error:
            raise LocalValueError(f"register values are 0..65535, got {list(registers)!r}") from None

    def _to_registers(self, data: bytes) -> list[int]:
        wire = self._to_wire(data)
        return [int.from_bytes(wire[i : i + 2], "big") for i in range(0, len(wire), 2)]

    def _to_wire(self, data: bytes) -> bytes:
        """Canonical big-endian bytes -> the device's register byte sequence."""
        words = [data[i : i + 2] for i in range(0, len(data), 2)]
        if self.word_order == "little":
            words.reverse()
        if self.byte_order == "little":
            words = [w[::-1] for w in words]
        return b"".join(words)

    def _from_wire(self, wire: bytes) -> bytes:
        # both transformations are involutions and commute, so the inverse is the same operation
        return self._to_wire(wire)


def _hex_words(wire: bytes) -> str:
    """Registers' bytes as the register values, e.g. ``7FC0 0000``."""
    return " ".join(wire[i : i + 2].hex().upper() for i in range(0, len(wire), 2))

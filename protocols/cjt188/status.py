"""The status word ST (状态ST): two bytes, D0 first on the wire.

CJ/T 188-2004 "状态ST" definition (as transcribed in [S1] and implemented in [S6], see
``data/cjt188.toml``): D0-D1 valve state (00 open, 01 closed, 11 abnormal), D2 battery voltage
(0 normal, 1 low), D3-D15 reserved or manufacturer-defined. The bit table lives in the data file
(``[status]``); :class:`Status` keeps the whole word so vendor bits are never lost.

ST is sent in current-data replies (901F), purchase replies (8105), write-valve
acknowledgements (A017) and every abnormal reply (control code with D6 set).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meter_gateway.protocols.cjt188.errors import LocalProtocolError, RemoteProtocolError
from meter_gateway.protocols.cjt188.tables import default_tables


@dataclass(frozen=True, slots=True)
class StatusBit:
    """``width`` bits at ``shift``; ``values`` names each state when given (else a bool)."""

    name: str
    quantity: str
    shift: int
    width: int = 1
    values: tuple[str, ...] = ()

    def decode(self, word: int) -> bool | int | str:
        state = (word >> self.shift) & ((1 << self.width) - 1)
        if self.values:
            return self.values[state] if state < len(self.values) else state
        return bool(state) if self.width == 1 else state

    def encode(self, value: object) -> int:
        if self.values and isinstance(value, str):
            if value not in self.values:
                raise LocalProtocolError(f"status {self.name}: {value!r} is not one of {list(self.values)}")
            state = self.values.index(value)
        elif isinstance(value, bool) or (isinstance(value, int) and 0 <= value < 1 << self.width):
            state = int(value)
        else:
            raise LocalProtocolError(f"status {self.name}: cannot encode {value!r}")
        return state << self.shift


def load_bits(tables: Mapping[str, Any]) -> tuple[StatusBit, ...]:
    try:
        rows = tables["status"]["bits"]
        bits = []
        for row in rows:
            if "bit" in row:
                shift, width = int(row["bit"]), 1
            else:
                low, high = (int(b) for b in row["bits"])
                shift, width = low, high - low + 1
            values = tuple(str(v) for v in row.get("values", ()))
            bits.append(StatusBit(str(row["name"]), str(row["quantity"]), shift, width, values))
    except (KeyError, TypeError, ValueError) as exc:
        raise LocalProtocolError(f"status bit table: {exc!r}") from None
    return tuple(bits)


@functools.cache
def default_bits() -> tuple[StatusBit, ...]:
    return load_bits(default_tables())


@dataclass(frozen=True, slots=True)
class Status:
    """The 16-bit status word ST (D0 = bit 0)."""

    word: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.word, bool) or not isinstance(self.word, int) or not 0 <= self.word <= 0xFFFF:
            raise LocalProtocolError(f"a status word is 0..FFFF, got {self.word!r}")

    @classmethod
    def build(cls, valve: str = "open", battery_low: bool = False, *, other: int = 0) -> Status:
        """A status word from its named parts; ``other`` carries reserved/vendor bits as they are."""
        word = other
        for bit in default_bits():
            if bit.name == "valve":
                word = (word & ~(((1 << bit.width) - 1) << bit.shift)) | bit.encode(valve)
            elif bit.name == "battery_low":
                word = (word & ~(1 << bit.shift)) | bit.encode(battery_low)
        return cls(word & 0xFFFF)

    @classmethod
    def from_bytes(cls, raw: bytes) -> Status:
        if len(raw) != 2:
            raise RemoteProtocolError(f"status ST is 2 bytes, got {len(raw)}")
        return cls(int.from_bytes(raw, "little"))

    def to_bytes(self) -> bytes:
        return self.word.to_bytes(2, "little")

    def bits(self) -> dict[str, bool | int | str]:
        """The named bits, e.g. ``{"valve": "closed", "battery_low": False}``."""
        return {bit.name: bit.decode(self.word) for bit in default_bits()}

    @property
    def valve(self) -> str:
        return str(self.bits()["valve"])

    @property
    def battery_low(self) -> bool:
        return bool(self.bits()["battery_low"])

    def __str__(self) -> str:
        return f"{self.word:04X}"

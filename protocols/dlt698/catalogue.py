"""The DL/T 698.45 OAD catalogue: what an object attribute is, its scaler, unit and quantity.

The content lives in ``data/oads.toml`` (DL/T 698.45-2017 chapter 7 interface classes, Appendix E
object list, Appendix F status words), one entry per object attribute, each citing its source;
the file's header documents layouts and quantity names. This module loads it and turns decoded
values into :class:`Reading` objects: ``(oad, raw, value, unit, quantity)``.

A value is ``raw * 10 ** scaler`` in the standard's unit (:func:`scale`). Power is W/var/VA in
698.45; :attr:`Reading.canonical` gives kW/kvar/kVA so quantities match the DL/T 645 catalogue.
"""

from __future__ import annotations

import functools
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

from meter_gateway.protocols.dlt698.apdu import ResultRecord
from meter_gateway.protocols.dlt698.axdr import OAD, ROAD, BitString, Data, DataType, plain
from meter_gateway.protocols.dlt698.errors import LocalProtocolError
from meter_gateway.protocols.package_data import read_packaged

LAYOUTS: Final = frozenset({"none", "tariffs", "phases", "total_phases", "status_words", "structure", "record"})
_CANONICAL: Final = {"W": ("kW", -3), "var": ("kvar", -3), "VA": ("kVA", -3)}
_PHASE_SUFFIX: Final = ("l1", "l2", "l3")


@dataclass(frozen=True, slots=True)
class FieldSpec:
    name: str
    quantity: str | None
    type: str
    scaler: int = 0
    unit: str = ""


@dataclass(frozen=True, slots=True)
class BitSpec:
    name: str
    shift: int
    width: int = 1
    values: tuple[str, ...] = ()

    def decode(self, bits: BitString) -> bool | int | str:
        state = 0
        for i in range(self.shift, self.shift + self.width):
            # bits of a multi-bit field: the lower-numbered bit is the less significant
            if i < bits.length and bits.bit(i):
                state |= 1 << (i - self.shift)
        if self.values:
            return self.values[state] if state < len(self.values) else state
        return bool(state) if self.width == 1 else state


@dataclass(frozen=True, slots=True)
class Item:
    """One catalogue entry: an object attribute (index 0 means the whole attribute)."""

    oi: int
    attribute: int
    name: str
    quantity: str
    type: str
    layout: str
    scaler: int = 0
    unit: str = ""
    source: str = ""
    fields: tuple[FieldSpec, ...] = ()

    @property
    def oad(self) -> OAD:
        return OAD(self.oi, self.attribute, 0)

    def element(self, index: int) -> tuple[str, str | None, int, str]:
        """(name, quantity, scaler, unit) of element ``index`` (0: the whole attribute)."""
        q = self.quantity
        if index == 0:
            whole = q if self.layout in ("none", "record") else f"{q}.all"
            return self.name, whole, self.scaler, self.unit
        match self.layout:
            case "tariffs":
                tariff = "total" if index == 1 else f"t{index - 1}"
                label = "total" if index == 1 else f"tariff {index - 1}"
                return f"{self.name}, {label}", f"{q}.{tariff}", self.scaler, self.unit
            case "phases" if index <= 3:
                return (
                    f"{self.name}, phase {'ABC'[index - 1]}",
                    f"{q}.{_PHASE_SUFFIX[index - 1]}",
                    self.scaler,
                    self.unit,
                )
            case "total_phases" if index <= 4:
                suffix = "total" if index == 1 else _PHASE_SUFFIX[index - 2]
                label = "total" if index == 1 else f"phase {'ABC'[index - 2]}"
                return f"{self.name}, {label}", f"{q}.{suffix}", self.scaler, self.unit
            case "status_words" if index <= 7:
                return f"Running status word {index}", f"{q}.word{index}", 0, ""
            case "structure" if index <= len(self.fields):
                spec = self.fields[index - 1]
                return spec.name, spec.quantity, spec.scaler, spec.unit
        return f"{self.name} [{index}]", None, self.scaler, self.unit


class Reading(NamedTuple):
    """One value of a response: the OAD it belongs to (element index filled in for arrays),
    the raw A-XDR value, the scaled value in ``unit``, and the canonical quantity."""

    oad: OAD
    raw: Any
    value: Any
    unit: str
    quantity: str | None
    name: str
    fields: Mapping[str, object] | None = None  # named status bits of a status word

    @property
    def canonical(self) -> tuple[Any, str]:
        """(value, unit) in the DL/T 645 catalogue's units (kW instead of W...)."""
        conv = _CANONICAL.get(self.unit)
        if conv is None or not isinstance(self.value, int | float):
            return self.value, self.unit
        return _round(self.value * 10 ** conv[1], 10), conv[0]


def _round(value: float, digits: int) -> float:
    return round(value, digits)


def scale(raw: object, scaler: int) -> object:
    """``raw * 10 ** scaler`` for a number (exact decimal digits kept: 123456, -2 -> 1234.56);
    anything else is returned as is."""
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        return raw
    if scaler == 0:
        return raw
    if scaler > 0:
        return raw * 10**scaler
    return round(raw * 10.0**scaler, -scaler)


class Catalogue:
    """The items of ``data/oads.toml`` (or another table with the same layout)."""

    def __init__(self, items: Iterator[Item] | list[Item], bit_tables: Mapping[str, tuple[BitSpec, ...]]) -> None:
        self._items: dict[tuple[int, int], Item] = {}
        self._by_quantity: dict[str, OAD] = {}
        for item in items:
            self._items.setdefault((item.oi, item.attribute), item)
        for item in self._items.values():
            for index in range(16):
                _, quantity, _, _ = item.element(index)
                if quantity is not None:
                    self._by_quantity.setdefault(quantity, OAD(item.oi, item.attribute, index))
        self.bit_tables = dict(bit_tables)

    def __iter__(self) -> Iterator[Item]:
        return iter(self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def get(self, oad: OAD) -> Item | None:
        """The entry for ``oad``'s object attribute (feature bits ignored), or None."""
        return self._items.get((oad.oi, oad.attribute & 0x1F))

    def oad_for(self, quantity: str) -> OAD:
        """The OAD that reads ``quantity`` (e.g. ``energy.active.import.total`` -> 00100201)."""
        try:
            return self._by_quantity[quantity]
        except KeyError:
            raise LocalProtocolError(f"no DL/T 698.45 object for quantity {quantity!r}") from None

    def describe_oad(self, oad: OAD) -> dict[str, object]:
        """What ``oad`` is: name, quantity, scaler, unit, type, source (``known: False`` if not listed)."""
        item = self.get(oad)
        if item is None:
            return {"oad": str(oad), "known": False}
        name, quantity, scaler, unit = item.element(oad.index)
        out: dict[str, object] = {
            "oad": str(oad),
            "known": True,
            "name": name,
            "type": item.type,
            "source": item.source,
        }
        if quantity:
            out["quantity"] = quantity
        if scaler:
            out["scaler"] = scaler
        if unit:
            out["unit"] = unit
        return out

    def readings(self, oad: OAD, data: Data) -> list[Reading]:
        """Readings of one GET/REPORT result: an array attribute read whole gives one per element."""
        item = self.get(oad)
        if item is None:
            return [Reading(oad, plain(data), plain(data), "", None, str(oad))]
        if (
            oad.index == 0
            and item.layout not in ("none", "record")
            and data.type in (DataType.ARRAY, DataType.STRUCTURE)
        ):
            return [
                self._reading(item, OAD(oad.oi, oad.attribute, i), element) for i, element in enumerate(data.value, 1)
            ]
        return [self._reading(item, oad, data)]

    def _reading(self, item: Item, oad: OAD, data: Data) -> Reading:
        name, quantity, scaler, unit = item.element(oad.index)
        fields = None
        if item.layout == "status_words" and isinstance(data.value, BitString):
            table = self.bit_tables.get(f"word{oad.index}", ())
            fields = {spec.name: spec.decode(data.value) for spec in table}
        raw = plain(data)
        value = scale(data.value, scaler) if data.type not in (DataType.ARRAY, DataType.STRUCTURE) else raw
        if data.type is DataType.NULL:
            value = None
        elif not isinstance(value, int | float | type(None)):
            value = raw
        return Reading(oad, raw, value, unit, quantity, name, fields)

    def record_readings(self, result: ResultRecord) -> list[list[Reading]]:
        """Per row, the readings of every column of a GET-Record / REPORT record result."""
        rows = []
        for row in result.rows or ():
            out: list[Reading] = []
            for column, value in zip(result.rcsd.columns, row, strict=True):
                if isinstance(column, ROAD):
                    elements = value.value if value.type is DataType.ARRAY else ()
                    for sub, element in zip(column.oads, elements, strict=False):
                        out += self.readings(sub, element)
                else:
                    out += self.readings(column, value)
            rows.append(out)
        return rows


def _load(text: str) -> Catalogue:
    raw = tomllib.loads(text)
    items: list[Item] = []
    for entry in raw["items"]:
        if entry["layout"] not in LAYOUTS:
            raise ValueError(f"unknown layout {entry['layout']!r} for {entry['oi']}")
        oi = int(entry["oi"], 16)
        fields = tuple(
            FieldSpec(f["name"], f.get("quantity"), f["type"], f.get("scaler", 0), f.get("unit", ""))
            for f in entry.get("fields", ())
        )
        base = Item(
            oi,
            entry["attribute"],
            entry["name"],
            entry["quantity"],
            entry["type"],
            entry["layout"],
            entry.get("scaler", 0),
            entry.get("unit", ""),
            entry["source"],
            fields,
        )
        items.append(base)
        if entry.get("phases"):
            items.extend(
                Item(
                    oi + p,
                    base.attribute,
                    f"{base.name}, phase {'ABC'[p - 1]}",
                    f"{base.quantity}.{_PHASE_SUFFIX[p - 1]}",
                    base.type,
                    base.layout,
                    base.scaler,
                    base.unit,
                    base.source,
                )
                for p in range(1, 4)
            )
    bit_tables = {}
    for word, specs in raw.get("bit_tables", {}).items():
        parsed = []
        for spec in specs:
            bits = spec.get("bits", [spec.get("bit", 0), spec.get("bit", 0)])
            parsed.append(BitSpec(spec["name"], bits[0], bits[1] - bits[0] + 1, tuple(spec.get("values", ()))))
        bit_tables[word] = tuple(parsed)
    return Catalogue(items, bit_tables)


@functools.cache
def default_catalogue() -> Catalogue:
    """The catalogue of ``data/oads.toml``, loaded once."""
    from meter_gateway.protocols.dlt698 import data

    text = read_packaged(data, "oads.toml")
    return _load(text)


def describe_oad(oad: OAD | str) -> dict[str, object]:
    """:meth:`Catalogue.describe_oad` on the default catalogue; accepts ``"00100201"``."""
    return default_catalogue().describe_oad(OAD.parse(oad) if isinstance(oad, str) else oad)

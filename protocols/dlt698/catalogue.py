"""The DL/T 698.45 OAD catalogue: what an object attribute is, its scaler, unit and quantity.

The content lives in ``data/oads.toml`` (DL/T 698.45-2017 chapter 7 interface classes, Appendix E
object list, Appendix F status words), one entry per object attribute, each citing its source;
the file's header documents layouts and quantity names. This module loads it and turns decoded
values into :class:`Reading` objects: oad, raw, value, unit, quantity, name.

A value is ``raw * 10 ** scaler`` in the standard's unit (:func:`scale`). Power is W/var/VA in
698.45; :attr:`Reading.canonical` gives kW/kvar/kVA so quantities match the DL/T 645 catalogue.
"""

from __future__ import annotations

import functools
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

import msgspec

from meter_gateway.protocols.dlt698.apdu import ResultNormal, ResultRecord
from meter_gateway.protocols.dlt698.axdr import OAD, ROAD, BitString, Data, DataType, Ints, plain
from meter_gateway.protocols.dlt698.errors import LocalProtocolError
from meter_gateway.protocols.package_data import read_packaged

LAYOUTS: Final = frozenset({"none", "tariffs", "phases", "total_phases", "status_words", "structure", "record"})
_CANONICAL: Final = {"W": ("kW", -3), "var": ("kvar", -3), "VA": ("kVA", -3)}
_PHASE_SUFFIX: Final = ("l1", "l2", "l3")
# the tags compared for every value decoded, as module globals rather than enum attribute lookups
_ARRAY: Final = DataType.ARRAY
_STRUCTURE: Final = DataType.STRUCTURE


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


class ElementSpec(NamedTuple):
    """What :meth:`Item.element` says about one element, with the scaling worked out once at
    catalogue load: the decode path does one integer operation per value (see :func:`scale`)."""

    name: str
    quantity: str | None
    scaler: int
    unit: str
    divisor: int  # 10 ** -scaler when scaler < 0, else 1
    multiplier: int  # 10 ** scaler when scaler > 0, else 1

    @classmethod
    def of(cls, item: Item, index: int) -> ElementSpec:
        name, quantity, scaler, unit = item.element(index)
        return cls(name, quantity, scaler, unit, 10 ** max(-scaler, 0), 10 ** max(scaler, 0))


class _Entry(NamedTuple):
    """A catalogue item and everything the decode path needs about it, built once per item."""

    item: Item
    spread: bool  # an array/structure read whole (index 0) gives one reading per element
    status_words: bool
    elements: tuple[ElementSpec, ...]  # indexed by element index; 0 is the whole attribute


class _Target(NamedTuple):
    """One value's destination: its OAD (element index filled in) and its :class:`ElementSpec`,
    unpacked so the decode path builds a :class:`Reading` without another lookup."""

    oad: OAD
    name: str
    quantity: str | None
    scaler: int
    unit: str
    divisor: int
    multiplier: int

    @classmethod
    def of(cls, oad: OAD, spec: ElementSpec) -> _Target:
        return cls(oad, *spec)


class _Converter(NamedTuple):
    """How the results for one OAD (as a meter sends it, feature bits included) become readings,
    built the first time that OAD is seen: the targets of the value read whole and, for an
    attribute read whole whose value is an array or structure, of each of its elements."""

    entry: _Entry
    whole: _Target  # the value as one reading (an element asked for directly, or not spread)
    parts: tuple[_Target, ...]  # elements 1, 2...; empty when the attribute does not spread


_PRECOMPUTED_ELEMENTS: Final = 16  # element indices 0..15 cover every layout in the standard's tables
_MAX_CONVERTERS: Final = 4096  # catalogue OADs seen; a gateway polls a few dozen, this bounds junk


class Reading(msgspec.Struct, frozen=True, gc=False):
    """One value of a response: the OAD it belongs to (element index filled in for arrays),
    the raw A-XDR value, the scaled value in ``unit``, and the canonical quantity.

    A Struct rather than a NamedTuple: one is built per value decoded, and a Struct called with
    its fields positionally is built in one C call, with no argument tuple to copy. It is not a
    tuple: read it by field name. Never part of a reference cycle (its values are decoded data),
    so the garbage collector need not track it (``gc=False``)."""

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
    if isinstance(raw, int):
        # int / int is correctly rounded: the float nearest the exact decimal, for any size of raw
        return raw / 10**-scaler
    return round(raw * 10.0**scaler, -scaler)


class Catalogue:
    """The items of ``data/oads.toml`` (or another table with the same layout)."""

    def __init__(self, items: Iterator[Item] | list[Item], bit_tables: Mapping[str, tuple[BitSpec, ...]]) -> None:
        self._items: dict[tuple[int, int], Item] = {}
        self._by_quantity: dict[str, OAD] = {}
        for item in items:
            self._items.setdefault((item.oi, item.attribute), item)
        # an item's entry is built the first time the item is read: a gateway reads a few of them
        self._entries: dict[tuple[int, int], _Entry] = {}
        for item in self._items.values():
            for index in range(_PRECOMPUTED_ELEMENTS):
                quantity = item.element(index)[1]
                if quantity is not None:
                    self._by_quantity.setdefault(quantity, OAD(item.oi, item.attribute, index))
        self.bit_tables = dict(bit_tables)
        self._converters: dict[OAD, _Converter] = {}

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
        return self.result_readings((ResultNormal(oad, data),))

    def result_readings(self, results: Iterable[ResultNormal]) -> list[Reading]:
        """Readings of A-ResultNormal results in order (a DAR result gives none, see
        ``requests.failures``): each OAD's converter, built the first time it is seen, turns its
        value, or each element of an attribute read whole, into a :class:`Reading`."""
        converters = self._converters
        out: list[Reading] = []
        append = out.append
        for result in results:
            data = result.data
            if data is None:
                continue
            oad = result.oad
            converter = converters.get(oad) or self._converter(oad)
            if converter is None:  # not in the catalogue
                shown = plain(data)
                append(Reading(oad, shown, shown, "", None, str(oad)))
                continue
            tag, raw = data
            parts = converter.parts
            if parts and type(raw) is Ints:  # an array of integers read whole: nearly every poll
                values = raw.values
                if len(values) > len(parts):
                    parts = self._more_parts(converter, len(values))
                for target, value in zip(parts, values):  # noqa: B905 - more targets than values
                    this, name, quantity, scaler, unit, divisor, multiplier = target
                    scaled = value / divisor if scaler < 0 else value * multiplier if scaler else value
                    append(Reading(this, value, scaled, unit, quantity, name))
                continue
            targets: Iterable[tuple[_Target, Data]]
            if parts and (tag is _ARRAY or tag is _STRUCTURE):
                if len(raw) > len(parts):
                    parts = self._more_parts(converter, len(raw))
                # as many targets as elements or more, so a strict zip would be wrong here
                targets = zip(parts, raw)  # noqa: B905
            else:
                targets = ((converter.whole, data),)
            for target, element in targets:
                value = element[1]
                # integers are nearly every value a meter sends (bool is not one: type() is exact)
                if type(value) is int:
                    this, name, quantity, scaler, unit, divisor, multiplier = target
                    scaled = value / divisor if scaler < 0 else value * multiplier if scaler else value
                    append(Reading(this, value, scaled, unit, quantity, name))
                else:
                    append(self._reading(converter.entry, target, element))
        return out

    def _converter(self, oad: OAD) -> _Converter | None:
        oi, attribute, index = oad
        entry = self._entries.get((oi, attribute & 0x1F)) or self._entry((oi, attribute & 0x1F))
        if entry is None:
            return None
        elements = entry.elements
        whole = _Target.of(oad, elements[index] if index < len(elements) else ElementSpec.of(entry.item, index))
        parts: tuple[_Target, ...] = ()
        if index == 0 and entry.spread:
            parts = tuple(_Target.of(OAD(oi, attribute, i), elements[i]) for i in range(1, len(elements)))
        converter = _Converter(entry, whole, parts)
        if len(self._converters) >= _MAX_CONVERTERS:
            self._converters.clear()
        self._converters[oad] = converter
        return converter

    def _entry(self, key: tuple[int, int]) -> _Entry | None:
        """The entry of a catalogue item, built the first time one of its OADs is read."""
        item = self._items.get(key)
        if item is None:
            return None
        elements = tuple(ElementSpec.of(item, index) for index in range(_PRECOMPUTED_ELEMENTS))
        entry = self._entries[key] = _Entry(
            item, item.layout not in ("none", "record"), item.layout == "status_words", elements
        )
        return entry

    @staticmethod
    def _more_parts(converter: _Converter, count: int) -> tuple[_Target, ...]:
        """Targets of an array longer than the precomputed elements (built for this value)."""
        oi, attribute, _ = converter.whole.oad
        parts = converter.parts
        more = (
            _Target.of(OAD(oi, attribute, i), ElementSpec.of(converter.entry.item, i))
            for i in range(len(parts) + 1, count + 1)
        )
        return parts + tuple(more)

    def _reading(self, entry: _Entry, target: _Target, data: Data) -> Reading:
        """The reading of a value that is not an integer (float, status word, string, time...)."""
        tag, raw = data
        oad = target.oad
        fields = None
        if entry.status_words and isinstance(raw, BitString):
            table = self.bit_tables.get(f"word{oad.index}", ())
            fields = {bit.name: bit.decode(raw) for bit in table}
        shown = plain(data)
        value: Any
        if tag is DataType.NULL:
            value = None
        elif tag is DataType.ARRAY or tag is DataType.STRUCTURE:
            value = shown
        else:
            value = scale(raw, target.scaler)
            if not isinstance(value, int | float | type(None)):
                value = shown
        return Reading(oad, shown, value, target.unit, target.quantity, target.name, fields)

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

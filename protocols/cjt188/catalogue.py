"""The CJ/T 188 data-identifier catalogue: what each DI is, how its bytes decode, what it means.

The content lives in ``data/cjt188.toml`` (meter types, unit codes, the status word and one entry
per DI or family of DIs, each citing its source: CJ/T 188-2004 clause 7 Tables 5-9 as transcribed
publicly, and public implementations). This module loads it and decodes/encodes the data that
follows ``DI SER`` in a data field; :mod:`.messages` splits DI and SER off.

A DI's layout can depend on the meter class (901F is 19 bytes from a water, gas or other meter
and 43 bytes from a heat meter; the meter type T decides, Table 3). Values whose unit is sent as
a unit code (计量单位代号) are converted to canonical units (m3, m3/h, kWh, GJ, kW); the value as
sent stays in ``fields`` (``raw_value``, ``raw_unit``, ``unit_code``).

Decoding is tolerant: a layout that does not fit the meter type but fits another class is used
with a warning; a field that is not BCD decodes to None with a warning; extra bytes are reported
and kept as hex; unknown DIs decode to their hex. Only a data field too short for any layout
raises :class:`RemoteProtocolError`. Encoding is strict: a value that does not fit, an unknown DI
or field raise :class:`LocalProtocolError`.
"""

from __future__ import annotations

import datetime
import functools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Final

from meter_gateway.protocols.cjt188.errors import LocalProtocolError, RemoteProtocolError
from meter_gateway.protocols.cjt188.formats import (
    FieldValue,
    bcd_digits,
    decode_field,
    encode_field,
    format_length,
)
from meter_gateway.protocols.cjt188.functions import Function
from meter_gateway.protocols.cjt188.identifiers import di_text
from meter_gateway.protocols.cjt188.status import Status, StatusBit, load_bits
from meter_gateway.protocols.cjt188.tables import default_tables, parse_tables

__all__ = [
    "Catalogue",
    "DataItem",
    "Decoded",
    "DecodedValue",
    "FieldSpec",
    "UnitCode",
    "default_catalogue",
]

CODED: Final = "coded"
CLASSES: Final = ("water", "gas", "heat", "cooling", "other")
_FUNCTIONS: Final = {f.name.lower(): f for f in Function}


@dataclass(frozen=True, slots=True)
class UnitCode:
    """One entry of the unit-code table: ``value_in_symbol * factor = value_in_canonical``."""

    code: int
    symbol: str
    canonical: str
    factor: Decimal


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One field of a layout; ``unit == "coded"`` means a unit-code byte follows the value."""

    name: str
    format: str
    unit: str | None = None
    default_unit: str | None = None

    @property
    def coded(self) -> bool:
        return self.unit == CODED

    @property
    def length(self) -> int:
        return format_length(self.format) + (1 if self.coded else 0)


Layout = tuple[FieldSpec, ...]


@dataclass(frozen=True, slots=True)
class DataItem:
    """One catalogue entry: a DI, its function, and its request and reply layouts by meter class."""

    di: int
    name: str
    function: Function
    source: str
    request: Layout = ()
    reply: Mapping[str, Layout] = field(default_factory=dict)  # class -> layout; "*" for any
    nth: int | None = None  # history DIs: the Nth most recent settlement (1 = last month)

    @property
    def di_text(self) -> str:
        return di_text(self.di)

    def reply_layout(self, meter_class: str) -> Layout:
        found = self.reply.get(meter_class)
        if found is None:
            found = self.reply.get("*")
        if found is None:
            found = self.reply.get("water", ())
        return found


@dataclass(slots=True)
class DecodedValue:
    """One value decoded from a data field (JSON-friendly ``value``)."""

    di: int
    name: str
    quantity: str | None
    value: object
    unit: str | None = None
    timestamp: datetime.datetime | None = None
    fields: dict[str, object] = field(default_factory=dict)


@dataclass(slots=True)
class Decoded:
    """What a data field held, and what was odd about it (tolerated, reported)."""

    values: list[DecodedValue]
    warnings: list[str] = field(default_factory=list)

    def by_quantity(self) -> dict[str, object]:
        return {v.quantity: v.value for v in self.values if v.quantity}


class Catalogue:
    """The parsed tables: items by DI, meter types, unit codes and the status bits."""

    def __init__(self, tables: Mapping[str, Any], origin: str = "cjt188.toml") -> None:
        self.origin = origin
        self.standard = str(tables.get("standard", ""))
        self.units = _units(origin, tables.get("units", {}))
        self._units_by_symbol = {u.symbol: u for u in self.units.values()}
        self.status_bits: tuple[StatusBit, ...] = load_bits(tables)
        self._types, self._ranges = _meter_types(origin, tables)
        layouts = {name: _layout(f"{origin}: layouts.{name}", rows) for name, rows in tables.get("layouts", {}).items()}
        self._items: dict[int, DataItem] = {}
        for index, raw in enumerate(tables.get("items", ())):
            for item in _items(f"{origin}: item {index + 1} ({raw.get('di', '?')})", raw, layouts):
                if item.di in self._items:
                    raise LocalProtocolError(f"{origin}: DI {item.di_text} is defined twice")
                self._items[item.di] = item

    @classmethod
    def from_text(cls, text: str, origin: str = "<catalogue>") -> Catalogue:
        return cls(parse_tables(text, origin), origin)

    # -- look-ups ------------------------------------------------------------------------------

    def get(self, di: int) -> DataItem | None:
        return self._items.get(di)

    def require(self, di: int) -> DataItem:
        item = self._items.get(di)
        if item is None:
            shown = di_text(di) if 0 <= di <= 0xFFFF else repr(di)
            raise LocalProtocolError(f"CJ/T 188 data identifier {shown} is unknown")
        return item

    def items(self) -> Iterator[DataItem]:
        return iter(self._items.values())

    def meter_class(self, meter_type: int) -> str:
        """``water``, ``gas``, ``heat``, ``cooling``, ``other`` or ``unknown`` (Table 3 ranges)."""
        named = self._types.get(meter_type)
        if named is not None:
            return named[2]
        for meter_class, (low, high) in self._ranges.items():
            if low <= meter_type <= high:
                return meter_class
        return "unknown"

    def meter_type_name(self, meter_type: int) -> str:
        named = self._types.get(meter_type)
        if named is not None:
            return named[0]
        if meter_type == 0xAA:
            return "any"
        meter_class = self.meter_class(meter_type)
        return f"other_{meter_class}" if meter_class != "unknown" else f"unknown_{meter_type:02X}"

    def meter_type_label(self, meter_type: int) -> str | None:
        named = self._types.get(meter_type)
        return named[1] if named is not None else None

    def known_meter_type(self, meter_type: int) -> bool:
        return meter_type == 0xAA or self.meter_class(meter_type) != "unknown"

    def unit_by_symbol(self, symbol: str) -> UnitCode:
        found = self._units_by_symbol.get(symbol)
        if found is None:
            known = sorted(self._units_by_symbol)
            raise LocalProtocolError(f"unit {symbol!r} has no CJ/T 188 unit code (known: {known})")
        return found

    # -- decoding ------------------------------------------------------------------------------

    def decode_reply(self, di: int, meter_type: int, raw: bytes) -> Decoded:
        """Decode what follows ``DI SER`` in a meter's normal reply for ``di``."""
        item = self._items.get(di)
        if item is None:
            return _unknown(di, raw)
        meter_class = self.meter_class(meter_type)
        layout = item.reply_layout(meter_class)
        warnings: list[str] = []
        if sum(spec.length for spec in layout) != len(raw):
            for other_class in CLASSES:
                other = item.reply_layout(other_class)
                if other is not layout and sum(spec.length for spec in other) == len(raw):
                    warnings.append(
                        f"{item.di_text}: {len(raw)} bytes fit the {other_class} layout, not the {meter_class} one"
                        f" of meter type {meter_type:02X}"
                    )
                    layout = other
                    break
        decoded = self._decode_layout(item, layout, raw)
        decoded.warnings[:0] = warnings
        return decoded

    def decode_request(self, di: int, raw: bytes) -> Decoded:
        """Decode what follows ``DI SER`` in a master's request for ``di`` (write data)."""
        item = self._items.get(di)
        if item is None:
            return _unknown(di, raw)
        return self._decode_layout(item, item.request, raw)

    def _decode_layout(self, item: DataItem, layout: Layout, raw: bytes) -> Decoded:
        out = Decoded([])
        need = sum(spec.length for spec in layout)
        if len(raw) < need:
            whole = 0
            for spec in layout:
                if whole + spec.length > len(raw):
                    break
                whole += spec.length
            if not layout or (whole == 0 and raw):
                raise RemoteProtocolError(f"{item.di_text} ({item.name}): data of {len(raw)} bytes, expected {need}")
            out.warnings.append(f"{item.di_text}: data of {len(raw)} bytes is shorter than {need}: partial")
        offset = 0
        for spec in layout:
            if offset + spec.length > len(raw):
                break
            out.values += self._decode_field(item, spec, raw[offset : offset + spec.length], out.warnings)
            offset += spec.length
        if offset < len(raw) and len(raw) > need:
            out.warnings.append(f"{item.di_text}: {len(raw) - offset} extra byte(s) {raw[offset:].hex().upper()}")
        return out

    def _decode_field(self, item: DataItem, spec: FieldSpec, raw: bytes, warnings: list[str]) -> list[DecodedValue]:
        body = raw[:-1] if spec.coded else raw
        fields: dict[str, object] = {}
        if item.nth is not None:
            fields["nth"] = item.nth
        try:
            value: FieldValue = decode_field(spec.format, body)
        except RemoteProtocolError as exc:
            warnings.append(f"{item.di_text} {spec.name}: {exc}")
            fields["raw"] = body.hex().upper()
            return [DecodedValue(item.di, item.name, spec.name, None, None, None, fields)]
        if spec.format == "ST":
            assert isinstance(value, int)
            return self._status_values(item, Status(value), fields)
        unit = spec.unit
        if spec.coded:
            code = raw[-1]
            unit_code = self.units.get(code)
            fields["unit_code"] = f"{code:02X}"
            if unit_code is None or not isinstance(value, int | float):
                warnings.append(f"{item.di_text} {spec.name}: unknown unit code {code:02X}")
                unit = None
            else:
                fields["raw_value"] = value
                fields["raw_unit"] = unit_code.symbol
                value = _scaled(spec.format, body, unit_code.factor)
                unit = unit_code.canonical
        timestamp = value if isinstance(value, datetime.datetime) else None
        shown = value.isoformat() if isinstance(value, datetime.datetime) else value
        return [DecodedValue(item.di, item.name, spec.name, shown, unit, timestamp, fields)]

    def _status_values(self, item: DataItem, status: Status, fields: dict[str, object]) -> list[DecodedValue]:
        bits = {bit.name: bit.decode(status.word) for bit in self.status_bits}
        status_fields = {**fields, "st": str(status), **bits}
        out = [DecodedValue(item.di, item.name, "status", status.word, None, None, status_fields)]
        out += [
            DecodedValue(item.di, item.name, bit.quantity, bits[bit.name], None, None, dict(fields))
            for bit in self.status_bits
        ]
        return out

    # -- encoding ------------------------------------------------------------------------------

    def encode_reply(self, di: int, meter_type: int, values: Mapping[str, object]) -> bytes:
        """The data a meter sends after ``DI SER`` for ``di``; ``values`` keyed by field name."""
        item = self.require(di)
        return self._encode_layout(item, item.reply_layout(self.meter_class(meter_type)), values)

    def encode_request(self, di: int, values: Mapping[str, object]) -> bytes:
        """The data a master sends after ``DI SER`` (write data) for ``di``."""
        item = self.require(di)
        return self._encode_layout(item, item.request, values)

    def _encode_layout(self, item: DataItem, layout: Layout, values: Mapping[str, object]) -> bytes:
        names = {spec.name for spec in layout}
        unknown = sorted(set(values) - names)
        if unknown:
            raise LocalProtocolError(f"{item.di_text} ({item.name}): unknown fields {unknown}; it has {sorted(names)}")
        out = bytearray()
        for spec in layout:
            if spec.name not in values:
                raise LocalProtocolError(f"{item.di_text} ({item.name}): field {spec.name!r} is missing")
            try:
                out += self._encode_field(spec, values[spec.name])
            except LocalProtocolError as exc:
                raise LocalProtocolError(f"{item.di_text} ({item.name}) {spec.name}: {exc}") from exc
        return bytes(out)

    def _encode_field(self, spec: FieldSpec, value: object) -> bytes:
        if spec.format == "ST":
            if isinstance(value, Status):
                return value.to_bytes()
            if isinstance(value, Mapping):
                return Status.build(**value).to_bytes()
            return encode_field("ST", value)
        if not spec.coded:
            return encode_field(spec.format, value)
        number, symbol = _number_and_unit(value, spec.default_unit)
        return encode_field(spec.format, number) + bytes((self.unit_by_symbol(symbol).code,))


def _number_and_unit(value: object, default_unit: str | None) -> tuple[object, str]:
    """A coded field's value: a number (in ``default_unit``), ``(number, unit)`` or a mapping."""
    if isinstance(value, Mapping):
        number, unit = value.get("value"), value.get("unit", default_unit)
    elif isinstance(value, tuple) and len(value) == 2:
        number, unit = value
    else:
        number, unit = value, default_unit
    if not isinstance(unit, str):
        raise LocalProtocolError(f"no unit for {value!r}")
    return number, unit


def _scaled(fmt: str, body: bytes, factor: Decimal) -> int | float:
    """The value of BCD ``body`` in format ``fmt`` times ``factor``, exactly, then as a number."""
    decimals = len(fmt) - fmt.index(".") - 1 if "." in fmt else 0
    exact = Decimal(bcd_digits(fmt, body)).scaleb(-decimals) * factor
    return int(exact) if exact == exact.to_integral_value() and decimals == 0 and factor >= 1 else float(exact)


def _unknown(di: int, raw: bytes) -> Decoded:
    values = [DecodedValue(di, "unknown", None, raw.hex().upper())] if raw else []
    return Decoded(values, [f"data identifier {di_text(di)} is not in the catalogue"])


# -- loading ---------------------------------------------------------------------------------------


def _hex_byte(where: str, text: object) -> int:
    try:
        value = int(str(text), 16)
    except ValueError:
        raise LocalProtocolError(f"{where}: {text!r} is not a hex byte") from None
    if not 0 <= value <= 0xFF:
        raise LocalProtocolError(f"{where}: {text!r} is not a byte")
    return value


def _units(origin: str, raw: Mapping[str, Any]) -> dict[int, UnitCode]:
    out = {}
    for code_text, row in raw.items():
        code = _hex_byte(f"{origin}: units", code_text)
        try:
            out[code] = UnitCode(code, str(row["symbol"]), str(row["canonical"]), Decimal(str(row["factor"])))
        except (KeyError, TypeError, ArithmeticError) as exc:
            raise LocalProtocolError(f"{origin}: units.{code_text}: {exc!r}") from None
    return out


def _meter_types(
    origin: str, tables: Mapping[str, Any]
) -> tuple[dict[int, tuple[str, str, str]], dict[str, tuple[int, int]]]:
    types = {}
    for code_text, row in tables.get("meter_types", {}).items():
        code = _hex_byte(f"{origin}: meter_types", code_text)
        if row.get("class") not in CLASSES:
            raise LocalProtocolError(f"{origin}: meter_types.{code_text}: class must be one of {CLASSES}")
        types[code] = (str(row["name"]), str(row.get("label", "")), str(row["class"]))
    ranges = {}
    for meter_class, (low, high) in tables.get("meter_type_ranges", {}).items():
        ranges[str(meter_class)] = (_hex_byte(origin, low), _hex_byte(origin, high))
    return types, ranges


_FIELD_KEYS: Final = frozenset({"name", "format", "unit", "default_unit"})


def _layout(where: str, rows: object) -> Layout:
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise LocalProtocolError(f"{where}: a layout is a list of field tables")
    specs = []
    for row in rows:
        unknown = set(row) - _FIELD_KEYS
        if unknown:
            raise LocalProtocolError(f"{where}: unknown keys {sorted(unknown)}")
        spec = FieldSpec(str(row["name"]), str(row["format"]), row.get("unit"), row.get("default_unit"))
        format_length(spec.format)  # an unknown format fails at load time
        if spec.coded and spec.default_unit is None:
            raise LocalProtocolError(f"{where}: coded field {spec.name!r} needs a default_unit")
        specs.append(spec)
    if len({spec.name for spec in specs}) != len(specs):
        raise LocalProtocolError(f"{where}: field names repeat")
    return tuple(specs)


def _layout_ref(where: str, raw: object, layouts: Mapping[str, Layout]) -> Layout:
    if isinstance(raw, str):
        if raw not in layouts:
            raise LocalProtocolError(f"{where}: no layout {raw!r}")
        return layouts[raw]
    return _layout(where, raw)


_ITEM_KEYS: Final = frozenset({"di", "name", "function", "source", "request", "reply", "count"})


def _items(where: str, raw: Mapping[str, Any], layouts: Mapping[str, Layout]) -> list[DataItem]:
    unknown = set(raw) - _ITEM_KEYS
    if unknown:
        raise LocalProtocolError(f"{where}: unknown keys {sorted(unknown)}")
    if not raw.get("source"):
        raise LocalProtocolError(f"{where}: every entry cites its source")
    function = _FUNCTIONS.get(str(raw.get("function")))
    if function is None:
        raise LocalProtocolError(f"{where}: function must be one of {sorted(_FUNCTIONS)}")
    try:
        first = int(str(raw["di"]), 16)
    except (KeyError, ValueError):
        raise LocalProtocolError(f"{where}: 'di' must be 4 hex digits") from None
    request = _layout_ref(f"{where}.request", raw.get("request", []), layouts)
    reply_raw = raw.get("reply", [])
    if isinstance(reply_raw, dict):
        reply = {str(k): _layout_ref(f"{where}.reply.{k}", v, layouts) for k, v in reply_raw.items()}
    else:
        reply = {"*": _layout_ref(f"{where}.reply", reply_raw, layouts)}
    count = raw.get("count")
    name = str(raw.get("name", ""))
    if count is None:
        return [DataItem(first, name, function, str(raw["source"]), request, reply)]
    return [
        DataItem(first + n - 1, name.format(n=n), function, str(raw["source"]), request, reply, nth=n)
        for n in range(1, int(count) + 1)
    ]


@functools.cache
def default_catalogue() -> Catalogue:
    """The catalogue of the packaged ``data/cjt188.toml``."""
    return Catalogue(default_tables())


def layout_names(layout: Sequence[FieldSpec]) -> list[str]:
    return [spec.name for spec in layout]

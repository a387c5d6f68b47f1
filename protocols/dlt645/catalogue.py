"""The DL/T 645 data-identifier catalogue: what each DI is, how its bytes decode, what it means.

The content lives in table files (``protocols/dlt645/data/dlt645_2007.toml`` and
``dlt645_1997.toml``), one entry per DI or family of DIs, each citing its source; the 2007 file's
header documents the quantity-name scheme. This module loads them and decodes/encodes data
fields. Data bytes here have the 0x33 offset already removed and exclude the DI bytes; the frame
layer does both.

An item is one of four kinds:

``value``
    one value of one :mod:`~protocols.dlt645.formats` format;
``record``
    named sub-fields (maximum demand + its time, an event record), decoded into one
    :class:`DecodedValue` whose ``value`` and ``timestamp`` come from the fields the entry names;
``block``
    a DI that reads several other DIs at once (``0001FF00``, ``040005FF``, ``901F``). A meter sends
    as many members as it has (four tariffs, or eight): the data is split by member length and
    each whole member present gives one :class:`DecodedValue`; a partial trailing member is an
    error;
``series``
    like a block, but the parts have no DI of their own (the daily frozen energies ``050601NN``,
    total then each tariff).

Decoded values are JSON-friendly: ``value`` is an int, float, str, bool or None (dates and times as
ISO 8601 text); ``timestamp`` is the meter's own naive local time for the value when it states one
(demand time, event time, freeze time); ``fields`` holds the extras the CLI prints (``date`` and
``weekday``, ``time``, ``status_word`` and named status bits, record sub-fields, ``nth``).

Errors: bytes from a peer that do not fit raise :class:`RemoteProtocolError`; asking for an unknown
DI or encoding a value that does not fit raise :class:`LocalProtocolError`. Nothing else escapes.
"""

from __future__ import annotations

import datetime
import functools
import string
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import msgspec

from meter_gateway.protocols.dlt645.edition import Edition
from meter_gateway.protocols.dlt645.errors import LocalProtocolError, RemoteProtocolError
from meter_gateway.protocols.dlt645.formats import (
    FieldValue,
    _encoder,
    decode_field,
    encode_field,
    field_decoder,
    format_length,
    json_fields,
    json_value,
)

__all__ = [
    "BitField",
    "Catalogue",
    "DataItem",
    "DecodedValue",
    "FieldSpec",
    "default_catalogue",
    "load_items",
]

ItemKind = Literal["value", "record", "block", "series"]

_STATUS_FORMATS: Final = frozenset({"NN", "NNNN"})
_RESERVED_FIELDS: Final = frozenset({"status_word", "nth", "date", "weekday", "time"})
_DATA_FILES: Final = {Edition.DLT645_2007: "dlt645_2007.toml", Edition.DLT645_1997: "dlt645_1997.toml"}


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One named sub-field of a record, or one part of a series."""

    name: str
    format: str
    unit: str | None = None
    quantity: str | None = None

    @property
    def length(self) -> int:
        return format_length(self.format)


@dataclass(frozen=True, slots=True)
class BitField:
    """``width`` bits at ``shift`` of a status word; ``values`` names each state when given."""

    name: str
    shift: int
    width: int = 1
    values: tuple[str, ...] = ()

    def decode(self, word: int) -> bool | int | str:
        state = (word >> self.shift) & ((1 << self.width) - 1)
        if self.values:
            return self.values[state] if state < len(self.values) else state
        return bool(state) if self.width == 1 else state


@dataclass(frozen=True, slots=True)
class DataItem:
    """One catalogue entry. ``length`` is the full length (a block's or series' with every member)."""

    edition: Edition
    di: int
    name: str
    format: str | None
    length: int
    unit: str | None
    quantity: str | None
    members: tuple[int, ...] = ()
    fields: tuple[FieldSpec, ...] = ()
    source: str = ""
    kind: ItemKind = "value"
    value_field: str | None = None
    timestamp_field: str | None = None
    bits: tuple[BitField, ...] = ()
    nth: int | None = None  # frozen data and event records: the Nth most recent (1 = last)

    @property
    def di_text(self) -> str:
        return self.edition.format_di(self.di)


class DecodedValue(msgspec.Struct, frozen=True):
    """One value decoded from a data field (a block gives one per member present).

    A frozen msgspec Struct rather than a frozen dataclass: one is built for every value polled,
    and a Struct sets its fields without going through ``object.__setattr__`` one by one.
    """

    di: int
    item: DataItem | None
    name: str
    quantity: str | None
    value: object
    unit: str | None
    timestamp: datetime.datetime | None
    fields: dict[str, object] = {}


class _Table:
    """One edition's items. Families from the table files stay templates until a DI of theirs
    is asked for (start-up cost is then parsing, not building two thousand items); the quantity
    indexes, which only look-ups by quantity need, are built on first use."""

    def __init__(
        self,
        items: Iterable[DataItem] = (),
        pending: Mapping[int, tuple[_Entry, Mapping[str, object]]] | None = None,
    ) -> None:
        self._items: dict[int, DataItem] = {}
        self._pending = dict(pending or {})
        self._order = list(self._pending)
        for item in items:
            if item.di in self._items or item.di in self._pending:
                raise LocalProtocolError(f"catalogue: DI {item.di_text} is defined twice")
            self._items[item.di] = item
            self._order.append(item.di)
        self._parts: dict[int, tuple[DataItem, ...]] = {}
        # DI -> what a meter's read reply for it is made of (see Catalogue.reply_parts)
        self.reply_parts: dict[int, tuple[tuple[DataItem, Callable[[object], bytes]], ...]] = {}
        self._by_quantity: dict[str, DataItem] | None = None
        self._by_key: dict[tuple[str, int | None], DataItem] = {}
        self._decoders: dict[int, _Decoder] = {}  # DI -> its item's compiled decoder

    def decoder(self, di: int) -> _Decoder | None:
        """The compiled decoder of ``di``'s data field, made with its item (None: unknown DI)."""
        found = self._decoders.get(di)
        if found is None:
            item = self.get(di)
            if item is None:
                return None
            found = self._decoders[di] = self._compile(item)
        return found

    def di_name(self, di: int) -> str:
        """``DI (name)`` of a known DI, as decoding errors start."""
        item = self._member(di)
        return f"{item.di_text} ({item.name})"

    def _compile(self, item: DataItem) -> _Decoder:
        if item.kind == "value":
            return _value_decoder(item)
        if item.kind == "block":
            # a block's members are never blocks (checked by the loader)
            return _block_decoder([(member, self._compile(member)) for member in self.parts(item)])
        if item.kind == "series":
            return _series_decoder(item)
        return functools.partial(_decode_record_checked, item)

    def get(self, di: int) -> DataItem | None:
        item = self._items.get(di)
        if item is None:
            found = self._pending.get(di)
            if found is None:
                return None
            entry, variables = found
            item = self._items[di] = entry.build(variables, self._member)
        return item

    def _member(self, di: int) -> DataItem:
        item = self.get(di)
        if item is None:
            raise LocalProtocolError(f"catalogue: block member {di:08X} is not defined")
        return item

    def all(self) -> list[DataItem]:
        return [self._member(di) for di in self._order]

    def parts(self, block: DataItem) -> tuple[DataItem, ...]:
        parts = self._parts.get(block.di)
        if parts is None:
            parts = self._parts[block.di] = tuple(self._member(m) for m in block.members)
        return parts

    @property
    def by_quantity(self) -> dict[str, DataItem]:
        if self._by_quantity is None:
            by_quantity: dict[str, DataItem] = {}
            for item in self.all():
                for quantity in _quantities(item):
                    by_quantity.setdefault(quantity, item)
                    self._by_key.setdefault((quantity, item.nth), item)
            self._by_quantity = by_quantity
        return self._by_quantity

    @property
    def by_key(self) -> dict[tuple[str, int | None], DataItem]:
        """(quantity, nth) -> item."""
        _ = self.by_quantity
        return self._by_key


def _quantities(item: DataItem) -> list[str]:
    """The quantities an item reads: its own, and for a series each part's."""
    quantities = [item.quantity] if item.quantity else []
    if item.kind == "series":
        quantities += [spec.quantity for spec in item.fields if spec.quantity]
    return quantities


class Catalogue:
    """Data items of both editions. Each edition's table is loaded on first use."""

    def __init__(self, sources: Mapping[Edition, Callable[[], str]]) -> None:
        """``sources`` gives, per edition, a function returning that edition's table-file text."""
        self._sources = dict(sources)
        self._tables: dict[Edition, _Table] = {}

    @classmethod
    def from_items(cls, items: Iterable[DataItem]) -> Catalogue:
        """A catalogue of ready-made items (tests, tools)."""
        catalogue = cls({})
        by_edition: dict[Edition, list[DataItem]] = {edition: [] for edition in Edition}
        for item in items:
            by_edition[item.edition].append(item)
        for edition, found in by_edition.items():
            catalogue._tables[edition] = _Table(found)
        return catalogue

    def _table(self, edition: Edition) -> _Table:
        table = self._tables.get(edition)
        if table is None:
            source = self._sources.get(edition)
            if source is None:
                table = _Table()
            else:
                name = _DATA_FILES.get(edition, edition.value)
                parsed_edition, pending = _parse(source(), name)
                if parsed_edition is not edition:
                    raise LocalProtocolError(f"{name}: describes DL/T 645-{parsed_edition.value}")
                table = _Table(pending=pending)
            self._tables[edition] = table
        return table

    # -- look-ups ------------------------------------------------------------------------------

    def get(self, edition: Edition, di: int) -> DataItem | None:
        return self._table(edition).get(di)

    def require(self, edition: Edition, di: int) -> DataItem:
        item = self.get(edition, di)
        if item is None:
            raise LocalProtocolError(f"DL/T 645-{edition.value} data identifier {_di_text(edition, di)} is unknown")
        return item

    def items(self, edition: Edition) -> Iterator[DataItem]:
        return iter(self._table(edition).all())

    def by_quantity(self, edition: Edition, quantity: str) -> DataItem | None:
        """The item that reads ``quantity`` (for Nth-most-recent families, the most recent one)."""
        return self._table(edition).by_quantity.get(quantity)

    def equivalent(self, di: int, from_edition: Edition, to_edition: Edition) -> int | None:
        """The DI of the same quantity in the other edition, or None when it has none."""
        item = self.get(from_edition, di)
        if item is None:
            return None
        if from_edition is to_edition:
            return di
        table = self._table(to_edition)
        for quantity in _quantities(item):
            found = table.by_key.get((quantity, item.nth))
            if found is not None:
                return found.di
        return None

    # -- decoding ------------------------------------------------------------------------------

    def decode(self, edition: Edition, di: int, raw: bytes | bytearray | memoryview) -> list[DecodedValue]:
        """Decode the data field of ``di`` (offset removed, DI bytes stripped)."""
        if type(raw) is not bytes:
            raw = bytes(raw)
        table = self._tables.get(edition) or self._table(edition)
        decode = table.decoder(di)
        if decode is None:
            return [DecodedValue(di, None, "unknown", None, raw.hex().upper(), None, None, {})]
        try:
            if raw:
                return decode(raw)
            problem = "the reply has no data"
        except RemoteProtocolError as exc:
            raise RemoteProtocolError(f"{table.di_name(di)}: {exc}") from exc
        raise RemoteProtocolError(f"{table.di_name(di)}: {problem}")

    # -- encoding ------------------------------------------------------------------------------

    def encode(self, edition: Edition, di: int, value: object) -> bytes:
        """The data field for ``di``: a value; a mapping of field names for a record; a sequence
        of member values (as many as the meter has, in order) for a block or series."""
        return self.encoder(edition, di)(value)

    def encoder(self, edition: Edition, di: int) -> Callable[[object], bytes]:
        """``encode(edition, di, ·)`` with the look-ups done once, for a caller that encodes the
        same DI again and again (a simulated meter answering polls)."""
        item = self.require(edition, di)
        if item.kind == "value":
            assert item.format is not None
            encode_value = _encoder(item.format)
        else:
            encode_value = functools.partial(self._encode_item, item)

        def encode(value: object) -> bytes:
            try:
                return encode_value(value)
            except LocalProtocolError as exc:
                raise LocalProtocolError(f"{item.di_text} ({item.name}): {exc}") from exc

        return encode

    def reply_parts(self, edition: Edition, di: int) -> tuple[tuple[DataItem, Callable[[object], bytes]], ...] | None:
        """What a meter's read reply for ``di`` is made of, each item with its :meth:`encoder`: a
        block's members (a meter answers as many as it has) in order, up to the first one the
        catalogue lacks; any other item itself. None for an unknown DI. Kept per DI: a meter
        answers the same few DIs all the time."""
        table = self._tables.get(edition) or self._table(edition)
        parts = table.reply_parts.get(di)
        if parts is None:
            item = table.get(di)
            if item is None:
                return None  # not kept: asking for arbitrary unknown DIs must not grow the table
            items = [item]
            if item.kind == "block":
                items = []
                for member in item.members:
                    found = table.get(member)
                    if found is None:
                        break
                    items.append(found)
            parts = table.reply_parts[di] = tuple((part, self.encoder(edition, part.di)) for part in items)
        return parts

    def _encode_item(self, item: DataItem, value: object) -> bytes:
        if item.kind == "value":
            assert item.format is not None
            return encode_field(item.format, value)
        if item.kind == "record":
            if not isinstance(value, Mapping):
                raise LocalProtocolError(f"a record needs a mapping of {[f.name for f in item.fields]}")
            missing = [f.name for f in item.fields if f.name not in value]
            if missing:
                raise LocalProtocolError(f"record fields missing: {missing}")
            return b"".join(encode_field(f.format, value[f.name]) for f in item.fields)
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            raise LocalProtocolError("a block needs a sequence of member values")
        count = len(item.members) if item.kind == "block" else len(item.fields)
        if not 1 <= len(value) <= count:
            raise LocalProtocolError(f"a block takes 1 to {count} values, got {len(value)}")
        if item.kind == "series":
            return b"".join(encode_field(f.format, v) for f, v in zip(item.fields, value, strict=False))
        members = self._table(item.edition).parts(item)
        return b"".join(self._encode_item(m, v) for m, v in zip(members, value, strict=False))


_Decoder = Callable[[bytes], list[DecodedValue]]


def _value_decoder(item: DataItem) -> _Decoder:
    """A value item's decoder: its format looked up once; a number (the bulk of what is polled)
    needs none of the JSON extras, status bits or timestamps :func:`_decoded` works out."""
    assert item.format is not None  # a value item always has one (checked by the loader)
    length, decode_raw, numeric = field_decoder(item.format)
    if length != item.length:
        raise LocalProtocolError(f"catalogue: {item.di_text} is {item.length} bytes, its format {length}")
    wrong_length = f"needs {length} bytes, got {{}}"
    if numeric:
        di, name, quantity, unit, nth = item.di, item.name, item.quantity, item.unit, item.nth

        def decode_number(raw: bytes) -> list[DecodedValue]:
            if len(raw) != length:
                raise RemoteProtocolError(wrong_length.format(len(raw)))
            fields: dict[str, object] = {} if nth is None else {"nth": nth}
            return [DecodedValue(di, item, name, quantity, decode_raw(raw), unit, None, fields)]

        return decode_number

    def decode_other(raw: bytes) -> list[DecodedValue]:
        if len(raw) != length:
            raise RemoteProtocolError(wrong_length.format(len(raw)))
        return [_decoded(item, item.quantity, item.unit, decode_raw(raw), item.name)]

    return decode_other


def _block_decoder(members: Sequence[tuple[DataItem, _Decoder]]) -> _Decoder:
    """A block's decoder: each member's slice and decoder fixed once; a meter answers the first
    N members it has, so the reply's length says how many (any other length is an error)."""
    lengths = [member.length for member, _ in members]
    parts: list[tuple[int, int, DataItem, _Decoder]] = []
    count_of: dict[int, int] = {}
    offset = 0
    for member, decode in members:
        parts.append((offset, offset + member.length, member, decode))
        offset += member.length
        count_of[offset] = len(parts)

    def decode_block(raw: bytes) -> list[DecodedValue]:
        count = count_of.get(len(raw))
        if count is None:  # not a whole number of members: _split says what is wrong
            count = len(_split(raw, lengths))
        out: list[DecodedValue] = []
        for start, end, member, decode in parts[:count]:
            try:
                out += decode(raw[start:end])
            except RemoteProtocolError as exc:
                raise RemoteProtocolError(f"member {member.di_text} ({member.name}): {exc}") from exc
        return out

    return decode_block


def _series_decoder(item: DataItem) -> _Decoder:
    specs = [(spec, f"{item.name}, {spec.name}") for spec in item.fields]
    lengths = [spec.length for spec in item.fields]

    def decode_series(raw: bytes) -> list[DecodedValue]:
        return [
            _decoded(item, spec.quantity, spec.unit, _field(spec, chunk), name)
            for (spec, name), chunk in zip(specs, _split(raw, lengths), strict=False)
        ]

    return decode_series


def _decode_record_checked(item: DataItem, raw: bytes) -> list[DecodedValue]:
    if len(raw) != item.length:
        raise RemoteProtocolError(f"needs {item.length} bytes, got {len(raw)}")
    return [_decode_record(item, raw)]


def _di_text(edition: Edition, di: int) -> str:
    return edition.format_di(di) if 0 <= di < 1 << (8 * edition.di_length) else repr(di)


def _split(raw: bytes, lengths: Sequence[int]) -> list[bytes]:
    """Cut ``raw`` into whole members, as many as present; a partial member is an error."""
    chunks: list[bytes] = []
    offset, size = 0, len(raw)
    for length in lengths:
        if offset == size:
            break
        end = offset + length
        if end > size:
            raise RemoteProtocolError(
                f"{size - offset} byte(s) left after {len(chunks)} member(s) do not make a whole"
                f" member of {length} bytes"
            )
        chunks.append(raw[offset:end])
        offset = end
    if offset != size:
        raise RemoteProtocolError(f"{size} bytes is more than the {offset} all members take")
    return chunks


def _field(spec: FieldSpec, raw: bytes) -> FieldValue:
    try:
        return decode_field(spec.format, raw)
    except RemoteProtocolError as exc:
        raise RemoteProtocolError(f"field {spec.name!r}: {exc}") from exc


def _decoded(item: DataItem, quantity: str | None, unit: str | None, value: FieldValue, name: str) -> DecodedValue:
    fields = json_fields(value)
    if item.format in _STATUS_FORMATS and isinstance(value, int):
        fields["status_word"] = value
        for bit in item.bits:
            fields[bit.name] = bit.decode(value)
    if item.nth is not None:
        fields["nth"] = item.nth
    timestamp = value if isinstance(value, datetime.datetime) else None
    return DecodedValue(item.di, item, name, quantity, json_value(value), unit, timestamp, fields)


def _decode_record(item: DataItem, raw: bytes) -> DecodedValue:
    values: dict[str, FieldValue] = {}
    offset = 0
    for spec in item.fields:
        values[spec.name] = _field(spec, raw[offset : offset + spec.length])
        offset += spec.length
    fields: dict[str, object] = {name: json_value(value) for name, value in values.items()}
    if item.nth is not None:
        fields["nth"] = item.nth
    stamp = values.get(item.timestamp_field) if item.timestamp_field else None
    timestamp = stamp if isinstance(stamp, datetime.datetime) else None
    value = json_value(values[item.value_field]) if item.value_field else None
    return DecodedValue(item.di, item, item.name, item.quantity, value, item.unit, timestamp, fields)


# -- loading the table files -----------------------------------------------------------------------

_FORMATTER: Final = string.Formatter()
_ITEM_KEYS: Final = frozenset(
    {"di", "name", "quantity", "source", "format", "unit", "bits", "fields", "value", "timestamp",
     "series", "members", "tariffs", "phases", "nth"}
)  # fmt: skip
_KIND_KEYS: Final = ("format", "fields", "series", "members")


def _range(where: str, spec: object) -> range:
    if (
        not isinstance(spec, list)
        or len(spec) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in spec)
    ):
        raise LocalProtocolError(f"{where}: a range is [first, last], got {spec!r}")
    return range(spec[0], spec[1] + 1)


def _tariff_vars(t: int) -> dict[str, object]:
    """Template variables of tariff ``t`` (0 is the total)."""
    return {
        "t": t,
        "tariff": "total" if t == 0 else f"t{t}",
        "tariff_name": "total" if t == 0 else f"tariff {t}",
        "tariff_suffix": "" if t == 0 else f".t{t}",
    }


def _phase_vars(p: int) -> dict[str, object]:
    """Template variables of phase ``p`` (0 is the total)."""
    total = p == 0
    return {"p": p, "phase": "total" if total else f"l{p}", "phase_name": "total" if total else f"phase {p}"}


def _expand(where: str, entry: Mapping[str, Any]) -> list[dict[str, object]]:
    """The template variables of each DI an entry stands for."""
    given = [key for key in ("tariffs", "phases", "nth") if key in entry]
    if len(given) > 1:
        raise LocalProtocolError(f"{where}: give one of 'tariffs', 'phases' or 'nth', not {given}")
    if "tariffs" in entry:
        return [_tariff_vars(t) for t in _range(where, entry["tariffs"])]
    if "phases" in entry:
        return [_phase_vars(p) for p in _range(where, entry["phases"])]
    if "nth" in entry:
        return [{"n": n} for n in _range(where, entry["nth"])]
    return [{}]


def _text(where: str, template: object, variables: Mapping[str, object]) -> str:
    if not isinstance(template, str):
        raise LocalProtocolError(f"{where}: expected text, got {template!r}")
    if "{" not in template:
        return template
    try:
        return template.format(**variables)
    except (KeyError, IndexError, ValueError) as exc:
        raise LocalProtocolError(f"{where}: bad template {template!r}: {exc!r}") from None


def _di(where: str, edition: Edition, text: str) -> int:
    if len(text) != 2 * edition.di_length:
        raise LocalProtocolError(f"{where}: DI {text!r} is not {2 * edition.di_length} hex digits")
    try:
        return int(text, 16)
    except ValueError:
        raise LocalProtocolError(f"{where}: DI {text!r} is not hex") from None


def _template_names(raw: object) -> frozenset[str]:
    """Every template variable the strings inside ``raw`` refer to."""
    if isinstance(raw, str):
        try:
            return frozenset(name for _, name, _, _ in _FORMATTER.parse(raw) if name)
        except ValueError:
            return frozenset()  # reported with its location when the template is used
    if isinstance(raw, dict):
        raw = list(raw.values())
    if isinstance(raw, list):
        return frozenset().union(*(_template_names(v) for v in raw))
    return frozenset()


def _bad_bit(row: object) -> ValueError:
    return ValueError(f"bad bit field {row!r}")


def _bit_tables(where: str, raw: object) -> dict[str, tuple[BitField, ...]]:
    if not isinstance(raw, dict):
        raise LocalProtocolError(f"{where}: 'bit_tables' must be a table")
    tables = {}
    for name, rows in raw.items():
        bits = []
        try:
            for row in rows:
                if "bit" in row:
                    shift, width = int(row["bit"]), 1
                else:
                    low, high = (int(b) for b in row["bits"])
                    shift, width = low, high - low + 1
                bit = BitField(str(row["name"]), shift, width, tuple(str(v) for v in row.get("values", ())))
                if bit.name in _RESERVED_FIELDS or not 0 <= shift < shift + width <= 16:
                    raise _bad_bit(row)
                bits.append(bit)
        except (KeyError, TypeError, ValueError) as exc:
            raise LocalProtocolError(f"{where}.{name}: {exc!r}") from None
        tables[name] = tuple(bits)
    return tables


class _Entry:
    """One ``[[items]]`` entry of a table file: one DI, or a family of DIs sharing templates."""

    __slots__ = ("_specs", "bits", "edition", "expansions", "kind", "raw", "source", "where")

    def __init__(
        self, where: str, edition: Edition, raw: Mapping[str, Any], tables: Mapping[str, tuple[BitField, ...]]
    ) -> None:
        self.where = where
        self.edition = edition
        self.raw = raw
        unknown = set(raw) - _ITEM_KEYS
        if unknown:
            raise LocalProtocolError(f"{where}: unknown keys {sorted(unknown)}")
        if not raw.get("source"):
            raise LocalProtocolError(f"{where}: every entry cites its source")
        self.source = str(raw["source"])
        kinds = [key for key in _KIND_KEYS if key in raw]
        if len(kinds) != 1:
            raise LocalProtocolError(f"{where}: give exactly one of {', '.join(_KIND_KEYS)}")
        self.kind = kinds[0]
        self.bits: tuple[BitField, ...] = ()
        if "bits" in raw:
            if raw["bits"] not in tables:
                raise LocalProtocolError(f"{where}: no bit table {raw['bits']!r}")
            self.bits = tables[raw["bits"]]
        self.expansions = _expand(where, raw)
        # Field specs that do not depend on the family variable are built once for the family.
        self._specs: dict[tuple[tuple[str, object], ...], tuple[tuple[FieldSpec, ...], int]] = {}

    def di(self, variables: Mapping[str, object]) -> int:
        return _di(self.where, self.edition, _text(f"{self.where}.di", self.raw.get("di"), variables))

    def _optional(self, key: str, variables: Mapping[str, object]) -> str | None:
        return _text(f"{self.where}.{key}", self.raw[key], variables) if key in self.raw else None

    def _field_specs(self, variables: Mapping[str, object]) -> tuple[tuple[FieldSpec, ...], int]:
        raw = self.raw[self.kind]
        names = _template_names(raw)
        key = tuple(sorted((k, v) for k, v in variables.items() if k in names))
        found = self._specs.get(key)
        if found is None:
            specs = _field_specs(f"{self.where}.{self.kind}", raw, variables)
            found = self._specs[key] = (specs, sum(spec.length for spec in specs))
        return found

    def build(self, variables: Mapping[str, object], member: Callable[[int], DataItem]) -> DataItem:
        raw, where, edition = self.raw, self.where, self.edition
        di = self.di(variables)
        name = _text(f"{where}.name", raw.get("name"), variables)
        quantity = self._optional("quantity", variables)
        n = variables.get("n")
        nth = n if isinstance(n, int) else None
        if self.kind == "format":
            fmt = _text(f"{where}.format", raw["format"], variables)
            unit = self._optional("unit", variables)
            return DataItem(
                edition, di, name, fmt, format_length(fmt), unit, quantity, (), (), self.source,
                "value", bits=self.bits, nth=nth,
            )  # fmt: skip
        if self.kind == "fields":
            specs, length = self._field_specs(variables)
            by_name = {spec.name: spec for spec in specs}
            value_field, timestamp_field = raw.get("value"), raw.get("timestamp")
            for role in (value_field, timestamp_field):
                if role is not None and role not in by_name:
                    raise LocalProtocolError(f"{where}: no field {role!r}")
            unit = by_name[value_field].unit if value_field else None
            return DataItem(
                edition, di, name, None, length, unit, quantity, (), specs, self.source,
                "record", value_field, timestamp_field, nth=nth,
            )  # fmt: skip
        if self.kind == "series":
            specs, length = self._field_specs(variables)
            units = {spec.unit for spec in specs}
            unit = units.pop() if len(units) == 1 else None
            return DataItem(edition, di, name, None, length, unit, quantity, (), specs, self.source, "series", nth=nth)
        members = self._members(variables)
        parts = [member(m) for m in members]
        if any(part.kind == "block" for part in parts):
            raise LocalProtocolError(f"{where}: a block's members cannot be blocks")
        units = {part.unit for part in parts}
        return DataItem(
            edition, di, name, None, sum(part.length for part in parts),
            units.pop() if len(units) == 1 else None, quantity, members, (), self.source, "block", nth=nth,
        )  # fmt: skip

    def _members(self, variables: Mapping[str, object]) -> tuple[int, ...]:
        spec = self.raw["members"]
        where = f"{self.where}.members"
        if isinstance(spec, list):
            texts = [_text(where, m, variables) for m in spec]
        elif isinstance(spec, dict):
            texts = [_text(where, spec.get("di"), {**variables, **mv}) for mv in _expand(where, spec)]
        else:
            raise LocalProtocolError(f"{where}: members must be a list of DIs or a DI template table")
        if not texts:
            raise LocalProtocolError(f"{where}: a block needs members")
        return tuple(_di(where, self.edition, text) for text in texts)


def _field_specs(where: str, raw: object, variables: Mapping[str, object]) -> tuple[FieldSpec, ...]:
    """A list of field tables, or one table with 'tariffs' standing for a field per tariff."""
    if isinstance(raw, dict):
        rows: list[tuple[Mapping[str, Any], Mapping[str, object]]] = [
            (raw, {**variables, **tv}) for tv in _expand(where, raw)
        ]
    elif isinstance(raw, list) and all(isinstance(row, dict) for row in raw):
        rows = [(row, variables) for row in raw]
    else:
        raise LocalProtocolError(f"{where}: fields must be a list of tables or one table")
    specs = []
    for row, row_vars in rows:
        unknown = set(row) - {"name", "format", "unit", "quantity", "tariffs", "phases", "nth"}
        if unknown:
            raise LocalProtocolError(f"{where}: unknown keys {sorted(unknown)}")
        spec = FieldSpec(
            _text(f"{where}.name", row.get("name"), row_vars),
            _text(f"{where}.format", row.get("format"), row_vars),
            _text(f"{where}.unit", row["unit"], row_vars) if "unit" in row else None,
            _text(f"{where}.quantity", row["quantity"], row_vars) if "quantity" in row else None,
        )
        format_length(spec.format)  # an unknown format name fails here, at load time
        if spec.name == "nth":
            raise LocalProtocolError(f"{where}: field name 'nth' is reserved")
        specs.append(spec)
    if len({spec.name for spec in specs}) != len(specs):
        raise LocalProtocolError(f"{where}: field names repeat")
    return tuple(specs)


def _parse(text: str, origin: str) -> tuple[Edition, dict[int, tuple[_Entry, Mapping[str, object]]]]:
    """Parse a table file into its edition and DI -> (entry, template variables)."""
    import tomllib

    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise LocalProtocolError(f"{origin}: not valid TOML: {exc}") from None
    try:
        edition = Edition.parse(str(document.get("edition")))
    except ValueError as exc:
        raise LocalProtocolError(f"{origin}: {exc}") from None
    tables = _bit_tables(f"{origin}: bit_tables", document.get("bit_tables", {}))
    pending: dict[int, tuple[_Entry, Mapping[str, object]]] = {}
    entries = document.get("items", ())
    if not isinstance(entries, list):
        raise LocalProtocolError(f"{origin}: 'items' must be an array of tables")
    for index, raw in enumerate(entries):
        where = f"{origin}: item {index + 1} ({raw.get('di', '?')})"
        entry = _Entry(where, edition, raw, tables)
        for variables in entry.expansions:
            di = entry.di(variables)
            if di in pending:
                raise LocalProtocolError(f"{where}: DI {edition.format_di(di)} is defined twice")
            pending[di] = (entry, variables)
    return edition, pending


def load_items(text: str, origin: str = "<catalogue>") -> list[DataItem]:
    """Every item of one table file, built (its ``edition`` key says which edition it describes)."""
    _, pending = _parse(text, origin)
    return _Table(pending=pending).all()


def _read_data_file(edition: Edition) -> str:
    """The packaged table file's text.

    Read through the package's own loader (what :func:`pkgutil.get_data` does, so zip installs
    work too) rather than :mod:`importlib.resources`, whose imports would slow every CLI start;
    importlib.resources remains the fallback.
    """
    import os

    from meter_gateway.protocols.dlt645 import data

    name = _DATA_FILES[edition]
    try:
        get_data = getattr(data.__spec__.loader, "get_data", None)
        if get_data is not None and data.__file__:
            raw = get_data(os.path.join(os.path.dirname(data.__file__), name))
            if isinstance(raw, bytes):
                return raw.decode("utf-8")
        from importlib import resources

        return resources.files(data).joinpath(name).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LocalProtocolError(f"packaged DL/T 645 table {name} cannot be read: {exc}") from None


@functools.cache
def default_catalogue() -> Catalogue:
    """The catalogue of the packaged table files (each edition parsed on first use)."""
    return Catalogue({edition: functools.partial(_read_data_file, edition) for edition in Edition})

"""Meter model files: what a meter type answers, where, and how it encodes it.

Every meter model is a TOML file in ``drivers/models/`` (or anywhere, given by path). The
``protocol`` key (a protocol family of :mod:`drivers.registry`) picks the schema, built by the
family's ``models`` builder named in the registry:

``modbus``
    register map: defaults (function, byte/word order, read limits), then ``[[sections]]``, each
    citing its source and listing ``points`` (quantity, address, type, scale, ...), and an
    optional ``[relay]`` (how to open/close the supply and read the state back).
``dlt645``
    data identifiers: an ``edition``, ``[[sections]]`` of ``points`` (quantity, DI), optional
    ``[[blocks]]`` (block-read DIs and the quantities each covers) and an optional ``[relay]``
    saying which status-word bit reports the relay.
``dlt698``, ``cjt188``
    see :mod:`drivers.dlt698_model` and :mod:`drivers.cjt188_model`.

The shipped files document the schema by example (``sim-3ph.toml`` is the fullest). Loading is
strict: an unknown key, a quantity name that is not canonical, a unit other than the canonical
one, a duplicate point or an address that does not fit is a :class:`ModelError` naming the file
and the key, never a silent default. Units are canonical (kWh, kvarh, V, A, kW, kvar, kVA, Hz, ""
for power factor and relay state): a meter reporting W gets ``scale = 0.001``.

Addresses in model files are the 0-based protocol addresses that go on the wire, not the
1-based "30001"-style register numbers of vendor manuals; each file says how it converted.
"""

from __future__ import annotations

import difflib
import math
import re
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Final

from meter_gateway.drivers import registry
from meter_gateway.drivers.errors import ConfigurationError
from meter_gateway.protocols.dlt645.edition import Edition
from meter_gateway.protocols.modbus.values import BYTE_ORDERS, DATA_TYPES, ModbusValueError, ValueCodec

if TYPE_CHECKING:
    from meter_gateway.drivers.cjt188_model import Cjt188Model
    from meter_gateway.drivers.dlt698_model import Dlt698Model

__all__ = [
    "COMMON_KEYS",
    "FUNCTIONS",
    "MODELS_DIR",
    "Dlt645Block",
    "Dlt645Model",
    "Dlt645Point",
    "Dlt645Relay",
    "ModbusModel",
    "ModbusPoint",
    "ModelError",
    "ModelReader",
    "RelayAccess",
    "RelaySpec",
    "Source",
    "available_models",
    "build_dlt645",
    "build_modbus",
    "canonical_info",
    "canonical_unit",
    "load_model",
    "plausible_range",
    "suggest",
]

MODELS_DIR: Final = Path(__file__).resolve().with_name("models")

# Modbus data tables by the names model files use, and their read function codes.
FUNCTIONS: Final[dict[str, int]] = {"coil": 1, "discrete_input": 2, "holding": 3, "input": 4}
_FUNCTION_NAMES: Final = {v: k for k, v in FUNCTIONS.items()}
_BIT_FUNCTIONS: Final = frozenset({1, 2})
BOOL_TYPE: Final = "bool"  # the type of a point read from a coil or discrete input

# Canonical quantities: name pattern, unit, plausible range. Readings outside the range are kept
# but flagged OUT_OF_RANGE. Ranges are wide on purpose (CT/VT-connected meters report primary
# values); they catch garbage (negative energy, PF 7.3, 0 Hz), not unusual installations.
_QUANTITIES: Final[tuple[tuple[re.Pattern[str], str, tuple[float, float]], ...]] = tuple(
    (re.compile(pattern), unit, bounds)
    for pattern, unit, bounds in (
        (r"energy\.active\.(import|export)\.(total|t[1-9][0-9]?)", "kWh", (0.0, 1e12)),
        (r"energy\.reactive\.(import|export)\.(total|t[1-9][0-9]?)", "kvarh", (0.0, 1e12)),
        (r"voltage\.l[123]", "V", (0.0, 1e6)),
        (r"current\.(l[123]|n)", "A", (0.0, 1e6)),
        (r"power\.active\.(total|l[123])", "kW", (-1e7, 1e7)),
        (r"power\.reactive\.(total|l[123])", "kvar", (-1e7, 1e7)),
        (r"power\.apparent\.(total|l[123])", "kVA", (0.0, 1e7)),
        (r"power_factor\.(total|l[123])", "", (-1.0, 1.0)),
        (r"frequency", "Hz", (40.0, 70.0)),
        (r"relay\.state", "", (0.0, 1.0)),
        # A prepaid meter's own account (DL/T 645-2007 local fee control): an energy-type meter
        # keeps kWh, a money-type one yuan; balances and purchases are never negative (overdraft
        # is its own quantity), and the wire format tops out at 999999.99.
        (r"prepaid\.energy\.(remaining|overdraft)", "kWh", (0.0, 1e6)),
        (r"prepaid\.money\.(remaining|overdraft)", "CNY", (0.0, 1e6)),
        (r"prepaid\.energy\.purchase\.(amount|before|after|total)", "kWh", (0.0, 1e6)),
        (r"prepaid\.money\.purchase\.(amount|before|after|total)", "CNY", (0.0, 1e6)),
        (r"prepaid\.(energy|money)\.purchase\.count", "", (0.0, 9999.0)),
    )
)
# DL/T 645 models may also name these (units come from the DL/T 645 catalogue).
_DLT645_EXTRA: Final = re.compile(
    r"clock\.(date|time)|status\.word[1-7]|meter\.(address|number)|prepaid\.(energy|money)\.purchase\.time"
)


def canonical_info(quantity: str) -> tuple[str, tuple[float, float]] | None:
    """The unit and plausible range of a canonical quantity, None for any other name."""
    for pattern, unit, bounds in _QUANTITIES:
        if pattern.fullmatch(quantity):
            return unit, bounds
    return None


def canonical_unit(quantity: str) -> str:
    """The unit every reading of ``quantity`` carries; KeyError if the name is not canonical."""
    info = canonical_info(quantity)
    if info is None:
        raise KeyError(quantity)
    return info[0]


def plausible_range(quantity: str) -> tuple[float, float]:
    info = canonical_info(quantity)
    if info is None:
        raise KeyError(quantity)
    return info[1]


class ModelError(ConfigurationError):
    """A meter model file is missing, unreadable or invalid; the message names file and key."""


# ---------------------------------------------------------------------------------------------
# Model types


@dataclass(frozen=True, slots=True)
class Source:
    """Where a model's facts come from (vendor manual, standard)."""

    title: str
    version: str = ""
    url: str = ""
    notes: str = ""


@dataclass(frozen=True, slots=True)
class ModbusPoint:
    """One quantity at one place in a meter's Modbus tables."""

    quantity: str
    function: int  # read function code: 1 coil, 2 discrete input, 3 holding, 4 input
    address: int  # 0-based protocol address
    type: str  # a protocols.modbus data type, or "bool" for coils/discrete inputs
    unit: str
    scale: float = 1.0
    byte_order: str = "big"
    word_order: str = "big"
    variant: str = ""  # lets one model carry the same quantity twice (e.g. float and scaled int)
    range: tuple[float, float] = (-math.inf, math.inf)
    source: str = ""
    codec: ValueCodec | None = None  # None for bool points

    @property
    def count(self) -> int:
        """Registers (or bits) the point occupies."""
        return 1 if self.codec is None else self.codec.count

    @property
    def end(self) -> int:
        """One past the last register (or bit)."""
        return self.address + self.count

    @property
    def is_bit(self) -> bool:
        return self.function in _BIT_FUNCTIONS


@dataclass(frozen=True, slots=True)
class RelayAccess:
    """One side of the relay: a coil or register, and the raw values meaning closed and open."""

    function: int
    address: int
    closed: int
    open: int


@dataclass(frozen=True, slots=True)
class RelaySpec:
    write: RelayAccess  # function 1 (coil, written with FC 05) or 3 (holding, written with FC 06)
    read: RelayAccess
    source: str = ""


@dataclass(frozen=True, slots=True)
class ModbusModel:
    name: str
    vendor: str
    description: str
    source: Source
    path: Path
    function: int  # default read function
    byte_order: str
    word_order: str
    max_registers_per_read: int
    max_bits_per_read: int
    max_gap: int  # unused registers a read may span to merge two points into one transaction
    points: tuple[ModbusPoint, ...]
    relay: RelaySpec | None = None
    # every quantity the model can read, in file order, once each (asked for on every read)
    quantities: tuple[str, ...] = field(init=False, repr=False, compare=False)

    protocol: ClassVar[str] = "modbus"

    def __post_init__(self) -> None:
        object.__setattr__(self, "quantities", tuple(dict.fromkeys(p.quantity for p in self.points)))

    @property
    def variants(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p.variant for p in self.points))

    def point(self, quantity: str, variant: str | None = None) -> ModbusPoint:
        """The point to read ``quantity`` from: the ``variant`` one if there is one, else the
        default-variant one, else the first."""
        candidates = [p for p in self.points if p.quantity == quantity]
        if not candidates:
            raise ConfigurationError(
                f"meter model {self.name} has no point for {quantity!r}{suggest(quantity, self.quantities)}"
            )
        for wanted in (variant, ""):
            if wanted is None:
                continue
            for p in candidates:
                if p.variant == wanted:
                    return p
        return candidates[0]

    def points_for(self, quantities: Iterable[str] | None = None, variant: str | None = None) -> list[ModbusPoint]:
        wanted = self.quantities if quantities is None else tuple(dict.fromkeys(quantities))
        return [self.point(q, variant) for q in wanted]

    def with_layout(self, *, word_order: str | None = None, byte_order: str | None = None) -> ModbusModel:
        """A copy with every register point re-laid out (e.g. a meter configured for CDAB).

        Meters such as many Chinese DIN-rail models let the installer pick the word order; the
        same model then serves either, and both the simulator and the driver can apply it.
        """
        points = []
        for p in self.points:
            if p.codec is None:
                points.append(p)
                continue
            wo = word_order or p.word_order
            bo = byte_order or p.byte_order
            try:
                codec = ValueCodec(p.type, byte_order=bo, word_order=wo, scale=p.scale)
            except ModbusValueError as e:
                raise ConfigurationError(f"meter model {self.name}: {e}") from e
            points.append(replace(p, word_order=wo, byte_order=bo, codec=codec))
        return replace(
            self,
            points=tuple(points),
            word_order=word_order or self.word_order,
            byte_order=byte_order or self.byte_order,
        )


@dataclass(frozen=True, slots=True)
class Dlt645Point:
    quantity: str
    di: int
    source: str = ""

    def di_text(self, edition: Edition) -> str:
        return edition.format_di(self.di)


@dataclass(frozen=True, slots=True)
class Dlt645Block:
    """A block-read DI (DI1 or DI0 = FF) and the quantities its answer carries, in order."""

    di: int
    covers: tuple[str, ...]
    source: str = ""


@dataclass(frozen=True, slots=True)
class Dlt645Relay:
    """The relay state is bit ``bit`` of the status word at ``state_di``; ``open_when`` is the bit
    value that means the supply is disconnected."""

    state_di: int
    bit: int
    open_when: int
    source: str = ""


@dataclass(frozen=True, slots=True)
class Dlt645Model:
    name: str
    vendor: str
    description: str
    source: Source
    path: Path
    edition: Edition
    supports_block_reads: bool
    points: tuple[Dlt645Point, ...]
    blocks: tuple[Dlt645Block, ...] = ()
    relay: Dlt645Relay | None = None

    protocol: ClassVar[str] = "dlt645"

    @property
    def quantities(self) -> tuple[str, ...]:
        return tuple(p.quantity for p in self.points)

    def di_for(self, quantity: str) -> int:
        for p in self.points:
            if p.quantity == quantity:
                return p.di
        raise ConfigurationError(
            f"meter model {self.name} has no data identifier for {quantity!r}{suggest(quantity, self.quantities)}"
        )

    def format_di(self, di: int) -> str:
        return self.edition.format_di(di)


# ---------------------------------------------------------------------------------------------
# Loading


def available_models() -> list[str]:
    """Names of the shipped models (``load_model`` accepts these)."""
    return sorted(p.stem for p in MODELS_DIR.glob("*.toml"))


_cache: dict[tuple[str, int, int], ModbusModel | Dlt645Model | Cjt188Model | Dlt698Model] = {}


def load_model(name_or_path: str | Path) -> ModbusModel | Dlt645Model | Cjt188Model | Dlt698Model:
    """Load a shipped model by name (``"sdm630"``) or any model file by path.

    Raises :class:`ModelError` (a ConfigurationError) with the file and key for anything wrong.
    Results are cached per file version, so hundreds of meters of one model share one object.
    """
    path = _resolve(name_or_path)
    try:
        st = path.stat()
    except OSError as e:
        raise ModelError(f"{path}: cannot read meter model: {e.strerror or e}") from e
    key = (str(path), st.st_mtime_ns, st.st_size)
    cached = _cache.get(key)
    if cached is not None:
        return cached
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ModelError(f"{path}: not valid TOML: {e}") from e
    except OSError as e:
        raise ModelError(f"{path}: cannot read meter model: {e.strerror or e}") from e
    model = _build(path, data)
    _cache[key] = model
    return model


def _resolve(name_or_path: str | Path) -> Path:
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or "/" in text or text.endswith(".toml"):
        return Path(text).resolve()
    path = MODELS_DIR / f"{text}.toml"
    if not path.exists():
        raise ModelError(
            f"no meter model named {text!r}{suggest(text, available_models())} "
            f"(available: {', '.join(available_models())})"
        )
    return path


def _build(path: Path, data: dict[str, Any]) -> ModbusModel | Dlt645Model | Cjt188Model | Dlt698Model:
    r = ModelReader(path)
    family = r.get(data, "", "protocol", str)
    info = registry.of_family(family)
    if info is None:
        known = [f"'{f}'" for f in registry.families()]
        raise r.error("protocol", f"must be {', '.join(known[:-1])} or {known[-1]}, got {family!r}")
    model: ModbusModel | Dlt645Model | Cjt188Model | Dlt698Model = info.model_builder()(r, data)
    return model


COMMON_KEYS: Final = ("name", "protocol", "vendor", "description", "source", "sections")
_MODBUS_DEFAULT_KEYS: Final = (
    "function",
    "type",
    "byte_order",
    "word_order",
    "max_registers_per_read",
    "max_bits_per_read",
    "max_gap",
)
_LAYOUT_KEYS: Final = ("function", "type", "byte_order", "word_order", "variant")


def build_modbus(r: ModelReader, data: dict[str, Any]) -> ModbusModel:
    """A ``protocol = "modbus"`` model file (the registry's Modbus ``models`` builder)."""
    r.only(data, "", (*COMMON_KEYS, "defaults", "relay"))
    name, vendor, description, source = r.header(data)
    d = r.get(data, "", "defaults", dict)
    r.only(d, "defaults", _MODBUS_DEFAULT_KEYS)
    defaults: dict[str, Any] = {
        "function": r.choice(d, "defaults", "function", FUNCTIONS),
        "type": r.get(d, "defaults", "type", str, None),
        "byte_order": r.get(d, "defaults", "byte_order", str, "big"),
        "word_order": r.get(d, "defaults", "word_order", str, "big"),
        "variant": "",
    }
    for key in ("byte_order", "word_order"):
        if defaults[key] not in BYTE_ORDERS:
            raise r.error(f"defaults.{key}", f"must be 'big' or 'little', got {defaults[key]!r}")
    max_regs = r.get(d, "defaults", "max_registers_per_read", int)
    if not 1 <= max_regs <= 125:  # Modbus Application Protocol v1.1b3 §6.3/6.4: 1..125 registers
        raise r.error("defaults.max_registers_per_read", f"must be 1..125, got {max_regs}")
    max_bits = r.get(d, "defaults", "max_bits_per_read", int, 2000)
    if not 1 <= max_bits <= 2000:  # §6.1/6.2: 1..2000 coils or inputs
        raise r.error("defaults.max_bits_per_read", f"must be 1..2000, got {max_bits}")
    max_gap = r.get(d, "defaults", "max_gap", int, 0)
    if max_gap < 0:
        raise r.error("defaults.max_gap", f"must be >= 0, got {max_gap}")

    points: list[ModbusPoint] = []
    seen: dict[tuple[str, str], str] = {}
    for si, raw_section in enumerate(r.get(data, "", "sections", list)):
        where = f"sections[{si}]"
        section = r.table(raw_section, where)
        r.only(section, where, ("source", *_LAYOUT_KEYS, "scale", "points"))
        cite = r.get(section, where, "source", str)
        inherited = dict(defaults)
        for key in _LAYOUT_KEYS:
            if key in section:
                inherited[key] = section[key]
        if "function" in section:
            inherited["function"] = r.choice(section, where, "function", FUNCTIONS)
        inherited["scale"] = r.number(section, where, "scale", 1.0)
        for pi, raw in enumerate(r.get(section, where, "points", list)):
            pwhere = f"{where}.points[{pi}]"
            point = _modbus_point(r, r.table(raw, pwhere), pwhere, inherited, cite=cite, max_regs=max_regs)
            dup = (point.quantity, point.variant)
            if dup in seen:
                raise r.error(
                    pwhere, f"duplicate point for {point.quantity!r} (variant {point.variant!r}); first at {seen[dup]}"
                )
            seen[dup] = pwhere
            points.append(point)
    if not points:
        raise r.error("sections", "a model needs at least one point")
    relay = _modbus_relay(r, data["relay"]) if "relay" in data else None
    return ModbusModel(
        name=name,
        vendor=vendor,
        description=description,
        source=source,
        path=r.path,
        function=defaults["function"],
        byte_order=defaults["byte_order"],
        word_order=defaults["word_order"],
        max_registers_per_read=max_regs,
        max_bits_per_read=max_bits,
        max_gap=max_gap,
        points=tuple(points),
        relay=relay,
    )


def _modbus_point(
    r: ModelReader, raw: dict[str, Any], where: str, inherited: Mapping[str, Any], *, cite: str, max_regs: int
) -> ModbusPoint:
    r.only(raw, where, ("quantity", "address", *_LAYOUT_KEYS, "scale", "unit", "range"))
    quantity = r.get(raw, where, "quantity", str)
    info = canonical_info(quantity)
    if info is None:
        raise r.error(
            f"{where}.quantity", f"{quantity!r} is not a canonical quantity name{_suggest_quantity(quantity)}"
        )
    unit, bounds = info
    if "unit" in raw:
        given = r.get(raw, where, "unit", str)
        if given != unit:
            raise r.error(
                f"{where}.unit",
                f"{quantity} is reported in {unit!r}, not {given!r}: give the canonical unit and a scale "
                f"(e.g. W -> kW is scale = 0.001)",
            )
    function = r.choice(raw, where, "function", FUNCTIONS) if "function" in raw else inherited["function"]
    address = r.get(raw, where, "address", int)
    if not 0 <= address <= 0xFFFF:
        raise r.error(f"{where}.address", f"must be 0..65535, got {address}")
    byte_order = raw.get("byte_order", inherited["byte_order"])
    word_order = raw.get("word_order", inherited["word_order"])
    variant = raw.get("variant", inherited["variant"])
    if not isinstance(variant, str):
        raise r.error(f"{where}.variant", f"must be a string, got {variant!r}")
    scale = r.number(raw, where, "scale", inherited["scale"])
    if "range" in raw:
        rng = raw["range"]
        if not (isinstance(rng, list) and len(rng) == 2 and all(_is_number(x) for x in rng) and rng[0] < rng[1]):
            raise r.error(f"{where}.range", f"must be [low, high] numbers, got {rng!r}")
        bounds = (float(rng[0]), float(rng[1]))
    if function in _BIT_FUNCTIONS:
        type_ = raw.get("type", BOOL_TYPE)
        if type_ != BOOL_TYPE:
            raise r.error(f"{where}.type", f"a {_FUNCTION_NAMES[function]} point is type 'bool', got {type_!r}")
        return ModbusPoint(
            quantity, function, address, BOOL_TYPE, unit, 1.0, variant=variant, range=bounds, source=cite
        )
    type_ = raw.get("type", inherited["type"])
    if type_ is None:
        raise r.error(f"{where}.type", f"missing (and no default type); one of {', '.join(DATA_TYPES)}")
    if type_ == BOOL_TYPE:
        raise r.error(f"{where}.type", "'bool' is only for coil and discrete_input points")
    try:
        codec = ValueCodec(str(type_), byte_order=str(byte_order), word_order=str(word_order), scale=scale)
    except ModbusValueError as e:
        raise r.error(where, str(e)) from e
    if address + codec.count > 0x10000:
        raise r.error(f"{where}.address", f"{type_} at {address} runs past register 65535")
    if codec.count > max_regs:
        raise r.error(where, f"{type_} needs {codec.count} registers, more than max_registers_per_read {max_regs}")
    return ModbusPoint(
        quantity,
        function,
        address,
        str(type_),
        unit,
        scale,
        byte_order=str(byte_order),
        word_order=str(word_order),
        variant=variant,
        range=bounds,
        source=cite,
        codec=codec,
    )


def _modbus_relay(r: ModelReader, raw: Any) -> RelaySpec:
    relay = r.table(raw, "relay")
    r.only(relay, "relay", ("source", "write", "read"))
    cite = r.get(relay, "relay", "source", str)
    sides: dict[str, RelayAccess] = {}
    for side in ("write", "read"):
        where = f"relay.{side}"
        t = r.table(r.get(relay, "relay", side, dict), where)
        r.only(t, where, ("function", "address", "closed", "open"))
        function = r.choice(t, where, "function", FUNCTIONS)
        if side == "write" and function not in (1, 3):
            raise r.error(f"{where}.function", "the relay is written as a 'coil' or a 'holding' register")
        address = r.get(t, where, "address", int)
        if not 0 <= address <= 0xFFFF:
            raise r.error(f"{where}.address", f"must be 0..65535, got {address}")
        closed = r.get(t, where, "closed", int)
        opened = r.get(t, where, "open", int)
        limit = 1 if function in _BIT_FUNCTIONS else 0xFFFF
        for key, value in (("closed", closed), ("open", opened)):
            if not 0 <= value <= limit:
                raise r.error(f"{where}.{key}", f"must be 0..{limit} for a {_FUNCTION_NAMES[function]}, got {value}")
        if closed == opened:
            raise r.error(where, "'closed' and 'open' must differ")
        sides[side] = RelayAccess(function, address, closed, opened)
    return RelaySpec(sides["write"], sides["read"], cite)


def build_dlt645(r: ModelReader, data: dict[str, Any]) -> Dlt645Model:
    """A ``protocol = "dlt645"`` model file (the registry's DL/T 645 ``models`` builder)."""
    r.only(data, "", (*COMMON_KEYS, "edition", "supports_block_reads", "blocks", "relay"))
    name, vendor, description, source = r.header(data)
    try:
        edition = Edition.parse(r.get(data, "", "edition", str))
    except ValueError as e:
        raise r.error("edition", str(e)) from e
    supports_blocks = r.get(data, "", "supports_block_reads", bool, False)

    def check(quantity: str, where: str) -> None:
        if canonical_info(quantity) is None and not _DLT645_EXTRA.fullmatch(quantity):
            raise r.error(
                f"{where}.quantity", f"{quantity!r} is not a known quantity name{_suggest_quantity(quantity)}"
            )

    points = [
        Dlt645Point(quantity, _di(r, p, where, "di", edition), cite)
        for where, p, quantity, cite in r.points(data, ("quantity", "di"), check)
    ]
    seen = [p.quantity for p in points]
    blocks: list[Dlt645Block] = []
    for bi, raw in enumerate(r.get(data, "", "blocks", list, [])):
        where = f"blocks[{bi}]"
        b = r.table(raw, where)
        r.only(b, where, ("di", "covers", "source"))
        covers = r.get(b, where, "covers", list)
        for q in covers:
            if q not in seen:
                raise r.error(f"{where}.covers", f"{q!r} is not a point of this model{suggest(str(q), seen)}")
        blocks.append(Dlt645Block(_di(r, b, where, "di", edition), tuple(covers), r.get(b, where, "source", str)))
    if blocks and not supports_blocks:
        raise r.error("blocks", "blocks are listed but supports_block_reads is false")
    relay = None
    if "relay" in data:
        t = r.table(data["relay"], "relay")
        r.only(t, "relay", ("state_di", "bit", "open_when", "source"))
        bit = r.get(t, "relay", "bit", int)
        open_when = r.get(t, "relay", "open_when", int)
        if not 0 <= bit <= 15 or open_when not in (0, 1):
            raise r.error("relay", "bit must be 0..15 and open_when 0 or 1")
        relay = Dlt645Relay(_di(r, t, "relay", "state_di", edition), bit, open_when, r.get(t, "relay", "source", str))
    return Dlt645Model(
        name=name,
        vendor=vendor,
        description=description,
        source=source,
        path=r.path,
        edition=edition,
        supports_block_reads=supports_blocks,
        points=tuple(points),
        blocks=tuple(blocks),
        relay=relay,
    )


def _di(r: ModelReader, table: Mapping[str, Any], where: str, key: str, edition: Edition) -> int:
    text = r.get(table, where, key, str)
    digits = edition.di_length * 2
    if not re.fullmatch(f"[0-9A-Fa-f]{{{digits}}}", text):
        raise r.error(f"{where}.{key}", f"a DL/T 645-{edition.value} DI is {digits} hex digits, got {text!r}")
    return int(text, 16)


class ModelReader:
    """Typed access to parsed TOML with errors that name the file and the key."""

    _MISSING: Final = object()

    def __init__(self, path: Path) -> None:
        self.path = path

    def header(self, data: Mapping[str, Any]) -> tuple[str, str, str, Source]:
        """name, vendor, description and [source]: what every model file starts with."""
        name = self.get(data, "", "name", str)
        if name != self.path.stem:
            raise self.error("name", f"{name!r} must match the file name {self.path.stem!r}")
        vendor = self.get(data, "", "vendor", str)
        description = self.get(data, "", "description", str, "")
        s = self.table(self.get(data, "", "source", dict), "source")
        self.only(s, "source", ("title", "version", "url", "notes"))
        source = Source(
            title=self.get(s, "source", "title", str),
            version=self.get(s, "source", "version", str, ""),
            url=self.get(s, "source", "url", str, ""),
            notes=self.get(s, "source", "notes", str, ""),
        )
        return name, vendor, description, source

    def points(
        self, data: Mapping[str, Any], keys: Sequence[str], check: Callable[[str, str], None]
    ) -> Iterator[tuple[str, dict[str, Any], str, str]]:
        """``(where, table, quantity, cite)`` of every point of the file's ``[[sections]]``, in order.

        Each point may hold only ``keys``; ``check(quantity, where)`` raises for a quantity the
        protocol does not know. A quantity named twice, and a file with no point, are errors here
        so that every protocol with one identifier per quantity words them alike.
        """
        seen: dict[str, str] = {}
        for si, raw_section in enumerate(self.get(data, "", "sections", list)):
            where = f"sections[{si}]"
            section = self.table(raw_section, where)
            self.only(section, where, ("source", "points"))
            cite = self.get(section, where, "source", str)
            for pi, raw in enumerate(self.get(section, where, "points", list)):
                pwhere = f"{where}.points[{pi}]"
                p = self.table(raw, pwhere)
                self.only(p, pwhere, keys)
                quantity = self.get(p, pwhere, "quantity", str)
                check(quantity, pwhere)
                if quantity in seen:
                    raise self.error(pwhere, f"duplicate point for {quantity!r}; first at {seen[quantity]}")
                seen[quantity] = pwhere
                yield pwhere, p, quantity, cite
        if not seen:
            raise self.error("sections", "a model needs at least one point")

    def error(self, key: str, message: str) -> ModelError:
        return ModelError(f"{self.path}: {key}: {message}" if key else f"{self.path}: {message}")

    def only(self, table: Mapping[str, Any], where: str, allowed: Sequence[str]) -> None:
        for key in table:
            if key not in allowed:
                raise self.error(
                    f"{where}.{key}" if where else key,
                    f"unknown key{suggest(key, allowed)} (allowed: {', '.join(allowed)})",
                )

    def table(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(where, f"must be a table, got {type(value).__name__}")
        return value

    def get(self, table: Mapping[str, Any], where: str, key: str, kind: type, default: Any = _MISSING) -> Any:
        full = f"{where}.{key}" if where else key
        if key not in table:
            if default is self._MISSING:
                raise self.error(full, "missing")
            return default
        value = table[key]
        # bool is an int subclass: `true` is not a register address
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.error(full, f"must be {_KIND_NAMES.get(kind, kind.__name__)}, got {value!r}")
        return value

    def number(self, table: Mapping[str, Any], where: str, key: str, default: float) -> float:
        if key not in table:
            return default
        value = table[key]
        if not _is_number(value) or not math.isfinite(value) or value == 0:
            raise self.error(f"{where}.{key}", f"must be a finite non-zero number, got {value!r}")
        return float(value)

    def choice(self, table: Mapping[str, Any], where: str, key: str, choices: Mapping[str, int]) -> int:
        value = self.get(table, where, key, str)
        if value not in choices:
            raise self.error(
                f"{where}.{key}" if where else key,
                f"{value!r} is not one of {', '.join(choices)}{suggest(value, choices)}",
            )
        return choices[value]


_KIND_NAMES: Final = {str: "a string", int: "an integer", bool: "true or false", dict: "a table", list: "a list"}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def suggest(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


_EXAMPLE_QUANTITIES: Final = (
    "energy.active.import.total",
    "energy.active.export.total",
    "energy.reactive.import.total",
    "energy.reactive.export.total",
    "energy.active.import.t1",
    *(f"voltage.l{k}" for k in (1, 2, 3)),
    *(f"current.l{k}" for k in (1, 2, 3)),
    "current.n",
    *(f"power.{kind}.{p}" for kind in ("active", "reactive", "apparent") for p in ("total", "l1", "l2", "l3")),
    *(f"power_factor.{p}" for p in ("total", "l1", "l2", "l3")),
    "frequency",
    "relay.state",
)


def _suggest_quantity(quantity: str) -> str:
    return suggest(quantity, _EXAMPLE_QUANTITIES)

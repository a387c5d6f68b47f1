"""DL/T 698.45 meter models: which OAD answers each quantity, and how the meter wants to be read.

A model file (``protocol = "dlt698"`` in ``drivers/models/``) says:

* ``[[sections]]`` of ``points``: quantity -> OAD (8 hex digits, printed OI, attribute, index as
  in the standard's tables: ``00100201`` = forward active energy, total). What the value's type,
  scaler and unit are is the codec catalogue's business (``protocols/dlt698/data/oads.toml``);
  the model only says which objects this kind of meter answers;
* ``oads_per_request``: how many OADs go in one GET-Request NormalList (DL/T 698.45-2017 clause
  6.3.7). Meters differ in how long a response they can build; elements of one array attribute
  that are wanted together are asked as the whole attribute (index 0) and count as one;
* ``security``: ``plain``, or ``rn`` for meters whose security-mode table (F101) makes reads go in
  SECURITY-Request plaintext + RN (clause 6.3.13);
* ``association``: ``auto`` (learn from the first exchange), ``connect`` (CONNECT first) or
  ``none``: the default of the meters' ``dlt698.association`` setting;
* ``[freeze]``: the quantities the meter keeps in its daily freeze (5004), its monthly (5006) and
  minute (5002) freezes, each the columns of a GET-Record;
* ``[relay]``: which OAD and bit report the relay (Appendix F.3, status word 3 bit 4), the relay
  output unit the control methods name (F2050201), and whether the close method may arm the relay
  for the customer's button.

Loading is strict, as for the other protocols: unknown keys, OADs the catalogue cannot decode, a
quantity that is not canonical, or whose unit differs from the catalogue's, are
:class:`~drivers.meter_models.ModelError` lines naming the file and key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Final, Literal

from meter_gateway.drivers.errors import ConfigurationError
from meter_gateway.protocols.dlt698.axdr import OAD
from meter_gateway.protocols.dlt698.catalogue import Catalogue, default_catalogue

if TYPE_CHECKING:
    from meter_gateway.drivers.meter_models import ModelReader, Source

__all__ = [
    "ASSOCIATIONS",
    "SECURITY_MODES",
    "Dlt698Freeze",
    "Dlt698Model",
    "Dlt698Point",
    "Dlt698Relay",
    "build_dlt698",
]

SECURITY_MODES: Final = ("plain", "rn")
ASSOCIATIONS: Final = ("auto", "connect", "none")
MAX_OADS_PER_REQUEST: Final = 64
# 698 extras a model may name besides the canonical quantities (the catalogue gives their units)
_EXTRA: Final = re.compile(r"clock\.datetime|status\.word[1-7]|meter\.(address|number)")
_CANONICAL_POWER: Final = {"W": "kW", "var": "kvar", "VA": "kVA"}
_FREEZES: Final = {"daily": OAD(0x5004, 2, 0), "monthly": OAD(0x5006, 2, 0), "minute": OAD(0x5002, 2, 0)}


@dataclass(frozen=True, slots=True)
class Dlt698Point:
    quantity: str
    oad: OAD
    source: str = ""


@dataclass(frozen=True, slots=True)
class Dlt698Freeze:
    """The quantities a freeze object (5004 daily, 5006 monthly, 5002 minute) keeps as columns."""

    object: OAD
    quantities: tuple[str, ...]
    source: str = ""


@dataclass(frozen=True, slots=True)
class Dlt698Relay:
    """Status word ``state_oad`` bit ``bit`` reports the relay (``open_when`` = open); the
    control methods name ``output`` (the relay output unit); ``close_permit``: method 130 with
    enum 0 arms the relay for the customer's button instead of closing it."""

    state_oad: OAD
    bit: int
    open_when: int
    output: OAD
    close_permit: bool
    command_bit: int | None = None  # relay command state (F.3 bit 6)
    keep_power_bit: int | None = None  # keep-power (F.3 bit 12)
    source: str = ""


@dataclass(frozen=True, slots=True)
class Dlt698Model:
    name: str
    vendor: str
    description: str
    source: Source
    path: Path
    points: tuple[Dlt698Point, ...]
    oads_per_request: int
    security: Literal["plain", "rn"]
    association: Literal["auto", "connect", "none"]
    freezes: Mapping[str, Dlt698Freeze]  # "daily", "monthly", "minute"
    relay: Dlt698Relay | None = None

    protocol: ClassVar[str] = "dlt698"

    @property
    def quantities(self) -> tuple[str, ...]:
        return tuple(p.quantity for p in self.points)

    def oad_for(self, quantity: str) -> OAD:
        for p in self.points:
            if p.quantity == quantity:
                return p.oad
        from meter_gateway.drivers.meter_models import suggest

        raise ConfigurationError(
            f"meter model {self.name} has no OAD for {quantity!r}{suggest(quantity, self.quantities)}"
        )

    @property
    def daily_quantities(self) -> tuple[str, ...]:
        daily = self.freezes.get("daily")
        return daily.quantities if daily is not None else ()

    def __hash__(self) -> int:  # freezes is a dict: hash what identifies the file
        return hash((self.name, self.path))


def _unit_of(catalogue: Catalogue, oad: OAD) -> str | None:
    item = catalogue.get(oad)
    if item is None:
        return None
    _, _, _, unit = item.element(oad.index)
    return _CANONICAL_POWER.get(unit, unit)


def build_dlt698(r: ModelReader, data: dict[str, Any], catalogue: Catalogue | None = None) -> Dlt698Model:
    """The model of a parsed ``protocol = "dlt698"`` file (``r`` names the file in errors)."""
    from meter_gateway.drivers.meter_models import COMMON_KEYS, suggest

    cat = catalogue or default_catalogue()
    r.only(data, "", (*COMMON_KEYS, "oads_per_request", "security", "association", "freeze", "relay"))
    name, vendor, description, source = r.header(data)
    per_request = r.get(data, "", "oads_per_request", int)
    if not 1 <= per_request <= MAX_OADS_PER_REQUEST:
        raise r.error("oads_per_request", f"must be 1..{MAX_OADS_PER_REQUEST}, got {per_request}")
    security = r.get(data, "", "security", str, "plain")
    if security not in SECURITY_MODES:
        raise r.error(
            "security", f"{security!r} is not one of {', '.join(SECURITY_MODES)}{suggest(security, SECURITY_MODES)}"
        )
    association = r.get(data, "", "association", str, "auto")
    if association not in ASSOCIATIONS:
        raise r.error(
            "association",
            f"{association!r} is not one of {', '.join(ASSOCIATIONS)}{suggest(association, ASSOCIATIONS)}",
        )
    points = _points(r, data, cat)
    freezes = _freezes(r, data["freeze"], [p.quantity for p in points]) if "freeze" in data else {}
    relay = _relay(r, data["relay"], cat) if "relay" in data else None
    return Dlt698Model(
        name=name,
        vendor=vendor,
        description=description,
        source=source,
        path=r.path,
        points=points,
        oads_per_request=per_request,
        security=security,
        association=association,
        freezes=freezes,
        relay=relay,
    )


def _points(r: ModelReader, data: dict[str, Any], cat: Catalogue) -> tuple[Dlt698Point, ...]:
    """The [[point]] tables: each OAD in the catalogue, in the unit its quantity is read in."""
    from meter_gateway.drivers.meter_models import canonical_info

    def check(quantity: str, where: str) -> None:
        if canonical_info(quantity) is None and not _EXTRA.fullmatch(quantity):
            raise r.error(f"{where}.quantity", f"{quantity!r} is not a known quantity name")

    points: list[Dlt698Point] = []
    for pwhere, p, quantity, cite in r.points(data, ("quantity", "oad"), check):
        oad = _oad(r, p, pwhere, "oad")
        unit = _unit_of(cat, oad)
        if unit is None:
            raise r.error(
                f"{pwhere}.oad", f"{oad} is not in the DL/T 698.45 catalogue (protocols/dlt698/data/oads.toml)"
            )
        info = canonical_info(quantity)
        if info is not None and unit != info[0]:
            raise r.error(f"{pwhere}.oad", f"{oad} is in {unit or 'no unit'}, {quantity} is in {info[0] or 'no unit'}")
        points.append(Dlt698Point(quantity, oad, cite))
    return tuple(points)


def _freezes(r: ModelReader, raw: Any, seen: list[str]) -> dict[str, Dlt698Freeze]:
    """The [freeze] table: which of the model's points each freeze kind keeps."""
    from meter_gateway.drivers.meter_models import suggest

    f = r.table(raw, "freeze")
    r.only(f, "freeze", ("source", *_FREEZES))
    cite = r.get(f, "freeze", "source", str)
    freezes: dict[str, Dlt698Freeze] = {}
    for kind, obj in _FREEZES.items():
        wanted = r.get(f, "freeze", kind, list, [])
        for q in wanted:
            if q not in seen:
                raise r.error(f"freeze.{kind}", f"{q!r} is not a point of this model{suggest(str(q), seen)}")
        if wanted:
            freezes[kind] = Dlt698Freeze(obj, tuple(wanted), cite)
    return freezes


def _relay(r: ModelReader, raw: Any, cat: Catalogue) -> Dlt698Relay:
    """The [relay] table: where the relay state is read and how it is switched."""
    t = r.table(raw, "relay")
    r.only(
        t,
        "relay",
        ("state_oad", "bit", "open_when", "command_bit", "keep_power_bit", "output", "close_permit", "source"),
    )
    bits = {k: r.get(t, "relay", k, int, None) for k in ("bit", "command_bit", "keep_power_bit")}
    if bits["bit"] is None:
        raise r.error("relay.bit", "missing")
    for key, bit in bits.items():
        if bit is not None and not 0 <= bit <= 15:
            raise r.error(f"relay.{key}", f"a status word bit is 0..15, got {bit}")
    open_when = r.get(t, "relay", "open_when", int)
    if open_when not in (0, 1):
        raise r.error("relay.open_when", f"must be 0 or 1, got {open_when}")
    state = _oad(r, t, "relay", "state_oad")
    if cat.get(state) is None:
        raise r.error("relay.state_oad", f"{state} is not in the DL/T 698.45 catalogue")
    return Dlt698Relay(
        state,
        bits["bit"],
        open_when,
        _oad(r, t, "relay", "output"),
        r.get(t, "relay", "close_permit", bool, True),
        bits["command_bit"],
        bits["keep_power_bit"],
        r.get(t, "relay", "source", str),
    )


def _oad(r: ModelReader, table: Mapping[str, Any], where: str, key: str) -> OAD:
    text = r.get(table, where, key, str)
    if not re.fullmatch(r"[0-9A-Fa-f]{8}", text):
        raise r.error(f"{where}.{key}", f"an OAD is 8 hex digits (OI, attribute, index), got {text!r}")
    return OAD.parse(text)

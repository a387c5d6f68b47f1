"""CJ/T 188 meter models (``protocol = "cjt188"`` in a ``drivers/models/*.toml`` file).

A CJ/T 188 model says what kind of meter it is and how it must be spoken to; what its data
fields mean is the codec's catalogue (``protocols/cjt188/data/cjt188.toml``):

``meter_type``
    the type byte T (CJ/T 188-2004 clause 6.2.2, Table 3: 10H cold water, 20H heat, 30H gas ...);
    it also picks the 901F layout (water/gas 19 bytes, heat 43 bytes).
``di_order``
    ``"standard"`` (``90 1F``) or ``"swapped"`` (``1F 90``); see :mod:`protocols.cjt188.identifiers`.
    A meter can override it (``meters[].cjt188.di_order``).
``preamble``
    FE wake-up bytes sent before every request (clause 6.3: 2 to 4). Battery meters that sleep
    between reads listen only after a run of FE; a meter can override it.
``turnaround``
    seconds the meter may take before it starts to answer. The driver waits at least that plus the
    longest reply's time on the wire, even when the bus's ``reply_timeout`` is shorter.
``valve``, ``battery``
    whether the meter has a motorised valve (A017 works, ST D0-D1 means something) and a battery
    (ST D2 means something).
``[[sections]]``
    ``points``: quantity and the DI whose reply carries it, each section citing its source.

Quantities are the catalogue's names; units are canonical (:data:`QUANTITIES`): m3, m3/h, kWh,
kW, degC, h. A heat meter that counts in J-family units is reported in GJ (the catalogue keeps
the two energy families apart rather than convert a billed register inexactly).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Final

from meter_gateway.drivers.errors import ConfigurationError
from meter_gateway.protocols.cjt188.catalogue import default_catalogue
from meter_gateway.protocols.cjt188.identifiers import DI_ORDERS, DiOrder, check_order

if TYPE_CHECKING:
    from meter_gateway.drivers.meter_models import ModelReader, Source

__all__ = ["QUANTITIES", "Cjt188Model", "Cjt188Point", "build_cjt188", "quantity_info"]

# Canonical CJ/T 188 quantities: unit(s) and the plausible range. The 6+2-digit BCD registers
# top out below 1,000,000; temperatures are XXXX.XX degC but a meter in service reads -40..200.
QUANTITIES: Final[dict[str, tuple[tuple[str, ...], tuple[float, float]]]] = {
    "volume.total": (("m3",), (0.0, 1e6)),
    "volume.settlement": (("m3",), (0.0, 1e6)),
    "heat.total": (("kWh", "GJ"), (0.0, 1e8)),
    "heat.settlement": (("kWh", "GJ"), (0.0, 1e8)),
    "cooling.total": (("kWh", "GJ"), (0.0, 1e8)),
    "cooling.settlement": (("kWh", "GJ"), (0.0, 1e8)),
    "power.heat": (("kW",), (0.0, 1e5)),
    "flow.rate": (("m3/h",), (0.0, 1e4)),
    "temperature.supply": (("degC",), (-40.0, 200.0)),
    "temperature.return": (("degC",), (-40.0, 200.0)),
    "time.working_hours": (("h",), (0.0, 999999.0)),
    "valve.state": (("",), (0.0, 0.0)),  # "open" | "closed" | "abnormal": a string reading
    "battery.low": (("",), (0.0, 1.0)),
    "status.word": (("",), (0.0, 65535.0)),  # the raw ST word, vendor bits included
}
_VALVE_QUANTITIES: Final = frozenset({"valve.state"})
_BATTERY_QUANTITIES: Final = frozenset({"battery.low"})
# the catalogue's name for the ST field, exported under the quantity name above
_STATUS_FIELD: Final = "status"


def quantity_info(quantity: str) -> tuple[tuple[str, ...], tuple[float, float]]:
    """The canonical units and plausible range of a CJ/T 188 quantity (KeyError if unknown)."""
    return QUANTITIES[quantity]


@dataclass(frozen=True, slots=True)
class Cjt188Point:
    quantity: str
    di: int
    source: str = ""

    @property
    def field(self) -> str:
        """The catalogue field that carries the quantity (``status`` for ``status.word``)."""
        return _STATUS_FIELD if self.quantity == "status.word" else self.quantity


@dataclass(frozen=True, slots=True)
class Cjt188Model:
    name: str
    vendor: str
    description: str
    source: Source
    path: Path
    meter_type: int
    di_order: DiOrder
    preamble: int
    turnaround: float
    valve: bool
    battery: bool
    points: tuple[Cjt188Point, ...]

    protocol: ClassVar[str] = "cjt188"

    @property
    def quantities(self) -> tuple[str, ...]:
        return tuple(p.quantity for p in self.points)

    @property
    def meter_class(self) -> str:
        return default_catalogue().meter_class(self.meter_type)

    def point(self, quantity: str) -> Cjt188Point:
        for p in self.points:
            if p.quantity == quantity:
                return p
        raise ConfigurationError(
            f"meter model {self.name} has no data identifier for {quantity!r} (it reads {', '.join(self.quantities)})"
        )


_KEYS: Final = (
    "name",
    "protocol",
    "vendor",
    "description",
    "source",
    "sections",
    "meter_type",
    "di_order",
    "preamble",
    "turnaround",
    "valve",
    "battery",
)


def build_cjt188(r: ModelReader, data: dict[str, Any]) -> Cjt188Model:
    """A :class:`Cjt188Model` from a parsed model file; errors name the file and the key."""
    r.only(data, "", _KEYS)
    name, vendor, description, source = r.header(data)
    catalogue = default_catalogue()
    type_text = r.get(data, "", "meter_type", str)
    if not re.fullmatch(r"[0-9A-Fa-f]{2}", type_text):
        raise r.error("meter_type", f'the meter type T is 2 hex digits (Table 3, e.g. "10"), got {type_text!r}')
    meter_type = int(type_text, 16)
    meter_class = catalogue.meter_class(meter_type)
    if meter_class == "unknown":
        raise r.error("meter_type", f"{type_text} is no water, heat, gas or other meter type (Table 3: 10-49)")
    order = r.get(data, "", "di_order", str, "standard")
    if order not in DI_ORDERS:
        raise r.error("di_order", f"must be one of {', '.join(DI_ORDERS)}, got {order!r}")
    preamble = r.get(data, "", "preamble", int, 2)
    if not 0 <= preamble <= 16:
        raise r.error("preamble", f"FE wake-up bytes must be 0..16 (the standard sends 2-4), got {preamble}")
    turnaround = data.get("turnaround", 0.0)
    if isinstance(turnaround, bool) or not isinstance(turnaround, int | float) or not 0 <= turnaround <= 30:
        raise r.error("turnaround", f"must be 0..30 seconds, got {turnaround!r}")
    valve = r.get(data, "", "valve", bool, False)
    battery = r.get(data, "", "battery", bool, False)
    points: list[Cjt188Point] = []

    def check(quantity: str, where: str) -> None:
        if quantity not in QUANTITIES:
            raise r.error(f"{where}.quantity", f"{quantity!r} is not a CJ/T 188 quantity ({', '.join(QUANTITIES)})")
        if quantity in _VALVE_QUANTITIES and not valve:
            raise r.error(f"{where}.quantity", f"{quantity} needs valve = true")
        if quantity in _BATTERY_QUANTITIES and not battery:
            raise r.error(f"{where}.quantity", f"{quantity} needs battery = true")

    for pwhere, p, quantity, cite in r.points(data, ("quantity", "di"), check):
        di_text = r.get(p, pwhere, "di", str)
        if not re.fullmatch(r"[0-9A-Fa-f]{4}", di_text):
            raise r.error(f"{pwhere}.di", f'a CJ/T 188 DI is 4 hex digits (e.g. "901F"), got {di_text!r}')
        point = Cjt188Point(quantity, int(di_text, 16), cite)
        item = catalogue.get(point.di)
        carried = set() if item is None else {spec.name for spec in item.reply_layout(meter_class)}
        if _STATUS_FIELD in carried:
            carried |= {bit.quantity for bit in catalogue.status_bits}
        if point.field not in carried:
            raise r.error(
                f"{pwhere}.di",
                f"DI {di_text.upper()} of a {meter_class} meter does not carry {quantity}"
                + (f" (it carries {', '.join(sorted(carried))})" if carried else " (not in the catalogue)"),
            )
        points.append(point)
    return Cjt188Model(
        name=name,
        vendor=vendor,
        description=description,
        source=source,
        path=r.path,
        meter_type=meter_type,
        di_order=check_order(order),
        preamble=preamble,
        turnaround=float(turnaround),
        valve=valve,
        battery=battery,
        points=tuple(points),
    )

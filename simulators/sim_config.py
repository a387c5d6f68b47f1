"""The ``meter-gateway simulate`` configuration: a TOML file, or the same built from quick flags.

File layout (see config/simulator.toml for a commented example)::

    [simulator]              # all optional
    seed = 0                 # load models and fault RNGs derive from it
    speed = 1.0              # simulated seconds per real second
    start = "2026-03-14T10:00:00"   # simulated start (naive local time); default: now
    control_port = 7700      # TCP text control (press ADDR, status ADDR, fault BUS KNOB VALUE)
    timezone = "Asia/Shanghai"   # the zone the meters keep time in; default: the host's

    [[bus]]
    protocol = "dlt645-2007" # dlt645-2007 | dlt645-1997 | modbus-tcp | modbus-rtu-over-tcp
    kind = "tcp"             # tcp | pty (DL/T 645 only)
    host = "127.0.0.1"
    port = 6001
    baud = 2400              # wire-time emulation; omit for none
    bits_per_char = 11       # 8E1
    meters = ["000000000001", "000000000002"]   # or: first_address = 1, count = 10
    turnaround = 0.02        # seconds a meter thinks before answering
    preamble = 4             # FE bytes before each reply (0..4)
    drift_ppm = 0.0
    tariffs = 4
    [bus.faults]             # see simulators/faults.py
    drop_reply = 0.01
    [bus.faults.per_meter."000000000002"]
    stuck_relay = true

Modbus buses use ``units = [1, 2]`` (or first_address/count as unit ids) and ``model``.

``protocol = "dlt698"`` (DL/T 698.45; 12-digit addresses) adds the keys ``requires_connect``,
``requires_security``, ``accept_plaintext_control``, ``report``, ``login`` (the meter opens with a
LINK login when a master connects, as a terminal does), ``heartbeat`` (seconds between LINK
heartbeats; 0 for none), ``security_key`` (hex, the key of
the simulator's TEST-ONLY security scheme, see simulators/dlt698_test_security.py), ``purse``
(CNY; omit for a meter without a purse), ``price`` (CNY/kWh) and ``trip_at_zero_credit``;
``dlt645-2007`` buses take the same three for money-type prepaid meters (simulators/prepaid.py).
``protocol = "cjt188"`` (CJ/T 188; 14-digit addresses) adds ``meter_type`` (water | gas | heat),
``di_order`` (standard | swapped), ``wake_preamble`` (FE bytes a frame needs to be heard),
``valve_time`` (seconds), ``battery_low`` and ``battery_days``. A key of another protocol is an
error, as is any unknown key.

One bus can host meters of several byte protocols (not Modbus): the bus table describes the
link and its first group of meters, and each ``[[bus.group]]`` table adds a group of another
(or the same) protocol with its own meter keys::

    [[bus]]
    protocol = "dlt645-2007"
    meters = ["000000000001"]
    [[bus.group]]
    protocol = "cjt188"
    meter_type = "water"
    meters = ["00000000000001"]

Errors are :class:`SimConfigError` (a ValueError) naming the offending key.
"""

from __future__ import annotations

import datetime
import tomllib
import zoneinfo
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

from meter_gateway.drivers import registry
from meter_gateway.simulators.faults import Faults

# A Modbus bus is simulated whole (one server holds every unit), framed as named here (the value
# is modbus_meter.serve_modbus's transport); the byte protocols are the registry's meter protocols
# with a simulator for a group of meters (``MeterProtocol.sim_group``), many sharing one link.
MODBUS_FRAMINGS: Final = {"modbus-tcp": "tcp", "modbus-rtu-over-tcp": "rtu-over-tcp"}
BYTE_PROTOCOLS: Final = tuple(p.name for p in registry.PROTOCOLS.values() if p.sim_group)
PROTOCOLS: Final = (*BYTE_PROTOCOLS, *MODBUS_FRAMINGS)
METER_TYPES: Final = ("water", "gas", "heat")
_LINK_KEYS: Final = frozenset({"name", "kind", "host", "port", "baud", "bits_per_char", "faults", "group"})
_GROUP_KEYS: Final = frozenset({"protocol", "meters", "first_address", "count", "turnaround", "preamble", "drift_ppm"})
_PROTOCOL_KEYS: Final[dict[str, frozenset[str]]] = {
    "dlt645": frozenset({"tariffs", "purse", "price", "trip_at_zero_credit"}),
    "dlt698": frozenset(
        {
            "tariffs",
            "requires_connect",
            "requires_security",
            "accept_plaintext_control",
            "report",
            "login",
            "heartbeat",
            "security_key",
            "purse",
            "price",
            "trip_at_zero_credit",
        }
    ),
    "cjt188": frozenset({"meter_type", "di_order", "wake_preamble", "valve_time", "battery_low", "battery_days"}),
    "modbus": frozenset({"units", "model"}),
}
_ALL_PROTOCOL_KEYS: Final = frozenset().union(*_PROTOCOL_KEYS.values())
_BUS_KEYS: Final = _LINK_KEYS | _GROUP_KEYS | _ALL_PROTOCOL_KEYS
_ADDRESS_DIGITS: Final = {"dlt645": 12, "dlt698": 12, "cjt188": 14}
# per family: the tariffs its simulated meters can keep, where narrower than any
_TARIFFS: Final = {"dlt698": (1, 12)}


def family(protocol: str) -> str:
    """The protocol family of a bus or group ``protocol`` (the keys of the tables above)."""
    return "modbus" if protocol in MODBUS_FRAMINGS else registry.get(protocol).family


_SIM_KEYS: Final = frozenset({"seed", "speed", "start", "control_port", "timezone"})


class SimConfigError(ValueError):
    """A bad simulator config: the message names the key and what is wrong."""


@dataclass
class BusConfig:
    name: str
    protocol: str = "dlt645-2007"
    kind: str = "tcp"
    host: str = "127.0.0.1"
    port: int = 0
    baud: int | None = None
    bits_per_char: int = 11
    meters: list[str] = field(default_factory=list)  # meter addresses, or Modbus unit ids as text
    model: str = "sim-3ph"
    turnaround: float = 0.0
    preamble: int | None = None  # FE bytes before replies; None: the protocol's usual (645/698 4, 188 2)
    drift_ppm: float = 0.0
    tariffs: int = 4
    faults: Faults = field(default_factory=Faults)
    # DL/T 698.45
    requires_connect: bool = False
    requires_security: bool = False
    accept_plaintext_control: bool = True
    report: bool = False
    login: bool = False
    heartbeat: int = 0  # seconds between LINK heartbeats (long-unsigned in LINK-Request); 0: none
    security_key: bytes | None = None
    purse: float | None = None
    price: float = 0.5
    trip_at_zero_credit: bool = False
    # CJ/T 188
    meter_type: str = "water"
    di_order: str = "standard"
    wake_preamble: int = 0
    valve_time: float = 0.0
    battery_low: bool = False
    battery_days: float | None = None
    # further groups of meters on the same link (their link fields are unused)
    groups: list[BusConfig] = field(default_factory=list)

    @property
    def is_modbus(self) -> bool:
        return self.protocol in MODBUS_FRAMINGS

    @property
    def all_groups(self) -> list[BusConfig]:
        """This bus's own meter group, then the ``[[bus.group]]`` ones."""
        return [self, *self.groups]

    @property
    def all_meters(self) -> list[str]:
        return [address for group in self.all_groups for address in group.meters]


@dataclass
class SimConfig:
    buses: list[BusConfig]
    seed: int = 0
    speed: float = 1.0
    start: datetime.datetime | None = None
    control_port: int | None = None
    # IANA zone the meters keep their clocks in (a utility's meters keep local time, whatever the
    # host's zone); None: the host's zone
    timezone: str | None = None

    def zone(self) -> datetime.tzinfo | None:
        return None if self.timezone is None else zone_of(self.timezone)


def _int(where: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SimConfigError(f"{where} must be an integer, got {value!r}")
    return value


def _num(where: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SimConfigError(f"{where} must be a number, got {value!r}")
    return float(value)


def _str(where: str, value: object) -> str:
    if not isinstance(value, str):
        raise SimConfigError(f"{where} must be text, got {value!r}")
    return value


def _addresses(where: str, raw: Mapping[str, Any], protocol: str) -> list[str]:
    modbus = protocol in MODBUS_FRAMINGS
    digits = _ADDRESS_DIGITS.get(family(protocol), 12)
    listed = raw.get("units" if modbus else "meters")
    if listed is not None:
        if not isinstance(listed, list) or not listed:
            raise SimConfigError(f"{where}.{'units' if modbus else 'meters'} must be a non-empty list")
        return [str(_int(where, u)) if modbus else _address(where, u, protocol, digits) for u in listed]
    first = _int(f"{where}.first_address", raw.get("first_address", 1))
    count = _int(f"{where}.count", raw.get("count", 1))
    if count < 1:
        raise SimConfigError(f"{where}.count must be >= 1")
    if modbus:
        if not 1 <= first <= first + count - 1 <= 247:
            raise SimConfigError(f"{where}: Modbus unit ids are 1..247")
        return [str(u) for u in range(first, first + count)]
    if not 0 <= first <= first + count - 1 < 10**digits:
        raise SimConfigError(f"{where}: addresses must fit {digits} digits")
    return [f"{a:0{digits}d}" for a in range(first, first + count)]


def _address(where: str, value: object, protocol: str, digits: int) -> str:
    text = _str(f"{where}.meters", value)
    if len(text) != digits or not text.isdigit():
        raise SimConfigError(f"{where}.meters: {text!r} is not a {digits}-digit {protocol} address")
    return text


def _bool(where: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise SimConfigError(f"{where} must be true or false, got {value!r}")
    return value


def _check_keys(where: str, raw: Mapping[str, Any], protocol: str, allowed_extra: frozenset[str]) -> None:
    unknown = set(raw) - _BUS_KEYS
    if unknown:
        raise SimConfigError(f"{where}: unknown key(s) {sorted(unknown)} (known: {sorted(_BUS_KEYS)})")
    mine = _PROTOCOL_KEYS[family(protocol)] | allowed_extra | _GROUP_KEYS
    if protocol in MODBUS_FRAMINGS:
        mine -= {"turnaround", "preamble", "drift_ppm"}
    foreign = set(raw) - mine
    if foreign:
        owners = {
            key: sorted(name for name, keys in _PROTOCOL_KEYS.items() if key in keys) or ["bus (link)"]
            for key in sorted(foreign)
        }
        detail = "; ".join(f"{key!r} is for {', '.join(who)}" for key, who in owners.items())
        raise SimConfigError(f"{where}: key(s) not for protocol {protocol!r}: {detail}")


_Parse = Callable[[str, object], object]


def _ranged(lo: int, hi: int) -> _Parse:
    def parse(where: str, value: object) -> int:
        number = _int(where, value)
        if not lo <= number <= hi:
            raise SimConfigError(f"{where} must be {lo}..{hi}")
        return number

    return parse


def _non_negative(where: str, value: object) -> float:
    number = _num(where, value)
    if number < 0:
        raise SimConfigError(f"{where} must be >= 0")
    return number


def _choice(choices: tuple[str, ...], wording: str) -> _Parse:
    def parse(where: str, value: object) -> str:
        text = _str(where, value)
        if text not in choices:
            raise SimConfigError(f"{where} must be {wording}")
        return text

    return parse


def _hex_key(where: str, value: object) -> bytes:
    text = _str(where, value)
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise SimConfigError(f"{where} must be hex digits, got {text!r}") from None
    if not key:
        raise SimConfigError(f"{where} must not be empty")
    return key


# The meter keys a bus or group table may set, each with the parser that checks its value; checked
# in this order, so the first bad key of a table is the one reported.
_GROUP_FIELDS: Final[tuple[tuple[str, _Parse], ...]] = (
    ("model", _str),
    ("turnaround", _num),
    ("preamble", _ranged(0, 4)),
    ("drift_ppm", _num),
    ("tariffs", _int),
    ("requires_connect", _bool),
    ("requires_security", _bool),
    ("accept_plaintext_control", _bool),
    ("report", _bool),
    ("login", _bool),
    ("heartbeat", _ranged(0, 0xFFFF)),
    ("trip_at_zero_credit", _bool),
    ("battery_low", _bool),
    ("security_key", _hex_key),
    ("purse", _non_negative),
    ("price", _non_negative),
    ("valve_time", _non_negative),
    ("battery_days", _non_negative),
    ("meter_type", _choice(METER_TYPES, f"one of {', '.join(METER_TYPES)}")),
    ("di_order", _choice(("standard", "swapped"), "'standard' or 'swapped'")),
    ("wake_preamble", _ranged(0, 16)),
)


def _group(where: str, raw: Mapping[str, Any], protocol: str, base: BusConfig) -> BusConfig:
    """``base`` with the meter keys of ``raw`` (a bus table or a [[bus.group]] table) applied."""
    config = replace(base, protocol=protocol, meters=_addresses(where, raw, protocol), groups=[])
    for key, parse in _GROUP_FIELDS:
        if key in raw:
            setattr(config, key, parse(f"{where}.{key}", raw[key]))
    tariffs = _TARIFFS.get(family(protocol))
    if tariffs is not None and not tariffs[0] <= config.tariffs <= tariffs[1]:
        raise SimConfigError(f"{where}.tariffs must be {tariffs[0]}..{tariffs[1]} for {family(protocol)}")
    return config


def bus_from_mapping(raw: Mapping[str, Any], index: int, *, seed: int = 0) -> BusConfig:
    where = f"bus[{index}]"
    protocol = _str(f"{where}.protocol", raw.get("protocol", "dlt645-2007"))
    if protocol not in PROTOCOLS:
        raise SimConfigError(f"{where}.protocol {protocol!r} is not one of {', '.join(PROTOCOLS)}")
    _check_keys(where, raw, protocol, _LINK_KEYS)
    kind = _str(f"{where}.kind", raw.get("kind", "tcp"))
    if kind not in ("tcp", "pty"):
        raise SimConfigError(f"{where}.kind must be 'tcp' or 'pty', got {kind!r}")
    modbus = protocol in MODBUS_FRAMINGS
    if modbus and kind == "pty":
        raise SimConfigError(f"{where}: Modbus simulators here listen on TCP only")
    baud = raw.get("baud")
    faults_raw = raw.get("faults", {})
    if not isinstance(faults_raw, Mapping):
        raise SimConfigError(f"{where}.faults must be a table")
    link = BusConfig(
        name=_str(f"{where}.name", raw.get("name", f"bus{index + 1}")),
        protocol=protocol,
        kind=kind,
        host=_str(f"{where}.host", raw.get("host", "127.0.0.1")),
        port=_int(f"{where}.port", raw.get("port", 0)),
        baud=None if baud is None else _int(f"{where}.baud", baud),
        bits_per_char=_int(f"{where}.bits_per_char", raw.get("bits_per_char", 11)),
        faults=Faults.from_mapping(faults_raw, seed=seed + index, where=f"{where}.faults"),
    )
    if not 0 <= link.port <= 65535:
        raise SimConfigError(f"{where}.port must be 0..65535")
    config = _group(where, raw, protocol, link)
    groups_raw = raw.get("group", [])
    if not isinstance(groups_raw, list) or not all(isinstance(g, Mapping) for g in groups_raw):
        raise SimConfigError(f"{where}.group must be an array of tables ([[bus.group]])")
    if groups_raw and modbus:
        raise SimConfigError(f"{where}: a Modbus bus cannot host other meter groups")
    for n, group_raw in enumerate(groups_raw):
        gwhere = f"{where}.group[{n}]"
        gprotocol = _str(f"{gwhere}.protocol", group_raw.get("protocol", ""))
        if gprotocol not in BYTE_PROTOCOLS:
            raise SimConfigError(f"{gwhere}.protocol must be one of {', '.join(BYTE_PROTOCOLS)}, got {gprotocol!r}")
        _check_keys(gwhere, group_raw, gprotocol, frozenset())
        config.groups.append(_group(gwhere, group_raw, gprotocol, replace(link, groups=[])))
    return config


def config_from_mapping(raw: Mapping[str, Any]) -> SimConfig:
    unknown = set(raw) - {"simulator", "bus"}
    if unknown:
        raise SimConfigError(f"unknown top-level key(s) {sorted(unknown)} (expected [simulator] and [[bus]])")
    sim = raw.get("simulator", {})
    if not isinstance(sim, Mapping):
        raise SimConfigError("[simulator] must be a table")
    bad = set(sim) - _SIM_KEYS
    if bad:
        raise SimConfigError(f"simulator: unknown key(s) {sorted(bad)} (known: {sorted(_SIM_KEYS)})")
    seed = _int("simulator.seed", sim.get("seed", 0))
    speed = _num("simulator.speed", sim.get("speed", 1.0))
    if speed < 0:
        raise SimConfigError("simulator.speed must be >= 0")
    start_raw = sim.get("start")
    start: datetime.datetime | None = None
    if isinstance(start_raw, datetime.datetime):
        start = start_raw.replace(tzinfo=None)
    elif start_raw is not None:
        try:
            start = datetime.datetime.fromisoformat(_str("simulator.start", start_raw)).replace(tzinfo=None)
        except ValueError:
            raise SimConfigError(f"simulator.start {start_raw!r} is not an ISO 8601 date-time") from None
    control = sim.get("control_port")
    timezone = sim.get("timezone")
    if timezone is not None:
        zone_of(_str("simulator.timezone", timezone), "simulator.timezone")
    buses_raw = raw.get("bus", [])
    if not isinstance(buses_raw, list) or not buses_raw:
        raise SimConfigError("the config needs at least one [[bus]]")
    buses = [bus_from_mapping(b, i, seed=seed) for i, b in enumerate(buses_raw)]
    return SimConfig(
        buses,
        seed,
        speed,
        start,
        None if control is None else _int("simulator.control_port", control),
        timezone,
    )


def zone_of(name: str, where: str = "--timezone") -> datetime.tzinfo:
    """The IANA zone ``name``, or SimConfigError naming ``where``."""
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise SimConfigError(f"{where}: unknown time zone {name!r} (an IANA name, e.g. Asia/Shanghai)") from None


def load_config(path: str | Path) -> SimConfig:
    try:
        text = Path(path).read_text("utf-8")
    except OSError as exc:
        raise SimConfigError(f"cannot read {path}: {exc.strerror}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SimConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        return config_from_mapping(raw)
    except ValueError as exc:
        raise SimConfigError(f"{path}: {exc}") from None


def quick_config(
    *,
    meters: int,
    buses: int,
    port: int,
    protocol: str,
    pty: bool = False,
    host: str = "127.0.0.1",
    speed: float = 1.0,
    seed: int = 0,
    baud: int | None = None,
    meter_type: str = "water",
) -> SimConfig:
    """``--meters N --buses M --port P``: meters spread evenly, bus i on port P + i."""
    if meters < 1 or buses < 1 or buses > meters:
        raise SimConfigError("need --meters >= --buses >= 1")
    per_bus, extra = divmod(meters, buses)
    out: list[BusConfig] = []
    first = 1
    for i in range(buses):
        count = per_bus + (1 if i < extra else 0)
        raw: dict[str, Any] = {
            "protocol": protocol,
            "kind": "pty" if pty else "tcp",
            "host": host,
            "port": 0 if pty or port == 0 else port + i,
            "first_address": 1 if protocol in MODBUS_FRAMINGS else first,
            "count": count,
        }
        if baud is not None:
            raw["baud"] = baud
        if protocol in PROTOCOLS and "meter_type" in _PROTOCOL_KEYS[family(protocol)]:
            raw["meter_type"] = meter_type
        out.append(bus_from_mapping(raw, i, seed=seed))
        first += count
    return SimConfig(out, seed, speed)

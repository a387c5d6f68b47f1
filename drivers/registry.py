"""The protocol registry: the one place that says which meter protocols exist and what each can do.

Adding a protocol means: a ``protocols/<family>/`` package (sans-I/O), a driver module in
``drivers/``, a command actuator in ``gateway/commands/``, a simulated meter in ``simulators/``,
model files in ``drivers/models/``, and one :class:`MeterProtocol` entry in :data:`PROTOCOLS` below
naming them (docs/architecture.md lists it all). Config validation, the fleet builder, the
frozen-read and time-sync jobs, the command service, the model loader, the meter-events publisher,
the field tools and the simulator ask this table (``capable``, ``carried_by``, ``check_address``,
an entry's hooks) instead of testing protocol names themselves; tests/test_registry.py fails when
code outside ``protocols/<family>/`` and this module compares a protocol name.

This module is data and imports no driver (its few adapters import theirs when called): the config
checker (which runs in a child process at every start and reload) reads it without paying for
pymodbus or the codecs. A driver is found by its dotted path and imported only when a meter of its
protocol is configured.
"""

from __future__ import annotations

import enum
import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "BUS_PROTOCOLS",
    "BYTE_BUSES",
    "PROTOCOLS",
    "Can",
    "Discovered",
    "MeterProtocol",
    "Rule",
    "capable",
    "carried_by",
    "check_address",
    "families",
    "get",
    "meter_protocols",
    "of_driver",
    "of_family",
]


class Can(enum.Flag):
    """What a protocol's driver can do for the daemon (each flag names the job that asks)."""

    READ = enum.auto()  # poll quantities (the poller)
    FROZEN = enum.auto()  # read the meter's frozen records (daily_frozen job, backfill): daily unless SETTLEMENT
    TIME_SYNC = enum.auto()  # read and set the meter's clock (time_sync job)
    RELAY = enum.auto()  # remote disconnect / reconnect of the supply (commands)
    CLOSE_PERMIT = enum.auto()  # reconnect by arming the relay for the customer's button
    KEEP_POWER = enum.auto()  # a keep-power (guarantee) state that blocks a remote trip
    VALVE = enum.auto()  # valve close / open (water and gas meters; commands)
    DISCOVER = enum.auto()  # find the meters on a line (meter-gateway discover)
    # with FROZEN: the records are monthly, taken at 00:00 of the meter's settlement day (the
    # frozen job reads them on that calendar, 12 months back) instead of every midnight
    SETTLEMENT = enum.auto()


@dataclass(frozen=True, slots=True)
class Rule:
    """How a configured value (a meter's ``address``, its password) is written for a protocol."""

    kind: type  # str or int in the TOML file
    pattern: str = ""  # str addresses: the whole address must match
    low: int = 0  # int addresses: inclusive range
    high: int = 0
    forbidden: frozenset[str] = frozenset()  # e.g. the broadcast address
    hint: str = ""  # the error line's explanation

    def problem(self, address: object) -> str | None:
        """Why ``address`` is not a valid address of this kind, or None."""
        if self.kind is int:
            if isinstance(address, bool) or not isinstance(address, int) or not self.low <= address <= self.high:
                return f"{self.hint}, got {address!r}"
            return None
        if not isinstance(address, str) or not re.fullmatch(self.pattern, address):
            return f"{self.hint}, got {address!r}"
        if address.upper() in self.forbidden:
            return f"{address} is a broadcast address, not a meter"
        return None


@dataclass(frozen=True, slots=True)
class MeterProtocol:
    """One meter protocol as configured in ``meters[].protocol``."""

    name: str  # the config value, e.g. "dlt645-2007"
    family: str  # protocols/<family>/, the model files' ``protocol`` and the driver family
    title: str  # for people: "DL/T 645-2007"
    buses: frozenset[str]  # the buses[].protocol values whose line can carry it
    can: Can
    address: Rule
    driver: str  # "module:function" that builds the driver (see gateway/daemon/meters.py)
    password: Rule | None = None  # control frames carry a meter password (meters[].credentials)
    # TIME_SYNC protocols with a broadcast clock set: "module:function", an async function
    # (bus, when, tz) that sets every meter of this protocol on the bus at once; "" means
    # meters of this protocol are set one by one (the driver's sync_time)
    broadcast_time: str = ""
    # seconds either side of the meter's midnight (when it freezes) that its clock must not be set
    midnight_guard: float = 300.0
    # "module:function" making a simulated meter for a configured one (simulators/for_config.py);
    # "" for protocols simulated per bus instead (Modbus: one server holds every unit)
    simulator: str = ""
    # "module:function" (group, address, clock, seed) making a simulated meter for one address of a
    # [[bus]] group of the simulator's own config (meter-gateway simulate); "" as for ``simulator``
    sim_group: str = ""
    # "module:Class" of the command actuator, built from a meter's driver (gateway/commands/)
    actuator: str = ""
    # "module:function" (ModelReader, data) building a model file whose ``protocol`` is ``family``
    # (drivers/meter_models.py); protocols of one family share it
    models: str = ""
    # the ``edition`` a model file of this family must name for a meter of this protocol ("" any)
    edition: str = ""
    # the wildcard request that finds the one meter on a line (meter-gateway discover): a
    # "module:function" or a callable, async (bus, protocol, *, preamble, meter_type) -> Discovered;
    # "" none (Modbus is scanned by unit id, a Modbus bus's own way)
    discover: str | Callable[..., Any] = ""
    # the meter reports its type on discovery and model files carry it (``meter_type``): discovery
    # picks the model by it, and an address range is probed with the type of the --model given
    typed_meters: bool = False
    # remote control frames carry the meter password: control needs meters[].credentials.password
    control_password: bool = False
    # the bus's FE wake-up bytes (buses[].preamble) are the meter's ``preamble`` option unless set
    bus_preamble: bool = False
    # "module:function" describing an APDU the meter sent unasked as plain data for the events
    # topic (gateway/uplink/meter_events.py); "" sends the raw APDU only
    describe_event: str = ""

    @property
    def standard(self) -> str:
        """The title without its year, for people: "CJ/T 188", "DL/T 645"."""
        return self.title.partition("-")[0]

    def build_driver(self) -> Callable[..., Any]:
        """The driver builder, imported now (only protocols in use are ever imported)."""
        return _load(self.driver)

    def simulated_meter(self) -> Callable[..., Any] | None:
        """The simulated-meter builder, imported now, or None (see ``simulator``)."""
        return _load(self.simulator) if self.simulator else None

    def simulated_group_meter(self) -> Callable[..., Any] | None:
        """The simulator-config meter builder, imported now, or None (see ``sim_group``)."""
        return _load(self.sim_group) if self.sim_group else None

    def broadcaster(self) -> Callable[..., Any] | None:
        """The broadcast time-set function, imported now, or None when the protocol has none."""
        return _load(self.broadcast_time) if self.broadcast_time else None

    def build_actuator(self) -> Callable[..., Any]:
        """The command actuator class, imported now."""
        return _load(self.actuator)

    def model_builder(self) -> Callable[..., Any]:
        """The model-file builder of this protocol's family, imported now."""
        return _load(self.models)

    def discoverer(self) -> Callable[..., Any] | None:
        """The wildcard discovery function, imported now, or None (see ``discover``)."""
        return _load(self.discover) if self.discover else None

    def event_describer(self) -> Callable[..., Any] | None:
        """The unsolicited-APDU describer, imported now, or None (see ``describe_event``)."""
        return _load(self.describe_event) if self.describe_event else None


@dataclass(frozen=True, slots=True)
class Discovered:
    """What a wildcard discovery found: the meter's address, its type if the protocol reports
    one (``typed_meters``), and a line for people about what else it said."""

    address: str
    meter_type: int | None = None
    note: str = ""


def _load(path: str | Callable[..., Any]) -> Callable[..., Any]:
    if callable(path):
        return path
    module, _, function = path.partition(":")
    loaded: Callable[..., Any] = getattr(importlib.import_module(module), function)
    return loaded


# Every bus runs on the gateway's own transport and Bus (turn lock, transaction engine, health).
# On these byte-stream buses frames of any of these protocols share a line, so one RS-485 line
# (or serial server) can hold DL/T 645 and DL/T 698.45 electricity meters beside CJ/T 188 water
# meters; each driver recognises its own replies. A Modbus bus carries Modbus only, framed as the
# bus says (modbus-tcp: MBAP, modbus-rtu: RTU): drivers/modbus.py builds the requests and cuts the
# frames with pymodbus' framers; protocols/modbus/exchange.py, sans-I/O like every protocol's
# exchange, recognises each request's reply (transaction id, or unit and function; late replies;
# exception codes) and protocols/modbus/values.py decodes its registers.
BYTE_BUSES: Final = frozenset({"dlt645", "dlt698", "cjt188"})
MODBUS_BUSES: Final = frozenset({"modbus-rtu", "modbus-tcp"})
BUS_PROTOCOLS: Final = BYTE_BUSES | MODBUS_BUSES

_DLT645_ADDRESS: Final = Rule(
    str,
    pattern=r"[0-9]{12}",
    forbidden=frozenset({"999999999999"}),
    hint='a DL/T 645 address is exactly 12 decimal digits in quotes (e.g. "000000001234")',
)
# CJ/T 188-2004 clause 6.2.3: A0..A6, 14 BCD digits printed most significant first; AA bytes
# are wildcards, so an all-A address is no one meter.
_CJT188_ADDRESS: Final = Rule(
    str,
    pattern=r"[0-9]{14}",
    hint='a CJ/T 188 address is exactly 14 decimal digits in quotes, most significant first (e.g. "00000000000001")',
)
# DL/T 698.45-2017 clause 5: the server address SA is 1..16 bytes of BCD, printed most significant
# digit first; A nibbles (wildcard) and the broadcast AA address no one meter.
_DLT698_ADDRESS: Final = Rule(
    str,
    pattern=r"(?:[0-9]{2}){1,16}",
    hint='a DL/T 698.45 server address is an even number (2..32) of decimal digits in quotes (e.g. "000000000001")',
)
# CONNECT-Request PasswordSecurity (clause 6.2, ConnectMechanismInfo): a visible-string password.
_DLT698_PASSWORD: Final = Rule(
    str, pattern=r"[ -~]{1,32}", hint="a DL/T 698.45 connect password is 1..32 printable ASCII characters"
)
_MODBUS_UNIT: Final = Rule(int, low=1, high=247, hint="a Modbus unit id is an integer 1..247")

# DL/T 645-2007 clause 6.13 / -1997 clause 9.5: a password is the level byte then 3 bytes, here
# written as the 6 hex digits after the level (meters[].credentials.password_level holds that).
_DLT645_PASSWORD: Final = Rule(str, pattern=r"[0-9A-Fa-f]{6}", hint="the DL/T 645 password must be 6 hex digits")
_DLT645_CAN: Final = Can.READ | Can.RELAY | Can.CLOSE_PERMIT | Can.KEEP_POWER | Can.DISCOVER


# Wildcard discovery in the ``discover`` hook's shape, over each driver's own function (each
# imports its driver only when called).
async def _discover_dlt645(bus: Any, protocol: str, *, preamble: int, meter_type: int | None) -> Discovered:
    from meter_gateway.drivers.dlt645_driver import discover_address
    from meter_gateway.protocols.dlt645.edition import Edition

    return Discovered(await discover_address(bus, Edition.parse(protocol), preamble=preamble))


async def _discover_dlt698(bus: Any, protocol: str, *, preamble: int, meter_type: int | None) -> Discovered:
    from meter_gateway.drivers.dlt698_driver import discover_address

    return Discovered(await discover_address(bus))


async def _discover_cjt188(bus: Any, protocol: str, *, preamble: int, meter_type: int | None) -> Discovered:
    from meter_gateway.drivers.cjt188_driver import discover
    from meter_gateway.protocols.cjt188.frame import WILDCARD_TYPE

    meter = await discover(bus, meter_type=WILDCARD_TYPE if meter_type is None else meter_type)
    note = f"{meter.meter_class} meter, type {meter.meter_type:02X}H"
    return Discovered(meter.address, meter.meter_type, note)


PROTOCOLS: Final[dict[str, MeterProtocol]] = {
    # DL/T 645-2007: daily freezes (05 06 xx xx, clause A.7) and broadcast/unicast time (08, 04 00 01 01/02).
    "dlt645-2007": MeterProtocol(
        "dlt645-2007",
        "dlt645",
        "DL/T 645-2007",
        BYTE_BUSES,
        _DLT645_CAN | Can.FROZEN | Can.TIME_SYNC,
        _DLT645_ADDRESS,
        "meter_gateway.drivers.dlt645_driver:from_config",
        _DLT645_PASSWORD,
        broadcast_time="meter_gateway.drivers.dlt645_driver:broadcast_time_2007",
        edition="2007",
        simulator="meter_gateway.simulators.for_config:dlt645",
        sim_group="meter_gateway.simulators.cli:dlt645_meter",
        actuator="meter_gateway.gateway.commands.actuators:Dlt645Actuator",
        models="meter_gateway.drivers.meter_models:build_dlt645",
        discover=_discover_dlt645,
        control_password=True,
        bus_preamble=True,
    ),
    # DL/T 645-1997 keeps no daily frozen data; broadcast time (08) is its only clock write we use.
    "dlt645-1997": MeterProtocol(
        "dlt645-1997",
        "dlt645",
        "DL/T 645-1997",
        BYTE_BUSES,
        _DLT645_CAN | Can.TIME_SYNC,
        _DLT645_ADDRESS,
        "meter_gateway.drivers.dlt645_driver:from_config",
        _DLT645_PASSWORD,
        broadcast_time="meter_gateway.drivers.dlt645_driver:broadcast_time_1997",
        edition="1997",
        midnight_guard=3600.0,  # 1997 clause 5.5 notes: not in the meter's hours 23 and 0
        simulator="meter_gateway.simulators.for_config:dlt645",
        sim_group="meter_gateway.simulators.cli:dlt645_meter",
        actuator="meter_gateway.gateway.commands.actuators:Dlt645Actuator",
        models="meter_gateway.drivers.meter_models:build_dlt645",
        discover=_discover_dlt645,
        control_password=True,
        bus_preamble=True,
    ),
    # DL/T 698.45-2017: GET-NormalList reads, GET-Record freezes (5004/5006/5002 on 2021), broadcast
    # ACTION 4000-127 and SET 40000200 time, 8000-129/130 relay (130 enum 0 arms it: close permit),
    # 8001 keep-power, wildcard GET 40010200 discovery. Passwords are CONNECT PasswordSecurity.
    "dlt698": MeterProtocol(
        "dlt698",
        "dlt698",
        "DL/T 698.45-2017",
        BYTE_BUSES,
        Can.READ | Can.FROZEN | Can.TIME_SYNC | Can.RELAY | Can.CLOSE_PERMIT | Can.KEEP_POWER | Can.DISCOVER,
        _DLT698_ADDRESS,
        "meter_gateway.drivers.dlt698_driver:from_config",
        _DLT698_PASSWORD,
        broadcast_time="meter_gateway.drivers.dlt698_driver:broadcast_time",
        simulator="meter_gateway.simulators.for_config:dlt698",
        sim_group="meter_gateway.simulators.cli:dlt698_meter",
        actuator="meter_gateway.gateway.commands.dlt698_actuator:Dlt698Actuator",
        models="meter_gateway.drivers.dlt698_model:build_dlt698",
        discover=_discover_dlt698,
        describe_event="meter_gateway.protocols.dlt698.describe:describe_apdu",
    ),
    # CJ/T 188-2004 water, gas and heat meters: 901F reads, A015 time (acknowledged), A017 valve,
    # 810A discovery; frozen records are the monthly settlement-day history (8103, D120-D12B).
    "cjt188": MeterProtocol(
        "cjt188",
        "cjt188",
        "CJ/T 188-2004",
        BYTE_BUSES,
        Can.READ | Can.FROZEN | Can.SETTLEMENT | Can.VALVE | Can.TIME_SYNC | Can.DISCOVER,
        _CJT188_ADDRESS,
        "meter_gateway.drivers.cjt188_driver:from_config",
        simulator="meter_gateway.simulators.for_config:cjt188",
        sim_group="meter_gateway.simulators.cli:cjt188_meter",
        actuator="meter_gateway.gateway.commands.cjt188_actuator:Cjt188Actuator",
        models="meter_gateway.drivers.cjt188_model:build_cjt188",
        discover=_discover_cjt188,
        typed_meters=True,
    ),
    # Modbus: registers only; no clock, freezes or relay function is defined by the protocol.
    "modbus": MeterProtocol(
        "modbus",
        "modbus",
        "Modbus",
        MODBUS_BUSES,
        Can.READ | Can.DISCOVER,
        _MODBUS_UNIT,
        "meter_gateway.drivers.modbus:from_config",
        actuator="meter_gateway.gateway.commands.actuators:ModbusActuator",
        models="meter_gateway.drivers.meter_models:build_modbus",
    ),
}


def get(name: str) -> MeterProtocol:
    """The protocol named ``name`` (KeyError names the known ones)."""
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise KeyError(f"unknown meter protocol {name!r} (known: {', '.join(PROTOCOLS)})") from None


def capable(name: str, can: Can) -> bool:
    """Whether meters of protocol ``name`` can do ``can`` (unknown protocols can do nothing)."""
    info = PROTOCOLS.get(name)
    return info is not None and can in info.can


def carried_by(bus_protocol: str) -> list[str]:
    """The meter protocols a bus of ``bus_protocol`` can carry, in registry order."""
    return [p.name for p in PROTOCOLS.values() if bus_protocol in p.buses]


def check_address(name: str, address: object) -> str | None:
    """Why ``address`` is not a valid address for a meter of protocol ``name``, or None."""
    return get(name).address.problem(address)


def of_family(family: str) -> MeterProtocol | None:
    """The first protocol of ``family`` (a model file's ``protocol``), or None."""
    return next((p for p in PROTOCOLS.values() if p.family == family), None)


def of_driver(driver: object) -> MeterProtocol:
    """The (first) protocol whose driver module built ``driver`` (KeyError when none did)."""
    module = type(driver).__module__
    for info in PROTOCOLS.values():
        if info.driver.partition(":")[0] == module:
            return info
    raise KeyError(f"{type(driver).__name__} is no registered protocol's driver")


def families() -> list[str]:
    """The protocol families, in registry order (for messages)."""
    return list(dict.fromkeys(p.family for p in PROTOCOLS.values()))


def meter_protocols(can: Can) -> list[str]:
    """The protocols whose meters can do ``can``, in registry order (for messages)."""
    return [p.name for p in PROTOCOLS.values() if can in p.can]

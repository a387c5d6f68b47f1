"""The protocol registry: the one place that says which meter protocols exist and what each can do.

Adding a protocol means: a ``protocols/<family>/`` package (sans-I/O), a driver module in
``drivers/``, a simulated meter in ``simulators/``, model files in ``drivers/models/``, and one
:class:`MeterProtocol` entry in :data:`PROTOCOLS` below. Config validation, the fleet builder, the
frozen-read and time-sync jobs and the command actuators ask this table (``capable``,
``carried_by``, ``check_address``...) instead of testing protocol names themselves.

This module is plain data and imports no driver: the config checker (which runs in a child process
at every start and reload) reads it without paying for pymodbus or the codecs. A driver is found by
its dotted path and imported only when a meter of its protocol is configured.
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
    "MeterProtocol",
    "Rule",
    "capable",
    "carried_by",
    "check_address",
    "get",
    "meter_protocols",
]


class Can(enum.Flag):
    """What a protocol's driver can do for the daemon (each flag names the job that asks)."""

    READ = enum.auto()  # poll quantities (the poller)
    FROZEN = enum.auto()  # read the meter's daily frozen records (daily_frozen job, backfill)
    TIME_SYNC = enum.auto()  # read and set the meter's clock (time_sync job)
    RELAY = enum.auto()  # remote disconnect / reconnect of the supply (commands)
    CLOSE_PERMIT = enum.auto()  # reconnect by arming the relay for the customer's button
    KEEP_POWER = enum.auto()  # a keep-power (guarantee) state that blocks a remote trip
    VALVE = enum.auto()  # valve close / open (water and gas meters; commands)
    DISCOVER = enum.auto()  # find the meters on a line (meter-gateway discover)


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

    def build_driver(self) -> Callable[..., Any]:
        """The driver builder, imported now (only protocols in use are ever imported)."""
        return _load(self.driver)

    def simulated_meter(self) -> Callable[..., Any] | None:
        """The simulated-meter builder, imported now, or None (see ``simulator``)."""
        return _load(self.simulator) if self.simulator else None

    def broadcaster(self) -> Callable[..., Any] | None:
        """The broadcast time-set function, imported now, or None when the protocol has none."""
        return _load(self.broadcast_time) if self.broadcast_time else None


def _load(path: str) -> Callable[..., Any]:
    module, _, function = path.partition(":")
    loaded: Callable[..., Any] = getattr(importlib.import_module(module), function)
    return loaded


# Byte-stream buses: our own transport carries frames of any of these protocols, so one RS-485
# line (or serial server) can hold DL/T 645 and DL/T 698.45 electricity meters beside CJ/T 188
# water meters; each driver recognises its own replies. Modbus buses hand the line to pymodbus.
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
        simulator="meter_gateway.simulators.for_config:dlt645",
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
        midnight_guard=3600.0,  # 1997 clause 5.5 notes: not in the meter's hours 23 and 0
        simulator="meter_gateway.simulators.for_config:dlt645",
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
    ),
    # CJ/T 188-2004 water, gas and heat meters: 901F reads, A015 time (acknowledged), A017 valve,
    # 810A discovery. Its settlement-day history is monthly, not the daily freezes FROZEN reads.
    "cjt188": MeterProtocol(
        "cjt188",
        "cjt188",
        "CJ/T 188-2004",
        BYTE_BUSES,
        Can.READ | Can.VALVE | Can.TIME_SYNC | Can.DISCOVER,
        _CJT188_ADDRESS,
        "meter_gateway.drivers.cjt188_driver:from_config",
        simulator="meter_gateway.simulators.for_config:cjt188",
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


def meter_protocols(can: Can) -> list[str]:
    """The protocols whose meters can do ``can``, in registry order (for messages)."""
    return [p.name for p in PROTOCOLS.values() if can in p.can]

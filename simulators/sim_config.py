"""The ``meter-gateway simulate`` configuration: a TOML file, or the same built from quick flags.

File layout (see config/simulator.toml for a commented example)::

    [simulator]              # all optional
    seed = 0                 # load models and fault RNGs derive from it
    speed = 1.0              # simulated seconds per real second
    start = "2026-03-14T10:00:00"   # simulated start (naive local time); default: now
    control_port = 7700      # TCP text control (press ADDR, status ADDR, fault BUS KNOB VALUE)

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
Errors are :class:`SimConfigError` (a ValueError) naming the offending key.
"""

from __future__ import annotations

import datetime
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from meter_gateway.simulators.faults import Faults

PROTOCOLS: Final = ("dlt645-2007", "dlt645-1997", "modbus-tcp", "modbus-rtu-over-tcp")
_BUS_KEYS: Final = frozenset(
    {
        "name",
        "protocol",
        "kind",
        "host",
        "port",
        "baud",
        "bits_per_char",
        "meters",
        "first_address",
        "count",
        "units",
        "model",
        "turnaround",
        "preamble",
        "drift_ppm",
        "tariffs",
        "faults",
    }
)
_SIM_KEYS: Final = frozenset({"seed", "speed", "start", "control_port"})


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
    meters: list[str] = field(default_factory=list)  # DL/T 645 addresses, or Modbus unit ids as text
    model: str = "sim-3ph"
    turnaround: float = 0.0
    preamble: int = 4
    drift_ppm: float = 0.0
    tariffs: int = 4
    faults: Faults = field(default_factory=Faults)

    @property
    def is_modbus(self) -> bool:
        return self.protocol.startswith("modbus")


@dataclass
class SimConfig:
    buses: list[BusConfig]
    seed: int = 0
    speed: float = 1.0
    start: datetime.datetime | None = None
    control_port: int | None = None


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


def _addresses(where: str, raw: Mapping[str, Any], modbus: bool) -> list[str]:
    listed = raw.get("units" if modbus else "meters")
    if listed is not None:
        if not isinstance(listed, list) or not listed:
            raise SimConfigError(f"{where}.{'units' if modbus else 'meters'} must be a non-empty list")
        return [str(_int(where, u)) if modbus else _address(where, u) for u in listed]
    first = _int(f"{where}.first_address", raw.get("first_address", 1))
    count = _int(f"{where}.count", raw.get("count", 1))
    if count < 1:
        raise SimConfigError(f"{where}.count must be >= 1")
    if modbus:
        if not 1 <= first <= first + count - 1 <= 247:
            raise SimConfigError(f"{where}: Modbus unit ids are 1..247")
        return [str(u) for u in range(first, first + count)]
    if not 0 <= first <= first + count - 1 < 10**12:
        raise SimConfigError(f"{where}: addresses must fit 12 digits")
    return [f"{a:012d}" for a in range(first, first + count)]


def _address(where: str, value: object) -> str:
    text = _str(f"{where}.meters", value)
    if len(text) != 12 or not text.isdigit():
        raise SimConfigError(f"{where}.meters: {text!r} is not a 12-digit DL/T 645 address")
    return text


def bus_from_mapping(raw: Mapping[str, Any], index: int, *, seed: int = 0) -> BusConfig:
    where = f"bus[{index}]"
    unknown = set(raw) - _BUS_KEYS
    if unknown:
        raise SimConfigError(f"{where}: unknown key(s) {sorted(unknown)} (known: {sorted(_BUS_KEYS)})")
    protocol = _str(f"{where}.protocol", raw.get("protocol", "dlt645-2007"))
    if protocol not in PROTOCOLS:
        raise SimConfigError(f"{where}.protocol {protocol!r} is not one of {', '.join(PROTOCOLS)}")
    kind = _str(f"{where}.kind", raw.get("kind", "tcp"))
    if kind not in ("tcp", "pty"):
        raise SimConfigError(f"{where}.kind must be 'tcp' or 'pty', got {kind!r}")
    modbus = protocol.startswith("modbus")
    if modbus and kind == "pty":
        raise SimConfigError(f"{where}: Modbus simulators here listen on TCP only")
    baud = raw.get("baud")
    faults_raw = raw.get("faults", {})
    if not isinstance(faults_raw, Mapping):
        raise SimConfigError(f"{where}.faults must be a table")
    config = BusConfig(
        name=_str(f"{where}.name", raw.get("name", f"bus{index + 1}")),
        protocol=protocol,
        kind=kind,
        host=_str(f"{where}.host", raw.get("host", "127.0.0.1")),
        port=_int(f"{where}.port", raw.get("port", 0)),
        baud=None if baud is None else _int(f"{where}.baud", baud),
        bits_per_char=_int(f"{where}.bits_per_char", raw.get("bits_per_char", 11)),
        meters=_addresses(where, raw, modbus),
        model=_str(f"{where}.model", raw.get("model", "sim-3ph")),
        turnaround=_num(f"{where}.turnaround", raw.get("turnaround", 0.0)),
        preamble=_int(f"{where}.preamble", raw.get("preamble", 4)),
        drift_ppm=_num(f"{where}.drift_ppm", raw.get("drift_ppm", 0.0)),
        tariffs=_int(f"{where}.tariffs", raw.get("tariffs", 4)),
        faults=Faults.from_mapping(faults_raw, seed=seed + index, where=f"{where}.faults"),
    )
    if not 0 <= config.port <= 65535:
        raise SimConfigError(f"{where}.port must be 0..65535")
    if not 0 <= config.preamble <= 4:
        raise SimConfigError(f"{where}.preamble must be 0..4")
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
    buses_raw = raw.get("bus", [])
    if not isinstance(buses_raw, list) or not buses_raw:
        raise SimConfigError("the config needs at least one [[bus]]")
    buses = [bus_from_mapping(b, i, seed=seed) for i, b in enumerate(buses_raw)]
    return SimConfig(buses, seed, speed, start, None if control is None else _int("simulator.control_port", control))


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
            "first_address": 1 if protocol.startswith("modbus") else first,
            "count": count,
        }
        if baud is not None:
            raw["baud"] = baud
        out.append(bus_from_mapping(raw, i, seed=seed))
        first += count
    return SimConfig(out, seed, speed)

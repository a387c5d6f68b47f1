"""The bus and meter a field tool (``meter-gateway read``, ``meter-gateway discover``) works on.

A field tool reaches meters exactly as the daemon does: a :class:`~gateway.config.BusConfig`
(taken from the gateway's config with ``-c FILE --bus NAME``, or built from ``--tcp`` /
``--serial`` options with the config's defaults), a Bus from :func:`gateway.meters.build_bus`, and
drivers from the protocol registry. So a line that reads with ``read`` reads the same way in the
daemon: same frame gap, reply timeout, attempts, serial framing and RS-485 mode.

No secrets are read: the config is loaded without them (the tools need neither the broker nor
the command keys, and an operator's shell rarely holds the service's secrets).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import logging
import re
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Final, TypeVar

import msgspec

from meter_gateway.drivers import registry
from meter_gateway.drivers.bus import Bus
from meter_gateway.drivers.errors import ConfigurationError
from meter_gateway.drivers.health import HealthBook
from meter_gateway.drivers.meter_models import available_models, load_model
from meter_gateway.drivers.transport import TcpSettings
from meter_gateway.gateway.cli.config_cmd import EX_CONFIG
from meter_gateway.gateway.config import (
    BAUD_RATES,
    BusConfig,
    Config,
    ConfigError,
    Duration,
    GatewaySection,
    Meter,
    TcpBus,
    UplinkSection,
    load_config,
)
from meter_gateway.gateway.daemon.meters import build_bus, link_settings

__all__ = [
    "EX_CONFIG",
    "EX_USAGE",
    "FieldError",
    "Target",
    "add_bus_arguments",
    "default_model",
    "describe_link",
    "make_meter",
    "open_bus",
    "resolve_target",
    "run_tool",
    "shipped_models",
    "tool_config",
    "tool_logging",
]

EX_USAGE: Final = 2
DEFAULT_BUS_NAME: Final = "field"
T = TypeVar("T")
_NAME: Final = r"[A-Za-z0-9][A-Za-z0-9_.:-]*"  # gateway.config's names (bus and meter ids)
# What an unconfigured line usually runs at (DL/T 645-2007 clause 4.2 and CJ/T 188 lines: 2400
# 8E1; DL/T 698.45 meters default to the same; Modbus over Serial Line V1.02 2.5.1: 9600 8E1 is
# the default, but most meters ship at 9600 8N1).
_SERIAL_DEFAULTS: Final = {"modbus": (9600, "N"), "other": (2400, "E")}


class FieldError(Exception):
    """A problem the tool reports as one line and exits with ``code``."""

    def __init__(self, message: str, code: int = EX_USAGE) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Target:
    """Where the tool works: a bus as configured, the meter protocol spoken on it, the config."""

    bus: BusConfig
    protocol: str  # a registry meter protocol
    config: Config  # the gateway's config, or a minimal one holding just ``bus``
    from_file: bool  # ``bus`` came from ``-c FILE``
    meter: Meter | None = None  # ``--meter ID``: that meter as configured


def add_bus_arguments(parser: argparse.ArgumentParser, *, meter_option: bool) -> None:
    """The options that name a line: a configured bus, or a TCP endpoint or serial device."""
    where = parser.add_argument_group("the line (a configured bus, or --tcp / --serial)")
    where.add_argument("-c", "--config", metavar="FILE", help="the gateway's config file: use its bus settings")
    where.add_argument(
        "--bus", metavar="NAME", help="with -c: the configured bus to use; without: the bus name the output uses"
    )
    if meter_option:
        where.add_argument("--meter", metavar="ID", help="with -c: the configured meter (its bus, protocol, address)")
    where.add_argument("--tcp", metavar="HOST:PORT", help="a serial device server or Modbus TCP device")
    where.add_argument("--serial", metavar="DEVICE", help="a local serial port, e.g. /dev/ttyUSB0")
    where.add_argument("--protocol", choices=list(registry.PROTOCOLS), help="the meter protocol")
    line = parser.add_argument_group("line settings (default: the configured bus's, else the config defaults)")
    line.add_argument("--baud", type=int, choices=BAUD_RATES, help="serial speed (default 2400; Modbus 9600)")
    line.add_argument("--parity", choices=("N", "E", "O"), help="serial parity (default E; Modbus N)")
    line.add_argument("--data-bits", type=int, choices=(7, 8), default=None, help="serial data bits (default 8)")
    line.add_argument("--stop-bits", type=int, choices=(1, 2), default=None, help="serial stop bits (default 1)")
    line.add_argument("--no-rs485", action="store_true", help="no kernel RS-485 mode (RS-232, self-switching adapters)")
    line.add_argument(
        "--framing",
        choices=("tcp", "rtu"),
        help="Modbus over --tcp: tcp (Modbus TCP, the default) or rtu (RTU frames through a serial server)",
    )
    line.add_argument("--reply-timeout", type=_seconds, metavar="SECONDS", help="wait for a reply (default 1)")
    line.add_argument("--attempts", type=_attempts, metavar="N", help="tries per transaction, 1..10 (default 3)")
    line.add_argument("--frame-gap", type=_seconds_or_zero, metavar="SECONDS", help="silence between frames")
    line.add_argument("--connect-timeout", type=_seconds, metavar="SECONDS", help="TCP connect (default 5)")
    line.add_argument("--timezone", metavar="ZONE", help="the meters' IANA time zone (default: the config's, or here)")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0 < value <= 60:
        raise argparse.ArgumentTypeError(f"expected seconds in (0, 60], got {text}")
    return value


def _seconds_or_zero(text: str) -> float:
    return 0.0 if text.strip() in {"0", "0.0"} else _seconds(text)


def _attempts(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 10:
        raise argparse.ArgumentTypeError(f"expected 1..10, got {text!r}")
    return int(text)


def _bus_protocol(protocol: str, *, tcp: bool, framing: str | None) -> str:
    """The ``buses[].protocol`` of a line carrying ``protocol`` meters."""
    buses = registry.get(protocol).buses
    if not buses & registry.MODBUS_BUSES:
        if framing is not None:
            raise FieldError("--framing is for Modbus lines")
        # a byte bus: any carries the protocol; the one named after its family reads best
        family = registry.get(protocol).family
        return family if family in buses else min(buses)
    if not tcp:
        if framing == "tcp":
            raise FieldError("Modbus on a serial port is framed rtu")
        return "modbus-rtu"
    return "modbus-rtu" if framing == "rtu" else "modbus-tcp"


def _meter_protocol(bus: BusConfig) -> str:
    """The protocol a bus's meters most likely speak (``--protocol`` not given with ``--bus``)."""
    return registry.carried_by(bus.protocol)[0]


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")  # [::1]:502
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise FieldError(f"--tcp wants HOST:PORT (port 1..65535), got {text!r}")
    return host, int(port)


def _link_options_given(args: argparse.Namespace) -> list[str]:
    names = ("baud", "parity", "data_bits", "stop_bits", "framing", "connect_timeout")
    given = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) is not None]
    return given + (["--no-rs485"] if args.no_rs485 else [])


def _overrides(bus: BusConfig, args: argparse.Namespace) -> BusConfig:
    """``bus`` with the transaction settings given on the command line."""
    changes: dict[str, object] = {}
    if args.reply_timeout is not None:
        changes["reply_timeout"] = Duration(args.reply_timeout)
    if args.attempts is not None:
        changes["attempts"] = args.attempts
    if args.frame_gap is not None:
        changes["inter_frame_gap"] = Duration(args.frame_gap)
    return msgspec.structs.replace(bus, **changes) if changes else bus


def tool_config(bus: BusConfig, timezone: str | None) -> Config:
    """A config holding just ``bus``: what the daemon's builders take (the uplink is never used)."""
    return Config(
        gateway=GatewaySection(id="meter-gateway-field", timezone=timezone),
        uplink=UplinkSection(host="localhost"),
        buses=[bus],
    )


def _load(path: str) -> Config:
    try:
        return load_config(path, secrets=False)
    except ConfigError as e:
        raise FieldError("\n".join(e.messages), EX_CONFIG) from None


def _check_zone(zone: str | None) -> None:
    if zone is None:
        return
    try:
        GatewaySection(id="x", timezone=zone).zone()
    except (ValueError, KeyError, OSError) as e:  # ZoneInfoNotFoundError is a KeyError
        raise FieldError(f"--timezone: unknown time zone {zone!r} ({type(e).__name__})") from None


def resolve_target(args: argparse.Namespace) -> Target:
    """The line and protocol the options name (raises :class:`FieldError`)."""
    _check_zone(args.timezone)
    meter_id: str | None = getattr(args, "meter", None)
    if args.config is not None:
        return _from_file(args, meter_id)
    if meter_id is not None:
        raise FieldError("--meter needs -c FILE (the config that names the meter)")
    if (args.tcp is None) == (args.serial is None):
        raise FieldError("give the line: --tcp HOST:PORT or --serial DEVICE (or -c FILE --bus NAME)")
    if args.protocol is None:
        raise FieldError(f"--protocol is needed with --tcp or --serial (one of {', '.join(registry.PROTOCOLS)})")
    name = args.bus or DEFAULT_BUS_NAME
    if not re.fullmatch(_NAME, name) or len(name) > 64:
        raise FieldError(f"--bus: {name!r} is not a bus name (letters, digits and _ . : -, at most 64)")
    bus_protocol = _bus_protocol(args.protocol, tcp=args.tcp is not None, framing=args.framing)
    fields: dict[str, object] = {"name": name, "protocol": bus_protocol}
    if args.tcp is not None:
        serial_only = [o for o in _link_options_given(args) if o not in {"--framing", "--connect-timeout"}]
        if serial_only:
            raise FieldError(f"{', '.join(serial_only)}: serial settings, and this line is --tcp")
        host, port = _host_port(args.tcp)
        fields.update(type="tcp", host=host, port=port)
        if args.connect_timeout is not None:
            fields["connect_timeout"] = args.connect_timeout
    else:
        if args.connect_timeout is not None:
            raise FieldError("--connect-timeout is for --tcp lines")
        baud, parity = _SERIAL_DEFAULTS["modbus" if bus_protocol in registry.MODBUS_BUSES else "other"]
        fields.update(
            type="serial",
            port=args.serial,
            baud_rate=args.baud or baud,
            parity=args.parity or parity,
            data_bits=args.data_bits or 8,
            stop_bits=args.stop_bits or 1,
            rs485=not args.no_rs485,
        )
    bus: BusConfig = _checked(fields, BusConfig, "the line")  # type: ignore[arg-type]
    bus = _overrides(bus, args)
    return Target(bus, args.protocol, tool_config(bus, args.timezone), from_file=False)


def _checked(fields: dict[str, object], kind: type[T], what: str) -> T:
    """``fields`` as a config struct, checked by the config's own types and limits."""
    try:
        return msgspec.convert(fields, kind, dec_hook=_duration)
    except msgspec.ValidationError as e:
        raise FieldError(f"{what}: {e}") from None


def _duration(kind: type, value: object) -> object:
    if kind is Duration and isinstance(value, int | float) and not isinstance(value, bool):
        return Duration(value)
    raise NotImplementedError(kind)


def make_meter(**fields: object) -> Meter:
    """A ``[[meters]]`` table's meter, checked as the config checks one (its id, its protocol)."""
    return _checked(dict(fields), Meter, "the meter")


def _from_file(args: argparse.Namespace, meter_id: str | None) -> Target:
    if args.tcp is not None or args.serial is not None:
        raise FieldError("-c FILE takes the line from the config: drop --tcp / --serial")
    if given := _link_options_given(args):
        raise FieldError(f"{', '.join(given)}: with -c the line's settings are the configured bus's")
    config = _load(args.config)
    meter: Meter | None = None
    if meter_id is not None:
        try:
            meter = config.meter(meter_id)
        except KeyError:
            raise FieldError(
                f"no meter {meter_id!r} in {args.config}{_close(meter_id, [m.id for m in config.meters])}"
            ) from None
        if args.bus is not None and args.bus != meter.bus:
            raise FieldError(f"meter {meter_id} is on bus {meter.bus}, not {args.bus}")
        if args.protocol is not None and args.protocol != meter.protocol:
            raise FieldError(f"meter {meter_id} is a {meter.protocol} meter, not {args.protocol}")
        bus_name = meter.bus
    elif args.bus is not None:
        bus_name = args.bus
    elif len(config.buses) == 1:
        bus_name = config.buses[0].name
    else:
        names = ", ".join(b.name for b in config.buses) or "none"
        raise FieldError(f"which bus of {args.config}? give --bus NAME (configured: {names})")
    try:
        bus = config.bus(bus_name)
    except KeyError:
        raise FieldError(
            f"no bus {bus_name!r} in {args.config}{_close(bus_name, [b.name for b in config.buses])}"
        ) from None
    protocol = meter.protocol if meter is not None else (args.protocol or _meter_protocol(bus))
    if bus.protocol not in registry.get(protocol).buses:
        raise FieldError(f"bus {bus.name} is a {bus.protocol} line: it cannot carry {protocol} meters")
    if args.timezone is not None:
        config = msgspec.structs.replace(
            config, gateway=msgspec.structs.replace(config.gateway, timezone=args.timezone)
        )
    bus = _overrides(bus, args)
    return Target(bus, protocol, config, from_file=True, meter=meter)


def _close(word: str, options: list[str]) -> str:
    near = difflib.get_close_matches(word, options, n=1)
    return f" (did you mean {near[0]!r}?)" if near else ""


def describe_link(bus: BusConfig) -> str:
    """``tcp 127.0.0.1:6001`` or ``serial /dev/ttyUSB0 2400 8E1``, for messages."""
    if isinstance(bus, TcpBus):
        return f"tcp {bus.host}:{bus.port}"
    return f"serial {bus.port} {bus.baud_rate} {bus.data_bits}{bus.parity}{bus.stop_bits}"


def shipped_models(protocol: str) -> list[str]:
    """The shipped model names a meter of ``protocol`` can use (its family; the edition the
    registry says its model files name, if any)."""
    info = registry.get(protocol)
    out: list[str] = []
    for name in available_models():
        try:
            model = load_model(name)
        except ConfigurationError:
            continue  # a broken shipped file is check-config's to report, not a field tool's
        if model.protocol != info.family:
            continue
        edition = getattr(model, "edition", None)
        if info.edition and edition is not None and edition.value != info.edition:
            continue
        out.append(name)
    return out


def default_model(protocol: str) -> str | None:
    """The model to use when none is given: the protocol's generic one, if it ships one."""
    name = f"{protocol}-generic"
    return name if name in shipped_models(protocol) else None


def _probe_bus(bus: BusConfig) -> Bus:
    """:func:`~gateway.meters.build_bus` for a scan, but for one setting: a TCP link that hears no
    reply to a few requests in a row is taken for half-open and reconnected (for polling known
    meters); a scan mostly asks addresses nobody has, so silence is no sign of a dead link."""
    settings = link_settings(bus)
    if not isinstance(settings, TcpSettings):
        return build_bus(bus, HealthBook())  # serial links have no such detector
    return build_bus(bus, HealthBook(), link=dataclasses.replace(settings, no_reply_limit=0))


@contextlib.asynccontextmanager
async def open_bus(bus: BusConfig, *, scan: bool = False) -> AsyncIterator[Bus]:
    """The daemon's Bus for ``bus`` (``scan``: see :func:`_probe_bus`), connected; closed afterwards.

    Raises :class:`FieldError` (exit 1) when a byte-stream line cannot be opened: a serial device
    that is missing or locked by a running gateway, a TCP endpoint that refuses."""
    built = _probe_bus(bus) if scan else build_bus(bus, HealthBook())
    try:
        if not await built.open():
            transport = built.transport
            reason = transport.stats.last_error if transport is not None else None
            raise FieldError(f"cannot open {describe_link(bus)}: {reason or 'no connection'}", 1)
        yield built
    finally:
        with contextlib.suppress(Exception):  # closing must not hide what happened
            await built.close()


@contextlib.contextmanager
def tool_logging(verbose: bool) -> Iterator[None]:
    """Driver warnings (a DI the meter lacks, a pty refusing RS-485 mode) as plain stderr lines
    while the tool runs; the logger is left as it was found afterwards."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logger = logging.getLogger("meter_gateway")
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def run_tool(parser: argparse.ArgumentParser, argv: list[str], run: Callable[[argparse.Namespace], int]) -> int:
    """A field tool's ``main``: ``run`` the parsed options with driver warnings on stderr; a
    :class:`FieldError` is its lines on stderr, each prefixed with the tool's name, and its code."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    with tool_logging(args.verbose):
        try:
            return run(args)
        except FieldError as e:
            for line in str(e).splitlines():
                print(line if line.startswith("error: ") else f"{parser.prog}: {line}", file=sys.stderr)
            return e.code
        except KeyboardInterrupt:
            return 130

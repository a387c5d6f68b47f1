"""`meter-gateway discover`: find the meters on a line and print ``[[meters]]`` tables to paste.

    meter-gateway discover --tcp 192.0.2.10:4001 --protocol dlt645-2007
    meter-gateway discover --serial /dev/ttyUSB0 --protocol dlt645-2007 --range 000000000001-000000000050
    meter-gateway discover --tcp 192.0.2.20:502 --protocol modbus --units 1-32
    meter-gateway discover -c /etc/meter-gateway/gateway.toml --bus line2 --range 000000001000-000000001099

How, per protocol (the protocol registry says whether it can discover at all, and names its
wildcard request: ``MeterProtocol.discover``):

* **One meter on the line** (a hand-held converter on one meter, one meter per serial server
  port): the protocol's wildcard request. DL/T 645-2007 0x13 read address to AAAAAAAAAAAA
  (clause 6.4; 1997: a read to the wildcard), DL/T 698.45 GET 40010200 to the wildcard server
  address, CJ/T 188 810A to the all-AA address (its reply also gives the meter type, which picks
  the model). Several meters on one line answer on top of each other or not at all: that is
  reported, with the way out (``--range``).
* **A shared line** (``--range FIRST-LAST``): each address in the range is asked for its
  model's first quantity, with one attempt and a short reply timeout (``--probe-timeout``).
  Any answer, a refusal included, means a meter is there. At most :data:`MAX_PROBES` addresses
  per run, so a typo cannot start a scan of hours.
* **Modbus** (``--units FIRST-LAST``, default 1-247): one holding-register read per unit id. An
  exception reply is a device that is there; "gateway target did not respond" (0x0B) and
  "gateway path unavailable" (0x0A) are a gateway saying nobody is.

The tables printed name a suggested id, the bus, the protocol, the address and a model, and pass
``check-config`` when pasted into a config that has the bus. With ``-c`` a meter already
configured is named in a comment, not printed again. ``--json`` prints the same as data.

Exit status: 0 meters found; 1 none found, or the line cannot be opened; 2 bad usage (and a
protocol that cannot discover); 78 the config file given with -c is bad.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Final

import msgspec

from meter_gateway.drivers import registry
from meter_gateway.drivers.errors import BadReply, ConfigurationError, DriverError, LinkDown, MeterRefused, NoAnswer
from meter_gateway.drivers.meter_models import load_model
from meter_gateway.gateway.cli.field_bus import (
    FieldError,
    Target,
    add_bus_arguments,
    default_model,
    describe_link,
    make_meter,
    open_bus,
    resolve_target,
    run_tool,
    shipped_models,
)
from meter_gateway.gateway.config import BusConfig, Duration
from meter_gateway.gateway.daemon.meters import build_driver

__all__ = ["MAX_PROBES", "Found", "main", "snippet"]

NONE_FOUND: Final = 1
MAX_PROBES: Final = 1000  # addresses per --range run: at the default timeout about eight minutes
DEFAULT_PROBE_TIMEOUT: Final = 0.5  # s: DL/T 645-2007 lets a meter take up to 500 ms to answer
MODBUS_UNITS: Final = (1, 247)  # Modbus over Serial Line V1.02 2.2: 1..247 are device addresses
# exceptions that are a Modbus gateway's answer for a device that is not there (V1.1b3 §7)
_GATEWAY_NOBODY: Final = frozenset({0x0A})  # 0x0B already comes back as NoAnswer
# "server device failure" to a one-register read: a device in trouble, or a server that answers
# for unit ids it does not have (pymodbus 3.16's server and others do, where the spec says a
# missing unit keeps quiet); listed apart, never as a meter to configure
_DOUBTFUL: Final = 0x04


@dataclass(frozen=True, slots=True)
class Found:
    """A meter found on the line, as a ``[[meters]]`` table would hold it."""

    id: str
    bus: str
    protocol: str
    address: str | int
    model: str
    model_guessed: bool = False  # nothing the meter said picks its model
    note: str = ""  # what else the meter told (a CJ/T 188 meter's type)
    configured_as: str | None = None  # with -c: the configured meter of this address


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meter-gateway discover",
        description="Find the meters on a line and print [[meters]] tables to paste into the config.",
        epilog="Without --range or --units: the protocol's wildcard request, for a line with one meter. "
        "Exit status: 0 found, 1 none found or the line cannot be opened, 2 bad usage, 78 bad config file.",
    )
    how = parser.add_argument_group("what to look for")
    how.add_argument("--range", metavar="FIRST-LAST", help=f"probe each address (a shared line; at most {MAX_PROBES})")
    how.add_argument("--units", metavar="FIRST-LAST", help="Modbus: unit ids to scan (default 1-247)")
    how.add_argument("--register", type=int, default=0, metavar="N", help="Modbus: holding register read per unit")
    how.add_argument("--meter-type", metavar="HEX", help='CJ/T 188: only meters of this type (e.g. "10" cold water)')
    how.add_argument(
        "--probe-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help=f"reply timeout of one probe (default {DEFAULT_PROBE_TIMEOUT}, or a longer bus reply_timeout's half)",
    )
    how.add_argument(
        "--model", help="the model the tables name (default: the protocol's generic or what the meter says)"
    )
    add_bus_arguments(parser, meter_option=False)
    out = parser.add_argument_group("output")
    out.add_argument("--id-prefix", metavar="TEXT", help="suggested ids are TEXT + address (default: the bus name + -)")
    out.add_argument("--json", action="store_true", help="print one JSON object")
    out.add_argument("-v", "--verbose", action="store_true", help="log every transaction's trouble")
    return parser


# -- ranges -----------------------------------------------------------------------------------------


def address_range(protocol: str, text: str) -> list[str]:
    """The addresses ``FIRST-LAST`` (or one address) spans, each written with FIRST's digits."""
    first, _, last = text.partition("-")
    last = last or first
    if not first.isdigit() or not last.isdigit() or len(first) != len(last):
        raise FieldError(f"--range wants FIRST-LAST, two addresses of the same number of digits, got {text!r}")
    low, high = int(first), int(last)
    if high < low:
        raise FieldError(f"--range: {last} is below {first}")
    if high - low + 1 > MAX_PROBES:
        raise FieldError(f"--range spans {high - low + 1} addresses; at most {MAX_PROBES} per run (split the range)")
    width = len(first)
    out: list[str] = []
    for n in range(low, high + 1):
        address = f"{n:0{width}d}"
        problem = registry.check_address(protocol, address)
        if problem is not None and "broadcast" not in problem:
            raise FieldError(f"--range: {problem}")
        if problem is None:
            out.append(address)
    return out


def unit_range(text: str | None) -> list[int]:
    if text is None:
        return list(range(MODBUS_UNITS[0], MODBUS_UNITS[1] + 1))
    first, _, last = text.partition("-")
    last = last or first
    if not first.isdigit() or not last.isdigit():
        raise FieldError(f"--units wants FIRST-LAST unit ids, got {text!r}")
    low, high = int(first), int(last)
    if not MODBUS_UNITS[0] <= low <= high <= MODBUS_UNITS[1]:
        raise FieldError(f"--units: unit ids are {MODBUS_UNITS[0]}..{MODBUS_UNITS[1]}, FIRST <= LAST; got {text!r}")
    return list(range(low, high + 1))


# -- models -------------------------------------------------------------------------------------------


def _model_for(protocol: str, given: str | None) -> tuple[str, bool]:
    """The model the tables name and whether it is a guess."""
    if given is not None:
        try:
            model = load_model(given)
        except ConfigurationError as e:
            raise FieldError(f"--model: {e}") from None
        if model.protocol != registry.get(protocol).family:
            raise FieldError(f"model {model.name} is a {model.protocol} model, not for {protocol} meters")
        return given, False
    generic = default_model(protocol)
    if generic is not None:
        return generic, False
    shipped = shipped_models(protocol)
    if not shipped:
        raise FieldError(f"no shipped {protocol} model: give --model FILE")
    return shipped[0], True


def _typed_model(protocol: str, meter_type: int | None) -> tuple[str, bool]:
    """The shipped model of the type a meter reported (protocols with ``typed_meters``)."""
    names = shipped_models(protocol)
    if not names:
        raise FieldError(f"no shipped {protocol} model: give --model FILE")
    for name in names:
        if meter_type is not None and getattr(load_model(name), "meter_type", None) == meter_type:
            return name, False
    return names[0], True


# -- probing ------------------------------------------------------------------------------------------


def _probe_bus(bus: BusConfig, timeout: float | None) -> BusConfig:
    """``bus`` for probing: one attempt, a short reply timeout (a silent address costs only that)."""
    if timeout is None:
        timeout = max(DEFAULT_PROBE_TIMEOUT, float(bus.reply_timeout) / 2)
    return msgspec.structs.replace(bus, reply_timeout=Duration(timeout), attempts=1)


async def _wildcard(target: Target, args: argparse.Namespace) -> list[Found]:
    protocol = target.protocol
    info = registry.get(protocol)
    discover = info.discoverer()
    if discover is None:
        raise FieldError(f"{protocol} has no wildcard request: use --range FIRST-LAST")
    # what is given is checked before anything goes on the line
    meter_type = _meter_type(args.meter_type) if args.meter_type is not None else None
    model, guessed = _model_for(protocol, args.model) if not info.typed_meters or args.model else ("", False)
    async with open_bus(target.bus) as bus:
        found: registry.Discovered = await discover(
            bus, protocol, preamble=target.bus.dlt645_preamble(), meter_type=meter_type
        )
    if not model:  # the meter's type picks the model
        model, guessed = _typed_model(protocol, found.meter_type)
    return [_found(target, args, found.address, model, guessed=guessed, note=found.note)]


def _meter_type(text: str) -> int:
    try:
        value = int(text, 16)
    except ValueError:
        value = -1
    if not 0 <= value <= 0xFF or len(text) != 2:
        raise FieldError(f'--meter-type wants the type as 2 hex digits (CJ/T 188 Table 3, e.g. "10"), got {text!r}')
    return value


async def _addresses(target: Target, args: argparse.Namespace, addresses: list[str]) -> list[Found]:
    """Ask each address for its model's first quantity through the daemon's own driver."""
    protocol = target.protocol
    info = registry.get(protocol)
    if info.typed_meters and args.model is None:
        raise FieldError(f"a {info.standard} range probe asks with a model's meter type: give --model")
    model, guessed = _model_for(protocol, args.model)
    quantity = load_model(model).quantities[0]
    probe = _probe_bus(target.bus, args.probe_timeout)
    found: list[Found] = []
    async with open_bus(probe, scan=True) as bus:
        for address in addresses:
            meter = make_meter(id=f"probe-{address}", bus=probe.name, protocol=protocol, address=address, model=model)
            driver = build_driver(target.config, meter, bus)
            now = time.time()
            try:
                await driver.read([quantity], slot=float(int(now)), now=now)
            except MeterRefused:
                pass  # it refused: it is there
            except NoAnswer:
                continue
            except BadReply as e:
                print(f"meter-gateway discover: {address}: a garbled answer ({e}); not listed", file=sys.stderr)
                continue
            found.append(_found(target, args, address, model, guessed=guessed))
    return found


async def _units(target: Target, args: argparse.Namespace, units: list[int]) -> tuple[list[Found], list[int]]:
    """The units that answered, and those whose only answer was "server device failure"."""
    from meter_gateway.drivers.modbus import link_for

    if not 0 <= args.register <= 0xFFFF:
        raise FieldError(f"--register is a register address 0..65535, got {args.register}")
    model, guessed = _model_for(target.protocol, args.model)
    probe = _probe_bus(target.bus, args.probe_timeout)
    found: list[Found] = []
    doubtful: list[int] = []
    async with open_bus(probe, scan=True) as bus:
        link = link_for(bus)  # build_bus makes every Modbus bus one
        for unit in units:
            try:
                await link.read_registers(unit, 3, args.register, 1)
            except MeterRefused as e:
                if e.code in _GATEWAY_NOBODY:
                    continue
                if e.code == _DOUBTFUL:
                    doubtful.append(unit)
                    continue
                # any other exception reply: the device is there (the register may just not exist)
            except NoAnswer:
                continue
            except BadReply as e:
                print(f"meter-gateway discover: unit {unit}: a garbled answer ({e}); not listed", file=sys.stderr)
                continue
            found.append(_found(target, args, unit, model, guessed=guessed))
    return found, doubtful


def _runs(numbers: list[int]) -> str:
    """``1, 3-4, 6``."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _found(
    target: Target, args: argparse.Namespace, address: str | int, model: str, *, guessed: bool = False, note: str = ""
) -> Found:
    prefix = args.id_prefix if args.id_prefix is not None else f"{target.bus.name}-"
    meter_id = f"{prefix}{'u' if isinstance(address, int) else ''}{address}"
    if len(meter_id) > 64:
        meter_id = f"m{address}"
    configured = next((m.id for m in target.config.meters if m.bus == target.bus.name and m.address == address), None)
    return Found(meter_id, target.bus.name, target.protocol, address, model, guessed, note, configured)


# -- output -------------------------------------------------------------------------------------------


def snippet(found: list[Found], protocol: str) -> str:
    """The ``[[meters]]`` tables of the meters not yet configured; comments for the others."""
    lines: list[str] = []
    guesses = shipped_models(protocol)
    for f in found:
        if f.configured_as is not None:
            lines.append(f"# {f.address} on {f.bus} is configured already, as meter {f.configured_as}")
            continue
        if lines:
            lines.append("")
        if f.note:
            lines.append(f"# {f.note}")
        address = f'"{f.address}"' if isinstance(f.address, str) else str(f.address)
        model = f'model = "{f.model}"'
        if f.model_guessed:
            model += f"  # a guess: nothing on the wire names the model (shipped: {', '.join(guesses)})"
        lines += [
            "[[meters]]",
            f'id = "{f.id}"',
            f'bus = "{f.bus}"',
            f'protocol = "{f.protocol}"',
            f"address = {address}",
            model,
        ]
    return "\n".join(lines)


def _iter_found(found: list[Found]) -> Iterator[dict[str, object]]:
    for f in found:
        yield {k: v for k, v in asdict(f).items() if v not in ("", None)}


async def _discover(target: Target, args: argparse.Namespace) -> tuple[str, int, list[Found], list[int]]:
    """(method, how many addresses were asked, the meters found, Modbus units in doubt)."""
    if target.bus.protocol in registry.MODBUS_BUSES:  # a Modbus bus: its devices are unit ids
        if args.range is not None:
            raise FieldError("Modbus devices are found by unit id: use --units FIRST-LAST")
        units = unit_range(args.units)
        found, doubtful = await _units(target, args, units)
        return "units", len(units), found, doubtful
    if args.units is not None:
        raise FieldError(f"--units is for Modbus; {target.protocol} addresses take --range FIRST-LAST")
    if args.range is not None:
        addresses = address_range(target.protocol, args.range)
        return "range", len(addresses), await _addresses(target, args, addresses), []
    return "wildcard", 1, await _wildcard(target, args), []


def run(args: argparse.Namespace) -> int:
    target = resolve_target(args)
    if not registry.capable(target.protocol, registry.Can.DISCOVER):
        able = ", ".join(registry.meter_protocols(registry.Can.DISCOVER)) or "none"
        raise FieldError(f"{target.protocol} meters cannot be discovered (protocols that can: {able})")
    if args.probe_timeout is not None and not 0 < args.probe_timeout <= 60:
        raise FieldError(f"--probe-timeout is seconds in (0, 60], got {args.probe_timeout}")
    try:
        method, asked, found, doubtful = asyncio.run(_discover(target, args))
    except LinkDown as e:
        raise FieldError(f"{describe_link(target.bus)}: {e}", NONE_FOUND) from None
    except NoAnswer:
        raise FieldError(
            f"no meter answered the {target.protocol} wildcard request on {describe_link(target.bus)}: none on the "
            "line, or several that answered on top of each other (on a shared line use --range FIRST-LAST)",
            NONE_FOUND,
        ) from None
    except BadReply as e:
        raise FieldError(
            f"a garbled answer to the {target.protocol} wildcard request ({e}): probably several meters answered at "
            "once; on a shared line use --range FIRST-LAST",
            NONE_FOUND,
        ) from None
    except ConfigurationError as e:
        raise FieldError(str(e)) from None
    except DriverError as e:
        raise FieldError(f"{describe_link(target.bus)}: {e.kind.replace('_', ' ')}: {e}", NONE_FOUND) from None
    text = snippet(found, target.protocol)
    if doubtful:
        print(
            f"meter-gateway discover: unit(s) {_runs(doubtful)} answered only 'server device failure' (0x04): "
            "a device in trouble, or a server answering for units it does not have; not listed",
            file=sys.stderr,
        )
    if args.json:
        doc = {
            "bus": target.bus.name,
            "link": describe_link(target.bus),
            "protocol": target.protocol,
            "method": method,
            "asked": asked,
            "found": list(_iter_found(found)),
            "doubtful": doubtful,
            "snippet": text,
        }
        print(json.dumps(doc, ensure_ascii=False))
    else:
        where = f"bus {target.bus.name} ({describe_link(target.bus)})"
        print(f"# {len(found)} {target.protocol} meter(s) found on {where} by {method} ({asked} asked)")
        if text:
            print(text)
    return 0 if found else NONE_FOUND


def main(argv: list[str]) -> int:
    return run_tool(_parser(), argv, run)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

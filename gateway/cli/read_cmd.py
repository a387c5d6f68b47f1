"""`meter-gateway read`: read one meter once, without the daemon, the broker or any key.

    meter-gateway read --tcp 192.0.2.10:4001 --protocol dlt645-2007 --address 000000001234
    meter-gateway read --serial /dev/ttyUSB0 --baud 2400 --parity E --protocol dlt645-2007 \\
        --address 000000001234 energy.active.import.total voltage.l1
    meter-gateway read -c /etc/meter-gateway/gateway.toml --meter m17 --json

The meter is read the way the daemon reads it: the bus is built by the daemon's
:func:`~gateway.meters.build_bus` (so the configured or given frame gap, reply timeout and attempts
apply), the driver by its protocol's builder in the registry, and the read is the poller's
``read(quantities, slot=..., now=...)``. Without quantities, everything the model names is read;
a quantity the meter has no data for is listed as missing.

Exit status: 0 every asked quantity was read; 1 the meter did not answer, refused, answered
garbage, the line could not be opened, or an asked quantity came back empty; 2 bad usage (an
unknown quantity, a malformed address); 78 the config file given with -c is bad.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import difflib
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import msgspec

from meter_gateway.drivers import registry
from meter_gateway.drivers.errors import ConfigurationError, DriverError
from meter_gateway.drivers.meter_models import load_model
from meter_gateway.drivers.reading import Quality, Reading
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
from meter_gateway.gateway.config import Meter
from meter_gateway.gateway.daemon.meters import MeterRuntime, build_driver

__all__ = ["main", "parse_address"]

READ_FAILED = 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meter-gateway read",
        description="Read one meter once (no daemon, broker or keys), the way the daemon reads it.",
        epilog="Exit status: 0 read, 1 no (complete) answer or the line cannot be opened, 2 bad usage, "
        "78 bad config file.",
    )
    parser.add_argument("quantities", nargs="*", metavar="QUANTITY", help="quantities to read (default: the model's)")
    meter = parser.add_argument_group("the meter (or -c FILE --meter ID)")
    meter.add_argument("--address", help="DL/T 645, DL/T 698.45, CJ/T 188 address digits, or a Modbus unit id")
    meter.add_argument("--model", help="a shipped model name or a model file (default: the protocol's generic)")
    add_bus_arguments(parser, meter_option=True)
    out = parser.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print one JSON object")
    out.add_argument("-v", "--verbose", action="store_true", help="log every transaction's trouble")
    return parser


def parse_address(protocol: str, text: str) -> str | int:
    """A meter address as the config writes it (a Modbus unit id is a number), checked."""
    address: str | int = text
    if registry.get(protocol).address.kind is int:
        address = int(text) if text.isdigit() else text
    problem = registry.check_address(protocol, address)
    if problem is not None:
        raise FieldError(f"--address: {problem}")
    return address


def _quantities(given: Sequence[str]) -> list[str]:
    """``a b`` and ``a,b`` alike, in order, once each."""
    words = [q.strip() for text in given for q in text.split(",")]
    return list(dict.fromkeys(q for q in words if q))


def _meter(target: Target, args: argparse.Namespace) -> Meter:
    """The meter to read: as configured (``--meter``), or from ``--address`` and ``--model``."""
    if target.meter is not None:
        if args.address is not None or args.model is not None:
            raise FieldError("--meter reads the meter as configured: drop --address / --model")
        # read with what the config says, minus write access: a read never needs a password
        return msgspec.structs.replace(target.meter, credentials=None)
    protocol = target.protocol
    if args.address is None:
        raise FieldError("--address is needed (or -c FILE --meter ID)")
    address = parse_address(protocol, args.address)
    model = args.model or default_model(protocol)
    if model is None:
        names = ", ".join(shipped_models(protocol)) or "none shipped"
        raise FieldError(f"{protocol} meters differ by model: give --model (shipped: {names}, or a model file)")
    return make_meter(
        id=f"{target.bus.name}-{address}", bus=target.bus.name, protocol=protocol, address=address, model=model
    )


def _check_quantities(meter: Meter, wanted: list[str]) -> tuple[str, ...]:
    """The quantities to read: the model's when none are given; unknown ones are a usage error."""
    try:
        model = load_model(meter.model)
    except ConfigurationError as e:
        raise FieldError(f"--model: {e}") from None
    if model.protocol != registry.get(meter.protocol).family:
        raise FieldError(f"model {model.name} is a {model.protocol} model, not for {meter.protocol} meters")
    if not wanted:
        return tuple(model.quantities)
    for quantity in wanted:
        if quantity not in model.quantities:
            near = difflib.get_close_matches(quantity, model.quantities, n=1)
            hint = f" (did you mean {near[0]}?)" if near else f" (it reads: {', '.join(model.quantities)})"
            raise FieldError(f"model {model.name} has no quantity {quantity!r}{hint}")
    return tuple(wanted)


async def _read(target: Target, meter: Meter, quantities: tuple[str, ...]) -> tuple[list[Reading], float]:
    async with open_bus(target.bus) as bus:
        driver = build_driver(target.config, meter, bus)
        runtime = MeterRuntime(meter.id, bus.name, meter.protocol, driver)
        now = time.time()
        readings = await runtime.read(quantities, float(int(now)), now)
    return readings, now


def _quality(reading: Reading) -> list[str]:
    return [flag.name for flag in Quality if flag and flag in reading.quality and flag.name is not None]


def _as_json(target: Target, meter: Meter, readings: list[Reading], missing: list[str], at: float) -> dict[str, Any]:
    return {
        "meter": meter.id,
        "protocol": meter.protocol,
        "address": meter.address,
        "model": meter.model,
        "bus": target.bus.name,
        "link": describe_link(target.bus),
        "read_at": datetime.datetime.fromtimestamp(at, datetime.UTC).isoformat(timespec="milliseconds"),
        "readings": [
            {"quantity": r.quantity, "value": r.value, "unit": r.unit, "quality": _quality(r)} for r in readings
        ],
        "missing": missing,
    }


def _as_text(target: Target, meter: Meter, readings: list[Reading], missing: list[str], at: float) -> str:
    when = datetime.datetime.fromtimestamp(at, datetime.UTC).isoformat(timespec="seconds")
    lines = [f"{meter.address} ({meter.protocol}, {meter.model}) on {describe_link(target.bus)} at {when}"]
    width = max((len(r.quantity) for r in readings), default=0)
    for r in readings:
        flags = _quality(r)
        unit = f" {r.unit}" if r.unit else ""
        lines.append(f"  {r.quantity:<{width}}  {r.value}{unit}{'  [' + ', '.join(flags) + ']' if flags else ''}")
    if missing:
        lines.append(f"  no value: {', '.join(missing)}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    target = resolve_target(args)
    if not registry.capable(target.protocol, registry.Can.READ):
        raise FieldError(f"{target.protocol} meters cannot be read by this gateway")
    meter = _meter(target, args)
    asked = _quantities(args.quantities)
    quantities = _check_quantities(meter, asked)
    try:
        readings, at = asyncio.run(_read(target, meter, quantities))
    except ConfigurationError as e:  # the driver refused the meter as given (model and address)
        raise FieldError(str(e)) from None
    except DriverError as e:
        raise FieldError(
            f"meter {meter.address} on {describe_link(target.bus)}: {e.kind.replace('_', ' ')}: {e}", READ_FAILED
        ) from None
    got = {r.quantity for r in readings}
    missing = [q for q in quantities if q not in got]
    if args.json:
        print(json.dumps(_as_json(target, meter, readings, missing, at), ensure_ascii=False))
    else:
        print(_as_text(target, meter, readings, missing, at))
    if asked and missing:
        return READ_FAILED
    return 0 if readings else READ_FAILED


def main(argv: list[str]) -> int:
    return run_tool(_parser(), argv, run)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

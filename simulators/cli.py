"""``meter-gateway simulate``: serve simulated DL/T 645, DL/T 698.45, CJ/T 188 (and Modbus)
meters until SIGINT/SIGTERM.

Prints one line per bus (protocol, endpoint, the meter addresses it serves as compact ranges;
one line per meter group on a bus with several), then ``ready``. A text control port
(``--control-port``, or ``control_port`` in the config) accepts one command per line on
127.0.0.1:

    press ADDRESS            press the meter's button (closes a relay armed by a close permit)
    status ADDRESS           relay (or valve), armed, keep-power, stuck and meter time
    valve ADDRESS open|close move a CJ/T 188 meter's valve as the customer's hand would
    topup ADDRESS AMOUNT     a purchase on a prepaid DL/T 645 or 698.45 meter (yuan; kWh for a
                             DL/T 645 energy-type meter); then ``press`` closes a credit-tripped relay
    fault BUS KNOB VALUE     set a fault knob at run time (BUS = 1-based index, name, or a meter
                             address for that meter alone)
    help

Exit status: 0 after a clean stop, 1 when a bus cannot start, 2 for bad usage or config.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import signal
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from meter_gateway.drivers import registry
from meter_gateway.protocols.dlt645.edition import Edition
from meter_gateway.simulators.cjt188_meter import Cjt188Meter
from meter_gateway.simulators.clock import SimClock
from meter_gateway.simulators.dlt645_meter import Dlt645Meter
from meter_gateway.simulators.dlt698_meter import Dlt698Meter
from meter_gateway.simulators.dlt698_test_security import DEFAULT_KEY
from meter_gateway.simulators.faults import PROBABILITIES, Faults
from meter_gateway.simulators.links import LinkConfig, SimulatedBus
from meter_gateway.simulators.sim_config import (
    METER_TYPES,
    MODBUS_FRAMINGS,
    PROTOCOLS,
    BusConfig,
    SimConfig,
    SimConfigError,
    load_config,
    quick_config,
    zone_of,
)

_HELP_EPILOG = """\
control port commands (one per line, e.g. `printf 'press 000000000001\\n' | nc 127.0.0.1 7700`):
  press ADDRESS          press the meter's button: closes a relay armed by a close permit
  status ADDRESS         show relay (valve), armed, keep-power, stuck relay (valve) and meter time
  valve ADDRESS open|close   move a CJ/T 188 meter's valve by hand
  topup ADDRESS AMOUNT   buy credit on a prepaid meter (`purse` in the config); `press` then closes
                         a relay the meter tripped at zero credit
  fault BUS KNOB VALUE   set a fault at run time, e.g. `fault 1 drop_reply 0.2` (BUS: index or name,
                         or a meter address for that meter alone)

delayed trips (1D/1E) use N2 in minutes of meter time; see simulators/dlt645_meter.py.
--protocol dlt698 serves DL/T 698.45 meters (simulators/dlt698_meter.py), --protocol cjt188
CJ/T 188 water, gas or heat meters (--meter-type; simulators/cjt188_meter.py).
"""


class UsageError(Exception):
    pass


@dataclass
class _Running:
    dlt_buses: list[tuple[BusConfig, SimulatedBus]] = field(default_factory=list)
    modbus: list[tuple[BusConfig, Any]] = field(default_factory=list)
    meters: dict[str, Dlt645Meter | Dlt698Meter | Cjt188Meter] = field(default_factory=dict)

    async def stop(self) -> None:
        for _, bus in self.dlt_buses:
            await bus.stop()
        for _, server in self.modbus:
            await server.stop()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meter-gateway simulate",
        description="Run simulated DL/T 645, DL/T 698.45, CJ/T 188 and Modbus meters on TCP ports or pseudo-terminals.",
        epilog=_HELP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="TOML file (see config/simulator.toml); quick flags are ignored")
    parser.add_argument("--meters", type=int, default=1, help="number of meters (default 1)")
    parser.add_argument("--buses", type=int, default=1, help="number of buses the meters spread over (default 1)")
    parser.add_argument("--port", type=int, default=6001, help="first TCP port; bus i listens on PORT+i (0: any)")
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="dlt645-2007")
    parser.add_argument(
        "--meter-type", choices=METER_TYPES, default="water", help="CJ/T 188 meter kind (default water)"
    )
    parser.add_argument("--pty", action="store_true", help="one pseudo-terminal per bus instead of TCP (not Modbus)")
    parser.add_argument("--baud", type=int, help="emulate wire time at this baud rate (11 bits/char, 8E1)")
    parser.add_argument("--speed", type=float, default=1.0, help="simulated seconds per real second")
    parser.add_argument("--seed", type=int, default=0, help="seed of load models and faults")
    parser.add_argument("--control-port", type=int, help="TCP port of the text control interface (127.0.0.1)")
    parser.add_argument(
        "--timezone",
        help="IANA zone the meters keep time in, as the gateway's gateway.timezone (default: the host's zone)",
    )
    return parser


def compact_ranges(addresses: Iterable[str]) -> str:
    """``000000000001-000000000100, 000000000200`` for sorted runs of consecutive numbers."""
    texts = list(addresses)
    numbers = sorted(int(a) for a in texts)
    # meter addresses keep their leading zeros (12 digits DL/T 645 and 698.45, 14 CJ/T 188)
    width = max((len(a) for a in texts if len(a) >= 12), default=0)
    runs: list[tuple[int, int]] = []
    for n in numbers:
        if runs and n == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], n)
        else:
            runs.append((n, n))
    fmt = (lambda v: f"{v:0{width}d}") if width else str
    return ", ".join(fmt(a) if a == b else f"{fmt(a)}-{fmt(b)}" for a, b in runs)


def build_meters(
    config: SimConfig, bus: BusConfig, clock: SimClock, index: int
) -> list[Dlt645Meter | Dlt698Meter | Cjt188Meter]:
    """The simulated meters of every group of ``bus`` (the ``index``-th bus), seeded apart."""
    out: list[Dlt645Meter | Dlt698Meter | Cjt188Meter] = []
    for group in bus.all_groups:
        for address in group.meters:
            seed = config.seed * 1_000_003 + index * 10_007 + len(out)
            out.append(_meter(group, address, clock, seed))
    return out


def _meter(group: BusConfig, address: str, clock: SimClock, seed: int) -> Dlt645Meter | Dlt698Meter | Cjt188Meter:
    """The simulated meter at ``address`` of ``group``, built by its protocol's ``sim_group``."""
    build = registry.get(group.protocol).simulated_group_meter()
    if build is None:
        raise UsageError(f"{group.protocol} meters are not simulated in groups")
    meter: Dlt645Meter | Dlt698Meter | Cjt188Meter = build(group, address, clock, seed)
    return meter


# The registry's ``sim_group`` builders: one simulated meter of a [[bus]] or [[bus.group]] table.


def dlt698_meter(group: BusConfig, address: str, clock: SimClock, seed: int) -> Dlt698Meter:
    return Dlt698Meter(
        address,
        clock=clock,
        seed=seed,
        preamble=4 if group.preamble is None else group.preamble,
        turnaround=group.turnaround,
        tariffs=group.tariffs,
        drift_ppm=group.drift_ppm,
        requires_connect=group.requires_connect,
        requires_security=group.requires_security,
        accept_plaintext_control=group.accept_plaintext_control,
        report=group.report,
        login=group.login,
        heartbeat=group.heartbeat or None,
        security_key=group.security_key or DEFAULT_KEY,
        purse=group.purse,
        price=group.price,
        trip_at_zero_credit=group.trip_at_zero_credit,
    )


def cjt188_meter(group: BusConfig, address: str, clock: SimClock, seed: int) -> Cjt188Meter:
    return Cjt188Meter(
        address,
        group.meter_type,
        clock=clock,
        seed=seed,
        preamble=2 if group.preamble is None else group.preamble,
        turnaround=group.turnaround,
        drift_ppm=group.drift_ppm,
        di_order=group.di_order,
        wake_preamble=group.wake_preamble,
        valve_time=group.valve_time,
        battery_low=group.battery_low,
        battery_days=group.battery_days,
    )


def dlt645_meter(group: BusConfig, address: str, clock: SimClock, seed: int) -> Dlt645Meter:
    return Dlt645Meter(
        address,
        Edition.parse(group.protocol),
        clock=clock,
        seed=seed,
        preamble=4 if group.preamble is None else group.preamble,
        turnaround=group.turnaround,
        tariffs=group.tariffs,
        drift_ppm=group.drift_ppm,
        purse=group.purse,
        price=group.price,
        trip_at_zero_credit=group.trip_at_zero_credit,
    )


async def _start(config: SimConfig) -> _Running:
    clock = SimClock(config.start, config.speed, tz=config.zone())
    running = _Running()
    try:
        for index, bus_config in enumerate(config.buses):
            if bus_config.is_modbus:
                running.modbus.append((bus_config, await _start_modbus(config, bus_config)))
                continue
            meters = build_meters(config, bus_config, clock, index)
            _register(running, meters)
            link = LinkConfig(
                kind="pty" if bus_config.kind == "pty" else "tcp",
                host=bus_config.host,
                port=bus_config.port,
                baud=bus_config.baud,
                bits_per_char=bus_config.bits_per_char,
            )
            bus = SimulatedBus(meters, link, bus_config.faults)
            await bus.start()
            running.dlt_buses.append((bus_config, bus))
    except BaseException:
        await running.stop()
        raise
    return running


def _register(running: _Running, meters: list[Dlt645Meter | Dlt698Meter | Cjt188Meter]) -> None:
    for meter in meters:
        if meter.address_text in running.meters:
            raise UsageError(f"meter {meter.address_text} is configured on two buses")
        running.meters[meter.address_text] = meter


async def _start_modbus(config: SimConfig, bus: BusConfig) -> Any:
    try:
        from meter_gateway.simulators import modbus_meter
    except ImportError as exc:
        raise UsageError(f"the Modbus simulator is not available in this build ({exc})") from None
    transport = MODBUS_FRAMINGS[bus.protocol]
    start = config.start.replace(tzinfo=config.zone()).timestamp() if config.start is not None else None
    clock = modbus_meter.accelerated_clock(config.speed, start=start)
    return await modbus_meter.serve_modbus(
        units=[int(u) for u in bus.meters],
        model=bus.model,
        seed=config.seed,
        clock=clock,
        transport=transport,
        host=bus.host,
        port=bus.port,
    )


def _describe(running: _Running) -> list[str]:
    lines: list[str] = []
    for config, bus in running.dlt_buses:
        endpoint = bus.endpoint
        where = f"{endpoint[0]}:{endpoint[1]}" if isinstance(endpoint, tuple) else endpoint
        baud = f" {config.baud} baud" if config.baud else ""
        lines.extend(
            f"{config.name}: {group.protocol} {config.kind} {where}{baud}  "
            f"{len(group.meters)} meters: {compact_ranges(group.meters)}"
            for group in config.all_groups
        )
    for config, server in running.modbus:
        host, port = server.address
        lines.append(
            f"{config.name}: {config.protocol} tcp {host}:{port}  "
            f"{len(config.meters)} units: {compact_ranges(config.meters)}"
        )
    return lines


def control_command(running: _Running, line: str) -> str:
    """Execute one control-port command; the reply line (``ok ...`` or ``error ...``)."""
    words = line.split()
    if not words:
        return "error empty command"
    command, args = words[0].lower(), words[1:]
    if command == "help":
        return (
            "ok commands: press ADDRESS | status ADDRESS | valve ADDRESS open|close | topup ADDRESS AMOUNT"
            " | fault BUS KNOB VALUE"
        )
    if command in {"press", "status", "valve"}:
        if len(args) != (2 if command == "valve" else 1):
            return f"error usage: {command} ADDRESS{' open|close' if command == 'valve' else ''}"
        meter = running.meters.get(args[0])
        if meter is None:
            return f"error no simulated meter {args[0]}"
        return _meter_command(meter, command, args[1:])
    if command == "topup":
        return _top_up(running, args)
    if command == "fault":
        if len(args) != 3:
            return "error usage: fault BUS KNOB VALUE"
        return _set_fault(running, *args)
    return f"error unknown command {command!r} (try help)"


def _meter_command(meter: Dlt645Meter | Dlt698Meter | Cjt188Meter, command: str, args: list[str]) -> str:
    when = meter.meter_time().replace(microsecond=0).isoformat()
    if isinstance(meter, Cjt188Meter):
        if command == "press":
            return "error a CJ/T 188 meter has no button"
        if command == "valve":
            if args[0] not in ("open", "close"):
                return "error usage: valve ADDRESS open|close"
            meter.command_valve(args[0] == "open")
        status = meter.status()
        return (
            f"ok valve={status.valve} battery_low={status.battery_low} stuck={meter.stuck_valve} "
            f"st={status} time={when}"
        )
    if command == "valve":
        return "error only CJ/T 188 meters have a valve"
    if command == "press":
        closed = meter.press_button()
        return "ok relay closed" if closed else "ok not armed: relay unchanged"
    word3 = meter.status_word3 if isinstance(meter, Dlt645Meter) else meter.status_word(3)
    return (
        f"ok relay={'closed' if meter.relay_closed else 'open'} armed={meter.relay_armed} "
        f"keep_power={meter.keep_power} stuck={meter.stuck_relay} word3={word3:04X} time={when}"
    )


def _top_up(running: _Running, args: list[str]) -> str:
    if len(args) != 2:
        return "error usage: topup ADDRESS AMOUNT"
    meter = running.meters.get(args[0])
    if meter is None:
        return f"error no simulated meter {args[0]}"
    if isinstance(meter, Cjt188Meter):
        return "error a CJ/T 188 meter is topped up with its own purchase frame"
    try:
        amount = float(args[1])
    except ValueError:
        return f"error topup needs an amount, got {args[1]!r}"
    try:
        meter.top_up(amount)
    except ValueError as exc:
        return f"error {exc}"
    relay = "closed" if meter.relay_closed else "armed" if meter.relay_armed else "open"
    return f"ok topped up {amount:.2f}: relay {relay}"


def _set_fault(running: _Running, which: str, knob: str, value: str) -> str:
    faults: Faults | None = None
    for i, (cfg, bus) in enumerate(running.dlt_buses, 1):
        if which in {str(i), cfg.name}:
            faults = bus.faults
        elif which in cfg.all_meters:  # a meter address: its own override, starting from the bus's faults
            faults = bus.faults.per_meter.get(which)
            if faults is None:
                faults = bus.faults.per_meter[which] = dataclasses.replace(bus.faults, per_meter={})
    if faults is None:
        return f"error no simulated bus or meter {which!r}"
    if knob not in Faults.__dataclass_fields__ or knob in {"per_meter", "seed", "rng"}:
        return f"error unknown fault {knob!r}"
    old = getattr(faults, knob)
    try:
        new: object = value.lower() in {"1", "true", "yes", "on"} if isinstance(old, bool) else float(value)
    except ValueError:
        return f"error {knob} needs a number, got {value!r}"
    setattr(faults, knob, new)
    try:
        faults.validate()
    except ValueError as exc:
        setattr(faults, knob, old)
        return f"error {exc}"
    kind = "probability" if knob in PROBABILITIES else "value"
    return f"ok {knob} {kind} = {new}"


async def _control_server(running: _Running, port: int) -> asyncio.Server:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                writer.write((control_command(running, line.decode("utf-8", "replace")) + "\n").encode())
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", port)


async def _serve(config: SimConfig) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        running = await _start(config)
    except UsageError as exc:
        print(f"meter-gateway simulate: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"meter-gateway simulate: cannot start a bus: {exc}", file=sys.stderr)
        return 1
    control: asyncio.Server | None = None
    try:
        if config.control_port is not None:
            control = await _control_server(running, config.control_port)
            cport = control.sockets[0].getsockname()[1]
            commands = (
                "press ADDRESS | status ADDRESS | valve ADDRESS open|close | topup ADDRESS AMOUNT"
                " | fault BUS KNOB VALUE"
            )
            print(f"control: 127.0.0.1:{cport} ({commands})")
        for line in _describe(running):
            print(line)
        print("ready", flush=True)
        await stop.wait()
    except OSError as exc:
        print(f"meter-gateway simulate: cannot open the control port: {exc}", file=sys.stderr)
        return 1
    finally:
        if control is not None:
            control.close()
            with contextlib.suppress(Exception):
                await control.wait_closed()
        await running.stop()
    print("stopped", flush=True)
    return 0


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.config:
            config = load_config(args.config)
        else:
            config = quick_config(
                meters=args.meters,
                buses=args.buses,
                port=args.port,
                protocol=args.protocol,
                pty=args.pty,
                host=args.host,
                speed=args.speed,
                seed=args.seed,
                baud=args.baud,
                meter_type=args.meter_type,
            )
        if args.timezone is not None:
            zone_of(args.timezone)
            config.timezone = args.timezone
    except SimConfigError as exc:
        print(f"meter-gateway simulate: {exc}", file=sys.stderr)
        return 2
    if args.control_port is not None:
        config.control_port = args.control_port
    return asyncio.run(_serve(config))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""`meter-gateway demo`: the whole chain on embedded defaults, without hardware.

Loads the packaged ``config/demo.toml`` (or ``-c FILE``), starts a simulated meter for every meter
it lists (DL/T 645-2007 and -1997 meters on simulated RS-485 lines reached over TCP, Modbus TCP
meters), a local MQTT broker
(mosquitto on a free loopback port; the product ships no broker), and the gateway itself; then
subscribes to the gateway's readings like a head-end would and prints them as they arrive at the
broker, with their quality flags. Ports are picked free at start, so it runs beside anything.
The simulated meters keep the time of the config's ``gateway.timezone``, not the host's, and
their buttons are on a loopback text port (``press ADDRESS``; README "Simulated meters").
Stop with Ctrl-C, or give ``--duration``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.resources
import logging
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import msgspec

from meter_gateway.config import resource
from meter_gateway.drivers import registry
from meter_gateway.drivers.meter_models import load_model
from meter_gateway.drivers.reading import Quality
from meter_gateway.gateway.cli.local_broker import BrokerUnavailable, LocalBroker
from meter_gateway.gateway.config import BusConfig, Config, ConfigError, Meter, TcpBus, load_config
from meter_gateway.gateway.daemon.app import Gateway
from meter_gateway.gateway.uplink.contract import ReadingsBatch, Topics
from meter_gateway.gateway.uplink.headend_client import ReadingsWatcher
from meter_gateway.simulators.clock import SimClock
from meter_gateway.simulators.dlt645_meter import Dlt645Meter

# Package data, so the demo runs from an installed wheel in any directory, not only from a checkout.
DEMO_CONFIG_FILE = "demo.toml"


class _Buttons:
    """The demo's meter buttons on a loopback text port, one command a line:
    ``press ADDRESS`` (closes a relay a close permit armed) or ``status ADDRESS``."""

    def __init__(self, meters: dict[str, Dlt645Meter]) -> None:
        self.meters = meters
        self.server: asyncio.Server | None = None

    def answer(self, line: str) -> str:
        words = line.split()
        if len(words) != 2 or words[0] not in ("press", "status"):
            return "error usage: press ADDRESS | status ADDRESS"
        meter = self.meters.get(words[1])
        if meter is None:
            return f"error no simulated DL/T 645 meter {words[1]}"
        if words[0] == "press":
            return "ok relay closed" if meter.press_button() else "ok not armed: relay unchanged"
        relay = "closed" if meter.relay_closed else "armed" if meter.relay_armed else "open"
        return f"ok relay={relay} time={meter.meter_time().replace(microsecond=0).isoformat()}"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                writer.write((self.answer(line.decode("utf-8", "replace")) + "\n").encode())
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def start_simulators(config: Config) -> tuple[list[object], Config]:
    """A simulator for every bus and meter of ``config``; returns them and the config re-pointed
    at the ports they got."""
    from meter_gateway.simulators.links import LinkConfig, SimulatedBus
    from meter_gateway.simulators.modbus_meter import serve_modbus

    running: list[object] = []
    buses: list[BusConfig] = []
    dlt645: dict[str, Dlt645Meter] = {}
    # the meters keep the time of the zone the config puts them in, whatever this host's zone is:
    # on a UTC host, Shanghai meters on host time would be 8 h off and every reading clock-suspect
    clock = SimClock(tz=config.gateway.zone())
    seeds = {m.id: i for i, m in enumerate(config.meters)}  # every simulated meter its own load
    for bus in config.buses:
        meters = [m for m in config.meters if m.bus == bus.name]
        if not isinstance(bus, TcpBus):
            buses.append(bus)
            continue
        if bus.protocol in registry.BYTE_BUSES:
            sims = [_simulated(m, clock, seeds[m.id]) for m in meters]
            sim_bus = SimulatedBus(sims, LinkConfig(kind="tcp", host="127.0.0.1", port=0))
            await sim_bus.start()
            running.append(sim_bus)
            dlt645.update((sim.address_text, sim) for sim in sims if isinstance(sim, Dlt645Meter))
            port = int(sim_bus.endpoint[1])
        else:
            transport = "tcp" if bus.protocol == "modbus-tcp" else "rtu-over-tcp"
            model = meters[0].model if meters else "sim-3ph"
            server = await serve_modbus(
                units=[m.unit_id for m in meters],
                model=model,
                seed=100 + min((seeds[m.id] for m in meters), default=0),
                transport=transport,
                host="127.0.0.1",
                port=0,
            )
            running.append(server)
            port = int(server.address[1])
        buses.append(msgspec.structs.replace(bus, host="127.0.0.1", port=port))
    if dlt645:
        buttons = _Buttons(dlt645)
        button_port = await buttons.start()
        running.append(buttons)
        print(f"demo: meter buttons: printf 'press ADDRESS\\n' | nc 127.0.0.1 {button_port}", flush=True)
    return running, msgspec.structs.replace(config, buses=buses)


def _simulated(meter: Meter, clock: SimClock, seed: int) -> Any:
    """The simulated meter for a configured one, built by its protocol's simulator (the registry)."""
    build = registry.get(meter.protocol).simulated_meter()
    if build is None:
        raise ConfigError([f"meters: {meter.id}: {meter.protocol} meters cannot be simulated on a byte-stream bus"])
    return build(meter.address, meter.protocol, load_model(meter.model), clock=clock, seed=seed)


def _flags(q: int) -> str:
    """A reading's quality flags as shown beside it (nothing for a good reading)."""
    names = [flag.name.lower() for flag in Quality if flag.value and q & flag.value and flag.name]
    return f"  [{', '.join(names)}]" if names else ""


def _printer(started: float) -> tuple[dict[str, int], object, object]:
    seen: dict[str, int] = {"batches": 0, "readings": 0, "clock_suspect": 0}
    ids: set[str] = set()
    lock = threading.Lock()

    def on_batch(batch: ReadingsBatch) -> None:
        with lock:
            seen["batches"] += 1
            for r in batch.readings:
                seen["readings"] += 1
                ids.add(r.id)
                if r.q & Quality.CLOCK_SUSPECT:
                    seen["clock_suspect"] += 1
                value = f"{r.value:.2f}" if isinstance(r.value, float) else str(r.value)
                line = f"{time.time() - started:7.1f}s  {r.meter:<9} {r.qty:<28} {value:>10} {r.unit}{_flags(r.q)}"
                print(line, flush=True)
            seen["distinct"] = len(ids)

    def on_state(meter: str, state: str) -> None:
        print(f"{time.time() - started:7.1f}s  {meter:<9} is {state}", flush=True)

    return seen, on_batch, on_state


async def run_demo(config_path: Path, duration: float | None) -> int:
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print("\n".join(exc.messages), file=sys.stderr)
        return 78
    sims, config = await start_simulators(config)
    state = tempfile.TemporaryDirectory(prefix="meter-gateway-demo-")
    try:
        with LocalBroker() as broker:
            config = msgspec.structs.replace(
                config,
                uplink=msgspec.structs.replace(config.uplink, host=broker.host, port=broker.port),
                gateway=msgspec.structs.replace(config.gateway, state_dir=state.name),
                outbox=msgspec.structs.replace(config.outbox, path=None),
            )
            started = time.time()
            seen, on_batch, on_state = _printer(started)
            topics = Topics(config.gateway.id, config.uplink.topic_prefix)
            watcher = ReadingsWatcher(broker.host, broker.port, topics, on_batch, on_state).start()  # type: ignore[arg-type]
            print(f"demo: MQTT broker: {broker.description}", flush=True)
            print(
                f"demo: {len(config.meters)} simulated meters on {len(config.buses)} buses; {broker.kind} broker on "
                f"{broker.host}:{broker.port}; readings on {topics.readings}; Ctrl-C to stop",
                flush=True,
            )
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            if duration is not None:
                loop.call_later(duration, stop.set)
            gateway = Gateway(config, shutdown_budget=5.0)
            try:
                await gateway.run(stop)
            finally:
                await asyncio.sleep(0.5)
                watcher.stop()
            clocks = gateway.time_sync.stats.measured if gateway.time_sync is not None else 0
            print(
                f"demo: {seen['readings']} readings in {seen['batches']} batches reached the broker "
                f"({seen.get('distinct', 0)} distinct ids, {seen['clock_suspect']} clock-suspect); "
                f"meter clocks read {clocks}; gateway committed {gateway.stats.committed}, "
                f"read failures {gateway.stats.failures or 'none'}",
                flush=True,
            )
            return 0 if seen["readings"] else 1
    except BrokerUnavailable as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 69  # EX_UNAVAILABLE: the demo needs a service this machine does not have
    finally:
        for sim in sims:
            with contextlib.suppress(Exception):
                await sim.stop()  # type: ignore[attr-defined]
        state.cleanup()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="meter-gateway demo", description=__doc__)
    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        default=None,
        help="gateway config (default: the demo's, `meter-gateway example-config demo`)",
    )
    parser.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the gateway's log lines")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if args.config is not None:
        return asyncio.run(run_demo(args.config, args.duration))
    with importlib.resources.as_file(resource(DEMO_CONFIG_FILE)) as config:
        return asyncio.run(run_demo(config, args.duration))

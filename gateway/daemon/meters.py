"""Build buses and meter drivers from the config: the one place that maps config to drivers.

:class:`Fleet` holds what was built (buses and their meters) and applies a reloaded config
by rebuilding only what changed: an untouched bus keeps its ``Bus`` (queue, counters, meter
health) and its link, so a SIGHUP that adds one meter does not drop every connection.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from meter_gateway.drivers import registry
from meter_gateway.drivers.backoff import BackoffPolicy
from meter_gateway.drivers.bus import Bus, BusSettings
from meter_gateway.drivers.context import Credentials, DriverContext
from meter_gateway.drivers.health import HealthBook
from meter_gateway.drivers.meter_models import load_model
from meter_gateway.drivers.reading import Reading
from meter_gateway.drivers.transport import Rs485Settings, SerialSettings, TcpSettings, make_transport
from meter_gateway.gateway.config import BusConfig, Config, ConfigDiff, Meter, SerialBus, TcpBus

if TYPE_CHECKING:
    from meter_gateway.drivers.cjt188_driver import Cjt188Driver
    from meter_gateway.drivers.dlt645_driver import Dlt645Driver
    from meter_gateway.drivers.modbus import ModbusMeter

    Driver = Dlt645Driver | ModbusMeter | Cjt188Driver

log = logging.getLogger("meter_gateway")

ReadFn = Callable[[Sequence[str], float, float], Awaitable[list[Reading]]]
# (meter id, protocol) -> the callback a driver calls with what its meter sent unasked
EventListener = Callable[[str, str], Callable[[Any], None]]


@dataclass(frozen=True, slots=True)
class MeterRuntime:
    """A configured meter as the daemon drives it: its bus, how to read it, and its driver (built
    by its protocol's builder, see :mod:`drivers.registry`) for everything beyond polling
    (commands, frozen data, time sync)."""

    meter_id: str
    bus: str
    protocol: str
    driver: Driver

    async def read(self, quantities: Sequence[str], slot: float, now: float) -> list[Reading]:
        """Read ``quantities`` for the slot starting at ``slot`` (a :data:`ReadFn`). A method, not
        a stored callable, so 10,000 meters do not each carry a reader object."""
        readings: list[Reading] = await self.driver.read(quantities, slot=slot, now=now)
        return readings


def link_settings(bus: BusConfig) -> SerialSettings | TcpSettings:
    if isinstance(bus, SerialBus):
        return SerialSettings(
            port=bus.port,
            baudrate=bus.baud_rate,
            bytesize=bus.data_bits,
            parity=bus.parity,
            stopbits=bus.stop_bits,
            rs485=Rs485Settings() if bus.rs485 else None,
        )
    assert isinstance(bus, TcpBus)
    return TcpSettings(
        host=bus.host,
        port=bus.port,
        connect_timeout=float(bus.connect_timeout),
        reconnect=BackoffPolicy(0.5, 30.0),
    )


def build_bus(bus: BusConfig, health: HealthBook, *, link: SerialSettings | TcpSettings | None = None) -> Bus:
    """The bus on one of our transports (``link``, default: from the config), whatever its
    protocol; a Modbus bus also gets its Modbus framing (:func:`drivers.modbus.attach`)."""
    settings = BusSettings(
        reply_timeout=float(bus.reply_timeout),
        attempts=bus.attempts,
        inter_frame_gap=bus.frame_gap(),
        trace=bus.trace,
    )
    transport = make_transport(link or link_settings(bus), name=bus.name)
    built = Bus(bus.name, transport, settings=settings, health=health)
    if bus.protocol in registry.MODBUS_BUSES:
        from meter_gateway.drivers.modbus import attach  # pymodbus only where Modbus is configured

        attach(built, "tcp" if bus.protocol == "modbus-tcp" else "rtu")
    return built


def build_buses(config: Config, health: HealthBook) -> dict[str, Bus]:
    return {bus.name: build_bus(bus, health) for bus in config.buses}


def driver_context(config: Config, meter: Meter, bus: Bus, events: EventListener | None = None) -> DriverContext:
    """What the meter's protocol builder is given (drivers never read the config themselves);
    ``events`` is where what the meter sends unasked goes."""
    creds = meter.credentials
    credentials = None
    if creds is not None:
        password = creds.password.reveal() if creds.password is not None else None
        credentials = Credentials(password=password, level=creds.password_level, operator=creds.operator)
    options = meter.protocol_options()
    if registry.get(meter.protocol).bus_preamble and options.get("preamble") is None:
        # buses[].preamble, with its per-type default, unless the meter sets its own
        options["preamble"] = next(b for b in config.buses if b.name == meter.bus).dlt645_preamble()
    return DriverContext(
        meter_id=meter.id,
        protocol=meter.protocol,
        address=meter.address,
        bus=bus,
        model=load_model(meter.model),
        tz=config.gateway.zone(),
        credentials=credentials,
        options=options,
        events=events,
    )


def build_driver(config: Config, meter: Meter, bus: Bus, events: EventListener | None = None) -> Driver:
    """The meter's driver, built by its protocol's builder named in the registry."""
    driver: Driver = registry.get(meter.protocol).build_driver()(driver_context(config, meter, bus, events))
    return driver


class Fleet:
    """The buses and meters built from one config."""

    def __init__(self, health: HealthBook, on_event: EventListener | None = None) -> None:
        self.health = health
        self.on_event = on_event  # given to every driver; those whose meters send unasked frames use it
        self.buses: dict[str, Bus] = {}
        self.meters: dict[str, MeterRuntime] = {}

    def build(self, config: Config) -> None:
        self.buses = build_buses(config, self.health)
        for meter in config.meters:
            self.meters[meter.id] = self._meter(config, meter)

    async def open(self) -> None:
        for bus in self.buses.values():
            await bus.open()

    async def close(self) -> None:
        for name in list(self.buses):
            await self._close_bus(name)

    async def apply(self, old: Config, new: Config, changes: ConfigDiff) -> tuple[set[str], set[str]]:
        """Rebuild what ``changes`` touches; returns (buses rebuilt, meters rebuilt or removed)."""
        buses = set(changes.buses.touched)
        meters = set(changes.meters_to_restart(new)) | {m.id for m in old.meters if m.bus in buses}
        for name in buses:
            await self._close_bus(name)
        for meter_id in meters:
            dropped = self.meters.pop(meter_id, None)
            if dropped is not None:
                _detach(dropped.driver)
        for bus in new.buses:
            if bus.name in buses:
                self.buses[bus.name] = build_bus(bus, self.health)
                await self.buses[bus.name].open()
        for meter in new.meters:
            if meter.id in meters:
                self.meters[meter.id] = self._meter(new, meter)
        for meter_id in meters - {m.id for m in new.meters}:
            self.health.forget(meter_id)
        return buses, meters

    def _meter(self, config: Config, meter: Meter) -> MeterRuntime:
        # the listener, not a callback made for each meter: a driver asks it when an event arrives
        driver = build_driver(config, meter, self.buses[meter.bus], self.on_event)
        return MeterRuntime(meter.id, meter.bus, meter.protocol, driver)

    async def _close_bus(self, name: str) -> None:
        bus = self.buses.pop(name, None)
        if bus is None:
            return
        with contextlib.suppress(Exception):  # closing must not stop a shutdown or reload
            await bus.close()


def _detach(driver: object) -> None:
    """A dropped meter's driver that its bus routes unasked frames to (DL/T 698.45's) lets go."""
    detach = getattr(driver, "detach", None)
    if detach is not None:
        detach()


__all__ = ["Fleet", "MeterRuntime", "build_bus", "build_buses", "build_driver", "driver_context", "link_settings"]

"""Build buses and meter drivers from the config: the one place that maps config to drivers.

:class:`Fleet` holds what was built (buses, Modbus links, meters) and applies a reloaded config
by rebuilding only what changed: an untouched bus keeps its ``Bus`` (queue, counters, meter
health) and its link, so a SIGHUP that adds one meter does not drop every connection.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

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


@dataclass(frozen=True, slots=True)
class MeterRuntime:
    """A configured meter as the daemon drives it: its bus, how to read it, and its driver (built
    by its protocol's builder, see :mod:`drivers.registry`) for everything beyond polling
    (commands, frozen data, time sync)."""

    meter_id: str
    bus: str
    protocol: str
    driver: Driver
    # Modbus meters: the bus whose turn a read waits for (their Modbus link does the I/O);
    # byte-stream drivers go through their bus themselves. ``read`` is a method, not a stored
    # callable, so 10,000 meters do not each carry a reader object.
    modbus_bus: Bus | None = None

    async def read(self, quantities: Sequence[str], slot: float, now: float) -> list[Reading]:
        """Read ``quantities`` for the slot starting at ``slot`` (a :data:`ReadFn`)."""
        driver = self.driver
        bus = self.modbus_bus
        if bus is None:
            readings: list[Reading] = await driver.read(quantities, slot=slot, now=now)
            return readings
        return await bus.run(lambda: driver.read(quantities, slot=slot, now=now), meter=self.meter_id)


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


def build_bus(bus: BusConfig, health: HealthBook) -> Bus:
    """Byte-stream buses (DL/T 645, DL/T 698.45, CJ/T 188) get one of our transports; Modbus buses
    get a Modbus link (``Bus.job_link``) and use the Bus for exclusive access and health."""
    settings = BusSettings(
        reply_timeout=float(bus.reply_timeout),
        attempts=bus.attempts,
        inter_frame_gap=bus.frame_gap(),
    )
    byte_stream = bus.protocol in registry.BYTE_BUSES
    transport = make_transport(link_settings(bus), name=bus.name) if byte_stream else None
    built = Bus(bus.name, transport, settings=settings, health=health)
    if not byte_stream:
        from meter_gateway.drivers.modbus import ModbusLink  # pymodbus only where Modbus is configured

        framing = "tcp" if bus.protocol == "modbus-tcp" else "rtu"
        timeout = float(bus.reply_timeout)
        built.job_link = ModbusLink(link_settings(bus), framing=framing, timeout=timeout, name=bus.name)
    return built


def build_buses(config: Config, health: HealthBook) -> dict[str, Bus]:
    return {bus.name: build_bus(bus, health) for bus in config.buses}


def driver_context(config: Config, meter: Meter, bus: Bus) -> DriverContext:
    """What the meter's protocol builder is given (drivers never read the config themselves)."""
    creds = meter.credentials
    credentials = None
    if creds is not None:
        password = creds.password.reveal() if creds.password is not None else None
        credentials = Credentials(password=password, level=creds.password_level, operator=creds.operator)
    return DriverContext(
        meter_id=meter.id,
        protocol=meter.protocol,
        address=meter.address,
        bus=bus,
        model=load_model(meter.model),
        tz=config.gateway.zone(),
        credentials=credentials,
        options=meter.protocol_options(),
    )


def build_driver(config: Config, meter: Meter, bus: Bus) -> Driver:
    """The meter's driver, built by its protocol's builder named in the registry."""
    driver: Driver = registry.get(meter.protocol).build_driver()(driver_context(config, meter, bus))
    return driver


class Fleet:
    """The buses, Modbus links and meters built from one config."""

    def __init__(self, health: HealthBook) -> None:
        self.health = health
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
            self.meters.pop(meter_id, None)
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
        bus = self.buses[meter.bus]
        driver = build_driver(config, meter, bus)
        # a driver whose library does the I/O (Modbus) is read inside the bus's turn
        job_bus = bus if bus.job_link is not None else None
        return MeterRuntime(meter.id, meter.bus, meter.protocol, driver, modbus_bus=job_bus)

    async def _close_bus(self, name: str) -> None:
        bus = self.buses.pop(name, None)
        if bus is None:
            return
        with contextlib.suppress(Exception):  # closing must not stop a shutdown or reload
            await bus.close()
        if bus.job_link is not None:
            from meter_gateway.drivers.modbus import ModbusLink

            if isinstance(bus.job_link, ModbusLink):
                with contextlib.suppress(Exception):
                    await bus.job_link.close()


__all__ = ["Fleet", "MeterRuntime", "build_bus", "build_buses", "build_driver", "driver_context", "link_settings"]

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

from meter_gateway.drivers.backoff import BackoffPolicy
from meter_gateway.drivers.bus import Bus, BusSettings
from meter_gateway.drivers.health import HealthBook
from meter_gateway.drivers.meter_models import Dlt645Model, ModbusModel, load_model
from meter_gateway.drivers.reading import Reading
from meter_gateway.drivers.transport import Rs485Settings, SerialSettings, TcpSettings, make_transport
from meter_gateway.gateway.config import BusConfig, Config, ConfigDiff, Meter, SerialBus, TcpBus
from meter_gateway.protocols.dlt645.edition import Edition

if TYPE_CHECKING:
    from meter_gateway.drivers.dlt645_driver import Dlt645Driver
    from meter_gateway.drivers.modbus import ModbusLink, ModbusMeter

log = logging.getLogger("meter_gateway")

ReadFn = Callable[[Sequence[str], float, float], Awaitable[list[Reading]]]


@dataclass(frozen=True, slots=True)
class MeterRuntime:
    """A configured meter as the daemon drives it: its bus, how to read it, and its driver
    (``Dlt645Driver`` or ``ModbusMeter``) for everything beyond polling (commands, frozen data,
    time sync)."""

    meter_id: str
    bus: str
    protocol: str
    driver: Dlt645Driver | ModbusMeter
    # Modbus meters: the bus whose turn a read waits for (their pymodbus link does the I/O);
    # DL/T 645 drivers go through their bus themselves. ``read`` is a method, not a stored
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
    """Raw-byte buses (DL/T 645) get one of our transports; Modbus buses leave the I/O to their
    pymodbus link and use the Bus only for exclusive access and health."""
    settings = BusSettings(
        reply_timeout=float(bus.reply_timeout),
        attempts=bus.attempts,
        inter_frame_gap=bus.frame_gap(),
    )
    transport = make_transport(link_settings(bus), name=bus.name) if bus.protocol == "dlt645" else None
    return Bus(bus.name, transport, settings=settings, health=health)


def build_buses(config: Config, health: HealthBook) -> dict[str, Bus]:
    return {bus.name: build_bus(bus, health) for bus in config.buses}


def dlt645_driver(config: Config, meter: Meter, bus: Bus, model: Dlt645Model) -> Dlt645Driver:
    from meter_gateway.drivers.dlt645_driver import Dlt645Driver

    creds = meter.credentials
    return Dlt645Driver(
        bus,
        meter.id,
        meter.dlt645_address,
        Edition.parse(meter.protocol),
        model,
        password=creds.password.reveal() if creds is not None and creds.password is not None else None,
        password_level=creds.password_level if creds is not None else 2,
        operator=creds.operator if creds is not None else "00000000",
        tz=config.gateway.zone(),
    )


class Fleet:
    """The buses, Modbus links and meters built from one config."""

    def __init__(self, health: HealthBook) -> None:
        self.health = health
        self.buses: dict[str, Bus] = {}
        self.meters: dict[str, MeterRuntime] = {}
        self._links: dict[str, ModbusLink] = {}

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
        bus_config = config.bus(meter.bus)
        bus = self.buses[meter.bus]
        model = load_model(meter.model)
        if meter.protocol == "modbus":
            from meter_gateway.drivers.modbus import ModbusLink, ModbusMeter  # pymodbus only where Modbus is configured

            assert isinstance(model, ModbusModel)
            link = self._links.get(meter.bus)
            if link is None:
                framing = "tcp" if bus_config.protocol == "modbus-tcp" else "rtu"
                link = self._links[meter.bus] = ModbusLink(
                    link_settings(bus_config), framing=framing, timeout=float(bus_config.reply_timeout), name=meter.bus
                )
                bus.job_link = link  # its requests and bytes in the bus's metrics
            modbus = ModbusMeter(link, model, unit=meter.unit_id, meter_id=meter.id)
            return MeterRuntime(meter.id, meter.bus, meter.protocol, modbus, modbus_bus=bus)
        assert isinstance(model, Dlt645Model)
        driver = dlt645_driver(config, meter, bus, model)
        return MeterRuntime(meter.id, meter.bus, meter.protocol, driver)

    async def _close_bus(self, name: str) -> None:
        bus = self.buses.pop(name, None)
        link = self._links.pop(name, None)
        for closing in (bus, link):
            if closing is not None:
                with contextlib.suppress(Exception):  # closing must not stop a shutdown or reload
                    await closing.close()


__all__ = ["Fleet", "MeterRuntime", "build_bus", "build_buses", "dlt645_driver", "link_settings"]

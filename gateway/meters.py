"""Build buses and meter drivers from the config: the one place that maps config to drivers."""

from __future__ import annotations

from collections.abc import Sequence

from drivers.backoff import BackoffPolicy
from drivers.bus import Bus, BusSettings
from drivers.health import HealthBook
from drivers.meter_models import Dlt645Model, ModbusModel, load_model
from drivers.modbus import ModbusLink, ModbusMeter
from drivers.reading import Reading
from drivers.transport import Rs485Settings, SerialSettings, TcpSettings, make_transport
from gateway.config import BusConfig, Config, Meter, SerialBus, TcpBus
from protocols.dlt645.edition import Edition


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


def build_buses(config: Config, health: HealthBook) -> dict[str, Bus]:
    """One Bus per configured bus. Raw-byte buses (DL/T 645, Modbus RTU over our transports) get a
    transport; Modbus buses own their pymodbus link and use the bus only for exclusive access."""
    buses: dict[str, Bus] = {}
    for bus in config.buses:
        settings = BusSettings(
            reply_timeout=float(bus.reply_timeout),
            attempts=bus.attempts,
            inter_frame_gap=bus.frame_gap(),
        )
        transport = make_transport(link_settings(bus), name=bus.name) if bus.protocol == "dlt645" else None
        buses[bus.name] = Bus(bus.name, transport, settings=settings, health=health)
    return buses


class _ModbusReader:
    """Runs a Modbus meter's reads through its bus, so one transaction at a time per bus."""

    def __init__(self, bus: Bus, meter: ModbusMeter) -> None:
        self.bus = bus
        self.meter = meter

    async def __call__(self, quantities: Sequence[str], slot: float, now: float) -> list[Reading]:
        return await self.bus.run(lambda: self.meter.read(quantities, slot=slot, now=now), meter=self.meter.meter_id)


class _Dlt645Reader:
    def __init__(self, driver: object) -> None:
        self.driver = driver

    async def __call__(self, quantities: Sequence[str], slot: float, now: float) -> list[Reading]:
        readings: list[Reading] = await self.driver.read(quantities, slot=slot, now=now)  # type: ignore[attr-defined]
        return readings


def build_meters(config: Config, buses: dict[str, Bus]) -> dict:  # type: ignore[type-arg]
    from gateway.app import MeterRuntime

    links: dict[str, ModbusLink] = {}
    meters: dict[str, MeterRuntime] = {}
    for meter in config.meters:
        bus_config = config.bus(meter.bus)
        bus = buses[meter.bus]
        model = load_model(meter.model)
        if meter.protocol == "modbus":
            assert isinstance(model, ModbusModel)
            link = links.get(meter.bus)
            if link is None:
                framing = "tcp" if bus_config.protocol == "modbus-tcp" else "rtu"
                link = links[meter.bus] = ModbusLink(
                    link_settings(bus_config), framing=framing, timeout=float(bus_config.reply_timeout), name=meter.bus
                )
            driver = ModbusMeter(link, model, unit=meter.unit_id, meter_id=meter.id)
            meters[meter.id] = MeterRuntime(meter.id, meter.bus, _ModbusReader(bus, driver))
        else:
            assert isinstance(model, Dlt645Model)
            meters[meter.id] = MeterRuntime(
                meter.id, meter.bus, _Dlt645Reader(_dlt645_driver(config, meter, bus, model))
            )
    return meters


def _dlt645_driver(config: Config, meter: Meter, bus: Bus, model: Dlt645Model) -> object:
    from drivers.dlt645_driver import Dlt645Driver

    edition = Edition.parse(meter.protocol)
    creds = meter.credentials
    return Dlt645Driver(
        bus,
        meter.id,
        meter.dlt645_address,
        edition,
        model,
        password=creds.password.reveal() if creds is not None and creds.password is not None else None,
        operator=creds.operator if creds is not None else None,
        tz=config.gateway.zone(),
    )

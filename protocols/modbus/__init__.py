"""Pure Modbus helpers: register value codec. No pymodbus, sockets, asyncio or clocks here."""

from meter_gateway.protocols.modbus.values import (
    BYTE_ORDERS,
    DATA_TYPES,
    LocalValueError,
    ModbusValueError,
    RemoteValueError,
    ValueCodec,
)

__all__ = [
    "BYTE_ORDERS",
    "DATA_TYPES",
    "LocalValueError",
    "ModbusValueError",
    "RemoteValueError",
    "ValueCodec",
]

"""Pure protocol code: bytes in, frames/events out. No asyncio, sockets, serial ports or clocks."""

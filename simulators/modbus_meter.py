"""Simulated Modbus meters, driven by the shared load model, framed by pymodbus.

A :class:`SimulatedMeter` is one unit id: a meter model file (``sim-3ph`` by default, any Modbus
model works) whose registers are encoded, at request time, from a
:class:`~simulators.load.LoadModel` advanced to the server clock. Several meters on one
:class:`ModbusSimServer` are several meters on one bus (RS-485 multidrop, or a TCP gateway);
requests for a unit id nobody has (or a meter set ``silent``) get no answer at all, as on a real
bus.

Transports: Modbus TCP, RTU framing over TCP (a transparent serial server), RTU on a serial port
(any path pyserial opens: a USB adapter, or a pseudo-terminal for tests and demos).

What a read sees, per model: registers of points and of the relay read-back; registers between
them within the model's ``max_gap`` read as 0; anything else is exception 02 (illegal data
address), and so is writing anywhere but the relay. A read longer than the model's
``max_registers_per_read`` is exception 03 (illegal data value), as meters with a smaller limit
than the protocol's 125 do. Writing the relay coil or register opens/closes the simulated relay.

The server is ours (asyncio for TCP, pyserial-asyncio-fast for serial ports); pymodbus' public
framers (``FramerSocket``, ``FramerRTU``) and PDU classes only cut requests out of the byte stream
and encode the replies. pymodbus 3.16's own server reads registers through its datastore, which
cannot compute a register at request time, answer one unit and ignore another that is switched
silent while running, or tell a bit read's length to a hook (the ``SimDevice`` action gets the
number of 16-bit words); running the dispatch ourselves needs none of that.

Nothing here prints; the ``simulate`` CLI owns the terminal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

import serial_asyncio_fast
from pymodbus.constants import ExcCodes
from pymodbus.framer import FramerBase, FramerRTU, FramerSocket
from pymodbus.pdu import DecodePDU, ExceptionResponse, ModbusPDU
from pymodbus.pdu.bit_message import ReadCoilsResponse, ReadDiscreteInputsResponse, WriteSingleCoilResponse
from pymodbus.pdu.register_message import (
    ReadHoldingRegistersResponse,
    ReadInputRegistersResponse,
    WriteMultipleRegistersResponse,
    WriteSingleRegisterResponse,
)

from meter_gateway.drivers.meter_models import ModbusModel, ModbusPoint, load_model
from meter_gateway.protocols.modbus.values import ModbusValueError
from meter_gateway.simulators.load import LoadModel, LoadSettings

__all__ = [
    "TRANSPORTS",
    "ModbusSimServer",
    "SimulatedMeter",
    "accelerated_clock",
    "serve_modbus",
]

Clock = Callable[[], float]
TRANSPORTS: Final = ("tcp", "rtu-over-tcp", "serial")

ILLEGAL_ADDRESS: Final = 0x02
ILLEGAL_VALUE: Final = 0x03
DEVICE_FAILURE: Final = 0x04

# which table a function code addresses (writes read back through the same table)
_TABLE: Final = {1: 1, 5: 1, 15: 1, 2: 2, 3: 3, 6: 3, 16: 3, 4: 4}
_READ_REPLY: Final[dict[int, type[ModbusPDU]]] = {
    1: ReadCoilsResponse,
    2: ReadDiscreteInputsResponse,
    3: ReadHoldingRegistersResponse,
    4: ReadInputRegistersResponse,
}
# Modbus Application Protocol V1.1b3 §6.1-6.4: quantities a read may ask for; more is exception 03
_READ_LIMIT: Final = {1: 2000, 2: 2000, 3: 125, 4: 125}
_RX_CAP: Final = 512  # bytes kept while a request is incomplete: more is line noise

log = logging.getLogger(__name__)


def accelerated_clock(speed: float, *, start: float | None = None, base: Clock = time.time) -> Clock:
    """A clock running ``speed`` times faster than ``base`` from ``start`` (default: now), so a
    demo's energy registers visibly move."""
    origin = base()
    first = origin if start is None else start
    return lambda: first + (base() - origin) * speed


class SimulatedMeter:
    """One simulated meter (unit id): a Modbus model's register image over a load model."""

    def __init__(
        self,
        model: ModbusModel | str = "sim-3ph",
        *,
        load: LoadModel | None = None,
        settings: LoadSettings | None = None,
        start: float | None = None,
    ) -> None:
        loaded = load_model(model) if isinstance(model, str) else model
        if not isinstance(loaded, ModbusModel):
            raise TypeError(f"{model!r} is not a Modbus meter model")
        if load is None:
            if start is None:
                raise ValueError("a simulated meter needs a load model or a start time")
            load = LoadModel(settings, start=start)
        self.model = loaded
        self.load = load
        self.silent = False  # answer nothing, like a meter with a cut bus wire
        self.overrides: dict[str, float] = {}  # quantity -> value to serve instead (NaN: a faulty meter)
        self.requests = 0
        self._readable: dict[int, dict[int, tuple[ModbusPoint | None, int]]] = {1: {}, 2: {}, 3: {}, 4: {}}
        self._index()
        # point -> the value last encoded for it and its registers (instantaneous values hold for
        # a measurement cycle, so most reads find their registers here)
        self._encoded: dict[ModbusPoint, tuple[float, list[int]]] = {}

    # -- what the pymodbus adapter calls --------------------------------------------------------

    def read(self, function: int, address: int, count: int, now: float) -> list[int] | list[bool] | int:
        """Registers or bits, or an exception code."""
        table = _TABLE[function]
        limit = self.model.max_bits_per_read if table in (1, 2) else self.model.max_registers_per_read
        if count > limit:
            return ILLEGAL_VALUE
        image = self._readable[table]
        cells = [image.get(a) for a in range(address, address + count)]
        if any(c is None for c in cells):
            return ILLEGAL_ADDRESS
        self.requests += 1
        value_of = self._value_of(now)
        encoded = self._encoded
        out: list[Any] = []
        for cell in cells:
            assert cell is not None
            point, offset = cell
            if point is None:  # a gap register, or the relay read-back
                out.append(self._relay_raw(table) if offset < 0 else 0)
                continue
            if point.codec is None:
                out.append(bool(value_of(point.quantity)))
                continue
            value = value_of(point.quantity)
            known = encoded.get(point)
            if known is None or known[0] != value:
                try:
                    known = encoded[point] = (value, point.codec.encode(value))
                except ModbusValueError:
                    return DEVICE_FAILURE  # a value this register cannot hold
            out.append(known[1][offset])
        return out

    def write(self, function: int, address: int, values: list[int] | list[bool], now: float) -> int | None:
        """Apply a write; None, or an exception code."""
        relay = self.model.relay
        table = _TABLE[function]
        if relay is None or relay.write.function != table or address != relay.write.address or len(values) != 1:
            return ILLEGAL_ADDRESS
        raw = int(values[0])
        if raw not in (relay.write.closed, relay.write.open):
            return ILLEGAL_VALUE
        self.requests += 1
        self.load.set_relay(raw == relay.write.closed, at=now)
        return None

    # -- internals ----------------------------------------------------------------------------

    def _value_of(self, now: float) -> Callable[[str], float]:
        """The function giving a quantity's value at ``now`` (an override first)."""
        self.load.advance(now)
        if not self.overrides:
            return self.load.value
        overrides, value = self.overrides, self.load.value
        return lambda quantity: overrides[quantity] if quantity in overrides else value(quantity)

    def _relay_raw(self, table: int) -> int | bool:
        relay = self.model.relay
        assert relay is not None
        raw = relay.read.closed if self.load.relay_closed else relay.read.open
        return bool(raw) if table in (1, 2) else raw

    def _index(self) -> None:
        by_table: dict[int, list[ModbusPoint]] = {}
        for p in self.model.points:
            by_table.setdefault(p.function, []).append(p)
        for table, points in by_table.items():
            image = self._readable[table]
            points.sort(key=lambda p: p.address)
            prev_end: int | None = None
            for p in points:
                if prev_end is not None and 0 < p.address - prev_end <= self.model.max_gap:
                    for a in range(prev_end, p.address):
                        image.setdefault(a, (None, 0))
                for offset in range(p.count):
                    image[p.address + offset] = (p, offset)
                prev_end = p.end if prev_end is None else max(prev_end, p.end)
        relay = self.model.relay
        if relay is not None:
            self._readable[relay.read.function][relay.read.address] = (None, -1)
            # writing the relay reads it back (FC 05/06 echo): make sure that read is legal
            self._readable[relay.write.function].setdefault(relay.write.address, (None, -1))


def answer(
    meters: Mapping[int, SimulatedMeter], request: ModbusPDU | None, function: int, now: float
) -> ModbusPDU | None:
    """The reply to one decoded request (None: stay silent, as an absent or silent meter does).

    ``request`` is None when pymodbus could not decode the PDU of ``function`` (a read asking for
    more than the protocol allows fails its decode): exception 03, or 01 for a function we do not
    serve."""
    if request is None:
        code = ExcCodes.ILLEGAL_VALUE if function in _TABLE else ExcCodes.ILLEGAL_FUNCTION
        return ExceptionResponse(function, code)
    meter = meters.get(request.dev_id)
    if meter is None or meter.silent:
        return None
    fc = request.function_code
    if fc in _READ_REPLY:
        if not 1 <= request.count <= _READ_LIMIT[fc]:
            return ExceptionResponse(fc, ExcCodes.ILLEGAL_VALUE)
        values = meter.read(fc, request.address, request.count, now)
        if isinstance(values, int):
            return ExceptionResponse(fc, values)
        if fc in (1, 2):
            return _READ_REPLY[fc](bits=[bool(v) for v in values])
        return _READ_REPLY[fc](registers=[int(v) for v in values])
    if fc in (5, 6, 15, 16):
        bits = [bool(b) for b in request.bits]
        registers = [int(r) for r in request.registers]
        error = meter.write(fc, request.address, bits if fc in (5, 15) else registers, now)
        if error is not None:
            return ExceptionResponse(fc, error)
        if fc == 5:
            return WriteSingleCoilResponse(address=request.address, bits=bits)
        if fc == 6:
            return WriteSingleRegisterResponse(address=request.address, registers=registers)
        if fc == 16:
            return WriteMultipleRegistersResponse(address=request.address, count=len(registers))
        # FC 15 (write multiple coils): our meters have one relay coil and take FC 05 only
        return ExceptionResponse(fc, ExcCodes.ILLEGAL_FUNCTION)
    return ExceptionResponse(fc, ExcCodes.ILLEGAL_FUNCTION)


class _BusPort(asyncio.Protocol):
    """One connection (or the serial port): cuts requests out of the stream, answers them."""

    def __init__(self, server: ModbusSimServer, framer: FramerBase) -> None:
        self.server = server
        self.framer = framer
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data
        while buffer:
            used, unit, tid, pdu = self.framer.decode(buffer)
            if not used:
                break
            buffer = buffer[used:]
            if pdu:  # an empty PDU is what the framer makes of a frame with a bad CRC: dropped
                self.request(unit, tid, pdu)
        self.buffer = buffer[-_RX_CAP:]

    def request(self, unit: int, tid: int, pdu: bytes) -> None:
        decoded = self.framer.decoder.decode(pdu)
        if decoded is not None:
            decoded.dev_id = unit
        if unit not in self.server.meters:  # another meter's request on a shared bus: not ours
            return
        reply = answer(self.server.meters, decoded, pdu[0] & 0x7F, self.server.clock())
        if reply is None or self.transport is None:
            return
        reply.dev_id = unit
        reply.transaction_id = tid
        self.transport.write(self.framer.buildFrame(reply))


class ModbusSimServer:
    """Serves ``meters`` (unit id -> SimulatedMeter) on one transport until stopped.

    ``transport``: "tcp" (Modbus TCP), "rtu-over-tcp" (RTU frames on a TCP socket) or "serial"
    (RTU on ``serial_port``). ``port=0`` picks a free TCP port; see :attr:`address`.
    """

    def __init__(
        self,
        meters: Mapping[int, SimulatedMeter],
        *,
        transport: str = "tcp",
        host: str = "127.0.0.1",
        port: int = 5020,
        serial_port: str | None = None,
        baudrate: int = 9600,
        bytesize: int = 8,
        parity: str = "N",
        stopbits: int = 1,
        clock: Clock = time.time,
    ) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
        if transport == "serial" and not serial_port:
            raise ValueError("a serial simulator needs serial_port")
        for unit in meters:
            if not 1 <= unit <= 247:
                raise ValueError(f"unit ids are 1..247, got {unit}")
        self.meters = dict(meters)
        self.transport = transport
        self.host = host
        self.port = port
        self.serial_port = serial_port
        self.baudrate, self.bytesize, self.parity, self.stopbits = baudrate, bytesize, parity, stopbits
        self.clock = clock
        self.connections: set[_BusPort] = set()
        self._server: asyncio.Server | None = None
        self._serial: asyncio.BaseTransport | None = None

    def __repr__(self) -> str:
        where = self.serial_port if self.transport == "serial" else f"{self.host}:{self.port}"
        return f"<ModbusSimServer {self.transport} {where} units {sorted(self.meters)}>"

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) actually listened on (TCP transports)."""
        return self.host, self.port

    @property
    def running(self) -> bool:
        return self._server is not None or self._serial is not None

    def _port(self) -> _BusPort:
        framer = FramerSocket if self.transport == "tcp" else FramerRTU
        return _BusPort(self, framer(DecodePDU(True)))

    async def start(self) -> None:
        """Listen (TCP) or open the serial port; raises OSError if that cannot be done."""
        if self.running:
            return
        loop = asyncio.get_running_loop()
        if self.transport == "serial":
            assert self.serial_port is not None
            self._serial, _ = await serial_asyncio_fast.create_serial_connection(
                loop,
                self._port,
                self.serial_port,
                baudrate=self.baudrate,
                bytesize=self.bytesize,
                parity=self.parity,
                stopbits=self.stopbits,
            )
            return
        try:
            server = await loop.create_server(self._port, self.host, self.port)
        except OSError as e:
            raise OSError(f"Modbus simulator cannot listen on {self.host}:{self.port}: {e.strerror or e}") from e
        self.port = int(server.sockets[0].getsockname()[1])
        self._server = server

    async def stop(self) -> None:
        server, self._server = self._server, None
        serial, self._serial = self._serial, None
        if serial is not None:
            serial.close()
        if server is not None:
            server.close()
        for port in list(self.connections):
            if port.transport is not None:
                port.transport.abort()
        if server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await server.wait_closed()

    async def __aenter__(self) -> ModbusSimServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def serve_modbus(
    meters: Mapping[int, SimulatedMeter] | None = None,
    *,
    units: Iterable[int] = (1,),
    model: ModbusModel | str = "sim-3ph",
    seed: int = 0,
    clock: Clock = time.time,
    **server_options: Any,
) -> ModbusSimServer:
    """Start and return a simulator. Without ``meters``, one ``model`` meter per unit id, each
    with its own load (seed + unit id) and plausible starting registers (a few thousand kWh spread
    over the tariffs, from the same seed), starting at the clock's current time."""
    if meters is None:
        start = clock()
        meters = {unit: SimulatedMeter(model, settings=_settings(seed + unit), start=start) for unit in units}
    server = ModbusSimServer(meters, clock=clock, **server_options)
    await server.start()
    return server


def _settings(seed: int) -> LoadSettings:
    rng = random.Random(seed)
    initial = {f"energy.active.import.t{t}": round(rng.uniform(50.0, 5000.0), 2) for t in range(1, 5)}
    initial.update({f"energy.reactive.import.t{t}": round(v * 0.35, 2) for t, v in enumerate(initial.values(), 1)})
    return LoadSettings(seed=seed, initial_energy=initial)

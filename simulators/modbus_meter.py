"""Simulated Modbus meters on pymodbus's server, driven by the shared load model.

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

Nothing here prints; the ``simulate`` CLI owns the terminal.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

from pymodbus.constants import ExcCodes
from pymodbus.datastore import ModbusBaseDeviceContext, ModbusServerContext
from pymodbus.exceptions import NoSuchIdException
from pymodbus.framer import FramerType
from pymodbus.server import ModbusSerialServer, ModbusTcpServer

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

# which table a pymodbus function code addresses (writes read back through the same table)
_TABLE: Final = {1: 1, 5: 1, 15: 1, 2: 2, 3: 3, 6: 3, 16: 3, 4: 4}


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
        self._cache_time = math.nan
        self._cache: dict[str, float] = {}

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
        values = self._values(now)
        encoded: dict[ModbusPoint, list[int]] = {}
        out: list[Any] = []
        for cell in cells:
            assert cell is not None
            point, offset = cell
            if point is None:  # a gap register, or the relay read-back
                out.append(self._relay_raw(table) if offset < 0 else 0)
                continue
            if point.codec is None:
                out.append(bool(values[point.quantity]))
                continue
            if point not in encoded:
                try:
                    encoded[point] = point.codec.encode(values[point.quantity])
                except ModbusValueError:
                    return DEVICE_FAILURE  # a value this register cannot hold
            out.append(encoded[point][offset])
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
        self._cache_time = math.nan
        return None

    # -- internals ----------------------------------------------------------------------------

    def _values(self, now: float) -> dict[str, float]:
        if now != self._cache_time:
            self.load.advance(now)
            self._cache = self.load.values()
            self._cache_time = now
        if not self.overrides:
            return self._cache
        return {**self._cache, **self.overrides}

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


class _DeviceContext(ModbusBaseDeviceContext):
    """pymodbus datastore interface over one SimulatedMeter."""

    def __init__(self, meter: SimulatedMeter, clock: Clock) -> None:
        self.meter = meter
        self.clock = clock

    def reset(self) -> None:
        """Nothing to reset: the registers are computed."""

    def getValues(  # noqa: N802 - the name pymodbus calls
        self, func_code: int, address: int, count: int = 1
    ) -> list[int] | list[bool] | ExcCodes:
        if func_code not in _TABLE:
            return ExcCodes.ILLEGAL_FUNCTION
        result = self.meter.read(func_code, address, count, self.clock())
        return ExcCodes(result) if isinstance(result, int) else result

    def setValues(  # noqa: N802 - the name pymodbus calls
        self, func_code: int, address: int, values: list[int] | list[bool]
    ) -> ExcCodes | None:
        if func_code not in (5, 6, 15, 16):
            return ExcCodes.ILLEGAL_FUNCTION
        result = self.meter.write(func_code, address, list(values), self.clock())
        return None if result is None else ExcCodes(result)


class _ServerContext(ModbusServerContext):
    """Unit id -> meter; a silent or unknown unit raises NoSuchIdException, which the server
    (ignore_missing_devices) answers with silence."""

    def __init__(self, meters: Mapping[int, SimulatedMeter], clock: Clock) -> None:
        devices = {u: _DeviceContext(m, clock) for u, m in meters.items()}
        super().__init__(devices=devices, single=False)  # type: ignore[no-untyped-call]
        self._meters = meters

    def __getitem__(self, device_id: int) -> Any:
        meter = self._meters.get(device_id)
        if meter is None or meter.silent:
            raise NoSuchIdException(f"no meter answers unit {device_id}")  # type: ignore[no-untyped-call]
        return super().__getitem__(device_id)  # type: ignore[no-untyped-call]


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
        self._server: ModbusTcpServer | ModbusSerialServer | None = None

    def __repr__(self) -> str:
        where = self.serial_port if self.transport == "serial" else f"{self.host}:{self.port}"
        return f"<ModbusSimServer {self.transport} {where} units {sorted(self.meters)}>"

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) actually listened on (TCP transports)."""
        return self.host, self.port

    @property
    def running(self) -> bool:
        return self._server is not None

    async def start(self) -> None:
        if self._server is not None:
            return
        context = _ServerContext(self.meters, self.clock)
        server: ModbusTcpServer | ModbusSerialServer
        if self.transport == "serial":
            server = ModbusSerialServer(
                context,
                framer=FramerType.RTU,
                port=self.serial_port,
                ignore_missing_devices=True,
                baudrate=self.baudrate,
                bytesize=self.bytesize,
                parity=self.parity,
                stopbits=self.stopbits,
            )
        else:
            framer = FramerType.SOCKET if self.transport == "tcp" else FramerType.RTU
            server = ModbusTcpServer(
                context, framer=framer, address=(self.host, self.port), ignore_missing_devices=True
            )
        try:
            await server.serve_forever(background=True)
        except RuntimeError as e:
            where = self.serial_port if self.transport == "serial" else f"{self.host}:{self.port}"
            raise OSError(f"Modbus simulator cannot listen on {where}") from e
        if self.transport != "serial":
            sockets = getattr(server.transport, "sockets", None) or ()
            if sockets:
                self.port = int(sockets[0].getsockname()[1])
        self._server = server

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.shutdown()  # type: ignore[no-untyped-call]

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

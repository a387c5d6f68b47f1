"""Simulated DL/T 645 buses for tests: real TCP ports and ptys with simulated meters behind them.

``sim_bus`` is a factory: ``handle = await sim_bus(3)`` starts a bus with meters 000000000001..3
on a free 127.0.0.1 port (``kind="pty"`` for a pseudo-terminal) and stops it after the test.
``handle.endpoint`` is (host, port) or the pty slave path, ``handle.meters`` the
:class:`~simulators.dlt645_meter.Dlt645Meter` objects, ``handle.clock`` their SimClock,
``handle.bus`` the :class:`~simulators.links.SimulatedBus` (faults, stats).

``DltTcpClient`` is a minimal master built on the protocol core, for talking to a bus.

For DL/T 698.45 and CJ/T 188 meters (and buses mixing protocols): ``meters_bus`` is a factory
taking already built meters (``bus = await meters_bus([m1, m2], kind="tcp", faults=...)``);
``ByteClient`` sends bytes to a TCP bus and deframes what comes back with any codec's deframer;
``pty_exchange`` writes to a pty bus at 8N1 and returns what came back.
"""

from __future__ import annotations

import asyncio
import datetime
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Self

import pytest_asyncio

from meter_gateway.protocols.dlt645.deframer import Deframer, Discarded, Event
from meter_gateway.protocols.dlt645.edition import Edition
from meter_gateway.protocols.dlt645.frame import Frame
from meter_gateway.simulators.clock import SimClock
from meter_gateway.simulators.dlt645_meter import Dlt645Meter
from meter_gateway.simulators.faults import Faults
from meter_gateway.simulators.links import LinkConfig, SimulatedBus

SIM_START = datetime.datetime(2026, 3, 14, 10, 0, 0)


@dataclass
class SimBusHandle:
    bus: SimulatedBus
    meters: list[Dlt645Meter]
    clock: SimClock

    @property
    def endpoint(self) -> tuple[str, int] | str:
        return self.bus.endpoint


class ByteClient:
    """Send bytes to a TCP bus; deframe what comes back with ``deframer`` (any codec's)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, deframer: Any) -> None:
        self.reader = reader
        self.writer = writer
        self.deframer = deframer
        self.raw = bytearray()

    @classmethod
    async def connect(cls, endpoint: tuple[str, int] | str, *options: Any) -> Self:
        """Connected to ``endpoint``; ``options`` as the class's constructor takes them after the streams."""
        assert isinstance(endpoint, tuple), "ByteClient talks to TCP buses"
        reader, writer = await asyncio.open_connection(*endpoint)
        return cls(reader, writer, *options)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def events(self, wait: float = 0.3, *, until_frames: int | None = None) -> list[Any]:
        """Everything deframed within ``wait`` seconds (or once ``until_frames`` frames came)."""
        out: list[Any] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while until_frames is None or sum(not hasattr(e, "reason") for e in out) < until_frames:
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                chunk = await asyncio.wait_for(self.reader.read(4096), left)
            except TimeoutError:
                break
            if not chunk:
                break
            self.raw += chunk
            out += self.deframer.feed(chunk)
        return out

    async def frames(self, data: bytes, count: int = 1, wait: float = 1.0) -> list[Any]:
        """Send ``data``; the frames that come back (up to ``count``) within ``wait`` seconds."""
        await self.send(data)
        return [e for e in await self.events(wait, until_frames=count) if not hasattr(e, "reason")]

    async def request(self, data: bytes, wait: float = 1.0) -> Any | None:
        """Send one request; the first frame back, or None."""
        got = await self.frames(data, 1, wait)
        return got[0] if got else None

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


class DltTcpClient(ByteClient):
    """A :class:`ByteClient` that deframes DL/T 645."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super().__init__(reader, writer, Deframer())


def frames_of(events: list[Event]) -> list[Frame]:
    return [e for e in events if isinstance(e, Frame)]


def discards_of(events: list[Event]) -> list[Discarded]:
    return [e for e in events if isinstance(e, Discarded)]


SimBusFactory = Callable[..., Awaitable[SimBusHandle]]


@pytest_asyncio.fixture
async def sim_bus(meters_bus: MetersBusFactory) -> AsyncIterator[SimBusFactory]:
    """Factory: ``await sim_bus(n, kind="tcp"|"pty", edition=..., baud=None, faults=None, ...)``."""

    async def start(
        n: int = 1,
        *,
        kind: str = "tcp",
        edition: Edition = Edition.DLT645_2007,
        baud: int | None = None,
        bits_per_char: int = 11,
        faults: Faults | None = None,
        start_time: datetime.datetime = SIM_START,
        speed: float = 1.0,
        first_address: int = 1,
        **meter_options: object,
    ) -> SimBusHandle:
        clock = SimClock(start_time, speed)
        meters = [
            Dlt645Meter(f"{first_address + i:012d}", edition, clock=clock, seed=i, **meter_options)  # type: ignore[arg-type]
            for i in range(n)
        ]
        bus = await meters_bus(meters, kind=kind, faults=faults, baud=baud, bits_per_char=bits_per_char)
        return SimBusHandle(bus, meters, clock)

    yield start


def pty_exchange(path: str, data: bytes, *, wait: float = 0.5, quiet: float = 0.15) -> bytes:
    """Write ``data`` to a pty bus at 2400 8N1 (ptys refuse even parity); what came back until
    the line stayed quiet for ``quiet`` seconds (or ``wait`` passed with nothing). Blocking: run it
    in a thread."""
    import serial

    out = bytearray()
    with serial.Serial(path, 2400, bytesize=8, parity="N", stopbits=1, timeout=quiet) as port:
        port.write(data)
        deadline = time.monotonic() + wait
        while True:
            chunk = port.read(4096)
            if chunk:
                out += chunk
                continue
            if out or time.monotonic() > deadline:
                return bytes(out)


MetersBusFactory = Callable[..., Awaitable[SimulatedBus]]


@pytest_asyncio.fixture
async def meters_bus() -> AsyncIterator[MetersBusFactory]:
    """Factory: ``await meters_bus(meters, kind="tcp"|"pty", faults=None, baud=None)`` starts a bus
    with the given simulated meters (any protocols) and stops it after the test."""
    started: list[SimulatedBus] = []

    async def start(
        meters: Iterable[Any],
        *,
        kind: str = "tcp",
        faults: Faults | None = None,
        baud: int | None = None,
        bits_per_char: int = 11,
        idle_reset: float = 0.5,
    ) -> SimulatedBus:
        link = LinkConfig(kind=kind, baud=baud, bits_per_char=bits_per_char, idle_reset=idle_reset)  # type: ignore[arg-type]
        bus = SimulatedBus(meters, link, faults=faults)
        await bus.start()
        started.append(bus)
        return bus

    yield start
    for bus in started:
        await bus.stop()

"""Scripted peers for transport and bus tests: TCP meters on 127.0.0.1 and meters on a pty master.

They speak a toy length-prefixed framing so these tests do not depend on any real protocol:

    0xA5, n, kind, address, seq, payload...      (n = 3 + len(payload))

kind 0x01 is a request, 0x81 a reply. ``ToyExchange`` is a real reply exchange for it
(:class:`protocols.exchange.ReplyExchange`; the bus is protocol-agnostic, so tests supply the
protocol part the way a driver would).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tty
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest_asyncio

from meter_gateway.protocols.exchange import Answer, Event, Rejected, Rejection

SYNC = 0xA5
REQUEST = 0x01
REPLY = 0x81


@dataclass(frozen=True)
class ToyFrame:
    kind: int
    address: int
    seq: int
    payload: bytes = b""

    def encode(self) -> bytes:
        body = bytes([self.kind, self.address, self.seq]) + self.payload
        return bytes([SYNC, len(body)]) + body

    def reply(self, payload: bytes | None = None) -> ToyFrame:
        return ToyFrame(REPLY, self.address, self.seq, b"re:" + self.payload if payload is None else payload)


def request(address: int, seq: int, payload: bytes = b"") -> ToyFrame:
    return ToyFrame(REQUEST, address, seq, payload)


class ToyDeframer:
    """Streaming deframer: yields frames, counts bytes skipped while hunting for a frame start."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def clear(self) -> None:
        self._buf.clear()

    def feed(self, data: bytes) -> list[tuple[int, ToyFrame | None]]:
        """Return (skipped garbage bytes, frame or None) items in arrival order."""
        self._buf += data
        out: list[tuple[int, ToyFrame | None]] = []
        while self._buf:
            start = self._buf.find(SYNC)
            if start < 0:
                out.append((len(self._buf), None))
                self._buf.clear()
                break
            if start:
                out.append((start, None))
                del self._buf[:start]
            if len(self._buf) < 2:
                break
            n = self._buf[1]
            if n < 3:  # cannot be a frame: drop the sync byte and hunt again
                out.append((1, None))
                del self._buf[:1]
                continue
            if len(self._buf) < 2 + n:
                break
            body = bytes(self._buf[2 : 2 + n])
            del self._buf[: 2 + n]
            out.append((0, ToyFrame(body[0], body[1], body[2], body[3:])))
        return out


class ToyExchange:
    """Accepts the reply to one toy request; reports everything else by kind."""

    def __init__(self, req: ToyFrame) -> None:
        self.request = req
        self._raw = req.encode()
        self._deframer = ToyDeframer()

    def begin(self) -> None:
        self._deframer.clear()

    def receive(self, data: bytes) -> list[Event[ToyFrame]]:
        events: list[Event[ToyFrame]] = []
        for skipped, frame in self._deframer.feed(data):
            if frame is None:
                events.append(Rejected(Rejection.GARBAGE, skipped))
                continue
            event = self.consider(frame)
            events.append(event)
            if not isinstance(event, Rejected):
                break
        return events

    def consider(self, frame: ToyFrame) -> Event[ToyFrame]:
        size = len(frame.encode())
        if frame.encode() == self._raw:
            return Rejected(Rejection.ECHO, size)
        if frame.kind != REPLY:
            return Rejected(Rejection.WRONG_FUNCTION, size, f"kind {frame.kind:#x}")
        if frame.address != self.request.address:
            return Rejected(Rejection.WRONG_ADDRESS, size, f"address {frame.address}")
        if frame.seq != self.request.seq:
            return Rejected(Rejection.LATE, size, f"seq {frame.seq}")
        return Answer(frame)


async def until(cond: Callable[[], object], within: float = 1.0) -> None:
    """Wait (polling) until ``cond()`` is true; fail the test if it is not within ``within`` s."""
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    while not cond():
        assert loop.time() < end, "condition not reached in time"
        await asyncio.sleep(0.005)


# A handler gets each request frame and the peer connection; it answers (or not) via conn.write.
Handler = Callable[[ToyFrame, "PeerConn"], Awaitable[None]]


async def answer(frame: ToyFrame, conn: PeerConn) -> None:
    conn.write(frame.reply().encode())


async def silent(frame: ToyFrame, conn: PeerConn) -> None:
    return


@dataclass
class Arrival:
    frame: ToyFrame
    at: float  # loop time
    conn: int  # connection number (1 = first)


@dataclass
class PeerConn:
    number: int
    _write: Callable[[bytes], None]
    _hang_up: Callable[[], None] = lambda: None
    sent_at: list[float] = field(default_factory=list)
    busy: int = 0  # handlers running for this connection now

    def write(self, data: bytes) -> None:
        self.sent_at.append(asyncio.get_running_loop().time())
        self._write(data)

    def hang_up(self) -> None:
        self._hang_up()


class _Meter:
    """Request bookkeeping shared by the TCP and pty peers."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.arrivals: list[Arrival] = []
        self.raw = bytearray()
        self.overlaps = 0  # a request arrived on a connection still handling the previous one
        self._tasks: set[asyncio.Task[None]] = set()

    def _dispatch(self, deframer: ToyDeframer, data: bytes, conn: PeerConn) -> None:
        self.raw += data
        for _, frame in deframer.feed(data):
            if frame is None:
                continue
            self.arrivals.append(Arrival(frame, asyncio.get_running_loop().time(), conn.number))
            if conn.busy:
                self.overlaps += 1
            task = asyncio.get_running_loop().create_task(self._handle(frame, conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _handle(self, frame: ToyFrame, conn: PeerConn) -> None:
        conn.busy += 1
        try:
            await self.handler(frame, conn)
        except (ConnectionError, OSError):
            pass  # the link under test went away mid-answer: that is the test's business
        finally:
            conn.busy -= 1

    async def _cancel_tasks(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task


class ToyServer(_Meter):
    """A TCP peer on 127.0.0.1; stop() and start() again to simulate a restart on the same port."""

    def __init__(self, handler: Handler = answer, port: int | None = None) -> None:
        from tests.plugins.ports import free_port  # lazily: this plugin may load before ports.py

        super().__init__(handler)
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.connections = 0
        self.conns: list[PeerConn] = []
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        conn = PeerConn(self.connections, writer.write, writer.close)
        self.conns.append(conn)
        deframer = ToyDeframer()
        try:
            while data := await reader.read(4096):
                self._dispatch(deframer, data, conn)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    def drop_connections(self) -> None:
        """Close every accepted connection but keep listening (an idle-timeout on the far end)."""
        for w in self._writers:
            w.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in self._writers:
            w.close()
        for w in self._writers:
            with contextlib.suppress(ConnectionError, OSError):
                await w.wait_closed()
        self._writers.clear()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        await self._cancel_tasks()


class PtyMeter(_Meter):
    """Plays a meter on the master side of a pty; ``path`` is the slave device the link opens."""

    def __init__(self, handler: Handler = answer) -> None:
        super().__init__(handler)
        self.master, self._slave = os.openpty()
        # raw from the start, so nothing is echoed before the link configures the port
        tty.setraw(self._slave)
        os.set_blocking(self.master, False)
        self.path = os.ttyname(self._slave)
        self._deframer = ToyDeframer()
        self._conn = PeerConn(1, self._write)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.master, self._readable)
        self.closed = False

    def _write(self, data: bytes) -> None:
        if not self.closed:
            os.write(self.master, data)

    def write(self, data: bytes) -> None:
        self._conn.write(data)

    def _readable(self) -> None:
        try:
            data = os.read(self.master, 4096)
        except BlockingIOError:
            return
        except OSError:  # EIO: no one has the slave open right now
            return
        if data:
            self._dispatch(self._deframer, data, self._conn)

    def close_slave_hold(self) -> None:
        """Drop our own slave descriptor (the link keeps its own)."""
        if self._slave >= 0:
            os.close(self._slave)
            self._slave = -1

    async def close(self) -> None:
        """Hang up the line: the link's reads then fail as they do for an unplugged adapter."""
        if self.closed:
            return
        self.closed = True
        self._loop.remove_reader(self.master)
        os.close(self.master)
        self.close_slave_hold()
        await self._cancel_tasks()


@pytest_asyncio.fixture
async def toy_server() -> AsyncIterator[Callable[..., Awaitable[ToyServer]]]:
    """Factory: ``await toy_server(handler)`` starts a scripted TCP meter; all stop at teardown."""
    servers: list[ToyServer] = []

    async def make(handler: Handler = answer, port: int | None = None) -> ToyServer:
        server = ToyServer(handler, port)
        await server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.stop()


@pytest_asyncio.fixture
async def pty_meter() -> AsyncIterator[Callable[..., PtyMeter]]:
    """Factory: ``pty_meter(handler)`` opens a pty whose master plays the meter."""
    meters: list[PtyMeter] = []

    def make(handler: Handler = answer) -> PtyMeter:
        meter = PtyMeter(handler)
        meters.append(meter)
        return meter

    yield make
    for meter in meters:
        await meter.close()

"""Simulated RS-485 buses: many simulated meters behind one TCP port or one pty.

A :class:`SimulatedBus` is what a gateway sees of one RS-485 segment: a transparent serial server
(TCP; every connected client shares the one segment) or a pseudo-terminal (the gateway opens the
slave path at 8N1; ptys here refuse even parity). One bus may host meters of several byte
protocols at once (DL/T 645, DL/T 698.45, CJ/T 188; see :mod:`simulators.protocol`): the bytes
from the gateway go through one deframer per protocol present, and each frame goes to the meter
of that protocol it addresses (dict lookup by address: no per-meter tasks). Unaddressed meters
stay silent; a wildcard is answered only when exactly one meter of the frame's protocol is on
the link, as on a real bus where two would collide; broadcasts reach every meter of the protocol
and get no reply. On a bus with several protocols each deframer reports the other protocols'
frames as discards (``bus.stats``: ``discarded_*`` for DL/T 645, ``dlt698_discarded_*`` ...).

When a deframer holds part of a frame and the line stays quiet for ``LinkConfig.idle_reset``
seconds, the partial input is given up (``expire()`` where the codec has it, so a frame behind a
truncated one is still found), as a meter's receiver resets after an inter-frame gap.

Wire-time emulation (``LinkConfig.baud``): the segment is half duplex and shared. A reply may
start once the request has crossed the wire (``len * bits_per_char / baud``) plus the meter's
turnaround, and no earlier than the wire is free; its bytes then leave in 20 ms slices no faster
than the baud rate allows. One sender task per client connection does the sleeping, so the
number of timers scales with connections, not meters. Without a baud rate replies are written at
once (the fast path the throughput benchmark measures).

Faults (:class:`~simulators.faults.Faults`) are applied per reply; ``bus.stats`` counts every
frame, discard and injected fault so a test can assert that a fault actually happened.

Meters that speak on their own (a DL/T 698.45 terminal's LINK login and heartbeats: a meter whose
``talks`` is true) are timed per connection, by one talker task whatever their number: each
logs in when the connection is made (for a pty, when the bus starts: a terminal repeats its
login until answered, so one the gateway missed by opening the port later is sent again) and
sends its next LINK-Request when :meth:`link_request` said it is due. :meth:`SimulatedBus.emit`
puts any other bytes a meter sends on its own (a REPORT-Notification) on the line.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import os
import tty
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from meter_gateway.drivers.transport import RecvIntoBuffer
from meter_gateway.protocols.dlt645.frame import Address
from meter_gateway.simulators.faults import Faults
from meter_gateway.simulators.protocol import DLT645, StreamDeframer, WireProtocol, wire_of

log = logging.getLogger(__name__)

_SLICE = 0.02  # seconds of wire time per paced write


@dataclass(frozen=True, slots=True)
class LinkConfig:
    kind: Literal["tcp", "pty"] = "tcp"
    host: str = "127.0.0.1"
    port: int = 0
    baud: int | None = None
    bits_per_char: int = 11  # 8E1: start + 8 data + parity + stop
    idle_reset: float = 0.5  # seconds of silence after which partial input is given up

    def __post_init__(self) -> None:
        if self.kind not in ("tcp", "pty"):
            raise ValueError(f"link kind must be 'tcp' or 'pty', got {self.kind!r}")
        if self.baud is not None and self.baud <= 0:
            raise ValueError(f"baud must be positive, got {self.baud}")
        if not 7 <= self.bits_per_char <= 12:
            raise ValueError(f"bits_per_char must be 7..12, got {self.bits_per_char}")
        if self.idle_reset <= 0:
            raise ValueError(f"idle_reset must be positive seconds, got {self.idle_reset}")

    @property
    def char_time(self) -> float:
        return 0.0 if self.baud is None else self.bits_per_char / self.baud


@dataclass(slots=True)
class Segment:
    """The meters of one protocol on a bus, by address key."""

    wire: WireProtocol
    meters: dict[Hashable, Any] = field(default_factory=dict)


class SimulatedBus:
    """One simulated RS-485 segment with its meters. ``await start()``, read ``endpoint``."""

    def __init__(
        self,
        meters: Iterable[Any],
        link: LinkConfig | None = None,
        faults: Faults | None = None,
    ) -> None:
        self.link = link or LinkConfig()
        self.faults = faults or Faults()
        self.segments: dict[str, Segment] = {}
        self.meters: list[Any] = []
        for meter in meters:
            wire = wire_of(meter)
            segment = self.segments.setdefault(wire.name, Segment(wire))
            key = wire.key(meter)
            if key in segment.meters:
                raise ValueError(f"{wire.name} meter address {meter.address_text} is on this bus twice")
            segment.meters[key] = meter
            self.meters.append(meter)
        if not self.segments:  # an empty bus still listens (and answers nothing) as DL/T 645
            self.segments[DLT645.name] = Segment(DLT645)
        self.stats: Counter[str] = Counter()
        self.wire_free = 0.0  # loop time at which the shared segment is next idle
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._pty: tuple[int, int] | None = None
        self._endpoint: tuple[str, int] | str | None = None

    # -- life cycle -----------------------------------------------------------------------------

    @property
    def endpoint(self) -> tuple[str, int] | str:
        """(host, port) of the TCP listener, or the pty slave path."""
        if self._endpoint is None:
            raise RuntimeError("the bus is not started")
        return self._endpoint

    def emit(self, data: bytes) -> None:
        """Bytes a meter sends on its own, to every client of the segment (paced like replies)."""
        self.stats["emitted"] += 1
        for connection in list(self._connections):
            connection.emit(data)

    def meter(self, address: str) -> Any:
        """The meter with this printed address (any protocol)."""
        text = address.strip()
        for meter in self.meters:
            if meter.address_text == text:
                return meter
        wanted = Address.parse(address).wire  # a DL/T 645 address written another way
        segment = self.segments.get(DLT645.name)
        if segment is not None and wanted in segment.meters:
            return segment.meters[wanted]
        raise KeyError(address)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.link.kind == "tcp":
            self._server = await loop.create_server(lambda: _Connection(self), self.link.host, self.link.port)
            sock = self._server.sockets[0].getsockname()
            self._endpoint = (str(sock[0]), int(sock[1]))
            return
        master, slave = os.openpty()
        tty.setraw(slave)  # no echo, no CR/LF translation: bytes pass as on a serial line
        self._pty = (master, slave)
        self._endpoint = os.ttyname(slave)
        os.set_blocking(master, False)
        connection = _Connection(self)
        reader = os.fdopen(master, "rb", buffering=0, closefd=False)
        writer = os.fdopen(os.dup(master), "wb", buffering=0)
        await loop.connect_read_pipe(lambda: connection, reader)
        write_transport, _ = await loop.connect_write_pipe(asyncio.BaseProtocol, writer)
        connection.writer = write_transport
        connection.start_talking()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections):
            connection.close()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        if self._pty is not None:
            for fd in self._pty:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._pty = None
        self._endpoint = None

    async def __aenter__(self) -> SimulatedBus:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- dispatch -------------------------------------------------------------------------------

    def dispatch(self, frame: Any, wire: WireProtocol = DLT645) -> tuple[Any | None, list[bytes]]:
        """Deliver one request frame of protocol ``wire``; the meter that answers (if any) and
        its reply bytes."""
        self.stats["frames"] += 1
        if wire.from_meter(frame):
            self.stats["ignored_replies"] += 1  # another master's traffic, or an echo
            return None, []
        segment = self.segments.get(wire.name)
        meters = segment.meters if segment is not None else {}
        if wire.is_broadcast(frame):
            self.stats["broadcasts"] += 1
            for each in meters.values():
                if not self._fault_silences(each):
                    each.handle(frame)
            return None, []
        meter = meters.get(wire.frame_key(frame))
        if meter is None and wire.is_wildcard(frame):
            candidates = [m for m in meters.values() if wire.wildcard_matches(frame, m)]
            if len(meters) != 1 or not candidates:
                self.stats["wildcard_unanswered"] += 1
                return None, []
            meter = candidates[0]
        if meter is None:
            self.stats["not_for_us"] += 1
            return None, []
        if self._fault_silences(meter):
            return meter, []
        replies = meter.handle(frame)
        if replies:
            self.stats["replies"] += 1
        return meter, replies

    def _fault_silences(self, meter: Any) -> bool:
        if not self.faults.active:
            return False
        f = self.faults.for_meter(meter.address_text)
        wire_of(meter).stick(meter, f)
        if f.never_answer:
            self.stats["never_answer"] += 1
            return True
        if f.hit(f.drop_request):
            self.stats["drop_request"] += 1
            return True
        return False

    def mangle(self, meter: Any, request: Any, replies: list[bytes]) -> tuple[bytes, float, float]:
        """Apply reply faults: (bytes to send, extra delay, seconds per byte when dribbling)."""
        f = self.faults.for_meter(meter.address_text)
        wire = wire_of(meter)
        data = b"".join(replies)
        if f.hit(f.drop_reply):
            self.stats["drop_reply"] += 1
            return b"", 0.0, 0.0
        if f.hit(f.wrong_address):
            self.stats["wrong_address"] += 1
            data = b"".join(wire.readdress(r) for r in replies)
        if f.hit(f.corrupt_byte):
            self.stats["corrupt_byte"] += 1
            start = len(data) - len(data.lstrip(b"\xfe"))
            pos = f.rng.randrange(start, len(data))
            data = data[:pos] + bytes((data[pos] ^ f.rng.randrange(1, 256),)) + data[pos + 1 :]
        if f.hit(f.truncate_reply) and len(data) > 1:
            self.stats["truncate_reply"] += 1
            data = data[: f.rng.randrange(1, len(data))]
        if f.hit(f.echo_request):
            self.stats["echo_request"] += 1
            data = wire.encode(request) + data
        if f.hit(f.noise_burst):
            self.stats["noise_burst"] += 1
            data = f.rng.randbytes(f.rng.randrange(3, 17)) + data
        if f.late_reply > 0:
            self.stats["late_reply"] += 1
        if f.dribble > 0:
            self.stats["dribble"] += 1
        return data, f.late_reply, f.dribble


class _Connection(RecvIntoBuffer):
    """One client of a bus (a TCP connection or the pty master).

    Sockets receive with ``recv_into`` into one reused buffer, as the gateway's links do (see
    :class:`~drivers.transport.RecvIntoBuffer`), so a simulator serving many meters spends its
    time answering rather than allocating. The pty master's pipe transport calls
    ``data_received`` directly.
    """

    def __init__(self, bus: SimulatedBus) -> None:
        self.bus = bus
        self.deframers: list[tuple[WireProtocol, StreamDeframer]] = [
            (segment.wire, segment.wire.deframer()) for segment in bus.segments.values()
        ]
        self.writer: asyncio.WriteTransport | None = None
        self.transport: asyncio.BaseTransport | None = None
        self._queue: list[tuple[float, int, bytes, float]] = []
        self._order = itertools.count()
        self._wake = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None
        self._idle: asyncio.TimerHandle | None = None
        self._talker: asyncio.Task[None] | None = None
        self._closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        if isinstance(transport, asyncio.WriteTransport):
            self.writer = transport
        self.bus._connections.add(self)
        self.bus.stats["connections"] += 1
        if self.writer is not None:  # a socket; the pty's writer comes after, and start() calls
            self.start_talking()

    def start_talking(self) -> None:
        talkers = [m for m in self.bus.meters if getattr(m, "talks", False)]
        if talkers and self._talker is None:
            self._talker = asyncio.get_running_loop().create_task(self._talk(talkers))

    async def _talk(self, talkers: list[Any]) -> None:
        """Send each talking meter's LINK-Requests when due (see the module docstring)."""
        loop = asyncio.get_running_loop()
        for meter in talkers:
            meter.connected()
        due = dict.fromkeys(range(len(talkers)), loop.time())
        while not self._closed:
            now = loop.time()
            for i, meter in enumerate(talkers):
                if due[i] <= now:
                    data, wait = meter.link_request()
                    self.bus.stats["link_requests"] += 1
                    self.emit(data)
                    due[i] = now + wait
            await asyncio.sleep(max(0.0, min(due.values()) - loop.time()))

    def emit(self, data: bytes) -> None:
        """Bytes a meter sends on its own: after the replies queued, paced as they are."""
        if self._closed:
            return
        if not (self.bus.link.char_time or self._queue):
            if self.writer is not None:
                self.writer.write(data)
            return
        heapq.heappush(self._queue, (asyncio.get_running_loop().time(), next(self._order), data, 0.0))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.get_running_loop().create_task(self._send_loop())
        self._wake.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.bus._connections.discard(self)
        self._stop_timers()

    def close(self) -> None:
        self._closed = True
        self._stop_timers()
        for t in (self.transport, self.writer):
            if t is not None:
                t.close()

    def _stop_timers(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
        if self._talker is not None:
            self._talker.cancel()
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def data_received(self, data: bytes) -> None:
        held = False
        for wire, deframer in self.deframers:
            self._deliver(wire, deframer.feed(data))
            held = held or deframer.buffered > 0
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        if held and not self._closed:
            self._idle = asyncio.get_running_loop().call_later(self.bus.link.idle_reset, self._line_idle)

    def _line_idle(self) -> None:
        """The line went quiet with part of a frame held: give it up (see the module docstring)."""
        self._idle = None
        for wire, deframer in self.deframers:
            if not deframer.buffered:
                continue
            self.bus.stats["idle_resets"] += 1
            expire = getattr(deframer, "expire", None)
            if expire is not None:
                self._deliver(wire, expire())
            else:
                deframer.reset()

    def _deliver(self, wire: WireProtocol, events: Sequence[Any]) -> None:
        bus = self.bus
        now = None
        for event in events:
            if not wire.is_frame(event):
                bus.stats[f"{wire.discard_prefix}{event.reason}"] += 1
                continue
            meter, replies = bus.dispatch(event, wire)
            if meter is None or not replies:
                continue
            delay, dribble = 0.0, 0.0
            out = b"".join(replies)
            if bus.faults.active:
                out, delay, dribble = bus.mangle(meter, event, replies)
                if not out:
                    continue
            char_time = bus.link.char_time
            delay += meter.turnaround
            if not (char_time or delay or dribble) and not self._queue:
                if self.writer is not None:
                    self.writer.write(out)
                continue
            if now is None:
                now = asyncio.get_running_loop().time()
            # The request crossed the wire before the meter could see it.
            ready = now + wire.request_bytes(event) * char_time + delay
            heapq.heappush(self._queue, (ready, next(self._order), out, dribble))
            if self._sender is None or self._sender.done():
                self._sender = asyncio.get_running_loop().create_task(self._send_loop())
            self._wake.set()

    def eof_received(self) -> bool | None:
        return None

    async def _send_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue and not self._closed:
            ready, _, data, dribble = self._queue[0]
            wait = ready - loop.time()
            if wait > 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)
                continue
            heapq.heappop(self._queue)
            await self._transmit(data, dribble)

    async def _transmit(self, data: bytes, dribble: float) -> None:
        bus = self.bus
        loop = asyncio.get_running_loop()
        char_time = bus.link.char_time
        if dribble > 0:
            step, pause = 1, max(dribble, char_time)
        elif char_time > 0:
            step = max(1, int(_SLICE / char_time))
            pause = step * char_time
        else:
            if self.writer is not None and not self._closed:
                self.writer.write(data)
            return
        for i in range(0, len(data), step):
            chunk = data[i : i + step]
            start = max(loop.time(), bus.wire_free)
            bus.wire_free = start + (pause if len(chunk) == step else len(chunk) * char_time)
            await asyncio.sleep(bus.wire_free - loop.time())
            if self._closed or self.writer is None:
                return
            self.writer.write(chunk)

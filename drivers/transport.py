"""The southbound byte transport the bus drives, its settings, and the factory that builds one.

A transport is a byte pipe to one physical bus (an RS-485 line behind a local adapter, or a TCP
link to a transparent serial server / concentrator). It keeps itself connected: ``open()`` starts a
supervisor that (re)connects with jittered, capped backoff and sleeps between attempts, so a
vanished adapter or a dead server costs no CPU. Everything it raises is a ``drivers.errors``
type; OSError and pyserial exceptions stop here.

One reader at a time: the bus serializes transactions, and a transport assumes it. Input that
arrives with no read waiting is buffered, and ``on_input`` (if set) is told: the bus then hands it
to the protocol that listens to the idle line, when no transaction holds the line
(:meth:`drivers.bus.Bus.listen`), or leaves it for the next transaction's flush.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Protocol, runtime_checkable

from meter_gateway.drivers.backoff import Backoff, BackoffPolicy
from meter_gateway.drivers.errors import ConfigurationError, LinkDown
from meter_gateway.drivers.log_limit import logfmt_value

log = logging.getLogger(__name__)


@runtime_checkable
class Transport(Protocol):
    """What the bus needs from a link, whichever kind it is."""

    @property
    def name(self) -> str: ...

    @property
    def connected(self) -> bool: ...

    @property
    def down_since(self) -> float | None:
        """Loop time the link went (or started) down; None while connected."""
        ...

    @property
    def last_rx(self) -> float:
        """Loop time the last byte arrived (-inf if none yet): the bus's quiet-time reference."""
        ...

    @property
    def stats(self) -> LinkStats: ...

    async def open(self) -> bool:
        """Start keeping the link up; return whether the first attempt connected."""
        ...

    async def close(self) -> None: ...

    async def wait_connected(self, within: float | None = None) -> bool: ...

    async def write(self, data: bytes) -> None:
        """Queue ``data`` and return once the OS has taken it (drain). Raises LinkDown."""
        ...

    async def read(self, deadline: float) -> bytes:
        """Return what has arrived, waiting until ``deadline`` (loop time) for at least one byte.

        Returns b"" at the deadline; raises LinkDown if the link is down and nothing is buffered.
        """
        ...

    async def read_until(self, consume: Callable[[bytes], bool], deadline: float) -> bool:
        """Hand arriving bytes to ``consume`` until it returns True (then return True) or the
        ``deadline`` (loop time) passes (then return False). What ``consume`` raises is raised
        here; LinkDown if the link goes down first. ``consume`` runs as the bytes arrive, so a
        reply costs the waiting transaction one wake-up however many chunks it came in."""
        ...

    def flush_input(self) -> int:
        """Discard stale input (ours and the OS's); return how many bytes were discarded. What
        arrived since the last read goes to ``on_stale`` instead, when set."""
        ...

    def take_input(self) -> bytes:
        """The input buffered since the last read, handed over (the buffer is emptied)."""
        ...

    on_input: Callable[[], None] | None
    """Called when input arrives with no read waiting (it is then buffered); None: nobody asks."""

    on_stale: Callable[[bytes], None] | None
    """Given the buffered input ``flush_input`` would discard (a terminal's heartbeat that came
    while a transaction waited for a quiet line); None: it is discarded."""

    def tx_time(self, nbytes: int) -> float:
        """Seconds the line needs to put ``nbytes`` on the wire after write() returned."""
        ...

    def note_reply(self, source: object = None) -> None:
        """A transaction got an answer (from ``source``, the meter asked, if known): the link is alive."""
        ...

    def note_silence(self, source: object = None) -> None:
        """A transaction to ``source`` (the meter asked, if known) timed out with the link nominally
        up (input to half-open detection)."""
        ...


@dataclass(slots=True)
class LinkStats:
    """Plain counters per link; the gateway exports them."""

    open_attempts: int = 0
    connects: int = 0
    losses: int = 0
    half_open_resets: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    overflow_dropped: int = 0  # input nobody asked for, dropped when the buffer cap was hit
    last_error: str = ""

    def as_dict(self) -> dict[str, int]:
        return {k: v for k, v in asdict(self).items() if isinstance(v, int)}


# ---------------------------------------------------------------------------------------------
# Settings


PARITIES = {"N": "none", "E": "even", "O": "odd"}
# A failed open of a missing device path costs nothing: retry often enough that a returning
# adapter is back within seconds (the field expects < 10 s), never spinning.
SERIAL_RECONNECT = BackoffPolicy(initial=0.5, maximum=5.0)
TCP_RECONNECT = BackoffPolicy(initial=1.0, maximum=60.0)


@dataclass(frozen=True, slots=True)
class Rs485Settings:
    """Kernel RS-485 mode (TIOCSRS485): the UART driver switches the transceiver direction."""

    rts_level_for_tx: bool = True
    rts_level_for_rx: bool = False
    rx_during_tx: bool = False  # adapters that hear their own transmission (the bus then sees echoes)
    delay_before_tx: float | None = None  # seconds
    delay_before_rx: float | None = None


@dataclass(frozen=True, slots=True)
class SerialSettings:
    """A local serial port. DL/T 645 lines are normally 1200 or 2400 baud 8E1, Modbus RTU 9600 8N1."""

    kind: ClassVar[str] = "serial"

    port: str  # a stable /dev/serial/by-id/... path is best; it is just a path here
    baudrate: int = 9600
    bytesize: int = 8
    parity: str = "N"
    stopbits: float = 1
    rs485: Rs485Settings | None = None
    exclusive: bool = True  # flock the port so a second gateway cannot share the line
    reconnect: BackoffPolicy = SERIAL_RECONNECT
    # A quiet meter is no reason to reopen a local port; a wedged USB adapter can be, so opt-in.
    no_reply_limit: int = 0
    write_timeout: float = 5.0

    def __post_init__(self) -> None:
        if not self.port:
            raise ConfigurationError("serial link: 'port' is empty")
        where = f"serial link {self.port}"
        if self.baudrate <= 0:
            raise ConfigurationError(f"{where}: baudrate must be positive, got {self.baudrate}")
        if self.bytesize not in (5, 6, 7, 8):
            raise ConfigurationError(f"{where}: bytesize must be 5..8, got {self.bytesize}")
        if self.parity not in PARITIES:
            raise ConfigurationError(f"{where}: parity must be N, E or O, got {self.parity!r}")
        if self.stopbits not in (1, 1.5, 2):
            raise ConfigurationError(f"{where}: stopbits must be 1, 1.5 or 2, got {self.stopbits}")
        _check_common(where, self.no_reply_limit, self.write_timeout)

    @property
    def frame_bits(self) -> float:
        """Bits one character occupies on the line: start + data + parity + stop."""
        return 1 + self.bytesize + (0 if self.parity == "N" else 1) + self.stopbits

    @property
    def label(self) -> str:
        stop = int(self.stopbits) if self.stopbits != 1.5 else 1.5
        return f"{self.baudrate} {self.bytesize}{self.parity}{stop}"


@dataclass(frozen=True, slots=True)
class TcpSettings:
    """A TCP link carrying raw bus bytes (transparent serial server, concentrator, Modbus gateway)."""

    kind: ClassVar[str] = "tcp"

    host: str
    port: int
    connect_timeout: float = 5.0
    reconnect: BackoffPolicy = TCP_RECONNECT
    keepalive_idle: int = 30  # seconds of silence before the first keepalive probe
    keepalive_interval: int = 10
    keepalive_count: int = 3
    user_timeout: float = 30.0  # unacknowledged data older than this kills the connection
    # N consecutive transaction timeouts on an "up" socket: assume it is half-open and reconnect.
    no_reply_limit: int = 3
    write_timeout: float = 5.0

    def __post_init__(self) -> None:
        where = f"tcp link {self.host}:{self.port}"
        if not self.host:
            raise ConfigurationError("tcp link: 'host' is empty")
        if not 0 < self.port < 65536:
            raise ConfigurationError(f"{where}: port must be 1..65535")
        if self.connect_timeout <= 0:
            raise ConfigurationError(f"{where}: connect_timeout must be positive")
        if min(self.keepalive_idle, self.keepalive_interval, self.keepalive_count) < 1:
            raise ConfigurationError(f"{where}: keepalive settings must be >= 1")
        if self.user_timeout < 0:
            raise ConfigurationError(f"{where}: user_timeout must be >= 0")
        _check_common(where, self.no_reply_limit, self.write_timeout)

    @property
    def label(self) -> str:
        return f"{self.host}:{self.port}"


LinkSettings = SerialSettings | TcpSettings


def _check_common(where: str, no_reply_limit: int, write_timeout: float) -> None:
    if no_reply_limit < 0:
        raise ConfigurationError(f"{where}: no_reply_limit must be >= 0 (0 disables it)")
    if write_timeout <= 0:
        raise ConfigurationError(f"{where}: write_timeout must be positive")


def settings_from_mapping(raw: Mapping[str, Any]) -> LinkSettings:
    """Build link settings from a config table, e.g. ``{"type": "serial", "port": ..., "parity": "E"}``.

    Backoff is given flat as ``reconnect_initial`` / ``reconnect_max`` (seconds); RS-485 mode as
    ``rs485 = true`` or a table of Rs485Settings fields. Unknown keys are an error, not ignored:
    a typo in a baud rate key must not silently become 9600.
    """
    data = dict(raw)
    kind = data.pop("type", None)
    cls: type[SerialSettings] | type[TcpSettings]
    if kind == "serial":
        cls = SerialSettings
    elif kind == "tcp":
        cls = TcpSettings
    else:
        raise ConfigurationError(f"link 'type' must be 'serial' or 'tcp', got {kind!r}")
    initial = data.pop("reconnect_initial", None)
    maximum = data.pop("reconnect_max", None)
    if initial is not None or maximum is not None:
        default = SERIAL_RECONNECT if cls is SerialSettings else TCP_RECONNECT
        try:
            data["reconnect"] = BackoffPolicy(
                initial=float(initial if initial is not None else default.initial),
                maximum=float(maximum if maximum is not None else default.maximum),
            )
        except (TypeError, ValueError) as e:
            raise ConfigurationError(f"{kind} link: bad reconnect backoff: {e}") from e
    if cls is SerialSettings and "rs485" in data:
        rs = data["rs485"]
        if rs is True:
            data["rs485"] = Rs485Settings()
        elif rs is False or rs is None:
            data["rs485"] = None
        elif isinstance(rs, Mapping):
            try:
                data["rs485"] = Rs485Settings(**rs)
            except TypeError as e:
                raise ConfigurationError(f"serial link: bad rs485 table: {e}") from e
        else:
            raise ConfigurationError(f"serial link: rs485 must be true/false or a table, got {rs!r}")
    if cls is SerialSettings and isinstance(data.get("parity"), str):
        data["parity"] = data["parity"].upper()
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigurationError(f"{kind} link: unknown setting(s) {', '.join(unknown)}")
    try:
        return cls(**data)
    except TypeError as e:
        raise ConfigurationError(f"{kind} link: {e}") from e


def make_transport(settings: LinkSettings, *, name: str | None = None) -> StreamLink:
    """The transport for ``settings`` (not yet opened)."""
    if isinstance(settings, SerialSettings):
        from meter_gateway.drivers.serial_link import SerialLink

        return SerialLink(settings, name=name)
    if isinstance(settings, TcpSettings):
        from meter_gateway.drivers.tcp_link import TcpLink

        return TcpLink(settings, name=name)
    raise ConfigurationError(f"no transport for settings of type {type(settings).__name__}")


# ---------------------------------------------------------------------------------------------
# Shared implementation for links built on an asyncio transport + protocol


class Inbox(asyncio.Protocol):
    """Feeds one connection's events to its link; a superseded connection's events are ignored."""

    def __init__(self, link: StreamLink, generation: int) -> None:
        self._link = link
        self._generation = generation
        self.closed = asyncio.Event()  # set when the connection is really gone (device closed)

    def _current(self) -> bool:
        return self._link._generation == self._generation

    def data_received(self, data: bytes) -> None:
        if self._current():
            self._link._on_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()
        self._link._inboxes.discard(self)
        if self._current():
            self._link._on_lost(str(exc) if exc is not None else _PEER_CLOSED)

    def pause_writing(self) -> None:
        if self._current():
            self._link._writable.clear()

    def resume_writing(self) -> None:
        if self._current():
            self._link._writable.set()


class RecvIntoBuffer(asyncio.BufferedProtocol):
    """Receive into one small buffer of the protocol's own (``recv_into``), each chunk handed to
    its ``data_received``; for the gateway's TCP links and the simulator's connections.

    Meter frames are small, and asyncio's plain ``data_received`` path allocates a large read
    buffer for every receive and shrinks it afterwards; a buffer sized for meter frames, reused,
    keeps that work off every reply. Mix in after the class that defines ``data_received``.
    """

    RX_SIZE: ClassVar[int] = 2048
    _rx: memoryview | None = None  # made on the first receive

    data_received: Callable[[bytes], None]

    def get_buffer(self, sizehint: int) -> memoryview:
        rx = self._rx
        if rx is None:
            rx = self._rx = memoryview(bytearray(self.RX_SIZE))
        return rx

    def buffer_updated(self, nbytes: int) -> None:
        assert self._rx is not None  # get_buffer came first
        self.data_received(self._rx[:nbytes].tobytes())


class BufferedInbox(Inbox, RecvIntoBuffer):
    """An Inbox that receives with ``recv_into`` (see :class:`RecvIntoBuffer`)."""


def _expire(waiter: asyncio.Future[bool]) -> None:
    """A read's deadline came: the wait ends with "no answer" unless something ended it first."""
    if not waiter.done():
        waiter.set_result(False)


class StreamLink(abc.ABC):
    """Connection supervision, input buffering and half-open policy for stream links.

    Subclasses only say how to connect (``_connect``) and may add a way to discard input the OS
    still holds (``_discard_os_input``) and a line time (``tx_time``).
    """

    MAX_BUFFER = 64 * 1024
    INBOX: ClassVar[type[Inbox]] = Inbox  # how a connection delivers what it receives
    STABLE_AFTER = 10.0  # a connection that lived this long resets the reconnect backoff

    def __init__(
        self,
        name: str,
        *,
        reconnect: BackoffPolicy,
        no_reply_limit: int,
        write_timeout: float,
    ) -> None:
        self._name = name
        self._reconnect = reconnect
        self._no_reply_limit = no_reply_limit
        self._write_timeout = write_timeout
        self._stats = LinkStats()
        self._generation = 0
        self._transport: asyncio.BaseTransport | None = None
        self._buf = bytearray()
        self._wake = asyncio.Event()
        self._up = asyncio.Event()
        self._down = asyncio.Event()
        self._down.set()
        self._writable = asyncio.Event()
        self._writable.set()
        self._supervisor: asyncio.Task[None] | None = None
        self._inboxes: set[Inbox] = set()  # connections not yet fully closed
        self._closing = False
        self._silent = 0
        self._silent_sources: set[object] = set()  # who the current run of silences went to (<= 2 kept)
        self._answering: set[object] = set()  # who ever answered on this link (<= 2 kept)
        self._fruitless_drop = False  # we dropped the link for silence and nothing answered since
        self._answered = False  # the current connection answered a transaction
        self._last_rx = -math.inf
        self._down_since: float | None = None
        # read_until: the consumer fed straight from data_received and the future it resolves
        self._consumer: Callable[[bytes], bool] | None = None
        self._waiter: asyncio.Future[bool] | None = None
        self.on_input: Callable[[], None] | None = None
        self.on_stale: Callable[[bytes], None] | None = None

    # -- state ------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def connected(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    @property
    def down_since(self) -> float | None:
        return None if self.connected else self._down_since

    @property
    def last_rx(self) -> float:
        return self._last_rx

    @property
    def stats(self) -> LinkStats:
        return self._stats

    def tx_time(self, nbytes: int) -> float:  # a stream socket has no line time
        return 0.0

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._name} {'up' if self.connected else 'down'}>"

    # -- lifecycle --------------------------------------------------------------------------

    async def open(self) -> bool:
        if self._supervisor is not None:
            return self.connected
        loop = asyncio.get_running_loop()
        self._closing = False
        self._down_since = loop.time()
        first: asyncio.Future[None] = loop.create_future()
        self._supervisor = asyncio.create_task(self._keep_up(first), name=f"link {self._name}")
        await first
        return self.connected

    async def close(self) -> None:
        self._closing = True
        task, self._supervisor = self._supervisor, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        transport = self._transport
        if transport is not None:
            transport.close()
            self._on_lost("closed")
        # the serial transport closes the device in an executor; wait so nothing leaks
        pending = [inbox.closed.wait() for inbox in self._inboxes]
        if pending:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await asyncio.gather(*pending)

    async def wait_connected(self, within: float | None = None) -> bool:
        if self.connected:
            return True
        try:
            async with asyncio.timeout(within):
                await self._up.wait()
        except TimeoutError:
            return False
        return self.connected

    @abc.abstractmethod
    async def _connect(self, inbox: Inbox) -> asyncio.BaseTransport:
        """Connect once; return the asyncio transport driving ``inbox``. Raise LinkDown on failure."""

    async def _connect_once(self, inbox: Inbox) -> asyncio.BaseTransport:
        transport = await self._connect(inbox)
        if inbox.closed.is_set():  # accepted, then closed before we even looked
            raise LinkDown("closed by peer right after connecting")
        return transport

    async def _keep_up(self, first: asyncio.Future[None]) -> None:
        loop = asyncio.get_running_loop()
        backoff = Backoff(self._reconnect)
        outage_logged = False
        try:
            while not self._closing:
                self._stats.open_attempts += 1
                self._generation += 1
                inbox = self.INBOX(self, self._generation)
                self._buf.clear()
                try:
                    transport = await self._connect_once(inbox)
                except LinkDown as e:
                    self._stats.last_error = str(e)
                    delay = backoff.next()
                    level = logging.DEBUG if outage_logged else logging.WARNING
                    log.log(
                        level,
                        "event=link_connect_failed link=%s error=%s retry_in=%.1f",
                        logfmt_value(self._name),
                        logfmt_value(e),
                        delay,
                    )
                    outage_logged = True
                    if not first.done():
                        first.set_result(None)
                    await asyncio.sleep(delay)
                    continue
                connected_at = loop.time()
                self._inboxes.add(inbox)
                self._transport = transport
                self._silent = 0
                self._answered = False
                self._writable.set()
                self._down.clear()
                self._up.set()
                self._down_since = None
                self._stats.connects += 1
                outage_logged = False
                log.info("event=link_connected link=%s", logfmt_value(self._name))
                if not first.done():
                    first.set_result(None)
                await self._down.wait()
                if loop.time() - connected_at >= self.STABLE_AFTER or self._answered:
                    backoff.reset()
                if not self._closing and not self._answered:
                    # a peer that closes after answering (cheap serial servers, some PLC gateways
                    # close after every reply) is no outage: connect again at once
                    await asyncio.sleep(backoff.next())
        finally:
            if not first.done():
                first.set_result(None)

    # -- callbacks from the connection -----------------------------------------------------

    def _on_data(self, data: bytes) -> None:
        self._stats.bytes_in += len(data)
        self._last_rx = asyncio.get_running_loop().time()
        consume, waiter = self._consumer, self._waiter
        if consume is not None and waiter is not None and not waiter.done():
            try:
                done = consume(data)
            except Exception as e:  # what the consumer raises is the reader's to handle
                waiter.set_exception(e)
                return
            if done:
                waiter.set_result(True)
            return
        self._buf += data
        excess = len(self._buf) - self.MAX_BUFFER
        if excess > 0:
            # nobody is reading (a chattering bus between transactions): keep the newest bytes
            del self._buf[:excess]
            self._stats.overflow_dropped += excess
        self._wake.set()
        if self.on_input is not None:
            self.on_input()

    def _on_lost(self, reason: str) -> None:
        if self._transport is None:
            return
        self._transport = None
        self._generation += 1  # late callbacks of the dead connection are ignored from here on
        self._down_since = asyncio.get_running_loop().time()
        self._up.clear()
        self._down.set()
        self._writable.set()
        self._wake.set()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(LinkDown(f"link {self._name}: not connected"))
        if not self._closing:
            self._stats.losses += 1
            self._stats.last_error = reason
            level = logging.DEBUG if self._answered and reason == _PEER_CLOSED else logging.WARNING
            log.log(level, "event=link_lost link=%s reason=%s", logfmt_value(self._name), logfmt_value(reason))

    def _drop(self, reason: str) -> None:
        """Abort the current connection now; the supervisor reconnects after its backoff."""
        transport = self._transport
        if transport is None:
            return
        self._answered = False  # our decision, not a peer closing after its reply
        if isinstance(transport, asyncio.WriteTransport):
            transport.abort()
        else:
            transport.close()
        self._on_lost(f"{reason}; reconnecting")

    # -- I/O ------------------------------------------------------------------------------

    async def write(self, data: bytes) -> None:
        transport = self._transport
        if transport is None or transport.is_closing() or not isinstance(transport, asyncio.WriteTransport):
            raise LinkDown(f"link {self._name}: not connected")
        transport.write(data)
        self._stats.bytes_out += len(data)
        if not self._writable.is_set():
            try:
                async with asyncio.timeout(self._write_timeout):
                    await self._writable.wait()
            except TimeoutError:
                self._drop(f"write stalled for {self._write_timeout:.1f} s")
                raise LinkDown(f"link {self._name}: write stalled") from None
        if self._transport is not transport or transport.is_closing():
            raise LinkDown(f"link {self._name}: lost while writing")

    async def read(self, deadline: float) -> bytes:
        while True:
            if self._buf:
                data = bytes(self._buf)
                self._buf.clear()
                return data
            if not self.connected:
                raise LinkDown(f"link {self._name}: not connected")
            self._wake.clear()
            try:
                async with asyncio.timeout_at(deadline):
                    await self._wake.wait()
            except TimeoutError:
                return b""

    async def read_until(self, consume: Callable[[bytes], bool], deadline: float) -> bool:
        if self._buf:
            data = bytes(self._buf)
            self._buf.clear()
            if consume(data):
                return True
        if not self.connected:
            raise LinkDown(f"link {self._name}: not connected")
        loop = asyncio.get_running_loop()
        if loop.time() >= deadline:
            return False
        # _on_data, _on_lost or the deadline's timer resolves the waiter (only a pending one is
        # fed). A bare timer rather than asyncio.timeout_at: this runs for every request, and a
        # timeout context costs a task cancellation and its bookkeeping each time.
        waiter: asyncio.Future[bool] = loop.create_future()
        self._consumer, self._waiter = consume, waiter
        timer = loop.call_at(deadline, _expire, waiter)
        try:
            return await waiter
        finally:
            timer.cancel()
            if self._waiter is waiter:
                self._consumer = self._waiter = None

    def take_input(self) -> bytes:
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def flush_input(self) -> int:
        n = len(self._buf)
        if n and self.on_stale is not None:
            self.on_stale(self.take_input())
            n = 0
        self._buf.clear()
        if self.connected:
            n += self._discard_os_input()
            transport = self._transport
            if transport is not None and self._peer_closed():
                # the peer closed after its last reply and the event loop has not seen it yet: a
                # request written now would be lost, so the link goes down before it is sent
                transport.close()
                self._on_lost(_PEER_CLOSED)
        return n

    def _discard_os_input(self) -> int:
        """Discard input the OS holds that has not reached us yet; return its size."""
        return 0

    def _peer_closed(self) -> bool:
        """Whether the OS already knows the peer closed the connection (links that can tell)."""
        return False

    # -- half-open policy ------------------------------------------------------------------

    # Silence alone cannot tell a half-open link from a meter that does not answer; who is silent
    # can. A run of silences that spans two meters, or one meter's on a link where no other meter
    # ever answered, drops the link (the reconnect is the test). One meter's silence while another
    # answered on this link is that meter's, and a reconnect that brought no answer is not repeated
    # for the same single-meter silence: the meter's health deals with it, the link stays up.

    def note_reply(self, source: object = None) -> None:
        self._silent = 0
        self._silent_sources.clear()
        self._answered = True
        self._fruitless_drop = False
        if len(self._answering) < 2:
            self._answering.add(source)

    def note_silence(self, source: object = None) -> None:
        if not self.connected:
            return
        self._silent += 1
        if len(self._silent_sources) < 2:
            self._silent_sources.add(source)
        if not self._no_reply_limit or self._silent < self._no_reply_limit:
            return
        if len(self._silent_sources) < 2 and (self._answering - self._silent_sources or self._fruitless_drop):
            return  # one meter is silent, not the link
        self._silent = 0
        self._silent_sources.clear()
        self._fruitless_drop = True
        self._stats.half_open_resets += 1
        self._drop(f"no reply to {self._no_reply_limit} consecutive requests on an open link")


_PEER_CLOSED = "closed by peer"

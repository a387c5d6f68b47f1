"""Per-bus transaction scheduling: one transaction at a time on each physical bus.

A Bus is a priority lock plus counters, not a task, so a process can hold hundreds of them.
Drivers that frame raw bytes use ``exchange`` (request bytes + a protocol-specific reply matcher);
drivers whose library owns the I/O (pymodbus) wrap each transaction in ``run``. Both take a
priority: a command goes next on its bus, ahead of queued polls; FIFO within a priority.
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import itertools
import logging
import math
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, TypeVar

from meter_gateway.drivers.backoff import Backoff, BackoffPolicy
from meter_gateway.drivers.errors import BadReply, DriverError, LinkDown, MeterRefused, NoAnswer
from meter_gateway.drivers.health import HealthBook, MeterOffline
from meter_gateway.drivers.transport import LinkStats, Transport

log = logging.getLogger(__name__)

R_co = TypeVar("R_co", covariant=True)
R = TypeVar("R")
T = TypeVar("T")


class Priority(enum.IntEnum):
    """Lower runs sooner."""

    COMMAND = 0  # remote disconnect / reconnect, operator actions
    POLL = 10  # scheduled readings
    BACKFILL = 20  # catching up on frozen data; yields to everything live


class Rejection(enum.StrEnum):
    ECHO = "echo"  # our own request heard back (RS-485 adapters that hear themselves)
    WRONG_ADDRESS = "wrong_address"  # a valid reply from another meter
    WRONG_FUNCTION = "wrong_function"  # right meter, wrong function code / data identifier
    GARBAGE = "garbage"  # bytes that do not form a valid frame (noise, bad checksum)
    LATE = "late"  # a reply to an earlier request of ours


@dataclass(frozen=True, slots=True)
class Rejected:
    kind: Rejection
    size: int  # bytes
    detail: str = ""


class ReplyMatcher(Protocol[R_co]):
    """Protocol-specific recognizer of the one reply a request expects (supplied by the driver).

    ``feed`` gets the bytes as they arrive and returns the accepted reply (never None) once a
    complete matching frame is in; everything it skips it records for ``take_rejections``. It may
    raise MeterRefused (the meter answered with an error: no retry) or BadReply (a matching but
    unusable reply: retried). ``reset`` is called before every attempt, retries included.
    """

    def reset(self) -> None: ...

    def feed(self, data: bytes) -> R_co | None: ...

    def take_rejections(self) -> list[Rejected]: ...


class RejectionLog:
    """Mixin for matchers: keeps the rejections until the bus takes them."""

    def __init__(self) -> None:
        self._rejections: list[Rejected] = []

    def reject(self, kind: Rejection, size: int, detail: str = "") -> None:
        self._rejections.append(Rejected(kind, size, detail))

    def take_rejections(self) -> list[Rejected]:
        out = self._rejections
        if out:  # the usual empty case allocates nothing
            self._rejections = []
        return out


class JobLink(Protocol):
    """A link whose library does the I/O (Modbus through pymodbus): the bus runs its jobs and only
    reports its figures, so its requests and bytes show in the bus's snapshot like a raw link's."""

    @property
    def stats(self) -> LinkStats: ...

    @property
    def connected(self) -> bool: ...

    @property
    def transactions(self) -> int:
        """Requests written so far."""
        ...


@dataclass(frozen=True, slots=True)
class BusSettings:
    reply_timeout: float = 1.0  # whole reply, from the request being on the wire
    attempts: int = 3  # first try included
    retry: BackoffPolicy = field(default_factory=lambda: BackoffPolicy(initial=0.1, maximum=1.0))
    inter_frame_gap: float = 0.0  # bus quiet time before we send
    max_quiet_wait: float = 1.0  # a chattering bus cannot hold a request back longer than this
    link_wait: float = 1.0  # how long into an outage transactions wait for the link to return

    def __post_init__(self) -> None:
        if self.reply_timeout <= 0 or self.attempts < 1:
            raise ValueError("bus settings need reply_timeout > 0 and attempts >= 1")
        if min(self.inter_frame_gap, self.max_quiet_wait, self.link_wait) < 0:
            raise ValueError("bus settings: gaps and waits must be >= 0")


@dataclass(slots=True)
class BusCounters:
    """Plain counters per bus, exported by the gateway (see ``Bus.snapshot``)."""

    sent: int = 0  # requests written (retries included)
    ok: int = 0  # transactions (exchanges and jobs) that ended with an answer
    retries: int = 0
    timeouts: int = 0  # attempts that ended at the deadline without an accepted reply
    echo_ignored: int = 0
    mismatched: int = 0  # replies for another address or function
    garbage_bytes: int = 0
    stale_bytes_flushed: int = 0
    late_replies: int = 0
    link_down: int = 0  # transactions failed because the link was down
    no_answer: int = 0  # transactions failed with NoAnswer after all attempts
    bad_reply: int = 0  # transactions failed with BadReply after all attempts
    refused: int = 0  # the meter answered with an error
    offline_skipped: int = 0  # failed fast: meter offline, not due for a probe
    probes: int = 0  # single attempts on offline meters
    jobs: int = 0  # run() jobs started
    jobs_failed: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class _PriorityGate:
    """A lock granted by (priority, arrival order); cancelled waiters are skipped."""

    def __init__(self) -> None:
        self._held = False
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    @property
    def waiting(self) -> int:
        return sum(1 for *_, f in self._waiters if not f.done())

    def try_acquire(self) -> bool:
        """Take the gate at once if it is free and nobody queues; no await, no allocation."""
        if self._held or self._waiters:
            return False
        self._held = True
        return True

    async def acquire(self, priority: int) -> None:
        if self.try_acquire():
            return
        fut = self.enqueue(asyncio.get_running_loop(), priority)
        try:
            await fut
        except asyncio.CancelledError:
            self.abandon(fut)
            raise

    def enqueue(self, loop: asyncio.AbstractEventLoop, priority: int) -> asyncio.Future[None]:
        """Queue for the gate: the future resolves when it is ours (``acquire`` without a coroutine)."""
        fut: asyncio.Future[None] = loop.create_future()
        heapq.heappush(self._waiters, (priority, next(self._order), fut))
        return fut

    def abandon(self, fut: asyncio.Future[None]) -> None:
        """The waiter of ``fut`` was cancelled: if the gate was handed to it meanwhile, pass it on."""
        if fut.done() and not fut.cancelled():
            self.release()

    def release(self) -> None:
        while self._waiters:
            fut = heapq.heappop(self._waiters)[2]
            if not fut.done():
                fut.set_result(None)  # ownership moves; _held stays True
                return
        self._held = False


class Bus:
    """One physical bus. ``transport`` is required for ``exchange``/``send``, not for ``run``."""

    def __init__(
        self,
        name: str,
        transport: Transport | None = None,
        *,
        settings: BusSettings | None = None,
        health: HealthBook | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.name = name
        self.transport = transport
        self.settings = settings or BusSettings()
        self.health = health
        self.counters = BusCounters()
        self._gate = _PriorityGate()
        self._rng = rng  # None: the shared jitter generator (drivers.backoff)
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop we run in (see _admit)
        self._last_tx_end = -math.inf  # loop time our last request left the wire
        self._last_job_end = -math.inf
        self._closed = False
        # called with the seconds from request written to accepted reply (for a job: its duration)
        self.on_latency: Callable[[float], None] | None = None
        # the running exchange's state, fed by _consume_bytes
        self._matcher: ReplyMatcher[Any] | None = None
        self._reply: Any = None
        self._heard = False
        self._bad: list[str] = []  # descriptions of the rejections that mean a bad reply
        self._consume = self._consume_bytes  # bound once
        # the link a job-only bus's library drives (set by whoever builds it), for snapshot()
        self.job_link: JobLink | None = None

    def __repr__(self) -> str:
        return f"<Bus {self.name} queued={self.queued}>"

    @property
    def queued(self) -> int:
        return self._gate.waiting

    def snapshot(self) -> dict[str, int]:
        """Counters (and the link's, prefixed ``link_``) as plain data for export."""
        out = self.counters.as_dict()
        out["queued"] = self.queued
        link: Transport | JobLink | None = self.transport
        if link is None and self.job_link is not None:
            link = self.job_link
            out["sent"] += self.job_link.transactions  # its library writes the requests, not we
        if link is not None:
            out.update({f"link_{k}": v for k, v in link.stats.as_dict().items()})
            out["link_connected"] = int(link.connected)
        return out

    async def open(self) -> bool:
        self._closed = False
        return await self.transport.open() if self.transport is not None else True

    async def close(self) -> None:
        self._closed = True
        if self.transport is not None:
            await self.transport.close()

    # -- public API -------------------------------------------------------------------------

    async def exchange(
        self,
        request: bytes,
        matcher: ReplyMatcher[R],
        *,
        meter: str | None = None,
        priority: int = Priority.POLL,
        reply_timeout: float | None = None,
        attempts: int | None = None,
        force: bool = False,
    ) -> R:
        """Send ``request`` and return the reply ``matcher`` accepts.

        Raises NoAnswer / BadReply after all attempts, MeterRefused at once, LinkDown, and
        MeterOffline (without sending) for an offline meter that is not due for a probe unless
        ``force`` (operator commands). ``meter`` keys the health book.
        """
        # the hot path of every poll: plain acquire/release rather than an async context manager
        self._admit(meter, force)
        loop = self._loop
        assert loop is not None  # noted by _admit
        gate = self._gate
        if not gate.try_acquire():
            fut = gate.enqueue(loop, priority)
            try:
                await fut
            except asyncio.CancelledError:
                gate.abandon(fut)
                raise
        try:
            probing = self._begin(meter, force)
            tries = 1 if probing else (attempts or self.settings.attempts)
            limit = reply_timeout or self.settings.reply_timeout
            try:
                # the attempts run inline: one coroutine level less on every wake-up of the caller
                backoff: Backoff | None = None  # only a retry needs one
                failure: DriverError | None = None
                reply: R | None = None
                self._matcher = matcher
                bad = self._bad
                consume = self._consume
                for attempt in range(tries):
                    if attempt:
                        self.counters.retries += 1
                        if backoff is None:
                            backoff = Backoff(self.settings.retry, rng=self._rng)
                        await asyncio.sleep(backoff.next())
                    transport = self.transport
                    if transport is None or not transport.connected:
                        transport = await self._link()
                    if self.settings.inter_frame_gap > 0:
                        await self._quiet(transport)
                    self.counters.stale_bytes_flushed += transport.flush_input()
                    matcher.reset()
                    self._reply, self._heard = None, False
                    bad.clear()
                    try:
                        await transport.write(request)
                        self._sent(transport, request)
                        # the deadline is fixed from the request being on the wire: dribbling cannot extend it
                        await transport.read_until(consume, self._last_tx_end + limit)
                    except MeterRefused:
                        transport.note_reply()
                        raise
                    except BadReply as e:
                        transport.note_reply()  # something answered: the link is alive
                        failure = e
                        continue
                    except LinkDown as e:
                        if attempt + 1 == tries:
                            raise
                        log.debug("bus %s: %s; retrying", self.name, e)
                        continue
                    # any byte heard (even an echo or a late reply) shows the link itself is alive
                    if self._heard:
                        transport.note_reply()
                    else:
                        transport.note_silence()
                    reply = self._reply
                    if reply is not None:
                        if self.on_latency is not None:
                            self.on_latency(loop.time() - self._last_tx_end)
                        self.counters.ok += 1
                        self._record(meter, None)
                        return reply
                    self.counters.timeouts += 1
                    if bad:
                        failure = BadReply(
                            f"bus {self.name}: no valid matching reply within {limit:.2f} s ({', '.join(bad)})"
                        )
                    else:
                        failure = NoAnswer(f"bus {self.name}: no reply within {limit:.2f} s")
                raise failure or NoAnswer(f"bus {self.name}: no reply")
            except DriverError as e:
                self._account_failure(meter, e)
                raise
        finally:
            self._matcher = self._reply = None
            gate.release()

    def _consume_bytes(self, data: bytes) -> bool:
        """The consumer of an exchange: the link calls it from data_received (no wake-up per
        chunk). Its state lives on the bus, which runs one transaction at a time, rather than in
        a closure and cells made for every transaction."""
        self._heard = True
        matcher = self._matcher
        assert matcher is not None  # set for as long as an exchange runs
        try:
            reply = self._reply = matcher.feed(data)
        finally:
            rejections = matcher.take_rejections()
            if rejections:
                self._bad.extend(self._describe(r) for r in rejections if self._count_rejection(r))
        return reply is not None

    async def send(self, request: bytes, *, priority: int = Priority.POLL) -> None:
        """Send a request that gets no reply (a broadcast), honouring gap and flush."""
        async with self._turn(None, priority, force=True):
            try:
                transport = await self._link()
                await self._quiet(transport)
                self.counters.stale_bytes_flushed += transport.flush_input()
                await self._write(transport, request)
            except LinkDown:
                self.counters.link_down += 1
                raise

    async def run(
        self,
        job: Callable[[], Awaitable[T]],
        *,
        meter: str | None = None,
        priority: int = Priority.POLL,
        force: bool = False,
    ) -> T:
        """Run ``job()`` with the bus held (for drivers whose library owns the I/O)."""
        async with self._turn(meter, priority, force):
            await self._quiet(self.transport)
            self.counters.jobs += 1
            loop = self._loop
            assert loop is not None  # noted by _turn
            started = loop.time()
            try:
                result = await job()
            except DriverError as e:
                self.counters.jobs_failed += 1
                self._account_failure(meter, e)
                raise
            finally:
                self._last_job_end = loop.time()
            self.counters.ok += 1
            self._record(meter, None)
            if self.on_latency is not None:
                self.on_latency(loop.time() - started)
            return result

    # -- internals ------------------------------------------------------------------------

    @asynccontextmanager
    async def _turn(self, meter: str | None, priority: int, force: bool) -> AsyncIterator[bool]:
        """Hold the bus for one transaction; yield whether it is a probe of an offline meter."""
        self._admit(meter, force)
        await self._gate.acquire(priority)
        try:
            yield self._begin(meter, force)
        finally:
            self._gate.release()

    def _admit(self, meter: str | None, force: bool) -> None:
        """Fail fast, before queueing behind others: a closed bus, an offline meter not due.

        Also notes the running loop: on Python 3.11 every asyncio.get_running_loop() is a getpid()
        system call, and the hot path would make several per transaction."""
        loop = self._loop
        if loop is None or loop.is_closed():
            self._loop = asyncio.get_running_loop()
        if self._closed:
            raise LinkDown(f"bus {self.name} is closed")
        if meter is None or self.health is None or force:
            return
        try:
            self.health.check(meter)
        except MeterOffline:
            self.counters.offline_skipped += 1
            raise

    def _begin(self, meter: str | None, force: bool) -> bool:
        """With the bus held: whether this transaction is a probe of an offline meter."""
        if meter is None or self.health is None or force:
            return False
        try:
            probing = self.health.begin(meter)
        except MeterOffline:
            self.counters.offline_skipped += 1
            raise
        if probing:
            self.counters.probes += 1
        return probing

    @staticmethod
    def _describe(r: Rejected) -> str:
        return f"{r.kind}{': ' + r.detail if r.detail else ''}"

    def _count_rejection(self, r: Rejected) -> bool:
        """Count one rejection; return True if it means a bad reply rather than silence."""
        c = self.counters
        if r.kind is Rejection.ECHO:
            c.echo_ignored += 1
            return False
        if r.kind is Rejection.LATE:
            c.late_replies += 1
            return False
        if r.kind is Rejection.GARBAGE:
            c.garbage_bytes += r.size
        else:
            c.mismatched += 1
        return True

    async def _link(self) -> Transport:
        transport = self.transport
        if transport is None:
            raise LinkDown(f"bus {self.name} has no transport for raw exchanges")
        if transport.connected:
            return transport
        # wait for a reconnect only early in an outage; later, fail fast so the queue drains
        now = asyncio.get_running_loop().time()
        since = transport.down_since
        remaining = (since if since is not None else now) + self.settings.link_wait - now
        if remaining > 0 and await transport.wait_connected(remaining):
            return transport
        raise LinkDown(f"bus {self.name}: link {transport.name} is down")

    async def _write(self, transport: Transport, request: bytes) -> None:
        await transport.write(request)
        self._sent(transport, request)

    def _sent(self, transport: Transport, request: bytes) -> None:
        self.counters.sent += 1
        self._last_tx_end = self._loop.time() + transport.tx_time(len(request))  # type: ignore[union-attr]  # set by _admit

    async def _quiet(self, transport: Transport | None) -> None:
        """Wait until the bus has been quiet for the inter-frame gap (bounded by max_quiet_wait)."""
        gap = self.settings.inter_frame_gap
        if gap <= 0:
            return
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.settings.max_quiet_wait
        while True:
            last = max(self._last_tx_end, self._last_job_end, transport.last_rx if transport else -math.inf)
            now = loop.time()
            wait = min(last + gap, give_up) - now
            if wait <= 0:
                return
            await asyncio.sleep(wait)

    def _account_failure(self, meter: str | None, e: DriverError) -> None:
        c = self.counters
        if isinstance(e, LinkDown):
            c.link_down += 1
        elif isinstance(e, MeterRefused):
            c.refused += 1
        elif isinstance(e, BadReply):
            c.bad_reply += 1
        elif isinstance(e, NoAnswer) and not isinstance(e, MeterOffline):
            c.no_answer += 1
        self._record(meter, e)

    def _record(self, meter: str | None, e: DriverError | None) -> None:
        if meter is not None and self.health is not None:
            self.health.record(meter, e)

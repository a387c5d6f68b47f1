"""One physical bus: its turn lock, its transaction engine, its counters and its meters' health.

A Bus is a lock plus counters, not a task, so a process can hold hundreds of them. Drivers that
frame raw bytes use ``exchange`` (request bytes + the protocol's sans-I/O reply exchange, see
:mod:`protocols.exchange`); drivers whose library owns the I/O (pymodbus) wrap each transaction
in ``run``. Both take a priority (:class:`~drivers.turn_lock.Priority`): a command goes next on
its bus, ahead of queued polls; FIFO within a priority.

The bus adds the meters' health to what its parts do: a meter the health book holds offline fails
fast without touching the wire until it is due for a probe (a single attempt), and every outcome
is recorded.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from meter_gateway.drivers.bus_counters import BusCounters
from meter_gateway.drivers.errors import BadReply, DriverError, LinkDown, MeterRefused, NoAnswer
from meter_gateway.drivers.health import HealthBook, MeterOffline
from meter_gateway.drivers.transaction import BusSettings, TransactionEngine
from meter_gateway.drivers.transport import Transport
from meter_gateway.drivers.turn_lock import Priority, TurnLock
from meter_gateway.protocols.exchange import ReplyExchange

__all__ = ["Bus", "BusCounters", "BusSettings", "Priority"]

R = TypeVar("R")
T = TypeVar("T")


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
        self.settings = settings or BusSettings()
        self.health = health
        self.counters = BusCounters()
        self.turns = TurnLock()
        self.engine = TransactionEngine(name, transport, self.settings, self.counters, rng=rng)
        self._closed = False
        # counts a protocol keeps per bus beyond the engine's (Modbus exception replies by code),
        # exported with the bus's snapshot
        self.protocol_counters: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"<Bus {self.name} queued={self.queued}>"

    @property
    def transport(self) -> Transport | None:
        return self.engine.transport

    @property
    def on_latency(self) -> Callable[[float], None] | None:
        """Called with the seconds from request written to accepted reply (for a job: its duration)."""
        return self.engine.on_latency

    @on_latency.setter
    def on_latency(self, callback: Callable[[float], None] | None) -> None:
        self.engine.on_latency = callback

    @property
    def queued(self) -> int:
        return self.turns.waiting

    def snapshot(self) -> dict[str, int]:
        """Counters (and the link's, prefixed ``link_``) as plain data for export."""
        out = self.counters.as_dict()
        out["queued"] = self.queued
        out.update(self.protocol_counters)
        link = self.transport
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
        exchange: ReplyExchange[R],
        *,
        meter: str | None = None,
        priority: int = Priority.POLL,
        reply_timeout: float | None = None,
        attempts: int | None = None,
        force: bool = False,
    ) -> R:
        """Send ``request`` and return the reply ``exchange`` accepts.

        Raises NoAnswer / BadReply after all attempts, MeterRefused at once, LinkDown, and
        MeterOffline (without sending) for an offline meter that is not due for a probe unless
        ``force`` (operator commands). ``meter`` keys the health book.
        """
        self._admit(meter, force)
        await self.turns.acquire(priority)
        try:
            probing = self._begin(meter, force)
            try:
                reply = await self.engine.transact(
                    request,
                    exchange,
                    attempts=1 if probing else (attempts or self.settings.attempts),
                    reply_timeout=reply_timeout or self.settings.reply_timeout,
                    source=meter,
                )
            except DriverError as e:
                self._account_failure(meter, e)
                raise
            self._record(meter, None)
            return reply
        finally:
            self.turns.release()

    async def send(self, request: bytes, *, priority: int = Priority.POLL) -> None:
        """Send a request that gets no reply (a broadcast), honouring gap and flush."""
        self._admit(None, True)
        async with self.turns.turn(priority):
            try:
                await self.engine.send(request)
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
        self._admit(meter, force)
        async with self.turns.turn(priority):
            self._begin(meter, force)
            await self.engine.quiet()
            self.counters.jobs += 1
            loop = asyncio.get_running_loop()
            started = loop.time()
            try:
                result = await job()
            except DriverError as e:
                self.counters.jobs_failed += 1
                self._account_failure(meter, e)
                raise
            finally:
                self.engine.job_ended()
            self.counters.ok += 1
            self._record(meter, None)
            if self.on_latency is not None:
                self.on_latency(loop.time() - started)
            return result

    # -- health ---------------------------------------------------------------------------

    def _admit(self, meter: str | None, force: bool) -> None:
        """Fail fast, before queueing behind others: a closed bus, an offline meter not due."""
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

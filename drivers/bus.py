"""One physical bus: its turn lock, its transaction engine, its counters and its meters' health.

A Bus is a lock plus counters, not a task, so a process can hold hundreds of them. Every driver
(DL/T 645, DL/T 698.45, CJ/T 188, Modbus) sends through ``exchange``: request bytes plus the
protocol's sans-I/O reply exchange (see :mod:`protocols.exchange`). It takes a priority
(:class:`~drivers.turn_lock.Priority`): a command goes next on its bus, ahead of queued polls;
FIFO within a priority.

The bus adds the meters' health to what its parts do: a meter the health book holds offline fails
fast without touching the wire until it is due for a probe (a single attempt), and every outcome
is recorded.

Between transactions the line is idle, and a protocol whose meters speak on their own (DL/T
698.45 logins, heartbeats and reports) can listen to it (:meth:`Bus.listen`): input that arrives
while no turn is held, or is left over when the last turn ends, goes at once to the listener's
sans-I/O ``hear`` (what it rejects is counted as a transaction's rejections are), and its ``serve``
then answers through ordinary turns. The turn lock decides who owns the line: bytes arriving while
a turn is held belong to that transaction, so a poll never races the listener.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from meter_gateway.drivers.bus_counters import BusCounters
from meter_gateway.drivers.errors import BadReply, DriverError, LinkDown, MeterRefused, NoAnswer
from meter_gateway.drivers.health import HealthBook, MeterOffline
from meter_gateway.drivers.log_limit import log_limited, logfmt_value
from meter_gateway.drivers.transaction import BusSettings, TransactionEngine
from meter_gateway.drivers.transport import Transport
from meter_gateway.drivers.turn_lock import Priority, TurnLock
from meter_gateway.protocols.exchange import Rejected, ReplyExchange

__all__ = ["Bus", "BusCounters", "BusSettings", "LineListener", "Priority"]

log = logging.getLogger(__name__)

R = TypeVar("R")


class LineListener(Protocol):
    """What hears a bus's idle line (see the module docstring); one per bus."""

    @property
    def pending(self) -> bool:
        """Something heard waits to be served."""
        ...

    def hear(self, data: bytes) -> Sequence[Rejected]:
        """Bytes that arrived with no transaction running (sans-I/O: keep what is for the
        listener); what they hold that is not for it, for the bus's counters."""
        ...

    async def serve(self) -> None:
        """Answer and hand on what was heard, until nothing is pending (one call at a time)."""
        ...


class Bus:
    """One physical bus. ``transport`` is required for ``exchange``/``send`` (a bus without one
    serves only its health checks: tools that plan without a wire)."""

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
        self._listener: LineListener | None = None
        self._serving: asyncio.Task[None] | None = None
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
        """Called with the seconds from request written to accepted reply."""
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
        serving = self._serving
        if serving is not None:
            serving.cancel()
        if self.transport is not None:
            await self.transport.close()

    # -- the idle line --------------------------------------------------------------------------

    def listen(self, listener: LineListener | None) -> None:
        """Give what arrives on the idle line to ``listener`` (None: stop; input waits for the
        next transaction's flush again)."""
        self._listener = listener
        hook = None if listener is None else self._hear_idle
        self.turns.on_free = hook
        if self.transport is not None:
            self.transport.on_input = hook
            self.transport.on_stale = None if listener is None else self._hear
        if hook is not None:
            hook()  # input already waiting

    def _hear(self, data: bytes) -> None:
        """Give ``data`` to the listener (with the turn free, or as a transaction's stale input)."""
        listener = self._listener
        if listener is None:
            return
        try:
            self.engine.trace_rx(data)
            for rejected in listener.hear(data):
                self.counters.rejected(rejected)
        except Exception as e:  # a listener bug must not break the link's callbacks or a transaction
            log_limited(
                log,
                logging.ERROR,
                f"idle_listener:{self.name}",
                "event=idle_listener_failed bus=%s error=%s",
                logfmt_value(self.name),
                logfmt_value(repr(e)),
                exc_info=True,
            )

    def _hear_idle(self) -> None:
        """Input arrived, or the last turn ended: with no turn held, the listener takes it."""
        listener, transport = self._listener, self.engine.transport
        if listener is None or transport is None or self.turns.held:
            return
        data = transport.take_input()
        if data:
            self._hear(data)
        if listener.pending and self._serving is None and not self._closed:
            self._serving = asyncio.get_running_loop().create_task(
                self._serve(listener), name=f"bus {self.name} unsolicited"
            )

    async def _serve(self, listener: LineListener) -> None:
        try:
            await listener.serve()
        except Exception as e:  # logged; the next input starts a fresh serve
            log_limited(
                log,
                logging.ERROR,
                f"idle_serve:{self.name}",
                "event=idle_serve_failed bus=%s error=%s",
                logfmt_value(self.name),
                logfmt_value(repr(e)),
                exc_info=True,
            )
        finally:
            self._serving = None

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

"""The turn lock of one wire: one transaction at a time, commands ahead of polls.

The bus (:mod:`drivers.bus`) takes a turn before each request and gives it back after the reply,
whatever the protocol. Turns are granted
by (priority, arrival order): a command goes next, ahead of queued polls; FIFO within a priority.
A waiter that is cancelled gives up its place, or passes the turn on if it was just handed one.

Between turns the line belongs to whoever listens to it idle (``on_free``: the bus hands input
that arrived meanwhile to a protocol that hears unsolicited frames, see :meth:`drivers.bus.Bus.listen`).
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

__all__ = ["Priority", "TurnLock"]


class Priority(enum.IntEnum):
    """Lower runs sooner."""

    COMMAND = 0  # remote disconnect / reconnect, operator actions
    POLL = 10  # scheduled readings
    BACKFILL = 20  # catching up on frozen data; yields to everything live


class TurnLock:
    def __init__(self) -> None:
        self._held = False
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()
        # called when the lock falls free (no waiter took the turn); None: nobody listens idle
        self.on_free: Callable[[], None] | None = None

    @property
    def held(self) -> bool:
        """A turn is running or being handed to a waiter: the line is not idle."""
        return self._held

    @property
    def waiting(self) -> int:
        """Transactions queued for a turn."""
        return sum(1 for *_, f in self._waiters if not f.done())

    async def acquire(self, priority: int) -> None:
        if not self._held and not self._waiters:
            self._held = True
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (priority, next(self._order), fut))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # the turn was handed to us as we were cancelled: pass it on
            raise

    def release(self) -> None:
        while self._waiters:
            fut = heapq.heappop(self._waiters)[2]
            if not fut.done():
                fut.set_result(None)  # the turn moves to this waiter; the lock stays held
                return
        self._held = False
        if self.on_free is not None:
            self.on_free()

    @asynccontextmanager
    async def turn(self, priority: int) -> AsyncIterator[None]:
        """Hold the wire for one transaction."""
        await self.acquire(priority)
        try:
            yield
        finally:
            self.release()

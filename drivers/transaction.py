"""The transaction engine of one wire: a request out, the reply the protocol's exchange accepts back.

The engine owns what every framed protocol needs around a request and nothing protocol-specific:

* waiting briefly for a link that is down (early in an outage only, so queues drain later);
* the inter-frame gap (bus quiet time, measured from the last byte either way) before sending;
* flushing stale input before every attempt (the transport's ``on_stale``, the bus's idle
  listener, hears what had arrived);
* the deadline, fixed when the request is on the wire, so a dribbling peer cannot extend it;
* retries with jittered backoff after silence, an unusable reply or a lost link; none after a
  refusal (the meter answered), nor after a reply still arriving at its deadline (a dribbling
  meter: its turn ends there, even if its previous trickle's tail reached the window first);
* counting what the exchange rejected, and telling the link whether anything answered (its
  half-open detection).

What the bytes mean is the exchange's business (:mod:`protocols.exchange`). The caller holds the
wire's turn (:mod:`drivers.turn_lock`) while a transaction runs.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from meter_gateway.drivers.backoff import Backoff, BackoffPolicy
from meter_gateway.drivers.bus_counters import BusCounters
from meter_gateway.drivers.errors import BadReply, DriverError, LinkDown, MeterRefused, NoAnswer
from meter_gateway.drivers.log_limit import logfmt_value
from meter_gateway.drivers.transport import Transport
from meter_gateway.protocols.exchange import Answer, Refusal, Rejected, ReplyExchange, Unusable, Verdict

__all__ = ["BusSettings", "TransactionEngine"]

log = logging.getLogger(__name__)
# Every frame on the wire, as a sniffer shows it: for ``--log-level DEBUG`` (every bus) or a bus's
# ``trace = true`` (that bus only, whatever the level: those records bypass the level check).
trace_log = logging.getLogger("meter_gateway.trace")

R = TypeVar("R")

# Line silence that ends a reply which overran its deadline (a quarter of the reply timeout at
# most). A peer pausing longer between bytes is cut off anyway; the next exchange rejects its
# late bytes.
TAIL_SETTLE = 0.1


def _settle(reply_timeout: float) -> float:
    return min(TAIL_SETTLE, reply_timeout / 4)


_NOBODY: object = object()  # no meter's trickle is known to be on the line


@dataclass(frozen=True, slots=True)
class BusSettings:
    reply_timeout: float = 1.0  # whole reply, from the request being on the wire
    attempts: int = 3  # first try included
    retry: BackoffPolicy = field(default_factory=lambda: BackoffPolicy(initial=0.1, maximum=1.0))
    inter_frame_gap: float = 0.0  # bus quiet time before we send
    max_quiet_wait: float = 1.0  # a chattering bus cannot hold a request back longer than this
    link_wait: float = 1.0  # how long into an outage transactions wait for the link to return
    trace: bool = False  # log every frame of this bus even when DEBUG is off

    def __post_init__(self) -> None:
        if self.reply_timeout <= 0 or self.attempts < 1:
            raise ValueError("bus settings need reply_timeout > 0 and attempts >= 1")
        if min(self.inter_frame_gap, self.max_quiet_wait, self.link_wait) < 0:
            raise ValueError("bus settings: gaps and waits must be >= 0")


class _Listener(Generic[R]):
    """What one attempt hears: fed by the link as bytes arrive, until a verdict."""

    __slots__ = ("bad", "counters", "exchange", "heard", "in_frame", "verdict")

    def __init__(self, exchange: ReplyExchange[R], counters: BusCounters) -> None:
        self.exchange = exchange
        self.counters = counters
        self.heard = False  # any byte, even an echo or a late reply, shows the link is alive
        self.verdict: Verdict[R] | None = None
        self.bad: list[str] = []  # the rejections that mean a bad reply rather than silence
        # The bytes heard last were taken in without a rejection: the exchange holds the start of
        # a frame (or its wake-up bytes), so a reply is arriving. Whatever was rejected before
        # (the tail of an earlier trickle, a burst of noise) does not change that.
        self.in_frame = False

    def feed(self, data: bytes) -> bool:
        self.heard = True
        events = self.exchange.receive(data)
        self.in_frame = not events
        for event in events:
            if isinstance(event, Rejected):
                if self.counters.rejected(event):
                    self.bad.append(str(event))
            else:
                self.verdict = event
                return True
        return False


class TransactionEngine:
    """Runs the transactions of one wire (see the module docstring). With ``transport`` None every
    transaction fails with LinkDown (a bus built only to plan, with no wire)."""

    def __init__(
        self,
        name: str,
        transport: Transport | None,
        settings: BusSettings,
        counters: BusCounters,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.name = name
        self.transport = transport
        self.settings = settings
        self.counters = counters
        self._rng = rng  # None: the shared jitter generator (drivers.backoff)
        # called with the seconds from request written to accepted reply
        self.on_latency: Callable[[float], None] | None = None
        self._last_tx_end = -math.inf  # loop time our last request left the wire
        # the meter whose reply was still trickling in when its turn ended, while the line has not
        # been quiet since (_NOBODY when none): its bytes may run on into later windows
        self._trickler: object = _NOBODY

    async def transact(
        self,
        request: bytes,
        exchange: ReplyExchange[R],
        *,
        attempts: int,
        reply_timeout: float,
        source: object = None,
    ) -> R:
        """Send ``request`` until ``exchange`` accepts a reply; return that reply. ``source`` (the
        meter asked) lets the link's half-open detection tell a silent meter from a dead link.

        Raises NoAnswer / BadReply after ``attempts``, MeterRefused at once, LinkDown when the
        link is still down on the last attempt.
        """
        failure: DriverError | None = None
        backoff: Backoff | None = None
        started = asyncio.get_running_loop().time()
        for attempt in range(attempts):
            if attempt:
                self.counters.retries += 1
                if backoff is None:
                    backoff = Backoff(self.settings.retry, rng=self._rng)
                await asyncio.sleep(backoff.next())
            # a link still down after the wait fails the transaction (awaited only when it is down:
            # this runs for every request)
            transport = self._connected() or await self._link()
            await self._quiet()
            self.counters.stale_bytes_flushed += transport.flush_input()
            if not transport.connected:  # the flush found the peer gone (one that closes after each reply)
                transport = await self._link()
            exchange.begin()
            self._forget_ended_trickle(transport, reply_timeout)
            listener: _Listener[R] = _Listener(exchange, self.counters)
            feed: Callable[[bytes], bool] = listener.feed
            if self._tracing():
                feed = self._traced(listener.feed, source, started)
            try:
                self._trace("tx", request, source, started)
                await transport.write(request)
                self._sent(transport, request)
                # the deadline is fixed from the request being on the wire: dribbling cannot extend it
                deadline = self._last_tx_end + reply_timeout
                await transport.read_until(feed, deadline)
            except LinkDown as e:  # lost while writing or waiting: the next attempt waits for it
                if attempt + 1 == attempts:
                    raise
                log.debug("event=link_lost_in_transaction bus=%s error=%s retry=true", self.name, logfmt_value(str(e)))
                continue
            if listener.heard:
                transport.note_reply(source)
            else:
                transport.note_silence(source)
            verdict = listener.verdict
            if isinstance(verdict, Answer):
                self.counters.ok += 1
                if self.on_latency is not None:
                    self.on_latency(asyncio.get_running_loop().time() - self._last_tx_end)
                return verdict.reply
            if isinstance(verdict, Refusal):
                raise MeterRefused(verdict.text, code=verdict.code, reasons=verdict.reasons, answer=verdict.answer)
            if isinstance(verdict, Unusable):
                failure = BadReply(verdict.text)
                continue
            self.counters.timeouts += 1
            if self._overran(listener, transport, deadline - _settle(reply_timeout), source):
                # a reply still arriving at its deadline (a dribbling meter): a retry would only
                # start another trickle, so its turn ends here. The rest of its turn's budget goes
                # to letting the tail pass, so the next meter's request does not collide with it.
                await self._let_tail_pass(transport, deadline + (attempts - attempt - 1) * reply_timeout, reply_timeout)
                self._trickler = _NOBODY if self._quiet_for(transport, _settle(reply_timeout)) else source
                raise NoAnswer(f"bus {self.name}: reply still arriving at the {reply_timeout:.2f} s deadline")
            if listener.bad:
                failure = BadReply(
                    f"bus {self.name}: no valid matching reply within {reply_timeout:.2f} s ({', '.join(listener.bad)})"
                )
            else:
                failure = NoAnswer(f"bus {self.name}: no reply within {reply_timeout:.2f} s")
        raise failure or NoAnswer(f"bus {self.name}: no reply")

    async def send(self, request: bytes) -> None:
        """Send a request that gets no reply (a broadcast), honouring gap and flush."""
        transport = await self._link()
        await self._quiet()
        self.counters.stale_bytes_flushed += transport.flush_input()
        self._trace("tx", request, None, asyncio.get_running_loop().time())
        await transport.write(request)
        self._sent(transport, request)

    async def _quiet(self) -> None:
        """Wait until the bus has been quiet for the inter-frame gap (bounded by max_quiet_wait)."""
        gap = self.settings.inter_frame_gap
        if gap <= 0:
            return
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.settings.max_quiet_wait
        transport = self.transport
        while True:
            last = max(self._last_tx_end, transport.last_rx if transport else -math.inf)
            wait = min(last + gap, give_up) - loop.time()
            if wait <= 0:
                return
            await asyncio.sleep(wait)

    async def _let_tail_pass(self, transport: Transport, until: float, reply_timeout: float) -> None:
        """Wait, until ``until`` at the latest, for the line to be quiet for the settle time."""
        settle = _settle(reply_timeout)
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            wait = min(transport.last_rx + settle, until) - now
            if wait <= 0:
                return
            await asyncio.sleep(wait)

    def _overran(self, listener: _Listener[R], transport: Transport, arriving_since: float, source: object) -> bool:
        """Whether the meter asked was still sending its reply at the deadline: bytes arrived up
        to it (since ``arriving_since``) and the last of them were taken in as part of a frame.

        Rejections earlier in the window do not count against it: the tail of this meter's
        previous trickle may have reached this request's window as garbage. A line noisy up to
        the deadline ends in a rejection and gets its retries; so does a meter whose window
        another meter's trickle ran into (those bytes are the other meter's, and a 68H inside
        that reply looks like the start of a frame)."""
        return listener.in_frame and transport.last_rx >= arriving_since and self._trickler in (_NOBODY, source)

    def _forget_ended_trickle(self, transport: Transport, reply_timeout: float) -> None:
        """Before a request: a trickle that ended (the line quiet since) runs into no later window."""
        if self._trickler is not _NOBODY and self._quiet_for(transport, _settle(reply_timeout)):
            self._trickler = _NOBODY

    @staticmethod
    def _quiet_for(transport: Transport, settle: float) -> bool:
        """Whether nothing has arrived on the line for ``settle`` seconds."""
        return asyncio.get_running_loop().time() - transport.last_rx >= settle

    def _connected(self) -> Transport | None:
        transport = self.transport
        return transport if transport is not None and transport.connected else None

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

    # -- frame trace ----------------------------------------------------------------------------

    def _tracing(self) -> bool:
        return self.settings.trace or trace_log.isEnabledFor(logging.DEBUG)

    def _trace(self, direction: str, data: bytes, meter: object, started: float) -> None:
        if not self._tracing():
            return
        elapsed = (asyncio.get_running_loop().time() - started) * 1000
        who = logfmt_value("-" if meter is None else str(meter))
        record = trace_log.makeRecord(
            trace_log.name,
            logging.DEBUG,
            __file__,
            0,
            'event=frame dir=%s bus=%s meter=%s t=+%.1fms len=%d hex="%s"',
            (direction, logfmt_value(self.name), who, elapsed, len(data), data.hex(" ")),
            None,
        )
        # handle(), not log(): a traced bus's frames pass whatever level the process runs at
        trace_log.handle(record)

    def trace_rx(self, data: bytes) -> None:
        """Trace input heard outside any transaction (the idle line's, see ``Bus.listen``)."""
        if self._tracing():
            self._trace("rx", data, None, asyncio.get_running_loop().time())

    def _traced(self, feed: Callable[[bytes], bool], meter: object, started: float) -> Callable[[bytes], bool]:
        def traced(data: bytes) -> bool:
            self._trace("rx", data, meter, started)
            return feed(data)

        return traced

    def _sent(self, transport: Transport, request: bytes) -> None:
        self.counters.sent += 1
        self._last_tx_end = asyncio.get_running_loop().time() + transport.tx_time(len(request))

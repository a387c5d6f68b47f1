"""Meter events to MQTT: what meters send unasked, on ``{prefix}/v1/{gw}/meters/{id}/events``.

A driver that can receive unsolicited frames has an ``on_event`` attribute (DL/T 698.45: REPORT-
Notification, FollowReport, LINK login/logout); the fleet sets it to :meth:`MeterEvents.listener`
for its meter. The driver has already answered the meter (REPORT-Response, LINK-Response) when
it calls back, so the callback only queues: it never blocks a bus. :meth:`MeterEvents.run`
publishes the queue in order through the uplink's public ``publish`` (QoS 1, not retained) and,
while the broker is away, keeps up to ``backlog`` events in memory, retrying with backoff; beyond
that the oldest are dropped and counted (``stats.dropped``, one warning line per burst). Events
are not persisted: a meter's event log (its own records) is the durable copy. An event's
``detail`` comes from its protocol's ``describe_event`` in :mod:`drivers.registry`, if it has one.

Heartbeats (LINK-Request type 1) say only "still here" every minute or so and are not published.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

from meter_gateway.drivers import registry
from meter_gateway.drivers.backoff import Backoff, BackoffPolicy
from meter_gateway.drivers.log_limit import logfmt_value
from meter_gateway.gateway.uplink.contract import CONTRACT_VERSION, MeterEvent, Topics, encode_meter_event

__all__ = ["DEFAULT_BACKLOG", "EventStats", "MeterEvents"]

log = logging.getLogger("meter_gateway")

DEFAULT_BACKLOG: Final = 1000
RETRY: Final = BackoffPolicy(1.0, 30.0)  # while the broker is away
HEARTBEAT: Final = 1  # LINK-Request type: 0 login, 1 heartbeat, 2 logout (DL/T 698.45 8.4)

Publish = Callable[[str, bytes], Awaitable[bool]]


@dataclass
class EventStats:
    received: int = 0
    published: int = 0
    dropped: int = 0  # pushed out of a full backlog while the broker was away
    skipped: int = 0  # heartbeats, not published


class MeterEvents:
    """The queue of meter events and its publisher (see the module doc)."""

    def __init__(
        self,
        topics: Topics,
        publish: Publish,
        *,
        clock: Callable[[], float] = time.time,
        backlog: int = DEFAULT_BACKLOG,
        retry: BackoffPolicy = RETRY,
    ) -> None:
        self.topics = topics
        self._publish = publish
        self.clock = clock
        self.stats = EventStats()
        self._queue: collections.deque[tuple[str, bytes]] = collections.deque()
        self._backlog = backlog
        self._retry = retry
        self._wake = asyncio.Event()
        self._dropping = False

    def listener(self, meter_id: str, protocol: str) -> Callable[[Any], None]:
        """The ``on_event`` callback for one meter's driver."""
        topic = self.topics.meter_events(meter_id)

        def on_event(event: Any) -> None:
            message = self._message(meter_id, protocol, event)
            if message is not None:
                self.offer(topic, encode_meter_event(message))

        return on_event

    def _message(self, meter_id: str, protocol: str, event: Any) -> MeterEvent | None:
        self.stats.received += 1
        apdu = event.apdu
        if event.kind == "link" and getattr(apdu, "kind", None) == HEARTBEAT:
            self.stats.skipped += 1
            return None
        detail: dict[str, Any] | None = None
        info = registry.PROTOCOLS.get(protocol)
        describe = info.event_describer() if info is not None else None
        if describe is not None:
            try:
                detail = describe(apdu)
            except Exception as exc:  # the raw APDU still goes out; the decode is a convenience
                log.debug("event=meter_event_undescribed meter=%s error=%s", logfmt_value(meter_id), logfmt_value(exc))
        return MeterEvent(
            v=CONTRACT_VERSION,
            gateway=self.topics.gateway_id,
            meter=meter_id,
            protocol=protocol,
            kind=event.kind,
            at=self.clock(),
            service=type(apdu).__name__,
            apdu=bytes(event.frame.apdu).hex().upper(),
            detail=detail,
        )

    def offer(self, topic: str, payload: bytes) -> None:
        """Queue one event for publishing; the oldest goes when the backlog is full."""
        if len(self._queue) >= self._backlog:
            self._queue.popleft()
            self.stats.dropped += 1
            if not self._dropping:
                self._dropping = True
                log.warning("event=meter_events_dropped backlog=%d reason='broker unreachable'", self._backlog)
        self._queue.append((topic, payload))
        self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._queue)

    async def run(self, stop: asyncio.Event) -> None:
        """Publish queued events in order until ``stop``; an unconfirmed one is retried."""
        backoff = Backoff(self._retry)
        stopped = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                if not self._queue:
                    self._wake.clear()
                    woken = asyncio.ensure_future(self._wake.wait())
                    await asyncio.wait({stopped, woken}, return_when=asyncio.FIRST_COMPLETED)
                    woken.cancel()
                    continue
                topic, payload = self._queue[0]
                if await self._publish(topic, payload):
                    if self._queue and self._queue[0][1] is payload:
                        self._queue.popleft()
                    self.stats.published += 1
                    self._dropping = False
                    backoff.reset()
                    continue
                await asyncio.wait({stopped}, timeout=backoff.next())
        finally:
            stopped.cancel()
        if self._queue:
            log.info("event=meter_events_unsent count=%d reason=stopping", len(self._queue))

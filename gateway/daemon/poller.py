"""The poller: the poll schedule's due reads, queued per bus, read and handed to the reading sink.

Polls are queued per bus and at most :data:`READS_PER_BUS` run at once on a bus (the bus does
one transaction at a time anyway): a task per due read would cost memory per meter at 10,000
meters, for nothing. A read handed out by the schedule stays owed (:meth:`Poller.cursors` never
passes its slot) until it is committed or reported as a missed slot, so a crash or a stop re-reads
it instead of skipping it. The daemon (gateway/daemon/app.py) runs :meth:`Poller.run` as its
``poller`` task and, on shutdown, waits for :attr:`Poller.in_flight` so what was read is committed.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from meter_gateway.drivers.errors import DriverError, LinkDown, PartialRead
from meter_gateway.drivers.health import HealthBook
from meter_gateway.drivers.log_limit import logfmt_value
from meter_gateway.gateway.config import Config
from meter_gateway.gateway.daemon.logs import log_limited
from meter_gateway.gateway.daemon.meters import Fleet, MeterRuntime
from meter_gateway.gateway.daemon.metrics import Metrics, missed_slot_reason
from meter_gateway.gateway.daemon.schedule import GroupPlan, MissedSlots, PollSchedule
from meter_gateway.gateway.daemon.sink import POLL, ReadingSink, SourceCounts
from meter_gateway.gateway.store.outbox import OutboxDamaged, SlotMark

if TYPE_CHECKING:
    from meter_gateway.drivers.reading import Reading

__all__ = ["COMMITS_PENDING", "PARTIAL_RETRIES", "READS_PER_BUS", "PollStats", "Poller"]

log = logging.getLogger("meter_gateway")

COMMITS_PENDING = 256  # read results waiting for the outbox at most (see Poller._commits)
# One meter read at a time per bus: its transactions follow each other from the same task, each
# request written in the loop turn that handles the reply before it. A second read waiting on the
# bus would take the bus at every hand-over and cost each transaction an extra loop turn.
READS_PER_BUS = 1
# Rounds of re-reading a partial read's failed quantities alone, only while the slot lasts. One:
# each transaction already made the bus's attempts, and a quantity a meter never answers would
# otherwise fail enough transactions in a row for the health book to take the meter offline.
PARTIAL_RETRIES = 1


class _DueRead:
    """A read handed out by the schedule, queued for its bus (``Poller._waiting``) or running
    until committed or failed (``Poller._active``). A start-up burst queues thousands of these
    at once, so one small object each, compared by identity, and the schedule's own ``slot`` int."""

    __slots__ = ("group", "meter", "slot")

    def __init__(self, meter: MeterRuntime, group: str, slot: int) -> None:
        self.meter = meter
        self.group = group
        self.slot = slot


@dataclass
class PollStats:
    reads: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    missed_slots: int = 0
    shed: int = 0  # reads not queued because their bus queue was full
    paused_slots: int = 0  # reads not issued while the outbox was over budget (pause_polling)
    partial_reads: int = 0  # reads committed with some quantities still failed after the retries
    quantities_failed: int = 0  # the quantities those reads lost
    # the reading sink's counts for live polls (frozen and command readings are counted apart)
    sunk: SourceCounts = field(default_factory=SourceCounts)

    @property
    def readings(self) -> int:
        return self.sunk.readings

    @property
    def committed(self) -> int:
        return self.sunk.committed

    def fail(self, kind: str) -> None:
        self.failures[kind] = self.failures.get(kind, 0) + 1


class Poller:
    """``note_missed`` takes slots the daily freeze may fill (the frozen job's, rebuilt on a
    reload); ``over_budget`` says whether the outbox is over its budget. ``schedule`` is set by
    the daemon before :meth:`run` (it resumes from the saved cursors and the committed slots)."""

    def __init__(
        self,
        config: Config,
        fleet: Fleet,
        health: HealthBook,
        sink: ReadingSink,
        *,
        clock: Callable[[], float],
        metrics: Metrics | None,
        note_missed: Callable[[Sequence[MissedSlots]], None],
        over_budget: Callable[[], bool],
    ) -> None:
        self.config = config
        self.fleet = fleet
        self.health = health
        self.sink = sink
        self.clock = clock
        self.metrics = metrics
        self._note_missed = note_missed
        self._over_budget = over_budget
        self.stats = PollStats(sunk=sink.counts(POLL))
        self.schedule: PollSchedule | None = None
        self._quantities = {g.name: tuple(g.quantities) for g in config.poll_groups}
        self._intervals = {g.name: int(g.interval) for g in config.poll_groups}
        self.in_flight: set[asyncio.Task[None]] = set()
        self._waiting: dict[str, collections.deque[_DueRead]] = {}
        # Reads handed out by the schedule and not yet committed or failed are queued in _waiting or
        # running in _active: the saved cursors never pass their slots, so a crash or a stop re-reads
        # them instead of skipping them. _active stays small (a read per bus, the pending commits):
        # a set never shrinks its table, so one that once held a start-up catch-up's reads keeps it.
        self._active: set[_DueRead] = set()
        # Reads whose bus turn ended and whose commit is still waiting (a drain, a slow disk): bounded,
        # or a stalled outbox would fill memory with readings; at the bound the bus waits instead.
        self._commits = asyncio.Semaphore(COMMITS_PENDING)
        self._running: dict[str, int] = {}
        self._links_down: set[str] = set()  # buses whose meters were set offline for link_down
        self._schedule_changed = False
        self.progress = time.monotonic()  # last loop turn, for the watchdog
        self.stopping = False  # no new read starts; a cancelled read stays owed
        self.paused = False  # polling paused: the outbox is over budget under pause_polling

    @property
    def intervals(self) -> dict[str, int]:
        return self._intervals

    def reload(self, config: Config) -> None:
        """A new config's groups take effect on the next loop turn (the schedule is rebuilt then,
        from the current cursors)."""
        self.config = config
        self._quantities = {g.name: tuple(g.quantities) for g in config.poll_groups}
        self._intervals = {g.name: int(g.interval) for g in config.poll_groups}
        self._schedule_changed = True
        self._links_down.clear()  # meters added on a bus that is down are set offline too

    def cursors(self) -> dict[tuple[str, str], int]:
        cursors = self.schedule.cursors() if self.schedule is not None else {}
        for item in itertools.chain(self._active, *self._waiting.values()):
            key = (item.group, item.meter.meter_id)
            if key in cursors:
                cursors[key] = min(cursors[key], item.slot)
        return cursors

    async def run(self, stop: asyncio.Event) -> None:
        assert self.schedule is not None
        polled = False
        while not stop.is_set():
            self.progress = time.monotonic()
            max_queue = self.config.limits.max_queue_per_bus
            now = self.clock()
            if self._schedule_changed:
                self._schedule_changed = False
                self.schedule = PollSchedule(GroupPlan.from_config(self.config), now, resume=self.schedule.cursors())
            schedule = self.schedule
            self._check_links()
            paused = self._pause_polling()
            for due in schedule.next_due(now):
                meter = self.fleet.meters.get(due.meter)
                if meter is None:
                    continue
                if paused:
                    self._skip_read(meter, due.group, due.slot)
                    continue
                waiting = self._waiting.setdefault(meter.bus, collections.deque())
                if len(waiting) >= max_queue:
                    self.stats.shed += 1
                    self._count_missed(meter.bus, "queue_full")
                    continue
                item = _DueRead(meter, due.group, due.slot)
                if self._running.get(meter.bus, 0) < READS_PER_BUS:
                    self._start_read(item)
                else:
                    waiting.append(item)
            missed = schedule.take_missed()
            # the first turn finds the slots whose window passed while the daemon was down
            reason = "late" if polled else "daemon_down"
            polled = True
            for m in missed:
                runtime = self.fleet.meters.get(m.meter)
                if runtime is not None:
                    self._count_missed(runtime.bus, reason, m.count)
                else:  # left the configuration since: no bus to count it on
                    self.stats.missed_slots += m.count
                log_limited(
                    log,
                    logging.WARNING,
                    f"missed_slots:{m.meter}",
                    "event=missed_slots group=%s meter=%s first=%d count=%d",
                    m.group,
                    m.meter,
                    m.first,
                    m.count,
                )
            if missed:
                self._note_missed(missed)
            wake = schedule.wake_time(now)
            # a plain sleep, at most a second: the daemon cancels this task to stop it, and a
            # reload or a stop is seen on the next turn (waiting on ``stop`` as well would cost a
            # task and a cancellation at each of the hundreds of turns a second of a large fleet)
            await asyncio.sleep(1.0 if wake is None else min(1.0, max(0.0, wake - self.clock())))

    def _check_links(self) -> None:
        """Meters behind a link that has been down (or never opened) for ``link_down_after`` go
        offline, reason link_down. Checked on the poller's turn (at least once a second), not on a
        failed read: a meter polled every 15 minutes must not look online for 15 minutes."""
        limit = self.health.policy.link_down_after
        now = asyncio.get_running_loop().time()
        down: set[str] = set()
        for name, bus in self.fleet.buses.items():
            link = bus.transport
            since = link.down_since if link is not None else None
            if since is not None and now - since >= limit:
                down.add(name)
        # only a bus newly past the limit walks the meters (10,000 of them, every second otherwise);
        # its meters cannot be read back online while it stays down
        new, self._links_down = down - self._links_down, down
        if not new:
            return
        for meter_id, meter in self.fleet.meters.items():
            if meter.bus in new:
                self.health.link_down(meter_id)

    def _count_missed(self, bus: str, reason: str, slots: int = 1) -> None:
        self.stats.missed_slots += slots
        if self.metrics is not None:
            self.metrics.count_missed(bus, reason, slots)

    def _pause_polling(self) -> bool:
        """Under ``pause_polling``, no read is issued while the outbox is over its budget: its
        readings would only be refused. Polling resumes by itself once deliveries free room."""
        paused = self.config.outbox.overflow_policy == "pause_polling" and self._over_budget()
        if paused != self.paused:
            self.paused = paused
            if paused:
                log.warning("event=polling_paused reason=outbox_over_budget skipped_so_far=%d", self.stats.paused_slots)
            else:
                log.info("event=polling_resumed skipped_slots=%d", self.stats.paused_slots)
        return paused

    def _skip_read(self, meter: MeterRuntime, group: str, slot: int) -> None:
        """A slot not read because polling is paused: a missed slot (reason ``outbox_full``) the
        daily freeze can fill, as a failed read's."""
        self.stats.paused_slots += 1
        self._count_missed(meter.bus, "outbox_full")
        interval = self._intervals.get(group)
        if interval is not None:
            self._note_missed([MissedSlots(group, meter.meter_id, slot, slot, interval)])

    def _start_read(self, item: _DueRead) -> None:
        bus = item.meter.bus
        self._running[bus] = self._running.get(bus, 0) + 1
        self._active.add(item)
        task = asyncio.create_task(self._read(item), name=f"read:{bus}")
        self.in_flight.add(task)
        task.add_done_callback(self.in_flight.discard)

    def _bus_turn_done(self, bus: str) -> None:
        self._running[bus] -= 1
        waiting = self._waiting.get(bus)
        if waiting and not self.stopping:
            if self.paused:  # queued before the pause: not issued either
                while waiting:
                    item = waiting.popleft()
                    self._skip_read(item.meter, item.group, item.slot)
            else:
                self._start_read(waiting.popleft())

    async def _read(self, item: _DueRead) -> None:
        try:
            await self._read_and_commit(item)
        finally:
            # done: committed, or failed and reported as a missed slot (a cancelled read stays owed)
            if not self.stopping or not asyncio.current_task().cancelling():  # type: ignore[union-attr]
                self._active.discard(item)

    async def _read_and_commit(self, item: _DueRead) -> None:
        meter = item.meter
        self.stats.reads += 1
        try:
            readings = await self._read_slot(item)
        except DriverError as exc:
            self._bus_turn_done(meter.bus)
            self.stats.fail(exc.kind)
            self._count_missed(meter.bus, missed_slot_reason(exc.kind))
            log.debug("event=read_failed meter=%s kind=%s detail=%s", meter.meter_id, exc.kind, exc)
            interval = self._intervals.get(item.group)
            if interval is not None:
                # a failed live read is a missed slot: the daily freeze can fill it if it is at midnight
                slot = item.slot
                self._note_missed([MissedSlots(item.group, meter.meter_id, slot, slot, interval)])
            return
        except BaseException:
            self._bus_turn_done(meter.bus)
            raise
        # the bus's turn ends with the read, not with the commit: a commit waiting behind a drain's
        # deletes must not hold the next meter's read back (the task stays in _in_flight for shutdown)
        try:
            await self._commits.acquire()
        finally:
            self._bus_turn_done(meter.bus)
        try:
            if readings:
                await self.sink.add(readings, POLL, SlotMark(item.group, meter.meter_id, item.slot))
        except OutboxDamaged:
            self.stats.fail("outbox_damaged")  # said once by the outbox; the daemon is stopping
        finally:
            self._commits.release()

    async def _read_slot(self, item: _DueRead) -> list[Reading]:
        """The slot's readings: what a partial read got, its failed quantities retried alone while
        the slot lasts; the slot counts as read. Raises what a read that got nothing raises."""
        meter = item.meter
        try:
            return await meter.read(self._quantities.get(item.group, ()), item.slot, self.clock())
        except PartialRead as partial:
            readings, failed, cause = list(partial.readings), partial.failed, partial.cause
        deadline = item.slot + self._intervals.get(item.group, 0)
        for _ in range(PARTIAL_RETRIES):
            if self.stopping or self.clock() >= deadline:
                break
            try:
                readings.extend(await meter.read(failed, item.slot, self.clock()))
                failed = ()
            except PartialRead as again:
                readings.extend(again.readings)
                failed, cause = again.failed, again.cause
            except LinkDown as exc:
                cause = exc
                break
            except DriverError as exc:
                cause = exc
            if not failed:
                break
        if failed:
            self.stats.partial_reads += 1
            self.stats.quantities_failed += len(failed)
            if self.metrics is not None:
                self.metrics.count_partial(meter.bus, len(failed))
            log_limited(
                log,
                logging.WARNING,
                f"partial_read:{meter.meter_id}",
                "event=partial_read meter=%s slot=%d failed=%s kind=%s detail=%s",
                logfmt_value(meter.meter_id),
                item.slot,
                logfmt_value(",".join(failed)),
                cause.kind,
                logfmt_value(str(cause)[:200]),
            )
        return readings

"""The daemon's lifecycle, in one place.

``Gateway.run`` opens the outbox, builds buses and meter drivers from the config, and runs one
``asyncio.TaskGroup`` of named tasks: ``uplink`` (outbox -> MQTT), ``poller`` (schedule -> bus
reads -> outbox), ``housekeeping`` (metrics, outbox age, sd_notify watchdog). Signals only set
events (``stop``, ``reload``). Shutdown runs the stages in reverse order within a budget: stop
handing out reads and let in-flight reads finish (so what was read is committed), stop the
uplink (it waits briefly for in-flight PUBACKs), close buses, close the outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from drivers.bus import Bus, Priority
from drivers.errors import DriverError
from drivers.health import HealthBook, HealthPolicy, MeterState, StateChange
from drivers.reading import Reading
from gateway.config import Config
from gateway.meters import build_buses, build_meters
from gateway.outbox import AsyncOutbox, OverflowPolicy
from gateway.schedule import GroupPlan, PollSchedule
from gateway.uplink import Protocol, TlsConfig, Uplink, UplinkConfig

log = logging.getLogger("meter_gateway")

ReadFn = Callable[[Sequence[str], float, float], Awaitable[list[Reading]]]

OVERFLOW = {"pause_polling": OverflowPolicy.REFUSE_NEW, "drop_oldest": OverflowPolicy.DROP_OLDEST}


@dataclass
class PollStats:
    reads: int = 0
    readings: int = 0
    committed: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    missed_slots: int = 0
    shed: int = 0  # reads not queued because their bus queue was full

    def fail(self, kind: str) -> None:
        self.failures[kind] = self.failures.get(kind, 0) + 1


@dataclass(frozen=True)
class MeterRuntime:
    """A configured meter as the poller drives it: which bus, and how to read it."""

    meter_id: str
    bus: str
    read: ReadFn


def uplink_config(config: Config) -> UplinkConfig:
    up = config.uplink
    tls = None
    if up.tls is not None:
        tls = TlsConfig(ca_file=up.tls.ca_file, cert_file=up.tls.cert_file, key_file=up.tls.key_file)
    return UplinkConfig(
        gateway_id=config.gateway.id,
        host=up.host,
        port=up.port,
        client_id=up.client_id,
        username=up.username,
        password=up.password.reveal() if up.password is not None else None,
        tls=tls,
        protocol=Protocol(up.protocol),
        keepalive=int(up.keepalive),
        batch_max_readings=up.batch_max_readings,
        window=up.max_inflight,
        topic_root=up.topic_prefix,
    )


def outbox_path(config: Config) -> Path:
    return Path(config.outbox.path or Path(config.gateway.state_dir) / "outbox.sqlite")


class Gateway:
    """The running daemon. ``run(stop)`` returns when ``stop`` is set and shutdown is done."""

    def __init__(
        self,
        config: Config,
        *,
        clock: Callable[[], float] = time.time,
        shutdown_budget: float = 20.0,
        on_ready: Callable[[], None] | None = None,
        on_tick: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.shutdown_budget = shutdown_budget
        self.stats = PollStats()
        self.health = HealthBook(
            HealthPolicy(
                degraded_after=config.limits.degraded_after,
                offline_after=config.limits.offline_after,
                probe_interval=float(config.limits.offline_probe_interval),
            ),
            on_change=self._meter_state_changed,
        )
        self.buses: dict[str, Bus] = {}
        self.meters: dict[str, MeterRuntime] = {}
        self.outbox: AsyncOutbox | None = None
        self.uplink: Uplink | None = None
        self._quantities = {g.name: tuple(g.quantities) for g in config.poll_groups}
        self._in_flight: set[asyncio.Task[None]] = set()
        self._on_ready = on_ready
        self._on_tick = on_tick

    # -- lifecycle ----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        config = self.config
        path = outbox_path(config)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.outbox = await AsyncOutbox.open(
            path,
            synchronous=config.outbox.synchronous,
            budget_bytes=int(config.outbox.budget_mb * 1024 * 1024),
            overflow_policy=OVERFLOW[config.outbox.overflow_policy],
        )
        try:
            self.uplink = Uplink(uplink_config(config), self.outbox)
            self.buses = build_buses(config, self.health)
            self.meters = build_meters(config, self.buses)
            for bus in self.buses.values():
                await bus.open()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.uplink.run(), name="uplink")
                poller = tg.create_task(self._poll(stop), name="poller")
                tg.create_task(self._housekeeping(stop), name="housekeeping")
                log.info(
                    "event=started gateway=%s buses=%d meters=%d outbox=%s depth=%d",
                    config.gateway.id,
                    len(self.buses),
                    len(self.meters),
                    path,
                    self.outbox.depth,
                )
                if self._on_ready is not None:
                    self._on_ready()
                await stop.wait()
                await self._shutdown(poller)
        finally:
            for bus in self.buses.values():
                with contextlib.suppress(Exception):
                    await bus.close()
            await self.outbox.close()
            log.info("event=stopped gateway=%s", config.gateway.id)

    async def _shutdown(self, poller: asyncio.Task[None]) -> None:
        """Reverse order: no new reads; in-flight reads commit; uplink drains briefly and stops."""
        deadline = asyncio.get_running_loop().time() + self.shutdown_budget
        poller.cancel()
        if self._in_flight:
            _, pending = await asyncio.wait(self._in_flight, timeout=max(0.0, self.shutdown_budget / 2))
            for task in pending:
                task.cancel()
        if self.uplink is not None:
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                await asyncio.wait_for(self.uplink.stop(), timeout=max(1.0, remaining))
            except TimeoutError:
                log.warning("event=shutdown_budget_exceeded stage=uplink")

    # -- polling ------------------------------------------------------------------------------

    async def _poll(self, stop: asyncio.Event) -> None:
        schedule = PollSchedule(GroupPlan.from_config(self.config), self.clock())
        max_queue = self.config.limits.max_queue_per_bus
        while not stop.is_set():
            now = self.clock()
            for due in schedule.next_due(now):
                meter = self.meters.get(due.meter)
                if meter is None:
                    continue
                bus = self.buses[meter.bus]
                if bus.queued >= max_queue:
                    self.stats.shed += 1
                    continue
                task = asyncio.create_task(
                    self._read(meter, self._quantities[due.group], float(due.slot)), name=f"read:{due.meter}"
                )
                self._in_flight.add(task)
                task.add_done_callback(self._in_flight.discard)
            for missed in schedule.take_missed():
                self.stats.missed_slots += missed.count
                log.warning(
                    "event=missed_slots group=%s meter=%s first=%d count=%d",
                    missed.group,
                    missed.meter,
                    missed.first,
                    missed.count,
                )
            next_time = schedule.next_time()
            delay = 1.0 if next_time is None else min(1.0, max(0.0, next_time - self.clock()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)

    async def _read(self, meter: MeterRuntime, quantities: Sequence[str], slot: float) -> None:
        self.stats.reads += 1
        try:
            readings = await meter.read(quantities, slot, self.clock())
        except DriverError as exc:
            self.stats.fail(exc.kind)
            log.debug("event=read_failed meter=%s kind=%s detail=%s", meter.meter_id, exc.kind, exc)
            return
        if not readings or self.outbox is None:
            return
        self.stats.readings += len(readings)
        result = await self.outbox.add(readings)
        self.stats.committed += result.committed

    # -- housekeeping -------------------------------------------------------------------------

    async def _housekeeping(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if self._on_tick is not None:
                self._on_tick()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)

    def _meter_state_changed(self, change: StateChange) -> None:
        log.info(
            "event=meter_state meter=%s from=%s to=%s failures=%d reason=%s",
            change.meter_id,
            change.old.value,
            change.new.value,
            change.failures,
            change.reason,
        )
        if self.uplink is not None and change.new is not MeterState.UNKNOWN:
            self.uplink.set_meter_state(change.meter_id, change.new.value, change.at, change.reason)  # type: ignore[arg-type]


__all__ = ["Gateway", "MeterRuntime", "PollStats", "Priority", "outbox_path", "uplink_config"]

"""The daemon's lifecycle, in one place.

``Gateway.run`` opens the outbox, builds buses and meter drivers from the config, and runs one
``asyncio.TaskGroup`` of named tasks: ``uplink`` (outbox -> MQTT), ``poller`` (schedule -> bus
reads -> outbox), ``housekeeping`` (metrics snapshots, the status file, sd_notify STATUS),
``watchdog`` (sd_notify WATCHDOG=1 while the poller makes progress) and ``reloader`` (applies a
new config on the ``reload`` event). Signals only set events (``stop``, ``reload``; see
gateway/run_cmd.py). Shutdown runs the stages in reverse order within a budget: stop handing out
reads and let in-flight reads finish (so what was read is committed), stop the uplink (it waits
briefly for in-flight PUBACKs), close buses, close the outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drivers.bus import Bus, Priority
from drivers.errors import DriverError
from drivers.health import HealthBook, HealthPolicy, MeterState, StateChange
from gateway.config import Config, ConfigError, diff
from gateway.meters import Fleet, MeterRuntime
from gateway.metrics import Metrics
from gateway.outbox import AsyncOutbox, OverflowPolicy
from gateway.schedule import GroupPlan, PollSchedule
from gateway.sdnotify import Notifier, run_watchdog, watchdog_interval
from gateway.uplink import Protocol, TlsConfig, Uplink, UplinkConfig

log = logging.getLogger("meter_gateway")

STATUS_FILE = "status.json"
STATUS_EVERY = 5.0  # seconds between status file writes
# sections a reload cannot change in a running process: they need a restart
RESTART_SECTIONS = frozenset({"gateway", "uplink", "outbox", "metrics"})

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


def status_path(config: Config) -> Path:
    return Path(config.gateway.state_dir) / STATUS_FILE


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
        metrics: Metrics | None = None,
        notifier: Notifier | None = None,
        load_config: Callable[[], Config] | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.shutdown_budget = shutdown_budget
        self.metrics = metrics
        self.notifier = notifier
        self._load_config = load_config
        self.stats = PollStats()
        self.reloads = {"ok": 0, "failed": 0}
        self.health = HealthBook(
            HealthPolicy(
                degraded_after=config.limits.degraded_after,
                offline_after=config.limits.offline_after,
                probe_interval=float(config.limits.offline_probe_interval),
            ),
            on_change=self._meter_state_changed,
        )
        self.fleet = Fleet(self.health)
        self.outbox: AsyncOutbox | None = None
        self.uplink: Uplink | None = None
        self._quantities = {g.name: tuple(g.quantities) for g in config.poll_groups}
        self._in_flight: set[asyncio.Task[None]] = set()
        self._on_ready = on_ready
        self._on_tick = on_tick
        self._schedule_changed = False
        self._poll_progress = time.monotonic()  # last poller loop turn, for the watchdog
        self._started_at = clock()
        self._stopping = False

    @property
    def buses(self) -> dict[str, Bus]:
        return self.fleet.buses

    @property
    def meters(self) -> dict[str, MeterRuntime]:
        return self.fleet.meters

    # -- lifecycle ----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, reload: asyncio.Event | None = None) -> None:
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
            self.fleet.build(config)
            self._watch_buses()
            await self.fleet.open()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.uplink.run(), name="uplink")
                poller = tg.create_task(self._poll(stop), name="poller")
                tg.create_task(self._housekeeping(stop), name="housekeeping")
                if self.notifier is not None:
                    watchdog = tg.create_task(
                        run_watchdog(self.notifier, watchdog_interval(), self._alive), name="watchdog"
                    )
                if reload is not None:
                    reloader = tg.create_task(self._reloader(stop, reload), name="reloader")
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
                if self.notifier is not None:
                    self.notifier.ready(self._status_line())
                await stop.wait()
                self._stopping = True
                if self.notifier is not None:
                    self.notifier.stopping()
                if reload is not None:
                    reloader.cancel()
                await self._shutdown(poller)
                if self.notifier is not None:
                    watchdog.cancel()
        finally:
            await self.fleet.close()
            with contextlib.suppress(Exception):  # the status file is a convenience, never a reason to fail
                await self._write_status(final=True)
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
        while not stop.is_set():
            self._poll_progress = time.monotonic()
            max_queue = self.config.limits.max_queue_per_bus
            now = self.clock()
            if self._schedule_changed:
                self._schedule_changed = False
                schedule = PollSchedule(GroupPlan.from_config(self.config), now, resume=schedule.cursors())
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
                runtime = self.meters.get(missed.meter)
                if self.metrics is not None and runtime is not None:
                    self.metrics.missed_slots.labels(bus=runtime.bus).inc(missed.count)
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
        if self.metrics is not None:
            self.metrics.readings_acquired.inc(len(readings))
        result = await self.outbox.add(readings)
        self.stats.committed += result.committed

    # -- housekeeping -------------------------------------------------------------------------

    async def _housekeeping(self, stop: asyncio.Event) -> None:
        last_status = -STATUS_EVERY
        while not stop.is_set():
            if self._on_tick is not None:
                self._on_tick()
            try:
                await self._update_metrics()
                if time.monotonic() - last_status >= STATUS_EVERY:
                    last_status = time.monotonic()
                    await self._write_status()
                    if self.notifier is not None:
                        self.notifier.status(self._status_line())
            except Exception:  # observability must never take the daemon down
                log.exception("event=housekeeping_failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)

    def _alive(self) -> bool:
        """The watchdog's check beyond the loop itself: the poller turned recently."""
        return time.monotonic() - self._poll_progress < 30.0

    def _watch_buses(self) -> None:
        if self.metrics is None:
            return
        for name, bus in self.buses.items():
            if bus.on_latency is None:
                bus.on_latency = self.metrics.reply_latency.labels(bus=name).observe

    async def _update_metrics(self) -> None:
        if self.metrics is None or self.outbox is None:
            return
        for name, bus in self.buses.items():
            self.metrics.update_bus(name, bus.snapshot())
        self.metrics.update_meter_states(self.health.counts())
        self.metrics.update_outbox(await self.outbox.stats(), self.clock())
        if self.uplink is not None:
            self.metrics.update_uplink(self.uplink.stats)

    def _status_line(self) -> str:
        counts = self.health.counts()
        depth = self.outbox.depth if self.outbox is not None else 0
        up = "connected" if self.uplink is not None and self.uplink.stats.connected else "disconnected"
        return (
            f"{len(self.meters)} meters ({counts.get('online', 0)} online, {counts.get('offline', 0)} offline), "
            f"outbox {depth}, uplink {up}"
        )

    async def _write_status(self, *, final: bool = False) -> None:
        """``<state_dir>/status.json`` for ``meter-gateway status``: replaced atomically."""
        if self.outbox is None:
            return
        stats = await self.outbox.stats()
        now = self.clock()
        up = self.uplink.stats if self.uplink is not None else None
        doc: dict[str, Any] = {
            "gateway": self.config.gateway.id,
            "pid": os.getpid(),
            "running": not final,
            "started_at": self._started_at,
            "updated_at": now,
            "meters": {m: s.value for m, s in sorted(self.health.states().items()) if m in self.meters},
            "meter_counts": self.health.counts(),
            "configured_meters": len(self.meters),
            "outbox": {
                "path": stats.path,
                "depth": stats.depth,
                "oldest_age": stats.oldest_age(now),
                "storage_alarm": stats.storage_alarm,
            },
            "uplink": {
                "connected": bool(up.connected) if up else False,
                "last_delivery": up.last_delivery if up else None,
                "published_readings": up.published_readings if up else 0,
            },
            "poll": {
                "reads": self.stats.reads,
                "readings": self.stats.readings,
                "missed_slots": self.stats.missed_slots,
                "failures": dict(self.stats.failures),
            },
            "reloads": dict(self.reloads),
        }
        path = status_path(self.config)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(path)

    # -- reload -------------------------------------------------------------------------------

    async def _reloader(self, stop: asyncio.Event, reload: asyncio.Event) -> None:
        while not stop.is_set():
            await reload.wait()
            reload.clear()
            if stop.is_set():
                return
            if self.notifier is not None:
                self.notifier.reloading()
            await self.reload()
            if self.notifier is not None:
                self.notifier.ready(self._status_line())

    async def reload(self, new: Config | None = None) -> bool:
        """Apply a new config to meters, buses and schedules; a bad config is rejected and the
        running one kept. Sections that need a restart (uplink, outbox, ...) are reported, not applied."""
        problems: list[str] = []
        if new is None and self._load_config is None:
            problems = ["no config file to reload from"]
        elif new is None and self._load_config is not None:
            try:
                new = self._load_config()
            except ConfigError as exc:
                problems = list(exc.messages)
        if new is None or problems:
            self._reloaded(False)
            for line in problems:
                log.error("event=reload_rejected problem=%r", line)
            log.error("event=reload_rejected errors=%d kept=running_config", len(problems))
            return False
        old = self.config
        changes = diff(old, new)
        restart = sorted(changes.sections & RESTART_SECTIONS)
        if restart:
            log.warning("event=reload_needs_restart sections=%s applied=meters,buses,schedules", ",".join(restart))
            new = _keep_sections(new, old, restart)
        buses, meters = await self.fleet.apply(old, new, changes)
        self.config = new
        self._quantities = {g.name: tuple(g.quantities) for g in new.poll_groups}
        self._schedule_changed = True
        if self.metrics is not None:
            for name in changes.buses.removed:
                self.metrics.remove_bus(name)
        self._watch_buses()
        self._reloaded(True)
        log.info(
            "event=reloaded buses_rebuilt=%d meters_rebuilt=%d meters_added=%d meters_removed=%d groups_changed=%d",
            len(buses),
            len(meters),
            len(changes.meters.added),
            len(changes.meters.removed),
            len(changes.poll_groups.touched),
        )
        return True

    def _reloaded(self, ok: bool) -> None:
        self.reloads["ok" if ok else "failed"] += 1
        if self.metrics is not None:
            self.metrics.count_reload(ok)

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


def _keep_sections(new: Config, old: Config, names: Sequence[str]) -> Config:
    import msgspec

    return msgspec.structs.replace(new, **{name: getattr(old, name) for name in names})


__all__ = ["Gateway", "MeterRuntime", "PollStats", "Priority", "outbox_path", "status_path", "uplink_config"]

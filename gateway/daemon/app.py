"""The daemon's lifecycle, in one place.

``Gateway.run`` opens the outbox, builds buses and meter drivers from the config, and runs one
``asyncio.TaskGroup`` of named tasks: ``uplink`` (outbox -> MQTT), ``poller`` (schedule -> bus
reads -> reading sink -> outbox; gateway/daemon/poller.py), ``cursors`` (saves the poll
schedule's cursors so a restart resumes and backfills), ``jobs`` (the daily frozen reads with
backfill, and meter time sync; restarted on a reload), ``commands`` (remote control, when
``[commands] enabled``), ``housekeeping`` (metrics snapshots, the status file, sd_notify
STATUS), ``watchdog`` (sd_notify WATCHDOG=1 while the poller makes progress) and ``reloader``
(applies a new config on the ``reload`` event). Signals only set events (``stop``, ``reload``;
see gateway/cli/run_cmd.py). Shutdown runs the stages in reverse order within a budget: stop
handing out reads and let in-flight reads finish (so what was read is committed), let commands
persist their state, stop the uplink (it waits briefly for
in-flight PUBACKs), close buses, close the cursor store and the outbox.

Polls, the frozen job and ``read_now`` commands commit through one
:class:`~meter_gateway.gateway.daemon.sink.ReadingSink`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from meter_gateway.drivers import registry
from meter_gateway.drivers.bus import Bus, Priority
from meter_gateway.drivers.health import HealthBook, HealthPolicy, MeterState, StateChange
from meter_gateway.drivers.log_limit import logfmt_value
from meter_gateway.gateway.config import Config, ConfigError, diff
from meter_gateway.gateway.daemon.logs import log_limited
from meter_gateway.gateway.daemon.meters import Fleet, MeterRuntime
from meter_gateway.gateway.daemon.metrics import Metrics
from meter_gateway.gateway.daemon.poller import Poller, PollStats
from meter_gateway.gateway.daemon.schedule import DEFAULT_RESYNC_AFTER, GroupPlan, MissedSlots, PollSchedule
from meter_gateway.gateway.daemon.sdnotify import Notifier, run_watchdog, watchdog_interval
from meter_gateway.gateway.daemon.sink import COMMAND, FROZEN, ReadingSink
from meter_gateway.gateway.daemon.status_file import StatusFile
from meter_gateway.gateway.jobs.frozen import FrozenJob
from meter_gateway.gateway.jobs.time_sync import TimeSyncJob
from meter_gateway.gateway.store.cursors import CursorStore, ResumeCursors, autosave_poll
from meter_gateway.gateway.store.outbox import AsyncOutbox, OverflowPolicy
from meter_gateway.gateway.store.outbox_sizing import PartitionTooSmall, check_partition
from meter_gateway.gateway.uplink.meter_events import MeterEvents
from meter_gateway.gateway.uplink.session import InboundMessage, Protocol, TlsConfig, Uplink, UplinkConfig

if TYPE_CHECKING:
    from meter_gateway.gateway.commands.service import CommandService

log = logging.getLogger("meter_gateway")

STATUS_FILE = "status.json"
STATUS_EVERY = 5.0  # seconds between status file writes
# sections a reload cannot change in a running process: they need a restart
RESTART_SECTIONS = frozenset({"gateway", "uplink", "outbox", "metrics"})

OVERFLOW = {"pause_polling": OverflowPolicy.REFUSE_NEW, "drop_oldest": OverflowPolicy.DROP_OLDEST}


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
        self.reloads = {"ok": 0, "failed": 0}
        self.health = HealthBook(
            HealthPolicy(
                degraded_after=config.limits.degraded_after,
                offline_after=config.limits.offline_after,
                probe_interval=float(config.limits.offline_probe_interval),
                link_down_after=float(config.limits.link_down_after),
            ),
            on_change=self._meter_state_changed,
        )
        self.fleet = Fleet(self.health)
        self.outbox: AsyncOutbox | None = None
        self.uplink: Uplink | None = None
        self.events: MeterEvents | None = None
        self.cursors: CursorStore | None = None
        self.frozen: FrozenJob | None = None
        self.time_sync: TimeSyncJob | None = None
        self.commands: CommandService | None = None
        self._jobs_restart = asyncio.Event()
        self._commands_stop = asyncio.Event()
        self._ignored_commands = 0
        self._on_ready = on_ready
        self._on_tick = on_tick
        self._started_at = clock()
        # polls, the frozen job and read_now commands commit through this one sink
        self.sink = ReadingSink(metrics=metrics, time_sync=lambda: self.time_sync)
        self.poller = Poller(
            config,
            self.fleet,
            self.health,
            self.sink,
            clock=clock,
            metrics=metrics,
            note_missed=self._note_missed,
            over_budget=lambda: self.outbox is not None and self.outbox.over_budget,
        )
        self._status_file = StatusFile(status_path(config))
        # what ``meter-gateway run`` exits with: 0, or EX_TEMPFAIL when the outbox was found
        # damaged (systemd restarts the service and the next open quarantines the file)
        self.exit_code = 0

    @property
    def buses(self) -> dict[str, Bus]:
        return self.fleet.buses

    @property
    def meters(self) -> dict[str, MeterRuntime]:
        return self.fleet.meters

    @property
    def stats(self) -> PollStats:
        return self.poller.stats

    @property
    def schedule(self) -> PollSchedule | None:
        return self.poller.schedule

    # -- lifecycle ----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, reload: asyncio.Event | None = None) -> None:
        config = self.config
        path = outbox_path(config)
        path.parent.mkdir(parents=True, exist_ok=True)
        budget = int(config.outbox.budget_mb * 1024 * 1024)
        try:
            check_partition(path.parent, budget, len(config.meters))
        except PartitionTooSmall as exc:
            # systemd retries 75: the partition may be mounted or grown meanwhile (docs/operations.md)
            log.error("event=state_partition_too_small detail=%r", str(exc))  # noqa: TRY400 (one line)
            self.exit_code = os.EX_TEMPFAIL
            return
        self.outbox = await AsyncOutbox.open(
            path,
            synchronous=config.outbox.synchronous,
            budget_bytes=budget,
            overflow_policy=OVERFLOW[config.outbox.overflow_policy],
            commit_interval=config.outbox.commit_interval,
        )
        self.outbox.on_damage = lambda _detail: self._outbox_damaged(stop)
        self.sink.outbox = self.outbox
        try:
            self.cursors = await asyncio.to_thread(CursorStore.for_config, config)
            self.uplink = Uplink(uplink_config(config), self.outbox, on_command=self._on_command)
            self.events = MeterEvents(self.uplink.topics, self.uplink.publish, clock=self.clock)
            self.fleet.on_event = self.events.listener
            self.fleet.build(config)
            self._watch_buses()
            await self.fleet.open()
            self.commands = self._make_commands(config)
            await self._build_jobs()
            # the outbox's committed-slot marks commit with the readings; the cursors lag behind them
            committed = await self.outbox.committed_slots()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.uplink.run(), name="uplink")
                tg.create_task(self.events.run(stop), name="meter_events")
                now = self.clock()
                resume = ResumeCursors(
                    self.cursors.load_poll(now), committed, self.poller.intervals, now + DEFAULT_RESYNC_AFTER
                )
                self.poller.schedule = PollSchedule(GroupPlan.from_config(config), now, resume=resume)
                del committed, resume
                poller = tg.create_task(self.poller.run(stop), name="poller")
                tg.create_task(autosave_poll(self.cursors, self.poller.cursors, stop), name="cursors")
                jobs = tg.create_task(self._jobs(stop), name="jobs")
                commands = (
                    tg.create_task(self.commands.run(self._commands_stop), name="commands")
                    if self.commands is not None
                    else None
                )
                tg.create_task(self._housekeeping(stop), name="housekeeping")
                if self.notifier is not None:
                    watchdog = tg.create_task(
                        run_watchdog(self.notifier, watchdog_interval(), self._alive), name="watchdog"
                    )
                if reload is not None:
                    reloader = tg.create_task(self._reloader(stop, reload), name="reloader")
                log.info(
                    "event=started gateway=%s buses=%d meters=%d outbox=%s depth=%d commands=%s",
                    config.gateway.id,
                    len(self.buses),
                    len(self.meters),
                    path,
                    self.outbox.depth,
                    "enabled" if self.commands is not None else "disabled",
                )
                if self._on_ready is not None:
                    self._on_ready()
                if self.notifier is not None:
                    self.notifier.ready(self._status_line())
                await stop.wait()
                self.poller.stopping = True
                if self.notifier is not None:
                    self.notifier.stopping()
                if reload is not None:
                    reloader.cancel()
                await self._shutdown(poller, jobs, commands)
                if self.notifier is not None:
                    watchdog.cancel()
        finally:
            await self.fleet.close()
            with contextlib.suppress(Exception):  # the status file is a convenience, never a reason to fail
                await self._write_status(final=True)
            if self.cursors is not None:
                self.cursors.close()
            await self.outbox.close()
            log.info("event=stopped gateway=%s", config.gateway.id)

    async def _shutdown(
        self, poller: asyncio.Task[None], jobs: asyncio.Task[None], commands: asyncio.Task[None] | None
    ) -> None:
        """Reverse order: no new reads; in-flight reads and jobs commit; commands persist their
        state; the uplink drains briefly (acks and readings) and stops."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.shutdown_budget
        poller.cancel()  # queued reads stay queued (and owed to the final cursor save): nothing starts them now
        self._commands_stop.set()
        stages: set[asyncio.Task[None]] = {*self.poller.in_flight, jobs}
        if commands is not None:
            stages.add(commands)
        _, pending = await asyncio.wait(stages, timeout=max(0.0, self.shutdown_budget / 2))
        for task in pending:
            log.warning("event=shutdown_budget_exceeded stage=%s", task.get_name())
            task.cancel()
        if self.uplink is not None:
            remaining = deadline - loop.time()
            try:
                await asyncio.wait_for(self.uplink.stop(), timeout=max(1.0, remaining))
            except TimeoutError:
                log.warning("event=shutdown_budget_exceeded stage=uplink")

    def _outbox_damaged(self, stop: asyncio.Event) -> None:
        """The outbox said it is damaged (and logged it once): stop, and exit for a restart."""
        self.exit_code = os.EX_TEMPFAIL
        stop.set()

    def _note_missed(self, missed: Sequence[MissedSlots]) -> None:
        # the frozen job of the moment (rebuilt on a reload) fills what it can at midnight
        if self.frozen is not None:
            self.frozen.note_missed(missed)

    # -- frozen data and time sync ------------------------------------------------------------

    def _drivers_that(self, can: registry.Can) -> dict[str, Any]:
        """The drivers of meters whose protocol can ``can`` (the jobs call one signature on all)."""
        return {m: rt.driver for m, rt in self.meters.items() if registry.capable(rt.protocol, can)}

    async def _build_jobs(self) -> None:
        """Built (and the frozen job's owed days loaded) before the poller starts, so missed
        slots it reports on its first turn are not lost."""
        assert self.outbox is not None
        assert self.cursors is not None
        frozen = self._drivers_that(registry.Can.FROZEN)
        self.frozen = FrozenJob(self.config, frozen, self.sink.for_source(FROZEN), self.clock, self.cursors)
        clocks = self._drivers_that(registry.Can.TIME_SYNC)
        if clocks == frozen:  # usually: the two jobs share one mapping (neither changes it), not two
            clocks = frozen
        self.time_sync = TimeSyncJob(self.config, clocks, self.buses, self.clock, cursors=self.cursors)
        await self.frozen.load()

    async def _jobs(self, stop: asyncio.Event) -> None:
        """The daily frozen job and the time-sync job, rebuilt from the config after a reload
        (they save their cursors on the way out, so nothing owed is forgotten)."""
        while not stop.is_set():
            if self._jobs_restart.is_set():
                self._jobs_restart.clear()
                await self._build_jobs()
            frozen, time_sync = self.frozen, self.time_sync
            assert frozen is not None
            assert time_sync is not None
            local_stop = asyncio.Event()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(frozen.run(local_stop), name="frozen")
                tg.create_task(time_sync.run(local_stop), name="time_sync")
                stopped = asyncio.ensure_future(stop.wait())
                restarted = asyncio.ensure_future(self._jobs_restart.wait())
                try:
                    await asyncio.wait({stopped, restarted}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    stopped.cancel()
                    restarted.cancel()
                    local_stop.set()

    # -- commands -----------------------------------------------------------------------------

    def _make_commands(self, config: Config) -> CommandService | None:
        if not config.commands.enabled or self.uplink is None:
            return None
        from meter_gateway.gateway.commands.service import CommandService

        return CommandService(
            config,
            self.meters,
            self.buses,
            self.uplink.publish,
            self.uplink.topics.acks,
            clock=self.clock,
            commit_readings=self.sink.committer(COMMAND),
            on_verified=self.metrics.observe_verification if self.metrics is not None else None,
        )

    async def _on_command(self, msg: InboundMessage) -> None:
        if self.commands is not None:
            await self.commands.on_message(msg)
            return
        self._ignored_commands += 1
        log.warning("event=command_ignored topic=%s reason='[commands] enabled = false'", msg.topic)

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
                log_limited(log, logging.ERROR, "housekeeping_failed", "event=housekeeping_failed", exc_info=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)

    def _alive(self) -> bool:
        """The watchdog's check beyond the loop itself: the poller turned recently."""
        alive = time.monotonic() - self.poller.progress < 30.0
        if not alive and self.metrics is not None:
            self.metrics.watchdog_misses.inc()  # a ping withheld; systemd restarts us after WatchdogSec
        return alive

    def _watch_buses(self) -> None:
        if self.metrics is None:
            return
        for name, bus in self.buses.items():
            self.metrics.add_bus(name)
            if bus.on_latency is None:
                bus.on_latency = self.metrics.latency(name).observe

    async def _update_metrics(self) -> None:
        if self.metrics is None or self.outbox is None:
            return
        for name, bus in self.buses.items():
            self.metrics.update_bus(name, bus.snapshot())
        self.metrics.update_meter_states(self.health.counts())
        self.metrics.update_outbox(await self.outbox.stats(), self.clock())
        if self.uplink is not None:
            self.metrics.update_uplink(self.uplink.stats)
        time_sync = self.time_sync if self.time_sync is not None and self.time_sync.enabled else None
        self.metrics.update_jobs(self.frozen.stats if self.frozen is not None else None, time_sync and time_sync.stats)
        self.metrics.update_commands(self.commands.stats if self.commands is not None else None)

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
        known = self.health.states()
        # sorted ids, not sorted (id, state) pairs: no tuple per meter every few seconds; and the
        # copy is let go before the document is encoded
        states = {m: known[m] for m in sorted(known) if m in self.meters}
        del known
        doc: dict[str, Any] = {
            "gateway": self.config.gateway.id,
            "pid": os.getpid(),
            "running": not final,
            "started_at": self._started_at,
            "updated_at": now,
            "meters": {m: s.value for m, s in states.items()},
            # why each degraded or offline meter is so (the retained state topic's ``detail``)
            "reasons": {
                m: self.health.get(m).last_error
                for m, s in states.items()
                if s in (MeterState.DEGRADED, MeterState.OFFLINE)
            },
            "meter_counts": self.health.counts(),
            "configured_meters": len(self.meters),
            "outbox": {
                "path": stats.path,
                "depth": stats.depth,
                "oldest_age": stats.oldest_age(now),
                "storage_alarm": stats.storage_alarm,
                "held": stats.held,
                "over_budget": self.outbox.over_budget,
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
                "paused": self.poller.paused,
                "paused_slots": self.stats.paused_slots,
                "partial_reads": self.stats.partial_reads,
                "quantities_failed": self.stats.quantities_failed,
                "failures": dict(self.stats.failures),
            },
            "reloads": dict(self.reloads),
        }
        if self.frozen is not None:
            f = self.frozen.stats
            doc["frozen"] = {
                "frozen_reads": f.frozen_reads,
                "backfilled_days": f.backfilled_days,
                "owed": f.owed,
                "lost_days": f.lost_days,
                "slots_filled": f.slots_filled,
                "slots_unfillable": f.slots_unfillable,
                "read_failures": dict(f.read_failures),
            }
        if self.time_sync is not None and self.time_sync.enabled:
            t = self.time_sync.stats
            doc["time_sync"] = {
                "runs": t.runs,
                "syncs": t.syncs,
                "corrected": t.corrected,
                "ineffective": t.ineffective,
                "alarms": dict(t.alarms),
                "failures": dict(t.failures),
            }
        if self.commands is not None:
            doc["commands"] = dataclasses.asdict(self.commands.stats)
        elif self._ignored_commands:
            doc["commands"] = {"ignored": self._ignored_commands}
        # off the loop: a 10,000-meter document is a few hundred kB
        await asyncio.to_thread(self._status_file.write, doc)

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
                # off the loop: parsing (or waiting for the config child) takes ~1 s at 10,000
                # meters, and the buses keep polling meanwhile
                new = await asyncio.to_thread(self._load_config)
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
        self.poller.reload(new)
        self._jobs_restart.set()
        if self.commands is not None:
            self.commands.update(new, self.meters, self.buses)
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
        # a meter that stops being readable is an operator's business; one coming back is news
        worse = change.new in (MeterState.DEGRADED, MeterState.OFFLINE)
        log.log(
            logging.WARNING if worse else logging.INFO,
            "event=meter_%s meter=%s from=%s to=%s failures=%d reason=%s",
            change.new.value,
            logfmt_value(change.meter_id),
            change.old.value,
            change.new.value,
            change.failures,
            logfmt_value(change.reason or "-"),
        )
        if self.uplink is not None and change.new is not MeterState.UNKNOWN:
            # since: gateway time (docs/mqtt.md), not the health book's monotonic clock
            self.uplink.set_meter_state(change.meter_id, change.new.value, self.clock(), change.reason)  # type: ignore[arg-type]


def _keep_sections(new: Config, old: Config, names: Sequence[str]) -> Config:

    return msgspec.structs.replace(new, **{name: getattr(old, name) for name in names})


__all__ = ["Gateway", "MeterRuntime", "PollStats", "Priority", "outbox_path", "status_path", "uplink_config"]

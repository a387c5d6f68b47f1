"""Prometheus metrics of the gateway, on a registry of their own.

Two kinds of metric live here. Events only the daemon sees (a reading acquired, a missed slot, a
config reload) are ordinary prometheus-client metrics the daemon increments. The reply latency,
observed on every bus request, is kept as plain per-bus counts (:class:`LatencyCounts`) that the
collector turns into a histogram at scrape time: prometheus-client's histogram takes a lock for
its sum and another for the bucket on every observation, on the event loop's hottest path.
Counters that other modules already keep as plain data (``Bus.snapshot()``, ``OutboxStats``,
``UplinkStats``, ``HealthBook.counts()``) are not copied into prometheus counters: the daemon hands
the latest snapshot to an ``update_*`` method and a custom collector reports those values at
scrape time. That keeps a single owner for each count and keeps counters monotonic (a counter
that restarts from zero, e.g. a bus re-created by a reload, is an ordinary counter reset to
Prometheus).

The snapshots are replaced whole under a lock, because scrapes run in the HTTP server's thread.
"""

from __future__ import annotations

import bisect
import contextlib
import math
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from meter_gateway.gateway import __version__

__all__ = [
    "COMMAND_REJECT_REASONS",
    "COMMAND_RESULTS",
    "LATENCY_BUCKETS",
    "METER_STATES",
    "MISSED_SLOT_REASONS",
    "PREFIX",
    "UPLINK_FAILURE_REASONS",
    "VERIFY_BUCKETS",
    "LatencyCounts",
    "Metrics",
    "MetricsServer",
    "exported_when",
    "missed_slot_reason",
    "reference_markdown",
    "reference_registry",
    "start_http",
]

PREFIX = "meter_gateway"

# One DL/T 645 reply at 2400 baud 8E1 is ~4.6 ms per byte: a 20-byte reply is ~90 ms and a long
# one plus the meter's turnaround reaches seconds; a Modbus TCP reply on a LAN takes a few ms.
LATENCY_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# From a relay command's first control frame to the relay read back where it was sent: a few
# seconds for a latching relay, up to the verify window (30 s by default) for a motorised breaker
# or a delayed trip; more only when control frames had to be sent again.
VERIFY_BUCKETS: tuple[float, ...] = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)

METER_STATES: tuple[str, ...] = ("online", "degraded", "offline", "unknown")

# Every label value a counter can take is exported at 0 from the start: a series born at its first
# increment has no earlier sample, so increase() and rate() over it stay 0 and an alert on the
# first forged command or the first failure never fires.

# Why a poll slot ended without a reading (missed_slots_total{reason}).
MISSED_SLOT_REASONS: tuple[str, ...] = (
    "daemon_down",  # its window passed while the gateway was not running (found at start)
    "link_down",  # the read failed because the bus link was down
    "meter_offline",  # the meter is offline and was not due for a probe
    "read_failed",  # the meter did not answer, answered badly, or refused
    "queue_full",  # the bus queue was full: the poll plan does not fit the bus
    "late",  # its window passed while running without being read (clock step, stalled loop)
    "outbox_full",  # not read: the outbox is over its budget under overflow_policy = "pause_polling"
)
# DriverError.kind -> missed slot reason; any other kind is a failed read.
_MISSED_BY_KIND = {"link_down": "link_down", "offline": "meter_offline"}


def missed_slot_reason(kind: str) -> str:
    """The ``missed_slots_total`` reason for a read that failed with ``DriverError.kind``."""
    return _MISSED_BY_KIND.get(kind, "read_failed")


# UplinkStats.failures keys the uplink can produce: its own, and the MQTT v5 reason codes a broker
# may answer a PUBLISH or SUBSCRIBE with (>= 0x80), named as gateway/uplink/session.py _reason_key spells them.
UPLINK_FAILURE_REASONS: tuple[str, ...] = (
    "ack_timeout",
    "connect_error",
    "connect_refused",
    "disconnected",
    "implementation_specific_error",
    "internal_error",
    "not_authorized",
    "outbox_damaged",
    "packet_identifier_in_use",
    "payload_format_invalid",
    "quota_exceeded",
    "subscribe_refused",
    "topic_name_invalid",
    "unspecified_error",
)

# Terminal results of an accepted execution (CommandStats.results); always exported so a
# success-rate expression has every series from the start.
COMMAND_RESULTS: tuple[str, ...] = ("verified", "unverified", "meter_refused", "expired")
# The relay actions the disconnect/reconnect KPI is about: their result series exist from the start.
_KPI_ACTIONS: tuple[str, ...] = ("disconnect", "reconnect")

# Reasons a command, or one meter of it, is refused: authentication (gateway/commands/auth.py
# REJECT_REASONS; spelled out here so the metrics do not import cryptography, and
# tests/test_metrics.py holds the two lists together) and the per-meter refusals of the service
# and executor.
COMMAND_REJECT_REASONS: tuple[str, ...] = (
    "retained",
    "malformed",
    "unsigned",
    "unknown_key",
    "bad_signature",
    "key_not_allowed",
    "wrong_gateway",
    "validity_too_long",
    "not_yet_valid",
    "expired",
    "not_held",
    "store_reset",
    "unknown_meter",
    "unsupported",
)

# Bus.snapshot() keys (drivers/bus.py BusCounters) -> (metric, label value). Grouped by unit so
# each metric family counts one kind of thing: whole transactions, single attempts, rejected
# replies, bytes thrown away.
_BUS_TRANSACTIONS = {
    "ok": "ok",
    "link_down": "link_down",
    "no_answer": "no_answer",
    "bad_reply": "bad_reply",
    "refused": "refused",
    "offline_skipped": "offline_skipped",
}
_BUS_ATTEMPTS = {"retries": "retry", "timeouts": "timeout", "probes": "probe"}
_BUS_REJECTED = {
    "echo_ignored": "echo",
    "mismatched": "mismatched",
    "late_replies": "late",
    "unsolicited": "unsolicited",  # a meter's own frames (reports, LINK), in a transaction or idle
}
_BUS_DISCARDED_BYTES = {"garbage_bytes": "garbage", "stale_bytes_flushed": "stale_flushed"}
# Bus.snapshot() keys of a Modbus bus's exception replies, one per code (drivers/modbus.py
# COUNTER_PREFIX): the driver sets every known code to 0 when the bus is built.
_MODBUS_EXCEPTION_PREFIX = "modbus_exception_"


@dataclass(frozen=True, slots=True)
class _OutboxView:
    depth: int
    oldest_age: float | None
    disk_bytes: int
    disk_full: bool
    held: int
    counters: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class _UplinkView:
    connected: bool
    connects: int
    disconnects: int
    connect_failures: int
    published_batches: int
    published_readings: int
    inflight_batches: int
    failures: Mapping[str, int]
    last_delivery: float | None


# the "le" label values, written by prometheus-client's own formatter
_LATENCY_LE: Final = tuple(floatToGoString(b) for b in (*LATENCY_BUCKETS, math.inf))  # type: ignore[no-untyped-call]


class LatencyCounts:
    """One bus's reply latencies as histogram counts: written by the event loop's thread only,
    copied by a scrape (a scrape may see an observation's bucket and not yet its sum)."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)  # per bucket, not cumulative; the last is +Inf
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        # a bucket's bound is inclusive ("le"): bisect_left finds the first bound >= seconds
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds

    def buckets(self) -> tuple[list[tuple[str, float]], float]:
        """Cumulative (le, count) pairs, +Inf last, and the sum."""
        counts, total = list(self.counts), self.total
        out: list[tuple[str, float]] = []
        running = 0
        for le, count in zip(_LATENCY_LE, counts, strict=True):
            running += count
            out.append((le, running))
        return out, total


class _SnapshotCollector(Collector):
    """Reports the latest snapshots handed to ``Metrics.update_*`` at scrape time."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.buses: dict[str, dict[str, int]] = {}
        self.latency: dict[str, LatencyCounts] = {}
        self.meter_states: dict[str, int] = {}
        self.outbox: _OutboxView | None = None
        self.uplink: _UplinkView | None = None
        self.jobs: list[Metric] = []
        self.commands: list[Metric] = []

    def collect(self) -> Iterable[Metric]:
        with self.lock:
            buses = dict(self.buses)
            latency = dict(self.latency)
            states = dict(self.meter_states)
            outbox = self.outbox
            uplink = self.uplink
            jobs = list(self.jobs)
            commands = list(self.commands)
        yield self._latency(latency)
        yield from self._buses(buses)
        meters = GaugeMetricFamily(f"{PREFIX}_meters", "Configured meters by health state.", labels=["state"])
        for state in (*METER_STATES, *sorted(set(states) - set(METER_STATES))):
            meters.add_metric([state], states.get(state, 0))
        yield meters
        if outbox is not None:
            yield from self._outbox(outbox)
        if uplink is not None:
            yield from self._uplink(uplink)
        yield from jobs
        yield from commands

    @staticmethod
    def _latency(latency: Mapping[str, LatencyCounts]) -> Metric:
        family = HistogramMetricFamily(
            f"{PREFIX}_reply_latency_seconds", "Time from request written to accepted reply, per bus.", labels=["bus"]
        )
        for bus, counts in sorted(latency.items()):
            buckets, total = counts.buckets()
            family.add_metric([bus], buckets, total)
        return family

    @staticmethod
    def _buses(buses: Mapping[str, Mapping[str, int]]) -> Iterator[Metric]:
        def family(name: str, doc: str, keys: Mapping[str, str], label: str) -> CounterMetricFamily:
            fam = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=["bus", label])
            for bus, snap in sorted(buses.items()):
                for key, value in keys.items():
                    fam.add_metric([bus, value], snap.get(key, 0))
            return fam

        yield family(
            "bus_transactions", "Bus transactions by final outcome (retries not counted).", _BUS_TRANSACTIONS, "outcome"
        )
        yield family("bus_attempts", "Extra attempts on a bus: retries, timeouts, probes.", _BUS_ATTEMPTS, "kind")
        yield family("bus_rejected_replies", "Frames heard on a bus and not taken as the reply.", _BUS_REJECTED, "kind")
        yield family("bus_discarded_bytes", "Bytes thrown away on a bus.", _BUS_DISCARDED_BYTES, "kind")
        exceptions = CounterMetricFamily(
            f"{PREFIX}_modbus_exceptions",
            "Modbus exception replies by exception code, retried ones included.",
            labels=["bus", "code"],
        )
        n = len(_MODBUS_EXCEPTION_PREFIX)
        for bus, snap in sorted(buses.items()):
            for key, value in sorted(snap.items()):
                if key.startswith(_MODBUS_EXCEPTION_PREFIX):
                    exceptions.add_metric([bus, key[n:]], value)
        yield exceptions

        sent = CounterMetricFamily(f"{PREFIX}_bus_requests_sent", "Requests written, retries included.", labels=["bus"])
        queued = GaugeMetricFamily(f"{PREFIX}_bus_queued", "Transactions waiting for the bus.", labels=["bus"])
        connected = GaugeMetricFamily(f"{PREFIX}_link_connected", "1 while the bus link is open.", labels=["bus"])
        connects = CounterMetricFamily(f"{PREFIX}_link_connects", "Link (re)connections made.", labels=["bus"])
        losses = CounterMetricFamily(f"{PREFIX}_link_losses", "Links lost after being up.", labels=["bus"])
        rx = CounterMetricFamily(f"{PREFIX}_link_received_bytes", "Bytes read from the link.", labels=["bus"])
        tx = CounterMetricFamily(f"{PREFIX}_link_sent_bytes", "Bytes written to the link.", labels=["bus"])
        for bus, snap in sorted(buses.items()):
            sent.add_metric([bus], snap.get("sent", 0))
            queued.add_metric([bus], snap.get("queued", 0))
            if "link_connected" in snap:  # absent for a bus with no link yet (a Modbus bus without meters)
                connected.add_metric([bus], snap["link_connected"])
                connects.add_metric([bus], snap.get("link_connects", 0))
                losses.add_metric([bus], snap.get("link_losses", 0))
                rx.add_metric([bus], snap.get("link_bytes_in", 0))
                tx.add_metric([bus], snap.get("link_bytes_out", 0))
        yield from (sent, queued, connected, connects, losses, rx, tx)

    @staticmethod
    def _outbox(o: _OutboxView) -> Iterator[Metric]:
        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)

        def counter(name: str, doc: str, key: str) -> CounterMetricFamily:
            return CounterMetricFamily(f"{PREFIX}_{name}", doc, value=o.counters.get(key, 0))

        yield gauge("outbox_depth", "Readings committed and not yet delivered.", o.depth)
        yield gauge(
            "outbox_oldest_undelivered_age_seconds",
            "How long the oldest undelivered reading has waited (0 when the outbox is empty).",
            o.oldest_age or 0.0,
        )
        yield gauge("outbox_disk_bytes", "Outbox database size on disk, WAL included.", o.disk_bytes)
        yield gauge("outbox_disk_full", "1 while the outbox storage refuses writes.", 1 if o.disk_full else 0)
        yield gauge(
            "outbox_held", "Readings held in memory while the outbox storage refuses writes (disk full).", o.held
        )
        yield counter(
            "outbox_disk_full_events", "Times the outbox storage started refusing writes.", "disk_full_events"
        )
        yield counter(
            "outbox_quarantined",
            "Damaged outbox files moved aside at start (a fresh outbox was started; alert on any).",
            "quarantined",
        )
        yield counter(
            "outbox_wal_lost", "Starts that found the outbox's write-ahead log missing after a crash.", "wal_lost"
        )
        yield counter("readings_committed", "Readings newly committed to the outbox.", "committed")
        yield counter("readings_duplicates", "Readings already in the outbox, ignored.", "duplicates")
        yield counter("readings_delivered", "Readings acknowledged by the head-end and removed.", "delivered")
        yield counter(
            "outbox_overflow_dropped", "Oldest undelivered readings dropped to stay in budget.", "overflow_dropped"
        )
        yield counter("outbox_refused", "Readings refused by a full outbox.", "refused")
        yield counter("outbox_invalid", "Readings not storable (bad types or timestamps).", "invalid")

    @staticmethod
    def _uplink(u: _UplinkView) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            f"{PREFIX}_uplink_connected", "1 while connected to the broker.", value=int(u.connected)
        )
        yield CounterMetricFamily(f"{PREFIX}_uplink_connects", "Broker connections made.", value=u.connects)
        yield CounterMetricFamily(f"{PREFIX}_uplink_disconnects", "Broker connections lost.", value=u.disconnects)
        yield CounterMetricFamily(
            f"{PREFIX}_uplink_connect_failures", "Broker connection attempts failed.", value=u.connect_failures
        )
        yield CounterMetricFamily(
            f"{PREFIX}_uplink_published_batches", "Batches acknowledged by the broker.", value=u.published_batches
        )
        yield CounterMetricFamily(
            f"{PREFIX}_uplink_published_readings", "Readings in acknowledged batches.", value=u.published_readings
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_uplink_inflight_batches", "Batches published, PUBACK pending.", value=u.inflight_batches
        )
        failures = CounterMetricFamily(
            f"{PREFIX}_uplink_publish_failures", "Publish failures by reason.", labels=["reason"]
        )
        for reason in sorted({*UPLINK_FAILURE_REASONS, *u.failures}):
            failures.add_metric([reason], u.failures.get(reason, 0))
        yield failures
        if u.last_delivery is not None:  # absent rather than 1970 until the first delivery
            yield GaugeMetricFamily(
                f"{PREFIX}_uplink_last_delivery_timestamp_seconds",
                "Unix time of the last acknowledged delivery of readings.",
                value=u.last_delivery,
            )


class Metrics:
    """Every metric the daemon exports, on its own registry (several instances do not collide)."""

    def __init__(self, version: str = __version__, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self._snapshots = _SnapshotCollector()
        r.register(self._snapshots)

        self.build_info = Gauge(f"{PREFIX}_build_info", "Always 1; the labels say what runs.", ["version"], registry=r)
        self.build_info.labels(version=version).set(1)
        self.readings_acquired = Counter(
            f"{PREFIX}_readings_acquired", "Readings decoded from meters (before the outbox).", registry=r
        )
        self.missed_slots = Counter(
            f"{PREFIX}_missed_slots",
            "Poll slots not read (daemon down, link down, read failed, ...), per bus and reason.",
            ["bus", "reason"],
            registry=r,
        )
        self.partial_reads = Counter(
            f"{PREFIX}_partial_reads",
            "Poll slots committed with some of their quantities missing (retried while the slot lasted), per bus.",
            ["bus"],
            registry=r,
        )
        self.quantities_failed = Counter(
            f"{PREFIX}_quantities_failed",
            "Quantities a partial read could not get, per bus.",
            ["bus"],
            registry=r,
        )
        self.watchdog_misses = Counter(
            f"{PREFIX}_watchdog_misses",
            "systemd watchdog pings withheld because the poller stopped making progress.",
            registry=r,
        )
        self.command_verify_latency = Histogram(
            f"{PREFIX}_command_verify_seconds",
            "Time from an execution's first control frame to its verification, by action.",
            ["action"],
            buckets=VERIFY_BUCKETS,
            registry=r,
        )
        for action in _KPI_ACTIONS:
            self.command_verify_latency.labels(action=action)
        self.config_reloads = Counter(
            f"{PREFIX}_config_reloads", "Configuration reloads (SIGHUP) by result.", ["result"], registry=r
        )
        for result in ("ok", "failed"):
            self.config_reloads.labels(result=result)
        self.config_last_reload = Gauge(
            f"{PREFIX}_config_last_reload_timestamp_seconds", "Unix time of the last successful reload.", registry=r
        )
        # The standard process_*, python_info and python_gc_* series: memory, CPU, open files and
        # the start time (a restart by the systemd watchdog shows there).
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)

    # -- directly owned ---------------------------------------------------------------------

    def latency(self, bus: str) -> LatencyCounts:
        """The reply latency counts of ``bus`` (``observe`` is the bus's latency callback)."""
        with self._snapshots.lock:
            return self._snapshots.latency.setdefault(bus, LatencyCounts())

    def observe_verification(self, action: str, seconds: float) -> None:
        self.command_verify_latency.labels(action=action).observe(seconds)

    def add_bus(self, bus: str) -> None:
        """Export a configured bus's own series at 0 before anything happens on it."""
        self.latency(bus)
        self.partial_reads.labels(bus=bus)
        self.quantities_failed.labels(bus=bus)
        for reason in MISSED_SLOT_REASONS:
            self.missed_slots.labels(bus=bus, reason=reason)

    def count_missed(self, bus: str, reason: str, slots: int = 1) -> None:
        """``slots`` poll slots of a meter on ``bus`` ended without a reading, for ``reason``
        (one of :data:`MISSED_SLOT_REASONS`)."""
        if reason not in MISSED_SLOT_REASONS:
            raise ValueError(f"unknown missed slot reason {reason!r}")
        self.missed_slots.labels(bus=bus, reason=reason).inc(slots)

    def count_partial(self, bus: str, failed: int) -> None:
        """A slot on ``bus`` was committed without ``failed`` of its quantities."""
        self.partial_reads.labels(bus=bus).inc()
        self.quantities_failed.labels(bus=bus).inc(failed)

    def count_reload(self, ok: bool, when: float | None = None) -> None:
        self.config_reloads.labels(result="ok" if ok else "failed").inc()
        if ok:
            self.config_last_reload.set(time.time() if when is None else when)

    # -- snapshots owned by other modules ------------------------------------------------

    def update_bus(self, bus: str, snapshot: Mapping[str, int]) -> None:
        """Latest ``Bus.snapshot()`` of one bus; unknown keys are ignored."""
        with self._snapshots.lock:
            self._snapshots.buses[bus] = dict(snapshot)

    def remove_bus(self, bus: str) -> None:
        """Stop exporting a bus (it left the configuration)."""
        with self._snapshots.lock:
            self._snapshots.buses.pop(bus, None)
            self._snapshots.latency.pop(bus, None)
        for reason in MISSED_SLOT_REASONS:
            with contextlib.suppress(KeyError):
                self.missed_slots.remove(bus, reason)
        for per_bus in (self.partial_reads, self.quantities_failed):
            with contextlib.suppress(KeyError):
                per_bus.remove(bus)

    def update_meter_states(self, counts: Mapping[str, int]) -> None:
        """``HealthBook.counts()`` summed over buses: meters per state name."""
        with self._snapshots.lock:
            self._snapshots.meter_states = dict(counts)

    def update_outbox(self, stats: Any, now: float | None = None) -> None:
        """Latest ``OutboxStats`` (duck-typed so this module does not import the outbox)."""
        now = time.time() if now is None else now
        view = _OutboxView(
            depth=int(stats.depth),
            oldest_age=stats.oldest_age(now),
            disk_bytes=int(stats.file_bytes) + int(stats.wal_bytes),
            disk_full=stats.storage_alarm is not None,
            held=int(getattr(stats, "held", 0)),
            counters=dict(stats.counters),
        )
        with self._snapshots.lock:
            self._snapshots.outbox = view

    def update_jobs(self, frozen: Any, time_sync: Any) -> None:
        """Latest ``FrozenStats`` and ``TimeSyncStats`` (either may be None: not exported)."""
        families = _jobs_families(frozen, time_sync)
        with self._snapshots.lock:
            self._snapshots.jobs = families

    def update_commands(self, stats: Any) -> None:
        """Latest ``CommandStats`` of the command service (gateway/commands/executor.py); None
        (commands disabled) exports nothing."""
        families = _commands_families(stats) if stats is not None else []
        with self._snapshots.lock:
            self._snapshots.commands = families

    def update_uplink(self, stats: Any) -> None:
        """Latest ``UplinkStats`` (copied: the uplink keeps mutating its own)."""
        view = _UplinkView(
            connected=bool(stats.connected),
            connects=int(stats.connects),
            disconnects=int(stats.disconnects),
            connect_failures=int(stats.connect_failures),
            published_batches=int(stats.published_batches),
            published_readings=int(stats.published_readings),
            inflight_batches=int(stats.inflight_batches),
            failures=dict(stats.failures),
            last_delivery=stats.last_delivery,
        )
        with self._snapshots.lock:
            self._snapshots.uplink = view


def _jobs_families(frozen: Any, time_sync: Any) -> list[Metric]:
    """Families for the daily frozen job (``FrozenStats``) and time sync (``TimeSyncStats``)."""
    out: list[Metric] = []
    if frozen is not None:
        days = CounterMetricFamily(
            f"{PREFIX}_frozen_reads", "Daily freezes committed, read on time or as backfill.", labels=["kind"]
        )
        days.add_metric(["on_time"], frozen.frozen_reads)
        days.add_metric(["backfill"], frozen.backfilled_days)
        out.append(days)
        out.append(
            CounterMetricFamily(
                f"{PREFIX}_frozen_lost",
                "Freezes given up (gone from the meter or outside backfill_days).",
                value=frozen.lost_days,
            )
        )
        out.append(GaugeMetricFamily(f"{PREFIX}_frozen_owed", "Daily freezes owed right now.", value=frozen.owed))
        slots = CounterMetricFamily(
            f"{PREFIX}_backfill_slots", "Missed poll slots of backfill groups, by outcome.", labels=["result"]
        )
        slots.add_metric(["filled"], frozen.slots_filled)
        slots.add_metric(["unfillable"], frozen.slots_unfillable)
        out.append(slots)
    if time_sync is not None:
        syncs = CounterMetricFamily(f"{PREFIX}_time_syncs", "Clock corrections sent (0x08).", labels=["mode"])
        syncs.add_metric(["broadcast"], time_sync.broadcasts)
        syncs.add_metric(["unicast"], time_sync.unicasts)
        out.append(syncs)
        results = CounterMetricFamily(
            f"{PREFIX}_time_sync_results", "Meters read back after a correction, by result.", labels=["result"]
        )
        results.add_metric(["corrected"], time_sync.corrected)
        results.add_metric(["ineffective"], time_sync.ineffective)
        out.append(results)
        out.append(
            GaugeMetricFamily(
                f"{PREFIX}_meter_clock_alarms",
                "Meters whose clock is off by more than a broadcast may correct.",
                value=len(time_sync.alarms),
            )
        )
        out.append(
            GaugeMetricFamily(
                f"{PREFIX}_meters_clock_suspect",
                "Meters whose readings are flagged CLOCK_SUSPECT (clock beyond time_sync.suspect_drift).",
                value=time_sync.clock_suspect_meters,
            )
        )
        if time_sync.drifts:
            out.append(
                GaugeMetricFamily(
                    f"{PREFIX}_meter_clock_drift_max_seconds",
                    "Largest absolute meter clock drift among the recent measurements.",
                    value=max(abs(d) for d in time_sync.drifts),
                )
            )
    return out


def _commands_families(s: Any) -> list[Metric]:
    """Families for remote control (``CommandStats``); docs/commands.md "Metrics" explains them."""

    def counter(name: str, doc: str, value: int) -> CounterMetricFamily:
        return CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)

    def gauge(name: str, doc: str, value: int) -> GaugeMetricFamily:
        return GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)

    rejected = CounterMetricFamily(
        f"{PREFIX}_commands_rejected", "Commands (or meters of a command) refused, by reason.", labels=["reason"]
    )
    for reason in sorted({*COMMAND_REJECT_REASONS, *s.rejected}):
        rejected.add_metric([reason], s.rejected.get(reason, 0))
    executions = CounterMetricFamily(
        f"{PREFIX}_command_executions", "Executions started on a meter, by action.", labels=["action"]
    )
    for action in sorted({*_KPI_ACTIONS, *s.executed}):
        executions.add_metric([action], s.executed.get(action, 0))
    results = CounterMetricFamily(
        f"{PREFIX}_command_results",
        "Executions finished, by action and terminal result (verified, unverified, meter_refused, expired).",
        labels=["action", "result"],
    )
    by_action: dict[str, dict[str, int]] = {a: {} for a in _KPI_ACTIONS}
    for action, counts in getattr(s, "results", {}).items():
        by_action[action] = dict(counts)
    for action, counts in sorted(by_action.items()):
        for result in (*COMMAND_RESULTS, *sorted(set(counts) - set(COMMAND_RESULTS))):
            results.add_metric([action, result], counts.get(result, 0))
    return [
        counter("commands_received", "Messages received on the command topic.", s.received),
        counter("commands_accepted", "Commands authenticated, not replayed, stored: they will run.", s.accepted),
        rejected,
        counter("commands_duplicates", "Re-deliveries of a known command id (answered, not run again).", s.duplicates),
        executions,
        results,
        counter("command_retries", "Control frames sent again (no answer, or resumed after a restart).", s.retries),
        counter("command_no_answer", "Control attempts the meter did not answer.", s.no_answer),
        counter("command_resumed", "Executions picked up again after a restart.", s.resumed),
        counter("command_acks_published", "Acks confirmed by the broker (PUBACK).", s.acks_published),
        gauge("command_acks_pending", "Acks stored and not yet confirmed by the broker.", s.acks_pending),
        gauge("commands_held", "Meters held by the mass-disconnect guard right now.", s.held_now),
        counter(
            "mass_disconnect_guard_trips",
            "Times the mass-disconnect guard started holding disconnects.",
            s.guard_tripped,
        ),
        counter("commands_released", "Held meters released to run by a release command.", s.released),
        counter(
            "command_internal_errors", "Command handling failures that are bugs or a broken disk.", s.internal_errors
        ),
    ]


class MetricsServer:
    """The /metrics HTTP server (a thread of prometheus-client's); ``close`` stops it."""

    def __init__(self, server: Any, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def port(self) -> int:
        return self.address[1]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start_http(host: str, port: int, metrics: Metrics) -> MetricsServer:
    """Serve ``metrics`` on http://host:port/metrics (port 0 picks a free one)."""
    server, thread = start_http_server(port, addr=host, registry=metrics.registry)
    return MetricsServer(server, thread)


# -- the metrics reference (docs/metrics.md) ------------------------------------------------------

# Families that are not always on /metrics, and when they are.
_CONDITIONS: dict[str, str] = {
    "meter_gateway_link_connected": "buses with a link (not a Modbus bus without meters)",
    "meter_gateway_link_connects": "buses with a link",
    "meter_gateway_link_losses": "buses with a link",
    "meter_gateway_link_received_bytes": "buses with a link",
    "meter_gateway_link_sent_bytes": "buses with a link",
    "meter_gateway_modbus_exceptions": "Modbus buses",
    "meter_gateway_uplink_last_delivery_timestamp_seconds": "after the first delivery",
    "meter_gateway_meter_clock_drift_max_seconds": "once a meter clock was measured",
}
_CONDITIONAL_PREFIXES: tuple[tuple[str, str], ...] = (
    ("meter_gateway_frozen_", "with `[daily_frozen]`"),
    ("meter_gateway_backfill_", "with `[daily_frozen]`"),
    ("meter_gateway_time_sync", "with `[time_sync]` enabled"),
    ("meter_gateway_meter_clock_", "with `[time_sync]` enabled"),
    ("meter_gateway_meters_clock_", "with `[time_sync]` enabled"),
    ("meter_gateway_command_acks", "with `[commands] enabled`"),
    ("meter_gateway_commands_", "with `[commands] enabled`"),
    ("meter_gateway_command_executions", "with `[commands] enabled`"),
    ("meter_gateway_command_results", "with `[commands] enabled`"),
    ("meter_gateway_command_retries", "with `[commands] enabled`"),
    ("meter_gateway_command_no_answer", "with `[commands] enabled`"),
    ("meter_gateway_command_resumed", "with `[commands] enabled`"),
    ("meter_gateway_command_internal", "with `[commands] enabled`"),
    ("meter_gateway_mass_disconnect", "with `[commands] enabled`"),
)
# Label values not listed in the reference: they come from the config or the host.
_OPEN_LABELS = frozenset({"bus", "le", "version", "implementation", "major", "minor", "patchlevel", "generation"})


def reference_registry() -> CollectorRegistry:
    """A registry holding every family the daemon can export, each fed an all-zero snapshot: the
    source of docs/metrics.md (``python -m meter_gateway.gateway.daemon.metrics``)."""
    from meter_gateway.drivers.bus import BusCounters
    from meter_gateway.gateway.commands.executor import CommandStats
    from meter_gateway.gateway.jobs.frozen import FrozenStats
    from meter_gateway.gateway.jobs.time_sync import TimeSyncStats
    from meter_gateway.gateway.store.outbox import OutboxStats
    from meter_gateway.gateway.uplink.session import UplinkStats

    metrics = Metrics(version=__version__)
    metrics.add_bus("bus")
    from meter_gateway.drivers.modbus import COUNTER_PREFIX, EXCEPTION_NAMES

    modbus = {f"{COUNTER_PREFIX}{code:#04x}": 0 for code in EXCEPTION_NAMES}
    metrics.update_bus("bus", BusCounters().as_dict() | {"link_connected": 0} | modbus)
    outbox = OutboxStats("", 0, "", "", "", 0, 0, 0, None, None, 0, 0, 0, None, 0, 0)
    metrics.update_outbox(outbox, now=0.0)
    metrics.update_uplink(UplinkStats(last_delivery=0.0))
    time_sync = TimeSyncStats()
    time_sync.drifts.append(0.0)
    metrics.update_jobs(FrozenStats(), time_sync)
    metrics.update_commands(CommandStats())
    return metrics.registry


def exported_when(name: str) -> str:
    """When the family ``name`` (without ``_total``) is on /metrics: "always" or the condition."""
    if name in _CONDITIONS:
        return _CONDITIONS[name]
    return next((text for prefix, text in _CONDITIONAL_PREFIXES if name.startswith(prefix)), "always")


def reference_markdown(registry: CollectorRegistry | None = None) -> str:
    """docs/metrics.md: one row per family, from the registry itself so it cannot drift."""
    registry = reference_registry() if registry is None else registry
    lines = [
        "# Metrics reference",
        "",
        "Generated from the code's own registry by `python -m meter_gateway.gateway.daemon.metrics >"
        " docs/metrics.md`; tests/test_metrics.py fails when this file and the code disagree."
        ' docs/operations.md ("Metrics") explains how to read them; docs/commands.md the command ones.',
        "",
        "Every label value the code knows is exported at 0 from the start, so `rate()` and `increase()`"
        " see the first event. `bus` values are the configured bus names.",
        "",
        "| Metric | Type | Labels | Exported | Meaning |",
        "|---|---|---|---|---|",
    ]
    seen: set[str] = set()
    for family in registry.collect():
        if family.name in seen:
            continue
        seen.add(family.name)
        shown = f"{family.name}_total" if family.type == "counter" else family.name
        values: dict[str, set[str]] = {}
        for sample in family.samples:
            for label, value in sample.labels.items():
                values.setdefault(label, set()).add(value)
        labels = ", ".join(
            label if label in _OPEN_LABELS else f"{label}: " + " ".join(f"`{v}`" for v in sorted(vals))
            for label, vals in sorted(values.items())
            if label != "le"
        )
        doc = family.documentation.replace("|", "\\|")
        lines.append(f"| `{shown}` | {family.type} | {labels} | {exported_when(family.name)} | {doc} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    sys.stdout.write(reference_markdown())

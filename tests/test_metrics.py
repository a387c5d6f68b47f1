"""Metrics scraped over real HTTP from a loopback port, parsed with prometheus-client's own parser."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from prometheus_client.parser import text_string_to_metric_families

from meter_gateway.drivers.bus import BusCounters
from meter_gateway.gateway.metrics import LATENCY_BUCKETS, Metrics, MetricsServer, start_http


@pytest.fixture
def served() -> Iterator[tuple[Metrics, MetricsServer]]:
    metrics = Metrics(version="9.9.9")
    server = start_http("127.0.0.1", 0, metrics)
    try:
        yield metrics, server
    finally:
        server.close()


def scrape(server: MetricsServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    host, port = server.address
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_build_info_and_meter_states_always_present(served: tuple[Metrics, MetricsServer]) -> None:
    _, server = served
    samples = scrape(server)
    assert samples[("meter_gateway_build_info", (("version", "9.9.9"),))] == 1
    for state in ("online", "degraded", "offline", "unknown"):
        assert samples[("meter_gateway_meters", (("state", state),))] == 0
    assert samples[("meter_gateway_config_reloads_total", (("result", "failed"),))] == 0


def test_bus_snapshot_counters_follow_the_snapshot(served: tuple[Metrics, MetricsServer]) -> None:
    metrics, server = served
    counters = BusCounters(ok=40, retries=3, timeouts=5, echo_ignored=7, garbage_bytes=123, late_replies=2)
    snap = counters.as_dict() | {"queued": 4, "link_connected": 1, "link_bytes_in": 900, "link_connects": 2}
    metrics.update_bus("rs485-1", snap)
    s = scrape(server)
    bus = ("bus", "rs485-1")
    assert s[("meter_gateway_bus_transactions_total", (bus, ("outcome", "ok")))] == 40
    assert s[("meter_gateway_bus_transactions_total", (bus, ("outcome", "no_answer")))] == 0
    assert s[("meter_gateway_bus_attempts_total", (bus, ("kind", "retry")))] == 3
    assert s[("meter_gateway_bus_attempts_total", (bus, ("kind", "timeout")))] == 5
    assert s[("meter_gateway_bus_rejected_replies_total", (bus, ("kind", "echo")))] == 7
    assert s[("meter_gateway_bus_rejected_replies_total", (bus, ("kind", "late")))] == 2
    assert s[("meter_gateway_bus_discarded_bytes_total", (bus, ("kind", "garbage")))] == 123
    assert s[("meter_gateway_bus_queued", (bus,))] == 4
    assert s[("meter_gateway_link_connected", (bus,))] == 1
    assert s[("meter_gateway_link_received_bytes_total", (bus,))] == 900

    # a later snapshot replaces the earlier one (the bus owns the count; no double counting)
    counters.ok = 41
    metrics.update_bus("rs485-1", counters.as_dict())
    s = scrape(server)
    assert s[("meter_gateway_bus_transactions_total", (bus, ("outcome", "ok")))] == 41
    assert ("meter_gateway_link_connected", (bus,)) not in s  # no link in this snapshot

    metrics.remove_bus("rs485-1")
    assert not any(name.startswith("meter_gateway_bus_") for name, _ in scrape(server))


def test_every_bus_counter_key_is_exported_or_deliberately_skipped() -> None:
    from meter_gateway.gateway import metrics as m

    mapped = {*m._BUS_TRANSACTIONS, *m._BUS_ATTEMPTS, *m._BUS_REJECTED, *m._BUS_DISCARDED_BYTES, "sent"}
    not_exported = {"jobs", "jobs_failed"}  # run() jobs end in the same outcome counters
    assert set(BusCounters().as_dict()) - mapped == not_exported


def test_latency_histogram_and_owned_counters(served: tuple[Metrics, MetricsServer]) -> None:
    metrics, server = served
    metrics.observe_latency("tcp-a", 0.004)
    metrics.observe_latency("tcp-a", 0.3)
    metrics.observe_latency("tcp-a", 20.0)
    metrics.readings_acquired.inc(5)
    metrics.missed_slots.labels(bus="tcp-a").inc()
    metrics.count_reload(ok=True, when=1_700_000_000.0)
    metrics.count_reload(ok=False)
    s = scrape(server)
    bus = ("bus", "tcp-a")
    assert LATENCY_BUCKETS[0] == 0.005
    assert LATENCY_BUCKETS[-1] == 10.0
    assert s[("meter_gateway_reply_latency_seconds_bucket", (bus, ("le", "0.005")))] == 1
    assert s[("meter_gateway_reply_latency_seconds_bucket", (bus, ("le", "0.5")))] == 2
    assert s[("meter_gateway_reply_latency_seconds_bucket", (bus, ("le", "10.0")))] == 2
    assert s[("meter_gateway_reply_latency_seconds_bucket", (bus, ("le", "+Inf")))] == 3
    assert s[("meter_gateway_reply_latency_seconds_count", (bus,))] == 3
    assert s[("meter_gateway_readings_acquired_total", ())] == 5
    assert s[("meter_gateway_missed_slots_total", (bus,))] == 1
    assert s[("meter_gateway_config_reloads_total", (("result", "ok"),))] == 1
    assert s[("meter_gateway_config_reloads_total", (("result", "failed"),))] == 1
    assert s[("meter_gateway_config_last_reload_timestamp_seconds", ())] == 1_700_000_000.0


@dataclass
class FakeOutboxStats:
    """Shape of gateway.outbox.OutboxStats, with only the fields the metrics read."""

    depth: int
    oldest_added_at: float | None
    file_bytes: int
    wal_bytes: int
    storage_alarm: str | None
    counters: dict[str, int] = field(default_factory=dict)
    held: int = 0

    def oldest_age(self, now: float) -> float | None:
        return None if self.oldest_added_at is None else max(0.0, now - self.oldest_added_at)


def test_outbox_meters_and_uplink(served: tuple[Metrics, MetricsServer]) -> None:
    from meter_gateway.gateway.uplink import UplinkStats

    metrics, server = served
    counters = {"committed": 10, "duplicates": 2, "overflow_dropped": 3, "refused": 4, "delivered": 6, "invalid": 0}
    counters |= {"disk_full_events": 1, "quarantined": 1, "wal_lost": 0}
    metrics.update_outbox(FakeOutboxStats(7, 1000.0, 4096, 512, "disk full", counters, held=200), now=1090.0)
    metrics.update_meter_states({"online": 5, "offline": 2})
    up = UplinkStats(connected=True, published_batches=3, published_readings=30, last_delivery=1_700_000_123.5)
    up.fail("not_authorized")
    up.fail("not_authorized")
    metrics.update_uplink(up)
    s = scrape(server)
    assert s[("meter_gateway_outbox_depth", ())] == 7
    assert s[("meter_gateway_outbox_oldest_undelivered_age_seconds", ())] == 90.0
    assert s[("meter_gateway_outbox_disk_bytes", ())] == 4608
    assert s[("meter_gateway_outbox_disk_full", ())] == 1
    assert s[("meter_gateway_outbox_held", ())] == 200
    assert s[("meter_gateway_outbox_disk_full_events_total", ())] == 1
    assert s[("meter_gateway_outbox_quarantined_total", ())] == 1
    assert s[("meter_gateway_outbox_wal_lost_total", ())] == 0
    assert s[("meter_gateway_readings_committed_total", ())] == 10
    assert s[("meter_gateway_readings_duplicates_total", ())] == 2
    assert s[("meter_gateway_outbox_overflow_dropped_total", ())] == 3
    assert s[("meter_gateway_outbox_refused_total", ())] == 4
    assert s[("meter_gateway_meters", (("state", "online"),))] == 5
    assert s[("meter_gateway_meters", (("state", "offline"),))] == 2
    assert s[("meter_gateway_meters", (("state", "degraded"),))] == 0
    assert s[("meter_gateway_uplink_connected", ())] == 1
    assert s[("meter_gateway_uplink_published_batches_total", ())] == 3
    assert s[("meter_gateway_uplink_published_readings_total", ())] == 30
    assert s[("meter_gateway_uplink_publish_failures_total", (("reason", "not_authorized"),))] == 2
    assert s[("meter_gateway_uplink_last_delivery_timestamp_seconds", ())] == 1_700_000_123.5

    # storage back, outbox drained
    metrics.update_outbox(FakeOutboxStats(0, None, 4096, 0, None, counters), now=2000.0)
    s = scrape(server)
    assert s[("meter_gateway_outbox_disk_full", ())] == 0
    assert s[("meter_gateway_outbox_oldest_undelivered_age_seconds", ())] == 0


def test_instances_do_not_collide() -> None:
    a, b = Metrics(), Metrics()
    a.readings_acquired.inc(3)
    assert a.registry.get_sample_value("meter_gateway_readings_acquired_total") == 3
    assert b.registry.get_sample_value("meter_gateway_readings_acquired_total") == 0


def test_names_follow_conventions() -> None:
    metrics = Metrics()
    metrics.update_bus("b", BusCounters().as_dict() | {"link_connected": 0})
    metrics.update_outbox(FakeOutboxStats(0, None, 0, 0, None), now=0.0)
    from meter_gateway.gateway.commands.executor import CommandStats

    metrics.update_commands(CommandStats(rejected={"malformed": 1}, executed={"disconnect": 1}))
    for family in metrics.registry.collect():
        assert family.name.startswith("meter_gateway_"), family.name
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples), family.name
        assert not family.name.endswith(("_ms", "_milliseconds", "_kb")), family.name


def test_server_stops() -> None:
    server = start_http("127.0.0.1", 0, Metrics())
    host, port = server.address
    server.close()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=2)


def test_dashboard_queries_only_exported_metrics() -> None:
    import json
    import re
    from pathlib import Path

    from meter_gateway.gateway.uplink import UplinkStats

    metrics = Metrics()
    metrics.update_bus("b", BusCounters().as_dict() | {"link_connected": 1})
    metrics.update_outbox(FakeOutboxStats(0, None, 0, 0, None), now=0.0)
    uplink = UplinkStats(last_delivery=1.0)
    uplink.fail("timeout")  # reasons appear once they happen
    metrics.update_uplink(uplink)
    metrics.observe_latency("b", 0.1)
    metrics.missed_slots.labels(bus="b").inc()
    exported = {s.name for family in metrics.registry.collect() for s in family.samples}

    path = Path(__file__).resolve().parent.parent / "config" / "grafana-dashboard.json"
    dashboard = json.loads(path.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs.append(dashboard["templating"]["list"][1]["query"]["query"])
    used = {name for e in exprs for name in re.findall(r"\bmeter_gateway_\w+", e)}
    assert len(used) > 20
    assert used - exported == set()


def test_frozen_and_time_sync_jobs(served: tuple[Metrics, MetricsServer]) -> None:
    from meter_gateway.gateway.frozen_job import FrozenStats
    from meter_gateway.gateway.time_sync_job import TimeSyncStats

    metrics, server = served
    metrics.update_jobs(None, None)
    assert not any(name.startswith("meter_gateway_frozen") for name, _ in scrape(server))
    frozen = FrozenStats(frozen_reads=4, backfilled_days=3, lost_days=1, owed=2, slots_filled=6, slots_unfillable=9)
    sync = TimeSyncStats(broadcasts=1, unicasts=2, corrected=5, ineffective=1, clock_suspect_meters=3)
    sync.drifts.extend([1.5, -42.0, 3.0])
    sync.alarms["m9"] = 400.0
    metrics.update_jobs(frozen, sync)
    s = scrape(server)
    assert s[("meter_gateway_frozen_days_total", (("kind", "on_time"),))] == 4
    assert s[("meter_gateway_frozen_days_total", (("kind", "backfill"),))] == 3
    assert s[("meter_gateway_frozen_lost_days_total", ())] == 1
    assert s[("meter_gateway_frozen_owed", ())] == 2
    assert s[("meter_gateway_backfill_slots_total", (("result", "filled"),))] == 6
    assert s[("meter_gateway_backfill_slots_total", (("result", "unfillable"),))] == 9
    assert s[("meter_gateway_time_syncs_total", (("mode", "unicast"),))] == 2
    assert s[("meter_gateway_time_sync_results_total", (("result", "ineffective"),))] == 1
    assert s[("meter_gateway_meter_clock_alarms", ())] == 1
    assert s[("meter_gateway_meters_clock_suspect", ())] == 3
    assert s[("meter_gateway_meter_clock_drift_max_seconds", ())] == 42.0


def test_command_stats_snapshot(served: tuple[Metrics, MetricsServer]) -> None:
    from meter_gateway.gateway.commands.executor import CommandStats

    metrics, server = served
    metrics.update_commands(None)  # commands disabled: nothing exported
    assert not any("command" in name for name, _ in scrape(server))

    stats = CommandStats(received=12, accepted=9, duplicates=1, retries=2, no_answer=3, resumed=1)
    stats.reject("bad_signature")
    stats.reject("replayed")
    stats.reject("replayed")
    stats.executed.update({"disconnect": 6, "relay_status": 1})
    for state, action in [
        ("verified", "disconnect"),
        ("verified", "disconnect"),
        ("unverified", "disconnect"),
        ("meter_refused", "disconnect"),
        ("expired", "reconnect"),
        ("verified", "relay_status"),
        ("queued", "disconnect"),  # not a result: not counted
    ]:
        stats.count_state(state, action)
    stats.held_now, stats.guard_tripped, stats.released = 950, 1, 50
    stats.acks_pending, stats.acks_published = 4, 40
    metrics.update_commands(stats)
    s = scrape(server)

    def result(action: str, res: str) -> float:
        return s[("meter_gateway_command_results_total", (("action", action), ("result", res)))]

    assert s[("meter_gateway_commands_received_total", ())] == 12
    assert s[("meter_gateway_commands_accepted_total", ())] == 9
    assert s[("meter_gateway_commands_rejected_total", (("reason", "replayed"),))] == 2
    assert s[("meter_gateway_commands_rejected_total", (("reason", "bad_signature"),))] == 1
    assert s[("meter_gateway_command_executions_total", (("action", "disconnect"),))] == 6
    assert (result("disconnect", "verified"), result("disconnect", "unverified")) == (2, 1)
    assert (result("disconnect", "meter_refused"), result("disconnect", "expired")) == (1, 0)
    assert result("reconnect", "expired") == 1
    assert result("reconnect", "verified") == 0  # KPI series exist before the first result
    assert result("relay_status", "verified") == 1
    assert (stats.verified, stats.unverified, stats.expired) == (3, 1, 1)
    assert s[("meter_gateway_command_retries_total", ())] == 2
    assert s[("meter_gateway_command_no_answer_total", ())] == 3
    assert s[("meter_gateway_command_resumed_total", ())] == 1
    assert s[("meter_gateway_command_acks_pending", ())] == 4
    assert s[("meter_gateway_command_acks_published_total", ())] == 40
    assert s[("meter_gateway_commands_held", ())] == 950
    assert s[("meter_gateway_mass_disconnect_guard_trips_total", ())] == 1
    assert s[("meter_gateway_commands_released_total", ())] == 50

    # the service owns the counts: a later snapshot replaces the earlier one
    stats.held_now = 0
    stats.count_state("verified", "reconnect")
    metrics.update_commands(stats)
    s = scrape(server)
    assert s[("meter_gateway_commands_held", ())] == 0
    assert result("reconnect", "verified") == 1

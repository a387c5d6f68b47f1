"""Metrics scraped over real HTTP from a loopback port, parsed with prometheus-client's own parser."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from meter_gateway.drivers.bus import BusCounters
from meter_gateway.gateway.daemon.metrics import LATENCY_BUCKETS, Metrics, MetricsServer, start_http
from tests.plugins.broker import Broker
from tests.plugins.simulators import SimBusFactory


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


def test_latency_counts_expose_what_prometheus_clients_histogram_would() -> None:
    """The per-bus latency counts against prometheus-client's own Histogram fed the same values,
    bounds included (a bucket's bound is inclusive), in the text exposition a scrape sees."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    values = [0.0, 0.001, *LATENCY_BUCKETS, 0.0051, 0.3, 9.99, 10.0001, 20.0, 1e9]
    ours = Metrics()
    ours.add_bus("a")
    for v in values:
        ours.latency("a").observe(v)
    reference = CollectorRegistry()
    histogram = Histogram(
        "meter_gateway_reply_latency_seconds",
        "Time from request written to accepted reply, per bus.",
        ["bus"],
        buckets=LATENCY_BUCKETS,
        registry=reference,
    )
    for v in values:
        histogram.labels(bus="a").observe(v)

    def lines(text: bytes) -> list[str]:
        return sorted(
            line
            for line in text.decode().splitlines()
            if line.startswith("meter_gateway_reply_latency_seconds") and "_created" not in line
        )

    want = lines(generate_latest(reference))
    assert len(want) == len(LATENCY_BUCKETS) + 3
    assert lines(generate_latest(ours.registry)) == want
    ours.remove_bus("a")
    assert lines(generate_latest(ours.registry)) == []


def test_every_bus_counter_key_is_exported_or_deliberately_skipped() -> None:
    from meter_gateway.gateway.daemon import metrics as m

    mapped = {*m._BUS_TRANSACTIONS, *m._BUS_ATTEMPTS, *m._BUS_REJECTED, *m._BUS_DISCARDED_BYTES, "sent"}
    assert set(BusCounters().as_dict()) - mapped == set()


def test_latency_histogram_and_owned_counters(served: tuple[Metrics, MetricsServer]) -> None:
    metrics, server = served
    metrics.latency("tcp-a").observe(0.004)
    metrics.latency("tcp-a").observe(0.3)
    metrics.latency("tcp-a").observe(20.0)
    metrics.readings_acquired.inc(5)
    metrics.count_missed("tcp-a", "link_down")
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
    assert s[("meter_gateway_missed_slots_total", (bus, ("reason", "link_down")))] == 1
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
    from meter_gateway.gateway.uplink.session import UplinkStats

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
        # the process_*, python_* families are prometheus-client's standard ones, named as everywhere
        assert family.name.startswith(("meter_gateway_", "process_", "python_")), family.name
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples), family.name
        assert not family.name.endswith(("_ms", "_milliseconds", "_kb")), family.name


def test_server_stops() -> None:
    server = start_http("127.0.0.1", 0, Metrics())
    host, port = server.address
    server.close()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=2)


def dashboard_metrics() -> set[str]:
    """Every metric name a panel (or the instance selector) of the shipped dashboard queries."""
    import json
    import re
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "config" / "grafana-dashboard.json"
    dashboard = json.loads(path.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs.append(dashboard["templating"]["list"][1]["query"]["query"])
    return {name for e in exprs for name in re.findall(r"\b(?:meter_gateway|process|python)_\w+", e)}


def test_dashboard_queries_only_exported_metrics() -> None:
    """A panel querying a misspelt or renamed metric shows "No data" forever."""
    from meter_gateway.gateway.daemon.metrics import reference_registry

    exported = {s.name for family in reference_registry().collect() for s in family.samples}
    used = dashboard_metrics()
    assert len(used) > 20
    assert used - exported == set()
    # the remote-command panels: commands by state, guard holds, verification latency
    assert {
        "meter_gateway_command_results_total",
        "meter_gateway_commands_rejected_total",
        "meter_gateway_commands_held",
        "meter_gateway_command_verify_seconds_bucket",
        "meter_gateway_missed_slots_total",
        "process_resident_memory_bytes",
    } <= used


def test_frozen_and_time_sync_jobs(served: tuple[Metrics, MetricsServer]) -> None:
    from meter_gateway.gateway.jobs.frozen import FrozenStats
    from meter_gateway.gateway.jobs.time_sync import TimeSyncStats

    metrics, server = served
    metrics.update_jobs(None, None)
    assert not any(name.startswith("meter_gateway_frozen") for name, _ in scrape(server))
    frozen = FrozenStats(frozen_reads=4, backfilled_days=3, lost_days=1, owed=2, slots_filled=6, slots_unfillable=9)
    sync = TimeSyncStats(broadcasts=1, unicasts=2, corrected=5, ineffective=1, clock_suspect_meters=3)
    sync.drifts.extend([1.5, -42.0, 3.0])
    sync.alarms["m9"] = 400.0
    metrics.update_jobs(frozen, sync)
    s = scrape(server)
    assert s[("meter_gateway_frozen_reads_total", (("kind", "on_time"),))] == 4
    assert s[("meter_gateway_frozen_reads_total", (("kind", "backfill"),))] == 3
    assert s[("meter_gateway_frozen_lost_total", ())] == 1
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
    # (the verification histogram is the daemon's own, exported at 0 either way)
    assert not any("command" in name and "verify" not in name for name, _ in scrape(server))

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


# -- issue 20: label values born at 0, process metrics, the generated reference ---------------------


def test_every_known_label_value_is_exported_at_zero_before_its_first_event() -> None:
    """A counter series born at its first increment makes increase() miss that event (see
    tests/test_alerts.py): every reason, bus and action the code knows exists from the start."""
    from meter_gateway.gateway.commands.executor import CommandStats
    from meter_gateway.gateway.uplink.session import UplinkStats

    metrics = Metrics()
    metrics.add_bus("rs485-1")
    metrics.update_uplink(UplinkStats())
    metrics.update_commands(CommandStats())
    value = metrics.registry.get_sample_value
    for reason in ("daemon_down", "link_down", "meter_offline", "read_failed", "queue_full", "late"):
        assert value("meter_gateway_missed_slots_total", {"bus": "rs485-1", "reason": reason}) == 0, reason
    for reason in ("bad_signature", "unknown_key", "key_not_allowed", "wrong_gateway", "unsigned", "malformed"):
        assert value("meter_gateway_commands_rejected_total", {"reason": reason}) == 0, reason
    for reason in ("not_authorized", "ack_timeout", "connect_refused", "quota_exceeded"):
        assert value("meter_gateway_uplink_publish_failures_total", {"reason": reason}) == 0, reason
    for action in ("disconnect", "reconnect"):
        assert value("meter_gateway_command_executions_total", {"action": action}) == 0
        assert value("meter_gateway_command_verify_seconds_count", {"action": action}) == 0
    assert value("meter_gateway_reply_latency_seconds_count", {"bus": "rs485-1"}) == 0
    assert value("meter_gateway_watchdog_misses_total") == 0

    # a bus that leaves the configuration takes its series along
    metrics.remove_bus("rs485-1")
    assert value("meter_gateway_missed_slots_total", {"bus": "rs485-1", "reason": "link_down"}) is None


def test_metric_reason_tables_match_the_code_that_produces_them() -> None:
    from meter_gateway.drivers.errors import LinkDown, NoAnswer
    from meter_gateway.drivers.health import MeterOffline
    from meter_gateway.gateway.commands.auth import REJECT_REASONS
    from meter_gateway.gateway.daemon.metrics import COMMAND_REJECT_REASONS, MISSED_SLOT_REASONS, missed_slot_reason

    assert set(REJECT_REASONS) <= set(COMMAND_REJECT_REASONS)
    assert missed_slot_reason(LinkDown.kind) == "link_down"
    assert missed_slot_reason(MeterOffline.kind) == "meter_offline"
    assert missed_slot_reason(NoAnswer.kind) == "read_failed"
    assert {missed_slot_reason(k) for k in ("bad_reply", "meter_refused", "configuration")} == {"read_failed"}
    assert set(MISSED_SLOT_REASONS) >= {"daemon_down", "link_down", "read_failed"}
    with pytest.raises(ValueError, match="unknown missed slot reason"):
        Metrics().count_missed("b", "bored")


def test_process_platform_and_gc_collectors_are_exported(served: tuple[Metrics, MetricsServer]) -> None:
    _, server = served
    s = scrape(server)
    names = {name for name, _ in s}
    assert {"process_resident_memory_bytes", "process_start_time_seconds", "process_cpu_seconds_total"} <= names
    assert "process_open_fds" in names
    assert "python_info" in names
    assert any(name == "python_gc_collections_total" for name in names)
    assert s[("process_resident_memory_bytes", ())] > 1_000_000


def test_docs_metrics_md_is_generated_from_the_registry() -> None:
    from pathlib import Path

    from meter_gateway.gateway.daemon.metrics import reference_markdown, reference_registry

    path = Path(__file__).resolve().parent.parent / "docs" / "metrics.md"
    assert path.read_text() == reference_markdown(), (
        "docs/metrics.md is stale: python -m meter_gateway.gateway.daemon.metrics > docs/metrics.md"
    )
    # every family of a fully fed registry is documented, once
    text = path.read_text()
    for family in reference_registry().collect():
        shown = f"{family.name}_total" if family.type == "counter" else family.name
        assert text.count(f"| `{shown}` |") == 1, shown


@pytest.mark.asyncio
async def test_verification_latency_of_a_real_disconnect_is_observed(
    tmp_path: Path, mosquitto: Broker, sim_bus: SimBusFactory
) -> None:
    """A disconnect through the command service on a simulated DL/T 645 meter, acked over a real
    broker: the time from its control frame to "verified" lands in the histogram."""
    import paho.mqtt.publish as mqtt_publish

    from meter_gateway.gateway.commands.envelope import encode_envelope
    from meter_gateway.gateway.commands.service import CommandService
    from meter_gateway.gateway.store.outbox import AsyncOutbox
    from meter_gateway.gateway.uplink.session import InboundMessage, Uplink, UplinkConfig
    from tests.test_command_exec import GW, dlt_rig, envelope, mid

    async def until(cond: Callable[[], bool], what: str) -> None:
        end = time.monotonic() + 10
        while not cond():
            assert time.monotonic() < end, what
            await asyncio.sleep(0.01)

    metrics = Metrics()
    handle = await sim_bus(1)
    meter = mid(handle.meters[0])
    async with dlt_rig(tmp_path, handle) as rig:
        box = await AsyncOutbox.open(tmp_path / "outbox.sqlite", synchronous="NORMAL")

        async def on_command(msg: InboundMessage) -> None:
            await service.on_message(msg)

        uplink = Uplink(
            UplinkConfig(gateway_id=GW, host=mosquitto.host, port=mosquitto.port), box, on_command=on_command
        )

        async def publish(topic: str, payload: bytes) -> bool:
            return await uplink.publish(topic, payload, within=1.0)

        service = CommandService(
            rig.config, rig.meters, rig.buses, publish, uplink.topics.acks, on_verified=metrics.observe_verification
        )
        stop = asyncio.Event()
        tasks = [asyncio.create_task(uplink.run()), asyncio.create_task(service.run(stop))]
        try:
            await until(lambda: uplink.stats.connected, "uplink connected")
            await asyncio.sleep(0.1)  # let the command subscription settle
            before = time.monotonic()
            payload = encode_envelope(envelope("disconnect", [meter]))
            await asyncio.to_thread(
                mqtt_publish.single,
                uplink.topics.commands,
                payload,
                qos=1,
                hostname=mosquitto.host,
                port=mosquitto.port,
            )
            await until(lambda: service.stats.verified == 1, "verified")
            took = time.monotonic() - before
        finally:
            stop.set()
            await asyncio.wait_for(uplink.stop(), 10)
            await asyncio.gather(*tasks)
            await box.close()
    value = metrics.registry.get_sample_value
    assert value("meter_gateway_command_verify_seconds_count", {"action": "disconnect"}) == 1
    observed = value("meter_gateway_command_verify_seconds_sum", {"action": "disconnect"})
    assert observed is not None
    assert 0 <= observed <= took
    assert value("meter_gateway_command_verify_seconds_count", {"action": "reconnect"}) == 0


@pytest.mark.asyncio
async def test_missed_slots_count_every_slot_not_read_with_its_reason(tmp_path: Path, mosquitto: Broker) -> None:
    """A gateway whose bus link is down misses every slot (reason link_down); stopped for a while
    and started again, it counts the slots that passed meanwhile (reason daemon_down)."""
    from meter_gateway.gateway.config import load_config
    from meter_gateway.gateway.daemon.app import Gateway
    from tests.plugins.ports import free_port
    from tests.test_daemon import config_text

    dead_port = free_port()  # nothing listens: the Modbus TCP link stays down
    path = tmp_path / "gateway.toml"
    path.write_text(config_text(tmp_path, mosquitto, dead_port, units=(1, 2), metrics_port=free_port()))

    def missed(metrics: Metrics, reason: str) -> float:
        value = metrics.registry.get_sample_value(
            "meter_gateway_missed_slots_total", {"bus": "modbus-a", "reason": reason}
        )
        assert value is not None, reason  # exported from the start
        return value

    async def run_for(metrics: Metrics, seconds: float) -> None:
        gateway = Gateway(load_config(path), metrics=metrics)
        stop = asyncio.Event()
        task = asyncio.create_task(gateway.run(stop))
        await asyncio.sleep(seconds)
        stop.set()
        await asyncio.wait_for(task, 30)

    first = Metrics()
    await run_for(first, 4.5)
    assert missed(first, "link_down") >= 4  # two meters, a 1 s group: every failed slot counted
    assert missed(first, "daemon_down") == 0

    await asyncio.sleep(3.0)  # the daemon is down for three slots
    second = Metrics()
    await run_for(second, 1.5)
    assert missed(second, "daemon_down") >= 2 * 2
    assert missed(second, "read_failed") == 0

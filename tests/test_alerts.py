"""The shipped alert rules (config/alerts.yml) under `promtool check rules` and `promtool test rules`
(tests/alerts_test.yml), and `promtool check metrics` on a live scrape of the real daemon.

promtool comes with Debian's `prometheus` package, which `./dev test` installs when it runs as root."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from meter_gateway.simulators.modbus_meter import ModbusSimServer, SimulatedMeter
from tests.plugins.broker import Broker
from tests.plugins.ports import free_port
from tests.test_daemon import config_text, start_daemon, stop_daemon, wait_until

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "config" / "alerts.yml"
UNIT_TESTS = ROOT / "tests" / "alerts_test.yml"


def promtool() -> str:
    found = shutil.which("promtool") or ("/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None)
    if found is not None:
        return found
    if os.geteuid() == 0:
        pytest.fail("promtool is missing although we are root: `./dev test` installs Debian's prometheus package")
    pytest.skip("promtool not installed (Debian package prometheus; `./dev test` as root installs it)")


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], input=stdin, capture_output=True, text=True, timeout=120, check=False)


def rule_blocks(text: str) -> dict[str, str]:
    """Alert name -> the lines of its rule in config/alerts.yml."""
    parts = re.split(r"^      - alert: ", text, flags=re.MULTILINE)[1:]
    return {part.split("\n", 1)[0].strip(): part for part in parts}


def without_annotations(text: str) -> str:
    """The rules with their annotation blocks removed (see tests/alerts_test.yml)."""
    out: list[str] = []
    skipping = False
    for line in text.splitlines():
        if line == "        annotations:":
            skipping = True
            continue
        if skipping and (line.startswith("          ") or not line.strip()):
            continue
        skipping = False
        out.append(line)
    return "\n".join(out) + "\n"


EXPECTED_ALERTS = {
    "MeterGatewayDown",
    "MeterGatewayLinkDown",
    "MeterGatewayMeterOffline",
    "MeterGatewayMetersOffline",
    "MeterGatewayOutboxGrowing",
    "MeterGatewayReadingsNotDelivered",
    "MeterGatewayDiskFull",
    "MeterGatewayDeliveryStalled",
    "MeterGatewayCommandAuthFailures",
    "MeterGatewayWatchdogMiss",
}


def test_every_alert_has_a_severity_and_says_what_it_means_and_what_to_do() -> None:
    blocks = rule_blocks(RULES.read_text())
    assert set(blocks) >= EXPECTED_ALERTS
    for name, block in blocks.items():
        assert re.search(r"^          severity: (page|ticket)$", block, re.MULTILINE), name
        for key in ("summary", "description", "first_action"):
            assert re.search(rf"^          {key}: ", block, re.MULTILINE), f"{name}: no {key}"
    # each is documented in docs/operations.md with its meaning and first action
    operations = (ROOT / "docs" / "operations.md").read_text()
    for name in blocks:
        assert f"`{name}`" in operations, f"{name} is not in docs/operations.md"


def test_promtool_check_rules_accepts_the_shipped_file() -> None:
    done = run("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rule_blocks(RULES.read_text()))} rules found" in done.stdout


def test_promtool_unit_tests_fire_each_alert_on_the_first_event_and_not_when_healthy(tmp_path: Path) -> None:
    (tmp_path / "alerts.yml").write_text(without_annotations(RULES.read_text()))
    shutil.copyfile(UNIT_TESTS, tmp_path / "alerts_test.yml")
    checked = run("check", "rules", str(tmp_path / "alerts.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = set(re.findall(r"alertname: (\w+)", UNIT_TESTS.read_text()))
    assert tested == set(rule_blocks(RULES.read_text())), "every alert needs a case in tests/alerts_test.yml"
    done = run("test", "rules", str(tmp_path / "alerts_test.yml"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_promtool_unit_test_catches_a_lazily_born_counter(tmp_path: Path) -> None:
    """The counter-example the daemon avoids: with the auth-failure series created at the first
    rejection, promtool's expectation that the alert fires is not met."""
    (tmp_path / "alerts.yml").write_text(without_annotations(RULES.read_text()))
    lazy = UNIT_TESTS.read_text().replace(
        'instance="bad",reason="bad_signature"}\', values: \'0 0 0 1 1 1\'',
        'instance="bad",reason="bad_signature"}\', values: \'_ _ _ 1 1 1\'',
    )
    assert lazy != UNIT_TESTS.read_text()
    (tmp_path / "alerts_test.yml").write_text(lazy)
    done = run("test", "rules", str(tmp_path / "alerts_test.yml"))
    assert done.returncode != 0
    assert "MeterGatewayCommandAuthFailures" in done.stdout + done.stderr


# -- a live scrape ---------------------------------------------------------------------------------


@pytest_asyncio.fixture
async def modbus_sim() -> AsyncIterator[ModbusSimServer]:
    meters = {unit: SimulatedMeter("sim-3ph", start=time.time()) for unit in (1, 2)}
    server = ModbusSimServer(meters, transport="tcp", host="127.0.0.1", port=0)
    await server.start()
    yield server
    await server.stop()


@pytest.mark.asyncio
async def test_promtool_check_metrics_is_clean_on_the_running_daemon(
    tmp_path: Path, mosquitto: Broker, modbus_sim: ModbusSimServer
) -> None:
    promtool()  # skips before starting anything when promtool is missing
    port = free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(config_text(tmp_path, mosquitto, modbus_sim.address[1], units=(1, 2), metrics_port=port))
    proc = await start_daemon(config)
    try:

        def text() -> str:
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            except OSError:
                return ""

        await wait_until(lambda: 'meter_gateway_meters{state="online"} 2.0' in text(), 15, "meters online", proc)
        await wait_until(lambda: "meter_gateway_uplink_last_delivery_timestamp_seconds" in text(), 15, "a delivery")
        scraped = await asyncio.to_thread(text)
    finally:
        code, err = await stop_daemon(proc)
    assert code == 0, err[-2000:]
    done = await asyncio.to_thread(run, "check", "metrics", stdin=scraped)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout + done.stderr == ""
    # the series the alerts and the dashboard rely on are there on a healthy gateway, at 0
    assert 'meter_gateway_missed_slots_total{bus="modbus-a",reason="link_down"} 0.0' in scraped
    assert 'meter_gateway_uplink_publish_failures_total{reason="not_authorized"} 0.0' in scraped
    assert "meter_gateway_watchdog_misses_total 0.0" in scraped
    assert "process_start_time_seconds " in scraped
    # no dashboard panel is empty on a healthy gateway, except those of features this one has off
    from meter_gateway.gateway.daemon.metrics import exported_when
    from tests.test_metrics import dashboard_metrics

    live = {line.split("{")[0].split(" ")[0] for line in scraped.splitlines() if not line.startswith("#")}
    features = ("with `[commands] enabled`", "with `[daily_frozen]`", "with `[time_sync]` enabled")
    missing = {
        name
        for name in dashboard_metrics() - live
        if exported_when(re.sub(r"_(total|bucket|count|sum)$", "", name)) not in features
    }
    assert missing == set()


def test_promtool_check_metrics_is_clean_on_every_family_the_daemon_can_export() -> None:
    """The live daemon above runs without commands, daily freezes or time sync: their families are
    checked here, from the registry docs/metrics.md is generated from."""
    from prometheus_client import generate_latest

    from meter_gateway.gateway.daemon.metrics import reference_registry

    done = run("check", "metrics", stdin=generate_latest(reference_registry()).decode())
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout + done.stderr == ""

"""Config faults and event-loop stalls (docs/reliability.md): a config with typos or bad values
exits 78 quickly naming the key; a bad config on SIGHUP keeps the running one; a blocked event
loop stops the systemd watchdog pings; /metrics stays quick with 1,000 meters on 8 buses."""

from __future__ import annotations

import asyncio
import itertools
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from bench.e2e import PROTOCOLS, LineReader, gateway_config, parse_endpoints, simulator_config
from meter_gateway.gateway.config import load_config
from meter_gateway.gateway.daemon.app import Gateway
from meter_gateway.gateway.daemon.sdnotify import Notifier
from meter_gateway.simulators.modbus_meter import ModbusSimServer, SimulatedMeter
from tests.faults import scale
from tests.plugins.broker import Broker
from tests.plugins.ports import free_port
from tests.test_daemon import config_text, start_daemon, stop_daemon, wait_until
from tests.test_daemon import scrape as scrape_or_raise

ROOT = Path(__file__).resolve().parents[2]
EX_CONFIG = 78


def scrape(port: int) -> dict[str, float]:
    try:
        return scrape_or_raise(port)
    except OSError:
        return {}


@pytest_asyncio.fixture
async def modbus_sim() -> AsyncIterator[ModbusSimServer]:
    meters = {unit: SimulatedMeter("sim-3ph", start=time.time()) for unit in (1, 2)}
    server = ModbusSimServer(meters, transport="tcp", host="127.0.0.1", port=0)
    await server.start()
    yield server
    await server.stop()


# -- 11. typos and bad values ------------------------------------------------------------------

GOOD = """\
[gateway]
id = "gw-cfg"
state_dir = "{state}"

[uplink]
host = "127.0.0.1"
port = 1883

[outbox]
synchronous = "FULL"

[metrics]
enabled = false

[[buses]]
name = "bus-a"
type = "tcp"
host = "127.0.0.1"
port = 1502
protocol = "modbus-tcp"
reply_timeout = "1s"

[[meters]]
id = "mb-1"
bus = "bus-a"
protocol = "modbus"
address = 1
model = "sim-3ph"

[[poll_groups]]
name = "fast"
interval = "15m"
quantities = ["energy.active.import.total"]
"""

# (case, text replaced, replacement, what the error line must name)
BAD: list[tuple[str, str, str, str]] = [
    ("key_typo", 'reply_timeout = "1s"', 'reply_timout = "1s"', "buses[0].reply_timout"),
    ("section_typo", "[uplink]", "[uplnk]", "uplnk"),
    ("wrong_type", "port = 1883", 'port = "mqtt"', "uplink.port"),
    ("out_of_range", "port = 1883", "port = 70000", "uplink.port"),
    ("bad_duration", 'reply_timeout = "1s"', 'reply_timeout = "1 fortnight"', "buses[0].reply_timeout"),
    ("bad_choice", 'synchronous = "FULL"', 'synchronous = "SOMETIMES"', "outbox.synchronous"),
    ("unknown_bus", 'bus = "bus-a"', 'bus = "bus-b"', "meters[0].bus"),
    ("unknown_model", 'model = "sim-3ph"', 'model = "sim-9ph"', "meters[0].model"),
    ("unknown_quantity", '"energy.active.import.total"', '"energy.imported"', "poll_groups[0]"),
    ("toml_syntax", 'id = "gw-cfg"', 'id = "gw-cfg', "line 2"),
]


@pytest.mark.parametrize(("case", "old", "new", "names"), BAD, ids=[b[0] for b in BAD])
def test_bad_config_exits_78_within_2s_naming_the_key(
    tmp_path: Path, case: str, old: str, new: str, names: str
) -> None:
    good = GOOD.format(state=tmp_path / "state")
    assert old in good, case
    config = tmp_path / "gateway.toml"
    config.write_text(good.replace(old, new, 1))
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "meter_gateway.gateway.cli", "run", "-c", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    elapsed = time.monotonic() - started
    assert done.returncode == EX_CONFIG, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert errors, done.stderr[-2000:]
    assert any(str(config) in line and names in line for line in errors), errors
    assert "not starting" in done.stderr
    print(f"\n{case}: exit {done.returncode} in {elapsed:.2f} s: {errors[0]}")
    assert elapsed < 5.0  # hard bound even on a contended machine; the 2 s goal: the test below


def test_a_bad_config_exits_within_2s(tmp_path: Path) -> None:
    """Best of 3 runs, so a burst of load from other processes on a shared CI machine does not
    decide it; the product's own time (interpreter start, imports, validation) must be < 2 s."""
    config = tmp_path / "gateway.toml"
    config.write_text(GOOD.format(state=tmp_path / "state").replace("port = 1883", "port = 70000"))
    times = []
    for _ in range(3):
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "meter_gateway.gateway.cli", "run", "-c", str(config)],
            cwd=ROOT,
            capture_output=True,
            timeout=30,
            check=False,
        )
        times.append(time.monotonic() - started)
        assert done.returncode == EX_CONFIG
    print(f"\nexit 78 in {', '.join(f'{t:.2f}' for t in times)} s")
    assert min(times) < 2.0


def test_the_good_config_is_good(tmp_path: Path) -> None:
    # the cases above fail because of their one change, not because the base is broken
    path = tmp_path / "gateway.toml"
    path.write_text(GOOD.format(state=tmp_path / "state"))
    assert load_config(path).meters[0].id == "mb-1"


@pytest.mark.asyncio
async def test_bad_configs_on_sighup_keep_the_running_one(
    tmp_path: Path, mosquitto: Broker, modbus_sim: ModbusSimServer
) -> None:
    metrics_port = free_port()
    config = tmp_path / "gateway.toml"
    good = config_text(tmp_path, mosquitto, modbus_sim.address[1], units=(1, 2), metrics_port=metrics_port)
    config.write_text(good)
    proc = await start_daemon(config)
    try:
        await wait_until(
            lambda: scrape(metrics_port).get('meter_gateway_meters{state="online"}') == 2, 20, "2 online", proc
        )
        bad = [
            good.replace("reply_timeout", "reply_timout"),
            good.replace('address = 2\nmodel = "sim-3ph"', 'address = 2\nmodel = "nope"'),
            good.replace('interval = "1s"', 'interval = "-1s"'),
            good.replace("[[poll_groups]]", "[[poll_groups]"),
            good.replace('bus = "modbus-a"', 'bus = "nowhere"'),
        ]
        for n, text in enumerate(bad, start=1):
            config.write_text(text)
            acquired = scrape(metrics_port)["meter_gateway_readings_acquired_total"]
            proc.send_signal(signal.SIGHUP)
            await wait_until(
                lambda n=n: scrape(metrics_port).get('meter_gateway_config_reloads_total{result="failed"}') == n,
                10,
                f"failed reload {n}",
                proc,
            )
            # the old config runs on: same meters online, still polling
            await wait_until(
                lambda a=acquired: scrape(metrics_port)["meter_gateway_readings_acquired_total"] > a,
                5,
                "polling after a rejected reload",
                proc,
            )
            assert scrape(metrics_port)['meter_gateway_meters{state="online"}'] == 2
        assert scrape(metrics_port).get('meter_gateway_config_reloads_total{result="ok"}', 0) == 0
    finally:
        code, err = await stop_daemon(proc)
    assert code == 0, err[-3000:]
    assert proc.returncode == 0


# -- 12. event-loop stall and the watchdog -----------------------------------------------------


class NotifyListener:
    """The systemd side of sd_notify on its own thread, so arrival times are real even while the
    daemon's event loop is blocked."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.messages.append((time.monotonic(), data.decode()))

    def pings(self) -> list[float]:
        return [t for t, m in list(self.messages) if "WATCHDOG=1" in m.split("\n")]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[NotifyListener]:
    ns = NotifyListener(tmp_path / "notify.sock")
    yield ns
    ns.close()


@pytest.mark.asyncio
async def test_a_blocked_event_loop_stops_the_watchdog_pings(
    tmp_path: Path,
    mosquitto: Broker,
    modbus_sim: ModbusSimServer,
    listener: NotifyListener,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    watchdog_usec = 600_000  # WatchdogSec=0.6 s: pings every 0.3 s
    monkeypatch.setenv("WATCHDOG_USEC", str(watchdog_usec))
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    text = config_text(tmp_path, mosquitto, modbus_sim.address[1], units=(1, 2), metrics_port=9)
    path = tmp_path / "gateway.toml"
    path.write_text(text.replace("[metrics]\nenabled = true", "[metrics]\nenabled = false"))
    notifier = Notifier({"NOTIFY_SOCKET": str(listener.path)})
    gateway = Gateway(load_config(path), notifier=notifier)
    stop = asyncio.Event()
    task = asyncio.create_task(gateway.run(stop))
    stall = scale(2, 10)
    try:
        await wait_until(lambda: len(listener.pings()) >= 4, 15, "steady pings")
        loop = asyncio.get_running_loop()
        blocked: list[float] = []

        def block() -> None:  # the injected blocking call: a synchronous sleep on the loop's thread
            blocked.append(time.monotonic())
            time.sleep(stall)

        loop.call_soon(block)
        await asyncio.sleep(0)  # runs once the blocking call has returned
        await asyncio.sleep(1.5)  # pings resume
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
        notifier.close()
    start = blocked[0]
    pings = listener.pings()
    during = [t for t in pings if start + 0.05 < t < start + stall - 0.05]
    assert during == [], "a ping came from a blocked loop"
    before = max(t for t in pings if t <= start + 0.05)
    after = min(t for t in pings if t > start + stall - 0.05)
    gap = after - before
    assert gap > watchdog_usec / 1e6  # longer than WatchdogSec: systemd would kill and restart
    assert len([t for t in pings if t > after]) >= 2  # and they resume once the loop runs again
    steady = [b - a for a, b in itertools.pairwise(pings) if b < start]
    assert max(steady) < watchdog_usec / 1e6  # before the stall no gap came near WatchdogSec
    print(f"\nwatchdog: ping gap {gap:.2f} s across a {stall} s stall (steady max {max(steady):.2f} s)")


# -- 12. /metrics under a 1,000-meter load -----------------------------------------------------


def _timed_get(url: str) -> float:
    started = time.monotonic()
    with urllib.request.urlopen(url, timeout=10) as resp:
        resp.read()
    return time.monotonic() - started


@pytest.fixture
def many_meter_sim(tmp_path: Path) -> Iterator[tuple[dict[str, int], int]]:
    buses, per_bus = 8, 125
    (tmp_path / "sim.toml").write_text(simulator_config(PROTOCOLS["modbus"], buses, per_bus))
    sim = subprocess.Popen(
        [sys.executable, "-m", "meter_gateway.gateway.cli", "simulate", "--config", str(tmp_path / "sim.toml")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert sim.stdout is not None
    reader = LineReader(sim.stdout)
    try:
        ports = parse_endpoints(reader.wait_for("ready", 60))
        assert len(ports) == buses
        yield ports, per_bus
    finally:
        sim.terminate()
        try:
            sim.wait(10)
        except subprocess.TimeoutExpired:
            sim.kill()
            sim.wait()
        # close the pipe only after the reader thread saw EOF (closing it under a blocked read hangs)
        end = time.monotonic() + 5
        while reader.lines[-1:] != [""] and time.monotonic() < end:
            time.sleep(0.02)
        sim.stdout.close()


@pytest.mark.asyncio
async def test_metrics_answer_within_1s_with_1000_meters_on_8_buses(
    tmp_path: Path, mosquitto: Broker, many_meter_sim: tuple[dict[str, int], int]
) -> None:
    ports, per_bus = many_meter_sim
    metrics_port = free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(
        gateway_config(
            PROTOCOLS["modbus"],
            ports,
            per_bus,
            broker_port=mosquitto.port,
            metrics_port=metrics_port,
            state_dir=tmp_path / "state",
            interval=5.0,
            quantities=PROTOCOLS["modbus"].quantities,
        )
    )
    log = (tmp_path / "gateway.log").open("wb")
    # stderr to a file: 1,000 meters log more than a pipe nobody reads can hold
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "meter_gateway.gateway.cli", "run", "-c", str(config), "--log-level", "WARNING"),
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=log,
    )
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    try:
        await wait_until(
            lambda: scrape(metrics_port).get('meter_gateway_meters{state="online"}', 0) >= 900,
            60,
            "meters online",
            proc,
        )
        latencies: list[float] = []
        end = time.monotonic() + scale(8, 60)
        while time.monotonic() < end:
            latencies.append(await asyncio.to_thread(_timed_get, url))
            await asyncio.sleep(0.2)
        values = scrape(metrics_port)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 30)
        log.close()
    assert code == 0, (tmp_path / "gateway.log").read_text()[-3000:]
    assert values["meter_gateway_readings_acquired_total"] > 10_000  # it was busy while scraped
    latencies.sort()
    print(
        f"\n/metrics with 1000 meters: {len(latencies)} scrapes, median {latencies[len(latencies) // 2] * 1000:.0f} ms,"
        f" max {latencies[-1] * 1000:.0f} ms"
    )
    assert latencies[-1] < 1.0

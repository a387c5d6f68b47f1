"""`meter-gateway run` as systemd runs it: a real process with a config file, Modbus simulators on
TCP, a real mosquitto, sd_notify on a test socket, metrics over HTTP, SIGHUP, SIGTERM, SIGKILL."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path

import pytest
import pytest_asyncio

from meter_gateway.gateway.uplink.contract import Topics, decode_batch
from meter_gateway.simulators.modbus_meter import ModbusSimServer, SimulatedMeter
from tests.plugins.broker import Broker, Subscriber
from tests.plugins.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
QUANTITIES = ["energy.active.import.total", "voltage.l1", "power.active.total"]
TOPICS = Topics("gw-daemon", "meter-gateway")


@pytest_asyncio.fixture
async def modbus_sim() -> AsyncIterator[ModbusSimServer]:
    meters = {unit: SimulatedMeter("sim-3ph", start=time.time()) for unit in (1, 2, 3, 4)}
    server = ModbusSimServer(meters, transport="tcp", host="127.0.0.1", port=0)
    await server.start()
    yield server
    await server.stop()


def config_text(tmp_path: Path, broker: Broker, sim_port: int, *, units: tuple[int, ...], metrics_port: int) -> str:
    meters = "".join(
        f'\n[[meters]]\nid = "mb-{u}"\nbus = "modbus-a"\nprotocol = "modbus"\naddress = {u}\nmodel = "sim-3ph"\n'
        for u in units
    )
    quantities = ", ".join(f'"{q}"' for q in QUANTITIES)
    return f"""
[gateway]
id = "gw-daemon"
state_dir = "{tmp_path / "state"}"

[uplink]
host = "{broker.host}"
port = {broker.port}
keepalive = "10s"

[metrics]
enabled = true
host = "127.0.0.1"
port = {metrics_port}

[[buses]]
name = "modbus-a"
type = "tcp"
host = "127.0.0.1"
port = {sim_port}
protocol = "modbus-tcp"
reply_timeout = "1s"
{meters}
[[poll_groups]]
name = "fast"
interval = "1s"
quantities = [{quantities}]
"""


class NotifySocket:
    """The systemd side of sd_notify: a datagram socket collecting what the daemon says."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[str] = []

    def drain(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return self.messages

    def saw(self, line: str) -> bool:
        return any(line in m.split("\n") for m in self.drain())


@pytest_asyncio.fixture
async def notify_socket(tmp_path: Path) -> AsyncIterator[NotifySocket]:
    """Drained continuously, as systemd does (a full datagram queue makes the daemon drop messages)."""
    ns = NotifySocket(tmp_path / "notify.sock")

    async def drain() -> None:
        while True:
            ns.drain()
            await asyncio.sleep(0.02)

    task = asyncio.create_task(drain())
    yield ns
    task.cancel()
    ns.sock.close()


async def start_daemon(config: Path, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "meter_gateway.gateway.cli",
        "run",
        "-c",
        str(config),
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def wait_until(cond: object, within: float, what: str, proc: asyncio.subprocess.Process | None = None) -> None:
    end = time.monotonic() + within
    while not cond():  # type: ignore[operator]
        if proc is not None and proc.returncode is not None:
            err = (await proc.stderr.read()).decode() if proc.stderr else ""
            raise AssertionError(f"daemon exited {proc.returncode} while waiting for {what}:\n{err[-3000:]}")
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def delivered_ids(sub: Subscriber) -> set[str]:
    return {r.id for m in sub.snapshot(TOPICS.readings) for r in decode_batch(m.payload).readings}


async def stop_daemon(proc: asyncio.subprocess.Process, within: float = 15.0) -> tuple[int, str]:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    _, err = await asyncio.wait_for(proc.communicate(), within)
    assert proc.returncode is not None
    return proc.returncode, err.decode()


@pytest.mark.asyncio
async def test_daemon_notifies_serves_metrics_reloads_and_stops_cleanly(
    tmp_path: Path, mosquitto: Broker, modbus_sim: ModbusSimServer, notify_socket: NotifySocket
) -> None:
    metrics_port = free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(config_text(tmp_path, mosquitto, modbus_sim.address[1], units=(1, 2), metrics_port=metrics_port))
    sub = Subscriber(mosquitto, [TOPICS.readings]).start()
    proc = await start_daemon(config, {"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "1000000"})
    try:
        await wait_until(lambda: notify_socket.saw("READY=1"), 20, "READY=1", proc)
        await wait_until(lambda: notify_socket.saw("WATCHDOG=1"), 5, "WATCHDOG=1", proc)
        await wait_until(lambda: {i.split("/")[0] for i in delivered_ids(sub)} == {"mb-1", "mb-2"}, 15, "readings")

        # snapshots reach the registry once a second
        await wait_until(lambda: scrape(metrics_port).get('meter_gateway_meters{state="online"}') == 2, 5, "online")
        values = scrape(metrics_port)
        assert values["meter_gateway_readings_acquired_total"] > 0
        assert any(k.startswith("meter_gateway_reply_latency_seconds_count") and v > 0 for k, v in values.items())

        # a typo in the new config: rejected, the running config kept
        good = config.read_text()
        config.write_text(good.replace("reply_timeout", "reply_timout"))
        proc.send_signal(signal.SIGHUP)
        await wait_until(
            lambda: scrape(metrics_port).get('meter_gateway_config_reloads_total{result="failed"}') == 1,
            10,
            "failed reload",
            proc,
        )
        # add meters 3 and 4: they start reporting without a restart
        config.write_text(
            config_text(tmp_path, mosquitto, modbus_sim.address[1], units=(1, 2, 3, 4), metrics_port=metrics_port)
        )
        proc.send_signal(signal.SIGHUP)
        await wait_until(lambda: notify_socket.saw("RELOADING=1"), 10, "RELOADING=1", proc)
        await wait_until(
            lambda: {i.split("/")[0] for i in delivered_ids(sub)} >= {"mb-3", "mb-4"}, 15, "new meters", proc
        )
        await wait_until(lambda: scrape(metrics_port).get('meter_gateway_meters{state="online"}') == 4, 5, "online")
        assert scrape(metrics_port)['meter_gateway_config_reloads_total{result="ok"}'] == 1
        await asyncio.sleep(5.5)  # the status file is replaced every 5 s

        status = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "meter_gateway.gateway.cli",
            "status",
            "-c",
            str(config),
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await status.communicate()
        assert status.returncode == 0, out
        assert b"running" in out
        assert b"4 online" in out
    finally:
        code, err = await stop_daemon(proc)
        sub.stop()
    assert code == 0, err[-3000:]
    assert notify_socket.saw("STOPPING=1")
    assert "event=stopped" in err
    status = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "meter_gateway.gateway.cli",
        "status",
        "-c",
        str(config),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await status.communicate()
    assert status.returncode == 3, out
    assert b"NOT RUNNING" in out


@pytest.mark.asyncio
async def test_sigkill_mid_stream_then_restart_delivers_every_committed_reading(
    tmp_path: Path, broker_factory: object, modbus_sim: ModbusSimServer
) -> None:
    broker: Broker = broker_factory()  # type: ignore[operator]
    config = tmp_path / "gateway.toml"
    config.write_text(config_text(tmp_path, broker, modbus_sim.address[1], units=(1, 2, 3), metrics_port=free_port()))
    sub = Subscriber(broker, [TOPICS.readings], client_id="kill-sub", clean=False).start()
    proc = await start_daemon(config)
    try:
        await wait_until(lambda: len(delivered_ids(sub)) > 20, 20, "first readings", proc)
        broker.stop()  # let a backlog build up in the outbox, then kill the gateway mid-stream
        await asyncio.sleep(2.0)
        proc.kill()
        await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    db = sqlite3.connect(tmp_path / "state" / "outbox.sqlite")
    with closing(db):
        committed = {row[0] for row in db.execute("SELECT reading_id FROM readings")}
    assert committed, "the outbox should hold the readings committed while the broker was away"

    broker.start()
    proc = await start_daemon(config)
    try:
        await wait_until(lambda: committed <= delivered_ids(sub), 30, "the backlog delivered", proc)
    finally:
        code, err = await stop_daemon(proc)
        sub.stop()
    assert code == 0, err[-3000:]


@pytest.mark.asyncio
async def test_bad_config_exits_78_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(
        '[gateway]\nid = "gw"\n[uplink]\nhost = "127.0.0.1"\n'
        '[[buses]]\nname = "b"\ntype = "serial"\nport = "/dev/ttyS0"\nbaudrate = 2400\nparity = "E"\n'
        'protocol = "dlt645"\n'
    )
    proc = await start_daemon(config)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 78
    assert "buses[0].baudrate" in err.decode()
    assert "baud_rate" in err.decode()


@pytest.mark.asyncio
async def test_metrics_port_taken_exits_75_for_a_retry(tmp_path: Path, mosquitto: Broker) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = tmp_path / "gateway.toml"
        config.write_text(config_text(tmp_path, mosquitto, 9, units=(1,), metrics_port=taken.getsockname()[1]))
        proc = await start_daemon(config)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 75  # EX_TEMPFAIL: systemd restarts it; 78 would keep it down
    assert "metrics.port" in err.decode()

"""sd_notify messages received on a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import asyncio
import configparser
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meter_gateway.gateway.daemon.sdnotify import Notifier, run_watchdog, watchdog_interval


@pytest.fixture
def systemd() -> Iterator[tuple[socket.socket, str]]:
    # a short path: AF_UNIX paths are limited to ~108 bytes, pytest's tmp_path can be longer
    with tempfile.TemporaryDirectory(prefix="sdn") as d:
        path = str(Path(d) / "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(2)
        try:
            yield sock, path
        finally:
            sock.close()


def drain(sock: socket.socket) -> list[str]:
    out = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(4096).decode())
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(2)
    return out


def test_messages(systemd: tuple[socket.socket, str]) -> None:
    sock, path = systemd
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready("polling 12 meters")
    assert sock.recv(4096).decode() == "READY=1\nSTATUS=polling 12 meters"
    assert n.status("uplink down")
    assert sock.recv(4096).decode() == "STATUS=uplink down"
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert n.reloading()
    lines = sock.recv(4096).decode().split("\n")
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert lines[0] == "RELOADING=1"
    key, _, usec = lines[1].partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(usec) <= after
    assert n.stopping()
    assert sock.recv(4096).decode() == "STOPPING=1"
    n.close()


def test_a_listener_that_stops_reading_never_blocks_us(systemd: tuple[socket.socket, str]) -> None:
    sock, path = systemd
    n = Notifier({"NOTIFY_SOCKET": path})
    started = time.monotonic()
    sent = [n.watchdog() for _ in range(200)]  # far more than a datagram socket queues
    assert time.monotonic() - started < 1.0
    assert sent[0] is True
    assert sent[-1] is False  # dropped and counted, not waited for
    assert n.failures > 0
    assert drain(sock)[0] == "WATCHDOG=1"
    n.close()


def test_abstract_socket() -> None:
    name = f"meter-gateway-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(2)
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert n.watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"
        n.close()


def test_noop_without_socket_and_survives_a_missing_listener(tmp_path: Path) -> None:
    n = Notifier({})
    assert not n.enabled
    assert not n.ready()
    gone = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody")})
    assert not gone.ready()  # systemd went away: counted, never raised
    assert gone.failures == 1
    gone.close()


def test_watchdog_interval() -> None:
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "junk"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}) == 1.0
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}) is None


@pytest.mark.asyncio
async def test_watchdog_cadence_and_withheld_when_not_alive(systemd: tuple[socket.socket, str]) -> None:
    sock, path = systemd
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"}  # 0.1 s -> ping every 0.05 s
    interval = watchdog_interval(env)
    assert interval == 0.05
    alive = True
    n = Notifier(env)
    task = asyncio.create_task(run_watchdog(n, interval, lambda: alive))
    try:
        await asyncio.sleep(0.33)
        pings = drain(sock)
        assert set(pings) == {"WATCHDOG=1"}
        assert 5 <= len(pings) <= 8  # ~7 at 0.05 s; slack for a loaded machine
        alive = False
        await asyncio.sleep(0.06)  # let a ping already scheduled go out
        drain(sock)
        await asyncio.sleep(0.25)
        assert drain(sock) == []  # liveness check failed: no pings, systemd will restart us
        alive = True
        await asyncio.sleep(0.12)
        assert "WATCHDOG=1" in drain(sock)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        n.close()


@pytest.mark.asyncio
async def test_stalled_loop_stops_pings(systemd: tuple[socket.socket, str]) -> None:
    sock, path = systemd
    n = Notifier({"NOTIFY_SOCKET": path})
    task = asyncio.create_task(run_watchdog(n, 0.05))
    try:
        await asyncio.sleep(0.01)
        drain(sock)
        time.sleep(0.3)  # noqa: ASYNC251 -- the point: a blocking call stalls the loop, the pings must stop too
        assert drain(sock) == []
        await asyncio.sleep(0.12)
        assert "WATCHDOG=1" in drain(sock)  # the loop runs again: so do the pings
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        n.close()


@pytest.mark.asyncio
async def test_watchdog_disabled_returns() -> None:
    await asyncio.wait_for(run_watchdog(Notifier({}), 0.01), timeout=1)


# -- the unit file -------------------------------------------------------------------------------

UNIT = Path(__file__).resolve().parent.parent / "config" / "meter-gateway.service"


def unit_settings() -> dict[str, list[str]]:
    """Every Key=value of the unit by key (repeated keys keep every value), comments dropped."""
    out: dict[str, list[str]] = {}
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a setting: {raw!r}"
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_unit_key_settings() -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    assert parser.sections() == ["Unit", "Service", "Install"]
    s = unit_settings()
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "ExecStart": "/opt/meter-gateway/bin/meter-gateway run -c /etc/meter-gateway/gateway.toml",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "WatchdogSec": "30",
        "Restart": "on-failure",
        "RestartPreventExitStatus": "78",
        "TimeoutStopSec": "30",
        "User": "meter-gateway",
        "SupplementaryGroups": "dialout",
        "StateDirectory": "meter-gateway",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "RestrictNamespaces": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "SystemCallArchitectures": "native",
        "CapabilityBoundingSet": "",
        "DevicePolicy": "closed",
    }
    for key, value in expected.items():
        assert s.get(key) == [value], key
    assert set(s["DeviceAllow"]) == {"char-ttyS rw", "char-ttyUSB rw", "char-ttyAMA rw"}
    assert "PrivateDevices" not in s  # it would hide the serial ports
    assert "ConfigurationDirectory" not in s  # it would leave /etc/meter-gateway root-only (deploy/install.sh)
    assert s["WantedBy"] == ["multi-user.target"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unit_verifies(tmp_path: Path) -> None:
    # verify checks that ExecStart exists: point it at a binary this machine has, keep the rest
    installed = "ExecStart=/opt/meter-gateway/bin/meter-gateway "
    text = UNIT.read_text().replace(installed, f"ExecStart={shutil.which('true')} ")
    assert text != UNIT.read_text()
    unit = tmp_path / "meter-gateway.service"
    unit.write_text(text)
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == ""  # unknown keys and bad values are only warnings: fail on them too

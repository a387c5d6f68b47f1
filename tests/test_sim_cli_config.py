"""``meter-gateway simulate`` settings that change what its meters do: the zone their clocks keep
(a gateway configured for Asia/Shanghai reads meters that agree with it on a host running in
UTC), and DL/T 698.45 terminals that open with a LINK login."""

from __future__ import annotations

import asyncio
import datetime
import os
import re
import signal
import sys
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from meter_gateway.simulators.sim_config import SimConfigError, config_from_mapping

SHANGHAI = ZoneInfo("Asia/Shanghai")
CODE = "import sys; from meter_gateway.simulators.cli import main; sys.exit(main(sys.argv[1:]))"


async def _meter_time(*args: str) -> datetime.datetime:
    """Start ``meter-gateway simulate ARGS`` under TZ=UTC and ask its control port for meter 1's time."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CODE,
        "--port",
        "0",
        "--control-port",
        "0",
        *args,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "TZ": "UTC"},
    )
    assert proc.stdout is not None
    try:
        control = ""
        while (line := (await asyncio.wait_for(proc.stdout.readline(), 20)).decode().strip()) != "ready":
            assert line, "the simulator ended before it was ready"
            if line.startswith("control:"):
                control = line
        port = int(control.split()[1].rpartition(":")[2])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"status 000000000001\n")
        reply = (await asyncio.wait_for(reader.readline(), 5)).decode()
        writer.close()
        await writer.wait_closed()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    found = re.search(r"time=(\S+)", reply)
    assert found, reply
    return datetime.datetime.fromisoformat(found.group(1))


@pytest.mark.asyncio
async def test_timezone_option_sets_the_meters_clock_zone_on_a_utc_host() -> None:
    meter = await _meter_time("--timezone", "Asia/Shanghai")
    expected = datetime.datetime.now(SHANGHAI).replace(tzinfo=None)
    assert abs((meter - expected).total_seconds()) < 30
    host = await _meter_time()  # no zone given: the host's (UTC here), 8 h behind Shanghai
    assert abs((host - datetime.datetime.now(datetime.UTC).replace(tzinfo=None)).total_seconds()) < 30


@pytest.mark.asyncio
async def test_config_file_timezone(tmp_path: Path) -> None:
    path = tmp_path / "sim.toml"
    path.write_text('[simulator]\ntimezone = "Asia/Shanghai"\n\n[[bus]]\nprotocol = "dlt645-2007"\nport = 0\n')
    meter = await _meter_time("--config", str(path))
    assert abs((meter - datetime.datetime.now(SHANGHAI).replace(tzinfo=None)).total_seconds()) < 30


def test_unknown_zone_is_refused_with_its_key(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SimConfigError, match=r"simulator.timezone: unknown time zone 'Asia/Shangai'"):
        config_from_mapping({"simulator": {"timezone": "Asia/Shangai"}, "bus": [{"protocol": "dlt645-2007"}]})
    from meter_gateway.simulators.cli import main

    assert main(["--timezone", "Mars/Olympus"]) == 2
    assert "--timezone: unknown time zone 'Mars/Olympus'" in capsys.readouterr().err


@pytest.mark.asyncio
async def test_a_configured_terminal_logs_in_on_connect(tmp_path: Path) -> None:
    """``login`` and ``heartbeat`` in a dlt698 bus table make its meters open with a LINK login."""
    from meter_gateway.protocols.dlt698.frame import parse_frame

    path = tmp_path / "sim.toml"
    path.write_text('[[bus]]\nprotocol = "dlt698"\nport = 0\nmeters = ["000000000021"]\nlogin = true\nheartbeat = 60\n')
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CODE, "--config", str(path), stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    try:
        lines = []
        while (line := (await asyncio.wait_for(proc.stdout.readline(), 20)).decode().strip()) != "ready":
            assert line, "the simulator ended before it was ready"
            lines.append(line)
        host, _, port = lines[0].split()[3].rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        data = await asyncio.wait_for(reader.read(256), 5)  # the login comes without a request
        writer.close()
        await writer.wait_closed()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    frame = parse_frame(data)
    assert str(frame.address) == "000000000021"
    assert frame.data[0] == 0x01  # LINK-Request
    assert frame.data[2] == 0  # login


def test_heartbeat_out_of_range_is_refused() -> None:
    with pytest.raises(SimConfigError, match=r"bus\[0\].heartbeat must be 0..65535"):
        config_from_mapping({"bus": [{"protocol": "dlt698", "heartbeat": 70000}]})
    with pytest.raises(SimConfigError, match=r"'login' is for dlt698"):
        config_from_mapping({"bus": [{"protocol": "dlt645-2007", "login": True}]})

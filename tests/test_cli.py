"""The console entry point, the demo, `example-config`, and the exit codes systemd acts on."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meter_gateway.config import EXAMPLES
from meter_gateway.gateway.cli import main as cli
from tests.plugins.ports import free_port

ROOT = Path(__file__).resolve().parents[1]


def test_usage_lists_commands(capsys) -> None:  # type: ignore[no-untyped-def]
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    for name in ("decode", "simulate", "run", "check-config", "demo"):
        assert name in out


def test_unknown_command_exits_2(capsys) -> None:  # type: ignore[no-untyped-def]
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_console_script_version() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "meter_gateway.gateway.cli", "--version"], capture_output=True, text=True, check=True
    )
    assert proc.stdout.startswith("meter-gateway ")


def test_demo_shows_readings_of_every_configured_meter(tmp_path: Path) -> None:
    """The README's first command: simulators + mosquitto + gateway, readings seen at the broker."""
    from meter_gateway.gateway.config import load_config

    proc = subprocess.run(
        [sys.executable, "-m", "meter_gateway.gateway.cli", "demo", "--duration", "14"],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
        cwd=tmp_path,  # the demo finds its config in the package, wherever it is started
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    shown = {line.split()[1] for line in lines if line.strip() and line.split()[0].endswith("s")}
    assert {m.id for m in load_config(ROOT / "config" / "demo.toml").meters} <= shown
    summary = lines[-1]
    assert "read failures none" in summary
    assert "reached the broker" in summary


def test_demo_meters_keep_the_configured_time_zone_on_a_utc_host(tmp_path: Path) -> None:
    """The demo's meters are in Asia/Shanghai (gateway.timezone): on a UTC host their clocks must
    still show Shanghai time, or the time-sync check finds them 8 h off and flags every reading
    clock-suspect. The clocks are checked at start-up here (time sync every minute, no offset)."""
    demo = (ROOT / "config" / "demo.toml").read_text()
    sync = '[time_sync]\ninterval = "1h"\noffset = "7m"'
    assert sync in demo
    config = tmp_path / "demo.toml"
    config.write_text(demo.replace(sync, '[time_sync]\ninterval = "1m"\noffset = "0s"'))
    proc = subprocess.run(
        [sys.executable, "-m", "meter_gateway.gateway.cli", "demo", "-c", str(config), "--duration", "14"],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
        cwd=tmp_path,
        env={**os.environ, "TZ": "UTC"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = proc.stdout.splitlines()[-1]
    clocks = re.search(r"meter clocks read (\d+)", summary)
    assert clocks is not None, summary
    assert int(clocks.group(1)) >= 5  # every DL/T 645 meter's clock was checked (5 in the demo)
    assert " 0 clock-suspect" in summary, summary
    assert "[clock_suspect" not in proc.stdout
    assert "read failures none" in summary


# -- example-config --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["rs485", "tcp-concentrator", "demo"])
def test_example_config_output_passes_check_config(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`meter-gateway example-config NAME > gateway.toml` is a file to start from: it validates as
    printed, with no secret set in the environment."""
    monkeypatch.delenv("METER_GATEWAY_MQTT_PASSWORD", raising=False)
    assert cli.main(["example-config", name]) == 0
    file = tmp_path / "gateway.toml"
    file.write_text(capsys.readouterr().out)
    assert file.read_text().startswith("#")  # commented, to be read before it is edited
    assert cli.main(["check-config", str(file)]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.startswith(f"ok: {file}")


@pytest.mark.parametrize("name", ["systemd", "alerts", "grafana", "simulator"])
def test_example_config_prints_the_shipped_file(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["example-config", name]) == 0
    assert capsys.readouterr().out == (ROOT / "config" / EXAMPLES[name].file).read_text()


def test_example_config_lists_and_rejects_unknown_names(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["example-config"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in EXAMPLES)
    assert cli.main(["example-config", "rs-485"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "no example 'rs-485'" in err
    assert "rs485" in err


# -- exit codes systemd acts on ---------------------------------------------------------------------


def test_missing_serial_device_at_start_is_retried_not_fatal(tmp_path: Path) -> None:
    """An RS-485 adapter not plugged in yet is a temporary state: the daemon starts, says so, keeps
    retrying the device, and stops cleanly; it does not exit 78, which would keep systemd from
    restarting it."""
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[gateway]\nid = "gw-serial"\nstate_dir = "{tmp_path / "state"}"\n'
        f'[uplink]\nhost = "127.0.0.1"\nport = {free_port()}\n'
        "[metrics]\nenabled = false\n"
        f'[[buses]]\nname = "line-1"\ntype = "serial"\nport = "{tmp_path / "ttyUSB-absent"}"\n'
        'baud_rate = 2400\nparity = "E"\nprotocol = "dlt645"\n'
        '[[meters]]\nid = "m1"\nbus = "line-1"\nprotocol = "dlt645-2007"\naddress = "000000000001"\n'
        'model = "dlt645-2007-generic"\n'
        '[[poll_groups]]\nname = "billing"\ninterval = "15m"\nquantities = ["energy.active.import.total"]\n'
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "meter_gateway.gateway.cli", "run", "-c", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "state" / "status.json").exists():
            assert proc.poll() is None, f"exited {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}"
            assert time.monotonic() < deadline, "the daemon never wrote its status file"
            time.sleep(0.2)
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-3000:]
    assert 'event=link_connect_failed link=line-1 error="cannot open: No such file or directory' in err  # it says so

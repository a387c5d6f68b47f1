"""The console entry point and the demo's fallback path."""

from __future__ import annotations

import subprocess
import sys

from meter_gateway.gateway import cli


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


def test_demo_shows_readings_of_every_configured_meter() -> None:
    """The README's first command: simulators + mosquitto + gateway, readings seen at the broker."""
    from meter_gateway.gateway.config import load_config
    from meter_gateway.gateway.demo import DEMO_CONFIG

    proc = subprocess.run(
        [sys.executable, "-m", "meter_gateway.gateway.cli", "demo", "--duration", "14"],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    shown = {line.split()[1] for line in lines if line.strip() and line.split()[0].endswith("s")}
    assert {m.id for m in load_config(DEMO_CONFIG).meters} <= shown
    summary = lines[-1]
    assert "read failures none" in summary
    assert "reached the broker" in summary

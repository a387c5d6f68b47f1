"""The console entry point and the demo's fallback path."""

from __future__ import annotations

import subprocess
import sys

from gateway import cli


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
        [sys.executable, "-m", "gateway.cli", "--version"], capture_output=True, text=True, check=True
    )
    assert proc.stdout.startswith("meter-gateway ")

"""A small real filesystem for disk-full tests: a tmpfs of a given size, mounted for the test."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """Mount a tmpfs of ``size`` (e.g. "4m") at ``path``. Skip the test where mounting is not
    allowed (no CAP_SYS_ADMIN); where it is allowed (CI runs as root), a failed mount fails the
    test, so the small-disk tests cannot pass by being skipped."""
    path.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, check=False
    )
    if done.returncode != 0:
        if _may_mount():
            pytest.fail(f"mounting a {size} tmpfs at {path} failed: {done.stderr.decode().strip()}")
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}): needs root or CAP_SYS_ADMIN")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _may_mount() -> bool:
    """True when this process holds CAP_SYS_ADMIN (bit 21 of its effective capabilities)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) & (1 << 21))
    except OSError:
        pass
    return os.geteuid() == 0

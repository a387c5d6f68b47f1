"""Fault and bad-input tests (docs/reliability.md). Each runs a short variant in CI; set
METER_GATEWAY_LONG_FAULTS=1 for the long variants (more iterations, bigger volumes)."""

import os

LONG = os.environ.get("METER_GATEWAY_LONG_FAULTS", "") not in ("", "0")


def scale(short: int, long: int) -> int:
    """An iteration count: ``short`` in CI, ``long`` when the long variants are asked for."""
    return long if LONG else short

"""Running the real daemon in a test, and waiting for what it does: one copy for every test file."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from meter_gateway.gateway.config import load_config
from meter_gateway.gateway.daemon.app import Gateway


@asynccontextmanager
async def running(path: Path, clock: Callable[[], float] = time.time) -> AsyncIterator[Gateway]:
    """``Gateway`` on the config file at ``path`` in this loop, stopped (within 15 s) on exit."""
    gateway = Gateway(load_config(path), clock=clock, shutdown_budget=5.0)
    stop = asyncio.Event()
    task = asyncio.create_task(gateway.run(stop))
    try:
        yield gateway
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


async def until(cond: Callable[[], object], within: float = 45.0, what: str = "condition") -> None:
    """Wait (polling) until ``cond()`` is true; fail the test if it is not within ``within`` s.
    The bounds are generous: a loaded machine is slow, and the wait ends as soon as it holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"{what} not reached within {within} s")
        await asyncio.sleep(0.02)

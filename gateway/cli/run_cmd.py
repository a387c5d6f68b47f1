"""`meter-gateway run -c FILE`: the daemon, as systemd runs it.

Exit status: 0 after a clean stop (SIGTERM/SIGINT); 78 (EX_CONFIG) only when the config itself is
wrong, which a restart cannot fix (systemd's RestartPreventExitStatus=78); 75 (EX_TEMPFAIL) for a
failure a restart may cure (the metrics port still held by another process, the outbox found
damaged); 1 on an unexpected failure. A serial device missing at start is not an exit at all: its
bus retries the device with backoff while the other buses poll. SIGHUP reloads meters, buses and
schedules; a bad new config is logged and the running one kept.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from meter_gateway.gateway.cli.config_cmd import EX_CONFIG
from meter_gateway.gateway.config import Config, ConfigError
from meter_gateway.gateway.config_child import load_config_in_child
from meter_gateway.gateway.daemon.logs import setup_logging

if TYPE_CHECKING:
    from meter_gateway.gateway.daemon.metrics import MetricsServer

log = logging.getLogger("meter_gateway")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meter-gateway run", description=__doc__.splitlines()[0])
    p.add_argument("-c", "--config", required=True, help="the gateway's TOML config file")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--log-format", default="logfmt", choices=["logfmt", "json"])
    return p


def main(argv: list[str]) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    setup_logging(args.log_level, args.log_format)
    _tune_malloc()
    try:
        config = load_config_in_child(args.config)
    except ConfigError as exc:
        for line in exc.messages:
            print(line, file=sys.stderr)
        print(f"{args.config}: {len(exc.messages)} error(s); not starting", file=sys.stderr)
        return EX_CONFIG
    try:
        return asyncio.run(serve(config, args.config))
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        return 130


# How long a thread may hold the GIL before another gets it (Python's default: 5 ms). SQLite
# releases the GIL for every row it steps, so the outbox's writer and reader threads take it back
# many times per batch and each time wait up to this interval behind the event loop: at the
# default, a busy gateway's deliveries fall behind its polls (bench e2e shows the outbox growing).
GIL_SWITCH_INTERVAL = 0.001
# glibc gives a thread its own malloc arena when another holds the lock; with threads taking turns
# this often, the outbox, reader and metrics threads would each grow one for nothing (bench
# memory). MALLOC_ARENA_MAX, if set, wins.
MALLOC_ARENAS = 2
# glibc serves a block of at least this size from a mapping of its own, returned to the system
# when freed, and gives back free memory above this much at the top of its heap. Both are glibc's
# defaults, but glibc raises them to the size of each large mapped block freed (up to 32 MiB):
# after one large transient (a 10,000-meter gateway frees blocks of ~2 MB), every block up to
# that size would come from the heap, where freed blocks leave holes the process keeps (bench
# memory). Set explicitly, they stay put. MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_, if set, win.
MALLOC_MMAP_THRESHOLD = 128 * 1024
MALLOC_TRIM_THRESHOLD = 128 * 1024
# glibc malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def _tune_malloc() -> None:
    """Called before the config is loaded and before any thread starts."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return
    for env, param, value in (
        ("MALLOC_ARENA_MAX", _M_ARENA_MAX, MALLOC_ARENAS),
        ("MALLOC_MMAP_THRESHOLD_", _M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD),
        ("MALLOC_TRIM_THRESHOLD_", _M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD),
    ):
        if env not in os.environ:
            mallopt(param, value)


async def serve(config: Config, path: str) -> int:
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    # imported here, after the config is known good: a bad config exits 78 without paying for them
    from meter_gateway.gateway.daemon.app import Gateway
    from meter_gateway.gateway.daemon.metrics import Metrics, start_http
    from meter_gateway.gateway.daemon.sdnotify import Notifier

    metrics = Metrics()
    server: MetricsServer | None = None
    if config.metrics.enabled:
        try:
            server = start_http(config.metrics.host, config.metrics.port, metrics)
        except OSError as exc:
            where = f"{config.metrics.host}:{config.metrics.port}"
            if exc.errno == errno.EACCES:  # a privileged port: the config must name another one
                print(f"{path}: metrics.port: not allowed to listen on {where}: {exc.strerror}", file=sys.stderr)
                return EX_CONFIG
            # Taken (often by the previous instance still shutting down) or the address not up
            # yet: systemd restarts on 75 after RestartSec, where 78 would keep the service down.
            reason = exc.strerror or str(exc)
            print(f"{path}: metrics.port: cannot listen on {where}: {reason}; will retry", file=sys.stderr)
            return os.EX_TEMPFAIL
        log.info("event=metrics_listening address=%s:%d", *server.address)
    notifier = Notifier()
    stop = asyncio.Event()
    reload = asyncio.Event()
    loop = asyncio.get_running_loop()
    # signals only set events; the Gateway's lifecycle does the work
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _stop_handler(stop, sig))
    loop.add_signal_handler(signal.SIGHUP, reload.set)
    gateway = Gateway(config, metrics=metrics, notifier=notifier, load_config=lambda: load_config_in_child(path))
    try:
        await gateway.run(stop, reload)
    except Exception:
        log.exception("event=crashed")
        return 1
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        if server is not None:
            server.close()
        with contextlib.suppress(Exception):
            notifier.close()
    return gateway.exit_code


def _stop_handler(stop: asyncio.Event, sig: signal.Signals) -> Callable[[], None]:
    def handler() -> None:
        if not stop.is_set():
            log.info("event=stopping signal=%s", sig.name)
        stop.set()

    return handler


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

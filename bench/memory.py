"""Gateway memory: RSS with 10,000 meters configured, against the same process with none.

    python -m bench memory [--protocol dlt645|dlt698|modbus] [--buses 100] [--meters-per-bus 100]
                           [--interval 30] [--settle 30] [--sample 5] [--runs 1] [--tracemalloc 25]

The gateway runs as a user runs it (``meter-gateway run -c gateway.toml``), polling its meters
through the simulator (``meter-gateway simulate``, another process) into a local mosquitto. Each
meter is read every ``--interval`` seconds (DL/T 645: the forward active energy block, 5 readings
in one request; DL/T 698.45: the same 5 as the whole attribute 00100200 in one GET; Modbus: the
12 energy registers in one read), spread over 90 % of the interval:
a modest, steady rate (10,000 meters / 30 s = 333 reads/s). After ``--settle`` seconds, so every
meter has been read at least once, VmRSS is sampled once a second for ``--sample`` seconds; the
median sample is the figure, VmHWM (peak) is reported beside it. Meters whose read time in the
slot in progress has passed when polling starts are read at once (a start-up catch-up), so the
figure depends a little on when in the slot the gateway starts; ``--start-at S`` starts it S
seconds into a slot (S=24: the whole fleet at once, the worst case).

Baselines, same run: the same gateway, metrics and uplink with 0 meters (interpreter, imports,
SQLite, MQTT session), and with the N meters configured but no poll group (what the meter
objects cost at rest, without the read tasks polling creates). Per-meter bytes = (RSS with N
meters - RSS with none) / N.

``--tracemalloc N`` runs the gateway once more in a probe process (this module, ``_probe``) with
tracemalloc started before any import, and prints the N biggest allocators by file and by line
after the same settle time: where the memory goes; then SQLite's own heap (page caches, prepared
statements), which tracemalloc does not see. (tracemalloc itself costs memory and CPU, so its
RSS is not the figure.)

Bytecode: an installed gateway loads its modules from compiled bytecode (pip compiles a wheel's
modules at install; systemd does not set PYTHONDONTWRITEBYTECODE). A shell with
PYTHONDONTWRITEBYTECODE=1 and no __pycache__ makes every start compile gateway/, drivers/ and
protocols/ from source, and the compiler's freed scratch memory stays in the RSS (~2 MiB with
0 meters; with 10,000 meters their objects reuse most of it). So the gateway runs from a copy of
the package (``meter_gateway/``) in the temporary directory, compiled beforehand (the checkout is
not written to); the run stops if the gateway would import the package from elsewhere;
``--compile-at-start`` runs it from the checkout as it is.

Goal: <= 60 MB RSS with 10,000 meters.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.e2e import (
    PROTOCOLS,
    ROOT,
    LineReader,
    gateway_config,
    memory_kib,
    parse_endpoints,
    rss_kib,
    scrape,
    simulator_config,
    stop_process,
)

GOAL_MB = 60.0
POLLED = {
    "dlt645": tuple(f"energy.active.import.{t}" for t in ("total", "t1", "t2", "t3", "t4")),
    "dlt698": tuple(f"energy.active.import.{t}" for t in ("total", "t1", "t2", "t3", "t4")),
    "modbus": (
        *(f"energy.{kind}.{d}.total" for kind in ("active", "reactive") for d in ("import", "export")),
        *(f"energy.active.{d}.t{t}" for d in ("import", "export") for t in (1, 2, 3, 4)),
    ),
}


@dataclass
class Sample:
    meters: int
    rss_mib: float
    hwm_mib: float
    committed: float
    startup_s: float
    anon_mib: float


def _start_simulator(
    workdir: Path, protocol: str, buses: int, per_bus: int
) -> tuple[subprocess.Popen[str], dict[str, int]]:
    (workdir / "sim.toml").write_text(simulator_config(PROTOCOLS[protocol], buses, per_bus))
    sim = subprocess.Popen(
        [sys.executable, "-m", "meter_gateway.gateway.cli", "simulate", "--config", str(workdir / "sim.toml")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert sim.stdout is not None
    try:
        ports = parse_endpoints(LineReader(sim.stdout).wait_for("ready", 120))
    except BaseException:
        stop_process(sim)
        raise
    return sim, ports


def _write_config(
    workdir: Path,
    args: argparse.Namespace,
    ports: dict[str, int],
    broker_port: int,
    metrics_port: int,
    *,
    poll: bool = True,
) -> Path:
    from bench.e2e import PROTOCOLS as P

    config = gateway_config(
        P[args.protocol],
        ports,
        args.meters_per_bus,
        broker_port=broker_port,
        metrics_port=metrics_port,
        # a fresh state directory each time: no run inherits an earlier run's outbox and WAL
        state_dir=Path(tempfile.mkdtemp(prefix="state-", dir=workdir)),
        interval=args.interval,
        quantities=POLLED[args.protocol] if ports and poll else (),
        spread=0.9,
    )
    path = workdir / f"gateway-{len(ports)}{'' if poll else '-idle'}.toml"
    path.write_text(config)
    return path


def _wait_metrics(port: int, proc: subprocess.Popen[Any], timeout: float = 120.0) -> float:
    """Seconds until the gateway answers on its metrics port."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited {proc.returncode}")
        try:
            scrape(port)
        except OSError:
            time.sleep(0.2)
        else:
            return time.monotonic() - started
    raise RuntimeError("gateway metrics never answered")


# the import package's subpackages (the checkout's root is the package ``meter_gateway``)
SUBPACKAGES = ("config", "drivers", "gateway", "protocols", "simulators")


def gateway_root(workdir: Path, *, compile_at_start: bool) -> Path:
    """Where the gateway runs from: the checkout (``compile_at_start``), or a copy of the package
    in ``workdir``, ``meter_gateway/`` with its bytecode compiled, as an installed package has it
    (the checkout is not written to; the standard library and the virtualenv already have theirs).
    Run from there, ``-m`` puts the copy first on ``sys.path``, before the editable install's
    finder (which comes after the path)."""
    if compile_at_start:
        return ROOT
    app = workdir / "app"
    package = app / "meter_gateway"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in SUBPACKAGES:
        shutil.copytree(ROOT / name, package / name, ignore=skip)
    shutil.copy2(ROOT / "__init__.py", package / "__init__.py")
    shutil.copytree(ROOT / "bench", app / "bench", ignore=skip)  # the tracemalloc probe runs as bench.memory
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(package), str(app / "bench")],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    found = subprocess.run(
        [sys.executable, "-c", "import meter_gateway; print(meter_gateway.__file__)"],
        cwd=app,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    if Path(found).parent != package:
        raise RuntimeError(f"the gateway would import {found}, not the compiled copy in {package}")
    return app


def measure(
    args: argparse.Namespace,
    workdir: Path,
    ports: dict[str, int],
    broker_port: int,
    *,
    poll: bool = True,
    cwd: Path = ROOT,
) -> Sample:
    from meter_gateway.gateway.cli.local_broker import free_port

    metrics_port = free_port()
    config = _write_config(workdir, args, ports, broker_port, metrics_port, poll=poll)
    log = config.with_suffix(".log").open("w")
    if args.start_at is not None:
        # wall clock: the schedule's slots are aligned to it (gateway.schedule)
        while abs(time.time() % args.interval - args.start_at) > 0.05:
            time.sleep(0.01)
    gw = subprocess.Popen(
        [sys.executable, "-m", "meter_gateway.gateway.cli", "run", "-c", str(config), "--log-level", "WARNING"],
        cwd=cwd,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        startup = _wait_metrics(metrics_port, gw)
        time.sleep(args.settle)
        samples = []
        anon = []
        for _ in range(max(1, int(args.sample))):
            kib = memory_kib(gw.pid)
            samples.append(kib["VmRSS"])
            anon.append(kib["RssAnon"])
            time.sleep(1.0)
        _, hwm = rss_kib(gw.pid)
        committed = scrape(metrics_port)["committed"]
        if gw.poll() is not None:
            raise RuntimeError(f"gateway exited {gw.returncode}")
    finally:
        stop_process(gw)
        log.close()
    meters = len(ports) * args.meters_per_bus
    return Sample(
        meters, statistics.median(samples) / 1024, hwm / 1024, committed, startup, statistics.median(anon) / 1024
    )


def probe(args: argparse.Namespace, workdir: Path, ports: dict[str, int], broker_port: int, cwd: Path = ROOT) -> None:
    from meter_gateway.gateway.cli.local_broker import free_port

    config = _write_config(workdir, args, ports, broker_port, free_port())
    subprocess.run(
        [sys.executable, "-m", "bench.memory", "_probe", str(config), str(args.settle), str(args.tracemalloc)],
        cwd=cwd,
        check=True,
        timeout=args.settle + 300,
    )


def _probe_main(config_path: str, seconds: float, top: int) -> int:
    """Run the gateway in this process under tracemalloc; print the top allocators."""
    import tracemalloc

    tracemalloc.start(1)
    import asyncio
    import logging

    from meter_gateway.gateway.cli.run_cmd import _tune_malloc, serve
    from meter_gateway.gateway.config import load_config

    logging.basicConfig(level=logging.WARNING)
    _tune_malloc()  # as ``meter-gateway run`` does before loading its config
    imports = tracemalloc.take_snapshot()
    config = load_config(config_path)

    async def run() -> tuple[tracemalloc.Snapshot, int, tracemalloc.Snapshot | None]:
        task = asyncio.create_task(serve(config, config_path))
        # a snapshot whenever the traced total climbs a MiB past the highest seen while serving:
        # what a transient peak (a start-up catch-up, a burst of publishes) held that is gone later
        loop = asyncio.get_running_loop()
        end, highest = loop.time() + seconds, 0
        at_peak: tracemalloc.Snapshot | None = None
        while loop.time() < end:
            await asyncio.sleep(0.5)
            current = tracemalloc.get_traced_memory()[0]
            if current > highest + 2**20:
                highest = current
                at_peak = tracemalloc.take_snapshot()
        snap = tracemalloc.take_snapshot()
        peak = tracemalloc.get_traced_memory()[1]
        import os
        import signal

        os.kill(os.getpid(), signal.SIGTERM)
        await task
        return snap, peak, at_peak

    snap, peak, at_peak = asyncio.run(run())
    print(_sqlite_memory())
    traced = sum(s.size for s in snap.statistics("filename")) / 2**20
    at_imports = sum(s.size for s in imports.statistics("filename")) / 2**20
    print(
        f"tracemalloc: {traced:.1f} MiB traced (peak {peak / 2**20:.1f} MiB, with this probe's in-process "
        "config load, which the daemon does in a child); "
        f"{at_imports:.1f} MiB of it after imports"
    )
    for key in ("filename", "lineno"):
        print(f"top {top} by {key}:")
        for stat in snap.statistics(key)[:top]:
            frame = stat.traceback[0]
            line = f":{frame.lineno}" if key == "lineno" else ""
            print(f"  {stat.size / 1024:9.0f} KiB {stat.count:8d} blocks  {_where(frame.filename)}{line}")
    if at_peak is not None:
        held = sum(s.size for s in at_peak.statistics("filename")) / 2**20
        print(f"top {top} held at the highest sampled point ({held:.1f} MiB) beyond the end, by lineno:")
        for diff in at_peak.compare_to(snap, "lineno")[:top]:
            frame = diff.traceback[0]
            where = f"{_where(frame.filename)}:{frame.lineno}"
            print(f"  {diff.size_diff / 1024:+9.0f} KiB {diff.count_diff:+8d} blocks  {where}")
    return 0


def _sqlite_memory() -> str:
    """SQLite's own heap (page caches, prepared statements, schemas): tracemalloc does not see it."""
    import ctypes
    import ctypes.util
    import sqlite3

    try:
        lib = ctypes.CDLL(ctypes.util.find_library("sqlite3") or "libsqlite3.so.0")
        lib.sqlite3_memory_used.restype = lib.sqlite3_memory_highwater.restype = ctypes.c_int64
        major, minor, patch = sqlite3.sqlite_version_info
        if lib.sqlite3_libversion_number() != major * 1_000_000 + minor * 1000 + patch:
            return "SQLite heap: not measured (the library found is not the one Python's sqlite3 uses)"
        used, high = lib.sqlite3_memory_used(), lib.sqlite3_memory_highwater(0)
    except (OSError, AttributeError) as exc:
        return f"SQLite heap: not measured ({exc})"
    return f"SQLite heap at the end: {used / 2**20:.1f} MiB (highest {high / 2**20:.1f} MiB)"


def _where(filename: str) -> str:
    """A traced file as a short path: relative to the checkout, or under <venv>."""
    return str(Path(filename).resolve()).replace(str(Path.cwd()) + "/", "").replace(sys.prefix, "<venv>")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_probe"]:
        return _probe_main(argv[1], float(argv[2]), int(argv[3]))
    parser = argparse.ArgumentParser(prog="memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--protocol", choices=list(POLLED), default="dlt645")
    parser.add_argument("--buses", type=int, default=100)
    parser.add_argument("--meters-per-bus", type=int, default=100)
    parser.add_argument("--interval", type=float, default=30.0, help="poll interval of every meter, seconds")
    parser.add_argument("--settle", type=float, default=30.0, help="seconds after start-up before sampling")
    parser.add_argument("--sample", type=float, default=5.0, help="seconds of once-a-second RSS samples")
    parser.add_argument("--runs", type=int, default=1, help="runs; medians are reported")
    parser.add_argument(
        "--start-at",
        type=float,
        default=None,
        metavar="S",
        help="start each gateway S seconds into a poll slot (default: whenever; the meters whose read time "
        "has passed when polling starts are all read at once, e.g. S=24 with 2-3 s of start-up: the whole fleet)",
    )
    parser.add_argument("--tracemalloc", type=int, default=0, metavar="N", help="also print the N top allocators")
    parser.add_argument(
        "--compile-at-start",
        action="store_true",
        help="run the gateway in this environment as it is (with PYTHONDONTWRITEBYTECODE=1 it compiles its "
        "modules at every start) instead of from bytecode compiled beforehand, as installed",
    )
    args = parser.parse_args(argv)
    if args.start_at is not None and not 0 <= args.start_at < args.interval:
        parser.error(f"--start-at must be within the poll interval, [0, {args.interval:g})")
    if args.protocol == "modbus" and args.meters_per_bus > 247:
        parser.error("Modbus unit ids stop at 247")
    from meter_gateway.gateway.cli.local_broker import LocalBroker

    empty: list[Sample] = []
    idle: list[Sample] = []
    full: list[Sample] = []
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp, LocalBroker() as broker:
        workdir = Path(tmp)
        app = gateway_root(workdir, compile_at_start=args.compile_at_start)
        print("gateway modules:", "compiled at start" if args.compile_at_start else "from bytecode compiled beforehand")
        sim, ports = _start_simulator(workdir, args.protocol, args.buses, args.meters_per_bus)
        try:
            for run in range(1, args.runs + 1):
                base = measure(args, workdir, {}, broker.port, cwd=app)
                still = measure(args, workdir, ports, broker.port, poll=False, cwd=app)
                loaded = measure(args, workdir, ports, broker.port, cwd=app)
                empty.append(base)
                idle.append(still)
                full.append(loaded)
                print(
                    f"run {run}: 0 meters {base.rss_mib:.1f} MiB (anon {base.anon_mib:.1f}); {loaded.meters:,} meters "
                    f"not polled {still.rss_mib:.1f} MiB; polled {loaded.rss_mib:.1f} MiB (peak {loaded.hwm_mib:.1f}, "
                    f"anon {loaded.anon_mib:.1f}), "
                    f"{_per_meter(loaded, base):,.0f} bytes per meter; started in {loaded.startup_s:.1f} s, "
                    f"{loaded.committed:,.0f} readings committed",
                    flush=True,
                )
            if args.tracemalloc:
                probe(args, workdir, ports, broker.port, app)
        finally:
            stop_process(sim)
    med = statistics.median
    rss0, rss_idle, rss = (med(s.rss_mib for s in group) for group in (empty, idle, full))
    meters = full[0].meters
    verdict = "meets" if rss * 2**20 / 1e6 <= GOAL_MB else "misses"
    print()
    print(
        "| protocol | meters | RSS MiB, polled (median; runs) | peak MiB | not polled MiB | 0 meters MiB "
        "| bytes per meter (polled; not polled) | goal |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {args.protocol} | {meters:,} | {rss:.1f} ({', '.join(f'{s.rss_mib:.1f}' for s in full)}) | "
        f"{med(s.hwm_mib for s in full):.1f} | {rss_idle:.1f} | {rss0:.1f} | "
        f"{(rss - rss0) * 2**20 / meters:,.0f}; {(rss_idle - rss0) * 2**20 / meters:,.0f} | "
        f"<= {GOAL_MB:.0f} MB: {verdict} |"
    )
    return 0


def _per_meter(loaded: Sample, base: Sample) -> float:
    return (loaded.rss_mib - base.rss_mib) * 2**20 / loaded.meters


if __name__ == "__main__":
    sys.exit(main())

"""Outbox inserts against a busy event loop: executemany (one step, one GIL hand-over per row) vs
the outbox's multi-row INSERT statements.

Python's sqlite3 releases the GIL around every ``sqlite3_step``. A writer thread inserting with
``executemany`` steps once per row, so while the main thread runs Python (as the gateway's event
loop does at load) every row waits for the GIL again, up to the switch interval (1 ms, as
``meter-gateway run`` sets it). Here a writer thread inserts ``--batch`` outbox rows every
``--pace`` seconds into a real SQLite file (WAL, synchronous=NORMAL) while the main thread counts
in a loop; reported per mode: rows/s the writer managed, and the main thread's progress (million
loop steps per second). Modes alternate within each run; medians over ``--runs``.

    python -m bench outbox_gil --runs 3 --seconds 5
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from meter_gateway.drivers.reading import Reading
from meter_gateway.gateway.store.outbox import _insert, _insert_sql, _row
from meter_gateway.gateway.store.outbox_schema import migrate

MODES = ("executemany", "multi-row")


def _rows(start: int, n: int, now: float) -> list[tuple[object, ...]]:
    """``n`` outbox rows as the outbox writes them (its own ``_row``)."""
    return [
        _row(
            f"{i % 320:012d}/energy.t{i % 5}/{i}",
            Reading(f"{i % 320:012d}", "energy.active.import.total", 1234.5 + i, "kWh", now, slot=float(int(now))),
            now,
        )
        for i in range(start, start + n)
    ]


def run_once(mode: str, seconds: float, batch: int, pace: float) -> tuple[float, float]:
    """(rows/s the writer committed, main-thread million loop steps/s)."""
    with tempfile.TemporaryDirectory(prefix="bench-outbox-gil-") as tmp:
        conn = sqlite3.connect(Path(tmp) / "o.sqlite", isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        migrate(conn)
        stop = threading.Event()
        done = 0

        def writer() -> None:
            nonlocal done
            n = 0
            while not stop.is_set():
                rows = _rows(n, batch, time.time())
                n += batch
                conn.execute("BEGIN IMMEDIATE")
                if mode == "executemany":
                    conn.executemany(_insert_sql(1), rows)  # the one-row statement
                else:
                    _insert(conn, rows)
                conn.execute("COMMIT")
                done += batch
                time.sleep(pace)

        thread = threading.Thread(target=writer, name="writer")
        started = time.perf_counter()
        thread.start()
        steps = 0
        while time.perf_counter() - started < seconds:
            for _ in range(1000):
                steps += 1
        elapsed = time.perf_counter() - started
        stop.set()
        thread.join()
        conn.close()
    return done / elapsed, steps / elapsed / 1e6


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench outbox_gil", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--batch", type=int, default=320, help="rows per writer transaction")
    parser.add_argument("--pace", type=float, default=0.02, help="writer's sleep between transactions, s")
    parser.add_argument("--switch-interval", type=float, default=0.001, help="sys.setswitchinterval, s")
    args = parser.parse_args(argv)
    sys.setswitchinterval(args.switch_interval)
    results: dict[str, list[tuple[float, float]]] = {m: [] for m in MODES}
    for run in range(1, args.runs + 1):
        for mode in MODES:
            rate, steps = run_once(mode, args.seconds, args.batch, args.pace)
            results[mode].append((rate, steps))
            print(f"run {run} {mode:>11}: writer {rate:8,.0f} rows/s; main thread {steps:5.1f} M steps/s", flush=True)
    print(
        f"\nmedian of {args.runs} (the writer sleeps {args.pace * 1000:.0f} ms after each transaction of "
        f"{args.batch} rows)"
    )
    for mode in MODES:
        rates = [r for r, _ in results[mode]]
        steps = [s for _, s in results[mode]]
        print(
            f"  {mode:>11}: writer {statistics.median(rates):8,.0f} rows/s; "
            f"main thread {statistics.median(steps):5.1f} M steps/s"
        )
    return 0

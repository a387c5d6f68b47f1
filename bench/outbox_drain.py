"""Backlog drain: N readings accumulated in the outbox during an outage, drained into mosquitto.

    python -m bench.outbox_drain [--count 1000000] [--runs 3] [--synchronous FULL]
                                 [--host H --port P] [--verify] [--turns 500]

Each run fills a fresh outbox with ``--count`` readings (batches of 1,000, one transaction
each: the acquisition commit rate is reported too), then starts the uplink against the broker
and times until every row has a positive PUBACK and is deleted. Prints readings/s per run and
the median. Without --host a local mosquitto is started on a free port. ``--verify`` adds a
subscriber and checks that every reading id arrived (it loads the broker, so the figure drops).
The goal is >= 50,000 readings/s drained and >= 10,000 readings/s committed.

Each run also times the daemon's steady state in process, on a synchronous ``Outbox`` in a
fresh file: ``--turns`` writer turns, each committing 20 reads of 10 quantities (200 readings,
what a 20 ms commit interval gathers at 10,000 readings/s) and acking the rows committed two
turns before, in one ``write`` call. It reports the process CPU time per reading.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from meter_gateway.drivers.reading import Quality, Reading
from meter_gateway.gateway.store.outbox import AsyncOutbox, Outbox
from meter_gateway.gateway.uplink.session import Uplink, UplinkConfig

FILL_BATCH = 1000
TURN_READS = 20  # reads per steady-state writer turn
TURN_QUANTITIES = 10  # readings per read
TURN_METERS = 1000


def _readings(count: int, meters: int = 2000) -> Iterator[list[Reading]]:
    """Interval energy readings of ``meters`` meters, slot after slot, in batches."""
    batch: list[Reading] = []
    base = 1_700_000_000.0
    for i in range(count):
        slot = base + 900.0 * (i // meters)
        batch.append(
            Reading(
                f"{i % meters:012d}",
                "energy.active.import.total",
                12345.0 + i / 100,
                "kWh",
                gateway_time=slot + 2.5,
                slot=slot,
                quality=Quality.BACKFILLED if i % 97 == 0 else Quality.GOOD,
            )
        )
        if len(batch) == FILL_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _turn_reads(turn: int) -> list[Reading]:
    out: list[Reading] = []
    for k in range(TURN_READS):
        read = turn * TURN_READS + k
        slot = 1_700_000_000.0 + read // TURN_METERS
        meter = f"{read % TURN_METERS:012d}"
        out += [
            Reading(meter, f"q{q}", 1000.0 + q, "kWh", gateway_time=slot + 0.25, slot=slot)
            for q in range(TURN_QUANTITIES)
        ]
    return out


def _steady_once(args: argparse.Namespace, workdir: Path, run: int) -> float:
    """CPU microseconds per reading of ``--turns`` steady-state writer turns (adds + acks)."""
    path = workdir / f"steady-{run}.sqlite"
    box = Outbox.open(path, synchronous=args.synchronous)
    try:
        batches = [_turn_reads(t) for t in range(args.turns)]
        committed: list[list[int]] = []
        started = time.process_time()
        for batch in batches:
            acks = [committed.pop(0)] if len(committed) > 2 else []
            first = box.last_row_id + 1
            (result,), _ = box.write([batch], acks)
            assert result.committed == len(batch), result
            committed.append(list(range(first, box.last_row_id + 1)))
        cpu = time.process_time() - started
    finally:
        box.close()
        for suffix in ("", "-wal", "-shm", ".lock"):
            with contextlib.suppress(FileNotFoundError):
                Path(f"{path}{suffix}").unlink()
    return cpu / sum(map(len, batches)) * 1e6


async def _run_once(args: argparse.Namespace, host: str, port: int, workdir: Path, run: int) -> tuple[float, float]:
    box = await AsyncOutbox.open(workdir / f"drain-{run}.sqlite", synchronous=args.synchronous)
    try:
        started = time.perf_counter()
        for batch in _readings(args.count):
            await box.add(batch)
        fill_rate = args.count / (time.perf_counter() - started)
        assert box.depth == args.count, box.depth

        subscriber = None
        if args.verify:
            subscriber = await _Verifier.start(host, port)
        config = UplinkConfig(
            gateway_id="bench-gw",
            host=host,
            port=port,
            batch_max_readings=args.batch,
            batch_max_bytes=args.batch_bytes,
            window=args.window,
        )
        uplink = Uplink(config, box)
        started = time.perf_counter()
        task = asyncio.create_task(uplink.run())
        while box.depth > 0:
            await asyncio.sleep(0.01)
            if task.done():
                task.result()
                raise RuntimeError("uplink stopped before the outbox was drained")
        elapsed = time.perf_counter() - started
        await uplink.stop()
        await task
        if subscriber is not None:
            missing = await subscriber.finish(args.count)
            if missing:
                raise RuntimeError(f"verify: {missing} reading ids never arrived")
        failures = {k: v for k, v in uplink.stats.failures.items() if v}
        if failures:
            print(f"  run {run}: failures {failures}", file=sys.stderr)
        return args.count / elapsed, fill_rate
    finally:
        await box.close()
        for suffix in ("", "-wal", "-shm", ".lock"):
            with contextlib.suppress(FileNotFoundError):
                (workdir / f"drain-{run}.sqlite{suffix}").unlink()


class _Verifier:
    """A subscriber counting distinct reading ids (paho on its own thread)."""

    def __init__(self, client: Any) -> None:
        self.ids: set[str] = set()
        self.client = client

    @classmethod
    async def start(cls, host: str, port: int) -> _Verifier:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        from meter_gateway.gateway.uplink.contract import Topics, decode_batch

        client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self = cls(client)
        ready = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_connect(c: mqtt.Client, *_: Any) -> None:
            c.subscribe(Topics("bench-gw").readings, qos=1)

        def on_subscribe(*_: Any) -> None:
            loop.call_soon_threadsafe(ready.set)

        def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
            self.ids.update(r.id for r in decode_batch(bytes(msg.payload)).readings)

        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_message = on_message
        client.connect(host, port)
        client.loop_start()
        await asyncio.wait_for(ready.wait(), 5)
        return self

    async def finish(self, count: int) -> int:
        end = time.monotonic() + 30
        while len(self.ids) < count and time.monotonic() < end:  # noqa: ASYNC110  (a paho thread fills ids)
            await asyncio.sleep(0.05)
        self.client.disconnect()
        self.client.loop_stop()
        return count - len(self.ids)


async def _main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="outbox-drain-", dir=args.dir) as tmp:
        workdir = Path(tmp)
        broker = None
        host, port = args.host, args.port
        if host is None:
            from tests.plugins.broker import Broker  # the test fixture's launcher

            broker = Broker(workdir / "broker")
            broker.start()
            host, port = broker.host, broker.port
        try:
            drains: list[float] = []
            fills: list[float] = []
            steady: list[float] = []
            for run in range(1, args.runs + 1):
                drain, fill = await _run_once(args, host, port, workdir, run)
                drains.append(drain)
                fills.append(fill)
                steady.append(_steady_once(args, workdir, run))
                print(
                    f"run {run}: drained {drain:,.0f} readings/s (filled at {fill:,.0f} readings/s committed); "
                    f"steady turns {steady[-1]:.2f} CPU us per reading"
                )
        finally:
            if broker is not None:
                broker.stop()
    print(
        f"median of {args.runs}: drain {statistics.median(drains):,.0f} readings/s, "
        f"commit {statistics.median(fills):,.0f} readings/s, "
        f"steady turns {statistics.median(steady):.2f} CPU us per reading "
        f"({args.count:,} readings, synchronous={args.synchronous}, batch {args.batch}, window {args.window})"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="outbox_drain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1_000_000, help="readings in the backlog")
    parser.add_argument("--runs", type=int, default=3, help="runs; the median is reported")
    parser.add_argument("--synchronous", default="FULL", choices=["NORMAL", "FULL", "EXTRA"])
    parser.add_argument("--batch", type=int, default=1000, help="readings per MQTT message")
    parser.add_argument("--batch-bytes", type=int, default=256 * 1024)
    parser.add_argument("--window", type=int, default=16, help="unacknowledged messages at once")
    parser.add_argument("--host", help="use this broker instead of a local mosquitto")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--dir", help="where to put the outbox files (default: the system temp dir)")
    parser.add_argument("--verify", action="store_true", help="subscribe and check every id arrived")
    parser.add_argument("--turns", type=int, default=500, help="steady-state writer turns timed in process")
    args = parser.parse_args(argv)
    if args.count < 1 or args.runs < 1 or args.turns < 1:
        parser.error("--count, --runs and --turns must be >= 1")
    return asyncio.run(_main(args))


if __name__ == "__main__":
    sys.exit(main())

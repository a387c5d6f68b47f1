"""Polling 1,000 DL/T 645 meters on 100 TCP links: reads/s and CPU per read, against the bare ceiling.

The simulator (``meter-gateway simulate --config``, a child process so its CPU is not ours) serves
100 buses of 10 meters, wire-time emulation off and zero turnaround: every millisecond is spent
in software. The gateway side, in this process, is the real stack: 100 TCP transports, 100
:class:`drivers.bus.Bus` (one transaction at a time per link, as on the serial line behind a real
serial server) and 1,000 :class:`drivers.dlt645_driver.Dlt645Driver`, each meter polled back to
back by its own task for ``--quantities`` (default: total forward active energy, one 16-byte
request and a 24-byte reply with 4 FE bytes).

Baseline, in the same run: the bare asyncio request/reply ceiling at the same concurrency. A
trivial server (child process, ``asyncio.Protocol``) answers every 16 bytes it receives with the
same fixed 24-byte reply; a trivial client here keeps one request in flight on each of 100
connections and counts replies by length. Gateway and baseline runs alternate, so machine noise
hits both; each figure is the median of ``--runs``.

CPU is this process's ``time.process_time()`` over the measured window (user + system, all
threads); the simulator's and the baseline server's come from /proc.

    python -m bench tcp_links --runs 5 --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

from bench.wire_utilization import SimEndpoint, process_cpu, start_simulator, stop_simulator
from drivers.bus import Bus, BusSettings
from drivers.dlt645_driver import Dlt645Driver
from drivers.errors import DriverError
from drivers.health import HealthBook
from drivers.meter_models import Dlt645Model, load_model
from drivers.transport import TcpSettings, make_transport
from protocols.dlt645.edition import Edition
from protocols.dlt645.frame import Address
from protocols.dlt645.messages import ReadRequest

E7 = Edition.DLT645_2007
MODEL = "dlt645-2007-generic"
QUANTITIES = {
    "energy-total": ("energy.active.import.total",),
    "energy-block": tuple(f"energy.active.import.{t}" for t in ("total", "t1", "t2", "t3", "t4")),
}
# What the baseline exchanges: a 0x11 read of 00010000 (no preamble, as the driver sends it) and
# the meter's 0x91 reply of 0.26 kWh with 4 FE wake-up bytes (the codec benchmark's frame).
BASE_REQUEST = ReadRequest(Address.parse("000000000161"), 0x00010000).encode(E7)
BASE_REPLY = bytes.fromhex("FE FE FE FE 68 61 01 00 00 00 00 68 91 08 33 33 34 33 59 33 33 33 8A 16")


@dataclass
class Sample:
    seconds: float
    reads: int
    transactions: int
    failures: int
    cpu: float  # this process
    peer_cpu: float  # the simulator or the baseline server

    @property
    def rate(self) -> float:
        return self.transactions / self.seconds

    @property
    def cpu_per_transaction(self) -> float:
        return self.cpu / max(self.transactions, 1)


# -- the gateway side -----------------------------------------------------------------------------


class _Poller:
    def __init__(self, quantities: tuple[str, ...]) -> None:
        self.quantities = quantities
        self.reads = 0
        self.failures = 0
        self.running = True

    async def poll(self, driver: Dlt645Driver) -> None:
        wanted = len(self.quantities)
        while self.running:
            now = time.time()
            try:
                readings = await driver.read(self.quantities, slot=float(int(now)), now=now)
            except DriverError:
                self.failures += 1
                continue
            if len(readings) == wanted:
                self.reads += 1
            else:
                self.failures += 1


async def _gateway_sample(
    buses: list[Bus],
    drivers: list[Dlt645Driver],
    quantities: tuple[str, ...],
    sim_pid: int,
    *,
    warmup: float,
    seconds: float,
) -> Sample:
    poller = _Poller(quantities)
    tasks = [asyncio.create_task(poller.poll(d)) for d in drivers]
    try:
        await asyncio.sleep(warmup)
        reads0, fail0, ok0 = poller.reads, poller.failures, sum(b.counters.ok for b in buses)
        peer0, cpu0, t0 = process_cpu(sim_pid), time.process_time(), time.perf_counter()
        await asyncio.sleep(seconds)
        elapsed, cpu, peer = time.perf_counter() - t0, time.process_time() - cpu0, process_cpu(sim_pid) - peer0
        sample = Sample(
            elapsed, poller.reads - reads0, sum(b.counters.ok for b in buses) - ok0, poller.failures - fail0, cpu, peer
        )
    finally:
        poller.running = False
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return sample


# -- the bare baseline ----------------------------------------------------------------------------


class _BareServer(asyncio.Protocol):
    """Answers each complete fixed-size request with the fixed reply."""

    def __init__(self, request_length: int, reply: bytes) -> None:
        self.request_length = request_length
        self.reply = reply
        self.pending = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.pending += len(data)
        count, self.pending = divmod(self.pending, self.request_length)
        if count and self.transport is not None:
            self.transport.write(self.reply * count)


async def _serve_bare() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _BareServer(len(BASE_REQUEST), BASE_REPLY), "127.0.0.1", 0)
    print(f"port {server.sockets[0].getsockname()[1]}", flush=True)
    print("ready", flush=True)
    # runs until the parent closes our stdin
    await loop.run_in_executor(None, sys.stdin.read)
    server.close()


def start_bare_server() -> tuple[subprocess.Popen[str], int]:
    code = "import asyncio; from bench.tcp_links import _serve_bare; asyncio.run(_serve_bare())"
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=os.getcwd()
    )
    assert proc.stdout is not None
    port = 0
    for line in proc.stdout:
        if line.startswith("port "):
            port = int(line.split()[1])
        if line.strip() == "ready":
            return proc, port
    raise RuntimeError("the baseline server exited before it was ready")


class _BareClient(asyncio.Protocol):
    """One request in flight; the next goes out when the whole reply (by length) is in."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.pending = 0
        self.done = 0
        self.running = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def send(self) -> None:
        if self.transport is not None:
            self.transport.write(BASE_REQUEST)

    def data_received(self, data: bytes) -> None:
        self.pending += len(data)
        if self.pending >= len(BASE_REPLY):
            self.pending -= len(BASE_REPLY)
            self.done += 1
            if self.running:
                self.send()


async def _bare_sample(port: int, connections: int, server_pid: int, *, warmup: float, seconds: float) -> Sample:
    loop = asyncio.get_running_loop()
    clients = [_BareClient() for _ in range(connections)]
    for client in clients:
        await loop.create_connection(lambda client=client: client, "127.0.0.1", port)  # type: ignore[misc]
    try:
        for client in clients:
            client.send()
        await asyncio.sleep(warmup)
        done0 = sum(c.done for c in clients)
        peer0, cpu0, t0 = process_cpu(server_pid), time.process_time(), time.perf_counter()
        await asyncio.sleep(seconds)
        elapsed, cpu, peer = time.perf_counter() - t0, time.process_time() - cpu0, process_cpu(server_pid) - peer0
        done = sum(c.done for c in clients) - done0
    finally:
        for client in clients:
            client.running = False
            if client.transport is not None:
                client.transport.close()
    return Sample(elapsed, done, done, 0, cpu, peer)


# -- orchestration --------------------------------------------------------------------------------


def simulator_config(links: int, per_link: int) -> str:
    parts = ["[simulator]\nseed = 1\n"]
    for i in range(links):
        parts.append(  # noqa: PERF401 (a loop reads better than a generator of two f-strings)
            f'[[bus]]\nname = "link{i + 1}"\nprotocol = "dlt645-2007"\nport = 0\n'
            f"first_address = {i * per_link + 1}\ncount = {per_link}\nturnaround = 0.0\npreamble = 4\n"
        )
    return "\n".join(parts)


async def _run_all(
    args: argparse.Namespace, endpoints: list[SimEndpoint], sim_pid: int, bare_port: int, bare_pid: int
) -> tuple[list[Sample], list[Sample]]:
    model = load_model(MODEL)
    assert isinstance(model, Dlt645Model)
    quantities = QUANTITIES[args.quantities]
    health = HealthBook()
    settings = BusSettings(reply_timeout=args.reply_timeout)  # a TCP bus: no inter-frame gap
    buses = [
        Bus(f"link{i}", make_transport(TcpSettings(e.host, e.port), name=f"link{i}"), settings=settings, health=health)
        for i, e in enumerate(endpoints)
    ]
    opened = await asyncio.gather(*(b.open() for b in buses))
    if not all(opened):
        raise RuntimeError(f"{opened.count(False)} of {len(buses)} links did not connect to the simulator")
    drivers = [
        Dlt645Driver(b, f"m{a}", a, E7, model) for b, e in zip(buses, endpoints, strict=True) for a in e.addresses
    ]
    ours: list[Sample] = []
    bare: list[Sample] = []
    try:
        profile = cProfile.Profile() if args.profile else None
        for _ in range(args.runs):
            if profile is not None:
                profile.enable()
            ours.append(
                await _gateway_sample(buses, drivers, quantities, sim_pid, warmup=args.warmup, seconds=args.seconds)
            )
            if profile is not None:
                profile.disable()
            bare.append(await _bare_sample(bare_port, len(buses), bare_pid, warmup=args.warmup, seconds=args.seconds))
    finally:
        await asyncio.gather(*(b.close() for b in buses))
    if profile is not None:
        profile.dump_stats(args.profile)
    return ours, bare


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench tcp_links", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run and side")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each run")
    parser.add_argument("--links", type=int, default=100)
    parser.add_argument("--meters-per-link", type=int, default=10)
    parser.add_argument("--reply-timeout", type=float, default=1.0)
    parser.add_argument("--quantities", choices=sorted(QUANTITIES), default="energy-total")
    parser.add_argument("--profile", metavar="FILE", help="write a cProfile of the gateway runs (pstats) to FILE")
    args = parser.parse_args(argv)
    sim, endpoints, path = start_simulator(simulator_config(args.links, args.meters_per_link))
    try:
        server, port = start_bare_server()
        try:
            ours, bare = asyncio.run(_run_all(args, endpoints, sim.pid, port, server.pid))
        finally:
            assert server.stdin is not None
            server.stdin.close()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    finally:
        stop_simulator(sim, path)
    report(args, ours, bare)
    return 0


def report(args: argparse.Namespace, ours: list[Sample], bare: list[Sample]) -> None:
    med = statistics.median
    meters = args.links * args.meters_per_link
    print(
        f"tcp_links: {meters} meters on {args.links} TCP links ({args.meters_per_link}/link), reading "
        f"{args.quantities}, 1 request in flight per link; Python {platform.python_version()}, "
        f"{os.cpu_count()} cpus, {args.runs} runs x {args.seconds:.0f} s per side"
    )
    print("gateway runs (tx/s): " + ", ".join(f"{s.rate:,.0f} ({s.failures} failed)" for s in ours))
    print("bare runs (tx/s):    " + ", ".join(f"{s.rate:,.0f}" for s in bare))
    ratios = [o.rate / b.rate for o, b in zip(ours, bare, strict=True)]
    rows = [
        (
            "transactions (request/reply) per second",
            f"{med(s.rate for s in ours):,.0f}",
            f"{med(s.rate for s in bare):,.0f}",
        ),
        ("meter reads per second", f"{med(s.reads / s.seconds for s in ours):,.0f}", "-"),
        (
            "CPU us per transaction (this process)",
            f"{med(s.cpu_per_transaction for s in ours) * 1e6:,.0f}",
            f"{med(s.cpu_per_transaction for s in bare) * 1e6:,.0f}",
        ),
        (
            "CPU share of one core, this process",
            f"{med(s.cpu / s.seconds for s in ours):.0%}",
            f"{med(s.cpu / s.seconds for s in bare):.0%}",
        ),
        (
            "CPU share of one core, peer process",
            f"{med(s.peer_cpu / s.seconds for s in ours):.0%}",
            f"{med(s.peer_cpu / s.seconds for s in bare):.0%}",
        ),
        (
            "peer CPU us per transaction",
            f"{med(s.peer_cpu / max(s.transactions, 1) for s in ours) * 1e6:,.0f}",
            f"{med(s.peer_cpu / max(s.transactions, 1) for s in bare) * 1e6:,.0f}",
        ),
    ]
    print(f"{'figure (median)':<44}{'gateway':>12}{'bare':>12}")
    for name, a, b in rows:
        print(f"{name:<44}{a:>12}{b:>12}")
    cpu_ratio = med(s.cpu_per_transaction for s in bare) / med(s.cpu_per_transaction for s in ours)
    runs = ", ".join(f"{r:.0%}" for r in ratios)
    print(f"gateway / bare ceiling, transactions/s (goal >= 50%): {med(ratios):.1%} (runs: {runs})")
    print(f"bare / gateway CPU per transaction: {cpu_ratio:.1%}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

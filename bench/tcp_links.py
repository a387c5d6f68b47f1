"""Polling 1,000 DL/T 645 meters on 100 TCP links: reads/s and CPU per read, against the bare ceiling.

The simulator (``meter-gateway simulate --config``, a child process so its CPU is not ours) serves
100 buses of 10 meters, wire-time emulation off and zero turnaround: every millisecond is spent
in software. The gateway side, in this process, is the real stack: 100 TCP transports, 100
:class:`drivers.bus.Bus` (one transaction at a time per link, as on the serial line behind a real
serial server) and 1,000 :class:`drivers.dlt645_driver.Dlt645Driver`, read back to back for
``--quantities`` (default: total forward active energy, one 16-byte request and a 24-byte reply
with 4 FE bytes). By default one poller per link reads its meters in turn, as the daemon does
(one read at a time per bus, ``gateway.daemon.poller.READS_PER_BUS``); ``--pollers meter`` gives every
meter its own task instead, all queueing for their link's turn.

The gateway is measured against two peers:

* the simulator, which builds every reply from its meter models (so it costs far more CPU per
  reply than the bare server, on the same cores);
* a canned-reply server (child process, as lean as the bare server): before the runs, each
  meter's reply to each request the gateway will send is recorded once from the simulator; the
  server then frames requests by length and answers each with that meter's recorded reply. The
  gateway still validates address, DI and checksum and decodes every value, so this ratio
  measures the gateway rather than the simulator.

Baseline, in the same run: the bare asyncio request/reply ceiling at the same concurrency. A
trivial server (child process, ``asyncio.Protocol``) answers every 16 bytes it receives with the
same fixed 24-byte reply; a trivial client here keeps one request in flight on each of 100
connections and counts replies by length. A second bare client is the same but receives with
``recv_into`` into a small buffer, as the gateway's TCP links do (asyncio's plain
``data_received`` path allocates 256 KiB per receive, which glibc may serve with system calls);
each run's ceiling is the faster of the two. The gateway and the bare sides alternate, so machine
noise hits all of them; each figure is the median of ``--runs``, and the ratios are medians of the
per-run ratios. The gateway is driven through its public interfaces only (``Bus``,
``Dlt645Driver.read``), as the daemon drives it.

CPU is this process's ``time.process_time()`` over the measured window (user + system, all
threads); the simulator's and the servers' come from /proc.

    python -m bench tcp_links --runs 5 --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.wire_utilization import SimEndpoint, process_cpu, start_simulator, stop_simulator
from meter_gateway.drivers.bus import Bus, BusSettings
from meter_gateway.drivers.dlt645_driver import Dlt645Driver
from meter_gateway.drivers.errors import DriverError
from meter_gateway.drivers.health import HealthBook
from meter_gateway.drivers.meter_models import Dlt645Model, load_model
from meter_gateway.drivers.transport import TcpSettings, make_transport
from meter_gateway.protocols.dlt645.deframer import Deframer
from meter_gateway.protocols.dlt645.edition import Edition
from meter_gateway.protocols.dlt645.frame import Address, Frame
from meter_gateway.protocols.dlt645.messages import ReadRequest

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

    async def poll(self, drivers: list[Dlt645Driver]) -> None:
        """Read ``drivers`` in turn, back to back, one read at a time."""
        wanted = len(self.quantities)
        while self.running:
            for driver in drivers:
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


def _by_bus(drivers: list[Dlt645Driver]) -> list[list[Dlt645Driver]]:
    by_bus: dict[int, list[Dlt645Driver]] = {}
    for d in drivers:
        by_bus.setdefault(id(d.bus), []).append(d)
    return list(by_bus.values())


async def _gateway_sample(
    buses: list[Bus],
    drivers: list[Dlt645Driver],
    quantities: tuple[str, ...],
    sim_pid: int,
    *,
    warmup: float,
    seconds: float,
    per_link: bool,
) -> Sample:
    poller = _Poller(quantities)
    # per link, as the daemon polls: one read at a time per bus, its meters in turn; else every
    # meter its own task: they queue for their bus and take it in turn
    groups = _by_bus(drivers) if per_link else [[d] for d in drivers]
    tasks = [asyncio.create_task(poller.poll(g)) for g in groups]
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
    return _start_child("import asyncio; from bench.tcp_links import _serve_bare; asyncio.run(_serve_bare())")


class _BareClient(asyncio.Protocol):
    """One request in flight; the next goes out when the whole reply (by length) is in."""

    failures = 0  # a bare client cannot tell a wrong reply: it counts bytes

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.pending = 0
        self.done = 0
        self.running = True

    @property
    def reads(self) -> int:
        return self.done

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


class _BareBufferedClient(_BareClient, asyncio.BufferedProtocol):
    """The bare client receiving as the gateway's TCP links do: recv_into a small buffer of its own
    (asyncio's plain path allocates 256 KiB per receive). Reported beside the trivial client."""

    def __init__(self) -> None:
        super().__init__()
        self._rx = memoryview(bytearray(2048))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._rx

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self._rx[:nbytes].tobytes())


async def _bare_sample(
    port: int, connections: int, server_pid: int, *, warmup: float, seconds: float, buffered: bool = False
) -> Sample:
    kind = _BareBufferedClient if buffered else _BareClient
    clients = [kind() for _ in range(connections)]
    return await _client_sample(port, clients, server_pid, warmup=warmup, seconds=seconds)


async def _client_sample(
    port: int, clients: list[_BareClient], server_pid: int, *, warmup: float, seconds: float
) -> Sample:
    """Connect each client (one connection each), start them, and measure them over ``seconds``."""
    loop = asyncio.get_running_loop()
    for client in clients:
        await loop.create_connection(lambda client=client: client, "127.0.0.1", port)  # type: ignore[misc]

    def totals() -> tuple[int, int, int]:
        return sum(c.done for c in clients), sum(c.reads for c in clients), sum(c.failures for c in clients)

    try:
        for client in clients:
            client.send()
        await asyncio.sleep(warmup)
        before = totals()
        peer0, cpu0, t0 = process_cpu(server_pid), time.process_time(), time.perf_counter()
        await asyncio.sleep(seconds)
        elapsed, cpu, peer = time.perf_counter() - t0, time.process_time() - cpu0, process_cpu(server_pid) - peer0
        done, reads, failures = (after - b for after, b in zip(totals(), before, strict=True))
    finally:
        for client in clients:
            client.running = False
            if client.transport is not None:
                client.transport.close()
    return Sample(elapsed, reads, done, failures, cpu, peer)


# -- the canned-reply server ----------------------------------------------------------------------


async def record_replies(endpoints: list[SimEndpoint], requests: dict[str, list[bytes]]) -> dict[bytes, bytes]:
    """Each meter's reply (as sent, preamble included) to each request, asked of the simulator once.

    ``requests`` maps a meter address to the request frames the gateway will send it.
    """
    table: dict[bytes, bytes] = {}
    for endpoint in endpoints:
        reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
        try:
            for address in endpoint.addresses:
                for request in requests[address]:
                    writer.write(request)
                    table[request] = await _one_reply(reader)
        finally:
            writer.close()
            await writer.wait_closed()
    return table


async def _one_reply(reader: asyncio.StreamReader) -> bytes:
    deframer = Deframer(max_data_length=255)
    got = bytearray()
    async with asyncio.timeout(5.0):
        while True:
            chunk = await reader.read(4096)
            if not chunk:
                raise RuntimeError("the simulator closed the connection while recording replies")
            got += chunk
            if any(isinstance(event, Frame) for event in deframer.feed(chunk)):
                return bytes(got)


class _CannedServer(asyncio.Protocol):
    """Frames requests by length (68 A0..A5 68 C L DATA CS 16: 12 + L bytes, no preamble) and
    answers each with the recorded reply; an unknown request gets no answer, as from a dead meter."""

    def __init__(self, table: dict[bytes, bytes]) -> None:
        self.table = table
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        out = []
        while len(buf) >= 10:
            size = 12 + buf[9]
            if len(buf) < size:
                break
            reply = self.table.get(buf[:size])
            if reply is not None:
                out.append(reply)
            buf = buf[size:]
        self.buf = buf
        if out and self.transport is not None:
            self.transport.write(b"".join(out) if len(out) > 1 else out[0])


def serve_canned(path: str) -> None:
    raw = json.loads(Path(path).read_text())
    asyncio.run(_serve_canned({bytes.fromhex(k): bytes.fromhex(v) for k, v in raw.items()}))


async def _serve_canned(table: dict[bytes, bytes]) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _CannedServer(table), "127.0.0.1", 0)
    print(f"port {server.sockets[0].getsockname()[1]}", flush=True)
    print("ready", flush=True)
    await loop.run_in_executor(None, sys.stdin.read)  # runs until the parent closes our stdin
    server.close()


def start_canned_server(table: dict[bytes, bytes]) -> tuple[subprocess.Popen[str], int, Path]:
    handle = tempfile.NamedTemporaryFile("w", suffix=".json", prefix="bench-canned-", delete=False)  # noqa: SIM115
    with handle:
        json.dump({k.hex(): v.hex() for k, v in table.items()}, handle)
    path = Path(handle.name)
    code = f"from bench.tcp_links import serve_canned; serve_canned({str(path)!r})"
    proc, port = _start_child(code)
    return proc, port, path


def _start_child(code: str) -> tuple[subprocess.Popen[str], int]:
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
    raise RuntimeError("a bench server exited before it was ready")


def _stop_child(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- orchestration --------------------------------------------------------------------------------


def simulator_config(links: int, per_link: int) -> str:
    parts = ["[simulator]\nseed = 1\n"]
    for i in range(links):
        parts.append(  # noqa: PERF401 (a loop reads better than a generator of two f-strings)
            f'[[bus]]\nname = "link{i + 1}"\nprotocol = "dlt645-2007"\nport = 0\n'
            f"first_address = {i * per_link + 1}\ncount = {per_link}\nturnaround = 0.0\npreamble = 4\n"
        )
    return "\n".join(parts)


@dataclass
class Results:
    sim: list[Sample]  # the gateway against the simulator
    canned: list[Sample]  # the gateway against the canned-reply server
    bare: list[Sample]
    bare_buffered: list[Sample]  # the bare client receiving with recv_into, as the gateway does


@dataclass
class Gateway:
    buses: list[Bus]
    drivers: list[Dlt645Driver]


async def _open_gateway(
    args: argparse.Namespace, model: Dlt645Model, targets: list[tuple[str, int, list[str]]], tag: str
) -> Gateway:
    """One bus per (host, port, meter addresses) and one driver per meter on it."""
    health = HealthBook()
    settings = BusSettings(reply_timeout=args.reply_timeout)  # a TCP bus: no inter-frame gap
    buses = [
        Bus(f"{tag}{i}", make_transport(TcpSettings(host, port), name=f"{tag}{i}"), settings=settings, health=health)
        for i, (host, port, _) in enumerate(targets)
    ]
    opened = await asyncio.gather(*(b.open() for b in buses))
    if not all(opened):
        raise RuntimeError(f"{opened.count(False)} of {len(buses)} {tag} links did not connect")
    drivers = [
        Dlt645Driver(b, f"m{a}", a, E7, model)
        for b, (_, _, addresses) in zip(buses, targets, strict=True)
        for a in addresses
    ]
    return Gateway(buses, drivers)


def _requests(model: Dlt645Model, endpoints: list[SimEndpoint], quantities: tuple[str, ...]) -> dict[str, list[bytes]]:
    """The request frames the gateway sends each meter (its plan: block or single DIs)."""
    probe = Bus("plan")
    out: dict[str, list[bytes]] = {}
    for e in endpoints:
        for a in e.addresses:
            plan = Dlt645Driver(probe, "plan", a, E7, model).plan(quantities)
            out[a] = [ReadRequest(Address.parse(a), di).encode(E7) for di, _ in plan]
    return out


async def _run_all(
    args: argparse.Namespace,
    endpoints: list[SimEndpoint],
    sim_pid: int,
    bare: tuple[int, int],
    canned: tuple[int, int],
) -> Results:
    model = load_model(MODEL)
    assert isinstance(model, Dlt645Model)
    quantities = QUANTITIES[args.quantities]
    (bare_port, bare_pid), (canned_port, canned_pid) = bare, canned
    via_sim = await _open_gateway(args, model, [(e.host, e.port, e.addresses) for e in endpoints], "sim")
    # the canned server answers any meter on any connection: the same 100 links x 10 meters
    via_canned = await _open_gateway(
        args, model, [("127.0.0.1", canned_port, e.addresses) for e in endpoints], "canned"
    )
    results = Results([], [], [], [])
    profile = cProfile.Profile() if args.profile else None
    try:
        for _ in range(args.runs):
            for gateway, pid, into in ((via_sim, sim_pid, results.sim), (via_canned, canned_pid, results.canned)):
                if profile is not None:
                    profile.enable()
                into.append(
                    await _gateway_sample(
                        gateway.buses,
                        gateway.drivers,
                        quantities,
                        pid,
                        warmup=args.warmup,
                        seconds=args.seconds,
                        per_link=args.pollers == "link",
                    )
                )
                if profile is not None:
                    profile.disable()
            for buffered, into in ((False, results.bare), (True, results.bare_buffered)):
                into.append(
                    await _bare_sample(
                        bare_port, len(endpoints), bare_pid, warmup=args.warmup, seconds=args.seconds, buffered=buffered
                    )
                )
    finally:
        await asyncio.gather(*(b.close() for b in via_sim.buses + via_canned.buses))
    if profile is not None:
        profile.dump_stats(args.profile)
    return results


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench tcp_links", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run and side")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each run")
    parser.add_argument("--links", type=int, default=100)
    parser.add_argument("--meters-per-link", type=int, default=10)
    parser.add_argument("--reply-timeout", type=float, default=1.0)
    parser.add_argument("--quantities", choices=sorted(QUANTITIES), default="energy-total")
    parser.add_argument(
        "--pollers",
        choices=["link", "meter"],
        default="link",
        help="link: one poller per link reading its meters in turn, as the daemon does (one read at a "
        "time per bus); meter: one task per meter, all queueing for their link",
    )
    parser.add_argument("--profile", metavar="FILE", help="write a cProfile of the gateway runs (pstats) to FILE")
    args = parser.parse_args(argv)
    model = load_model(MODEL)
    assert isinstance(model, Dlt645Model)
    sim, endpoints, path = start_simulator(simulator_config(args.links, args.meters_per_link))
    try:
        table = asyncio.run(record_replies(endpoints, _requests(model, endpoints, QUANTITIES[args.quantities])))
        server, port = start_bare_server()
        try:
            canned, canned_port, canned_path = start_canned_server(table)
            try:
                results = asyncio.run(_run_all(args, endpoints, sim.pid, (port, server.pid), (canned_port, canned.pid)))
            finally:
                _stop_child(canned)
                canned_path.unlink(missing_ok=True)
        finally:
            _stop_child(server)
    finally:
        stop_simulator(sim, path)
    report(args, results)
    return 0


def report(args: argparse.Namespace, results: Results) -> None:
    med = statistics.median
    sim, canned, bare, bare_buffered = results.sim, results.canned, results.bare, results.bare_buffered
    meters = args.links * args.meters_per_link
    print(
        f"tcp_links: {meters} meters on {args.links} TCP links ({args.meters_per_link}/link), reading "
        f"{args.quantities}, 1 request in flight per link, pollers per {args.pollers}; "
        f"Python {platform.python_version()}, "
        f"{os.cpu_count()} cpus, {args.runs} runs x {args.seconds:.0f} s per side"
    )
    print("gateway vs simulator (tx/s): " + ", ".join(f"{s.rate:,.0f} ({s.failures} failed)" for s in sim))
    print("gateway vs canned (tx/s):    " + ", ".join(f"{s.rate:,.0f} ({s.failures} failed)" for s in canned))
    print("bare runs (tx/s):            " + ", ".join(f"{s.rate:,.0f}" for s in bare))
    print("bare recv_into runs (tx/s):  " + ", ".join(f"{s.rate:,.0f}" for s in bare_buffered))
    sides = (sim, canned, bare, bare_buffered)

    def row(name: str, fn: Callable[[Sample], float], fmt: str, skip_bare: bool = False) -> None:
        cells = [
            format(med(fn(s) for s in side), fmt) if not (skip_bare and side in (bare, bare_buffered)) else "-"
            for side in sides
        ]
        print(f"{name:<40}" + "".join(f"{c:>14}" for c in cells))

    heads = ("gw/simulator", "gw/canned", "bare")
    print(f"{'figure (median)':<40}" + "".join(f"{h:>14}" for h in heads) + f"{'bare recv_into':>15}")
    row("transactions (request/reply) per second", lambda s: s.rate, ",.0f")
    row("meter reads per second", lambda s: s.reads / s.seconds, ",.0f", skip_bare=True)
    row("CPU us per transaction, this process", lambda s: s.cpu_per_transaction * 1e6, ",.0f")
    row("CPU us per transaction, peer process", lambda s: s.peer_cpu / max(s.transactions, 1) * 1e6, ",.0f")
    row("CPU share of one core, this process", lambda s: s.cpu / s.seconds, ".0%")
    row("CPU share of one core, peer process", lambda s: s.peer_cpu / s.seconds, ".0%")
    # The ceiling of each run is the faster of the two bare clients: depending on how glibc serves
    # the plain client's 256 KiB receives, it runs at either of two speeds for a whole run.
    ceiling = [max(a, b, key=lambda s: s.rate) for a, b in zip(bare, bare_buffered, strict=True)]
    slow = sum(b.rate < r.rate / 2 for b, r in zip(bare, bare_buffered, strict=True))
    if slow:
        print(f"(the plain bare client ran in its slow mode in {slow} of {len(bare)} runs)")
    ceiling_cpu = med(s.cpu_per_transaction for s in ceiling)
    for name, side in (("gateway vs simulator", sim), ("gateway vs canned server", canned)):
        ratios = [o.rate / c.rate for o, c in zip(side, ceiling, strict=True)]
        runs = ", ".join(f"{r:.0%}" for r in ratios)
        print(f"{name} / bare ceiling, tx/s: {med(ratios):.1%} (runs: {runs})")
        print(f"  bare / its CPU per transaction: {ceiling_cpu / med(s.cpu_per_transaction for s in side):.1%}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

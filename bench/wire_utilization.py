"""Wire utilization of one 2400-baud 8E1 DL/T 645 bus: how close polling comes to the line's limit.

32 simulated meters sit behind ONE simulated serial server (``meter-gateway simulate`` in a child
process, wire-time emulation on: 11 bits per character at ``--baud``, each meter answering after
``--turnaround``). The gateway side is the real stack: a TCP transport, a :class:`drivers.bus.Bus`
with the inter-frame gap a 2400-baud serial bus gets (3.5 character times, gateway/config.py
``SerialBus.frame_gap``) and one :class:`drivers.dlt645_driver.Dlt645Driver` per meter. Every
meter has its own poll task reading ``--quantities`` back to back, so the bus queue is never
empty, as when a whole line falls due in one slot.

The limit is what the wire allows for the frames actually exchanged (sizes measured from the
link's byte counters, FE wake-up bytes included): one transaction takes

    t_req + turnaround + t_reply + gap,   t = bytes * bits_per_char / baud

and utilization = achieved transactions/s divided by 1 / that. The cycle is also split into
where the time went (request written -> reply accepted, against the ideal; and quiet time before
the next request, against the gap) to show which side loses it.

Requests carry ``--request-preamble`` FE wake-up bytes (default 4, what the gateway sends on a
serial bus: ``buses[].preamble``); the report states what they cost: the wire limit with the
same frames and no request FE, against the limit with them.

    python -m bench wire_utilization --runs 3 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from meter_gateway.drivers.bus import Bus, BusSettings
from meter_gateway.drivers.dlt645_driver import Dlt645Driver
from meter_gateway.drivers.errors import DriverError
from meter_gateway.drivers.health import HealthBook
from meter_gateway.drivers.meter_models import Dlt645Model, load_model
from meter_gateway.drivers.transport import StreamLink, TcpSettings, make_transport
from meter_gateway.protocols.dlt645.edition import Edition
from meter_gateway.protocols.dlt645.frame import Address
from meter_gateway.protocols.dlt645.messages import ReadRequest

ROOT = Path(__file__).resolve().parents[1]
E7 = Edition.DLT645_2007
MODEL = "dlt645-2007-generic"
# The billing registers: total + 4 tariffs of forward active energy, one 0001FF00 block read.
QUANTITY_SETS = {
    "energy-block": tuple(f"energy.active.import.{t}" for t in ("total", "t1", "t2", "t3", "t4")),
    "energy-total": ("energy.active.import.total",),
}


# -- the simulator, in its own process ------------------------------------------------------------


@dataclass
class SimEndpoint:
    host: str
    port: int
    addresses: list[str]


def start_simulator(config_toml: str) -> tuple[subprocess.Popen[str], list[SimEndpoint], Path]:
    """Start ``meter-gateway simulate --config`` with ``config_toml``; its buses once it is ready."""
    handle = tempfile.NamedTemporaryFile("w", suffix=".toml", prefix="bench-sim-", delete=False)  # noqa: SIM115
    with handle:
        handle.write(config_toml)
    path = Path(handle.name)
    code = "import sys; from meter_gateway.simulators.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "--config", str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    endpoints: list[SimEndpoint] = []
    for line in proc.stdout:
        if line.strip() == "ready":
            break
        # "bus1: dlt645-2007 tcp 127.0.0.1:PORT [2400 baud]  N meters: A-B, C"
        words = line.split()
        host, _, port = words[3].rpartition(":")
        ranges = line.split("meters:", 1)[1]
        addresses: list[str] = []
        for part in ranges.split(","):
            first, _, last = part.strip().partition("-")
            addresses += [f"{a:012d}" for a in range(int(first), int(last or first) + 1)]
        endpoints.append(SimEndpoint(host, int(port), addresses))
    else:
        path.unlink(missing_ok=True)
        raise RuntimeError("the simulator exited before it was ready")
    return proc, endpoints, path


def stop_simulator(proc: subprocess.Popen[str], path: Path) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    path.unlink(missing_ok=True)


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) another process has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- wire-time arithmetic -------------------------------------------------------------------------


@dataclass(frozen=True)
class WireLimit:
    baud: int
    bits_per_char: int
    request_bytes: float
    reply_bytes: float
    turnaround: float
    gap: float

    @property
    def char_time(self) -> float:
        return self.bits_per_char / self.baud

    @property
    def t_request(self) -> float:
        return self.request_bytes * self.char_time

    @property
    def t_reply(self) -> float:
        return self.reply_bytes * self.char_time

    @property
    def cycle(self) -> float:
        return self.t_request + self.turnaround + self.t_reply + self.gap

    @property
    def per_second(self) -> float:
        return 1.0 / self.cycle


def serial_frame_gap(baud: int, bits_per_char: int) -> float:
    """The gap a serial bus gets by default: 3.5 character times (as gateway/config.py SerialBus)."""
    return 0.00175 if baud > 19200 else 3.5 * bits_per_char / baud


# -- one measurement ------------------------------------------------------------------------------


@dataclass
class RunResult:
    seconds: float
    transactions: int
    reads: int
    failures: int
    request_bytes: float
    reply_bytes: float
    latency: float  # mean seconds from request written to reply accepted
    gateway_cpu: float  # CPU seconds of this process during the window

    @property
    def rate(self) -> float:
        return self.transactions / self.seconds


class _Poller:
    def __init__(self, drivers: list[Dlt645Driver], quantities: tuple[str, ...]) -> None:
        self.drivers = drivers
        self.quantities = quantities
        self.reads = 0
        self.failures = 0
        self.running = True

    async def poll(self, driver: Dlt645Driver) -> None:
        while self.running:
            try:
                now = time.time()
                readings = await driver.read(self.quantities, slot=float(int(now)), now=now)
            except DriverError:
                self.failures += 1
                continue
            if len(readings) != len(self.quantities):
                self.failures += 1
            else:
                self.reads += 1


def build_bus(name: str, endpoint: SimEndpoint, settings: BusSettings) -> Bus:
    transport: StreamLink = make_transport(TcpSettings(endpoint.host, endpoint.port), name=name)
    return Bus(name, transport, settings=settings, health=HealthBook())


async def measure(
    bus: Bus, drivers: list[Dlt645Driver], quantities: tuple[str, ...], warmup: float, seconds: float
) -> RunResult:
    """Poll every driver back to back; count what happens on ``bus`` during ``seconds``."""
    assert bus.transport is not None
    poller = _Poller(drivers, quantities)
    latencies: list[float] = []
    tasks = [asyncio.create_task(poller.poll(d)) for d in drivers]
    try:
        await asyncio.sleep(warmup)
        stats, counters = bus.transport.stats, bus.counters
        out0, in0, sent0, ok0 = stats.bytes_out, stats.bytes_in, counters.sent, counters.ok
        reads0, fail0 = poller.reads, poller.failures
        bus.on_latency = latencies.append
        cpu0, t0 = time.process_time(), time.perf_counter()
        await asyncio.sleep(seconds)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        bus.on_latency = None
        sent, ok = counters.sent - sent0, counters.ok - ok0
        result = RunResult(
            seconds=elapsed,
            transactions=ok,
            reads=poller.reads - reads0,
            failures=poller.failures - fail0,
            request_bytes=(stats.bytes_out - out0) / max(sent, 1),
            reply_bytes=(stats.bytes_in - in0) / max(ok, 1),
            latency=statistics.fmean(latencies) if latencies else 0.0,
            gateway_cpu=cpu,
        )
    finally:
        poller.running = False
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return result


async def _run_all(
    args: argparse.Namespace, endpoint: SimEndpoint, quantities: tuple[str, ...]
) -> tuple[list[RunResult], list[tuple[float, float]]]:
    """Alternate gateway runs and bare-client runs, so machine noise hits both alike."""
    model = load_model(MODEL)
    assert isinstance(model, Dlt645Model)
    gap = args.gap if args.gap is not None else serial_frame_gap(args.baud, args.bits)
    settings = BusSettings(reply_timeout=args.reply_timeout, inter_frame_gap=gap)
    addresses = endpoint.addresses[: args.meters]
    results: list[RunResult] = []
    bare: list[tuple[float, float]] = []
    for _ in range(args.runs):
        bus = build_bus("wire", endpoint, settings)
        if not await bus.open():
            raise RuntimeError(f"cannot connect to the simulator at {endpoint.host}:{endpoint.port}")
        try:
            drivers = [Dlt645Driver(bus, f"m{a}", a, E7, model, preamble=args.request_preamble) for a in addresses]
            [(di, _)] = drivers[0].plan(quantities)  # the presets are one request per read
            results.append(await measure(bus, drivers, quantities, args.warmup, args.seconds))
        finally:
            await bus.close()
        requests = [ReadRequest(Address.parse(a), di).encode(E7, args.request_preamble) for a in addresses]
        reply_length = round(results[-1].reply_bytes)
        bare.append(await bare_rate(endpoint, requests, reply_length, gap, warmup=args.warmup, seconds=args.seconds))
    return results, bare


async def bare_rate(
    endpoint: SimEndpoint, requests: list[bytes], reply_length: int, gap: float, *, warmup: float, seconds: float
) -> tuple[float, float]:
    """Transactions/s of a bare client on the same simulated bus, and its mean written -> reply.

    Same frames, same gap, no Bus, driver or matcher: a reply is complete when ``reply_length``
    bytes are in. The difference to the gateway is what our stack costs; the difference to the
    wire limit is what the simulator's pacing costs.
    """
    reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
    loop = asyncio.get_running_loop()
    done, latency_sum, counting = 0, 0.0, False
    start = end = 0.0
    try:
        index = 0
        t_begin = loop.time()
        while True:
            now = loop.time()
            if not counting and now - t_begin >= warmup:
                counting, start = True, now
            if counting and now - start >= seconds:
                end = now
                break
            writer.write(requests[index % len(requests)])
            index += 1
            written = loop.time()
            await reader.readexactly(reply_length)
            received = loop.time()
            if counting:
                done += 1
                latency_sum += received - written
            await asyncio.sleep(gap)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return done / (end - start), latency_sum / max(done, 1)


def simulator_config(meters: int, baud: int, bits: int, turnaround: float, preamble: int) -> str:
    return (
        "[simulator]\nseed = 1\n\n[[bus]]\n"
        'name = "wire"\nprotocol = "dlt645-2007"\nkind = "tcp"\nport = 0\n'
        f"baud = {baud}\nbits_per_char = {bits}\nfirst_address = 1\ncount = {meters}\n"
        f"turnaround = {turnaround}\npreamble = {preamble}\n"
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench wire_utilization", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each run")
    parser.add_argument("--meters", type=int, default=32)
    parser.add_argument("--baud", type=int, default=2400)
    parser.add_argument("--bits", type=int, default=11, help="bits per character (8E1 = 11)")
    parser.add_argument("--turnaround", type=float, default=0.02, help="meter think time, seconds")
    parser.add_argument("--preamble", type=int, default=4, help="FE bytes before each reply")
    parser.add_argument(
        "--request-preamble", type=int, default=4, help="FE bytes before each request (a serial bus's default)"
    )
    parser.add_argument("--gap", type=float, help="inter-frame gap, seconds (default: 3.5 chars)")
    parser.add_argument("--reply-timeout", type=float, default=1.0)
    parser.add_argument("--quantities", choices=sorted(QUANTITY_SETS), default="energy-block")
    args = parser.parse_args(argv)
    quantities = QUANTITY_SETS[args.quantities]
    config = simulator_config(args.meters, args.baud, args.bits, args.turnaround, args.preamble)
    proc, endpoints, path = start_simulator(config)
    sim_cpu0 = process_cpu(proc.pid)
    try:
        results, bare = asyncio.run(_run_all(args, endpoints[0], quantities))
        sim_cpu = process_cpu(proc.pid) - sim_cpu0
    finally:
        stop_simulator(proc, path)
    report(args, quantities, results, bare, sim_cpu)
    return 0


def report(
    args: argparse.Namespace,
    quantities: tuple[str, ...],
    results: list[RunResult],
    bare: list[tuple[float, float]],
    sim_cpu: float,
) -> None:
    gap = args.gap if args.gap is not None else serial_frame_gap(args.baud, args.bits)
    med = statistics.median
    limit = WireLimit(
        args.baud,
        args.bits,
        med(r.request_bytes for r in results),
        med(r.reply_bytes for r in results),
        args.turnaround,
        gap,
    )
    rates = [r.rate for r in results]
    utils = [rate / limit.per_second for rate in rates]
    # the same frames without the request FE: what the wake-up bytes cost on the wire
    no_preamble = replace(limit, request_bytes=limit.request_bytes - args.request_preamble)
    preamble_cost = limit.cycle - no_preamble.cycle
    achieved = med(rates)
    cycle = 1.0 / achieved
    latency = med(r.latency for r in results)
    ideal_latency = limit.t_request + args.turnaround + limit.t_reply
    print(
        f"wire_utilization: {args.meters} meters, one {args.baud} baud bus, {args.bits} bits/char, "
        f"turnaround {args.turnaround * 1000:.0f} ms, gap {gap * 1000:.2f} ms, reading {args.quantities} "
        f"({len(quantities)} quantities); Python {platform.python_version()}, {os.cpu_count()} cpus, "
        f"{args.runs} runs x {args.seconds:.0f} s"
    )
    print(
        f"frames: request {limit.request_bytes:.1f} B = {limit.t_request * 1000:.1f} ms, "
        f"reply {limit.reply_bytes:.1f} B = {limit.t_reply * 1000:.1f} ms (FE bytes included: "
        f"{args.request_preamble} before each request, {args.preamble} before each reply)"
    )
    print(f"wire limit: {limit.cycle * 1000:.1f} ms per transaction = {limit.per_second:.3f} transactions/s")
    print(
        "runs: "
        + ", ".join(f"{r.rate:.3f}/s ({u:.1%}, {r.failures} failed)" for r, u in zip(results, utils, strict=True))
    )
    print("bare client runs: " + ", ".join(f"{rate:.3f}/s" for rate, _ in bare))
    bare_rate_ = med(rate for rate, _ in bare)
    print(f"{'figure':<44}{'median':>12}")
    rows = [
        ("transactions/s achieved", f"{achieved:.3f}"),
        ("meter reads/s achieved", f"{med(r.reads / r.seconds for r in results):.3f}"),
        ("wire limit transactions/s", f"{limit.per_second:.3f}"),
        (f"  with 0 request FE instead of {args.request_preamble}", f"{no_preamble.per_second:.3f}"),
        (f"  {args.request_preamble} request FE cost, ms per transaction", f"{preamble_cost * 1000:.1f}"),
        ("  ... share of the wire limit", f"{preamble_cost / limit.cycle:.1%}"),
        # the simulator charges a request's 68..16 bytes only, not its FE: this is the fair ratio
        ("utilization of the limit without request FE", f"{achieved / no_preamble.per_second:.1%}"),
        ("utilization (goal >= 90%)", f"{med(utils):.1%}"),
        ("cycle ms: achieved", f"{cycle * 1000:.1f}"),
        ("  written -> accepted ms (ideal)", f"{latency * 1000:.1f} ({ideal_latency * 1000:.1f})"),
        ("  accepted -> next written ms (gap)", f"{(cycle - latency) * 1000:.1f} ({gap * 1000:.1f})"),
        ("bare client transactions/s (same sim, gap)", f"{bare_rate_:.3f}"),
        ("  bare utilization of the wire limit", f"{bare_rate_ / limit.per_second:.1%}"),
        ("  bare written -> reply ms", f"{med(lat for _, lat in bare) * 1000:.1f}"),
        ("gateway / bare client", f"{achieved / bare_rate_:.1%}"),
        ("gateway CPU, share of one core", f"{med(r.gateway_cpu / r.seconds for r in results):.1%}"),
        ("simulator CPU s (whole bench)", f"{sim_cpu:.2f}"),
    ]
    for name, value in rows:
        print(f"{name:<44}{value:>12}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

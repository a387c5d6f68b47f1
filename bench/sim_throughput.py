"""Requests per second one DL/T 645 simulator process sustains over TCP.

Starts ``meter-gateway simulate`` in a child process (one core: the simulator is one asyncio
thread), then a client here opens ``--connections`` TCP connections to its buses and keeps
``--window`` requests in flight on each (1 = strictly sequential request/reply, like a gateway
polling one line). Requests cycle over every meter's address and over a few data identifiers.
A run counts complete replies (a reply's length is known, so no deframing on the client) for
``--seconds``; the median of ``--runs`` runs is reported.

    python -m bench sim_throughput --meters 1000 --buses 10 --connections 10 --runs 5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from meter_gateway.protocols.dlt645.edition import Edition
from meter_gateway.protocols.dlt645.frame import Address
from meter_gateway.protocols.dlt645.messages import ReadRequest

ROOT = Path(__file__).resolve().parents[1]
# (DI, data bytes of the reply value): energy total, voltage L1, status word 3
DIS = ((0x00010000, 4), (0x02010100, 2), (0x04000503, 2))
PREAMBLE = 4


class _Client(asyncio.Protocol):
    def __init__(self, requests: list[tuple[bytes, int]], window: int) -> None:
        self.requests = requests
        self.window = window
        self.index = 0
        self.expected: list[int] = []
        self.pending = 0
        self.done = 0
        self.transport: asyncio.Transport | None = None
        self.running = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def start(self) -> None:
        for _ in range(self.window):
            self._send()

    def _send(self) -> None:
        request, reply_length = self.requests[self.index]
        self.index = (self.index + 1) % len(self.requests)
        self.expected.append(reply_length)
        assert self.transport is not None
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self.pending += len(data)
        while self.expected and self.pending >= self.expected[0]:
            self.pending -= self.expected.pop(0)
            self.done += 1
            if self.running:
                self._send()


def _requests(addresses: list[str]) -> list[tuple[bytes, int]]:
    out = []
    for i, address in enumerate(addresses):
        di, value_length = DIS[i % len(DIS)]
        frame = ReadRequest(Address.parse(address), di).encode(Edition.DLT645_2007, preamble=PREAMBLE)
        out.append((frame, PREAMBLE + 12 + 4 + value_length))
    return out


async def _run(endpoints: list[tuple[str, int, list[str]]], connections: int, window: int, seconds: float) -> float:
    loop = asyncio.get_running_loop()
    clients: list[_Client] = []
    for i in range(connections):
        host, port, addresses = endpoints[i % len(endpoints)]
        client = _Client(_requests(addresses), window)
        await loop.create_connection(lambda client=client: client, host, port)  # type: ignore[misc]
        clients.append(client)
    await asyncio.sleep(0.1)
    started = time.perf_counter()
    for client in clients:
        client.start()
    await asyncio.sleep(seconds)
    elapsed = time.perf_counter() - started
    total = sum(c.done for c in clients)
    for client in clients:
        client.running = False
        if client.transport is not None:
            client.transport.close()
    return total / elapsed


def _start_simulator(meters: int, buses: int) -> tuple[subprocess.Popen[str], list[tuple[str, int, list[str]]]]:
    code = "import sys; from meter_gateway.simulators.cli import main; sys.exit(main(sys.argv[1:]))"
    args = [sys.executable, "-c", code, "--meters", str(meters), "--buses", str(buses), "--port", "0"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    endpoints = []
    for line in proc.stdout:
        if line.strip() == "ready":
            break
        # "bus1: dlt645-2007 tcp 127.0.0.1:PORT  N meters: A-B"
        parts = line.split()
        host, _, port = parts[3].rpartition(":")
        first, _, last = parts[-1].partition("-")
        last = last or first
        addresses = [f"{a:012d}" for a in range(int(first), int(last) + 1)]
        endpoints.append((host, int(port), addresses))
    else:
        raise RuntimeError("the simulator exited before it was ready")
    return proc, endpoints


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench sim_throughput", description=__doc__.splitlines()[0])
    parser.add_argument("--meters", type=int, default=1000)
    parser.add_argument("--buses", type=int, default=10)
    parser.add_argument("--connections", type=int, default=10)
    parser.add_argument("--window", type=int, default=1, help="requests in flight per connection")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    proc, endpoints = _start_simulator(args.meters, args.buses)
    try:
        # warm-up, not counted: every meter's first read integrates its load from the start time
        asyncio.run(_run(endpoints, args.connections, args.window, 1.0))
        rates = [asyncio.run(_run(endpoints, args.connections, args.window, args.seconds)) for _ in range(args.runs)]
    finally:
        proc.terminate()
        proc.wait(10)
    print(
        f"sim_throughput: {args.meters} meters on {args.buses} buses, {args.connections} connections x "
        f"window {args.window}, {os.cpu_count()} cpus"
    )
    print("runs (req/s): " + ", ".join(f"{r:,.0f}" for r in rates))
    print(f"median: {statistics.median(rates):,.0f} requests/replies per second")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

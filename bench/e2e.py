"""End-to-end throughput: simulated meters -> gateway -> SQLite outbox -> mosquitto -> subscriber.

    python -m bench e2e [--protocol modbus|dlt645|dlt698|both|all] [--runs 3] [--warmup 8] [--seconds 15]
                        [--buses 20] [--meters-per-bus N] [--interval 1] [--baseline-count 50000]
                        [--profile PREFIX] [--keep-log PREFIX]

Every part runs in its own process, started as a user would start it:

* the simulator: ``meter-gateway simulate --config sim.toml`` (Modbus TCP ``sim-3ph`` meters, or
  DL/T 645-2007 or DL/T 698.45 meters behind TCP serial servers; no wire-time emulation, so the simulator is
  not the limit it would be at 2400 baud);
* mosquitto on a free loopback port (gateway/cli/local_broker.py);
* the gateway: ``meter-gateway run -c gateway.toml`` with a generated config (metrics on, outbox
  ``synchronous=FULL``, default uplink batch and window);
* a head-end subscriber (this module, ``_subscriber``): paho, QoS 1, decodes every batch and
  counts DISTINCT reading ids, printing its count with a monotonic timestamp four times a second.

Each meter is polled every ``--interval`` seconds for all the quantities its model reads in a
few requests (Modbus: 36 quantities in 2 register reads; DL/T 645: the 32 quantities of 8 block
reads; DL/T 698.45: 29 quantities in one GET-Request-NormalList of 8 OADs), so the offered load
is ``meters * quantities / interval`` readings/s. After ``--warmup``
seconds the rate of new distinct ids at the subscriber is measured over ``--seconds``; the CPU
time (user + system, every thread) of each process over the same window comes from
/proc/PID/stat, the gateway's RSS from /proc/PID/status.

Baseline, in the same run: the same broker and a fresh subscriber, fed by the real uplink draining
an outbox pre-filled with ``--baseline-count`` readings (in this process). That is the ceiling of
the delivery half (outbox -> broker -> subscriber) on this machine at that moment; the e2e figure
is reported as a ratio of it, so a noisy machine shows up in both.

Goal: >= 10,000 readings/s sustained, simulator on the same (2-core) machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]
GATEWAY_ID = "bench-gw"
CLK_TCK = os.sysconf("SC_CLK_TCK")
GOAL = 10_000.0

# What each protocol polls: every quantity the model answers in few requests.
MODBUS_QUANTITIES = (
    *(f"voltage.l{p}" for p in (1, 2, 3)),
    *(f"current.{p}" for p in ("l1", "l2", "l3", "n")),
    *(f"power.{kind}.{p}" for kind in ("active", "reactive", "apparent") for p in ("total", "l1", "l2", "l3")),
    *(f"power_factor.{p}" for p in ("total", "l1", "l2", "l3")),
    "frequency",
    *(f"energy.{kind}.{d}.total" for kind in ("active", "reactive") for d in ("import", "export")),
    *(f"energy.active.{d}.t{t}" for d in ("import", "export") for t in (1, 2, 3, 4)),
)
DLT645_QUANTITIES = (
    *(f"energy.active.{d}.{t}" for d in ("import", "export") for t in ("total", "t1", "t2", "t3", "t4")),
    *(f"voltage.l{p}" for p in (1, 2, 3)),
    *(f"current.l{p}" for p in (1, 2, 3)),
    *(
        f"{kind}.{p}"
        for kind in ("power.active", "power.reactive", "power.apparent", "power_factor")
        for p in ("total", "l1", "l2", "l3")
    ),
)

DLT698_QUANTITIES = (  # what dlt698-generic reads: its 8 OADs fit one GET-Request-NormalList
    *(f"energy.active.{d}.{t}" for d in ("import", "export") for t in ("total", "t1", "t2", "t3", "t4")),
    *(f"voltage.l{p}" for p in (1, 2, 3)),
    *(f"current.l{p}" for p in (1, 2, 3)),
    *(f"{kind}.{p}" for kind in ("power.active", "power.reactive") for p in ("total", "l1", "l2", "l3")),
    *(f"power_factor.{p}" for p in ("total", "l1", "l2", "l3")),
    "power.apparent.total",
)


@dataclass(frozen=True)
class Protocol:
    name: str
    sim_protocol: str
    bus_protocol: str
    meter_protocol: str
    model: str
    quantities: tuple[str, ...]
    requests_per_poll: int


PROTOCOLS = {
    "modbus": Protocol("modbus", "modbus-tcp", "modbus-tcp", "modbus", "sim-3ph", MODBUS_QUANTITIES, 2),
    "dlt645": Protocol("dlt645", "dlt645-2007", "dlt645", "dlt645-2007", "dlt645-2007-generic", DLT645_QUANTITIES, 8),
    "dlt698": Protocol("dlt698", "dlt698", "dlt698", "dlt698", "dlt698-generic", DLT698_QUANTITIES, 1),
}
# --protocol both: the two the earlier figures compare; all: every protocol above
CHOICES = {"both": ("modbus", "dlt645"), "all": tuple(PROTOCOLS)}


# -- processes ------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU of every thread of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime: fields 14 and 15 of stat(5)


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (peak RSS), RssAnon (private heap) and RssFile (mapped files, shared
    libraries) of ``pid`` in KiB, from /proc/PID/status."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            values[key] = int(rest.split()[0])
    return values


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of ``pid`` in KiB."""
    values = memory_kib(pid)
    return values["VmRSS"], values["VmHWM"]


def scrape(port: int) -> dict[str, float]:
    """The gateway's own counters (Prometheus text), summed over labels."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    wanted = {
        "meter_gateway_readings_acquired_total": "acquired",
        "meter_gateway_readings_committed_total": "committed",
        "meter_gateway_readings_delivered_total": "delivered",
        "meter_gateway_outbox_depth": "depth",
        "meter_gateway_bus_requests_sent_total": "requests",
        "meter_gateway_reply_latency_seconds_sum": "latency_sum",
        "meter_gateway_reply_latency_seconds_count": "latency_count",
    }
    out = dict.fromkeys(wanted.values(), 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in wanted:
            out[wanted[name]] += float(line.rsplit(" ", 1)[1])
    return out


def stop_process(proc: subprocess.Popen[Any], timeout: float = 15.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class LineReader:
    """Reads a child's stdout lines on a thread; keeps them all."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self._thread.start()

    def _run(self, stream: IO[str]) -> None:
        for line in stream:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self.lines.append("")  # EOF marker
            self._cond.notify_all()

    def wait_for(self, text: str, timeout: float) -> list[str]:
        """All lines up to the first one equal to ``text``."""
        end = time.monotonic() + timeout
        with self._cond:
            while text not in self.lines:
                left = end - time.monotonic()
                if left <= 0 or (self.lines and self.lines[-1] == ""):
                    raise RuntimeError(f"child did not print {text!r}; got: {self.lines[-5:]}")
                self._cond.wait(left)
            return self.lines[: self.lines.index(text)]


class Subscriber:
    """The head-end subscriber process; ``sample()`` is its latest (monotonic time, distinct ids)."""

    def __init__(self, host: str, port: int, topic: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.e2e", "_subscriber", host, str(port), topic],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.reader = LineReader(self.proc.stdout)
        self.reader.wait_for("ready", 10)

    def samples(self) -> list[tuple[float, int]]:
        out = []
        for line in list(self.reader.lines):
            parts = line.split()
            if len(parts) == 3 and parts[0] == "n":
                out.append((float(parts[1]), int(parts[2])))
        return out

    def sample(self) -> tuple[float, int]:
        got = self.samples()
        return got[-1] if got else (time.monotonic(), 0)

    def time_reaching(self, count: int, timeout: float) -> float:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for t, n in self.samples():
                if n >= count:
                    return t
            time.sleep(0.05)
        raise RuntimeError(f"subscriber saw {self.sample()[1]} of {count} reading ids")

    def stop(self) -> None:
        stop_process(self.proc)


def _subscriber_main(host: str, port: int, topic: str) -> int:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from meter_gateway.gateway.uplink.contract import decode_batch

    ids: set[str] = set()
    ready = threading.Event()
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)

    def on_connect(c: mqtt.Client, *_: Any) -> None:
        c.subscribe(topic, qos=1)

    def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        ids.update([r.id for r in decode_batch(bytes(msg.payload)).readings])

    client.on_connect = on_connect
    client.on_subscribe = lambda *_: ready.set()
    client.on_message = on_message
    client.connect(host, port)
    client.loop_start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if not ready.wait(10):
        return 1
    print("ready", flush=True)
    while not stop.wait(0.25):
        print(f"n {time.monotonic():.4f} {len(ids)}", flush=True)
    client.disconnect()
    client.loop_stop()
    return 0


# -- configs --------------------------------------------------------------------------------------


def simulator_config(proto: Protocol, buses: int, per_bus: int) -> str:
    lines = ["[simulator]", "seed = 7", ""]
    for b in range(buses):
        lines += ["[[bus]]", f'name = "b{b:03d}"', f'protocol = "{proto.sim_protocol}"', "port = 0"]
        if proto.name == "modbus":
            lines += ['model = "sim-3ph"', "first_address = 1", f"count = {per_bus}"]
        else:
            lines += [f"first_address = {b * per_bus + 1}", f"count = {per_bus}", "turnaround = 0.0"]
        lines.append("")
    return "\n".join(lines)


def parse_endpoints(lines: list[str]) -> dict[str, int]:
    """``b000: modbus-tcp tcp 127.0.0.1:40211  10 units: 1-10`` -> {"b000": 40211}."""
    ports = {}
    for line in lines:
        name, sep, rest = line.partition(": ")
        words = rest.split()
        if sep and len(words) >= 3 and words[1] == "tcp" and name.startswith("b"):
            ports[name] = int(words[2].rsplit(":", 1)[1])
    return ports


def gateway_config(
    proto: Protocol,
    ports: dict[str, int],
    per_bus: int,
    *,
    broker_port: int,
    metrics_port: int,
    state_dir: Path,
    interval: float,
    quantities: tuple[str, ...],
    spread: float = 0.5,
) -> str:
    q = ", ".join(f'"{x}"' for x in quantities)
    out = [
        "[gateway]",
        f'id = "{GATEWAY_ID}"',
        f'state_dir = "{state_dir}"',
        "",
        "[uplink]",
        'host = "127.0.0.1"',
        f"port = {broker_port}",
        "",
        "[outbox]",
        'synchronous = "FULL"',
        "",
        "[metrics]",
        f"port = {metrics_port}",
        "",
    ]
    for b, (name, port) in enumerate(sorted(ports.items())):
        out += [
            "[[buses]]",
            f'name = "{name}"',
            'type = "tcp"',
            'host = "127.0.0.1"',
            f"port = {port}",
            f'protocol = "{proto.bus_protocol}"',
            'reply_timeout = "1s"',
            "attempts = 2",
            "",
        ]
        for i in range(per_bus):
            address = str(i + 1) if proto.name == "modbus" else f'"{b * per_bus + i + 1:012d}"'
            out += [
                "[[meters]]",
                f'id = "{name}-m{i + 1:03d}"',
                f'bus = "{name}"',
                f'protocol = "{proto.meter_protocol}"',
                f"address = {address}",
                f'model = "{proto.model}"',
                "",
            ]
    if not quantities:
        return "\n".join(out)
    out += [
        "[[poll_groups]]",
        'name = "live"',
        f"interval = {interval}",
        'meters = "*"',
        f"spread = {spread}",
        f"quantities = [{q}]",
        "",
    ]
    return "\n".join(out)


# -- one run --------------------------------------------------------------------------------------


@dataclass
class RunResult:
    rate: float  # distinct readings/s at the subscriber over the window
    offered: float  # readings/s the config asks for
    cpu_per_1000: float  # gateway CPU seconds per 1,000 delivered readings
    gateway_cpu: float  # gateway CPU share of one core over the window
    rss_mib: float
    hwm_mib: float
    others_cpu: dict[str, float] = field(default_factory=dict)  # share of one core
    baseline: float = 0.0
    status: dict[str, Any] = field(default_factory=dict)
    gauges: dict[str, float] = field(default_factory=dict)  # from the gateway's /metrics


def _fill_readings(count: int, meters: int = 2000) -> Iterator[list[Any]]:
    from meter_gateway.drivers.reading import Quality, Reading

    base = 1_700_000_000.0
    batch = []
    for i in range(count):
        slot = base + i // meters
        batch.append(
            Reading(
                f"base-{i % meters:05d}",
                "energy.active.import.total",
                1000.0 + i / 100,
                "kWh",
                gateway_time=slot,
                slot=slot,
                quality=Quality.GOOD,
            )
        )
        if len(batch) == 1000:
            yield batch
            batch = []
    if batch:
        yield batch


async def _baseline_drain(host: str, port: int, workdir: Path, count: int, subscriber: Subscriber) -> float:
    """Readings/s from uplink start until the subscriber has seen every id."""
    from meter_gateway.gateway.store.outbox import AsyncOutbox
    from meter_gateway.gateway.uplink.session import Uplink, UplinkConfig

    box = await AsyncOutbox.open(workdir / "baseline.sqlite", synchronous="NORMAL")
    try:
        for batch in _fill_readings(count):
            await box.add(batch)
        uplink = Uplink(UplinkConfig(gateway_id=GATEWAY_ID, host=host, port=port), box)
        started = time.monotonic()
        task = asyncio.create_task(uplink.run())
        while box.depth > 0 and not task.done():  # noqa: ASYNC110 - the outbox has no "empty" event
            await asyncio.sleep(0.05)
        reached = await asyncio.to_thread(subscriber.time_reaching, count, 60.0)
        await uplink.stop()
        await task
        return count / (reached - started)
    finally:
        await box.close()


def run_once(proto: Protocol, args: argparse.Namespace, run: int) -> RunResult:
    from meter_gateway.gateway.cli.local_broker import LocalBroker, free_port
    from meter_gateway.gateway.uplink.contract import Topics

    topic = Topics(GATEWAY_ID).readings
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp, LocalBroker() as broker:
        workdir = Path(tmp)
        broker_pid = broker._proc.pid if broker._proc is not None else None
        baseline = 0.0
        if args.baseline_count:
            counter = Subscriber(broker.host, broker.port, topic)
            try:
                baseline = asyncio.run(_baseline_drain(broker.host, broker.port, workdir, args.baseline_count, counter))
            finally:
                counter.stop()

        (workdir / "sim.toml").write_text(simulator_config(proto, args.buses, args.meters_per_bus))
        sim = subprocess.Popen(
            [
                sys.executable,
                *(["-m", "cProfile", "-o", f"{args.profile}.simulator.{proto.name}.{run}"] if args.profile else []),
                *("-m", "meter_gateway.gateway.cli", "simulate", "--config", str(workdir / "sim.toml")),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        procs: list[subprocess.Popen[Any]] = [sim]
        sub: Subscriber | None = None
        try:
            assert sim.stdout is not None
            ports = parse_endpoints(LineReader(sim.stdout).wait_for("ready", 60))
            if len(ports) != args.buses:
                raise RuntimeError(f"simulator reported {len(ports)} buses, expected {args.buses}")
            quantities = proto.quantities
            metrics_port = free_port()
            config = gateway_config(
                proto,
                ports,
                args.meters_per_bus,
                broker_port=broker.port,
                metrics_port=metrics_port,
                state_dir=workdir / "state",
                interval=args.interval,
                quantities=quantities,
            )
            (workdir / "gateway.toml").write_text(config)
            sub = Subscriber(broker.host, broker.port, topic)
            log = (workdir / "gateway.log").open("w")
            profile = ["-m", "cProfile", "-o", f"{args.profile}.{proto.name}.{run}"] if args.profile else []
            gw = subprocess.Popen(
                [
                    sys.executable,
                    *profile,
                    "-m",
                    "meter_gateway.gateway.cli",
                    "run",
                    "-c",
                    str(workdir / "gateway.toml"),
                    "--log-level",
                    "WARNING",
                ],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            procs.append(gw)
            time.sleep(args.warmup)
            if gw.poll() is not None:
                raise RuntimeError(f"gateway exited {gw.returncode}: {(workdir / 'gateway.log').read_text()[-2000:]}")
            watched = {"gateway": gw.pid, "simulator": sim.pid, "subscriber": sub.proc.pid}
            if broker_pid is not None:
                watched["mosquitto"] = broker_pid
            cpu0 = {k: cpu_seconds(p) for k, p in watched.items()}
            t0, n0 = sub.sample()
            m0 = scrape(metrics_port)
            time.sleep(args.seconds)
            t1, n1 = sub.sample()
            m1 = scrape(metrics_port)
            cpu1 = {k: cpu_seconds(p) for k, p in watched.items()}
            rss, hwm = rss_kib(gw.pid)
            time.sleep(max(0.0, 5.5 - args.seconds))  # the status file is written every 5 s
            status_file = workdir / "state" / "status.json"
            status = json.loads(status_file.read_text()) if status_file.exists() else {}
            elapsed = t1 - t0
            delivered = n1 - n0
            gw_cpu = cpu1["gateway"] - cpu0["gateway"]
            meters = args.buses * args.meters_per_bus
            return RunResult(
                rate=delivered / elapsed,
                offered=meters * len(quantities) / args.interval,
                cpu_per_1000=1000 * gw_cpu / max(delivered, 1),
                gateway_cpu=gw_cpu / elapsed,
                rss_mib=rss / 1024,
                hwm_mib=hwm / 1024,
                others_cpu={k: (cpu1[k] - cpu0[k]) / elapsed for k in watched if k != "gateway"},
                baseline=baseline,
                status={k: status.get(k) for k in ("poll", "outbox")},
                gauges={
                    "acquired/s": (m1["acquired"] - m0["acquired"]) / elapsed,
                    "requests/s": (m1["requests"] - m0["requests"]) / elapsed,
                    "depth growth/s": (m1["depth"] - m0["depth"]) / elapsed,
                    "depth": m1["depth"],
                    # mean seconds from request written to accepted reply over the window
                    "reply latency": (m1["latency_sum"] - m0["latency_sum"])
                    / max(m1["latency_count"] - m0["latency_count"], 1),
                },
            )
        finally:
            for proc in reversed(procs):
                stop_process(proc)
            if sub is not None:
                sub.stop()
            if args.keep_log:
                log_text = (workdir / "gateway.log").read_text() if (workdir / "gateway.log").exists() else ""
                Path(f"{args.keep_log}.{proto.name}.{run}").write_text(log_text)


def _print_run(proto: str, run: int, r: RunResult) -> None:
    others = ", ".join(f"{k} {v:.0%}" for k, v in r.others_cpu.items())
    poll = r.status.get("poll") or {}
    outbox = r.status.get("outbox") or {}
    g = r.gauges
    base = f"; baseline drain {r.baseline:,.0f}/s (e2e = {r.rate / r.baseline:.0%})" if r.baseline else ""
    print(
        f"{proto} run {run}: {r.rate:,.0f} readings/s delivered (offered {r.offered:,.0f}/s){base}\n"
        f"    gateway: {r.cpu_per_1000:.3f} CPU s per 1,000 readings ({r.gateway_cpu:.0%} of a core), "
        f"RSS {r.rss_mib:.1f} MiB (peak {r.hwm_mib:.1f}); others: {others}\n"
        f"    gateway metrics: acquired {g['acquired/s']:,.0f}/s, bus requests {g['requests/s']:,.0f}/s, "
        f"outbox depth {g['depth']:,.0f} (growing {g['depth growth/s']:+,.0f}/s), "
        f"mean reply latency {g['reply latency'] * 1000:.2f} ms\n"
        f"    status: reads {poll.get('reads')}, failures {poll.get('failures')}, missed slots "
        f"{poll.get('missed_slots')}, outbox depth {outbox.get('depth')}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_subscriber"]:
        return _subscriber_main(argv[1], int(argv[2]), argv[3])
    parser = argparse.ArgumentParser(prog="e2e", description=__doc__.split("\n\n")[0])
    parser.add_argument("--protocol", choices=[*PROTOCOLS, *CHOICES], default="both")
    parser.add_argument("--runs", type=int, default=3, help="runs per protocol; medians are reported")
    parser.add_argument("--warmup", type=float, default=8.0, help="seconds after the gateway starts")
    parser.add_argument("--seconds", type=float, default=15.0, help="measuring window")
    parser.add_argument("--buses", type=int, default=None, help="TCP buses (default: 20)")
    parser.add_argument(
        "--meters-per-bus", type=int, default=None, help="default: 14 Modbus (10,080 readings/s), 10 DL/T 645 (6,400/s)"
    )
    parser.add_argument("--interval", type=float, default=1.0, help="poll interval, seconds")
    parser.add_argument(
        "--baseline-count", type=int, default=50_000, help="readings drained for the baseline (0: none)"
    )
    parser.add_argument("--keep-log", metavar="PREFIX", help="keep the gateway's log as PREFIX.PROTOCOL.RUN")
    parser.add_argument(
        "--profile",
        metavar="PREFIX",
        help="run the gateway and the simulator under cProfile, stats to PREFIX.PROTOCOL.RUN and "
        "PREFIX.simulator.PROTOCOL.RUN",
    )
    args = parser.parse_args(argv)
    if args.runs < 1 or args.seconds <= 0:
        parser.error("--runs must be >= 1 and --seconds > 0")
    names = list(CHOICES.get(args.protocol, (args.protocol,)))
    # buses x meters per bus: ~10,000 readings/s offered at 1 s (DL/T 645 offers 6,400)
    defaults = {"modbus": (20, 14), "dlt645": (20, 10), "dlt698": (20, 18)}
    summary = []
    for name in names:
        proto = PROTOCOLS[name]
        run_args = argparse.Namespace(**vars(args))
        run_args.buses = args.buses or defaults[name][0]
        run_args.meters_per_bus = args.meters_per_bus or defaults[name][1]
        meters = run_args.buses * run_args.meters_per_bus
        print(
            f"{name}: {meters} meters ({proto.model}) on {run_args.buses} TCP buses, "
            f"{len(proto.quantities)} quantities in {proto.requests_per_poll} requests every {args.interval:g} s",
            flush=True,
        )
        results = []
        for run in range(1, args.runs + 1):
            result = run_once(proto, run_args, run)
            _print_run(name, run, result)
            results.append(result)
        summary.append((name, meters, results))
    print()
    print(
        "| protocol | meters | offered/s | delivered/s (median; runs) | baseline drain/s | e2e/baseline "
        "| gateway CPU s per 1,000 | gateway RSS MiB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, meters, results in summary:
        med = statistics.median
        runs = ", ".join(f"{r.rate:,.0f}" for r in results)
        base = med(r.baseline for r in results)
        ratio = f"{med(r.rate / r.baseline for r in results):.0%}" if base else "-"
        print(
            f"| {name} | {meters} | {results[0].offered:,.0f} | {med(r.rate for r in results):,.0f} ({runs}) | "
            f"{base:,.0f} | {ratio} | {med(r.cpu_per_1000 for r in results):.3f} | "
            f"{med(r.rss_mib for r in results):.1f} |"
        )
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())

"""Remote disconnect/reconnect under a lossy bus: fraction verified and command-to-verified latency.

    python -m bench commands [--runs 3] [--buses 10] [--meters-per-bus 10] [--per-meter 10]
                             [--mode waves|burst] [--reconnect close_permit|direct_close]
                             [--turnaround 0.02] [--drop 0.05] [--corrupt 0.01] [--profile FILE]

The issue's benchmark: 1,000 disconnect and 1,000 reconnect commands over 100 meters with the
simulator dropping 5 % of frames and corrupting 1 %. Goals: >= 99.9 % verified; command-to-
verified p99 <= 200 ms plus the meter's own turnaround on an unloaded TCP link.

Real parts:

* meters: ``meter-gateway simulate --config sim.toml`` in a child process, ``--buses`` TCP
  listeners (a transparent serial server each, one RS-485 segment behind it) of
  ``--meters-per-bus`` DL/T 645-2007 meters answering after ``--turnaround`` seconds, no
  wire-time emulation. Faults are switched per scenario through the simulator's control port
  (``fault BUS KNOB VALUE``): ``drop_request`` (the meter never sees the request) and
  ``drop_reply`` (it acts, the reply is lost) at ``--drop`` each, so both directions lose 5 % of
  their frames, and ``corrupt_byte`` at ``--corrupt`` on replies (the simulator corrupts replies
  only; a corrupted request fails its checksum at the meter, which is a dropped request).
* gateway: buses, drivers and health book built by :class:`gateway.meters.Fleet` from a
  :class:`gateway.config.Config` with the daemon's defaults (TCP bus ``reply_timeout`` 1 s,
  ``attempts`` 3; ``[commands]`` retry 3, verify_window 30 s), the real
  :class:`gateway.commands.service.CommandService` with its SQLite store (WAL,
  ``synchronous=FULL``) and audit log in a fresh temp dir per scenario, on this disk.
* commands: Ed25519-signed envelopes (one meter each), delivered as
  :class:`gateway.uplink.InboundMessage` to ``CommandService.on_message`` (the uplink's hook),
  one at a time with a yield between them as an MQTT client delivers them. Acks come back
  through the service's ``publish`` callable (no broker in this benchmark).

Workload: ``--per-meter`` disconnects and as many reconnects per meter, alternating (disconnect,
reconnect, disconnect ...) so every command moves the relay. ``waves`` (default): one command per
meter at once (100 concurrent executions, 10 per bus), the next wave when every execution of
this one is terminal. ``burst``: every command delivered at once; each meter works its queue in
order, so latency includes queueing. Expiry is 15 minutes, far above the run. The
mass-disconnect guard is set to exactly the run's disconnects (``max_disconnects`` = meters x
per-meter, window 1 h): nothing may be held.

Baseline, same run, same simulator with faults off: one disconnect and one reconnect per meter,
ONE command at a time (the next once the previous is terminal): the unloaded link the latency
goal speaks of. Scenarios alternate baseline / loaded in each run; figures are medians of runs.

Latencies come from the service's own ack timestamps (``Ack.at``, the time each transition was
persisted): command-to-verified = terminal ack - delivery to on_message (queueing included);
service = terminal - the moment the meter's worker took the execution (the later of its
``queued`` ack and the meter's previous terminal ack: one execution at a time per meter);
control-to-verified = terminal - first ``sent`` ack (the control frame; the keep-power read of a
disconnect precedes it). At the end of each scenario every meter's relay is read through the
simulator's control port (``status``) and compared with what the last verified ack said.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import itertools
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meter_gateway.drivers.health import HealthBook, HealthPolicy
from meter_gateway.gateway.commands.auth import SigningKey, sign_envelope
from meter_gateway.gateway.commands.envelope import TERMINAL_STATES, Ack, CommandEnvelope, decode_ack, encode_envelope
from meter_gateway.gateway.commands.service import CommandService
from meter_gateway.gateway.config import (
    CommandKeyConfig,
    CommandsSection,
    Config,
    Credentials,
    Duration,
    GatewaySection,
    LimitsSection,
    Meter,
    Secret,
    TcpBus,
    UplinkSection,
)
from meter_gateway.gateway.daemon.meters import Fleet
from meter_gateway.gateway.uplink.session import InboundMessage

ROOT = Path(__file__).resolve().parents[1]
GW = "bench-gw"
ACK_TOPIC = f"meter-gateway/v1/{GW}/acks"
COMMAND_TOPIC = f"meter-gateway/v1/{GW}/commands"
EXPIRES = 900.0
PASSWORD = "000000"  # the simulated meters' level-2 password (simulators/dlt645_meter.py)
OPERATOR = "12345678"
LATENCY_GOAL = 0.200  # seconds, plus the meter's turnaround
VERIFIED_GOAL = 0.999


# -- the simulator --------------------------------------------------------------------------------


@dataclass
class Simulator:
    proc: subprocess.Popen[str]
    config: Path
    control: tuple[str, int]
    buses: list[tuple[str, int, list[str]]]  # host, port, meter addresses

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.config.unlink(missing_ok=True)


def simulator_config(buses: int, per_bus: int, turnaround: float) -> str:
    parts = ["[simulator]\nseed = 7\ncontrol_port = 0\n"]
    for i in range(buses):
        parts.append(  # noqa: PERF401 - two f-strings read better in a loop
            f'[[bus]]\nname = "seg{i + 1}"\nprotocol = "dlt645-2007"\nport = 0\n'
            f"first_address = {i * per_bus + 1}\ncount = {per_bus}\nturnaround = {turnaround}\npreamble = 4\n"
        )
    return "\n".join(parts)


def start_simulator(buses: int, per_bus: int, turnaround: float) -> Simulator:
    handle = tempfile.NamedTemporaryFile("w", suffix=".toml", prefix="bench-cmd-sim-", delete=False)  # noqa: SIM115
    with handle:
        handle.write(simulator_config(buses, per_bus, turnaround))
    path = Path(handle.name)
    code = "import sys; from meter_gateway.simulators.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "--config", str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    control: tuple[str, int] | None = None
    found: list[tuple[str, int, list[str]]] = []
    for line in proc.stdout:
        if line.strip() == "ready":
            break
        words = line.split()
        if words and words[0] == "control:":
            host, _, port = words[1].rpartition(":")
            control = (host, int(port))
            continue
        # "seg1: dlt645-2007 tcp 127.0.0.1:PORT  N meters: A-B, C"
        host, _, port = words[3].rpartition(":")
        addresses: list[str] = []
        for part in line.split("meters:", 1)[1].split(","):
            first, _, last = part.strip().partition("-")
            addresses += [f"{a:012d}" for a in range(int(first), int(last or first) + 1)]
        found.append((host, int(port), addresses))
    else:
        path.unlink(missing_ok=True)
        raise RuntimeError("the simulator exited before it was ready")
    if control is None:
        raise RuntimeError("the simulator printed no control port")
    return Simulator(proc, path, control, found)


async def control(sim: Simulator, lines: Sequence[str]) -> list[str]:
    """Send control-port commands; their reply lines (each must start with ``ok``)."""
    reader, writer = await asyncio.open_connection(*sim.control)
    try:
        replies = []
        for line in lines:
            writer.write(line.encode() + b"\n")
            await writer.drain()
            reply = (await reader.readline()).decode().strip()
            if not reply.startswith("ok"):
                raise RuntimeError(f"simulator control {line!r}: {reply}")
            replies.append(reply)
        return replies
    finally:
        writer.close()
        await writer.wait_closed()


async def set_faults(sim: Simulator, drop: float, corrupt: float) -> None:
    lines = []
    for i in range(1, len(sim.buses) + 1):
        lines += [f"fault {i} drop_request {drop}", f"fault {i} drop_reply {drop}", f"fault {i} corrupt_byte {corrupt}"]
    await control(sim, lines)


async def relay_states(sim: Simulator, addresses: Sequence[str]) -> dict[str, str]:
    """closed | open | armed per meter, as the simulated meter itself holds it."""
    replies = await control(sim, [f"status {a}" for a in addresses])
    out = {}
    for address, reply in zip(addresses, replies, strict=True):
        fields = dict(w.split("=", 1) for w in reply.split()[1:] if "=" in w)
        closed, armed = fields["relay"] == "closed", fields["armed"] == "True"
        out[address] = "closed" if closed else "armed" if armed else "open"
    return out


# -- the gateway side ------------------------------------------------------------------------------


def meter_id(address: str) -> str:
    return f"m{address}"


def gateway_config(sim: Simulator, state_dir: Path, args: argparse.Namespace, key: SigningKey) -> Config:
    buses = [
        TcpBus(name=f"seg{i + 1}", protocol="dlt645", host=host, port=port, reply_timeout=Duration(args.reply_timeout))
        for i, (host, port, _) in enumerate(sim.buses)
    ]
    meters = [
        Meter(
            id=meter_id(address),
            bus=f"seg{i + 1}",
            protocol="dlt645-2007",
            address=address,
            model="dlt645-2007-generic",
            credentials=Credentials(password=Secret(PASSWORD), password_level=2, operator=OPERATOR),
            reconnect=args.reconnect,
        )
        for i, (_, _, addresses) in enumerate(sim.buses)
        for address in addresses
    ]
    vk = key.verify_key(["command"])
    keys = [CommandKeyConfig(id=key.key_id, alg="ed25519", roles=["command"], public_key=vk.public_key)]
    commands = CommandsSection(
        enabled=True,
        keys=keys,
        max_disconnects=max(1, len(meters) * args.per_meter),
        guard_window=Duration(3600),
        retry=args.retry,
        verify_window=Duration(args.verify_window),
    )
    return Config(
        gateway=GatewaySection(id=GW, state_dir=str(state_dir)),
        uplink=UplinkSection(host="127.0.0.1"),
        limits=LimitsSection(offline_after=args.offline_after),
        buses=list(buses),
        meters=meters,
        commands=commands,
    )


@dataclass
class Scenario:
    """One scenario's raw results."""

    name: str
    commands: int = 0
    seconds: float = 0.0
    cpu: float = 0.0
    states: Counter[str] = field(default_factory=Counter)
    to_verified: list[float] = field(default_factory=list)  # delivery -> verified, queueing included
    service: list[float] = field(default_factory=list)  # worker start -> verified
    control: list[float] = field(default_factory=list)  # first control frame -> verified
    publish_delay: list[float] = field(default_factory=list)  # terminal ack persisted -> published
    retries: int = 0
    no_answer: int = 0
    bus_sent: int = 0
    bus_timeouts: int = 0
    bus_link_down: int = 0
    relay_mismatches: int = 0
    trails: list[str] = field(default_factory=list)  # the ack trail of every execution not verified
    held: int = 0
    internal_errors: int = 0

    @property
    def verified_fraction(self) -> float:
        return self.states["verified"] / max(self.commands, 1)


class Harness:
    """A CommandService over the fleet, fed signed envelopes, collecting its acks."""

    def __init__(self, config: Config, fleet: Fleet, key: SigningKey) -> None:
        self.key = key
        self.acks: list[tuple[float, Ack]] = []
        self.delivered: dict[str, float] = {}
        self.terminal: dict[tuple[str, str], Ack] = {}
        self.changed = asyncio.Event()
        self.service = CommandService(config, fleet.meters, fleet.buses, self.publish, ACK_TOPIC)
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._seq = itertools.count(int(time.time() * 1000))

    async def publish(self, topic: str, payload: bytes) -> bool:
        ack = decode_ack(payload)
        self.acks.append((time.time(), ack))
        if ack.meter is not None and ack.command is not None and ack.state in TERMINAL_STATES:
            self.terminal.setdefault((ack.command, ack.meter), ack)
            self.changed.set()
        return True

    async def start(self) -> None:
        self.task = asyncio.create_task(self.service.run(self.stop))
        await asyncio.sleep(0)

    async def halt(self) -> None:
        self.stop.set()
        if self.task is not None:
            await asyncio.wait_for(self.task, 30)

    def envelope(self, action: str, meter: str) -> CommandEnvelope:
        now = time.time()
        env = CommandEnvelope(
            v=1,
            id=f"bench-{action}-{next(self._ids)}",
            gateway=GW,
            meters=[meter],
            action=action,  # type: ignore[arg-type]
            params=None,
            issued_at=now,
            not_before=now - 30,
            expires_at=now + EXPIRES,
            seq=next(self._seq),
            key_id=self.key.key_id,
            alg=self.key.alg,
        )
        return sign_envelope(env, self.key)

    async def deliver(self, env: CommandEnvelope) -> None:
        payload = encode_envelope(env)
        now = time.time()
        self.delivered[env.id] = now
        await self.service.on_message(InboundMessage(COMMAND_TOPIC, payload, False, 1, now))
        await asyncio.sleep(0)  # an MQTT client yields between messages

    async def wait(self, pending: set[tuple[str, str]], within: float) -> None:
        end = time.monotonic() + within
        while not pending <= self.terminal.keys():
            if self.task is not None and self.task.done():  # the service died: say why, do not wait
                self.task.result()
                raise RuntimeError("the command service stopped before the executions finished")
            left = end - time.monotonic()
            if left <= 0:
                missing = sorted(pending - self.terminal.keys())[:5]
                raise RuntimeError(f"{len(pending - self.terminal.keys())} executions not terminal, e.g. {missing}")
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(left, 1.0))


def analyse(h: Harness, sc: Scenario, expected: dict[str, str]) -> None:
    """Fill ``sc`` from the acks: terminal states and the three latencies."""
    by_exe: dict[tuple[str, str], dict[int, Ack]] = {}
    published: dict[tuple[str, str, int], float] = {}
    for at, ack in h.acks:
        if ack.command is None or ack.meter is None:
            continue
        by_exe.setdefault((ack.command, ack.meter), {}).setdefault(ack.seq, ack)
        published.setdefault((ack.command, ack.meter, ack.seq), at)
    finished_at: dict[str, list[float]] = {}
    latest: dict[str, float] = {}
    rows = []
    for (command, meter), acks in by_exe.items():
        ordered = [acks[s] for s in sorted(acks)]
        final = next((a for a in ordered if a.state in TERMINAL_STATES), None)
        if final is None:
            sc.states["(not terminal)"] += 1
            continue
        sc.states[final.state] += 1
        if final.state != "verified":
            t0 = ordered[0].at
            steps = "; ".join(
                f"+{a.at - t0:.2f}s {a.state}" + (f" ({a.reason or a.detail})" if a.reason or a.detail else "")
                for a in ordered
            )
            sc.trails.append(f"{command} {meter}: {steps}")
        queued = next((a.at for a in ordered if a.state == "queued"), None)
        sent = next((a.at for a in ordered if a.state == "sent"), None)
        rows.append((command, meter, final, queued, sent))
        finished_at.setdefault(meter, []).append(final.at)
        sc.publish_delay.append(published[(command, meter, final.seq)] - final.at)
        if final.state == "verified" and final.relay is not None and final.at >= latest.get(meter, 0.0):
            latest[meter] = final.at
            expected[meter] = final.relay
    for times in finished_at.values():
        times.sort()
    for command, meter, final, queued, sent in rows:
        if final.state != "verified":
            continue
        sc.to_verified.append(final.at - h.delivered[command])
        if queued is not None:
            earlier = [t for t in finished_at[meter] if t < final.at]
            sc.service.append(final.at - max(queued, earlier[-1] if earlier else queued))
        if sent is not None:
            sc.control.append(final.at - sent)
    sc.commands = len(h.delivered)
    stats = h.service.stats
    sc.retries, sc.no_answer, sc.held, sc.internal_errors = (
        stats.retries,
        stats.no_answer,
        stats.held_now,
        stats.internal_errors,
    )


@dataclass
class Rigging:
    sim: Simulator
    config: Config
    fleet: Fleet
    key: SigningKey


async def run_scenario(
    rig: Rigging, name: str, work: list[list[tuple[str, str]]], *, one_at_a_time: bool, within: float
) -> Scenario:
    """``work``: waves of (action, meter id); a wave is delivered at once, the next once it is done."""
    sc = Scenario(name)
    state = Path(tempfile.mkdtemp(prefix=f"bench-cmd-{name}-", dir="/var/tmp"))
    config = with_state_dir(rig.config, state)
    fleet = rig.fleet
    h = Harness(config, fleet, rig.key)
    buses0 = [(b.counters.sent, b.counters.timeouts, b.counters.link_down) for b in fleet.buses.values()]
    try:
        await h.start()
        cpu0, t0 = time.process_time(), time.perf_counter()
        for wave in work:
            items = [[item] for item in wave] if one_at_a_time else [wave]
            for group in items:
                pending = set()
                for action, meter in group:
                    env = h.envelope(action, meter)
                    await h.deliver(env)
                    pending.add((env.id, meter))
                await h.wait(pending, within)
        sc.seconds, sc.cpu = time.perf_counter() - t0, time.process_time() - cpu0
        await asyncio.sleep(0.05)  # the last acks' publication
        expected: dict[str, str] = {}
        analyse(h, sc, expected)
    finally:
        try:
            await h.halt()
        finally:
            shutil.rmtree(state, ignore_errors=True)
    for (sent, timeouts, down), bus in zip(buses0, fleet.buses.values(), strict=True):
        sc.bus_sent += bus.counters.sent - sent
        sc.bus_timeouts += bus.counters.timeouts - timeouts
        sc.bus_link_down += bus.counters.link_down - down
    actual = await relay_states(rig.sim, [m[1:] for m in expected])
    sc.relay_mismatches = sum(actual[m[1:]] != want for m, want in expected.items())
    return sc


def with_state_dir(config: Config, state: Path) -> Config:
    return msgspec.structs.replace(config, gateway=msgspec.structs.replace(config.gateway, state_dir=str(state)))


def loaded_work(meters: list[str], per_meter: int, mode: str) -> list[list[tuple[str, str]]]:
    waves = [[("disconnect" if k % 2 == 0 else "reconnect", m) for m in meters] for k in range(2 * per_meter)]
    return waves if mode == "waves" else [[item for wave in waves for item in wave]]


async def run_all(args: argparse.Namespace, sim: Simulator) -> tuple[list[Scenario], list[Scenario]]:
    key = SigningKey.ed25519("bench-ops", Ed25519PrivateKey.generate())
    base_dir = Path(tempfile.mkdtemp(prefix="bench-cmd-", dir="/var/tmp"))
    config = gateway_config(sim, base_dir, args, key)
    limits = config.limits  # the health book as gateway/daemon/app.py builds it
    fleet = Fleet(
        HealthBook(
            HealthPolicy(
                degraded_after=limits.degraded_after,
                offline_after=limits.offline_after,
                probe_interval=float(limits.offline_probe_interval),
            )
        )
    )
    fleet.build(config)
    await fleet.open()
    meters = sorted(fleet.meters)
    baseline_work = [[("disconnect", m)] for m in meters] + [[("reconnect", m)] for m in meters]
    work = loaded_work(meters, args.per_meter, args.mode)
    rig = Rigging(sim, config, fleet, key)
    baseline: list[Scenario] = []
    loaded: list[Scenario] = []
    profile = cProfile.Profile() if args.profile else None
    try:
        for run in range(args.runs):
            await set_faults(sim, 0.0, 0.0)
            baseline.append(await run_scenario(rig, "baseline", baseline_work, one_at_a_time=True, within=120))
            print(f"run {run + 1}: baseline {summary(baseline[-1])}", flush=True)
            await set_faults(sim, args.drop, args.corrupt)
            if profile is not None:
                profile.enable()
            loaded.append(await run_scenario(rig, "loaded", work, one_at_a_time=False, within=args.timeout))
            if profile is not None:
                profile.disable()
            print(f"run {run + 1}: loaded   {summary(loaded[-1])}", flush=True)
            for trail in loaded[-1].trails:
                print(f"  not verified: {trail}", flush=True)
    finally:
        await set_faults(sim, 0.0, 0.0)
        await fleet.close()
        shutil.rmtree(base_dir, ignore_errors=True)
    if profile is not None:
        profile.dump_stats(args.profile)
    return baseline, loaded


# -- reporting -------------------------------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:,.0f}"


def summary(sc: Scenario) -> str:
    states = ", ".join(f"{k} {v}" for k, v in sorted(sc.states.items()))
    return (
        f"{sc.commands} commands in {sc.seconds:.1f} s: {states}; verified {sc.verified_fraction:.2%}; "
        f"to-verified p50/p99/max {ms(pct(sc.to_verified, 50))}/{ms(pct(sc.to_verified, 99))}/"
        f"{ms(max(sc.to_verified, default=math.nan))} ms; retries {sc.retries}, no-answer {sc.no_answer}, "
        f"bus timeouts {sc.bus_timeouts}/{sc.bus_sent} frames, link down {sc.bus_link_down}; "
        f"relay mismatches {sc.relay_mismatches}"
    )


def report(args: argparse.Namespace, baseline: list[Scenario], loaded: list[Scenario]) -> bool:
    med = statistics.median
    meters = args.buses * args.meters_per_bus
    print()
    print(
        f"commands: {meters} DL/T 645-2007 meters on {args.buses} TCP links ({args.meters_per_bus}/link), meter "
        f"turnaround {args.turnaround * 1000:.0f} ms, reply_timeout {args.reply_timeout:g} s, retry {args.retry}, "
        f"verify_window {args.verify_window:g} s, offline_after {args.offline_after}, reconnect {args.reconnect}; "
        f"Python {platform.python_version()}, {os.cpu_count()} cpus, median of {args.runs} runs"
    )
    print(
        f"loaded: {meters * args.per_meter} disconnects + {meters * args.per_meter} reconnects, {args.mode}, "
        f"faults drop_request {args.drop:.0%} + drop_reply {args.drop:.0%} + corrupt_byte {args.corrupt:.0%}; "
        f"baseline: {2 * meters} commands one at a time, no faults"
    )

    def row(name: str, fn: Any, fmt: Any = str) -> tuple[str, str, str]:
        return (name, fmt(med(fn(s) for s in baseline)), fmt(med(fn(s) for s in loaded)))

    def f0(x: float) -> str:
        return f"{x:,.0f}"

    states = sorted({k for s in [*baseline, *loaded] for k in s.states})
    rows = [
        row("commands (executions)", lambda s: s.commands, f0),
        row("verified fraction", lambda s: s.verified_fraction, lambda x: f"{x:.2%}"),
        *(row(f"  terminal: {k}", lambda s, k=k: s.states[k], f0) for k in states),
        row("command->verified p50 ms", lambda s: pct(s.to_verified, 50), ms),
        row("command->verified p99 ms", lambda s: pct(s.to_verified, 99), ms),
        row("command->verified max ms", lambda s: max(s.to_verified, default=math.nan), ms),
        row("service (worker start->verified) p50 ms", lambda s: pct(s.service, 50), ms),
        row("service (worker start->verified) p99 ms", lambda s: pct(s.service, 99), ms),
        row("control frame->verified p50 ms", lambda s: pct(s.control, 50), ms),
        row("control frame->verified p99 ms", lambda s: pct(s.control, 99), ms),
        row("terminal ack persisted->published p99 ms", lambda s: pct(s.publish_delay, 99), ms),
        row("control retries", lambda s: s.retries, f0),
        row("control attempts without answer", lambda s: s.no_answer, f0),
        row("bus frames sent", lambda s: s.bus_sent, f0),
        row("bus reply timeouts", lambda s: s.bus_timeouts, f0),
        row("bus transactions failed, link down", lambda s: s.bus_link_down, f0),
        row("meters held by the guard", lambda s: s.held, f0),
        row("relay state != last verified ack", lambda s: s.relay_mismatches, f0),
        row("wall seconds", lambda s: s.seconds, lambda x: f"{x:.1f}"),
        row("CPU s (this process)", lambda s: s.cpu, lambda x: f"{x:.1f}"),
    ]
    print(f"{'figure (median of runs)':<44}{'baseline':>12}{'loaded':>12}")
    for name, a, b in rows:
        print(f"{name:<44}{a:>12}{b:>12}")
    fraction = med(s.verified_fraction for s in loaded)
    base_p99 = med(pct(s.to_verified, 99) for s in baseline)
    limit = LATENCY_GOAL + args.turnaround
    ok_fraction = fraction >= VERIFIED_GOAL
    ok_latency = base_p99 <= limit
    runs = ", ".join(f"{s.verified_fraction:.2%}" for s in loaded)
    verdict = "met" if ok_fraction else "NOT met"
    print(f"goal verified >= {VERIFIED_GOAL:.1%} under faults: {fraction:.2%} (runs: {runs}) -> {verdict}")
    runs = ", ".join(ms(pct(s.to_verified, 99)) for s in baseline)
    print(
        f"goal p99 <= {ms(limit)} ms (200 ms + {ms(args.turnaround)} ms turnaround), unloaded link: {ms(base_p99)} ms "
        f"(runs: {runs}) -> {'met' if ok_latency else 'NOT met'}"
    )
    return ok_fraction and ok_latency


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench commands", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--buses", type=int, default=10)
    parser.add_argument("--meters-per-bus", type=int, default=10)
    parser.add_argument("--per-meter", type=int, default=10, help="disconnects (and reconnects) per meter")
    parser.add_argument("--mode", choices=("waves", "burst"), default="waves")
    parser.add_argument("--reconnect", choices=("close_permit", "direct_close"), default="close_permit")
    parser.add_argument("--turnaround", type=float, default=0.02, help="seconds each meter takes to answer")
    parser.add_argument("--reply-timeout", type=float, default=1.0, help="the bus reply_timeout (config default 1 s)")
    parser.add_argument("--retry", type=int, default=3, help="[commands] retry: control attempts (default 3)")
    parser.add_argument("--verify-window", type=float, default=30.0, help="[commands] verify_window (default 30 s)")
    parser.add_argument(
        "--offline-after", type=int, default=3, help="[limits] offline_after: failed transactions (default 3)"
    )
    parser.add_argument("--drop", type=float, default=0.05, help="drop probability per frame, each direction")
    parser.add_argument("--corrupt", type=float, default=0.01, help="corrupt probability per reply")
    parser.add_argument("--timeout", type=float, default=600.0, help="give up on a wave after this many seconds")
    parser.add_argument("--profile", metavar="FILE", help="write a cProfile of the loaded scenarios to FILE")
    args = parser.parse_args(argv)
    sim = start_simulator(args.buses, args.meters_per_bus, args.turnaround)
    try:
        baseline, loaded = asyncio.run(run_all(args, sim))
    finally:
        sim.stop()
    report(args, baseline, loaded)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

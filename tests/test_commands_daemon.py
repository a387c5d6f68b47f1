"""Remote control end to end with real parts only: `meter-gateway run` as a subprocess with
``[commands] enabled``, a real mosquitto, simulated DL/T 645-2007 meters on real TCP ports (in this
process, so the test can see each meter's relay and every control frame it received), an Ed25519
key made by `meter-gateway ctl keygen`, commands sent by `meter-gateway ctl` subprocesses, the
daemon SIGKILLed mid-command and restarted, and `meter-gateway audit` reading the result.

What docs/mqtt.md and docs/commands.md promise and these tests hold the code to:

* ``ctl disconnect --wait`` exits 0 once the relay was read back open; close permit arms it;
* a crash after a trip frame left: the restart reads the relay first; a meter already open is
  ``verified`` without a second trip, one still closed gets the trip again as attempt 2;
* a crash before any frame reached the meter: the restart runs the command if it has not
  expired, and ends it ``expired`` (nothing sent) if it has;
* the same signed envelope published again after a restart is answered with the stored state
  and never reaches the meter; an old ``seq`` is ``replayed``;
* the audit log lists every transition and its hash chain verifies.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.publish as mqtt_publish
import pytest
import pytest_asyncio

from meter_gateway.gateway.commands.envelope import TERMINAL_STATES, Ack, decode_ack, decode_envelope
from meter_gateway.gateway.uplink.contract import Topics
from meter_gateway.protocols.dlt645 import messages as m
from meter_gateway.protocols.dlt645.remote_control import RemoteCommand
from meter_gateway.simulators.clock import SimClock
from meter_gateway.simulators.dlt645_meter import Dlt645Meter
from meter_gateway.simulators.links import LinkConfig, SimulatedBus
from tests.plugins.broker import Broker, Subscriber
from tests.plugins.ports import free_port
from tests.plugins.simulators import SIM_START

ROOT = Path(__file__).resolve().parents[1]
GW = "gw-cmd"
TOPICS = Topics(GW)
PASSWORD_ENV = {"CMDTEST_METER_PASSWORD": "000000"}  # the simulators' level-2 password


class ScriptedMeter(Dlt645Meter):
    """A simulated meter that records every remote-control (0x1C) frame it receives and can be
    told how to take a trip: ``normal``; ``act_silently`` (the relay opens, the reply is lost);
    ``ignore`` (the frame was garbled on the line: no action, no reply)."""

    def __init__(self, address: str, clock: SimClock) -> None:
        super().__init__(address, clock=clock)
        self.controls: list[RemoteCommand] = []
        self.on_trip: Literal["normal", "act_silently", "ignore"] = "normal"

    def _remote_control(self, req: m.RemoteControlRequest) -> list[Any]:
        self.controls.append(req.command)
        if req.command is RemoteCommand.TRIP and self.on_trip != "normal":
            if self.on_trip == "act_silently":
                super()._remote_control(req)
            return []
        return super()._remote_control(req)

    @property
    def trip_frames(self) -> int:
        return self.controls.count(RemoteCommand.TRIP)


@dataclass
class Line:
    """One simulated RS-485 line behind a TCP port, with one meter on it. Until ``start`` the
    port is held by a bound socket that does not listen: connections to it are refused (the
    line is down) and no other process on the machine can take the port meanwhile."""

    meter_id: str
    meter: ScriptedMeter
    port: int
    bus: SimulatedBus | None = None
    placeholder: socket.socket | None = None

    def hold(self) -> None:
        self.placeholder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.placeholder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.placeholder.bind(("127.0.0.1", 0))
        self.port = self.placeholder.getsockname()[1]

    async def start(self) -> None:
        if self.placeholder is not None:
            self.placeholder.close()
            self.placeholder = None
        self.bus = SimulatedBus([self.meter], LinkConfig(port=self.port))
        await self.bus.start()
        endpoint = self.bus.endpoint
        assert isinstance(endpoint, tuple)
        self.port = endpoint[1]

    async def stop(self) -> None:
        if self.placeholder is not None:
            self.placeholder.close()
        if self.bus is not None:
            await self.bus.stop()
            self.bus = None


def make_line(n: int, clock: SimClock) -> Line:
    return Line(f"flat-{n}", ScriptedMeter(f"{n:012d}", clock), 0)


def config_text(
    state: Path,
    broker: Broker,
    pub_key: Path,
    lines: list[Line],
    release_key: Path | None = None,
    metrics_port: int | None = None,
    **commands: str,
) -> str:
    section = {"verify_window": '"3s"', "retry": "3", **commands}
    buses = meters = ""
    for i, line in enumerate(lines):
        buses += (
            f'\n[[buses]]\nname = "line-{i}"\ntype = "tcp"\nhost = "127.0.0.1"\nport = {line.port}\n'
            f'protocol = "dlt645"\nreply_timeout = "5s"\nattempts = 1\nconnect_timeout = "1s"\n'
        )
        meters += (
            f'\n[[meters]]\nid = "{line.meter_id}"\nbus = "line-{i}"\nprotocol = "dlt645-2007"\n'
            f'address = "{line.meter.address_text}"\nmodel = "dlt645-2007-generic"\n'
            'credentials = { password_level = 2, password_env = "CMDTEST_METER_PASSWORD", operator = "12345678" }\n'
        )
    extra = "".join(f"{k} = {v}\n" for k, v in section.items())
    if release_key is not None:
        extra += f'\n[[commands.keys]]\nid = "supervisor"\nalg = "ed25519"\npublic_key_file = "{release_key}"\n'
        extra += 'roles = ["release"]\n'

    metrics = "enabled = false"
    if metrics_port is not None:
        metrics = f'enabled = true\nhost = "127.0.0.1"\nport = {metrics_port}'
    return f"""
[gateway]
id = "{GW}"
timezone = "Asia/Shanghai"
state_dir = "{state}"

[uplink]
host = "{broker.host}"
port = {broker.port}
keepalive = "10s"

[metrics]
{metrics}

[commands]
enabled = true
{extra}
[[commands.keys]]
id = "ops"
alg = "ed25519"
public_key_file = "{pub_key}"
roles = ["command"]
{buses}{meters}"""


async def cli(*args: str, env: dict[str, str] | None = None, within: float = 60.0) -> tuple[int, str, str]:
    """Run `meter-gateway ARGS...` to completion (while this event loop keeps serving the meters)."""
    proc = await cli_start(*args, env=env)
    out, err = await asyncio.wait_for(proc.communicate(), within)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def cli_start(*args: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "meter_gateway.gateway.cli",
        *args,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def until(cond: Callable[[], bool], within: float, what: str, daemon: Daemon | None = None) -> None:
    end = time.monotonic() + within
    while not cond():
        if daemon is not None:
            daemon.check_alive(what)
        assert time.monotonic() < end, f"timed out after {within} s waiting for {what}"
        await asyncio.sleep(0.02)


@dataclass
class Daemon:
    """`meter-gateway run -c CONFIG` (stderr to a file: a full pipe would block its logging)."""

    config: Path
    log: Path
    acks: Subscriber
    broker: Broker
    proc: asyncio.subprocess.Process | None = None
    lives: int = 0

    async def start(self) -> None:
        self.lives += 1
        with self.log.open("ab") as log:
            log.write(f"--- start {self.lives} ---\n".encode())
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "meter_gateway.gateway.cli",
                "run",
                "-c",
                str(self.config),
                cwd=ROOT,
                env={**os.environ, **PASSWORD_ENV},
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=log,
            )
        await self.wait_subscribed()

    async def wait_subscribed(self, within: float = 20.0) -> None:
        """Clean MQTT sessions lose commands published before the daemon subscribed: probe with
        an unsigned message until its ``rejected`` ack comes back (the ack proves the whole
        inbound and outbound path)."""
        end = time.monotonic() + within
        while True:
            self.check_alive("the command subscription")
            before = len(rejected_probes(self.acks))
            await publish(self.broker, b"readiness probe")
            probe_end = time.monotonic() + 0.5
            while time.monotonic() < probe_end:
                if len(rejected_probes(self.acks)) > before:
                    return
                await asyncio.sleep(0.02)
            assert time.monotonic() < end, f"daemon not answering commands after {within} s:\n{self.log_tail()}"

    def check_alive(self, what: str) -> None:
        if self.proc is not None and self.proc.returncode is not None:
            raise AssertionError(f"daemon exited {self.proc.returncode} while waiting for {what}:\n{self.log_tail()}")

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()  # SIGKILL: no shutdown code runs, like a power cut
        await self.proc.wait()

    async def stop(self) -> int:
        """SIGTERM and wait for a clean exit; the exit code."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(self.proc.wait(), 20)
        assert self.proc.returncode is not None
        return self.proc.returncode


async def publish(broker: Broker, payload: bytes) -> None:
    """Publish on the command topic like a head-end (QoS 1, not retained)."""
    await asyncio.to_thread(
        mqtt_publish.single, TOPICS.commands, payload, qos=1, hostname=broker.host, port=broker.port
    )


def acks_of(sub: Subscriber) -> list[Ack]:
    return [decode_ack(r.payload) for r in sub.snapshot(TOPICS.acks)]


def rejected_probes(sub: Subscriber) -> list[Ack]:
    return [a for a in acks_of(sub) if a.command is None and a.reason == "malformed"]


def history(sub: Subscriber, command: str, meter: str) -> list[Ack]:
    """The acks of one meter of a command, deduplicated on seq (QoS 1 and restarts re-send)."""
    seen: dict[int, Ack] = {}
    for a in acks_of(sub):
        if a.command == command and a.meter == meter:
            seen.setdefault(a.seq, a)
    return [seen[s] for s in sorted(seen)]


def final(sub: Subscriber, command: str, meter: str) -> Ack | None:
    done = [a for a in history(sub, command, meter) if a.state in TERMINAL_STATES]
    return done[-1] if done else None


@dataclass
class Site:
    tmp_path: Path
    broker: Broker
    clock: SimClock
    key: Path
    pub: Path
    lines: list[Line] = field(default_factory=list)
    subs: list[Subscriber] = field(default_factory=list)
    daemons: list[Daemon] = field(default_factory=list)

    def ctl_args(
        self, verb: str, *meters: str, command_id: str | None = None, key: tuple[Path, str] | None = None, **extra: str
    ) -> list[str]:
        key_file, key_id = key or (self.key, "ops")
        args = ["ctl", verb, *meters, "--gateway", GW, "--key", str(key_file), "--key-id", key_id]
        args += ["--broker", f"{self.broker.host}:{self.broker.port}"]
        if command_id is not None:
            args += ["--id", command_id]
        for k, v in extra.items():  # value "" for a flag without a value (wait="")
            args += [f"--{k.replace('_', '-')}", v] if v else [f"--{k.replace('_', '-')}"]
        return args

    def daemon(
        self, lines: list[Line], release_key: Path | None = None, metrics_port: int | None = None, **commands: str
    ) -> Daemon:
        self.lines += lines
        config = self.tmp_path / "gateway.toml"
        state = self.tmp_path / "state"
        config.write_text(config_text(state, self.broker, self.pub, lines, release_key, metrics_port, **commands))
        sub = Subscriber(self.broker, [TOPICS.acks, TOPICS.commands]).start()
        self.subs.append(sub)
        daemon = Daemon(config, self.tmp_path / "daemon.log", sub, self.broker)
        self.daemons.append(daemon)
        return daemon


@pytest_asyncio.fixture
async def site(tmp_path: Path, mosquitto: Broker) -> AsyncIterator[Site]:
    """A broker, a key pair from `ctl keygen`, and cleanup of daemons, meters and subscribers."""
    code, out, err = await cli("ctl", "keygen", "--key-id", "ops", "--out", str(tmp_path / "keys"))
    assert code == 0, err
    assert "[[commands.keys]]" in out  # the config snippet for the gateway
    key, pub = tmp_path / "keys" / "ops.key", tmp_path / "keys" / "ops.pub"
    assert key.stat().st_mode & 0o077 == 0  # the private key is not readable by others
    s = Site(tmp_path, mosquitto, SimClock(SIM_START, 1.0), key, pub)
    try:
        yield s
    finally:
        for d in s.daemons:
            if d.proc is not None and d.proc.returncode is None:
                await d.kill()
        for line in s.lines:
            await line.stop()
        for sub in s.subs:
            sub.stop()


def states_printed(out: str, meter: str) -> list[str]:
    """The state column of `ctl --wait` lines for one meter (time, command, meter, state, ...)."""
    return [cols[3] for cols in (line.split("  ") for line in out.splitlines()) if len(cols) > 3 and cols[2] == meter]


# -- (a) ctl against the daemon; (d) replay after a restart; (e) the audit log ------------------------


@pytest.mark.asyncio
async def test_ctl_disconnect_reconnect_status_replay_and_audit(site: Site) -> None:
    line = make_line(101, site.clock)
    await line.start()
    daemon = site.daemon([line])
    await daemon.start()
    meter = line.meter

    code, out, err = await cli(*site.ctl_args("disconnect", line.meter_id, command_id="cut-1", wait="", timeout="30"))
    assert code == 0, out + err
    assert states_printed(out, line.meter_id) == ["queued", "sent", "meter_acknowledged", "verified"]
    assert "relay=open" in out.splitlines()[-1]
    assert not meter.relay_closed
    assert meter.trip_frames == 1

    code, out, err = await cli(*site.ctl_args("reconnect", line.meter_id, wait="", timeout="30"))
    assert code == 0, out + err
    assert "verified  relay=armed" in out  # close permit: armed, closes on the customer's button
    assert meter.relay_armed
    assert not meter.relay_closed
    assert meter.controls[-1] is RemoteCommand.CLOSE_PERMIT

    code, out, err = await cli(*site.ctl_args("status", line.meter_id, wait="", timeout="30"))
    assert code == 0, out + err
    assert "verified  relay=armed" in out

    # the exact signed envelope ctl published, as the broker delivered it
    (cut,) = [r.payload for r in daemon.acks.snapshot(TOPICS.commands) if b'"id":"cut-1"' in r.payload]
    assert decode_envelope(cut).action == "disconnect"
    stored = history(daemon.acks, "cut-1", line.meter_id)

    assert await daemon.stop() == 0
    await daemon.start()

    # (d) replayed after the restart: the current state again (same seq), not a second trip
    def cut_acks() -> list[Ack]:
        return [a for a in acks_of(daemon.acks) if a.command == "cut-1"]

    before = len(cut_acks())
    await publish(site.broker, cut)
    await until(lambda: len(cut_acks()) >= before + 2, 10, "the re-sent state", daemon)
    resent = cut_acks()[before:]
    assert {(a.meter, a.state) for a in resent} == {(None, "accepted"), (line.meter_id, "verified")}
    assert next(a for a in resent if a.meter is not None).seq == stored[-1].seq  # the same ack, not a new one
    # a new command id with an old seq is refused as a replay
    code, out, err = await cli(*site.ctl_args("disconnect", line.meter_id, command_id="old-seq", seq="1", wait=""))
    assert code == 1, out + err
    assert "rejected  reason=replayed" in out
    await asyncio.sleep(0.3)  # time for a wrongly executed command to reach the meter
    assert meter.trip_frames == 1
    assert meter.relay_armed

    # (e) the audit log, through the CLI, while the daemon runs
    env = PASSWORD_ENV  # the CLI loads the gateway config, whose meter secrets must resolve
    code, out, err = await cli("audit", "-c", str(daemon.config), "--command", "cut-1", env=env)
    assert code == 0, err
    # seq, time, actor, command, meter, action, state, detail
    rows = [re.split(r" {2,}", r.strip()) for r in out.splitlines()]
    assert [r[6] for r in rows if r[4] == line.meter_id] == ["queued", "sent", "meter_acknowledged", "verified"]
    assert {r[2] for r in rows if r[6] != "duplicate"} == {"ops"}  # actor: the key id
    assert any(r[6] == "duplicate" for r in rows)  # the replay is on record too
    assert "000000" not in out  # the meter password never reaches the audit log
    code, out, err = await cli("audit", "-c", str(daemon.config), "--verify", env=env)
    assert code == 0, out + err
    assert "intact" in out
    assert await daemon.stop() == 0


# -- (b) SIGKILL after the trip frame was written --------------------------------------------------------


@pytest.mark.asyncio
async def test_sigkill_after_the_trip_frame_resumes_by_reading_the_relay(site: Site) -> None:
    opened, missed = make_line(201, site.clock), make_line(202, site.clock)
    opened.meter.on_trip = "act_silently"  # the trip worked; its reply is lost
    missed.meter.on_trip = "ignore"  # the trip never took effect
    for line in (opened, missed):
        await line.start()
    daemon = site.daemon([opened, missed])
    await daemon.start()

    # the head-end's ctl keeps waiting across the gateway's crash and restart
    ctl = await cli_start(
        *site.ctl_args("disconnect", opened.meter_id, missed.meter_id, command_id="cut-b", wait="", timeout="40")
    )
    await until(lambda: opened.meter.trip_frames == 1 and missed.meter.trip_frames == 1, 15, "both trips", daemon)
    await daemon.kill()  # the gateway is waiting for the replies (reply_timeout 5 s): state "sent"
    assert not opened.meter.relay_closed
    assert missed.meter.relay_closed
    opened.meter.on_trip = missed.meter.on_trip = "normal"

    await daemon.start()
    out, err = await asyncio.wait_for(ctl.communicate(), 40)
    text = out.decode()
    assert ctl.returncode == 0, text + err.decode()

    done = final(daemon.acks, "cut-b", opened.meter_id)
    assert done is not None
    assert (done.state, done.relay) == ("verified", "open")
    assert "found after a restart" in (done.detail or "")
    assert opened.meter.trip_frames == 1  # the relay was read first: no second trip

    steps = history(daemon.acks, "cut-b", missed.meter_id)
    assert [a.state for a in steps] == ["queued", "sent", "sent", "meter_acknowledged", "verified"]
    assert steps[2].detail == "attempt 2"  # the re-send is counted as a retry
    assert missed.meter.trip_frames == 2  # sent again only because the relay was still closed
    assert not missed.meter.relay_closed
    assert "found after a restart" in text
    assert await daemon.stop() == 0


# -- (c) SIGKILL before any frame reached the meter ------------------------------------------------------


@pytest.mark.asyncio
async def test_sigkill_before_the_frame_runs_or_expires_after_restart(site: Site) -> None:
    # nobody listens on the lines' ports yet: the meters are unreachable
    runs, expires = make_line(301, site.clock), make_line(302, site.clock)
    for line in (runs, expires):
        line.hold()
    daemon = site.daemon([runs, expires], retry="5")
    await daemon.start()

    code, out, err = await cli(*site.ctl_args("disconnect", runs.meter_id, command_id="cut-late", expires="120"))
    assert code == 0, out + err
    short = time.time() + 4.0
    code, out, err = await cli(*site.ctl_args("disconnect", expires.meter_id, command_id="cut-short", expires="4"))
    assert code == 0, out + err

    def tried(command: str, meter: str) -> bool:
        return "no_answer" in [a.state for a in history(daemon.acks, command, meter)]

    await until(lambda: tried("cut-late", runs.meter_id) and tried("cut-short", expires.meter_id), 5, "attempts")
    await daemon.kill()
    for command, meter in (("cut-late", runs.meter_id), ("cut-short", expires.meter_id)):
        assert final(daemon.acks, command, meter) is None, history(daemon.acks, command, meter)

    # the lines come back; cut-short expires while the gateway is down
    for line in (runs, expires):
        await line.start()
    await until(lambda: time.time() > short + 0.2, 10, "cut-short to expire")
    await daemon.start()
    await until(
        lambda: (
            final(daemon.acks, "cut-late", runs.meter_id) is not None
            and final(daemon.acks, "cut-short", expires.meter_id) is not None
        ),
        15,
        "both commands final",
        daemon,
    )
    ran = final(daemon.acks, "cut-late", runs.meter_id)
    assert ran is not None
    assert (ran.state, ran.relay) == ("verified", "open")
    steps = [a.state for a in history(daemon.acks, "cut-late", runs.meter_id)]
    assert steps[-3:] == ["sent", "meter_acknowledged", "verified"]
    sent = steps.count("sent")
    assert sent >= 2  # attempts before the crash, then one after the restart, numbered on
    assert history(daemon.acks, "cut-late", runs.meter_id)[-3].detail == f"attempt {sent}"
    assert runs.meter.trip_frames == 1
    assert not runs.meter.relay_closed

    gone = final(daemon.acks, "cut-short", expires.meter_id)
    assert gone is not None
    assert (gone.state, gone.relay) == ("expired", "closed")  # the relay was read, nothing was sent
    assert [a.state for a in history(daemon.acks, "cut-short", expires.meter_id)][-2:] == ["no_answer", "expired"]
    assert "not sent again" in (gone.detail or "")
    assert expires.meter.controls == []
    assert expires.meter.relay_closed
    assert await daemon.stop() == 0


# -- the mass-disconnect guard and a release by a second key --------------------------------------------


@pytest.mark.asyncio
async def test_mass_disconnect_guard_holds_warns_once_and_release_runs(site: Site) -> None:
    keys = site.tmp_path / "keys"
    code, _, err = await cli("ctl", "keygen", "--key-id", "supervisor", "--role", "release", "--out", str(keys))
    assert code == 0, err
    supervisor = (keys / "supervisor.key", "supervisor")
    lines = [make_line(n, site.clock) for n in (401, 402, 403)]
    for line in lines:
        await line.start()
    metrics_port = free_port()
    daemon = site.daemon(lines, keys / "supervisor.pub", metrics_port, max_disconnects="1", guard_window='"1h"')
    await daemon.start()
    ids = [line.meter_id for line in lines]

    code, out, err = await cli(*site.ctl_args("disconnect", *ids, command_id="mass-1"))
    assert code == 0, out + err
    await until(lambda: all(final(daemon.acks, "mass-1", i) or held(daemon, i) for i in ids), 10, "decisions", daemon)
    assert final(daemon.acks, "mass-1", ids[0]) is not None
    assert [held(daemon, i) for i in ids] == [False, True, True]
    assert [line.meter.trip_frames for line in lines] == [1, 0, 0]
    # a second disconnect while holding: held too, and no second warning
    code, out, err = await cli(*site.ctl_args("disconnect", ids[2], command_id="mass-2"))
    assert code == 0, out + err
    await until(lambda: "mass_disconnect_guard" in reasons(daemon, "mass-2", ids[2]), 10, "mass-2 held", daemon)
    warnings = [x for x in daemon.log.read_text().splitlines() if "event=mass_disconnect_guard_tripped" in x]
    assert len(warnings) == 1, warnings
    assert "level=warning" in warnings[0]
    assert "command=mass-1" in warnings[0]
    assert "held=2" in warnings[0]
    # the alarm an operator's Prometheus sees
    alarm = {
        "meter_gateway_commands_held": 3.0,
        "meter_gateway_mass_disconnect_guard_trips_total": 1.0,
        'meter_gateway_command_results_total{action="disconnect",result="verified"}': 1.0,
    }
    await until(lambda: scrape(metrics_port, alarm) == alarm, 10, "guard alarm on /metrics", daemon)

    # the ops key cannot release; the supervisor's key can, and --wait follows the release itself
    code, out, err = await cli(*site.ctl_args("release", "mass-1", wait="", timeout="20"))
    assert code == 1, out + err
    assert "reason=key_not_allowed" in out
    code, out, err = await cli(*site.ctl_args("release", "mass-1", key=supervisor, wait="", timeout="20"))
    assert code == 0, out + err
    await until(lambda: final(daemon.acks, "mass-1", ids[2]) is not None, 10, "released meters done", daemon)
    for i in ids[1:]:
        done = final(daemon.acks, "mass-1", i)
        assert done is not None
        assert (done.state, done.relay) == ("verified", "open")
    assert [line.meter.trip_frames for line in lines] == [1, 1, 1]
    assert held(daemon, ids[2], "mass-2")  # not named by the release: still held
    assert await daemon.stop() == 0


def scrape(port: int, wanted: dict[str, float]) -> dict[str, float]:
    """The values of the ``wanted`` series on the daemon's /metrics (missing ones left out)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
        text = resp.read().decode()
    found = {}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name in wanted:
            found[name] = float(value)
    return found


def held(daemon: Daemon, meter: str, command: str = "mass-1") -> bool:
    steps = history(daemon.acks, command, meter)
    return bool(steps) and steps[-1].state == "held"


def reasons(daemon: Daemon, command: str, meter: str) -> list[str | None]:
    return [a.reason for a in history(daemon.acks, command, meter)]

"""The command executor against simulated meters: DL/T 645 over real TCP (sim_bus), Modbus over
the pymodbus simulator, real SQLite store and audit files. Acks are collected from the service's
``publish`` callable (the MQTT path itself is tested in test_command_service.py)."""

from __future__ import annotations

import asyncio
import datetime
import itertools
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meter_gateway.drivers.backoff import BackoffPolicy
from meter_gateway.drivers.bus import Bus, BusSettings
from meter_gateway.drivers.dlt645_driver import Dlt645Driver
from meter_gateway.drivers.health import HealthBook, HealthPolicy, MeterState
from meter_gateway.drivers.meter_models import Dlt645Model, load_model
from meter_gateway.drivers.modbus import ModbusLink, ModbusMeter
from meter_gateway.drivers.reading import Reading
from meter_gateway.drivers.tcp_link import TcpLink
from meter_gateway.drivers.transport import TcpSettings
from meter_gateway.gateway.commands.auth import SigningKey, sign_envelope
from meter_gateway.gateway.commands.envelope import (
    TERMINAL_STATES,
    Ack,
    CommandEnvelope,
    Params,
    decode_ack,
    encode_envelope,
)
from meter_gateway.gateway.commands.service import CommandService
from meter_gateway.gateway.commands.states import CommandEvent
from meter_gateway.gateway.config import (
    CommandKeyConfig,
    CommandsSection,
    Config,
    Credentials,
    Duration,
    GatewaySection,
    Meter,
    Secret,
    UplinkSection,
)
from meter_gateway.gateway.daemon.meters import MeterRuntime
from meter_gateway.gateway.store.audit import AuditLog
from meter_gateway.gateway.store.commands import CommandStore, MeterPlan, Transition
from meter_gateway.gateway.uplink.session import InboundMessage
from meter_gateway.protocols.dlt645 import messages as m
from meter_gateway.protocols.dlt645.edition import Edition
from meter_gateway.protocols.dlt645.frame import Frame
from meter_gateway.protocols.dlt645.remote_control import RemoteCommand
from meter_gateway.simulators.clock import SimClock
from meter_gateway.simulators.dlt645_meter import Dlt645Meter
from meter_gateway.simulators.faults import Faults
from meter_gateway.simulators.links import LinkConfig, SimulatedBus
from meter_gateway.simulators.modbus_meter import serve_modbus
from tests.plugins.simulators import SIM_START, SimBusFactory, SimBusHandle

GW = "gw-1"
TZ = datetime.timezone(datetime.timedelta(hours=8))
QUICK = BackoffPolicy(initial=0.01, maximum=0.02)
OPS = SigningKey.ed25519("ops", Ed25519PrivateKey.generate())
SUPERVISOR = SigningKey.ed25519("supervisor", Ed25519PrivateKey.generate())
_seq = itertools.count(int(time.time() * 1000))
_ids = itertools.count(1)


def dlt_model() -> Dlt645Model:
    model = load_model("dlt645-2007-generic")
    assert isinstance(model, Dlt645Model)
    return model


def key_config(key: SigningKey, roles: list[str]) -> CommandKeyConfig:
    vk = key.verify_key(roles)
    return CommandKeyConfig(id=key.key_id, alg="ed25519", roles=roles, public_key=vk.public_key)  # type: ignore[arg-type]


def make_config(tmp_path: Path, meters: Sequence[Meter], **commands: Any) -> Config:
    section = {
        "enabled": True,
        "keys": [key_config(OPS, ["command"]), key_config(SUPERVISOR, ["release"])],
        "verify_window": Duration(0.5),
        "retry": 3,
        **commands,
    }
    return Config(
        gateway=GatewaySection(id=GW, state_dir=str(tmp_path)),
        uplink=UplinkSection(host="127.0.0.1"),
        meters=list(meters),
        commands=CommandsSection(**section),
    )


def envelope(
    action: str,
    meters: Sequence[str],
    *,
    key: SigningKey = OPS,
    now: float | None = None,
    expires: float = 60.0,
    command_id: str | None = None,
    seq: int | None = None,
    params: Params | None = None,
    gateway: str = GW,
) -> CommandEnvelope:
    t = time.time() if now is None else now
    env = CommandEnvelope(
        v=1,
        id=command_id or f"cmd-{next(_ids)}-{int(t * 1000)}",
        gateway=gateway,
        meters=list(meters),
        action=action,  # type: ignore[arg-type]
        params=params,
        issued_at=t,
        not_before=t - 30,
        expires_at=t + expires,
        seq=next(_seq) if seq is None else seq,
        key_id=key.key_id,
        alg=key.alg,
    )
    return sign_envelope(env, key)


class Clock:
    """The gateway clock of a test: real time plus an offset the test moves."""

    def __init__(self) -> None:
        self.offset = 0.0
        self.frozen: float | None = None

    def __call__(self) -> float:
        return self.frozen if self.frozen is not None else time.time() + self.offset


@dataclass
class Rig:
    """A CommandService over real meters, with the acks it publishes collected."""

    tmp_path: Path
    config: Config
    meters: dict[str, MeterRuntime]
    buses: dict[str, Bus]
    clock: Clock = field(default_factory=Clock)
    acks: list[Ack] = field(default_factory=list)
    on_ack: Callable[[Ack], None] | None = None
    publish_ok: bool = True
    readings: list[Reading] = field(default_factory=list)
    service: CommandService | None = None
    stop: asyncio.Event | None = None
    task: asyncio.Task[None] | None = None

    async def publish(self, topic: str, payload: bytes) -> bool:
        assert topic == f"meter-gateway/v1/{GW}/acks"
        if not self.publish_ok:
            return False
        ack = decode_ack(payload)
        self.acks.append(ack)
        if self.on_ack is not None:
            self.on_ack(ack)
        return True

    async def commit(self, readings: list[Reading]) -> None:
        self.readings.extend(readings)

    async def start(self, **overrides: Any) -> CommandService:
        config = (
            msgspec.structs.replace(self.config, commands=msgspec.structs.replace(self.config.commands, **overrides))
            if overrides
            else self.config
        )
        self.config = config
        self.service = CommandService(
            config,
            self.meters,
            self.buses,
            self.publish,
            f"meter-gateway/v1/{GW}/acks",
            clock=self.clock,
            commit_readings=self.commit,
            publish_backoff=BackoffPolicy(initial=0.02, maximum=0.1),
        )
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(self.service.run(self.stop))
        await asyncio.sleep(0)
        return self.service

    async def halt(self) -> None:
        assert self.stop is not None
        assert self.task is not None
        self.stop.set()
        await asyncio.wait_for(self.task, 5)

    async def send(self, env: CommandEnvelope | bytes, *, retained: bool = False) -> None:
        assert self.service is not None
        payload = env if isinstance(env, bytes) else encode_envelope(env)
        msg = InboundMessage(f"meter-gateway/v1/{GW}/commands", payload, retained, 1, time.time())
        await self.service.on_message(msg)

    def of(self, command: str, meter: str | None = None) -> list[Ack]:
        """Acks of a command (and meter), deduplicated on seq, in seq order."""
        seen: dict[int, Ack] = {}
        for a in self.acks:
            if a.command == command and (meter is None or a.meter == meter):
                seen.setdefault(a.seq, a)
        return [seen[s] for s in sorted(seen)]

    async def new_acks(self, before: int, settle: float = 0.05) -> list[Ack]:
        """Acks published after the first ``before`` ones, once they stop coming."""
        end = time.monotonic() + 5
        while len(self.acks) <= before:
            assert time.monotonic() < end, "no new acks"
            await asyncio.sleep(0.01)
        await asyncio.sleep(settle)
        return self.acks[before:]

    def states(self, command: str, meter: str | None = None) -> list[str]:
        return [a.state for a in self.of(command, meter)]

    async def finished(self, command: str, meters: Sequence[str], within: float = 5.0) -> dict[str, Ack]:
        """Wait until every meter of ``command`` has a terminal ack; their terminal acks."""
        end = time.monotonic() + within
        while True:
            final = {a.meter: a for a in self.of(command) if a.meter is not None and a.state in TERMINAL_STATES}
            if all(mid in final for mid in meters):
                return {mid: final[mid] for mid in meters}
            assert time.monotonic() < end, f"{command}: not finished: {[(a.meter, a.state) for a in self.of(command)]}"
            await asyncio.sleep(0.01)


def dlt_meter_config(meter: Dlt645Meter, *, password: str = "000000", **kw: Any) -> Meter:
    return Meter(
        id=f"m{meter.address_text}",
        bus="sim",
        protocol="dlt645-2007",
        address=meter.address_text,
        model="dlt645-2007-generic",
        credentials=Credentials(password=Secret(password), password_level=2, operator="12345678"),
        **kw,
    )


@asynccontextmanager
async def dlt_rig(
    tmp_path: Path,
    handle: SimBusHandle,
    *,
    passwords: dict[str, str] | None = None,
    password: str = "000000",
    reconnect: dict[str, str] | None = None,
    attempts: int = 1,
    health: HealthBook | None = None,
    **commands: Any,
) -> AsyncIterator[Rig]:
    """A rig over every meter of a simulated bus (meter ids ``m<address>``)."""
    host, port = handle.endpoint  # type: ignore[misc]
    link = TcpLink(TcpSettings(host, port, no_reply_limit=0, reconnect=BackoffPolicy(initial=0.05, maximum=0.1)))
    bus = Bus("sim", link, settings=BusSettings(reply_timeout=0.2, attempts=attempts, retry=QUICK), health=health)
    assert await bus.open()
    model = dlt_model()
    configs, runtimes = [], {}
    for meter in handle.meters:
        secret = (passwords or {}).get(meter.address_text, password)
        cfg = dlt_meter_config(
            meter, password=secret, reconnect=(reconnect or {}).get(meter.address_text, "close_permit")
        )
        driver = Dlt645Driver(
            bus, cfg.id, meter.address_text, Edition.DLT645_2007, model, password=secret, operator="12345678", tz=TZ
        )
        configs.append(cfg)
        runtimes[cfg.id] = MeterRuntime(cfg.id, "sim", cfg.protocol, driver)
    rig = Rig(tmp_path, make_config(tmp_path, configs, **commands), runtimes, {"sim": bus})
    try:
        yield rig
    finally:
        if rig.task is not None and not rig.task.done():
            await rig.halt()
        await bus.close()


def mid(meter: Dlt645Meter) -> str:
    return f"m{meter.address_text}"


def audit_of(rig: Rig) -> AuditLog:
    return AuditLog.open(rig.tmp_path / "audit.sqlite", readonly=True)


# -- the happy paths ---------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_disconnect_then_close_permit_then_button(tmp_path: Path, sim_bus: SimBusFactory) -> None:
    handle = await sim_bus(2)
    meter, other = handle.meters
    async with dlt_rig(tmp_path, handle, reconnect={other.address_text: "direct_close"}) as rig:
        await rig.start()
        cut = envelope("disconnect", [mid(meter), mid(other)])
        await rig.send(cut)
        final = await rig.finished(cut.id, [mid(meter), mid(other)])
        assert {a.state for a in final.values()} == {"verified"}
        assert {a.relay for a in final.values()} == {"open"}
        assert not meter.relay_closed
        assert not other.relay_closed
        assert meter.trips[0].operator == "12345678"
        assert rig.states(cut.id, None)[:2] == ["received", "accepted"]
        assert rig.states(cut.id, mid(meter)) == ["queued", "sent", "meter_acknowledged", "verified"]
        seqs = [a.seq for a in rig.of(cut.id)]
        assert seqs == list(range(1, len(seqs) + 1))

        back = envelope("reconnect", [mid(meter), mid(other)])
        await rig.send(back)
        final = await rig.finished(back.id, [mid(meter), mid(other)])
        assert (final[mid(meter)].state, final[mid(meter)].relay) == ("verified", "armed")  # close permit
        assert "armed" in (final[mid(meter)].detail or "")
        assert (final[mid(other)].state, final[mid(other)].relay) == ("verified", "closed")  # direct close per meter
        assert not meter.relay_closed
        assert meter.relay_armed

        assert meter.press_button()
        status = envelope("relay_status", [mid(meter)])
        await rig.send(status)
        final = await rig.finished(status.id, [mid(meter)])
        assert (final[mid(meter)].state, final[mid(meter)].relay) == ("verified", "closed")

        stats = rig.service.stats if rig.service else None
        assert stats is not None
        assert (stats.accepted, stats.verified, stats.executed["disconnect"]) == (3, 5, 2)
    with audit_of(rig) as audit:
        assert audit.verify() is None
        records = audit.query(command=cut.id)
        assert {r.actor for r in records} == {"ops"}
        assert [r.state for r in records if r.meter == mid(meter)][-1] == "verified"
        assert all("000000" not in (r.detail or "") for r in audit.query())  # no password in the audit log


@pytest.mark.asyncio
async def test_keep_power_meter_is_never_tripped(tmp_path: Path, sim_bus: SimBusFactory) -> None:
    handle = await sim_bus(1)
    meter = handle.meters[0]
    async with dlt_rig(tmp_path, handle) as rig:
        await rig.start()
        keep = envelope("keep_power_on", [mid(meter)])
        await rig.send(keep)
        assert (await rig.finished(keep.id, [mid(meter)]))[mid(meter)].state == "verified"
        assert meter.keep_power

        cut = envelope("disconnect", [mid(meter)])
        await rig.send(cut)
        final = (await rig.finished(cut.id, [mid(meter)]))[mid(meter)]
        assert (final.state, final.reason, final.relay) == ("meter_refused", "keep_power", "closed")
        assert rig.states(cut.id, mid(meter)) == ["queued", "meter_refused"]  # no frame was sent
        assert meter.relay_closed
        assert meter.trip_count == 0

        release = envelope("keep_power_off", [mid(meter)])
        await rig.send(release)
        await rig.finished(release.id, [mid(meter)])
        assert not meter.keep_power


@pytest.mark.asyncio
async def test_meter_refusals_carry_the_meters_reason(tmp_path: Path, sim_bus: SimBusFactory) -> None:
    handle = await sim_bus(2)
    wrong, late = handle.meters
    late.clock_offset = 400 * 86400  # the meter clock is past the command's validity time
    async with dlt_rig(tmp_path, handle, passwords={wrong.address_text: "999999"}) as rig:
        await rig.start()
        cut = envelope("disconnect", [mid(wrong), mid(late)])
        await rig.send(cut)
        final = await rig.finished(cut.id, [mid(wrong), mid(late)])
        assert (final[mid(wrong)].state, final[mid(wrong)].reason) == ("meter_refused", "authentication_failed")
        assert (final[mid(late)].state, final[mid(late)].reason) == ("meter_refused", "validity_expired")
        assert wrong.relay_closed
        assert late.relay_closed
        assert rig.service is not None
        assert rig.service.stats.meter_refused == 2
        assert rig.states(cut.id, mid(wrong)) == ["queued", "sent", "meter_refused"]  # refusals are not retried


@pytest.mark.asyncio
async def test_stuck_relay_is_unverified(tmp_path: Path, sim_bus: SimBusFactory) -> None:
    handle = await sim_bus(1)
    meter = handle.meters[0]
    meter.stuck_relay = True
    async with dlt_rig(tmp_path, handle, verify_window=Duration(0.3)) as rig:
        await rig.start()
        cut = envelope("disconnect", [mid(meter)])
        started = time.monotonic()
        await rig.send(cut)
        final = (await rig.finished(cut.id, [mid(meter)]))[mid(meter)]
        assert time.monotonic() - started >= 0.3  # it kept reading for the whole window
        assert (final.state, final.relay) == ("unverified", "closed")
        assert "wanted open" in (final.detail or "")
        assert "meter_acknowledged" in rig.states(cut.id, mid(meter))


class DelayedTripMeter(Dlt645Meter):
    """A meter configured to trip a while after a 1A command (many meters have a settable trip
    delay): 1A is handled as the simulator's 1D delayed trip with N2 = 1 minute of meter time."""

    def _remote_control(self, req: m.RemoteControlRequest) -> list[Any]:
        if req.command is RemoteCommand.TRIP:
            req = replace(req, command=RemoteCommand.DELAYED_TRIP, n2=1)
        return super()._remote_control(req)


@pytest.mark.asyncio
async def test_delayed_trip_is_verified_when_the_relay_opens(tmp_path: Path) -> None:
    clock = SimClock(SIM_START, speed=200.0)  # one meter minute = 0.3 s
    meter = DelayedTripMeter("000000000001", clock=clock)
    bus = SimulatedBus([meter], LinkConfig())
    await bus.start()
    try:
        handle = SimBusHandle(bus, [meter], clock)
        async with dlt_rig(tmp_path, handle, verify_window=Duration(3.0)) as rig:
            await rig.start()
            cut = envelope("disconnect", [mid(meter)])
            started = time.monotonic()
            await rig.send(cut)
            final = (await rig.finished(cut.id, [mid(meter)]))[mid(meter)]
            assert (final.state, final.relay) == ("verified", "open")
            assert time.monotonic() - started >= 0.2  # verified only once the delay had passed
            assert meter.trip_count == 1
    finally:
        await bus.stop()


@pytest.mark.asyncio
async def test_dropped_replies_no_answer_then_retry_then_verified(tmp_path: Path, sim_bus: SimBusFactory) -> None:
    faults = Faults()
    handle = await sim_bus(1, faults=faults)
    meter = handle.meters[0]
    async with dlt_rig(tmp_path, handle) as rig:

        def heal(ack: Ack) -> None:
            if ack.state == "no_answer":
                faults.per_meter.clear()

        rig.on_ack = heal
        await rig.start()
        cut = envelope("disconnect", [mid(meter)])
        # the meter acts on the trip but its replies are lost until the gateway reports no_answer
        faults.per_meter[meter.address_text] = Faults(drop_reply=1.0)
        await rig.send(cut)
        final = (await rig.finished(cut.id, [mid(meter)]))[mid(meter)]
        assert (final.state, final.relay) == ("verified", "open")
        states = rig.states(cut.id, mid(meter))
        assert states[:3] == ["queued", "sent", "no_answer"]
        assert states[3:] == ["sent", "meter_acknowledged", "verified"]
        assert handle.bus.stats["drop_reply"] >= 1
        assert rig.service is not None
        assert (rig.service.stats.no_answer, rig.service.stats.retries) == (1, 1)
        assert meter.trip_count == 1  # the repeated trip was harmless


@pytest.mark.asyncio
async def test_read_back_reaches_a_meter_its_lost_replies_marked_offline(
    tmp_path: Path, sim_bus: SimBusFactory
) -> None:
    """Every control frame's reply lost: the health book marks the meter offline (polls then wait
    for the next probe, a minute away), but the command's read-back must still go to the meter."""
    faults = Faults()
    handle = await sim_bus(1, faults=faults)
    meter = handle.meters[0]
    health = HealthBook(HealthPolicy(degraded_after=1, offline_after=2, probe_interval=60.0))
    async with dlt_rig(tmp_path, handle, retry=2, health=health) as rig:
        offline_at_heal: list[MeterState] = []

        def heal(ack: Ack) -> None:
            if ack.state == "no_answer" and rig.states(ack.command, ack.meter).count("no_answer") == 2:
                offline_at_heal.append(health.state(mid(meter)))
                faults.per_meter.clear()

        rig.on_ack = heal
        await rig.start()
        cut = envelope("disconnect", [mid(meter)])
        faults.per_meter[meter.address_text] = Faults(drop_reply=1.0)  # the meter trips; replies lost
        await rig.send(cut)
        final = (await rig.finished(cut.id, [mid(meter)]))[mid(meter)]
        assert offline_at_heal == [MeterState.OFFLINE]  # the read-back went to an "offline" meter
        assert (final.state, final.relay) == ("verified", "open"), final
        assert rig.states(cut.id, mid(meter)).count("no_answer") == 2
        assert meter.trip_count == 1


def lose_control_frames(meter: Dlt645Meter, count: int, *, replies_only: bool = False) -> list[int]:
    """The meter's next ``count`` control (0x1C) frames are lost before it sees them (no action,
    no reply), or with ``replies_only`` it acts and only its replies are lost; reads still get
    through (the simulator's drop_request / drop_reply would take those too)."""
    handle_control = meter._handlers[m.RemoteControlRequest]
    lost: list[int] = []

    def lossy(req: m.Message) -> list[Frame]:
        if len(lost) < count:
            lost.append(1)
            if replies_only:
                handle_control(req)
            return []
        return handle_control(req)

    meter._handlers[m.RemoteControlRequest] = lossy
    return lost


@pytest.mark.asyncio
async def test_control_frames_lost_on_the_way_go_again_once_the_meter_answers(
    tmp_path: Path, sim_bus: SimBusFactory
) -> None:
    """Every control frame lost before the meter (it never acts): when the read-back then answers
    with the relay unmoved, the frame goes again instead of the window being spent polling."""
    handle = await sim_bus(1)
    meter = handle.meters[0]
    async with dlt_rig(tmp_path, handle, retry=2) as rig:
        await rig.start()
        lost = lose_control_frames(meter, 2)  # both attempts (each control attempt is one frame)
        cut = envelope("disconnect", [mid(meter)])
        started = time.monotonic()
        await rig.send(cut)
        final = (await rig.finished(cut.id, [mid(meter)]))[mid(meter)]
        assert (final.state, final.relay) == ("verified", "open"), final
        assert rig.states(cut.id, mid(meter)) == [
            "queued",
            "sent",
            "no_answer",
            "sent",
            "no_answer",
            "sent",  # attempt 3: after a read-back found the relay still closed
            "meter_acknowledged",
            "verified",
        ]
        assert len(lost) == 2
        assert meter.trip_count == 1
        assert rig.service is not None
        assert rig.service.stats.retries == 2
        assert time.monotonic() - started < 15  # not also a 30 s verify window spent polling


@pytest.mark.asyncio
async def test_control_frames_go_again_only_once_per_execution(tmp_path: Path, sim_bus: SimBusFactory) -> None:
    """The second round lost as well: the relay, read back unmoved, ends unverified; no third."""
    handle = await sim_bus(1)
    meter = handle.meters[0]
    async with dlt_rig(tmp_path, handle, retry=2, verify_window=Duration(0.5)) as rig:
        await rig.start()
        lost = lose_control_frames(meter, 1000)
        cut = envelope("disconnect", [mid(meter)])
        await rig.send(cut)
        final = (await rig.finished(cut.id, [mid(meter)]))[mid(meter)]
        assert (final.state, final.relay) == ("unverified", "closed"), final
        assert rig.states(cut.id, mid(meter)).count("sent") == 4
        assert len(lost) == 4
        assert "never acknowledged" in (final.detail or "")
        assert meter.trip_count == 0


@pytest.mark.asyncio
async def test_a_held_delayed_trip_is_not_sent_again(tmp_path: Path) -> None:
    """Every reply to the trip lost, and the meter holds it as a delayed trip: the read-back shows
    the relay still closed but commanded open (status word 3 bit 6), so nothing goes again (that
    would restart the meter's delay); it is verified when the relay opens."""
    clock = SimClock(SIM_START, speed=60.0)  # one meter minute = 1 s: longer than both attempts
    meter = DelayedTripMeter("000000000001", clock=clock)
    bus = SimulatedBus([meter], LinkConfig())
    await bus.start()
    try:
        handle = SimBusHandle(bus, [meter], clock)
        async with dlt_rig(tmp_path, handle, retry=2, verify_window=Duration(4.0)) as rig:
            await rig.start()
            lost = lose_control_frames(meter, 1000, replies_only=True)
            cut = envelope("disconnect", [mid(meter)])
            await rig.send(cut)
            final = (await rig.finished(cut.id, [mid(meter)]))[mid(meter)]
            assert (final.state, final.relay) == ("verified", "open"), final
            assert rig.states(cut.id, mid(meter)).count("sent") == 2
            assert len(lost) == 2
            assert meter.trip_count == 1
    finally:
        await bus.stop()


@pytest.mark.asyncio
async def test_dead_meter_retries_within_expiry_then_unverified(tmp_path: Path, sim_bus: SimBusFactory) -> None:
    handle = await sim_bus(1, faults=Faults(never_answer=True))
    meter = handle.meters[0]
    async with dlt_rig(tmp_path, handle, retry=2, verify_window=Duration(0.2)) as rig:
        await rig.start()
        cut = envelope("disconnect", [mid(meter)])
        await rig.send(cut)
        final = (await rig.finished(cut.id, [mid(meter)]))[mid(meter)]
        assert (final.state, final.relay) == ("unverified", None)
        assert rig.states(cut.id, mid(meter)).count("sent") == 2
        assert "never acknowledged" in (final.detail or "")


# -- idempotency, replay, expiry ---------------------------------------------------------------------


@pytest.mark.asyncio
async def test_duplicate_id_runs_once_and_resends_current_state(tmp_path: Path, sim_bus: SimBusFactory) -> None:
    handle = await sim_bus(1)
    meter = handle.meters[0]
    async with dlt_rig(tmp_path, handle) as rig:
        await rig.start()
        cut = envelope("disconnect", [mid(meter)])
        await rig.send(cut)
        await rig.send(cut)  # broker redelivery while it runs
        await rig.finished(cut.id, [mid(meter)])
        before = len(rig.acks)
        await rig.send(cut)  # head-end retry after a lost ack
        resent = await rig.new_acks(before)
        latest = rig.of(cut.id)
        assert {(a.meter, a.state) for a in resent} == {(None, "accepted"), (mid(meter), "verified")}
        assert {a.seq for a in resent} <= {a.seq for a in latest}  # the same acks, not new ones

        rig.clock.offset = 120.0  # a late re-delivery, after expiry: still the state, not a rejection
        before = len(rig.acks)
        await rig.send(cut)
        resent = {(a.meter, a.state) for a in await rig.new_acks(before)}
        assert resent == {(None, "accepted"), (mid(meter), "verified")}

        # a forged copy claiming the id must not speak for the accepted command
        before = len(rig.acks)
        await rig.send(msgspec.structs.replace(cut, meters=["m999999999999"]))
        (forged,) = await rig.new_acks(before)
        assert (forged.command, forged.state, forged.reason) == (None, "rejected", "bad_signature")
        assert cut.id in (forged.detail or "")
        assert "rejected" not in rig.states(cut.id)

        assert meter.trip_count == 1
        assert rig.states(cut.id, mid(meter)).count("sent") == 1
        assert rig.service is not None
        assert rig.service.stats.duplicates == 3
        assert rig.service.stats.rejected == {"bad_signature": 1}


@pytest.mark.asyncio
async def test_replay_is_refused_after_a_restart(tmp_path: Path, sim_bus: SimBusFactory) -> None:
    handle = await sim_bus(1)
    meter = handle.meters[0]
    async with dlt_rig(tmp_path, handle) as rig:
        await rig.start()
        cut = envelope("disconnect", [mid(meter)], seq=5_000)
        await rig.send(cut)
        await rig.finished(cut.id, [mid(meter)])
        await rig.halt()

        await rig.start()  # a new service, store and audit instances on the same files
        old = envelope("reconnect", [mid(meter)], seq=4_999)
        same = envelope("reconnect", [mid(meter)], seq=5_000)
        await rig.send(old)
        await rig.send(same)
        await rig.send(cut)  # the original again: already done, not executed again
        await asyncio.sleep(0.1)
        for env in (old, same):
            assert rig.states(env.id) == ["received", "rejected"]
            assert rig.of(env.id)[-1].reason == "replayed"
        assert meter.trip_count == 1
        assert not meter.relay_closed
        assert meter.close_count == 0
        assert rig.service is not None
        assert rig.service.stats.rejected == {"replayed": 2}
        assert rig.service.stats.duplicates == 1


@pytest.mark.asyncio
async def test_expiry_boundaries(tmp_path: Path, sim_bus: SimBusFactory) -> None:
    handle = await sim_bus(2)
    meter, busy = handle.meters
    busy.stuck_relay = True
    async with dlt_rig(tmp_path, handle, verify_window=Duration(0.6)) as rig:
        now = time.time()
        rig.clock.frozen = now
        await rig.start()
        at_expiry = envelope("disconnect", [mid(meter)], now=now - 10, expires=10)  # expires_at == now
        just_before = envelope("disconnect", [mid(meter)], now=now - 9.999, expires=10)
        await rig.send(at_expiry)
        await rig.send(just_before)
        await rig.finished(just_before.id, [mid(meter)])  # the gateway clock stands still meanwhile
        assert rig.states(at_expiry.id) == ["received", "rejected"]
        assert rig.of(at_expiry.id)[-1].reason == "expired"
        assert rig.states(just_before.id, mid(meter))[-1] == "verified"  # accepted 1 ms before expiry: runs
        rig.clock.frozen = None

        # a command queued behind a long execution on the same meter expires in the queue, unsent
        first = envelope("disconnect", [mid(busy)])
        second = envelope("reconnect", [mid(busy)], expires=0.3)
        await rig.send(first)
        await rig.send(second)
        final = await rig.finished(second.id, [mid(busy)])
        assert final[mid(busy)].state == "expired"
        assert rig.states(second.id, mid(busy)) == ["queued", "expired"]
        await rig.finished(first.id, [mid(busy)])
        assert busy.close_count == 0


# -- crash resume ------------------------------------------------------------------------------------


def persist_sent(rig: Rig, env: CommandEnvelope, meter: str, now: float) -> None:
    """What a gateway killed right after persisting "sent" leaves behind."""
    store = CommandStore.open(rig.tmp_path / "commands.sqlite", GW)
    try:
        store.accept(env, now, [MeterPlan(meter, CommandEvent.ADMIT, guarded=True)])
        store.apply([Transition(env.id, meter, CommandEvent.SEND, attempts=1, sent=True, detail="attempt 1")], now)
    finally:
        store.close()


@pytest.mark.asyncio
async def test_crash_resume_reads_the_relay_first(tmp_path: Path, sim_bus: SimBusFactory) -> None:
    handle = await sim_bus(3)
    reached, lost, late = handle.meters
    async with dlt_rig(tmp_path, handle) as rig:
        now = time.time()
        # the trip had reached this meter before the crash
        tripped = envelope("disconnect", [mid(reached)])
        persist_sent(rig, tripped, mid(reached), now)
        driver = rig.meters[mid(reached)].driver
        assert isinstance(driver, Dlt645Driver)
        await driver.remote_control(RemoteCommand.TRIP, now + 60)
        # this one's frame never left
        unsent = envelope("disconnect", [mid(lost)])
        persist_sent(rig, unsent, mid(lost), now)
        # and this one expired while the gateway was down
        expired = envelope("disconnect", [mid(late)], now=now - 50, expires=55)
        persist_sent(rig, expired, mid(late), now - 50)
        rig.clock.offset = 10.0
        requests = [mt.requests for mt in handle.meters]

        await rig.start()
        final = await rig.finished(tripped.id, [mid(reached)])
        assert (final[mid(reached)].state, final[mid(reached)].relay) == ("verified", "open")
        assert "restart" in (final[mid(reached)].detail or "")
        assert reached.trip_count == 1
        assert reached.requests == requests[0] + 1

        final = await rig.finished(unsent.id, [mid(lost)])
        assert final[mid(lost)].state == "verified"
        assert not lost.relay_closed
        assert rig.states(unsent.id, mid(lost)) == ["queued", "sent", "sent", "meter_acknowledged", "verified"]
        assert rig.of(unsent.id, mid(lost))[-3].detail == "attempt 2"  # counted as the second attempt

        final = await rig.finished(expired.id, [mid(late)])
        assert (final[mid(late)].state, final[mid(late)].relay) == ("expired", "closed")
        assert late.trip_count == 0
        assert late.requests == requests[2] + 1
        assert rig.service is not None
        assert (rig.service.stats.resumed, rig.service.stats.retries) == (3, 1)


# -- the mass-disconnect guard -------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_thousand_disconnects_against_the_guard(tmp_path: Path, sim_bus: SimBusFactory) -> None:
    handle = await sim_bus(100, speed=0.0)
    ids = [mid(mt) for mt in handle.meters]
    async with dlt_rig(tmp_path, handle, max_disconnects=50, guard_window=Duration(3600)) as rig:
        await rig.start()
        commands = [envelope("disconnect", ids) for _ in range(9)]
        short = envelope("disconnect", ids, expires=1.0)  # never released: expires while held
        for env in [*commands, short]:
            await rig.send(env)
        assert rig.service is not None
        stats = rig.service.stats
        assert stats.held_now == 950
        assert stats.guard_tripped == 1
        first = await rig.finished(commands[0].id, ids[:50])
        assert {a.state for a in first.values()} == {"verified"}
        # exactly the first 50 meters of the first command ran; nothing else reached a meter
        await asyncio.sleep(0.2)
        assert sum(mt.trip_count for mt in handle.meters) == 50
        assert all(mt.relay_closed for mt in handle.meters[50:])
        assert rig.states(commands[0].id, ids[60]) == ["held"]
        assert rig.of(commands[0].id, ids[60])[0].reason == "mass_disconnect_guard"

        final = await rig.finished(short.id, ids, within=5)
        assert {a.state for a in final.values()} == {"expired"}

        # a release signed by the ops key is refused; the supervisor's runs the held meters
        bad = envelope("release", [], params=Params(commands=[commands[0].id]))
        await rig.send(bad)
        release = envelope("release", [], key=SUPERVISOR, params=Params(commands=[commands[0].id, commands[1].id]))
        await rig.send(release)
        final0 = await rig.finished(commands[0].id, ids, within=10)
        final1 = await rig.finished(commands[1].id, ids, within=10)
        assert {a.state for a in [*final0.values(), *final1.values()]} == {"verified"}
        assert all(not mt.relay_closed for mt in handle.meters)
        assert rig.of(bad.id)[-1].reason == "key_not_allowed"
        assert rig.of(release.id)[-1].state == "verified"
        stats = rig.service.stats
        assert (stats.released, stats.held_now, stats.expired, stats.guard_tripped) == (150, 700, 100, 1)
        assert stats.rejected == {"key_not_allowed": 1}


# -- Modbus ------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_modbus_disconnect_and_reconnect_via_relay_coil(tmp_path: Path) -> None:
    server = await serve_modbus(units=(1,), port=0)
    link = ModbusLink.build(
        TcpSettings("127.0.0.1", server.port, connect_timeout=1.0, reconnect=QUICK), timeout=0.5, name="mb"
    )
    meter = ModbusMeter(link, "sim-3ph", unit=1, meter_id="mb1")
    cfg = Meter(id="mb1", bus="mb", protocol="modbus", address=1, model="sim-3ph")
    rig = Rig(
        tmp_path,
        make_config(tmp_path, [cfg]),
        {"mb1": MeterRuntime("mb1", "mb", "modbus", meter)},
        {"mb": link.bus},
    )
    try:
        await rig.start()
        cut = envelope("disconnect", ["mb1"])
        await rig.send(cut)
        assert (await rig.finished(cut.id, ["mb1"]))["mb1"].relay == "open"
        assert not server.meters[1].load.relay_closed
        back = envelope("reconnect", ["mb1"])  # Modbus has no close permit: closes directly
        await rig.send(back)
        final = (await rig.finished(back.id, ["mb1"]))["mb1"]
        assert (final.state, final.relay) == ("verified", "closed")
        assert server.meters[1].load.relay_closed
        keep = envelope("keep_power_on", ["mb1"])
        await rig.send(keep)
        await asyncio.sleep(0.05)
        refused = rig.of(keep.id, "mb1")[-1]
        assert (refused.state, refused.reason) == ("rejected", "unsupported")
        read = envelope("read_now", ["mb1"], params=Params(quantities=["voltage.l1", "energy.active.import.total"]))
        await rig.send(read)
        final = (await rig.finished(read.id, ["mb1"]))["mb1"]
        assert final.state == "verified"
        assert "read 2 of 2" in (final.detail or "")
        assert sorted(r.quantity for r in rig.readings) == ["energy.active.import.total", "voltage.l1"]
    finally:
        if rig.task is not None:
            await rig.halt()
        await link.close()
        await server.stop()


@pytest.mark.asyncio
async def test_time_sync_and_read_now_on_dlt645(tmp_path: Path, sim_bus: SimBusFactory) -> None:
    handle = await sim_bus(1)
    meter = handle.meters[0]
    async with dlt_rig(tmp_path, handle, attempts=2) as rig:
        await rig.start()
        sync = envelope("time_sync", [mid(meter)])
        await rig.send(sync)
        final = (await rig.finished(sync.id, [mid(meter)]))[mid(meter)]
        assert final.state == "verified", final
        meter_now = meter.meter_time().replace(tzinfo=TZ).timestamp()
        assert abs(meter_now - time.time()) < 2.5
        read = envelope("read_now", [mid(meter)], params=Params(quantities=["energy.active.import.total"]))
        await rig.send(read)
        final = (await rig.finished(read.id, [mid(meter)]))[mid(meter)]
        assert final.state == "verified"
        assert [r.quantity for r in rig.readings] == ["energy.active.import.total"]


@pytest.mark.asyncio
async def test_reload_applies_new_limits_keys_and_meters(tmp_path: Path, sim_bus: SimBusFactory) -> None:
    handle = await sim_bus(3)
    first, second, third = handle.meters
    async with dlt_rig(tmp_path, handle) as rig:
        full = dict(rig.meters)
        rig.meters = {mid(first): full[mid(first)]}
        service = await rig.start()
        cut = envelope("disconnect", [mid(first), mid(second)])
        await rig.send(cut)
        final = await rig.finished(cut.id, [mid(first), mid(second)])
        assert final[mid(first)].state == "verified"
        assert (final[mid(second)].state, final[mid(second)].reason) == ("rejected", "unknown_meter")
        assert second.requests == 0

        # SIGHUP: all meters known, the guard tightened to one disconnect, the ops key dropped
        config = msgspec.structs.replace(
            rig.config,
            meters=[dlt_meter_config(m) for m in handle.meters],
            commands=msgspec.structs.replace(
                rig.config.commands, max_disconnects=1, keys=[key_config(SUPERVISOR, ["release"])]
            ),
        )
        service.update(config, full, rig.buses)
        refused = envelope("disconnect", [mid(second)])
        before = len(rig.acks)
        await rig.send(refused)
        await rig.new_acks(before)
        assert [(a.state, a.reason) for a in rig.of(refused.id)] == [("received", None), ("rejected", "unknown_key")]
        assert second.requests == 0

        # the ops key back: the second meter is now known, and the one disconnect already spent in
        # the guard window (the first meter's) holds it
        config = msgspec.structs.replace(
            config, commands=msgspec.structs.replace(config.commands, keys=[key_config(OPS, ["command"])])
        )
        service.update(config, full, rig.buses)
        again = envelope("disconnect", [mid(second)])
        before = len(rig.acks)
        await rig.send(again)
        await rig.new_acks(before, settle=0.3)
        assert (rig.of(again.id, mid(second))[-1].state, rig.of(again.id, mid(second))[-1].reason) == (
            "held",
            "mass_disconnect_guard",
        )
        assert second.relay_closed
        # reconnects are never held by the disconnect guard
        back = envelope("reconnect", [mid(third)])
        await rig.send(back)
        done = (await rig.finished(back.id, [mid(third)]))[mid(third)]
        assert done.state == "verified", done
        assert service.stats.held_now == 1

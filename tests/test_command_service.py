"""The command service behind a real gateway.uplink.Uplink on a real mosquitto: commands published
by a head-end client, acks read by a subscriber, meters simulated over TCP, real SQLite files."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import paho.mqtt.publish as mqtt_publish
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meter_gateway.drivers.backoff import BackoffPolicy
from meter_gateway.drivers.log_limit import limited_kind_ended
from meter_gateway.gateway.commands.auth import SigningKey
from meter_gateway.gateway.commands.envelope import (
    TERMINAL_STATES,
    Ack,
    CommandEnvelope,
    Params,
    decode_ack,
    encode_envelope,
)
from meter_gateway.gateway.commands.service import CommandService
from meter_gateway.gateway.config import Duration
from meter_gateway.gateway.store.audit import AuditLog
from meter_gateway.gateway.store.outbox import AsyncOutbox
from meter_gateway.gateway.uplink.contract import Topics
from meter_gateway.gateway.uplink.session import InboundMessage, Protocol, Uplink, UplinkConfig
from tests.plugins.broker import Broker, Subscriber
from tests.plugins.simulators import SimBusFactory, SimBusHandle
from tests.test_command_exec import GW, SUPERVISOR, Rig, dlt_rig, envelope, mid

TOPICS = Topics(GW)
FAST: dict[str, Any] = {
    "reconnect": BackoffPolicy(initial=0.05, maximum=0.3),
    "refused_backoff": BackoffPolicy(initial=0.05, maximum=0.2),
    "keepalive": 10,
    "ack_timeout": 2.0,
}


async def until(cond: Callable[[], bool], within: float = 5.0, what: str = "condition") -> None:
    end = time.monotonic() + within
    while not cond():
        assert time.monotonic() < end, f"{what} not reached within {within} s"
        await asyncio.sleep(0.01)


@pytest.fixture
def subscriber() -> Iterator[Callable[..., Subscriber]]:
    """``subscriber(broker, topics)``: a started recording subscriber, stopped after the test."""
    subs: list[Subscriber] = []

    def make(broker: Broker, topics: list[str]) -> Subscriber:
        sub = Subscriber(broker, topics).start()
        subs.append(sub)
        return sub

    yield make
    for sub in subs:
        sub.stop()


@dataclass
class Gateway:
    service: CommandService
    uplink: Uplink
    rig: Rig
    broker: Broker

    async def command(self, env: CommandEnvelope | bytes, *, retain: bool = False) -> None:
        """Publish like a head-end: QoS 1 on the command topic."""
        payload = env if isinstance(env, bytes) else encode_envelope(env)
        await asyncio.to_thread(
            mqtt_publish.single,
            TOPICS.commands,
            payload,
            qos=1,
            retain=retain,
            hostname=self.broker.host,
            port=self.broker.port,
        )


@asynccontextmanager
async def gateway(
    tmp_path: Path, broker: Broker, handle: SimBusHandle, *, protocol: Protocol = Protocol.V5, **commands: Any
) -> AsyncIterator[Gateway]:
    async with dlt_rig(tmp_path, handle, **commands) as rig:
        box = await AsyncOutbox.open(tmp_path / "outbox.sqlite", synchronous="NORMAL")
        uplinks: list[Uplink] = []

        async def publish(topic: str, payload: bytes) -> bool:
            return await uplinks[0].publish(topic, payload, within=1.0)

        service = CommandService(
            rig.config,
            rig.meters,
            rig.buses,
            publish,
            TOPICS.acks,
            publish_backoff=BackoffPolicy(initial=0.05, maximum=0.2),
        )
        config = UplinkConfig(gateway_id=GW, host=broker.host, port=broker.port, protocol=protocol, **FAST)
        uplink = Uplink(config, box, on_command=service.on_message)
        uplinks.append(uplink)
        stop = asyncio.Event()
        tasks = [asyncio.create_task(uplink.run()), asyncio.create_task(service.run(stop))]
        try:
            if broker.running:
                await until(lambda: uplink.stats.connected, what="uplink connected")
                await asyncio.sleep(0.1)  # let the command subscription settle
            yield Gateway(service, uplink, rig, broker)
        finally:
            stop.set()
            await asyncio.wait_for(uplink.stop(), 10)
            await asyncio.gather(*tasks)
            await box.close()


def acks_of(sub: Subscriber, command: str | None) -> list[Ack]:
    seen: dict[tuple[str | None, int, str | None], Ack] = {}
    for msg in sub.snapshot(TOPICS.acks):
        ack = decode_ack(msg.payload)
        if ack.command == command:
            seen.setdefault((ack.command, ack.seq, ack.detail if command is None else None), ack)
    return sorted(seen.values(), key=lambda a: a.seq)


async def terminal(sub: Subscriber, command: str, meters: list[str], within: float = 5.0) -> dict[str, Ack]:
    def done() -> bool:
        final = {a.meter for a in acks_of(sub, command) if a.state in TERMINAL_STATES}
        return all(m in final for m in meters)

    await until(done, within, f"{command} terminal")
    return {a.meter: a for a in acks_of(sub, command) if a.meter is not None and a.state in TERMINAL_STATES}


@pytest.mark.asyncio
async def test_disconnect_over_mqtt_is_acked_in_order(
    tmp_path: Path, mosquitto: Broker, sim_bus: SimBusFactory, subscriber: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="meter_gateway.gateway")
    handle = await sim_bus(2, passwords={2: "314159"})
    meters = [mid(m) for m in handle.meters]
    sub = subscriber(mosquitto, [TOPICS.acks])
    async with gateway(tmp_path, mosquitto, handle, password="314159") as gw:
        cut = envelope("disconnect", meters)
        await gw.command(cut)
        final = await terminal(sub, cut.id, meters)
        assert {(a.state, a.relay) for a in final.values()} == {("verified", "open")}
        acks = acks_of(sub, cut.id)
        assert [a.seq for a in acks] == list(range(1, len(acks) + 1))
        assert [a.state for a in acks[:2]] == ["received", "accepted"]
        assert [a.state for a in acks if a.meter == meters[0]] == ["queued", "sent", "meter_acknowledged", "verified"]
        assert all(not m.relay_closed for m in handle.meters)
        await until(lambda: gw.service.stats.acks_pending == 0, what="acks confirmed")
        assert gw.service.stats.acks_published == len(acks)
        for msg in sub.snapshot(TOPICS.acks):
            assert b"314159" not in msg.payload  # no meter password
            assert b"12345678" not in msg.payload  # no operator code
    assert "314159" not in caplog.text
    with AuditLog.open(tmp_path / "audit.sqlite", readonly=True) as audit:
        assert all("314159" not in (r.detail or "") for r in audit.query())


@pytest.mark.asyncio
async def test_every_rejection_is_acked_counted_audited_and_touches_no_meter(
    tmp_path: Path, broker_factory: Callable[..., Broker], sim_bus: SimBusFactory, subscriber: Any
) -> None:
    broker = broker_factory()
    handle = await sim_bus(2)
    target, probe = handle.meters
    sub = subscriber(broker, [TOPICS.acks])
    stranger = SigningKey.ed25519("nobody", Ed25519PrivateKey.generate())
    # a stale retained command waits on the broker; with MQTT 3.1.1 the gateway gets it (flagged)
    # when it subscribes, and must refuse it
    retained = envelope("disconnect", [mid(target)], command_id="bad-11")
    await asyncio.to_thread(
        mqtt_publish.single,
        TOPICS.commands,
        encode_envelope(retained),
        qos=1,
        retain=True,
        hostname=broker.host,
        port=broker.port,
    )
    async with gateway(tmp_path, broker, handle, protocol=Protocol.V311, max_validity=Duration(600)) as gw:
        accepted = envelope("relay_status", [mid(probe)], seq=10**15)
        await gw.command(accepted)
        await terminal(sub, accepted.id, [mid(probe)])
        t = mid(target)
        cut = envelope("disconnect", [t])
        cases: dict[str, CommandEnvelope | bytes] = {
            "malformed": msgspec.json.encode({**msgspec.to_builtins(cut), "id": "bad-1", "extra": 1}),
            "unsigned": msgspec.structs.replace(envelope("disconnect", [t], command_id="bad-2"), sig=""),
            "unknown_key": envelope("disconnect", [t], key=stranger, command_id="bad-3"),
            "bad_signature": msgspec.structs.replace(
                envelope("disconnect", [mid(probe)], command_id="bad-4"), meters=[t]
            ),
            "key_not_allowed": envelope("disconnect", [t], key=SUPERVISOR, command_id="bad-5"),
            "wrong_gateway": envelope("disconnect", [t], gateway="gw-2", command_id="bad-6"),
            "validity_too_long": envelope("disconnect", [t], expires=3600, command_id="bad-7"),
            "not_yet_valid": envelope("disconnect", [t], now=time.time() + 100, command_id="bad-8"),
            "expired": envelope("disconnect", [t], now=time.time() - 100, expires=50, command_id="bad-9"),
            "replayed": envelope("disconnect", [t], seq=10**15 - 1, command_id="bad-10"),
        }
        for env in cases.values():
            await gw.command(env)
        await gw.command(b"\xff not json at all")
        unknown = envelope("disconnect", ["no-such-meter"], seq=10**15 + 1)
        await gw.command(unknown)
        await until(lambda: sum(gw.service.stats.rejected.values()) == 13, what="13 rejections")
        await gw.command(b"", retain=True)  # clears the retained message; arrives as an empty (malformed) one
        await until(lambda: sum(gw.service.stats.rejected.values()) == 14, what="14 rejections")

        ids = {"malformed": "bad-1"} | {r: e.id for r, e in cases.items() if isinstance(e, CommandEnvelope)}
        for reason, cid in ids.items():
            await until(lambda cid=cid: len(acks_of(sub, cid)) == 2, what=f"acks of {reason}")  # type: ignore[misc]
            received, rejected = acks_of(sub, cid)
            assert (received.state, received.seq, rejected.state, rejected.seq) == ("received", 1, "rejected", 2)
            assert rejected.reason == reason, (reason, rejected)
            assert rejected.meter is None
        await until(lambda: len(acks_of(sub, None)) == 2, what="acks of the two messages without an id")
        no_id = acks_of(sub, None)
        assert [(a.state, a.seq, a.reason) for a in no_id] == [("rejected", 1, "malformed")] * 2
        assert acks_of(sub, retained.id)[-1].reason == "retained"
        meter_level = await terminal(sub, unknown.id, ["no-such-meter"])
        assert (meter_level["no-such-meter"].state, meter_level["no-such-meter"].reason) == (
            "rejected",
            "unknown_meter",
        )

        expected = dict.fromkeys([*cases, "retained", "unknown_meter"], 1)
        expected["malformed"] = 3  # with an id, without one, and the empty message
        assert gw.service.stats.rejected == expected
        assert target.requests == 0
        assert target.relay_closed
    with AuditLog.open(tmp_path / "audit.sqlite", readonly=True) as audit:
        assert audit.verify() is None
        rejected_records = [r for r in audit.query() if r.state == "rejected"]
        assert len(rejected_records) == 14
        assert {r.actor for r in rejected_records if r.command == "bad-5"} == {"supervisor"}  # signed, wrong role


@pytest.mark.asyncio
async def test_acks_survive_a_broker_outage_and_a_restart(
    tmp_path: Path, broker_factory: Callable[..., Broker], sim_bus: SimBusFactory, subscriber: Any
) -> None:
    broker = broker_factory()
    handle = await sim_bus(1)
    meter = handle.meters[0]
    cut = envelope("disconnect", [mid(meter)])
    async with gateway(tmp_path, broker, handle) as gw:
        broker.stop()
        await until(lambda: not gw.uplink.stats.connected, what="uplink noticed the outage")
        # the command arrived just before the outage (the hook is what the uplink calls)
        await gw.service.on_message(InboundMessage(TOPICS.commands, encode_envelope(cut), False, 1, time.time()))
        await until(lambda: not meter.relay_closed, what="meter disconnected")
        await until(lambda: gw.service.stats.verified == 1, what="verified while the broker is down")
        assert gw.service.stats.acks_pending == 6  # received, accepted, queued, sent, meter_acknowledged, verified
    # the gateway stopped with its acks unpublished; the broker comes back; a new gateway sends them
    broker.start()
    sub = subscriber(broker, [TOPICS.acks])
    async with gateway(tmp_path, broker, handle) as gw:
        final = await terminal(sub, cut.id, [mid(meter)])
        assert (final[mid(meter)].state, final[mid(meter)].relay) == ("verified", "open")
        assert [a.seq for a in acks_of(sub, cut.id)] == [1, 2, 3, 4, 5, 6]
        await until(lambda: gw.service.stats.acks_pending == 0, what="acks confirmed")
        assert meter.trip_count == 1


@pytest.mark.asyncio
async def test_guard_holds_and_release_over_mqtt(
    tmp_path: Path, mosquitto: Broker, sim_bus: SimBusFactory, subscriber: Any
) -> None:
    handle = await sim_bus(3)
    meters = [mid(m) for m in handle.meters]
    sub = subscriber(mosquitto, [TOPICS.acks])
    async with gateway(tmp_path, mosquitto, handle, max_disconnects=1) as gw:
        cut = envelope("disconnect", meters)
        await gw.command(cut)
        await until(lambda: len([a for a in acks_of(sub, cut.id) if a.state == "held"]) == 2, what="2 held")
        assert (await terminal(sub, cut.id, meters[:1]))[meters[0]].state == "verified"
        assert gw.service.stats.held_now == 2
        release = envelope("release", [meters[2]], key=SUPERVISOR, params=Params(commands=[cut.id]))
        await gw.command(release)
        final = await terminal(sub, cut.id, [meters[2]])
        assert final[meters[2]].state == "verified"
        assert (await terminal(sub, release.id, [meters[2]]))[meters[2]].state == "verified"
        assert handle.meters[1].relay_closed  # still held
        assert not handle.meters[2].relay_closed  # released
        assert [a.state for a in acks_of(sub, cut.id) if a.meter == meters[1]] == ["held"]
        assert gw.service.stats.held_now == 1


@pytest.mark.asyncio
async def test_a_flood_of_forged_commands_is_each_acked_audited_and_counted_but_logged_once(
    tmp_path: Path,
    broker_factory: Callable[..., Broker],
    sim_bus: SimBusFactory,
    subscriber: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="meter_gateway")
    limited_kind_ended("command_rejected:bad_signature")  # no window left open by an earlier test
    broker = broker_factory()
    handle = await sim_bus(1)
    (target,) = handle.meters
    sub = subscriber(broker, [TOPICS.acks])
    flood = 40
    async with gateway(tmp_path, broker, handle) as gw:
        for n in range(flood):
            signed = envelope("relay_status", [mid(target)], command_id=f"forged-{n}")
            await gw.command(msgspec.structs.replace(signed, action="disconnect"))  # the signature no longer fits
        await until(lambda: gw.service.stats.rejected.get("bad_signature") == flood, 15, f"{flood} rejections")
        await until(
            lambda: all(len(acks_of(sub, f"forged-{n}")) == 2 for n in range(flood)), 15, "every forged command acked"
        )
        assert {acks_of(sub, f"forged-{n}")[-1].reason for n in range(flood)} == {"bad_signature"}
        assert target.requests == 0
        assert target.relay_closed
    lines = [r.getMessage() for r in caplog.records if "event=command_rejected" in r.getMessage()]
    assert len(lines) == 1, lines  # the rest wait for the next window, counted as suppressed=N
    assert "reason=bad_signature" in lines[0]
    with AuditLog.open(tmp_path / "audit.sqlite", readonly=True) as audit:
        assert len([r for r in audit.query() if r.state == "rejected"]) == flood

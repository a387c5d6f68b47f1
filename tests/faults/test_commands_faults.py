"""Remote-control faults through a real mosquitto into the real Uplink + CommandService, with
simulated DL/T 645 meters behind a real TCP bus; every relay operation is counted on the meters.

Relay operations are counted as the remote-control frames (function 0x1C) a meter received, not
as relay movements: a second trip of an already open relay does not move it, but it is still a
second operation that must not happen. SIGKILL around the control-frame write and replay after a
restart of the real daemon are tests/test_commands_daemon.py's (not repeated here).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import paho.mqtt.client as paho
import paho.mqtt.publish as mqtt_publish
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion

from meter_gateway.gateway.commands.auth import SigningKey
from meter_gateway.gateway.commands.envelope import CommandEnvelope, encode_envelope
from meter_gateway.gateway.uplink.session import Protocol
from meter_gateway.protocols.dlt645.frame import Frame
from meter_gateway.simulators.clock import SimClock
from meter_gateway.simulators.dlt645_meter import Dlt645Meter
from meter_gateway.simulators.links import LinkConfig, SimulatedBus
from tests.faults import scale
from tests.plugins.broker import Broker, Subscriber
from tests.plugins.simulators import SIM_START, SimBusHandle
from tests.test_command_exec import envelope, mid
from tests.test_command_service import TOPICS, Gateway, acks_of, gateway, terminal, until

REMOTE_CONTROL = 0x1C


class CountingMeter(Dlt645Meter):
    """A simulated meter that also counts the remote-control frames addressed to it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.control_frames = 0

    def handle(self, frame: Frame, now: Any = None) -> list[bytes]:
        if frame.control.function == REMOTE_CONTROL and not frame.control.from_meter:
            self.control_frames += 1
        return super().handle(frame, now)


@asynccontextmanager
async def counting_bus(n: int) -> AsyncIterator[SimBusHandle]:
    clock = SimClock(SIM_START, 1.0)
    meters = [CountingMeter(f"{i + 1:012d}", clock=clock, seed=i) for i in range(n)]
    bus = SimulatedBus(meters, LinkConfig())
    await bus.start()
    try:
        yield SimBusHandle(bus, list(meters), clock)
    finally:
        await bus.stop()


def operations(handle: SimBusHandle) -> int:
    return sum(m.control_frames for m in handle.meters if isinstance(m, CountingMeter))


@pytest.fixture
def subscriber() -> Any:
    subs: list[Subscriber] = []

    def make(broker: Broker, topics: list[str]) -> Subscriber:
        sub = Subscriber(broker, topics).start()
        subs.append(sub)
        return sub

    yield make
    for sub in subs:
        sub.stop()


def publish_many(broker: Broker, payloads: list[bytes]) -> float:
    """Publish every payload at QoS 1 from one head-end connection; seconds until all were PUBACKed."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"headend-{time.monotonic_ns()}")
    client.max_inflight_messages_set(0)  # no client-side window: as fast as the broker takes them
    client.max_queued_messages_set(0)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        start = time.monotonic()
        infos = [client.publish(TOPICS.commands, p, qos=1) for p in payloads]
        for info in infos:
            info.wait_for_publish(10)
            assert info.is_published()
        return time.monotonic() - start
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.mark.asyncio
async def test_a_command_delivered_five_times_operates_the_relay_once(
    tmp_path: Path, mosquitto: Broker, subscriber: Callable[..., Subscriber]
) -> None:
    rounds = scale(1, 20)
    async with counting_bus(2) as handle:
        sub = subscriber(mosquitto, [TOPICS.acks])
        async with gateway(tmp_path, mosquitto, handle) as gw:
            for r in range(rounds):
                meter = handle.meters[r % 2]
                action = "disconnect" if meter.relay_closed else "reconnect"
                cmd = envelope(action, [mid(meter)])
                before = (operations(handle), gw.service.stats.duplicates)
                # five deliveries: two back to back (the second arrives while the first executes),
                # three after it finished (a head-end or broker re-sending an old command)
                await gw.command(cmd)
                await gw.command(cmd)
                await terminal(sub, cmd.id, [mid(meter)])
                for _ in range(3):
                    await gw.command(cmd)
                duplicates = before[1] + 4
                await until(lambda: gw.service.stats.duplicates == duplicates, what="4 duplicates counted")  # noqa: B023
                await asyncio.sleep(0.2)  # an extra execution, if any, would start by now
                assert operations(handle) == before[0] + 1, f"round {r}: {action} operated more than once"
                states = [a.state for a in acks_of(sub, cmd.id) if a.meter == mid(meter)]
                assert states.count("sent") == 1, states
            assert gw.service.stats.accepted == rounds
            assert gw.service.stats.internal_errors == 0


@pytest.mark.asyncio
@pytest.mark.parametrize("protocol", [Protocol.V311, Protocol.V5])
async def test_retained_stale_forged_and_foreign_commands_never_reach_a_relay(
    tmp_path: Path, broker_factory: Callable[..., Broker], protocol: Protocol
) -> None:
    broker = broker_factory()
    stranger = SigningKey.ed25519("ops", Ed25519PrivateKey.generate())  # same key id, other key
    unknown = SigningKey.ed25519("nobody", Ed25519PrivateKey.generate())
    async with counting_bus(2) as handle:
        target = mid(handle.meters[0])
        # a genuine, still valid disconnect left retained on the broker before the gateway connects
        retained = envelope("disconnect", [target], expires=600)
        await asyncio.to_thread(
            mqtt_publish.single,
            TOPICS.commands,
            encode_envelope(retained),
            qos=1,
            retain=True,
            hostname=broker.host,
            port=broker.port,
        )
        async with gateway(tmp_path, broker, handle, protocol=protocol) as gw:
            good = envelope("disconnect", [target])
            forged_sig = good.sig[:10] + ("A" if good.sig[10] != "A" else "B") + good.sig[11:]
            cases: list[tuple[str, CommandEnvelope | bytes]] = [
                ("expired", envelope("disconnect", [target], now=time.time() - 120, expires=60)),
                ("not_yet_valid", envelope("disconnect", [target], now=time.time() + 300)),
                ("bad_signature", msgspec.structs.replace(good, sig=forged_sig)),
                ("bad_signature", envelope("disconnect", [target], key=stranger)),
                ("bad_signature", msgspec.structs.replace(envelope("reconnect", [target]), action="disconnect")),
                ("unknown_key", envelope("disconnect", [target], key=unknown)),
                ("wrong_gateway", envelope("disconnect", [target], gateway="gw-2")),
                ("wrong_gateway", envelope("disconnect", [target], gateway="gw-10")),
            ]
            for _, env in cases:
                await gw.command(env)
            expected: dict[str, int] = {}
            for reason, _ in cases:
                expected[reason] = expected.get(reason, 0) + 1
            if protocol is Protocol.V311:
                expected["retained"] = 1  # 3.1.1 hands the retained message over, flagged
            total = sum(expected.values())
            await until(lambda: sum(gw.service.stats.rejected.values()) >= total, what=f"{total} rejections")
            await asyncio.sleep(0.3)  # nothing may run late either
            assert gw.service.stats.rejected == expected
            assert gw.service.stats.accepted == 0
            assert gw.service.stats.internal_errors == 0
            assert operations(handle) == 0
            assert all(m.relay_closed for m in handle.meters)
            # the gateway still takes a genuine command afterwards
            await gw.command(good)
            await until(lambda: not handle.meters[0].relay_closed, what="the genuine disconnect")
            assert operations(handle) == 1


async def _send_burst(gw: Gateway, payloads: list[bytes]) -> float:
    return await asyncio.to_thread(publish_many, gw.broker, payloads)


@pytest.mark.asyncio
@pytest.mark.timeout(scale(120, 900))
async def test_a_thousand_disconnects_in_a_second_are_held_by_the_guard(tmp_path: Path, mosquitto: Broker) -> None:
    n, limit, meters_on_bus = 1000, 10, 20  # see docs/reliability.md finding 10: 5,000 exceed mosquitto's queue
    async with counting_bus(meters_on_bus) as handle:
        ids = [mid(m) for m in handle.meters]
        cmds = [envelope("disconnect", [ids[i % meters_on_bus]], expires=600) for i in range(n)]
        payloads = [encode_envelope(c) for c in cmds]
        async with gateway(tmp_path, mosquitto, handle, max_disconnects=limit) as gw:
            sent_in = await _send_burst(gw, payloads)
            start = time.monotonic()
            await until(lambda: gw.service.stats.received == n, within=scale(60, 600), what=f"{n} commands received")
            handled_in = time.monotonic() - start + sent_in
            await until(lambda: gw.service.stats.verified == limit, within=10, what=f"{limit} verified")
            await asyncio.sleep(0.3)
            stats = gw.service.stats
            print(f"\n{n} disconnects published in {sent_in:.2f} s, all handled within {handled_in:.2f} s")
            assert stats.accepted == n
            assert stats.held_now == n - limit
            assert stats.guard_tripped == 1
            assert stats.internal_errors == 0
            assert operations(handle) == limit  # the first `limit` commands only
            assert [m.relay_closed for m in handle.meters] == [False] * limit + [True] * (meters_on_bus - limit)

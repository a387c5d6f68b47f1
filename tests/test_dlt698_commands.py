"""Signed DL/T 698.45 commands: `meter-gateway ctl --apdu` through a real mosquitto, the envelope's
pass-through field, and the DL/T 698.45 actuator on a simulated meter in both control modes."""

from __future__ import annotations

import time
from pathlib import Path

import msgspec
import pytest

from meter_gateway.gateway.cli import ctl_cmd
from meter_gateway.gateway.commands.actuators import ActuatorError, make_actuator
from meter_gateway.gateway.commands.auth import KeyRing
from meter_gateway.gateway.commands.dlt698_actuator import Dlt698Actuator
from meter_gateway.gateway.commands.envelope import CommandEnvelope, Params
from meter_gateway.gateway.commands.executor import wanted_relay
from meter_gateway.gateway.uplink.contract import ContractError, Topics
from meter_gateway.protocols.dlt698 import requests as rq
from meter_gateway.protocols.dlt698.frame import ServerAddress
from meter_gateway.simulators.dlt698_test_security import TestOnlySecurity
from tests.plugins.broker import Broker, Subscriber
from tests.plugins.simulators import MetersBusFactory
from tests.test_ctl import GW, _accept, _args, keys  # noqa: F401  (keys is a fixture)
from tests.test_dlt698_driver import bus_to, driver, sim


def envelope(action: str, params: Params | None) -> CommandEnvelope:
    now = time.time()
    return CommandEnvelope(
        v=1,
        id="c1",
        gateway=GW,
        meters=["m1"],
        action=action,  # type: ignore[arg-type]
        issued_at=now,
        not_before=now,
        expires_at=now + 60,
        seq=1,
        key_id="ops",
        alg="ed25519",
        params=params,
    )


def test_the_apdu_param_is_hex_and_only_for_control_actions() -> None:
    envelope("disconnect", Params(apdu="10010203")).check()
    with pytest.raises(ContractError, match=r"params\.apdu is only for"):
        envelope("read_now", Params(apdu="10010203")).check()
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"apdu": "10 01"}, Params)
    assert envelope("disconnect", Params(apdu="10ff")).secured_apdu == b"\x10\xff"


def publish(broker: Broker, key_dir: Path, argv: list[str]) -> bytes:
    """``meter-gateway ctl`` ``argv``; the command as the gateway's subscription receives it."""
    sub = Subscriber(broker, [Topics(GW).commands_filter]).start()
    try:
        assert ctl_cmd.main([*argv, *_args(broker, key_dir)]) == 0
        deadline = time.monotonic() + 5
        while not sub.snapshot() and time.monotonic() < deadline:
            time.sleep(0.01)
        (msg,) = sub.snapshot()
    finally:
        sub.stop()
    return msg.payload


@pytest.mark.asyncio
async def test_a_signed_pass_through_disconnect_from_ctl_opens_the_relay(
    mosquitto: Broker,
    keys: tuple[Path, KeyRing],  # noqa: F811
    meters_bus: MetersBusFactory,
) -> None:
    key_dir, ring = keys
    meter = sim("000000000001", accept_plaintext_control=False)
    bus = await meters_bus([meter])
    # the head-end's crypto service (here the simulator's test-only scheme) seals the trip
    secured = TestOnlySecurity().seal_request(rq.relay_trip(ServerAddress.parse("000000000001"), piid=9).apdu, sid=7)
    payload = publish(mosquitto, key_dir, ["disconnect", "m1", "--id", "cmd-698", "--apdu", secured.encode().hex()])
    env = _accept(payload, ring)  # the signature covers the APDU
    assert env.secured_apdu == secured.encode()
    async with bus_to(bus) as b:
        actuator = make_actuator(driver(b, meter, control="passthrough"), b)
        assert isinstance(actuator, Dlt698Actuator)
        with pytest.raises(ActuatorError) as missing:
            await actuator.control("disconnect", None, env.expires_at)
        assert missing.value.reason == "apdu_required"
        await actuator.control(env.action, None, env.expires_at, apdu=env.secured_apdu)
        assert (await actuator.read_relay()).state == "open"
        assert meter.relay_closed is False


@pytest.mark.asyncio
async def test_plaintext_disconnect_close_permit_and_keep_power_verified_by_read_back(
    meters_bus: MetersBusFactory,
) -> None:
    meter = sim("000000000001")
    bus = await meters_bus([meter])
    async with bus_to(bus) as b:
        actuator = make_actuator(driver(b, meter), b)
        assert isinstance(actuator, Dlt698Actuator)
        assert actuator.unsupported("disconnect") is None
        await actuator.control("disconnect", None, time.time() + 60)
        assert (await actuator.read_relay()).state in wanted_relay("disconnect", None, actuator.protocol)
        await actuator.control("reconnect", "close_permit", time.time() + 60)
        reading = await actuator.read_relay()
        assert reading.state == "armed"
        assert "armed" in wanted_relay("reconnect", "close_permit", actuator.protocol)
        await actuator.control("reconnect", "direct_close", time.time() + 60)
        assert (await actuator.read_relay()).state == "closed"
        await actuator.control("keep_power_on", None, time.time() + 60)
        assert (await actuator.read_relay()).keep_power
        with pytest.raises(ActuatorError) as refused:
            await actuator.control("disconnect", None, time.time() + 60)
        assert refused.value.kind == "meter_refused"
        assert meter.relay_closed
        offset = await actuator.time_sync(time.time())
        assert abs(offset) < 2

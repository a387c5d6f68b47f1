"""Simulated CJ/T 188 water, gas and heat meters over real TCP sockets and a pty, driven with the
codec's message builders as a gateway would; also the simulator config and CLI for such meters."""

from __future__ import annotations

import asyncio
import datetime
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from meter_gateway.protocols.cjt188 import messages as m
from meter_gateway.protocols.cjt188.deframer import Deframer
from meter_gateway.protocols.cjt188.frame import Address, Frame
from meter_gateway.protocols.dlt698 import requests as rq
from meter_gateway.protocols.dlt698.axdr import OAD
from meter_gateway.protocols.dlt698.deframer import Deframer as Dlt698Deframer
from meter_gateway.protocols.dlt698.frame import ServerAddress
from meter_gateway.simulators.cjt188_meter import Cjt188Meter
from meter_gateway.simulators.clock import SimClock
from meter_gateway.simulators.faults import Faults
from meter_gateway.simulators.sim_config import SimConfigError, config_from_mapping, load_config
from tests.plugins.simulators import ByteClient, MetersBusFactory, pty_exchange

START = datetime.datetime(2026, 3, 14, 10, 0, 0)
W1 = Address.parse("00000000000001")
W2 = Address.parse("00000000000002")
WATER, HEAT, GAS = 0x10, 0x20, 0x30


def meter(
    address: str = "00000000000001", kind: str = "water", clock: SimClock | None = None, **options: Any
) -> Cjt188Meter:
    return Cjt188Meter(address, kind, clock=clock or SimClock(START, 0.0), **options)


async def client(bus: Any) -> ByteClient:
    return await ByteClient.connect(bus.endpoint, Deframer())


async def read(c: ByteClient, meter_type: int, address: Address, ser: int = 1, wait: float = 1.0) -> Any:
    reply = await c.request(m.ReadRequest.current_data(meter_type, address, ser).encode(preamble=4), wait)
    return None if reply is None else m.parse_message(reply)


def data(reply: Any) -> dict[str, object]:
    assert isinstance(reply, m.ReadReply)
    return reply.values().by_quantity()


@pytest.mark.asyncio
async def test_water_gas_and_heat_current_data_grow_with_the_profile(meters_bus: MetersBusFactory) -> None:
    clock = SimClock(START, 0.0)
    sims = [
        meter("00000000000001", "water", clock),
        meter("00000000000002", "heat", clock),
        meter("00000000000003", "gas", clock),
    ]
    bus = await meters_bus(sims)
    c = await client(bus)
    water = data(await read(c, WATER, W1, ser=9))
    assert water["volume.total"] == sims[0].current_values()["volume.total"][0]  # type: ignore[index]
    assert water["valve.state"] == "open"
    assert water["battery.low"] is False
    assert water["meter.time"] == "2026-03-14T10:00:00"
    heat = data(await read(c, HEAT, W2))
    assert set(heat) >= {
        "heat.total",
        "heat.settlement",
        "power.heat",
        "flow.rate",
        "temperature.supply",
        "time.working_hours",
    }
    delta_t = float(heat["temperature.supply"]) - float(heat["temperature.return"])  # type: ignore[arg-type]
    expected_power = float(heat["flow.rate"]) * delta_t * 1.163  # type: ignore[arg-type]
    assert heat["power.heat"] == pytest.approx(expected_power, abs=0.02)
    gas = data(await read(c, GAS, Address.parse("00000000000003")))
    clock.advance(3 * 3600)
    later = [data(await read(c, t, a)) for t, a in ((WATER, W1), (HEAT, W2), (GAS, Address.parse("00000000000003")))]
    assert later[0]["volume.total"] > water["volume.total"]  # type: ignore[operator]
    assert later[1]["heat.total"] > heat["heat.total"]  # type: ignore[operator]
    assert later[1]["time.working_hours"] == 3
    assert later[2]["volume.total"] > gas["volume.total"]  # type: ignore[operator]
    reply = await c.request(m.ReadRequest.current_data(WATER, W1, 77).encode(preamble=4))
    assert reply is not None
    assert m.parse_message(reply).ser == 77  # type: ignore[union-attr]
    await c.close()


@pytest.mark.asyncio
async def test_closing_the_valve_stops_the_flow_after_it_has_moved(meters_bus: MetersBusFactory) -> None:
    clock = SimClock(START, 0.0)
    sim = meter(clock=clock, valve_time=20.0)
    bus = await meters_bus([sim])
    c = await client(bus)
    ack = await c.request(m.WriteRequest.valve(WATER, W1, open_valve=False, ser=3).encode(preamble=4))
    assert ack is not None
    reply = m.parse_message(ack)
    assert isinstance(reply, m.WriteReply)
    assert reply.status is not None
    assert reply.status.valve == "open"  # still moving
    clock.advance(20)
    closed = data(await read(c, WATER, W1))
    assert closed["valve.state"] == "closed"
    clock.advance(6 * 3600)
    assert data(await read(c, WATER, W1))["volume.total"] == closed["volume.total"]
    await c.request(m.WriteRequest.valve(WATER, W1, open_valve=True).encode(preamble=4))
    clock.advance(3600)
    reopened = data(await read(c, WATER, W1))
    assert reopened["valve.state"] == "open"
    assert reopened["volume.total"] > closed["volume.total"]  # type: ignore[operator]
    await c.close()


@pytest.mark.asyncio
async def test_a_stuck_valve_stays_put_and_reports_abnormal(meters_bus: MetersBusFactory) -> None:
    clock = SimClock(START, 0.0)
    sim = meter(clock=clock)
    bus = await meters_bus([sim], faults=Faults(stuck_valve=True))
    c = await client(bus)
    ack = await c.request(m.WriteRequest.valve(WATER, W1, open_valve=False).encode(preamble=4))
    assert ack is not None
    reply = m.parse_message(ack)
    assert isinstance(reply, m.WriteReply)
    assert reply.status is not None
    assert reply.status.valve == "abnormal"
    assert sim.stuck_valve
    before = data(await read(c, WATER, W1))
    clock.advance(3600)
    after = data(await read(c, WATER, W1))
    assert after["valve.state"] == "abnormal"
    assert after["volume.total"] > before["volume.total"]  # type: ignore[operator]  # still flowing
    await c.close()


@pytest.mark.asyncio
async def test_slow_wake_up_needs_a_run_of_fe_and_slow_reply_waits(meters_bus: MetersBusFactory) -> None:
    sim = meter(wake_preamble=4, turnaround=0.2)
    bus = await meters_bus([sim])
    c = await client(bus)
    request = m.ReadRequest.current_data(WATER, W1, 5)
    assert await c.request(request.encode(preamble=2), 0.4) is None
    assert sim.unheard == 1
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await c.request(request.encode(preamble=4)) is not None
    assert loop.time() - started >= 0.2
    assert sim.requests == 1
    await c.close()


@pytest.mark.asyncio
async def test_di_order_swapped_meter_understands_only_swapped_requests(meters_bus: MetersBusFactory) -> None:
    bus = await meters_bus([meter(di_order="swapped")])
    c = await client(bus)
    standard = await c.request(m.ReadRequest.current_data(WATER, W1, 1).encode("standard", preamble=4))
    assert standard is not None
    assert standard.control.abnormal
    swapped = await c.request(m.ReadRequest.current_data(WATER, W1, 2).encode("swapped", preamble=4))
    assert swapped is not None
    assert "volume.total" in m.parse_message(swapped, "swapped").values().by_quantity()  # type: ignore[union-attr]
    await c.close()


@pytest.mark.asyncio
async def test_wildcard_read_address_only_on_a_one_meter_line(meters_bus: MetersBusFactory) -> None:
    single = await meters_bus([meter("12345678901234", "gas")])
    c = await client(single)
    reply = await c.request(m.ReadRequest.meter_address(ser=4).encode(preamble=4))
    assert reply is not None
    assert str(reply.address) == "12345678901234"
    assert reply.meter_type == GAS
    assert reply.control.byte == 0x83
    await c.close()
    two = await meters_bus([meter("00000000000001"), meter("00000000000002")])
    c = await client(two)
    assert await c.request(m.ReadRequest.meter_address().encode(preamble=4), 0.3) is None
    assert two.stats["wildcard_unanswered"] == 1
    await c.close()


@pytest.mark.asyncio
async def test_set_time_settlement_day_and_history(meters_bus: MetersBusFactory) -> None:
    clock = SimClock(START, 0.0)
    sim = meter(clock=clock, battery_days=30)
    bus = await meters_bus([sim])
    c = await client(bus)
    when = datetime.datetime(2026, 3, 14, 9, 59, 0)
    ack = await c.request(m.WriteRequest.standard_time(WATER, W1, when).encode(preamble=4))
    assert ack is not None
    assert isinstance(m.parse_message(ack), m.WriteReply)
    assert sim.meter_time() == when
    history = await c.request(m.ReadRequest(WATER, W1, 0xD120, 1).encode(preamble=4))
    assert history is not None
    assert history.control.abnormal  # no settlement day crossed yet
    clock.advance(20 * 86400)  # past 1 April, the settlement day
    now = data(await read(c, WATER, W1))
    settled = now["volume.settlement"]
    assert settled < now["volume.total"]  # type: ignore[operator]
    assert now["battery.low"] is False
    history = await c.request(m.ReadRequest(WATER, W1, 0xD120, 2).encode(preamble=4))
    assert history is not None
    assert m.parse_message(history).values().by_quantity()["volume.settlement"] == settled  # type: ignore[union-attr]
    clock.advance(11 * 86400)
    assert data(await read(c, WATER, W1))["battery.low"] is True
    await c.close()


@pytest.mark.asyncio
async def test_pty_bus_at_8n1(meters_bus: MetersBusFactory) -> None:
    bus = await meters_bus([meter("00000000000001"), meter("00000000000002", "heat")], kind="pty")
    path = bus.endpoint
    assert isinstance(path, str)
    raw = await asyncio.to_thread(pty_exchange, path, m.ReadRequest.current_data(HEAT, W2, 6).encode(preamble=4))
    frames = [e for e in Deframer().feed(raw) if isinstance(e, Frame)]
    assert len(frames) == 1
    assert frames[0].address == W2
    assert "heat.total" in data(m.parse_message(frames[0]))


@pytest.mark.asyncio
async def test_faults_drop_garble_and_late(meters_bus: MetersBusFactory) -> None:
    sims = [meter("00000000000001"), meter("00000000000002")]
    bus = await meters_bus(sims, faults=Faults(drop_request=1.0))
    c = await client(bus)
    assert await read(c, WATER, W1, wait=0.3) is None
    assert bus.stats["drop_request"] == 1
    assert sims[0].requests == 0
    bus.faults = Faults(corrupt_byte=1.0, seed=5)
    await c.send(m.ReadRequest.current_data(WATER, W1).encode(preamble=4))
    events = await c.events(0.3)
    bus.faults = Faults(wrong_address=1.0)
    reply = await c.request(m.ReadRequest.current_data(WATER, W1).encode(preamble=4))
    events += await c.events(0.05)
    assert reply is not None
    assert reply.address != W1  # a valid frame, from the neighbour's address
    assert [e for e in events if getattr(e, "reason", None)]
    assert bus.stats["corrupt_byte"] == 1
    bus.faults = Faults(per_meter={"00000000000001": Faults(late_reply=0.3)})
    assert await read(c, WATER, W1, wait=0.15) is None
    await c.send(m.ReadRequest.current_data(WATER, W2).encode(preamble=4))
    late = [e for e in await c.events(0.6, until_frames=2) if isinstance(e, Frame)]
    assert sorted(str(f.address) for f in late) == ["00000000000001", "00000000000002"]
    await c.close()


# -- configuration and the `meter-gateway simulate` CLI ---------------------------------------------


def test_config_builds_mixed_buses_and_rejects_keys_of_another_protocol() -> None:
    config = config_from_mapping(
        {
            "bus": [
                {
                    "protocol": "cjt188",
                    "meter_type": "heat",
                    "first_address": 5,
                    "count": 2,
                    "valve_time": 3.0,
                    "group": [{"protocol": "dlt698", "meters": ["000000000009"], "report": True}],
                }
            ]
        }
    )
    (bus,) = config.buses
    assert bus.meters == ["00000000000005", "00000000000006"]
    assert bus.meter_type == "heat"
    assert bus.groups[0].protocol == "dlt698"
    assert bus.groups[0].report
    assert bus.all_meters == ["00000000000005", "00000000000006", "000000000009"]
    with pytest.raises(SimConfigError, match="'di_order' is for cjt188"):
        config_from_mapping({"bus": [{"protocol": "dlt698", "di_order": "swapped"}]})
    with pytest.raises(SimConfigError, match="not a 14-digit cjt188 address"):
        config_from_mapping({"bus": [{"protocol": "cjt188", "meters": ["000000000001"]}]})
    with pytest.raises(SimConfigError, match="meter_type must be one of"):
        config_from_mapping({"bus": [{"protocol": "cjt188", "meter_type": "steam"}]})


def test_example_config_has_698_and_188_meters() -> None:
    config = load_config(Path(__file__).resolve().parents[1] / "config" / "simulator.toml")
    protocols = {g.protocol for b in config.buses for g in b.all_groups}
    assert {"dlt698", "cjt188", "dlt645-2007"} <= protocols


async def _ready(stream: asyncio.StreamReader) -> list[str]:
    lines: list[str] = []
    while True:
        line = (await asyncio.wait_for(stream.readline(), 10)).decode().strip()
        assert line, "simulator exited before it was ready"
        if line == "ready":
            return lines
        lines.append(line)


@pytest.mark.asyncio
async def test_cli_serves_a_mixed_bus_from_a_config(tmp_path: Path) -> None:
    path = tmp_path / "sim.toml"
    path.write_text(
        "[simulator]\nspeed = 0.0\ncontrol_port = 0\n"
        '[[bus]]\nprotocol = "cjt188"\nmeter_type = "water"\nport = 0\nmeters = ["00000000000001"]\n'
        '[[bus.group]]\nprotocol = "dlt698"\nmeters = ["000000000002"]\n'
    )
    code = "import sys; from meter_gateway.simulators.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, "--config", str(path), stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    try:
        control, water, elec = await _ready(proc.stdout)
        assert "cjt188 tcp" in water
        assert water.endswith("1 meters: 00000000000001")
        assert "dlt698 tcp" in elec
        host, _, port = water.split()[3].rpartition(":")
        c188 = await ByteClient.connect((host, int(port)), Deframer())
        assert data(await read(c188, WATER, W1))["valve.state"] == "open"
        await c188.close()
        c698 = await ByteClient.connect((host, int(port)), Dlt698Deframer())
        reply = await c698.request(rq.get(ServerAddress.parse("000000000002"), [OAD(0x4001, 2, 0)]).encode(preamble=4))
        assert reply is not None
        await c698.close()
        cport = int(control.split()[1].rpartition(":")[2])
        reader, writer = await asyncio.open_connection("127.0.0.1", cport)
        answers = []
        for command in ("valve 00000000000001 close", "status 000000000002", "press 00000000000001"):
            writer.write(command.encode() + b"\n")
            answers.append((await asyncio.wait_for(reader.readline(), 5)).decode().strip())
        writer.close()
        await writer.wait_closed()
        assert answers[0].startswith("ok valve=closed")
        assert answers[1].startswith("ok relay=closed")
        assert answers[2] == "error a CJ/T 188 meter has no button"
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        rc = await asyncio.wait_for(proc.wait(), 10)
    assert rc == 0

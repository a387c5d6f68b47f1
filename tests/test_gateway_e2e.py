"""End to end: simulated meters on TCP -> gateway (real config file) -> SQLite outbox -> mosquitto
-> a subscriber counting distinct reading ids."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from meter_gateway.drivers.health import HealthBook
from meter_gateway.gateway.config import load_config
from meter_gateway.gateway.daemon.app import Gateway
from meter_gateway.gateway.daemon.meters import Fleet
from meter_gateway.gateway.uplink.contract import Topics, decode_batch
from meter_gateway.simulators.modbus_meter import ModbusSimServer, SimulatedMeter
from tests.plugins.broker import Broker, Subscriber

QUANTITIES = ["energy.active.import.total", "voltage.l1", "current.l1", "power.active.total", "frequency"]


@pytest_asyncio.fixture
async def modbus_sim() -> AsyncIterator[ModbusSimServer]:
    start = time.time()
    meters = {unit: SimulatedMeter("sim-3ph", start=start) for unit in (1, 2, 3)}
    server = ModbusSimServer(meters, transport="tcp", host="127.0.0.1", port=0)
    await server.start()
    yield server
    await server.stop()


def write_config(tmp_path: Path, broker: Broker, sim_port: int, *, interval: str = "1s") -> Path:
    meters = "\n".join(
        f"""
[[meters]]
id = "mb-{unit}"
bus = "modbus-a"
protocol = "modbus"
address = {unit}
model = "sim-3ph"
"""
        for unit in (1, 2, 3)
    )
    text = f"""
[gateway]
id = "gw-test"
state_dir = "{tmp_path / "state"}"

[uplink]
host = "{broker.host}"
port = {broker.port}
keepalive = "10s"

[metrics]
enabled = false

[[buses]]
name = "modbus-a"
type = "tcp"
host = "127.0.0.1"
port = {sim_port}
protocol = "modbus-tcp"
reply_timeout = "1s"

{meters}

[[poll_groups]]
name = "fast"
interval = "{interval}"
quantities = {QUANTITIES!r}
spread = 0.2
""".replace("'", '"')
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return path


async def _run_until(gateway: Gateway, stop: asyncio.Event, condition: object, within: float) -> None:
    task = asyncio.create_task(gateway.run(stop))
    try:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline and not condition():  # type: ignore[operator]
            if task.done():
                task.result()
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


@pytest.mark.asyncio
async def test_readings_arrive_at_the_broker_with_deterministic_ids(
    tmp_path: Path, mosquitto: Broker, modbus_sim: ModbusSimServer
) -> None:
    config = load_config(write_config(tmp_path, mosquitto, modbus_sim.address[1]))
    topics = Topics("gw-test", "meter-gateway")
    state_topic = f"{topics.base}/meters/+/state"
    subscriber = Subscriber(mosquitto, [topics.readings, state_topic]).start()
    started = time.time()
    try:
        gateway = Gateway(config)

        def enough() -> bool:
            batches = [decode_batch(m.payload) for m in subscriber.snapshot(topics.readings)]
            meters = {r.meter for b in batches for r in b.readings}
            return meters == {"mb-1", "mb-2", "mb-3"} and sum(len(b.readings) for b in batches) >= 30

        await _run_until(gateway, asyncio.Event(), enough, within=20)
        batches = [decode_batch(m.payload) for m in subscriber.snapshot(topics.readings)]
        states = [json.loads(m.payload) for m in subscriber.messages if m.topic.endswith("/state")]
    finally:
        subscriber.stop()
    # meter states: retained, one per meter, "since" in gateway (wall) time
    assert {s["meter"]: s["state"] for s in states} == {"mb-1": "online", "mb-2": "online", "mb-3": "online"}
    assert all(started - 1 <= s["since"] <= time.time() for s in states), states
    readings = [r for b in batches for r in b.readings]
    assert {r.meter for r in readings} == {"mb-1", "mb-2", "mb-3"}
    assert {r.qty for r in readings} == set(QUANTITIES)
    for r in readings:
        assert r.id == f"{r.meter}/{r.qty}/s{int(r.id.rsplit('/s', 1)[1])}"  # meter/quantity/slot
        slot = int(r.id.rsplit("/s", 1)[1])
        assert slot % 1 == 0
        if r.qty == "voltage.l1":
            assert 200 < float(r.value) < 260
            assert r.unit == "V"
        if r.qty == "frequency":
            assert 49 < float(r.value) < 51
    # Everything that was published positively acknowledged left the outbox; what remains is
    # only what was still in flight when the gateway stopped.
    assert gateway.stats.committed >= len({r.id for r in readings})
    assert gateway.stats.failures == {}


@pytest.mark.asyncio
async def test_broker_down_and_back_loses_nothing(
    tmp_path: Path, mosquitto: Broker, modbus_sim: ModbusSimServer
) -> None:
    config = load_config(write_config(tmp_path, mosquitto, modbus_sim.address[1]))
    topics = Topics("gw-test", "meter-gateway")
    subscriber = Subscriber(mosquitto, [topics.readings], client_id="e2e-sub", clean=False).start()
    gateway = Gateway(config)
    stop = asyncio.Event()
    task = asyncio.create_task(gateway.run(stop))
    try:
        await asyncio.sleep(2.5)
        mosquitto.stop()
        await asyncio.sleep(2.5)  # readings keep being committed while the broker is away
        committed_during_outage = gateway.stats.committed
        mosquitto.start()
        await asyncio.sleep(3.5)
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
    assert committed_during_outage > 0
    db = sqlite3.connect(tmp_path / "state" / "outbox.sqlite")
    with contextlib.closing(db):
        (left,) = db.execute("SELECT count(*) FROM readings").fetchone()
    await asyncio.sleep(1.0)
    subscriber.stop()
    delivered = {r.id for m in subscriber.snapshot(topics.readings) for r in decode_batch(m.payload).readings}
    # Every reading the gateway committed was delivered, or is still in the outbox to deliver.
    assert len(delivered) + left >= gateway.stats.committed
    assert len(delivered) > 0


class SteppableClock:
    """Wall clock with an offset the test steps, as NTP or an operator would."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@pytest.mark.asyncio
async def test_clock_stepped_forward_and_back(tmp_path: Path, mosquitto: Broker, modbus_sim: ModbusSimServer) -> None:
    config = load_config(write_config(tmp_path, mosquitto, modbus_sim.address[1]))
    topics = Topics("gw-test", "meter-gateway")
    subscriber = Subscriber(mosquitto, [topics.readings]).start()
    clock = SteppableClock()
    gateway = Gateway(config, clock=clock)
    stop = asyncio.Event()
    task = asyncio.create_task(gateway.run(stop))
    try:
        await asyncio.sleep(2.5)
        before_forward = gateway.stats.readings
        clock.offset += 30.0  # forward: the skipped slots are missed (and counted), polling goes on
        await asyncio.sleep(2.5)
        assert gateway.stats.missed_slots >= 3 * 25
        assert gateway.stats.readings > before_forward
        clock.offset -= 3.0  # back: no slot is handed out twice; polling resumes when time catches up
        await asyncio.sleep(5.0)
        after_back = gateway.stats.readings
        await asyncio.sleep(1.5)
        assert gateway.stats.readings > after_back
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
    await asyncio.sleep(0.5)
    subscriber.stop()
    ids = [r.id for m in subscriber.snapshot(topics.readings) for r in decode_batch(m.payload).readings]
    db = sqlite3.connect(tmp_path / "state" / "outbox.sqlite")
    with contextlib.closing(db):
        (left,) = db.execute("SELECT count(*) FROM readings").fetchone()
    # every committed reading is at the broker or still in the outbox: a clock step deletes nothing
    assert len(set(ids)) + left >= gateway.stats.committed
    assert len(ids) == len(set(ids)), "a slot was read twice after the step back"


@pytest.mark.asyncio
async def test_a_modbus_bus_reports_its_links_requests_and_bytes(
    tmp_path: Path, mosquitto: Broker, modbus_sim: ModbusSimServer
) -> None:
    """A Modbus bus's requests go through the bus's own engine: its snapshot (what the metrics
    export) counts them, with the link's bytes, connection state and exception replies by code."""
    config = load_config(write_config(tmp_path, mosquitto, modbus_sim.address[1]))
    fleet = Fleet(HealthBook())
    fleet.build(config)
    await fleet.open()
    try:
        bus = fleet.buses["modbus-a"]
        assert bus.snapshot()["sent"] == 0
        now = time.time()
        for meter in ("mb-1", "mb-2"):
            readings = await fleet.meters[meter].read(QUANTITIES, float(int(now)), now)
            assert {r.quantity for r in readings} == set(QUANTITIES)
        snap = bus.snapshot()
        # sim-3ph's plan for these quantities is the same number of requests for every meter
        assert snap["sent"] > 0
        assert snap["sent"] % 2 == 0
        assert snap["ok"] == snap["sent"]
        assert snap["modbus_exception_0x02"] == 0  # every code exported from the start
        assert snap["link_connected"] == 1
        assert snap["link_connects"] == 1
        assert snap["link_bytes_out"] >= 12 * snap["sent"]  # a Modbus TCP read request is 12 bytes
        assert snap["link_bytes_in"] > snap["link_bytes_out"]  # the replies carry the registers
    finally:
        await fleet.close()

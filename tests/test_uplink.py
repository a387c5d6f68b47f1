"""The MQTT uplink against a real mosquitto, and the MQTT contract it speaks."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import struct
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
import pytest_asyncio

from meter_gateway.drivers.backoff import BackoffPolicy
from meter_gateway.drivers.reading import Quality, Reading
from meter_gateway.gateway.commands.envelope import TERMINAL_STATES
from meter_gateway.gateway.store.outbox import AsyncOutbox
from meter_gateway.gateway.uplink import contract
from meter_gateway.gateway.uplink.mqtt_connection import MqttConnection, MqttError
from meter_gateway.gateway.uplink.session import (
    InboundMessage,
    Protocol,
    TlsConfig,
    Uplink,
    UplinkConfig,
    UplinkConfigError,
)
from tests.plugins.broker import Broker, Subscriber
from tests.plugins.simulators import SimBusFactory
from tests.test_command_exec import envelope, mid
from tests.test_command_service import TOPICS as COMMAND_TOPICS
from tests.test_command_service import acks_of, gateway
from tests.test_outbox import write_v3_outbox

ROOT = Path(__file__).resolve().parents[1]
FAST: dict[str, Any] = {
    "reconnect": BackoffPolicy(initial=0.05, maximum=0.3),
    "refused_backoff": BackoffPolicy(initial=0.05, maximum=0.2),
    "keepalive": 10,
}


def readings(n: int, *, start: int = 0, meters: int = 7) -> list[Reading]:
    return [
        Reading(
            f"{i % meters:012d}",
            "energy.import",
            1000.0 + i / 4,
            "kWh",
            gateway_time=1_700_000_000.5 + i,
            slot=1_700_000_000.0 + 900 * i,
            quality=Quality.BACKFILLED if i % 5 == 0 else Quality.GOOD,
        )
        for i in range(start, start + n)
    ]


async def until(cond: Callable[[], object], within: float = 5.0, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    while not cond():
        assert loop.time() < end, f"{what} not reached within {within} s"
        await asyncio.sleep(0.01)


def batches_on(sub: Subscriber, topic: str) -> list[contract.ReadingsBatch]:
    return [contract.decode_batch(m.payload) for m in sub.snapshot(topic)]


def ids_on(sub: Subscriber, topic: str) -> list[str]:
    return contract.reading_ids(batches_on(sub, topic))


Starter = Callable[..., Awaitable[Uplink]]


@pytest_asyncio.fixture
async def start_uplink(tmp_path: Path) -> AsyncIterator[Starter]:
    """``await start_uplink(broker, gateway_id=..., **config)``: an Uplink running on its own outbox."""
    running: list[tuple[Uplink, asyncio.Task[None], AsyncOutbox]] = []

    async def start(broker: Broker, *, gateway_id: str = "gw-1", on_command: Any = None, **config: Any) -> Uplink:
        box = await AsyncOutbox.open(tmp_path / f"{gateway_id}-{len(running)}.sqlite", synchronous="NORMAL")
        settings = {**FAST, **config}
        if broker.tls is not None and "tls" not in settings:
            settings["tls"] = TlsConfig(
                ca_file=broker.tls.ca_file, cert_file=broker.tls.client_cert, key_file=broker.tls.client_key
            )
        uplink = Uplink(
            UplinkConfig(gateway_id=gateway_id, host=broker.host, port=broker.port, **settings),
            box,
            on_command=on_command,
        )
        running.append((uplink, asyncio.create_task(uplink.run()), box))
        return uplink

    yield start
    for uplink, task, box in running:
        await asyncio.wait_for(uplink.stop(), 10)
        await task
        await box.close()


@pytest.fixture
def subscriber() -> Any:
    subs: list[Subscriber] = []

    def make(broker: Broker, topics: list[str], **kwargs: Any) -> Subscriber:
        sub = Subscriber(broker, topics, **kwargs).start()
        subs.append(sub)
        return sub

    yield make
    for sub in subs:
        sub.stop()


# -- the contract ------------------------------------------------------------------------------


def test_topics_follow_the_versioned_layout() -> None:
    t = contract.Topics("gw-7")
    assert t.readings == "meter-gateway/v1/gw-7/readings"
    assert t.status == "meter-gateway/v1/gw-7/status"
    assert t.meter_state("000012345678") == "meter-gateway/v1/gw-7/meters/000012345678/state"
    assert t.commands_filter == "meter-gateway/v1/gw-7/commands/#"
    assert t.acks == "meter-gateway/v1/gw-7/acks"
    assert contract.shared_readings_filter() == "$share/headend/meter-gateway/v1/+/readings"


@pytest.mark.parametrize("bad", ["", "a/b", "a+b", "x#", "$SYS", "a\x00b"])
def test_ids_that_would_break_topics_are_refused(bad: str) -> None:
    with pytest.raises(contract.ContractError):
        contract.Topics(bad)
    with pytest.raises(contract.ContractError):
        contract.Topics("gw").meter_state(bad)


def test_batch_encoding_round_trips_and_is_compact() -> None:
    wire = [
        contract.WireReading(id="m/e/s60", row=1, meter="m", qty="e", value=1.5, unit="kWh", gt=61.0, slot=60.0),
        contract.WireReading(id="m/r/m55", row=2, meter="m", qty="r", value=1, unit="", gt=61.0, q=8, mt=55.0),
    ]
    payload = contract.encode_batch(
        gateway_id="gw",
        outbox="abc",
        first_row=1,
        last_row=2,
        sent_at=62.0,
        encoded_readings=[contract.encode_reading(w) for w in wire],
    )
    assert b" " not in payload
    assert b'"mt"' not in payload.split(b"},{")[0]  # absent fields are omitted, not null
    batch = contract.decode_batch(payload)
    assert batch.readings == wire
    assert (batch.v, batch.gateway, batch.outbox, batch.first_row, batch.last_row) == (1, "gw", "abc", 1, 2)
    with pytest.raises(contract.ContractError):
        contract.decode_batch(b'{"v":1,"gateway":"gw"}')
    with pytest.raises(contract.ContractError):
        contract.decode_batch(payload.replace(b'"v":1', b'"v":2'))


def test_bad_uplink_config_is_a_clear_error() -> None:
    with pytest.raises(UplinkConfigError, match="window"):
        UplinkConfig(gateway_id="gw", host="h", window=0)
    with pytest.raises(UplinkConfigError, match="username"):
        UplinkConfig(gateway_id="gw", host="h", password="x")
    with pytest.raises(contract.ContractError):
        UplinkConfig(gateway_id="gw/1", host="h")
    with pytest.raises(UplinkConfigError, match="protocol"):
        UplinkConfig(gateway_id="gw", host="h", protocol="4")  # type: ignore[arg-type]
    assert UplinkConfig(gateway_id="gw", host="h", protocol="3.1.1").protocol is Protocol.V311  # type: ignore[arg-type]


# -- delivery ----------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_readings_arrive_in_order_with_their_ids_and_fields(
    mosquitto: Broker, start_uplink: Starter, subscriber: Any
) -> None:
    topics = contract.Topics("gw-1")
    sub = subscriber(mosquitto, [topics.readings, topics.status])
    uplink = await start_uplink(mosquitto, batch_max_readings=1000)
    sent = readings(2500)
    await uplink.outbox.add(sent)

    await sub.wait_for(lambda _: len(ids_on(sub, topics.readings)) >= 2500)
    await until(lambda: uplink.outbox.depth == 0, what="outbox drained")
    batches = batches_on(sub, topics.readings)
    assert [len(b.readings) for b in batches] == [1000, 1000, 500]
    assert ids_on(sub, topics.readings) == [r.id for r in sent]
    assert [r.row for b in batches for r in b.readings] == list(range(1, 2501))
    assert all(b.outbox == uplink.outbox.instance and b.gateway == "gw-1" for b in batches)
    first = batches[0].readings[0]
    assert (first.meter, first.qty, first.value, first.unit) == ("000000000000", "energy.import", 1000.0, "kWh")
    assert (first.gt, first.slot, first.mt, first.q) == (1_700_000_000.5, 1_700_000_000.0, None, 1)
    assert uplink.stats.published_readings == 2500
    assert uplink.stats.published_batches == 3
    assert uplink.stats.last_delivery is not None
    assert uplink.stats.protocol == "5"

    status = [contract.decode_status(m.payload) for m in sub.snapshot(topics.status)]
    assert status[-1].state == "online"
    assert status[-1].version


@pytest.mark.asyncio
async def test_an_old_schema_outbox_delivers_its_undelivered_rows_once_with_their_ids(
    mosquitto: Broker, start_uplink: Starter, subscriber: Any, tmp_path: Path
) -> None:
    old = readings(30)
    instance = write_v3_outbox(tmp_path / "gw-1-0.sqlite", old, delivered=range(1, 6))  # the file start_uplink opens
    topics = contract.Topics("gw-1")
    sub = subscriber(mosquitto, [topics.readings])
    uplink = await start_uplink(mosquitto, batch_max_readings=7)
    assert uplink.outbox.instance == instance
    new = readings(4, start=30)
    result = await uplink.outbox.add(old[10:20] + new)  # re-acquired after the upgrade: duplicates
    assert (result.committed, result.duplicates) == (4, 10)

    await sub.wait_for(lambda _: len(ids_on(sub, topics.readings)) >= 29)
    await until(lambda: uplink.outbox.depth == 0, what="outbox drained")
    sent = [(r.row, r.id, r.value, r.gt, r.slot, r.q) for b in batches_on(sub, topics.readings) for r in b.readings]
    expected = [(i + 1, r.id, r.value, r.gateway_time, r.slot, int(r.quality)) for i, r in enumerate(old + new)]
    assert sent == expected[5:]  # once each, the old rows with their numbers and ids, the new ones after
    assert all(b.outbox == instance for b in batches_on(sub, topics.readings))


@pytest.mark.asyncio
async def test_backlog_drains_in_row_order_while_new_readings_arrive(
    mosquitto: Broker, subscriber: Any, tmp_path: Path
) -> None:
    topic = contract.Topics("gw-1").readings
    sub = subscriber(mosquitto, [topic])
    box = await AsyncOutbox.open(tmp_path / "o.sqlite", synchronous="NORMAL")
    await box.add(readings(20_000))  # accumulated during an outage
    uplink = Uplink(UplinkConfig(gateway_id="gw-1", host=mosquitto.host, port=mosquitto.port, **FAST), box)
    task = asyncio.create_task(uplink.run())
    try:
        for k in range(40):  # acquisition goes on meanwhile
            await box.add(readings(100, start=20_000 + 100 * k))
            await asyncio.sleep(0.005)
        await until(lambda: box.depth == 0, within=20, what="backlog and new readings delivered")
        rows = [
            r.row
            for b in await sub.wait_for(lambda _: len(ids_on(sub, topic)) >= 24_000)
            for r in contract.decode_batch(b.payload).readings
        ]
        assert rows == list(range(1, 24_001))  # no failures, so no resends: strictly in row order
    finally:
        await uplink.stop()
        await task
        await box.close()


@pytest.mark.asyncio
async def test_batches_respect_the_byte_limit(mosquitto: Broker, start_uplink: Starter, subscriber: Any) -> None:
    topic = contract.Topics("gw-1").readings
    sub = subscriber(mosquitto, [topic])
    uplink = await start_uplink(mosquitto, batch_max_bytes=4096)
    await uplink.outbox.add(readings(300))
    await sub.wait_for(lambda _: len(ids_on(sub, topic)) >= 300)
    sizes = [len(m.payload) for m in sub.snapshot(topic)]
    assert max(sizes) <= 4096
    assert len(sizes) > 300 * 100 // 4096


@pytest.mark.asyncio
async def test_publish_window_is_bounded_by_config_and_broker_receive_maximum(
    broker_factory: Callable[..., Broker], start_uplink: Starter
) -> None:
    broker = broker_factory(extra_config="max_inflight_messages 3")
    uplink = await start_uplink(broker, batch_max_readings=5, window=50)
    await uplink.outbox.add(readings(600))
    await until(lambda: uplink.outbox.depth == 0, what="outbox drained")
    assert uplink.stats.published_batches == 120
    assert 1 <= uplink.stats.max_inflight_batches <= 3


@pytest.mark.asyncio
async def test_broker_restart_mid_stream_loses_nothing(
    broker_factory: Callable[..., Broker], start_uplink: Starter, subscriber: Any
) -> None:
    # the head-end side needs what docs/mqtt.md asks of it: a persistent session on a broker
    # that persists sessions, so messages queue for it while it reconnects
    broker = broker_factory(persistence=True)
    topic = contract.Topics("gw-1").readings
    sub = subscriber(broker, [topic], client_id="headend-1", clean=False)
    uplink = await start_uplink(broker, batch_max_readings=50)

    sent: list[Reading] = []

    async def acquire() -> None:
        for k in range(60):
            batch = readings(50, start=50 * k)
            await uplink.outbox.add(batch)
            sent.extend(batch)
            await asyncio.sleep(0.01)

    producer = asyncio.create_task(acquire())
    await until(lambda: uplink.stats.published_readings >= 300, what="first deliveries")
    await broker.astop()
    await until(lambda: not uplink.stats.connected, what="uplink noticed the broker going")
    await asyncio.sleep(0.2)
    await broker.astart()
    await producer
    await until(lambda: uplink.outbox.depth == 0, within=10, what="outbox drained after the restart")
    assert uplink.stats.connects >= 2

    wanted = {r.id for r in sent}
    got = await sub.wait_for(lambda _: wanted <= set(ids_on(sub, topic)), within=10)
    assert got
    received = ids_on(sub, topic)
    assert set(received) == wanted  # after dedupe nothing is missing (duplicates are allowed)


@pytest.mark.asyncio
async def test_broker_killed_rows_stay_until_acknowledged(mosquitto: Broker, start_uplink: Starter) -> None:
    uplink = await start_uplink(mosquitto)
    await until(lambda: uplink.stats.connected, what="connected")
    await mosquitto.akill()
    await until(lambda: not uplink.stats.connected, what="disconnect noticed")
    await uplink.outbox.add(readings(100))
    await asyncio.sleep(0.3)  # reconnect attempts fail meanwhile
    assert uplink.outbox.depth == 100
    assert uplink.stats.failures.get("connect_error", 0) >= 1
    await mosquitto.astart()
    await until(lambda: uplink.outbox.depth == 0, what="delivered after the broker came back")


ACL_WITHOUT_READINGS = """
topic readwrite meter-gateway/v1/gw-acl/status
topic readwrite meter-gateway/v1/gw-acl/commands/#
topic readwrite meter-gateway/v1/gw-acl/meters/#
"""


@pytest.mark.asyncio
async def test_negative_puback_keeps_rows_and_recovers(
    broker_factory: Callable[..., Broker], start_uplink: Starter, caplog: pytest.LogCaptureFixture
) -> None:
    broker = broker_factory(acl=ACL_WITHOUT_READINGS)
    uplink = await start_uplink(broker, gateway_id="gw-acl", batch_max_readings=20)
    await uplink.outbox.add(readings(100))
    await until(lambda: uplink.stats.failures.get("not_authorized", 0) >= 3, what="refusals counted")
    assert uplink.outbox.depth == 100  # a PUBACK with 0x87 acked nothing
    assert uplink.stats.published_readings == 0
    assert uplink.stats.connected  # a refusal is not a connection problem
    refusal_lines = [r for r in caplog.records if "event=batch_refused" in r.getMessage()]
    assert len(refusal_lines) == 1  # one line, not one per retry

    broker.set_acl(ACL_WITHOUT_READINGS + "topic readwrite meter-gateway/v1/gw-acl/readings\n")
    broker.reload()
    await until(lambda: uplink.outbox.depth == 0, what="delivered once allowed")
    assert uplink.stats.published_readings == 100
    assert "event=broker_accepts_again" in caplog.text


@pytest.mark.asyncio
async def test_a_subscribe_to_a_frozen_broker_is_a_lost_connection_not_a_crash(mosquitto: Broker) -> None:
    """A broker that stops answering between CONNACK and SUBACK: MqttError (the uplink reconnects),
    not a bare TimeoutError that ends the session as an unexpected failure with a traceback."""
    conn = MqttConnection(mosquitto.host, mosquitto.port, identifier="gw-frozen-sub", mqtt5=True, timeout=1.0)
    await conn.connect()
    assert mosquitto.pid is not None
    os.kill(mosquitto.pid, signal.SIGSTOP)
    try:
        with pytest.raises(MqttError, match="no SUBACK within 1 s"):
            await conn.subscribe("meter-gateway/v1/gw-frozen-sub/commands/#")
    finally:
        os.kill(mosquitto.pid, signal.SIGCONT)
        await conn.disconnect(within=1.0)


@pytest.mark.asyncio
async def test_a_connection_reset_is_logged_as_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """paho reports a reset socket at its ERR level; for the gateway it is a lost connection
    (a broker restarting), reported and retried, so a WARNING, not an ERROR."""

    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)  # the CONNECT has arrived
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with RST
        writer.transport.abort()

    server = await asyncio.start_server(reset, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    caplog.set_level(logging.DEBUG, logger="test.paho")
    conn = MqttConnection(
        "127.0.0.1", port, identifier="gw-reset", mqtt5=True, timeout=5.0, logger=logging.getLogger("test.paho")
    )
    try:
        with pytest.raises(MqttError, match="before CONNACK"):
            await conn.connect()
    finally:
        server.close()
        await server.wait_closed()
    paho_lines = [r for r in caplog.records if r.name == "test.paho"]
    assert any("failed to receive on socket" in r.getMessage() and r.levelno == logging.WARNING for r in paho_lines)
    assert all(r.levelno < logging.ERROR for r in paho_lines)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("end", "ack_timeout"),
    [("thaw", 30.0), ("kill", 3.0)],  # keepalive notices the freeze first / the PUBACK timeout does
)
async def test_a_frozen_broker_costs_a_reconnect_and_logs_no_error(
    broker_factory: Callable[..., Broker],
    start_uplink: Starter,
    subscriber: Any,
    caplog: pytest.LogCaptureFixture,
    end: str,
    ack_timeout: float,
) -> None:
    """mosquitto frozen (SIGSTOP) for longer than the keepalive while readings and acks are in
    flight, then thawed or killed and restarted: the uplink reconnects and delivers everything,
    and nothing logs an ERROR, a traceback or "Future exception was never retrieved"."""
    caplog.set_level(logging.INFO)
    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    broker = broker_factory()
    assert broker.pid is not None
    uplink = await start_uplink(
        broker,
        keepalive=5,
        connect_timeout=2.0,
        ack_timeout=ack_timeout,
        batch_max_readings=20,
        # capped low: attempts on the frozen, then dead broker must not push the next one past the
        # restart by tens of seconds (the default cap is 30 s)
        reconnect=BackoffPolicy(initial=0.2, maximum=2.0),
    )
    await until(lambda: uplink.stats.connected, what="connected")
    added = 0
    outcomes: list[bool] = []

    async def produce() -> None:
        nonlocal added
        while True:
            await uplink.outbox.add(readings(20, start=added))
            added += 20
            # command acks go the other publish path, with their own timeout
            outcomes.append(await uplink.publish(COMMAND_TOPICS.acks, b'{"ack":1}', within=1.0))
            await asyncio.sleep(0.05)

    producer = asyncio.create_task(produce())
    try:
        await until(lambda: uplink.stats.published_readings >= 100, what="deliveries before the freeze")
        os.kill(broker.pid, signal.SIGSTOP)
        try:
            await until(lambda: not uplink.stats.connected, within=20, what="the frozen broker noticed")
            await until(
                lambda: uplink.stats.connect_failures >= 1, within=10, what="a reconnect attempt on the frozen broker"
            )
            assert uplink.outbox.depth > 0  # readings piled up meanwhile
        finally:
            if end == "kill":
                await broker.akill()  # SIGKILL ends a stopped process too: the frozen broker never wakes
            else:
                os.kill(broker.pid, signal.SIGCONT)
        if end == "kill":
            await broker.astart()
        await until(lambda: uplink.stats.connected, within=30, what="reconnected")
        assert False in outcomes  # acks published during the freeze were not confirmed (kept by the caller)
        assert await uplink.publish(COMMAND_TOPICS.acks, b'{"ack":2}', within=5.0)
    finally:
        producer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await producer
    await until(lambda: uplink.outbox.depth == 0, within=20, what="everything delivered after the freeze")
    late = subscriber(broker, [contract.Topics("gw-1").readings])
    await uplink.outbox.add(readings(5, start=added))
    await late.wait_for(lambda m: len(ids_on(late, contract.Topics("gw-1").readings)) >= 5)

    gc.collect()  # a future nobody retrieved reports itself when it is collected
    loop.set_exception_handler(None)
    assert unhandled == []
    troubles = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info is not None]
    assert troubles == [], [r.getMessage() for r in troubles]
    assert any("event=mqtt_" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


_DYING_GATEWAY = """
import asyncio, sys
from meter_gateway.gateway.store.outbox import AsyncOutbox
from meter_gateway.gateway.uplink.session import Uplink, UplinkConfig

async def main():
    box = await AsyncOutbox.open(sys.argv[1])
    uplink = Uplink(UplinkConfig(gateway_id="gw-lwt", host="127.0.0.1", port=int(sys.argv[2]), keepalive=5), box)
    await uplink.run()

asyncio.run(main())
"""


@pytest.mark.asyncio
async def test_last_will_says_offline_when_the_gateway_dies(mosquitto: Broker, subscriber: Any, tmp_path: Path) -> None:
    topic = contract.Topics("gw-lwt").status
    sub = subscriber(mosquitto, [topic])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _DYING_GATEWAY, str(tmp_path / "lwt.sqlite"), str(mosquitto.port), env=env, cwd=ROOT
    )
    try:
        await sub.wait_for(lambda m: any(contract.decode_status(x.payload).state == "online" for x in m), within=10)
    finally:
        proc.send_signal(signal.SIGKILL)  # no DISCONNECT: the broker must publish the Will
        await asyncio.wait_for(proc.wait(), 10)
    got = await sub.wait_for(lambda m: contract.decode_status(m[-1].payload).state == "offline")
    last = contract.decode_status(got[-1].payload)
    assert last.reason == "connection lost"

    late = subscriber(mosquitto, [topic])  # a head-end that starts later still learns it
    seen = await late.wait_for(lambda m: len(m) >= 1)
    assert seen[0].retain
    assert contract.decode_status(seen[0].payload).state == "offline"


@pytest.mark.asyncio
async def test_clean_stop_publishes_retained_offline_and_finishes_in_flight(
    mosquitto: Broker, subscriber: Any, tmp_path: Path
) -> None:
    box = await AsyncOutbox.open(tmp_path / "o.sqlite")
    uplink = Uplink(UplinkConfig(gateway_id="gw-1", host=mosquitto.host, port=mosquitto.port, **FAST), box)
    task = asyncio.create_task(uplink.run())
    try:
        await until(lambda: uplink.stats.connected, what="connected")
        await box.add(readings(500))
        await until(lambda: uplink.stats.published_readings > 0, what="first PUBACK")
        await asyncio.wait_for(uplink.stop(), 10)
        await task
        assert not uplink.stats.connected
        # whatever was in flight got its PUBACK and was acked; the rest waits for the next run
        assert box.depth == 500 - uplink.stats.published_readings
    finally:
        await box.close()
    sub = subscriber(mosquitto, [contract.Topics("gw-1").status])
    got = await sub.wait_for(lambda m: len(m) >= 1)
    status = contract.decode_status(got[0].payload)
    assert got[0].retain
    assert (status.state, status.reason) == ("offline", "shutdown")


async def _refuse_mqtt5_proxy(target: Broker) -> tuple[asyncio.Server, int]:
    """A broker front that answers MQTT 5 CONNECTs like a 3.1.1-only broker and passes the rest."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = await reader.read(65536)
        i = 1
        while first[i] & 0x80:  # remaining-length varint
            i += 1
        level = first[i + 1 + 6]  # after the varint: 00 04 "MQTT", then the protocol level
        if level == 5:
            writer.write(b"\x20\x02\x00\x01")  # CONNACK, return code 1: unacceptable protocol version
            await writer.drain()
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection(target.host, target.port)
        up_writer.write(first)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.asyncio
async def test_falls_back_to_mqtt_311_when_the_broker_refuses_5(
    mosquitto: Broker, subscriber: Any, tmp_path: Path
) -> None:
    server, port = await _refuse_mqtt5_proxy(mosquitto)
    topic = contract.Topics("gw-1").readings
    sub = subscriber(mosquitto, [topic])
    box = await AsyncOutbox.open(tmp_path / "o.sqlite")
    uplink = Uplink(UplinkConfig(gateway_id="gw-1", host="127.0.0.1", port=port, **FAST), box)
    task = asyncio.create_task(uplink.run())
    try:
        await box.add(readings(10))
        await until(lambda: box.depth == 0, what="delivered over 3.1.1")
        assert uplink.stats.protocol == Protocol.V311
        await sub.wait_for(lambda _: len(ids_on(sub, topic)) == 10)
    finally:
        await uplink.stop()
        await task
        await box.close()
        server.close()
        await server.wait_closed()


@pytest.mark.asyncio
async def test_tls_with_client_certificate(
    broker_factory: Callable[..., Broker], start_uplink: Starter, tmp_path: Path
) -> None:
    broker = broker_factory(tls=True)
    assert broker.tls is not None
    uplink = await start_uplink(broker)
    await uplink.outbox.add(readings(20))
    await until(lambda: uplink.outbox.depth == 0, what="delivered over TLS")

    # without a client certificate the broker (require_certificate) turns us away: counted, retried
    stranger = await start_uplink(broker, gateway_id="gw-2", tls=TlsConfig(ca_file=broker.tls.ca_file))
    await until(lambda: stranger.stats.connect_failures >= 2, what="TLS refusals")
    assert not stranger.stats.connected


def test_unreadable_tls_files_fail_at_start_up(tmp_path: Path) -> None:
    with pytest.raises(UplinkConfigError, match="certificates"):
        Uplink(
            UplinkConfig(gateway_id="gw", host="h", tls=TlsConfig(ca_file=str(tmp_path / "missing.pem"))),
            None,  # type: ignore[arg-type]
        )


@pytest.mark.asyncio
async def test_username_and_password(broker_factory: Callable[..., Broker], start_uplink: Starter) -> None:
    broker = broker_factory(users={"gw-1": "s3cret"})
    wrong = await start_uplink(broker, gateway_id="gw-x", username="gw-1", password="nope")
    right = await start_uplink(broker, username="gw-1", password="s3cret")
    await right.outbox.add(readings(5))
    await until(lambda: right.outbox.depth == 0, what="delivered with a password")
    await until(lambda: wrong.stats.failures.get("connect_refused", 0) >= 1, what="refusal counted")
    assert not wrong.stats.connected


@pytest.mark.asyncio
@pytest.mark.parametrize("protocol", [Protocol.V5, Protocol.V311])
async def test_commands_reach_the_hook_and_retained_ones_never_run(
    mosquitto: Broker, start_uplink: Starter, protocol: Protocol
) -> None:
    import paho.mqtt.publish as publish

    topics = contract.Topics("gw-1")
    # a stale retained command waiting on the broker before the gateway connects
    await asyncio.to_thread(
        publish.single,
        f"{topics.commands}/old",
        b"stale",
        qos=1,
        retain=True,
        hostname=mosquitto.host,
        port=mosquitto.port,
    )
    got: list[InboundMessage] = []

    async def hook(msg: InboundMessage) -> None:
        got.append(msg)
        if msg.payload == b"boom":
            raise RuntimeError("a bad command must not take the uplink down")

    uplink = await start_uplink(mosquitto, on_command=hook, protocol=protocol)
    await until(lambda: uplink.stats.connected, what="connected")
    await asyncio.sleep(0.1)  # let the subscription settle
    for payload in (b"boom", b"disconnect meter 1"):
        await asyncio.to_thread(
            publish.single, f"{topics.commands}/c-1", payload, qos=1, hostname=mosquitto.host, port=mosquitto.port
        )
    await until(lambda: any(m.payload == b"disconnect meter 1" for m in got), what="live command")
    live = [m for m in got if not m.retained]
    assert [m.payload for m in live] == [b"boom", b"disconnect meter 1"]
    assert live[1].topic == f"{topics.commands}/c-1"
    assert uplink.stats.command_errors == 1
    stale = [m for m in got if m.retained]
    if protocol is Protocol.V5:
        assert stale == []  # retain handling 2: the broker never sends them
    else:
        assert [m.payload for m in stale] == [b"stale"]  # 3.1.1: delivered, flagged, never to run
        assert uplink.stats.commands_retained == 1
    # clear the retained message so it does not leak into other tests on this broker
    await asyncio.to_thread(
        publish.single, f"{topics.commands}/old", b"", qos=1, retain=True, hostname=mosquitto.host, port=mosquitto.port
    )


@pytest.mark.asyncio
async def test_a_signed_command_published_retained_while_connected_never_runs(
    tmp_path: Path, mosquitto: Broker, sim_bus: SimBusFactory, subscriber: Any
) -> None:
    """MQTT 5: a genuine, signed, valid disconnect published with retain while the gateway is
    subscribed is forwarded at once; Retain As Published keeps its retain flag, so it is refused
    (``retained``) like any retained command, and the relay stays closed."""
    handle = await sim_bus(1)
    meter = handle.meters[0]
    acks = subscriber(mosquitto, [COMMAND_TOPICS.acks])
    async with gateway(tmp_path, mosquitto, handle, protocol=Protocol.V5) as gw:
        cut = envelope("disconnect", [mid(meter)], expires=600)
        await gw.command(cut, retain=True)
        await until(lambda: any(a.state == "rejected" for a in acks_of(acks, cut.id)), what="the refusal")
        received, rejected = acks_of(acks, cut.id)
        assert (received.state, rejected.state, rejected.reason) == ("received", "rejected", "retained")
        assert gw.service.stats.rejected == {"retained": 1}
        assert gw.uplink.stats.commands_retained == 1
        await asyncio.sleep(0.5)  # an execution, had one started, would have reached the meter by now
        assert meter.relay_closed
        assert meter.trip_count == 0
        assert gw.service.stats.accepted == 0

        # clearing the retained message (an empty retained publish) is refused the same way
        await gw.command(b"", retain=True)
        await until(lambda: gw.service.stats.rejected == {"retained": 2}, what="the empty retained message refused")
        # the refusal spent nothing: the same command sent as a command (not retained) runs
        await gw.command(cut)
        await until(
            lambda: any(a.meter and a.state in TERMINAL_STATES for a in acks_of(acks, cut.id)), what="execution"
        )
        assert [a.state for a in acks_of(acks, cut.id) if a.meter][-1] == "verified"
        assert not meter.relay_closed


@pytest.mark.asyncio
async def test_meter_states_are_retained_and_republished_on_reconnect(
    mosquitto: Broker, start_uplink: Starter, subscriber: Any
) -> None:
    topics = contract.Topics("gw-1")
    uplink = await start_uplink(mosquitto)
    uplink.set_meter_state("000000000001", "offline", since=1_700_000_000.0, detail="no answer x3")
    await until(lambda: uplink.stats.connected, what="connected")
    uplink.set_meter_state("000000000002", "online", since=1_700_000_100.0)
    live = subscriber(mosquitto, [f"{topics.base}/meters/+/state"])
    await live.wait_for(lambda m: len({x.topic for x in m}) >= 2)
    sub = subscriber(mosquitto, [f"{topics.base}/meters/+/state"])  # joins after both went out
    got = await sub.wait_for(lambda m: len(m) >= 2)
    states = {m.topic: contract.decode_meter_state(m.payload) for m in got}
    assert all(m.retain for m in got)
    one = states[topics.meter_state("000000000001")]
    assert (one.state, one.since, one.detail, one.gateway) == ("offline", 1_700_000_000.0, "no answer x3", "gw-1")
    assert states[topics.meter_state("000000000002")].state == "online"
    with pytest.raises(contract.ContractError):
        uplink.set_meter_state("bad/id", "online", since=0.0)

    # the broker forgot everything (no persistence): the states come back with the connection
    await mosquitto.astop()
    await mosquitto.astart()
    await until(lambda: uplink.stats.connects >= 2 and uplink.stats.connected, what="reconnected")
    late = subscriber(mosquitto, [f"{topics.base}/meters/+/state"])
    got = await late.wait_for(lambda m: len(m) >= 2)
    assert {m.topic for m in got} == set(states)


def test_wire_payload_is_plain_json_for_any_consumer() -> None:
    payload = contract.encode_status(contract.Status(v=1, gateway="gw", state="online", version="0.1.0"))
    assert msgspec.json.decode(payload) == {"v": 1, "gateway": "gw", "state": "online", "version": "0.1.0"}


@pytest.mark.asyncio
async def test_many_meter_states_go_out_through_a_bounded_number_of_tasks(
    mosquitto: Broker, start_uplink: Starter, subscriber: Any
) -> None:
    n = 1000
    topics = contract.Topics("gw-states")
    sub = subscriber(mosquitto, [f"{topics.base}/meters/+/state"])
    uplink = await start_uplink(mosquitto, gateway_id="gw-states", window=4)
    for i in range(n):  # before the connection: all of them go out when it comes up
        uplink.set_meter_state(f"m{i:05d}", "online", since=1_700_000_000.0 + i)
    most_tasks = 0

    def all_arrived() -> bool:
        nonlocal most_tasks
        most_tasks = max(most_tasks, len(asyncio.all_tasks()))
        return len({m.topic for m in sub.snapshot()}) >= n

    await until(all_arrived, within=30.0, what=f"{n} meter states")
    # a task per meter would be ~n tasks at once; the window (4) bounds them
    assert most_tasks < 40, most_tasks
    got = {m.topic: contract.decode_meter_state(m.payload) for m in sub.snapshot()}
    assert got[topics.meter_state("m00007")].since == 1_700_000_007.0

    # changes while connected: the latest state of a meter is what stays retained
    uplink.set_meter_state("m00001", "degraded", since=1_700_001_000.0, detail="no answer")
    uplink.set_meter_state("m00001", "offline", since=1_700_001_001.0, detail="no answer x3")
    await sub.wait_for(lambda ms: any(m.payload and b'"offline"' in m.payload for m in ms))
    late = subscriber(mosquitto, [topics.meter_state("m00001")])
    (retained,) = await late.wait_for(lambda ms: len(ms) >= 1)
    state = contract.decode_meter_state(retained.payload)
    assert retained.retain
    assert (state.state, state.since, state.detail) == ("offline", 1_700_001_001.0, "no answer x3")


@pytest.mark.asyncio
async def test_meter_state_payloads_are_the_same_whatever_form_they_are_kept_in(
    mosquitto: Broker, start_uplink: Starter, subscriber: Any
) -> None:
    topics = contract.Topics("gw-forms")
    uplink = await start_uplink(mosquitto, gateway_id="gw-forms")
    cases = {
        "recovered": ("online", 1_700_000_000.25, ""),  # the health book's recovery: kept as a bare float
        "no-detail": ("online", 1_700_000_001.5, None),
        "int-since": ("online", 1_700_000_002, ""),
        "offline": ("offline", 1_700_000_003.0, "no answer x3"),
    }
    for meter, (state, since, detail) in cases.items():
        uplink.set_meter_state(meter, state, since, detail)  # type: ignore[arg-type]
    await until(lambda: uplink.stats.connected, what="connected")
    sub = subscriber(mosquitto, [f"{topics.base}/meters/+/state"])
    got = await sub.wait_for(lambda ms: len({m.topic for m in ms}) >= len(cases))
    payloads = {m.topic: m.payload for m in got}
    for meter, (state, since, detail) in cases.items():
        expected = contract.encode_meter_state(
            contract.MeterState(v=1, gateway="gw-forms", meter=meter, state=state, since=since, detail=detail)  # type: ignore[arg-type]
        )
        assert payloads[topics.meter_state(meter)] == expected
    assert msgspec.json.decode(payloads[topics.meter_state("recovered")])["detail"] == ""
    assert b'"since":1700000002,' in payloads[topics.meter_state("int-since")]

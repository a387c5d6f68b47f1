"""Modbus against peers we did not write, with faults injected from outside (issue 19, items 2-5).

The peers are pymodbus' own server (its public API), a small Modbus TCP server written here
that parses MBAP by hand and a small RTU over TCP one that cuts frames and checks CRCs by hand;
none shares code with the gateway's Modbus driver. Each test reproduces one field fault: a server
that drops every second request (Modbus TCP and RTU framing), one that closes the connection
after each reply, exception replies (unknown unit, acknowledge, busy, gateway without a path), a
device that refuses reads spanning registers it does not map.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import struct
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass

import pytest
from prometheus_client import generate_latest
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from meter_gateway.drivers import log_limit
from meter_gateway.drivers.backoff import BackoffPolicy
from meter_gateway.drivers.errors import BadReply, NoAnswer
from meter_gateway.drivers.health import HealthBook, HealthPolicy, MeterOffline, MeterState
from meter_gateway.drivers.log_limit import REPEAT_INTERVAL, RateLimiter
from meter_gateway.drivers.meter_models import ModbusModel, load_model
from meter_gateway.drivers.modbus import ModbusLink, ModbusMeter
from meter_gateway.drivers.reading import Quality
from meter_gateway.drivers.transport import TcpSettings
from meter_gateway.gateway.daemon.metrics import Metrics
from tests.plugins.ports import free_port

T0 = 1_700_000_000.0
QUICK = BackoffPolicy(initial=0.01, maximum=0.05, jitter=0.1)
# what the daemon's config gives a TCP bus (gateway/daemon/meters.py link_settings)
CONFIG_RECONNECT = BackoffPolicy(0.5, 30.0)

# a bus name per test: warnings are rate-limited per bus for the whole process
_BUS_NAMES = (f"mb{i}" for i in itertools.count(1))

# (request number from 1, unit, function, address, count) -> the reply PDU, or None to stay silent
Handler = Callable[[int, int, int, int, int], bytes | None]


@dataclass
class PeerStats:
    requests: int = 0
    connections: int = 0


def exception_pdu(function: int, code: int) -> bytes:
    return bytes((function | 0x80, code))


def data_pdu(function: int, address: int, count: int, registers: dict[int, int] | None = None) -> bytes:
    if function in (1, 2):
        return bytes((function, (count + 7) // 8)) + bytes((count + 7) // 8)
    regs = registers or {}
    return bytes((function, 2 * count)) + b"".join(
        struct.pack(">H", regs.get(a, 0)) for a in range(address, address + count)
    )


@contextlib.asynccontextmanager
async def raw_peer(handler: Handler, *, close_after_reply: bool = False) -> AsyncIterator[tuple[int, PeerStats]]:
    """A Modbus TCP server written for these tests: MBAP by hand, replies from ``handler``."""
    stats = PeerStats()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stats.connections += 1
        try:
            while True:
                tid, _, length, unit = struct.unpack(">HHHB", await reader.readexactly(7))
                pdu = await reader.readexactly(length - 1)
                stats.requests += 1
                address, count = struct.unpack(">HH", pdu[1:5])
                reply = handler(stats.requests, unit, pdu[0], address, count)
                if reply is None:
                    continue  # dropped: the client hears nothing
                writer.write(struct.pack(">HHHB", tid, 0, len(reply) + 1, unit) + reply)
                await writer.drain()
                if close_after_reply:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], stats
    finally:
        server.close()
        await server.wait_closed()


def crc16(frame: bytes) -> bytes:
    """Modbus over Serial Line V1.02 §6.2.2: CRC-16, polynomial 0xA001 reflected, low byte first."""
    crc = 0xFFFF
    for byte in frame:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return struct.pack("<H", crc)


@contextlib.asynccontextmanager
async def raw_rtu_peer(handler: Handler) -> AsyncIterator[tuple[int, PeerStats]]:
    """A Modbus RTU over TCP server written for these tests (a serial server in transparent
    mode): 8-byte read requests cut and CRC-checked by hand, replies from ``handler``."""
    stats = PeerStats()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stats.connections += 1
        try:
            while True:
                frame = await reader.readexactly(8)  # unit, function, address, count, CRC
                assert frame[6:] == crc16(frame[:6]), frame.hex()
                stats.requests += 1
                unit, function, address, count = struct.unpack(">BBHH", frame[:6])
                reply = handler(stats.requests, unit, function, address, count)
                if reply is None:
                    continue  # dropped: the client hears nothing
                adu = bytes((unit,)) + reply
                writer.write(adu + crc16(adu))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], stats
    finally:
        server.close()
        await server.wait_closed()


def modbus_link(
    port: int,
    *,
    attempts: int = 3,
    timeout: float = 0.2,
    health: HealthBook | None = None,
    reconnect: BackoffPolicy = QUICK,
    framing: str = "tcp",
) -> ModbusLink:
    return ModbusLink.build(
        TcpSettings("127.0.0.1", port, connect_timeout=1.0, reconnect=reconnect),
        framing=framing,
        timeout=timeout,
        attempts=attempts,
        retry=QUICK,
        health=health,
        name=next(_BUS_NAMES),
    )


def model(name: str) -> ModbusModel:
    loaded = load_model(name)
    assert isinstance(loaded, ModbusModel)
    return loaded


def exported(link: ModbusLink) -> str:
    metrics = Metrics()
    metrics.add_bus(link.name)
    metrics.update_bus(link.name, link.bus.snapshot())
    return generate_latest(metrics.registry).decode()


# -- item 2: the bus's attempts apply to Modbus ---------------------------------------------------------


async def polls_survive_every_second_request_dropped(link: ModbusLink, meter: ModbusMeter, peer: PeerStats) -> None:
    """13 one-quantity polls and one full read (three transactions) through a peer that drops
    every second request: with three attempts, every poll is delivered, by retries alone."""
    delivered = 0
    for _ in range(13):
        readings = await meter.read(["voltage.l1"], slot=T0, now=T0)
        delivered += len(readings) == 1
    assert delivered == 13
    full = await meter.read(slot=T0, now=T0)  # three transactions, some of them dropped
    assert len(full) == len(meter.quantities)
    counters = link.bus.counters
    assert counters.retries >= 7
    assert counters.timeouts == counters.retries
    assert counters.no_answer == 0
    assert peer.requests == link.transactions


@pytest.mark.asyncio
async def test_a_server_dropping_every_second_request_loses_no_poll_with_three_attempts() -> None:
    def every_second_dropped(n: int, unit: int, function: int, address: int, count: int) -> bytes | None:
        return None if n % 2 == 0 else data_pdu(function, address, count)

    async with raw_peer(every_second_dropped) as (port, peer):
        link = modbus_link(port, attempts=3)
        meter = ModbusMeter(link, "sim-3ph", unit=1, meter_id="m1")
        try:
            await polls_survive_every_second_request_dropped(link, meter, peer)
        finally:
            await link.close()


@pytest.mark.asyncio
async def test_rtu_framing_over_tcp_gets_the_same_retries() -> None:
    """Modbus RTU frames through a TCP serial server: the bus's attempts apply as to Modbus TCP
    (and with one attempt, the same fault loses the polls it dropped)."""

    def every_second_dropped(n: int, unit: int, function: int, address: int, count: int) -> bytes | None:
        return None if n % 2 == 0 else data_pdu(function, address, count)

    async with raw_rtu_peer(every_second_dropped) as (port, peer):
        link = modbus_link(port, attempts=3, framing="rtu")
        meter = ModbusMeter(link, "sim-3ph", unit=1, meter_id="m1")
        try:
            await polls_survive_every_second_request_dropped(link, meter, peer)
            assert peer.connections == 1  # a dropped request is the meter's silence, not the link's
        finally:
            await link.close()

    async with raw_rtu_peer(every_second_dropped) as (port, peer):
        link = modbus_link(port, attempts=1, framing="rtu")
        meter = ModbusMeter(link, "sim-3ph", unit=1, meter_id="m1")
        try:
            delivered = 0
            for _ in range(6):
                with contextlib.suppress(NoAnswer):
                    delivered += len(await meter.read(["voltage.l1"], slot=T0, now=T0)) == 1
            assert delivered == 3  # one attempt: every second poll is lost
            assert link.bus.counters.retries == 0
        finally:
            await link.close()


# -- item 3: a server that closes the connection after each reply --------------------------------------


@pytest.mark.asyncio
async def test_a_server_closing_after_each_reply_delivers_multi_transaction_reads(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with raw_peer(lambda n, u, f, a, c: data_pdu(f, a, c), close_after_reply=True) as (port, peer):
        link = modbus_link(port, attempts=3, reconnect=CONFIG_RECONNECT)
        meter = ModbusMeter(link, "sim-3ph", unit=1, meter_id="m1")
        assert len(meter.plan()) == 3
        loop = asyncio.get_running_loop()
        try:
            started = loop.time()
            with caplog.at_level(logging.WARNING):
                for _ in range(5):
                    readings = await meter.read(slot=T0, now=T0)
                    assert len(readings) == len(meter.quantities)
            # a reconnect per transaction, at once: not the reconnect backoff (0.5 s, growing)
            assert loop.time() - started < 2.0
            assert peer.connections == peer.requests == 15
            assert link.bus.counters.link_down == 0
            assert "lost" not in caplog.text  # a peer that closes after answering is no outage
        finally:
            await link.close()


# -- item 4: exception replies -------------------------------------------------------------------------


async def _refused_everything(
    link: ModbusLink, book: HealthBook, unit: int, code: str, caplog: pytest.LogCaptureFixture
) -> None:
    meter = ModbusMeter(link, "eastron-sdm630", unit=unit, meter_id="m9")
    with caplog.at_level(logging.WARNING, logger="meter_gateway.drivers.modbus"):
        for expected in (MeterState.DEGRADED, MeterState.DEGRADED, MeterState.OFFLINE):
            with pytest.raises(BadReply, match="refuses every read"):
                await meter.read(slot=T0, now=T0)
            assert book.state("m9") is expected
    reason = book.get("m9").last_error
    assert "refuses every read" in reason
    assert f"unit {unit}: function 4 registers" in reason
    assert code in reason
    with pytest.raises(MeterOffline):  # offline: no traffic until its probe is due
        await meter.read(slot=T0, now=T0)
    assert "event=modbus_refuses_all meter=m9 unit=" in caplog.text
    assert code in caplog.text
    assert "function 4 registers" in caplog.text


@pytest.mark.asyncio
async def test_unknown_unit_on_pymodbus_server_takes_the_meter_offline_with_the_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """pymodbus 3.16 answers a unit it does not have with 0x04 (server device failure)."""
    port = free_port()
    devices = [SimDevice(id=1, simdata=[SimData(0, values=[0] * 100, datatype=DataType.REGISTERS)])]
    server = ModbusTcpServer(devices, address=("127.0.0.1", port))
    await server.serve_forever(background=True)
    book = HealthBook(HealthPolicy(degraded_after=1, offline_after=3, probe_interval=60))
    link = modbus_link(port, health=book)
    try:
        await _refused_everything(link, book, 7, "server device failure (0x04)", caplog)
        assert link.exceptions[4] > 3
        text = exported(link)
        assert f'meter_gateway_modbus_exceptions_total{{bus="{link.name}",code="0x04"}} {link.exceptions[4]}.0' in text
        assert f'meter_gateway_modbus_exceptions_total{{bus="{link.name}",code="0x06"}} 0.0' in text
    finally:
        await link.close()
        await server.shutdown()


@pytest.mark.asyncio
async def test_unknown_unit_answered_illegal_address_takes_the_meter_offline(caplog: pytest.LogCaptureFixture) -> None:
    """uModbus answers a unit it does not have with 0x02 (illegal data address)."""

    def one_unit(n: int, unit: int, function: int, address: int, count: int) -> bytes:
        return data_pdu(function, address, count) if unit == 1 else exception_pdu(function, 0x02)

    async with raw_peer(one_unit) as (port, _):
        book = HealthBook(HealthPolicy(degraded_after=1, offline_after=3, probe_interval=60))
        link = modbus_link(port, health=book)
        try:
            await _refused_everything(link, book, 3, "illegal data address (0x02)", caplog)
            # the refusals do not spill over: unit 1 on the same bus reads
            assert await ModbusMeter(link, "eastron-sdm630", unit=1, meter_id="m1").read(slot=T0, now=T0)
            assert book.state("m1") is MeterState.ONLINE
        finally:
            await link.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("code", [0x05, 0x06], ids=["acknowledge", "busy"])
async def test_busy_is_retried_with_backoff_and_counted(code: int) -> None:
    """0x05 acknowledge and 0x06 server device busy (§7): the meter is working on something
    else; it is asked again after the bus's backoff, and each reply counts under its code."""
    asked: list[float] = []
    loop = asyncio.get_running_loop()

    def busy_twice(n: int, unit: int, function: int, address: int, count: int) -> bytes:
        asked.append(loop.time())
        return exception_pdu(function, code) if n <= 2 else data_pdu(function, address, count)

    backoff = BackoffPolicy(initial=0.2, maximum=0.2, jitter=0.0)
    async with raw_peer(busy_twice) as (port, _):
        link = ModbusLink.build(
            TcpSettings("127.0.0.1", port, connect_timeout=1.0, reconnect=QUICK),
            timeout=0.5,
            attempts=3,
            retry=backoff,
            name=next(_BUS_NAMES),
        )
        try:
            assert await link.read_registers(1, 4, 0, 2, meter="m1") == [0, 0]
            assert link.exceptions[code] == 2
            assert sum(link.exceptions.values()) == 2
            assert link.bus.counters.retries == 2
            assert len(asked) == 3
            # asked again after the backoff, not at once
            assert all(b - a >= 0.2 * 0.95 for a, b in itertools.pairwise(asked)), asked
            assert f'code="{code:#04x}"}} 2.0' in exported(link)
        finally:
            await link.close()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("code", "error", "text"),
    [
        (0x05, BadReply, "acknowledge (0x05)"),
        (0x06, BadReply, "server device busy (0x06)"),
        (0x0A, NoAnswer, "gateway path unavailable (0x0a)"),
        (0x0B, NoAnswer, "gateway target device failed to respond (0x0b)"),
    ],
)
async def test_an_exception_that_lasts_degrades_the_meter_with_one_warning(
    code: int, error: type[Exception], text: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with raw_peer(lambda n, u, f, a, c: exception_pdu(f, code)) as (port, peer):
        book = HealthBook(HealthPolicy(degraded_after=1, offline_after=2, probe_interval=60))
        link = modbus_link(port, attempts=2, health=book)
        meter = ModbusMeter(link, "eastron-sdm630", unit=4, meter_id="m4")
        try:
            with caplog.at_level(logging.WARNING, logger="meter_gateway.drivers.modbus"):
                with pytest.raises(error, match=text.replace("(", r"\(").replace(")", r"\)")):
                    await meter.read(slot=T0, now=T0)
                assert book.state("m4") is MeterState.DEGRADED
                with pytest.raises(error):
                    await meter.read(slot=T0, now=T0)
            assert book.state("m4") is MeterState.OFFLINE
            assert text in book.get("m4").last_error
            assert peer.requests == 4  # two reads, each the bus's two attempts
            assert link.exceptions[code] == 4
            warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
            assert len(warnings) == 1  # rate-limited
            assert "event=modbus_exception meter=m4 " in warnings[0].getMessage()
            assert "function 4 registers 0..79" in warnings[0].getMessage()
            assert text in warnings[0].getMessage()
        finally:
            await link.close()


# -- item 5: a device that refuses reads spanning registers it does not map ------------------------------


def mapped_registers(m: ModbusModel, values: Iterable[tuple[str, float]]) -> dict[int, int]:
    registers: dict[int, int] = {}
    for quantity, value in values:
        point = m.point(quantity, None)
        assert point.codec is not None
        for offset, word in enumerate(point.codec.encode(value)):
            registers[point.address + offset] = word
    return registers


def plausible(m: ModbusModel, quantity: str, wanted: float) -> float:
    low, high = m.point(quantity, None).range
    return wanted if low <= wanted <= high else (max(low, -1e6) + min(high, 1e6)) / 2


@pytest.mark.asyncio
@pytest.mark.parametrize("name", ["eastron-sdm630", "chint-dtsu666"])
async def test_a_device_refusing_spans_over_unmapped_registers_is_read_point_by_point(
    name: str, caplog: pytest.LogCaptureFixture
) -> None:
    m = model(name)
    values = {q: plausible(m, q, 10.0 + i) for i, q in enumerate(m.quantities)}
    registers = mapped_registers(m, values.items())
    function = m.point(m.quantities[0], None).function

    def strict_map(n: int, unit: int, fn: int, address: int, count: int) -> bytes:
        if fn != function or any(a not in registers for a in range(address, address + count)):
            return exception_pdu(fn, 0x02)
        return data_pdu(fn, address, count, registers)

    async with raw_peer(strict_map) as (port, peer):
        book = HealthBook()
        link = modbus_link(port, health=book)
        meter = ModbusMeter(link, m, unit=1, meter_id="m1")
        try:
            with caplog.at_level(logging.WARNING, logger="meter_gateway.drivers.modbus"):
                readings = await meter.read(slot=T0, now=T0)
            assert len(readings) == len(m.quantities) >= 10
            for r in readings:
                assert r.quality is Quality.GOOD, r
                step = abs(m.point(r.quantity, None).scale)
                assert float(r.value) == pytest.approx(values[r.quantity], rel=1e-6, abs=step / 2)
            assert book.state("m1") is MeterState.ONLINE
            assert meter.refused  # remembered per meter
            assert f'event=modbus_refused meter=m1 unit=1 link={link.name} registers="function' in caplog.text
            assert "illegal data address (0x02)" in caplog.text
            # later polls make only the reads that work
            refusals, before = link.exceptions[2], peer.requests
            again = await meter.read(slot=T0, now=T0)
            assert [r.quantity for r in again] == [r.quantity for r in readings]
            assert link.exceptions[2] == refusals
            pieces = sum(len(parts) for parts in meter.refused.values())
            assert peer.requests - before == len(meter.plan()) - len(meter.refused) + pieces
        finally:
            await link.close()


# -- a register that reads NaN at every poll (issue 20, item 3: repeated warnings are rate-limited) -----


@pytest.mark.asyncio
async def test_a_register_read_as_nan_at_every_poll_logs_one_line_and_flags_every_reading(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    m = model("eastron-sdm630")
    registers = mapped_registers(m, [("voltage.l1", math.nan), ("voltage.l2", 230.0)])
    # the process's limiter, fresh (no window left by another test) and on a clock the test moves
    now = [0.0]
    monkeypatch.setattr(log_limit, "_LIMITER", RateLimiter(clock=lambda: now[0]))
    polls = 40

    async with raw_peer(lambda n, unit, fn, address, count: data_pdu(fn, address, count, registers)) as (port, peer):
        link = modbus_link(port)
        meter = ModbusMeter(link, m, unit=1, meter_id="nan1")
        try:
            with caplog.at_level(logging.WARNING, logger="meter_gateway.drivers.modbus"):
                for i in range(polls):
                    readings = {
                        r.quantity: r for r in await meter.read(["voltage.l1", "voltage.l2"], slot=T0 + i, now=T0 + i)
                    }
                    bad = readings["voltage.l1"]
                    assert bad.quality is Quality.OUT_OF_RANGE
                    assert math.isnan(float(bad.value))
                    assert readings["voltage.l2"].quality is Quality.GOOD
                    now[0] += 1.0  # a poll a second: within one interval
                lines = [r for r in caplog.records if "event=value_failed" in r.getMessage()]
                assert len(lines) == 1, [r.getMessage() for r in lines]
                assert lines[0].levelno == logging.WARNING
                assert "meter=nan1 quantity=voltage.l1" in lines[0].getMessage()
                assert peer.requests == polls  # every poll read the register and flagged its value
                # the lines held back are counted: the next line, an interval on, says how many
                now[0] += REPEAT_INTERVAL
                await meter.read(["voltage.l1"], slot=T0 + polls, now=T0 + polls)
            lines = [r for r in caplog.records if "event=value_failed" in r.getMessage()]
            assert len(lines) == 2
            assert lines[1].fields == {"suppressed": polls - 1}  # type: ignore[attr-defined]
        finally:
            await link.close()

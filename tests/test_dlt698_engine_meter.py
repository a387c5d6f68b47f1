"""The gateway reads a meter served by an independent DL/T 698.45 implementation: the PyPI package
``dlt698`` (Apache-2.0, a C++ engine with Python bindings; test-only, never imported by the product).

The meter here is the engine's own server session (``SessionHandle`` with ``attach_services``)
answering from an ``ObjectRegistry`` of standard objects whose raw values the test sets. A small
asyncio TCP server hands every byte the gateway sends to the engine and writes back what it
answers, so nothing of ours frames, decodes or encodes on the meter side. The expected values are
the raw values scaled by the engine's standard catalogue (``dlt698.standard``), not by ours: the
scalers and units of protocols/dlt698/data/oads.toml are checked too.

* the driver on a real Bus over a real TcpLink reads every quantity of the dlt698-generic model,
  the clock, status word 3 (relay), sets the clock (SET 40000200, which the engine validates and
  stores), and associates (CONNECT) with an engine session that has no preset association;
* the whole daemon (``gateway.daemon.app.Gateway`` on a config file, a real mosquitto) publishes
  those readings for two engine meters on one line and corrects their clocks (unicast time sync);
* wildcard address discovery is an expected failure: the engine ignores wildcard-addressed frames.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

pytest.importorskip("dlt698", reason="the independent DL/T 698.45 engine (PyPI dlt698, test extra) is not installed")
from dlt698 import Data, Oad, standard
from dlt698.common import ManualExecutor
from dlt698.protocol import link
from dlt698.service import (
    MemoryObject,
    ObjectRegistry,
    attach_services,
    make_object_schema,
    register_standard_object,
)
from dlt698.session import Role, SessionHandle, SessionOptions
from dlt698.transport import MemoryChannel

from meter_gateway.drivers.backoff import BackoffPolicy
from meter_gateway.drivers.bus import Bus, BusSettings
from meter_gateway.drivers.dlt698_driver import Dlt698Driver, discover_address
from meter_gateway.drivers.dlt698_model import Dlt698Model
from meter_gateway.drivers.errors import NoAnswer
from meter_gateway.drivers.meter_models import load_model
from meter_gateway.drivers.reading import Quality
from meter_gateway.drivers.tcp_link import TcpLink
from meter_gateway.drivers.transport import TcpSettings
from meter_gateway.gateway.uplink.contract import Topics, decode_batch
from meter_gateway.protocols.dlt698.apdu import ConnectRequest
from meter_gateway.protocols.dlt698.axdr import OAD
from meter_gateway.simulators.clock import SimClock
from tests.plugins.broker import Broker, Subscriber
from tests.plugins.daemon import running, until

TZ = ZoneInfo("Asia/Shanghai")
QUICK = BackoffPolicy(initial=0.01, maximum=0.02)
GW = "gw-engine"
METER_CLOCK = datetime.datetime(2026, 3, 14, 11, 58, 30)  # what the engine meters' 40000200 holds
CONNECT_VERSION = ConnectRequest().version  # the application-layer protocol version the gateway asks for

# Raw values the engine serves, per object attribute (OI, attribute): the standard's types
# (Appendix E) and the arrays' element order (total then tariffs 1-4; phases A-C; total then A-C).
# Phase B current is negative: 2001 is double-long, the sign is the direction of the current.
RAW: dict[tuple[int, int], tuple[Callable[[int], Data], int | tuple[int, ...]]] = {
    (0x0010, 2): (Data.uint32, (1234567, 300000, 400000, 500000, 34567)),  # 正向有功电能
    (0x0020, 2): (Data.uint32, (1000, 100, 200, 300, 400)),  # 反向有功电能
    (0x2000, 2): (Data.uint16, (2201, 2202, 2203)),  # 电压
    (0x2001, 2): (Data.int32, (5001, -5002, 5003)),  # 电流
    (0x2004, 2): (Data.int32, (33000, 11000, 11100, 10900)),  # 有功功率
    (0x2005, 2): (Data.int32, (-3000, -1000, -900, -1100)),  # 无功功率
    (0x2006, 2): (Data.int32, (34000, 11300, 11200, 11500)),  # 视在功率
    (0x200A, 2): (Data.int16, (985, 990, 980, 985)),  # 功率因数
    (0x200F, 2): (Data.uint16, 4998),  # 电网频率
}
# Appendix F.3 status word 3, bit 0 first: bit 4 set is "relay open" in the model's [relay].
STATUS_WORD3 = "0000100000000000"
# the gateway's units for the engine catalogue's W/var/VA (docs/dlt698.md: DL/T 645's units)
CANONICAL = {"W": ("kW", 1e-3), "var": ("kvar", 1e-3), "VA": ("kVA", 1e-3)}


def model() -> Dlt698Model:
    loaded = load_model("dlt698-generic")
    assert isinstance(loaded, Dlt698Model)
    return loaded


def date_time_s(when: datetime.datetime) -> Data:
    # the engine takes date_time_s as its 7 wire bytes: year high, year low, month .. second
    return Data.date_time_s(
        [when.year >> 8, when.year & 0xFF, when.month, when.day, when.hour, when.minute, when.second]
    )


def as_datetime(data: Data) -> datetime.datetime:
    yh, yl, month, day, hour, minute, second = data.as_date_time_s()
    return datetime.datetime((yh << 8) | yl, month, day, hour, minute, second)


def bits(text: str) -> bytes:
    return int(text, 2).to_bytes(len(text) // 8, "big")


# -- the engine meter ---------------------------------------------------------------------------


class EngineMeter:
    """One meter: an address and the engine's ObjectRegistry of standard objects it answers from.
    ``preset``: the session starts associated (a local port); otherwise it wants CONNECT first.
    ``version``: the CONNECT protocol version the meter speaks (None: the engine's own, 0x0010)."""

    def __init__(
        self,
        address: str,
        *,
        preset: bool = True,
        clock: datetime.datetime = METER_CLOCK,
        version: int | None = CONNECT_VERSION,
    ) -> None:
        self.address = address
        self.preset = preset
        self.version = version
        self.registry = ObjectRegistry()
        for (oi, attribute), (make, raw) in RAW.items():
            value = Data.array([make(v) for v in raw]) if isinstance(raw, tuple) else make(raw)
            self._add(oi, attribute, value)
        self._add(
            0x2014,
            2,
            Data.array([Data.bit_string(16, bits(STATUS_WORD3 if k == 3 else "0" * 16)) for k in range(1, 8)]),
        )
        self._add(0x4000, 2, date_time_s(clock), writable=True)  # 4000 attribute 2 is settable (E.5)
        self._add(0x4001, 2, Data.octet_string(bytes.fromhex(address)))

    def _add(self, oi: int, attribute: int, value: Data, *, writable: bool = False) -> None:
        # The engine checks the value against its standard catalogue on every read (a wrong type,
        # down to array elements, is DAR 7). Its standard schemas are read-only: a settable
        # attribute gets the same schema marked writable (the top-level type is still checked).
        provider = MemoryObject()
        provider.set(attribute, value)
        if not writable:
            register_standard_object(self.registry, oi, bytes([attribute]), provider)
            return
        schema = make_object_schema(oi, bytes([attribute]))
        attributes = schema.attributes
        for a in attributes:
            a.writable = True
        schema.attributes = attributes
        self.registry.register_object(schema, provider)

    def read(self, oi: int, attribute: int) -> Data:
        value = self.registry.read(Oad(oi=oi, attribute=attribute, index=0))
        assert isinstance(value, Data), f"the engine refuses {oi:04X}/{attribute}: DAR {value}"
        return value

    @property
    def clock(self) -> datetime.datetime:
        return as_datetime(self.read(0x4000, 2))


class EngineSession:
    """The engine's server session for one meter on one TCP connection, over an in-memory
    channel: ``feed`` gives it the bytes received and returns what it answered."""

    def __init__(self, meter: EngineMeter, executor: ManualExecutor) -> None:
        self.executor = executor
        self.near, far = MemoryChannel.pair(executor)
        wire = bytes.fromhex(meter.address)[::-1]  # BCD, least significant byte first (clause 5)
        options = SessionOptions(
            role=Role.server,
            preset_association=meter.preset,
            server=link.ServerAddress(bytes=wire, logical=0, type=link.AddressType.single),
        )
        # The engine accepts a CONNECT-Request of its own protocol version only and refuses any
        # other with ConnectResult 5 (协议版本不匹配, 6.2) naming its version: 0x0010 by default,
        # the value in the standard's Appendix D.2 example. The gateway offers 0x0016
        # (apdu.ConnectRequest) first; most meters here are configured to speak that version.
        if meter.version is not None:
            parameters = options.parameters
            parameters.version = meter.version
            options.parameters = parameters
        self.session = SessionHandle(far, executor, options)
        attach_services(self.session, meter.registry)
        self.session.start()
        self._out = bytearray()
        self._listen()

    def _listen(self) -> None:
        def received(data: object) -> None:
            if isinstance(data, bytes):
                self._out += data
                self._listen()

        self.near.async_read(received)

    def feed(self, data: bytes) -> bytes:
        self.near.async_write(data, lambda error: None)
        self.executor.run_ready()
        out = bytes(self._out)
        self._out.clear()
        return out

    def close(self) -> None:
        self.session.request_close()
        self.near.close()
        self.executor.run_ready()


@dataclass
class EngineLine:
    port: int
    answers: list[bytes]  # what the engine sessions wrote back, one entry per chunk received


@asynccontextmanager
async def engine_line(meters: Sequence[EngineMeter]) -> AsyncIterator[EngineLine]:
    """A serial server stand-in on 127.0.0.1: every byte goes to each meter's engine session (a
    multi-drop line: a session answers only frames to its own address) and every answer back."""
    answers: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        executor = ManualExecutor()
        sessions = [EngineSession(m, executor) for m in meters]
        try:
            while data := await reader.read(4096):
                answer = b"".join(s.feed(data) for s in sessions)
                if answer:
                    answers.append(answer)
                    writer.write(answer)
                    await writer.drain()
        except ConnectionError:
            pass
        finally:
            for s in sessions:
                s.close()
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port: int = server.sockets[0].getsockname()[1]
    try:
        yield EngineLine(port, answers)
    finally:
        server.close()
        await server.wait_closed()


@asynccontextmanager
async def bus_to(port: int) -> AsyncIterator[Bus]:
    link_ = TcpLink(
        TcpSettings("127.0.0.1", port, no_reply_limit=0, reconnect=BackoffPolicy(initial=0.05, maximum=0.1))
    )
    bus = Bus("engine", link_, settings=BusSettings(reply_timeout=0.5, attempts=2, retry=QUICK))
    assert await bus.open()
    try:
        yield bus
    finally:
        await bus.close()


# -- what the gateway should read -------------------------------------------------------------


def expected(oad: OAD) -> tuple[float | int, str]:
    """The value and unit of one point of the model: the raw value the engine serves, scaled by
    the engine's own catalogue (its scaler and unit for that attribute), in the gateway's units."""
    if (oad.oi, oad.attribute) == (0x2014, 2):
        word = STATUS_WORD3 if oad.index == 3 else "0" * 16
        return sum(1 << k for k, bit in enumerate(word) if bit == "1"), ""
    _, raw = RAW[oad.oi, oad.attribute]
    value = raw[oad.index - 1] if isinstance(raw, tuple) else raw
    definition = standard.find_attribute(Oad(oi=oad.oi, attribute=oad.attribute, index=0))
    assert definition is not None, oad
    assert definition.scaling is not None, oad
    unit = standard.unit_symbol(definition.scaling.unit)
    scaled = value * 10.0**definition.scaling.scaler
    if unit in CANONICAL:
        unit, factor = CANONICAL[unit]
        scaled *= factor
    return scaled, unit


def read_points() -> dict[str, OAD]:
    return {p.quantity: p.oad for p in model().points if p.quantity != "clock.datetime"}


# -- the driver -------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_every_quantity_of_the_generic_model_is_what_the_engine_serves() -> None:
    meter = EngineMeter("567890123456")
    async with engine_line([meter]) as line, bus_to(line.port) as bus:
        d = Dlt698Driver(bus, "e1", meter.address, model(), tz=TZ)
        points = read_points()
        readings = await d.read(list(points), slot=1000.0, now=1001.0)
        relay = await d.read_relay()
        clock = await d.read_clock()
    by_q = {r.quantity: r for r in readings}
    assert set(by_q) == set(points)
    for quantity, oad in points.items():
        value, unit = expected(oad)
        assert by_q[quantity].value == pytest.approx(value, rel=1e-12), quantity
        assert by_q[quantity].unit == unit, quantity
    # a reverse current (signed double-long) is a reading like any other, not an outlier
    assert by_q["current.l2"].value == pytest.approx(-5.002)
    assert {r.quantity: r.quality for r in readings} == dict.fromkeys(points, Quality.GOOD)
    assert by_q["energy.active.import.total"].value == pytest.approx(12345.67)  # scaler -2 kWh
    assert (relay.closed, relay.keep_power) == (False, False)
    assert clock == METER_CLOCK.replace(tzinfo=TZ).timestamp()
    assert d.needs_connect is False  # the preset association took the reads directly
    # 10 OADs in two GET-Request-NormalList (8 per request), then status word 3 and the clock
    assert len(line.answers) == 2 + 1 + 1


@pytest.mark.asyncio
async def test_the_clock_set_is_the_one_the_engine_stores() -> None:
    meter = EngineMeter("000000000007")
    target = datetime.datetime(2026, 3, 14, 12, 0, 0)
    async with engine_line([meter]) as line, bus_to(line.port) as bus:
        d = Dlt698Driver(bus, "e7", meter.address, model(), tz=TZ)
        assert await d.read_clock() == METER_CLOCK.replace(tzinfo=TZ).timestamp()
        await d.sync_time(target.replace(tzinfo=TZ).timestamp())  # SET 40000200, DAR 0 from the engine
        assert meter.clock == target
        assert await d.read_clock() == target.replace(tzinfo=TZ).timestamp()


@pytest.mark.asyncio
async def test_a_session_without_preset_association_is_read_after_connect() -> None:
    meter = EngineMeter("000000000008", preset=False)
    async with engine_line([meter]) as line, bus_to(line.port) as bus:
        d = Dlt698Driver(bus, "e8", meter.address, model(), association="connect", tz=TZ)
        readings = await d.read(["energy.active.import.total", "voltage.l1"], slot=0.0, now=1.0)
        assert d.associated
    assert {r.quantity: r.value for r in readings} == {
        "energy.active.import.total": pytest.approx(12345.67),
        "voltage.l1": pytest.approx(220.1),
    }


@pytest.mark.asyncio
async def test_a_meter_of_the_engines_own_version_is_learned_in_auto_mode() -> None:
    """The engine's defaults: it speaks protocol version 0x0010 and, without an association,
    answers a GET with ERROR-Response "service not supported" (not DAR 3). Auto mode learns
    both: it connects, is refused for the version, offers the one the meter named, and reads."""
    meter = EngineMeter("000000000009", preset=False, version=None)
    async with engine_line([meter]) as line, bus_to(line.port) as bus:
        d = Dlt698Driver(bus, "e9", meter.address, model(), association="auto", tz=TZ)
        readings = await d.read(["energy.active.import.total", "voltage.l1"], slot=0.0, now=1.0)
        assert d.needs_connect is True
        assert d.associated
        again = await d.read(["energy.active.import.total"], slot=0.0, now=1.0)
    assert {r.quantity: r.value for r in readings} == {
        "energy.active.import.total": pytest.approx(12345.67),
        "voltage.l1": pytest.approx(220.1),
    }
    assert [r.value for r in again] == [pytest.approx(12345.67)]


@pytest.mark.xfail(
    strict=True,
    raises=NoAnswer,
    reason=(
        "dlt698 1.0.1 drops frames to a wildcard server address (its session reports "
        "address_mismatch); DL/T 698.45-2017 clause 5 (address field AF, type 1 通配地址) has a meter "
        "answer a wildcard that matches its address, which is what discover_address relies on"
    ),
)
@pytest.mark.asyncio
async def test_wildcard_address_discovery() -> None:
    meter = EngineMeter("123456789012")
    async with engine_line([meter]) as line, bus_to(line.port) as bus:
        assert await discover_address(bus) == meter.address


# -- the daemon -------------------------------------------------------------------------------


@dataclass
class SimWallClock:
    sim: SimClock

    def __call__(self) -> float:
        return self.sim.now().replace(tzinfo=TZ).timestamp()


DAEMON_QUANTITIES = (
    "energy.active.import.total",
    "energy.active.import.t1",
    "energy.active.export.total",
    "voltage.l1",
    "voltage.l2",
    "voltage.l3",
    "current.l1",
    "current.l2",
    "current.l3",
    "power.active.total",
    "power.reactive.total",
    "power_factor.total",
    "frequency",
)


def config_text(state: Path, broker_port: int, line_port: int) -> str:
    quantities = ", ".join(f'"{q}"' for q in DAEMON_QUANTITIES)
    return f"""
[gateway]
id = "{GW}"
timezone = "Asia/Shanghai"
state_dir = "{state}"

[uplink]
host = "127.0.0.1"
port = {broker_port}
keepalive = "10s"

[metrics]
enabled = false

[[buses]]
name = "engine-line"
type = "tcp"
host = "127.0.0.1"
port = {line_port}
protocol = "dlt698"
reply_timeout = "1s"
attempts = 2

[[meters]]
id = "e-local"
bus = "engine-line"
protocol = "dlt698"
address = "000000000021"
model = "dlt698-generic"

[[meters]]
id = "e-remote"
bus = "engine-line"
protocol = "dlt698"
address = "000000000022"
model = "dlt698-generic"
dlt698 = {{ association = "connect" }}

[[poll_groups]]
name = "instant"
interval = "15m"
quantities = [{quantities}]
spread = 0

[time_sync]
interval = "1d"
mode = "unicast"
max_drift = "5s"
"""


@pytest.mark.asyncio
async def test_the_daemon_publishes_the_engine_meters_readings_and_sets_their_clocks(
    tmp_path: Path, mosquitto: Broker
) -> None:
    # noon, away from the meters' midnight (no clock set near it): the gateway's clock runs from there
    gateway_clock = SimWallClock(SimClock(datetime.datetime(2026, 3, 14, 12, 0, 0), 1.0))
    local, remote = EngineMeter("000000000021"), EngineMeter("000000000022", preset=False)
    topics = Topics(GW)
    sub = Subscriber(mosquitto, [topics.readings]).start()
    try:
        async with engine_line([local, remote]) as line:
            path = tmp_path / "gw.toml"
            path.write_text(config_text(tmp_path / "state", mosquitto.port, line.port))
            async with running(path, gateway_clock) as gw:

                def published() -> dict[tuple[str, str], tuple[float | int | str, str, int]]:
                    batches = [decode_batch(m.payload) for m in sub.snapshot(topics.readings)]
                    return {(r.meter, r.qty): (r.value, r.unit, r.q) for b in batches for r in b.readings}

                wanted = {(m, q) for m in ("e-local", "e-remote") for q in DAEMON_QUANTITIES}
                await until(lambda: wanted <= set(published()))
                await until(lambda: gw.time_sync is not None and gw.time_sync.stats.corrected == 2)
                synced_at = gateway_clock()
    finally:
        sub.stop()

    got = published()
    points = read_points()
    for meter, quantity in sorted(wanted):
        value, unit = expected(points[quantity])
        assert got[meter, quantity][:2] == (pytest.approx(value, rel=1e-12), unit), (meter, quantity)
        assert got[meter, quantity][2] == Quality.GOOD, (meter, quantity)
    # both clocks were 90 s behind: read (40000200), set by SET 40000200 and read back by the daemon
    assert gw.time_sync is not None
    assert gw.time_sync.stats.unicasts == 2
    # the poll and the clock read found e-remote's association closed at once: one CONNECT
    assert gw.time_sync.stats.failures == {}
    for meter in (local, remote):
        offset = meter.clock.replace(tzinfo=TZ).timestamp() - synced_at
        assert -5 <= offset <= 1, meter.address

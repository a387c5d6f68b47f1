"""FE wake-up preamble of DL/T 645 requests: the config's per-bus setting and per-meter override,
and the bytes a meter actually receives (a real TCP server that records them)."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from meter_gateway.drivers.backoff import BackoffPolicy
from meter_gateway.drivers.bus import Bus, BusSettings
from meter_gateway.drivers.dlt645_driver import Dlt645Driver, broadcast_time, discover_address
from meter_gateway.drivers.errors import ConfigurationError
from meter_gateway.drivers.meter_models import Dlt645Model, load_model
from meter_gateway.drivers.readings import to_meter_time
from meter_gateway.drivers.tcp_link import TcpLink
from meter_gateway.drivers.transport import TcpSettings
from meter_gateway.gateway.config import ConfigError, load_config
from meter_gateway.gateway.daemon.meters import build_driver
from meter_gateway.protocols.dlt645 import messages as m
from meter_gateway.protocols.dlt645.edition import Edition
from meter_gateway.protocols.dlt645.frame import BROADCAST, Address, parse_frame
from meter_gateway.simulators.clock import SimClock
from meter_gateway.simulators.dlt645_meter import Dlt645Meter

E7 = Edition.DLT645_2007
ADDRESS = "000000000161"
VOLTAGES = ["voltage.l1", "voltage.l2", "voltage.l3"]  # one 0201FF00 block read
QUICK = BackoffPolicy(initial=0.01, maximum=0.02)

CONFIG = """
[gateway]
id = "gw-1"
state_dir = "state"

[uplink]
host = "127.0.0.1"

[[buses]]
name = "rs485"
type = "serial"
port = "/dev/ttyUSB0"
baud_rate = 2400
parity = "E"
protocol = "dlt645"
{serial_extra}

[[buses]]
name = "server"
type = "tcp"
host = "127.0.0.1"
port = 4001
protocol = "dlt645"
{tcp_extra}

[[meters]]
id = "serial-meter"
bus = "rs485"
protocol = "dlt645-2007"
address = "000000000001"
model = "dlt645-2007-generic"

[[meters]]
id = "tcp-meter"
bus = "server"
protocol = "dlt645-2007"
address = "000000000002"
model = "dlt645-2007-generic"
{meter_extra}

[[poll_groups]]
name = "billing"
interval = "15m"
quantities = ["energy.active.import.total"]
"""


def model() -> Dlt645Model:
    found = load_model("dlt645-2007-generic")
    assert isinstance(found, Dlt645Model)
    return found


def preambles(tmp_path: Path, serial_extra: str = "", tcp_extra: str = "", meter_extra: str = "") -> dict[str, int]:
    """The preamble each configured meter's driver is built with, through the fleet builder."""
    path = tmp_path / "gw.toml"
    path.write_text(CONFIG.format(serial_extra=serial_extra, tcp_extra=tcp_extra, meter_extra=meter_extra))
    config = load_config(path)
    bus = Bus("unopened", TcpLink(TcpSettings("127.0.0.1", 9)))  # built, never connected
    out = {}
    for meter in config.meters:
        driver = build_driver(config, meter, bus)
        assert isinstance(driver, Dlt645Driver)
        out[meter.id] = driver.preamble
    return out


def test_serial_buses_default_to_four_fe_and_tcp_buses_to_none(tmp_path: Path) -> None:
    assert preambles(tmp_path) == {"serial-meter": 4, "tcp-meter": 0}


def test_the_bus_setting_and_the_meter_override(tmp_path: Path) -> None:
    assert preambles(tmp_path, serial_extra="preamble = 0", tcp_extra="preamble = 2") == {
        "serial-meter": 0,
        "tcp-meter": 2,
    }
    assert preambles(tmp_path, tcp_extra="preamble = 2", meter_extra="dlt645 = { preamble = 4 }") == {
        "serial-meter": 4,
        "tcp-meter": 4,
    }


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("dlt645 = { preambel = 4 }", "meters[1].dlt645"),  # a typo: rejected with its path
        ("dlt645 = { preamble = 17 }", "meters[1].dlt645.preamble"),
    ],
)
def test_bad_meter_preambles_are_config_errors_with_path_and_line(tmp_path: Path, extra: str, message: str) -> None:
    text = CONFIG.format(serial_extra="", tcp_extra="", meter_extra=extra)
    path = tmp_path / "gw.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    line = text.splitlines().index(extra) + 1
    assert message in str(caught.value)
    assert f"gw.toml:{line}" in str(caught.value)


def test_a_dlt645_table_on_another_protocols_meter_is_a_config_error(tmp_path: Path) -> None:
    text = CONFIG.format(serial_extra="", tcp_extra="", meter_extra="dlt645 = { preamble = 4 }")
    text = text.replace(
        'protocol = "dlt645-2007"\naddress = "000000000002"\nmodel = "dlt645-2007-generic"',
        ('protocol = "dlt698"\naddress = "000000000002"\nmodel = "dlt698-generic"'),
    )
    path = tmp_path / "gw.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"meters\[1\]\.dlt645: only for dlt645 meters; this meter speaks dlt698"):
        load_config(path)


def test_a_bus_preamble_out_of_range_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    path.write_text(CONFIG.format(serial_extra="preamble = -1", tcp_extra="", meter_extra=""))
    with pytest.raises(ConfigError, match=r"buses\[0\]\.preamble"):
        load_config(path)


def test_the_driver_refuses_an_impossible_preamble() -> None:
    bus = Bus("unopened", TcpLink(TcpSettings("127.0.0.1", 9)))
    with pytest.raises(ConfigurationError, match="preamble of 17 FE bytes"):
        Dlt645Driver(bus, "m", ADDRESS, E7, model(), preamble=17)


@asynccontextmanager
async def recording_meter(received: list[bytes], request_length: int) -> AsyncIterator[tuple[str, int]]:
    """A TCP server standing for a serial server with one simulated meter behind it: it keeps the
    exact bytes of each request (``request_length`` each) and answers as the meter does."""
    meter = Dlt645Meter(ADDRESS, clock=SimClock(datetime.datetime(2026, 3, 14, 10, 0), 0.0), seed=1)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request = await reader.readexactly(request_length)
                received.append(request)
                for reply in meter.handle(parse_frame(request)):
                    writer.write(reply)
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    host, port = server.sockets[0].getsockname()[:2]
    try:
        yield host, port
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.asyncio
@pytest.mark.parametrize("preamble", [0, 4])
async def test_each_request_goes_out_with_the_drivers_fe_preamble(preamble: int) -> None:
    expected = m.ReadRequest(Address.parse(ADDRESS), 0x0201FF00).encode(E7, preamble)
    assert expected[:preamble] == b"\xfe" * preamble
    assert expected[preamble] == 0x68
    received: list[bytes] = []
    async with recording_meter(received, len(expected)) as (host, port):
        bus = Bus("sim", TcpLink(TcpSettings(host, port, no_reply_limit=0)), settings=BusSettings(retry=QUICK))
        assert await bus.open()
        try:
            driver = Dlt645Driver(bus, "m61", ADDRESS, E7, model(), preamble=preamble)
            readings = await driver.read(VOLTAGES, slot=900.0, now=901.0)
        finally:
            await bus.close()
    assert received == [expected]
    assert [r.quantity for r in readings] == VOLTAGES
    assert all(isinstance(r.value, float) and 0 < r.value < 300 for r in readings)


@pytest.mark.asyncio
async def test_a_broadcast_time_wakes_the_meter_that_needs_the_longest_preamble() -> None:
    when = datetime.datetime(2026, 3, 14, 10, 0, 5).timestamp()
    expected = m.BroadcastTime(BROADCAST, to_meter_time(when, None)).encode(E7, 4)
    assert expected[:4] == b"\xfe" * 4
    received: list[bytes] = []
    async with recording_meter(received, len(expected)) as (host, port):
        bus = Bus("sim", TcpLink(TcpSettings(host, port, no_reply_limit=0)), settings=BusSettings(retry=QUICK))
        assert await bus.open()
        try:
            Dlt645Driver(bus, "quick", "000000000162", E7, model(), preamble=0)
            Dlt645Driver(bus, "sleepy", ADDRESS, E7, model(), preamble=4)
            await broadcast_time(bus, when, E7)
            await asyncio.sleep(0.2)  # no reply comes; let the server take the bytes
        finally:
            await bus.close()
    assert received == [expected]


@pytest.mark.asyncio
@pytest.mark.parametrize("preamble", [0, 4])
async def test_discovery_goes_out_with_the_buses_preamble(preamble: int) -> None:
    expected = m.ReadAddressRequest().encode(E7, preamble)
    received: list[bytes] = []
    async with recording_meter(received, len(expected)) as (host, port):
        bus = Bus("sim", TcpLink(TcpSettings(host, port, no_reply_limit=0)), settings=BusSettings(retry=QUICK))
        assert await bus.open()
        try:
            assert await discover_address(bus, E7, preamble=preamble) == ADDRESS
        finally:
            await bus.close()
    assert received == [expected]

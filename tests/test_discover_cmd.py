"""`meter-gateway discover` against simulated meters over real TCP sockets and ptys at 8N1, and
pymodbus' own Modbus server; every snippet it prints is pasted into a config and checked.

The command runs its own event loop, so the in-process tests run it in a thread while the
simulated bus serves on the test's loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
import time
import tty
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from meter_gateway.drivers import registry
from meter_gateway.gateway.cli import config_cmd
from meter_gateway.gateway.cli.discover_cmd import main
from meter_gateway.protocols.dlt645.edition import Edition
from meter_gateway.simulators.cjt188_meter import Cjt188Meter
from meter_gateway.simulators.clock import SimClock
from meter_gateway.simulators.dlt698_meter import Dlt698Meter
from meter_gateway.simulators.modbus_meter import ModbusSimServer, SimulatedMeter, serve_modbus
from tests.plugins.ports import free_port
from tests.plugins.simulators import SIM_START, MetersBusFactory, SimBusFactory

pytestmark = pytest.mark.timeout(90)

CLI = [sys.executable, "-m", "meter_gateway.gateway.cli"]


async def discover(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def endpoint(value: tuple[str, int] | str) -> str:
    assert isinstance(value, tuple)
    return f"{value[0]}:{value[1]}"


def tcp_bus(name: str, protocol: str, where: str) -> str:
    host, _, port = where.rpartition(":")
    return f'[[buses]]\nname = "{name}"\ntype = "tcp"\nprotocol = "{protocol}"\nhost = "{host}"\nport = {port}\n'


def check_pasted(tmp_path: Path, bus: str, snippet: str, capsys: pytest.CaptureFixture[str], meters: str = "") -> str:
    """Paste ``snippet`` into a config holding ``bus``; check-config must accept it."""
    path = tmp_path / "gateway.toml"
    header = '[gateway]\nid = "gw1"\nstate_dir = "state"\n\n[uplink]\nhost = "127.0.0.1"\n\n'
    path.write_text(f"{header}{bus}\n{meters}\n{snippet}\n", encoding="utf-8")
    code = config_cmd.main([str(path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def tables(snippet: str) -> list[dict[str, str]]:
    """The ``key = value`` lines of each ``[[meters]]`` table (values as written, comments off)."""
    out: list[dict[str, str]] = []
    for line in snippet.splitlines():
        if line == "[[meters]]":
            out.append({})
        elif " = " in line and out:
            key, _, value = line.partition(" = ")
            out[-1][key] = value.split("  #")[0]
    return out


@pytest.mark.asyncio
async def test_wildcard_on_a_single_meter_line_from_simulate(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    sim = await asyncio.create_subprocess_exec(
        *CLI, "simulate", "--port", "0", "--meters", "1", "--protocol", "dlt645-2007", stdout=asyncio.subprocess.PIPE
    )
    assert sim.stdout is not None
    try:
        line = (await asyncio.wait_for(sim.stdout.readline(), 20)).decode()
        where = line.split()[3]
        assert (await asyncio.wait_for(sim.stdout.readline(), 10)).strip() == b"ready"
        code, out, err = await discover(capsys, "--tcp", where, "--protocol", "dlt645-2007", "--bus", "line1")
    finally:
        sim.terminate()
        await asyncio.wait_for(sim.wait(), 10)
    assert code == 0, err
    assert out.splitlines()[0] == f"# 1 dlt645-2007 meter(s) found on bus line1 (tcp {where}) by wildcard (1 asked)"
    assert tables(out) == [
        {
            "id": '"line1-000000000001"',
            "bus": '"line1"',
            "protocol": '"dlt645-2007"',
            "address": '"000000000001"',
            "model": '"dlt645-2007-generic"',
        }
    ]
    summary = check_pasted(tmp_path, tcp_bus("line1", "dlt645", where), out, capsys)
    assert "meters:      1 (1 dlt645-2007)" in summary


@pytest.mark.asyncio
async def test_wildcard_on_a_shared_line_points_to_range(
    sim_bus: SimBusFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    handle = await sim_bus(3)
    code, out, err = await discover(
        capsys, "--tcp", endpoint(handle.endpoint), "--protocol", "dlt645-2007", "--reply-timeout", "0.3"
    )
    assert (code, out) == (1, "")
    assert err.splitlines()[-1].startswith("meter-gateway discover: no meter answered the dlt645-2007 wildcard")
    assert "use --range FIRST-LAST" in err


@pytest.mark.asyncio
async def test_range_probe_on_a_shared_pty_line_at_8n1(
    sim_bus: SimBusFactory, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    handle = await sim_bus(3, kind="pty", first_address=11)
    path = handle.endpoint
    assert isinstance(path, str)
    line = ["--serial", path, "--baud", "2400", "--parity", "N", "--protocol", "dlt645-2007", "--bus", "rs485a"]
    code, out, err = await discover(capsys, *line, "--range", "000000000009-000000000015", "--probe-timeout", "0.2")
    assert code == 0, err
    assert out.splitlines()[0].endswith("by range (7 asked)")
    found = tables(out)
    assert [t["address"] for t in found] == ['"000000000011"', '"000000000012"', '"000000000013"']
    assert {t["model"] for t in found} == {'"dlt645-2007-generic"'}
    bus = (
        f'[[buses]]\nname = "rs485a"\ntype = "serial"\nprotocol = "dlt645"\nport = "{path}"\n'
        'baud_rate = 2400\nparity = "N"\n'
    )
    check_pasted(tmp_path, bus, out, capsys)

    # with the config: its bus settings, and a meter configured already is named, not repeated
    configured = (
        '[[meters]]\nid = "kitchen"\nbus = "rs485a"\nprotocol = "dlt645-2007"\naddress = "000000000012"\n'
        'model = "dlt645-2007-generic"\n'
    )
    config = tmp_path / "with-meter.toml"
    config.write_text(
        f'[gateway]\nid = "gw1"\nstate_dir = "state"\n[uplink]\nhost = "127.0.0.1"\n{bus}\n{configured}',
        encoding="utf-8",
    )
    code, out, err = await discover(capsys, "-c", str(config), "--range", "000000000011-000000000013", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert (doc["bus"], doc["protocol"], doc["method"], doc["asked"]) == ("rs485a", "dlt645-2007", "range", 3)
    assert [f["address"] for f in doc["found"]] == ["000000000011", "000000000012", "000000000013"]
    assert doc["found"][1]["configured_as"] == "kitchen"
    assert "# 000000000012 on rs485a is configured already, as meter kitchen" in doc["snippet"]
    assert [t["address"] for t in tables(doc["snippet"])] == ['"000000000011"', '"000000000013"']
    check_pasted(tmp_path, bus, doc["snippet"], capsys, meters=configured)


@pytest.mark.asyncio
async def test_dlt645_1997_wildcard(sim_bus: SimBusFactory, capsys: pytest.CaptureFixture[str]) -> None:
    handle = await sim_bus(1, edition=Edition.DLT645_1997, first_address=4321)
    code, out, err = await discover(capsys, "--tcp", endpoint(handle.endpoint), "--protocol", "dlt645-1997", "--json")
    assert code == 0, err
    (found,) = json.loads(out)["found"]
    assert (found["address"], found["model"], found["protocol"]) == (
        "000000004321",
        "dlt645-1997-generic",
        "dlt645-1997",
    )


@pytest.mark.asyncio
async def test_dlt698_and_cjt188_wildcards(
    meters_bus: MetersBusFactory, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    clock = SimClock(SIM_START, 1.0)
    electricity = await meters_bus([Dlt698Meter("000000000698", clock=clock)])
    gas = await meters_bus([Cjt188Meter("00000000000188", "gas", clock=clock)])
    code, out, err = await discover(capsys, "--tcp", endpoint(electricity.endpoint), "--protocol", "dlt698")
    assert code == 0, err
    assert tables(out) == [
        {
            "id": '"field-000000000698"',
            "bus": '"field"',
            "protocol": '"dlt698"',
            "address": '"000000000698"',
            "model": '"dlt698-generic"',
        }
    ]
    check_pasted(tmp_path, tcp_bus("field", "dlt698", endpoint(electricity.endpoint)), out, capsys)

    where = endpoint(gas.endpoint)
    code, out, err = await discover(capsys, "--tcp", where, "--protocol", "cjt188", "--bus", "water1")
    assert code == 0, err
    assert "# gas meter, type 30H" in out.splitlines()
    (table,) = tables(out)
    assert (table["address"], table["model"]) == ('"00000000000188"', '"cjt188-gas"')
    check_pasted(tmp_path, tcp_bus("water1", "cjt188", where), out, capsys)

    # narrowed to cold-water meters, the gas meter keeps quiet
    code, _, err = await discover(
        capsys, "--tcp", where, "--protocol", "cjt188", "--meter-type", "10", "--reply-timeout", "0.2"
    )
    assert code == 1
    assert "no meter answered the cjt188 wildcard request" in err


@pytest.mark.asyncio
async def test_modbus_unit_scan_of_our_simulator(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    server = await serve_modbus(units=(3, 7), port=0)
    try:
        host, port = server.address
        where = f"{host}:{port}"
        code, out, err = await discover(
            capsys,
            "--tcp",
            where,
            "--protocol",
            "modbus",
            "--units",
            "1-9",
            "--probe-timeout",
            "0.2",
            "--model",
            "sim-3ph",
        )
    finally:
        await server.stop()
    assert code == 0, err
    found = tables(out)
    assert [(t["id"], t["address"], t["model"]) for t in found] == [
        ('"field-u3"', "3", '"sim-3ph"'),
        ('"field-u7"', "7", '"sim-3ph"'),
    ]
    check_pasted(tmp_path, tcp_bus("field", "modbus-tcp", where), out, capsys)


@pytest_asyncio.fixture
async def pty_cable() -> AsyncIterator[tuple[str, str]]:
    """Two pseudo-terminals joined like a null-modem cable (both ends tty paths, 8N1)."""
    m1, s1 = os.openpty()
    m2, s2 = os.openpty()
    for fd in (s1, s2):
        tty.setraw(fd)
    for fd in (m1, m2):
        os.set_blocking(fd, False)
    loop = asyncio.get_running_loop()

    def pump(src: int, dst: int) -> None:
        try:
            data = os.read(src, 4096)
            if data:
                os.write(dst, data)
        except OSError:
            pass  # a side closed: a cable drops bytes too

    loop.add_reader(m1, pump, m1, m2)
    loop.add_reader(m2, pump, m2, m1)
    try:
        yield os.ttyname(s1), os.ttyname(s2)
    finally:
        loop.remove_reader(m1)
        loop.remove_reader(m2)
        for fd in (m1, m2, s1, s2):
            os.close(fd)


@pytest.mark.asyncio
async def test_modbus_rtu_unit_scan_on_a_pty_at_8n1(
    pty_cable: tuple[str, str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    server_end, gateway_end = pty_cable
    meters = {unit: SimulatedMeter("sim-3ph", start=time.time()) for unit in (2, 3)}
    async with ModbusSimServer(meters, transport="serial", serial_port=server_end):
        code, out, err = await discover(
            capsys, "--serial", gateway_end, "--protocol", "modbus", "--units", "1-4", "--probe-timeout", "0.2"
        )
    assert code == 0, err
    assert out.splitlines()[0] == (
        f"# 2 modbus meter(s) found on bus field (serial {gateway_end} 9600 8N1) by units (4 asked)"
    )
    assert [t["address"] for t in tables(out)] == ["2", "3"]
    bus = (
        f'[[buses]]\nname = "field"\ntype = "serial"\nprotocol = "modbus-rtu"\nport = "{gateway_end}"\n'
        'baud_rate = 9600\nparity = "N"\n'
    )
    check_pasted(tmp_path, bus, out, capsys)


@pytest.mark.asyncio
async def test_modbus_unit_scan_of_pymodbus_own_server(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A server we did not write. Unit 2 answers register 0; unit 5 has no register 0 and answers
    exception 0x02: it is there. pymodbus 3.16 answers a unit it does not have with 0x04 (server
    device failure), even with ignore_missing_devices: those are named apart, not listed."""
    devices = [
        SimDevice(id=2, simdata=[SimData(0, values=[1234] * 8, datatype=DataType.REGISTERS)]),
        SimDevice(id=5, simdata=[SimData(100, values=[1] * 8, datatype=DataType.REGISTERS)]),
    ]
    port = free_port()
    server = ModbusTcpServer(devices, address=("127.0.0.1", port))
    await server.serve_forever(background=True)
    try:
        code, out, err = await discover(
            capsys, "--tcp", f"127.0.0.1:{port}", "--protocol", "modbus", "--units", "1-6", "--json"
        )
    finally:
        await server.shutdown()
    assert code == 0, err
    doc = json.loads(out)
    assert [f["address"] for f in doc["found"]] == [2, 5]
    assert doc["doubtful"] == [1, 3, 4, 6]
    assert "unit(s) 1, 3-4, 6 answered only 'server device failure' (0x04)" in err
    assert all(f["model_guessed"] for f in doc["found"])
    assert "# a guess: nothing on the wire names the model" in doc["snippet"]
    check_pasted(tmp_path, tcp_bus("field", "modbus-tcp", f"127.0.0.1:{port}"), doc["snippet"], capsys)


@pytest.mark.asyncio
async def test_a_protocol_that_cannot_discover_says_so(
    sim_bus: SimBusFactory, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    handle = await sim_bus(1)
    entry = registry.PROTOCOLS["dlt645-1997"]
    monkeypatch.setitem(
        registry.PROTOCOLS, "dlt645-1997", dataclasses.replace(entry, can=entry.can & ~registry.Can.DISCOVER)
    )
    code, out, err = await discover(capsys, "--tcp", endpoint(handle.endpoint), "--protocol", "dlt645-1997")
    assert (code, out) == (2, "")
    assert err == (
        "meter-gateway discover: dlt645-1997 meters cannot be discovered "
        "(protocols that can: dlt645-2007, dlt698, cjt188, modbus)\n"
    )


@pytest.mark.asyncio
async def test_bounds_and_bad_input(sim_bus: SimBusFactory, capsys: pytest.CaptureFixture[str]) -> None:
    handle = await sim_bus(1)
    line = ["--tcp", endpoint(handle.endpoint)]
    cases: list[tuple[list[str], str]] = [
        (
            [*line, "--protocol", "dlt645-2007", "--range", "000000000001-000000005000"],
            "--range spans 5000 addresses; at most 1000 per run",
        ),
        ([*line, "--protocol", "dlt645-2007", "--range", "1-000000000009"], "--range wants FIRST-LAST"),
        (
            [*line, "--protocol", "dlt645-2007", "--range", "000000000009-000000000001"],
            "--range: 000000000001 is below",
        ),
        ([*line, "--protocol", "dlt645-2007", "--units", "1-5"], "--units is for Modbus"),
        ([*line, "--protocol", "modbus", "--range", "1-5"], "Modbus devices are found by unit id: use --units"),
        ([*line, "--protocol", "modbus", "--units", "0-300"], "--units: unit ids are 1..247"),
        ([*line, "--protocol", "cjt188", "--range", "00000000000001-00000000000002"], "a CJ/T 188 range probe"),
        ([*line, "--protocol", "cjt188", "--meter-type", "1"], "--meter-type wants the type as 2 hex digits"),
    ]
    for argv, want in cases:
        code, out, err = await discover(capsys, *argv)
        assert (code, out) == (2, ""), argv
        assert err.startswith(f"meter-gateway discover: {want}"), err
        assert len(err.splitlines()) == 1, err

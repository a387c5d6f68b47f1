"""`meter-gateway read` against simulated meters over real TCP sockets and ptys at 8N1.

The command runs its own event loop, so the in-process tests run it in a thread while the
simulated bus serves on the test's loop; the first test runs both `meter-gateway simulate` and
`meter-gateway read` as the processes a field engineer would start.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from meter_gateway.gateway.cli.read_cmd import main
from meter_gateway.protocols.dlt645.catalogue import default_catalogue
from meter_gateway.protocols.dlt645.edition import Edition
from meter_gateway.simulators.cjt188_meter import Cjt188Meter
from meter_gateway.simulators.clock import SimClock
from meter_gateway.simulators.dlt645_meter import Dlt645Meter
from meter_gateway.simulators.dlt698_meter import Dlt698Meter
from meter_gateway.simulators.modbus_meter import serve_modbus
from tests.plugins.simulators import SIM_START, MetersBusFactory, SimBusFactory

pytestmark = pytest.mark.timeout(60)

CLI = [sys.executable, "-m", "meter_gateway.gateway.cli"]


async def read(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def endpoint(value: tuple[str, int] | str) -> str:
    assert isinstance(value, tuple)
    return f"{value[0]}:{value[1]}"


def dlt645_value(meter: Dlt645Meter, quantity: str) -> float:
    item = default_catalogue().by_quantity(meter.edition, quantity)
    assert item is not None
    value = meter.value_of(item)
    assert isinstance(value, float | int)
    return float(value)


def by_quantity(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["quantity"]: r for r in doc["readings"]}


@pytest.mark.asyncio
async def test_read_from_the_simulate_command_over_tcp_as_processes() -> None:
    sim = await asyncio.create_subprocess_exec(
        *CLI, "simulate", "--port", "0", "--meters", "2", stdout=asyncio.subprocess.PIPE
    )
    assert sim.stdout is not None
    try:
        line = (await asyncio.wait_for(sim.stdout.readline(), 20)).decode()
        assert line.startswith("bus1: dlt645-2007 tcp 127.0.0.1:")
        where = line.split()[3]
        assert (await asyncio.wait_for(sim.stdout.readline(), 10)).strip() == b"ready"
        args = ["read", "--tcp", where, "--protocol", "dlt645-2007", "--address", "000000000002"]
        proc = await asyncio.create_subprocess_exec(
            *CLI, *args, "energy.active.import.total,voltage.l1", "--json", stdout=asyncio.subprocess.PIPE
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0
        doc = json.loads(out)
        assert doc["address"] == "000000000002"
        assert doc["model"] == "dlt645-2007-generic"
        assert doc["link"] == f"tcp {where}"
        assert [r["quantity"] for r in doc["readings"]] == ["energy.active.import.total", "voltage.l1"]
        energy, volts = doc["readings"]
        assert energy["unit"] == "kWh"
        assert energy["value"] > 0
        assert volts["unit"] == "V"
        assert 180 < volts["value"] < 260
        assert energy["quality"] == volts["quality"] == []
        assert doc["missing"] == []
    finally:
        sim.terminate()
        assert await asyncio.wait_for(sim.wait(), 10) == 0


@pytest.mark.asyncio
async def test_read_on_a_pty_at_8n1_with_units(sim_bus: SimBusFactory, capsys: pytest.CaptureFixture[str]) -> None:
    handle = await sim_bus(2, kind="pty")
    path = handle.endpoint
    assert isinstance(path, str)
    code, out, err = await read(
        capsys,
        "--serial",
        path,
        "--baud",
        "2400",
        "--parity",
        "N",
        "--protocol",
        "dlt645-2007",
        "--address",
        "000000000002",
        "energy.active.import.total",
        "voltage.l1",
        "current.l1",
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"000000000002 (dlt645-2007, dlt645-2007-generic) on serial {path} 2400 8N1 at ")
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    value, unit = rows["energy.active.import.total"]
    assert unit == "kWh"
    assert float(value) == pytest.approx(dlt645_value(handle.meters[1], "energy.active.import.total"), abs=0.05)
    assert rows["voltage.l1"][1] == "V"
    assert rows["current.l1"][1] == "A"


@pytest.mark.asyncio
async def test_read_dlt645_1997_over_tcp(sim_bus: SimBusFactory, capsys: pytest.CaptureFixture[str]) -> None:
    handle = await sim_bus(1, edition=Edition.DLT645_1997)
    code, out, err = await read(
        capsys,
        "--tcp",
        endpoint(handle.endpoint),
        "--protocol",
        "dlt645-1997",
        "--address",
        "000000000001",
        "energy.active.import.total",
        "--json",
    )
    assert code == 0, err
    doc = json.loads(out)
    assert doc["model"] == "dlt645-1997-generic"
    (energy,) = doc["readings"]
    assert energy["value"] == pytest.approx(dlt645_value(handle.meters[0], "energy.active.import.total"), abs=0.05)


@pytest.mark.asyncio
async def test_read_dlt698_and_cjt188_meters_on_one_line(
    meters_bus: MetersBusFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    clock = SimClock(SIM_START, 1.0)
    electricity = Dlt698Meter("000000000021", clock=clock, seed=3)
    water = Cjt188Meter("00000000000031", "water", clock=clock, seed=4)
    bus = await meters_bus([electricity, water])
    where = endpoint(bus.endpoint)
    code, out, err = await read(
        capsys,
        "--tcp",
        where,
        "--protocol",
        "dlt698",
        "--address",
        "000000000021",
        "energy.active.import.total",
        "--json",
    )
    assert code == 0, err
    (energy,) = json.loads(out)["readings"]
    assert energy["unit"] == "kWh"
    assert energy["value"] == pytest.approx(electricity.quantity("energy.active.import.total"), abs=0.05)

    code, out, err = await read(capsys, "--tcp", where, "--protocol", "cjt188", "--address", "00000000000031", "--json")
    assert code == 2
    assert "give --model" in err
    assert "cjt188-cold-water" in err

    code, out, err = await read(
        capsys,
        "--tcp",
        where,
        "--protocol",
        "cjt188",
        "--address",
        "00000000000031",
        "--model",
        "cjt188-cold-water",
        "volume.total",
        "valve.state",
        "--json",
    )
    assert code == 0, err
    readings = by_quantity(json.loads(out))
    assert readings["volume.total"]["unit"] == "m3"
    assert readings["volume.total"]["value"] == pytest.approx(water.flow.volume, abs=0.05)
    assert readings["valve.state"]["value"] == "open"


@pytest.mark.asyncio
async def test_read_modbus_over_tcp(capsys: pytest.CaptureFixture[str]) -> None:
    server = await serve_modbus(units=(4,), port=0)
    try:
        host, port = server.address
        base = ["--tcp", f"{host}:{port}", "--protocol", "modbus", "--address", "4"]
        code, _, err = await read(capsys, *base, "voltage.l1")
        assert code == 2
        assert "give --model" in err
        code, out, err = await read(capsys, *base, "--model", "sim-3ph", "voltage.l1", "energy.active.import.total")
        assert code == 0, err
        rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[1:]}
        assert rows["voltage.l1"][1] == "V"
        assert 180 < float(rows["voltage.l1"][0]) < 260
        assert rows["energy.active.import.total"][1] == "kWh"
        code, _, err = await read(capsys, *base[:-1], "9", "--model", "sim-3ph", "voltage.l1", "--reply-timeout", "0.2")
        assert code == 1
        # the bus's attempts are Modbus's too: three silences in a row also reset the TCP link (a warning)
        assert err.splitlines()[-1].startswith("meter-gateway read: meter 9 on tcp ")
        assert "no answer" in err
    finally:
        await server.stop()


def write_config(tmp_path: Path, bus: str, meters: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(
        f'[gateway]\nid = "gw1"\nstate_dir = "state"\n\n[uplink]\nhost = "127.0.0.1"\n\n{bus}\n{meters}',
        encoding="utf-8",
    )
    return path


@pytest.mark.asyncio
async def test_read_a_configured_meter_with_the_configured_bus_settings(
    sim_bus: SimBusFactory, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    handle = await sim_bus(2)
    host, port = handle.endpoint
    bus = (
        f'[[buses]]\nname = "line1"\ntype = "tcp"\nprotocol = "dlt645"\nhost = "{host}"\nport = {port}\n'
        'reply_timeout = "300ms"\nattempts = 1\n'
    )
    meters = (
        '[[meters]]\nid = "m2"\nbus = "line1"\nprotocol = "dlt645-2007"\naddress = "000000000002"\n'
        'model = "dlt645-2007-generic"\n\n'
        '[[meters]]\nid = "gone"\nbus = "line1"\nprotocol = "dlt645-2007"\naddress = "000000000009"\n'
        'model = "dlt645-2007-generic"\n'
    )
    config = write_config(tmp_path, bus, meters)
    code, out, err = await read(capsys, "-c", str(config), "--meter", "m2", "voltage.l2", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert (doc["meter"], doc["bus"], doc["address"]) == ("m2", "line1", "000000000002")
    assert doc["readings"][0]["unit"] == "V"

    # the bus's reply_timeout and attempts apply: one 0.3 s wait, not the defaults' three of 1 s
    started = time.monotonic()
    code, _, err = await read(capsys, "-c", str(config), "--meter", "gone", "voltage.l2")
    assert code == 1
    assert time.monotonic() - started < 2.0
    assert "no reply within 0.30 s" in err

    # a bus of the config with an address given on the command line
    code, out, err = await read(capsys, "-c", str(config), "--bus", "line1", "--address", "000000000001", "frequency")
    assert code == 0, err
    assert out.splitlines()[1].split()[2] == "Hz"

    code, _, err = await read(capsys, "-c", str(config), "--meter", "m22")
    assert code == 2
    assert err.strip() == f"meter-gateway read: no meter 'm22' in {config} (did you mean 'm2'?)"


@pytest.mark.asyncio
async def test_bad_input_gets_one_clear_line(
    sim_bus: SimBusFactory, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    handle = await sim_bus(1)
    line = ["--tcp", endpoint(handle.endpoint), "--protocol", "dlt645-2007"]
    cases: list[tuple[list[str], int, str]] = [
        (
            [*line, "--address", "000000000001", "voltage.l"],
            2,
            "meter-gateway read: model dlt645-2007-generic has no quantity 'voltage.l' (did you mean voltage.l3?)",
        ),
        ([*line, "--address", "12345"], 2, "meter-gateway read: --address: a DL/T 645 address is exactly 12"),
        ([*line, "--address", "999999999999"], 2, "meter-gateway read: --address: 999999999999 is a broadcast"),
        (["--tcp", "127.0.0.1:1", "--address", "1"], 2, "meter-gateway read: --protocol is needed"),
        ([*line, "--address", "000000000001", "--baud", "2400"], 2, "meter-gateway read: --baud: serial settings"),
        (["--address", "000000000001"], 2, "meter-gateway read: give the line: --tcp HOST:PORT or --serial"),
        (
            [*line, "--address", "000000000001", "--model", "sim-3ph"],
            2,
            "meter-gateway read: model sim-3ph is a modbus",
        ),
    ]
    for argv, want_code, want in cases:
        code, out, err = await read(capsys, *argv)
        assert (code, out) == (want_code, ""), argv
        assert err.startswith(want), err
        assert len(err.splitlines()) == 1, err

    bad = tmp_path / "bad.toml"
    bad.write_text('[gateway]\nid = "gw1"\nbaudrate = 2\n[uplink]\nhost = "h"\n', encoding="utf-8")
    code, _, err = await read(capsys, "-c", str(bad), "--meter", "m1")
    assert code == 78
    assert err.startswith(f"error: {bad}:3: gateway.baudrate: ")

    code, _, err = await read(capsys, "--tcp", "127.0.0.1:1", "--protocol", "dlt645-2007", "--address", "000000000001")
    assert code == 1
    assert err.splitlines()[-1] == "meter-gateway read: cannot open tcp 127.0.0.1:1: Connection refused"


def test_cjt188_serial_lines_default_to_2400_8e1_without_opening_the_port(tmp_path: Path) -> None:
    """The field tools' serial defaults per protocol (gateway/cli/field_bus.py): CJ/T 188 meters
    ship at 2400 8E1 (clause 6.1), as DL/T 645 ones; resolving the line opens nothing."""
    from meter_gateway.gateway.cli.field_bus import describe_link, resolve_target
    from meter_gateway.gateway.cli.read_cmd import _parser

    port = str(tmp_path / "no-such-tty")  # never opened: resolving the line only checks settings
    argv = ["--serial", port, "--protocol", "cjt188", "--address", "00000000000001"]
    target = resolve_target(_parser().parse_args(argv))
    bus = target.bus
    assert (target.protocol, bus.protocol) == ("cjt188", "cjt188")
    assert (bus.baud_rate, bus.data_bits, bus.parity, bus.stop_bits) == (2400, 8, "E", 1)  # type: ignore[union-attr]
    assert describe_link(bus) == f"serial {port} 2400 8E1"
    # a meter set to another rate keeps the parity and frame
    faster = resolve_target(_parser().parse_args([*argv, "--baud", "9600"])).bus
    assert describe_link(faster) == f"serial {port} 9600 8E1"
    # Modbus lines default differently: the table is per protocol
    modbus = resolve_target(_parser().parse_args(["--serial", port, "--protocol", "modbus", "--address", "1"])).bus
    assert describe_link(modbus) == f"serial {port} 9600 8N1"
    assert not Path(port).exists()

"""Simulated buses over real TCP sockets and a pty: addressing, timing and every fault knob."""

from __future__ import annotations

import asyncio
import datetime
import signal
import sys
import time
from pathlib import Path

import pytest
import serial

from meter_gateway.protocols.dlt645 import messages as m
from meter_gateway.protocols.dlt645.deframer import Deframer
from meter_gateway.protocols.dlt645.edition import Edition
from meter_gateway.protocols.dlt645.frame import BROADCAST, WILDCARD, Address, Frame
from meter_gateway.protocols.dlt645.remote_control import RemoteCommand
from meter_gateway.simulators.faults import Faults
from tests.plugins import simulators as sim_plugin
from tests.plugins.simulators import DltTcpClient, SimBusFactory, discards_of, frames_of

sim_bus = sim_plugin.sim_bus  # the fixture, until conftest lists tests.plugins.simulators

E7 = Edition.DLT645_2007
E97 = Edition.DLT645_1997
A1 = Address.parse("000000000001")
A2 = Address.parse("000000000002")
READ = m.ReadRequest(A1, 0x00010000).encode(E7, preamble=4)


async def client_for(sim_bus: SimBusFactory, n: int = 1, **options: object) -> tuple[DltTcpClient, object]:
    handle = await sim_bus(n, **options)
    return await DltTcpClient.connect(handle.endpoint), handle


@pytest.mark.asyncio
async def test_only_the_addressed_meter_answers(sim_bus: SimBusFactory) -> None:
    handle = await sim_bus(3)
    client = await DltTcpClient.connect(handle.endpoint)
    reply = await client.request(m.ReadRequest(A2, 0x00010000).encode(E7))
    assert reply is not None
    assert reply.address == A2
    assert await client.request(m.ReadRequest(Address.parse("000000000009"), 0x00010000).encode(E7), 0.2) is None
    assert [mt.requests for mt in handle.meters] == [0, 1, 0]
    await client.close()


@pytest.mark.asyncio
async def test_wildcard_and_read_address_only_on_a_single_meter_link(sim_bus: SimBusFactory) -> None:
    many = await sim_bus(3)
    client = await DltTcpClient.connect(many.endpoint)
    assert await client.request(m.ReadAddressRequest().encode(E7), 0.2) is None
    assert await client.request(m.ReadRequest(WILDCARD, 0x00010000).encode(E7), 0.2) is None
    assert many.bus.stats["wildcard_unanswered"] == 2
    await client.close()
    single = await sim_bus(1, first_address=123456)
    client = await DltTcpClient.connect(single.endpoint)
    frame = await client.request(m.ReadAddressRequest().encode(E7))
    assert frame is not None
    reply = m.parse_message(frame, E7)
    assert isinstance(reply, m.ReadAddressReply)
    assert str(reply.meter_address) == "000000123456"
    frame = await client.request(m.ReadRequest(WILDCARD, 0x00010000).encode(E7))
    assert frame is not None
    assert str(frame.address) == "000000123456"
    await client.close()


@pytest.mark.asyncio
async def test_broadcast_time_reaches_every_meter_silently(sim_bus: SimBusFactory) -> None:
    handle = await sim_bus(3, speed=0.0)
    client = await DltTcpClient.connect(handle.endpoint)
    target = datetime.datetime(2026, 3, 14, 9, 58, 0)
    await client.send(m.BroadcastTime(BROADCAST, target).encode(E7, preamble=4))
    assert frames_of(await client.events(0.2)) == []
    assert [mt.meter_time() for mt in handle.meters] == [target] * 3
    await client.close()


@pytest.mark.asyncio
async def test_follow_up_frames_over_tcp(sim_bus: SimBusFactory) -> None:
    handle = await sim_bus(1, tariffs=63)
    client = await DltTcpClient.connect(handle.endpoint)
    first = await client.request(m.ReadRequest(A1, 0x0001FF00).encode(E7))
    assert first is not None
    assert first.control.byte == 0xB1
    second = await client.request(m.ReadFollowUpRequest(A1, 0x0001FF00, 1).encode(E7))
    assert second is not None
    assert second.control.byte == 0x92
    await client.close()


@pytest.mark.asyncio
async def test_dlt645_1997_over_tcp(sim_bus: SimBusFactory) -> None:
    handle = await sim_bus(2, edition=E97)
    client = await DltTcpClient.connect(handle.endpoint)
    frame = await client.request(m.ReadRequest(A2, 0x9010).encode(E97))
    assert frame is not None
    assert frame.control.byte == 0x81
    assert frame.address == A2
    await client.close()


@pytest.mark.asyncio
async def test_wire_time_pacing_at_2400_8e1(sim_bus: SimBusFactory) -> None:
    handle = await sim_bus(1, baud=2400, bits_per_char=11, preamble=4)
    client = await DltTcpClient.connect(handle.endpoint)
    request = m.ReadRequest(A1, 0x0201FF00).encode(E7)  # voltages: 4 FE + 12 + 4 + 6 = 26 bytes back
    started = time.monotonic()
    frame = await client.request(request, 2.0)
    elapsed = time.monotonic() - started
    assert frame is not None
    n = len(client.raw)
    assert n == 26
    assert elapsed >= n * 11 / 2400  # the reply alone, ~0.119 s
    assert elapsed >= (n + len(request)) * 11 / 2400 - 0.005  # plus the request on the wire
    await client.close()


@pytest.mark.asyncio
async def test_turnaround_delays_the_reply(sim_bus: SimBusFactory) -> None:
    handle = await sim_bus(1, turnaround=0.15)
    client = await DltTcpClient.connect(handle.endpoint)
    started = time.monotonic()
    assert await client.request(READ) is not None
    assert time.monotonic() - started >= 0.15
    await client.close()


@pytest.mark.asyncio
async def test_fault_drop_request(sim_bus: SimBusFactory) -> None:
    client, handle = await client_for(sim_bus, faults=Faults(drop_request=1.0))
    assert await client.request(READ, 0.2) is None
    assert handle.bus.stats["drop_request"] == 1  # type: ignore[attr-defined]
    assert handle.meters[0].requests == 0  # type: ignore[attr-defined]
    await client.close()


@pytest.mark.asyncio
async def test_fault_drop_reply_still_acts(sim_bus: SimBusFactory) -> None:
    client, handle = await client_for(sim_bus, faults=Faults(drop_reply=1.0))
    assert await client.request(READ, 0.2) is None
    assert handle.bus.stats["drop_reply"] == 1  # type: ignore[attr-defined]
    assert handle.meters[0].requests == 1  # type: ignore[attr-defined]
    await client.close()


@pytest.mark.asyncio
async def test_fault_truncate_reply(sim_bus: SimBusFactory) -> None:
    client, handle = await client_for(sim_bus, faults=Faults(truncate_reply=1.0))
    assert await client.request(READ, 0.2) is None
    assert 0 < len(client.raw) < 4 + 12 + 8
    assert handle.bus.stats["truncate_reply"] == 1  # type: ignore[attr-defined]
    await client.close()


@pytest.mark.asyncio
async def test_fault_corrupt_byte(sim_bus: SimBusFactory) -> None:
    client, handle = await client_for(sim_bus, faults=Faults(corrupt_byte=1.0, seed=3))
    await client.send(READ)
    events = await client.events(0.3)
    # the next good frame flushes whatever the corrupted one left in the deframer
    handle.bus.faults.corrupt_byte = 0.0  # type: ignore[attr-defined]
    await client.send(READ)
    events += await client.events(0.3, until_frames=1)
    assert len(frames_of(events)) == 1
    assert discards_of(events)
    assert handle.bus.stats["corrupt_byte"] == 1  # type: ignore[attr-defined]
    await client.close()


@pytest.mark.asyncio
async def test_fault_wrong_address(sim_bus: SimBusFactory) -> None:
    client, handle = await client_for(sim_bus, faults=Faults(wrong_address=1.0))
    frame = await client.request(READ)
    assert frame is not None
    assert frame.address != A1
    assert frame.control.byte == 0x91
    assert handle.bus.stats["wrong_address"] == 1  # type: ignore[attr-defined]
    await client.close()


@pytest.mark.asyncio
async def test_fault_echo_request(sim_bus: SimBusFactory) -> None:
    client, _ = await client_for(sim_bus, faults=Faults(echo_request=1.0))
    await client.send(READ)
    frames = frames_of(await client.events(0.5, until_frames=2))
    assert [f.control.byte for f in frames] == [0x11, 0x91]
    await client.close()


@pytest.mark.asyncio
async def test_fault_noise_burst(sim_bus: SimBusFactory) -> None:
    client, handle = await client_for(sim_bus, faults=Faults(noise_burst=1.0, seed=1))
    await client.send(READ)
    events = await client.events(0.5, until_frames=1)
    assert len(frames_of(events)) == 1
    assert len(client.raw) > 4 + 12 + 8  # the reply plus 3..16 noise bytes
    assert handle.bus.stats["noise_burst"] == 1  # type: ignore[attr-defined]
    await client.close()


@pytest.mark.asyncio
async def test_fault_late_reply_lands_in_the_next_exchange(sim_bus: SimBusFactory) -> None:
    client, handle = await client_for(sim_bus, 2, faults=Faults(per_meter={"000000000001": Faults(late_reply=0.3)}))
    assert await client.request(READ, 0.15) is None  # the gateway gives up on meter 1 ...
    await client.send(m.ReadRequest(A2, 0x00010000).encode(E7))
    frames = frames_of(await client.events(0.6, until_frames=2))
    # ... and meter 1's late reply arrives while it talks to meter 2
    assert sorted(str(f.address) for f in frames) == ["000000000001", "000000000002"]
    assert handle.bus.stats["late_reply"] == 1  # type: ignore[attr-defined]
    await client.close()


@pytest.mark.asyncio
async def test_fault_never_answer_per_meter(sim_bus: SimBusFactory) -> None:
    faults = Faults(per_meter={"000000000002": Faults(never_answer=True)})
    client, handle = await client_for(sim_bus, 2, faults=faults)
    assert await client.request(READ) is not None
    assert await client.request(m.ReadRequest(A2, 0x00010000).encode(E7), 0.2) is None
    assert handle.bus.stats["never_answer"] == 1  # type: ignore[attr-defined]
    await client.close()


@pytest.mark.asyncio
async def test_fault_dribble(sim_bus: SimBusFactory) -> None:
    client, handle = await client_for(sim_bus, faults=Faults(dribble=0.01))
    started = time.monotonic()
    reads = 0
    await client.send(READ)
    loop_deadline = started + 2.0
    deframer = Deframer()
    got: list[Frame] = []
    while not got and time.monotonic() < loop_deadline:
        chunk = await asyncio.wait_for(client.reader.read(100), 1.0)
        reads += 1
        got += [e for e in deframer.feed(chunk) if isinstance(e, Frame)]
    assert got
    assert time.monotonic() - started >= 23 * 0.01  # 24 bytes, one every 10 ms
    assert reads > 3  # the reply came in pieces
    assert handle.bus.stats["dribble"] == 1  # type: ignore[attr-defined]
    await client.close()


@pytest.mark.asyncio
async def test_fault_stuck_relay_from_bus_faults(sim_bus: SimBusFactory) -> None:
    client, handle = await client_for(sim_bus, faults=Faults(stuck_relay=True))
    meter = handle.meters[0]  # type: ignore[attr-defined]
    valid = meter.meter_time() + datetime.timedelta(minutes=5)
    trip = m.RemoteControlRequest(A1, m.Password(2), "00000001", RemoteCommand.TRIP, 0, valid.replace(microsecond=0))
    frame = await client.request(trip.encode(E7))
    assert frame is not None
    assert frame.control.byte == 0x9C
    assert meter.stuck_relay
    assert meter.relay_closed
    await client.close()


@pytest.mark.asyncio
async def test_faults_change_at_run_time(sim_bus: SimBusFactory) -> None:
    client, handle = await client_for(sim_bus)
    assert await client.request(READ) is not None
    handle.bus.faults = Faults(never_answer=True)  # type: ignore[attr-defined]
    assert await client.request(READ, 0.2) is None
    handle.bus.faults.never_answer = False  # type: ignore[attr-defined]
    assert await client.request(READ) is not None
    await client.close()


def test_fault_config_rejects_typos_and_bad_probabilities() -> None:
    with pytest.raises(ValueError, match="unknown fault"):
        Faults.from_mapping({"drop_requests": 0.1})
    with pytest.raises(ValueError, match="probability"):
        Faults(drop_reply=1.5)
    faults = Faults.from_mapping({"drop_reply": 0.1, "per_meter": {"000000000003": {"never_answer": True}}})
    assert faults.for_meter("000000000003").never_answer
    assert faults.for_meter("000000000003").drop_reply == 0.1
    assert not faults.for_meter("000000000001").never_answer


@pytest.mark.asyncio
async def test_pty_bus(sim_bus: SimBusFactory) -> None:
    handle = await sim_bus(2, kind="pty")
    path = handle.endpoint
    assert isinstance(path, str)
    assert path.startswith("/dev/")

    def exchange() -> bytes:
        with serial.Serial(path, 2400, bytesize=8, parity="N", stopbits=1, timeout=0.5) as port:
            port.write(m.ReadRequest(A2, 0x00010000).encode(E7, preamble=4))
            return bytes(port.read(24))

    raw = await asyncio.to_thread(exchange)
    frames = frames_of(Deframer().feed(raw))
    assert len(frames) == 1
    assert frames[0].address == A2
    assert frames[0].control.byte == 0x91


# -- the `meter-gateway simulate` CLI -------------------------------------------------------------


async def _read_until_ready(stream: asyncio.StreamReader) -> list[str]:
    lines: list[str] = []
    while True:
        line = (await asyncio.wait_for(stream.readline(), 10)).decode().strip()
        assert line, "simulator exited before it was ready"
        if line == "ready":
            return lines
        lines.append(line)


@pytest.mark.asyncio
async def test_cli_serves_reads_takes_control_commands_and_stops_on_sigterm() -> None:
    code = "import sys; from meter_gateway.simulators.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        "--meters",
        "5",
        "--buses",
        "2",
        "--port",
        "0",
        "--control-port",
        "0",
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        lines = await _read_until_ready(proc.stdout)
        control_line, bus1, bus2 = lines
        assert bus1.endswith("3 meters: 000000000001-000000000003")
        assert bus2.endswith("2 meters: 000000000004-000000000005")
        host, _, port = bus2.split()[3].rpartition(":")
        client = await DltTcpClient.connect((host, int(port)))
        frame = await client.request(m.ReadRequest(Address.parse("000000000005"), 0x00010000).encode(E7))
        assert frame is not None
        assert str(frame.address) == "000000000005"
        assert await client.request(READ, 0.2) is None  # meter 1 is on the other bus
        await client.close()
        cport = int(control_line.split()[1].rpartition(":")[2])
        reader, writer = await asyncio.open_connection("127.0.0.1", cport)
        replies = []
        commands = (
            "press 000000000001",
            "status 000000000004",
            "fault 2 drop_reply 7",
            "nonsense",
            "fault 000000000005 never_answer on",
        )
        for command in commands:
            writer.write(command.encode() + b"\n")
            replies.append((await asyncio.wait_for(reader.readline(), 5)).decode().strip())
        writer.close()
        await writer.wait_closed()
        assert replies[0] == "ok not armed: relay unchanged"
        assert replies[1].startswith("ok relay=closed armed=False")
        assert replies[2].startswith("error fault drop_reply is a probability")
        assert replies[3].startswith("error unknown command")
        assert replies[4] == "ok never_answer value = True"
        client = await DltTcpClient.connect((host, int(port)))
        assert await client.request(m.ReadRequest(Address.parse("000000000005"), 0x00010000).encode(E7), 0.3) is None
        assert await client.request(m.ReadRequest(Address.parse("000000000004"), 0x00010000).encode(E7)) is not None
        await client.close()
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        rc = await asyncio.wait_for(proc.wait(), 10)
    assert rc == 0


def test_cli_bad_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from meter_gateway.simulators.cli import main

    path = tmp_path / "sim.toml"
    path.write_text('[[bus]]\nprotocol = "dlt645-2007"\nbaud_rate = 2400\n')
    assert main(["--config", str(path)]) == 2
    assert "unknown key(s) ['baud_rate']" in capsys.readouterr().err


def test_cli_compact_ranges() -> None:
    from meter_gateway.simulators.cli import compact_ranges

    assert compact_ranges(["000000000003", "000000000001", "000000000002", "000000000007"]) == (
        "000000000001-000000000003, 000000000007"
    )
    assert compact_ranges(["1", "2", "5"]) == "1-2, 5"


def test_example_config_loads() -> None:
    from meter_gateway.simulators.sim_config import load_config

    config = load_config(Path(__file__).resolve().parents[1] / "config" / "simulator.toml")
    assert [b.protocol for b in config.buses] == ["dlt645-2007", "dlt645-2007", "dlt645-1997", "modbus-tcp"]
    assert len(config.buses[0].meters) == 32
    assert config.buses[0].baud == 2400
    noisy = config.buses[1].faults
    assert noisy.for_meter("000000001002").never_answer
    assert noisy.for_meter("000000001003").stuck_relay
    assert noisy.for_meter("000000001001").drop_reply == 0.02
    assert config.buses[2].kind == "pty"

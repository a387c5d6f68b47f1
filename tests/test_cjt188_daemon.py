"""CJ/T 188 end to end with real parts only: `meter-gateway run` as a subprocess, a real mosquitto,
one line of DL/T 645-2007 electricity meters and a second of CJ/T 188 water and gas meters (both
simulated in this process on real TCP ports, so the test sees each valve), readings of both lines
in one uplink, and signed valve commands sent by `meter-gateway ctl`: a prepaid ``valve_close``
then ``valve_open`` verified by reading ST back, and a stuck valve ending ``meter_refused`` with
reason ``valve_abnormal``."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio

from meter_gateway.gateway.uplink.contract import decode_batch
from meter_gateway.protocols.dlt645.edition import Edition
from meter_gateway.simulators.cjt188_meter import Cjt188Meter
from meter_gateway.simulators.clock import SimClock
from meter_gateway.simulators.dlt645_meter import Dlt645Meter
from meter_gateway.simulators.links import LinkConfig, SimulatedBus
from tests.plugins.broker import Broker, Subscriber
from tests.plugins.simulators import SIM_START
from tests.test_commands_daemon import GW, TOPICS, Daemon, acks_of, cli, final, history, states_printed, until

WATER, GAS, STUCK = "water-1", "gas-1", "water-2"
ELECTRICITY = ("flat-1", "flat-2")


@dataclass
class Site:
    tmp_path: Path
    broker: Broker
    key: Path
    pub: Path
    clock: SimClock = field(default_factory=lambda: SimClock(SIM_START, 1.0))
    lines: list[SimulatedBus] = field(default_factory=list)
    subs: list[Subscriber] = field(default_factory=list)
    daemons: list[Daemon] = field(default_factory=list)

    def ctl(self, verb: str, *meters: str) -> list[str]:
        args = ["ctl", verb, *meters, "--gateway", GW, "--key", str(self.key), "--key-id", "ops"]
        return [*args, "--broker", f"{self.broker.host}:{self.broker.port}", "--wait", "--timeout", "30"]


@pytest_asyncio.fixture
async def site(tmp_path: Path, mosquitto: Broker) -> AsyncIterator[Site]:
    code, _, err = await cli("ctl", "keygen", "--key-id", "ops", "--out", str(tmp_path / "keys"))
    assert code == 0, err
    s = Site(tmp_path, mosquitto, tmp_path / "keys" / "ops.key", tmp_path / "keys" / "ops.pub")
    try:
        yield s
    finally:
        for d in s.daemons:
            if d.proc is not None and d.proc.returncode is None:
                await d.kill()
        for line in s.lines:
            await line.stop()
        for sub in s.subs:
            sub.stop()


def config_text(site: Site, electricity_port: int, water_port: int) -> str:
    meters = "".join(
        f'\n[[meters]]\nid = "{mid}"\nbus = "electricity"\nprotocol = "dlt645-2007"\n'
        f'address = "{i:012d}"\nmodel = "dlt645-2007-generic"\n'
        for i, mid in enumerate(ELECTRICITY, 1)
    )
    for mid, address, model in (
        (WATER, "00000000000001", "cjt188-cold-water"),
        (GAS, "00000000000002", "cjt188-gas"),
        (STUCK, "00000000000003", "cjt188-cold-water"),
    ):
        meters += f'\n[[meters]]\nid = "{mid}"\nbus = "water"\nprotocol = "cjt188"\naddress = "{address}"\n'
        meters += f'model = "{model}"\n'
    return f"""
[gateway]
id = "{GW}"
timezone = "Asia/Shanghai"
state_dir = "{site.tmp_path / "state"}"

[uplink]
host = "{site.broker.host}"
port = {site.broker.port}
keepalive = "10s"

[metrics]
enabled = false

[commands]
enabled = true
verify_window = "5s"
retry = 3

[[commands.keys]]
id = "ops"
alg = "ed25519"
public_key_file = "{site.pub}"
roles = ["command"]

[[buses]]
name = "electricity"
type = "tcp"
host = "127.0.0.1"
port = {electricity_port}
protocol = "dlt645"
reply_timeout = "2s"
attempts = 2

[[buses]]
name = "water"
type = "tcp"
host = "127.0.0.1"
port = {water_port}
protocol = "cjt188"
reply_timeout = "2s"
attempts = 2
{meters}
[[poll_groups]]
name = "electricity"
interval = "1s"
quantities = ["energy.active.import.total"]
meters = ["flat-1", "flat-2"]

[[poll_groups]]
name = "water"
interval = "1s"
quantities = ["volume.total", "valve.state", "battery.low"]
meters = ["{WATER}", "{GAS}", "{STUCK}"]
"""


@pytest.mark.asyncio
async def test_electricity_water_and_gas_in_one_uplink_and_valve_commands(site: Site) -> None:
    clock = site.clock
    electricity = SimulatedBus(
        [Dlt645Meter(f"{i:012d}", Edition.DLT645_2007, clock=clock) for i in (1, 2)], LinkConfig()
    )
    water = Cjt188Meter("00000000000001", "water", clock=clock, valve_time=0.5)
    gas = Cjt188Meter("00000000000002", "gas", clock=clock, valve_time=0.5)
    stuck = Cjt188Meter("00000000000003", "water", clock=clock)
    stuck.stuck_valve = True
    water_line = SimulatedBus([water, gas, stuck], LinkConfig())
    for line in (electricity, water_line):
        await line.start()
        site.lines.append(line)
    ports = [line.endpoint[1] for line in (electricity, water_line)]  # type: ignore[index]
    config = site.tmp_path / "gateway.toml"
    config.write_text(config_text(site, *ports))
    sub = Subscriber(site.broker, [TOPICS.acks, TOPICS.commands, TOPICS.readings]).start()
    site.subs.append(sub)
    daemon = Daemon(config, site.tmp_path / "daemon.log", sub, site.broker)
    site.daemons.append(daemon)
    await daemon.start()

    # (1) both lines' readings arrive through the one uplink, water and gas in canonical units
    def readings() -> dict[tuple[str, str], tuple[object, str]]:
        out = {}
        for message in sub.snapshot(TOPICS.readings):
            for r in decode_batch(message.payload).readings:
                out[(r.meter, r.qty)] = (r.value, r.unit)
        return out

    wanted = {(m, "energy.active.import.total") for m in ELECTRICITY} | {
        (m, q) for m in (WATER, GAS, STUCK) for q in ("volume.total", "valve.state", "battery.low")
    }
    await until(lambda: wanted <= set(readings()), 30, "readings of every meter", daemon)
    got = readings()
    assert got[(ELECTRICITY[0], "energy.active.import.total")][1] == "kWh"
    assert got[(WATER, "volume.total")][1] == "m3"
    assert got[(GAS, "volume.total")][1] == "m3"
    assert got[(WATER, "valve.state")] == ("open", "")
    assert got[(GAS, "battery.low")] == (0, "")

    # (2) a prepaid shut-off and its restoration, each verified by reading ST back
    code, out, err = await cli(*site.ctl("valve-close", WATER, GAS))
    assert code == 0, out + err + daemon.log_tail()
    assert states_printed(out, WATER) == ["queued", "sent", "meter_acknowledged", "verified"]
    assert not water.valve_open
    assert not gas.valve_open
    closed_at = time.monotonic()
    await until(lambda: readings()[(WATER, "valve.state")] == ("closed", ""), 10, "the closed valve polled", daemon)
    code, out, err = await cli(*site.ctl("valve-open", WATER, GAS))
    assert code == 0, out + err
    assert water.valve_open
    assert gas.valve_open
    assert time.monotonic() - closed_at < 30

    # (3) a stuck valve: the meter acknowledges with ST "abnormal"; final, not retried
    code, out, err = await cli(*site.ctl("valve-close", STUCK))
    assert code == 1, out + err
    assert "meter_refused  reason=valve_abnormal" in out
    assert stuck.valve_open
    (command,) = {a.command for a in acks_of(sub) if a.meter == STUCK}
    assert command is not None
    end = final(sub, command, STUCK)
    assert end is not None
    assert (end.state, end.reason) == ("meter_refused", "valve_abnormal")
    assert [a.state for a in history(sub, command, STUCK)] == ["queued", "sent", "meter_refused"]

    # (4) the audit log has the valve commands
    code, out, err = await cli("audit", "-c", str(config), "--meter", WATER)
    assert code == 0, err
    assert "valve_close" in out
    assert "valve_open" in out
    assert await daemon.stop() == 0

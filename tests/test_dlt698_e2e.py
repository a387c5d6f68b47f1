"""DL/T 698.45 through the whole daemon, with real parts only: ``gateway.daemon.app.Gateway`` on a real
config file, a real mosquitto, simulated DL/T 698.45 and DL/T 645-2007 meters on one TCP line and
Modbus meters on another (real sockets), commands signed by ``meter-gateway ctl`` with a key made
by ``ctl keygen``, and the outbox and cursor store on disk.

* readings of all three protocols reach the broker under the same quantity names;
* a signed disconnect and reconnect of a 698.45 meter in plaintext control mode, and of one in
  pass-through mode whose APDU the head-end's crypto service sealed (here the simulator's
  documented test-only scheme, ``simulators/dlt698_test_security.py``), each verified by the
  daemon reading the relay back and by the simulated relay itself;
* the report a 698.45 meter sends after its relay moved is published on its events topic;
* a gateway outage across midnights: the restarted daemon fills the missed midnight slots of
  both 698.45 and 645 meters from their daily freezes (as test_gateway_jobs.py does for 645).
"""

from __future__ import annotations

import asyncio
import datetime
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from meter_gateway.drivers.reading import Quality
from meter_gateway.gateway.cli import ctl_cmd
from meter_gateway.gateway.commands.auth import KeyRing
from meter_gateway.gateway.commands.envelope import decode_ack
from meter_gateway.gateway.daemon.schedule import freeze_time
from meter_gateway.gateway.uplink.contract import Topics, decode_batch, decode_meter_event
from meter_gateway.protocols.dlt698 import requests as rq
from meter_gateway.protocols.dlt698.frame import ServerAddress
from meter_gateway.simulators.clock import SimClock
from meter_gateway.simulators.dlt645_meter import Dlt645Meter
from meter_gateway.simulators.dlt698_meter import Dlt698Meter
from meter_gateway.simulators.dlt698_test_security import TestOnlySecurity
from meter_gateway.simulators.links import SimulatedBus
from meter_gateway.simulators.modbus_meter import ModbusSimServer, SimulatedMeter
from tests.plugins.broker import Broker, Subscriber
from tests.plugins.daemon import running, until
from tests.plugins.simulators import MetersBusFactory
from tests.test_ctl import GW, _args, keys  # noqa: F401  (keys is a fixture)

TZ = ZoneInfo("Asia/Shanghai")
E_TOTAL = "energy.active.import.total"
TOPICS = Topics(GW)
PLAIN = "000000000011"  # a 698.45 meter that takes plaintext control
SEALED = "000000000012"  # one that takes control only as a secured APDU (pass-through)


@dataclass
class SimWallClock:
    sim: SimClock

    def __call__(self) -> float:
        return self.sim.now().replace(tzinfo=TZ).timestamp()


def config_text(state: Path, broker_port: int, line_port: int, modbus_port: int | None, extra: str = "") -> str:
    modbus = (
        f'\n[[buses]]\nname = "mb"\ntype = "tcp"\nhost = "127.0.0.1"\nport = {modbus_port}\n'
        'protocol = "modbus-tcp"\nreply_timeout = "1s"\n'
        '\n[[meters]]\nid = "mb-1"\nbus = "mb"\nprotocol = "modbus"\naddress = 1\nmodel = "sim-3ph"\n'
        if modbus_port is not None
        else ""
    )
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
name = "line-a"
type = "tcp"
host = "127.0.0.1"
port = {line_port}
protocol = "dlt698"
reply_timeout = "1s"
attempts = 2

[[meters]]
id = "p-plain"
bus = "line-a"
protocol = "dlt698"
address = "{PLAIN}"
model = "dlt698-generic"

[[meters]]
id = "p-sealed"
bus = "line-a"
protocol = "dlt698"
address = "{SEALED}"
model = "dlt698-generic"
dlt698 = {{ control = "passthrough" }}

[[meters]]
id = "m-645"
bus = "line-a"
protocol = "dlt645-2007"
address = "000000000001"
model = "dlt645-2007-generic"
{modbus}
[[poll_groups]]
name = "energy15"
interval = "15m"
quantities = ["{E_TOTAL}", "voltage.l1"]
spread = 0
backfill = true
{extra}"""


def now_local() -> datetime.datetime:
    return datetime.datetime.now(TZ).replace(tzinfo=None, microsecond=0)


async def ctl(broker: Broker, key_dir: Path, action: str, meter: str, seq: int, *extra: str) -> int:
    """``meter-gateway ctl ACTION METER --id c<seq> --seq <seq> EXTRA --wait``, in a thread while
    this loop runs the daemon and the meters."""
    argv = [action, meter, "--id", f"c{seq}", "--seq", str(seq), *extra, *_args(broker, key_dir)]
    return await asyncio.to_thread(ctl_cmd.main, [*argv, "--wait", "--timeout", "30"])


@pytest.mark.asyncio
async def test_mixed_line_reads_and_signed_control_of_698_meters_in_both_modes(
    tmp_path: Path,
    mosquitto: Broker,
    meters_bus: MetersBusFactory,
    keys: tuple[Path, KeyRing],  # noqa: F811
) -> None:
    key_dir, _ = keys
    clock = SimClock(now_local(), 1.0)  # the meters keep real time: ctl signs with the real clock
    plain = Dlt698Meter(PLAIN, clock=clock, seed=1, report=True)
    sealed = Dlt698Meter(SEALED, clock=clock, seed=2, accept_plaintext_control=False)
    old = Dlt645Meter("000000000001", clock=clock, seed=3)
    line: SimulatedBus = await meters_bus([plain, sealed, old])
    modbus = ModbusSimServer({1: SimulatedMeter("sim-3ph", start=time.time())}, transport="tcp", port=0)
    await modbus.start()
    state = tmp_path / "state"
    commands = (
        '\n[commands]\nenabled = true\nverify_window = "5s"\n'
        f'[[commands.keys]]\nid = "ops"\nalg = "ed25519"\npublic_key_file = "{key_dir / "ops.pub"}"\n'
        'roles = ["command"]\n'
    )
    # a 15 min interval polls each meter once at start: the readings needed, and a quiet line
    text = config_text(state, mosquitto.port, line.endpoint[1], modbus.address[1])  # type: ignore[index]
    path = tmp_path / "gw.toml"
    path.write_text(text + commands)
    sub = Subscriber(mosquitto, [TOPICS.readings, f"{TOPICS.base}/meters/+/events", TOPICS.acks]).start()
    try:
        async with running(path) as gw:

            def read_meters() -> set[str]:
                batches = [decode_batch(m.payload) for m in sub.snapshot(TOPICS.readings)]
                return {r.meter for b in batches for r in b.readings if r.qty == E_TOTAL}

            await until(lambda: read_meters() == {"p-plain", "p-sealed", "m-645", "mb-1"}, 30)
            assert gw.commands is not None

            # plaintext mode: the gateway makes the ACTION itself
            assert await ctl(mosquitto, key_dir, "disconnect", "p-plain", 1) == 0
            assert plain.relay_closed is False
            assert await ctl(mosquitto, key_dir, "reconnect", "p-plain", 2, "--mode", "direct_close") == 0
            assert plain.relay_closed is True

            # pass-through mode: the head-end's sealed APDU, forwarded untouched
            assert await ctl(mosquitto, key_dir, "disconnect", "p-sealed", 3) != 0  # no APDU
            assert sealed.relay_closed is True
            security = TestOnlySecurity()
            address = ServerAddress.parse(SEALED)
            trip = security.seal_request(rq.relay_trip(address, piid=5).apdu, sid=7).encode().hex()
            close = security.seal_request(rq.relay_close(address, close_now=True, piid=6).apdu, sid=8).encode().hex()
            assert await ctl(mosquitto, key_dir, "disconnect", "p-sealed", 4, "--apdu", trip) == 0
            assert sealed.relay_closed is False
            assert await ctl(mosquitto, key_dir, "reconnect", "p-sealed", 5, "--apdu", close) == 0
            assert sealed.relay_closed is True
            # an APDU for a meter that cannot take one is refused before anything is sent
            assert await ctl(mosquitto, key_dir, "disconnect", "m-645", 6, "--apdu", trip) != 0
            assert old.relay_closed

            # the plaintext meter reported its relay moves: published on its events topic
            await until(lambda: len(sub.snapshot(f"{TOPICS.base}/meters/p-plain/events")) >= 1)
    finally:
        sub.stop()
        await modbus.stop()

    finals = {}
    for msg in sub.snapshot(TOPICS.acks):
        ack = decode_ack(msg.payload)
        if ack.meter is not None:
            finals[ack.command] = ack
    assert {c: finals[c].state for c in ("c1", "c2", "c4", "c5")} == dict.fromkeys(("c1", "c2", "c4", "c5"), "verified")
    assert finals["c3"].state == "rejected"
    assert finals["c3"].reason == "unsupported"
    assert (finals["c6"].state, finals["c6"].reason) == ("rejected", "unsupported")
    event = decode_meter_event(sub.snapshot(f"{TOPICS.base}/meters/p-plain/events")[0].payload)
    assert (event.meter, event.protocol, event.kind) == ("p-plain", "dlt698", "report")
    assert event.apdu.startswith("88")  # REPORT-Notification
    assert event.detail is not None
    assert event.detail["service"] == "REPORT-Notification"
    assert sealed.reports_sent == 0  # it was not asked to report


def rows(state: Path) -> list[sqlite3.Row]:
    with sqlite3.connect(state / "outbox.sqlite") as conn:
        conn.row_factory = sqlite3.Row
        return conn.execute("SELECT * FROM readings ORDER BY row_id").fetchall()


@pytest.mark.asyncio
async def test_an_outage_across_midnights_is_backfilled_from_698_and_645_daily_freezes(
    tmp_path: Path, unused_port: int, meters_bus: MetersBusFactory
) -> None:
    clock = SimClock(datetime.datetime(2026, 3, 14, 10, 0), 0.0)
    meters = [
        Dlt698Meter(PLAIN, clock=clock, seed=1, history_days=10),
        Dlt698Meter(SEALED, clock=clock, seed=2, history_days=10),
        Dlt645Meter("000000000001", clock=clock, seed=3, history_days=10),
    ]
    line = await meters_bus(meters)
    state = tmp_path / "state"
    path = tmp_path / "gw.toml"
    # nobody listens on the broker port: every reading stays in the outbox for the test to read
    path.write_text(config_text(state, unused_port, line.endpoint[1], None, "\n[daily_frozen]\n"))  # type: ignore[index]
    gateway_clock = SimWallClock(clock)

    async with running(path, gateway_clock) as gw:
        await until(lambda: gw.frozen is not None and gw.frozen.stats.backfilled_days == 3)  # today's, 10 h late

    clock.set(datetime.datetime(2026, 3, 17, 10, 0))  # down for three days
    async with running(path, gateway_clock) as gw:
        await until(lambda: gw.frozen is not None and gw.frozen.stats.slots_filled == 3 * 3)
        assert gw.frozen is not None
        assert gw.frozen.stats.backfilled_days == 3 * 3
        assert gw.frozen.stats.lost_days == 0

    filled: dict[tuple[str, datetime.date], sqlite3.Row] = {}
    for r in rows(state):
        if r["quantity"] == E_TOTAL and r["meter_time"] is not None and r["slot"] is not None:
            day = datetime.datetime.fromtimestamp(r["slot"], TZ).date()
            assert r["slot"] == freeze_time(day, TZ) == r["meter_time"]
            assert Quality(r["quality"]) & Quality.BACKFILLED
            assert Quality(r["quality"]) & Quality.FROZEN
            filled[(r["meter_id"], day)] = r
    days = [datetime.date(2026, 3, d) for d in (15, 16, 17)]
    assert set(filled) == {(m, d) for m in ("p-plain", "p-sealed", "m-645") for d in days}
    # the values are the meters' own freezes, not later readings
    for meter, sim in (("p-plain", meters[0]), ("p-sealed", meters[1])):
        assert isinstance(sim, Dlt698Meter)
        for d in days:
            frozen = [f for f in sim.daily if f.time.date() == d]
            assert frozen, f"the simulator froze {d}"
            assert filled[(meter, d)]["value"] == pytest.approx(frozen[0].energy[E_TOTAL], abs=0.01)

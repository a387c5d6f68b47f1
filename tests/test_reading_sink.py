"""The one reading sink (gateway/daemon/sink.py) on a real outbox file: every producer's readings
land in the same outbox, a poll's slot mark commits with them, and the counts stay per source so
live-poll figures never include the frozen backfill or a read_now command."""

from __future__ import annotations

import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from prometheus_client import CollectorRegistry

from meter_gateway.drivers.backoff import BackoffPolicy
from meter_gateway.drivers.bus import Bus, BusSettings
from meter_gateway.drivers.dlt645_driver import Dlt645Driver, daily_frozen_quantities
from meter_gateway.drivers.meter_models import Dlt645Model, load_model
from meter_gateway.drivers.reading import Quality, Reading
from meter_gateway.drivers.tcp_link import TcpLink
from meter_gateway.drivers.transport import TcpSettings
from meter_gateway.gateway.config import load_config
from meter_gateway.gateway.daemon.metrics import Metrics
from meter_gateway.gateway.daemon.sink import COMMAND, FROZEN, POLL, ReadingSink
from meter_gateway.gateway.jobs.time_sync import TimeSyncJob
from meter_gateway.gateway.store.outbox import AsyncOutbox, SlotMark
from meter_gateway.protocols.dlt645.edition import Edition
from tests.plugins.simulators import SimBusFactory

SLOT = 1_800_000_000
TZ = ZoneInfo("Asia/Shanghai")


def read_of(meter: str, slot: int, quantities: tuple[str, ...] = ("voltage.l1", "voltage.l2")) -> list[Reading]:
    return [
        Reading(meter, q, 230.0 + i, "V", gateway_time=slot + 1.0, slot=float(slot)) for i, q in enumerate(quantities)
    ]


@pytest.mark.asyncio
async def test_every_source_commits_to_the_outbox_and_is_counted_apart(tmp_path: Path) -> None:
    box = await AsyncOutbox.open(tmp_path / "outbox.sqlite")
    try:
        sink = ReadingSink()
        sink.outbox = box
        polled = await sink.add(read_of("m1", SLOT), POLL, SlotMark("fast", "m1", SLOT))
        frozen = await sink.for_source(FROZEN).add(read_of("m2", SLOT, ("energy.import",)))
        await sink.committer(COMMAND)(read_of("m3", SLOT))
        again = await sink.add(read_of("m1", SLOT), POLL, SlotMark("fast", "m1", SLOT))

        assert polled.committed == 2
        assert frozen.committed == 1
        assert again.committed == 0  # same ids: the outbox dedupes
        assert again.duplicates == 2
        assert (sink.counts(POLL).readings, sink.counts(POLL).committed) == (4, 2)
        assert (sink.counts(FROZEN).readings, sink.counts(FROZEN).committed) == (1, 1)
        assert (sink.counts(COMMAND).readings, sink.counts(COMMAND).committed) == (2, 2)
        assert box.depth == 5
        assert (await box.committed_slots()) == {("fast", "m1"): SLOT}
    finally:
        await box.close()


@pytest.mark.asyncio
async def test_a_sink_without_its_outbox_says_so_and_keeps_nothing(tmp_path: Path) -> None:
    sink = ReadingSink()
    with pytest.raises(RuntimeError, match="before the outbox was opened"):
        await sink.add(read_of("m1", SLOT), POLL)
    assert sink.counts(POLL).readings == 0


def _sim_config(state: Path, port: int) -> str:
    meters = "".join(
        f'[[meters]]\nid = "m{i}"\nbus = "dlt-a"\nprotocol = "dlt645-2007"\naddress = "{i:012d}"\n'
        f'model = "dlt645-2007-generic"\n\n'
        for i in (1, 2)
    )
    return (
        f'[gateway]\nid = "gw-sink"\ntimezone = "Asia/Shanghai"\nstate_dir = "{state}"\n\n'
        f'[uplink]\nhost = "127.0.0.1"\n\n'
        f'[[buses]]\nname = "dlt-a"\ntype = "tcp"\nhost = "127.0.0.1"\nport = {port}\nprotocol = "dlt645"\n\n'
        f'{meters}[time_sync]\ninterval = "1d"\nmode = "unicast"\nmax_drift = "5s"\n'
    )


@pytest.mark.asyncio
async def test_a_frozen_reading_of_a_suspect_clock_is_flagged_and_counted_like_a_polled_one(
    sim_bus: SimBusFactory, tmp_path: Path
) -> None:
    """Simulated DL/T 645 meters on a real TCP bus: m1's clock is 400 s off (beyond the 300 s
    suspect threshold), m2's is right. The time-sync job measures them; then m1's daily freeze
    (the frozen job's backfill) and its live values go through the one sink: both carry
    CLOCK_SUSPECT, m2's freeze does not, and every reading counts in readings_acquired."""
    handle = await sim_bus(2, speed=0.0, history_days=3, start_time=datetime.datetime(2026, 3, 14, 10, 0))
    assert isinstance(handle.endpoint, tuple)
    handle.meters[0].clock_offset = 400
    state = tmp_path / "state"
    state.mkdir()
    cfg = tmp_path / "gw.toml"
    cfg.write_text(_sim_config(state, handle.endpoint[1]))
    model = load_model("dlt645-2007-generic")
    assert isinstance(model, Dlt645Model)

    def clock() -> float:
        return handle.clock.now().replace(tzinfo=TZ).timestamp()

    link = TcpLink(TcpSettings(*handle.endpoint, no_reply_limit=0, reconnect=BackoffPolicy(initial=0.05, maximum=0.1)))
    bus = Bus("dlt-a", link, settings=BusSettings(reply_timeout=0.3, attempts=2))
    assert await bus.open()
    box = await AsyncOutbox.open(tmp_path / "outbox.sqlite")
    try:
        drivers = {
            f"m{i}": Dlt645Driver(bus, f"m{i}", f"{i:012d}", Edition.DLT645_2007, model, tz=TZ, clock=clock)
            for i in (1, 2)
        }
        job = TimeSyncJob(load_config(cfg), drivers, {"dlt-a": bus}, clock)
        await job.check_clocks()
        assert job.suspect_meters == {"m1"}

        registry = CollectorRegistry()
        sink = ReadingSink(metrics=Metrics(registry=registry), time_sync=lambda: job)
        sink.outbox = box
        quantities = daily_frozen_quantities(model)
        frozen = [r for m in ("m1", "m2") for r in await drivers[m].read_frozen_daily(1, quantities)]
        assert frozen
        assert all(r.quality & Quality.FROZEN for r in frozen)
        assert not any(r.quality & Quality.CLOCK_SUSPECT for r in frozen)  # the driver does not know
        polled = await drivers["m1"].read(["energy.active.import.total"], slot=SLOT, now=clock())
        await sink.for_source(FROZEN).add(frozen)
        await sink.add(polled, POLL)

        rows = [row.reading() for row in await box.peek(0, 1000)]
        assert len(rows) == len(frozen) + len(polled)
        flagged = {(r.meter_id, Quality.FROZEN in r.quality): Quality.CLOCK_SUSPECT in r.quality for r in rows}
        assert flagged == {("m1", True): True, ("m2", True): False, ("m1", False): True}
        acquired = registry.get_sample_value("meter_gateway_readings_acquired_total")
        assert acquired == len(frozen) + len(polled)
        assert sink.counts(FROZEN).readings == len(frozen)
        assert sink.counts(POLL).readings == len(polled)
    finally:
        await box.close()
        await bus.close()

"""The one reading sink (gateway/daemon/sink.py) on a real outbox file: every producer's readings
land in the same outbox, a poll's slot mark commits with them, and the counts stay per source so
live-poll figures never include the frozen backfill or a read_now command."""

from __future__ import annotations

from pathlib import Path

import pytest

from meter_gateway.drivers.reading import Reading
from meter_gateway.gateway.daemon.sink import COMMAND, FROZEN, POLL, ReadingSink
from meter_gateway.gateway.store.outbox import AsyncOutbox, SlotMark

SLOT = 1_800_000_000


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

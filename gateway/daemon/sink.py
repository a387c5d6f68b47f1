"""The one way a reading enters the outbox, whoever read it.

Live polls, the daily frozen job and a ``read_now`` command all hand their readings to
:class:`ReadingSink`, so each gets the same treatment: the clock-suspect flag for meters whose clock
the time-sync job last found too far off, the ``readings_acquired`` metric, and the outbox add (with
the committed-slot mark for a poll). Counts are kept per source: a status line or a test that asks
how many live reads were committed must not see the frozen backfill in the same number.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec

from meter_gateway.drivers.reading import Quality, Reading

if TYPE_CHECKING:
    from meter_gateway.gateway.daemon.metrics import Metrics
    from meter_gateway.gateway.jobs.time_sync import TimeSyncJob
    from meter_gateway.gateway.store.outbox import AddResult, AsyncOutbox, SlotMark

__all__ = ["COMMAND", "FROZEN", "POLL", "ReadingSink", "SourceCounts", "SourceSink"]

POLL = "poll"
FROZEN = "frozen"
COMMAND = "command"


@dataclass
class SourceCounts:
    readings: int = 0  # handed to the sink (before the outbox)
    committed: int = 0  # newly committed rows


class ReadingSink:
    """``outbox`` is attached once the daemon has opened it; ``time_sync`` returns the current
    time-sync job (rebuilt on a reload), or None."""

    def __init__(
        self,
        *,
        metrics: Metrics | None = None,
        time_sync: Callable[[], TimeSyncJob | None] = lambda: None,
    ) -> None:
        self.outbox: AsyncOutbox | None = None
        self.metrics = metrics
        self._time_sync = time_sync
        self._counts: dict[str, SourceCounts] = {}

    def counts(self, source: str) -> SourceCounts:
        """The live counters of one source (the same object for the sink's lifetime)."""
        return self._counts.setdefault(source, SourceCounts())

    async def add(self, readings: list[Reading], source: str, mark: SlotMark | None = None) -> AddResult:
        if self.outbox is None:
            raise RuntimeError("reading sink used before the outbox was opened")
        readings = self.flag_clock_suspect(readings)
        counts = self.counts(source)
        counts.readings += len(readings)
        if self.metrics is not None:
            self.metrics.readings_acquired.inc(len(readings))
        result = await self.outbox.add(readings, mark=mark)
        counts.committed += result.committed
        return result

    def flag_clock_suspect(self, readings: list[Reading]) -> list[Reading]:
        """Readings of a meter whose clock the time-sync job last measured too far from ours carry
        Quality.CLOCK_SUSPECT (ids do not depend on quality, so dedupe is unaffected)."""
        ts = self._time_sync()
        if ts is None or not ts.suspect_meters:
            return readings
        return [
            msgspec.structs.replace(r, quality=r.quality | Quality.CLOCK_SUSPECT) if ts.clock_suspect(r.meter_id) else r
            for r in readings
        ]

    def for_source(self, source: str) -> SourceSink:
        return SourceSink(self, source)

    def committer(self, source: str) -> Callable[[list[Reading]], Awaitable[None]]:
        """For a producer that only needs the readings committed (a ``read_now`` command)."""

        async def commit(readings: list[Reading]) -> None:
            if readings:
                await self.add(readings, source)

        return commit


class SourceSink:
    """The sink bound to one source, shaped as the frozen job's ``add(readings)``."""

    __slots__ = ("sink", "source")

    def __init__(self, sink: ReadingSink, source: str) -> None:
        self.sink = sink
        self.source = source

    async def add(self, readings: Iterable[Reading]) -> AddResult:
        return await self.sink.add(list(readings), self.source)

"""The one normalized reading type everything downstream of the drivers works with."""

from __future__ import annotations

import enum
from collections.abc import Iterable

import msgspec


class Quality(enum.IntFlag):
    """Quality flags carried with every reading (bit values are part of the MQTT contract)."""

    GOOD = 0
    BACKFILLED = 1  # recovered later from the meter's frozen data, not read live
    CLOCK_SUSPECT = 2  # the meter's clock was off by more than the configured tolerance
    OUT_OF_RANGE = 4  # decoded fine but outside the plausible range for the quantity
    FROZEN = 8  # a value the meter froze (daily/interval freeze), stamped with the freeze time
    # came in a response the meter protected with a MAC the gateway cannot check (DL/T 698.45
    # SECURITY plaintext + RN: verifying needs the meter's keys, i.e. an ESAM): integrity unknown
    MAC_UNVERIFIED = 16


class Reading(msgspec.Struct, frozen=True, gc=False):
    """One value of one quantity from one meter.

    ``meter_time`` is the meter's own timestamp (unix seconds) when the meter supplies one
    (frozen data, demand with time, event records); ``slot`` is the start of the poll slot the
    reading belongs to. The id is derived from the meter time when present, else from the slot,
    so the same reading acquired twice has the same id and the head-end can dedupe.

    A msgspec Struct: built for every value read (10,000 a second at full load), it costs a
    seventh of a frozen dataclass's construction. ``gc=False``: it only refers to strings,
    numbers and flags, so it can never be part of a reference cycle.
    """

    meter_id: str
    quantity: str
    value: float | int | str
    unit: str
    gateway_time: float
    meter_time: float | None = None
    slot: float | None = None
    quality: Quality = Quality.GOOD

    def __post_init__(self) -> None:
        if self.meter_time is None and self.slot is None:
            raise ValueError("a reading needs a meter timestamp or a poll slot for its id")

    @property
    def id(self) -> str:
        return f"{self.meter_id}/{self.quantity}/{stamp_of(self.meter_time, self.slot)}"


def stamp_of(meter_time: float | None, slot: float | None) -> str:
    """The id suffix of a reading stamped so: ``m{meter time}`` when the meter gave one, else ``s{slot}``."""
    return f"m{int(meter_time)}" if meter_time is not None else f"s{int(slot or 0)}"


class ReadRecord(msgspec.Struct, frozen=True, gc=False):
    """What one read of one meter returned, as one record: the pipeline's unit of work.

    The readings of a record share the meter, the gateway time and the id stamp (meter time, or
    poll slot), so each reading's id is ``{meter_id}/{quantity}/{stamp}`` exactly as
    ``Reading.id`` derives it; the quantities, values, units and quality flags are parallel
    tuples. The outbox stores one row per record instead of one per reading.
    """

    meter_id: str
    gateway_time: float
    meter_time: float | None
    slot: float | None
    quantities: tuple[str, ...]
    values: tuple[float | int | str, ...]
    units: tuple[str, ...]
    qualities: tuple[int, ...]

    @property
    def stamp(self) -> str:
        return stamp_of(self.meter_time, self.slot)

    @property
    def key(self) -> str:
        """``{meter_id}/{stamp}``: what the outbox looks a re-acquired read up by."""
        return f"{self.meter_id}/{self.stamp}"

    def ids(self) -> list[str]:
        stamp = self.stamp
        return [f"{self.meter_id}/{q}/{stamp}" for q in self.quantities]

    def readings(self) -> list[Reading]:
        return [
            Reading(self.meter_id, q, v, u, self.gateway_time, self.meter_time, self.slot, Quality(f))
            for q, v, u, f in zip(self.quantities, self.values, self.units, self.qualities, strict=True)
        ]


def records(readings: Iterable[Reading]) -> list[ReadRecord]:
    """Group readings into records, keeping their order: each run of consecutive readings of one
    meter with the same gateway time, meter time and slot (one read's values) becomes one record."""
    out: list[ReadRecord] = []
    run: list[Reading] = []
    key: tuple[str, float, float | None, float | None] | None = None
    for r in readings:
        this = (r.meter_id, r.gateway_time, r.meter_time, r.slot)
        if this != key:
            if run:
                out.append(_record(run))
            run = []
            key = this
        run.append(r)
    if run:
        out.append(_record(run))
    return out


def _record(run: list[Reading]) -> ReadRecord:
    first = run[0]
    quantities, values, units, qualities = zip(*[(r.quantity, r.value, r.unit, r.quality) for r in run], strict=True)
    return ReadRecord(
        first.meter_id,
        first.gateway_time,
        first.meter_time,
        first.slot,
        quantities,
        values,
        units,
        tuple(map(int, qualities)),
    )

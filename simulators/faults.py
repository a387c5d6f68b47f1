"""Fault injection for simulated buses (DL/T 645, DL/T 698.45, CJ/T 188): what a bad RS-485
segment and bad meters do.

A :class:`Faults` applies to a whole bus; ``per_meter`` overrides it for one meter (keyed by the
printed address: 12 digits for DL/T 645 and 698.45, 14 for CJ/T 188). Everything is mutable at
run time (``bus.faults.drop_reply = 0.5``).
Decisions come from one seeded RNG so a run is repeatable for a given seed and request order.

Knobs (probabilities are 0..1 per request):

``drop_request``   the meter never sees the request (no state change, no reply)
``drop_reply``     the meter acts on the request but its reply is lost
``truncate_reply`` only a prefix of the reply arrives
``corrupt_byte``   one byte of the reply is changed (the checksum then fails)
``wrong_address``  the reply carries another meter's address (a valid frame otherwise)
``echo_request``   the request bytes come back first (a half-duplex adapter echoing)
``noise_burst``    3-16 random bytes arrive before the reply
``late_reply``     seconds added before the reply leaves (so it lands during the next exchange)
``never_answer``   the meter is dead: requests are ignored
``dribble``        seconds between reply bytes (a slow serial server sending one byte at a time)
``stuck_relay``    makes the meter's relay stuck (accepts trips, never moves) from its next request
                   on; it stays stuck until ``meter.stuck_relay = False`` (a fault that heals itself
                   would hide the problem from the test that set it); DL/T 645 and 698.45 meters
``stuck_valve``    the same for a CJ/T 188 meter's valve: commands are acknowledged, the valve stays
                   put and ST reports it "abnormal"; cleared by ``meter.stuck_valve = False``

Counters of every fault that fired are in ``SimulatedBus.stats`` under the knob's name.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

PROBABILITIES = (
    "drop_request",
    "drop_reply",
    "truncate_reply",
    "corrupt_byte",
    "wrong_address",
    "echo_request",
    "noise_burst",
)


@dataclass
class Faults:
    drop_request: float = 0.0
    drop_reply: float = 0.0
    truncate_reply: float = 0.0
    corrupt_byte: float = 0.0
    wrong_address: float = 0.0
    echo_request: float = 0.0
    noise_burst: float = 0.0
    late_reply: float = 0.0
    never_answer: bool = False
    dribble: float = 0.0
    stuck_relay: bool = False
    stuck_valve: bool = False
    per_meter: dict[str, Faults] = field(default_factory=dict)
    seed: int = 0
    rng: random.Random = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.validate()

    def validate(self) -> None:
        for name in PROBABILITIES:
            value = getattr(self, name)
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"fault {name} is a probability 0..1, got {value!r}")
        for name in ("late_reply", "dribble"):
            if float(getattr(self, name)) < 0:
                raise ValueError(f"fault {name} is seconds >= 0, got {getattr(self, name)!r}")
        for override in self.per_meter.values():
            override.validate()

    def for_meter(self, address: str) -> Faults:
        """The faults that apply to one meter: its override if any, else the bus-wide ones."""
        return self.per_meter.get(address, self)

    def hit(self, probability: float) -> bool:
        """One Bernoulli draw from the shared RNG (no draw when the knob is off)."""
        return probability > 0.0 and (probability >= 1.0 or self.rng.random() < probability)

    @property
    def active(self) -> bool:
        """Whether any knob is on (the fast path skips fault handling otherwise)."""
        return bool(
            self.per_meter
            or self.drop_request
            or self.drop_reply
            or self.truncate_reply
            or self.corrupt_byte
            or self.wrong_address
            or self.echo_request
            or self.noise_burst
            or self.late_reply
            or self.never_answer
            or self.dribble
            or self.stuck_relay
            or self.stuck_valve
        )

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], *, seed: int = 0, where: str = "faults") -> Faults:
        """From a config table; ``[...faults.per_meter."000000000001"]`` tables override per meter."""
        known = {f.name for f in fields(cls) if f.init and f.name not in {"per_meter", "seed"}}
        unknown = set(raw) - known - {"per_meter"}
        if unknown:
            raise ValueError(f"{where}: unknown fault(s) {sorted(unknown)} (known: {sorted(known)})")
        base = {k: v for k, v in raw.items() if k != "per_meter"}
        per_meter_raw = raw.get("per_meter", {})
        if not isinstance(per_meter_raw, Mapping):
            raise TypeError(f"{where}.per_meter must be a table of address -> faults")
        out = cls(**base, seed=seed)
        for address, table in per_meter_raw.items():
            if not isinstance(table, Mapping):
                raise TypeError(f"{where}.per_meter.{address} must be a table")
            merged = {**base, **table}
            override = cls.from_mapping(merged, seed=seed, where=f"{where}.per_meter.{address}")
            out.per_meter[str(address)] = replace(override, per_meter={})
        return out

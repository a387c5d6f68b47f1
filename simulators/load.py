"""A simulated three-phase electrical installation behind a meter: the physics, no protocol.

Protocol simulators (Modbus, DL/T 645) ask a :class:`LoadModel` for the values a meter would
show and encode them their own way; they share the quantity names of the rest of the product
(``voltage.l1``, ``power.active.total``, ``energy.active.import.t2``, ... in canonical units:
V, A, kW, kvar, kVA, Hz, kWh, kvarh, "" for power factor and relay state).

The model is deterministic given its seed and the times it is advanced to. Nothing in here
reads a clock: the caller passes time in (unix seconds) with :meth:`LoadModel.advance`.

Physics, per phase k (voltage angles 0, -120, +120 degrees):

* the load current follows a daily profile (night base, morning and evening peaks) scaled by a
  per-phase weight, with slow noise; the load has a fixed lagging power factor;
* optional PV generation (unity power factor) follows a half-sine from 06:00 to 18:00 local time;
  when it exceeds the load the phase exports;
* P = P_load - P_pv, Q = Q_load, S = sqrt(P^2 + Q^2), I = S / V, PF = P / S (negative while
  exporting; 1.0 when there is no current); totals are sums (S_total is the arithmetic sum,
  as most meters report it) and PF_total = P_total / S_total; the neutral current is the
  magnitude of the phasor sum of the phase currents;
* voltage is nominal minus a small drop with load plus noise; frequency is nominal plus noise;
* instantaneous quantities are measured once per second (the meter's measurement cycle): a
  read shows those of the start of the current second;
* energy registers integrate the *total* power: active import when P_total > 0, export when it
  is negative, likewise reactive with Q_total, each into the tariff that the time-of-day
  schedule selects. Tariff registers are the state; totals are their sums, as on a real meter.

Energy integrates over a fixed time grid (``step``, default 60 s) using the power at each cell's
midpoint, so the energy at a time does not depend on how often, or in what steps, the model was
advanced: a test can build a second model with the same seed and compare exactly.

When the relay is open, current and power drop to 0 (the meter still sees the supply voltage)
and the energy registers stop.
"""

from __future__ import annotations

import cmath
import math
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "DEFAULT_TARIFFS",
    "ENERGY_REGISTERS",
    "LoadModel",
    "LoadSettings",
    "TariffSchedule",
    "daily_profile",
    "energy_register",
    "initial_energy",
]

PHASES: Final = (1, 2, 3)
_PHASE_ANGLES: Final = (0.0, -2 * math.pi / 3, 2 * math.pi / 3)
_KINDS: Final = (("active", "kWh"), ("reactive", "kvarh"))
_DIRECTIONS: Final = ("import", "export")

# Instantaneous quantities are measured once per fast bucket (seconds), the meter's measurement
# cycle: two reads within the same second agree, as on a meter that refreshes its instantaneous
# registers once a second. Slow noise (load wander) changes per slow bucket.
_FAST_BUCKET: Final = 1.0
_SLOW_BUCKET: Final = 300.0


@dataclass(frozen=True, slots=True)
class TariffSchedule:
    """Time-of-day tariff switching: ``changes`` are (minute of day, tariff number), sorted.

    The tariff at a minute is that of the last change at or before it (wrapping past midnight).
    """

    changes: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        if not self.changes:
            raise ValueError("a tariff schedule needs at least one change")
        minutes = [m for m, _ in self.changes]
        if minutes != sorted(minutes) or len(set(minutes)) != len(minutes):
            raise ValueError("tariff changes must be sorted by time of day, one per minute")
        for minute, tariff in self.changes:
            if not 0 <= minute < 1440 or not 1 <= tariff <= 63:
                raise ValueError(f"bad tariff change ({minute}, {tariff}): minute 0..1439, tariff 1..63")

    @classmethod
    def parse(cls, changes: Iterable[tuple[str, int]]) -> TariffSchedule:
        """From ``[("00:00", 4), ("08:00", 3), ...]``."""
        out = []
        for text, tariff in changes:
            hours, _, minutes = text.partition(":")
            out.append((int(hours) * 60 + int(minutes or 0), int(tariff)))
        return cls(tuple(sorted(out)))

    @property
    def tariffs(self) -> int:
        """Number of tariff registers (the highest tariff number used)."""
        return max(t for _, t in self.changes)

    def tariff_at(self, minute_of_day: float) -> int:
        minute = minute_of_day % 1440
        current = self.changes[-1][1]  # before the first change of the day: last one of yesterday
        for start, tariff in self.changes:
            if start > minute:
                break
            current = tariff
        return current


# Four tariffs numbered as DL/T 645 numbers them: 1 sharp (尖), 2 peak (峰), 3 flat (平),
# 4 valley (谷). The hours are a typical Chinese time-of-use split, for simulation only.
DEFAULT_TARIFFS: Final = TariffSchedule.parse(
    [
        ("00:00", 4),
        ("08:00", 3),
        ("10:00", 2),
        ("12:00", 3),
        ("17:00", 2),
        ("19:00", 1),
        ("21:00", 2),
        ("22:00", 3),
        ("23:00", 4),
    ]
)


def initial_energy(seed: int, tariffs: int = DEFAULT_TARIFFS.tariffs) -> dict[str, float]:
    """An electricity meter's registers when the simulation starts, the same for the same seed:
    some years' active import per tariff, reactive at about a third of it."""
    rng = random.Random(seed)
    initial = {f"energy.active.import.t{t}": round(rng.uniform(50.0, 5000.0), 2) for t in range(1, tariffs + 1)}
    initial.update({f"energy.reactive.import.t{t}": round(v * 0.35, 2) for t, v in enumerate(initial.values(), 1)})
    return initial


def energy_register(kind: str, direction: str, get: Callable[[str, str], float]) -> float | None:
    """An electricity meter's ``energy.<kind>.<direction>`` register of one tariff, from
    ``get(kind, "import" | "export")``; None when no such register is simulated.

    Combined active is import plus export. The load model splits reactive energy by the sign of Q
    only: lagging while importing is quadrant I, reactive export is booked to quadrant IV; II and
    III stay 0.
    """
    if kind == "active" and direction in ("import", "export"):
        return get("active", direction)
    if kind == "active" and direction == "combined":
        return get("active", "import") + get("active", "export")
    if kind == "reactive":
        quadrant = {"q1": get("reactive", "import"), "q4": get("reactive", "export"), "q2": 0.0, "q3": 0.0}
        if direction in quadrant:
            return quadrant[direction]
        if direction == "combined1":
            return quadrant["q1"] + quadrant["q2"]
        if direction == "combined2":
            return quadrant["q3"] + quadrant["q4"]
    return None


@dataclass(frozen=True, slots=True)
class LoadSettings:
    """Everything that shapes a simulated installation. All defaults are a plausible home/shop."""

    seed: int = 0
    utc_offset: float = 0.0  # seconds added to unix time to get the local time of day
    nominal_voltage: float = 230.0  # V, phase to neutral
    voltage_noise: float = 0.8  # V, standard deviation
    voltage_drop: float = 0.04  # V per A of load current
    nominal_frequency: float = 50.0
    frequency_noise: float = 0.015  # Hz, standard deviation
    base_current: float = 1.5  # A per phase, around the clock
    peak_current: float = 24.0  # A per phase at the top of the daily profile
    phase_weights: tuple[float, float, float] = (1.0, 0.8, 1.15)
    current_noise: float = 0.04  # relative, slow-varying
    load_power_factor: float = 0.93  # lagging (inductive)
    pv_peak_current: float = 0.0  # A per phase of PV generation at solar noon; 0 = no PV
    tariffs: TariffSchedule = DEFAULT_TARIFFS
    # Starting register contents, by tariff-level name (e.g. "energy.active.import.t3": 1520.25).
    initial_energy: Mapping[str, float] = field(default_factory=dict)
    step: float = 60.0  # energy integration grid, seconds

    def __post_init__(self) -> None:
        if not 0 < self.load_power_factor <= 1:
            raise ValueError("load_power_factor must be in (0, 1]")
        if self.step <= 0 or self.nominal_voltage <= 0:
            raise ValueError("step and nominal_voltage must be positive")
        if len(self.phase_weights) != 3:
            raise ValueError("phase_weights needs three numbers")


def _energy_names(tariffs: int) -> list[str]:
    return [
        f"energy.{kind}.{direction}.t{t}"
        for kind, _ in _KINDS
        for direction in _DIRECTIONS
        for t in range(1, tariffs + 1)
    ]


ENERGY_REGISTERS: Final = tuple(_energy_names(DEFAULT_TARIFFS.tariffs))
_PHASE_QUANTITIES: Final = ("voltage", "current", "power.active", "power.reactive", "power.apparent", "power_factor")
_PHASE_KEYS: Final = tuple(tuple(f"{q}.l{k}" for q in _PHASE_QUANTITIES) for k in PHASES)


@dataclass(frozen=True, slots=True)
class _PhaseState:
    voltage: float
    current: float
    active: float  # kW
    reactive: float  # kvar
    apparent: float  # kVA
    power_factor: float


class LoadModel:
    """One simulated installation. Call :meth:`advance` with the current (simulated) time, then
    read :meth:`values`; flip the relay with :meth:`set_relay`."""

    def __init__(self, settings: LoadSettings | None = None, *, start: float) -> None:
        self.settings = settings or LoadSettings()
        self._time = float(start)
        self._relay_closed = True
        self._cell_power: tuple[int | None, tuple[tuple[str, float], ...]] = (None, ())
        self._slow_noise: tuple[int | None, tuple[float, ...]] = (None, ())  # a bucket, its noise per phase
        # (measurement cycle, relay closed) -> the instantaneous quantities of that cycle
        self._instant: tuple[tuple[int, bool] | None, dict[str, float]] = (None, {})
        tariffs = self.settings.tariffs.tariffs
        self._energy: dict[str, float] = dict.fromkeys(_energy_names(tariffs), 0.0)
        for name, value in self.settings.initial_energy.items():
            if name not in self._energy:
                raise ValueError(
                    f"initial_energy: unknown register {name!r} (expected e.g. {next(iter(self._energy))!r})"
                )
            if value < 0:
                raise ValueError(f"initial_energy: {name} must be >= 0")
            self._energy[name] = float(value)
        # "<prefix>.total" -> its tariff registers (the register names never change)
        self._totals: dict[str, tuple[str, ...]] = {}
        for name in self._energy:
            total = f"{name.rpartition('.')[0]}.total"
            self._totals[total] = (*self._totals.get(total, ()), name)

    # -- time and relay -----------------------------------------------------------------------

    @property
    def time(self) -> float:
        return self._time

    @property
    def relay_closed(self) -> bool:
        return self._relay_closed

    def advance(self, to_time: float) -> None:
        """Move simulated time forward to ``to_time``, accumulating energy. Earlier times are
        ignored: registers never run backwards, as a meter's would not when its clock is set back."""
        if to_time <= self._time:
            return
        if self._relay_closed:
            self._integrate(self._time, float(to_time))
        self._time = float(to_time)

    def set_relay(self, closed: bool, at: float | None = None) -> None:
        """Close (supply on) or open (supply off) the relay, effective at ``at`` (default: now)."""
        if at is not None:
            self.advance(at)
        self._relay_closed = bool(closed)

    # -- readings -----------------------------------------------------------------------------

    def energy(self, name: str) -> float:
        """One energy register: ``energy.<active|reactive>.<import|export>.<total|tN>``."""
        if name in self._energy:
            return self._energy[name]
        registers = self._totals.get(name)
        if registers is None:
            raise KeyError(name)
        return math.fsum([self._energy[register] for register in registers])

    def values(self) -> dict[str, float]:
        """Every quantity the model simulates, at :attr:`time`, in canonical units.

        Instantaneous quantities are those of the start of the current second (the meter's
        measurement cycle; see ``_FAST_BUCKET``); energies are integrated up to :attr:`time`."""
        out = dict(self._instantaneous())
        out.update(self._energy)
        for total in self._totals:
            out[total] = self.energy(total)
        return out

    def value(self, name: str) -> float:
        """One quantity of :meth:`values` (KeyError for a name it does not have), without
        building the others: a protocol read asks for a few."""
        energy = self._energy.get(name)
        if energy is not None:
            return energy
        if name in self._totals:
            return self.energy(name)
        return self._instantaneous()[name]

    def _instantaneous(self) -> dict[str, float]:
        bucket = math.floor(self._time / _FAST_BUCKET)
        key = (bucket, self._relay_closed)
        if self._instant[0] != key:
            self._instant = (key, self._measure(bucket))
        return self._instant[1]

    def _measure(self, bucket: int) -> dict[str, float]:
        """The instantaneous quantities one measurement cycle shows."""
        t = bucket * _FAST_BUCKET
        phases = self._phases(t, fast_noise=True)
        out: dict[str, float] = {}
        for (voltage, current, active, reactive, apparent, power_factor), ph in zip(_PHASE_KEYS, phases, strict=True):
            out[voltage] = ph.voltage
            out[current] = ph.current
            out[active] = ph.active
            out[reactive] = ph.reactive
            out[apparent] = ph.apparent
            out[power_factor] = ph.power_factor
        p_total = math.fsum(ph.active for ph in phases)
        q_total = math.fsum(ph.reactive for ph in phases)
        s_total = math.fsum(ph.apparent for ph in phases)
        out["power.active.total"] = p_total
        out["power.reactive.total"] = q_total
        out["power.apparent.total"] = s_total
        out["power_factor.total"] = p_total / s_total if s_total > 0 else 1.0
        neutral: complex = 0j
        for angle, ph in zip(_PHASE_ANGLES, phases, strict=True):
            if ph.current > 0:
                neutral += cmath.rect(ph.current, angle - math.atan2(ph.reactive, ph.active))
        out["current.n"] = abs(neutral)
        out["frequency"] = self.settings.nominal_frequency + self.settings.frequency_noise * self._gauss(9, 0, bucket)
        out["relay.state"] = 1.0 if self._relay_closed else 0.0
        return out

    # -- internals ----------------------------------------------------------------------------

    def _local_hour(self, t: float) -> float:
        return ((t + self.settings.utc_offset) % 86400.0) / 3600.0

    def _phases(self, t: float, *, fast_noise: bool) -> list[_PhaseState]:
        s = self.settings
        hour = self._local_hour(t)
        slow = math.floor(t / _SLOW_BUCKET)
        fast = math.floor(t / _FAST_BUCKET)
        swing = (s.peak_current - s.base_current) * daily_profile(hour)
        pv_current = s.pv_peak_current * _solar_profile(hour)
        sin_phi = math.sqrt(max(0.0, 1.0 - s.load_power_factor**2))
        if self._slow_noise[0] != slow:  # a 300 s bucket serves hundreds of reads: draw it once
            self._slow_noise = (slow, tuple(self._gauss(1, k, slow) for k in range(3)))
        phases = []
        for k in range(3):
            load_current = s.base_current + swing * s.phase_weights[k]
            load_current = max(0.0, load_current * (1.0 + s.current_noise * self._slow_noise[1][k]))
            voltage = s.nominal_voltage - s.voltage_drop * load_current
            if fast_noise:
                voltage += s.voltage_noise * self._gauss(2, k, fast)
            if not self._relay_closed:
                phases.append(_PhaseState(voltage, 0.0, 0.0, 0.0, 0.0, 1.0))
                continue
            active = voltage * (load_current * s.load_power_factor - pv_current) / 1000.0
            reactive = voltage * load_current * sin_phi / 1000.0
            apparent = math.hypot(active, reactive)
            current = apparent * 1000.0 / voltage
            pf = active / apparent if apparent > 0 else 1.0
            phases.append(_PhaseState(voltage, current, active, reactive, apparent, pf))
        return phases

    def _integrate(self, t0: float, t1: float) -> None:
        step = self.settings.step
        cell = math.floor(t0 / step)
        while cell * step < t1:
            start = max(t0, cell * step)
            end = min(t1, (cell + 1) * step)
            if end > start:
                self._accumulate(cell, (end - start) / 3600.0)
            cell += 1

    def _accumulate(self, cell: int, hours: float) -> None:
        if self._cell_power[0] != cell:
            self._cell_power = (cell, self._power_at_midpoint(cell))
        for register, power in self._cell_power[1]:
            self._energy[register] += power * hours

    def _power_at_midpoint(self, cell: int) -> tuple[tuple[str, float], ...]:
        """The registers a cell's energy goes into, with the power (kW, kvar; positive) at its
        midpoint. Kept for the last cell: reads every second advance the model in many slices of
        the same cell. Only integration asks, so the relay is closed."""
        mid = (cell + 0.5) * self.settings.step
        phases = self._phases(mid, fast_noise=False)
        tariff = self.settings.tariffs.tariff_at(self._local_hour(mid) * 60.0)
        out = []
        for kind, power in (
            ("active", math.fsum(ph.active for ph in phases)),
            ("reactive", math.fsum(ph.reactive for ph in phases)),
        ):
            direction = "import" if power >= 0 else "export"
            out.append((f"energy.{kind}.{direction}.t{tariff}", abs(power)))
        return tuple(out)

    def _gauss(self, stream: int, index: int, bucket: int) -> float:
        """A standard normal sample that depends only on (seed, stream, index, bucket)."""
        key = (((self.settings.seed * 1_000_003 + stream) * 1_000_033 + index) * 0x9E3779B97F4A7C15 + bucket) & _MASK
        a = _splitmix64(key)
        b = _splitmix64(a)
        u1 = ((a >> 11) + 1) / (1 << 53)  # (0, 1]
        u2 = (b >> 11) / (1 << 53)
        return math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)


_MASK: Final = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def _bump(hour: float, centre: float, width: float) -> float:
    d = (hour - centre + 12.0) % 24.0 - 12.0  # circular distance in hours
    return math.exp(-((d / width) ** 2))


def daily_profile(hour: float) -> float:
    """0..1: share of the peak load drawn at this local hour (the flow model uses it too)."""
    return min(1.0, 0.6 * _bump(hour, 7.5, 1.3) + 0.3 * _bump(hour, 13.0, 2.5) + 1.0 * _bump(hour, 19.5, 1.8))


def _solar_profile(hour: float) -> float:
    if 6.0 <= hour <= 18.0:
        return math.sin(math.pi * (hour - 6.0) / 12.0)
    return 0.0

"""A simulated water, gas or heating installation behind a CJ/T 188 meter: the physics, no protocol.

Like :class:`simulators.load.LoadModel` for electricity: deterministic for a seed and the times
it is advanced to, no clock read here (the caller passes unix-style seconds of simulated time).

* flow (m3/h) follows the same daily profile as the electrical load (night base, morning and
  evening peaks) between ``base_flow`` and ``peak_flow``, with slow noise (5-minute buckets);
* volume integrates the flow over a fixed grid (``step``) at each cell's midpoint, so the volume
  at a time does not depend on how often it was read;
* while the valve is closed the flow is 0 and the registers stop;
* a heat meter also has supply and return temperatures; its power is
  ``flow * (supply - return) * 1.163`` kW (water's heat capacity, kWh per m3 and kelvin) and its
  heat register integrates that power.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Final

from meter_gateway.simulators.load import daily_profile

WATER_HEAT_CAPACITY: Final = 1.163  # kWh per m3 per kelvin
_NOISE_BUCKET: Final = 300.0


@dataclass(frozen=True, slots=True)
class FlowSettings:
    seed: int = 0
    base_flow: float = 0.01  # m3/h at night
    peak_flow: float = 0.6  # m3/h at the top of the daily profile
    noise: float = 0.1  # relative, slow-varying
    supply_temperature: float = 0.0  # degC; heat meters only (0: not a heat meter)
    return_temperature: float = 0.0
    step: float = 60.0

    def __post_init__(self) -> None:
        if self.base_flow < 0 or self.peak_flow < self.base_flow:
            raise ValueError("flows must satisfy 0 <= base_flow <= peak_flow")
        if self.step <= 0:
            raise ValueError("step must be positive")

    @property
    def heat(self) -> bool:
        return self.supply_temperature > 0


WATER: Final = FlowSettings()
GAS: Final = FlowSettings(base_flow=0.0, peak_flow=1.2)
HEAT: Final = FlowSettings(base_flow=0.4, peak_flow=1.1, supply_temperature=62.0, return_temperature=44.0)


class FlowModel:
    """One installation. :meth:`advance` to a time, then read :attr:`volume`, :attr:`heat`, :meth:`flow_at`."""

    def __init__(self, settings: FlowSettings, *, start: float, volume: float = 0.0, heat: float = 0.0) -> None:
        self.settings = settings
        self._time = float(start)
        self.volume = float(volume)  # m3
        self.heat = float(heat)  # kWh
        self.valve_open = True
        self.open_seconds = 0.0  # time the valve was open (a heat meter's working hours)

    @property
    def time(self) -> float:
        return self._time

    def advance(self, to_time: float) -> None:
        """Integrate up to ``to_time``; earlier times are ignored (registers never run back)."""
        if to_time <= self._time:
            return
        if self.valve_open:
            step = self.settings.step
            cell = math.floor(self._time / step)
            while cell * step < to_time:
                start = max(self._time, cell * step)
                end = min(to_time, (cell + 1) * step)
                if end > start:
                    flow = self._flow((cell + 0.5) * step)
                    hours = (end - start) / 3600.0
                    self.volume += flow * hours
                    self.heat += self._power(flow) * hours
                cell += 1
            self.open_seconds += to_time - self._time
        self._time = float(to_time)

    def set_valve(self, open_: bool, at: float | None = None) -> None:
        if at is not None:
            self.advance(at)
        self.valve_open = bool(open_)

    def flow_at(self, t: float | None = None) -> float:
        """Flow (m3/h) now (or at ``t``); 0 while the valve is closed."""
        return self._flow(self._time if t is None else t) if self.valve_open else 0.0

    def power_at(self, t: float | None = None) -> float:
        """Heat power (kW) now (or at ``t``)."""
        return self._power(self.flow_at(t))

    def _flow(self, t: float) -> float:
        s = self.settings
        hour = (t % 86400.0) / 3600.0
        bucket = math.floor(t / _NOISE_BUCKET)
        noise = random.Random(s.seed * 1_000_003 + bucket).gauss(0.0, 1.0)
        flow = s.base_flow + (s.peak_flow - s.base_flow) * daily_profile(hour)
        return max(0.0, flow * (1.0 + s.noise * noise))

    def _power(self, flow: float) -> float:
        s = self.settings
        if not s.heat:
            return 0.0
        return flow * (s.supply_temperature - s.return_temperature) * WATER_HEAT_CAPACITY


__all__ = ["GAS", "HEAT", "WATER", "FlowModel", "FlowSettings"]

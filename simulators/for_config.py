"""A simulated meter for a configured meter: what the demo (and anything else that wants the
config's own meters simulated) starts, one function per byte-stream protocol.

The protocol registry (drivers/registry.py, ``MeterProtocol.simulator``) names the function, so
the demo needs no list of protocols of its own. Each takes the meter's configured address, its
protocol name and its loaded model, the shared simulated clock and a seed for its load.
"""

from __future__ import annotations

from typing import Any

from meter_gateway.protocols.dlt645.edition import Edition
from meter_gateway.simulators.clock import SimClock


def dlt645(address: str, protocol: str, model: Any, *, clock: SimClock, seed: int) -> Any:
    from meter_gateway.simulators.dlt645_meter import Dlt645Meter

    return Dlt645Meter(address, Edition.parse(protocol), clock=clock, seed=seed)


def dlt698(address: str, protocol: str, model: Any, *, clock: SimClock, seed: int) -> Any:
    from meter_gateway.simulators.dlt698_meter import Dlt698Meter

    return Dlt698Meter(address, clock=clock, seed=seed)


def cjt188(address: str, protocol: str, model: Any, *, clock: SimClock, seed: int) -> Any:
    from meter_gateway.simulators.cjt188_meter import Cjt188Meter

    return Cjt188Meter(
        address, model.meter_type, clock=clock, seed=seed, di_order=model.di_order, preamble=min(model.preamble, 4)
    )

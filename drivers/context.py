"""What a driver builder is given: one configured meter, the bus it is on, and its model.

Every protocol's driver module has a ``from_config(ctx: DriverContext)`` builder, named in the
protocol registry (:mod:`drivers.registry`). The fleet builder (``gateway/daemon/meters.py``) fills the
context from the config; drivers never import the config themselves, so they can be built the
same way by ``meter-gateway read``, the simulators' tests and the benchmarks.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meter_gateway.drivers.bus import Bus


@dataclass(frozen=True, slots=True)
class Credentials:
    """A meter's write access, for protocols whose control frames carry a password."""

    password: str | None = None  # the secret itself (never logged)
    level: int = 2
    operator: str = "00000000"


@dataclass(frozen=True, slots=True)
class DriverContext:
    meter_id: str
    protocol: str  # the registry name, e.g. "dlt645-2007"
    address: str | int  # as configured and checked by the registry's address rule
    bus: Bus
    model: Any  # the loaded meter model of the protocol's family (drivers/meter_models.py)
    tz: datetime.tzinfo = datetime.UTC  # the meters' local time zone (gateway.timezone)
    credentials: Credentials | None = None
    # protocol-specific per-meter settings from the config (e.g. meters[].dlt698), as plain data
    options: Mapping[str, Any] = field(default_factory=dict)
    # the fleet's listener for what meters send unasked: (meter id, protocol) -> the callback for
    # one event; a driver whose meters send such frames (DL/T 698.45) asks it when one arrives
    events: Callable[[str, str], Callable[[Any], None]] | None = None

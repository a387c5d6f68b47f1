"""State a protocol keeps per bus (its exchanges' shared line: request history, sequence numbers,
deframer), made on first use and dropped with the bus."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

from meter_gateway.drivers.bus import Bus

__all__ = ["PerBus"]

T = TypeVar("T")


class PerBus(Generic[T]):
    """``per_bus(bus)``: the bus's one ``T`` (``make()`` on first use)."""

    __slots__ = ("_made", "_make")

    def __init__(self, make: Callable[[], T]) -> None:
        self._make = make
        self._made: weakref.WeakKeyDictionary[Bus, T] = weakref.WeakKeyDictionary()

    def __call__(self, bus: Bus) -> T:
        made = self._made.get(bus)
        if made is None:
            made = self._made[bus] = self._make()
        return made

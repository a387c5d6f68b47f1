"""A prepaid meter's account (local fee control, 本地费控): credit that consumption draws down.

The purse holds a signed balance in its own unit: yuan for a money-type meter (each imported kWh
costs ``price``), kWh for an energy-type one (price 1). The balance is not stored per read: it is
the balance at the last purchase minus what the import register has advanced since, so it is
exact at whatever instant the caller reads the register. Below zero the meter shows remaining 0
and the shortfall as overdraft; a purchase first pays the overdraft back (as DL/T 645-2007 prepaid
meters do: 购电后剩余 = 购电前剩余 - 透支 + 购电).

No protocol and no clock here: the meter simulator passes its import energy and meter time in.
"""

from __future__ import annotations

import datetime
from collections import deque
from dataclasses import dataclass
from typing import Final, Literal

__all__ = ["KINDS", "PURCHASES_KEPT", "Purchase", "Purse", "PurseKind"]

PurseKind = Literal["money", "energy"]
KINDS: Final[tuple[PurseKind, ...]] = ("money", "energy")
PURCHASES_KEPT: Final = 10  # DL/T 645-2007 records (上1..10次)购电记录
MAX_AMOUNT: Final = 999_999.99  # XXXXXX.XX, the largest amount the wire carries


@dataclass(frozen=True, slots=True)
class Purchase:
    """One purchase, as the meter records it (DI 0332xxNN / 0333xxNN)."""

    time: datetime.datetime  # meter time
    count: int  # purchases so far, this one included
    amount: float
    before: float  # remaining before the purchase (0 while in overdraft)
    after: float  # remaining after it
    total: float  # everything bought so far, this one included


class Purse:
    """The account of one prepaid meter. ``credit`` is the opening purchase (purchase 1)."""

    def __init__(
        self,
        kind: PurseKind,
        *,
        credit: float,
        price: float,
        energy: float,
        at: datetime.datetime,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"prepaid kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if price <= 0 and kind == "money":
            raise ValueError(f"price must be > 0 yuan/kWh, got {price}")
        self.kind: PurseKind = kind
        self.unit = "CNY" if kind == "money" else "kWh"
        self.rate = price if kind == "money" else 1.0  # balance units per imported kWh
        self._balance = 0.0  # at _anchor_energy
        self._anchor_energy = energy
        self.total = 0.0
        self.purchases: deque[Purchase] = deque(maxlen=PURCHASES_KEPT)
        self.top_up(credit, energy=energy, at=at)

    def balance(self, energy: float) -> float:
        """Signed balance when the import register reads ``energy`` (kWh)."""
        return self._balance - (energy - self._anchor_energy) * self.rate

    def remaining(self, energy: float) -> float:
        return max(0.0, self.balance(energy))

    def overdraft(self, energy: float) -> float:
        return max(0.0, -self.balance(energy))

    def exhausted(self, energy: float) -> bool:
        """No credit left (remaining 0): a self-tripping meter opens its relay now."""
        return self.balance(energy) <= 0.0

    def top_up(self, amount: float, *, energy: float, at: datetime.datetime) -> Purchase:
        """Add ``amount`` (in the purse's unit); the overdraft is paid back first."""
        if not 0 < amount <= MAX_AMOUNT:
            raise ValueError(f"a purchase is more than 0 and at most {MAX_AMOUNT} {self.unit}, got {amount}")
        balance = self.balance(energy)
        self._balance = balance + amount
        self._anchor_energy = energy
        self.total += amount
        count = self.purchases[0].count + 1 if self.purchases else 1
        purchase = Purchase(at, count, amount, max(0.0, balance), max(0.0, self._balance), self.total)
        self.purchases.appendleft(purchase)
        return purchase

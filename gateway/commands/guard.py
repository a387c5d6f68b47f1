"""The mass-disconnect guard: at most ``max_disconnects`` meters disconnected (relay trips and
valve closes alike, :data:`GUARDED_ACTIONS`) per sliding ``guard_window``; beyond that,
disconnects are held until a ``release`` (signed by a key with the ``release`` role) or their
expiry.

A wrong or malicious mass disconnect is a safety incident (hospitals, lifts, heating in winter);
a limit that a second person must lift bounds the damage of one compromised key or one buggy
head-end run. The window entries live in the command store, so a restart does not reset it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from meter_gateway.gateway.commands.states import CommandEvent, CommandState
from meter_gateway.gateway.store.commands import CommandStore, Execution, Transition

__all__ = ["GUARDED_ACTIONS", "GUARD_REASON", "GuardDecision", "MassDisconnectGuard"]

log = logging.getLogger(__name__)

GUARD_REASON = "mass_disconnect_guard"
# Actions that cut a supply and so count against the window: closing a water or gas valve is a
# disconnect of that supply.
GUARDED_ACTIONS: Final = frozenset({"disconnect", "valve_close"})


@dataclass(frozen=True, slots=True)
class GuardDecision:
    admitted: list[str]  # meters that may run now (each takes a window entry)
    held: list[str]


class MassDisconnectGuard:
    """Decides, per disconnect, run or hold; counts how often it started holding."""

    def __init__(self, store: CommandStore, max_disconnects: int, window: float, clock: Callable[[], float]) -> None:
        self.store = store
        self.max_disconnects = max_disconnects
        self.window = window
        self.clock = clock
        self.tripped = 0  # times the guard went from "nothing held" to holding
        self.released = 0
        self._holding = store.count_state(CommandState.HELD) > 0

    def update(self, max_disconnects: int, window: float) -> None:
        self.max_disconnects = max_disconnects
        self.window = window

    def room(self, now: float) -> int:
        """Disconnects that may still start in the window ending at ``now``."""
        return max(0, self.max_disconnects - self.store.guard_count(now - self.window))

    def decide(self, meters: Sequence[str], now: float, command: str | None = None) -> GuardDecision:
        """Admit meters in the command's order while the window has room; hold the rest.

        The trip (nothing held -> holding) is logged as ONE warning line with a stable
        ``event=mass_disconnect_guard_tripped`` token to alert on; more commands held while it
        already holds get an info line each."""
        room = self.room(now)
        decision = GuardDecision(list(meters[:room]), list(meters[room:]))
        if not decision.held:
            return decision
        if not self._holding:
            self._holding = True
            self.tripped += 1
            log.warning(
                "event=mass_disconnect_guard_tripped command=%s held=%d admitted=%d limit=%d window=%gs"
                ' next="held until a release signed by a key with role release, or until expiry"',
                command or "-",
                len(decision.held),
                len(decision.admitted),
                self.max_disconnects,
                self.window,
            )
        else:
            log.info(
                "event=mass_disconnect_guard_holding command=%s held=%d admitted=%d",
                command or "-",
                len(decision.held),
                len(decision.admitted),
            )
        return decision

    def release(self, held: Sequence[Execution], now: float, detail: str) -> list[Transition]:
        """Transitions for held executions named by a release: ``release`` (-> queued; they bypass
        the limit: the release is the second person's approval, but still enter the window so the
        guard keeps counting) or ``expire``."""
        out: list[Transition] = []
        for exe in held:
            if exe.state is not CommandState.HELD:
                continue
            if now >= exe.expires_at:
                out.append(
                    Transition(exe.command, exe.meter, CommandEvent.EXPIRE, detail="expired while held by the guard")
                )
            else:
                out.append(Transition(exe.command, exe.meter, CommandEvent.RELEASE, detail=detail, guarded=True))
                self.released += 1
        return out

    def settle(self) -> None:
        """Call after held executions changed: the guard stops "holding" when none are left."""
        if self._holding and self.store.count_state(CommandState.HELD) == 0:
            self._holding = False

"""One interface over the meters' remote-control functions, so the executor need not know the protocol.

* DL/T 645-2007: function 0x1C (clause 6.13; 1C direct close from the 2013 filing amendment)
  through :meth:`Dlt645Driver.remote_control`, with the command's ``expires_at`` as the frame's
  validity time, so a frame that lingers in a serial server cannot act after the order expired;
  relay, close permit and keep-power from status word 3 (:meth:`Dlt645Driver.read_relay`).
* DL/T 698.45: ACTION 8000/8001, or a head-end's secured APDU passed through, in
  :mod:`gateway.commands.dlt698_actuator`.
* CJ/T 188 (water, gas, heat): the valve (A017) in :mod:`gateway.commands.cjt188_actuator`,
  verified from ST (:class:`ValveActuator`); no relay.
* Modbus: the model's relay coil or register (:meth:`ModbusMeter.set_relay`/``read_relay``) with
  ``priority=Priority.COMMAND, force=True``: a command goes ahead of polls and is tried even on a
  meter the health book calls offline. Modbus meters have no close permit, keep-power or alarm: a
  reconnect closes directly.

Which class serves a meter is its protocol's ``actuator`` in :mod:`drivers.registry`
(:func:`make_actuator`). Each control call is ONE attempt (the executor owns retries, so each
attempt is acked as ``sent``). Driver errors become :class:`ActuatorError` with the ack reason the
executor needs.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final, Generic, Literal, Protocol, TypeVar, runtime_checkable

from meter_gateway.drivers import registry
from meter_gateway.drivers.bus import Bus, Priority
from meter_gateway.drivers.dlt645_driver import Dlt645Driver
from meter_gateway.drivers.errors import ConfigurationError, DriverError, MeterRefused
from meter_gateway.drivers.modbus import ModbusMeter
from meter_gateway.drivers.reading import Reading
from meter_gateway.gateway.commands.envelope import RelayState
from meter_gateway.protocols.dlt645.edition import Edition
from meter_gateway.protocols.dlt645.remote_control import RemoteCommand

__all__ = [
    "RELAY_ACTIONS",
    "RELAY_STATUS_ACTIONS",
    "VALVE_ACTIONS",
    "ActuatorError",
    "Dlt645Actuator",
    "DriverActuator",
    "MeterActuator",
    "ModbusActuator",
    "RelayReading",
    "ValveActuator",
    "ValveReading",
    "guarded",
    "make_actuator",
    "relay_reading",
]

T = TypeVar("T")

# Actions that move the relay and are verified by reading it back.
RELAY_ACTIONS: Final = frozenset({"disconnect", "reconnect"})
# Actions a status-word meter (DL/T 645, DL/T 698.45) can only verify when its model says where the relay is.
RELAY_STATUS_ACTIONS: Final = frozenset({*RELAY_ACTIONS, "relay_status", "keep_power_on", "keep_power_off"})
# DL/T 645 N1 codes for the actions that are one 0x1C frame (clause 6.13 / remote_control.py).
_DLT_COMMANDS: Final = {
    "disconnect": RemoteCommand.TRIP,
    "keep_power_on": RemoteCommand.KEEP_POWER_ON,
    "keep_power_off": RemoteCommand.KEEP_POWER_OFF,
    "alarm_on": RemoteCommand.ALARM_ON,
    "alarm_off": RemoteCommand.ALARM_OFF,
}
_RECONNECT: Final = {"close_permit": RemoteCommand.CLOSE_PERMIT, "direct_close": RemoteCommand.DIRECT_CLOSE}
CONTROL_ACTIONS: Final = frozenset({*_DLT_COMMANDS, "reconnect"})
# Actions that move a water or gas valve and are verified by reading its state back; the value
# is whether the valve is to be open.
VALVE_ACTIONS: Final = {"valve_close": False, "valve_open": True}

Failure = Literal["no_answer", "meter_refused", "unsupported"]


class ActuatorError(Exception):
    """A control or read that did not succeed. ``kind``: ``no_answer`` (no reply, garbled reply,
    link down: worth retrying), ``meter_refused`` (the meter said no: final; ``reason`` is the
    meter's reason, e.g. ``keep_power``, ``authentication_failed``, ``validity_expired``) or
    ``unsupported`` (this meter or its model cannot do it: nothing was sent)."""

    def __init__(self, kind: Failure, reason: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind: Failure = kind
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class RelayReading:
    state: RelayState  # closed | open | armed (close permit pending the customer's button)
    keep_power: bool  # False when the meter cannot say
    raw: int | None  # the raw status word (DL/T 645), None for Modbus
    trip_pending: bool = False  # the meter holds a trip it has not carried out yet (DL/T 645 delayed trip)


@dataclass(frozen=True, slots=True)
class ValveReading:
    state: str  # open | closed | abnormal (the meter says the valve is jammed or failed)
    battery_low: bool
    raw: int | None  # the raw status word (CJ/T 188 ST)


def _convert(exc: DriverError) -> ActuatorError:
    if isinstance(exc, MeterRefused):
        reason = exc.reasons[0] if exc.reasons else f"code_{exc.code:#x}"
        return ActuatorError("meter_refused", reason, str(exc))
    if isinstance(exc, ConfigurationError):
        return ActuatorError("unsupported", "unsupported", str(exc))
    return ActuatorError("no_answer", exc.kind, str(exc))  # NoAnswer, LinkDown, BadReply, MeterOffline


async def guarded(call: Awaitable[T]) -> T:
    """Await a driver call, turning its errors into the actuator's (every actuator goes through this)."""
    try:
        return await call
    except DriverError as exc:
        raise _convert(exc) from exc


class MeterActuator(Protocol):
    meter_id: str
    protocol: str

    def unsupported(self, action: str) -> str | None:
        """Why this meter cannot do ``action`` (checked before anything is sent), or None."""

    async def control(self, action: str, mode: str | None, valid_until: float, apdu: bytes | None = None) -> None:
        """One attempt of a control frame; raises ActuatorError. ``apdu``: a secured APDU the
        signed command carries, to frame as it is (DL/T 698.45 pass-through); the executor gives
        one only to an actuator whose ``control`` names the parameter, so the others leave it out."""

    async def read_relay(self) -> RelayReading: ...

    async def read_now(self, quantities: Sequence[str] | None, now: float) -> list[Reading]: ...

    async def time_sync(self, now: float) -> float:
        """Set the meter clock to ``now``; returns the meter clock's offset read back after."""


@runtime_checkable
class ValveActuator(Protocol):
    """A meter with a valve: what the valve actions need beyond :class:`MeterActuator`."""

    meter_id: str

    async def read_valve(self) -> ValveReading: ...


class _ModelQuantities(Protocol):
    @property
    def quantities(self) -> tuple[str, ...]: ...


class CommandDriver(Protocol):
    """What :class:`DriverActuator` needs of a meter driver."""

    @property
    def meter_id(self) -> str: ...

    @property
    def model(self) -> _ModelQuantities: ...

    async def read(
        self, quantities: Sequence[str], *, slot: float | None, now: float, priority: int = ...
    ) -> list[Reading]: ...

    async def read_clock(self, *, priority: int = ...) -> float: ...

    async def sync_time(self, when: float, *, priority: int = ...) -> None: ...


D = TypeVar("D", bound=CommandDriver)


class DriverActuator(Generic[D]):
    """What the actuators over a clocked meter driver (DL/T 645, DL/T 698.45, CJ/T 188) do alike:
    on-demand reads and clock setting, at command priority, errors through :func:`guarded`."""

    def __init__(self, driver: D, clock: Callable[[], float] = time.time) -> None:
        self.driver = driver
        self.meter_id = driver.meter_id
        self.clock = clock

    async def read_now(self, quantities: Sequence[str] | None, now: float) -> list[Reading]:
        wanted = list(quantities) if quantities else list(self.driver.model.quantities)
        return await guarded(self.driver.read(wanted, slot=float(int(now)), now=now, priority=Priority.COMMAND))

    async def time_sync(self, now: float) -> float:
        await guarded(self.driver.sync_time(now, priority=Priority.COMMAND))
        meter = await guarded(self.driver.read_clock(priority=Priority.COMMAND))
        return meter - self.clock()


class RelayStatusLike(Protocol):
    @property
    def closed(self) -> bool: ...

    @property
    def armed(self) -> bool: ...

    @property
    def trip_pending(self) -> bool: ...

    @property
    def keep_power(self) -> bool: ...

    @property
    def raw(self) -> int: ...


def relay_reading(status: RelayStatusLike) -> RelayReading:
    """A status-word meter's relay state as the executor verifies it."""
    state: RelayState = "closed" if status.closed else "armed" if status.armed else "open"
    return RelayReading(state, status.keep_power, status.raw, status.trip_pending)


class Dlt645Actuator(DriverActuator[Dlt645Driver]):
    protocol = "dlt645"

    def unsupported(self, action: str) -> str | None:
        d = self.driver
        if action in CONTROL_ACTIONS and d.edition is not Edition.DLT645_2007:
            return "DL/T 645-1997 has no remote control (0x1C)"
        if action in RELAY_STATUS_ACTIONS and d.model.relay is None:
            return f"model {d.model.name} does not report its relay"
        return None

    async def control(self, action: str, mode: str | None, valid_until: float) -> None:
        command = _RECONNECT[mode or "close_permit"] if action == "reconnect" else _DLT_COMMANDS[action]
        await guarded(self.driver.remote_control(command, valid_until, priority=Priority.COMMAND, attempts=1))

    async def read_relay(self) -> RelayReading:
        # forced: a meter marked offline by the control frames' lost replies must still be read back
        return relay_reading(await guarded(self.driver.read_relay(priority=Priority.COMMAND, force=True)))


class ModbusActuator:
    protocol = "modbus"

    def __init__(self, meter: ModbusMeter) -> None:
        self.meter = meter
        self.meter_id = meter.meter_id

    def unsupported(self, action: str) -> str | None:
        if action in {*RELAY_ACTIONS, "relay_status"} and self.meter.model.relay is None:
            return f"model {self.meter.model.name} has no relay"
        if action in {"keep_power_on", "keep_power_off", "alarm_on", "alarm_off", "time_sync"}:
            return f"Modbus meters have no {action.replace('_', ' ')}"
        return None

    async def control(self, action: str, mode: str | None, valid_until: float) -> None:
        # no validity time on Modbus: the executor does not start a command after its expiry
        closed = action == "reconnect"
        await guarded(self.meter.set_relay(closed, priority=Priority.COMMAND, force=True, attempts=1))

    async def read_relay(self) -> RelayReading:
        closed = await guarded(self.meter.read_relay(priority=Priority.COMMAND, force=True))
        return RelayReading("closed" if closed else "open", False, None)

    async def read_now(self, quantities: Sequence[str] | None, now: float) -> list[Reading]:
        wanted = list(quantities) if quantities else None
        return await guarded(self.meter.read(wanted, slot=float(int(now)), now=now, priority=Priority.COMMAND))

    async def time_sync(self, now: float) -> float:
        raise ActuatorError("unsupported", "unsupported", "Modbus meters have no clock to set")


def make_actuator(driver: object, bus: Bus | None = None, *, protocol: str | None = None) -> MeterActuator:
    """The actuator for a meter runtime's driver, of the class its protocol's registry entry names
    (``actuator``). ``protocol``: the meter's protocol; None: the one whose driver module built
    ``driver``. ``bus`` is no longer needed (every driver holds its bus); it is accepted so callers
    need not change at once."""
    info = registry.get(protocol) if protocol is not None else registry.of_driver(driver)
    actuator: MeterActuator = info.build_actuator()(driver)
    return actuator

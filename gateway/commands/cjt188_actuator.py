"""The command actuator of CJ/T 188 water, gas and heat meters: valve close and open, reads, clock.

* ``valve_close`` / ``valve_open``: one A017 write valve control (55H open, 99H close; CJ/T 188-2004
  clause 7 write operations) per attempt, through :meth:`Cjt188Driver.set_valve` at command
  priority, sent even to a meter the health book holds offline. The meter acknowledges with ST;
  if that ST already says the valve is abnormal (jammed, motor fault) the meter has answered the
  command with a failure: ``meter_refused`` with reason ``valve_abnormal``, not retried. The
  executor then reads ST back (901F, :meth:`read_valve`) until the valve is where it should be.
* ``read_now`` and ``time_sync`` (A015, acknowledged) as for the other protocols.
* No relay, close permit, keep-power or alarm: those actions are refused before anything is sent.

Each control call is ONE attempt (the executor owns retries). Driver errors become
:class:`~gateway.commands.actuators.ActuatorError` with the reason the executor needs.
"""

from __future__ import annotations

from meter_gateway.drivers.bus import Priority
from meter_gateway.drivers.cjt188_driver import Cjt188Driver
from meter_gateway.gateway.commands.actuators import (
    VALVE_ACTIONS,
    ActuatorError,
    DriverActuator,
    RelayReading,
    ValveReading,
    guarded,
)

__all__ = ["Cjt188Actuator"]

_NO_RELAY = frozenset({"disconnect", "reconnect", "relay_status", "keep_power_on", "keep_power_off"})
_NO_ALARM = frozenset({"alarm_on", "alarm_off"})


class Cjt188Actuator(DriverActuator[Cjt188Driver]):
    protocol = "cjt188"

    def unsupported(self, action: str) -> str | None:
        model = self.driver.model
        if action in VALVE_ACTIONS and not model.valve:
            return f"model {model.name} has no valve"
        if action in _NO_RELAY:
            return "CJ/T 188 meters have no relay (water and gas meters are switched with valve_close/valve_open)"
        if action in _NO_ALARM:
            return "CJ/T 188 meters have no alarm command"
        return None

    async def control(self, action: str, mode: str | None, valid_until: float) -> None:
        # no validity time in A017: the executor does not start a command after its expiry
        try:
            open_valve = VALVE_ACTIONS[action]
        except KeyError:
            raise ActuatorError("unsupported", "unsupported", f"{action} is not a CJ/T 188 control") from None
        status = await guarded(self.driver.set_valve(open_valve, priority=Priority.COMMAND, attempts=1))
        if status is not None and status.valve == "abnormal":
            raise ActuatorError(
                "meter_refused",
                "valve_abnormal",
                f"meter {self.meter_id} acknowledged {action} with ST {status}: valve abnormal (jammed or motor fault)",
            )

    async def read_valve(self) -> ValveReading:
        # forced: a meter marked offline by lost command replies must still be read back
        status = await guarded(self.driver.read_valve(priority=Priority.COMMAND, force=True))
        return ValveReading(status.state, status.battery_low, status.raw)

    async def read_relay(self) -> RelayReading:
        raise ActuatorError("unsupported", "unsupported", "CJ/T 188 meters have no relay")

"""The command actuator of DL/T 698.45 meters (the executor's :class:`MeterActuator`).

* ``control = "plaintext"``: disconnect is ACTION 8000 method 129 (跳闸), reconnect method 130
  (合闸; ``close_permit`` sends enum 0, "allow closing", which arms the relay for the customer's
  button, ``direct_close`` enum 1), keep-power 8001 methods 127/128 (DL/T 698.45-2017 Appendix
  E.8), each through :class:`~drivers.dlt698_driver.Dlt698Driver`.
* ``control = "passthrough"``: the signed command carries the head-end's secured APDU
  (``params.apdu``, SECURITY-Request ciphertext + SID_MAC); it is forwarded untouched
  (:meth:`Dlt698Driver.passthrough`) and its SECURITY-Response DAR read. Without an APDU the
  action is ``unsupported``: the gateway cannot make one.

Either way the executor verifies by reading status word 3 back (relay, command state, keep-power).
Each control call is ONE attempt; driver errors become ActuatorError as for DL/T 645.
"""

from __future__ import annotations

from meter_gateway.drivers.bus import Priority
from meter_gateway.drivers.dlt698_driver import Dlt698Driver
from meter_gateway.gateway.commands.actuators import (
    RELAY_STATUS_ACTIONS,
    ActuatorError,
    DriverActuator,
    RelayReading,
    guarded,
    relay_reading,
)

__all__ = ["CONTROL_ACTIONS", "Dlt698Actuator"]

CONTROL_ACTIONS = frozenset({"disconnect", "reconnect", "keep_power_on", "keep_power_off"})


class Dlt698Actuator(DriverActuator[Dlt698Driver]):
    protocol = "dlt698"

    def unsupported(self, action: str) -> str | None:
        d = self.driver
        if action in {"alarm_on", "alarm_off"}:
            return "DL/T 698.45 alarm control is not implemented"
        if action in RELAY_STATUS_ACTIONS and d.model.relay is None:
            return f"model {d.model.name} does not report its relay"
        return None

    async def control(self, action: str, mode: str | None, valid_until: float, apdu: bytes | None = None) -> None:
        d = self.driver
        if action not in CONTROL_ACTIONS:
            raise ActuatorError("unsupported", "unsupported", f"{action} is not a DL/T 698.45 control action")
        if d.control == "passthrough":
            if apdu is None:
                raise ActuatorError(
                    "unsupported",
                    "apdu_required",
                    f"meter {d.meter_id} takes control only as the head-end's secured APDU (params.apdu)",
                )
            await guarded(d.passthrough(apdu, priority=Priority.COMMAND, attempts=1))
            return
        if apdu is not None:
            raise ActuatorError("unsupported", "unsupported", f"meter {d.meter_id} is in plaintext control mode")
        if action == "disconnect":
            await guarded(d.trip(priority=Priority.COMMAND, attempts=1))
        elif action == "reconnect":
            await guarded(d.close(close_now=mode == "direct_close", priority=Priority.COMMAND, attempts=1))
        else:
            await guarded(d.keep_power(action == "keep_power_on", priority=Priority.COMMAND, attempts=1))

    async def read_relay(self) -> RelayReading:
        return relay_reading(await guarded(self.driver.read_relay(priority=Priority.COMMAND, force=True)))

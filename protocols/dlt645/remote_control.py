"""Remote-control commands (2007 function 0x1C, N1 byte) and what each does to the relay.

DL/T 645-2007 clause 6.13 defines 1A trip, 1B close permit, 2A/2B alarm, 3A/3B keep-power; the
2013 filing amendment adds 1C direct close and 1D/1E delayed and delayed-auto-restore trips.
"""

from __future__ import annotations

import enum


class RemoteCommand(enum.IntEnum):
    TRIP = 0x1A  # 跳闸: open the relay
    CLOSE_PERMIT = 0x1B  # 合闸允许: arm the relay; it closes on the customer's local button press
    DIRECT_CLOSE = 0x1C  # 直接合闸: close the relay now
    DELAYED_TRIP = 0x1D  # 延时跳闸: open after a delay (N2)
    TRIP_AUTO_RESTORE = 0x1E  # 延时跳闸自动恢复: open after a delay, close again automatically
    ALARM_ON = 0x2A  # 报警
    ALARM_OFF = 0x2B  # 报警解除
    KEEP_POWER_ON = 0x3A  # 保电: the relay must not be tripped until released
    KEEP_POWER_OFF = 0x3B  # 保电解除

    @property
    def label(self) -> str:
        """Stable name used in JSON and the MQTT contract (``trip``, ``close-permit`` ...)."""
        return self.name.lower().replace("_", "-")

    @classmethod
    def from_label(cls, label: str) -> RemoteCommand:
        try:
            return cls[label.upper().replace("-", "_")]
        except KeyError:
            names = ", ".join(c.label for c in cls)
            raise ValueError(f"unknown remote-control command {label!r} (one of {names})") from None

    @property
    def opens_relay(self) -> bool:
        return self in {RemoteCommand.TRIP, RemoteCommand.DELAYED_TRIP, RemoteCommand.TRIP_AUTO_RESTORE}

    @property
    def closes_relay(self) -> bool:
        return self in {RemoteCommand.CLOSE_PERMIT, RemoteCommand.DIRECT_CLOSE}

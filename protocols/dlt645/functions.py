"""Function codes (control byte D4..D0) of both editions.

DL/T 645-2007 clause 4.3 ("控制码 C") and DL/T 645-1997 clause 4.2. The code sets overlap only
in 0x08 (broadcast time, same layout in both), which is why :func:`infer_edition` can name the
edition of any other frame from its control byte alone — for display; drivers always use the
edition configured for the meter.
"""

from __future__ import annotations

import enum

from meter_gateway.protocols.dlt645.edition import Edition


class Function2007(enum.IntEnum):
    BROADCAST_TIME = 0x08
    READ = 0x11
    READ_FOLLOW_UP = 0x12
    READ_ADDRESS = 0x13
    WRITE = 0x14
    WRITE_ADDRESS = 0x15
    FREEZE = 0x16
    CHANGE_BAUD = 0x17
    CHANGE_PASSWORD = 0x18
    CLEAR_MAX_DEMAND = 0x19
    CLEAR_METER = 0x1A
    CLEAR_EVENTS = 0x1B
    REMOTE_CONTROL = 0x1C


class Function1997(enum.IntEnum):
    READ = 0x01
    READ_FOLLOW_UP = 0x02
    REREAD = 0x03
    WRITE = 0x04
    BROADCAST_TIME = 0x08
    WRITE_ADDRESS = 0x0A
    CHANGE_BAUD = 0x0C
    CHANGE_PASSWORD = 0x0F
    CLEAR_MAX_DEMAND = 0x10


def function_name(edition: Edition, code: int) -> str:
    table: type[enum.IntEnum] = Function2007 if edition is Edition.DLT645_2007 else Function1997
    try:
        return table(code).name.lower().replace("_", "-")
    except ValueError:
        return f"unknown-{code:02X}"


def infer_edition(function: int) -> Edition | None:
    """The edition a function code belongs to (2007 for the shared 0x08), or None if neither."""
    if function in Function2007._value2member_map_:
        return Edition.DLT645_2007
    if function in Function1997._value2member_map_:
        return Edition.DLT645_1997
    return None

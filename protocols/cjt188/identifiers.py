"""Data identifiers (DI) on the wire, and the ``di_order`` setting.

A CJ/T 188 DI is two bytes the standard prints as one number (``901F``, ``810A``, ``A017``; clause
7, Tables 5-9) and shows in frames as ``DI0 DI1`` (clause 7.1/7.2 frame layouts). Implementations
disagree on which byte goes first and the checksum cannot tell:

``"standard"`` (default)
    the bytes in the order the standard prints the DI: ``90 1F``, ``81 0A``, ``A0 17`` (e.g. the
    frames at juejin.cn/post/7434716832313327625, "CJ/T188-2004 报文举例", and the valve frames
    at blog.csdn.net/qingwufeiyang12346/article/details/47306719);
``"swapped"``
    low byte first: ``1F 90``, ``0A 81`` (e.g. blog.csdn.net/qingwufeiyang12346/article/details/46824903
    and several meters' firmware).

It is a per-meter setting passed to every encoder and parser; nothing here guesses it.
"""

from __future__ import annotations

from typing import Final, Literal, TypeAlias

from meter_gateway.protocols.cjt188.errors import LocalProtocolError, RemoteProtocolError

DiOrder: TypeAlias = Literal["standard", "swapped"]
DI_ORDERS: Final = ("standard", "swapped")


def check_order(order: str) -> DiOrder:
    if order == "standard":
        return "standard"
    if order == "swapped":
        return "swapped"
    raise LocalProtocolError(f"di_order must be 'standard' or 'swapped', got {order!r}")


def di_bytes(di: int, order: DiOrder = "standard") -> bytes:
    """The two wire bytes of ``di`` (printed value, e.g. 0x901F)."""
    if not 0 <= di <= 0xFFFF:
        raise LocalProtocolError(f"data identifier {di!r} is not two bytes")
    return di.to_bytes(2, "big" if check_order(order) == "standard" else "little")


def di_from(data: bytes, order: DiOrder = "standard") -> int:
    """The DI (printed value) at the start of a data field."""
    if len(data) < 2:
        raise RemoteProtocolError(f"data field of {len(data)} bytes is too short for a data identifier")
    return int.from_bytes(data[:2], "big" if check_order(order) == "standard" else "little")


def di_text(di: int) -> str:
    return f"{di:04X}"

"""What a simulated bus needs to know about one byte protocol: how to deframe it, whom a frame
addresses, and how to fake the faults that depend on the frame layout.

A :class:`SimulatedBus <simulators.links.SimulatedBus>` can host meters of several byte
protocols at once (DL/T 645, DL/T 698.45, CJ/T 188 share RS-485 segments in the field). Every
byte the gateway sends goes through one deframer per protocol present; a frame goes only to the
meters of the protocol that deframed it, and among those to the one it addresses. Meters of
other protocols never see it, as a real meter's parser rejects a frame of another protocol.

Addressing, common to the three protocols: a frame from a meter (an echo, another master's
traffic) is ignored; a broadcast reaches every meter of the protocol and gets no reply; a
wildcard address is answered only when exactly one meter *of that protocol* is on the link (two
would collide, as on a real bus); otherwise the meter with that exact address answers.

Each protocol is a :class:`WireProtocol` subclass; a meter class names its protocol in a
``WIRE`` class attribute (the DL/T 645 meter, which predates this module, is mapped here).
"""

from __future__ import annotations

import abc
from collections.abc import Hashable, Sequence
from typing import Any, ClassVar, Final, Protocol, runtime_checkable

from meter_gateway.protocols.dlt645.deframer import Deframer as Dlt645Deframer
from meter_gateway.protocols.dlt645.frame import Frame as Dlt645Frame
from meter_gateway.protocols.dlt645.frame import checksum as dlt645_checksum
from meter_gateway.simulators.dlt645_meter import Dlt645Meter
from meter_gateway.simulators.faults import Faults


class StreamDeframer(Protocol):
    """The part of a codec's streaming deframer the bus uses."""

    @property
    def buffered(self) -> int: ...

    def feed(self, data: bytes) -> Sequence[Any]: ...

    def reset(self) -> bytes: ...


@runtime_checkable
class SimMeter(Protocol):
    """What the bus needs of a simulated meter of any protocol."""

    address_text: str
    turnaround: float

    def handle(self, frame: Any) -> list[bytes]: ...


class WireProtocol(abc.ABC):
    """One byte protocol on a shared bus. Subclasses are stateless singletons."""

    name: ClassVar[str]
    discard_prefix: ClassVar[str]  # bus.stats key prefix for this protocol's deframer discards

    @abc.abstractmethod
    def deframer(self) -> StreamDeframer:
        """A fresh streaming deframer (one per bus connection)."""

    def is_frame(self, event: object) -> bool:
        """Whether a deframer event is a frame (else it is a discard report with ``reason``)."""
        return not hasattr(event, "reason")

    @abc.abstractmethod
    def key(self, meter: Any) -> Hashable:
        """The meter's address as the dict key frames are looked up by."""

    @abc.abstractmethod
    def from_meter(self, frame: Any) -> bool:
        """The frame was sent by a meter (never a request)."""

    @abc.abstractmethod
    def frame_key(self, frame: Any) -> Hashable:
        """The exact-address key of the frame (compared with :meth:`key`)."""

    @abc.abstractmethod
    def is_broadcast(self, frame: Any) -> bool: ...

    @abc.abstractmethod
    def is_wildcard(self, frame: Any) -> bool: ...

    @abc.abstractmethod
    def wildcard_matches(self, frame: Any, meter: Any) -> bool: ...

    @abc.abstractmethod
    def request_bytes(self, frame: Any) -> int:
        """The request's size on the wire (68 .. 16), for wire-time emulation."""

    @abc.abstractmethod
    def encode(self, frame: Any) -> bytes:
        """The request's bytes again (the echo fault sends them back)."""

    @abc.abstractmethod
    def readdress(self, reply: bytes) -> bytes:
        """The same reply from a neighbouring address, still a valid frame (wrong_address fault)."""

    def stick(self, meter: Any, faults: Faults) -> None:
        """Apply a fault that is meter state rather than a per-request decision."""
        if faults.stuck_relay and hasattr(meter, "stuck_relay"):
            meter.stuck_relay = True


class Dlt645Wire(WireProtocol):
    name = "dlt645"
    discard_prefix = "discarded_"  # the first protocol's counters keep their original names

    def deframer(self) -> StreamDeframer:
        return Dlt645Deframer()

    def key(self, meter: Any) -> Hashable:
        return bytes(meter.address.wire)

    def from_meter(self, frame: Any) -> bool:
        return bool(frame.control.from_meter)

    def frame_key(self, frame: Any) -> Hashable:
        return bytes(frame.address.wire)

    def is_broadcast(self, frame: Any) -> bool:
        return bool(frame.address.is_broadcast)

    def is_wildcard(self, frame: Any) -> bool:
        return bool(frame.address.is_wildcard)

    def wildcard_matches(self, frame: Any, meter: Any) -> bool:
        return bool(frame.address.matches(meter.address))

    def request_bytes(self, frame: Any) -> int:
        return len(frame.data) + 12

    def encode(self, frame: Any) -> bytes:
        assert isinstance(frame, Dlt645Frame)
        return frame.encode()

    def readdress(self, reply: bytes) -> bytes:
        """Lowest digit's last bit flipped, checksum fixed."""
        start = reply.index(0x68)
        body = bytearray(reply[start:])
        body[1] ^= 0x01
        body[-2] = dlt645_checksum(body[:-2])
        return reply[:start] + bytes(body)


DLT645: Final = Dlt645Wire()


def wire_of(meter: object) -> WireProtocol:
    """The protocol a simulated meter speaks."""
    wire = getattr(type(meter), "WIRE", None)
    if isinstance(wire, WireProtocol):
        return wire
    if isinstance(meter, Dlt645Meter):
        return DLT645
    raise TypeError(f"{type(meter).__name__} is not a simulated meter (no WIRE protocol)")


__all__ = ["DLT645", "Dlt645Wire", "SimMeter", "StreamDeframer", "WireProtocol", "wire_of"]

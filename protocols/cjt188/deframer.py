"""Streaming CJ/T 188 deframer: arbitrary chunks in, frames and discard reports out.

Frames are delimited by their length byte L (offset 10), never by scanning for 0x16: a checksum
or data byte can be 0x16 and data bytes can be 0x68. The deframer looks for a start byte 0x68,
takes L, and waits for exactly 13 + L bytes (CJ/T 188-2004 clause 6.2, Table 2). A candidate that
fails (bad checksum, bad end byte, impossible length) gives up only its first byte and the
search resumes right after it, so a real frame hidden behind noise or a truncated frame is still
found. FE wake-up bytes (clause 6.3) between frames are counted, not reported as noise.

A truncated frame followed by a new frame would otherwise stall: the new frame's bytes are
counted as the old one's tail while the deframer waits for bytes that never come. So while a
candidate is incomplete, a later start byte that already begins a complete, valid frame wins,
and the stalled candidate is reported as truncated.

The buffer never holds more than one maximal frame: bytes before a start byte are reported and
dropped at once, and a candidate is resolved as soon as 13 + L bytes are in. Same shapes as
``protocols.dlt645.deframer`` so a driver can treat both alike.
"""

from __future__ import annotations

from typing import Final

from meter_gateway.protocols.cjt188.frame import (  # the hot path indexes these tables directly
    _CONTROLS,
    HEADER_LENGTH,
    MAX_READ_LENGTH,
    OVERHEAD,
    Address,
    Frame,
)
from meter_gateway.protocols.deframing import AddressCache, Discarded, SumCheckedDeframer

__all__ = ["REASONS", "Deframer", "Discarded", "Event"]

Event = Frame | Discarded

REASONS: Final = ("noise", "bad_checksum", "bad_end", "bad_length", "truncated")


class Deframer(SumCheckedDeframer[Frame]):
    """Feed bytes with :meth:`feed`; it returns the frames and discards completed by them.

    ``max_data_length`` bounds L: the standard's 64H by default (clause 6.2.5); raise it (up to
    255) for meters that send longer vendor replies.
    """

    __slots__ = ("_addresses",)

    LENGTH_AT = 10
    HEADER = HEADER_LENGTH
    OVERHEAD = OVERHEAD

    def __init__(self, max_data_length: int = MAX_READ_LENGTH) -> None:
        super().__init__(max_data_length)
        self._addresses = AddressCache(Address)

    def _frame(self, buf: bytes, pos: int, size: int) -> Frame:
        end = pos + size
        address = self._addresses.get(buf[pos + 2 : pos + 9])
        return Frame(buf[pos + 1], address, _CONTROLS[buf[pos + 9]], buf[pos + HEADER_LENGTH : end - 2])

    def know(self, address: Address) -> None:
        """Seed the address cache with an address the caller already holds (a driver's meter)."""
        self._addresses.know(address.wire, address)

"""Streaming DL/T 645 deframer: arbitrary chunks in, frames and discard reports out.

Frames are delimited by their length byte, never by scanning for 0x16 (a checksum byte can be
0x16 and data bytes can be 0x68). The deframer looks for a start byte 0x68, checks the second
0x68 seven bytes later, takes L, and waits for exactly 12 + L bytes. A candidate that fails
(bad checksum, bad end byte, impossible length) gives up only its first byte, and the search
resumes right after it, so a real frame hidden behind noise or a truncated frame is still found.

A truncated frame followed by a new frame would otherwise stall: the new frame's bytes are
counted as the old one's tail while the deframer waits for bytes that never come. So while a
candidate is incomplete, a later start byte that already begins a complete, valid frame wins,
and the stalled candidate is reported as truncated.

The buffer never holds more than one maximal frame: bytes before a start byte are reported and
dropped at once, and a candidate is resolved as soon as 12 + L bytes are in. The scan is the one
every length-framed protocol here shares (``protocols/deframing.py``); this module says what a
valid DL/T 645 frame is.
"""

from __future__ import annotations

from typing import Final

from meter_gateway.protocols.deframing import AddressCache, Discarded, SumCheckedDeframer
from meter_gateway.protocols.dlt645.frame import (  # the hot path indexes these tables directly
    _CONTROLS,
    _SUB_33,
    HEADER_LENGTH,
    OVERHEAD,
    START,
    Address,
    Frame,
)

__all__ = ["REASONS", "Deframer", "Discarded", "Event"]

Event = Frame | Discarded

REASONS: Final = ("noise", "bad_checksum", "bad_end", "bad_length", "truncated")


class Deframer(SumCheckedDeframer[Frame]):
    """Feed bytes with :meth:`feed`; it returns the frames and discards completed by them."""

    __slots__ = ("_addresses",)

    LENGTH_AT = 9
    HEADER = HEADER_LENGTH
    OVERHEAD = OVERHEAD

    def __init__(self, max_data_length: int = 200) -> None:
        super().__init__(max_data_length)
        self._addresses = AddressCache(Address)

    def _not_a_start(self, buf: bytes, pos: int, n: int) -> bool:
        return n - pos >= 8 and buf[pos + 7] != START  # the second 68 after the address

    def _frame(self, buf: bytes, pos: int, size: int) -> Frame:
        end = pos + size
        address = self._addresses.get(buf[pos + 1 : pos + 7])
        return Frame(address, _CONTROLS[buf[pos + 8]], buf[pos + HEADER_LENGTH : end - 2].translate(_SUB_33))

    def know(self, address: Address) -> None:
        """Seed the address cache with an address the caller already holds (a driver's meter), so
        frames from that meter share it instead of decoding and keeping a copy per bus."""
        self._addresses.know(address.wire, address)

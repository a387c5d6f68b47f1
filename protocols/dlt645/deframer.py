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
dropped at once, and a candidate is resolved as soon as 12 + L bytes are in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from protocols.dlt645.frame import (
    END,
    HEADER_LENGTH,
    OVERHEAD,
    PREAMBLE,
    START,
    Address,
    Control,
    Frame,
    unscramble,
)


@dataclass(frozen=True, slots=True)
class Discarded:
    """Bytes the deframer threw away, and why (for counters and field engineers' hex dumps).

    ``reason`` is one of: ``noise``, ``bad_checksum``, ``bad_end``, ``bad_length``, ``truncated``.
    """

    reason: str
    data: bytes
    detail: str = ""


Event = Frame | Discarded

REASONS: Final = ("noise", "bad_checksum", "bad_end", "bad_length", "truncated")


class Deframer:
    """Feed bytes with :meth:`feed`; it returns the frames and discards completed by them."""

    __slots__ = ("_addresses", "_buf", "max_data_length", "preamble_bytes")

    def __init__(self, max_data_length: int = 200) -> None:
        if not 0 <= max_data_length <= 255:
            raise ValueError("max_data_length must be within 0..255")
        self.max_data_length = max_data_length
        self._buf = bytearray()
        self._addresses: dict[bytes, Address] = {}
        self.preamble_bytes = 0  # FE wake-up bytes skipped (not noise, so counted apart)

    @property
    def buffer_limit(self) -> int:
        """The most bytes :attr:`buffered` can ever be."""
        return OVERHEAD + self.max_data_length

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def reset(self) -> bytes:
        """Drop and return whatever partial input is held (stale input before a new request)."""
        stale = bytes(self._buf)
        self._buf.clear()
        return stale

    def feed(self, data: bytes) -> list[Event]:
        buf = self._buf
        buf += data
        events: list[Event] = []
        while buf:
            start = buf.find(START)
            if start < 0:
                self._drop(events, len(buf))
                break
            if start:
                self._drop(events, start)
            # buf[0] is now a start byte.
            n = len(buf)
            if n >= 8 and buf[7] != START:
                events.append(Discarded("noise", bytes(buf[:1])))
                del buf[:1]
                continue
            if n < HEADER_LENGTH:
                break
            length = buf[9]
            if length > self.max_data_length:
                events.append(
                    Discarded("bad_length", bytes(buf[:1]), f"length byte L={length} exceeds {self.max_data_length}")
                )
                del buf[:1]
                continue
            total = OVERHEAD + length
            if n < total:
                later = self._complete_frame_after(1)
                if later < 0:
                    break
                events.append(
                    Discarded("truncated", bytes(buf[:later]), f"truncated after {later} bytes (L={length})")
                )
                del buf[:later]
                continue
            cs = sum(memoryview(buf)[: HEADER_LENGTH + length]) & 0xFF
            if cs != buf[total - 2]:
                events.append(
                    Discarded("bad_checksum", bytes(buf[:1]), f"checksum expected {cs:02X} found {buf[total - 2]:02X}")
                )
                del buf[:1]
                continue
            if buf[total - 1] != END:
                events.append(Discarded("bad_end", bytes(buf[:1]), f"end byte expected 16 found {buf[total - 1]:02X}"))
                del buf[:1]
                continue
            events.append(self._frame(bytes(buf[:total]), length))
            del buf[:total]
        return events

    def _drop(self, events: list[Event], count: int) -> None:
        chunk = bytes(self._buf[:count])
        del self._buf[:count]
        stripped = chunk.lstrip(b"\xfe") if chunk[-1] == PREAMBLE else chunk.rstrip(b"\xfe")
        # FE runs are wake-up preambles, not noise; only report what is left.
        fe = len(chunk) - len(stripped)
        self.preamble_bytes += fe
        if stripped and stripped.count(PREAMBLE) != len(stripped):
            events.append(Discarded("noise", stripped))
        elif stripped:
            self.preamble_bytes += len(stripped)

    def _complete_frame_after(self, offset: int) -> int:
        """Index of the first start byte at or after ``offset`` that begins a complete valid frame."""
        buf = self._buf
        n = len(buf)
        pos = buf.find(START, offset)
        while pos >= 0 and pos + OVERHEAD <= n:
            if buf[pos + 7] == START:
                length = buf[pos + 9]
                end = pos + OVERHEAD + length
                if (
                    length <= self.max_data_length
                    and end <= n
                    and buf[end - 1] == END
                    and sum(memoryview(buf)[pos : end - 2]) & 0xFF == buf[end - 2]
                ):
                    return pos
            pos = buf.find(START, pos + 1)
        return -1

    def _frame(self, raw: bytes, length: int) -> Frame:
        wire = raw[1:7]
        address = self._addresses.get(wire)
        if address is None:
            if len(self._addresses) > 4096:  # a bus rarely has more meters; keep the cache bounded
                self._addresses.clear()
            address = self._addresses[wire] = Address(wire)
        return Frame(address, Control.from_byte(raw[8]), unscramble(raw[HEADER_LENGTH : HEADER_LENGTH + length]))

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

from dataclasses import dataclass
from typing import Final

from meter_gateway.protocols.cjt188.frame import (  # the hot path indexes these tables directly
    _CONTROLS,
    END,
    HEADER_LENGTH,
    MAX_READ_LENGTH,
    OVERHEAD,
    PREAMBLE,
    START,
    Address,
    Frame,
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
    """Feed bytes with :meth:`feed`; it returns the frames and discards completed by them.

    ``max_data_length`` bounds L: the standard's 64H by default (clause 6.2.5); raise it (up to
    255) for meters that send longer vendor replies.
    """

    __slots__ = ("_addresses", "_buf", "max_data_length", "preamble_bytes")

    def __init__(self, max_data_length: int = MAX_READ_LENGTH) -> None:
        if not 0 <= max_data_length <= 255:
            raise ValueError("max_data_length must be within 0..255")
        self.max_data_length = max_data_length
        self._buf = b""  # the unresolved tail of the input: empty between whole frames
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
        stale = self._buf
        self._buf = b""
        return stale

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        held = self._buf
        buf = held + bytes(data) if held else data if type(data) is bytes else bytes(data)
        n = len(buf)
        pos = 0
        events: list[Event] = []
        max_length = self.max_data_length
        while pos < n:
            start = buf.find(START, pos)
            if start < 0:
                self._drop(events, buf[pos:])
                pos = n
                break
            if start > pos:
                if buf.count(PREAMBLE, pos, start) == start - pos:  # only wake-up bytes: the usual case
                    self.preamble_bytes += start - pos
                else:
                    self._drop(events, buf[pos:start])
                pos = start
            if n - pos < HEADER_LENGTH:
                break
            length = buf[pos + 10]
            if length > max_length:
                detail = f"length byte L={length} exceeds {max_length}"
                events.append(Discarded("bad_length", buf[pos : pos + 1], detail))
                pos += 1
                continue
            end = pos + OVERHEAD + length
            if n < end:
                later = self._complete_frame_after(buf, pos + 1)
                if later < 0:
                    break
                detail = f"truncated after {later - pos} bytes (L={length})"
                events.append(Discarded("truncated", buf[pos:later], detail))
                pos = later
                continue
            cs = sum(buf[pos : end - 2]) & 0xFF
            if cs != buf[end - 2]:
                detail = f"checksum expected {cs:02X} found {buf[end - 2]:02X}"
                events.append(Discarded("bad_checksum", buf[pos : pos + 1], detail))
                pos += 1
                continue
            if buf[end - 1] != END:
                detail = f"end byte expected 16 found {buf[end - 1]:02X}"
                events.append(Discarded("bad_end", buf[pos : pos + 1], detail))
                pos += 1
                continue
            wire = buf[pos + 2 : pos + 9]
            address = self._addresses.get(wire)
            if address is None:
                address = self._address(wire)
            events.append(Frame(buf[pos + 1], address, _CONTROLS[buf[pos + 9]], buf[pos + HEADER_LENGTH : end - 2]))
            pos = end
        self._buf = buf[pos:] if pos < n else b""
        return events

    def _drop(self, events: list[Event], chunk: bytes) -> None:
        # FE runs before and after noise are wake-up preambles, counted apart from noise.
        stripped = chunk.strip(b"\xfe")
        self.preamble_bytes += len(chunk) - len(stripped)
        if stripped:
            events.append(Discarded("noise", stripped))

    def _complete_frame_after(self, buf: bytes, offset: int) -> int:
        """Index of the first start byte at or after ``offset`` that begins a complete valid frame."""
        n = len(buf)
        pos = buf.find(START, offset)
        while pos >= 0 and pos + OVERHEAD <= n:
            length = buf[pos + 10]
            end = pos + OVERHEAD + length
            if (
                length <= self.max_data_length
                and end <= n
                and buf[end - 1] == END
                and sum(buf[pos : end - 2]) & 0xFF == buf[end - 2]
            ):
                return pos
            pos = buf.find(START, pos + 1)
        return -1

    def know(self, address: Address) -> None:
        """Seed the address cache with an address the caller already holds (a driver's meter)."""
        if len(self._addresses) <= 4096:
            self._addresses.setdefault(address.wire, address)

    def _address(self, wire: bytes) -> Address:
        if len(self._addresses) > 4096:  # a bus rarely has more meters; keep the cache bounded
            self._addresses.clear()
        address = self._addresses[wire] = Address(wire)
        return address

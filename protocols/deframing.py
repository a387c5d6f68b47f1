"""What the length-framed deframers share: frames that begin with a start byte 68H, possibly after
FEH wake-up bytes, and say their own length (DL/T 645, CJ/T 188, DL/T 698.45).

The scan: bytes before a start byte are wake-up bytes (counted in ``preamble_bytes``) or noise
(reported); at a start byte the protocol's :meth:`LengthFramedDeframer._check` says whether a
whole, valid frame starts there, that none does (a :class:`Discarded` whose ``data`` is what is
given up, usually the start byte alone, so a frame hidden behind it is still found), or that it
cannot tell yet (the candidate waits for more bytes). A frame is never found by scanning for the
end byte 16H: checksums and data may hold it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Final, Generic, TypeVar

__all__ = ["END", "PREAMBLE", "START", "AddressCache", "Discarded", "LengthFramedDeframer", "SumCheckedDeframer"]

START: Final = 0x68
PREAMBLE: Final = 0xFE  # a wake-up byte
END: Final = 0x16

F = TypeVar("F")
A = TypeVar("A")


@dataclass(frozen=True, slots=True)
class Discarded:
    """Bytes the deframer threw away, and why (for counters and field engineers' hex dumps).

    ``reason`` is one of the protocol deframer's ``REASONS``.
    """

    reason: str
    data: bytes
    detail: str = ""


class LengthFramedDeframer(Generic[F]):
    """Feed bytes with :meth:`feed`; it returns the frames and discards completed by them.

    The buffer holds only the unresolved tail of the input: nothing between whole frames.
    """

    __slots__ = ("_buf", "preamble_bytes")

    def __init__(self) -> None:
        self._buf = b""
        self.preamble_bytes = 0  # FE wake-up bytes skipped (not noise, so counted apart)

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def reset(self) -> bytes:
        """Drop and return whatever partial input is held (stale input before a new request)."""
        stale = self._buf
        self._buf = b""
        return stale

    def feed(self, data: bytes | bytearray | memoryview) -> list[F | Discarded]:
        held = self._buf
        buf = held + bytes(data) if held else data if type(data) is bytes else bytes(data)
        n = len(buf)
        pos = 0
        events: list[F | Discarded] = []
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
            verdict = self._check(buf, pos, n)
            if verdict is None:  # incomplete but plausible: wait for its bytes
                break
            if isinstance(verdict, Discarded):
                events.append(verdict)
                pos += len(verdict.data)
                continue
            events.append(self._frame(buf, pos, verdict))
            pos += verdict
        self._buf = buf[pos:] if pos < n else b""
        return events

    def _check(self, buf: bytes, pos: int, n: int) -> int | Discarded | None:
        """The size of the valid frame starting at ``buf[pos]`` (``n`` bytes are in), a
        Discarded if none starts there, None if that cannot be told until more bytes come."""
        raise NotImplementedError

    def _frame(self, buf: bytes, pos: int, size: int) -> F:
        """The frame of ``size`` bytes at ``pos`` that :meth:`_check` found valid."""
        raise NotImplementedError

    def _drop(self, events: list[F | Discarded], chunk: bytes) -> None:
        # FE runs before and after noise are wake-up preambles, counted apart from noise.
        stripped = chunk.strip(b"\xfe")
        self.preamble_bytes += len(chunk) - len(stripped)
        if stripped:
            events.append(Discarded("noise", stripped))


class AddressCache(Generic[A]):
    """A bus's meter addresses by their wire bytes: decoded once per meter, then shared by every
    frame from it (and by the driver that :meth:`know` s it) instead of a copy per frame."""

    __slots__ = ("_by_wire", "_make")

    LIMIT: Final = 4096  # a bus rarely has more meters; past it the cache starts again

    def __init__(self, make: Callable[[bytes], A]) -> None:
        self._by_wire: dict[bytes, A] = {}
        self._make = make

    def get(self, wire: bytes) -> A:
        address = self._by_wire.get(wire)
        if address is None:
            if len(self._by_wire) > self.LIMIT:
                self._by_wire.clear()
            address = self._by_wire[wire] = self._make(wire)
        return address

    def know(self, wire: bytes, address: A) -> None:
        """Seed the cache with an address the caller already holds."""
        if len(self._by_wire) <= self.LIMIT:
            self._by_wire.setdefault(wire, address)


class SumCheckedDeframer(LengthFramedDeframer[F]):
    """Frames ``68 .. L data CS 16`` whose one length byte L sits at ``LENGTH_AT``, the data after
    ``HEADER`` bytes, checked by a byte sum (DL/T 645, CJ/T 188). A subclass sets the three
    offsets, says in :meth:`_not_a_start` what else rules a start byte out, and builds frames."""

    __slots__ = ("max_data_length",)

    LENGTH_AT: ClassVar[int]
    HEADER: ClassVar[int]  # bytes before the data: 68 through L
    OVERHEAD: ClassVar[int]  # HEADER + CS + 16

    def __init__(self, max_data_length: int) -> None:
        if not 0 <= max_data_length <= 255:
            raise ValueError("max_data_length must be within 0..255")
        super().__init__()
        self.max_data_length = max_data_length

    @property
    def buffer_limit(self) -> int:
        """The most bytes :attr:`buffered` can ever be."""
        return self.OVERHEAD + self.max_data_length

    def _not_a_start(self, buf: bytes, pos: int, n: int) -> bool:
        """Whether the bytes in already show that no frame starts at ``pos``."""
        return False

    def _check(self, buf: bytes, pos: int, n: int) -> int | Discarded | None:
        if self._not_a_start(buf, pos, n):
            return Discarded("noise", buf[pos : pos + 1])
        if n - pos < self.HEADER:
            return None
        length = buf[pos + self.LENGTH_AT]
        if length > self.max_data_length:
            return Discarded("bad_length", buf[pos : pos + 1], f"length byte L={length} exceeds {self.max_data_length}")
        end = pos + self.OVERHEAD + length
        if n < end:
            later = self._complete_frame_after(buf, pos + 1)
            if later < 0:
                return None
            return Discarded("truncated", buf[pos:later], f"truncated after {later - pos} bytes (L={length})")
        cs = sum(buf[pos : end - 2]) & 0xFF
        if cs != buf[end - 2]:
            return Discarded("bad_checksum", buf[pos : pos + 1], f"checksum expected {cs:02X} found {buf[end - 2]:02X}")
        if buf[end - 1] != END:
            return Discarded("bad_end", buf[pos : pos + 1], f"end byte expected 16 found {buf[end - 1]:02X}")
        return self.OVERHEAD + length

    def _complete_frame_after(self, buf: bytes, offset: int) -> int:
        """Index of the first start byte at or after ``offset`` that begins a complete valid frame."""
        n = len(buf)
        pos = buf.find(START, offset)
        while pos >= 0 and pos + self.OVERHEAD <= n:
            if not self._not_a_start(buf, pos, n):
                length = buf[pos + self.LENGTH_AT]
                end = pos + self.OVERHEAD + length
                if (
                    length <= self.max_data_length
                    and end <= n
                    and buf[end - 1] == END
                    and sum(buf[pos : end - 2]) & 0xFF == buf[end - 2]
                ):
                    return pos
            pos = buf.find(START, pos + 1)
        return -1

"""Streaming DL/T 698.45 deframer and link-layer APDU fragment reassembly (DL/T 698.45-2017 clause 5).

Frames are delimited by their length field, never by scanning for 0x16 (CRC and data bytes can be
0x16 and 0x68). At a start byte 0x68 the deframer reads L and AF, checks the HCS as soon as the
header is in (so a corrupt header cannot make it wait for a bogus length), then waits for the
whole frame and checks FCS and the end byte. A candidate that fails gives up only its first byte
and the search resumes right after it, so a real frame hidden behind noise is still found.

A truncated frame is not guessed at from later bytes: a complete frame behind an incomplete
candidate may be *inside* it (PROXY and transparent forwarding carry whole frames in
octet-strings, vector P76), so the candidate waits. More bytes complete it and its FCS decides
(a truncated one fails and gives up one byte, so the frame behind it is found); if the line goes
quiet instead, the caller's silence timer calls :meth:`Deframer.expire`.

:class:`Reassembler` joins link fragments (fragment flag set in C) into the APDU and tells the
caller which acknowledgements to send, as data: sending them is the driver's job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from meter_gateway.protocols.deframing import Discarded, LengthFramedDeframer
from meter_gateway.protocols.dlt698.crc import crc16
from meter_gateway.protocols.dlt698.errors import LocalProtocolError, RemoteProtocolError
from meter_gateway.protocols.dlt698.frame import (
    END,
    MAX_LENGTH,
    MIN_FRAME,
    Control,
    FragmentHeader,
    FragmentType,
    Frame,
    ServerAddress,
    _build,
    frame_length,
)

__all__ = [
    "REASONS",
    "Deframer",
    "Discarded",
    "Event",
    "Reassembler",
    "Reassembly",
    "ack_frame",
    "fragment_apdu",
]

REASONS: Final = ("noise", "bad_hcs", "bad_fcs", "bad_end", "bad_length", "truncated")
# address flags (AF) with a cache of their own; a bus's meters normally share one, and past this
# the caches start again
_MAX_FLAGS: Final = 4
_MAX_ADDRESSES: Final = 4096  # of one AF: a bus rarely has more meters; past it the cache starts again

Event = Frame | Discarded


class Deframer(LengthFramedDeframer[Frame]):
    """Feed bytes with :meth:`feed`; it returns the frames and discards completed by them. An
    incomplete candidate waits for its bytes, or for :meth:`expire`."""

    __slots__ = ("_addresses", "max_frame_length")

    def __init__(self, max_frame_length: int = 2048) -> None:
        # 2048 covers the usual negotiated frame sizes; the field itself allows 16385.
        if not MIN_FRAME <= max_frame_length <= MAX_LENGTH + 2:
            raise LocalProtocolError(f"max_frame_length must be within {MIN_FRAME}..{MAX_LENGTH + 2}")
        super().__init__()
        self.max_frame_length = max_frame_length
        # server addresses by AF, then by their wire bytes: decoded once per meter and shared by
        # every frame from it (and by the driver that :meth:`know` s it). The key of a meter's
        # address is the address's own ``wire``: a known meter costs the cache one dict entry
        self._addresses: dict[int, dict[bytes, ServerAddress]] = {}

    def _frame(self, buf: bytes, pos: int, size: int) -> Frame:
        af = buf[pos + 4]
        wire = buf[pos + 5 : pos + 6 + (af & 0x0F)]
        known = self._addresses.get(af)
        address = known.get(wire) if known is not None else None
        return _build(buf, pos, size, address or self._learn(af, wire))

    def _learn(self, af: int, wire: bytes) -> ServerAddress:
        address = ServerAddress.from_wire(af, wire)  # every AF decodes: SA length 1..16, any type
        known = self._known(af)
        if len(known) > _MAX_ADDRESSES:
            known.clear()
        known[wire] = address
        return address

    def _known(self, af: int) -> dict[bytes, ServerAddress]:
        known = self._addresses.get(af)
        if known is None:
            if len(self._addresses) >= _MAX_FLAGS:
                self._addresses.clear()
            known = self._addresses[af] = {}
        return known

    def _check(self, buf: bytes, pos: int, n: int) -> int | Discarded | None:
        if n - pos < 5:
            return None
        total = frame_length(buf, pos)
        sa_len = (buf[pos + 4] & 0x0F) + 1
        hcs_at = pos + 6 + sa_len
        if total > self.max_frame_length or total < 12 + sa_len - 1:
            return Discarded("bad_length", buf[pos : pos + 1], f"frame length {total} out of range")
        if n < hcs_at + 2:
            return None
        hcs = crc16(buf[pos + 1 : hcs_at])
        if hcs != buf[hcs_at] | (buf[hcs_at + 1] << 8):
            return Discarded("bad_hcs", buf[pos : pos + 1], f"HCS expected {hcs:04X}")
        end = pos + total
        if n < end:
            return None
        fcs = crc16(buf[pos + 1 : end - 3])
        if fcs != buf[end - 3] | (buf[end - 2] << 8):
            return Discarded("bad_fcs", buf[pos : pos + 1], f"FCS expected {fcs:04X}")
        if buf[end - 1] != END:
            return Discarded("bad_end", buf[pos : pos + 1], f"end byte expected 16 found {buf[end - 1]:02X}")
        return total

    def expire(self) -> list[Event]:
        """The line went quiet (the caller's inter-frame timer): no more bytes will complete the
        held candidate. It is reported as truncated and the bytes after its start are rescanned,
        so a frame that arrived behind a truncated one is not lost."""
        events: list[Event] = []
        while self._buf:
            stalled = self._buf
            self._buf = b""
            skipped = 1
            events.append(Discarded("truncated", stalled[:1], f"line quiet with {len(stalled)} bytes held"))
            more = self.feed(stalled[skipped:])
            events += more
        return events

    def know(self, address: ServerAddress) -> None:
        """Seed the address cache with an address the caller already holds (a driver's meter), so
        frames from that meter share it instead of decoding and keeping a copy per bus."""
        known = self._known(address.af)
        if len(known) <= _MAX_ADDRESSES:
            known.setdefault(address.wire, address)


@dataclass(frozen=True, slots=True)
class Reassembly:
    """What one fragment frame gave: the whole APDU once the last fragment is in, and the
    acknowledgement the receiver must send (as a fragment header; see :func:`ack_frame`)."""

    apdu: bytes | None = None
    ack: FragmentHeader | None = None
    duplicate: bool = False


class Reassembler:
    """Joins the fragments of one APDU from one peer (clause 5, link-layer APDU fragmentation).

    Fragments arrive in sequence: start (sequence 0... any start resets), middles, last. Each
    start or middle fragment is acknowledged with an ACK carrying its sequence number; the last
    fragment completes the APDU. A repeat of the previous fragment (our ACK was lost) is
    acknowledged again but not appended. Anything else out of order is the peer's error.
    """

    __slots__ = ("_data", "_last", "limit")

    def __init__(self, limit: int = 65536) -> None:
        self.limit = limit
        self._data = bytearray()
        self._last: FragmentHeader | None = None

    @property
    def active(self) -> bool:
        return self._last is not None

    def reset(self) -> None:
        self._data.clear()
        self._last = None

    def feed(self, frame: Frame) -> Reassembly:
        header = frame.fragment
        if header is None:
            raise LocalProtocolError("not a fragment frame (control fragment flag clear)")
        if header.type is FragmentType.ACK:
            raise LocalProtocolError("an ACK fragment acknowledges our own sending; it carries no APDU part")
        chunk = frame.apdu
        last = self._last
        if last is not None and header.seq == last.seq and header.type == last.type:
            return Reassembly(ack=None if header.type is FragmentType.LAST else _ack(header), duplicate=True)
        if header.type is FragmentType.START:
            self._data.clear()
        elif last is None or header.seq != (last.seq + 1) & 0xFFF:
            expected = "a start fragment" if last is None else f"sequence {(last.seq + 1) & 0xFFF}"
            self.reset()
            raise RemoteProtocolError(f"fragment {header.seq} ({header.type.name}) out of order, expected {expected}")
        if len(self._data) + len(chunk) > self.limit:
            self.reset()
            raise RemoteProtocolError(f"reassembled APDU exceeds {self.limit} bytes")
        self._data += chunk
        if header.type is FragmentType.LAST:
            apdu = bytes(self._data)
            self.reset()
            self._last = None
            return Reassembly(apdu=apdu)
        self._last = header
        return Reassembly(ack=_ack(header))


def _ack(header: FragmentHeader) -> FragmentHeader:
    return FragmentHeader(header.seq, FragmentType.ACK)


def ack_frame(received: Frame, ack: FragmentHeader) -> Frame:
    """The acknowledgement frame answering fragment frame ``received`` (same addresses, DIR flipped)."""
    c = received.control
    control = Control(c.function, not c.from_server, c.prm, fragment=True, scrambled=c.scrambled)
    return Frame(control, received.address, received.client, ack.wire)


def fragment_apdu(apdu: bytes, size: int) -> list[tuple[FragmentHeader, bytes]]:
    """Split ``apdu`` into fragments of at most ``size`` bytes: sequence 0 start, middles, last.

    Send each as a Frame with the fragment flag and ``header.wire + chunk`` as data, waiting for
    the peer's ACK between fragments.
    """
    if size <= 0:
        raise LocalProtocolError("fragment size must be positive")
    if len(apdu) <= size:
        raise LocalProtocolError("an APDU that fits one frame is not fragmented")
    chunks = [apdu[i : i + size] for i in range(0, len(apdu), size)]
    out: list[tuple[FragmentHeader, bytes]] = []
    for seq, chunk in enumerate(chunks):
        kind = FragmentType.START if seq == 0 else FragmentType.LAST if seq == len(chunks) - 1 else FragmentType.MIDDLE
        out.append((FragmentHeader(seq & 0xFFF, kind), chunk))
    return out

"""Recognising the one Modbus reply a request expects, among everything a bus carries.

Sans-I/O (see :mod:`protocols.exchange`): a :class:`ModbusExchange` is made per request and given
the bytes that arrive after it; it cuts them into frames with its bus's :class:`Framing` and
accepts only a frame that answers *this* request (Modbus Application Protocol Specification
V1.1b3):

* Modbus TCP: the request's transaction id (MBAP); a reply carrying the id of a request recently
  made on the bus is ``late``, any other id a stranger (``wrong_function``). With the right id, a
  reply from another unit is ``wrong_address`` and one of another function is the answer, and
  unusable.
* RTU (no transaction id): the request's unit and function; a reply from a unit and function
  recently asked on the bus is ``late``, else ``wrong_address`` / ``wrong_function``. An RS-485
  adapter that hears itself returns a read request before its reply: that is an ``echo``. (A
  write's reply is its echo, so nothing can be told apart there.)

The accepted reply PDU goes to the request's ``value_of`` (:func:`registers_of`, :func:`bits_of`,
:func:`echo_of`): a reply of the wrong size or echo, or one that contradicts itself, is
:class:`~protocols.exchange.Unusable`. An exception reply (§7) is reported to the bus's
``on_exception`` (counted by code) and is Unusable when it is worth asking again (0x05 acknowledge,
0x06 busy; 0x0A/0x0B a Modbus gateway that cannot reach the meter), else a
:class:`~protocols.exchange.Refusal` (or Unusable too for a ``strict`` probe).

Cutting frames out of the byte stream is the :class:`Framing`'s business: an RTU frame carries no
length, and its size depends on the function's reply layout; the driver supplies it (pymodbus'
framers, which only ``drivers/modbus.py`` may import).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, Final, Generic, Protocol, TypeVar

from meter_gateway.protocols.exchange import (
    HISTORY_LENGTH,
    Answer,
    Event,
    Refusal,
    Rejected,
    Rejection,
    RequestHistory,
    Unusable,
    Verdict,
)

__all__ = [
    "EXCEPTION_NAMES",
    "PDU",
    "READ_FUNCTIONS",
    "READ_VALUES",
    "RETRIED_EXCEPTIONS",
    "UNREACHABLE_EXCEPTIONS",
    "WRITE_COIL",
    "WRITE_REGISTER",
    "Framing",
    "ModbusExchange",
    "ModbusLine",
    "Undecodable",
    "WrongReply",
    "bits_of",
    "echo_of",
    "exception_text",
    "register_bytes_of",
    "registers_of",
    "reply_size",
]

R = TypeVar("R")

# Modbus Application Protocol Specification V1.1b3, §7 "MODBUS Exception Responses".
EXCEPTION_NAMES: Final[dict[int, str]] = {
    0x01: "illegal function",
    0x02: "illegal data address",
    0x03: "illegal data value",
    0x04: "server device failure",
    0x05: "acknowledge",
    0x06: "server device busy",
    0x08: "memory parity error",
    0x0A: "gateway path unavailable",
    0x0B: "gateway target device failed to respond",
}
# The meter is working on something else: ask again after the bus's backoff.
RETRIED_EXCEPTIONS: Final = frozenset({0x05, 0x06})
# A Modbus gateway says the meter behind it cannot be reached: silence, as far as health goes.
UNREACHABLE_EXCEPTIONS: Final = frozenset({0x0A, 0x0B})

READ_FUNCTIONS: Final = frozenset({1, 2, 3, 4})
WRITE_COIL: Final = 5
WRITE_REGISTER: Final = 6
# Every request the gateway makes is a function code and two 16-bit words: the address, then the
# count (reads) or the value (writes) (§6.1-6.6).
PDU: Final = struct.Struct(">BHH")


def exception_text(code: int) -> str:
    return f"{EXCEPTION_NAMES.get(code, 'exception')} ({code:#04x})"


def reply_size(function: int, arg: int) -> int:
    """Bytes of the RTU reply to a request (unit, function, payload, CRC)."""
    if function in (1, 2):
        return 5 + (arg + 7) // 8
    if function in (3, 4):
        return 5 + 2 * arg
    return 8  # a write is echoed


class Framing(Protocol):
    """How one bus's replies are cut out of its byte stream (Modbus TCP's MBAP, or RTU)."""

    @property
    def tcp(self) -> bool:
        """Modbus TCP (replies carry transaction ids), else RTU."""
        ...

    def split(self, data: bytes) -> tuple[int, int, int, int, bytes]:
        """The first frame in ``data``: ``(start, end, unit, transaction id, pdu)``. ``end`` 0:
        no whole frame yet; ``pdu`` empty: ``data[:end]`` is no frame (garbage); else the frame
        lies at ``data[start:end]`` and what precedes it is garbage."""
        ...


class ModbusLine(RequestHistory[int]):
    """What the Modbus exchanges of one bus share: its framing, the requests recently made on it
    (each as a reply to it would show it: its transaction id on TCP, ``unit << 8 | function`` on
    RTU), its last transaction id, and who counts its exception replies."""

    __slots__ = ("framing", "name", "on_exception", "tcp", "tid")

    def __init__(
        self,
        name: str,
        framing: Framing,
        *,
        on_exception: Callable[[int], None] | None = None,
        history: int = HISTORY_LENGTH,
    ) -> None:
        super().__init__(history)
        self.name = name  # the bus's, for texts
        self.framing = framing
        self.tcp = framing.tcp
        self.on_exception = on_exception
        self.tid = 0  # MBAP transaction id of the last request (RTU has none)

    def next_tid(self) -> int:
        """The transaction id of the next request: 1..65535, then 1 again (TCP; RTU: 0)."""
        if not self.tcp:
            return 0
        self.tid = self.tid % 0xFFFF + 1
        return self.tid

    def asked_earlier(self, key: int, current: int) -> bool:
        """Whether ``key`` (a reply's transaction id, or unit and function) is that of a request
        recently made other than ``current``."""
        return key != current and self.answered_earlier(current, key.__eq__)


class WrongReply(Exception):
    """The reply answers the request but does not fit it (size, echoed address or value)."""


class Undecodable(Exception):
    """The reply PDU contradicts itself (its byte count is not its size)."""


def register_bytes_of(exchange: ModbusExchange[Any], pdu: bytes) -> bytes:
    """§6.3/6.4 reply: function, byte count, the registers big-endian; the registers' bytes as
    they came (a meter's read decodes each value where it lies, ``ValueCodec.decode_at``)."""
    size = len(pdu) - 2
    if size < 0 or pdu[1] != size or size % 2:
        raise Undecodable
    count = exchange.count
    if size != 2 * count:
        raise WrongReply(f"asked for {count} registers at {exchange.address}, got {size // 2}")
    return pdu[2:]


def registers_of(exchange: ModbusExchange[list[int]], pdu: bytes) -> list[int]:
    """§6.3/6.4 reply as a list of register values."""
    raw = register_bytes_of(exchange, pdu)
    return list(struct.unpack(f">{len(raw) // 2}H", raw))


def bits_of(exchange: ModbusExchange[list[bool]], pdu: bytes) -> list[bool]:
    """§6.1/6.2 reply: function, byte count, the bits packed low bit first."""
    size = len(pdu) - 2
    if size < 0 or pdu[1] != size:
        raise Undecodable
    count = exchange.count
    if size != (count + 7) // 8:
        raise WrongReply(f"asked for {count} bits at {exchange.address}, got {8 * size}")
    return [bool(pdu[2 + i // 8] >> (i % 8) & 1) for i in range(count)]


def echo_of(exchange: ModbusExchange[None], pdu: bytes) -> None:
    """§6.5/6.6 reply: the request echoed (a coil's value compared as on or off)."""
    if len(pdu) != 5:
        raise Undecodable
    _, address, value = PDU.unpack(pdu)
    asked = exchange.count  # the value written
    coil = pdu[0] == WRITE_COIL
    if address != exchange.address or (bool(value) != bool(asked) if coil else value != asked):
        what = f"coil {exchange.address}={bool(asked)}" if coil else f"register {exchange.address}={asked}"
        raise WrongReply(f"write {what} echoed {address}={bool(value) if coil else value}")


# what a read's reply holds, by function: bits, or the registers' bytes
READ_VALUES: Final[dict[int, Callable[[ModbusExchange[Any], bytes], bytes | list[bool]]]] = {
    1: bits_of,
    2: bits_of,
    3: register_bytes_of,
    4: register_bytes_of,
}


class ModbusExchange(Generic[R]):
    """The :class:`~protocols.exchange.ReplyExchange` of one Modbus request (see the module
    docstring for what is accepted): ``request`` is the framed request as sent, ``pdu`` its PDU,
    ``unit`` and ``tid`` (TCP; 0 on RTU) where it went. ``value_of`` turns the accepted reply PDU
    into the caller's value; a :class:`WrongReply` from it makes the reply unusable.
    ``exception`` is the exception code of the current attempt's reply, if it was one.

    One of these is made per request, so it holds only the request's bytes and what it was made
    with; its text for logs (:attr:`what`) is built only when something goes wrong."""

    __slots__ = ("buffer", "echo", "exception", "line", "pdu", "strict", "tid", "unit", "value_of")

    def __init__(
        self,
        line: ModbusLine,
        request: bytes,
        pdu: bytes,
        *,
        unit: int,
        tid: int,
        value_of: Callable[[ModbusExchange[R], bytes], R],
        strict: bool = False,
    ) -> None:
        self.line = line
        self.pdu = pdu
        self.unit = unit
        self.tid = tid
        self.value_of = value_of
        self.strict = strict
        function = pdu[0]
        # an RS-485 adapter that hears itself returns a read request before its reply; a write's
        # reply is its echo, so nothing can be told apart there
        self.echo = b"" if line.tcp or function not in READ_FUNCTIONS else request
        self.buffer = b""
        self.exception: int | None = None
        line.note(self._key)  # what a late reply to this request will look like

    @property
    def _key(self) -> int:
        return self.tid if self.line.tcp else (self.unit << 8 | self.pdu[0])

    @property
    def address(self) -> int:
        return self.pdu[1] << 8 | self.pdu[2]

    @property
    def count(self) -> int:
        """Registers or bits asked for; for a write, the value written."""
        return self.pdu[3] << 8 | self.pdu[4]

    @property
    def what(self) -> str:
        """The request, for error texts and logs."""
        function, address, count = PDU.unpack(self.pdu)
        if function in READ_FUNCTIONS:
            kind = "bits" if function in (1, 2) else "registers"
            asked = f"function {function} {kind} {address}..{address + count - 1}"
        else:
            asked = f"function {function} {'coil' if function == WRITE_COIL else 'register'} {address}"
        return f"{self.line.name} unit {self.unit}: {asked}"

    def begin(self) -> None:
        self.buffer = b""
        self.exception = None

    def receive(self, data: bytes) -> list[Event[R]]:
        events: list[Event[R]] = []
        buffer = self.buffer + data if self.buffer else data
        echo = self.echo
        if echo:
            if len(buffer) < len(echo) and echo.startswith(buffer):
                self.buffer = buffer
                return events  # maybe our request coming back: wait for the rest
            if buffer.startswith(echo):
                events.append(Rejected(Rejection.ECHO, len(echo)))
                buffer = buffer[len(echo) :]
        split = self.line.framing.split
        while buffer:
            start, end, unit, tid, frame = split(buffer)
            if not end:
                break
            if not frame:
                events.append(Rejected(Rejection.GARBAGE, end, "no valid frame"))
                buffer = buffer[end:]
                continue
            if start:
                events.append(Rejected(Rejection.GARBAGE, start, "before a frame"))
            buffer = buffer[end:]
            event = self._consider(unit, tid, frame, end)
            events.append(event)
            if not isinstance(event, Rejected):
                self.buffer = b""
                return events  # the verdict: whatever follows is stale input for the next attempt
        # while no whole frame is there, keep only the newest bytes: line noise that never forms a
        # frame would otherwise be rescanned (RTU framing tries every offset) on every chunk
        excess = len(buffer) - (2 * reply_size(self.pdu[0], self.count) + 8 + len(echo)) if buffer else 0
        if excess > 0:
            events.append(Rejected(Rejection.GARBAGE, excess, "no frame in the input"))
            buffer = buffer[excess:]
        self.buffer = buffer
        return events

    def _consider(self, unit: int, tid: int, frame: bytes, size: int) -> Event[R]:
        function = frame[0] & 0x7F
        asked = self.pdu[0]
        line = self.line
        tcp = line.tcp
        if tcp and tid != self.tid:
            if line.asked_earlier(tid, self.tid):
                return Rejected(Rejection.LATE, size, f"reply to transaction {tid}")
            return Rejected(Rejection.WRONG_FUNCTION, size, f"transaction id {tid}, asked {self.tid}")
        if unit != self.unit or function != asked:
            if not tcp and line.asked_earlier(unit << 8 | function, self._key):
                return Rejected(Rejection.LATE, size, f"unit {unit} function {function}")
            if unit != self.unit:
                return Rejected(Rejection.WRONG_ADDRESS, size, f"reply from unit {unit}, asked {self.unit}")
            if not tcp:
                return Rejected(Rejection.WRONG_FUNCTION, size, f"reply of function {function} to {asked}")
            # the request's own transaction id: it is the answer, and a wrong one
            return Unusable(f"{self.what}: reply of function {function} to function {asked}")
        if frame[0] & 0x80:
            return self._exception(frame)
        try:
            return Answer(self.value_of(self, frame))
        except Undecodable:
            return Unusable(f"{self.what}: undecodable reply {frame.hex()}")
        except WrongReply as e:
            return Unusable(f"{self.what}: {e}")

    def _exception(self, frame: bytes) -> Verdict[R]:
        """§7: function | 0x80, then the exception code."""
        if len(frame) < 2:
            return Unusable(f"{self.what}: undecodable reply {frame.hex()}")
        code = frame[1]
        self.exception = code
        if self.line.on_exception is not None:
            self.line.on_exception(code)
        text = f"{self.what}: {exception_text(code)}"
        if code in RETRIED_EXCEPTIONS or code in UNREACHABLE_EXCEPTIONS:
            return Unusable(text)
        if self.strict:
            return Unusable(f"{text} (it refuses every read)")
        return Refusal(text, code, (EXCEPTION_NAMES.get(code, f"exception {code:#04x}"),))

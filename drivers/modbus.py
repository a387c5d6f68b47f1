"""Modbus meters: the bus's Modbus access and framing, the read planner and the meter driver.

This is the only module that imports pymodbus, and it uses pymodbus' public framers only:
``FramerSocket`` (MBAP) or ``FramerRTU`` (CRC, and the frame sizing an RTU reply needs) put the
requests in frames and cut the replies out of the byte stream (:class:`PymodbusFraming`). Which
frame answers a request, and what it holds, is the sans-I/O
:class:`~protocols.modbus.exchange.ModbusExchange`'s business: the PDUs of the six functions the
gateway uses (§6.1-6.6 and the exception reply, §7) are fixed layouts, made and read there with
no object per request: a read plan's request PDUs are made once and shared by every meter of the
model, and a reply's registers are unpacked straight from its bytes.

A Modbus bus is a byte-stream bus like the others: the bytes travel over the gateway's own links
(:func:`drivers.transport.make_transport`) and every request is one ``Bus.exchange`` with a
:class:`ModbusExchange`, so the bus's turn lock (commands first), its transaction engine
(deadline, retries with backoff, input flush) and its meters' health apply to Modbus exactly as to
DL/T 645. No pymodbus type leaves this module: trouble becomes a ``drivers.errors`` type.

* :class:`ModbusLink` is Modbus on one bus (:func:`attach` makes it, :func:`link_for` finds it):
  the framing (Modbus TCP with MBAP, or RTU frames over TCP or a serial port), its
  :class:`~protocols.modbus.exchange.ModbusLine` (transaction ids, the requests recently made, to
  tell late replies from strangers) and the exception replies counted by code (exported with the
  bus's counters). Several :class:`ModbusMeter` objects (unit ids) share one.
* :func:`plan_reads` merges the registers wanted into as few transactions as the device allows.
* :class:`ModbusMeter` reads quantities into :class:`~drivers.reading.Reading` objects and
  operates the relay.

Exception replies (Modbus Application Protocol Specification V1.1b3, §7), counted by code:

============================================  =====================================================
0x05 acknowledge, 0x06 server device busy     asked again with the bus's backoff; BadReply after
                                              the bus's attempts (the meter is not answering data)
0x0A gateway path unavailable,                asked again likewise; then NoAnswer (the meter is
0x0B gateway target failed to respond         not reachable; its health counts the failure)
other codes (0x01-0x04, 0x08, ...)            MeterRefused(code, reasons=(name,)) at once
============================================  =====================================================

A refused coalesced read is split, down to single points, and what the device refuses is
remembered per meter (:class:`ModbusMeter`). A reply of the wrong function, size or echo is
unusable (tried again, then BadReply); no reply is NoAnswer; a lost link LinkDown.

RTU framing has no transaction id: input is flushed before every request, replies from another
unit, or for a request recently made to another unit or function, are rejected as late or
strangers, and replies are checked for function, size and echo. Modbus TCP replies must also
carry the request's transaction id; one with the id of an earlier request is a late reply.
"""

from __future__ import annotations

import logging
import math
import struct
import weakref
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final, TypeVar

from pymodbus.framer import FramerBase, FramerRTU, FramerSocket
from pymodbus.pdu import DecodePDU, ModbusPDU

from meter_gateway.drivers.backoff import BackoffPolicy
from meter_gateway.drivers.bus import Bus, BusSettings, Priority
from meter_gateway.drivers.context import DriverContext
from meter_gateway.drivers.errors import BadReply, ConfigurationError, LinkDown, MeterRefused, NoAnswer, PartialRead
from meter_gateway.drivers.health import HealthBook
from meter_gateway.drivers.log_limit import log_limited, logfmt_value
from meter_gateway.drivers.meter_models import ModbusModel, ModbusPoint, RelaySpec, load_model
from meter_gateway.drivers.reading import Quality, Reading
from meter_gateway.drivers.serial_link import SerialLink
from meter_gateway.drivers.transport import LinkStats, SerialSettings, TcpSettings, Transport, make_transport
from meter_gateway.protocols.modbus.exchange import (
    EXCEPTION_NAMES,
    PDU,
    READ_VALUES,
    RETRIED_EXCEPTIONS,
    UNREACHABLE_EXCEPTIONS,
    WRITE_COIL,
    WRITE_REGISTER,
    ModbusExchange,
    ModbusLine,
    bits_of,
    echo_of,
    exception_text,
    registers_of,
)
from meter_gateway.protocols.modbus.values import RemoteValueError

__all__ = [
    "COUNTER_PREFIX",
    "EXCEPTION_NAMES",
    "RETRIED_EXCEPTIONS",
    "UNREACHABLE_EXCEPTIONS",
    "ModbusExchange",
    "ModbusLink",
    "ModbusMeter",
    "PymodbusFraming",
    "ReadRequest",
    "attach",
    "decode_block",
    "from_config",
    "link_for",
    "plan_reads",
]

log = logging.getLogger(__name__)

R = TypeVar("R")

# Bus.protocol_counters key of an exception code's count
COUNTER_PREFIX: Final = "modbus_exception_"

# §6.1-6.4: per-request limits of the read functions
_MAX_COUNT: Final = {1: 2000, 2: 2000, 3: 125, 4: 125}
# What a device refused is tried merged again after this long (wall seconds): firmware updates
# and replaced meters happen, and a refusal that was a passing fault should not cost data forever.
RELEARN_AFTER: Final = 3600.0

# pymodbus' framers and decoder log every undecodable frame; we convert and count them ourselves
# and the bus logs one line per failed transaction, so its logger only speaks when it is dire.
logging.getLogger("pymodbus.logging").setLevel(logging.CRITICAL)


def _unit_ok(unit: int) -> None:
    if isinstance(unit, bool) or not isinstance(unit, int) or not 1 <= unit <= 255:
        raise ConfigurationError(f"Modbus unit id must be 1..255, got {unit!r}")


# ---------------------------------------------------------------------------------------------
# Modbus on one bus


_links: weakref.WeakKeyDictionary[Bus, ModbusLink] = weakref.WeakKeyDictionary()


def attach(bus: Bus, framing: str) -> ModbusLink:
    """Make ``bus`` a Modbus bus framed ``framing`` ("tcp" or "rtu"); its meters find the link
    with :func:`link_for`. Its exception counters start at 0 for every known code."""
    link = ModbusLink(bus, framing=framing)
    _links[bus] = link
    return link


def link_for(bus: Bus) -> ModbusLink:
    link = _links.get(bus)
    if link is None:
        raise ConfigurationError(f"bus {bus.name} is not a Modbus bus")
    return link


class ModbusLink:
    """Modbus on one bus: framing, its exchanges' shared line (transaction ids, recent requests),
    exception counts, and the register and coil transactions, each one ``bus.exchange`` with a
    :class:`~protocols.modbus.exchange.ModbusExchange` (see the module docstring).

    ``meter`` keys the health book; ``priority`` and ``force`` are the bus's (a command goes
    first and is tried on an offline meter); ``attempts`` overrides the bus's.
    """

    def __init__(self, bus: Bus, *, framing: str) -> None:
        if framing not in ("tcp", "rtu"):
            raise ConfigurationError(f"bus {bus.name}: Modbus framing must be 'tcp' or 'rtu', got {framing!r}")
        if bus.transport is None:
            raise ConfigurationError(f"bus {bus.name}: a Modbus bus needs a link")
        self.bus = bus
        self.framing = framing
        self.tcp = framing == "tcp"
        self.frames = PymodbusFraming(self.tcp)
        self.line = ModbusLine(bus.name, self.frames, on_exception=self.count_exception)
        self._own_bus = False  # made by build(): opened on first use, closed by close()
        self._closed = False
        counters = bus.protocol_counters
        for code in EXCEPTION_NAMES:
            counters.setdefault(f"{COUNTER_PREFIX}{code:#04x}", 0)

    @classmethod
    def build(
        cls,
        settings: TcpSettings | SerialSettings,
        *,
        framing: str | None = None,
        timeout: float = 1.0,
        attempts: int = 1,
        retry: BackoffPolicy | None = None,
        link_wait: float = 1.0,
        health: HealthBook | None = None,
        name: str | None = None,
    ) -> ModbusLink:
        """A bus of its own on ``settings`` (tools, tests); opened on first use. ``framing``
        defaults to "tcp" on TCP and must be "rtu" on a serial port."""
        if isinstance(settings, SerialSettings):
            framing = framing or "rtu"
            if framing != "rtu":
                raise ConfigurationError(f"serial link {settings.port}: Modbus on a serial port is framed 'rtu'")
            name = name or f"modbus-rtu:{settings.port}"
        elif isinstance(settings, TcpSettings):
            framing = framing or "tcp"
            name = name or f"modbus-{framing}://{settings.label}"
        else:
            raise ConfigurationError(f"Modbus link settings must be TcpSettings or SerialSettings, got {settings!r}")
        if not 0 < timeout <= 60:
            raise ConfigurationError(f"{name}: timeout must be in (0, 60] s, got {timeout}")
        timing = BusSettings(
            reply_timeout=float(timeout),
            attempts=attempts,
            retry=retry or BackoffPolicy(initial=0.1, maximum=1.0),
            link_wait=link_wait,
        )
        bus = Bus(name, make_transport(settings, name=name), settings=timing, health=health)
        link = cls(bus, framing=framing)
        link._own_bus = True
        return link

    def __repr__(self) -> str:
        return f"<ModbusLink {self.name} {self.framing} {'up' if self.connected else 'down'}>"

    @property
    def name(self) -> str:
        return self.bus.name

    @property
    def transport(self) -> Transport:
        transport = self.bus.transport
        assert transport is not None  # checked in __init__
        return transport

    @property
    def stats(self) -> LinkStats:
        return self.transport.stats

    @property
    def connected(self) -> bool:
        return self.transport.connected

    @property
    def down_since(self) -> float | None:
        return self.transport.down_since

    @property
    def transactions(self) -> int:
        """Requests written so far (retries included)."""
        return self.bus.counters.sent

    @property
    def rs485_active(self) -> bool:
        """Kernel RS-485 mode is on (serial links that asked for it and whose device took it)."""
        transport = self.transport
        return isinstance(transport, SerialLink) and transport.rs485_active

    @property
    def exceptions(self) -> dict[int, int]:
        """Exception replies heard on this bus, by code (retried ones included)."""
        n = len(COUNTER_PREFIX)
        return {int(k[n:], 16): v for k, v in self.bus.protocol_counters.items() if k.startswith(COUNTER_PREFIX)}

    async def connect(self) -> None:
        """Connect now (raises LinkDown); a link of its own also connects on first use."""
        if not await self.bus.open():
            raise LinkDown(f"{self.name}: cannot connect: {self.stats.last_error or 'no connection'}")

    async def wait_connected(self, within: float | None = None) -> bool:
        return await self.transport.wait_connected(within)

    async def close(self) -> None:
        """Close the bus (a link of its own; the fleet closes the buses it built)."""
        self._closed = True
        await self.bus.close()

    # -- transactions -------------------------------------------------------------------------

    async def read_registers(
        self,
        unit: int,
        function: int,
        address: int,
        count: int,
        *,
        meter: str | None = None,
        priority: int = Priority.POLL,
        force: bool = False,
        attempts: int | None = None,
        strict: bool = False,
    ) -> list[int]:
        """Read ``count`` holding (3) or input (4) registers. ``strict``: an exception reply that
        would be a refusal is a bad reply instead (a probe of a meter that refuses everything)."""
        if function not in (3, 4):
            raise ConfigurationError(f"register reads use function 3 or 4, not {function}")
        _check_span(function, address, count)
        return await self._transact(
            unit,
            PDU.pack(function, address, count),
            registers_of,
            meter=meter,
            priority=priority,
            force=force,
            attempts=attempts,
            strict=strict,
        )

    async def read_bits(
        self,
        unit: int,
        function: int,
        address: int,
        count: int,
        *,
        meter: str | None = None,
        priority: int = Priority.POLL,
        force: bool = False,
        attempts: int | None = None,
        strict: bool = False,
    ) -> list[bool]:
        """Read ``count`` coils (1) or discrete inputs (2)."""
        if function not in (1, 2):
            raise ConfigurationError(f"bit reads use function 1 or 2, not {function}")
        _check_span(function, address, count)
        return await self._transact(
            unit,
            PDU.pack(function, address, count),
            bits_of,
            meter=meter,
            priority=priority,
            force=force,
            attempts=attempts,
            strict=strict,
        )

    async def write_coil(
        self,
        unit: int,
        address: int,
        value: bool,
        *,
        meter: str | None = None,
        priority: int = Priority.POLL,
        force: bool = False,
        attempts: int | None = None,
    ) -> None:
        _check_span(1, address, 1)
        await self._transact(
            unit,
            PDU.pack(WRITE_COIL, address, 0xFF00 if value else 0),
            echo_of,
            meter=meter,
            priority=priority,
            force=force,
            attempts=attempts,
        )

    async def write_register(
        self,
        unit: int,
        address: int,
        value: int,
        *,
        meter: str | None = None,
        priority: int = Priority.POLL,
        force: bool = False,
        attempts: int | None = None,
    ) -> None:
        _check_span(3, address, 1)
        if isinstance(value, bool) or not 0 <= value <= 0xFFFF:
            raise ConfigurationError(f"a register holds 0..65535, got {value!r}")
        await self._transact(
            unit,
            PDU.pack(WRITE_REGISTER, address, value),
            echo_of,
            meter=meter,
            priority=priority,
            force=force,
            attempts=attempts,
        )

    async def _transact(
        self,
        unit: int,
        pdu: bytes,
        value_of: Callable[[ModbusExchange[R], bytes], R],
        *,
        meter: str | None,
        priority: int,
        force: bool,
        attempts: int | None,
        strict: bool = False,
    ) -> R:
        """One request (``pdu``: function, address, count or value) to ``unit``; ``value_of``
        turns the reply PDU into the caller's value (see :class:`ModbusExchange`)."""
        _unit_ok(unit)
        if self._own_bus and not self._closed:
            await self.bus.open()  # a link of its own connects on first use (idempotent after)
        line = self.line
        tid = line.next_tid()
        request = self.frames.encode(pdu, unit, tid)
        exchange = ModbusExchange(line, request, pdu, unit=unit, tid=tid, value_of=value_of, strict=strict)
        try:
            return await self.bus.exchange(
                request, exchange, meter=meter, priority=priority, attempts=attempts, force=force
            )
        except BadReply as e:
            code = exchange.exception
            if code is None or (strict and code not in UNREACHABLE_EXCEPTIONS):
                raise  # a strict probe's refusal is reported by the meter that probed
            log_limited(
                log,
                logging.WARNING,
                f"modbus.exception:{self.name}:{code}",
                "event=modbus_exception meter=%s unit=%d what=%s reason=%s gave_up=true",
                logfmt_value(meter or "-"),
                unit,
                logfmt_value(exchange.what),
                logfmt_value(exception_text(code)),
            )
            if code in UNREACHABLE_EXCEPTIONS:
                raise NoAnswer(str(e)) from e  # the bus counted it, and the health book, as a failure
            raise

    def count_exception(self, code: int) -> None:
        counters = self.bus.protocol_counters
        key = f"{COUNTER_PREFIX}{code:#04x}"
        counters[key] = counters.get(key, 0) + 1


def _check_span(function: int, address: int, count: int) -> None:
    limit = _MAX_COUNT[function]
    if not 1 <= count <= limit:
        raise ConfigurationError(f"function {function} reads 1..{limit} at a time, not {count}")
    if address < 0 or address + count > 0x10000:
        raise ConfigurationError(f"addresses {address}..{address + count - 1} are outside 0..65535")


class ReplyDecoder(DecodePDU):
    """pymodbus' response decoder, which ``FramerRTU`` asks how long a reply is (RTU frames carry
    no length), with a truncated PDU always "undecodable" (None) for anyone decoding with it.
    pymodbus 3.11 let ``struct.error`` out of several message classes (found by ``fuzz modbus``);
    3.16 catches it itself, and this keeps the guarantee whatever the version does."""

    def decode(self, frame: bytes) -> ModbusPDU | None:
        try:
            return super().decode(frame)
        except struct.error:
            log.debug("event=undecodable_pdu hex=%s", frame.hex())
            return None


class PymodbusFraming:
    """The :class:`~protocols.modbus.exchange.Framing` of a Modbus bus, by pymodbus' framers:
    MBAP on Modbus TCP, CRC and the reply sizing an RTU frame needs (RTU frames carry no
    length) otherwise. Kept here, not in ``protocols/modbus``, because only this module imports
    pymodbus."""

    __slots__ = ("framer", "tcp")

    def __init__(self, tcp: bool) -> None:
        self.tcp = tcp
        self.framer: FramerBase = (FramerSocket if tcp else FramerRTU)(ReplyDecoder(False))

    def encode(self, pdu: bytes, unit: int, tid: int) -> bytes:
        return self.framer.encode(pdu, unit, tid)

    def split(self, data: bytes) -> tuple[int, int, int, int, bytes]:
        used, unit, tid, frame = self.framer.decode(data)
        if self.tcp or not used or not frame:
            return 0, used, unit, tid, frame
        # FramerRTU reports the whole buffer used; the frame itself ends at its CRC
        start = max(data.find(bytes((unit,)) + frame), 0)
        return start, start + len(frame) + 3, unit, tid, frame


# ---------------------------------------------------------------------------------------------
# Read planning


@dataclass(frozen=True, slots=True)
class ReadRequest:
    """One read transaction: ``count`` registers (or bits) from ``address`` with ``function``,
    carrying ``points``."""

    function: int
    address: int
    count: int
    points: tuple[ModbusPoint, ...]
    # the request PDU, made once: a plan is shared by every meter of its model and read again
    # every poll
    pdu: bytes = field(init=False, repr=False, compare=False)
    # per point: where its registers (or bit) lie in the reply's, and the values it accepts
    layout: tuple[tuple[ModbusPoint, int, int, float, float], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pdu", PDU.pack(self.function, self.address, self.count))
        layout = []
        for p in self.points:
            start = p.address - self.address
            layout.append((p, start, start + p.count, *_accepted(p.range)))
        object.__setattr__(self, "layout", tuple(layout))

    @property
    def end(self) -> int:
        return self.address + self.count


def plan_reads(
    points: Iterable[ModbusPoint], *, max_registers: int, max_bits: int = 2000, max_gap: int = 0
) -> list[ReadRequest]:
    """Merge points into as few reads as the limits allow.

    Points of the same function are sorted by address and merged greedily while the span stays
    within ``max_registers`` (``max_bits`` for coils and discrete inputs) and the unused stretch
    between consecutive points is at most ``max_gap``. Overlapping points share registers.
    """
    if max_registers < 1 or max_bits < 1 or max_gap < 0:
        raise ConfigurationError("plan_reads: limits must be >= 1 and max_gap >= 0")
    by_function: dict[int, list[ModbusPoint]] = {}
    for p in dict.fromkeys(points):  # the same point asked twice is read once
        by_function.setdefault(p.function, []).append(p)
    requests: list[ReadRequest] = []
    for function in sorted(by_function):
        limit = max_bits if function in (1, 2) else max_registers
        group = sorted(by_function[function], key=lambda p: (p.address, p.end))
        start, end, members = group[0].address, group[0].end, [group[0]]
        for p in group[1:]:
            new_end = max(end, p.end)
            if p.address - end <= max_gap and new_end - start <= limit:
                end = new_end
                members.append(p)
                continue
            requests.append(ReadRequest(function, start, end - start, tuple(members)))
            start, end, members = p.address, p.end, [p]
        requests.append(ReadRequest(function, start, end - start, tuple(members)))
    for r in requests:
        limit = max_bits if r.function in (1, 2) else max_registers
        if r.count > limit:
            raise ConfigurationError(f"a point needs {r.count} registers at {r.address}, over the limit {limit}")
    return requests


def decode_block(
    request: ReadRequest,
    data: bytes | Sequence[bool],
    *,
    meter_id: str,
    gateway_time: float,
    slot: float | None,
) -> list[Reading]:
    """Turn one read's registers (the reply's register bytes) or bits into readings, flagging
    bad and implausible values."""
    out: list[Reading] = []
    registers = data if isinstance(data, bytes) else b""  # a bit read's points have no codec
    for p, start, _end, low, high in request.layout:
        quality = Quality.GOOD
        value: int | float
        codec = p.codec
        if codec is None:
            value = int(bool(data[start]))
        else:
            try:
                value = codec.decode_at(registers, 2 * start)
            except RemoteValueError as e:
                value = e.value
                quality = Quality.OUT_OF_RANGE
                # a faulty register reads NaN at every poll: one line per meter and quantity (a
                # set the config bounds) and interval; each reading still carries the flag
                log_limited(
                    log,
                    logging.WARNING,
                    f"value_failed:{meter_id}:{p.quantity}",
                    "event=value_failed meter=%s quantity=%s error=%s",
                    logfmt_value(meter_id),
                    logfmt_value(p.quantity),
                    logfmt_value(e),
                )
        if quality is Quality.GOOD and not low <= value <= high:
            quality = Quality.OUT_OF_RANGE
        out.append(Reading(meter_id, p.quantity, value, p.unit, gateway_time, None, slot, quality))
    return out


def _accepted(bounds: tuple[float, float]) -> tuple[float, float]:
    """The values a point's plausible range lets pass: a meter's own rounding may put PF at
    1.0000001, so the last float32 digit is tolerated."""
    low, high = bounds
    slack = 1e-6 * max(1.0, abs(low), abs(high)) if math.isfinite(low) and math.isfinite(high) else 0.0
    return low - slack, high + slack


# ---------------------------------------------------------------------------------------------
# The meter


@dataclass(frozen=True, slots=True)
class _Plan:
    """The reads that answer one question (quantities asked of a model with given settings)."""

    model: ModbusModel  # kept so the id in the plan's key cannot be reused
    requests: list[ReadRequest]
    order: dict[str, int]  # quantity -> its place among those asked, once each
    in_order: bool  # the requests' points come in the order asked: their readings need no sort


# Read plans per model and settings, not per meter: every polled meter of one model shares one
# plan, so a large fleet does not hold a copy per meter. Keyed by the model's id (hashing a model
# hashes all its points) and the quantities as asked (a poll group asks with the same tuple every
# time).
_PlanKey = tuple[int, str | None, int, int, tuple[str, ...]]
_shared_plans: dict[_PlanKey, _Plan] = {}


@dataclass(slots=True)
class _Learned:
    """What one meter's device refuses; only meters that refused something have one."""

    until: float  # wall time after which it is forgotten and the planned reads are tried again
    # a planned read the device refused -> the reads that replace it (points it refuses left out)
    pieces: dict[ReadRequest, tuple[ReadRequest, ...]]
    refuses_all: str = ""  # it refused every read: why (its reads are then single strict probes)


@dataclass(slots=True)
class _Outcome:
    """What the transactions of one read came to."""

    answered: bool = False
    refusals: list[tuple[ReadRequest, MeterRefused]] | None = None

    def refused(self, request: ReadRequest, error: MeterRefused) -> None:
        if self.refusals is None:
            self.refusals = []
        self.refusals.append((request, error))


def _split(request: ReadRequest) -> tuple[ReadRequest, ReadRequest]:
    """A read of several points as two reads of half the points each."""
    points = sorted(request.points, key=lambda p: (p.address, p.end))
    half = len(points) // 2
    return _span(request.function, points[:half]), _span(request.function, points[half:])


def _span(function: int, points: Sequence[ModbusPoint]) -> ReadRequest:
    start = min(p.address for p in points)
    return ReadRequest(function, start, max(p.end for p in points) - start, tuple(points))


def _registers(request: ReadRequest) -> str:
    kind = "bits" if request.function in (1, 2) else "registers"
    return f"function {request.function} {kind} {request.address}..{request.end - 1}"


class ModbusMeter:
    """One Modbus meter (a unit id on a Modbus bus) described by a meter model.

    ``variant`` picks which of a model's duplicate points to read (e.g. "int32" in sim-3ph);
    ``max_registers`` and ``max_gap`` override the model's limits for this meter.

    A device that refuses a merged read (one spanning registers it does not map, or more than it
    reads at once) has it split in two, again and again down to single points; the reads that
    worked replace the refused one for this meter from then on (for :data:`RELEARN_AFTER`), and a
    point refused on its own yields no reading. A meter that refuses every read is failing: its
    health book hears so, and later reads are one strict probe until it answers with data.
    """

    # 10,000 meters on one gateway: no per-instance __dict__
    __slots__ = ("_learned", "link", "max_gap", "max_registers", "meter_id", "model", "unit", "variant")

    def __init__(
        self,
        link: ModbusLink,
        model: ModbusModel | str,
        *,
        unit: int,
        meter_id: str,
        variant: str | None = None,
        max_registers: int | None = None,
        max_gap: int | None = None,
    ) -> None:
        if isinstance(model, str):
            loaded = load_model(model)
            if not isinstance(loaded, ModbusModel):
                raise ConfigurationError(f"meter {meter_id}: model {model!r} is not a Modbus model")
            model = loaded
        _unit_ok(unit)
        if variant is not None and variant not in model.variants:
            raise ConfigurationError(
                f"meter {meter_id}: model {model.name} has no variant {variant!r} ({model.variants})"
            )
        self.link = link
        self.model = model
        self.unit = unit
        self.meter_id = meter_id
        self.variant = variant
        self.max_registers = max_registers or model.max_registers_per_read
        self.max_gap = model.max_gap if max_gap is None else max_gap
        self._learned: _Learned | None = None

    def __repr__(self) -> str:
        return f"<ModbusMeter {self.meter_id} unit {self.unit} {self.model.name} on {self.link.name}>"

    @property
    def quantities(self) -> tuple[str, ...]:
        return self.model.quantities

    @property
    def refused(self) -> dict[ReadRequest, tuple[ReadRequest, ...]]:
        """The planned reads this meter's device refused, and the reads that replace each."""
        return dict(self._learned.pieces) if self._learned is not None else {}

    def plan(self, quantities: Iterable[str] | None = None) -> list[ReadRequest]:
        """The transactions the model's points need for ``quantities`` (all if None); cached."""
        return self._plan(quantities).requests

    def _plan(self, quantities: Iterable[str] | None) -> _Plan:
        asked = self.model.quantities if quantities is None else tuple(quantities)
        key = (id(self.model), self.variant, self.max_registers, self.max_gap, asked)
        found = _shared_plans.get(key)
        if found is not None and found.model is self.model:
            return found
        wanted = tuple(dict.fromkeys(asked))
        requests = plan_reads(
            self.model.points_for(wanted, self.variant),
            max_registers=self.max_registers,
            max_bits=self.model.max_bits_per_read,
            max_gap=self.max_gap,
        )
        order = {q: i for i, q in enumerate(wanted)}
        got = [order[p.quantity] for r in requests for p in r.points]
        plan = _shared_plans[key] = _Plan(self.model, requests, order, got == sorted(got))
        return plan

    async def read(
        self,
        quantities: Iterable[str] | None = None,
        *,
        slot: float | None,
        now: float,
        priority: int = Priority.POLL,
        force: bool = False,
    ) -> list[Reading]:
        """Read ``quantities`` (all the model has if None); ``now`` stamps ``gateway_time``.

        Points the device refuses yield no reading (see the class docstring). LinkDown is raised at
        once, BadReply when the device refused every read. A transaction lost otherwise (NoAnswer,
        BadReply) loses only its points: the other reads go on and PartialRead carries what they
        got with the quantities lost. Nothing read at all raises the first loss; so do two losses
        before anything was read (a dead device must not hold the bus for every read).
        """
        planned = self._plan(quantities)
        plan = planned.requests
        learned = self._learned
        if learned is not None and now >= learned.until:
            learned = self._learned = None
        readings: list[Reading] = []
        if learned is not None and learned.refuses_all:
            # a single strict attempt: a refusal counts against its health instead of proving it alive
            first = plan[0]
            try:
                data = await self._fetch(first, priority, force, strict=True, attempts=1)
            except BadReply as e:
                self._refuses_all(str(e))
                raise BadReply(f"meter {self.meter_id} refuses every read: {e}") from e
            learned = self._learned = None
            readings.extend(decode_block(first, data, meter_id=self.meter_id, gateway_time=now, slot=slot))
            plan = plan[1:]
        outcome = _Outcome()
        replaced: dict[ReadRequest, tuple[ReadRequest, ...]] = {}
        lost: set[str] = set()
        cause: NoAnswer | BadReply | None = None
        for request in plan:
            pieces = learned.pieces.get(request) if learned is not None else None
            got: tuple[ReadRequest, ...] = ()
            try:
                for piece in (request,) if pieces is None else pieces:
                    got += await self._gather(
                        piece, readings, outcome, now=now, slot=slot, priority=priority, force=force
                    )
            except (NoAnswer, BadReply) as exc:
                cause = cause or exc
                lost.update(p.quantity for p in request.points)
                if not readings and len(lost) > len(request.points):
                    raise cause from None
                continue  # an interrupted request teaches nothing about refusals
            if got != (pieces or (request,)):
                replaced[request] = got
        if outcome.refusals:
            self._learn(learned, replaced, outcome, now)
        order = planned.order
        if learned is not None or not planned.in_order:
            readings.sort(key=lambda r: order[r.quantity])  # as asked, not as the registers lie
        if cause is not None:
            if not readings:
                raise cause
            have = {r.quantity for r in readings}
            failed = tuple(q for q in order if q in lost and q not in have)
            if failed:
                raise PartialRead(readings, failed, cause)
        return readings

    async def _gather(
        self,
        request: ReadRequest,
        readings: list[Reading],
        outcome: _Outcome,
        *,
        now: float,
        slot: float | None,
        priority: int,
        force: bool,
    ) -> tuple[ReadRequest, ...]:
        """Read ``request`` into ``readings``, splitting it while the device refuses it; return the
        reads that worked."""
        try:
            data = await self._fetch(request, priority, force)
        except MeterRefused as e:
            outcome.refused(request, e)
            if len(request.points) == 1:
                return ()
            first, second = _split(request)
            head = await self._gather(first, readings, outcome, now=now, slot=slot, priority=priority, force=force)
            return head + await self._gather(
                second, readings, outcome, now=now, slot=slot, priority=priority, force=force
            )
        outcome.answered = True
        readings.extend(decode_block(request, data, meter_id=self.meter_id, gateway_time=now, slot=slot))
        return (request,)

    def _learn(
        self,
        learned: _Learned | None,
        replaced: dict[ReadRequest, tuple[ReadRequest, ...]],
        outcome: _Outcome,
        now: float,
    ) -> None:
        assert outcome.refusals
        first = outcome.refusals[0][1]
        if not outcome.answered:
            reason = str(first)
            self._learned = _Learned(now + RELEARN_AFTER, {}, refuses_all=reason)
            error = BadReply(f"meter {self.meter_id} refuses every read: {reason}")
            health = self.link.bus.health
            if health is not None:
                # each refusal told the health book the meter is alive; all of them say it is not working
                health.record(self.meter_id, error)
            self._refuses_all(reason)
            raise error
        pieces = dict(learned.pieces) if learned is not None else {}
        pieces.update(replaced)
        self._learned = _Learned(learned.until if learned is not None else now + RELEARN_AFTER, pieces)
        for planned, parts in replaced.items():
            codes = sorted({e.code for r, e in outcome.refusals if planned.address <= r.address < planned.end})
            lost = len(planned.points) - sum(len(p.points) for p in parts)
            log_limited(
                log,
                logging.WARNING,
                f"modbus.refused:{self.link.name}:{planned.function}:{planned.address}:{planned.count}",
                "event=modbus_refused meter=%s unit=%d link=%s registers=%s reason=%s parts=%d unread_points=%d",
                logfmt_value(self.meter_id),
                self.unit,
                logfmt_value(self.link.name),
                logfmt_value(_registers(planned)),
                logfmt_value(", ".join(exception_text(c) for c in codes)),
                len(parts),
                lost,
            )

    def _refuses_all(self, reason: str) -> None:
        log_limited(
            log,
            logging.WARNING,
            f"modbus.refuses_all:{self.link.name}",
            "event=modbus_refuses_all meter=%s unit=%d link=%s reason=%s counted=failing",
            logfmt_value(self.meter_id),
            self.unit,
            logfmt_value(self.link.name),
            logfmt_value(reason),
        )

    def _fetch(
        self,
        request: ReadRequest,
        priority: int,
        force: bool,
        *,
        strict: bool = False,
        attempts: int | None = None,
    ) -> Coroutine[object, None, bytes | list[bool]]:
        """The transaction of ``request`` (to await), whose span the plan checked and whose PDU it
        made; not a coroutine itself, so each request costs one coroutine fewer."""
        return self.link._transact(
            self.unit,
            request.pdu,
            READ_VALUES[request.function],
            meter=self.meter_id,
            priority=priority,
            force=force,
            strict=strict,
            attempts=attempts,
        )

    async def set_relay(
        self, closed: bool, *, priority: int = Priority.POLL, force: bool = False, attempts: int | None = None
    ) -> None:
        """Close (supply on) or open (disconnect) the relay. Does not wait for it to move: check
        with :meth:`read_relay`."""
        relay = self._relay()
        raw = relay.write.closed if closed else relay.write.open
        link, meter, address = self.link, self.meter_id, relay.write.address
        if relay.write.function == 1:
            await link.write_coil(
                self.unit, address, bool(raw), meter=meter, priority=priority, force=force, attempts=attempts
            )
        else:
            await link.write_register(
                self.unit, address, raw, meter=meter, priority=priority, force=force, attempts=attempts
            )

    async def read_relay(self, *, priority: int = Priority.POLL, force: bool = False) -> bool:
        """True if the relay is closed (supply on)."""
        access = self._relay().read
        raw: int
        link, meter, fn, address = self.link, self.meter_id, access.function, access.address
        if fn in (1, 2):
            bits = await link.read_bits(self.unit, fn, address, 1, meter=meter, priority=priority, force=force)
            raw = int(bits[0])
        else:
            regs = await link.read_registers(self.unit, fn, address, 1, meter=meter, priority=priority, force=force)
            raw = regs[0]
        if raw == access.closed:
            return True
        if raw == access.open:
            return False
        raise BadReply(
            f"{self.meter_id}: relay state reads {raw:#06x}, "
            f"neither closed ({access.closed:#x}) nor open ({access.open:#x})"
        )

    def _relay(self) -> RelaySpec:
        if self.model.relay is None:
            raise ConfigurationError(f"meter {self.meter_id}: model {self.model.name} has no relay")
        return self.model.relay


def from_config(ctx: DriverContext) -> ModbusMeter:
    """The registry's builder for Modbus meters: a unit on its bus's Modbus link (:func:`attach`)."""
    if not isinstance(ctx.model, ModbusModel) or not isinstance(ctx.address, int):
        raise ConfigurationError(f"meter {ctx.meter_id}: needs a Modbus model and a unit id")
    return ModbusMeter(link_for(ctx.bus), ctx.model, unit=ctx.address, meter_id=ctx.meter_id)

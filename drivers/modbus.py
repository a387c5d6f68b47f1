"""Modbus meters: the link, the read planner and the meter driver.

This is the only client-side module that imports pymodbus, and it uses pymodbus for encoding
only: requests and replies are pymodbus PDU objects, framed by its public ``FramerSocket`` (MBAP)
or ``FramerRTU``. The bytes travel over the gateway's own stream links
(:func:`drivers.transport.make_transport`: TCP with keepalive and TCP_USER_TIMEOUT, or a serial
port with kernel RS-485 mode), the same links the DL/T 645 buses use. pymodbus' client is not
used: what the driver needs from it (a connect timeout apart from the reply timeout, socket
options, the serial port object for RS-485 mode, a cap on a receive buffer that line noise
fills, failing the pending request when the connection drops) has no public hook in pymodbus
3.16; it lives in its transport's and transaction manager's internal state. No pymodbus type
leaves this module: trouble becomes a ``drivers.errors`` type.

* :class:`ModbusLink` is one bus: Modbus TCP (MBAP framing), RTU framing over TCP (transparent
  serial servers), or RTU on a local serial port. The link keeps itself connected in the
  background (reconnecting under the link settings' backoff policy); a transaction while it is
  down fails at once with LinkDown. There are no retries here: the caller's bus layer retries.
  Several :class:`ModbusMeter` objects (unit ids) share one link; the link runs one transaction
  at a time.
* :func:`plan_reads` merges the registers wanted into as few transactions as the device allows.
* :class:`ModbusMeter` reads quantities into :class:`~drivers.reading.Reading` objects and
  operates the relay. Each call is one or more transactions; run it under the per-bus scheduler
  (``Bus.run``), which serializes them.

Error mapping (Modbus Application Protocol Specification V1.1b3, §7 for exception codes):

============================================  =====================================================
cannot connect, connection lost               LinkDown
no reply before the timeout                   NoAnswer
exception 0x0B (gateway: target no response)  NoAnswer (the meter is silent, the gateway said so)
other exception responses                     MeterRefused(code, reasons=(name,))
reply of the wrong function, size, echo       BadReply
============================================  =====================================================

RTU framing has no transaction id, so a reply that arrives after its request timed out could be
taken for the answer to the next request. Input is discarded before every request, after a
timeout on an RTU link the next request waits ``late_reply_guard`` seconds so a late reply lands
in that gap, replies from another unit are skipped, and replies are checked for function, size
and echo. Modbus TCP replies must also carry the request's transaction id.
"""

from __future__ import annotations

import asyncio
import logging
import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from pymodbus.framer import FramerBase, FramerRTU, FramerSocket
from pymodbus.pdu import DecodePDU, ModbusPDU
from pymodbus.pdu.bit_message import ReadCoilsRequest, ReadDiscreteInputsRequest, WriteSingleCoilRequest
from pymodbus.pdu.register_message import (
    ReadHoldingRegistersRequest,
    ReadInputRegistersRequest,
    WriteSingleRegisterRequest,
)

from meter_gateway.drivers.context import DriverContext
from meter_gateway.drivers.errors import BadReply, ConfigurationError, LinkDown, MeterRefused, NoAnswer
from meter_gateway.drivers.meter_models import FUNCTIONS, ModbusModel, ModbusPoint, RelaySpec, load_model
from meter_gateway.drivers.reading import Quality, Reading
from meter_gateway.drivers.serial_link import SerialLink
from meter_gateway.drivers.transport import LinkStats, SerialSettings, StreamLink, TcpSettings, make_transport
from meter_gateway.protocols.modbus.values import RemoteValueError

__all__ = [
    "EXCEPTION_NAMES",
    "ModbusLink",
    "ModbusMeter",
    "ReadRequest",
    "decode_block",
    "from_config",
    "plan_reads",
]

log = logging.getLogger(__name__)

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
_GATEWAY_NO_RESPONSE: Final = 0x0B

_READ_FUNCTIONS: Final = frozenset(FUNCTIONS.values())
_WRITE_COIL: Final = 5
_WRITE_REGISTER: Final = 6
# The largest Modbus ADU (TCP: 7-byte MBAP + 253-byte PDU; RTU: 256): more waiting input is noise.
RECEIVE_BUFFER_CAP: Final = 260
# §6.1-6.4: per-request limits of the read functions
_MAX_COUNT: Final = {1: 2000, 2: 2000, 3: 125, 4: 125}

# pymodbus' framers and decoder log every undecodable frame; we convert and count them ourselves
# and the bus logs one line per failed transaction, so its logger only speaks when it is dire.
logging.getLogger("pymodbus.logging").setLevel(logging.CRITICAL)


def _unit_ok(unit: int) -> None:
    if isinstance(unit, bool) or not isinstance(unit, int) or not 1 <= unit <= 255:
        raise ConfigurationError(f"Modbus unit id must be 1..255, got {unit!r}")


class ModbusLink:
    """One Modbus bus or gateway connection, shared by the meters (unit ids) on it.

    ``framing`` is "tcp" (Modbus TCP, MBAP header) or "rtu" (RTU frames, over TCP to a
    transparent serial server, or on a local serial port; the default for serial settings).
    ``timeout`` bounds each transaction from request to complete reply.
    """

    def __init__(
        self,
        settings: TcpSettings | SerialSettings,
        *,
        framing: str | None = None,
        timeout: float = 1.0,
        late_reply_guard: float | None = None,
        name: str | None = None,
    ) -> None:
        if isinstance(settings, SerialSettings):
            framing = framing or "rtu"
            if framing != "rtu":
                raise ConfigurationError(f"serial link {settings.port}: Modbus on a serial port is framed 'rtu'")
            default_name = f"modbus-rtu:{settings.port}"
        elif isinstance(settings, TcpSettings):
            framing = framing or "tcp"
            if framing not in ("tcp", "rtu"):
                raise ConfigurationError(f"tcp link {settings.label}: framing must be 'tcp' or 'rtu', got {framing!r}")
            default_name = f"modbus-{framing}://{settings.label}"
        else:
            raise ConfigurationError(f"Modbus link settings must be TcpSettings or SerialSettings, got {settings!r}")
        if not 0 < timeout <= 60:
            raise ConfigurationError(f"{default_name}: timeout must be in (0, 60] s, got {timeout}")
        self.settings = settings
        self.framing = framing
        self.timeout = float(timeout)
        self.late_reply_guard = (
            (timeout / 2 if framing == "rtu" else 0.0) if late_reply_guard is None else late_reply_guard
        )
        self.name = name or default_name
        self.transactions = 0
        self._link: StreamLink = make_transport(settings, name=self.name)
        framer_class = FramerSocket if framing == "tcp" else FramerRTU
        self._framer: FramerBase = framer_class(ReplyDecoder(False))
        self._tid = 0  # MBAP transaction id of the last request (RTU has none)
        self._lock = asyncio.Lock()
        self._opened = False
        self._quiet_until = -math.inf  # loop time the late-reply guard ends

    def __repr__(self) -> str:
        return f"<ModbusLink {self.name} {'up' if self.connected else 'down'}>"

    @property
    def stats(self) -> LinkStats:
        return self._link.stats

    @property
    def connected(self) -> bool:
        return self._link.connected

    @property
    def down_since(self) -> float | None:
        """Loop time the link went down (or the first connect failed); None while up or unused."""
        return self._link.down_since if self._opened else None

    @property
    def rs485_active(self) -> bool:
        """Kernel RS-485 mode is on (serial links that asked for it and whose device took it)."""
        return isinstance(self._link, SerialLink) and self._link.rs485_active

    # -- connection ---------------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect now (raises LinkDown); transactions also connect on demand."""
        async with self._lock:
            self._ensure_connected()
            if not self._opened:
                await self._open()

    async def wait_connected(self, within: float | None = None) -> bool:
        """Wait until the link is up (it reconnects in the background); False after ``within`` s."""
        return self._opened and await self._link.wait_connected(within)

    async def close(self) -> None:
        async with self._lock:
            self._opened = False
            await self._link.close()

    async def _open(self) -> None:
        self._opened = True
        if not await self._link.open():
            target = self.settings.label if isinstance(self.settings, TcpSettings) else self.settings.port
            raise LinkDown(f"{self.name}: cannot connect to {target}: {self.stats.last_error or 'no connection'}")

    def _ensure_connected(self) -> None:
        if self._opened and not self._link.connected:
            raise LinkDown(
                f"{self.name}: link down ({self.stats.last_error or 'not connected'}); reconnecting in the background"
            )

    # -- transactions -------------------------------------------------------------------------

    async def read_registers(self, unit: int, function: int, address: int, count: int) -> list[int]:
        """Read ``count`` holding (3) or input (4) registers."""
        if function not in (3, 4):
            raise ConfigurationError(f"register reads use function 3 or 4, not {function}")
        _check_span(function, address, count)
        response = await self._transact(unit, function, address, count)
        registers = list(response.registers)
        if len(registers) != count:
            raise BadReply(f"{self.name} unit {unit}: asked for {count} registers at {address}, got {len(registers)}")
        return registers

    async def read_bits(self, unit: int, function: int, address: int, count: int) -> list[bool]:
        """Read ``count`` coils (1) or discrete inputs (2)."""
        if function not in (1, 2):
            raise ConfigurationError(f"bit reads use function 1 or 2, not {function}")
        _check_span(function, address, count)
        response = await self._transact(unit, function, address, count)
        bits = [bool(b) for b in response.bits]
        # bits come padded to whole bytes; fewer than asked is a short reply
        if len(bits) < count or len(bits) >= count + 8:
            raise BadReply(f"{self.name} unit {unit}: asked for {count} bits at {address}, got {len(bits)}")
        return bits[:count]

    async def write_coil(self, unit: int, address: int, value: bool) -> None:
        _check_span(1, address, 1)
        response = await self._transact(unit, _WRITE_COIL, address, bool(value))
        echoed = bool(response.bits[0]) if response.bits else None
        if response.address != address or echoed is not bool(value):
            raise BadReply(f"{self.name} unit {unit}: write coil {address}={value} echoed {response.address}={echoed}")

    async def write_register(self, unit: int, address: int, value: int) -> None:
        _check_span(3, address, 1)
        if isinstance(value, bool) or not 0 <= value <= 0xFFFF:
            raise ConfigurationError(f"a register holds 0..65535, got {value!r}")
        response = await self._transact(unit, _WRITE_REGISTER, address, value)
        echoed = response.registers[0] if response.registers else None
        if response.address != address or echoed != value:
            raise BadReply(
                f"{self.name} unit {unit}: write register {address}={value} echoed {response.address}={echoed}"
            )

    async def _transact(self, unit: int, function: int, address: int, arg: int | bool) -> ModbusPDU:
        _unit_ok(unit)
        async with self._lock:
            self._ensure_connected()
            if not self._opened:
                await self._open()
            link = self._link
            loop = asyncio.get_running_loop()
            if (wait := self._quiet_until - loop.time()) > 0:
                await asyncio.sleep(wait)
            if self.framing == "tcp":
                self._tid = self._tid % 0xFFFF + 1
            request = _request(function, unit, address, arg, self._tid)
            reply = _ReplyMatcher(self, self._framer, unit, self._tid, 2 * _reply_size(function, arg) + 8)
            self.transactions += 1
            link.flush_input()  # whatever is waiting answers nothing we are about to ask
            await link.write(self._framer.buildFrame(request))
            if not await link.read_until(reply.feed, loop.time() + self.timeout):
                raise self._no_reply(unit, function, address)
            link.note_reply()
            response = reply.pdu
            assert response is not None  # read_until returned True: feed() found it
            if response.isError():
                if response.function_code != function | 0x80:
                    raise BadReply(
                        f"{self.name} unit {unit}: exception reply to function {response.function_code & 0x7F}"
                    )
                code = int(response.exception_code)
                reason = EXCEPTION_NAMES.get(code, f"exception {code:#04x}")
                what = f"{self.name} unit {unit}: function {function} at {address}: {reason} ({code:#04x})"
                if code == _GATEWAY_NO_RESPONSE:
                    raise NoAnswer(what)
                raise MeterRefused(what, code=code, reasons=(reason,))
            if response.function_code != function:
                raise BadReply(
                    f"{self.name} unit {unit}: reply of function {response.function_code} to function {function}"
                )
            return response

    def _no_reply(self, unit: int, function: int, address: int) -> NoAnswer | LinkDown:
        self._quiet_until = asyncio.get_running_loop().time() + self.late_reply_guard
        self._link.note_silence()
        if not self._link.connected:
            # the socket looked fine but nothing answered any more: the link dropped it as half-open
            limit = self.settings.no_reply_limit
            return LinkDown(f"{self.name}: {limit} transactions in a row without a reply; reconnecting")
        return NoAnswer(
            f"{self.name} unit {unit}: no reply to function {function} at {address} within {self.timeout:.2f} s"
        )


class _ReplyMatcher:
    """Collects a reply from the arriving bytes (``feed`` is the link's ``read_until`` consumer).

    Frames from another unit (a neighbour's late reply on a shared bus) or, on Modbus TCP, with
    another transaction id are skipped. While no whole frame is there, only the newest ``cap``
    bytes are kept: line noise that never forms a frame would otherwise be rescanned (the RTU
    framer tries every offset) on every chunk that arrives."""

    __slots__ = ("buffer", "cap", "framer", "link", "pdu", "tid", "unit")

    def __init__(self, link: ModbusLink, framer: FramerBase, unit: int, tid: int, cap: int) -> None:
        self.link = link
        self.framer = framer
        self.unit = unit
        self.tid = tid
        self.cap = cap
        self.buffer = b""
        self.pdu: ModbusPDU | None = None

    def feed(self, data: bytes) -> bool:
        buffer = self.buffer + data
        framer = self.framer
        while buffer:
            used, unit, tid, frame = framer.decode(buffer)
            if not used:
                break
            buffer = buffer[used:]
            if not frame or unit != self.unit or (self.link.framing == "tcp" and tid != self.tid):
                continue
            pdu = framer.decoder.decode(frame)
            if pdu is None:
                raise BadReply(f"{self.link.name} unit {unit}: undecodable reply {frame.hex()}")
            self.pdu = pdu
            return True
        if len(buffer) > self.cap:
            self.link.stats.overflow_dropped += len(buffer) - self.cap
            buffer = buffer[-self.cap :]
        self.buffer = buffer
        return False


def _check_span(function: int, address: int, count: int) -> None:
    limit = _MAX_COUNT[function]
    if not 1 <= count <= limit:
        raise ConfigurationError(f"function {function} reads 1..{limit} at a time, not {count}")
    if address < 0 or address + count > 0x10000:
        raise ConfigurationError(f"addresses {address}..{address + count - 1} are outside 0..65535")


class ReplyDecoder(DecodePDU):
    """pymodbus' response decoder, with a truncated PDU always "undecodable" (None, a BadReply
    here). pymodbus 3.11 let ``struct.error`` out of several message classes (found by ``fuzz
    modbus``); 3.16 catches it itself, and this keeps the guarantee whatever the version does."""

    def decode(self, frame: bytes) -> ModbusPDU | None:
        try:
            return super().decode(frame)
        except struct.error:
            log.debug("undecodable reply PDU %s", frame.hex())
            return None


def _reply_size(function: int, arg: int | bool) -> int:
    """Bytes of the RTU reply to a request (unit, function, payload, CRC)."""
    if function in (1, 2):
        return 5 + (int(arg) + 7) // 8
    if function in (3, 4):
        return 5 + 2 * int(arg)
    return 8  # a write is echoed


def _request(function: int, unit: int, address: int, arg: int | bool, tid: int) -> ModbusPDU:
    if function in (1, 2, 3, 4):
        read = {1: ReadCoilsRequest, 2: ReadDiscreteInputsRequest, 3: ReadHoldingRegistersRequest}
        cls = read.get(function, ReadInputRegistersRequest)
        return cls(dev_id=unit, transaction_id=tid, address=address, count=int(arg))
    if function == _WRITE_COIL:
        return WriteSingleCoilRequest(dev_id=unit, transaction_id=tid, address=address, bits=[bool(arg)])
    return WriteSingleRegisterRequest(dev_id=unit, transaction_id=tid, address=address, registers=[int(arg)])


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
    data: Sequence[int] | Sequence[bool],
    *,
    meter_id: str,
    gateway_time: float,
    slot: float | None,
) -> list[Reading]:
    """Turn one read's registers (or bits) into readings, flagging bad and implausible values."""
    out: list[Reading] = []
    for p in request.points:
        offset = p.address - request.address
        quality = Quality.GOOD
        value: int | float
        if p.codec is None:
            value = int(bool(data[offset]))
        else:
            regs = [int(r) for r in data[offset : offset + p.count]]
            try:
                value = p.codec.decode(regs)
            except RemoteValueError as e:
                value = e.value
                quality = Quality.OUT_OF_RANGE
                log.warning("%s %s: %s", meter_id, p.quantity, e)
        if quality is Quality.GOOD and not _plausible(value, p.range):
            quality = Quality.OUT_OF_RANGE
        out.append(Reading(meter_id, p.quantity, value, p.unit, gateway_time, slot=slot, quality=quality))
    return out


def _plausible(value: float, bounds: tuple[float, float]) -> bool:
    low, high = bounds
    # a meter's own rounding may put PF at 1.0000001: tolerate the last float32 digit
    slack = 1e-6 * max(1.0, abs(low), abs(high)) if math.isfinite(low) and math.isfinite(high) else 0.0
    return low - slack <= value <= high + slack


# ---------------------------------------------------------------------------------------------
# The meter


# Read plans per model and settings, not per meter: 10,000 polled meters of one model share one
# plan (a per-meter cache cost ~700 bytes each). Keyed by the model's id (hashing a model hashes
# all its points), the model kept in the value so the id cannot be reused.
_PlanKey = tuple[int, str | None, int, int, tuple[str, ...]]
_shared_plans: dict[_PlanKey, tuple[ModbusModel, list[ReadRequest]]] = {}


class ModbusMeter:
    """One Modbus meter (a unit id on a link) described by a meter model.

    ``variant`` picks which of a model's duplicate points to read (e.g. "int32" in sim-3ph);
    ``max_registers`` and ``max_gap`` override the model's limits for this meter.
    """

    # 10,000 meters on one gateway: no per-instance __dict__
    __slots__ = ("link", "max_gap", "max_registers", "meter_id", "model", "unit", "variant")

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

    def __repr__(self) -> str:
        return f"<ModbusMeter {self.meter_id} unit {self.unit} {self.model.name} on {self.link.name}>"

    @property
    def quantities(self) -> tuple[str, ...]:
        return self.model.quantities

    def plan(self, quantities: Iterable[str] | None = None) -> list[ReadRequest]:
        """The transactions :meth:`read` will make for ``quantities`` (all if None); cached."""
        wanted = self.model.quantities if quantities is None else tuple(dict.fromkeys(quantities))
        key = (id(self.model), self.variant, self.max_registers, self.max_gap, wanted)
        found = _shared_plans.get(key)
        if found is not None and found[0] is self.model:
            return found[1]
        plan = plan_reads(
            self.model.points_for(wanted, self.variant),
            max_registers=self.max_registers,
            max_bits=self.model.max_bits_per_read,
            max_gap=self.max_gap,
        )
        _shared_plans[key] = (self.model, plan)
        return plan

    async def read(self, quantities: Iterable[str] | None = None, *, slot: float | None, now: float) -> list[Reading]:
        """Read ``quantities`` (all the model has if None); ``now`` stamps ``gateway_time``.

        Raises the first transaction's DriverError (LinkDown, NoAnswer, BadReply, MeterRefused);
        a partial set of readings is never returned as if complete.
        """
        wanted = None if quantities is None else tuple(dict.fromkeys(quantities))
        readings: list[Reading] = []
        for request in self.plan(wanted):
            data: Sequence[int] | Sequence[bool]
            if request.function in (1, 2):
                data = await self.link.read_bits(self.unit, request.function, request.address, request.count)
            else:
                data = await self.link.read_registers(self.unit, request.function, request.address, request.count)
            readings.extend(decode_block(request, data, meter_id=self.meter_id, gateway_time=now, slot=slot))
        order = {q: i for i, q in enumerate(wanted or self.model.quantities)}
        readings.sort(key=lambda r: order[r.quantity])  # as asked, not as the registers lie
        return readings

    async def set_relay(self, closed: bool) -> None:
        """Close (supply on) or open (disconnect) the relay. Does not wait for it to move: check
        with :meth:`read_relay`."""
        relay = self._relay()
        raw = relay.write.closed if closed else relay.write.open
        if relay.write.function == 1:
            await self.link.write_coil(self.unit, relay.write.address, bool(raw))
        else:
            await self.link.write_register(self.unit, relay.write.address, raw)

    async def read_relay(self) -> bool:
        """True if the relay is closed (supply on)."""
        access = self._relay().read
        raw: int
        if access.function in (1, 2):
            raw = int((await self.link.read_bits(self.unit, access.function, access.address, 1))[0])
        else:
            raw = (await self.link.read_registers(self.unit, access.function, access.address, 1))[0]
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
    """The registry's builder for Modbus meters: a unit on the link its bus was built with."""
    link = ctx.bus.job_link
    if not isinstance(link, ModbusLink):
        raise ConfigurationError(f"meter {ctx.meter_id}: bus {ctx.bus.name} has no Modbus link")
    if not isinstance(ctx.model, ModbusModel) or not isinstance(ctx.address, int):
        raise ConfigurationError(f"meter {ctx.meter_id}: needs a Modbus model and a unit id")
    return ModbusMeter(link, ctx.model, unit=ctx.address, meter_id=ctx.meter_id)

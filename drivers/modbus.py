"""Modbus meters: the link over pymodbus, the read planner and the meter driver.

This is the only client-side module that imports pymodbus. pymodbus reports trouble on two
channels: raised exceptions (ConnectionException, ModbusIOException, ...) and returned exception
responses (``isError()``). Both are converted here into ``drivers.errors`` types; no pymodbus
type leaves this module.

* :class:`ModbusLink` is one bus: Modbus TCP (MBAP framing), RTU framing over TCP (transparent
  serial servers), or RTU on a local serial port. pymodbus' own retries and automatic reconnect
  are off: the caller's bus layer retries transactions, and the link reconnects on demand under
  the link settings' backoff policy (a dead gateway is tried again no more often than that).
  Several :class:`ModbusMeter` objects (unit ids) share one link; the link runs one transaction at
  a time.
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
taken for the answer to the next request. pymodbus drops replies that arrive while no request is
pending, and after a timeout on an RTU link the next request waits ``late_reply_guard`` seconds
so a late reply lands in that gap; replies are also checked for function, size and echo.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import socket
import struct
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import serial.rs485
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.framer import FramerType
from pymodbus.pdu import DecodePDU, ModbusPDU

from meter_gateway.drivers.backoff import Backoff
from meter_gateway.drivers.errors import BadReply, ConfigurationError, LinkDown, MeterRefused, NoAnswer
from meter_gateway.drivers.meter_models import FUNCTIONS, ModbusModel, ModbusPoint, RelaySpec, load_model
from meter_gateway.drivers.reading import Quality, Reading
from meter_gateway.drivers.transport import LinkStats, SerialSettings, TcpSettings
from meter_gateway.protocols.modbus.values import RemoteValueError

__all__ = [
    "EXCEPTION_NAMES",
    "ModbusLink",
    "ModbusMeter",
    "ReadRequest",
    "decode_block",
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

_NEVER: Final = 1 << 30  # pymodbus' own "close after N silent requests": we decide that ourselves

# pymodbus logs every timeout and exception at ERROR level; we convert and count them ourselves
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
        rng: random.Random | None = None,
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
        self.stats = LinkStats()
        self.transactions = 0
        self._client: AsyncModbusTcpClient | AsyncModbusSerialClient | None = None
        self._lock = asyncio.Lock()
        self._backoff = Backoff(settings.reconnect, rng=rng)
        self._retry_at = -math.inf  # loop time before which no connect is attempted
        self._down_since: float | None = None
        self._silent = 0  # consecutive transactions without a reply
        self._quiet_until = -math.inf  # loop time the late-reply guard ends
        self._receive_cap = RECEIVE_BUFFER_CAP  # input kept for the reply now awaited (see _trace_packet)
        self._in_flight = False  # a request is waiting for its reply
        self.rs485_active = False  # kernel RS-485 mode is on (serial links that asked for it)
        self._rs485_refusal_logged = False

    def __repr__(self) -> str:
        return f"<ModbusLink {self.name} {'up' if self.connected else 'down'}>"

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.connected

    @property
    def down_since(self) -> float | None:
        """Loop time the link went down (or the first connect failed); None while up or unused."""
        return None if self.connected else self._down_since

    # -- connection ---------------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect now (raises LinkDown); transactions also connect on demand."""
        async with self._lock:
            self._retry_at = -math.inf
            await self._ensure_connected()

    async def close(self) -> None:
        async with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def _new_client(self) -> AsyncModbusTcpClient | AsyncModbusSerialClient:
        s = self.settings
        common: dict[str, Any] = {
            "timeout": self.timeout,
            "retries": 0,
            "reconnect_delay": 0,
            "reconnect_delay_max": 0,
            "name": self.name,
            "trace_packet": self._trace_packet,
            "trace_connect": self._trace_connect,
        }
        if isinstance(s, SerialSettings):
            client: AsyncModbusTcpClient | AsyncModbusSerialClient = AsyncModbusSerialClient(
                s.port,
                framer=FramerType.RTU,
                baudrate=s.baudrate,
                bytesize=s.bytesize,
                parity=s.parity,
                stopbits=s.stopbits,  # type: ignore[arg-type]  # pyserial takes 1.5 too
                handle_local_echo=s.rs485 is not None and s.rs485.rx_during_tx,
                **common,
            )
        else:
            framer = FramerType.SOCKET if self.framing == "tcp" else FramerType.RTU
            client = AsyncModbusTcpClient(s.host, port=s.port, framer=framer, **common)
        client.set_max_no_responses(_NEVER)
        client.ctx.framer.decoder = ReplyDecoder(False)
        return client

    async def _ensure_connected(self) -> AsyncModbusTcpClient | AsyncModbusSerialClient:
        if self._client is None:
            self._client = self._new_client()
        client = self._client
        if client.connected:
            return client
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now < self._retry_at:
            raise LinkDown(
                f"{self.name}: link down ({self.stats.last_error or 'not connected'}); "
                f"next connect attempt in {self._retry_at - now:.1f} s"
            )
        self.stats.open_attempts += 1
        # pymodbus uses one timeout for connecting and for replies; connect gets the link's own
        connect_timeout = self.settings.connect_timeout if isinstance(self.settings, TcpSettings) else self.timeout
        client.ctx.comm_params.timeout_connect = connect_timeout
        error = ""
        try:
            ok = await client.connect()
        except (OSError, ModbusException, ValueError) as e:  # pyserial's ValueError: bad settings
            ok, error = False, str(e)
        finally:
            client.ctx.comm_params.timeout_connect = self.timeout
        if ok and client.connected and isinstance(self.settings, TcpSettings):
            error = self._tune_socket(client)
            ok = not error
        elif ok and client.connected and self.settings.rs485 is not None:
            self._rs485_mode(client)
        if not (ok and client.connected):
            client.close()
            target = self.settings.label if isinstance(self.settings, TcpSettings) else self.settings.port
            self.stats.last_error = error or f"cannot connect to {target}"
            if self._backoff.attempt == 0:  # one line per outage, not one per attempt
                log.warning("%s: down: %s", self.name, self.stats.last_error)
            self._down_since = self._down_since if self._down_since is not None else now
            self._retry_at = loop.time() + self._backoff.next()
            raise LinkDown(f"{self.name}: {self.stats.last_error}")
        if self._backoff.attempt:
            log.info("%s: connected again after %d failed attempts", self.name, self._backoff.attempt)
        self._backoff.reset()
        self._retry_at = -math.inf
        self._down_since = None
        self._silent = 0
        self.stats.connects += 1
        return client

    def _tune_socket(self, client: AsyncModbusTcpClient | AsyncModbusSerialClient) -> str:
        """Keepalive and TCP_USER_TIMEOUT so the kernel notices a half-open link; "" or an error."""
        s = self.settings
        assert isinstance(s, TcpSettings)
        transport = client.ctx.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is None:
            return ""
        options = (
            (socket.SOL_SOCKET, "SO_KEEPALIVE", 1),
            (socket.IPPROTO_TCP, "TCP_KEEPIDLE", s.keepalive_idle),
            (socket.IPPROTO_TCP, "TCP_KEEPINTVL", s.keepalive_interval),
            (socket.IPPROTO_TCP, "TCP_KEEPCNT", s.keepalive_count),
            (socket.IPPROTO_TCP, "TCP_USER_TIMEOUT", int(s.user_timeout * 1000)),
            (socket.IPPROTO_TCP, "TCP_NODELAY", 1),
        )
        try:
            for level, name, value in options:
                opt = getattr(socket, name, None)
                if opt is not None:
                    sock.setsockopt(level, opt, value)
        except OSError as e:
            return f"cannot set socket options: {e}"
        return ""

    def _rs485_mode(self, client: AsyncModbusTcpClient | AsyncModbusSerialClient) -> None:
        """Kernel RS-485 mode on the port pymodbus opened. Like the raw serial links, a device
        that refuses it is used without it (the adapter must then switch direction itself)."""
        s = self.settings
        assert isinstance(s, SerialSettings)
        rs = s.rs485
        assert rs is not None
        port = getattr(client.ctx.transport, "sync_serial", None)  # pymodbus 3.11 SerialTransport
        refusal = "the serial port object is not reachable" if port is None else ""
        if port is not None:
            try:
                port.rs485_mode = serial.rs485.RS485Settings(
                    rts_level_for_tx=rs.rts_level_for_tx,
                    rts_level_for_rx=rs.rts_level_for_rx,
                    loopback=rs.rx_during_tx,
                    delay_before_tx=rs.delay_before_tx,
                    delay_before_rx=rs.delay_before_rx,
                )
            except (ValueError, OSError) as e:
                refusal = str(e)
        self.rs485_active = not refusal
        if refusal:
            level = logging.DEBUG if self._rs485_refusal_logged else logging.WARNING
            log.log(level, "%s: device refused kernel RS-485 mode (%s); running without it", self.name, refusal)
            self._rs485_refusal_logged = True

    def _trace_packet(self, sending: bool, data: bytes) -> bytes:
        if sending:
            self.stats.bytes_out += len(data)
            return data
        # ``data`` is pymodbus' whole receive buffer (what is left over plus what arrived), so this
        # counts left-over bytes again when a reply comes in pieces
        self.stats.bytes_in += len(data)
        cap = self._receive_cap
        if len(data) > cap and self._client is not None:
            # Line noise that never forms a frame would stay in pymodbus' buffer and be rescanned
            # (RTU: a CRC per candidate length, in the event loop) on every chunk: keep only the
            # tail that can still hold the awaited reply (pymodbus' scan is quadratic or worse in
            # what it holds). pymodbus 3.11 cuts ``ctx.recv_buffer`` by what the framer used of
            # the data returned here, so both are shortened alike.
            kept = data[-cap:]
            self._client.ctx.recv_buffer = kept
            self.stats.overflow_dropped += len(data) - len(kept)
            return kept
        return data

    def _trace_connect(self, connected: bool) -> None:
        if connected:
            return
        self.stats.losses += 1
        if self._down_since is None:
            self._down_since = asyncio.get_running_loop().time()
        # pymodbus leaves a request in flight waiting out its full timeout when the connection
        # drops under it; fail it now so a reset gateway is LinkDown at once, not NoAnswer later
        client = self._client
        pending = getattr(client.ctx, "response_future", None) if client is not None and self._in_flight else None
        if isinstance(pending, asyncio.Future) and not pending.done():
            pending.set_exception(_ConnectionLost("connection lost while waiting for the reply"))

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

    async def _transact(self, unit: int, function: int, address: int, arg: int | bool) -> Any:
        _unit_ok(unit)
        async with self._lock:
            client = await self._ensure_connected()
            loop = asyncio.get_running_loop()
            if (wait := self._quiet_until - loop.time()) > 0:
                await asyncio.sleep(wait)
            self.transactions += 1
            call = _request(client, function, unit, address, arg)
            self._receive_cap = 2 * _reply_size(function, arg) + 8
            self._in_flight = True
            try:
                response = await call
            except ModbusIOException as e:
                if isinstance(e.__cause__, asyncio.CancelledError):
                    raise e.__cause__ from None  # pymodbus turns our cancellation into an error
                if not client.connected:
                    raise self._lost(str(e)) from None
                if "No response" in str(e):
                    raise self._no_reply(unit, function, address) from None
                raise BadReply(f"{self.name} unit {unit}: {e}") from None
            except (ConnectionException, _ConnectionLost) as e:
                raise self._lost(str(e)) from None
            except OSError as e:
                raise self._lost(str(e)) from None
            except ModbusException as e:
                raise BadReply(f"{self.name} unit {unit}: {e}") from None
            finally:
                self._in_flight = False
            self._silent = 0
            if response is None:
                raise BadReply(f"{self.name} unit {unit}: no PDU in the reply")
            if response.isError():
                code = int(getattr(response, "exception_code", 0))
                if response.function_code != function | 0x80:
                    raise BadReply(
                        f"{self.name} unit {unit}: exception reply to function {response.function_code & 0x7F}"
                    )
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

    def _lost(self, detail: str) -> LinkDown:
        if self._client is not None:
            self._client.close()
        self.stats.last_error = f"connection lost: {detail}"
        log.warning("%s: %s", self.name, self.stats.last_error)
        if self._down_since is None:
            self._down_since = asyncio.get_running_loop().time()
        return LinkDown(f"{self.name}: {self.stats.last_error}")

    def _no_reply(self, unit: int, function: int, address: int) -> NoAnswer | LinkDown:
        self._silent += 1
        self._quiet_until = asyncio.get_running_loop().time() + self.late_reply_guard
        limit = self.settings.no_reply_limit
        if limit and self._silent >= limit:
            # the socket looks fine but nothing answers any more: assume it is half-open
            self.stats.half_open_resets += 1
            self._silent = 0
            return self._lost(f"{limit} transactions in a row without a reply")
        return NoAnswer(
            f"{self.name} unit {unit}: no reply to function {function} at {address} within {self.timeout:.2f} s"
        )


class _ConnectionLost(Exception):
    """Set on pymodbus' pending reply when the connection drops under it (see _trace_connect)."""


def _check_span(function: int, address: int, count: int) -> None:
    limit = _MAX_COUNT[function]
    if not 1 <= count <= limit:
        raise ConfigurationError(f"function {function} reads 1..{limit} at a time, not {count}")
    if address < 0 or address + count > 0x10000:
        raise ConfigurationError(f"addresses {address}..{address + count - 1} are outside 0..65535")


class ReplyDecoder(DecodePDU):
    """pymodbus' response decoder, but a truncated PDU is "undecodable" (None, which pymodbus
    turns into ModbusIOException) instead of a ``struct.error`` escaping from the protocol's
    ``data_received`` (which makes asyncio drop the connection). Found by ``fuzz modbus``:
    several pymodbus 3.11 message classes unpack without checking the length."""

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


def _request(
    client: AsyncModbusTcpClient | AsyncModbusSerialClient, function: int, unit: int, address: int, arg: int | bool
) -> Awaitable[Any]:
    if function == 1:
        return client.read_coils(address, count=int(arg), device_id=unit)
    if function == 2:
        return client.read_discrete_inputs(address, count=int(arg), device_id=unit)
    if function == 3:
        return client.read_holding_registers(address, count=int(arg), device_id=unit)
    if function == 4:
        return client.read_input_registers(address, count=int(arg), device_id=unit)
    if function == _WRITE_COIL:
        return client.write_coil(address, bool(arg), device_id=unit)
    return client.write_register(address, int(arg), device_id=unit)


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

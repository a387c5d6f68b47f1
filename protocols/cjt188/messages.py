"""CJ/T 188 messages, both sides: builders (message -> frame) and :func:`parse_message` (frame -> message).

CJ/T 188-2004 clause 7 (application layer), as transcribed in [S1] (see ``data/cjt188.toml``):

* read (读操作): request ``CTR_0 L=03H DI0 DI1 SER``; normal reply ``CTR_1 L=03H+m DI0 DI1 SER
  N1..Nm``; read data is 01H/81H, read address 03H/83H (DI 810A, the reply's A0..A6 is the
  meter's address), read key version 09H/89H (DI 8106);
* write (写操作): request ``CTR_3 L=03H+m DI0 DI1 SER N1..Nm``; write data 04H/84H, write address
  15H/95H (DI A018), write motor-sync data 16H/96H (DI A016); the reply is ``DI0 DI1 SER`` plus,
  for some DIs, data (A017: ST; A013: the purchase echoed; A014: the key version);
* abnormal reply (从站异常应答帧): ``CTR_2`` = function | C0H, ``L=03H SER ST`` (some meters also
  put the DI first: ``L=05H DI0 DI1 SER ST``; both are accepted);
* SER: the master adds 1 modulo 256 before each exchange (:func:`next_ser`); a meter echoes it.

The DI byte order is the caller's per-meter ``di_order`` (see :mod:`.identifiers`); the default
``"standard"`` sends ``90 1F``. Parsers raise only :class:`~.errors.ProtocolError`: the peer's bad
payloads as :class:`RemoteProtocolError`, a message that cannot be built as :class:`LocalProtocolError`.
Values inside a data field are decoded and encoded by :mod:`.catalogue` (``values()``/``build()``).
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Final, TypeAlias

from meter_gateway.protocols.cjt188.catalogue import Catalogue, Decoded, default_catalogue
from meter_gateway.protocols.cjt188.errors import LocalProtocolError, RemoteProtocolError
from meter_gateway.protocols.cjt188.formats import encode_time
from meter_gateway.protocols.cjt188.frame import WILDCARD, WILDCARD_TYPE, Address, Control, Frame
from meter_gateway.protocols.cjt188.functions import Function
from meter_gateway.protocols.cjt188.identifiers import DiOrder, check_order, di_bytes, di_from
from meter_gateway.protocols.cjt188.status import Status

DI_CURRENT_DATA: Final = 0x901F
DI_ADDRESS: Final = 0x810A
DI_KEY_VERSION: Final = 0x8106
DI_PURCHASE: Final = 0xA013
DI_STANDARD_TIME: Final = 0xA015
DI_SYNC_DATA: Final = 0xA016
DI_VALVE: Final = 0xA017
DI_WRITE_ADDRESS: Final = 0xA018

_READ_FUNCTIONS: Final = frozenset({Function.READ_DATA, Function.READ_ADDRESS, Function.READ_KEY_VERSION})
_WRITE_FUNCTIONS: Final = frozenset({Function.WRITE_DATA, Function.WRITE_ADDRESS, Function.WRITE_SYNC_DATA})


_STATUS_OK: Final = Status()
_NO_CONTROL: Final = Control(0)


def next_ser(ser: int) -> int:
    """The next sequence number: +1 modulo 256 before each exchange (clause 7.1)."""
    return (ser + 1) & 0xFF


def _check_ser(ser: int) -> None:
    if isinstance(ser, bool) or not isinstance(ser, int) or not 0 <= ser <= 0xFF:
        raise LocalProtocolError(f"SER is one byte, got {ser!r}")


def _function_for(di: int, group: frozenset[Function], default: Function) -> Function:
    """The function of ``di`` per the catalogue (810A reads with 03H, A018 writes with 15H ...)."""
    item = default_catalogue().get(di)
    return item.function if item is not None and item.function in group else default


@dataclass(frozen=True, slots=True)
class _Message:
    """Common base: meter type T and address; subclasses give the function and the data field."""

    meter_type: int
    address: Address

    FROM_METER: ClassVar[bool] = False

    def function(self) -> int:
        raise NotImplementedError

    def control(self) -> Control:
        return Control(self.function(), from_meter=self.FROM_METER)

    def payload(self, di_order: DiOrder = "standard") -> bytes:
        raise NotImplementedError

    def to_frame(self, di_order: DiOrder = "standard") -> Frame:
        return Frame(self.meter_type, self.address, self.control(), self.payload(check_order(di_order)))

    def encode(self, di_order: DiOrder = "standard", preamble: int = 0) -> bytes:
        """The frame's bytes; ``preamble`` FE wake-up bytes first (the standard sends 2-4)."""
        return self.to_frame(di_order).encode(preamble)


# --- master -> meter ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReadRequest(_Message):
    """Read ``di``: 01H for data, 03H for the address (810A), 09H for the key version (8106)."""

    di: int = DI_CURRENT_DATA
    ser: int = 0

    def function(self) -> int:
        return _function_for(self.di, _READ_FUNCTIONS, Function.READ_DATA)

    def payload(self, di_order: DiOrder = "standard") -> bytes:
        _check_ser(self.ser)
        return di_bytes(self.di, di_order) + bytes((self.ser,))

    @classmethod
    def current_data(cls, meter_type: int, address: Address, ser: int = 0) -> ReadRequest:
        """Read current data (901F)."""
        return cls(meter_type, address, DI_CURRENT_DATA, ser)

    @classmethod
    def meter_address(cls, ser: int = 0, meter_type: int = WILDCARD_TYPE, address: Address = WILDCARD) -> ReadRequest:
        """Read the address (810A) of the one meter on a one-to-one link: wildcard T and address."""
        return cls(meter_type, address, DI_ADDRESS, ser)


@dataclass(frozen=True, slots=True)
class WriteRequest(_Message):
    """Write ``di`` with ``data`` (the bytes after ``DI SER``): 04H, or 15H for A018, 16H for A016."""

    di: int = DI_VALVE
    ser: int = 0
    data: bytes = b""

    def function(self) -> int:
        return _function_for(self.di, _WRITE_FUNCTIONS, Function.WRITE_DATA)

    def payload(self, di_order: DiOrder = "standard") -> bytes:
        _check_ser(self.ser)
        return di_bytes(self.di, di_order) + bytes((self.ser,)) + self.data

    def values(self, catalogue: Catalogue | None = None) -> Decoded:
        return (catalogue or default_catalogue()).decode_request(self.di, self.data)

    @classmethod
    def build(
        cls,
        meter_type: int,
        address: Address,
        di: int,
        values: Mapping[str, object],
        *,
        ser: int = 0,
        catalogue: Catalogue | None = None,
    ) -> WriteRequest:
        """A write of ``di`` whose data the catalogue encodes from ``values`` (by field name)."""
        return cls(meter_type, address, di, ser, (catalogue or default_catalogue()).encode_request(di, values))

    @classmethod
    def valve(cls, meter_type: int, address: Address, open_valve: bool, ser: int = 0) -> WriteRequest:
        """写阀门控制 A017: 55H opens, 99H closes."""
        return cls.build(meter_type, address, DI_VALVE, {"valve.command": "open" if open_valve else "close"}, ser=ser)

    @classmethod
    def standard_time(cls, meter_type: int, address: Address, when: datetime.datetime, ser: int = 0) -> WriteRequest:
        """写标准时间 A015: ``when`` is the meter's naive local time, passed in (no clock here)."""
        return cls(meter_type, address, DI_STANDARD_TIME, ser, encode_time(when))

    @classmethod
    def purchase(
        cls, meter_type: int, address: Address, sequence: int, amount: float | str, ser: int = 0
    ) -> WriteRequest:
        """写购入金额 A013: purchase ``sequence`` (one byte) and ``amount`` (XXXXXX.XX yuan)."""
        values = {"purchase.sequence": sequence, "purchase.amount": amount}
        return cls.build(meter_type, address, DI_PURCHASE, values, ser=ser)

    @classmethod
    def new_address(cls, meter_type: int, address: Address, new: Address, ser: int = 0) -> WriteRequest:
        """写地址 A018 (function 15H): ``new`` becomes the meter's address."""
        return cls(meter_type, address, DI_WRITE_ADDRESS, ser, new.wire)


# --- meter -> master ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReadReply(_Message):
    """A normal read reply (81H/83H/89H): ``DI SER`` and the item's data."""

    di: int = DI_CURRENT_DATA
    ser: int = 0
    data: bytes = b""

    FROM_METER: ClassVar[bool] = True

    def function(self) -> int:
        return _function_for(self.di, _READ_FUNCTIONS, Function.READ_DATA)

    def payload(self, di_order: DiOrder = "standard") -> bytes:
        _check_ser(self.ser)
        return di_bytes(self.di, di_order) + bytes((self.ser,)) + self.data

    def values(self, catalogue: Catalogue | None = None) -> Decoded:
        """The data decoded by the catalogue for this meter type (tolerant; see Decoded.warnings)."""
        return (catalogue or default_catalogue()).decode_reply(self.di, self.meter_type, self.data)

    @property
    def meter_address(self) -> Address:
        """A read-address reply's answer: the frame's own address (Table 7)."""
        return self.address

    @classmethod
    def build(
        cls,
        meter_type: int,
        address: Address,
        di: int,
        values: Mapping[str, object],
        *,
        ser: int = 0,
        catalogue: Catalogue | None = None,
    ) -> ReadReply:
        """What a meter (or simulator) answers for ``di``; ``values`` keyed by field name, e.g.
        ``{"volume.total": 12.5, "volume.settlement": (3, "L"), "meter.time": dt, "status": Status()}``."""
        data = (catalogue or default_catalogue()).encode_reply(di, meter_type, values)
        return cls(meter_type, address, di, ser, data)


@dataclass(frozen=True, slots=True)
class WriteReply(_Message):
    """A normal write acknowledgement (84H/95H/96H): ``DI SER`` and, for some DIs, data."""

    di: int = DI_VALVE
    ser: int = 0
    data: bytes = b""

    FROM_METER: ClassVar[bool] = True

    def function(self) -> int:
        return _function_for(self.di, _WRITE_FUNCTIONS, Function.WRITE_DATA)

    def payload(self, di_order: DiOrder = "standard") -> bytes:
        _check_ser(self.ser)
        return di_bytes(self.di, di_order) + bytes((self.ser,)) + self.data

    @property
    def status(self) -> Status | None:
        """ST when the acknowledgement carries one (A017, and meters that add it to any write)."""
        return Status.from_bytes(self.data) if len(self.data) == 2 else None

    def values(self, catalogue: Catalogue | None = None) -> Decoded:
        return (catalogue or default_catalogue()).decode_reply(self.di, self.meter_type, self.data)

    @classmethod
    def ack(
        cls,
        meter_type: int,
        address: Address,
        di: int,
        *,
        ser: int = 0,
        status: Status | None = None,
        values: Mapping[str, object] | None = None,
        catalogue: Catalogue | None = None,
    ) -> WriteReply:
        """The acknowledgement of a write of ``di``: with ``status`` (A017 and others that send
        ST) or ``values`` for DIs whose reply has other data (A013, A014), else just ``DI SER``."""
        if status is not None and values is not None:
            raise LocalProtocolError("give status or values, not both")
        if status is not None:
            data = status.to_bytes()
        elif values is not None:
            data = (catalogue or default_catalogue()).encode_reply(di, meter_type, values)
        else:
            data = b""
        return cls(meter_type, address, di, ser, data)


@dataclass(frozen=True, slots=True)
class ErrorReply(_Message):
    """An abnormal reply (control D6 set): ``SER ST`` (L=03H), or ``DI SER ST`` (L=05H) when ``di``."""

    code: int = Function.READ_DATA  # the function the meter refuses
    ser: int = 0
    status: Status = _STATUS_OK
    di: int | None = None

    FROM_METER: ClassVar[bool] = True

    def function(self) -> int:
        return self.code

    def control(self) -> Control:
        return Control(self.code, from_meter=True, abnormal=True)

    def payload(self, di_order: DiOrder = "standard") -> bytes:
        _check_ser(self.ser)
        head = b"" if self.di is None else di_bytes(self.di, di_order)
        return head + bytes((self.ser,)) + self.status.to_bytes()


@dataclass(frozen=True, slots=True)
class OtherMessage(_Message):
    """A frame of a manufacturer-defined (1XXXXXB) or unknown function, kept as it came."""

    control_code: Control = _NO_CONTROL
    data: bytes = b""

    def function(self) -> int:
        return self.control_code.function

    def control(self) -> Control:
        return self.control_code

    def payload(self, di_order: DiOrder = "standard") -> bytes:
        return self.data


Message: TypeAlias = ReadRequest | WriteRequest | ReadReply | WriteReply | ErrorReply | OtherMessage


def parse_message(frame: Frame, di_order: DiOrder = "standard") -> Message:
    """The message a frame carries (tolerant: see the module docstring for what is accepted)."""
    order = check_order(di_order)
    control, data = frame.control, frame.data
    t, address = frame.meter_type, frame.address
    function = control.function
    if control.from_meter and control.abnormal:
        if len(data) == 3:
            return ErrorReply(t, address, function, data[0], Status.from_bytes(data[1:3]))
        if len(data) == 5:
            return ErrorReply(t, address, function, data[2], Status.from_bytes(data[3:5]), di_from(data, order))
        raise RemoteProtocolError(
            f"abnormal reply: data field of {len(data)} bytes, expected SER ST (3) or DI SER ST (5)"
        )
    if function in _READ_FUNCTIONS or function in _WRITE_FUNCTIONS:
        if len(data) < 3:
            kind = _kind(function, control.from_meter)
            raise RemoteProtocolError(f"{kind}: data field of {len(data)} bytes, expected DI SER")
        di, ser, rest = di_from(data, order), data[2], data[3:]
        if function in _READ_FUNCTIONS:
            if control.from_meter:
                return ReadReply(t, address, di, ser, rest)
            if rest:
                raise RemoteProtocolError(f"read request: {len(rest)} unexpected byte(s) after DI SER")
            return ReadRequest(t, address, di, ser)
        if control.from_meter:
            return WriteReply(t, address, di, ser, rest)
        return WriteRequest(t, address, di, ser, rest)
    return OtherMessage(t, address, control, data)


def _kind(function: int, from_meter: bool) -> str:
    try:
        name = Function(function).name.lower().replace("_", " ")
    except ValueError:
        name = f"function {function:02X}"
    return f"{name} {'reply' if from_meter else 'request'}"

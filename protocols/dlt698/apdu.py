"""DL/T 698.45 APDUs: the application-layer services of DL/T 698.45-2017 clauses 6.3.4-6.3.16.

Every APDU is a frozen dataclass with keyword-only fields; :func:`parse_apdu` decodes any of
them (tolerantly: oddities go to ``warnings``) and ``apdu.encode()`` encodes one strictly.

APDU families (clause 6.3.4) and what follows the service:

* LINK-APDU: LINK-Request [1] / LINK-Response [129]; nothing follows.
* Client-APDU: CONNECT [2], RELEASE [3], GET [5], SET [6], ACTION [7], REPORT-Response [8],
  PROXY [9], ERROR-Response [110]; followed by ``TimeTag OPTIONAL``.
* Server-APDU: CONNECT [130], RELEASE [131, 132], GET [133], SET [134], ACTION [135],
  REPORT-Notification [136], PROXY [137], ERROR-Response [238]; followed by
  ``FollowReport OPTIONAL`` and ``TimeTag OPTIONAL``.
* Security-APDU: SECURITY-Request [16] / SECURITY-Response [144] (clause 6.3.13 / Appendix G):
  the wrapped APDU is an octet-string; plaintext is decoded into :attr:`SecurityRequest.inner`,
  ciphertext is kept as opaque bytes. Nothing follows.

PIID (clause 6.3.4): bit 7 priority, bits 0-5 service sequence number; PIID-ACD adds bit 6, the
server's "I have something to report" flag. A missing trailer byte at the very end of an APDU is
accepted with a warning (some meters omit it); encoding always writes it.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Final, NamedTuple, TypeVar

import msgspec

from meter_gateway.protocols.dlt698.axdr import (
    COMDCB,
    CSD,
    OAD,
    OADS,
    OMD,
    RCSD,
    RSD,
    TI,
    Data,
    DateTime,
    DateTimeS,
    decode_data,
    decode_date_time,
    decode_date_time_s,
    decode_length,
    decode_oad,
    decode_octets,
    decode_omd,
    decode_rcsd,
    decode_rsd,
    decode_ti,
    encode_data,
    encode_date_time,
    encode_date_time_s,
    encode_length,
    encode_oad,
    encode_octets,
    encode_omd,
    encode_rcsd,
    encode_rsd,
    encode_ti,
    oad_of,
)
from meter_gateway.protocols.dlt698.errors import LocalProtocolError, RemoteProtocolError

# ---- building blocks ---------------------------------------------------------------------------


class Piid(NamedTuple):
    """PIID / PIID-ACD: service sequence number 0-63, priority, and (PIID-ACD) the ACD flag."""

    seq: int = 0
    high_priority: bool = False
    acd: bool = False

    @property
    def byte(self) -> int:
        if not 0 <= self.seq <= 63:
            raise LocalProtocolError(f"PIID sequence {self.seq} does not fit in 6 bits")
        return self.seq | (0x80 if self.high_priority else 0) | (0x40 if self.acd else 0)

    @classmethod
    def from_byte(cls, byte: int) -> Piid:
        return _PIIDS[byte]


_PIIDS: Final = tuple(Piid(b & 0x3F, bool(b & 0x80), bool(b & 0x40)) for b in range(256))
PIID0: Final = _PIIDS[0]


class TimeTag(NamedTuple):
    """Send time and allowed transmission delay; a server drops requests older than that."""

    send_time: DateTimeS
    delay: TI


class ResultNormal(msgspec.Struct, frozen=True, gc=False):
    """A-ResultNormal: an OAD and either its Data or a DAR.

    A Struct rather than a NamedTuple: one is decoded for every object a response carries, and a
    Struct is built in one C call. It is not a tuple: read it by field name. It holds decoded
    data only, never a cycle, so the garbage collector need not track it (``gc=False``)."""

    oad: OAD
    data: Data | None = None
    dar: int | None = None


class ResultRecord(NamedTuple):
    """A-ResultRecord: columns and rows (one Data per column), or a DAR."""

    oad: OAD
    rcsd: RCSD
    rows: tuple[tuple[Data, ...], ...] | None = None
    dar: int | None = None


class FollowReport(NamedTuple):
    """FollowReport: results the server piggybacks on a response (``records`` False: A-ResultNormal)."""

    results: tuple[ResultNormal, ...] | tuple[ResultRecord, ...]
    records: bool = False


class GetRecord(NamedTuple):
    oad: OAD
    rsd: RSD
    rcsd: RCSD


class SetThenGetItem(NamedTuple):
    oad: OAD
    data: Data
    get_oad: OAD
    delay: int


class SetThenGetResult(NamedTuple):
    oad: OAD
    dar: int
    get: ResultNormal


class ActionItem(NamedTuple):
    omd: OMD
    data: Data


class ActionResult(NamedTuple):
    omd: OMD
    dar: int
    data: Data | None = None


class ActionThenGetItem(NamedTuple):
    omd: OMD
    data: Data
    get_oad: OAD
    delay: int


class ActionThenGetResult(NamedTuple):
    omd: OMD
    dar: int
    data: Data | None
    get: ResultNormal


class SetResult(NamedTuple):
    oad: OAD
    dar: int


class FactoryVersion(NamedTuple):
    """CONNECT-Response's 服务器厂商版本信息: fixed-size visible-strings (4, 4, 6, 4, 6, 8)."""

    vendor: str
    software_version: str
    software_date: str
    hardware_version: str
    hardware_date: str
    extra: str


_FACTORY_SIZES: Final = (4, 4, 6, 4, 6, 8)


class ConnectMechanism(NamedTuple):
    """ConnectMechanismInfo: 0 NullSecurity, 1 PasswordSecurity (password), 2 SymmetrySecurity
    (ciphertext, signature), 3 SignatureSecurity (ciphertext, signature)."""

    kind: int = 0
    password: str = ""
    ciphertext: bytes = b""
    signature: bytes = b""


NULL_SECURITY: Final = ConnectMechanism()
MECHANISMS: Final = ("NullSecurity", "PasswordSecurity", "SymmetrySecurity", "SignatureSecurity")


class Verification(NamedTuple):
    """SECURITY-Request 数据验证信息: 0 SID_MAC, 1 RN, 2 RN_MAC, 3 SID."""

    kind: int
    rn: bytes = b""
    mac: bytes = b""
    sid: int = 0
    sid_extra: bytes = b""


VERIFICATIONS: Final = ("SID_MAC", "RN", "RN_MAC", "SID")

# ---- the APDU base classes ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True, repr=False, eq=False)
class Apdu:
    """Base of every APDU. ``SERVICE`` is the outer service name, ``NAME`` the CHOICE's."""

    TAG: ClassVar[int] = -1
    CHOICE: ClassVar[int | None] = None
    SERVICE: ClassVar[str] = ""
    NAME: ClassVar[str] = ""
    FAMILY: ClassVar[str] = ""  # link, client, server, security
    warnings: tuple[str, ...] = field(default=(), compare=False, repr=False)

    # one repr, == and hash for every APDU, as dataclass would write them for each (repr=False,
    # eq=False above): 46 classes' generated methods were a fifth of the module's memory
    def __repr__(self) -> str:
        shown = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if f.repr)
        return f"{self.__class__.__qualname__}({shown})"

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return _compared(self) == _compared(other)

    def __hash__(self) -> int:
        return hash(_compared(self))

    def encode(self) -> bytes:
        """The APDU's bytes (strict)."""
        out = bytearray((self.TAG,))
        if self.CHOICE is not None:
            out.append(self.CHOICE)
        self._body(out)
        self._trailer(out)
        return bytes(out)

    def _body(self, out: bytearray) -> None:
        raise LocalProtocolError(f"encoding {type(self).__name__} is not supported")

    def _trailer(self, out: bytearray) -> None:
        pass


@dataclass(frozen=True, slots=True, kw_only=True, repr=False, eq=False)
class ClientApdu(Apdu):
    FAMILY: ClassVar[str] = "client"
    piid: Piid = PIID0
    timetag: TimeTag | None = None

    def _trailer(self, out: bytearray) -> None:
        _encode_timetag(out, self.timetag)


@dataclass(frozen=True, slots=True, kw_only=True, repr=False, eq=False)
class ServerApdu(Apdu):
    FAMILY: ClassVar[str] = "server"
    piid: Piid = PIID0
    follow_report: FollowReport | None = None
    timetag: TimeTag | None = None

    def _trailer(self, out: bytearray) -> None:
        if self.follow_report is None:
            out.append(0)
        else:
            out += bytes((1, 2 if self.follow_report.records else 1))
            encode_length(out, len(self.follow_report.results))
            for result in self.follow_report.results:
                if isinstance(result, ResultRecord):
                    _encode_result_record(out, result)
                else:
                    _encode_result_normal(out, result)
        _encode_timetag(out, self.timetag)


def _compared(apdu: Apdu) -> tuple[Any, ...]:
    """The values of the fields ``==`` and ``hash`` look at (all but ``warnings``), in order."""
    return tuple(getattr(apdu, f.name) for f in fields(apdu) if f.compare)


# ---- LINK (clause 6.2 pre-connection; Appendix D.1) ------------------------------------------


LINK_KINDS: Final = ("login", "heartbeat", "logout")


@dataclass(frozen=True, slots=True, kw_only=True, repr=False, eq=False)
class LinkRequest(Apdu):
    """A terminal's login (0), heartbeat (1) or logout (2) with its heartbeat period and clock."""

    TAG: ClassVar[int] = 1
    SERVICE: ClassVar[str] = "LINK-Request"
    NAME: ClassVar[str] = "LinkRequest"
    FAMILY: ClassVar[str] = "link"
    piid: Piid = PIID0
    kind: int = 0
    heartbeat: int = 0  # seconds
    time: DateTime

    def _body(self, out: bytearray) -> None:
        out.append(self.piid.byte)
        out.append(self.kind)
        out += _u16(self.heartbeat, "heartbeat period")
        encode_date_time(out, self.time)


@dataclass(frozen=True, slots=True, kw_only=True, repr=False, eq=False)
class LinkResponse(Apdu):
    """The master's answer to a LINK-Request: result (0 ok, 1 duplicate address, 2 illegal
    device, 3 over capacity), clock-trusted flag (bit 7) and the three timestamps the terminal
    uses to correct its clock: its request time, our receive time and our response time."""

    TAG: ClassVar[int] = 129
    SERVICE: ClassVar[str] = "LINK-Response"
    NAME: ClassVar[str] = "LinkResponse"
    FAMILY: ClassVar[str] = "link"
    piid: Piid = PIID0
    result: int = 0
    clock_trusted: bool = True
    request_time: DateTime
    receive_time: DateTime
    response_time: DateTime

    def _body(self, out: bytearray) -> None:
        if not 0 <= self.result <= 7:
            raise LocalProtocolError(f"LINK result {self.result} does not fit in 3 bits")
        out.append(self.piid.byte)
        out.append(self.result | (0x80 if self.clock_trusted else 0))
        encode_date_time(out, self.request_time)
        encode_date_time(out, self.receive_time)
        encode_date_time(out, self.response_time)


# ---- CONNECT / RELEASE (clause 6.2 application connection; Appendix D.2) ---------------------


# The protocol version a CONNECT offers by default: what field devices answer in public captures
# (the standard's Appendix D.2 example shows 0010; a meter refusing ours names its own).
PROTOCOL_VERSION: Final = 0x0016


@dataclass(frozen=True, slots=True, kw_only=True, repr=False, eq=False)
class ConnectRequest(ClientApdu):
    TAG: ClassVar[int] = 2
    SERVICE: ClassVar[str] = "CONNECT-Request"
    NAME: ClassVar[str] = "ConnectRequest"
    version: int = PROTOCOL_VERSION
    protocol_conformance: bytes = b"\xff" * 8  # 64-bit conformance block (Appendix C)
    function_conformance: bytes = b"\xff" * 16  # 128-bit conformance block (Appendix C)
    send_max: int = 1024
    receive_max: int = 1024
    window: int = 1
    apdu_max: int = 1024
    timeout: int = 7200  # seconds the association lives without traffic
    mechanism: ConnectMechanism = NULL_SECURITY

    def _body(self, out: bytearray) -> None:
        if len(self.protocol_conformance) != 8 or len(self.function_conformance) != 16:
            raise LocalProtocolError("conformance blocks are 8 and 16 bytes")
        out.append(self.piid.byte)
        out += _u16(self.version, "version")
        out += self.protocol_conformance + self.function_conformance
        out += _u16(self.send_max, "send_max") + _u16(self.receive_max, "receive_max")
        out.append(_u8(self.window, "window"))
        out += _u16(self.apdu_max, "apdu_max")
        out += _u32(self.timeout, "timeout")
        m = self.mechanism
        out.append(m.kind)
        if m.kind == 1:
            encode_octets(out, m.password.encode("ascii"))
        elif m.kind in (2, 3):
            encode_octets(out, m.ciphertext)
            encode_octets(out, m.signature)
        elif m.kind != 0:
            raise LocalProtocolError(f"connect mechanism {m.kind} is not defined")


@dataclass(frozen=True, slots=True, kw_only=True, repr=False, eq=False)
class ConnectResponse(ServerApdu):
    """result: 0 allowed, 1 password error, 2 symmetric decryption error, 3 asymmetric decryption
    error, 4 signature error, 5 protocol version mismatch, 255 other."""

    TAG: ClassVar[int] = 130
    SERVICE: ClassVar[str] = "CONNECT-Response"
    NAME: ClassVar[str] = "ConnectResponse"
    factory: FactoryVersion
    version: int
    protocol_conformance: bytes
    function_conformance: bytes
    send_max: int
    receive_max: int
    window: int
    apdu_max: int
    timeout: int
    result: int = 0
    server_rn: bytes | None = None
    server_signature: bytes | None = None

    def _body(self, out: bytearray) -> None:
        out.append(self.piid.byte)
        for text, size in zip(self.factory, _FACTORY_SIZES, strict=True):
            raw = text.encode("latin-1")
            if len(raw) != size:
                raise LocalProtocolError(f"factory version field {text!r} must be {size} characters")
            out += raw
        out += _u16(self.version, "version") + self.protocol_conformance + self.function_conformance
        out += _u16(self.send_max, "send_max") + _u16(self.receive_max, "receive_max")
        out.append(_u8(self.window, "window"))
        out += _u16(self.apdu_max, "apdu_max") + _u32(self.timeout, "timeout")
        out.append(_u8(self.result, "connect result"))
        if self.server_rn is None:
            out.append(0)
        else:
            out.append(1)
            encode_octets(out, self.server_rn)
            encode_octets(out, self.server_signature or b"")


@dataclass(frozen=True, slots=True, kw_only=True, repr=False, eq=False)
class ReleaseRequest(ClientApdu):
    TAG: ClassVar[int] = 3
    SERVICE: ClassVar[str] = "RELEASE-Request"
    NAME: ClassVar[str] = "ReleaseRequest"

    def _body(self, out: bytearray) -> None:
        out.append(self.piid.byte)


@dataclass(frozen=True, slots=True, kw_only=True, repr=False, eq=False)
class ReleaseResponse(ServerApdu):
    TAG: ClassVar[int] = 131
    SERVICE: ClassVar[str] = "RELEASE-Response"
    NAME: ClassVar[str] = "ReleaseResponse"
    result: int = 0

    def _body(self, out: bytearray) -> None:
        out += bytes((self.piid.byte, _u8(self.result, "result")))


@dataclass(frozen=True, slots=True, kw_only=True, repr=False, eq=False)
class ReleaseNotification(ServerApdu):
    TAG: ClassVar[int] = 132
    SERVICE: ClassVar[str] = "RELEASE-Notification"
    NAME: ClassVar[str] = "ReleaseNotification"
    connected_at: DateTimeS
    now: DateTimeS

    def _body(self, out: bytearray) -> None:
        out.append(self.piid.byte)
        encode_date_time_s(out, self.connected_at)
        encode_date_time_s(out, self.now)


# ---- GET (clause 6.3.7; Appendix D.3) --------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True, repr=False, eq=False)
class GetRequestNormal(ClientApdu):
    TAG: ClassVar[int] = 5
    CHOICE: ClassVar[int | None] = 1
    SERVICE: ClassVar[str] = "GET-Request"
    NAME: ClassVar[str] = "GetRequestNormal"
    oad: OAD

    def _body(self, out: bytearray) -> None:
        out.append(self.piid.byte)
        encode_oad(out, self.oad)


@dataclass(frozen=True, slots=True, kw_only=True, repr=False, eq=False)
class GetRequestNormalList(ClientApdu):
    TAG: ClassVar[int] = 5
    CHOICE: ClassVar[int | None] = 2
    SERVICE: ClassVar[str] = "GET-Request"
    NAME: ClassVar[str] = "GetRequestNormalList"
    oads: tuple[OAD, ...]

    def _body(self, out: bytearray) -> None:
        out.append(self.piid.byte)
        encode_length(out, len(self.oads))
        for oad in self.oads:
            encode_oad(out, oad)


@dataclass(frozen=True, slots=True, kw_only=True, repr=False, eq=False)
class GetRequestRecord(ClientApdu):
    TAG: ClassVar[int] = 5
    CHOICE: ClassVar[int | None] = 3
    SERVICE: ClassVar[str] = "GET-Request"
    NAME: ClassVar[str] = "GetRequestRecord"
    record: GetRecord

    def _body(self, out: bytearray) -> None:
        out.append(self.piid.byte)
        _encode_get_record(out, self.record)


@dataclass(frozen=True, slots=True, kw_only=True, repr=False, eq=False)
class GetRequestRecordList(ClientApdu):
    TAG: ClassVar[int] = 5
    CHOICE: ClassVar[int | None] = 4
    SERVICE: ClassVar[str] = "GET-Request"
    NAME: ClassVar[str] = "GetRequestRecordList"
    records: tuple[GetRecord, ...]

    def _body(self, out: bytearray) -> None:
        out.append(self.piid.byte)
        encode_length(out, len(self.records))
        for record in self.records:
            _encode_get_record(out, record)


@dataclass(frozen=True, slots=True, kw_only=True, repr=False, eq=False)
class GetRequestNext(ClientApdu):
    """Ask for the block after ``last_block`` (application-layer block transfer, clause 6.1)."""

    TAG: ClassVar[int] = 5
    CHOICE: ClassVar[int | None] = 5
    SERVICE: ClassVar[str] = "GET-Request"
    NAME: ClassVar[str] = "GetRequestNext"
    last_block: int

    def _body(self, out: bytearray) -> None:
        out.append(self.piid.byte)
        out += _u16(self.last_block, "block number")


@dataclass(frozen=True, slots=True, kw_only=True, repr=False, eq=False)
class GetRequestMD5(ClientApdu):
    TAG: ClassVar[int] = 5
    CHOICE: ClassVar[int | None] = 6
    SERVICE: ClassVar[str] = "GET-Request"
    NAME: ClassVar[str] = "GetRequestMD5"
    oad: OAD

    def _body(self, out: bytearray) -> None:
        out.append(self.piid.byte)
        encode_oad(out, self.oad)


@dataclass(frozen=True, slots=True, kw_only=True, repr=False, eq=False)
class GetResponseNormal(ServerApdu):
    TAG: ClassVar[int] = 133
    CHOICE: ClassVar[int | None] = 1
    SERVICE: ClassVar[str] = "GET-Response"
    NAME: ClassVar[str] = "GetResponseNormal"
    result: ResultNormal

    def _body(self, out: bytearray) -> None:
        out.append(self.piid.byte)
        _encode_result_normal(out, self.result)


@dataclass(frozen=True, slots=True, kw_only=True, repr=False, eq=False)
class GetResponseNormalList(ServerApdu):
    TAG: ClassVar[int] = 133
    CHOICE: ClassVar[int | None] = 2
    SERVICE: ClassVar[str] = "GET-Response"
    NAME: ClassVar[str] = "GetResponseNormalList"
    results: tuple[ResultNormal, ...]

    def _body(self, out: bytearray) -> None:
        out.append(self.piid.byte)
        encode_length(out, len(self.results))
        for result in self.results:
            _encode_result_normal(out, result)


@dataclass(frozen=True, slots=True, kw_only=True, repr=False, eq=False)
class GetResponseRecord(ServerApdu):
    TAG: ClassVar[int] = 133
    CHOICE: ClassVar[int | None] = 3
    SERVICE: ClassVar[str] = "GET-Response"
    NAME: ClassVar[str] = "GetResponseRecord"
    result: ResultRecord

    def _body(self, out: bytearray) -> None:
        out.append(self.piid.byte)
        _encode_result_record(out, self.result)


@dataclass(frozen=True, slots=True, kw_only=True, repr=False, eq=False)
class GetResponseRecordList(ServerApdu):
    TAG: ClassVar[int] = 133
    CHOICE: ClassVar[int | None] = 4
    SERVICE: ClassVar[str] = "GET-Response"
    NAME: ClassVar[str] = "GetResponseRecordList"
    results: tuple[ResultRecord, ...]

    def _body(self, out: bytearray) -> None:
        out.append(self.piid.byte)
        encode_length(out, len(self.results))
        for result in self.results:
            _encode_result_record(out, result)


@dataclass(frozen=True, slots=True, kw_only=True, repr=False, eq=False)
class GetResponseNext(ServerApdu):
    """One block of a long GET: ``results`` (normal or record results) or ``dar``."""

    TAG: ClassVar[int] = 133
    CHOICE: ClassVar[int | None] = 5
    SERVICE: ClassVar[str] = "GET-Response"
    NAME: ClassVar[str] = "GetResponseNext"
    last: bool
    block: int
    dar: int | None = None
    results: tuple[ResultNormal, ...] | tuple[ResultRecord, ...] = ()
    records: bool = False

    def _body(self, out: bytearray) -> None:
        out.append(self.piid.byte)
        out.append(1 if self.last else 0)
        out += _u16(self.block, "block number")
        if self.dar is not None:
            out += bytes((0, _u8(self.dar, "DAR")))
            return
        out.append(2 if self.records else 1)
        encode_length(out, len(self.results))
        for result in self.results:
            if isinstance(result, ResultRecord):
                _encode_result_record(out, result)
            else:
                _encode_result_normal(out, result)


@dataclass(frozen=True, slots=True, kw_only=True, repr=False, eq=False)
class GetResponseMD5(ServerApdu):
    TAG: ClassVar[int] = 133
    CHOICE: ClassVar[int | None] = 6
    SERVICE: ClassVar[str] = "GET-Response"
    NAME: ClassVar[str] = "GetResponseMD5"
    oad: OAD
    dar: int | None = None
    md5: bytes | None = None

    def _body(self, out: bytearray) -> None:
        out.append(self.piid.byte)
        encode_oad(out, self.oad)
        if self.dar is not None:
            out += bytes((0, _u8(self.dar, "DAR")))
        else:
            out.append(1)
            encode_octets(out, self.md5 or b"")


# ---- SET (clause 6.3.8; Appendix D.4) --------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True, repr=False, eq=False)
class SetRequestNormal(ClientApdu):
    TAG: ClassVar[int] = 6
    CHOICE: ClassVar[int | None] = 1
    SERVICE: ClassVar[str] = "SET-Request"
    NAME: ClassVar[str] = "SetRequestNormal"
    oad: OAD
    data: Data

    def _body(self, out: bytearray) -> None:
        out.append(self.piid.byte)
        encode_oad(out, self.oad)
        encode_data(out, self.data)


@dataclass(frozen=True, slots=True, kw_only=True, repr=False, eq=False)
class SetRequestNormalList(ClientApdu):
    TAG: ClassVar[int] = 6
    CHOICE: ClassVar[int | None] = 2
    SERVICE: ClassVar[str] = "SET-Request"
    NAME: ClassVar[str] = "SetRequestNormalList"
    items: tuple[tuple[OAD, Data], ...]

    def _body(self, out: bytearray) -> None:
        out.append(self.piid.byte)
        encode_length(out, len(self.items))
        for oad, data in self.items:
            encode_oad(out, oad)
            encode_data(out, data)


@dataclass(frozen=True, slots=True, kw_only=True, repr=False, eq=False)
class SetThenGetRequestNormalList(ClientApdu):
    TAG: ClassVar[int] = 6
    CHOICE: ClassVar[int | None] = 3
    SERVICE: ClassVar[str] = "SET-Request"
    NAME: ClassVar[str] = "SetThenGetRequestNormalList"
    items: tuple[SetThenGetItem, ...]

    def _body(self, out: bytearray) -> None:
        out.append(self.piid.byte)
        encode_length(out, len(self.items))
        for item in self.items:
            encode_oad(out, item.oad)
            encode_data(out, item.data)
            encode_oad(out, item.get_oad)
            out.append(_u8(item.delay, "delay"))


@dataclass(frozen=True, slots=True, kw_only=True, repr=False, eq=False)
class SetResponseNormal(ServerApdu):
    TAG: ClassVar[int] = 134
    CHOICE: ClassVar[int | None] = 1
    SERVICE: ClassVar[str] = "SET-Response"
    NAME: ClassVar[str] = "SetResponseNormal"
    oad: OAD
    dar: int

    def _body(self, out: bytearray) -> None:
        out.append(self.piid.byte)
        encode_oad(out, self.oad)
        out.append(_u8(self.dar, "DAR"))


@dataclass(frozen=True, slots=True, kw_only=True, repr=False, eq=False)
class SetResponseNormalList(ServerApdu):
    TAG: ClassVar[int] = 134
    CHOICE: ClassVar[int | None] = 2
    SERVICE: ClassVar[str] = "SET-Response"
    NAME: ClassVar[str] = "SetResponseNormalList"
    results: tuple[SetResult, ...]

    def _body(self, out: bytearray) -> None:
        out.append(self.piid.byte)
        encode_length(out, len(self.results))
        for result in self.results:
            encode_oad(out, result.oad)
            out.append(_u8(result.dar, "DAR"))


@dataclass(frozen=True, slots=True, kw_only=True, repr=False, eq=False)
class SetThenGetResponseNormalList(ServerApdu):
    TAG: ClassVar[int] = 134
    CHOICE: ClassVar[int | None] = 3
    SERVICE: ClassVar[str] = "SET-Response"
    NAME: ClassVar[str] = "SetThenGetResponseNormalList"
    results: tuple[SetThenGetResult, ...]

    def _body(self, out: bytearray) -> None:
        out.append(self.piid.byte)
        encode_length(out, len(self.results))
        for result in self.results:
            encode_oad(out, result.oad)
            out.append(_u8(result.dar, "DAR"))
            _encode_result_normal(out, result.get)


# ---- ACTION (clause 6.3.9; Appendix D.5) -----------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True, repr=False, eq=False)
class ActionRequest(ClientApdu):
    TAG: ClassVar[int] = 7
    CHOICE: ClassVar[int | None] = 1
    SERVICE: ClassVar[str] = "ACTION-Request"
    NAME: ClassVar[str] = "ActionRequest"
    omd: OMD
    data: Data

    def _body(self, out: bytearray) -> None:
        out.append(self.piid.byte)
        encode_omd(out, self.omd)
        encode_data(out, self.data)


@dataclass(frozen=True, slots=True, kw_only=True, repr=False, eq=False)
class ActionRequestList(ClientApdu):
    TAG: ClassVar[int] = 7
    CHOICE: ClassVar[int | None] = 2
    SERVICE: ClassVar[str] = "ACTION-Request"
    NAME: ClassVar[str] = "ActionRequestList"
    items: tuple[ActionItem, ...]

    def _body(self, out: bytearray) -> None:
        out.append(self.piid.byte)
        encode_length(out, len(self.items))
        for item in self.items:
            encode_omd(out, item.omd)
            encode_data(out, item.data)


@dataclass(frozen=True, slots=True, kw_only=True, repr=False, eq=False)
class ActionThenGetRequestNormalList(ClientApdu):
    TAG: ClassVar[int] = 7
    CHOICE: ClassVar[int | None] = 3
    SERVICE: ClassVar[str] = "ACTION-Request"
    NAME: ClassVar[str] = "ActionThenGetRequestNormalList"
    items: tuple[ActionThenGetItem, ...]

    def _body(self, out: bytearray) -> None:
        out.append(self.piid.byte)
        encode_length(out, len(self.items))
        for item in self.items:
            encode_omd(out, item.omd)
            encode_data(out, item.data)
            encode_oad(out, item.get_oad)
            out.append(_u8(item.delay, "delay"))


@dataclass(frozen=True, slots=True, kw_only=True, repr=False, eq=False)
class ActionResponseNormal(ServerApdu):
    TAG: ClassVar[int] = 135
    CHOICE: ClassVar[int | None] = 1
    SERVICE: ClassVar[str] = "ACTION-Response"
    NAME: ClassVar[str] = "ActionResponseNormal"
    result: ActionResult

    def _body(self, out: bytearray) -> None:
        out.append(self.piid.byte)
        _encode_action_result(out, self.result)


@dataclass(frozen=True, slots=True, kw_only=True, repr=False, eq=False)
class ActionResponseNormalList(ServerApdu):
    TAG: ClassVar[int] = 135
    CHOICE: ClassVar[int | None] = 2
    SERVICE: ClassVar[str] = "ACTION-Response"
    NAME: ClassVar[str] = "ActionResponseNormalList"
    results: tuple[ActionResult, ...]

    def _body(self, out: bytearray) -> None:
        out.append(self.piid.byte)
        encode_length(out, len(self.results))
        for result in self.results:
            _encode_action_result(out, result)


@dataclass(frozen=True, slots=True, kw_only=True, repr=False, eq=False)
class ActionThenGetResponseNormalList(ServerApdu):
    TAG: ClassVar[int] = 135
    CHOICE: ClassVar[int | None] = 3
    SERVICE: ClassVar[str] = "ACTION-Response"
    NAME: ClassVar[str] = "ActionThenGetResponseNormalList"
    results: tuple[ActionThenGetResult, ...]

    def _body(self, out: bytearray) -> None:
        out.append(self.piid.byte)
        encode_length(out, len(self.results))
        for result in self.results:
            _encode_action_result(out, ActionResult(result.omd, result.dar, result.data))
            _encode_result_normal(out, result.get)


# ---- REPORT (clause 6.3.10) ------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True, repr=False, eq=False)
class ReportNotificationList(ServerApdu):
    TAG: ClassVar[int] = 136
    CHOICE: ClassVar[int | None] = 1
    SERVICE: ClassVar[str] = "REPORT-Notification"
    NAME: ClassVar[str] = "ReportNotificationList"
    results: tuple[ResultNormal, ...]

    def _body(self, out: bytearray) -> None:
        out.append(self.piid.byte)
        encode_length(out, len(self.results))
        for result in self.results:
            _encode_result_normal(out, result)


@dataclass(frozen=True, slots=True, kw_only=True, repr=False, eq=False)
class ReportNotificationRecordList(ServerApdu):
    TAG: ClassVar[int] = 136
    CHOICE: ClassVar[int | None] = 2
    SERVICE: ClassVar[str] = "REPORT-Notification"
    NAME: ClassVar[str] = "ReportNotificationRecordList"
    results: tuple[ResultRecord, ...]

    def _body(self, out: bytearray) -> None:
        out.append(self.piid.byte)
        encode_length(out, len(self.results))
        for result in self.results:
            _encode_result_record(out, result)


@dataclass(frozen=True, slots=True, kw_only=True, repr=False, eq=False)
class ReportNotificationTransData(ServerApdu):
    TAG: ClassVar[int] = 136
    CHOICE: ClassVar[int | None] = 3
    SERVICE: ClassVar[str] = "REPORT-Notification"
    NAME: ClassVar[str] = "ReportNotificationTransData"
    port: OAD
    frames: tuple[bytes, ...]

    def _body(self, out: bytearray) -> None:
        out.append(self.piid.byte)
        encode_oad(out, self.port)
        encode_length(out, len(self.frames))
        for frame in self.frames:
            encode_octets(out, frame)


@dataclass(frozen=True, slots=True, kw_only=True, repr=False, eq=False)
class ReportResponseList(ClientApdu):
    """Our acknowledgement of a ReportNotificationList: the OADs received."""

    TAG: ClassVar[int] = 8
    CHOICE: ClassVar[int | None] = 1
    SERVICE: ClassVar[str] = "REPORT-Response"
    NAME: ClassVar[str] = "ReportResponseList"
    oads: tuple[OAD, ...]

    def _body(self, out: bytearray) -> None:
        out.append(self.piid.byte)
        encode_length(out, len(self.oads))
        for oad in self.oads:
            encode_oad(out, oad)


@dataclass(frozen=True, slots=True, kw_only=True, repr=False, eq=False)
class ReportResponseRecordList(ReportResponseList):
    CHOICE: ClassVar[int | None] = 2
    NAME: ClassVar[str] = "ReportResponseRecordList"


@dataclass(frozen=True, slots=True, kw_only=True, repr=False, eq=False)
class ReportResponseTransData(ClientApdu):
    TAG: ClassVar[int] = 8
    CHOICE: ClassVar[int | None] = 3
    SERVICE: ClassVar[str] = "REPORT-Response"
    NAME: ClassVar[str] = "ReportResponseTransData"

    def _body(self, out: bytearray) -> None:
        out.append(self.piid.byte)


# ---- PROXY (clause 6.3.11) -------------------------------------------------------------------

PROXY_REQUESTS: Final = {
    1: "ProxyGetRequestList",
    2: "ProxyGetRequestRecord",
    3: "ProxySetRequestList",
    4: "ProxySetThenGetRequestList",
    5: "ProxyActionRequestList",
    6: "ProxyActionThenGetRequestList",
    7: "ProxyTransCommandRequest",
}
PROXY_RESPONSES: Final = {k: v.replace("Request", "Response") for k, v in PROXY_REQUESTS.items()}


@dataclass(frozen=True, slots=True, kw_only=True, repr=False, eq=False)
class ProxyTransCommandRequest(ClientApdu):
    """Pass ``command`` through serial port ``port`` (e.g. F2010201) of a terminal."""

    TAG: ClassVar[int] = 9
    CHOICE: ClassVar[int | None] = 7
    SERVICE: ClassVar[str] = "PROXY-Request"
    NAME: ClassVar[str] = "ProxyTransCommandRequest"
    port: OAD
    comdcb: COMDCB
    frame_timeout: int  # seconds to wait for the answer
    byte_timeout: int  # milliseconds between bytes
    command: bytes

    def _body(self, out: bytearray) -> None:
        out.append(self.piid.byte)
        encode_oad(out, self.port)
        out += bytes(_u8(v, "COMDCB field") for v in self.comdcb)
        out += _u16(self.frame_timeout, "frame timeout") + _u16(self.byte_timeout, "byte timeout")
        encode_octets(out, self.command)


@dataclass(frozen=True, slots=True, kw_only=True, repr=False, eq=False)
class ProxyTransCommandResponse(ServerApdu):
    TAG: ClassVar[int] = 137
    CHOICE: ClassVar[int | None] = 7
    SERVICE: ClassVar[str] = "PROXY-Response"
    NAME: ClassVar[str] = "ProxyTransCommandResponse"
    port: OAD
    dar: int | None = None
    answer: bytes | None = None

    def _body(self, out: bytearray) -> None:
        out.append(self.piid.byte)
        encode_oad(out, self.port)
        if self.dar is not None:
            out += bytes((0, _u8(self.dar, "DAR")))
        else:
            out.append(1)
            encode_octets(out, self.answer or b"")


@dataclass(frozen=True, slots=True, kw_only=True, repr=False, eq=False)
class ProxyOpaque(Apdu):
    """A PROXY request/response we do not decode field by field: ``raw`` is everything after the
    choice byte (including the trailers). PIID is still decoded."""

    FAMILY: ClassVar[str] = "client"
    tag: int
    choice: int
    piid: Piid = PIID0
    raw: bytes = b""

    def encode(self) -> bytes:
        return bytes((self.tag, self.choice)) + self.raw


# ---- SECURITY (clause 6.3.13; Appendix G) ----------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True, repr=False, eq=False)
class SecurityRequest(Apdu):
    """``data`` is the wrapped APDU (plaintext, or ciphertext when ``encrypted``); ``inner`` is the
    decoded plaintext APDU on decode (None for ciphertext)."""

    TAG: ClassVar[int] = 16
    SERVICE: ClassVar[str] = "SECURITY-Request"
    NAME: ClassVar[str] = "SecurityRequest"
    FAMILY: ClassVar[str] = "security"
    data: bytes
    encrypted: bool = False
    verification: Verification
    inner: Apdu | None = field(default=None, compare=False)

    def _body(self, out: bytearray) -> None:
        out.append(1 if self.encrypted else 0)
        encode_octets(out, self.data)
        v = self.verification
        out.append(_u8(v.kind, "verification"))
        if v.kind == 0:
            out += _u32(v.sid, "SID")
            encode_octets(out, v.sid_extra)
            encode_octets(out, v.mac)
        elif v.kind == 1:
            encode_octets(out, v.rn)
        elif v.kind == 2:
            encode_octets(out, v.rn)
            encode_octets(out, v.mac)
        elif v.kind == 3:
            out += _u32(v.sid, "SID")
            encode_octets(out, v.sid_extra)
        else:
            raise LocalProtocolError(f"verification kind {v.kind} is not defined")


@dataclass(frozen=True, slots=True, kw_only=True, repr=False, eq=False)
class SecurityResponse(Apdu):
    """``data`` (plaintext or ciphertext) or ``dar``; ``mac`` when the server added one."""

    TAG: ClassVar[int] = 144
    SERVICE: ClassVar[str] = "SECURITY-Response"
    NAME: ClassVar[str] = "SecurityResponse"
    FAMILY: ClassVar[str] = "security"
    data: bytes | None = None
    encrypted: bool = False
    dar: int | None = None
    mac: bytes | None = None
    inner: Apdu | None = field(default=None, compare=False)

    def _body(self, out: bytearray) -> None:
        if self.dar is not None:
            out += bytes((2, _u8(self.dar, "DAR")))
        else:
            out.append(1 if self.encrypted else 0)
            encode_octets(out, self.data or b"")
        if self.mac is None:
            out.append(0)
        else:
            out += b"\x01\x00"
            encode_octets(out, self.mac)


# ---- ERROR-Response (clause 6.3.15) ----------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True, repr=False, eq=False)
class ErrorResponse(Apdu):
    """error: 1 APDU cannot be parsed, 2 service not supported, 255 other. ``from_server`` picks
    the tag (238 from a server, 110 from a client)."""

    SERVICE: ClassVar[str] = "ERROR-Response"
    NAME: ClassVar[str] = "ErrorResponse"
    piid: Piid = PIID0
    error: int = 255
    from_server: bool = True

    def encode(self) -> bytes:
        return bytes((238 if self.from_server else 110, self.piid.byte, _u8(self.error, "error")))


# ---- encoding helpers --------------------------------------------------------------------------


def _u8(value: int, what: str) -> int:
    if not isinstance(value, int) or not 0 <= value <= 0xFF:
        raise LocalProtocolError(f"{what} {value!r} does not fit in one byte")
    return value


def _u16(value: int, what: str) -> bytes:
    if not isinstance(value, int) or not 0 <= value <= 0xFFFF:
        raise LocalProtocolError(f"{what} {value!r} does not fit in 16 bits")
    return value.to_bytes(2, "big")


def _u32(value: int, what: str) -> bytes:
    if not isinstance(value, int) or not 0 <= value <= 0xFFFFFFFF:
        raise LocalProtocolError(f"{what} {value!r} does not fit in 32 bits")
    return value.to_bytes(4, "big")


def _encode_timetag(out: bytearray, timetag: TimeTag | None) -> None:
    if timetag is None:
        out.append(0)
    else:
        out.append(1)
        encode_date_time_s(out, timetag.send_time)
        encode_ti(out, timetag.delay)


def _encode_get_record(out: bytearray, record: GetRecord) -> None:
    encode_oad(out, record.oad)
    encode_rsd(out, record.rsd)
    encode_rcsd(out, record.rcsd)


def _encode_result_normal(out: bytearray, result: ResultNormal) -> None:
    encode_oad(out, result.oad)
    if result.data is not None:
        out.append(1)
        encode_data(out, result.data)
    elif result.dar is not None:
        out += bytes((0, _u8(result.dar, "DAR")))
    else:
        raise LocalProtocolError("a result carries Data or a DAR")


def _encode_result_record(out: bytearray, result: ResultRecord) -> None:
    encode_oad(out, result.oad)
    encode_rcsd(out, result.rcsd)
    if result.rows is not None:
        out.append(1)
        encode_length(out, len(result.rows))
        for row in result.rows:
            if len(row) != len(result.rcsd.columns):
                raise LocalProtocolError(f"a row has {len(row)} values for {len(result.rcsd.columns)} columns")
            for value in row:
                encode_data(out, value)
    elif result.dar is not None:
        out += bytes((0, _u8(result.dar, "DAR")))
    else:
        raise LocalProtocolError("a record result carries rows or a DAR")


def _encode_action_result(out: bytearray, result: ActionResult) -> None:
    encode_omd(out, result.omd)
    out.append(_u8(result.dar, "DAR"))
    if result.data is None:
        out.append(0)
    else:
        out.append(1)
        encode_data(out, result.data)


# ---- decoding ----------------------------------------------------------------------------------


_OAD_AND_CHOICE: Final = struct.Struct(">IB").unpack_from  # the OAD's four bytes as one key


def _results_normal(buf: bytes, pos: int, count: int, warnings: list[str]) -> tuple[tuple[ResultNormal, ...], int]:
    """``count`` A-ResultNormal, each an OAD, then Data (choice 1) or DAR (choice 0). Every value
    of every GET response and REPORT comes through here, so the loop is here too (one call per
    response, not one per result)."""
    n = len(buf)
    results: list[ResultNormal] = []
    append = results.append
    for _ in range(count):
        if pos + 5 > n:
            raise RemoteProtocolError(f"truncated APDU: A-ResultNormal expected at offset {pos}")
        key, choice = _OAD_AND_CHOICE(buf, pos)
        oad = OADS.get(key) or oad_of(key)
        if choice == 1:
            data, pos = decode_data(buf, pos + 5, warnings)
            append(ResultNormal(oad, data))
        elif choice == 0:
            if pos + 6 > n:
                raise RemoteProtocolError(f"truncated APDU: DAR expected at offset {pos + 5}")
            append(ResultNormal(oad, None, buf[pos + 5]))
            pos += 6
        else:
            raise RemoteProtocolError(f"Get-Result choice {choice} at offset {pos + 4} is not 0 (DAR) or 1 (Data)")
    return tuple(results), pos


class _Reader:
    """A cursor over one APDU: the bytes, the position and the warnings found so far."""

    __slots__ = ("buf", "pos", "warnings")

    def __init__(self, buf: bytes, pos: int = 0) -> None:
        self.buf = buf
        self.pos = pos
        self.warnings: list[str] = []

    def u8(self, what: str) -> int:
        try:
            value = self.buf[self.pos]
        except IndexError:
            raise RemoteProtocolError(f"truncated APDU: {what} expected at offset {self.pos}") from None
        self.pos += 1
        return value

    def u16(self, what: str) -> int:
        return (self.u8(what) << 8) | self.u8(what)

    def u32(self, what: str) -> int:
        return (self.u16(what) << 16) | self.u16(what)

    def take(self, size: int, what: str) -> bytes:
        end = self.pos + size
        if end > len(self.buf):
            raise RemoteProtocolError(f"truncated APDU: {what} needs {size} bytes at offset {self.pos}")
        value = self.buf[self.pos : end]
        self.pos = end
        return value

    def length(self) -> int:
        value, self.pos = decode_length(self.buf, self.pos, self.warnings)
        return value

    def oad(self) -> OAD:
        value, self.pos = decode_oad(self.buf, self.pos)
        return value

    def omd(self) -> OMD:
        value, self.pos = decode_omd(self.buf, self.pos)
        return value

    def data(self) -> Data:
        value, self.pos = decode_data(self.buf, self.pos, self.warnings)
        return value

    def octets(self) -> bytes:
        value, self.pos = decode_octets(self.buf, self.pos, self.warnings)
        return value

    def date_time(self) -> DateTime:
        value, self.pos = decode_date_time(self.buf, self.pos)
        return value

    def date_time_s(self) -> DateTimeS:
        value, self.pos = decode_date_time_s(self.buf, self.pos)
        return value

    def rcsd(self) -> RCSD:
        value, self.pos = decode_rcsd(self.buf, self.pos, self.warnings)
        return value

    def rsd(self) -> RSD:
        value, self.pos = decode_rsd(self.buf, self.pos, self.warnings)
        return value

    def optional(self, what: str) -> bool:
        """An OPTIONAL's presence byte; missing at the very end counts as absent (with a warning)."""
        buf, pos = self.buf, self.pos
        if pos >= len(buf):
            self.warnings.append(f"{what} presence byte missing at the end of the APDU")
            return False
        flag = buf[pos]
        self.pos = pos + 1
        if flag > 1:
            raise RemoteProtocolError(f"{what} presence byte {flag:02X} at offset {pos} is not 00 or 01")
        return flag == 1

    def timetag(self) -> TimeTag | None:
        if not self.optional("TimeTag"):
            return None
        when = self.date_time_s()
        ti, self.pos = decode_ti(self.buf, self.pos)
        return TimeTag(when, ti)

    def follow_report(self) -> FollowReport | None:
        if not self.optional("FollowReport"):
            return None
        choice = self.u8("FollowReport choice")
        if choice == 1:
            return FollowReport(self.results_normal())
        if choice == 2:
            return FollowReport(tuple(self.result_record() for _ in range(self.length())), records=True)
        raise RemoteProtocolError(f"FollowReport choice {choice} is not 1 or 2")

    def result_normal(self) -> ResultNormal:
        (result,), self.pos = _results_normal(self.buf, self.pos, 1, self.warnings)
        return result

    def results_normal(self) -> tuple[ResultNormal, ...]:
        """SEQUENCE OF A-ResultNormal (GET-Response, REPORT-Notification, FollowReport)."""
        count = self.length()
        results, self.pos = _results_normal(self.buf, self.pos, count, self.warnings)
        return results

    def result_record(self) -> ResultRecord:
        oad = self.oad()
        rcsd = self.rcsd()
        choice = self.u8("record result")
        if choice == 0:
            return ResultRecord(oad, rcsd, dar=self.u8("DAR"))
        if choice != 1:
            raise RemoteProtocolError(f"record result choice {choice} is not 0 (DAR) or 1 (rows)")
        columns = len(rcsd.columns)
        count = self.length()
        if columns == 0 and count:
            raise RemoteProtocolError("record rows without columns")
        rows = tuple(tuple(self.data() for _ in range(columns)) for _ in range(count))
        return ResultRecord(oad, rcsd, rows)

    def get_record(self) -> GetRecord:
        return GetRecord(self.oad(), self.rsd(), self.rcsd())

    def action_result(self) -> ActionResult:
        omd = self.omd()
        dar = self.u8("DAR")
        return ActionResult(omd, dar, self.data() if self.optional("action return data") else None)


_C = TypeVar("_C", bound=ClientApdu)
_S = TypeVar("_S", bound=ServerApdu)


def _client(r: _Reader, cls: type[_C], **fields: Any) -> _C:
    timetag = r.timetag()
    return cls(timetag=timetag, warnings=tuple(r.warnings), **fields)


def _server(r: _Reader, cls: type[_S], **fields: Any) -> _S:
    follow = r.follow_report()
    timetag = r.timetag()
    return cls(follow_report=follow, timetag=timetag, warnings=tuple(r.warnings), **fields)


_new_object = object.__new__
_Setter = Callable[[Any, Any], None]
_Setters = tuple[_Setter, _Setter, _Setter, _Setter, _Setter]


def _slot_setters(cls: type[ServerApdu]) -> _Setters:
    """The slot setters of a server APDU with one field of its own, in field order: warnings,
    piid, follow_report, timetag, then that field (a slots dataclass's fields are member
    descriptors of the class that declares them)."""
    names = [f.name for f in fields(cls)]
    if names[:4] != ["warnings", "piid", "follow_report", "timetag"] or len(names) != 5:
        raise TypeError(f"{cls.__name__} has the fields {names}, not a server APDU's and one more")
    if hasattr(cls, "__post_init__"):  # it would be skipped
        raise TypeError(f"{cls.__name__} has a __post_init__")
    w, p, f, t, own = (getattr(cls, name).__set__ for name in names)
    return w, p, f, t, own


def _server_results(r: _Reader, cls: type[_S], piid: Piid, results: object) -> _S:
    """:func:`_server` for the APDUs that carry the values a meter sends (GET-Response Normal and
    NormalList, REPORT-Notification List), whose one field of their own is their result(s).
    Every field is set, as the dataclass __init__ sets them, but without its keyword parsing and
    one ``object.__setattr__`` call per field: this runs for every reply of every poll."""
    follow = r.follow_report()
    timetag = r.timetag()
    set_warnings, set_piid, set_follow, set_timetag, set_results = _RESULTS_SETTERS[cls]
    apdu = _new_object(cls)
    set_warnings(apdu, tuple(r.warnings))
    set_piid(apdu, piid)
    set_follow(apdu, follow)
    set_timetag(apdu, timetag)
    set_results(apdu, results)
    return apdu


def _decode_get_request(r: _Reader, choice: int) -> Apdu:
    piid = Piid.from_byte(r.u8("PIID"))
    if choice == 1:
        return _client(r, GetRequestNormal, piid=piid, oad=r.oad())
    if choice == 2:
        return _client(r, GetRequestNormalList, piid=piid, oads=tuple(r.oad() for _ in range(r.length())))
    if choice == 3:
        return _client(r, GetRequestRecord, piid=piid, record=r.get_record())
    if choice == 4:
        return _client(r, GetRequestRecordList, piid=piid, records=tuple(r.get_record() for _ in range(r.length())))
    if choice == 5:
        return _client(r, GetRequestNext, piid=piid, last_block=r.u16("block number"))
    if choice == 6:
        return _client(r, GetRequestMD5, piid=piid, oad=r.oad())
    raise RemoteProtocolError(f"GET-Request choice {choice} is not defined")


def _decode_get_response(r: _Reader, choice: int) -> Apdu:
    piid = Piid.from_byte(r.u8("PIID-ACD"))
    if choice == 1:
        return _server_results(r, GetResponseNormal, piid, r.result_normal())
    if choice == 2:
        return _server_results(r, GetResponseNormalList, piid, r.results_normal())
    if choice == 3:
        return _server(r, GetResponseRecord, piid=piid, result=r.result_record())
    if choice == 4:
        return _server(r, GetResponseRecordList, piid=piid, results=tuple(r.result_record() for _ in range(r.length())))
    if choice == 5:
        last = r.u8("last block flag") != 0
        block = r.u16("block number")
        kind = r.u8("block answer")
        if kind == 0:
            return _server(r, GetResponseNext, piid=piid, last=last, block=block, dar=r.u8("DAR"))
        if kind == 1:
            normal = r.results_normal()
            return _server(r, GetResponseNext, piid=piid, last=last, block=block, results=normal)
        if kind == 2:
            records = tuple(r.result_record() for _ in range(r.length()))
            return _server(r, GetResponseNext, piid=piid, last=last, block=block, results=records, records=True)
        raise RemoteProtocolError(f"GetResponseNext answer choice {kind} is not defined")
    if choice == 6:
        oad = r.oad()
        kind = r.u8("MD5 result")
        if kind == 0:
            return _server(r, GetResponseMD5, piid=piid, oad=oad, dar=r.u8("DAR"))
        return _server(r, GetResponseMD5, piid=piid, oad=oad, md5=r.octets())
    raise RemoteProtocolError(f"GET-Response choice {choice} is not defined")


def _decode_set_request(r: _Reader, choice: int) -> Apdu:
    piid = Piid.from_byte(r.u8("PIID"))
    if choice == 1:
        return _client(r, SetRequestNormal, piid=piid, oad=r.oad(), data=r.data())
    if choice == 2:
        items = tuple((r.oad(), r.data()) for _ in range(r.length()))
        return _client(r, SetRequestNormalList, piid=piid, items=items)
    if choice == 3:
        stg = tuple(SetThenGetItem(r.oad(), r.data(), r.oad(), r.u8("delay")) for _ in range(r.length()))
        return _client(r, SetThenGetRequestNormalList, piid=piid, items=stg)
    raise RemoteProtocolError(f"SET-Request choice {choice} is not defined")


def _decode_set_response(r: _Reader, choice: int) -> Apdu:
    piid = Piid.from_byte(r.u8("PIID-ACD"))
    if choice == 1:
        return _server(r, SetResponseNormal, piid=piid, oad=r.oad(), dar=r.u8("DAR"))
    if choice == 2:
        results = tuple(SetResult(r.oad(), r.u8("DAR")) for _ in range(r.length()))
        return _server(r, SetResponseNormalList, piid=piid, results=results)
    if choice == 3:
        stg = tuple(SetThenGetResult(r.oad(), r.u8("DAR"), r.result_normal()) for _ in range(r.length()))
        return _server(r, SetThenGetResponseNormalList, piid=piid, results=stg)
    raise RemoteProtocolError(f"SET-Response choice {choice} is not defined")


def _decode_action_request(r: _Reader, choice: int) -> Apdu:
    piid = Piid.from_byte(r.u8("PIID"))
    if choice == 1:
        return _client(r, ActionRequest, piid=piid, omd=r.omd(), data=r.data())
    if choice == 2:
        items = tuple(ActionItem(r.omd(), r.data()) for _ in range(r.length()))
        return _client(r, ActionRequestList, piid=piid, items=items)
    if choice == 3:
        atg = tuple(ActionThenGetItem(r.omd(), r.data(), r.oad(), r.u8("delay")) for _ in range(r.length()))
        return _client(r, ActionThenGetRequestNormalList, piid=piid, items=atg)
    raise RemoteProtocolError(f"ACTION-Request choice {choice} is not defined")


def _decode_action_response(r: _Reader, choice: int) -> Apdu:
    piid = Piid.from_byte(r.u8("PIID-ACD"))
    if choice == 1:
        return _server(r, ActionResponseNormal, piid=piid, result=r.action_result())
    if choice == 2:
        return _server(
            r, ActionResponseNormalList, piid=piid, results=tuple(r.action_result() for _ in range(r.length()))
        )
    if choice == 3:
        results = []
        for _ in range(r.length()):
            a = r.action_result()
            results.append(ActionThenGetResult(a.omd, a.dar, a.data, r.result_normal()))
        return _server(r, ActionThenGetResponseNormalList, piid=piid, results=tuple(results))
    raise RemoteProtocolError(f"ACTION-Response choice {choice} is not defined")


def _decode_report_notification(r: _Reader, choice: int) -> Apdu:
    piid = Piid.from_byte(r.u8("PIID-ACD"))
    if choice == 1:
        return _server_results(r, ReportNotificationList, piid, r.results_normal())
    if choice == 2:
        records = tuple(r.result_record() for _ in range(r.length()))
        return _server(r, ReportNotificationRecordList, piid=piid, results=records)
    if choice == 3:
        port = r.oad()
        frames = tuple(r.octets() for _ in range(r.length()))
        return _server(r, ReportNotificationTransData, piid=piid, port=port, frames=frames)
    raise RemoteProtocolError(f"REPORT-Notification choice {choice} is not defined")


def _decode_report_response(r: _Reader, choice: int) -> Apdu:
    piid = Piid.from_byte(r.u8("PIID"))
    if choice == 1:
        return _client(r, ReportResponseList, piid=piid, oads=tuple(r.oad() for _ in range(r.length())))
    if choice == 2:
        return _client(r, ReportResponseRecordList, piid=piid, oads=tuple(r.oad() for _ in range(r.length())))
    if choice == 3:
        return _client(r, ReportResponseTransData, piid=piid)
    raise RemoteProtocolError(f"REPORT-Response choice {choice} is not defined")


def _decode_proxy(r: _Reader, tag: int, choice: int) -> Apdu:
    names = PROXY_REQUESTS if tag == 9 else PROXY_RESPONSES
    if choice not in names:
        raise RemoteProtocolError(f"PROXY choice {choice} is not defined")
    start = r.pos
    piid = Piid.from_byte(r.u8("PIID"))
    if choice == 7 and tag == 9:
        port = r.oad()
        comdcb = COMDCB(*r.take(5, "COMDCB"))
        frame_timeout = r.u16("frame timeout")
        byte_timeout = r.u16("byte timeout")
        command = r.octets()
        return _client(
            r,
            ProxyTransCommandRequest,
            piid=piid,
            port=port,
            comdcb=comdcb,
            frame_timeout=frame_timeout,
            byte_timeout=byte_timeout,
            command=command,
        )
    if choice == 7:
        port = r.oad()
        kind = r.u8("TransCommand result")
        if kind == 0:
            return _server(r, ProxyTransCommandResponse, piid=piid, port=port, dar=r.u8("DAR"))
        return _server(r, ProxyTransCommandResponse, piid=piid, port=port, answer=r.octets())
    raw = r.buf[start:]
    r.pos = len(r.buf)
    return ProxyOpaque(tag=tag, choice=choice, piid=piid, raw=raw, warnings=(f"{names[choice]} kept opaque",))


def _decode_connect_request(r: _Reader) -> Apdu:
    piid = Piid.from_byte(r.u8("PIID"))
    version = r.u16("version")
    proto = r.take(8, "protocol conformance")
    func = r.take(16, "function conformance")
    send_max, receive_max = r.u16("send_max"), r.u16("receive_max")
    window = r.u8("window")
    apdu_max = r.u16("apdu_max")
    timeout = r.u32("timeout")
    kind = r.u8("connect mechanism")
    if kind == 0:
        mechanism = ConnectMechanism(0)
    elif kind == 1:
        mechanism = ConnectMechanism(1, password=r.octets().decode("latin-1"))
    elif kind in (2, 3):
        mechanism = ConnectMechanism(kind, ciphertext=r.octets(), signature=r.octets())
    else:
        raise RemoteProtocolError(f"connect mechanism {kind} is not defined")
    return _client(
        r,
        ConnectRequest,
        piid=piid,
        version=version,
        protocol_conformance=proto,
        function_conformance=func,
        send_max=send_max,
        receive_max=receive_max,
        window=window,
        apdu_max=apdu_max,
        timeout=timeout,
        mechanism=mechanism,
    )


def _decode_connect_response(r: _Reader) -> Apdu:
    piid = Piid.from_byte(r.u8("PIID-ACD"))
    factory = FactoryVersion(*(r.take(n, "factory version").decode("latin-1") for n in _FACTORY_SIZES))
    version = r.u16("version")
    proto = r.take(8, "protocol conformance")
    func = r.take(16, "function conformance")
    send_max, receive_max = r.u16("send_max"), r.u16("receive_max")
    window = r.u8("window")
    apdu_max = r.u16("apdu_max")
    timeout = r.u32("timeout")
    result = r.u8("connect result")
    rn = signature = None
    if r.optional("SecurityData"):
        rn = r.octets()
        signature = r.octets()
    return _server(
        r,
        ConnectResponse,
        piid=piid,
        factory=factory,
        version=version,
        protocol_conformance=proto,
        function_conformance=func,
        send_max=send_max,
        receive_max=receive_max,
        window=window,
        apdu_max=apdu_max,
        timeout=timeout,
        result=result,
        server_rn=rn,
        server_signature=signature,
    )


def _decode_security_request(r: _Reader, depth: int) -> Apdu:
    kind = r.u8("SECURITY-Request data choice")
    if kind > 1:
        raise RemoteProtocolError(f"SECURITY-Request data choice {kind} is not 0 (plain) or 1 (cipher)")
    data = r.octets()
    v = r.u8("verification choice")
    if v == 0:
        sid, extra = r.u32("SID"), r.octets()
        verification = Verification(0, sid=sid, sid_extra=extra, mac=r.octets())
    elif v == 1:
        verification = Verification(1, rn=r.octets())
    elif v == 2:
        rn = r.octets()
        verification = Verification(2, rn=rn, mac=r.octets())
    elif v == 3:
        sid = r.u32("SID")
        verification = Verification(3, sid=sid, sid_extra=r.octets())
    else:
        raise RemoteProtocolError(f"SECURITY-Request verification choice {v} is not defined")
    inner, warnings = _inner(data, kind == 0, depth)
    return SecurityRequest(
        data=data, encrypted=kind == 1, verification=verification, inner=inner, warnings=(*r.warnings, *warnings)
    )


def _decode_security_response(r: _Reader, depth: int) -> Apdu:
    kind = r.u8("SECURITY-Response data choice")
    data = dar = None
    if kind in (0, 1):
        data = r.octets()
    elif kind == 2:
        dar = r.u8("DAR")
    else:
        raise RemoteProtocolError(f"SECURITY-Response data choice {kind} is not defined")
    mac = None
    if r.optional("verification"):
        choice = r.u8("verification choice")
        if choice != 0:
            raise RemoteProtocolError(f"SECURITY-Response verification choice {choice} is not 0 (MAC)")
        mac = r.octets()
    inner, warnings = _inner(data, kind == 0, depth) if data is not None else (None, ())
    return SecurityResponse(
        data=data, encrypted=kind == 1, dar=dar, mac=mac, inner=inner, warnings=(*r.warnings, *warnings)
    )


def _inner(data: bytes, plain: bool, depth: int) -> tuple[Apdu | None, tuple[str, ...]]:
    if not plain:
        return None, ()
    if depth > 0:
        raise RemoteProtocolError("SECURITY APDU nested inside another SECURITY APDU")
    inner = _parse(data, depth + 1)
    return inner, tuple(f"inner: {w}" for w in inner.warnings)


def parse_apdu(raw: bytes) -> Apdu:
    """Decode one APDU (the link user data of a frame, after reassembly)."""
    return _parse(bytes(raw), 0)


def _parse(raw: bytes, depth: int) -> Apdu:
    r = _Reader(raw)
    tag = r.u8("APDU tag")
    apdu: Apdu
    by_choice = _CHOICE_DECODERS.get(tag)  # GET, SET, ACTION, REPORT: nearly every APDU
    if by_choice is not None:
        apdu = by_choice(r, r.u8("service choice"))
    elif tag == 1:
        piid = Piid.from_byte(r.u8("PIID-ACD"))
        kind = r.u8("link request type")
        heartbeat = r.u16("heartbeat")
        apdu = LinkRequest(piid=piid, kind=kind, heartbeat=heartbeat, time=r.date_time(), warnings=tuple(r.warnings))
    elif tag == 129:
        piid = Piid.from_byte(r.u8("PIID"))
        result = r.u8("link result")
        times = (r.date_time(), r.date_time(), r.date_time())
        apdu = LinkResponse(
            piid=piid,
            result=result & 0x07,
            clock_trusted=bool(result & 0x80),
            request_time=times[0],
            receive_time=times[1],
            response_time=times[2],
            warnings=tuple(r.warnings),
        )
    elif tag == 2:
        apdu = _decode_connect_request(r)
    elif tag == 130:
        apdu = _decode_connect_response(r)
    elif tag == 3:
        apdu = _client(r, ReleaseRequest, piid=Piid.from_byte(r.u8("PIID")))
    elif tag == 131:
        piid = Piid.from_byte(r.u8("PIID-ACD"))
        apdu = _server(r, ReleaseResponse, piid=piid, result=r.u8("result"))
    elif tag == 132:
        piid = Piid.from_byte(r.u8("PIID-ACD"))
        apdu = _server(r, ReleaseNotification, piid=piid, connected_at=r.date_time_s(), now=r.date_time_s())
    elif tag in (9, 137):
        apdu = _decode_proxy(r, tag, r.u8("PROXY choice"))
    elif tag == 16:
        apdu = _decode_security_request(r, depth)
    elif tag == 144:
        apdu = _decode_security_response(r, depth)
    elif tag in (110, 238):
        piid = Piid.from_byte(r.u8("PIID"))
        apdu = ErrorResponse(piid=piid, error=r.u8("error type"), from_server=tag == 238)
        r.pos = len(raw)  # trailers, if any, carry nothing we use
    else:
        raise RemoteProtocolError(f"unknown APDU tag {tag} ({tag:02X})")
    if r.pos != len(raw):
        extra = f"{len(raw) - r.pos} unexpected bytes after the APDU: {raw[r.pos :].hex().upper()}"
        object.__setattr__(apdu, "warnings", (*apdu.warnings, extra))
    return apdu


_RESULTS_SETTERS: Final[dict[type[ServerApdu], _Setters]] = {
    cls: _slot_setters(cls) for cls in (GetResponseNormal, GetResponseNormalList, ReportNotificationList)
}

_CHOICE_DECODERS: Final = {
    5: _decode_get_request,
    133: _decode_get_response,
    6: _decode_set_request,
    134: _decode_set_response,
    7: _decode_action_request,
    135: _decode_action_response,
    8: _decode_report_response,
    136: _decode_report_notification,
}


_Descriptors = Callable[[Any], list[OAD | OMD]]

# What each kind of APDU is about; kinds absent (link, connect, release, errors) are about nothing.
_ABOUT: Final[dict[type[Apdu], _Descriptors]] = {
    GetRequestNormal: lambda a: [a.oad],
    GetRequestMD5: lambda a: [a.oad],
    SetRequestNormal: lambda a: [a.oad],
    SetResponseNormal: lambda a: [a.oad],
    GetResponseMD5: lambda a: [a.oad],
    GetRequestNormalList: lambda a: list(a.oads),
    ReportResponseList: lambda a: list(a.oads),
    ReportResponseRecordList: lambda a: list(a.oads),
    GetRequestRecord: lambda a: [a.record.oad],
    GetRequestRecordList: lambda a: [rec.oad for rec in a.records],
    GetResponseNormal: lambda a: [a.result.oad],
    GetResponseRecord: lambda a: [a.result.oad],
    GetResponseNormalList: lambda a: [res.oad for res in a.results],
    GetResponseRecordList: lambda a: [res.oad for res in a.results],
    GetResponseNext: lambda a: [res.oad for res in a.results],
    ReportNotificationList: lambda a: [res.oad for res in a.results],
    ReportNotificationRecordList: lambda a: [res.oad for res in a.results],
    SetRequestNormalList: lambda a: [oad for oad, _ in a.items],
    SetResponseNormalList: lambda a: [res.oad for res in a.results],
    SetThenGetRequestNormalList: lambda a: [item.oad for item in a.items],
    ActionRequest: lambda a: [a.omd],
    ActionRequestList: lambda a: [item.omd for item in a.items],
    ActionResponseNormal: lambda a: [a.result.omd],
    ActionResponseNormalList: lambda a: [res.omd for res in a.results],
}


def oads_of(apdu: Apdu) -> list[OAD | OMD]:
    """The object descriptors an APDU is about, in order (OMDs for ACTION)."""
    if isinstance(apdu, SecurityRequest | SecurityResponse):
        return oads_of(apdu.inner) if apdu.inner is not None else []
    about = _ABOUT.get(type(apdu))
    return about(apdu) if about is not None else []


__all__ = [
    "CSD",
    "PROTOCOL_VERSION",
    "ActionItem",
    "ActionRequest",
    "ActionRequestList",
    "ActionResponseNormal",
    "ActionResponseNormalList",
    "ActionResult",
    "ActionThenGetItem",
    "ActionThenGetRequestNormalList",
    "ActionThenGetResponseNormalList",
    "ActionThenGetResult",
    "Apdu",
    "ClientApdu",
    "ConnectMechanism",
    "ConnectRequest",
    "ConnectResponse",
    "ErrorResponse",
    "FactoryVersion",
    "FollowReport",
    "GetRecord",
    "GetRequestMD5",
    "GetRequestNext",
    "GetRequestNormal",
    "GetRequestNormalList",
    "GetRequestRecord",
    "GetRequestRecordList",
    "GetResponseMD5",
    "GetResponseNext",
    "GetResponseNormal",
    "GetResponseNormalList",
    "GetResponseRecord",
    "GetResponseRecordList",
    "LinkRequest",
    "LinkResponse",
    "Piid",
    "ProxyOpaque",
    "ProxyTransCommandRequest",
    "ProxyTransCommandResponse",
    "ReleaseNotification",
    "ReleaseRequest",
    "ReleaseResponse",
    "ReportNotificationList",
    "ReportNotificationRecordList",
    "ReportNotificationTransData",
    "ReportResponseList",
    "ReportResponseRecordList",
    "ReportResponseTransData",
    "ResultNormal",
    "ResultRecord",
    "SecurityRequest",
    "SecurityResponse",
    "ServerApdu",
    "SetRequestNormal",
    "SetRequestNormalList",
    "SetResponseNormal",
    "SetResponseNormalList",
    "SetResult",
    "SetThenGetItem",
    "SetThenGetRequestNormalList",
    "SetThenGetResponseNormalList",
    "SetThenGetResult",
    "TimeTag",
    "Verification",
    "oads_of",
    "parse_apdu",
]

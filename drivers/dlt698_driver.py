"""The DL/T 698.45 meter driver: readings, freezes, clock, relay control, association, reports.

One :class:`Dlt698Driver` per meter; many share one :class:`~drivers.bus.Bus` with DL/T 645 and
CJ/T 188 meters. Every request is one ``bus.exchange`` with a
:class:`~protocols.dlt698.exchange.Dlt698Exchange` that accepts only this request's response
(server address, service, choice and PIID); frames and APDUs come from the sans-I/O codec
(:mod:`protocols.dlt698`), values and units from its catalogue. Clauses are DL/T 698.45-2017's.

Decisions worth knowing:

* **Reads** are GET-Request-NormalList (6.3.7) of the OADs the model names, at most the model's
  ``oads_per_request`` per request; elements of one array attribute wanted together are asked as
  the whole attribute (index 0). An OAD the meter answers with a DAR gives no reading (logged
  once per OAD); the other quantities are still read.
* **Security.** ``security = "rn"`` wraps every request in SECURITY-Request plaintext + RN
  (6.3.13) with 16 fresh random bytes; the meter answers with plaintext + MAC. Checking that MAC
  needs the meter's keys (an ESAM), which the gateway does not have: readings of such responses
  carry ``Quality.MAC_UNVERIFIED`` and the MAC is only kept as the driver's ``last_mac``. We never
  claim integrity we cannot check.
* **Association.** ``association = "connect"`` opens an application association (CONNECT, 6.2;
  NullSecurity, or PasswordSecurity with the configured password) before the first data request
  and again when it has expired; ``none`` never does; ``auto`` reads directly and, if every
  object comes back "read/write denied" (DAR 3), the service is refused that way, or the meter
  answers an ERROR-Response "service not supported" / "other" (as some firmware does without an
  association), connects and asks again, remembering that the meter needs it. A refusal while
  associated (the meter dropped the association) reconnects once. A meter that refuses the
  CONNECT for its protocol version (ConnectResult 5) names its own: it is offered that one.
* **Unsolicited frames** (REPORT-Notification, FollowReport, LINK-Requests) are collected by the
  exchange without disturbing the transaction, and on the idle line between transactions by the
  bus's listener (:meth:`~drivers.bus.Bus.listen`); either way one path then acknowledges
  notifications with REPORT-Response, answers LINK-Requests (login, heartbeat) with LINK-Response
  carrying the gateway's time, and hands every one to ``on_event`` of the driver of the meter that
  sent it (logged when nobody listens). A terminal that logs in and heartbeats on an otherwise
  idle line is answered within its heartbeat, not at the next poll.
* **Control** (8000 methods 129/130, 8001 methods 127/128, Appendix E.8) goes as plaintext ACTION
  (``control = "plaintext"``), or, for State Grid production meters that accept these methods only
  in ciphertext + SID_MAC made by the head-end's crypto service or an ESAM, as the head-end's
  secured APDU forwarded untouched (:meth:`Dlt698Driver.passthrough`): the gateway frames it,
  parses the SECURITY-Response and its DAR, and the caller verifies by reading the relay back. The
  gateway never makes, holds or inspects key material.
* **Time.** Meters keep naive local wall time; ``tz`` converts both ways, to the second.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import secrets
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar

from meter_gateway.drivers.bus import Bus, Priority
from meter_gateway.drivers.dlt698_model import Dlt698Model
from meter_gateway.drivers.errors import BadReply, ConfigurationError, MeterRefused, NoAnswer, PartialRead
from meter_gateway.drivers.log_limit import log_limited, logfmt_value
from meter_gateway.drivers.meter_models import canonical_info
from meter_gateway.drivers.reading import Quality, Reading
from meter_gateway.drivers.readings import from_meter_time, plain_value, plausible, to_meter_time
from meter_gateway.protocols.dlt698 import apdu as ap
from meter_gateway.protocols.dlt698 import requests as rq
from meter_gateway.protocols.dlt698.axdr import OAD, RCSD, BitString, Data, DataType, DateTimeS
from meter_gateway.protocols.dlt698.catalogue import Catalogue, Item, default_catalogue
from meter_gateway.protocols.dlt698.catalogue import Reading as Value
from meter_gateway.protocols.dlt698.dar import dar_info, dar_name
from meter_gateway.protocols.dlt698.errors import ProtocolError, RemoteProtocolError
from meter_gateway.protocols.dlt698.exchange import (
    Dlt698Exchange,
    Dlt698Line,
    Expect,
    Identity,
    MeterEvent,
    Reply,
    as_reply,
)
from meter_gateway.protocols.dlt698.frame import Frame, ServerAddress
from meter_gateway.protocols.exchange import Rejected

if TYPE_CHECKING:
    from meter_gateway.drivers.context import DriverContext

__all__ = [
    "Dlt698Driver",
    "Dlt698Options",
    "RelayStatus",
    "broadcast_time",
    "discover_address",
    "from_config",
]

log = logging.getLogger(__name__)

R = TypeVar("R")
# (meter id, protocol) -> the callback for one event its meter sent unasked (drivers/context.py)
EventListener = Callable[[str, str], Callable[[MeterEvent], None]]
Association = Literal["auto", "connect", "none"]
Security = Literal["plain", "rn"]
Control = Literal["plaintext", "passthrough"]

PROTOCOL: Final = "dlt698"  # the registry's name, for the event listener
PREAMBLE: Final = 4  # FE wake-up bytes before each request (clause 5, usual on RS-485)
RN_BYTES: Final = 16  # the client's random number of SECURITY-Request plaintext + RN
DAR_DENIED: Final = 3  # 拒绝读写: what a meter that wants an association answers
CONNECT_VERSION_MISMATCH: Final = 5  # ConnectResult 协议版本不匹配 (clause 6.2, CONNECT-Response)
# ERROR-Response codes (clause 6.3.15) a meter wanting an association may give a data service
# without one instead of DAR 3: 2 service not supported, 255 other (the PyPI dlt698 engine does)
ASSOCIATION_ERRORS: Final = frozenset({2, 255})
CONNECT_TIMEOUT: Final = 7200  # seconds we ask an association to live (ConnectRequest)
CONNECT_MARGIN: Final = 60.0  # reconnect this long before the meter would drop the association
SIGNED_TYPES: Final = frozenset({"integer", "long", "double-long", "long64"})  # catalogue types
MAX_BLOCKS: Final = 256  # GET-Response-Next blocks of one record read (more means a looping meter)
FREEZE_TIME: Final = OAD(0x2021, 2, 0)
CLOCK: Final = OAD(0x4000, 2, 0)
ADDRESS: Final = OAD(0x4001, 2, 0)

Batch = tuple[tuple[OAD, tuple[str, ...]], ...]  # (OAD asked, quantities its answer carries)
Plan = tuple[Batch, ...]


@dataclass(frozen=True, slots=True)
class Dlt698Options:
    """Per-meter settings (``meters[].dlt698`` in the config; None: the model's)."""

    association: Association | None = None
    security: Security | None = None
    control: Control = "plaintext"

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> Dlt698Options:
        return cls(raw.get("association"), raw.get("security"), raw.get("control") or "plaintext")


@dataclass(frozen=True, slots=True)
class RelayStatus:
    closed: bool  # supply connected
    armed: bool  # commanded closed, still open: waiting for the customer's button (method 130 enum 0)
    trip_pending: bool  # commanded open, still closed: a delayed trip
    keep_power: bool
    raw: int  # status word 3, bit k = the standard's bit k
    read_at: float


# -- what every driver of a bus shares ---------------------------------------------------------


class _BusShare:
    """The bus's DL/T 698.45 line, which driver speaks for each meter address, and the one path
    that answers and hands on what meters send on their own, whether a transaction heard it or
    the idle line did. It is the bus's :class:`~drivers.bus.LineListener`, listening from the
    first DL/T 698.45 use of the bus on (a terminal's login and heartbeats are answered at once),
    and lives as long as the bus."""

    __slots__ = ("__weakref__", "_bus", "drivers", "line")

    def __init__(self, bus: Bus) -> None:
        self.line = Dlt698Line()
        # held, not weakly: a weak reference per meter would cost more than the entry. The bus,
        # its share and its drivers go together; a driver whose meter is dropped while its bus
        # stays is detached (Dlt698Driver.detach)
        self.drivers: dict[bytes, Dlt698Driver] = {}
        self._bus = weakref.ref(bus)
        bus.listen(self)

    @property
    def pending(self) -> bool:
        return self.line.pending_events > 0

    def hear(self, data: bytes) -> list[Rejected]:
        return self.line.hear(data)

    async def serve(self) -> None:
        """Acknowledge notifications with REPORT-Response, answer LINK-Requests with
        LINK-Response, and hand every event to ``on_event`` of the driver of the meter that sent
        it (logged when nobody listens), until none is pending."""
        bus = self._bus()
        while bus is not None and self.line.pending_events:
            for event in self.line.take_events():
                bus.counters.unsolicited += 1
                owner = self.drivers.get(event.address.wire)
                try:
                    await self._answer(bus, owner, event)
                except Exception as exc:  # an unanswered report is sent again by the meter: log, go on
                    log_limited(
                        log,
                        logging.WARNING,
                        f"dlt698_answer_failed:{event.address}",
                        "event=dlt698_answer_failed meter=%s kind=%s address=%s error=%s",
                        logfmt_value(owner.meter_id if owner is not None else "-"),
                        logfmt_value(event.kind),
                        logfmt_value(event.address),
                        logfmt_value(exc),
                    )
                callback = owner.on_event if owner is not None else None
                if callback is not None:
                    callback(event)
                else:  # limited: a terminal that is no configured meter heartbeats for ever
                    log_limited(
                        log,
                        logging.INFO,
                        f"dlt698_unheard:{event.address}",
                        "event=dlt698_unheard kind=%s address=%s apdu=%s",
                        logfmt_value(event.kind),
                        logfmt_value(event.address),
                        logfmt_value(event.apdu.NAME),
                    )

    async def _answer(self, bus: Bus, owner: Dlt698Driver | None, event: MeterEvent) -> None:
        apdu = event.apdu
        if isinstance(apdu, ap.ReportNotificationList | ap.ReportNotificationRecordList):
            await bus.send(rq.report_response(event.frame, apdu).encode(PREAMBLE), priority=Priority.COMMAND)
        elif isinstance(apdu, ap.LinkRequest):
            # the gateway's time in the zone of the terminal (any meter's on the bus if it is not ours)
            zone = owner or next(iter(self.drivers.values()), None)
            now = to_meter_time(
                zone.clock() if zone is not None else time.time(), zone.tz if zone is not None else None
            )
            answer = rq.link_response(event.frame, apdu, now, now)
            await bus.send(answer.encode(PREAMBLE), priority=Priority.COMMAND)


# finds a bus's share without keeping it (the bus keeps it, as its listener), nor the bus
_shares: Final[weakref.WeakKeyDictionary[Bus, weakref.ref[_BusShare]]] = weakref.WeakKeyDictionary()


def _share(bus: Bus) -> _BusShare:
    """The bus's share, made at the first DL/T 698.45 use of the bus."""
    found = _shares.get(bus)
    share = found() if found is not None else None
    if share is None:
        share = _BusShare(bus)
        _shares[bus] = weakref.ref(share)
    return share


async def broadcast_time(
    bus: Bus, when: float, tz: datetime.tzinfo | None = None, *, priority: int = Priority.COMMAND
) -> None:
    """Set every DL/T 698.45 meter's clock on ``bus``: ACTION 4000 method 127 (广播校时) to the
    broadcast address; meters do not answer, so only a clock read tells whether one took it."""
    line = _share(bus).line
    frame = rq.broadcast_time(to_meter_time(when, tz), piid=line.next_piid())
    await bus.send(frame.encode(PREAMBLE), priority=priority)


async def discover_address(bus: Bus, *, priority: int = Priority.COMMAND, length: int = 6) -> str:
    """The address of the one meter on a single-meter line: GET 40010200 (通信地址) to the
    wildcard address (``length`` bytes of AA); the meter answers from its own address. With
    several meters on the line nobody (or everybody at once) answers: NoAnswer or BadReply."""
    line = _share(bus).line
    piid = line.next_piid()
    wildcard = ServerAddress.wildcard(length)
    request = rq.get(wildcard, [ADDRESS], piid=piid)
    exchange = Dlt698Exchange(line, Expect(wildcard, Identity(133, 1, piid)), as_reply)
    reply = await bus.exchange(request.encode(PREAMBLE), exchange, priority=priority)
    return str(reply.address)


_identities: Final[dict[Identity, Identity]] = {}


def _identity(tag: int, choice: int | None, piid: int) -> Identity:
    """One Identity object per (tag, choice, PIID): every bus's request history keeps its last
    requests', and these few values (PIIDs 1..63) repeat on every bus."""
    identity = Identity(tag, choice, piid)
    return _identities.setdefault(identity, identity)


def _as_int(bits: BitString) -> int:
    """A status word as an int whose bit k is the standard's bit k (Appendix F numbering)."""
    return sum(1 << k for k in range(bits.length) if bits.bit(k))


# -- per-model plans ---------------------------------------------------------------------------


class _ModelInfo:
    """What every driver of one model shares: quantity by OAD, units, and read plans."""

    __slots__ = ("plans", "quantity_of", "units")

    def __init__(self, model: Dlt698Model) -> None:
        self.quantity_of: dict[OAD, str] = {p.oad: p.quantity for p in model.points}
        self.plans: dict[tuple[str, ...], tuple[tuple[str, ...], Plan]] = {}
        self.units: dict[str, tuple[str, tuple[float, float]] | None] = {}


_model_infos: dict[tuple[str, str], _ModelInfo] = {}


def _model_info(model: Dlt698Model) -> _ModelInfo:
    key = (model.name, str(model.path))
    info = _model_infos.get(key)
    if info is None:
        info = _model_infos[key] = _ModelInfo(model)
    return info


@dataclass(frozen=True, slots=True, weakref_slot=True)
class _Settings:
    """How a driver reads its meter and where its meter's events go: one object for every driver
    configured alike (a fleet's meters of one model mostly are), not ten fields in each."""

    model: Dlt698Model
    info: _ModelInfo
    association: Association
    security: Security
    control: Control
    password: str | None
    tz: datetime.tzinfo | None
    clock: Callable[[], float]
    rng: Callable[[int], bytes]
    catalogue: Catalogue
    listener: EventListener | None
    on_event: Callable[[MeterEvent], None] | None = None  # one driver's own (never shared)

    def shared(self) -> _Settings:
        """This object, or the equal one that drivers configured alike already share."""
        # identities, not values: an entry lives only while its settings (which hold these
        # objects, so their ids stay theirs) are used by a driver
        key: tuple[object, ...] = (id(self.model), self.association, self.security, self.control, self.password)
        key += (id(self.tz), id(self.clock), id(self.rng), id(self.catalogue), id(self.listener), id(self.on_event))
        return _settings.setdefault(key, self)


_settings: Final[weakref.WeakValueDictionary[tuple[object, ...], _Settings]] = weakref.WeakValueDictionary()


def coalesce(oads: Sequence[tuple[OAD, str]]) -> list[tuple[OAD, tuple[str, ...]]]:
    """(OAD to ask, quantities it answers): elements of one attribute wanted together become the
    whole attribute (index 0), in the order first asked."""
    groups: dict[tuple[int, int, bool], list[tuple[OAD, str]]] = {}
    for oad, quantity in oads:
        # a whole attribute (index 0) is asked as it is, never merged with its own elements
        groups.setdefault((oad.oi, oad.attribute, oad.index == 0), []).append((oad, quantity))
    out: list[tuple[OAD, tuple[str, ...]]] = []
    for members in groups.values():
        if len(members) >= 2 and members[0][0].index:
            first = members[0][0]
            out.append((OAD(first.oi, first.attribute, 0), tuple(q for _, q in members)))
        else:
            out.append((members[0][0], (members[0][1],)))
    return out


class Dlt698Driver:
    """One DL/T 698.45 meter on a bus. See the module docstring for the behaviour."""

    # per meter only what differs between meters; how it is read is in its shared _Settings
    __slots__ = (
        "__weakref__",
        "_address",
        "_assoc_until",
        "_missing",
        "_needs_connect",
        "_settings",
        "_share",
        "bus",
        "last_mac",
        "meter_id",
    )

    def __init__(
        self,
        bus: Bus,
        meter_id: str,
        address: str,
        model: Dlt698Model,
        *,
        association: Association | None = None,
        security: Security | None = None,
        control: Control = "plaintext",
        password: str | None = None,
        tz: datetime.tzinfo | None = None,
        clock: Callable[[], float] = time.time,
        rng: Callable[[int], bytes] = secrets.token_bytes,
        catalogue: Catalogue | None = None,
        listener: EventListener | None = None,
    ) -> None:
        """``listener(meter id, "dlt698")`` gives the callback for one event the meter sent unasked
        (the fleet's); setting :attr:`on_event` overrides it for this driver."""
        try:
            self._address = ServerAddress.parse(address)
        except ProtocolError as exc:
            raise ConfigurationError(f"meter {meter_id}: {exc}") from exc
        if self._address.type.name != "SINGLE":
            raise ConfigurationError(f"meter {meter_id}: {address} is a wildcard, not one meter's address")
        if password is not None and not password.isascii():
            raise ConfigurationError(f"meter {meter_id}: a DL/T 698.45 connect password is ASCII text")
        self.bus = bus
        self.meter_id = meter_id
        self._settings = _Settings(
            model,
            _model_info(model),
            association or model.association,
            security or model.security,
            control,
            password,
            tz,
            clock,
            rng,
            catalogue or default_catalogue(),
            listener,
        ).shared()
        self._share = _share(bus)
        self._share.line.know(self._address)
        self._share.drivers[self._address.wire] = self
        # None until the first exchange shows whether the meter wants an association (auto)
        self._needs_connect: bool | None = {"connect": True, "none": False}.get(self.association)
        self._assoc_until: float | None = None  # gateway time the association lapses
        self._missing: set[OAD] | None = None  # OADs the meter answered with a DAR (logged once)
        self.last_mac: bytes | None = None  # the MAC of the last secured response (not verifiable)

    def __repr__(self) -> str:
        return f"<Dlt698Driver {self.meter_id} {self.address} on {self.bus.name}>"

    def detach(self) -> None:
        """Stop speaking for the meter on its bus: what the meter sends unasked no longer comes
        here (the fleet detaches the driver of a meter it drops while keeping the bus)."""
        drivers = self._share.drivers
        if drivers.get(self._address.wire) is self:
            del drivers[self._address.wire]

    @property
    def address(self) -> str:
        return str(self._address)

    @property
    def model(self) -> Dlt698Model:
        return self._settings.model

    @property
    def association(self) -> Association:
        return self._settings.association

    @property
    def security(self) -> Security:
        return self._settings.security

    @property
    def control(self) -> Control:
        return self._settings.control

    @property
    def password(self) -> str | None:
        return self._settings.password

    @property
    def tz(self) -> datetime.tzinfo | None:
        return self._settings.tz

    @property
    def clock(self) -> Callable[[], float]:
        return self._settings.clock

    @property
    def catalogue(self) -> Catalogue:
        return self._settings.catalogue

    @property
    def _rng(self) -> Callable[[int], bytes]:
        return self._settings.rng

    @property
    def _info(self) -> _ModelInfo:
        return self._settings.info

    @property
    def on_event(self) -> Callable[[MeterEvent], None] | None:
        """Where what this meter sends unasked goes: the callback set here, else the listener's
        for this meter (asked at each event: events are rare, meters many), else nobody."""
        settings = self._settings
        if settings.on_event is None and settings.listener is not None:
            return settings.listener(self.meter_id, PROTOCOL)
        return settings.on_event

    @on_event.setter
    def on_event(self, callback: Callable[[MeterEvent], None] | None) -> None:
        self._settings = dataclasses.replace(self._settings, on_event=callback)  # this driver's own

    @property
    def line(self) -> Dlt698Line:
        return self._share.line

    @property
    def needs_connect(self) -> bool | None:
        """Whether the meter wants an association before data services (None: not learned yet)."""
        return self._needs_connect

    @property
    def associated(self) -> bool:
        return self._assoc_until is not None and self.clock() < self._assoc_until

    # -- exchanges ----------------------------------------------------------------------------

    async def _exchange(
        self,
        build: Callable[[int], Frame],
        tag: int,
        choice: int | None,
        decode: Callable[[Reply], R],
        priority: int,
        *,
        secure: bool = True,
        force: bool = False,
        attempts: int | None = None,
    ) -> R:
        """One request to this meter (``build(piid)`` makes it), the response as ``decode`` gives it."""
        line = self._share.line
        piid = line.next_piid()
        frame = build(piid)
        secured = secure and self.security == "rn"
        if secured:
            frame = rq.secured(frame, self._rng(RN_BYTES))
        exchange = Dlt698Exchange(line, Expect(self._address, _identity(tag, choice, piid), secured), decode)
        try:
            return await self.bus.exchange(
                frame.encode(PREAMBLE), exchange, meter=self.meter_id, priority=priority, force=force, attempts=attempts
            )
        finally:
            if line.pending_events:
                await self._share.serve()

    async def _data(
        self,
        build: Callable[[int], Frame],
        tag: int,
        choice: int | None,
        decode: Callable[[Reply], R],
        priority: int,
        *,
        force: bool = False,
        attempts: int | None = None,
        denied: Callable[[R], bool] | None = None,
    ) -> R:
        """A data service (GET/SET/ACTION) under the association rules of the module docstring.

        ``denied(result)`` says whether an answer means "associate first" (all objects DAR 3); a
        refusal with DAR 3 means the same."""
        if self._needs_connect and not self.associated:
            await self._associate(priority, force)
        try:
            result = await self._exchange(build, tag, choice, decode, priority, force=force, attempts=attempts)
        except MeterRefused as exc:
            if not _wants_association(exc) or not self._may_connect():
                raise
            await self._learned_connect(priority, force)
            return await self._exchange(build, tag, choice, decode, priority, force=force, attempts=attempts)
        if denied is not None and denied(result) and self._may_connect():
            await self._learned_connect(priority, force)
            return await self._exchange(build, tag, choice, decode, priority, force=force, attempts=attempts)
        if self._needs_connect is None:
            self._needs_connect = False
            log.info("event=association_not_needed meter=%s", logfmt_value(self.meter_id))
        return result

    async def _associate(self, priority: int, force: bool) -> None:
        """Open the association once when several requests (a poll, the time-sync job's clock
        read) find it closed: the others wait for it. A meter may refuse a second CONNECT while
        associated (ConnectResult 255), failing the request that sent it."""
        async with _opening.setdefault(self, asyncio.Lock()):
            if not self.associated:
                await self.connect(priority=priority, force=force)

    def _may_connect(self) -> bool:
        """Whether a "denied" answer is worth a (re)connect: auto mode still learning or sure it
        needs one, or connect mode (the association may have been dropped by the meter)."""
        if self.association == "none":
            return False
        return self._needs_connect is not False

    async def _learned_connect(self, priority: int, force: bool) -> None:
        if self._needs_connect is None:
            log.info("event=association_needed meter=%s connecting=true", logfmt_value(self.meter_id))
        self._assoc_until = None
        await self.connect(priority=priority, force=force)
        self._needs_connect = True

    async def connect(self, *, priority: int = Priority.POLL, force: bool = False) -> ap.ConnectResponse:
        """CONNECT-Request (6.2): NullSecurity, or PasswordSecurity when a password is configured.

        A meter that refuses our protocol version (ConnectResult 5) names its own in the
        response: the CONNECT is made once more with that version, which the driver keeps."""
        mechanism = ap.NULL_SECURITY if self.password is None else ap.ConnectMechanism(1, self.password)
        address = self._address
        version = _versions.get(self)

        def build(piid: int) -> Frame:
            return rq.connect(address, piid=piid, timeout=CONNECT_TIMEOUT, mechanism=mechanism, version=version)

        started = self.clock()
        try:
            response: ap.ConnectResponse = await self._exchange(
                build, 130, None, _expect(ap.ConnectResponse), priority, secure=False, force=force
            )
        except MeterRefused as exc:
            theirs = exc.answer.version if isinstance(exc.answer, ap.ConnectResponse) else None
            if exc.code != CONNECT_VERSION_MISMATCH or theirs is None or theirs == version:
                raise
            log.info(
                "event=association_version meter=%s offered=%s meter_speaks=%04X",
                logfmt_value(self.meter_id),
                "default" if version is None else f"{version:04X}",
                theirs,
            )
            _versions[self] = version = theirs
            response = await self._exchange(
                build, 130, None, _expect(ap.ConnectResponse), priority, secure=False, force=force
            )
        lifetime = min(float(response.timeout or CONNECT_TIMEOUT), float(CONNECT_TIMEOUT))
        self._assoc_until = started + max(0.0, lifetime - CONNECT_MARGIN)
        log.info("event=association_open meter=%s seconds=%.0f", logfmt_value(self.meter_id), lifetime)
        return response

    async def release(self, *, priority: int = Priority.POLL) -> None:
        """RELEASE-Request: close the association (e.g. before the gateway stops)."""
        if self._assoc_until is None:
            return
        address = self._address
        self._assoc_until = None
        await self._exchange(
            lambda piid: rq.request_frame(address, ap.ReleaseRequest(piid=ap.Piid(piid))),
            131,
            None,
            as_reply,
            priority,
            secure=False,
        )

    # -- readings -------------------------------------------------------------------------------

    async def read(
        self, quantities: Sequence[str], *, slot: float | None, now: float, priority: int = Priority.POLL
    ) -> list[Reading]:
        """One Reading per quantity that decoded, in the order asked.

        Raises ConfigurationError for a quantity the model lacks and LinkDown at once. A request
        lost otherwise (NoAnswer, BadReply, MeterRefused) loses only its quantities: PartialRead
        carries what the others got. Nothing read at all raises the first loss; so do two losses
        before anything was read (a dead meter must not hold the bus for every request)."""
        wanted, plan = self._plan_for(quantities)
        values: dict[str, Value] = {}
        quality = Quality.GOOD
        lost: list[str] = []
        cause: NoAnswer | BadReply | MeterRefused | None = None
        for batch in plan:
            oads = [oad for oad, _ in batch]
            try:
                reply = await self._get(oads, priority)
            except (NoAnswer, BadReply, MeterRefused) as exc:
                cause = cause or exc
                covers = [q for _, qs in batch for q in qs]
                lost.extend(covers)
                if not values and len(lost) > len(covers):
                    raise cause from None
                continue
            if reply.security is not None:
                quality = Quality.MAC_UNVERIFIED
            self._collect(reply.apdu, values)
        readings = [
            self._reading(q, values[q], now, slot=slot, meter_time=None, quality=quality) for q in wanted if q in values
        ]
        if cause is not None:
            if not readings:
                raise cause
            raise PartialRead(readings, tuple(q for q in wanted if q in lost and q not in values), cause)
        return readings

    def _plan_for(self, quantities: Sequence[str]) -> tuple[tuple[str, ...], Plan]:
        key = quantities if isinstance(quantities, tuple) else tuple(quantities)
        cache = self._info.plans
        hit = cache.get(key)
        if hit is None:
            wanted = tuple(dict.fromkeys(key))
            asked = coalesce([(self.model.oad_for(q), q) for q in wanted])
            size = self.model.oads_per_request
            hit = (wanted, tuple(tuple(asked[i : i + size]) for i in range(0, len(asked), size)))
            if len(cache) >= 64:
                cache.clear()
            cache[key] = hit
        return hit

    async def _get(self, oads: Sequence[OAD], priority: int, *, force: bool = False) -> Reply:
        address = self._address
        choice = 1 if len(oads) == 1 else 2
        return await self._data(
            lambda piid: rq.get(address, oads, piid=piid),
            133,
            choice,
            self._keep_mac,
            priority,
            force=force,
            denied=_all_denied,
        )

    def _keep_mac(self, reply: Reply) -> Reply:
        if reply.security is not None:
            self.last_mac = reply.security.mac
        return reply

    def _collect(self, apdu: ap.Apdu, into: dict[str, Value]) -> None:
        quantity_of = self._info.quantity_of
        for oad, dar in rq.failures(apdu):
            self._note_missing(oad, dar)
        for value in rq.readings(apdu, self.catalogue):
            quantity = quantity_of.get(value.oad)
            if quantity is not None and value.value is not None:
                into[quantity] = value

    def _note_missing(self, oad: OAD, dar: int) -> None:
        if self._missing is None:
            self._missing = set()
        if oad not in self._missing:
            self._missing.add(oad)
            log.warning(
                "event=no_data meter=%s oad=%s reason=%s dar=%d",
                logfmt_value(self.meter_id),
                oad,
                logfmt_value(dar_name(dar)),
                dar,
            )

    def _reading(
        self,
        quantity: str,
        value: Value,
        now: float,
        *,
        slot: float | None,
        meter_time: float | None,
        quality: Quality,
    ) -> Reading:
        decoded, unit = value.canonical  # kW, not the standard's W
        if value.fields is not None and isinstance(value.raw, str):
            decoded = _as_int(BitString.from_bits(value.raw))  # a status word, as DL/T 645's are ints
        raw = plain_value(decoded)
        units = self._info.units
        if quantity not in units:
            # None for a 698 extra (clock, status word, address): the catalogue's unit stands
            units[quantity] = _canonical_info(quantity, self.catalogue.get(value.oad))
        info = units[quantity]
        if info is not None:
            unit = info[0]
            if isinstance(raw, int | float) and not plausible(raw, info[1]):
                quality |= Quality.OUT_OF_RANGE
        return Reading(self.meter_id, quantity, raw, unit, now, meter_time, slot, quality)

    def _single(self, reply: Reply) -> Data:
        """The value of a one-OAD GET; its DAR (the meter refused that object) as MeterRefused."""
        apdu = reply.apdu
        if not isinstance(apdu, ap.GetResponseNormal):
            raise BadReply(f"meter {self.meter_id}: {apdu.NAME} answers a one-object GET")
        result = apdu.result
        if result.data is None:
            dar = result.dar if result.dar is not None else 0
            info = dar_info(dar)
            raise MeterRefused(
                f"meter {self.meter_id} refused {result.oad}: {dar_name(dar)} (DAR {dar})",
                code=dar,
                reasons=(info.key if info is not None else f"dar_{dar}",),
            )
        return result.data

    # -- clock ----------------------------------------------------------------------------------

    async def read_clock(self, *, priority: int = Priority.POLL) -> float:
        """The meter's clock (40000200) as unix time (its local wall time read in ``tz``)."""
        stamp = self._single(await self._get([CLOCK], priority)).value
        when = stamp.to_datetime() if isinstance(stamp, DateTimeS) else None
        if when is None:
            raise BadReply(f"meter {self.meter_id}: clock 40000200 is not a valid date_time_s: {stamp!r}")
        return from_meter_time(when, self.tz)

    async def sync_time(self, when: float, *, priority: int = Priority.COMMAND) -> None:
        """Set this meter's clock to ``when``: SET 40000200 (unicast); the meter answers with a
        DAR, a refusal raises MeterRefused."""
        address = self._address
        local = to_meter_time(when, self.tz)
        await self._data(lambda piid: rq.set_clock(address, local, piid=piid), 134, 1, as_reply, priority, force=True)

    # -- freezes ----------------------------------------------------------------------------------

    def frozen_quantities(self) -> tuple[str, ...]:
        """The quantities the meter keeps in its daily freeze (the model's ``[freeze] daily``)."""
        return self.model.daily_quantities

    async def read_frozen_day(
        self, day: datetime.date, quantities: Sequence[str], *, priority: int = Priority.POLL
    ) -> list[Reading]:
        """The daily freeze (5004) taken at the meter's midnight starting ``day``, selector 1 on
        20210200; [] when the meter has no such record. Readings carry ``meter_time`` = the freeze
        time and ``Quality.FROZEN``."""
        midnight = datetime.datetime.combine(day, datetime.time())
        rows = await self.read_freezes("daily", rq.freeze_at(midnight), quantities, priority=priority)
        return rows[0] if rows else []

    async def read_freezes_between(
        self,
        kind: str,
        start: datetime.datetime,
        end: datetime.datetime,
        quantities: Sequence[str],
        *,
        priority: int = Priority.POLL,
    ) -> list[list[Reading]]:
        """Every ``kind`` (daily, monthly, minute) freeze taken in [start, end) meter time,
        selector 2 on 20210200, oldest first; one list of readings per freeze."""
        return await self.read_freezes(kind, rq.freezes_between(start, end), quantities, priority=priority)

    async def read_freezes(
        self, kind: str, rsd: Any, quantities: Sequence[str], *, priority: int = Priority.POLL
    ) -> list[list[Reading]]:
        """GET-Record of the model's ``kind`` freeze with row selector ``rsd`` (GET-Response-Next
        blocks joined), as one list of readings per row."""
        freeze = self.model.freezes.get(kind)
        if freeze is None:
            raise ConfigurationError(f"meter {self.meter_id}: model {self.model.name} keeps no {kind} freeze")
        wanted = [q for q in dict.fromkeys(quantities) if q in freeze.quantities]
        if not wanted:
            return []
        asked = coalesce([(self.model.oad_for(q), q) for q in wanted])
        columns = [FREEZE_TIME, *(oad for oad, _ in asked)]
        address = self._address
        record = ap.GetRecord(freeze.object, rsd, RCSD(tuple(columns)))
        reply = await self._data(
            lambda piid: rq.request_frame(address, ap.GetRequestRecord(piid=ap.Piid(piid), record=record)),
            133,
            3,
            self._keep_mac,
            priority,
        )
        results = await self._record_blocks(reply, priority)
        quality = Quality.FROZEN | (Quality.MAC_UNVERIFIED if reply.security is not None else Quality.GOOD)
        now = self.clock()
        quantity_of = self._info.quantity_of
        out: list[list[Reading]] = []
        for result in results:
            for row in self.catalogue.record_readings(result):
                stamp = next((v.raw for v in row if v.oad == FREEZE_TIME), None)
                when = _parse_stamp(stamp)
                if when is None:
                    continue  # a row without a freeze time cannot be dated: not a reading
                meter_time = from_meter_time(when, self.tz)
                values = {quantity_of[v.oad]: v for v in row if v.oad in quantity_of and v.value is not None}
                out.append(
                    [
                        self._reading(q, values[q], now, slot=None, meter_time=meter_time, quality=quality)
                        for q in wanted
                        if q in values
                    ]
                )
        out = [readings for readings in out if readings]
        out.sort(key=lambda readings: readings[0].meter_time or 0.0)
        return out

    async def _record_blocks(self, first: Reply, priority: int) -> list[ap.ResultRecord]:
        apdu = first.apdu
        if isinstance(apdu, ap.GetResponseRecord):
            return [apdu.result]
        if not isinstance(apdu, ap.GetResponseNext):
            raise BadReply(f"meter {self.meter_id}: {apdu.NAME} does not answer a GET-Record")
        results: list[ap.ResultRecord] = []
        address = self._address
        for _ in range(MAX_BLOCKS):
            results += [r for r in apdu.results if isinstance(r, ap.ResultRecord)]
            if apdu.last:
                return results
            block = apdu.block
            reply = await self._exchange(
                lambda piid, block=block: rq.request_frame(
                    address, ap.GetRequestNext(piid=ap.Piid(piid), last_block=block)
                ),  # type: ignore[misc]
                133,
                5,
                self._keep_mac,
                priority,
            )
            if not isinstance(reply.apdu, ap.GetResponseNext):
                raise BadReply(f"meter {self.meter_id}: {reply.apdu.NAME} in a GET-Next block transfer")
            apdu = reply.apdu
        raise BadReply(f"meter {self.meter_id}: record read still had blocks after {MAX_BLOCKS}")

    # -- relay and control ------------------------------------------------------------------------

    def _relay_spec(self) -> Any:
        relay = self.model.relay
        if relay is None:
            raise ConfigurationError(f"meter {self.meter_id}: model {self.model.name} does not report its relay")
        return relay

    async def read_relay(self, *, priority: int = Priority.COMMAND, force: bool = False) -> RelayStatus:
        """The relay from status word 3 (Appendix F.3): bit 4 relay, bit 6 command, bit 12 keep-power."""
        relay = self._relay_spec()
        data = self._single(await self._get([relay.state_oad], priority, force=force))
        if data.type is not DataType.BIT_STRING:
            raise BadReply(f"meter {self.meter_id}: status word {relay.state_oad} gave no bit-string")
        word = _as_int(data.value)
        closed = (word >> relay.bit) & 1 != relay.open_when
        commanded_open = relay.command_bit is not None and bool((word >> relay.command_bit) & 1)
        return RelayStatus(
            closed=closed,
            armed=relay.command_bit is not None and not commanded_open and not closed,
            trip_pending=commanded_open and closed,
            keep_power=relay.keep_power_bit is not None and bool((word >> relay.keep_power_bit) & 1),
            raw=word,
            read_at=self.clock(),
        )

    async def _action(self, build: Callable[[int], Frame], priority: int, attempts: int | None) -> None:
        if self.control == "passthrough":
            raise ConfigurationError(
                f"meter {self.meter_id}: control is pass-through: the command must carry the head-end's secured APDU"
            )
        await self._data(build, 135, 1, as_reply, priority, force=True, attempts=attempts)

    async def trip(self, *, priority: int = Priority.COMMAND, attempts: int | None = None) -> None:
        """ACTION 8000 method 129 (跳闸) on the model's relay output, at once, no auto-close."""
        output = self._relay_spec().output
        address = self._address
        await self._action(lambda piid: rq.relay_trip(address, relay=output, piid=piid), priority, attempts)

    async def close(self, *, close_now: bool, priority: int = Priority.COMMAND, attempts: int | None = None) -> None:
        """ACTION 8000 method 130 (合闸): enum 1 closes at once, 0 allows the customer to close."""
        relay = self._relay_spec()
        if not close_now and not relay.close_permit:
            raise ConfigurationError(f"meter {self.meter_id}: model {self.model.name} has no close permit")
        address = self._address
        await self._action(
            lambda piid: rq.relay_close(address, relay=relay.output, close_now=close_now, piid=piid), priority, attempts
        )

    async def keep_power(self, enable: bool, *, priority: int = Priority.COMMAND, attempts: int | None = None) -> None:
        """ACTION 8001 method 127 (保电投入) or 128 (保电解除)."""
        address = self._address
        await self._action(lambda piid: rq.keep_power(address, enable, piid=piid), priority, attempts)

    async def passthrough(
        self, secured_apdu: bytes, *, priority: int = Priority.COMMAND, attempts: int | None = None
    ) -> ap.SecurityResponse:
        """Forward the head-end's SECURITY-Request APDU (ciphertext + SID_MAC made by its crypto
        service or an ESAM) untouched, framed to this meter; return its SECURITY-Response.

        Only the APDU's outer structure is checked (a SECURITY-Request, nothing after it): the
        gateway never opens it. A DAR in the response (or in a plaintext inner ACTION-Response)
        raises MeterRefused; a ciphertext response says nothing the gateway can read, so the
        caller verifies by reading the relay back."""
        try:
            apdu = ap.parse_apdu(secured_apdu)
        except ProtocolError as exc:
            raise ConfigurationError(f"meter {self.meter_id}: the pass-through APDU does not parse: {exc}") from exc
        if not isinstance(apdu, ap.SecurityRequest) or apdu.warnings:
            raise ConfigurationError(f"meter {self.meter_id}: the pass-through APDU must be one SECURITY-Request")
        frame = rq.request_frame(self._address, secured_apdu)
        line = self._share.line
        exchange = Dlt698Exchange(line, Expect.of(frame), as_reply)
        try:
            reply = await self.bus.exchange(
                frame.encode(PREAMBLE), exchange, meter=self.meter_id, priority=priority, force=True, attempts=attempts
            )
        finally:
            if line.pending_events:
                await self._share.serve()
        if reply.security is None:
            raise BadReply(f"meter {self.meter_id}: answered a SECURITY-Request without SECURITY-Response")
        return reply.security


def _expect(kind: type[Any]) -> Callable[[Reply], Any]:
    def decode(reply: Reply) -> Any:
        if not isinstance(reply.apdu, kind):
            raise RemoteProtocolError(f"expected {kind.__name__}, got {reply.apdu.NAME}")
        return reply.apdu

    return decode


# the lock of a meter whose association is being opened (only meters that associate get one)
_opening: weakref.WeakKeyDictionary[Dlt698Driver, asyncio.Lock] = weakref.WeakKeyDictionary()
# the protocol version a meter named when it refused ours (only such meters get an entry)
_versions: weakref.WeakKeyDictionary[Dlt698Driver, int] = weakref.WeakKeyDictionary()


def _canonical_info(quantity: str, item: Item | None) -> tuple[str, tuple[float, float]] | None:
    """The quantity's unit and plausible range as this meter's object carries it. A signed type
    carries a direction (2001 电流 is double-long): -5.002 A is a current flowing the other way,
    not garbage, so a magnitude range reaches as far below zero as above (as for DL/T 645's ±)."""
    info = canonical_info(quantity)
    if info is None or item is None or item.type not in SIGNED_TYPES or info[1][0] < 0:
        return info
    return info[0], (-info[1][1], info[1][1])


def _wants_association(exc: MeterRefused) -> bool:
    """Whether a refusal is how a meter says "associate first": DAR 3, or an ERROR-Response of
    :data:`ASSOCIATION_ERRORS` (told apart by its reason: both carry small codes)."""
    if "error_response" in exc.reasons:
        return exc.code in ASSOCIATION_ERRORS
    return exc.code == DAR_DENIED


def _all_denied(reply: Reply) -> bool:
    """Every object of a GET answered "read/write denied": the meter wants an association."""
    failed = rq.failures(reply.apdu)
    apdu = reply.apdu
    count = len(apdu.results) if isinstance(apdu, ap.GetResponseNormalList) else 1
    return len(failed) == count and all(dar == DAR_DENIED for _, dar in failed)


def _parse_stamp(stamp: object) -> datetime.datetime | None:
    if not isinstance(stamp, str):
        return None
    try:
        return datetime.datetime.fromisoformat(stamp)
    except ValueError:
        return None


def from_config(ctx: DriverContext) -> Dlt698Driver:
    """The registry's builder (``drivers/registry.py``): one driver from the fleet's context."""
    model = ctx.model
    if not isinstance(model, Dlt698Model):
        raise ConfigurationError(
            f"meter {ctx.meter_id}: model {getattr(model, 'name', model)!r} is not a DL/T 698.45 model"
        )
    options = Dlt698Options.from_mapping(ctx.options)
    credentials = ctx.credentials
    return Dlt698Driver(
        ctx.bus,
        ctx.meter_id,
        str(ctx.address),
        model,
        association=options.association,
        security=options.security,
        control=options.control,
        password=credentials.password if credentials is not None else None,
        tz=ctx.tz,
        listener=ctx.events,
    )

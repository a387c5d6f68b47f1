"""A simulated DL/T 698.45 meter: state and request handling, no I/O.

:meth:`Dlt698Meter.handle` takes one request frame (from :mod:`protocols.dlt698.deframer`) and
returns the reply frames' bytes. Time comes from a shared :class:`~simulators.clock.SimClock`
plus the meter's drift; the installation behind it is a :class:`~simulators.load.LoadModel`
advanced lazily when a value is read, as for :class:`~simulators.dlt645_meter.Dlt645Meter`.

What it answers (DL/T 698.45-2017 clause 6.3, Appendix E objects as in
``protocols/dlt698/data/oads.toml``):

* GET-Request Normal / NormalList: every catalogue object the load model can fill (energies
  total and ``tariffs`` tariffs, voltages, currents, powers, power factors, frequency), status
  words 2014 (word 3: bit 4 relay open, bit 6 relay commanded open, bit 7 pre-trip alarm, bits 8-9
  prepaid "money" when the purse is kept, bit 12 keep-power; word 1 bit 14 overdraft at zero
  credit), 4000 date-time, 4001 address (wildcard GET of 40010200 is address discovery), 4002,
  the purse 202C {remaining money (CNY, -2), purchase count}; anything else is DAR 6;
* GET-Request Record on 5004 (daily freeze, 62 kept), 5006 (monthly, 12 kept) and 5002 (15-minute,
  96 kept) with selector 1 (freeze time 20210200 equal), 2 (in [start, end), optional interval)
  or 9 (the Nth last); columns 20210200 and the energy objects, null for others. A response longer
  than the APDU size (``apdu_max``, or what CONNECT negotiated) goes out in GET-Response Next
  blocks (clause 6.1 application-layer block transfer);
* SET 40000200 and ACTION 4000 method 127 (broadcast or addressed) set the clock;
* ACTION 8000 method 129 trips (alarm delay minutes delay it; a power-off time with auto-close
  closes again after those minutes), 130 closes (enum 1 now, 0 arms: :meth:`press_button`),
  8001 method 127/128 keep-power on/off (a trip under keep-power gets DAR 3);
* CONNECT-Request (NullSecurity or PasswordSecurity) and RELEASE-Request; with
  ``requires_connect`` GET/SET/ACTION answer DAR 3 until an association exists (with
  ``unassociated_error`` an ERROR-Response "service not supported" instead, as some firmware
  does); a CONNECT offering another ``protocol_version`` than the meter's gets ConnectResult 5
  with the meter's version;
* SECURITY-Request plaintext + RN: answered by SECURITY-Response plaintext + MAC; ciphertext +
  SID_MAC: opened and answered in ciphertext. Both use the documented TEST-ONLY scheme of
  :mod:`simulators.dlt698_test_security` (NOT the State Grid ESAM scheme). With
  ``requires_security`` unwrapped GET/SET/ACTION answer DAR 20; remote control (8000, 8001)
  needs ciphertext unless ``accept_plaintext_control``;
* with ``report``: a relay move is followed by a REPORT-Notification (status words) after the
  reply, and the next response carries the same as a FollowReport unless a REPORT-Response
  acknowledged it first;
* prepaid: with a ``purse`` the remaining money falls by ``price`` per kWh imported; at zero credit
  a meter with ``trip_at_zero_credit`` trips itself (checked when a request arrives, so the trip
  is dated then, not at the exact moment the credit ran out);
* ``stuck_relay``: commands are accepted but the relay never moves.

As a terminal (or a meter that opens with a login, clause 6.3.2 LINK): with ``login`` the meter
sends a LINK-Request login when a master connects and again every ``heartbeat`` seconds (every
:data:`LOGIN_RETRY` without one) until a LINK-Response accepts it; with ``heartbeat`` it then
sends a LINK heartbeat at that period. :meth:`Dlt698Meter.link_request` makes the next one and
says when the one after is due; the bus (:mod:`simulators.links`) does the timing and the
writing. Every LINK-Response received is kept in ``link_answers`` with the seconds it took.
:meth:`Dlt698Meter.notify` makes a pending report a REPORT-Notification sent on its own, as a
meter does when an event happens between requests.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final

from meter_gateway.protocols.dlt698 import apdu as ap
from meter_gateway.protocols.dlt698.axdr import (
    NULL,
    OAD,
    OMD,
    RCSD,
    ROAD,
    TI,
    BitString,
    Data,
    DataType,
    DateTime,
    DateTimeS,
    Selector1,
    Selector2,
    SelectorLast,
    array,
    structure,
)
from meter_gateway.protocols.dlt698.catalogue import Catalogue, Item, default_catalogue
from meter_gateway.protocols.dlt698.deframer import Deframer
from meter_gateway.protocols.dlt698.errors import ProtocolError
from meter_gateway.protocols.dlt698.frame import (
    FUNCTION_DATA,
    FUNCTION_LINK,
    AddressType,
    Control,
    Frame,
    ServerAddress,
    parse_frame,
)
from meter_gateway.simulators.clock import SimClock
from meter_gateway.simulators.dlt698_test_security import DEFAULT_KEY, SecurityError, TestOnlySecurity
from meter_gateway.simulators.load import DEFAULT_TARIFFS, LoadModel, LoadSettings, energy_register, initial_energy
from meter_gateway.simulators.meter_clock import MeterClock
from meter_gateway.simulators.protocol import StreamDeframer, WireProtocol

log = logging.getLogger(__name__)

DAR_OK: Final = 0
DAR_DENIED: Final = 3  # 拒绝读写
DEFAULT_PROTOCOL_VERSION: Final = ap.PROTOCOL_VERSION  # what the gateway offers by default
DAR_UNDEFINED: Final = 4
DAR_UNAVAILABLE: Final = 6  # 对象不存在
DAR_TYPE: Final = 7
DAR_NO_BLOCK_TRANSFER: Final = 11
DAR_SECURITY_MISMATCH: Final = 20  # 安全认证不匹配
DAR_SECURITY_FAILED: Final = 23  # 安全认证失败
DAILY_KEPT: Final = 62
MONTHLY_KEPT: Final = 12
MINUTE_KEPT: Final = 96
MINUTE_INTERVAL: Final = 15  # minutes between 5002 freezes
CLOCK: Final = OAD(0x4000, 2, 0)
FREEZE_TIME: Final = OAD(0x2021, 2, 0)
STATUS_WORDS: Final = OAD(0x2014, 2, 0)
_EPOCH: Final = datetime.datetime(1970, 1, 1)
_RESPONSE: Final = Control(FUNCTION_DATA, from_server=True, prm=True)
_REPORT: Final = Control(FUNCTION_DATA, from_server=True, prm=False)
_LINK: Final = Control(FUNCTION_LINK, from_server=True, prm=False)
LINK_LOGIN: Final = 0
LINK_HEARTBEAT: Final = 1
LOGIN_RETRY: Final = 5.0  # seconds between unanswered logins of a meter without a heartbeat period
_W_UNITS: Final = frozenset({"W", "var", "VA"})
_FACTORY: Final = ap.FactoryVersion("MGSM", "0001", "260314", "0001", "260314", "SIMULATE")
_FREEZE_OBJECTS: Final = {0x5002: "minute", 0x5004: "daily", 0x5006: "monthly"}
_DEFAULT_COLUMNS: Final = (FREEZE_TIME, OAD(0x0010, 2, 0), OAD(0x0020, 2, 0))


def _unix(dt: datetime.datetime) -> float:
    return (dt - _EPOCH).total_seconds()


@functools.cache
def _data_type(name: str) -> DataType:
    return DataType[name.upper().replace("-", "_")]


@dataclass(frozen=True, slots=True)
class Freeze:
    time: datetime.datetime  # meter time of the freeze
    energy: Mapping[str, float]


class Dlt698Wire(WireProtocol):
    """DL/T 698.45 on a shared bus (see :mod:`simulators.protocol`)."""

    name = "dlt698"
    discard_prefix = "dlt698_discarded_"

    def deframer(self) -> StreamDeframer:
        return Deframer()

    def key(self, meter: Any) -> Hashable:
        return bytes(meter.address.wire)

    def from_meter(self, frame: Any) -> bool:
        return bool(frame.control.from_server)

    def frame_key(self, frame: Any) -> Hashable:
        address: ServerAddress = frame.address
        return bytes(address.wire) if address.type is AddressType.SINGLE else (address.type, address.wire)

    def is_broadcast(self, frame: Any) -> bool:
        return bool(frame.address.type is AddressType.BROADCAST)

    def is_wildcard(self, frame: Any) -> bool:
        return bool(frame.address.type is AddressType.WILDCARD)

    def wildcard_matches(self, frame: Any, meter: Any) -> bool:
        return bool(frame.address.matches(meter.address))

    def request_bytes(self, frame: Any) -> int:
        return 11 + len(frame.address.wire) + len(frame.data)

    def encode(self, frame: Any) -> bytes:
        return bytes(frame.encode())

    def readdress(self, reply: bytes) -> bytes:
        """The same reply from the address with its lowest bit flipped (HCS and FCS redone)."""
        preamble = len(reply) - len(reply.lstrip(b"\xfe"))
        frame = parse_frame(reply)
        wire = bytes((frame.address.wire[0] ^ 0x01,)) + frame.address.wire[1:]
        moved = ServerAddress(wire, frame.address.type, frame.address.logical)
        return Frame(frame.control, moved, frame.client, frame.data).encode(preamble)


DLT698: Final = Dlt698Wire()


@dataclass(frozen=True, slots=True)
class LinkAnswer:
    """A master's LINK-Response to one of the meter's LINK-Requests."""

    kind: int  # of the request: 0 login, 1 heartbeat, 2 logout
    latency: float  # seconds from the request made to the response received
    response: ap.LinkResponse


class Dlt698Meter(MeterClock):
    """One simulated DL/T 698.45 meter. See the module docstring for what it does."""

    WIRE: ClassVar[WireProtocol] = DLT698

    def __init__(
        self,
        address: str,
        *,
        clock: SimClock,
        seed: int = 0,
        preamble: int = 4,
        turnaround: float = 0.0,
        tariffs: int = 4,
        drift_ppm: float = 0.0,
        history_days: int = 0,
        energy_step: float = 300.0,
        requires_connect: bool = False,
        requires_security: bool = False,
        accept_plaintext_control: bool = True,
        report: bool = False,
        security_key: bytes = DEFAULT_KEY,
        password: str = "",
        purse: float | None = None,
        price: float = 0.5,
        trip_at_zero_credit: bool = False,
        apdu_max: int = 1024,
        catalogue: Catalogue | None = None,
        login: bool = False,
        heartbeat: float | None = None,
        protocol_version: int = DEFAULT_PROTOCOL_VERSION,
        unassociated_error: bool = False,
    ) -> None:
        self.address = ServerAddress.parse(address, AddressType.SINGLE)
        self.address_text = str(self.address)
        if not 0 <= preamble <= 4:
            raise ValueError(f"preamble is 0..4 FE bytes, got {preamble}")
        if not 1 <= tariffs <= 12:
            raise ValueError(f"tariffs must be 1..12, got {tariffs}")
        if apdu_max < 64:
            raise ValueError(f"apdu_max must be >= 64 bytes, got {apdu_max}")
        if heartbeat is not None and not 0 < heartbeat <= 0xFFFF:
            raise ValueError(f"heartbeat must be 0..65535 seconds, got {heartbeat}")
        self.clock = clock
        self.preamble = preamble
        self.turnaround = turnaround
        self.tariffs = tariffs
        self.drift_ppm = drift_ppm
        self.requires_connect = requires_connect
        self.protocol_version = protocol_version
        self.unassociated_error = unassociated_error
        self.requires_security = requires_security
        self.accept_plaintext_control = accept_plaintext_control
        self.report = report
        self.security = TestOnlySecurity(security_key)
        self.password = password
        self.price = price
        self.trip_at_zero_credit = trip_at_zero_credit
        self.apdu_max = apdu_max
        self.catalogue = catalogue or default_catalogue()
        self.relay_closed = True
        self.relay_armed = False
        self.relay_command_open = False
        self.keep_power = False
        self.stuck_relay = False
        self.requests = 0
        self.reports_sent = 0
        self.login = login
        self.heartbeat = heartbeat
        self.logged_in = False
        self.link_requests_sent = 0
        self.link_answers: list[LinkAnswer] = []
        self._link_waiting: dict[int, tuple[int, float]] = {}  # PIID -> (kind, monotonic time sent)
        self._link_piid = 0
        self.daily: deque[Freeze] = deque(maxlen=DAILY_KEPT)
        self.monthly: deque[Freeze] = deque(maxlen=MONTHLY_KEPT)
        self.minute: deque[Freeze] = deque(maxlen=MINUTE_KEPT)
        self._association_until: datetime.datetime | None = None
        self._negotiated_apdu = apdu_max
        self._pending_trip: datetime.datetime | None = None
        self._pending_close: datetime.datetime | None = None
        self._new_report: tuple[ap.ResultNormal, ...] | None = None  # to notify after this reply
        self._follow_report: tuple[ap.ResultNormal, ...] | None = None  # to ride on the next reply
        self._blocks: list[ap.ResultRecord] = []
        self._report_piid = 0
        self._request_now: datetime.datetime | None = None
        sim_now = self._start_clock()
        initial = initial_energy(seed)
        start = sim_now - datetime.timedelta(days=history_days)
        self.load = LoadModel(LoadSettings(seed=seed, initial_energy=initial, step=energy_step), start=_unix(start))
        self._model_tariffs = DEFAULT_TARIFFS.tariffs
        self._last_minute_freeze = _floor_minutes(start, MINUTE_INTERVAL)
        self._last_date = start.date()
        self.purse = purse
        self.purchase_count = 0 if purse is None else 1
        self._purse_energy = self.load.energy("energy.active.import.total")
        self._credit_tripped = False

    # -- clock ----------------------------------------------------------------------------------

    def _sim_at(self, meter_time: datetime.datetime) -> float:
        return _unix(meter_time - datetime.timedelta(seconds=self.clock_offset))

    # -- relay and purse ------------------------------------------------------------------------

    def press_button(self) -> bool:
        """The customer's button: closes a relay armed by method 130 "allow closing"."""
        self._catch_up()
        if not self.relay_armed:
            return False
        self.relay_armed = False
        self._move_relay(closed=True)
        return self.relay_closed

    def _move_relay(self, *, closed: bool, at: datetime.datetime | None = None) -> bool:
        """Move the relay (at meter time ``at``); whether it moved."""
        if self.stuck_relay or self.relay_closed == closed:
            return False
        when = at or self.meter_time()
        self.load.advance(self._sim_at(when))
        self.load.set_relay(closed)
        self.relay_closed = closed
        if self.report:
            self._new_report = (ap.ResultNormal(STATUS_WORDS, self._status_words()),)
        return True

    @property
    def remaining_money(self) -> float | None:
        """Remaining credit (CNY), or None when the meter keeps no purse."""
        if self.purse is None:
            return None
        used = self.load.energy("energy.active.import.total") - self._purse_energy
        return max(0.0, self.purse - used * self.price)

    def top_up(self, amount: float) -> None:
        """A purchase: credit added (the purse restarts from what remained)."""
        remaining = self.remaining_money
        if remaining is None:
            raise ValueError("this meter keeps no purse")
        self.purse = remaining + amount
        self._purse_energy = self.load.energy("energy.active.import.total")
        self.purchase_count += 1
        self._credit_tripped = False

    def status_word(self, n: int) -> int:
        """Running status word ``n`` (1..7) as an int whose bit k is the standard's bit k."""
        self._catch_up()
        return self._word(n)

    def _word(self, n: int) -> int:
        word = 0
        if n == 1 and self.purse is not None and self.remaining_money == 0.0:
            word |= 1 << 14
        if n == 3:
            if not self.relay_closed:
                word |= 1 << 4
            if self.relay_command_open:
                word |= 1 << 6
            if self._pending_trip is not None:
                word |= 1 << 7
            if self.purse is not None:
                word |= 1 << 9  # prepaid by money (bits 8-9 = 2)
            if self.keep_power:
                word |= 1 << 12
        return word

    def _status_words(self) -> Data:
        """2014 attribute 2 as the state is now (no catch-up: relay moves call it mid-way)."""
        words = []
        for n in range(1, 8):
            value = self._word(n)
            bits = "".join("1" if value >> k & 1 else "0" for k in range(16))
            words.append(Data(DataType.BIT_STRING, BitString.from_bits(bits)))
        return array(*words)

    # -- lazy time-driven state -----------------------------------------------------------------

    def _catch_up(self) -> None:
        """Apply what is due by now: delayed trips, auto-close, freezes, the zero-credit trip."""
        now = self.meter_time()
        events: list[tuple[datetime.datetime, int, Callable[[], None]]] = []
        if self._pending_trip is not None and self._pending_trip <= now:
            due = self._pending_trip

            def trip(due: datetime.datetime = due) -> None:
                self._pending_trip = None
                self._move_relay(closed=False, at=due)

            events.append((due, 0, trip))
        if self._pending_close is not None and self._pending_close <= now:
            due_close = self._pending_close

            def close(due: datetime.datetime = due_close) -> None:
                self._pending_close = None
                self.relay_command_open = False
                self._move_relay(closed=True, at=due)

            events.append((due_close, 1, close))
        events.extend(
            (when, 2, functools.partial(self._freeze, self.minute, when)) for when in self._due_minute_freezes(now)
        )
        today = now.date()
        if today > self._last_date:
            first = max(self._last_date + datetime.timedelta(days=1), today - datetime.timedelta(days=DAILY_KEPT + 31))
            day = first
            while day <= today:
                midnight = datetime.datetime.combine(day, datetime.time())
                events.append((midnight, 3, functools.partial(self._freeze, self.daily, midnight)))
                if day.day == 1:
                    events.append((midnight, 4, functools.partial(self._freeze, self.monthly, midnight)))
                day += datetime.timedelta(days=1)
            self._last_date = today
        for _, _, action in sorted(events, key=lambda e: (e[0], e[1])):
            action()
        self.load.advance(self._sim_at(now))
        if (
            self.trip_at_zero_credit
            and not self._credit_tripped
            and self.remaining_money == 0.0
            and not self.keep_power
            and self.relay_closed
        ):
            self._credit_tripped = True
            self.relay_command_open = True
            self._move_relay(closed=False, at=now)

    def _due_minute_freezes(self, now: datetime.datetime) -> list[datetime.datetime]:
        step = datetime.timedelta(minutes=MINUTE_INTERVAL)
        latest = _floor_minutes(now, MINUTE_INTERVAL)
        if latest <= self._last_minute_freeze:
            return []
        first = max(self._last_minute_freeze + step, latest - step * (MINUTE_KEPT - 1))
        self._last_minute_freeze = latest
        out = []
        while first <= latest:
            out.append(first)
            first += step
        return out

    def _freeze(self, kept: deque[Freeze], when: datetime.datetime) -> None:
        self.load.advance(self._sim_at(when))
        kept.appendleft(Freeze(when, self._energy_snapshot()))

    def _energy_snapshot(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for kind in ("active", "reactive"):
            for direction in ("import", "export"):
                for tariff in ("total", *(f"t{t}" for t in range(1, self.tariffs + 1))):
                    number = 0 if tariff == "total" else int(tariff[1:])
                    name = f"energy.{kind}.{direction}.{tariff}"
                    out[name] = self.load.energy(name) if number <= self._model_tariffs else 0.0
        return out

    # -- values ---------------------------------------------------------------------------------

    def quantity(self, name: str, snapshot: Mapping[str, float] | None = None) -> float:
        """A quantity in canonical units (kWh, kW, V, A ...); LookupError when not simulated."""
        if name.startswith("energy."):
            return self._energy(name, snapshot)
        values = self.load.values()
        if name in values:
            return values[name]
        raise LookupError(name)

    def _energy(self, name: str, snapshot: Mapping[str, float] | None) -> float:
        parts = name.split(".")
        if len(parts) != 4:
            raise LookupError(name)  # per-phase energies are not simulated
        _, kind, direction, tariff = parts
        number = int(tariff[1:]) if tariff[:1] == "t" and tariff[1:].isdigit() else 0
        if tariff != "total" and not 1 <= number <= self.tariffs:
            raise LookupError(name)
        source = snapshot if snapshot is not None else self._energy_snapshot()

        def get(k: str, d: str) -> float:
            return source[f"energy.{k}.{d}.{tariff}"]

        value = energy_register(kind, direction, get)
        if value is None:
            raise LookupError(name)
        return value

    def get_data(self, oad: OAD, snapshot: Mapping[str, float] | None = None) -> Data:
        """The Data for ``oad`` now (or from a freeze ``snapshot``); LookupError if the meter has none."""
        oi = oad.oi
        if oi == 0x4000 and oad.attribute_id == 2:
            return Data(DataType.DATE_TIME_S, DateTimeS.from_datetime(self.meter_time().replace(microsecond=0)))
        if oi in (0x4001, 0x4002) and oad.attribute_id == 2:
            return Data(DataType.OCTET_STRING, bytes.fromhex(self.address_text))
        if oi == 0x2014 and oad.attribute_id == 2:
            self._catch_up()
            words = self._status_words()
            return words if oad.index == 0 else _element(words, oad.index)
        if oi == 0x202C and oad.attribute_id == 2:
            remaining = self.remaining_money
            if remaining is None:
                raise LookupError(oad)
            purse = structure(
                Data(DataType.DOUBLE_LONG_UNSIGNED, round(remaining * 100)),
                Data(DataType.DOUBLE_LONG_UNSIGNED, self.purchase_count),
            )
            return purse if oad.index == 0 else _element(purse, oad.index)
        item = self.catalogue.get(oad)
        if item is None or item.layout in ("record", "structure", "status_words"):
            raise LookupError(oad)
        count = _element_count(item, self.tariffs)
        if oad.index == 0:
            if item.layout == "none":
                return self._number(item, 0, snapshot)
            return array(*(self._number(item, i, snapshot) for i in range(1, count + 1)))
        if oad.index > count:
            raise LookupError(oad)
        return self._number(item, oad.index, snapshot)

    def _number(self, item: Item, index: int, snapshot: Mapping[str, float] | None) -> Data:
        _, quantity, scaler, unit = item.element(index)
        if quantity is None:
            raise LookupError(item.oad)
        value = self.quantity(quantity, snapshot)
        if unit in _W_UNITS:
            value *= 1000.0  # the load model's kW; 698.45 counts W
        raw = round(value / 10.0**scaler)
        if "unsigned" in item.type:
            raw = max(0, raw)
        return Data(_data_type(item.type), raw)

    # -- request handling -----------------------------------------------------------------------

    def handle(self, frame: Frame, now: datetime.datetime | None = None) -> list[bytes]:
        """Reply bytes for one request frame (an empty list when the meter stays silent)."""
        if frame.control.from_server or frame.control.fragment or not frame.address.matches(self.address):
            return []
        return self._answering(now, self._handle, frame)

    def _handle(self, frame: Frame) -> list[bytes]:
        broadcast = frame.address.type is AddressType.BROADCAST
        try:
            request = ap.parse_apdu(frame.apdu)
        except ProtocolError as exc:
            log.debug("meter %s: unparsable APDU: %s", self.address_text, exc)
            return [] if broadcast else [self._frame(frame, ap.ErrorResponse(error=1).encode())]
        if isinstance(request, ap.LinkResponse):
            self._link_answered(request)
            return []
        self._catch_up()
        if isinstance(request, ap.ReportResponseList):
            self._follow_report = None  # the master has the report: no FollowReport needed
            return []
        response = self._secured(request, broadcast)
        if broadcast or response is None:
            return []
        out = [self._frame(frame, response)]
        if self._new_report is not None:
            out.append(self._notification(frame.client))
        return out

    # -- speaking on its own ----------------------------------------------------------------------

    @property
    def talks(self) -> bool:
        """Whether the meter sends LINK-Requests on its own (the bus then times them)."""
        return self.login or self.heartbeat is not None

    def connected(self) -> None:
        """A master connected: the meter logs in again before its heartbeats."""
        self.logged_in = False
        self._link_waiting.clear()

    def link_request(self) -> tuple[bytes, float]:
        """The meter's next LINK-Request (a login until one is accepted, then a heartbeat) and
        the seconds until the one after."""
        kind = LINK_HEARTBEAT if self.logged_in or not self.login else LINK_LOGIN
        self._link_piid = self._link_piid % 63 + 1
        request = ap.LinkRequest(
            piid=ap.Piid(self._link_piid),
            kind=kind,
            heartbeat=round(self.heartbeat or 0),
            time=DateTime.from_datetime(self.meter_time()),
        )
        self._link_waiting[self._link_piid] = (kind, time.monotonic())
        self.link_requests_sent += 1
        return Frame(_LINK, self.address, 0, request.encode()).encode(self.preamble), self.heartbeat or LOGIN_RETRY

    def _link_answered(self, response: ap.LinkResponse) -> None:
        sent = self._link_waiting.pop(response.piid.seq, None)
        if sent is None:
            return  # an answer to nothing we are waiting for (repeated, or before a reconnect)
        kind, at = sent
        self.link_answers.append(LinkAnswer(kind, time.monotonic() - at, response))
        if kind == LINK_LOGIN and response.result == 0:
            self.logged_in = True

    def notify(self) -> bytes | None:
        """The pending report (a relay move with ``report``) as a REPORT-Notification sent on its
        own, not behind a response; None when nothing is pending."""
        return None if self._new_report is None else self._notification(0)

    def _notification(self, client: int) -> bytes:
        """The pending report as a REPORT-Notification; it rides on the next response as a
        FollowReport too, until a REPORT-Response acknowledges it."""
        assert self._new_report is not None
        self._report_piid = (self._report_piid + 1) & 0x3F
        notification = ap.ReportNotificationList(piid=ap.Piid(self._report_piid), results=self._new_report)
        self.reports_sent += 1
        self._follow_report, self._new_report = self._new_report, None
        return Frame(_REPORT, self.address, client, notification.encode()).encode(self.preamble)

    def _frame(self, request: Frame, apdu: bytes) -> bytes:
        return Frame(_RESPONSE, self.address, request.client, apdu).encode(self.preamble)

    def _secured(self, request: ap.Apdu, broadcast: bool) -> bytes | None:
        """The response APDU bytes to ``request``, SECURITY-wrapped as the request was."""
        if not isinstance(request, ap.SecurityRequest):
            response = self._serve(request, "none", broadcast)
            return None if response is None else self._with_follow_report(response).encode()
        v = request.verification
        if request.encrypted:
            try:
                plain = self.security.open_request(request)
                inner = ap.parse_apdu(plain)
            except (SecurityError, ProtocolError) as exc:
                log.debug("meter %s: refused a ciphertext request: %s", self.address_text, exc)
                return ap.SecurityResponse(dar=DAR_SECURITY_FAILED).encode()
            response = self._serve(inner, "cipher", broadcast)
            if response is None:
                return None
            return self.security.seal_response(self._with_follow_report(response).encode(), v.sid, v.sid_extra).encode()
        if request.inner is None or v.kind != 1:
            return ap.SecurityResponse(dar=DAR_SECURITY_MISMATCH).encode()
        response = self._serve(request.inner, "plain", broadcast)
        if response is None:
            return None
        body = self._with_follow_report(response).encode()
        return ap.SecurityResponse(data=body, mac=self.security.rn_mac(v.rn, body)).encode()

    def _with_follow_report(self, response: ap.Apdu) -> ap.Apdu:
        if self._follow_report is None or not isinstance(response, ap.ServerApdu):
            return response
        results = self._follow_report
        self._follow_report = None
        return dataclasses.replace(response, follow_report=ap.FollowReport(results))

    def _serve(self, request: ap.Apdu, level: str, broadcast: bool) -> ap.Apdu | None:
        """The plaintext response APDU (None: no response). ``level``: none | plain | cipher."""
        piid = getattr(request, "piid", ap.PIID0)
        piid = ap.Piid(piid.seq, piid.high_priority)
        if isinstance(request, ap.ConnectRequest):
            return self._connect(request, piid)
        if isinstance(request, ap.ReleaseRequest):
            self._association_until = None
            self._negotiated_apdu = self.apdu_max
            return ap.ReleaseResponse(piid=piid, result=0)
        denied = self._denied(level, broadcast)
        if denied == DAR_DENIED and self.unassociated_error:
            return ap.ErrorResponse(piid=piid, error=2)
        match request:
            case ap.GetRequestNormal(oad=oad):
                return ap.GetResponseNormal(piid=piid, result=self._get(oad, denied))
            case ap.GetRequestNormalList(oads=oads):
                return ap.GetResponseNormalList(piid=piid, results=tuple(self._get(o, denied) for o in oads))
            case ap.GetRequestRecord(record=record):
                return self._get_record(piid, record, denied)
            case ap.GetRequestNext(last_block=last):
                return self._get_next(piid, last)
            case ap.SetRequestNormal(oad=oad, data=data):
                return ap.SetResponseNormal(piid=piid, oad=oad, dar=denied or self._set(oad, data))
            case ap.ActionRequest(omd=omd, data=data):
                dar = denied or self._action(omd, data, level)
                return ap.ActionResponseNormal(piid=piid, result=ap.ActionResult(omd, dar))
        return None if broadcast else ap.ErrorResponse(piid=piid, error=2)

    def _denied(self, level: str, broadcast: bool) -> int:
        """The DAR refusing a data service before its object is looked at (0: go ahead)."""
        if broadcast:
            return 0  # broadcast time needs neither association nor security
        if self.requires_security and level == "none":
            return DAR_SECURITY_MISMATCH
        if self.requires_connect and not self._associated():
            return DAR_DENIED
        return 0

    def _associated(self) -> bool:
        until = self._association_until
        if until is not None and until < self.meter_time():
            self._association_until = None
        return self._association_until is not None

    def _connect(self, request: ap.ConnectRequest, piid: ap.Piid) -> ap.Apdu:
        mechanism = request.mechanism
        result = 0
        if mechanism.kind == 1 and mechanism.password != self.password:
            result = 1
        elif mechanism.kind not in (0, 1):
            result = 2  # symmetric/signature security needs an ESAM, which is not simulated
        if request.version != self.protocol_version:
            result = 5  # the meter answers with its own version
        size = min(request.apdu_max, self.apdu_max)
        if result == 0:
            self._association_until = self.meter_time() + datetime.timedelta(seconds=request.timeout)
            self._negotiated_apdu = size
        return ap.ConnectResponse(
            piid=piid,
            factory=_FACTORY,
            version=self.protocol_version,
            protocol_conformance=request.protocol_conformance,
            function_conformance=request.function_conformance,
            send_max=min(request.receive_max, self.apdu_max),
            receive_max=min(request.send_max, self.apdu_max),
            window=1,
            apdu_max=size,
            timeout=request.timeout,
            result=result,
        )

    def _get(self, oad: OAD, denied: int) -> ap.ResultNormal:
        if denied:
            return ap.ResultNormal(oad, dar=denied)
        try:
            return ap.ResultNormal(oad, self.get_data(oad))
        except LookupError:
            return ap.ResultNormal(oad, dar=DAR_UNAVAILABLE)

    # -- records --------------------------------------------------------------------------------

    def _get_record(self, piid: ap.Piid, record: ap.GetRecord, denied: int) -> ap.Apdu:
        columns = record.rcsd.columns or _DEFAULT_COLUMNS
        rcsd = RCSD(tuple(columns))
        kind = _FREEZE_OBJECTS.get(record.oad.oi)
        if denied or kind is None or record.oad.attribute_id != 2:
            dar = denied or DAR_UNAVAILABLE
            return ap.GetResponseRecord(piid=piid, result=ap.ResultRecord(record.oad, rcsd, dar=dar))
        kept: deque[Freeze] = getattr(self, kind)
        try:
            freezes = _select(kept, record.rsd)
        except LookupError:
            return ap.GetResponseRecord(piid=piid, result=ap.ResultRecord(record.oad, rcsd, dar=DAR_TYPE))
        rows = tuple(tuple(self._column(c, f) for c in columns) for f in freezes)
        result = ap.ResultRecord(record.oad, rcsd, rows)
        whole = ap.GetResponseRecord(piid=piid, result=result)
        if len(whole.encode()) <= self._negotiated_apdu:
            self._blocks = []
            return whole
        self._blocks = self._split(result)
        return self._get_next(piid, 0)

    def _split(self, result: ap.ResultRecord) -> list[ap.ResultRecord]:
        """Rows in blocks that each fit the APDU size (at least one row per block)."""
        blocks: list[ap.ResultRecord] = []
        rows: list[tuple[Data, ...]] = []
        overhead = 32  # GET-Response Next header and trailers
        for row in result.rows or ():
            trial = ap.ResultRecord(result.oad, result.rcsd, (*rows, row))
            if rows and len(ap.GetResponseRecord(result=trial).encode()) + overhead > self._negotiated_apdu:
                blocks.append(ap.ResultRecord(result.oad, result.rcsd, tuple(rows)))
                rows = []
            rows.append(row)
        blocks.append(ap.ResultRecord(result.oad, result.rcsd, tuple(rows)))
        return blocks

    def _get_next(self, piid: ap.Piid, last_block: int) -> ap.Apdu:
        if not self._blocks or not 0 <= last_block < len(self._blocks):
            return ap.GetResponseNext(piid=piid, last=True, block=last_block + 1, dar=DAR_NO_BLOCK_TRANSFER)
        block = last_block + 1
        last = block == len(self._blocks)
        response = ap.GetResponseNext(
            piid=piid, last=last, block=block, results=(self._blocks[last_block],), records=True
        )
        if last:
            self._blocks = []
        return response

    def _column(self, column: OAD | ROAD, freeze: Freeze) -> Data:
        if isinstance(column, ROAD):
            return NULL
        if column.oi == FREEZE_TIME.oi:
            return Data(DataType.DATE_TIME_S, DateTimeS.from_datetime(freeze.time))
        if column.oi >= 0x1000:  # only energies are frozen
            return NULL
        try:
            return self.get_data(column, freeze.energy)
        except LookupError:
            return NULL

    # -- SET and ACTION -------------------------------------------------------------------------

    def _set(self, oad: OAD, data: Data) -> int:
        if oad.oi != CLOCK.oi or oad.attribute_id != 2:
            return DAR_DENIED if self.catalogue.get(oad) is not None else DAR_UNDEFINED
        when = data.value.to_datetime() if data.type is DataType.DATE_TIME_S else None
        if when is None:
            return DAR_TYPE
        self.set_meter_time(when)
        return DAR_OK

    def _action(self, omd: OMD, data: Data, level: str) -> int:
        if omd.oi == 0x4000 and omd.method == 127:
            when = data.value.to_datetime() if data.type is DataType.DATE_TIME_S else None
            if when is None:
                return DAR_TYPE
            self.set_meter_time(when)
            return DAR_OK
        if omd.oi not in (0x8000, 0x8001):
            return DAR_UNDEFINED
        if level != "cipher" and not self.accept_plaintext_control:
            return DAR_SECURITY_MISMATCH
        if omd.oi == 0x8001:
            if omd.method not in (127, 128):
                return DAR_UNDEFINED
            self.keep_power = omd.method == 127
            if self.keep_power:
                self._pending_trip = None
            return DAR_OK
        try:
            commands = [tuple(item.value) for item in data.value]
        except TypeError:
            return DAR_TYPE
        if omd.method == 129:
            return self._trip(commands)
        if omd.method == 130:
            return self._close(commands)
        return DAR_UNDEFINED

    def _trip(self, commands: Sequence[tuple[Data, ...]]) -> int:
        if any(len(c) != 4 for c in commands) or not commands:
            return DAR_TYPE
        if self.keep_power:
            return DAR_DENIED
        _, alarm, off, auto_close = commands[0]
        now = self.meter_time()
        self.relay_command_open = True
        self.relay_armed = False
        if int(alarm.value):
            self._pending_trip = now + datetime.timedelta(minutes=int(alarm.value))
            trip_at = self._pending_trip
        else:
            self._pending_trip = None
            self._move_relay(closed=False)
            trip_at = now
        self._pending_close = None
        if int(off.value) and bool(auto_close.value):
            self._pending_close = trip_at + datetime.timedelta(minutes=int(off.value))
        return DAR_OK

    def _close(self, commands: Sequence[tuple[Data, ...]]) -> int:
        if any(len(c) != 2 for c in commands) or not commands:
            return DAR_TYPE
        close_now = int(commands[0][1].value) == 1
        self.relay_command_open = False
        self._pending_trip = None
        self._pending_close = None
        if close_now:
            self.relay_armed = False
            self._move_relay(closed=True)
        else:
            self.relay_armed = not self.relay_closed
        return DAR_OK


def _floor_minutes(when: datetime.datetime, minutes: int) -> datetime.datetime:
    floored = when.replace(second=0, microsecond=0)
    return floored - datetime.timedelta(minutes=floored.minute % minutes)


def _element(data: Data, index: int) -> Data:
    items = data.value
    if not 1 <= index <= len(items):
        raise LookupError(index)
    return items[index - 1]  # type: ignore[no-any-return]


def _element_count(item: Item, tariffs: int) -> int:
    return {"tariffs": tariffs + 1, "phases": 3, "total_phases": 4}.get(item.layout, 1)


def _select(kept: Sequence[Freeze], rsd: Any) -> list[Freeze]:
    """The freezes a row selector picks, oldest first. LookupError for a selector not supported."""
    value = rsd.value
    if rsd.selector == 1 and isinstance(value, Selector1) and value.oad.oi == FREEZE_TIME.oi:
        when = value.value.value.to_datetime() if value.value.type is DataType.DATE_TIME_S else None
        return [f for f in reversed(kept) if f.time == when]
    if rsd.selector == 2 and isinstance(value, Selector2) and value.oad.oi == FREEZE_TIME.oi:
        start = value.start.value.to_datetime() if value.start.type is DataType.DATE_TIME_S else None
        end = value.end.value.to_datetime() if value.end.type is DataType.DATE_TIME_S else None
        if start is None or end is None:
            raise LookupError("selector 2 needs date_time_s bounds")
        rows = [f for f in reversed(kept) if start <= f.time < end]
        step = value.interval.value if value.interval.type is DataType.TI else None
        if isinstance(step, TI) and step.interval:
            rows = [f for f in rows if _on_step(start, f.time, step)]
        return rows
    if rsd.selector == 9 and isinstance(value, SelectorLast):
        return [kept[value.n - 1]] if 1 <= value.n <= len(kept) else []
    raise LookupError(f"selector {rsd.selector}")


def _on_step(start: datetime.datetime, when: datetime.datetime, step: TI) -> bool:
    if step.unit in (0, 1, 2, 3):
        seconds = step.interval * (1, 60, 3600, 86400)[step.unit]
        return (when - start).total_seconds() % seconds == 0
    months = (when.year - start.year) * 12 + when.month - start.month
    return months % (step.interval * (1 if step.unit == 4 else 12)) == 0


__all__ = ["DLT698", "Dlt698Meter", "Dlt698Wire", "Freeze"]

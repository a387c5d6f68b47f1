"""The CJ/T 188 meter driver: water, gas and heat meter readings, clock, time sync, valve, discovery.

One :class:`Cjt188Driver` per meter; many share one :class:`~drivers.bus.Bus` (an M-Bus or RS-485
segment behind a level converter, or a TCP serial server), also with DL/T 645 or DL/T 698.45
meters. Every request is one ``bus.exchange`` with a
:class:`~protocols.cjt188.exchange.Cjt188Exchange` that accepts only this request's reply;
frames and messages come from the sans-I/O codec (:mod:`protocols.cjt188`), values from its
catalogue.

Decisions worth knowing:

* **Wake-up.** The model's ``preamble`` FE bytes (clause 6.3; a meter may override it) go in
  front of every request, so a battery meter's receiver is awake before the frame starts. The
  transport sends bytes as given; the preamble is part of the request.
* **Waiting.** A transaction waits at least the model's ``turnaround`` plus the longest reply's
  time on the wire (preamble and a 43-byte heat 901F), even when the bus's ``reply_timeout`` is
  shorter: a slow battery meter must not read as dead because a fast meter shares its line.
* **SER.** One counter per bus (clause 7.1: +1 modulo 256 per exchange); retries resend the
  same bytes and SER, which is idempotent for reads and for valve commands.
* **One read per DI.** A model's quantities come from few DIs (901F carries all of a water
  meter's); each DI is read once per ``read`` call. ST becomes ``valve.state`` (a string:
  open, closed, abnormal), ``battery.low`` (0/1) and ``status.word`` (the raw word).
* **Units.** The catalogue converts coded units to canonical ones (L to m3, Wh/MWh to kWh...);
  a heat register kept in J-family units stays in GJ. ``OUT_OF_RANGE`` outside
  :data:`~drivers.cjt188_model.QUANTITIES`' range, as the other drivers do.
* **Time.** Meters keep naive local wall time: ``tz`` converts both ways. 901F carries the
  meter's time; A015 sets it (acknowledged, unlike DL/T 645's broadcast).
* **Settlement days.** A meter settles once a month, at 00:00 of its settlement day (8103), and
  keeps the register at its last 12 settlements (D120-D12B, newest first; the replies carry no
  date). :meth:`Cjt188Driver.read_frozen_day` answers the frozen job's question "the record of
  this date" for a settlement date: the meter's settlement day and clock say how many
  settlements back it is, the reading is stamped at that settlement instant (``meter_time``)
  under the register's ordinary name (``volume.total``, ``heat.total``...), so its id is the
  same however often it is read, as for daily freezes.
* **Valve.** A017 with 55H opens, 99H closes; the acknowledgement carries ST (the old position
  while the motor still runs). Whether the valve got there is the caller's read-back
  (:meth:`Cjt188Driver.read_valve`): the command executor verifies every valve command.
"""

from __future__ import annotations

import calendar
import datetime
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from meter_gateway.drivers.bus import Bus, Priority
from meter_gateway.drivers.cjt188_model import Cjt188Model, quantity_info
from meter_gateway.drivers.context import DriverContext
from meter_gateway.drivers.errors import BadReply, ConfigurationError, MeterRefused, NoAnswer, PartialRead
from meter_gateway.drivers.log_limit import logfmt_value
from meter_gateway.drivers.per_bus import PerBus
from meter_gateway.drivers.reading import Quality, Reading
from meter_gateway.drivers.readings import from_meter_time, plausible, to_meter_time
from meter_gateway.protocols.cjt188 import messages as m
from meter_gateway.protocols.cjt188.catalogue import Catalogue, DecodedValue, default_catalogue
from meter_gateway.protocols.cjt188.errors import ProtocolError, RemoteProtocolError
from meter_gateway.protocols.cjt188.exchange import Cjt188Exchange, Cjt188Line, Expect
from meter_gateway.protocols.cjt188.frame import OVERHEAD, WILDCARD, WILDCARD_TYPE, Address
from meter_gateway.protocols.cjt188.identifiers import DI_ORDERS, DiOrder, check_order
from meter_gateway.protocols.cjt188.status import Status

__all__ = [
    "SETTLEMENTS_KEPT",
    "Cjt188Driver",
    "DiscoveredMeter",
    "ValveStatus",
    "discover",
    "from_config",
    "latest_settlement",
    "line_for",
    "settlement_date",
    "settlement_dates",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

# The longest reply the gateway asks for: a heat meter's 901F (DI SER + 43 bytes), 4 FE first.
LONGEST_REPLY: Final = 4 + OVERHEAD + 3 + 43
DISCOVERY_PREAMBLE: Final = 4  # clause 6.3's longest run: whatever sleeps on the line wakes
DISCOVERY_TURNAROUND: Final = 1.0  # s: the slowest shipped model's turnaround, for an unknown meter
# A converter or serial server adds its own latency to the meter's turnaround.
SCHEDULING_MARGIN: Final = 0.1  # s

# what the CJ/T 188 exchanges on a bus share
line_for: Final = PerBus(Cjt188Line)

DI_SETTLEMENT_DAY: Final = 0x8103  # clause 7 Table 5: read settlement day (DD)
DI_HISTORY: Final = 0xD120  # D120 + n - 1: the register at the n-th last settlement day
SETTLEMENTS_KEPT: Final = 12  # D120-D12B
# the register a meter of each class keeps at its settlement days (the history DI's value)
_SETTLED: Final = {"water": "volume", "gas": "volume", "heat": "heat", "cooling": "cooling", "other": "reading"}


def settlement_date(year: int, month: int, settlement_day: int) -> datetime.date:
    """The settlement date of a month: its ``settlement_day``, or its last day when it is shorter."""
    last = calendar.monthrange(year, month)[1]
    return datetime.date(year, month, min(settlement_day, last))


def _month_before(day: datetime.date) -> tuple[int, int]:
    return (day.year, day.month - 1) if day.month > 1 else (day.year - 1, 12)


def latest_settlement(today: datetime.date, settlement_day: int) -> datetime.date:
    """The newest settlement date on or before ``today``."""
    this = settlement_date(today.year, today.month, settlement_day)
    return this if this <= today else settlement_date(*_month_before(today), settlement_day)


def settlement_dates(first: datetime.date, last: datetime.date, settlement_day: int) -> list[datetime.date]:
    """The settlement dates from ``first`` to ``last`` (inclusive), oldest first."""
    out: list[datetime.date] = []
    day = latest_settlement(last, settlement_day)
    while day >= first:
        out.append(day)
        day = settlement_date(*_month_before(day), settlement_day)
    return out[::-1]


def _months(older: datetime.date, newer: datetime.date) -> int:
    return (newer.year - older.year) * 12 + newer.month - older.month


@dataclass(frozen=True, slots=True)
class ValveStatus:
    state: str  # open | closed | abnormal (ST D0-D1; "reserved" for the undefined 10)
    battery_low: bool
    raw: int  # the whole ST word
    read_at: float  # gateway unix time of the read


@dataclass(frozen=True, slots=True)
class DiscoveredMeter:
    meter_type: int
    address: str  # printed, 14 digits
    meter_class: str  # water, gas, heat, cooling, other


def _expecting(kind: type[T]) -> Callable[[m.Message], T]:
    def decode(message: m.Message) -> T:
        if not isinstance(message, kind):
            raise RemoteProtocolError(f"expected {kind.__name__}, got {type(message).__name__}")
        return message

    return decode


def _unconverted(value: DecodedValue) -> bool:
    return "unit_code" in value.fields and value.unit is None


def _reply_timeout(bus: Bus, turnaround: float, preamble: int) -> float:
    """The bus's reply timeout, or the meter's turnaround plus the longest reply's line time
    plus :data:`SCHEDULING_MARGIN`, whichever is longer."""
    transport = bus.transport
    line_time = transport.tx_time(LONGEST_REPLY + preamble) if transport is not None else 0.0
    return max(bus.settings.reply_timeout, turnaround + line_time + SCHEDULING_MARGIN)


async def discover(
    bus: Bus,
    *,
    meter_type: int = WILDCARD_TYPE,
    preamble: int = DISCOVERY_PREAMBLE,
    di_order: DiOrder = "standard",
    priority: int = Priority.COMMAND,
    reply_timeout: float | None = None,
) -> DiscoveredMeter:
    """The type and address of the one meter on a one-to-one link: 03H read address (DI 810A)
    to the all-AA wildcard address (clause 7, Table 7; type AA unless ``meter_type`` narrows it).

    With several meters on the line several answer at once: BadReply (a collision) or the first
    clean reply; CJ/T 188 discovery is for a meter on its own (a hand-held converter on one
    meter, or one meter per serial server port). Raises NoAnswer when nothing answers.
    """
    line = line_for(bus)
    request = m.ReadRequest.meter_address(line.next_ser(), meter_type, WILDCARD)
    exchange = Cjt188Exchange(line, Expect.of(request, di_order), _expecting(m.ReadReply), di_order)
    reply = await bus.exchange(
        request.encode(di_order, preamble),
        exchange,
        priority=priority,
        reply_timeout=reply_timeout or _reply_timeout(bus, DISCOVERY_TURNAROUND, preamble),
    )
    catalogue = default_catalogue()
    return DiscoveredMeter(reply.meter_type, str(reply.address), catalogue.meter_class(reply.meter_type))


class Cjt188Driver:
    """One CJ/T 188 meter on a bus. See the module docstring for the behaviour."""

    __slots__ = (
        "_address",
        "_line",
        "_reply_timeout",
        "address",
        "bus",
        "catalogue",
        "clock",
        "di_order",
        "meter_id",
        "meter_type",
        "model",
        "preamble",
        "settlement_day",
        "tz",
    )

    def __init__(
        self,
        bus: Bus,
        meter_id: str,
        address: str,
        model: Cjt188Model,
        *,
        di_order: str | None = None,
        preamble: int | None = None,
        tz: datetime.tzinfo | None = None,
        clock: Callable[[], float] = time.time,
        catalogue: Catalogue | None = None,
    ) -> None:
        try:
            self._address = Address.parse(address)
            self.di_order: DiOrder = check_order(di_order or model.di_order)
        except ProtocolError as exc:
            raise ConfigurationError(f"meter {meter_id}: {exc}") from exc
        if self._address.is_wildcard:
            raise ConfigurationError(f"meter {meter_id}: {address} is a wildcard, not one meter's address")
        self.preamble = model.preamble if preamble is None else preamble
        if not 0 <= self.preamble <= 16:
            raise ConfigurationError(f"meter {meter_id}: preamble of {self.preamble} FE bytes (0..16)")
        self.bus = bus
        self.meter_id = meter_id
        self.address = str(self._address)
        self.model = model
        self.meter_type = model.meter_type
        self.tz = tz
        self.clock = clock
        self.catalogue = catalogue or default_catalogue()
        self._line = line_for(bus)
        self._line.know(self._address)
        self._reply_timeout = _reply_timeout(bus, model.turnaround, self.preamble)
        self.settlement_day: int | None = None  # the meter's 8103, as last read

    def __repr__(self) -> str:
        return f"<Cjt188Driver {self.meter_id} {self.meter_type:02X}/{self.address} on {self.bus.name}>"

    # -- transactions -----------------------------------------------------------------------------

    async def _exchange(
        self,
        request: m.ReadRequest | m.WriteRequest,
        decode: Callable[[m.Message], R],
        priority: int,
        *,
        attempts: int | None = None,
        force: bool = False,
    ) -> R:
        order = self.di_order
        try:
            raw = request.encode(order, self.preamble)
        except ProtocolError as exc:
            raise ConfigurationError(f"meter {self.meter_id}: {exc}") from exc
        exchange = Cjt188Exchange(self._line, Expect.of(request, order), decode, order)
        return await self.bus.exchange(
            raw,
            exchange,
            meter=self.meter_id,
            priority=priority,
            reply_timeout=self._reply_timeout,
            attempts=attempts,
            force=force,
        )

    async def read_di(self, di: int, *, priority: int = Priority.POLL, force: bool = False) -> list[DecodedValue]:
        """The decoded values of one DI (a reply that does not decode is read again)."""
        request = m.ReadRequest(self.meter_type, self._address, di, self._line.next_ser())

        def decode(message: m.Message) -> list[DecodedValue]:
            if not isinstance(message, m.ReadReply):
                raise RemoteProtocolError(f"expected ReadReply, got {type(message).__name__}")
            decoded = message.values(self.catalogue)
            bad = [v.quantity for v in decoded.values if v.value is None]
            if bad:  # a field that is not BCD: garbled on the line, ask again
                raise RemoteProtocolError(f"DI {di:04X}: {', '.join(str(q) for q in bad)} did not decode")
            # a unit code the catalogue does not know leaves the number unconverted: never
            # hand it on under the canonical unit
            unknown = [f"{v.quantity} ({v.fields['unit_code']})" for v in decoded.values if _unconverted(v)]
            if unknown:
                raise RemoteProtocolError(f"DI {di:04X}: unknown unit code for {', '.join(unknown)}")
            for warning in decoded.warnings:
                log.debug("event=meter_warning meter=%s warning=%s", logfmt_value(self.meter_id), logfmt_value(warning))
            return decoded.values

        return await self._exchange(request, decode, priority, force=force)

    # -- readings ---------------------------------------------------------------------------------

    async def read(
        self, quantities: Sequence[str], *, slot: float | None, now: float, priority: int = Priority.POLL
    ) -> list[Reading]:
        """One Reading per quantity, in the order asked (each DI read once).

        Raises ConfigurationError for a quantity the model lacks and LinkDown at once. A DI lost
        otherwise (NoAnswer, BadReply, MeterRefused) loses only its quantities: PartialRead
        carries what the other DIs got. Nothing read at all raises the first loss; so do two
        losses before anything was read (a dead meter must not hold the bus for every DI).
        """
        wanted = tuple(dict.fromkeys(quantities))
        by_di: dict[int, list[str]] = {}
        for quantity in wanted:
            by_di.setdefault(self.model.point(quantity).di, []).append(quantity)
        values: dict[str, DecodedValue] = {}
        lost: list[str] = []
        cause: NoAnswer | BadReply | MeterRefused | None = None
        for di, covers in by_di.items():
            try:
                decoded = await self.read_di(di, priority=priority)
            except (NoAnswer, BadReply, MeterRefused) as exc:
                cause = cause or exc
                lost.extend(covers)
                if not values and len(lost) > len(covers):
                    raise cause from None
                continue
            for value in decoded:
                name = "status.word" if value.quantity == "status" else value.quantity
                if name is not None and name in covers:
                    values[name] = value
        missing = [q for q in wanted if q not in values and q not in lost]
        if missing:
            cause = cause or BadReply(f"meter {self.meter_id}: reply lacks {', '.join(missing)}")
        if cause is not None:
            readings = [self._reading(q, values[q], now=now, slot=slot) for q in wanted if q in values]
            if not readings:
                raise cause
            raise PartialRead(readings, tuple(q for q in wanted if q not in values), cause)
        return [self._reading(q, values[q], now=now, slot=slot) for q in wanted]

    def _reading(
        self, quantity: str, decoded: DecodedValue, *, now: float, slot: float | None, meter_time: float | None = None
    ) -> Reading:
        units, bounds = quantity_info(quantity)
        value: Any = decoded.value
        quality = Quality.GOOD
        if quantity == "valve.state":
            return Reading(self.meter_id, quantity, str(value), "", now, meter_time, slot, quality)
        if isinstance(value, bool):
            value = int(value)
        unit = decoded.unit or units[0]
        if unit not in units:
            raise BadReply(f"meter {self.meter_id}: {quantity} came in {unit}, expected {' or '.join(units)}")
        if not isinstance(value, int | float) or not plausible(value, bounds):
            quality |= Quality.OUT_OF_RANGE
        return Reading(self.meter_id, quantity, value, unit, now, meter_time, slot, quality)

    async def read_history(self, nth: int, *, priority: int = Priority.POLL) -> DecodedValue:
        """The register at the ``nth`` last settlement day (D120 + nth - 1, 1..12; clause 7 Table 5
        history data). The reply carries no date: the settlement day is the meter's (8103)."""
        if not 1 <= nth <= SETTLEMENTS_KEPT:
            raise ValueError(f"settlement history is 1..{SETTLEMENTS_KEPT} months back, got {nth}")
        values = await self.read_di(DI_HISTORY + nth - 1, priority=priority)
        if not values:
            raise BadReply(f"meter {self.meter_id}: history {nth} has no value")
        return values[0]

    async def read_settlement_day(self, *, priority: int = Priority.POLL) -> int:
        """The meter's settlement day of the month (8103), kept in :attr:`settlement_day`."""
        for value in await self.read_di(DI_SETTLEMENT_DAY, priority=priority):
            number = value.value
            if value.quantity == "settlement.day" and isinstance(number, int) and not isinstance(number, bool):
                if not 1 <= number <= 31:
                    raise BadReply(f"meter {self.meter_id}: settlement day {number} (8103) is no day of a month")
                self.settlement_day = number
                return number
        raise BadReply(f"meter {self.meter_id}: 8103 carried no settlement day")

    # -- settlement-day records (the frozen job) --------------------------------------------------

    settlements_kept: Final = SETTLEMENTS_KEPT

    def settlement_dates(self, first: datetime.date, last: datetime.date) -> list[datetime.date] | None:
        """The meter's settlement dates from ``first`` to ``last``, oldest first; None before its
        settlement day has been read (:meth:`read_settlement_day`)."""
        if self.settlement_day is None:
            return None
        return settlement_dates(first, last, self.settlement_day)

    def frozen_quantities(self) -> tuple[str, ...]:
        """The quantity the meter keeps at each settlement day: its billing register (volume for
        water and gas meters, heat for heat meters...), when the model reads that register."""
        register = _SETTLED.get(self.model.meter_class)
        name = f"{register}.total"
        return (name,) if register is not None and name in self.model.quantities else ()

    async def read_frozen_day(
        self, day: datetime.date, quantities: Sequence[str], *, priority: int = Priority.POLL
    ) -> list[Reading]:
        """The register at the settlement taken at the meter's midnight starting ``day`` (the
        frozen job's protocol-neutral call); [] when the meter has no such record: ``day`` is not
        its settlement date (8103, read each time), that settlement is still to come by its clock,
        or older than the 12 it keeps (or it refuses the history DI).

        Which D12x holds ``day`` is counted from the meter's clock: its newest settlement is
        D120. A read that straddles a settlement midnight (the clock read after the history read
        shows a newer settlement) is done again once.
        """
        wanted = [q for q in self.frozen_quantities() if q in quantities]
        if not wanted:
            return []
        settlement_day = await self.read_settlement_day(priority=priority)
        if day != settlement_date(day.year, day.month, settlement_day):
            return []
        newest = await self._newest_settlement(settlement_day, priority)
        for _ in range(2):
            if day > newest:
                return []  # not settled yet by the meter's clock
            nth = _months(day, newest) + 1
            if nth > SETTLEMENTS_KEPT:
                return []
            try:
                value = await self.read_history(nth, priority=priority)
            except MeterRefused:
                return []  # the meter keeps no such record (abnormal reply to D12x)
            after = await self._newest_settlement(settlement_day, priority)
            if after == newest:
                break
            newest = after  # a settlement happened meanwhile: D12x moved by one
        else:
            raise BadReply(f"meter {self.meter_id}: its settlements kept moving while read")
        stamp = from_meter_time(datetime.datetime.combine(day, datetime.time()), self.tz)
        return [self._reading(wanted[0], value, now=self.clock(), slot=None, meter_time=stamp)]

    async def _newest_settlement(self, settlement_day: int, priority: int) -> datetime.date:
        meter_now = await self.read_clock(priority=priority)
        return latest_settlement(to_meter_time(meter_now, self.tz).date(), settlement_day)

    # -- clock ------------------------------------------------------------------------------------

    async def read_clock(self, *, priority: int = Priority.POLL) -> float:
        """The meter's clock (901F's real time) as unix time, read in ``tz``."""
        for value in await self.read_di(m.DI_CURRENT_DATA, priority=priority):
            if value.quantity == "meter.time" and isinstance(value.timestamp, datetime.datetime):
                return from_meter_time(value.timestamp, self.tz)
        raise BadReply(f"meter {self.meter_id}: 901F carried no meter time")

    async def sync_time(self, when: float, *, priority: int = Priority.COMMAND) -> None:
        """Set the meter's clock to ``when``: A015 write standard time, acknowledged (84H)."""
        request = m.WriteRequest.standard_time(
            self.meter_type, self._address, to_meter_time(when, self.tz), self._line.next_ser()
        )
        await self._exchange(request, _expecting(m.WriteReply), priority, force=True)

    # -- valve ------------------------------------------------------------------------------------

    def _need_valve(self) -> None:
        if not self.model.valve:
            raise ConfigurationError(f"meter {self.meter_id}: model {self.model.name} has no valve")

    async def set_valve(
        self, open_valve: bool, *, priority: int = Priority.COMMAND, attempts: int | None = None
    ) -> Status | None:
        """A017 write valve control (55H open, 99H close); returns the ST of the acknowledgement
        (None if the meter sent none). Sent even to a meter the health book holds offline."""
        self._need_valve()
        request = m.WriteRequest.valve(self.meter_type, self._address, open_valve, self._line.next_ser())
        reply = await self._exchange(request, _expecting(m.WriteReply), priority, attempts=attempts, force=True)
        return reply.status

    async def read_valve(self, *, priority: int = Priority.COMMAND, force: bool = False) -> ValveStatus:
        """The valve and battery as ST of 901F reports them."""
        self._need_valve()
        for value in await self.read_di(m.DI_CURRENT_DATA, priority=priority, force=force):
            if value.quantity == "status" and isinstance(value.value, int):
                st = Status(value.value)
                return ValveStatus(st.valve, st.battery_low, st.word, self.clock())
        raise BadReply(f"meter {self.meter_id}: 901F carried no status word")


def _options(ctx: DriverContext) -> tuple[str | None, int | None]:
    options = ctx.options
    order = options.get("di_order")
    preamble = options.get("preamble")
    if order is not None and order not in DI_ORDERS:
        raise ConfigurationError(f"meter {ctx.meter_id}: di_order must be one of {', '.join(DI_ORDERS)}")
    if preamble is not None and (isinstance(preamble, bool) or not isinstance(preamble, int)):
        raise ConfigurationError(f"meter {ctx.meter_id}: preamble must be a number of FE bytes")
    return order, preamble


def from_config(ctx: DriverContext) -> Cjt188Driver:
    """The registry's builder for CJ/T 188 meters (options: ``di_order``, ``preamble``)."""
    if not isinstance(ctx.model, Cjt188Model) or not isinstance(ctx.address, str):
        raise ConfigurationError(f"meter {ctx.meter_id}: needs a CJ/T 188 model and a 14-digit address")
    order, preamble = _options(ctx)
    return Cjt188Driver(ctx.bus, ctx.meter_id, ctx.address, ctx.model, di_order=order, preamble=preamble, tz=ctx.tz)

"""The DL/T 645 meter driver: readings, clock, time sync, remote control, relay state, daily freezes.

One :class:`Dlt645Driver` per meter; many share one :class:`~drivers.bus.Bus` (an RS-485 segment
or a TCP link to a serial server). Every request is one ``bus.exchange`` with a
:class:`~protocols.dlt645.exchange.Dlt645Exchange` that accepts only this request's reply and
decodes it; frames and messages come from the sans-I/O core (:mod:`protocols.dlt645`), values
from the catalogue.

Decisions worth knowing:

* **Coalescing.** When the model ``supports_block_reads``, a block DI (``0001FF00``, ``901F``...)
  is read when it covers two or more of the wanted quantities; everything else is read one DI per
  exchange, all within the one ``read`` call. A block the meter refuses with "no requested data"
  is remembered and its quantities are read one by one from then on.
* **Follow-up frames.** A reply with the follow-up flag is continued with 0x12 + SEQ 1, 2, ...
  (2007, clause 6.3; retries resend the same SEQ, which is idempotent) or 0x02 (1997, clause
  5.2). A 1997 follow-up has no sequence number, so a lost one cannot be retried safely (the
  meter has moved on to the next part): the whole read restarts from 0x01 instead.
* **Missing data.** A DI the meter answers with "no requested data" (2007 ERR bit1) or "bad
  data identifier" (1997 D1) yields no reading for its quantities, logged once per DI; the other
  quantities are still read. Any other refusal raises :class:`~drivers.errors.MeterRefused`.
* **Time.** Meters keep naive local wall time; ``tz`` (default: the host's zone) converts both
  ways. Timestamps go out rounded to the second.
* **Readings.** Canonical unit from :func:`drivers.meter_models.canonical_unit` (the catalogue's
  unit for the DL/T 645 extras such as ``status.word3``); ``OUT_OF_RANGE`` outside
  :func:`~drivers.meter_models.plausible_range`, as the Modbus driver does.
* **Wake-up.** ``preamble`` FE bytes go in front of every request to the meter (the config's
  ``buses[].preamble``, 4 on serial lines, overridable per meter as ``meters[].dlt645.preamble``):
  some meters' receivers need them to wake, as both common DL/T 645 libraries send by default.
  Like CJ/T 188's, the preamble is part of the request bytes, so its wire time is counted.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final, TypeVar

from meter_gateway.drivers.bus import Bus, Priority
from meter_gateway.drivers.context import DriverContext
from meter_gateway.drivers.errors import BadReply, ConfigurationError, DriverError, MeterRefused, NoAnswer, PartialRead
from meter_gateway.drivers.log_limit import logfmt_value
from meter_gateway.drivers.meter_models import Dlt645Block, Dlt645Model, canonical_unit, plausible_range
from meter_gateway.drivers.reading import Quality, Reading
from meter_gateway.drivers.readings import from_meter_time, plausible, to_meter_time
from meter_gateway.protocols.dlt645 import messages as m
from meter_gateway.protocols.dlt645.catalogue import Catalogue, DecodedValue, default_catalogue
from meter_gateway.protocols.dlt645.edition import Edition
from meter_gateway.protocols.dlt645.errors import ProtocolError, RemoteProtocolError
from meter_gateway.protocols.dlt645.exchange import Dlt645Exchange, Dlt645Line, Expect, as_message
from meter_gateway.protocols.dlt645.formats import is_signed
from meter_gateway.protocols.dlt645.frame import BROADCAST, WILDCARD, Address
from meter_gateway.protocols.dlt645.remote_control import RemoteCommand

__all__ = [
    "Dlt645Driver",
    "RelayStatus",
    "broadcast_time",
    "broadcast_time_1997",
    "broadcast_time_2007",
    "daily_frozen_quantities",
    "discover_address",
    "from_config",
]

log = logging.getLogger(__name__)

E7 = Edition.DLT645_2007
E97 = Edition.DLT645_1997

# Refusal flags that mean "this meter has no such data" rather than "you may not" (error_words.toml).
NO_DATA_FLAGS: Final = frozenset({"no_requested_data", "bad_data_identifier"})
FROZEN_PREFIX: Final = "frozen.daily."
MAX_FOLLOW_UPS: Final = 64  # a block of 63 tariffs needs 2; more means a meter that never stops
MAX_PREAMBLE: Final = 16  # FE wake-up bytes; the config's bound, as CJ/T 188's
# "not worked out yet" in a meter model's unit table (None there means "the catalogue's unit")
_UNKNOWN_UNIT: Final[tuple[str, tuple[float, float]]] = ("", (0.0, 0.0))
DAILY_FREEZES: Final = range(1, 63)  # DL/T 645-2007 App. A Table A.6: 0506xx01..3E
FROZEN_PROBES: Final = 3  # reads to find one day's freeze when the meter numbers its records differently

T = TypeVar("T", bound=m.Message)
R = TypeVar("R")
ReadFrame = tuple[m.ReadReply, list[DecodedValue] | None]  # a read reply, its values if it is the only frame

_lines: weakref.WeakKeyDictionary[Bus, Dlt645Line] = weakref.WeakKeyDictionary()


def line_for(bus: Bus) -> Dlt645Line:
    """What the DL/T 645 exchanges on ``bus`` share (made on first use, dropped with the bus)."""
    line = _lines.get(bus)
    if line is None:
        line = _lines[bus] = Dlt645Line()
    return line


@dataclass(frozen=True, slots=True)
class RelayStatus:
    closed: bool  # supply connected (relay closed)
    armed: bool  # a close-permit (1B) is pending a local button press (False if the meter cannot say)
    trip_pending: bool  # commanded open while still closed, e.g. a delayed trip (False if it cannot say)
    keep_power: bool  # keep-power (3A) is in force (False if the meter cannot say)
    raw: int  # the raw status word (status word 3 for 2007)
    read_at: float  # gateway unix time of the read


async def broadcast_time(
    bus: Bus,
    when: float,
    edition: Edition,
    tz: datetime.tzinfo | None = None,
    *,
    priority: int = Priority.COMMAND,
) -> None:
    """Set every meter's clock on ``bus``: 0x08 to 999999999999, no reply (2007 6.1, 1997 5.5),
    with the largest FE wake-up preamble its meters are configured with.

    Real meters accept a broadcast correction only within limits (typically ±5 min, once a day);
    bigger steps need a password write. Nothing comes back to say whether a meter took it.
    """
    frame = m.BroadcastTime(BROADCAST, to_meter_time(when, tz)).encode(edition, line_for(bus).wake)
    await bus.send(frame, priority=priority)


async def broadcast_time_2007(bus: Bus, when: float, tz: datetime.tzinfo | None = None) -> None:
    """:func:`broadcast_time` for DL/T 645-2007 meters: the registry's protocol-neutral
    broadcast signature (``drivers/registry.py``, ``MeterProtocol.broadcast_time``)."""
    await broadcast_time(bus, when, E7, tz)


async def broadcast_time_1997(bus: Bus, when: float, tz: datetime.tzinfo | None = None) -> None:
    """:func:`broadcast_time` for DL/T 645-1997 meters (see :func:`broadcast_time_2007`)."""
    await broadcast_time(bus, when, E97, tz)


def daily_frozen_quantities(model: Dlt645Model, catalogue: Catalogue | None = None) -> tuple[str, ...]:
    """The quantities of ``model`` a DL/T 645-2007 meter keeps in its daily freezes (its
    energies; Table A.6 has no instantaneous values); () for 1997, which keeps none."""
    if model.edition is not E7:
        return ()
    cat = catalogue or default_catalogue()
    return tuple(q for q in model.quantities if cat.by_quantity(E7, FROZEN_PREFIX + q) is not None)


async def discover_address(
    bus: Bus, edition: Edition, *, priority: int = Priority.COMMAND, preamble: int | None = None
) -> str:
    """The address of the one meter on a single-meter link (printed, 12 digits).

    2007: 0x13 to AAAAAAAAAAAA (clause 6.4). 1997 has no read-address function: a read of the
    total forward active energy to the wildcard address is answered from the meter's real
    address. With several meters on the link nobody (or everybody at once) answers: NoAnswer or
    BadReply. ``preamble``: FE wake-up bytes (the bus's setting); None: what the line's meters use.
    """
    line = line_for(bus)
    wake = line.wake if preamble is None else preamble
    if edition is E7:
        request = m.ReadAddressRequest()
        exchange = Dlt645Exchange(line, edition, Expect(WILDCARD, 0x13), as_message)
        reply = await bus.exchange(request.encode(edition, wake), exchange, priority=priority)
        if not isinstance(reply, m.ReadAddressReply):
            raise BadReply(f"bus {bus.name}: unexpected reply {type(reply).__name__} to read address")
        return str(reply.meter_address)
    di = _catalogue_di(default_catalogue(), edition, "energy.active.import.total")
    read = m.ReadRequest(WILDCARD, di)
    exchange = Dlt645Exchange(line, edition, Expect(WILDCARD, read.function(edition), di), as_message)
    reply = await bus.exchange(read.encode(edition, wake), exchange, priority=priority)
    return str(reply.address)


def _catalogue_di(catalogue: Catalogue, edition: Edition, quantity: str) -> int:
    item = catalogue.by_quantity(edition, quantity)
    if item is None:
        raise ConfigurationError(f"the DL/T 645-{edition.value} catalogue has no data identifier for {quantity!r}")
    return item.di


def _expecting(kind: type[T]) -> Callable[[m.Message], T]:
    """The ``decode`` of an exchange whose reply must be a ``kind``."""

    def decode(message: m.Message) -> T:
        if not isinstance(message, kind):
            raise RemoteProtocolError(f"expected {kind.__name__}, got {type(message).__name__}")
        return message

    return decode


class _BrokenChain(Exception):
    """A follow-up frame of a read that cannot be retried on its own was lost."""

    def __init__(self, cause: NoAnswer | BadReply) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _bounds(quantity: str, decoded: DecodedValue) -> tuple[float, float]:
    """The plausible range of ``quantity`` as this meter's DI carries it. DL/T 645 sends the
    direction of current and power in the top bit (App. A Table A.3 notes; the catalogue writes
    such formats with a leading ``±``): -1.5 A is a current flowing the other way, not garbage,
    so a magnitude range reaches as far below zero as above."""
    low, high = plausible_range(quantity)
    item = decoded.item
    if item is not None and item.format is not None and low >= 0 and is_signed(item.format):
        return -high, high
    return low, high


def _is_no_data(refusal: MeterRefused) -> bool:
    return bool(NO_DATA_FLAGS.intersection(refusal.reasons))


Plan = tuple[tuple[int, tuple[str, ...]], ...]  # (DI, the quantities its reply answers) per read
PLAN_CACHE_SIZE: Final = 64  # distinct quantity lists per model; the configuration has a handful


class _ModelInfo:
    """What every driver of one model (with one catalogue) shares, built and checked once.

    Thousands of meters of a model cost one of these, not one DI map and plan cache each.
    """

    __slots__ = ("block_dis", "blocks", "plans", "quantity_of", "units")

    def __init__(self, model: Dlt645Model, catalogue: Catalogue, meter_id: str) -> None:
        edition = model.edition
        for p in model.points:
            if catalogue.get(edition, p.di) is None:
                raise ConfigurationError(
                    f"meter {meter_id}: model {model.name} reads {p.quantity} from DI {edition.format_di(p.di)}, "
                    f"which the DL/T 645-{edition.value} catalogue cannot decode"
                )
        self.blocks = model.blocks if model.supports_block_reads else ()
        for block in self.blocks:
            item = catalogue.get(edition, block.di)
            covered = {model.di_for(q) for q in block.covers}
            if item is None or item.kind != "block" or not covered <= set(item.members):
                raise ConfigurationError(
                    f"meter {meter_id}: model {model.name} block {edition.format_di(block.di)} is not a catalogue"
                    " block of the data identifiers it claims to cover"
                )
        self.quantity_of = {p.di: p.quantity for p in model.points}
        self.block_dis = frozenset(b.di for b in self.blocks)
        self.plans: dict[tuple[str, ...], tuple[tuple[str, ...], Plan]] = {}  # drivers with no refused block
        # quantity -> (canonical unit, plausible range), None for DL/T 645 extras (catalogue unit)
        self.units: dict[str, tuple[str, tuple[float, float]] | None] = {}


_model_infos: dict[tuple[Dlt645Model, int], tuple[Catalogue, _ModelInfo]] = {}

# Shared by every driver that has not been refused a block: since 3.10 each frozenset() is a
# new object, and a gateway has thousands of drivers.
_NO_BLOCKS: frozenset[int] = frozenset()


def _model_info(model: Dlt645Model, catalogue: Catalogue, meter_id: str) -> _ModelInfo:
    key = (model, id(catalogue))
    found = _model_infos.get(key)
    if found is not None and found[0] is catalogue:
        return found[1]
    info = _ModelInfo(model, catalogue, meter_id)
    _model_infos[key] = (catalogue, info)  # the catalogue is kept alive, so its id is not reused
    return info


class Dlt645Driver:
    """One DL/T 645 meter on a bus. See the module docstring for the behaviour."""

    # 10,000 meters on one gateway: no per-instance __dict__, and the sets, plan cache and chain
    # waiters below exist only for the meters that need them
    __slots__ = (
        "_address",
        "_chain_busy",
        "_chain_waiters",
        "_info",
        "_line",
        "_missing",
        "_password",
        "_plans",
        "_refused_blocks",
        "address",
        "bus",
        "catalogue",
        "clock",
        "edition",
        "meter_id",
        "model",
        "operator",
        "preamble",
        "tz",
    )

    def __init__(
        self,
        bus: Bus,
        meter_id: str,
        address: str,
        edition: Edition,
        model: Dlt645Model,
        *,
        password: str | None = None,
        password_level: int = 2,
        operator: str = "00000000",
        tz: datetime.tzinfo | None = None,
        clock: Callable[[], float] = time.time,
        catalogue: Catalogue | None = None,
        preamble: int = 0,
    ) -> None:
        if not 0 <= preamble <= MAX_PREAMBLE:
            raise ConfigurationError(f"meter {meter_id}: preamble of {preamble} FE bytes (0..{MAX_PREAMBLE})")
        try:
            self._address = Address.parse(address)
        except ProtocolError as exc:
            raise ConfigurationError(f"meter {meter_id}: {exc}") from exc
        if self._address.is_broadcast or self._address.is_wildcard:
            raise ConfigurationError(f"meter {meter_id}: {address} is not one meter's address")
        if model.edition is not edition:
            raise ConfigurationError(
                f"meter {meter_id}: model {model.name} is DL/T 645-{model.edition.value}, "
                f"the meter is configured as {edition.value}"
            )
        self._password: m.Password | None = None
        try:
            if password is not None:
                self._password = m.Password(password_level, password)
            m.RemoteControlRequest(self._address, operator=operator).payload(E7)  # validates the code
        except ProtocolError as exc:
            raise ConfigurationError(f"meter {meter_id}: {exc}") from exc
        self.bus = bus
        self.meter_id = meter_id
        self.address = str(self._address)
        self.edition = edition
        self.model = model
        self.operator = operator
        self.tz = tz
        self.clock = clock
        self.catalogue = catalogue or default_catalogue()
        self.preamble = preamble
        self._line = line_for(bus)
        self._line.know(self._address)
        self._line.wake = max(self._line.wake, preamble)
        self._info = _model_info(model, self.catalogue, meter_id)
        self._refused_blocks = _NO_BLOCKS  # blocks this meter said it lacks (|= makes a new set)
        self._plans: dict[tuple[str, ...], tuple[tuple[str, ...], Plan]] | None = None  # once a block is refused
        self._missing: set[int] | None = None  # DIs the meter said it has no data for (logged once)
        # one multi-frame read at a time (follow-ups are per-DI state in the meter): a flag, and a
        # queue of waiters created only if two reads of one meter ever overlap
        self._chain_busy: bool = False
        self._chain_waiters: collections.deque[asyncio.Future[None]] | None = None

    def __repr__(self) -> str:
        return f"<Dlt645Driver {self.meter_id} {self.address} DL/T 645-{self.edition.value} on {self.bus.name}>"

    # -- readings -----------------------------------------------------------------------------

    async def read(
        self, quantities: Sequence[str], *, slot: float | None, now: float, priority: int = Priority.POLL
    ) -> list[Reading]:
        """One Reading per quantity that decoded, in the order asked.

        Raises ConfigurationError for a quantity the model lacks and LinkDown at once. A
        transaction that fails otherwise (NoAnswer, BadReply, MeterRefused other than "no data")
        loses only the quantities it covers: the others are still read, and PartialRead carries
        them with the lost ones. Nothing read at all raises the first failure; so do two
        failures before anything was read (a dead meter must not hold the bus for every DI).
        """
        wanted, plan = self._plan_for(quantities)
        values: dict[str, DecodedValue] = {}
        failed: list[str] = []
        first: DriverError | None = None
        for di, covers in plan:
            try:
                await self._read_di(di, covers, values, priority)
            except (NoAnswer, BadReply, MeterRefused) as exc:
                first = first or exc
                failed.extend(q for q in covers if q not in values)
                if not values and len(failed) > len(covers):
                    raise first from None
        readings = self._readings(wanted, values, now=now, slot=slot)
        if first is not None:
            if not readings:
                raise first
            raise PartialRead(readings, tuple(q for q in wanted if q in failed), first)
        return readings

    async def _read_di(self, di: int, covers: tuple[str, ...], values: dict[str, DecodedValue], priority: int) -> None:
        decoded = await self._read_values(di, priority)
        if decoded is None and di in self._info.block_dis:
            self._refuse_block(di)
            for quantity in covers:
                single = await self._read_values(self.model.di_for(quantity), priority)
                self._collect(single or [], (quantity,), values)
            return
        self._collect(decoded or [], covers, values)

    def _readings(
        self, wanted: tuple[str, ...], values: dict[str, DecodedValue], *, now: float, slot: float | None
    ) -> list[Reading]:
        """The live readings of ``wanted`` that have a value, in that order."""
        return [
            self._reading(q, values[q], gateway_time=now, slot=slot, meter_time=None, quality=Quality.GOOD)
            for q in wanted
            if q in values
        ]

    def _plan_for(self, quantities: Sequence[str]) -> tuple[tuple[str, ...], Plan]:
        """The de-duplicated quantities and their plan, cached (per model while no block is refused)."""
        key = quantities if isinstance(quantities, tuple) else tuple(quantities)
        cache = self._info.plans if self._plans is None else self._plans
        hit = cache.get(key)
        if hit is None:
            wanted = tuple(dict.fromkeys(key))
            for quantity in wanted:
                self.model.di_for(quantity)  # a clear error before any traffic
            hit = (wanted, tuple(self.plan(wanted)))
            if len(cache) >= PLAN_CACHE_SIZE:
                cache.clear()
            cache[key] = hit
        return hit

    def _refuse_block(self, di: int) -> None:
        self._refused_blocks |= {di}
        self._plans = {}  # this meter's plans differ from its model's from now on
        log.info("event=block_refused meter=%s di=%s fallback=members", logfmt_value(self.meter_id), self._di(di))

    def plan(self, quantities: Sequence[str]) -> list[tuple[int, tuple[str, ...]]]:
        """The (DI, quantities it answers) reads :meth:`read` makes for ``quantities``."""
        left = list(dict.fromkeys(quantities))
        plan: list[tuple[int, tuple[str, ...]]] = []
        for block in self._usable_blocks():
            covered = tuple(q for q in left if q in block.covers)
            if len(covered) >= 2:
                plan.append((block.di, covered))
                left = [q for q in left if q not in covered]
        plan.extend((self.model.di_for(q), (q,)) for q in left)
        return plan

    def _usable_blocks(self) -> list[Dlt645Block]:
        return [b for b in self._info.blocks if b.di not in self._refused_blocks]

    def _collect(self, decoded: list[DecodedValue], wanted: tuple[str, ...], into: dict[str, DecodedValue]) -> None:
        quantity_of = self._info.quantity_of
        for value in decoded:
            quantity = quantity_of.get(value.di)
            if quantity in wanted and value.value is not None:  # None: "never happened" timestamps
                into[quantity] = value

    def _reading(
        self,
        quantity: str,
        decoded: DecodedValue,
        *,
        gateway_time: float,
        slot: float | None,
        meter_time: float | None,
        quality: Quality,
    ) -> Reading:
        value = decoded.value
        # tuples, not ``int | float``: isinstance checks a tuple without building a union's args
        if isinstance(value, bool):
            value = int(value)
        elif not isinstance(value, (int, float, str)):
            value = str(value)
        units = self._info.units
        info = units.get(quantity, _UNKNOWN_UNIT)
        if info is _UNKNOWN_UNIT:
            try:
                info = units[quantity] = (canonical_unit(quantity), _bounds(quantity, decoded))
            except KeyError:  # a DL/T 645 extra (clock, status word, address): the catalogue's unit
                info = units[quantity] = None
        bounds: tuple[float, float] | None
        if info is None:
            unit, bounds = decoded.unit or "", None
        else:
            unit, bounds = info
        if bounds is not None and isinstance(value, (int, float)) and not plausible(float(value), bounds):
            quality |= Quality.OUT_OF_RANGE
        return Reading(self.meter_id, quantity, value, unit, gateway_time, meter_time, slot, quality)

    def _read_decoder(self, di: int) -> Callable[[m.Message], ReadFrame]:
        """The ``decode`` of a read of ``di``: a reply that is the only frame is decoded with the
        catalogue at once, so data that does not decode makes the bus read again."""

        def decode(message: m.Message) -> ReadFrame:
            if not isinstance(message, m.ReadReply):
                raise RemoteProtocolError(f"expected ReadReply, got {type(message).__name__}")
            if message.more:
                return message, None
            return message, self.catalogue.decode(self.edition, di, message.value)  # errors name the DI

        return decode

    async def _read_values(self, di: int, priority: int, *, force: bool = False) -> list[DecodedValue] | None:
        """The decoded values of ``di`` (follow-up frames joined), or None when the meter has no
        such data. ``force`` reads even a meter the health book holds offline (a command's
        read-back must not wait for the next probe)."""
        if self._chain_busy:
            await self._chain_wait()
        else:
            self._chain_busy = True
        try:
            if self.edition is E7:
                first, values = await self._exchange(
                    m.ReadRequest(self._address, di), self._read_decoder(di), priority, di=di, force=force
                )
                if values is not None:
                    return values
                raw = await self._follow_ups(di, first, priority, force=force)
            else:
                raw, values = await self._read_1997(di, priority, force=force)
                if values is not None:
                    return values
        except MeterRefused as exc:
            if not _is_no_data(exc):
                raise
            if self._missing is None:
                self._missing = set()
            if di not in self._missing:
                self._missing.add(di)
                log.warning(
                    "event=no_data meter=%s di=%s error=%s",
                    logfmt_value(self.meter_id),
                    self._di(di),
                    logfmt_value(exc),
                )
            return None
        finally:
            self._chain_release()
        try:
            return self.catalogue.decode(self.edition, di, raw)
        except ProtocolError as exc:
            raise BadReply(f"meter {self.meter_id}: DI {self._di(di)}: {exc}") from exc

    async def _read_1997(
        self, di: int, priority: int, *, force: bool = False
    ) -> tuple[bytes, list[DecodedValue] | None]:
        """The whole data of ``di`` from a 1997 meter (follow-up frames joined, DI bytes stripped),
        and its decoded values if it came in one frame.

        1997 follow-ups cannot be retried (no SEQ): a broken chain starts again from 0x01.
        """
        attempts = self.bus.settings.attempts
        for attempt in range(1, attempts + 1):
            first, values = await self._exchange(
                m.ReadRequest(self._address, di), self._read_decoder(di), priority, di=di, force=force
            )
            if not first.more:
                return first.value, values
            try:
                return await self._follow_ups(di, first, priority, follow_up_attempts=1, force=force), None
            except _BrokenChain as broken:
                if attempt == attempts:
                    raise broken.cause from None
                log.debug(
                    "event=follow_up_lost meter=%s di=%s error=%s retry=true",
                    logfmt_value(self.meter_id),
                    self._di(di),
                    logfmt_value(broken),
                )
        raise AssertionError("unreachable")  # pragma: no cover

    async def _chain_wait(self) -> None:
        """Queue for the chain held by another read of this meter; FIFO, ownership handed over."""
        waiters = self._chain_waiters
        if waiters is None:
            waiters = self._chain_waiters = collections.deque()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._chain_release()  # handed to us as we were cancelled: pass it on
            raise

    def _chain_release(self) -> None:
        waiters = self._chain_waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # ownership moves; _chain_busy stays True
                return
        self._chain_busy = False
        self._chain_waiters = None

    async def _follow_ups(
        self, di: int, first: m.ReadReply, priority: int, *, follow_up_attempts: int | None = None, force: bool = False
    ) -> bytes:
        """The data of ``first`` joined with its follow-up frames' (2007 0x12 + SEQ, 1997 0x02)."""
        edition = self.edition
        parts = [first.value]
        more: bool = first.more
        seq = 0
        while more:
            seq += 1
            if seq > MAX_FOLLOW_UPS:
                raise BadReply(f"meter {self.meter_id}: DI {self._di(di)} still has follow-ups after {MAX_FOLLOW_UPS}")
            request = m.ReadFollowUpRequest(self._address, di, seq if edition is E7 else 0)
            try:
                reply = await self._exchange(
                    request,
                    _expecting(m.ReadReply),
                    priority,
                    di=di,
                    seq=seq if edition is E7 else None,
                    attempts=follow_up_attempts,
                    force=force,
                )
            except (NoAnswer, BadReply) as exc:
                if follow_up_attempts is None:
                    raise
                raise _BrokenChain(exc) from exc
            parts.append(reply.value)
            more = reply.more
        return b"".join(parts)

    def _exchange(
        self,
        request: m.Message,
        decode: Callable[[m.Message], R],
        priority: int,
        *,
        di: int | None = None,
        seq: int | None = None,
        attempts: int | None = None,
        force: bool = False,
    ) -> Awaitable[R]:
        """One request to this meter; the reply as ``decode`` gives it. A plain function handing
        back the bus's coroutine: a read then runs one coroutine level fewer."""
        expect = Expect(self._address, request.function(self.edition), di, seq)
        exchange = Dlt645Exchange(self._line, self.edition, expect, decode)
        return self.bus.exchange(
            request.encode(self.edition, self.preamble),
            exchange,
            meter=self.meter_id,
            priority=priority,
            attempts=attempts,
            force=force,
        )

    def _di(self, di: int) -> str:
        return self.edition.format_di(di)

    # -- clock --------------------------------------------------------------------------------

    async def read_clock(self, *, priority: int = Priority.POLL) -> float:
        """The meter's clock as unix time (its local wall time read in ``tz``).

        Date and time are separate DIs (2007 04000101/04000102, 1997 C010/C011): the date is read
        first and read again when the time shows midnight has just passed, so a read straddling
        midnight cannot pair yesterday's date with today's time.
        """
        date_di = _catalogue_di(self.catalogue, self.edition, "clock.date")
        time_di = _catalogue_di(self.catalogue, self.edition, "clock.time")
        day = await self._clock_field(date_di, priority)
        clock = await self._clock_field(time_di, priority)
        t = datetime.time.fromisoformat(str(clock))
        if t.hour == 0 and t.minute == 0:
            day = await self._clock_field(date_di, priority)
        local = datetime.datetime.combine(datetime.date.fromisoformat(str(day)), t)
        return from_meter_time(local, self.tz)

    async def _clock_field(self, di: int, priority: int) -> object:
        decoded = await self._read_values(di, priority)
        if not decoded or not isinstance(decoded[0].value, str):
            raise BadReply(f"meter {self.meter_id}: clock DI {self._di(di)} gave no value")
        return decoded[0].value

    async def sync_time(self, when: float, *, priority: int = Priority.COMMAND) -> None:
        """Set this meter's clock to ``when``: 0x08 addressed to the meter, no reply expected.

        Meters that honour 0x08 only as a broadcast ignore it silently: check with read_clock.
        """
        frame = m.BroadcastTime(self._address, to_meter_time(when, self.tz)).encode(self.edition, self.preamble)
        await self.bus.send(frame, priority=priority)

    # -- remote control and relay --------------------------------------------------------------

    async def remote_control(
        self,
        command: RemoteCommand,
        valid_until: float,
        *,
        priority: int = Priority.COMMAND,
        attempts: int | None = None,
        delay_minutes: int = 0,
    ) -> None:
        """0x1C (2007 clause 6.13): returns when the meter acknowledges (0x9C).

        ``valid_until`` (unix time) goes out as the command's validity time in the meter's
        ``tz``; ``delay_minutes`` is N2 for delayed trips. Raises MeterRefused (code = the error
        word, reasons such as ``authentication_failed``, ``validity_expired``, ``keep_power``),
        NoAnswer/LinkDown/BadReply, ConfigurationError for a 1997 meter or without a password.
        The command is sent even to a meter the health book has marked offline.
        """
        if self.edition is not E7:
            raise ConfigurationError(f"meter {self.meter_id}: DL/T 645-1997 has no remote control (0x1C)")
        if self._password is None:
            raise ConfigurationError(f"meter {self.meter_id}: remote control needs a password; none configured")
        try:
            request = m.RemoteControlRequest(
                self._address,
                self._password,
                self.operator,
                command,
                delay_minutes,
                to_meter_time(valid_until, self.tz),
            )
            request.payload(self.edition)
        except ProtocolError as exc:
            raise ConfigurationError(f"meter {self.meter_id}: {exc}") from exc
        await self._exchange(request, _expecting(m.RemoteControlReply), priority, attempts=attempts, force=True)

    async def read_relay(self, *, priority: int = Priority.COMMAND, force: bool = False) -> RelayStatus:
        """The relay as the meter reports it (2007: status word 3, DI 04000503).

        DL/T 645-2007 Appendix A, Table A.5 notes (电表运行状态字3) with the 2013 filing
        amendment: bit 4 relay state (0 closed, 1 open), bit 6 relay command state (0 close,
        1 open), bit 12 keep-power. The bit names come from the catalogue's ``word3`` table.
        "Armed" is the state a close-permit (1B) leaves: commanded closed while still open,
        waiting for the customer's button. 1997 meters have no relay bit we can trust: the
        model then has no ``[relay]`` and this raises ConfigurationError.
        """
        relay = self.model.relay
        if relay is None:
            raise ConfigurationError(f"meter {self.meter_id}: model {self.model.name} does not report its relay")
        decoded = await self._read_values(relay.state_di, priority, force=force)
        if not decoded or not isinstance(decoded[0].value, int):
            raise BadReply(f"meter {self.meter_id}: relay status DI {self._di(relay.state_di)} gave no status word")
        word = decoded[0].value
        fields = decoded[0].fields
        closed = (word >> relay.bit) & 1 != relay.open_when
        command = fields.get("relay_command")
        return RelayStatus(
            closed=closed,
            armed=command == "closed" and not closed,
            trip_pending=command == "open" and closed,
            keep_power=bool(fields.get("keep_power", False)),
            raw=word,
            read_at=self.clock(),
        )

    # -- frozen data ----------------------------------------------------------------------------

    def frozen_quantities(self) -> tuple[str, ...]:
        """The model's quantities the meter keeps in its daily freezes (the frozen job asks)."""
        return daily_frozen_quantities(self.model, self.catalogue)

    async def read_frozen_day(
        self, day: datetime.date, quantities: Sequence[str], *, priority: int = Priority.POLL
    ) -> list[Reading]:
        """The daily freeze taken at the meter's midnight starting ``day``; [] when the meter has
        no such record (not taken yet, too old, or never taken). The protocol-neutral signature
        the frozen job calls (DL/T 698.45 selects by freeze time, Dlt698Driver.read_frozen_day).

        DL/T 645-2007 numbers its freezes instead (1 = the newest, :meth:`read_frozen_daily`):
        the record number is predicted from the newest freeze's time (one read; the meter's
        calendar, not ours, numbers them), and the freeze time the meter returns checked. A
        meter that did not freeze some midnight (it was unpowered) numbers older records
        differently: the number is moved by the difference and asked again, at most
        :data:`FROZEN_PROBES` reads.
        """
        if self.edition is not E7:
            raise ConfigurationError(f"meter {self.meter_id}: DL/T 645-1997 has no daily frozen data")
        newest_di = self._nth_di("frozen.daily.time", 1)
        if newest_di is None:
            raise ConfigurationError("the DL/T 645-2007 catalogue has no daily freeze time")
        newest = await self._freeze_time(newest_di, priority)
        if newest is None or day > newest.date():
            return []  # no freeze yet, or not this one yet
        index = (newest.date() - day).days + 1
        tried: set[int] = set()
        for _ in range(FROZEN_PROBES):
            if index not in DAILY_FREEZES or index in tried:
                return []
            tried.add(index)
            readings = await self.read_frozen_daily(index, quantities, priority=priority)
            if not readings or readings[0].meter_time is None:
                return []
            got = datetime.datetime.fromtimestamp(readings[0].meter_time, self.tz).date()
            if got == day:
                return readings
            log.info(
                "event=freeze_wrong_day meter=%s freeze=%d got=%s want=%s retry=true",
                logfmt_value(self.meter_id),
                index,
                logfmt_value(got),
                day.isoformat(),
            )
            index += (got - day).days
        return []

    async def read_frozen_daily(
        self, index: int, quantities: Sequence[str], *, priority: int = Priority.POLL
    ) -> list[Reading]:
        """The ``index``-th most recent daily freeze (1 = the last) of ``quantities``.

        2007 DIs 0506xxNN (Appendix A Table A.6): 050600NN gives the freeze time, each energy
        family one series of total + tariffs. Readings carry ``meter_time`` = the freeze time
        and ``Quality.FROZEN``. Quantities the meter does not freeze (voltages, powers) are
        skipped; an index the meter has no freeze for gives []. The freeze time is read again
        after the values: if a new freeze shifted the index meanwhile, the read is repeated.
        """
        if index not in DAILY_FREEZES:
            raise ValueError(f"daily freeze index must be 1..62, got {index}")
        if self.edition is not E7:
            raise ConfigurationError(f"meter {self.meter_id}: DL/T 645-1997 has no daily frozen data")
        wanted = tuple(dict.fromkeys(quantities))
        time_di = self._nth_di("frozen.daily.time", index)
        if time_di is None:
            raise ConfigurationError("the DL/T 645-2007 catalogue has no daily freeze time")
        series: dict[int, list[str]] = {}
        for quantity in wanted:
            di = self._nth_di(FROZEN_PREFIX + quantity, index)
            if di is None:
                log.debug(
                    "event=no_frozen_value meter=%s quantity=%s", logfmt_value(self.meter_id), logfmt_value(quantity)
                )
                continue
            series.setdefault(di, []).append(quantity)
        for _ in range(2):
            stamp = await self._freeze_time(time_di, priority)
            if stamp is None:
                return []
            values: dict[str, DecodedValue] = {}
            for di in series:
                for value in await self._read_values(di, priority) or []:
                    if value.quantity and value.quantity.startswith(FROZEN_PREFIX):
                        values[value.quantity.removeprefix(FROZEN_PREFIX)] = value
            if await self._freeze_time(time_di, priority) == stamp:
                break
            log.info("event=freeze_moved meter=%s freeze=%d retry=true", logfmt_value(self.meter_id), index)
        else:
            raise BadReply(f"meter {self.meter_id}: daily freeze {index} kept moving while being read")
        meter_time = from_meter_time(stamp, self.tz)
        now = self.clock()
        return [
            self._reading(q, values[q], gateway_time=now, slot=None, meter_time=meter_time, quality=Quality.FROZEN)
            for q in wanted
            if q in values
        ]

    def _nth_di(self, quantity: str, index: int) -> int | None:
        """The DI of the ``index``-th member of an Nth-most-recent family (DI0 = NN)."""
        first = self.catalogue.by_quantity(self.edition, quantity)
        if first is None or first.nth is None:
            return None
        di = (first.di & ~0xFF) | index
        item = self.catalogue.get(self.edition, di)
        if item is None or item.nth != index or item.quantity != first.quantity:
            return None
        return di

    async def _freeze_time(self, di: int, priority: int) -> datetime.datetime | None:
        decoded = await self._read_values(di, priority)
        if not decoded:
            return None
        stamp = decoded[0].timestamp
        return stamp if isinstance(stamp, datetime.datetime) else None


def from_config(ctx: DriverContext) -> Dlt645Driver:
    """The registry's builder for DL/T 645 meters (both editions; the protocol name says which)."""
    if not isinstance(ctx.model, Dlt645Model) or not isinstance(ctx.address, str):
        raise ConfigurationError(f"meter {ctx.meter_id}: needs a DL/T 645 model and a 12-digit address")
    creds = ctx.credentials
    return Dlt645Driver(
        ctx.bus,
        ctx.meter_id,
        ctx.address,
        Edition.parse(ctx.protocol),
        ctx.model,
        password=creds.password if creds is not None else None,
        password_level=creds.level if creds is not None else 2,
        operator=creds.operator if creds is not None else "00000000",
        tz=ctx.tz,
        preamble=_preamble_option(ctx),
    )


def _preamble_option(ctx: DriverContext) -> int:
    """``preamble`` of the meter's options (the fleet builder fills in its bus's when the meter
    sets none); 0 for a context without one (tools that build a driver on their own)."""
    preamble = ctx.options.get("preamble")
    if preamble is None:
        return 0
    if isinstance(preamble, bool) or not isinstance(preamble, int):
        raise ConfigurationError(f"meter {ctx.meter_id}: preamble must be a number of FE bytes")
    return preamble

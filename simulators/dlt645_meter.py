"""A simulated DL/T 645 meter (2007 or 1997): state and request handling, no I/O.

:meth:`Dlt645Meter.handle` takes one request frame and returns the reply frames' bytes (none for
broadcasts, frames for other meters and refused functions). The meter reads its time from a
shared :class:`~simulators.clock.SimClock` plus its own drift; nothing here sleeps or touches a
socket. The electrical installation behind it is :class:`simulators.load.LoadModel`, advanced
lazily to the simulated time when a value is read (no per-meter timers, so 10,000 meters cost
nothing while idle).

Behaviour follows DL/T 645-2007 clause 6 and the 2013 filing amendment, as real meters do it:

* reads answer from the catalogue; block DIs answer as many members as the meter has (total and
  ``tariffs`` tariffs for energies); an unknown or unsupported DI answers 0xD1 (1997: 0xC1) with
  ERR bit1 "no requested data"; a reply longer than 200 data bytes goes out in parts: the first
  with the follow-up flag (B1), the rest on 0x12 requests as 0x92/0xB2 carrying SEQ (1997:
  0x02 -> 0x82/0xA2);
* 0x13 read address answers the meter's address; 0x08 broadcast time and writes of
  04000101/04000102 (1997 C010/C011) set the meter clock (writes need a password of a level in
  the password table: 0x94 on success, 0xD4 ERR bit2 when the password is wrong);
* daily freezes at the meter's midnight, kept for 62 days (0506xxNN, NN=1 the latest); every
  midnight crossed since the last request is frozen, so advancing the SimClock by days works;
* remote control 0x1C: the password must match and its level must be in ``trip_levels`` (default
  {2}: the plaintext level of the standard; ESAM levels 98/99 are not simulated), else 0xDC with
  ``authentication_failed``; a validity time earlier than the meter clock gives
  ``validity_expired``; a trip while keep-power (3A) is on gives ``keep_power``. 1A trips now;
  1D and 1E trip after N2 **minutes of meter time** (1E closes again ``auto_restore_minutes``
  later); 1B only arms the relay, which closes on :meth:`press_button`; 1C closes now; 2A/2B
  set/clear the pre-trip alarm. Status word 3 (04000503): bit4 relay open, bit6 relay commanded
  open, bit7 pre-trip alarm (also while a delayed trip is pending), bit12 keep-power. Trip and
  close event records (1D00.., 1E00..) log time, operator and energies when the relay moves;
* ``stuck_relay``: commands are accepted (and the command bit follows) but the relay never moves;
* instantaneous values come from the load model with its noise, refreshed once per simulated
  second; maximum demand (0101xx00) is the highest import power seen at those refreshes, with its
  time (a simplification of the 15-minute window); apparent energy and reactive demand are not
  kept (they answer "no requested data"). Energy is computed lazily from the clock on read;
* prepaid (local fee control), with a ``purse`` (opening credit): a ``prepaid="money"`` meter's
  remaining money falls by ``price`` yuan per kWh imported, an ``"energy"`` meter's remaining
  energy by each kWh; past zero the overdraft grows (00 90 0x 00/01; the other type's DIs answer
  "no requested data"). Status word 3 bits 8-9 give the type, word 1 bit 14 is set at zero
  credit. :meth:`top_up` is a purchase (records 0332/0333 xx NN, the opening credit is purchase
  1). With ``trip_at_zero_credit`` the meter opens its own relay (operator FFFFFFFF) when credit
  runs out, dated to the integration step in which it did, unless keep-power is on; a purchase
  that restores credit then arms the relay, which closes on :meth:`press_button` as after 1B.
"""

from __future__ import annotations

import datetime
import functools
import logging
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

from meter_gateway.protocols.dlt645 import messages as m
from meter_gateway.protocols.dlt645.catalogue import Catalogue, DataItem, default_catalogue
from meter_gateway.protocols.dlt645.edition import Edition
from meter_gateway.protocols.dlt645.errors import ProtocolError
from meter_gateway.protocols.dlt645.frame import Address, Frame
from meter_gateway.protocols.dlt645.remote_control import RemoteCommand
from meter_gateway.simulators.clock import SimClock
from meter_gateway.simulators.load import DEFAULT_TARIFFS, LoadModel, LoadSettings, energy_register, initial_energy
from meter_gateway.simulators.meter_clock import MeterClock
from meter_gateway.simulators.prepaid import Purchase, Purse, PurseKind

log = logging.getLogger(__name__)

MAX_READ_DATA: Final = 200  # DL/T 645-2007 6.2: a read reply's data field carries at most 200 bytes
FREEZES_KEPT: Final = 62  # 0506xx01..3E
EVENTS_KEPT: Final = 10  # 1D00FF01..0A
ERR_OTHER: Final = 0x01
ERR_NO_DATA: Final = 0x02  # err_2007 bit1; 1997 bit1 is "bad data identifier", the same meaning
ERR_PASSWORD: Final = 0x04
RC_AUTH_FAILED: Final = 1 << 3
RC_EXPIRED: Final = 1 << 10
RC_KEEP_POWER: Final = 1 << 11
_EPOCH: Final = datetime.datetime(1970, 1, 1)
_ENERGY_KINDS: Final = ("active", "reactive")
_IMPORT: Final = "energy.active.import.total"
LOCAL_OPERATOR: Final = "FFFFFFFF"  # operator code a meter logs for what it does by itself


def _unix(dt: datetime.datetime) -> float:
    """Simulated local time as the load model's seconds (its utc_offset is 0: local = model time)."""
    return (dt - _EPOCH).total_seconds()


@functools.cache
def _energy_name(quantity: str) -> tuple[str, str, str, int]:
    """``energy.<kind>.<direction>.<tariff>`` as (kind, direction, tariff, tariff number; 0 for
    the total), parsed once per name; LookupError when it is not such a name (int()'s ValueError
    when a ``t`` tariff has no number)."""
    parts = quantity.split(".")
    if len(parts) != 4:
        raise LookupError(quantity)
    _, kind, direction, tariff = parts
    if tariff == "total":
        return kind, direction, tariff, 0
    if not tariff.startswith("t"):
        raise LookupError(quantity)
    return kind, direction, tariff, int(tariff[1:])


@dataclass(frozen=True, slots=True)
class Freeze:
    time: datetime.datetime
    energy: dict[str, float]


@dataclass(frozen=True, slots=True)
class RelayEvent:
    time: datetime.datetime
    operator: str
    energy: dict[str, float]


class Dlt645Meter(MeterClock):
    """One simulated meter. See the module docstring for what it does."""

    def __init__(
        self,
        address: str,
        edition: Edition | int | str = Edition.DLT645_2007,
        *,
        clock: SimClock,
        seed: int = 0,
        passwords: Mapping[int, str] | None = None,
        trip_levels: frozenset[int] | set[int] = frozenset({2}),
        preamble: int = 4,
        turnaround: float = 0.0,
        tariffs: int = 4,
        drift_ppm: float = 0.0,
        history_days: int = 0,
        energy_step: float = 300.0,
        catalogue: Catalogue | None = None,
        load_settings: Mapping[str, Any] | None = None,
        purse: float | None = None,
        prepaid: PurseKind = "money",
        price: float = 0.5,
        trip_at_zero_credit: bool = False,
    ) -> None:
        """``load_settings``: further :class:`~simulators.load.LoadSettings` fields for this
        meter's installation (PV, currents...). ``purse``: opening credit of a prepaid meter (yuan,
        or kWh for ``prepaid="energy"``); None for a meter without fee control."""
        self.address = Address.parse(address)
        self.address_text = str(self.address)
        self.edition = edition if isinstance(edition, Edition) else Edition.parse(str(edition))
        if not 0 <= preamble <= 4:
            raise ValueError(f"preamble is 0..4 FE bytes, got {preamble}")
        if not 1 <= tariffs <= 63:
            raise ValueError(f"tariffs must be 1..63, got {tariffs}")
        self.clock = clock
        self.seed = seed
        self.passwords = dict({2: "000000", 4: "000000"} if passwords is None else passwords)
        self.trip_levels = frozenset(trip_levels)
        self.preamble = preamble
        self.turnaround = turnaround
        self.tariffs = tariffs
        self.drift_ppm = drift_ppm
        self.auto_restore_minutes = 30.0
        self.max_data = MAX_READ_DATA  # longest read-reply data field; some meters have less room
        self.catalogue = catalogue or default_catalogue()
        self.relay_closed = True
        self.relay_armed = False
        self.relay_command_open = False
        self.keep_power = False
        self.alarm = False
        self.stuck_relay = False
        self.freezes: deque[Freeze] = deque(maxlen=FREEZES_KEPT)
        self.trips: deque[RelayEvent] = deque(maxlen=EVENTS_KEPT)
        self.closes: deque[RelayEvent] = deque(maxlen=EVENTS_KEPT)
        self.trip_count = 0
        self.close_count = 0
        self.requests = 0
        self._pending_trip: tuple[datetime.datetime, str] | None = None  # meter time, operator
        self._pending_restore: datetime.datetime | None = None
        self._follow_ups: dict[int, list[bytes]] = {}
        self._cache_second: int | None = None
        self._second_of: tuple[datetime.datetime | None, int] = (None, 0)  # a time and its _unix second
        self._request_now: datetime.datetime | None = None
        self.max_demand: dict[str, tuple[float, datetime.datetime]] = {}  # total | tN -> (kW, time)
        self._cache_values: dict[str, float] = {}
        self._last_reply: list[bytes] = []
        sim_now = self._start_clock()
        initial = initial_energy(seed)
        start = sim_now - datetime.timedelta(days=history_days)
        self._started = start
        self._model_tariffs = DEFAULT_TARIFFS.tariffs
        settings = LoadSettings(seed=seed, initial_energy=initial, step=energy_step, **dict(load_settings or {}))
        self.load = LoadModel(settings, start=_unix(start))
        self.trip_at_zero_credit = trip_at_zero_credit
        self._credit_tripped = False
        self.purse = (
            None
            if purse is None
            else Purse(prepaid, credit=purse, price=price, energy=self.load.energy(_IMPORT), at=start)
        )
        self._last_meter_date = (start + datetime.timedelta(seconds=self._offset)).date()
        self._handlers: dict[type, Callable[[m.Message], list[Frame]]] = {
            m.ReadRequest: self._read,  # type: ignore[dict-item]
            m.ReadFollowUpRequest: self._read_follow_up,  # type: ignore[dict-item]
            m.ReadAddressRequest: self._read_address,  # type: ignore[dict-item]
            m.WriteRequest: self._write,  # type: ignore[dict-item]
            m.BroadcastTime: self._broadcast_time,  # type: ignore[dict-item]
            m.RemoteControlRequest: self._remote_control,  # type: ignore[dict-item]
        }

    # -- relay ----------------------------------------------------------------------------------

    def press_button(self) -> bool:
        """The customer's local button: closes an armed relay. Returns whether it closed."""
        self._catch_up()
        if not self.relay_armed:
            return False
        self.relay_armed = False
        self._move_relay(closed=True, operator="FFFFFFFF")
        return self.relay_closed

    def top_up(self, amount: float) -> Purchase:
        """A purchase of ``amount`` (the purse's unit), dated now; ValueError for a meter without
        fee control or an amount the meter cannot record. Credit back above zero after a
        zero-credit trip arms the relay (the customer closes it with the button)."""
        if self.purse is None:
            raise ValueError(f"meter {self.address_text} has no prepaid purse")
        self._catch_up()
        purchase = self.purse.top_up(amount, energy=self.load.energy(_IMPORT), at=self.meter_time())
        if self._credit_tripped and purchase.after > 0:
            self._credit_tripped = False
            self.relay_command_open = False
            self.relay_armed = not self.relay_closed
        return purchase

    @property
    def status_word1(self) -> int:
        self._catch_up()
        if self.purse is not None and self.purse.exhausted(self.load.energy(_IMPORT)):
            return 1 << 14  # overdraft / credit exhausted
        return 0

    @property
    def status_word3(self) -> int:
        self._catch_up()
        word = 0
        if self.purse is not None:
            word |= 1 << 9 if self.purse.kind == "money" else 1 << 8  # bits 8-9: 10 money, 01 energy
        if not self.relay_closed:
            word |= 1 << 4
        if self.relay_command_open:
            word |= 1 << 6
        if self.alarm or self._pending_trip is not None:
            word |= 1 << 7
        if self.keep_power:
            word |= 1 << 12
        return word

    def _move_relay(self, *, closed: bool, operator: str, at: datetime.datetime | None = None) -> None:
        """Move the relay (at meter time ``at``, default now) and log the event."""
        if self.stuck_relay or self.relay_closed == closed:
            return
        if at is None:
            at = self.meter_time()
        self.load.advance(_unix(at - datetime.timedelta(seconds=self.clock_offset)))
        self.load.set_relay(closed)
        self._cache_second = None
        self.relay_closed = closed
        event = RelayEvent(at, operator, self._energy_snapshot())
        if closed:
            self.closes.appendleft(event)
            self.close_count += 1
        else:
            self.trips.appendleft(event)
            self.trip_count += 1

    # -- lazy time-driven state -------------------------------------------------------------------

    def _catch_up(self) -> None:
        """Apply everything due by now: pending delayed trips, restores and midnight freezes."""
        now = self.meter_time()
        events: list[tuple[datetime.datetime, Callable[[], None]]] = []
        if self._pending_trip is not None and self._pending_trip[0] <= now:
            due, operator = self._pending_trip

            def trip(operator: str = operator, due: datetime.datetime = due) -> None:
                self._pending_trip = None
                self._move_relay(closed=False, operator=operator, at=due)

            events.append((due, trip))
        if self._pending_restore is not None and self._pending_restore <= now:

            def restore(due: datetime.datetime = self._pending_restore) -> None:
                self._pending_restore = None
                self.relay_command_open = False
                self._move_relay(closed=True, operator="FFFFFFFF", at=due)

            events.append((self._pending_restore, restore))
        day = self._last_meter_date
        today = now.date()
        if today > day:
            first = day + datetime.timedelta(days=1)
            skip = max(0, (today - first).days + 1 - FREEZES_KEPT)
            first += datetime.timedelta(days=skip)
            d = first
            while d <= today:
                midnight = datetime.datetime.combine(d, datetime.time())
                events.append((midnight, functools.partial(self._freeze, midnight)))
                d += datetime.timedelta(days=1)
        self._last_meter_date = max(day, today)
        for _, action in sorted(events, key=lambda e: e[0]):
            action()
        if self.trip_at_zero_credit and self.purse is not None and self.relay_closed:
            self._trip_when_credit_runs_out()

    def _trip_when_credit_runs_out(self) -> None:
        """Walk the load model up to now one integration step at a time and open the relay at the
        first step boundary where the credit is gone (keep-power forbids it, as it forbids trips)."""
        assert self.purse is not None
        if self.keep_power or self.stuck_relay:
            return
        target = _unix(self._sim_now())
        step = self.load.settings.step
        while True:
            if self.purse.exhausted(self.load.energy(_IMPORT)):
                at = _EPOCH + datetime.timedelta(seconds=self.load.time + self.clock_offset)
                self._credit_tripped = True
                self.relay_command_open = True
                self.relay_armed = False
                self._move_relay(closed=False, operator=LOCAL_OPERATOR, at=at)
                return
            if self.load.time >= target:
                return
            self.load.advance(min(target, (self.load.time // step + 1) * step))
            self._cache_second = None

    def _freeze(self, meter_midnight: datetime.datetime) -> None:
        sim = meter_midnight - datetime.timedelta(seconds=self.clock_offset)
        self.load.advance(_unix(sim))
        self.freezes.appendleft(Freeze(meter_midnight, self._energy_snapshot()))

    def _energy_snapshot(self) -> dict[str, float]:
        return {
            f"{kind}.{direction}.{tariff}": self.load.energy(f"energy.{kind}.{direction}.{tariff}")
            if tariff == "total" or int(tariff[1:]) <= self._model_tariffs
            else 0.0
            for kind in _ENERGY_KINDS
            for direction in ("import", "export")
            for tariff in ("total", *(f"t{t}" for t in range(1, self.tariffs + 1)))
        }

    # -- request handling -----------------------------------------------------------------------

    def addressed_by(self, address: Address) -> bool:
        # Own address first: matches() compares byte by byte in Python.
        return address.wire == self.address.wire or address.is_broadcast or address.matches(self.address)

    def handle(self, frame: Frame, now: datetime.datetime | None = None) -> list[bytes]:
        """Reply bytes for one request frame (an empty list when the meter stays silent).

        ``now`` is the simulated time of the request (default: the clock's now)."""
        if frame.control.from_meter or not self.addressed_by(frame.address):
            return []
        return self._answering(now, self._handle, frame)

    def _handle(self, frame: Frame) -> list[bytes]:
        try:
            message = m.parse_message(frame, self.edition)
        except ProtocolError as exc:
            log.debug("meter %s: ignoring request %s: %s", self.address_text, frame.control, exc)
            return []
        self._catch_up()
        if isinstance(message, m.RereadRequest):
            return list(self._last_reply)
        handler = self._handlers.get(type(message))
        if handler is None:
            if frame.address.is_broadcast:
                return []
            replies = [self._error(frame.control.function, ERR_OTHER)]
        else:
            replies = handler(message)
        if frame.address.is_broadcast:
            return []
        out = [r.encode(self.preamble) for r in replies]
        if out:
            self._last_reply = out
        return out

    def _error(self, function: int, code: int, *, word: bool = False) -> Frame:
        return m.ErrorReply(self.address, function, code, word).to_frame(self.edition)

    def _read(self, req: m.ReadRequest) -> list[Frame]:
        read_fn = m.ReadRequest.FUNCTIONS[self.edition]
        try:
            value = self.value_bytes(req.di)
        except LookupError:
            return [self._error(read_fn, ERR_NO_DATA)]
        room = self.max_data - self.edition.di_length
        if len(value) <= room:
            return [m.ReadReply(self.address, req.di, value).to_frame(self.edition)]
        chunk = room - 1 if self.edition is Edition.DLT645_2007 else room  # 2007 follow-ups carry SEQ
        self._follow_ups[req.di] = [value[i : i + chunk] for i in range(room, len(value), chunk)]
        return [m.ReadReply(self.address, req.di, value[:room], more=True).to_frame(self.edition)]

    def _read_follow_up(self, req: m.ReadFollowUpRequest) -> list[Frame]:
        parts = self._follow_ups.get(req.di)
        fn = m.ReadFollowUpRequest.FUNCTIONS[self.edition]
        if not parts:
            return [self._error(fn, ERR_NO_DATA)]
        if self.edition is Edition.DLT645_2007:
            index = req.seq - 1
            if not 0 <= index < len(parts):
                return [self._error(fn, ERR_NO_DATA)]
            more = index + 1 < len(parts)
            return [m.ReadReply(self.address, req.di, parts[index], more, req.seq).to_frame(self.edition)]
        part = parts.pop(0)
        # 1997 follow-ups have no SEQ: each 0x02 takes the next part; the reply function is 0x02.
        frame = m.ReadReply(self.address, req.di, part, bool(parts), 0).to_frame(self.edition)
        return [Frame(frame.address, frame.control, frame.data[:-1])]

    def _read_address(self, req: m.ReadAddressRequest) -> list[Frame]:
        return [m.ReadAddressReply(self.address, self.address).to_frame(self.edition)]

    def _password_ok(self, password: m.Password) -> bool:
        return self.passwords.get(password.level) == password.digits

    def _write(self, req: m.WriteRequest) -> list[Frame]:
        fn = m.WriteRequest.FUNCTIONS[self.edition]
        if not self._password_ok(req.password):
            return [self._error(fn, ERR_PASSWORD)]
        item = self.catalogue.get(self.edition, req.di)
        if item is None or item.quantity not in {"clock.date", "clock.time"}:
            return [self._error(fn, ERR_OTHER)]
        try:
            decoded = self.catalogue.decode(self.edition, req.di, req.value)[0].value
        except ProtocolError:
            return [self._error(fn, ERR_OTHER)]
        now = self.meter_time()
        if item.quantity == "clock.date":
            day = datetime.date.fromisoformat(str(decoded))
            self.set_meter_time(datetime.datetime.combine(day, now.time()))
        else:
            t = datetime.time.fromisoformat(str(decoded))
            self.set_meter_time(datetime.datetime.combine(now.date(), t))
        return [m.Ack(self.address, fn).to_frame(self.edition)]

    def _broadcast_time(self, req: m.BroadcastTime) -> list[Frame]:
        self.set_meter_time(req.when)
        return []

    def _remote_control(self, req: m.RemoteControlRequest) -> list[Frame]:
        if not self._password_ok(req.password) or req.password.level not in self.trip_levels:
            return [self._error(0x1C, RC_AUTH_FAILED, word=True)]
        now = self.meter_time()
        if req.valid_until is None or req.valid_until < now:  # no validity time: expired, as meters treat it
            return [self._error(0x1C, RC_EXPIRED, word=True)]
        command = req.command
        if command.opens_relay and self.keep_power:
            return [self._error(0x1C, RC_KEEP_POWER, word=True)]
        if command is RemoteCommand.TRIP:
            self.relay_command_open = True
            self.relay_armed = False
            self._pending_trip = None
            self._move_relay(closed=False, operator=req.operator)
        elif command in (RemoteCommand.DELAYED_TRIP, RemoteCommand.TRIP_AUTO_RESTORE):
            self.relay_command_open = True
            self.relay_armed = False
            due = now + datetime.timedelta(minutes=req.n2)
            self._pending_trip = (due, req.operator)
            if command is RemoteCommand.TRIP_AUTO_RESTORE:
                self._pending_restore = due + datetime.timedelta(minutes=self.auto_restore_minutes)
            self._catch_up()
        elif command is RemoteCommand.CLOSE_PERMIT:
            self.relay_command_open = False
            self._pending_trip = None
            self.relay_armed = not self.relay_closed
        elif command is RemoteCommand.DIRECT_CLOSE:
            self.relay_command_open = False
            self.relay_armed = False
            self._pending_trip = None
            self._move_relay(closed=True, operator=req.operator)
        elif command in (RemoteCommand.ALARM_ON, RemoteCommand.ALARM_OFF):
            self.alarm = command is RemoteCommand.ALARM_ON
        elif command in (RemoteCommand.KEEP_POWER_ON, RemoteCommand.KEEP_POWER_OFF):
            self.keep_power = command is RemoteCommand.KEEP_POWER_ON
            if self.keep_power:
                self._pending_trip = None
        return [m.RemoteControlReply(self.address).to_frame(self.edition)]

    # -- values ---------------------------------------------------------------------------------

    def value_bytes(self, di: int) -> bytes:
        """The encoded data for ``di`` now; LookupError when the meter has no such data."""
        parts = self.catalogue.reply_parts(self.edition, di)
        if parts is None:
            raise LookupError(di)
        data: list[bytes] = []
        for item, encode in parts:
            try:
                data.append(self._item_bytes(item, encode))
            except LookupError:
                # A block answers the members the meter has: the first one it lacks ends the data.
                if not data:
                    raise
                break
        return b"".join(data)

    def _item_bytes(self, item: DataItem, encode: Callable[[object], bytes]) -> bytes:
        if item.kind == "block":  # a block inside a block: only hand-made catalogues have them
            return self.value_bytes(item.di)
        value = self.value_of(item)
        try:
            return encode(value)
        except ProtocolError as exc:
            raise LookupError(item.di) from exc

    def value_of(self, item: DataItem) -> object:
        quantity = item.quantity or ""
        return _source(quantity)(self, item, quantity)

    # Value sources, chosen per quantity by _source; all take (item, quantity).

    def _clock_date(self, item: DataItem, quantity: str) -> object:
        return self.meter_time().date()

    def _clock_time(self, item: DataItem, quantity: str) -> object:
        return self.meter_time().time().replace(microsecond=0)

    def _identity(self, item: DataItem, quantity: str) -> object:
        return self.address_text

    def _status_word3(self, item: DataItem, quantity: str) -> object:
        return self.status_word3

    def _energy_now(self, item: DataItem, quantity: str) -> object:
        self._live_values()  # advances the load model, whose registers hold the energy, to now
        return self._energy(quantity)

    def _current_demand(self, item: DataItem, quantity: str) -> object:
        return self._live_values()["power.active.total"]

    def _max_demand(self, item: DataItem, quantity: str) -> object:
        self._live_values()  # a refresh tracks the demand
        # 2007: one record (demand and time); 1997: the demand (A01x) and its time (B01x, the
        # quantity name with ".time") are separate data identifiers
        time_only = quantity.endswith(".time")
        key = quantity.removeprefix("demand.active.import.max").removesuffix(".time").lstrip(".") or "total"
        if key != "total" and not (key[:1] == "t" and key[1:].isdigit() and 1 <= int(key[1:]) <= self.tariffs):
            raise LookupError(quantity)
        demand, at = self.max_demand.get(key, (0.0, self._started.replace(second=0, microsecond=0)))
        if time_only:
            return at.strftime("--%m-%dT%H:%M")  # MMDDhhmm: no year
        return {"demand": demand, "time": at} if item.kind == "record" else demand

    def _instantaneous(self, item: DataItem, quantity: str) -> object:
        values = self._live_values()
        if quantity in values:
            value = values[quantity]
            if quantity.startswith("current.l") and value > 0:
                return abs(value) * (1 if values[f"power.active.{quantity[-2:]}"] >= 0 else -1)
            return value
        raise LookupError(quantity)

    def _live_values(self) -> dict[str, float]:
        """The load model's values at the current simulated second (a meter refreshes about once a
        second, and this keeps a burst of reads from re-integrating the load for each one)."""
        now = self._sim_now()
        if now is not self._second_of[0]:  # the datetime arithmetic once per request, not per value
            self._second_of = (now, int(_unix(now)))
        second = self._second_of[1]
        if self._cache_second != second:
            self.load.advance(float(second))
            values = self._cache_values = self.load.values()
            self._cache_second = second
            self._track_demand(values["power.active.total"])
        return self._cache_values

    def _track_demand(self, power: float) -> None:
        """Maximum demand, simplified: the highest import power seen when the meter was read
        (a real meter uses 15-minute sliding windows), overall and per tariff, with its time."""
        if power <= 0:
            return
        at = self.meter_time().replace(second=0, microsecond=0)
        minute = at.hour * 60 + at.minute
        tariff = f"t{self.load.settings.tariffs.tariff_at(minute)}"
        for key in ("total", tariff):
            if power > self.max_demand.get(key, (0.0, at))[0]:
                self.max_demand[key] = (power, at)

    def _energy(self, quantity: str, snapshot: Mapping[str, float] | None = None) -> float:
        kind, direction, tariff, number = _energy_name(quantity)
        if tariff != "total" and not 1 <= number <= self.tariffs:
            raise LookupError(quantity)

        def get(k: str, d: str) -> float:
            if snapshot is not None:
                return snapshot[f"{k}.{d}.{tariff}"]
            if number > self._model_tariffs:
                return 0.0
            return self.load.energy(f"energy.{k}.{d}.{tariff}")

        value = energy_register(kind, direction, get)
        if value is None:
            raise LookupError(quantity)
        return value

    def _frozen(self, item: DataItem, quantity: str) -> object:
        nth = item.nth or 1
        if nth > len(self.freezes):
            raise LookupError(quantity)
        freeze = self.freezes[nth - 1]
        if quantity == "frozen.daily.time":
            return freeze.time
        base = quantity.removeprefix("frozen.daily.").removesuffix(".all")
        tariffs = ("total", *(f"t{t}" for t in range(1, self.tariffs + 1)))
        return [self._energy(f"{base}.{t}", freeze.energy) for t in tariffs]

    def _status_word1(self, item: DataItem, quantity: str) -> object:
        return self.status_word1

    def _prepaid(self, item: DataItem, quantity: str) -> object:
        """``prepaid.<kind>.<what>``: the purse of this meter's type only (the other type's DIs
        and a meter without fee control have no such data)."""
        purse = self.purse
        _, kind, what = quantity.split(".", 2)
        if purse is None or kind != purse.kind:
            raise LookupError(quantity)
        self._live_values()  # advances the load model, whose import register the purse follows
        energy = self.load.energy(_IMPORT)
        if what == "remaining":
            return purse.remaining(energy)
        if what == "overdraft":
            return purse.overdraft(energy)
        field = what.removeprefix("purchase.")
        nth = item.nth or 1
        if field == what or nth > len(purse.purchases):
            raise LookupError(quantity)
        record = purse.purchases[nth - 1]
        if field == "time":
            return record.time.replace(second=0, microsecond=0)
        if field in ("count", "amount", "before", "after", "total"):
            return getattr(record, field)
        raise LookupError(quantity)

    def _event(self, item: DataItem, quantity: str) -> object:
        _, which, what = quantity.split(".", 2)
        records = self.trips if which == "trip" else self.closes
        if what == "count":
            return self.trip_count if which == "trip" else self.close_count
        nth = item.nth or 1
        if nth > len(records):
            raise LookupError(quantity)
        record = records[nth - 1]
        if what == "time":
            return record.time.replace(microsecond=0)
        if what == "operator":
            return record.operator
        if what == "last":
            e = record.energy
            return {
                "time": record.time.replace(microsecond=0),
                "operator": record.operator,
                "energy.active.import.total": e["active.import.total"],
                "energy.active.export.total": e["active.export.total"],
                "energy.reactive.q1.total": e["reactive.import.total"],
                "energy.reactive.q2.total": 0.0,
                "energy.reactive.q3.total": 0.0,
                "energy.reactive.q4.total": e["reactive.export.total"],
            }
        raise LookupError(quantity)


_Source: TypeAlias = Callable[[Dlt645Meter, DataItem, str], object]


def _constant(value: object) -> _Source:
    return lambda meter, item, quantity: value


_NAMED_SOURCES: Final[dict[str, _Source]] = {
    "clock.date": Dlt645Meter._clock_date,
    "clock.time": Dlt645Meter._clock_time,
    "meter.address": Dlt645Meter._identity,
    "meter.number": Dlt645Meter._identity,
    "meter.constant.active": _constant(1200),
    "meter.constant.reactive": _constant(1200),
    "status.word1": Dlt645Meter._status_word1,
    "status.word3": Dlt645Meter._status_word3,
    "temperature.internal": _constant(28.5),
    "demand.active.current": Dlt645Meter._current_demand,
}


@functools.cache
def _source(quantity: str) -> _Source:
    """Where a quantity's value comes from, decided once per name rather than by a chain of string
    tests per value read. Frozen and event quantities, then the named ones, then the families."""
    if quantity.startswith("frozen.daily."):
        return Dlt645Meter._frozen
    if quantity.startswith("event."):
        return Dlt645Meter._event
    if quantity.startswith("prepaid."):
        return Dlt645Meter._prepaid
    named = _NAMED_SOURCES.get(quantity)
    if named is not None:
        return named
    if quantity.startswith("status.word"):
        return _constant(0)
    if quantity.startswith("energy."):
        return Dlt645Meter._energy_now
    if quantity.startswith("demand.active.import.max"):
        return Dlt645Meter._max_demand
    return Dlt645Meter._instantaneous


__all__ = ["Dlt645Meter", "Freeze", "RelayEvent"]

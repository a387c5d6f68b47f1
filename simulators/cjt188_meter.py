"""A simulated CJ/T 188 water, gas or heat meter: state and request handling, no I/O.

:meth:`Cjt188Meter.handle` takes one received request (a frame and the FE wake-up bytes that
preceded it) and returns the reply frames' bytes. Time comes from the shared
:class:`~simulators.clock.SimClock` plus the meter's drift; consumption comes from a
:class:`~simulators.flow.FlowModel` advanced lazily when a value is read.

What it answers (CJ/T 188-2004 clause 7, tables of ``protocols/cjt188/data/cjt188.toml``):

* 901F read current data: water and gas meters the cumulative volume (m3, unit code 2C), the
  volume at the last settlement day, the meter time and ST; heat meters the settlement-day and
  current heat (kWh), heat power (kW), flow (m3/h), cumulative volume, supply and return
  temperatures, working hours (hours the valve was open), time and ST; registers roll over at
  1,000,000 as the 6+2-digit BCD fields do;
* D120-D12B the settlement-day values of the last 1-12 months (DI not kept yet: abnormal reply);
  8103 the settlement day; 810A read address (function 03H; with the all-AA wildcard address and
  type AA it is address discovery on a one-meter line);
* A017 valve control (55H open, 99H close): the valve takes ``valve_time`` seconds to move, and
  the flow stops once it is closed; the acknowledgement carries ST after the command (the old
  position while the valve is still moving). ``stuck_valve``: the command is acknowledged, the
  valve stays put and ST reports the valve "abnormal" (11) until a command finds it where it
  should be. ``jamming_valve``: the command is acknowledged normally (ST shows the valve where
  it was, as for a valve that starts to move), then the valve jams where it was and ST reports
  it "abnormal" from the next read on, until a command finds it where it should be;
* A015 write standard time sets the meter clock;
* anything else: an abnormal reply (function | C0H) with SER and ST.

ST: D0-D1 valve (00 open, 01 closed, 11 abnormal), D2 battery low (``battery_low``, or after
``battery_days`` of simulated time).

Per-meter options: ``di_order`` ("standard" sends 90 1F, "swapped" 1F 90: requests in the other
order name another DI and get an abnormal reply); ``wake_preamble`` (slow wake-up: a frame not
preceded by at least that many FE bytes is not heard at all); ``turnaround`` (slow reply);
``preamble`` (FE bytes before each reply).
"""

from __future__ import annotations

import datetime
import logging
import random
from collections import deque
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Final

from meter_gateway.protocols.cjt188 import messages as m
from meter_gateway.protocols.cjt188.catalogue import default_catalogue
from meter_gateway.protocols.cjt188.deframer import Deframer
from meter_gateway.protocols.cjt188.errors import ProtocolError
from meter_gateway.protocols.cjt188.frame import Address, Frame, checksum
from meter_gateway.protocols.cjt188.identifiers import DiOrder, check_order
from meter_gateway.protocols.cjt188.status import Status
from meter_gateway.simulators.clock import SimClock
from meter_gateway.simulators.faults import Faults
from meter_gateway.simulators.flow import GAS, HEAT, WATER, FlowModel, FlowSettings
from meter_gateway.simulators.meter_clock import MeterClock
from meter_gateway.simulators.protocol import StreamDeframer, WireProtocol

log = logging.getLogger(__name__)

METER_TYPES: Final = {"water": 0x10, "heat": 0x20, "gas": 0x30}
HISTORY_FIRST: Final = 0xD120
HISTORY_KEPT: Final = 12
DI_SETTLEMENT_DAY: Final = 0x8103
ROLLOVER: Final = 1_000_000.0  # XXXXXX.XX
_EPOCH: Final = datetime.datetime(1970, 1, 1)
_RECENT: Final = 1024  # bytes of input kept to count the FE run before each frame


def _unix(dt: datetime.datetime) -> float:
    return (dt - _EPOCH).total_seconds()


def meter_type_code(meter_type: int | str) -> int:
    """``water`` / ``gas`` / ``heat`` or a Table 3 type byte (0x10-0x49)."""
    if isinstance(meter_type, str):
        try:
            return METER_TYPES[meter_type]
        except KeyError:
            known = sorted(METER_TYPES)
            raise ValueError(f"meter_type must be one of {known} or a type byte, got {meter_type!r}") from None
    if not 0x10 <= meter_type <= 0x49 or default_catalogue().meter_class(meter_type) == "unknown":
        raise ValueError(f"meter type {meter_type:#04x} is not a CJ/T 188 water, heat, gas or other meter")
    return meter_type


@dataclass(frozen=True, slots=True)
class Received:
    """A request frame and the run of FE wake-up bytes right before it."""

    frame: Frame
    preamble: int

    def wire_bytes(self) -> bytes:
        f = self.frame
        body = bytes((0x68, f.meter_type, *f.address.wire, f.control.byte, len(f.data))) + f.data
        return b"\xfe" * self.preamble + body + bytes((checksum(body), 0x16))


class WakeTrackingDeframer:
    """The codec's deframer, plus the FE run before each frame (slow wake-up needs it)."""

    __slots__ = ("_inner", "_recent")

    def __init__(self) -> None:
        self._inner = Deframer(max_data_length=255)
        self._recent = b""

    @property
    def buffered(self) -> int:
        return self._inner.buffered

    def reset(self) -> bytes:
        self._recent = b""
        return self._inner.reset()

    def feed(self, data: bytes) -> list[Any]:
        recent = (self._recent + bytes(data))[-_RECENT:]
        out: list[Any] = []
        for event in self._inner.feed(data):
            if not isinstance(event, Frame):
                out.append(event)
                continue
            raw = Received(event, 0).wire_bytes()
            at = recent.find(raw)
            run = 0
            if at >= 0:
                while run < at and recent[at - run - 1] == 0xFE:
                    run += 1
                recent = recent[at + len(raw) :]
            out.append(Received(event, run))
        self._recent = recent
        return out


class Cjt188Wire(WireProtocol):
    """CJ/T 188 on a shared bus (see :mod:`simulators.protocol`). No broadcast address exists."""

    name = "cjt188"
    discard_prefix = "cjt188_discarded_"

    def deframer(self) -> StreamDeframer:
        return WakeTrackingDeframer()

    def key(self, meter: Any) -> Hashable:
        return bytes(meter.address.wire)

    def from_meter(self, frame: Any) -> bool:
        return bool(frame.frame.control.from_meter)

    def frame_key(self, frame: Any) -> Hashable:
        return bytes(frame.frame.address.wire)

    def is_broadcast(self, frame: Any) -> bool:
        return False

    def is_wildcard(self, frame: Any) -> bool:
        return bool(frame.frame.address.is_wildcard)

    def wildcard_matches(self, frame: Any, meter: Any) -> bool:
        return bool(frame.frame.address.matches(meter.address))

    def request_bytes(self, frame: Any) -> int:
        return 13 + len(frame.frame.data) + int(frame.preamble)

    def encode(self, frame: Any) -> bytes:
        return bytes(frame.wire_bytes())

    def readdress(self, reply: bytes) -> bytes:
        """The same reply from the address with its lowest bit flipped, checksum fixed."""
        start = reply.index(0x68)
        body = bytearray(reply[start:])
        body[2] ^= 0x01
        body[-2] = checksum(body[:-2])
        return reply[:start] + bytes(body)

    def stick(self, meter: Any, faults: Faults) -> None:
        if faults.stuck_valve:
            meter.stuck_valve = True


CJT188: Final = Cjt188Wire()


class Cjt188Meter(MeterClock):
    """One simulated CJ/T 188 meter. See the module docstring for what it does."""

    WIRE: ClassVar[WireProtocol] = CJT188

    def __init__(
        self,
        address: str,
        meter_type: int | str = "water",
        *,
        clock: SimClock,
        seed: int = 0,
        preamble: int = 2,
        turnaround: float = 0.0,
        drift_ppm: float = 0.0,
        di_order: str = "standard",
        wake_preamble: int = 0,
        valve_time: float = 0.0,
        battery_low: bool = False,
        battery_days: float | None = None,
        settlement_day: int = 1,
        jamming_valve: bool = False,
        flow: FlowSettings | None = None,
    ) -> None:
        self.address = Address.parse(address)
        if self.address.is_wildcard:
            raise ValueError(f"a meter's own address cannot be a wildcard: {address!r}")
        self.address_text = str(self.address)
        self.meter_type = meter_type_code(meter_type)
        self.meter_class = default_catalogue().meter_class(self.meter_type)
        if not 0 <= preamble <= 4:
            raise ValueError(f"preamble is 0..4 FE bytes, got {preamble}")
        if not 0 <= wake_preamble <= 16:
            raise ValueError(f"wake_preamble is 0..16 FE bytes, got {wake_preamble}")
        if valve_time < 0:
            raise ValueError(f"valve_time must be >= 0 seconds, got {valve_time}")
        if not 1 <= settlement_day <= 28:
            raise ValueError(f"settlement_day must be 1..28, got {settlement_day}")
        self.di_order: DiOrder = check_order(di_order)
        self.clock = clock
        self.preamble = preamble
        self.turnaround = turnaround
        self.drift_ppm = drift_ppm
        self.wake_preamble = wake_preamble
        self.valve_time = valve_time
        self.battery_low = battery_low
        self.battery_days = battery_days
        self.settlement_day = settlement_day
        self.stuck_valve = False
        self.jamming_valve = jamming_valve
        self.valve_fault = False
        self._jam_after_ack = False  # a jamming valve's fault shows once its command is acknowledged
        self.requests = 0
        self.unheard = 0  # frames ignored for a short wake-up preamble
        rng = random.Random(seed)
        base = flow or {"heat": HEAT, "gas": GAS}.get(self.meter_class, WATER)
        sim_now = self._start_clock()
        self._started = sim_now
        self.flow = FlowModel(
            replace(base, seed=seed),
            start=_unix(sim_now),
            volume=round(rng.uniform(10.0, 900.0), 2),
            heat=round(rng.uniform(100.0, 9000.0), 2) if base.heat else 0.0,
        )
        self._valve_target: bool | None = None  # commanded position while the valve moves
        self._valve_due: datetime.datetime | None = None  # simulated time the move completes
        self._request_now: datetime.datetime | None = None
        self.settlements: deque[tuple[datetime.date, float]] = deque(maxlen=HISTORY_KEPT)
        self._last_settlement_check = self.meter_time().date()
        self._settled_value = self._register()  # the value at the last settlement day

    # -- valve, battery, status -----------------------------------------------------------------

    @property
    def valve_open(self) -> bool:
        self._catch_up()
        return self.flow.valve_open

    def command_valve(self, open_valve: bool) -> None:
        """What an A017 write does (also for the control port)."""
        self._catch_up()
        if self.stuck_valve or self.jamming_valve:
            # A stuck valve cannot reach a position it is not in; being told to stay is fine.
            fault = self.flow.valve_open != open_valve
            self._valve_target = self._valve_due = None
            if self.jamming_valve and fault:
                self.valve_fault = False  # the acknowledgement still looks normal
                self._jam_after_ack = True
            else:
                self.valve_fault = fault
            return
        self.valve_fault = False
        if self.flow.valve_open == open_valve:
            self._valve_target = self._valve_due = None
            return
        self._valve_target = open_valve
        self._valve_due = self._sim_now() + datetime.timedelta(seconds=self.valve_time)
        self._catch_up()

    def _jammed(self) -> None:
        """A jamming valve's command has been acknowledged: from now on ST says abnormal."""
        if self._jam_after_ack:
            self._jam_after_ack = False
            self.valve_fault = True

    @property
    def battery_is_low(self) -> bool:
        if self.battery_low:
            return True
        if self.battery_days is None:
            return False
        return (self._sim_now() - self._started).total_seconds() >= self.battery_days * 86400

    def status(self) -> Status:
        self._catch_up()
        valve = "abnormal" if self.valve_fault else "open" if self.flow.valve_open else "closed"
        return Status.build(valve=valve, battery_low=self.battery_is_low)

    # -- lazy time-driven state -----------------------------------------------------------------

    def _catch_up(self) -> None:
        now = self._sim_now()
        if self._valve_due is not None and self._valve_due <= now and self._valve_target is not None:
            self.flow.set_valve(self._valve_target, at=_unix(self._valve_due))
            self._valve_target = self._valve_due = None
        today = self.meter_time().date()
        if today > self._last_settlement_check:
            day = self._last_settlement_check + datetime.timedelta(days=1)
            day = max(day, today - datetime.timedelta(days=HISTORY_KEPT * 31 + 31))
            while day <= today:
                if day.day == self.settlement_day:
                    midnight = datetime.datetime.combine(day, datetime.time())
                    self.flow.advance(_unix(midnight) - self.clock_offset)
                    self._settled_value = self._register()
                    self.settlements.appendleft((day, self._settled_value))
                day += datetime.timedelta(days=1)
            self._last_settlement_check = today
        self.flow.advance(_unix(now))

    def _register(self) -> float:
        """The billing register: heat (kWh) for a heat meter, volume (m3) otherwise."""
        return self.flow.heat if self.flow.settings.heat else self.flow.volume

    # -- request handling -----------------------------------------------------------------------

    def handle(self, received: Received | Frame, now: datetime.datetime | None = None) -> list[bytes]:
        """Reply bytes for one request (an empty list when the meter stays silent)."""
        frame, preamble = (received.frame, received.preamble) if isinstance(received, Received) else (received, None)
        if frame.control.from_meter or not frame.address.matches(self.address):
            return []
        if frame.meter_type not in (self.meter_type, 0xAA):
            return []
        if preamble is not None and preamble < self.wake_preamble:
            self.unheard += 1  # still asleep: the frame went by unheard
            return []
        reply = self._answering(now, self._reply, frame)
        return [] if reply is None else [reply.encode(self.di_order, self.preamble)]

    def _reply(self, frame: Frame) -> m.Message | None:
        self._jammed()  # a jam after a command given on the control port shows from the next request
        self._catch_up()
        try:
            message = m.parse_message(frame, self.di_order)
        except ProtocolError as exc:
            log.debug("meter %s: ignoring request %s: %s", self.address_text, frame.control, exc)
            return None
        t, a = self.meter_type, self.address
        if isinstance(message, m.ReadRequest):
            if message.di == m.DI_ADDRESS:
                return m.ReadReply(t, a, m.DI_ADDRESS, message.ser)
            values = self._read_values(message.di)
            if values is None:
                return self._abnormal(frame, message.ser)
            return m.ReadReply.build(t, a, message.di, values, ser=message.ser)
        if isinstance(message, m.WriteRequest):
            return self._write(frame, message)
        return self._abnormal(frame, None)

    def _abnormal(self, frame: Frame, ser: int | None) -> m.Message:
        if ser is None:
            ser = frame.data[2] if len(frame.data) >= 3 else 0
        return m.ErrorReply(self.meter_type, self.address, frame.control.function, ser, self.status())

    def _read_values(self, di: int) -> Mapping[str, object] | None:
        if di == m.DI_CURRENT_DATA:
            return self.current_values()
        if di == DI_SETTLEMENT_DAY:
            return {"settlement.day": self.settlement_day}
        if HISTORY_FIRST <= di < HISTORY_FIRST + HISTORY_KEPT:
            nth = di - HISTORY_FIRST + 1
            if nth > len(self.settlements):
                return None
            name = "heat.settlement" if self.flow.settings.heat else "volume.settlement"
            return {name: self._coded(self.settlements[nth - 1][1], "kWh" if self.flow.settings.heat else "m3")}
        return None

    def current_values(self) -> dict[str, object]:
        """901F's fields by name, as the catalogue encodes them (units as sent)."""
        self._catch_up()
        when = self.meter_time().replace(microsecond=0)
        status = self.status()
        if not self.flow.settings.heat:
            prefix = "volume" if self.meter_class in ("water", "gas") else "reading"
            unit = "m3" if prefix == "volume" else "kWh"
            return {
                f"{prefix}.total": self._coded(self.flow.volume, unit),
                f"{prefix}.settlement": self._coded(self._settled_value, unit),
                "meter.time": when,
                "status": status,
            }
        s = self.flow.settings
        prefix = "cooling" if self.meter_class == "cooling" else "heat"
        return {
            f"{prefix}.settlement": self._coded(self._settled_value, "kWh"),
            f"{prefix}.total": self._coded(self.flow.heat, "kWh"),
            "power.heat": (round(self.flow.power_at(), 2), "kW"),
            "flow.rate": (round(self.flow.flow_at(), 4), "m3/h"),
            "volume.total": self._coded(self.flow.volume, "m3"),
            "temperature.supply": s.supply_temperature,
            "temperature.return": s.return_temperature if self.flow.valve_open else s.supply_temperature,
            "time.working_hours": int(self.flow.open_seconds // 3600),
            "meter.time": when,
            "status": status,
        }

    @staticmethod
    def _coded(value: float, unit: str) -> tuple[float, str]:
        # Truncated, not rounded: a register shows what has been consumed, never more.
        return (int((value % ROLLOVER) * 100) / 100, unit)

    def _write(self, frame: Frame, request: m.WriteRequest) -> m.Message:
        try:
            values = request.values().by_quantity()
        except ProtocolError:
            return self._abnormal(frame, request.ser)
        t, a = self.meter_type, self.address
        if request.di == m.DI_VALVE and values.get("valve.command") in ("open", "close"):
            self.command_valve(values["valve.command"] == "open")
            ack = m.WriteReply.ack(t, a, m.DI_VALVE, ser=request.ser, status=self.status())
            self._jammed()
            return ack
        if request.di == m.DI_STANDARD_TIME and isinstance(values.get("meter.time"), str):
            self.set_meter_time(datetime.datetime.fromisoformat(str(values["meter.time"])))
            return m.WriteReply.ack(t, a, m.DI_STANDARD_TIME, ser=request.ser)
        return self._abnormal(frame, request.ser)


__all__ = ["CJT188", "Cjt188Meter", "Cjt188Wire", "Received", "WakeTrackingDeframer", "meter_type_code"]

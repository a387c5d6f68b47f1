"""Per-meter execution of accepted commands: control frame, retries, read-back verification.

One execution at a time per meter (a meter's queue is worked by one task; a second command for a
busy meter waits, it is not rejected); different meters run concurrently and their bus's
priority gate puts every command frame ahead of queued polls.

Life of a relay command on one meter (docs/commands.md has the diagram)::

    queued -> [read relay first: keep-power? -> meter_refused "keep_power", nothing sent]
           -> sent -> meter_acknowledged | no_answer (-> sent again, up to commands.retry,
              with backoff, never after expires_at) | meter_refused (final)
           -> read the relay back until it is in the wanted state or commands.verify_window
              passes -> verified | unverified
              (no frame acknowledged and the read-back answers with no sign of the command:
              the frames never reached the meter, so one more round of sends, then read again)

Every step is an event that the store moves through the lifecycle table (states.py) and persists
first (state + ack in one transaction), then audited and published by the service's recorder. A
crash leaves the last persisted state; on restart an execution that may have sent a frame is
resumed by reading the relay first: already in the wanted state -> verified; expired -> expired;
else the frame is sent again (counted as a retry). The relay operations are idempotent, so a
repeated frame is harmless; a blind re-send after expiry is what must never happen.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from meter_gateway.drivers import registry
from meter_gateway.drivers.backoff import Backoff, BackoffPolicy
from meter_gateway.drivers.log_limit import logfmt_value
from meter_gateway.drivers.reading import Reading
from meter_gateway.gateway.commands.actuators import (
    RELAY_ACTIONS,
    VALVE_ACTIONS,
    ActuatorError,
    MeterActuator,
    RelayReading,
    ValveActuator,
    ValveReading,
)
from meter_gateway.gateway.commands.envelope import Ack, RelayState
from meter_gateway.gateway.commands.states import RESULTS, TERMINAL, CommandEvent, CommandState
from meter_gateway.gateway.store.commands import CommandStore, Execution, Transition

__all__ = ["RESULT_STATES", "CommandStats", "ExecSettings", "Executor", "Recorder", "wanted_relay"]

E = CommandEvent

log = logging.getLogger(__name__)

# A meter clock this close to ours after a time sync counts as set (whole-second resolution on
# the wire plus one exchange's latency).
CLOCK_TOLERANCE: Final = 2.0
# Protocol families (an actuator's ``protocol``) whose meters arm a close permit or hold keep-power,
# as the registry says (drivers/registry.py capabilities, not protocol names).
_CLOSE_PERMIT_FAMILIES: Final = frozenset(
    p.family for p in registry.PROTOCOLS.values() if registry.Can.CLOSE_PERMIT in p.can
)
_KEEP_POWER_FAMILIES: Final = frozenset(
    p.family for p in registry.PROTOCOLS.values() if registry.Can.KEEP_POWER in p.can
)
# The keep-power setting each keep-power action must read back (status word 3).
_KEEP_POWER: Final = {"keep_power_on": True, "keep_power_off": False}

Recorder = Callable[[Sequence[Transition]], list[Ack]]
CommitReadings = Callable[[list[Reading]], Awaitable[None]]
Outcome = Literal["acknowledged", "refused", "no_answer", "expired"]
# terminal states that end an execution that was accepted (``rejected`` is counted by reason)
RESULT_STATES: Final = RESULTS


@dataclass
class CommandStats:
    """Plain counters (metrics, status.json). See docs/commands.md "Metrics"."""

    received: int = 0
    accepted: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # by reason
    duplicates: int = 0
    executed: dict[str, int] = field(default_factory=dict)  # executions started, by action
    verified: int = 0
    unverified: int = 0
    meter_refused: int = 0
    no_answer: int = 0  # control attempts without an answer
    retries: int = 0  # control frames sent again (after no answer, or after a restart)
    expired: int = 0
    resumed: int = 0  # executions picked up again after a restart
    held_now: int = 0  # meters currently held by the guard
    released: int = 0
    acks_published: int = 0
    acks_pending: int = 0
    guard_tripped: int = 0
    internal_errors: int = 0
    # terminal results by action, then result (the disconnect/reconnect success-rate KPI needs
    # them apart from relay_status, read_now...); "unknown" when the action could not be found
    results: dict[str, dict[str, int]] = field(default_factory=dict)

    def reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def count_state(self, state: CommandState, action: str | None = None) -> None:
        if state not in RESULTS:
            return
        name = CommandState(state).value  # the counter and the metric label are the wire string
        setattr(self, name, getattr(self, name) + 1)
        by_result = self.results.setdefault(action or "unknown", {})
        by_result[name] = by_result.get(name, 0) + 1


@dataclass(frozen=True, slots=True)
class ExecSettings:
    retry: int = 3  # control attempts per execution (commands.retry)
    verify_window: float = 30.0  # seconds to read the relay back (commands.verify_window)
    retry_backoff: BackoffPolicy = field(default_factory=lambda: BackoffPolicy(initial=0.2, maximum=2.0))
    verify_backoff: BackoffPolicy = field(default_factory=lambda: BackoffPolicy(initial=0.05, maximum=1.0, jitter=0.0))


def wanted_relay(action: str, mode: str | None, protocol: str) -> frozenset[str]:
    """Relay states that verify a relay action. A close permit is done when the relay is armed
    (the customer's button closes it) or already closed; Modbus relays close directly."""
    if action == "disconnect":
        return frozenset({"open"})
    if mode == "close_permit" and protocol in _CLOSE_PERMIT_FAMILIES:
        return frozenset({"armed", "closed"})
    return frozenset({"closed"})


def _untouched(action: str, reading: RelayReading) -> bool:
    """The meter shows no sign of this relay command: neither its relay nor (DL/T 645, status word
    3 bit 6) its relay command state moved, so no control frame reached it. A trip it holds (a
    delayed trip) or a close permit it armed is a frame that arrived."""
    if action == "disconnect":
        return reading.state != "open" and not reading.trip_pending
    return reading.state == "open"


def _relay_detail(reading: RelayReading) -> str:
    if reading.state == "armed":
        return "close permit; relay armed (closes on the customer's button)"
    return f"relay {reading.state}"


def _valve_detail(reading: ValveReading) -> str:
    battery = "; battery low" if reading.battery_low else ""
    raw = f" (ST {reading.raw:04X})" if reading.raw is not None else ""
    return f"valve {reading.state}{raw}{battery}"


class Executor:
    """Runs executions, one at a time per meter. ``submit`` is cheap; ``close`` cancels workers
    (their state stays persisted and is resumed at the next start)."""

    def __init__(
        self,
        store: CommandStore,
        record: Recorder,
        actuator_for: Callable[[str], MeterActuator | None],
        settings: ExecSettings,
        stats: CommandStats,
        *,
        clock: Callable[[], float] = time.time,
        commit_readings: CommitReadings | None = None,
    ) -> None:
        self.store = store
        self.record = record
        self.actuator_for = actuator_for
        self.settings = settings
        self.stats = stats
        self.clock = clock
        self.commit_readings = commit_readings
        self._queues: dict[str, deque[tuple[str, bool]]] = {}
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._running: set[tuple[str, str]] = set()
        # How each action runs: a new action adds its row here (and its actuator support), not a branch.
        self._runners: dict[str, Callable[[Execution, MeterActuator], Awaitable[None]]] = {
            **dict.fromkeys(RELAY_ACTIONS, self._relay),
            **dict.fromkeys(VALVE_ACTIONS, self._valve),
            **dict.fromkeys((*_KEEP_POWER, "alarm_on", "alarm_off"), self._setting),
            "relay_status": self._relay_status,
            "read_now": self._read_now,
            "time_sync": self._time_sync,
        }

    # -- queueing ---------------------------------------------------------------------------------

    def submit(self, exe: Execution, *, resume: bool = False) -> None:
        """Queue ``exe`` on its meter (``resume``: it may have sent a frame before a restart)."""
        self._queues.setdefault(exe.meter, deque()).append((exe.command, resume))
        if exe.meter not in self._workers:
            self._workers[exe.meter] = asyncio.create_task(self._work(exe.meter), name=f"command-{exe.meter}")

    def running(self, command: str, meter: str) -> bool:
        return (command, meter) in self._running

    @property
    def idle(self) -> bool:
        return not self._workers

    async def wait_idle(self) -> None:
        while self._workers:
            await asyncio.gather(*list(self._workers.values()), return_exceptions=True)

    async def close(self) -> None:
        workers = list(self._workers.values())
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        self._queues.clear()

    async def _work(self, meter: str) -> None:
        queue = self._queues[meter]
        try:
            while queue:
                command, resume = queue.popleft()
                self._running.add((command, meter))
                try:
                    await self._execute(command, meter, resume=resume)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # a bug must not leave the meter's queue dead or the ack missing
                    self.stats.internal_errors += 1
                    log.exception(
                        "event=command_crashed command=%s meter=%s", logfmt_value(command), logfmt_value(meter)
                    )
                    self._fail(command, meter, exc)
                finally:
                    self._running.discard((command, meter))
        finally:
            self._workers.pop(meter, None)
            if not queue:
                self._queues.pop(meter, None)

    # -- one execution ----------------------------------------------------------------------------

    def _step(
        self,
        exe: Execution,
        event: CommandEvent,
        *,
        relay: RelayState | None = None,
        reason: str | None = None,
        detail: str | None = None,
        attempts: int | None = None,
        sent: bool | None = None,
    ) -> None:
        """Record what happened; the store moves the stored state through the lifecycle table."""
        t = Transition(
            exe.command, exe.meter, event, relay=relay, reason=reason, detail=detail, attempts=attempts, sent=sent
        )
        self.record([t])

    def _fail(self, command: str, meter: str, exc: Exception) -> None:
        """End an execution that a bug interrupted, unless it had already ended."""
        try:
            exe = self.store.execution(command, meter)
            if exe is not None and exe.state not in TERMINAL:
                self._step(exe, E.FAIL, detail=f"internal error: {type(exc).__name__}")
        except Exception:  # the store itself fails (disk full): the state stays as persisted
            log.exception(
                "event=command_state_unrecorded command=%s meter=%s", logfmt_value(command), logfmt_value(meter)
            )

    async def _execute(self, command: str, meter: str, *, resume: bool) -> None:
        exe = self.store.execution(command, meter)  # the stored state wins over what was queued
        if exe is None or exe.terminal or exe.state is CommandState.HELD:
            return
        actuator = self.actuator_for(meter)
        if actuator is None:
            self._step(exe, E.REJECT, reason="unknown_meter", detail="meter no longer configured")
            return
        run = self._runners.get(exe.action)
        why = f"action {exe.action} runs on no meter" if run is None else actuator.unsupported(exe.action)
        if why is None and exe.apdu is not None and not _takes_apdu(actuator):
            why = f"params.apdu is for DL/T 698.45 pass-through meters; {meter} is {actuator.protocol}"
        if why is not None or run is None:
            self._step(exe, E.REJECT, reason="unsupported", detail=why)
            return
        if resume and exe.state is not CommandState.QUEUED:
            self.stats.resumed += 1
            if await self._resume(exe, actuator):
                return
        elif self.clock() >= exe.expires_at:
            self._step(exe, E.EXPIRE, detail="expired before the meter was started")
            return
        self.stats.executed[exe.action] = self.stats.executed.get(exe.action, 0) + 1
        await run(exe, actuator)

    async def _resume(self, exe: Execution, actuator: MeterActuator) -> bool:
        """After a restart: read the relay before anything else. True when that settled it.
        (A valve action reads its valve first itself, in :meth:`_valve`.)"""
        reading = None if exe.action in VALVE_ACTIONS else await self._read(actuator)
        wanted = wanted_relay(exe.action, exe.mode, actuator.protocol)
        if exe.action in RELAY_ACTIONS and reading is not None and reading.state in wanted:
            detail = f"{_relay_detail(reading)} (found after a restart)"
            self._step(exe, E.CONFIRM, relay=reading.state, detail=detail)
            return True
        if self.clock() >= exe.expires_at:
            relay = reading.state if reading is not None else None
            self._step(exe, E.EXPIRE, relay=relay, detail="expired while the gateway was down; not sent again")
            return True
        return False

    async def _read(self, actuator: MeterActuator) -> RelayReading | None:
        try:
            return await actuator.read_relay()
        except ActuatorError as exc:
            log.info(
                "event=relay_read_failed meter=%s error=%s", logfmt_value(actuator.meter_id), logfmt_value(exc.detail)
            )
            return None

    async def _control(self, exe: Execution, actuator: MeterActuator) -> Outcome:
        """Send the control frame up to ``retry`` times while it gets no answer and the command
        has not expired; each attempt is acked as ``sent``."""
        attempts = exe.attempts
        backoff = Backoff(self.settings.retry_backoff)
        for i in range(self.settings.retry):
            if self.clock() >= exe.expires_at:
                if attempts == 0:
                    self._step(exe, E.EXPIRE, detail="expired before the meter was started")
                    return "expired"
                return "no_answer"  # expired between retries: go on to verify what happened
            if attempts > 0:
                self.stats.retries += 1
            attempts += 1
            self._step(exe, E.SEND, attempts=attempts, sent=True, detail=f"attempt {attempts}")
            try:
                if exe.apdu is None:
                    await actuator.control(exe.action, exe.mode, exe.expires_at)
                else:  # only actuators that take one get here (checked in _execute)
                    await actuator.control(exe.action, exe.mode, exe.expires_at, apdu=exe.apdu)
            except ActuatorError as exc:
                if exc.kind == "meter_refused":
                    self._step(exe, E.REFUSE, reason=exc.reason, detail=exc.detail)
                    return "refused"
                if exc.kind == "unsupported":
                    self._step(exe, E.REJECT, reason="unsupported", detail=exc.detail)
                    return "refused"
                self.stats.no_answer += 1
                self._step(exe, E.NO_REPLY, reason=exc.reason, detail=exc.detail)
                if i + 1 < self.settings.retry:
                    left = exe.expires_at - self.clock()
                    await asyncio.sleep(max(0.0, min(backoff.next(), left)))
                continue
            self._step(exe, E.ACKNOWLEDGE)
            return "acknowledged"
        return "no_answer"

    async def _relay(self, exe: Execution, actuator: MeterActuator) -> None:
        keep_power_check = exe.action == "disconnect" and actuator.protocol in _KEEP_POWER_FAMILIES
        # After a command store reset this command may already have run: look first, and do not
        # operate a relay that is already where it should be (store.py "reset_caution").
        after_reset = self.store.reset_caution
        if keep_power_check or after_reset:
            # Never trip a keep-power meter (hospital, life support): look before sending. If the
            # read fails we still send: the meter itself refuses a trip under keep-power.
            before = await self._read(actuator)
            if keep_power_check and before is not None and before.keep_power:
                self._step(
                    exe,
                    E.REFUSE,
                    reason="keep_power",
                    relay=before.state,
                    detail="keep-power is on; no trip sent",
                )
                return
            wanted = wanted_relay(exe.action, exe.mode, actuator.protocol)
            if after_reset and before is not None and before.state in wanted:
                detail = f"{_relay_detail(before)} already; nothing sent (read first after a command store reset)"
                self._step(exe, E.CONFIRM, relay=before.state, detail=detail)
                return
        outcome = await self._control(exe, actuator)
        if outcome in ("refused", "expired"):
            return
        await self._verify(exe, actuator, wanted_relay(exe.action, exe.mode, actuator.protocol), outcome)

    async def _verify(self, exe: Execution, actuator: MeterActuator, wanted: frozenset[str], outcome: Outcome) -> None:
        """Read the relay until it is in a wanted state or the window passes. A delayed trip or a
        slow motorised breaker reaches the state within the window; a stuck relay never does.

        If no control frame was acknowledged and a read-back answers showing no sign of the
        command (:func:`_untouched`), the frames were lost on the way to the meter (it answers
        now, and has not acted): the control frame goes again, once per execution, with the same
        retries and never after expiry, rather than polling an unmoved relay for the whole window."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.verify_window
        interval = Backoff(self.settings.verify_backoff)
        last: RelayReading | None = None
        resent = False
        while True:
            reading = await self._read(actuator)
            if reading is not None:
                last = reading
                if reading.state in wanted:
                    self._step(exe, E.CONFIRM, relay=reading.state, detail=_relay_detail(reading))
                    return
                if (
                    outcome == "no_answer"
                    and not resent
                    and _untouched(exe.action, reading)
                    and self.clock() < exe.expires_at
                ):
                    resent = True
                    log.info(
                        "event=control_resent command=%s meter=%s relay=%s reason=no_control_frame_acknowledged",
                        logfmt_value(exe.command),
                        logfmt_value(exe.meter),
                        reading.state,
                    )
                    current = self.store.execution(exe.command, exe.meter) or exe  # its attempts so far
                    outcome = await self._control(current, actuator)
                    if outcome in ("refused", "expired"):
                        return  # _control recorded the end
                    if outcome == "acknowledged":  # a slow breaker gets the whole window again
                        deadline = loop.time() + self.settings.verify_window
                        interval = Backoff(self.settings.verify_backoff)
                    continue
            left = deadline - loop.time()
            if left <= 0:
                break
            await asyncio.sleep(min(interval.next(), left))
        window = f"{self.settings.verify_window:g} s"
        if last is None:
            detail = f"no answer to the relay read-back within {window}"
        else:
            detail = f"relay {last.state} after {window}, wanted {' or '.join(sorted(wanted))}"
        if outcome == "no_answer":
            detail += "; the control frame was never acknowledged"
        self._step(exe, E.GIVE_UP, relay=last.state if last else None, detail=detail)

    async def _read_valve(self, actuator: ValveActuator) -> ValveReading | None:
        try:
            return await actuator.read_valve()
        except ActuatorError as exc:
            log.info(
                "event=valve_read_failed meter=%s error=%s", logfmt_value(actuator.meter_id), logfmt_value(exc.detail)
            )
            return None

    async def _valve(self, exe: Execution, actuator: MeterActuator) -> None:
        """Valve close/open: one valve command per attempt, then the valve read back until it is
        where it should be or ``verify_window`` passes. A valve the meter reports abnormal
        (jammed, motor fault) ends at once with reason ``valve_abnormal``: waiting cannot fix it.
        After a restart or a command store reset the valve is looked at first, and a valve
        already where it should be is not operated."""
        if not isinstance(actuator, ValveActuator):
            self._step(exe, E.REJECT, reason="unsupported", detail=f"meter {exe.meter} has no valve")
            return
        wanted = "open" if VALVE_ACTIONS[exe.action] else "closed"
        if self.store.reset_caution or exe.attempts > 0:
            before = await self._read_valve(actuator)
            if before is not None and before.state == wanted:
                self._step(exe, E.CONFIRM, detail=f"{_valve_detail(before)} already; nothing sent")
                return
        outcome = await self._control(exe, actuator)
        if outcome in ("refused", "expired"):
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.verify_window
        interval = Backoff(self.settings.verify_backoff)
        last: ValveReading | None = None
        while True:
            reading = await self._read_valve(actuator)
            if reading is not None:
                last = reading
                if reading.state == wanted:
                    self._step(exe, E.CONFIRM, detail=_valve_detail(reading))
                    return
                if reading.state == "abnormal":
                    self._step(exe, E.GIVE_UP, reason="valve_abnormal", detail=f"read back: {_valve_detail(reading)}")
                    return
            left = deadline - loop.time()
            if left <= 0:
                break
            await asyncio.sleep(min(interval.next(), left))
        window = f"{self.settings.verify_window:g} s"
        if last is None:
            detail = f"no answer to the valve read-back within {window}"
        else:
            detail = f"{_valve_detail(last)} after {window}, wanted {wanted}"
        if outcome == "no_answer":
            detail += "; the valve command was never acknowledged"
        self._step(exe, E.GIVE_UP, detail=detail)

    async def _setting(self, exe: Execution, actuator: MeterActuator) -> None:
        """Keep-power and alarm: one control frame; keep-power is verified from status word 3."""
        outcome = await self._control(exe, actuator)
        if outcome in ("refused", "expired"):
            return
        want = _KEEP_POWER.get(exe.action)
        if want is not None:
            reading = await self._read(actuator)
            if reading is not None and reading.keep_power == want:
                self._step(exe, E.CONFIRM, relay=reading.state, detail=f"keep-power {'on' if want else 'off'}")
                return
            seen = "no answer" if reading is None else f"keep-power {'on' if reading.keep_power else 'off'}"
            self._step(exe, E.GIVE_UP, relay=reading.state if reading else None, detail=f"read back: {seen}")
            return
        if outcome == "acknowledged":
            self._step(exe, E.CONFIRM, detail="meter acknowledged the alarm command")
        else:
            self._step(exe, E.GIVE_UP, detail="the meter never acknowledged the alarm command")

    async def _once(self, exe: Execution, call: Callable[[], Awaitable[object]]) -> object | None:
        """A read-type action with the same retry rules as a control frame; None when it failed
        (the terminal ack has then been recorded)."""
        attempts = exe.attempts
        backoff = Backoff(self.settings.retry_backoff)
        last = "no answer"
        for i in range(self.settings.retry):
            if self.clock() >= exe.expires_at:
                break
            if attempts > 0:
                self.stats.retries += 1
            attempts += 1
            self._step(exe, E.SEND, attempts=attempts, sent=True, detail=f"attempt {attempts}")
            try:
                return await call()
            except ActuatorError as exc:
                if exc.kind == "meter_refused":
                    self._step(exe, E.REFUSE, reason=exc.reason, detail=exc.detail)
                    return None
                if exc.kind == "unsupported":
                    self._step(exe, E.REJECT, reason="unsupported", detail=exc.detail)
                    return None
                self.stats.no_answer += 1
                last = exc.detail
                self._step(exe, E.NO_REPLY, reason=exc.reason, detail=exc.detail)
                if i + 1 < self.settings.retry:
                    await asyncio.sleep(max(0.0, min(backoff.next(), exe.expires_at - self.clock())))
        if attempts == exe.attempts:
            self._step(exe, E.EXPIRE, detail="expired before the meter was started")
        else:
            self._step(exe, E.GIVE_UP, detail=f"no result: {last}")
        return None

    async def _relay_status(self, exe: Execution, actuator: MeterActuator) -> None:
        result = await self._once(exe, actuator.read_relay)
        if isinstance(result, RelayReading):
            keep = "; keep-power on" if result.keep_power else ""
            self._step(exe, E.CONFIRM, relay=result.state, detail=_relay_detail(result) + keep)

    async def _read_now(self, exe: Execution, actuator: MeterActuator) -> None:
        result = await self._once(exe, lambda: actuator.read_now(exe.quantities, self.clock()))
        if not isinstance(result, list):
            return
        readings: list[Reading] = result
        committed = ""
        if self.commit_readings is not None and readings:
            await self.commit_readings(readings)
            committed = "; committed to the outbox"
        asked = f" of {len(exe.quantities)}" if exe.quantities else ""
        self._step(exe, E.CONFIRM, detail=f"read {len(readings)}{asked} quantities{committed}")

    async def _time_sync(self, exe: Execution, actuator: MeterActuator) -> None:
        result = await self._once(exe, lambda: actuator.time_sync(self.clock()))
        if not isinstance(result, float):
            return
        if abs(result) <= CLOCK_TOLERANCE:
            self._step(exe, E.CONFIRM, detail=f"meter clock set; {result:+.1f} s off after")
        else:
            self._step(exe, E.GIVE_UP, detail=f"meter clock still {result:+.1f} s off after the sync")


def _takes_apdu(actuator: MeterActuator) -> bool:
    """Whether the actuator's control accepts a head-end APDU (``apdu=``; DL/T 698.45's does)."""
    return "apdu" in inspect.signature(actuator.control).parameters

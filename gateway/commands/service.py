"""The command service: what the daemon runs for remote control (docs/mqtt.md "Commands and
acknowledgements", /work/specs/commands_api.md, docs/commands.md for operators).

``on_message`` is the uplink's command hook and must stay quick: it authenticates, checks replay,
persists the acceptance and queues the executions; it never waits for a meter. ``run`` publishes
acks (re-publishing until a success PUBACK; unpublished acks survive a restart), expires held and
queued executions, prunes the store, and on start resumes executions a crash interrupted.

Every message is answered: a rejection (authentication, ``replayed``, ``unknown_meter``...) is
acked, counted, audited and logged as one line, and nothing reaches a meter. Meter passwords and
operator codes never enter acks, logs or the audit log (they stay inside the drivers).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

from meter_gateway.drivers import registry
from meter_gateway.drivers.backoff import Backoff, BackoffPolicy
from meter_gateway.drivers.bus import Bus
from meter_gateway.drivers.log_limit import log_limited, logfmt_value
from meter_gateway.gateway.commands.actuators import CONTROL_ACTIONS, MeterActuator, make_actuator
from meter_gateway.gateway.commands.auth import CommandRejected, KeyRing, authenticate
from meter_gateway.gateway.commands.envelope import Ack, CommandEnvelope, canonical_bytes, decode_envelope
from meter_gateway.gateway.commands.executor import CommandStats, CommitReadings, ExecSettings, Executor
from meter_gateway.gateway.commands.guard import GUARD_REASON, GUARDED_ACTIONS, MassDisconnectGuard
from meter_gateway.gateway.commands.states import ACTIVE, CommandEvent, CommandState, IllegalTransition
from meter_gateway.gateway.config import Config, Meter
from meter_gateway.gateway.store.audit import AuditEntry, AuditError, AuditLog
from meter_gateway.gateway.store.commands import CommandStore, MeterPlan, StoreError, Transition
from meter_gateway.gateway.uplink.contract import ContractError

if TYPE_CHECKING:
    from meter_gateway.gateway.daemon.meters import MeterRuntime
    from meter_gateway.gateway.uplink.session import InboundMessage

__all__ = ["CommandService", "CommandStats"]

log = logging.getLogger(__name__)

# Refused before the signature was checked: anyone could have sent it, so it must not speak for
# an accepted command of the same id (see _reject).
UNAUTHENTICATED: Final = frozenset({"retained", "malformed", "unsigned", "unknown_key", "bad_signature"})
SWEEP_INTERVAL: Final = 0.25  # seconds between expiry checks of held and queued executions
PRUNE_INTERVAL: Final = 3600.0
ACK_BATCH: Final = 64

Publish = Callable[[str, bytes], Awaitable[bool]]

E = CommandEvent


class CommandService:
    """See the module docstring and /work/specs/commands_api.md."""

    def __init__(
        self,
        config: Config,
        meters: Mapping[str, MeterRuntime],
        buses: Mapping[str, Bus],
        publish: Publish,
        ack_topic: str,
        *,
        clock: Callable[[], float] = time.time,
        commit_readings: CommitReadings | None = None,
        publish_concurrency: int = 8,
        publish_backoff: BackoffPolicy | None = None,
        on_verified: Callable[[str, float], None] | None = None,
    ) -> None:
        self._publish = publish
        self._ack_topic = ack_topic
        self._clock = clock
        self._commit_readings = commit_readings
        self._publish_sem = asyncio.Semaphore(max(1, publish_concurrency))
        self._publish_backoff = publish_backoff or BackoffPolicy(initial=0.2, maximum=5.0)
        self._stats = CommandStats()
        self._store: CommandStore | None = None
        self._audit: AuditLog | None = None
        self._executor: Executor | None = None
        self._guard: MassDisconnectGuard | None = None
        self._wake = asyncio.Event()
        self._stopped = False
        self._meta: dict[str, tuple[str, str]] = {}  # command id -> (key id, action), for the audit
        # (action, seconds from an execution's first control frame to "verified"): the metrics' histogram
        self._on_verified = on_verified
        self._first_sent: dict[tuple[str | None, str], float] = {}
        self._apply_config(config, meters, buses)

    # -- configuration ----------------------------------------------------------------------------

    def _apply_config(self, config: Config, meters: Mapping[str, MeterRuntime], buses: Mapping[str, Bus]) -> None:
        self.config = config
        section = config.commands
        try:
            self._keyring = KeyRing.from_config(section.keys)
        except ValueError as exc:  # the config loader checks keys; this only guards hand-made configs
            log.error("event=command_keys_unusable effect=every_command_rejected error=%s", logfmt_value(exc))  # noqa: TRY400 - one line
            self._keyring = KeyRing()
        self._meters_cfg: dict[str, Meter] = {m.id: m for m in config.meters}
        actuators: dict[str, MeterActuator] = {}
        self._protocols: dict[str, str] = {meter_id: runtime.protocol for meter_id, runtime in meters.items()}
        for meter_id, runtime in meters.items():
            try:
                actuators[meter_id] = make_actuator(runtime.driver, buses.get(runtime.bus), protocol=runtime.protocol)
            except Exception as exc:  # one broken meter must not take remote control down
                log.error("event=meter_not_controllable meter=%s error=%s", logfmt_value(meter_id), logfmt_value(exc))  # noqa: TRY400
        self._actuators = actuators
        self._settings = ExecSettings(retry=section.retry, verify_window=float(section.verify_window))
        if self._executor is not None:
            self._executor.settings = self._settings
        if self._guard is not None:
            self._guard.update(section.max_disconnects, float(section.guard_window))

    def _actuator_for(self, meter_id: str) -> MeterActuator | None:
        # looked up at each execution, so a reload's new meters and drivers are seen
        return self._actuators.get(meter_id)

    def update(self, config: Config, meters: Mapping[str, MeterRuntime], buses: Mapping[str, Bus]) -> None:
        """After a reload: new meters, drivers, keys and limits. Running executions keep the
        driver they started with."""
        self._apply_config(config, meters, buses)

    @property
    def stats(self) -> CommandStats:
        s = self._stats
        if self._store is not None:
            s.held_now = self._store.count_state(CommandState.HELD)
            s.acks_pending = self._store.pending_count()
        if self._guard is not None:
            s.guard_tripped = self._guard.tripped
            s.released = self._guard.released
        return s

    # -- opening and resuming ---------------------------------------------------------------------

    def _paths(self) -> tuple[Path, Path]:
        section, state = self.config.commands, Path(self.config.gateway.state_dir)
        return (
            Path(section.store_path or state / "commands.sqlite"),
            Path(section.audit_path or state / "audit.sqlite"),
        )

    def _open(self) -> tuple[CommandStore, Executor, MassDisconnectGuard]:
        """Open store and audit log on first use (a command may arrive before ``run``) and resume
        interrupted executions."""
        if self._store is not None and self._executor is not None and self._guard is not None:
            return self._store, self._executor, self._guard
        store_path, audit_path = self._paths()
        store = CommandStore.open(store_path, self.config.gateway.id)
        try:
            self._audit = AuditLog.open(audit_path)
        except AuditError:
            store.close()
            raise
        self._store = store
        section = self.config.commands
        self._guard = MassDisconnectGuard(store, section.max_disconnects, float(section.guard_window), self._clock)
        self._executor = Executor(
            store,
            self._record,
            self._actuator_for,
            self._settings,
            self._stats,
            clock=self._clock,
            commit_readings=self._commit_readings,
        )
        resumed = store.executions(states=ACTIVE)
        for exe in resumed:
            self._executor.submit(exe, resume=True)
        if resumed:
            log.warning("event=commands_resumed count=%d cause=restart first=relay_read", len(resumed))
        self._wake.set()
        return store, self._executor, self._guard

    # -- the hook ---------------------------------------------------------------------------------

    async def on_message(self, msg: InboundMessage) -> None:
        """The uplink's command hook: quick, never raises, never waits for a meter."""
        self._stats.received += 1
        if self._stopped:
            log.warning("event=command_ignored topic=%s reason=service_stopped", logfmt_value(msg.topic))
            return
        try:
            self._handle(msg.payload, retained=msg.retained)
        except Exception:  # malformed input is handled above; this is a bug or a broken disk
            self._stats.internal_errors += 1
            log.exception("event=command_message_failed topic=%s", logfmt_value(msg.topic))

    def _handle(self, payload: bytes, *, retained: bool) -> None:
        store, _, _ = self._open()
        now = self._clock()
        try:
            env = authenticate(
                payload,
                retained=retained,
                gateway_id=self.config.gateway.id,
                keyring=self._keyring,
                now=now,
                max_validity=float(self.config.commands.max_validity),
            )
        except CommandRejected as rejected:
            self._reject(payload, rejected, now)
            return
        if store.known(env.id):
            self._duplicate(env, now)
            return
        last = store.last_seq(env.key_id)
        if last is not None and env.seq <= last:
            detail = f"seq {env.seq} of key {env.key_id!r} is not above the last accepted {last}"
            self._rejected(env.id, "replayed", detail, now, actor=env.key_id, action=env.action)
            return
        if env.action == "release":
            self._release(env, now)
        else:
            self._accept(env, now)

    # -- rejections and duplicates ---------------------------------------------------------------

    def _reject(self, payload: bytes, rejected: CommandRejected, now: float) -> None:
        store = self._require_store()
        cid, reason, detail = rejected.command_id, rejected.reason, rejected.detail
        env = None
        if reason not in UNAUTHENTICATED:
            with contextlib.suppress(ContractError):
                env = decode_envelope(payload)
        if cid is not None and store.known(cid):
            if env is not None:
                # A genuine re-delivery that arrives too late (expired) or otherwise refused: the
                # command already ran or runs; answer with its current state, as for a duplicate.
                self._duplicate(env, now, refused=f"{reason}: {detail}")
                return
            # Anyone can put a known id into a garbled message: acking "rejected" under that id
            # would tell the head-end its accepted command was refused. Ack it without the id.
            detail = f"message claiming accepted command {cid} refused ({detail}); that command is unaffected"
            cid = None
        self._rejected(cid, reason, detail, now, actor=env.key_id if env else None, action=env.action if env else None)

    def _rejected(
        self, cid: str | None, reason: str, detail: str, now: float, *, actor: str | None, action: str | None
    ) -> None:
        acks = self._require_store().reject(cid, now, reason, detail)
        # every rejection is audited, acknowledged and counted; the log gets one line per reason
        # and minute, so a flood of forged or garbled messages cannot flood it
        log_limited(
            log,
            logging.WARNING,
            f"command_rejected:{reason}",
            "event=command_rejected command=%s reason=%s detail=%s",
            logfmt_value(cid or "-"),
            logfmt_value(reason),
            logfmt_value(detail),
        )
        self._after(acks, actor=actor, action=action)

    def _duplicate(self, env: CommandEnvelope, now: float, *, refused: str | None = None) -> None:
        store = self._require_store()
        same = store.canonical(env.id) == canonical_bytes(env)
        payloads = store.current_acks(env.id)
        store.requeue(payloads)
        self._stats.duplicates += 1
        note = "re-delivered; current state re-sent, not executed again"
        if not same:
            note += "; the message differs from the accepted command with this id"
        if refused is not None:
            note += f"; this delivery was refused ({refused})"
        log.info("event=command_note command=%s note=%s", logfmt_value(env.id), logfmt_value(note))
        self._audit_entries([AuditEntry(at=now, state="duplicate", actor=env.key_id, command=env.id, detail=note)])
        self._wake.set()

    # -- acceptance -------------------------------------------------------------------------------

    def _unsupported(self, meter_id: str, action: str) -> str | None:
        actuator = self._actuators[meter_id]
        why = actuator.unsupported(action)
        if why is None and action in CONTROL_ACTIONS and self._needs_password(meter_id):
            cfg = self._meters_cfg.get(meter_id)
            if cfg is None or cfg.credentials is None or cfg.credentials.password is None:
                why = "no meter password configured (credentials) for remote control"
        return why

    def _needs_password(self, meter_id: str) -> bool:
        """Whether the meter's control frames carry its password (the registry says per protocol)."""
        info = registry.PROTOCOLS.get(self._protocols.get(meter_id, ""))
        return info is not None and info.control_password

    def _plans(self, env: CommandEnvelope, now: float, guard: MassDisconnectGuard) -> list[MeterPlan]:
        plans: dict[str, MeterPlan] = {}
        runnable: list[str] = []
        for meter in env.meters:
            if meter not in self._actuators:
                plans[meter] = MeterPlan(meter, E.REJECT, reason="unknown_meter", detail="not a meter of this gateway")
                continue
            why = self._unsupported(meter, env.action)
            if why is not None:
                plans[meter] = MeterPlan(meter, E.REJECT, reason="unsupported", detail=why)
                continue
            runnable.append(meter)
        mode = env.reconnect_mode
        held: set[str] = set()
        if env.action in GUARDED_ACTIONS:
            decision = guard.decide(runnable, now, env.id)
            held = set(decision.held)
        for meter in runnable:
            cfg = self._meters_cfg.get(meter)
            meter_mode = (mode or (cfg.reconnect if cfg else "close_permit")) if env.action == "reconnect" else None
            if meter in held:
                limit = f"{guard.max_disconnects} per {guard.window:g} s"
                detail = f"more than {limit}; waits for a release (role release) until it expires"
                plans[meter] = MeterPlan(meter, E.HOLD, reason=GUARD_REASON, detail=detail)
            else:
                plans[meter] = MeterPlan(meter, E.ADMIT, mode=meter_mode, guarded=env.action in GUARDED_ACTIONS)
        return [plans[m] for m in env.meters]

    def _accept(self, env: CommandEnvelope, now: float) -> None:
        store, executor, guard = self._open()
        acks = store.accept(env, now, self._plans(env, now, guard))
        self._meta[env.id] = (env.key_id, env.action)
        self._after(acks, actor=env.key_id, action=env.action)
        for exe in store.executions(command=env.id, states=(CommandState.QUEUED,)):
            executor.submit(exe)

    def _release(self, env: CommandEnvelope, now: float) -> None:
        """A release names held commands (and optionally meters); their held meters run now
        (or expire). The release command's own result is per listed meter, or for the whole
        command when it lists none."""
        store, executor, guard = self._open()
        wanted = set(env.meters)
        held = [
            e
            for cid in env.released_commands
            for e in store.executions(command=cid, states=(CommandState.HELD,))
            if not wanted or e.meter in wanted
        ]
        transitions = guard.release(held, now, detail=f"released by {env.id} (key {env.key_id})")
        outcome = {t.meter: t.event for t in transitions}
        plans = []
        for m in env.meters:
            if outcome.get(m) is E.RELEASE:
                plans.append(MeterPlan(m, E.CONFIRM, detail="released"))
            elif outcome.get(m) is E.EXPIRE:
                plans.append(MeterPlan(m, E.REJECT, reason="expired", detail="the held command had expired"))
            else:
                plans.append(MeterPlan(m, E.REJECT, reason="not_held", detail="not held by the listed commands"))
        queued = sum(t.event is E.RELEASE for t in transitions)
        expired = len(transitions) - queued
        summary = f"released {queued} held meter(s), {expired} expired, of {', '.join(env.released_commands)}"
        then = list(transitions)
        if not env.meters:
            result = E.CONFIRM if transitions else E.GIVE_UP
            then.append(Transition(env.id, None, result, detail=summary if transitions else "nothing held matched"))
        acks = store.accept(env, now, plans, then)
        self._meta[env.id] = (env.key_id, env.action)
        log.warning(
            "event=release command=%s key_id=%s summary=%s",
            logfmt_value(env.id),
            logfmt_value(env.key_id),
            logfmt_value(summary),
        )
        self._after(acks, actor=env.key_id, action=env.action)
        guard.settle()
        for t in transitions:
            if t.event is E.RELEASE and t.meter is not None:
                exe = store.execution(t.command, t.meter)
                if exe is not None:
                    executor.submit(exe)

    # -- recording transitions --------------------------------------------------------------------

    def _require_store(self) -> CommandStore:
        if self._store is None:
            raise StoreError("command store not open")
        return self._store

    def _record(self, transitions: Sequence[Transition]) -> list[Ack]:
        """The executor's recorder: persist (state + ack), then audit, count and wake the publisher."""
        acks = self._require_store().apply(transitions, self._clock())
        self._after(acks)
        return acks

    def _command_meta(self, command: str | None) -> tuple[str | None, str | None]:
        if command is None:
            return None, None
        meta = self._meta.get(command)
        if meta is None and self._store is not None:
            meta = self._store.command_meta(command)
            if meta is not None:
                self._meta[command] = meta
        return meta if meta is not None else (None, None)

    def _after(self, acks: Sequence[Ack], *, actor: str | None = None, action: str | None = None) -> None:
        entries = []
        for ack in acks:
            who, what = (actor, action) if actor is not None else self._command_meta(ack.command)
            self._time_verification(ack, what)
            if ack.state is CommandState.ACCEPTED and ack.meter is None:
                self._stats.accepted += 1
            elif ack.state is CommandState.REJECTED:
                self._stats.reject(ack.reason or "unknown")
                if ack.meter is not None:
                    log.info(
                        "event=command_rejected command=%s meter=%s reason=%s detail=%s",
                        logfmt_value(ack.command),
                        logfmt_value(ack.meter),
                        logfmt_value(ack.reason),
                        logfmt_value(ack.detail),
                    )
            else:
                self._stats.count_state(ack.state, what)
            parts = [p for p in (ack.reason, f"relay={ack.relay}" if ack.relay else None, ack.detail) if p]
            entries.append(
                AuditEntry(
                    at=ack.at,
                    state=ack.state.value,
                    actor=who,
                    command=ack.command,
                    meter=ack.meter,
                    action=what,
                    detail="; ".join(parts) or None,
                )
            )
        self._audit_entries(entries)
        self._wake.set()

    def _time_verification(self, ack: Ack, action: str | None) -> None:
        if self._on_verified is None or ack.meter is None:
            return
        key = (ack.command, ack.meter)
        if ack.state == "sent":
            self._first_sent.setdefault(key, ack.at)
        elif ack.terminal:
            # an execution resumed after a restart has no first frame here: not timed
            started = self._first_sent.pop(key, None)
            if ack.state == "verified" and started is not None and action is not None:
                self._on_verified(action, max(0.0, ack.at - started))

    def _audit_entries(self, entries: list[AuditEntry]) -> None:
        if self._audit is None or not entries:
            return
        try:
            self._audit.append_many(entries)
        except AuditError as exc:  # the command state is already durable; say loudly what is missing
            log.error("event=audit_write_failed unaudited=%d error=%s", len(entries), logfmt_value(exc))  # noqa: TRY400

    # -- run --------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Resume, publish acks, expire what waits too long; return soon after ``stop`` is set."""
        self._stopped = False
        self._open()
        tasks = [
            asyncio.create_task(self._publisher(stop), name="command-acks"),
            asyncio.create_task(self._sweeper(stop), name="command-expiry"),
        ]
        try:
            await stop.wait()
        finally:
            self._stopped = True
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.close()

    async def close(self) -> None:
        """Stop executions (their state stays persisted for the next start) and close files."""
        if self._executor is not None:
            await self._executor.close()
        if self._store is not None:
            self._store.close()
        if self._audit is not None:
            self._audit.close()
        self._executor = self._store = self._audit = self._guard = None

    async def _sweeper(self, stop: asyncio.Event) -> None:
        last_prune = -PRUNE_INTERVAL
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            try:
                self._expire()
                if loop.time() - last_prune >= PRUNE_INTERVAL:
                    last_prune = loop.time()
                    self._prune()
            except (StoreError, IllegalTransition) as exc:
                log.error("event=command_expiry_failed error=%s", logfmt_value(exc))  # noqa: TRY400
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SWEEP_INTERVAL)

    def _expire(self) -> None:
        """Held and queued executions whose command expired before they started: ``expired``
        (the one running on its meter checks expiry itself)."""
        store, executor, guard = self._open()
        now = self._clock()
        due = [
            e
            for e in store.executions(states=(CommandState.HELD, CommandState.QUEUED))
            if now >= e.expires_at and not executor.running(e.command, e.meter)
        ]
        if not due:
            return
        held, queued = "expired while held by the mass-disconnect guard", "expired in the queue"
        self._record(
            [
                Transition(e.command, e.meter, E.EXPIRE, detail=held if e.state is CommandState.HELD else queued)
                for e in due
            ]
        )
        guard.settle()

    def _prune(self) -> None:
        store = self._require_store()
        section = self.config.commands
        n = store.prune(self._clock(), float(section.max_validity), float(section.guard_window))
        if n:
            log.info("event=commands_pruned count=%d", n)

    async def _publisher(self, stop: asyncio.Event) -> None:
        """Publish pending acks, a bounded number at once; keep each until its PUBACK."""
        backoff = Backoff(self._publish_backoff)
        while not stop.is_set():
            self._wake.clear()
            store = self._require_store()
            rows = store.pending_acks(ACK_BATCH)
            if not rows:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 1.0)
                continue
            results = await asyncio.gather(*(self._publish_one(payload) for _, payload in rows))
            done = [ack_id for (ack_id, _), ok in zip(rows, results, strict=True) if ok]
            if self._store is None:
                return
            self._store.delete_acks(done)
            self._stats.acks_published += len(done)
            if len(done) < len(rows):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), backoff.next())
            else:
                backoff.reset()

    async def _publish_one(self, payload: bytes) -> bool:
        async with self._publish_sem:
            try:
                return await self._publish(self._ack_topic, payload)
            except Exception:  # the publish callable is someone else's code: never lose the ack
                log.exception("event=ack_publish_crashed kept=true")
                return False

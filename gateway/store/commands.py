"""The command executor's durable state: one SQLite file (WAL, ``synchronous=FULL``).

What it remembers, and why it must survive a power cut:

* seen command ids and the highest ``seq`` per key (replay protection, docs/mqtt.md "Replay");
  written in the same transaction that accepts the command, so a command is either accepted
  and remembered, or neither;
* one row per (command, meter) execution with its current state, and the history of every
  transition (the acks, with their per-command ``seq``), so a duplicate can be answered with the
  current state and a restart resumes exactly where the crash left off;
* the per-command ack counter (also for rejected ids, so a later genuine command with the same
  id never reuses an ack ``seq`` the head-end may already have deduplicated away);
* acks not yet confirmed by a PUBACK (re-published after a restart: no ack is lost);
* the mass-disconnect guard's window entries (a restart must not reset the guard).

Commands are rare, so every write is its own fsync'd transaction; a 1,000-meter command is one
transaction. All methods are synchronous and quick; the service calls them from the event loop.

A damaged file (SQLite says "not a database" or "malformed", or ``PRAGMA quick_check`` finds
damage within ``check_budget``) must not crash-loop the daemon: :meth:`CommandStore.open` moves
it aside with its -wal/-shm (``commands.sqlite.corrupt-<UTC>``, kept for forensics), starts a
fresh store and logs one ERROR line ``event=command_store_quarantined``. What the damaged file
knew about executed commands is gone, so the fresh store records ``reset_at`` and from then on:

* every command issued before ``reset_at`` is rejected ``store_reset`` (it may already have run),
  as is any command whose id could be read from the damaged file (best-effort salvage, together
  with the per-key ``seq`` and the guard window entries);
* relay actions read the relay first and are acked ``verified`` without operating when it is
  already in the wanted state (:attr:`CommandStore.reset_caution`, until every command that could
  predate the reset has expired: see :meth:`CommandStore.prune`);
* acks of a command id that predates the reset are numbered from :data:`RESET_ACK_BASE`, above
  any ``seq`` the head-end may have seen (and deduplicated on) for that id before the reset.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Self

from meter_gateway.drivers.log_limit import logfmt_value
from meter_gateway.gateway.commands.envelope import Ack, CommandEnvelope, RelayState, canonical_bytes, encode_ack
from meter_gateway.gateway.commands.states import (
    ACTIVE,
    COMMAND_START,
    EXECUTION_START,
    TERMINAL,
    CommandEvent,
    CommandState,
    Scope,
    transition,
)
from meter_gateway.gateway.store.sqlite_check import (
    DEFAULT_CHECK_BUDGET,
    DamagedDatabase,
    checked_connection,
    limit_cache,
    limit_wal,
    open_readonly,
    open_store,
    refuse_truncated,
    time_limit,
)

__all__ = [
    "RESET_ACK_BASE",
    "SCHEMA_VERSION",
    "STORE_RESET",
    "CommandStore",
    "Execution",
    "MeterPlan",
    "StoreError",
    "Transition",
]

log = logging.getLogger(__name__)

SCHEMA_VERSION: Final = 1
STORE_RESET: Final = "store_reset"  # rejection reason: the command predates a store reset
# First ack seq - 1 for a command id that predates a reset: a 1000-meter command with 10 retries
# per meter numbers its acks far below this, so nothing the head-end saw before is reused.
RESET_ACK_BASE: Final = 1_000_000
# Head-end clock ahead of the gateway's by up to this much still counts when deciding that no
# command from before a reset can be valid any more (the end of reset_caution).
RESET_CLOCK_MARGIN: Final = 600.0
# Seconds the best-effort salvage from a quarantined file may take.
_SALVAGE_BUDGET: Final = 1.0

_SCHEMA: Final = f"""
CREATE TABLE IF NOT EXISTS commands (
    id TEXT PRIMARY KEY,
    key_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    action TEXT NOT NULL,
    expires_at REAL NOT NULL,
    accepted_at REAL NOT NULL,
    canonical BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS commands_expiry ON commands (expires_at);
CREATE TABLE IF NOT EXISTS key_seq (key_id TEXT PRIMARY KEY, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS ack_counter (command TEXT PRIMARY KEY, last INTEGER NOT NULL, touched_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS executions (
    command TEXT NOT NULL,
    meter TEXT NOT NULL,
    position INTEGER NOT NULL,
    action TEXT NOT NULL,
    key_id TEXT NOT NULL,
    mode TEXT,
    params TEXT,
    state TEXT NOT NULL,
    relay TEXT,
    reason TEXT,
    detail TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    sent INTEGER NOT NULL DEFAULT 0,
    expires_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (command, meter)
);
CREATE INDEX IF NOT EXISTS executions_state ON executions (state);
CREATE TABLE IF NOT EXISTS history (
    id INTEGER PRIMARY KEY,
    command TEXT,
    meter TEXT,
    seq INTEGER NOT NULL,
    state TEXT NOT NULL,
    at REAL NOT NULL,
    payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS history_command ON history (command, meter, seq);
CREATE TABLE IF NOT EXISTS pending_acks (
    id INTEGER PRIMARY KEY, command TEXT, seq INTEGER NOT NULL, payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS guard (
    id INTEGER PRIMARY KEY, at REAL NOT NULL, command TEXT NOT NULL, meter TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS guard_at ON guard (at);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS seen_before_reset (id TEXT PRIMARY KEY, key_id TEXT, seq INTEGER);
PRAGMA user_version = {SCHEMA_VERSION};
"""

# Static SQL only: a NULL parameter switches its filter off, states come as a JSON list.
_SELECT_EXECUTIONS: Final = (
    "SELECT command, meter, position, action, key_id, mode, params, state, relay, reason, detail, attempts, sent,"
    " expires_at FROM executions WHERE (:command IS NULL OR command = :command)"
    " AND (:meter IS NULL OR meter = :meter)"
    " AND (:states IS NULL OR state IN (SELECT value FROM json_each(:states))) ORDER BY rowid"
)
_INSERT_EXECUTION: Final = (
    "INSERT INTO executions (command, meter, position, action, key_id, mode, params, state, relay, reason, detail,"
    " attempts, sent, expires_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL, ?, ?, 0, 0, ?, ?)"
)
_PRUNABLE: Final = (
    "SELECT id FROM commands c WHERE expires_at < :horizon AND NOT EXISTS (SELECT 1 FROM executions e"
    " WHERE e.command = c.id AND e.state NOT IN (SELECT value FROM json_each(:terminal)))"
)
_COMMAND_STATE: Final = "SELECT state FROM history WHERE command = ? AND meter IS NULL ORDER BY seq DESC LIMIT 1"


def _states_json(states: Iterable[CommandState]) -> str:
    return json.dumps(sorted(s.value for s in states))


class StoreError(Exception):
    """The command store cannot be opened or written (disk full, wrong file, newer schema)."""


def _known_state(raw: object, path: object, where: str) -> CommandState:
    """A stored state string as a :class:`CommandState`; a string no version of the lifecycle
    knows means the file is damaged (the open-time check quarantines such a file)."""
    try:
        if isinstance(raw, str):
            return CommandState(raw)
    except ValueError:
        pass
    known = ", ".join(s.value for s in CommandState)
    raise StoreError(f"command store {path}: {where} has unknown state {raw!r} (known: {known})")


@dataclass(frozen=True, slots=True)
class Execution:
    """One meter of one command, as stored."""

    command: str
    meter: str
    position: int  # index in the command's meter list (release order, audit)
    action: str
    key_id: str
    mode: str | None  # reconnect: close_permit | direct_close
    quantities: tuple[str, ...] | None  # read_now
    state: CommandState
    relay: str | None
    reason: str | None
    detail: str | None
    attempts: int  # control frames sent so far (over restarts)
    sent: bool  # a control frame may have reached the meter
    expires_at: float
    apdu: bytes | None = None  # DL/T 698.45 pass-through: the head-end's secured APDU (params.apdu)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL


@dataclass(frozen=True, slots=True)
class MeterPlan:
    """What acceptance decided for one meter: the event that gives its first state after
    ``accepted`` (states.py: admit -> queued, hold -> held, reject -> rejected; a release
    command's own per-meter result: confirm -> verified, reject -> rejected)."""

    meter: str
    event: CommandEvent
    mode: str | None = None
    reason: str | None = None
    detail: str | None = None
    guarded: bool = False  # counts against the mass-disconnect guard window


@dataclass(frozen=True, slots=True)
class Transition:
    """An event for one execution (``meter`` None: the whole command). The store applies it to
    the stored state through the lifecycle table (states.py), which decides the new state."""

    command: str
    meter: str | None
    event: CommandEvent
    relay: RelayState | None = None
    reason: str | None = None
    detail: str | None = None
    attempts: int | None = None  # new value of the execution's counter, if it changed
    sent: bool | None = None
    guarded: bool = False  # add a guard window entry (a held disconnect released)


def _execution(row: Sequence[Any], path: str) -> Execution:
    command, meter, position, action, key_id, mode, params, state, relay, reason, detail, attempts, sent, exp = row
    quantities, apdu = _params(params)
    return Execution(
        command,
        meter,
        position,
        action,
        key_id,
        mode,
        quantities,
        _known_state(state, path, f"execution {command}/{meter}"),
        relay,
        reason,
        detail,
        attempts,
        bool(sent),
        exp,
        apdu,
    )


def _params(stored: str | None) -> tuple[tuple[str, ...] | None, bytes | None]:
    """(quantities, apdu) from ``executions.params``: a JSON list of quantities (read_now, and
    every row written before pass-through existed) or an object with ``quantities``/``apdu``."""
    if not stored:
        return None, None
    raw = json.loads(stored)
    if isinstance(raw, list):
        return tuple(raw), None
    quantities = raw.get("quantities")
    apdu = raw.get("apdu")
    return (tuple(quantities) if quantities else None), (bytes.fromhex(apdu) if apdu else None)


def _stored_params(env: CommandEnvelope) -> str | None:
    """What :func:`_params` reads back; a list when there is no APDU, as older versions wrote."""
    p = env.params
    if p is None:
        return None
    if p.apdu:
        return json.dumps({"quantities": list(p.quantities or ()), "apdu": p.apdu})
    return json.dumps(list(p.quantities)) if p.quantities else None


class CommandStore:
    """See the module docstring. Not thread-safe: one event loop owns it."""

    def __init__(self, conn: sqlite3.Connection, path: str, gateway_id: str) -> None:
        self._conn = conn
        self.path = path
        self.gateway_id = gateway_id
        self.quarantined: Path | None = None  # where open() moved a damaged file, if it did
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        self.reset_at: float | None = float(meta["reset_at"]) if "reset_at" in meta else None
        self._caution = "reset_caution" in meta

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        gateway_id: str,
        *,
        check_budget: float = DEFAULT_CHECK_BUDGET,
        clock: Callable[[], float] = time.time,
    ) -> Self:
        """Open (creating it if needed) the store at ``path``. A damaged file is quarantined and
        a fresh store started (module docstring); ``quarantined`` then names where it went.
        ``check_budget``: seconds the open-time ``quick_check`` may take (0 skips it)."""
        file = Path(path)
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot open command store {file}: {exc}") from exc

        def fresh_damaged(again: DamagedDatabase) -> StoreError:
            return StoreError(f"command store {file}: a fresh store is damaged too: {again}")

        store, aside, reason = open_store(
            file, lambda: cls(_connect(file, check_budget), str(file), gateway_id), fresh_damaged=fresh_damaged
        )
        if aside is not None:
            store._after_quarantine(aside, reason, clock())
        return store

    def _after_quarantine(self, aside: Path, reason: str, now: float) -> None:
        """Record the reset in the fresh store, with what can still be read from the damaged one."""
        keys, ids, guard = _salvage(aside)
        meta = {"reset_at": repr(now), "reset_caution": "1", "quarantined_from": str(aside), "reason": reason[:500]}
        with self._txn() as cur:
            cur.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", list(meta.items()))
            cur.executemany(
                "INSERT INTO key_seq (key_id, seq) VALUES (?, ?)"
                " ON CONFLICT (key_id) DO UPDATE SET seq = max(seq, excluded.seq)",
                keys,
            )
            cur.executemany("INSERT OR IGNORE INTO seen_before_reset (id, key_id, seq) VALUES (?, ?, ?)", ids)
            cur.executemany("INSERT INTO guard (at, command, meter) VALUES (?, ?, ?)", guard)
        self.quarantined, self.reset_at, self._caution = aside, now, True
        # one line, no traceback: the cause is the file, not the code
        log.error(
            "event=command_store_quarantined path=%s moved_to=%s reason=%r reset_at=%.3f salvaged_keys=%d"
            " salvaged_ids=%d salvaged_guard=%d action=fresh_store detail='commands issued before reset_at are"
            " rejected (store_reset); relay commands read the relay first; unfinished executions and unsent acks"
            " of the damaged file are lost'",
            self.path,
            aside,
            reason,
            now,
            len(keys),
            len(ids),
            len(guard),
        )

    @property
    def reset_caution(self) -> bool:
        """The store was reset and a command from before the reset could still be valid: relay
        actions read the relay first and do not operate when it is already in the wanted state."""
        return self._caution

    def predates_reset(self, env: CommandEnvelope) -> str | None:
        """Why ``env`` must be rejected ``store_reset`` (it may have run before the store was
        reset), or None. :meth:`accept` checks it too."""
        if self.reset_at is None:
            return None
        when = f"the command store was reset at {self.reset_at:.3f} (damaged file quarantined)"
        if env.issued_at < self.reset_at:
            return f"issued at {env.issued_at:.3f}, before {when}; it may already have run"
        if self._one("SELECT 1 FROM seen_before_reset WHERE id = ?", (env.id,)) is not None:
            return f"command id seen before {when}; it may already have run"
        return None

    def close(self) -> None:
        self._conn.close()

    # -- reads ------------------------------------------------------------------------------------

    def known(self, command_id: str) -> bool:
        return self._one("SELECT 1 FROM commands WHERE id = ?", (command_id,)) is not None

    def canonical(self, command_id: str) -> bytes | None:
        row = self._one("SELECT canonical FROM commands WHERE id = ?", (command_id,))
        return None if row is None else bytes(row[0])

    def command_meta(self, command_id: str) -> tuple[str, str] | None:
        """(key id, action) of a stored command."""
        row = self._one("SELECT key_id, action FROM commands WHERE id = ?", (command_id,))
        return None if row is None else (str(row[0]), str(row[1]))

    def last_seq(self, key_id: str) -> int | None:
        row = self._one("SELECT seq FROM key_seq WHERE key_id = ?", (key_id,))
        return None if row is None else int(row[0])

    def execution(self, command: str, meter: str) -> Execution | None:
        found = self._executions(command, meter, None)
        return found[0] if found else None

    def executions(
        self, *, states: Iterable[CommandState] | None = None, command: str | None = None
    ) -> list[Execution]:
        """Executions in acceptance order, filtered by state and/or command."""
        return self._executions(command, None, None if states is None else _states_json(states))

    def _executions(self, command: str | None, meter: str | None, states: str | None) -> list[Execution]:
        try:
            rows = self._conn.execute(
                _SELECT_EXECUTIONS, {"command": command, "meter": meter, "states": states}
            ).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"command store {self.path}: {exc}") from exc
        return [_execution(r, self.path) for r in rows]

    def count_state(self, state: CommandState) -> int:
        row = self._one("SELECT count(*) FROM executions WHERE state = ?", (state.value,))
        return int(row[0]) if row else 0

    def history(self, command: str) -> list[Ack]:
        """Every ack of ``command`` in ``seq`` order (for tests, ``status`` and audits)."""
        from meter_gateway.gateway.commands.envelope import decode_ack

        rows = self._conn.execute("SELECT payload FROM history WHERE command = ? ORDER BY seq", (command,))
        return [decode_ack(bytes(r[0])) for r in rows.fetchall()]

    def current_acks(self, command: str) -> list[bytes]:
        """The latest ack of the command as a whole and of each of its meters (what a duplicate
        delivery is answered with: same payloads, same ``seq``, so re-sending is idempotent)."""
        rows = self._conn.execute(
            "SELECT payload FROM history h WHERE command = ? AND seq = "
            "(SELECT max(seq) FROM history g WHERE g.command = h.command AND g.meter IS h.meter) ORDER BY seq",
            (command,),
        )
        return [bytes(r[0]) for r in rows.fetchall()]

    def guard_count(self, since: float) -> int:
        row = self._one("SELECT count(*) FROM guard WHERE at > ?", (since,))
        return int(row[0]) if row else 0

    def guard_oldest(self, since: float) -> float | None:
        row = self._one("SELECT min(at) FROM guard WHERE at > ?", (since,))
        return None if row is None or row[0] is None else float(row[0])

    def pending_acks(self, limit: int, exclude: Iterable[int] = ()) -> list[tuple[int, bytes]]:
        skip = set(exclude)
        rows = self._conn.execute("SELECT id, payload FROM pending_acks ORDER BY id LIMIT ?", (limit + len(skip),))
        return [(int(i), bytes(p)) for i, p in rows.fetchall() if int(i) not in skip][:limit]

    def pending_count(self) -> int:
        row = self._one("SELECT count(*) FROM pending_acks", ())
        return int(row[0]) if row else 0

    # -- writes (each one durable transaction) ----------------------------------------------------

    def accept(
        self, env: CommandEnvelope, now: float, plans: Sequence[MeterPlan], then: Sequence[Transition] = ()
    ) -> list[Ack]:
        """Remember ``env`` (id and key seq), create its executions, and queue the acks
        ``received``, ``accepted`` and each meter's first state, then apply ``then`` (what a
        release does to the held executions, and its own result); all or nothing.

        Raises StoreError if the id is already known or the seq is not new: the caller checks
        first (same event loop, no await in between), this is the last line of defence.

        A command that :meth:`predates_reset` is not accepted: the acks returned are then
        ``received`` + ``rejected`` (reason ``store_reset``) and nothing else is stored.
        """
        why = self.predates_reset(env)
        if why is not None:
            log.warning("event=command_rejected_store_reset command=%s key=%s detail=%r", env.id, env.key_id, why)
            return self.reject(env.id, now, STORE_RESET, why, predates_reset=True)
        params = _stored_params(env)
        with self._txn() as cur:
            if cur.execute("SELECT 1 FROM commands WHERE id = ?", (env.id,)).fetchone():
                raise StoreError(f"command {env.id} already stored")
            row = cur.execute("SELECT seq FROM key_seq WHERE key_id = ?", (env.key_id,)).fetchone()
            if row is not None and env.seq <= int(row[0]):
                raise StoreError(f"seq {env.seq} of key {env.key_id} is not above {row[0]}")
            cur.execute(
                "INSERT INTO commands (id, key_id, seq, action, expires_at, accepted_at, canonical)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (env.id, env.key_id, env.seq, env.action, env.expires_at, now, canonical_bytes(env)),
            )
            cur.execute(
                "INSERT INTO key_seq (key_id, seq) VALUES (?, ?) ON CONFLICT (key_id) DO UPDATE SET seq = excluded.seq",
                (env.key_id, env.seq),
            )
            accepted = transition(Scope.COMMAND, COMMAND_START, CommandEvent.ACCEPT)
            acks = [
                self._ack(cur, env.id, None, COMMAND_START, now),
                self._ack(cur, env.id, None, accepted, now, detail=f"{env.action} for {len(env.meters)} meter(s)"),
            ]
            for position, plan in enumerate(plans):
                first = transition(Scope.EXECUTION, EXECUTION_START, plan.event)
                cur.execute(
                    _INSERT_EXECUTION,
                    (
                        env.id,
                        plan.meter,
                        position,
                        env.action,
                        env.key_id,
                        plan.mode,
                        params,
                        first.value,
                        plan.reason,
                        plan.detail,
                        env.expires_at,
                        now,
                    ),
                )
                if plan.guarded:
                    cur.execute("INSERT INTO guard (at, command, meter) VALUES (?, ?, ?)", (now, env.id, plan.meter))
                acks.append(self._ack(cur, env.id, plan.meter, first, now, reason=plan.reason, detail=plan.detail))
            acks += self._apply(cur, then, now)
            return acks

    def reject(
        self, command_id: str | None, now: float, reason: str, detail: str, *, predates_reset: bool = False
    ) -> list[Ack]:
        """Acks for a refused message: ``received`` + ``rejected`` under its id, or just
        ``rejected`` (seq 1) when it had no readable id. Nothing else is remembered.
        ``predates_reset``: the id may have been acked before a store reset (see RESET_ACK_BASE)."""
        rejected = transition(Scope.COMMAND, COMMAND_START, CommandEvent.REJECT)
        with self._txn() as cur:
            if command_id is None:
                return [self._ack(cur, None, None, rejected, now, reason=reason, detail=detail)]
            if self.reset_at is not None and (
                predates_reset or cur.execute("SELECT 1 FROM seen_before_reset WHERE id = ?", (command_id,)).fetchone()
            ):
                cur.execute(
                    "INSERT OR IGNORE INTO ack_counter (command, last, touched_at) VALUES (?, ?, ?)",
                    (command_id, RESET_ACK_BASE, now),
                )
            return [
                self._ack(cur, command_id, None, COMMAND_START, now),
                self._ack(cur, command_id, None, rejected, now, reason=reason, detail=detail),
            ]

    def apply(self, transitions: Sequence[Transition], now: float) -> list[Ack]:
        """Apply transitions (one transaction) and queue their acks. Each goes through the
        lifecycle table from the stored state; one it does not allow (any event after a terminal
        state: a terminal state is final) raises :class:`IllegalTransition` and nothing of the
        batch is written. A transition of an execution the store does not hold is skipped."""
        with self._txn() as cur:
            return self._apply(cur, transitions, now)

    def _apply(self, cur: sqlite3.Cursor, transitions: Sequence[Transition], now: float) -> list[Ack]:
        acks: list[Ack] = []
        for t in transitions:
            if t.meter is None:
                row = cur.execute(_COMMAND_STATE, (t.command,)).fetchone()
                if row is None:
                    continue
                state = transition(Scope.COMMAND, _known_state(row[0], self.path, f"command {t.command}"), t.event)
            else:
                row = cur.execute(
                    "SELECT state FROM executions WHERE command = ? AND meter = ?", (t.command, t.meter)
                ).fetchone()
                if row is None:
                    continue
                where = f"execution {t.command}/{t.meter}"
                state = transition(Scope.EXECUTION, _known_state(row[0], self.path, where), t.event)
                cur.execute(
                    "UPDATE executions SET state = ?, relay = coalesce(?, relay), reason = ?, detail = ?,"
                    " attempts = coalesce(?, attempts), sent = coalesce(?, sent), updated_at = ?"
                    " WHERE command = ? AND meter = ?",
                    (
                        state.value,
                        t.relay,
                        t.reason,
                        t.detail,
                        t.attempts,
                        None if t.sent is None else int(t.sent),
                        now,
                        t.command,
                        t.meter,
                    ),
                )
                if t.guarded:
                    cur.execute("INSERT INTO guard (at, command, meter) VALUES (?, ?, ?)", (now, t.command, t.meter))
            acks.append(self._ack(cur, t.command, t.meter, state, now, relay=t.relay, reason=t.reason, detail=t.detail))
        return acks

    def requeue(self, payloads: Iterable[bytes]) -> int:
        """Queue already-numbered acks again (a duplicate delivery is answered with them)."""
        n = 0
        with self._txn() as cur:
            for payload in payloads:
                cur.execute("INSERT INTO pending_acks (command, seq, payload) VALUES (NULL, 0, ?)", (payload,))
                n += 1
        return n

    def delete_acks(self, ids: Iterable[int]) -> None:
        """Forget acks the broker confirmed. Losing this write only means a harmless re-send, so it
        need not be fsync'd on its own (the next durable transaction carries it)."""
        wanted = [(i,) for i in ids]
        if not wanted:
            return
        try:
            self._conn.execute("PRAGMA synchronous=NORMAL")
            with self._txn() as cur:
                cur.executemany("DELETE FROM pending_acks WHERE id = ?", wanted)
        finally:
            self._conn.execute("PRAGMA synchronous=FULL")

    def prune(self, now: float, max_validity: float, guard_window: float) -> int:
        """Forget what replay protection no longer needs (docs/mqtt.md "Replay"): commands more than
        ``max_validity`` past their expiry (such a command is rejected as ``expired`` anyway; the
        per-key seq stays forever), ack counters of refused ids as old, guard entries older than
        the window. Executions not yet terminal are never pruned. Ends :attr:`reset_caution` once
        no command from before a reset can be valid."""
        horizon = now - max_validity
        with self._txn() as cur:
            prunable = {"horizon": horizon, "terminal": _states_json(TERMINAL)}
            old = [str(r[0]) for r in cur.execute(_PRUNABLE, prunable).fetchall()]
            for cid in old:
                cur.execute("DELETE FROM executions WHERE command = ?", (cid,))
                cur.execute("DELETE FROM history WHERE command = ?", (cid,))
                cur.execute("DELETE FROM ack_counter WHERE command = ?", (cid,))
                cur.execute("DELETE FROM commands WHERE id = ?", (cid,))
            cur.execute(
                "DELETE FROM ack_counter WHERE touched_at < ? AND command NOT IN (SELECT id FROM commands)",
                (horizon - max_validity,),
            )
            cur.execute("DELETE FROM guard WHERE at <= ?", (now - guard_window,))
            # After a reset: once every command that could predate it has expired (its validity
            # is at most max_validity, its issuer's clock maybe a little ahead), the read-first
            # caution and the salvaged ids have nothing left to protect against.
            reset = self.reset_at
            over = self._caution and reset is not None and now >= reset + max_validity + RESET_CLOCK_MARGIN
            if over:
                cur.execute("DELETE FROM meta WHERE key = 'reset_caution'")
                cur.execute("DELETE FROM seen_before_reset")
        if over:
            self._caution = False
            log.info("event=command_store_reset reset_at=%.3f effect=older_commands_invalid", self.reset_at)
        return len(old)

    # -- internals --------------------------------------------------------------------------------

    def _one(self, sql: str, params: Sequence[object]) -> tuple[Any, ...] | None:
        try:
            row: tuple[Any, ...] | None = self._conn.execute(sql, params).fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"command store {self.path}: {exc}") from exc
        return row

    def _txn(self) -> _Transaction:
        return _Transaction(self._conn, self.path)

    def _ack(
        self,
        cur: sqlite3.Cursor,
        command: str | None,
        meter: str | None,
        state: CommandState,
        at: float,
        *,
        relay: RelayState | None = None,
        reason: str | None = None,
        detail: str | None = None,
    ) -> Ack:
        if command is None:
            seq = 1  # nothing to correlate it with: docs/mqtt.md shows such a rejection as seq 1
        else:
            row = cur.execute(
                "INSERT INTO ack_counter (command, last, touched_at) VALUES (?, 1, ?) ON CONFLICT (command)"
                " DO UPDATE SET last = last + 1, touched_at = excluded.touched_at RETURNING last",
                (command, at),
            ).fetchone()
            seq = int(row[0])
        ack = Ack(
            gateway=self.gateway_id,
            command=command,
            meter=meter,
            state=state,
            at=round(at, 3),
            seq=seq,
            relay=relay,
            reason=reason,
            detail=detail,
        )
        payload = encode_ack(ack)
        if command is not None:
            cur.execute(
                "INSERT INTO history (command, meter, seq, state, at, payload) VALUES (?, ?, ?, ?, ?, ?)",
                (command, meter, seq, state.value, at, payload),
            )
        cur.execute("INSERT INTO pending_acks (command, seq, payload) VALUES (?, ?, ?)", (command, seq, payload))
        return ack


def _connect(file: Path, check_budget: float) -> sqlite3.Connection:
    """Open, check and set up the store file; DamagedDatabase if SQLite finds it damaged."""

    def configure(conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA busy_timeout=5000")
        _check_version(conn, file)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")  # an accepted command must survive a power cut
        limit_cache(conn)
        limit_wal(conn)

    try:
        # a store truncated to nothing would silently forget which commands ran
        refuse_truncated(file)
        return checked_connection(
            file,
            what="command_store",
            check_budget=check_budget,
            configure=configure,
            migrate=_migrate,
            isolation_level=None,
        )
    except (OSError, sqlite3.Error) as exc:
        raise StoreError(f"cannot open command store {file}: {exc}") from exc


def _migrate(conn: sqlite3.Connection) -> None:
    conn.executescript(_SCHEMA)
    # What the service reads at start (resume, guard, publisher): damage there would fail
    # every start, even when quick_check ran out of budget before reaching it.
    conn.execute(_SELECT_EXECUTIONS, {"command": None, "meter": None, "states": _states_json(ACTIVE)})
    conn.execute("SELECT count(*) FROM executions WHERE state = ?", (CommandState.HELD.value,)).fetchone()
    _check_states(conn)
    conn.execute("SELECT count(*) FROM pending_acks").fetchone()
    conn.execute("SELECT key, value FROM meta").fetchall()


def _check_states(conn: sqlite3.Connection) -> None:
    """Every stored execution state is one the lifecycle knows (states.py). The schema version
    rules out a newer vocabulary, so an unknown string is damage: quarantine, not a crash loop."""
    known = {s.value for s in CommandState}
    for (state,) in conn.execute("SELECT DISTINCT state FROM executions"):  # the state index: cheap
        if state not in known:
            raise DamagedDatabase(f"an execution has unknown state {state!r}, not one of the command lifecycle's")


def _check_version(conn: sqlite3.Connection, file: Path) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version not in (0, SCHEMA_VERSION):
        raise StoreError(f"{file}: command store schema {version}, this gateway knows {SCHEMA_VERSION}")


Salvage = tuple[list[tuple[str, int]], list[tuple[str, str | None, int | None]], list[tuple[float, str, str]]]


def _salvage(aside: Path) -> Salvage:
    """Best effort, read-only, bounded in time: the per-key seq, the command ids and the guard
    window entries still readable in a quarantined store. Anything unreadable is skipped."""
    keys: list[tuple[str, int]] = []
    ids: list[tuple[str, str | None, int | None]] = []
    guard: list[tuple[float, str, str]] = []
    try:
        conn = open_readonly(aside)
    except sqlite3.Error:
        return keys, ids, guard
    try:
        with time_limit(conn, _SALVAGE_BUDGET):
            for key_id, seq in _rows(conn, "SELECT key_id, seq FROM key_seq"):
                if isinstance(key_id, str) and isinstance(seq, int) and 0 <= seq < 2**63:
                    keys.append((key_id, seq))
            for cid, key_id, seq in _rows(conn, "SELECT id, key_id, seq FROM commands"):
                if isinstance(cid, str):
                    key = key_id if isinstance(key_id, str) else None
                    ids.append((cid, key, seq if isinstance(seq, int) else None))
            for at, cid, meter in _rows(conn, "SELECT at, command, meter FROM guard"):
                if isinstance(at, float | int) and isinstance(cid, str) and isinstance(meter, str):
                    guard.append((float(at), cid, meter))
    finally:
        conn.close()
    return keys, ids, guard


def _rows(conn: sqlite3.Connection, sql: str) -> list[tuple[Any, ...]]:
    """The rows SQLite returns before an error (a damaged page ends the scan, not the salvage)."""
    out: list[tuple[Any, ...]] = []
    try:
        out.extend(tuple(row) for row in conn.execute(sql))
    except sqlite3.Error as exc:
        log.debug("event=command_store_salvage_stopped sql=%s error=%s", logfmt_value(sql), logfmt_value(exc))
    return out


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (rolled back on any error), sqlite errors as StoreError."""

    def __init__(self, conn: sqlite3.Connection, path: str) -> None:
        self._conn = conn
        self._path = path
        self._cur: sqlite3.Cursor | None = None

    def __enter__(self) -> sqlite3.Cursor:
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreError(f"command store {self._path}: {exc}") from exc
        self._cur = self._conn.cursor()
        return self._cur

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            if exc_type is None:
                self._conn.execute("COMMIT")
            else:
                self._conn.execute("ROLLBACK")
        except sqlite3.Error as err:
            if exc_type is None:
                raise StoreError(f"command store {self._path}: {err}") from err
        if isinstance(exc, sqlite3.Error):
            raise StoreError(f"command store {self._path}: {exc}") from exc

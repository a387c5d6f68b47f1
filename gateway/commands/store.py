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
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Self

from gateway.commands.envelope import TERMINAL_STATES, Ack, CommandEnvelope, canonical_bytes, encode_ack

__all__ = ["ACTIVE_STATES", "SCHEMA_VERSION", "CommandStore", "Execution", "MeterPlan", "StoreError", "Transition"]

SCHEMA_VERSION: Final = 1

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
    "SELECT id FROM commands c WHERE expires_at < ? AND NOT EXISTS (SELECT 1 FROM executions e"
    " WHERE e.command = c.id AND e.state NOT IN ('rejected', 'meter_refused', 'verified', 'unverified', 'expired'))"
)
# Not terminal and not waiting for a release: what the executor owns.
ACTIVE_STATES: Final = ("queued", "sent", "meter_acknowledged", "no_answer")


class StoreError(Exception):
    """The command store cannot be opened or written (disk full, wrong file, newer schema)."""


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
    state: str
    relay: str | None
    reason: str | None
    detail: str | None
    attempts: int  # control frames sent so far (over restarts)
    sent: bool  # a control frame may have reached the meter
    expires_at: float

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES


@dataclass(frozen=True, slots=True)
class MeterPlan:
    """What acceptance decided for one meter: its first state after ``accepted``."""

    meter: str
    state: str  # queued | held | rejected
    mode: str | None = None
    reason: str | None = None
    detail: str | None = None
    guarded: bool = False  # counts against the mass-disconnect guard window


@dataclass(frozen=True, slots=True)
class Transition:
    """A state change of one execution (``meter`` None: the whole command)."""

    command: str
    meter: str | None
    state: str
    relay: str | None = None
    reason: str | None = None
    detail: str | None = None
    attempts: int | None = None  # new value of the execution's counter, if it changed
    sent: bool | None = None
    guarded: bool = False  # add a guard window entry (a held disconnect released)


def _execution(row: Sequence[Any]) -> Execution:
    command, meter, position, action, key_id, mode, params, state, relay, reason, detail, attempts, sent, exp = row
    quantities = tuple(json.loads(params)) if params else None
    return Execution(
        command,
        meter,
        position,
        action,
        key_id,
        mode,
        quantities,
        state,
        relay,
        reason,
        detail,
        attempts,
        bool(sent),
        exp,
    )


class CommandStore:
    """See the module docstring. Not thread-safe: one event loop owns it."""

    def __init__(self, conn: sqlite3.Connection, path: str, gateway_id: str) -> None:
        self._conn = conn
        self.path = path
        self.gateway_id = gateway_id

    @classmethod
    def open(cls, path: str | os.PathLike[str], gateway_id: str) -> Self:
        file = Path(path)
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(file, isolation_level=None)
            conn.execute("PRAGMA busy_timeout=5000")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                conn.close()
                raise StoreError(f"{file}: command store schema {version}, this gateway knows {SCHEMA_VERSION}")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")  # an accepted command must survive a power cut
            conn.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open command store {file}: {exc}") from exc
        return cls(conn, str(file), gateway_id)

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

    def executions(self, *, states: Iterable[str] | None = None, command: str | None = None) -> list[Execution]:
        """Executions in acceptance order, filtered by state and/or command."""
        return self._executions(command, None, None if states is None else json.dumps(list(states)))

    def _executions(self, command: str | None, meter: str | None, states: str | None) -> list[Execution]:
        try:
            rows = self._conn.execute(
                _SELECT_EXECUTIONS, {"command": command, "meter": meter, "states": states}
            ).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"command store {self.path}: {exc}") from exc
        return [_execution(r) for r in rows]

    def count_state(self, state: str) -> int:
        row = self._one("SELECT count(*) FROM executions WHERE state = ?", (state,))
        return int(row[0]) if row else 0

    def history(self, command: str) -> list[Ack]:
        """Every ack of ``command`` in ``seq`` order (for tests, ``status`` and audits)."""
        from gateway.commands.envelope import decode_ack

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
        """
        params = json.dumps(list(env.params.quantities)) if env.params and env.params.quantities else None
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
            acks = [
                self._ack(cur, env.id, None, "received", now),
                self._ack(cur, env.id, None, "accepted", now, detail=f"{env.action} for {len(env.meters)} meter(s)"),
            ]
            for position, plan in enumerate(plans):
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
                        plan.state,
                        plan.reason,
                        plan.detail,
                        env.expires_at,
                        now,
                    ),
                )
                if plan.guarded:
                    cur.execute("INSERT INTO guard (at, command, meter) VALUES (?, ?, ?)", (now, env.id, plan.meter))
                acks.append(self._ack(cur, env.id, plan.meter, plan.state, now, reason=plan.reason, detail=plan.detail))
            acks += self._apply(cur, then, now)
            return acks

    def reject(self, command_id: str | None, now: float, reason: str, detail: str) -> list[Ack]:
        """Acks for a refused message: ``received`` + ``rejected`` under its id, or just
        ``rejected`` (seq 1) when it had no readable id. Nothing else is remembered."""
        with self._txn() as cur:
            if command_id is None:
                return [self._ack(cur, None, None, "rejected", now, reason=reason, detail=detail)]
            return [
                self._ack(cur, command_id, None, "received", now),
                self._ack(cur, command_id, None, "rejected", now, reason=reason, detail=detail),
            ]

    def command_ack(
        self, command: str, state: str, now: float, *, reason: str | None = None, detail: str | None = None
    ) -> Ack:
        """A state of a whole stored command (e.g. a release command's result)."""
        with self._txn() as cur:
            return self._ack(cur, command, None, state, now, reason=reason, detail=detail)

    def apply(self, transitions: Sequence[Transition], now: float) -> list[Ack]:
        """Apply transitions (one transaction) and queue their acks. A transition of an execution
        that is already terminal is skipped: a terminal state is final."""
        with self._txn() as cur:
            return self._apply(cur, transitions, now)

    def _apply(self, cur: sqlite3.Cursor, transitions: Sequence[Transition], now: float) -> list[Ack]:
        acks: list[Ack] = []
        for t in transitions:
            if t.meter is not None:
                row = cur.execute(
                    "SELECT state FROM executions WHERE command = ? AND meter = ?", (t.command, t.meter)
                ).fetchone()
                if row is None or str(row[0]) in TERMINAL_STATES:
                    continue
                cur.execute(
                    "UPDATE executions SET state = ?, relay = coalesce(?, relay), reason = ?, detail = ?,"
                    " attempts = coalesce(?, attempts), sent = coalesce(?, sent), updated_at = ?"
                    " WHERE command = ? AND meter = ?",
                    (
                        t.state,
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
            acks.append(
                self._ack(cur, t.command, t.meter, t.state, now, relay=t.relay, reason=t.reason, detail=t.detail)
            )
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
        the window. Executions not yet terminal are never pruned."""
        horizon = now - max_validity
        with self._txn() as cur:
            old = [str(r[0]) for r in cur.execute(_PRUNABLE, (horizon,)).fetchall()]
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
        state: str,
        at: float,
        *,
        relay: str | None = None,
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
            state=state,  # type: ignore[arg-type]  # callers pass AckState values
            at=round(at, 3),
            seq=seq,
            relay=relay,  # type: ignore[arg-type]
            reason=reason,
            detail=detail,
        )
        payload = encode_ack(ack)
        if command is not None:
            cur.execute(
                "INSERT INTO history (command, meter, seq, state, at, payload) VALUES (?, ?, ?, ?, ?, ?)",
                (command, meter, seq, state, at, payload),
            )
        cur.execute("INSERT INTO pending_acks (command, seq, payload) VALUES (?, ?, ?)", (command, seq, payload))
        return ack


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

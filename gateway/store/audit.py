"""The remote-control audit log: an append-only, hash-chained SQLite table.

Every command the gateway receives and every state it passes through is one record. Records are
never changed: triggers refuse UPDATE and DELETE, and each record carries
``hash = SHA-256(prev_hash || canonical record)`` so that editing, inserting or deleting a row
behind SQLite's back (after dropping the triggers) breaks the chain at that row, which
:meth:`AuditLog.verify` reports.

The canonical record is the UTF-8 JSON array ``[seq, at, actor, command, meter, action, state,
detail]`` without whitespace (strings JSON-escaped as msgspec writes them, ``null`` for absent
values, ``at`` a float in shortest round-trip form), and ``prev_hash`` enters the hash as its 64
lower-case hex characters; the first record's ``prev_hash`` is 64 zeros.

The chain cannot reveal the newest records being cut off (nothing follows them): keep a copy
of :meth:`AuditLog.head` somewhere else (the head-end, a log shipper) to anchor it.

A damaged file (SQLite says "not a database" or "malformed", or ``PRAGMA quick_check`` finds
damage) must not stop remote control: opening it for writing moves it aside with its -wal/-shm
(``audit.sqlite.corrupt-<UTC>``, kept for forensics: ``meter-gateway audit --file ... --verify``
still reads what it can), logs one ERROR line ``event=audit_log_quarantined`` and starts a fresh
log whose first record (state :data:`QUARANTINE_STATE`) names the moved file, the damage and the
last record still readable in it (its seq and hash), so the break is on the record and the old
chain's head can be matched against a copy kept elsewhere.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, astuple, dataclass
from pathlib import Path
from typing import Any, Final, Self

import msgspec

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

__all__ = ["GENESIS", "QUARANTINE_STATE", "AuditEntry", "AuditError", "AuditLog", "AuditRecord", "record_hash"]

log = logging.getLogger(__name__)

GENESIS: Final = "0" * 64
SCHEMA_VERSION: Final = 1
QUARANTINE_STATE: Final = "audit_log_quarantined"  # first record of a log started after a quarantine

_SCHEMA: Final = f"""
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    actor TEXT,
    command TEXT,
    meter TEXT,
    action TEXT,
    state TEXT NOT NULL,
    detail TEXT,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_meter ON audit (meter, seq);
CREATE INDEX IF NOT EXISTS audit_command ON audit (command, seq);
CREATE INDEX IF NOT EXISTS audit_at ON audit (at);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only: UPDATE refused'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only: DELETE refused'); END;
PRAGMA user_version = {SCHEMA_VERSION};
"""

_INSERT: Final = (
    "INSERT INTO audit (seq, at, actor, command, meter, action, state, detail, prev_hash, hash)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_SELECT: Final = "SELECT seq, at, actor, command, meter, action, state, detail, prev_hash, hash FROM audit"
_HEAD: Final = _SELECT + " ORDER BY seq DESC LIMIT 1"
_ALL: Final = _SELECT + " ORDER BY seq"
# Static SQL: a NULL parameter switches its filter off.
_QUERY: Final = (
    _SELECT + " WHERE (:meter IS NULL OR meter = :meter) AND (:command IS NULL OR command = :command)"
    " AND (:since IS NULL OR at >= :since) ORDER BY seq DESC LIMIT :limit"
)
_encoder: Final = msgspec.json.Encoder()


class AuditError(Exception):
    """The audit log cannot be opened or written."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditEntry:
    """What to record; the log adds seq and the hashes."""

    at: float
    state: str
    actor: str | None = None
    command: str | None = None
    meter: str | None = None
    action: str | None = None
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class AuditRecord:
    seq: int
    at: float
    actor: str | None  # key id that signed the command (None: the gateway itself)
    command: str | None
    meter: str | None
    action: str | None
    state: str  # ack state or event name ("received", "rejected", "verified", ...)
    detail: str | None
    prev_hash: str
    hash: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def record_hash(
    prev_hash: str,
    *,
    seq: int,
    at: float,
    actor: str | None,
    command: str | None,
    meter: str | None,
    action: str | None,
    state: str,
    detail: str | None,
) -> str:
    canonical = _encoder.encode([seq, float(at), actor, command, meter, action, state, detail])
    return hashlib.sha256(prev_hash.encode("ascii") + canonical).hexdigest()


class AuditLog:
    """One audit database. Thread-safe (one lock); every append is its own durable transaction."""

    def __init__(self, conn: sqlite3.Connection, path: str, *, readonly: bool) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self.path = path
        self.readonly = readonly
        self.quarantined: Path | None = None  # where open() moved a damaged file, if it did

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        readonly: bool = False,
        check_budget: float = DEFAULT_CHECK_BUDGET,
        clock: Callable[[], float] = time.time,
    ) -> Self:
        """Open (creating it unless ``readonly``) the audit log at ``path``. For writing, a
        damaged file is quarantined and a fresh log started (module docstring); ``quarantined``
        then names where it went. ``check_budget``: seconds the open-time ``quick_check`` may
        take (0 skips it). Read-only opens never move anything: damage is an AuditError."""
        file = Path(path)
        if readonly:
            if not file.is_file():
                raise AuditError(f"no audit log at {file}")
            try:
                conn = sqlite3.connect(f"{file.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
            except sqlite3.Error as exc:
                raise AuditError(f"cannot open audit log {file}: {exc}") from exc
            _check_version(conn, file)
            return cls(conn, str(file), readonly=True)

        def fresh_damaged(again: DamagedDatabase) -> AuditError:
            return AuditError(f"audit log {file}: a fresh log is damaged too: {again}")

        audit, aside, reason = open_store(
            file, lambda: cls(_connect(file, check_budget), str(file), readonly=False), fresh_damaged=fresh_damaged
        )
        if aside is None:
            return audit
        audit.quarantined = aside
        old_head = _last_readable(aside)  # the moved file keeps its -wal beside it
        detail = f"previous audit log damaged ({reason[:300]}); moved to {aside.name}; {old_head}"
        audit.append(at=clock(), state=QUARANTINE_STATE, detail=detail)
        # one line, no traceback: the cause is the file, not the code
        log.error(
            "event=audit_log_quarantined path=%s moved_to=%s reason=%r old_chain=%r action=fresh_log"
            " detail='the fresh log starts a new chain with a record of this; keep the moved file for forensics'",
            file,
            aside,
            reason,
            old_head,
        )
        return audit

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def append(
        self,
        *,
        at: float,
        state: str,
        actor: str | None = None,
        command: str | None = None,
        meter: str | None = None,
        action: str | None = None,
        detail: str | None = None,
    ) -> AuditRecord:
        """Add one record, durably, and return it (with its seq and hash)."""
        entry = AuditEntry(at=at, state=state, actor=actor, command=command, meter=meter, action=action, detail=detail)
        return self.append_many([entry])[0]

    def append_many(self, entries: Iterable[AuditEntry]) -> list[AuditRecord]:
        """Add records in one durable transaction (one fsync for, say, a 1000-meter command's
        ``queued`` transitions); all or none are written."""
        if self.readonly:
            raise AuditError("audit log opened read-only")
        out: list[AuditRecord] = []
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")  # serialises seq/prev_hash with other writers
                try:
                    last = self._conn.execute(_HEAD).fetchone()
                    seq, prev = (last[0] + 1, last[-1]) if last else (1, GENESIS)
                    for e in entries:
                        at = float(e.at)
                        digest = record_hash(
                            prev,
                            seq=seq,
                            at=at,
                            actor=e.actor,
                            command=e.command,
                            meter=e.meter,
                            action=e.action,
                            state=e.state,
                            detail=e.detail,
                        )
                        record = AuditRecord(
                            seq, at, e.actor, e.command, e.meter, e.action, e.state, e.detail, prev, digest
                        )
                        self._conn.execute(_INSERT, astuple(record))
                        out.append(record)
                        seq, prev = seq + 1, digest
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise AuditError(f"cannot append to audit log {self.path}: {exc}") from exc
        return out

    def _rows(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> Iterator[AuditRecord]:
        with self._lock:
            try:
                rows = self._conn.execute(sql, params).fetchall()
            except sqlite3.DatabaseError as exc:
                raise AuditError(f"cannot read audit log {self.path}: {exc}") from exc
        for row in rows:
            yield AuditRecord(*row)

    def head(self) -> AuditRecord | None:
        """The newest record (its hash anchors the whole chain)."""
        return next(self._rows(_HEAD), None)

    def count(self) -> int:
        with self._lock:
            try:
                n: int = self._conn.execute("SELECT count(*) FROM audit").fetchone()[0]
            except sqlite3.DatabaseError as exc:
                raise AuditError(f"cannot read audit log {self.path}: {exc}") from exc
        return n

    def verify(self) -> int | None:
        """Recompute the chain; the seq of the first record that does not fit, or None if all do.

        A changed record fails its own hash; a deleted or inserted one breaks the link (or the
        numbering) of the record after it. A log started after a quarantine begins with a
        :data:`QUARANTINE_STATE` record (see :meth:`breaks`). A file SQLite cannot read to the
        end raises AuditError.
        """
        with self._lock:
            try:
                return self._verify()
            except sqlite3.DatabaseError as exc:
                raise AuditError(f"cannot read audit log {self.path} to the end: {exc}") from exc

    def breaks(self) -> list[AuditRecord]:
        """The records saying this log was started fresh after a damaged one was quarantined."""
        return list(self._rows(_SELECT + " WHERE state = ? ORDER BY seq", (QUARANTINE_STATE,)))

    def _verify(self) -> int | None:
        prev, expected_seq = GENESIS, 1
        cursor = self._conn.execute(_ALL)
        for row in cursor:
            r = AuditRecord(*row)
            if r.seq != expected_seq or r.prev_hash != prev:
                return r.seq
            digest = record_hash(
                prev,
                seq=r.seq,
                at=r.at,
                actor=r.actor,
                command=r.command,
                meter=r.meter,
                action=r.action,
                state=r.state,
                detail=r.detail,
            )
            if digest != r.hash:
                return r.seq
            prev, expected_seq = r.hash, r.seq + 1
        return None

    def query(
        self,
        *,
        meter: str | None = None,
        command: str | None = None,
        since: float | None = None,
        limit: int | None = None,
    ) -> list[AuditRecord]:
        """Matching records, oldest first; with ``limit``, the newest ``limit`` of them."""
        params = {"meter": meter, "command": command, "since": since, "limit": -1 if limit is None else limit}
        return list(reversed(list(self._rows(_QUERY, params))))


def _check_version(conn: sqlite3.Connection, file: Path) -> None:
    try:
        conn.execute("PRAGMA busy_timeout=5000")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.Error as exc:
        conn.close()
        raise AuditError(f"cannot open audit log {file}: {exc}") from exc
    if version != SCHEMA_VERSION:
        conn.close()
        raise AuditError(f"{file} is not an audit log of schema version {SCHEMA_VERSION} (found {version})")


def _connect(file: Path, check_budget: float) -> sqlite3.Connection:
    """Open the log for writing, checked and set up; DamagedDatabase if SQLite finds it damaged."""
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        refuse_truncated(file)  # a truncated log would start over silently
        conn = checked_connection(
            file,
            what="audit_log",
            check_budget=check_budget,
            configure=_configure,
            migrate=_migrate,
            check_same_thread=False,
            isolation_level=None,
        )
    except (OSError, sqlite3.Error) as exc:
        raise AuditError(f"cannot open audit log {file}: {exc}") from exc
    _check_version(conn, file)
    return conn


def _configure(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    limit_cache(conn)
    limit_wal(conn)


def _migrate(conn: sqlite3.Connection) -> None:
    conn.executescript(_SCHEMA)
    conn.execute(_HEAD).fetchone()  # what every append reads first


def _last_readable(file: Path) -> str:
    """Best effort, read-only, bounded: the newest record a damaged log still shows."""
    try:
        conn = open_readonly(file)
    except sqlite3.Error:
        return "no record readable"
    try:
        with time_limit(conn, 1.0):
            row = conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    except sqlite3.Error:
        return "no record readable"
    finally:
        conn.close()
    if row is None:
        return "no record readable"
    return f"its last readable record: seq {row[0]} hash {row[1]}"

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
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from dataclasses import asdict, astuple, dataclass
from pathlib import Path
from typing import Any, Final, Self

import msgspec

__all__ = ["GENESIS", "AuditEntry", "AuditError", "AuditLog", "AuditRecord", "record_hash"]

GENESIS: Final = "0" * 64
SCHEMA_VERSION: Final = 1

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

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, readonly: bool = False) -> Self:
        """Open (creating it unless ``readonly``) the audit log at ``path``."""
        file = Path(path)
        try:
            if readonly:
                if not file.is_file():
                    raise AuditError(f"no audit log at {file}")
                conn = sqlite3.connect(f"{file.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
            else:
                file.parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(file, check_same_thread=False, isolation_level=None)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                conn.executescript(_SCHEMA)
            conn.execute("PRAGMA busy_timeout=5000")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.Error as exc:
            raise AuditError(f"cannot open audit log {file}: {exc}") from exc
        if version != SCHEMA_VERSION:
            conn.close()
            raise AuditError(f"{file} is not an audit log of schema version {SCHEMA_VERSION} (found {version})")
        return cls(conn, str(file), readonly=readonly)

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
            rows = self._conn.execute(sql, params).fetchall()
        for row in rows:
            yield AuditRecord(*row)

    def head(self) -> AuditRecord | None:
        """The newest record (its hash anchors the whole chain)."""
        return next(self._rows(_HEAD), None)

    def count(self) -> int:
        with self._lock:
            n: int = self._conn.execute("SELECT count(*) FROM audit").fetchone()[0]
        return n

    def verify(self) -> int | None:
        """Recompute the chain; the seq of the first record that does not fit, or None if all do.

        A changed record fails its own hash; a deleted or inserted one breaks the link (or the
        numbering) of the record after it.
        """
        prev, expected_seq = GENESIS, 1
        with self._lock:
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

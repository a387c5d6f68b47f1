"""The durable outbox: every reading is committed to SQLite before it counts as acquired.

One row per read (a ``ReadRecord``: one meter's values from one read), holding its readings
encoded as the MQTT batches carry them; every reading keeps its own row number (delivery order,
never reused) and deterministic id (a re-acquired reading is a counted duplicate, not a second
row). A reading leaves the outbox only through ``ack(row_ids)`` after a positive broker
acknowledgement, or through the counted
drop-oldest overflow policy; nothing is ever deleted by age, so a gateway clock step cannot
lose undelivered data. The gateway time at insert is kept only for the oldest-undelivered-age
metric.

Storage failures (disk full, I/O error, lock timeout) do not stop the daemon: the failing batch
is held in memory (bounded by ``hold_limit`` readings), an alarm is raised, and the batch is
retried until the storage takes it again. See docs/outbox.md for the durability of each
``synchronous`` setting and for why the default overflow policy refuses new readings.

A damaged database is found on open, within a time budget (``check_budget``): SQLite's own
errors on first use (not a database, malformed image) and ``PRAGMA quick_check``. The damaged
file (with its -wal and -shm) is renamed aside with a UTC timestamp and kept for forensics, a
fresh outbox (new instance id) is started, and the event is logged on one ERROR line and
counted (``counters["quarantined"]``): undelivered readings in the damaged file are not sent,
since nothing read from a damaged file can be trusted for billing. A write-ahead log that
disappeared while the -shm still says it held commits is detected too: the outbox keeps the
main file (what was checkpointed is intact) but takes a new instance id, so row numbers are
never reused under the old one, and counts ``wal_lost``.

``Outbox`` is synchronous and must be used from one thread; ``AsyncOutbox`` runs it on a
dedicated writer thread (so commit fsyncs never block the event loop) and group-commits
concurrent ``add``/``ack`` calls: the adds and acks of one writer turn share one transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import errno
import fcntl
import functools
import logging
import math
import os
import sqlite3
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import msgspec

from meter_gateway.drivers.log_limit import logfmt_value
from meter_gateway.drivers.reading import Quality, Reading, ReadRecord, records
from meter_gateway.gateway.daemon.logs import limited_kind_ended, log_limited
from meter_gateway.gateway.store import outbox_schema
from meter_gateway.gateway.store.outbox_schema import COUNTER_NAMES, SchemaError
from meter_gateway.gateway.store.outbox_sizing import transaction_rows, wal_limit
from meter_gateway.gateway.store.sqlite_check import (
    CACHE_KIB,
    DamagedDatabase,
    checked_connection,
    clear_damage_mark,
    damage_mark,
    is_damage,
    limit_cache,
    mark_damaged,
    open_store,
)
from meter_gateway.gateway.uplink.contract import WireReading, decode_readings, encode_readings

__all__ = [
    "AddResult",
    "AsyncOutbox",
    "Outbox",
    "OutboxDamaged",
    "OutboxError",
    "OutboxStats",
    "OverflowPolicy",
    "Record",
    "Row",
    "SchemaError",
    "SlotMark",
    "Synchronous",
]

log = logging.getLogger(__name__)
_T = TypeVar("_T")

DEFAULT_BUDGET_BYTES = 512 * 1024 * 1024
MIN_BUDGET_BYTES = 64 * 1024
DEFAULT_HOLD_LIMIT = 100_000
# Seconds the open-time quick_check may take: on a large backlog it stops there (logged) rather
# than delay the start. Measured on 1,000,000 rows: see docs/outbox.md "Damaged database".
DEFAULT_CHECK_BUDGET = 2.0
ACK_GROUP_ROWS = 20_000  # acked rows deleted per writer transaction at most (see AsyncOutbox._take_acks)
# A fresh database has too few rows for a measured per-row size; this is above the real
# figure (about 150-200 bytes a reading as one row each; less as records) so the budget errs on the safe side.
_INITIAL_ROW_ESTIMATE = 256
# Ids per "IN (...)" lookup, under SQLite's bound-parameter limit. A lookup is padded (with its
# last id again) to a power of two, for the same reason as the INSERTs' sizes: one cached
# statement per group size seen would pile up after a start-up catch-up (bench memory).
_IN_CHUNK = 512

# SQLite primary result codes (https://www.sqlite.org/rescode.html) we treat as "storage is
# unavailable right now": retry later instead of failing the daemon.
_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6
_SQLITE_IOERR = 10
_SQLITE_FULL = 13


class Synchronous(enum.StrEnum):
    """PRAGMA synchronous in WAL mode; docs/outbox.md says what survives a power cut with each."""

    NORMAL = "NORMAL"
    FULL = "FULL"
    EXTRA = "EXTRA"


class OverflowPolicy(enum.StrEnum):
    """What happens when the outbox reaches its disk budget (both counted)."""

    REFUSE_NEW = "refuse-new"  # keep every committed row; new readings are refused
    DROP_OLDEST = "drop-oldest"  # delete the oldest undelivered rows to make room


def _settings(
    synchronous: Synchronous | str, overflow_policy: OverflowPolicy | str, budget_bytes: int, hold_limit: int
) -> tuple[Synchronous, OverflowPolicy]:
    """The open-time settings checked, as their enums (OutboxError names the bad one)."""
    try:
        sync = Synchronous(str(synchronous).upper())
    except ValueError:
        raise OutboxError(f"outbox synchronous must be one of {', '.join(Synchronous)}, got {synchronous!r}") from None
    try:
        policy = OverflowPolicy(str(overflow_policy))
    except ValueError:
        raise OutboxError(
            f"outbox overflow policy must be one of {', '.join(OverflowPolicy)}, got {overflow_policy!r}"
        ) from None
    if budget_bytes < MIN_BUDGET_BYTES:
        raise OutboxError(f"outbox budget must be at least {MIN_BUDGET_BYTES} bytes, got {budget_bytes}")
    if hold_limit < 0:
        raise OutboxError(f"outbox hold limit must be >= 0, got {hold_limit}")
    return sync, policy


class OutboxError(Exception):
    """The outbox cannot be opened or used as asked."""


class OutboxDamaged(OutboxError):
    """SQLite found the open outbox damaged (malformed pages): nothing more can be trusted from it.
    The file is marked, so the next open quarantines it."""


class _StorageFailure(Exception):
    """A write transaction the storage refused (full, I/O error, busy), rolled back."""

    def __init__(self, cause: sqlite3.Error | OSError) -> None:
        super().__init__(str(cause))
        self.cause = cause


class Row(NamedTuple):
    """One undelivered reading as stored; ``added_at`` is gateway time at insert (metric only)."""

    row_id: int
    reading_id: str
    meter_id: str
    quantity: str
    value: float | int | str
    unit: str
    gateway_time: float
    meter_time: float | None
    slot: float | None
    quality: int
    added_at: float

    def reading(self) -> Reading:
        return Reading(
            meter_id=self.meter_id,
            quantity=self.quantity,
            value=self.value,
            unit=self.unit,
            gateway_time=self.gateway_time,
            meter_time=self.meter_time,
            slot=self.slot,
            quality=Quality(self.quality),
        )

    @classmethod
    def of(cls, w: WireReading, added_at: float) -> Row:
        return cls(w.row, w.id, w.meter, w.qty, w.value, w.unit, w.gt, w.mt, w.slot, w.q, added_at)


class Record(NamedTuple):
    """One stored read: its readings' row numbers span ``first_row``..``last_row`` (``n`` of them;
    fewer than the span once some were acked alone) and ``wire`` is their batch encoding."""

    first_row: int
    last_row: int
    n: int
    added_at: float
    wire: bytes

    def row_ids(self) -> list[int]:
        if self.n == self.last_row - self.first_row + 1:
            return list(range(self.first_row, self.last_row + 1))
        return [w.row for w in decode_readings(self.wire)]

    def rows(self) -> list[Row]:
        return [Row.of(w, self.added_at) for w in decode_readings(self.wire)]


_RECORD = "SELECT first_row, last_row, n, added_at, wire FROM reads "
# the record holding a row number, when one does (records never interleave)
_AT_OR_BEFORE = _RECORD + "WHERE first_row <= ? ORDER BY first_row DESC LIMIT 1"
_FROM = _RECORD + "WHERE first_row >= ? ORDER BY first_row LIMIT ?"
_INSERT_INTO = "INSERT INTO reads (first_row, last_row, n, key, added_at, wire) VALUES "
_INSERT_COLUMNS = 6
# Records per INSERT statement. Python's sqlite3 releases the GIL around every sqlite3_step, and
# executemany steps once per row: while the event loop is busy, each row then waits for the GIL
# (up to the switch interval) and steals the loop's turns. One multi-row statement is one step.
# Statements come in power-of-two sizes only: sqlite3 keeps every prepared statement it has seen
# (up to 128), and one per size would hold memory for nothing (bench memory).
_INSERT_ROWS = 64


@functools.cache
def _insert_sql(rows: int) -> str:
    return _INSERT_INTO + ",".join(["(" + ",".join("?" * _INSERT_COLUMNS) + ")"] * rows)


@functools.cache
def _lookup_sql(keys: int) -> str:
    # only "?" placeholders are interpolated; the keys themselves are bound
    return f"SELECT key, wire FROM reads WHERE key IN ({','.join('?' * keys)})"  # noqa: S608


def _seq(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'readings'").fetchone()
    return int(row[0]) if row else 0


def _depth(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT coalesce(sum(n), 0) FROM reads").fetchone()[0])


def _record_key(reading_id: str) -> str:
    """The ``key`` of the record a reading id belongs to: ``{meter}/{stamp}`` (a meter id has no "/")."""
    return reading_id[: reading_id.find("/")] + reading_id[reading_id.rfind("/") :]


def _insert(conn: sqlite3.Connection, rows: Sequence[tuple[object, ...]]) -> None:
    """INSERT ``rows`` (``_records`` tuples), in order, in few statements (GIL hand-overs)."""
    start = 0
    while start < len(rows):
        size = min(_INSERT_ROWS, 1 << ((len(rows) - start).bit_length() - 1))  # largest power of two left
        conn.execute(_insert_sql(size), [x for row in rows[start : start + size] for x in row])
        start += size


class SlotMark(NamedTuple):
    """The poll slot a read's readings belong to, recorded with them (``committed_slots``)."""

    group: str
    meter: str
    slot: int


@dataclass(frozen=True, slots=True)
class AddResult:
    """What became of the readings handed to one ``add`` call (and of earlier held ones)."""

    committed: int = 0  # newly committed rows
    duplicates: int = 0  # already in the outbox (same reading id): ignored
    held: int = 0  # readings now waiting in memory for the storage to come back (all calls)
    refused: int = 0  # not taken: budget full under refuse-new, or the hold buffer full
    dropped: int = 0  # oldest undelivered rows deleted to make room (drop-oldest policy)
    invalid: int = 0  # not storable (wrong types, non-finite timestamps): counted, logged, not stored


@dataclass(frozen=True, slots=True)
class OutboxStats:
    path: str
    schema_version: int
    instance: str
    synchronous: str
    overflow_policy: str
    budget_bytes: int
    depth: int
    last_row_id: int
    oldest_row_id: int | None
    oldest_added_at: float | None
    live_bytes: int
    file_bytes: int
    wal_bytes: int
    storage_alarm: str | None  # None, or why the storage refuses writes ("disk full", ...)
    held: int
    pending_acks: int
    counters: dict[str, int] = field(default_factory=dict)  # this process
    totals: dict[str, int] = field(default_factory=dict)  # lifetime, persisted
    quarantined: str | None = None  # where a damaged database was moved on open (this process)

    def oldest_age(self, now: float) -> float | None:
        """Seconds the oldest undelivered reading has waited (never negative after a clock step)."""
        if self.oldest_added_at is None:
            return None
        return max(0.0, now - self.oldest_added_at)


# The counters a write transaction persists with its rows.
_WRITE_COUNTERS: tuple[str, ...] = ("delivered", "committed", "duplicates", "overflow_dropped", "refused")

# Process-only counters (not persisted): a quarantine starts a fresh file, so it cannot be a
# lifetime total of that file.
PROCESS_COUNTERS: tuple[str, ...] = ("storage_errors", "quarantined", "wal_lost")


def _classify(exc: BaseException) -> str | None:
    """Name the storage failure, or None when the error is not one to ride out."""
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        primary = code & 0xFF if isinstance(code, int) else None
        text = str(exc).lower()
        if primary == _SQLITE_FULL or "database or disk is full" in text:
            return "disk full"
        if primary == _SQLITE_IOERR or "disk i/o error" in text:
            return "I/O error"
        if primary in (_SQLITE_BUSY, _SQLITE_LOCKED) or "database is locked" in text:
            return "database busy"
        return None
    if isinstance(exc, OSError):
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return "disk full"
        return "I/O error"
    return None


# Values SQLite cannot hold as numbers (it stores NaN as NULL; ints beyond 64 bits overflow)
# travel as strings, so nothing the meter said is lost: a float32 register can hold a NaN.
_INT64 = (-(2**63), 2**63 - 1)


def _number_text(value: object) -> str:
    if isinstance(value, float):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return str(value)


def _stamp_ok(t: object) -> bool:
    return (type(t) is float and math.isfinite(t)) or type(t) is int


def _problem(r: Reading) -> str | None:
    """Why a reading cannot be stored as is: None (fine), "convert" (value as text) or a reason."""
    if type(r.meter_id) is not str or type(r.quantity) is not str or type(r.unit) is not str:
        return "meter id, quantity and unit must be text"
    if not _stamp_ok(r.gateway_time):
        return f"gateway time {r.gateway_time!r} is not a finite number"
    if (r.meter_time is not None and not _stamp_ok(r.meter_time)) or (r.slot is not None and not _stamp_ok(r.slot)):
        return "meter time and slot must be finite numbers"
    v = r.value
    if isinstance(v, float):
        return None if math.isfinite(v) else "convert"
    if isinstance(v, int):
        return None if _INT64[0] <= v <= _INT64[1] else "convert"
    if isinstance(v, str):
        return None
    return f"value of type {type(v).__name__} is not a number or text"


def _record_ok(rec: ReadRecord) -> bool:
    """Whether a record can be stored as is (checked once per read; values one by one)."""
    if type(rec.meter_id) is not str or not _stamp_ok(rec.gateway_time):
        return False
    if (rec.meter_time is not None and not _stamp_ok(rec.meter_time)) or (
        rec.slot is not None and not _stamp_ok(rec.slot)
    ):
        return False
    for v in rec.values:
        t = type(v)
        if t is float:
            if not math.isfinite(v):  # type: ignore[arg-type]
                return False
        elif t is int:
            if not _INT64[0] <= v <= _INT64[1]:  # type: ignore[operator]
                return False
        elif t is not str:
            return False
    return all(type(x) is str for x in rec.quantities) and all(type(x) is str for x in rec.units)


def _storable(group: Sequence[Reading]) -> tuple[list[ReadRecord], int]:
    """The reads of a batch the outbox can store, as records, and how many readings it cannot
    (logged once). A record is checked as a whole; only one that fails is looked at by reading."""
    out: list[ReadRecord] = []
    bad = 0
    first: str | None = None
    for rec in records(group):
        if _record_ok(rec):
            out.append(rec)
            continue
        fixed: list[Reading] = []
        for r in rec.readings():
            problem = _problem(r)
            if problem is None:
                fixed.append(r)
            elif problem == "convert":
                fixed.append(msgspec.structs.replace(r, value=_number_text(r.value)))
            else:
                bad += 1
                first = first or f"{r.id}: {problem}"
        out += records(fixed)
    if bad:
        log_limited(
            log,
            logging.WARNING,
            "outbox.invalid",
            "event=outbox_refused_invalid count=%d first=%s",
            bad,
            logfmt_value(first),
        )
    return out, bad


def _size_of(recs: Iterable[ReadRecord]) -> int:
    """Readings in some records."""
    return sum(len(rec.quantities) for rec in recs)


def _subset(rec: ReadRecord, keep: Sequence[int]) -> ReadRecord:
    """The record with only the readings at positions ``keep``."""
    return msgspec.structs.replace(
        rec,
        quantities=tuple(rec.quantities[i] for i in keep),
        values=tuple(rec.values[i] for i in keep),
        units=tuple(rec.units[i] for i in keep),
        qualities=tuple(rec.qualities[i] for i in keep),
    )


def _cut(recs: Sequence[ReadRecord], n: int) -> list[ReadRecord]:
    """The first ``n`` readings of some records (the last record cut if need be)."""
    out: list[ReadRecord] = []
    for rec in recs:
        if n <= 0:
            break
        size = len(rec.quantities)
        out.append(rec if size <= n else _subset(rec, range(n)))
        n -= size
    return out


def _encode_record(rec: ReadRecord, first_row: int, now: float) -> tuple[object, ...]:
    """A record's INSERT parameters (see ``_INSERT_INTO``), its readings numbered from
    ``first_row`` and encoded here, once, as batches carry them."""
    stamp = rec.stamp
    meter, gt, mt, slot = rec.meter_id, rec.gateway_time, rec.meter_time, rec.slot
    wire = [
        WireReading(f"{meter}/{qty}/{stamp}", row, meter, qty, value, unit, gt, q, mt, slot)
        for row, qty, value, unit, q in zip(
            range(first_row, first_row + len(rec.quantities)),
            rec.quantities,
            rec.values,
            rec.units,
            rec.qualities,
            strict=True,
        )
    ]
    return (first_row, first_row + len(wire) - 1, len(wire), f"{meter}/{stamp}", now, encode_readings(wire))


def _runs(ids: Sequence[int]) -> Iterator[tuple[int, int]]:
    """Contiguous runs of sorted unique ids, so an ack of a batch is one range delete."""
    it = iter(ids)
    try:
        start = prev = next(it)
    except StopIteration:
        return
    for i in it:
        if i != prev + 1:
            yield start, prev
            start = i
        prev = i
    yield start, prev


class Outbox:
    """Synchronous outbox on one SQLite connection; use it from a single thread."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        path: Path,
        *,
        synchronous: Synchronous,
        budget_bytes: int,
        overflow_policy: OverflowPolicy,
        hold_limit: int,
        clock: Callable[[], float],
        lock_fd: int | None,
        readonly: bool = False,
    ) -> None:
        self._conn = conn
        self.path = path
        self.synchronous = synchronous
        self.budget_bytes = budget_bytes
        self.overflow_policy = overflow_policy
        self.hold_limit = hold_limit
        self._clock = clock
        self._lock_fd = lock_fd
        self.readonly = readonly
        self._page_size: int = conn.execute("PRAGMA page_size").fetchone()[0]
        self.schema_version = outbox_schema.version(conn)
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        self.instance: str = meta.get("instance", "")
        self._depth: int = _depth(conn)
        self._last_row_id: int = _seq(conn)
        self._totals: dict[str, int] = dict.fromkeys(COUNTER_NAMES, 0)
        self._totals.update(dict(conn.execute("SELECT name, value FROM counters").fetchall()))
        self.counters: dict[str, int] = dict.fromkeys((*COUNTER_NAMES, *PROCESS_COUNTERS), 0)
        self.quarantined: Path | None = None  # set by open() when it moved a damaged file aside
        self._unflushed: dict[str, int] = {}  # counter increments not yet persisted
        self._next_row = self._last_row_id + 1  # row number of the next reading committed
        self._held: list[Reading] = []
        self._pending_acks: set[int] = set()
        self._alarm: str | None = None
        self._closed = False
        # WAL bounded from the budget (outbox_sizing): checkpointed and truncated past this size
        self.wal_limit = wal_limit(budget_bytes)
        self.transaction_rows = transaction_rows(budget_bytes)  # held readings per retry transaction
        self._wal_path = Path(f"{path}-wal")
        self.wal_high_water = _size(self._wal_path)  # largest -wal seen after a write
        # -wal file size at which the automatic checkpoint has run (its limit counts frames,
        # each a page and a header); the file reaches ``wal_limit`` a few commits before that
        pages = self.wal_limit // self._page_size
        self._wal_checkpointed = _WAL_HEADER + pages * (self._page_size + _WAL_FRAME_HEADER)
        self._wal_over = False  # the -wal was past that size after the last write
        self._over_budget = False
        # Bytes of pages in use as the last write left them, or more (deletes since then free
        # pages without measuring); see _commit.
        self._live = 0
        self._recovered = 0  # held readings committed since the storage alarm was raised
        if not readonly:
            self._live = self.live_bytes()
            self._update_over_budget()

    # -- opening ----------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        synchronous: Synchronous | str = Synchronous.FULL,
        budget_bytes: int = DEFAULT_BUDGET_BYTES,
        overflow_policy: OverflowPolicy | str = OverflowPolicy.REFUSE_NEW,
        hold_limit: int = DEFAULT_HOLD_LIMIT,
        page_limit: int | None = None,
        clock: Callable[[], float] = time.time,
        check_budget: float = DEFAULT_CHECK_BUDGET,
    ) -> Outbox:
        """Open (creating and migrating as needed) the outbox at ``path`` for writing.

        ``page_limit`` is a hard cap on the database file in pages (PRAGMA max_page_count): the
        storage then reports "disk full" at that size. It is a backstop for storage that must
        never grow past a size, and how tests fill the "disk" without filling a real one.

        ``check_budget``: seconds the open-time ``quick_check`` may run (0 skips it). A damaged
        file is quarantined and a fresh outbox started (see the module doc); ``quarantined``
        then names where the damaged file went.
        """
        sync, policy = _settings(synchronous, overflow_policy, budget_bytes, hold_limit)
        db = Path(path)
        if not db.parent.is_dir():
            raise OutboxError(f"outbox directory {db.parent} does not exist")
        lock_fd = _lock(db)

        def connect() -> Outbox:
            marked = damage_mark(db)
            if marked is not None:  # found damaged while in use: quick_check may not see it
                raise DamagedDatabase(f"found damaged while in use: {marked}")
            conn = checked_connection(
                db,
                what="outbox",
                check_budget=check_budget,
                configure=lambda c: _configure(c, db, sync, page_limit, wal_limit(budget_bytes)),
                migrate=outbox_schema.migrate,
                isolation_level=None,
                check_same_thread=False,
                timeout=5.0,
            )
            try:
                return cls(
                    conn,
                    db,
                    synchronous=sync,
                    budget_bytes=budget_bytes,
                    overflow_policy=policy,
                    hold_limit=hold_limit,
                    clock=clock,
                    lock_fd=lock_fd,
                )
            except sqlite3.DatabaseError as exc:
                conn.close()
                if is_damage(exc):
                    raise DamagedDatabase(str(exc)) from exc
                raise
            except BaseException:
                conn.close()
                raise

        def moved(aside: Path, reason: str) -> None:
            _log_quarantine(db, aside, reason)
            clear_damage_mark(db)

        def fresh_damaged(again: DamagedDatabase) -> OutboxError:
            return OutboxError(f"outbox {db}: a fresh database is damaged too: {again}")

        try:
            lost_frames = _wal_lost(db)
            box, aside, reason = open_store(db, connect, fresh_damaged=fresh_damaged, on_moved=moved)
            if aside is not None:
                box._note_quarantine(aside, reason)
            elif lost_frames:
                box._note_wal_lost(lost_frames)
        except BaseException:
            os.close(lock_fd)
            raise
        return box

    @classmethod
    def open_readonly(cls, path: str | os.PathLike[str]) -> Outbox:
        """Open an existing outbox for inspection while the daemon may be writing to it."""
        db = Path(path)
        if not db.is_file():
            raise OutboxError(f"no outbox at {db}")
        conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
        try:
            _check_current(conn, db)
            return cls(
                conn,
                db,
                synchronous=Synchronous.NORMAL,
                budget_bytes=DEFAULT_BUDGET_BYTES,
                overflow_policy=OverflowPolicy.REFUSE_NEW,
                hold_limit=0,
                clock=time.time,
                lock_fd=None,
                readonly=True,
            )
        except BaseException:
            conn.close()
            raise

    # -- state -------------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Committed, undelivered rows."""
        return self._depth

    @property
    def last_row_id(self) -> int:
        """Highest row id ever committed to this outbox (row ids are never reused)."""
        return self._last_row_id

    @property
    def held(self) -> int:
        """Readings waiting in memory because the storage refused them."""
        return len(self._held)

    @property
    def pending_acks(self) -> int:
        return len(self._pending_acks)

    @property
    def storage_alarm(self) -> str | None:
        return self._alarm

    def _note_quarantine(self, aside: Path, reason: str) -> None:
        self.quarantined = aside
        self.counters["quarantined"] += 1
        self._set_meta({"quarantined_from": str(aside), "quarantine_reason": reason[:500]})

    def _note_wal_lost(self, frames: int) -> None:
        """The -wal vanished with commits in it: those rows are gone, and the main file's row
        sequence may be behind numbers the head-end has already seen. A new instance id tells
        the head-end that numbering restarted, so no row number is reused under the old one."""
        old = self.instance
        self.instance = uuid.uuid4().hex
        self.counters["wal_lost"] += 1
        self._set_meta({"instance": self.instance, "wal_lost_from_instance": old})
        log.error(
            "event=outbox_wal_lost path=%s frames=%d old_instance=%s new_instance=%s "
            "detail='the write-ahead log was removed while it held commits: readings committed after the "
            "last checkpoint are lost; row numbering restarts under the new instance'",
            self.path,
            frames,
            old,
            self.instance,
        )

    def _set_meta(self, values: dict[str, str]) -> None:
        with contextlib.suppress(sqlite3.Error):  # forensics only: never a reason not to start
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                list(values.items()),
            )
            self._conn.execute("COMMIT")
        self._rollback()
        if not self.readonly:
            self._live = self.live_bytes()

    def set_page_limit(self, pages: int | None) -> None:
        """Change the hard page cap (None: SQLite's default maximum)."""
        value = 0xFFFFFFFE if pages is None else int(pages)
        self._conn.execute(f"PRAGMA max_page_count = {value:d}")

    # -- writing -----------------------------------------------------------------------------

    def add(self, readings: Iterable[Reading], *, mark: SlotMark | None = None) -> AddResult:
        """Commit a batch in one transaction (after any held readings, which keep their order);
        ``mark``: the poll slot it read, recorded in the same transaction (see committed_slots)."""
        results, _ = self.write([list(readings)], [], [mark])
        return results[0]

    def ack(self, row_ids: Iterable[int]) -> int:
        """Delete delivered rows by row id; returns how many were still there."""
        _, counts = self.write([], [list(row_ids)])
        return counts[0]

    def retry_held(self) -> AddResult:
        """Try again to commit held readings and pending acks (call while ``storage_alarm``)."""
        self.write([], [])
        return AddResult(held=len(self._held))

    def write(
        self,
        adds: Sequence[Sequence[Reading]],
        acks: Sequence[Sequence[int]],
        marks: Sequence[SlotMark | None] = (),
    ) -> tuple[list[AddResult], list[int]]:
        """Group commit: the acks and the adds of one writer turn in one transaction (one fsync).

        If that transaction fails, each part is tried alone: deletes that free space still
        commit when the disk refuses the inserts. ``marks`` (parallel to ``adds``, missing ones
        None) are recorded with the adds they go with. Returns one AddResult per add group and
        one delivered count per ack group.
        """
        if self.readonly:
            raise OutboxError(f"outbox {self.path} is open read-only")
        if self._closed:
            raise OutboxError(f"outbox {self.path} is closed")
        work: list[list[ReadRecord]] = []
        invalid: list[int] = []
        for group in adds:
            ok, bad = _storable(group)
            work.append(ok)
            invalid.append(bad)
        self._count("invalid", sum(invalid))
        ack_groups = [sorted(set(group)) for group in acks]
        acking = bool(ack_groups or self._pending_acks)
        adding = bool(self._held or any(work))
        # A held backlog larger than one transaction goes back in bounded ones (_add_part).
        if acking and adding and len(self._held) <= self.transaction_rows:
            try:
                ack_counts, results = self._commit(ack_groups, work, marks, acking=True)
            except _StorageFailure:
                ack_counts = self._ack_part(ack_groups)
                results = self._add_part(work, marks)
        else:
            ack_counts = self._ack_part(ack_groups)
            results = self._add_part(work, marks)
        self._trim_wal()
        results = [dataclasses.replace(r, invalid=n) if n else r for r, n in zip(results, invalid, strict=True)]
        return results, ack_counts

    def _trim_wal(self) -> None:
        """Checkpoint and truncate the WAL when the automatic checkpoint could not restart it: a
        reader in the middle of a peek keeps the log from restarting, and it then grows.

        The commit that crosses the limit runs the automatic checkpoint and leaves the file past
        it until the next commit restarts the log and SQLite truncates it back
        (journal_size_limit); still past it after that next commit means no restart happened.
        Truncating at the first crossing would make every later commit grow the file again. A
        checkpoint that cannot finish (no space, busy) is tried again after the next write."""
        size = _size(self._wal_path)
        self.wal_high_water = max(self.wal_high_water, size)
        over = size >= self._wal_checkpointed
        if over and self._wal_over:
            with contextlib.suppress(sqlite3.Error):
                busy, _, _ = self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                over = bool(busy)
        self._wal_over = over

    def _ack_part(self, groups: Sequence[Sequence[int]]) -> list[int]:
        """The acks (and those pending) in a transaction of their own; kept pending on failure."""
        if not groups and not self._pending_acks:
            return []
        try:
            counts, _ = self._commit(groups, [], acking=True, held_rows=0)
        except _StorageFailure as failure:
            self._storage_failed(failure.cause)
            for group in groups:
                self._pending_acks.update(group)
            return [0] * len(groups)
        return counts

    def _delete_ids(self, ids: Sequence[int]) -> int:
        deleted = 0
        for first, last in _runs(ids):
            deleted += self._delete_range(first, last)
        return deleted

    def _delete_range(self, first: int, last: int) -> int:
        """Delete the readings with row numbers ``first``..``last``; return how many there were.

        Records wholly inside go in one range delete; a record the range cuts (an ack of single
        rows, not the uplink's, which acks whole records) is rewritten with its other readings."""
        conn = self._conn
        deleted = 0
        cut = [Record._make(r) for r in conn.execute(_AT_OR_BEFORE, (first - 1,))]
        cut = [rec for rec in cut if rec.last_row >= first]
        cut += map(
            Record._make,
            conn.execute(_RECORD + "WHERE first_row BETWEEN ? AND ? AND last_row > ?", (first, last, last)),
        )
        for rec in cut:
            wires = decode_readings(rec.wire)
            keep = [w for w in wires if not first <= w.row <= last]
            deleted += len(wires) - len(keep)
            key = _record_key(wires[0].id)
            conn.execute("DELETE FROM reads WHERE first_row = ?", (rec.first_row,))
            if keep:
                conn.execute(
                    _insert_sql(1), (keep[0].row, keep[-1].row, len(keep), key, rec.added_at, encode_readings(keep))
                )
        (whole,) = conn.execute(
            "SELECT coalesce(sum(n), 0) FROM reads WHERE first_row BETWEEN ? AND ? AND last_row <= ?",
            (first, last, last),
        ).fetchone()
        if whole:
            conn.execute("DELETE FROM reads WHERE first_row BETWEEN ? AND ? AND last_row <= ?", (first, last, last))
        return deleted + int(whole)

    def _add_part(self, work: list[list[ReadRecord]], marks: Sequence[SlotMark | None] = ()) -> list[AddResult]:
        """The adds (after held readings) in transactions of their own; held on failure."""
        # A backlog held through a storage failure goes back in bounded transactions, oldest
        # first: in one transaction, 100,000 readings need tens of MiB of WAL that a small state
        # partition does not have, and the retry would fail for good.
        while len(self._held) > self.transaction_rows:
            before = len(self._held)
            self._add_once([], held_rows=self.transaction_rows)
            if len(self._held) >= before:  # still failing: the new readings wait behind the backlog
                return self._hold(work)
        return self._add_once(work, marks)

    def _add_once(
        self, work: list[list[ReadRecord]], marks: Sequence[SlotMark | None] = (), held_rows: int | None = None
    ) -> list[AddResult]:
        if not self._held and not any(work):
            return [AddResult() for _ in work]
        try:
            _, results = self._commit([], work, marks, held_rows=held_rows)
        except _StorageFailure as failure:
            self._storage_failed(failure.cause)
            return self._hold(work)
        return results

    def _commit(
        self,
        ack_groups: Sequence[Sequence[int]],
        work: list[list[ReadRecord]],
        marks: Sequence[SlotMark | None] = (),
        *,
        acking: bool = False,
        held_rows: int | None = None,
    ) -> tuple[list[int], list[AddResult]]:
        """One transaction: when ``acking``, delete the pending acks and ``ack_groups`` (sorted
        unique ids); then insert the first ``held_rows`` held readings (all when None), ``work``
        and the ``marks`` of its groups whose readings were all taken. Returns the delivered
        count per ack group and one AddResult per work group.

        The deletes come first, so the budget sees the room they free. Nothing in memory
        changes unless the COMMIT succeeds; a storage failure is rolled back and raised as
        ``_StorageFailure`` (anything else is raised as it is)."""
        # Held readings go first so the outbox keeps acquisition order; they belong to no caller.
        take = len(self._held) if held_rows is None else min(held_rows, len(self._held))
        held = self._held[:take]
        attempt = [records(held), *work] if held else work
        deltas: dict[str, int] = dict.fromkeys(_WRITE_COUNTERS, 0)
        counts: list[int] = []
        results: list[AddResult] = []
        last_row = self._last_row_id
        live: int | None = None
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            if acking:
                deltas["delivered"] = self._delete_ids(sorted(self._pending_acks))
                counts = [self._delete_ids(group) for group in ack_groups]
                deltas["delivered"] += sum(counts)
            depth = self._depth - deltas["delivered"]
            if any(attempt):
                self._next_row = self._last_row_id + 1  # the only writer: the file is locked
                now = self._clock()
                roomy = self._roomy(sum(map(_size_of, attempt)), depth)
                for result in self._insert_all(attempt, now) if roomy else self._insert_each(attempt, now, depth):
                    depth += result.committed - result.dropped
                    deltas["committed"] += result.committed
                    deltas["duplicates"] += result.duplicates
                    deltas["overflow_dropped"] += result.dropped
                    deltas["refused"] += result.refused
                    results.append(result)
                last_row = self._next_row - 1
                if last_row != self._last_row_id:
                    conn.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'readings'", (last_row,))
                self._mark_slots(marks, results[1:] if held else results)
            else:
                results = [AddResult() for _ in work]
            self._flush_counters(deltas)
            # Pages in use as this transaction leaves them. Only inserts add pages: after deletes
            # alone the last figure stays an upper bound, measured again only when it matters.
            if any(attempt) or (self._over_budget and deltas["delivered"]):
                live = self.live_bytes()
            conn.execute("COMMIT")
        except (sqlite3.Error, OSError) as exc:
            self._rollback()
            if _classify(exc) is None:
                raise
            raise _StorageFailure(exc) from exc
        if acking:
            self._pending_acks.clear()
        del self._held[:take]
        self._depth = depth
        self._last_row_id = last_row
        self._committed_counters(deltas)
        if held:
            self._recovered += results[0].committed
            results = results[1:]
        self._storage_ok()
        if live is not None:
            self._live = live
            self._update_over_budget()
        return counts, results

    def _mark_slots(self, marks: Sequence[SlotMark | None], results: Sequence[AddResult]) -> None:
        # A refused read is not marked: its slot may be read again once there is room. A mark
        # never moves back (a late commit of an older slot, a backfill).
        rows = [m for m, r in zip(marks, results, strict=False) if m is not None and not r.refused]
        if rows:
            self._conn.executemany(
                "INSERT INTO committed_slots (grp, meter, slot) VALUES (?, ?, ?) "
                "ON CONFLICT (grp, meter) DO UPDATE SET slot = max(slot, excluded.slot)",
                rows,
            )

    def committed_slots(self) -> dict[tuple[str, str], int]:
        """(group, meter) -> the latest poll slot whose readings were committed."""
        rows = self._conn.execute("SELECT grp, meter, slot FROM committed_slots").fetchall()
        return {(g, m): int(slot) for g, m, slot in rows}

    def _update_over_budget(self) -> None:
        """Whether the pages in use reached the budget (less a margin): the poller stops issuing
        reads under ``pause_polling`` while it is so. The margin, and twice it to clear, keep a
        poll cycle's readings from being refused first and the state from flapping at each ack."""
        live = self._live
        margin = min(max(self.budget_bytes // 32, 64 * 1024), self.budget_bytes // 4)
        limit = self.budget_bytes - (2 * margin if self._over_budget else margin)
        over = live >= limit if not self._over_budget else live > limit
        if over == self._over_budget:
            return
        self._over_budget = over
        if over:
            log.warning(
                "event=outbox_over_budget path=%s live_bytes=%d budget_bytes=%d policy=%s",
                self.path,
                live,
                self.budget_bytes,
                self.overflow_policy.value,
            )
        else:
            log.info(
                "event=outbox_within_budget path=%s live_bytes=%d budget_bytes=%d", self.path, live, self.budget_bytes
            )

    @property
    def over_budget(self) -> bool:
        """True from when the pages in use come within a margin of the budget until deliveries
        free twice that margin (see ``_update_over_budget``)."""
        return self._over_budget

    def _roomy(self, n: int, depth: int) -> bool:
        """Whether ``n`` new rows fit the budget with as much again to spare: then the batch is
        inserted whole, without the per-group budget checks (each measures the pages in use).
        The last measured figure answers without a query when it leaves room: it can only be
        above the pages in use now, as only inserts add pages."""
        if self._budget_plan(2 * n, depth, self._live) == (2 * n, 0):
            return True
        return self._budget_plan(2 * n, depth) == (2 * n, 0)

    def _insert_all(self, groups: list[list[ReadRecord]], now: float) -> list[AddResult]:
        """Insert every group's new readings together; one result per group."""
        fresh = self._fresh([rec for group in groups for rec in group])
        # Every fresh record is inserted: the lookup and the INSERT share this write transaction.
        self._insert_fresh(fresh, now)
        results = []
        start = 0
        for group in groups:
            committed = _size_of(rec for rec in fresh[start : start + len(group)] if rec is not None)
            start += len(group)
            results.append(AddResult(committed=committed, duplicates=_size_of(group) - committed))
        return results

    def _insert_each(self, groups: list[list[ReadRecord]], now: float, depth: int) -> list[AddResult]:
        """Insert group by group, checking the budget (and applying its policy) before each."""
        results = []
        for group in groups:
            result = self._insert_group(group, now, depth)
            depth += result.committed - result.dropped
            results.append(result)
        return results

    def _insert_group(self, group: list[ReadRecord], now: float, depth: int) -> AddResult:
        if not group:
            return AddResult()
        size = _size_of(group)
        take, drop = self._budget_plan(size, depth)
        dropped = 0
        if drop:
            dropped = self._drop_oldest(drop)
            log_limited(
                log,
                logging.WARNING,
                "outbox.dropped",
                "event=outbox_dropped reason=over_budget count=%d which=oldest_undelivered",
                dropped,
            )
        refused = size - take
        if refused:
            log_limited(
                log,
                logging.WARNING,
                "outbox.refused",
                "event=outbox_refused reason=over_budget budget_bytes=%d count=%d",
                self.budget_bytes,
                refused,
            )
        fresh = self._fresh(_cut(group, take))
        self._insert_fresh(fresh, now)
        committed = _size_of(rec for rec in fresh if rec is not None)
        return AddResult(committed=committed, duplicates=take - committed, refused=refused, dropped=dropped)

    def _fresh(self, recs: Sequence[ReadRecord]) -> list[ReadRecord | None]:
        """Each record with only its readings not yet in the outbox by id (first of each id
        only), or None when none is new; in order, one per record.

        One index probe per read (its meter and stamp), not per reading: only a read whose key
        is found (a re-acquisition, or another poll group of the meter in the same slot) has its
        readings' ids compared. Filtering before the INSERT keeps row numbers gap-free, and a
        gap must mean loss to the head-end.
        """
        keys = [rec.key for rec in recs]
        stored: dict[str, set[str]] = {}
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), _IN_CHUNK):
            chunk = unique[start : start + _IN_CHUNK]
            size = 1 << (len(chunk) - 1).bit_length()
            chunk += chunk[-1:] * (size - len(chunk))
            for key, wire in self._conn.execute(_lookup_sql(size), chunk):
                stored.setdefault(key, set()).update(w.id for w in decode_readings(wire))
        taken: dict[str, list[ReadRecord]] = {}  # records taken whole, ids not yet listed
        out: list[ReadRecord | None] = []
        for rec, key in zip(recs, keys, strict=True):
            if key not in stored and key not in taken and len(set(rec.quantities)) == len(rec.quantities):
                taken[key] = [rec]
                out.append(rec)
                continue
            seen = stored.setdefault(key, set())
            for earlier in taken.pop(key, ()):
                seen.update(earlier.ids())
            keep = []
            for i, rid in enumerate(rec.ids()):
                if rid not in seen:
                    seen.add(rid)
                    keep.append(i)
            out.append(None if not keep else rec if len(keep) == len(rec.quantities) else _subset(rec, keep))
        return out

    def _insert_fresh(self, recs: Sequence[ReadRecord | None], now: float) -> None:
        """Insert records (``_fresh``'s) in order, numbering their readings' rows on."""
        rows: list[tuple[object, ...]] = []
        for rec in recs:
            if rec is not None:
                rows.append(_encode_record(rec, self._next_row, now))
                self._next_row += len(rec.quantities)
        _insert(self._conn, rows)

    def _drop_oldest(self, n: int) -> int:
        """Delete the oldest records holding at least ``n`` readings (whole reads); return how many readings."""
        dropped = 0
        last = None
        for first_row, count in self._conn.execute("SELECT first_row, n FROM reads ORDER BY first_row"):
            dropped += count
            last = first_row
            if dropped >= n:
                break
        if last is not None:
            self._conn.execute("DELETE FROM reads WHERE first_row <= ?", (last,))
        return dropped

    def _budget_plan(self, n: int, depth: int, live: int | None = None) -> tuple[int, int]:
        """(how many of ``n`` new readings to take, how many oldest rows to drop first), with
        ``live`` bytes of pages in use (None: measured now, in the open transaction)."""
        if live is None:
            live = self.live_bytes()
        per_row = live // depth if depth >= 64 else _INITIAL_ROW_ESTIMATE
        room = max(0, (self.budget_bytes - live) // max(per_row, 1))
        if n <= room:
            return n, 0
        if self.overflow_policy is OverflowPolicy.REFUSE_NEW:
            return room, 0
        return n, min(n - room, depth)

    def _hold(self, work: list[list[ReadRecord]]) -> list[AddResult]:
        """Keep the readings of a failed attempt in memory, after those held from earlier;
        refuse what exceeds the hold limit."""
        results: list[AddResult] = []
        refused_total = 0
        for group in ([r for rec in recs for r in rec.readings()] for recs in work):
            space = max(0, self.hold_limit - len(self._held))
            self._held.extend(group[:space])
            refused = len(group) - min(space, len(group))
            refused_total += refused
            results.append(AddResult(refused=refused))
        if refused_total:
            self._count("refused", refused_total)
            log_limited(
                log,
                logging.ERROR,
                "outbox.hold_full",
                "event=outbox_refused reason=storage_unavailable held=%d count=%d",
                self.hold_limit,
                refused_total,
            )
        return [AddResult(held=len(self._held), refused=r.refused) for r in results]

    def _count(self, name: str, n: int) -> None:
        """Count an event that happened outside a successful transaction (persisted later)."""
        if not n:
            return
        self.counters[name] += n
        if name in self._totals:
            self._totals[name] += n
            self._unflushed[name] = self._unflushed.get(name, 0) + n

    def _flush_counters(self, deltas: dict[str, int]) -> None:
        """Persist counter increments inside the caller's open transaction."""
        merged = dict(self._unflushed)
        for name, n in deltas.items():
            merged[name] = merged.get(name, 0) + n
        rows = [(name, n) for name, n in merged.items() if n and name in self._totals]
        if rows:
            # an upsert, so a counter added to COUNTER_NAMES later needs no migration step
            self._conn.executemany(
                "INSERT INTO counters (name, value) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
                rows,
            )

    def _committed_counters(self, deltas: dict[str, int]) -> None:
        for name, n in deltas.items():
            self.counters[name] += n
            self._totals[name] += n
        self._unflushed.clear()

    def _rollback(self) -> None:
        if self._conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")

    def _storage_failed(self, exc: BaseException) -> None:
        reason = _classify(exc)
        if reason is None:
            raise exc
        if self._alarm is None:
            if reason == "disk full":
                self._count("disk_full_events", 1)
            self.counters["storage_errors"] += 1
            log.error(
                "event=outbox_unavailable reason=%s error=%s holding=memory retrying=true",
                logfmt_value(reason),
                logfmt_value(exc),
            )
        self._alarm = reason

    def _storage_ok(self) -> None:
        if self._alarm is not None and not self._held and not self._pending_acks:
            # the one line that ends the episode the ERROR line began (docs/outbox.md)
            log.info(
                "event=outbox_storage_ok was=%r committed_held=%d detail='outbox storage available again'",
                self._alarm,
                self._recovered,
            )
            self._alarm = None
            self._recovered = 0
            limited_kind_ended("outbox.hold_full")

    # -- reading -----------------------------------------------------------------------------

    def peek(self, after_row_id: int = 0, limit: int = 1000) -> list[Row]:
        """Undelivered rows with row id > ``after_row_id``, in row-id order, at most ``limit``."""
        return _peek(self._conn, after_row_id, limit, self._pending_acks)

    def open_reader(self) -> OutboxReader:
        """A second connection for peeks from another thread (WAL readers never block the writer)."""
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA query_only = 1")
        limit_cache(conn)
        return OutboxReader(conn, self._pending_acks)

    def peek_records(self, after_row_id: int = 0, limit: int = 1000) -> list[Record]:
        return _peek_records(self._conn, after_row_id, limit, self._pending_acks)

    def get(self, key: int | str) -> Row | None:
        """One undelivered row by row id (int) or reading id (str)."""
        return _get(self._conn, key)

    def oldest_undelivered(self) -> tuple[int, float] | None:
        """(row id, gateway time at insert) of the oldest undelivered row, or None when empty."""
        row = self._conn.execute("SELECT first_row, added_at FROM reads ORDER BY first_row LIMIT 1").fetchone()
        return (row[0], row[1]) if row else None

    def live_bytes(self) -> int:
        """Bytes of database pages in use (the file may be larger: free pages are reused)."""
        pages: int = self._conn.execute(
            "SELECT page_count - freelist_count FROM pragma_page_count(), pragma_freelist_count()"
        ).fetchone()[0]
        return pages * self._page_size

    def stats(self) -> OutboxStats:
        oldest = self.oldest_undelivered()
        if self.readonly:
            # another process writes: read what is committed now rather than our cached view
            depth = _depth(self._conn)
            last = _seq(self._conn)
            totals = dict(self._conn.execute("SELECT name, value FROM counters").fetchall())
        else:
            depth, last, totals = self._depth, self._last_row_id, dict(self._totals)
        return OutboxStats(
            path=str(self.path),
            schema_version=self.schema_version,
            instance=self.instance,
            synchronous=self.synchronous.value,
            overflow_policy=self.overflow_policy.value,
            budget_bytes=self.budget_bytes,
            depth=depth,
            last_row_id=last,
            oldest_row_id=oldest[0] if oldest else None,
            oldest_added_at=oldest[1] if oldest else None,
            live_bytes=self.live_bytes(),
            file_bytes=_size(self.path),
            wal_bytes=_size(Path(f"{self.path}-wal")),
            storage_alarm=self._alarm,
            held=len(self._held),
            pending_acks=len(self._pending_acks),
            counters=dict(self.counters),
            totals=totals,
            quarantined=str(self.quarantined) if self.quarantined is not None else None,
        )

    def close(self) -> None:
        """Close; a last attempt is made to commit held readings (loss is logged if it fails)."""
        if self._closed:
            return
        try:
            if not self.readonly and (self._held or self._pending_acks):
                self.write([], [])
                if self._held:
                    log.error("event=outbox_closed_uncommitted count=%d reason=storage_unavailable", len(self._held))
            if not self.readonly:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            self._closed = True
            self._conn.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None


def _records_after(conn: sqlite3.Connection, after_row_id: int, limit: int) -> Iterator[Record]:
    """Up to ``limit`` records holding rows after ``after_row_id``, in row order (the first may
    also hold rows up to it: a record is cut only by an ack of single rows). Lazily: callers
    stop once they have enough readings."""
    start = after_row_id + 1
    held = conn.execute(_AT_OR_BEFORE, (start,)).fetchone()
    if held is not None and held[1] >= start:
        start = held[0]
    cursor = conn.execute(_FROM, (start, limit))
    try:
        yield from map(Record._make, cursor)
    finally:
        cursor.close()


def _peek(conn: sqlite3.Connection, after_row_id: int, limit: int, pending_acks: set[int]) -> list[Row]:
    out: list[Row] = []
    for rec in _records_after(conn, after_row_id, limit):
        out += [r for r in rec.rows() if r.row_id > after_row_id]
        if len(out) >= limit:
            del out[limit:]
            break
    if pending_acks:
        # rows whose ack is waiting for the storage were delivered: do not send them again
        out = [r for r in out if r.row_id not in pending_acks]
    return out


def _peek_records(conn: sqlite3.Connection, after_row_id: int, limit: int, pending_acks: set[int]) -> list[Record]:
    """Whole records (about ``limit`` readings' worth, at least one record) with rows after
    ``after_row_id``; rows at or before it, or waiting for their ack's commit, are left out."""
    out: list[Record] = []
    count = 0
    for rec in _records_after(conn, after_row_id, limit):
        if rec.first_row <= after_row_id or (pending_acks and not pending_acks.isdisjoint(rec.row_ids())):
            rows = [w for w in decode_readings(rec.wire) if w.row > after_row_id and w.row not in pending_acks]
            if not rows:
                continue
            out.append(Record(rows[0].row, rows[-1].row, len(rows), rec.added_at, encode_readings(rows)))
        else:
            out.append(rec)
        count += out[-1].n
        if count >= limit:
            break
    return out


def _get(conn: sqlite3.Connection, key: int | str) -> Row | None:
    if isinstance(key, int):
        found = conn.execute(_AT_OR_BEFORE, (key,)).fetchall()
    else:
        found = conn.execute(_RECORD + "WHERE key = ?", (_record_key(key),)).fetchall()
    for rec in map(Record._make, found):
        for row in rec.rows():
            if key in (row.row_id, row.reading_id):
                return row
    return None


class OutboxReader:
    """Peeks on its own connection, so reading the backlog overlaps the writer's commits."""

    def __init__(self, conn: sqlite3.Connection, pending_acks: set[int]) -> None:
        self._conn = conn
        self._pending_acks = pending_acks  # the writer's set, shared (membership tests only)

    def peek(self, after_row_id: int = 0, limit: int = 1000) -> list[Row]:
        return _peek(self._conn, after_row_id, limit, self._pending_acks)

    def peek_records(self, after_row_id: int = 0, limit: int = 1000) -> list[Record]:
        return _peek_records(self._conn, after_row_id, limit, self._pending_acks)

    def get(self, key: int | str) -> Row | None:
        return _get(self._conn, key)

    def close(self) -> None:
        self._conn.close()


def _configure(conn: sqlite3.Connection, db: Path, sync: Synchronous, page_limit: int | None, wal_bytes: int) -> None:
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise OutboxError(f"outbox {db}: cannot switch to WAL mode (got {mode})")
    # PRAGMAs take no bound parameters; both values are ours (an enum member, an int)
    conn.execute(f"PRAGMA synchronous = {sync.value}")
    limit_cache(conn, CACHE_KIB)
    # SQLite's default auto-checkpoint waits for 1,000 pages (~4 MiB): on a small state partition
    # the WAL alone filled the disk, after which nothing could commit or checkpoint. Checkpoint at
    # the budget's WAL share, and truncate the file back to it when a checkpoint resets the log.
    page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
    conn.execute(f"PRAGMA wal_autocheckpoint = {max(1, wal_bytes // page_size):d}")
    conn.execute(f"PRAGMA journal_size_limit = {int(wal_bytes):d}")
    if page_limit is not None:
        conn.execute(f"PRAGMA max_page_count = {int(page_limit):d}")


def _log_quarantine(db: Path, aside: Path, reason: str) -> None:
    # one line, no traceback: the cause is the file, not the code
    log.error(
        "event=outbox_quarantined path=%s moved_to=%s reason=%r action=fresh_outbox "
        "detail='undelivered readings in the damaged file are NOT sent; keep it for forensics'",
        db,
        aside,
        reason,
    )


# The -shm wal-index header (https://www.sqlite.org/walformat.html, "The WAL-Index Header"):
# iVersion u32 at 0, isInit u8 at 12, szPage u16 at 14, mxFrame u32 at 16, in native byte order.
_SHM_HEADER = 48
_WAL_HEADER = 32
_WAL_FRAME_HEADER = 24


def _wal_lost(db: Path) -> int:
    """Frames the -shm says the -wal held that the -wal no longer has (0: none lost).

    After a crash the -shm and -wal stay behind together; SQLite replays the -wal on the next
    open. If the -wal alone was deleted, SQLite opens what was last checkpointed without a
    word: this is the only trace left of the lost commits.
    """
    shm, wal = Path(f"{db}-shm"), Path(f"{db}-wal")
    try:
        head = shm.read_bytes()[:_SHM_HEADER] if shm.is_file() else b""
    except OSError:
        return 0
    if len(head) < 20 or head[12] != 1:
        return 0
    version = int.from_bytes(head[0:4], sys.byteorder)
    page = int.from_bytes(head[14:16], sys.byteorder)
    frames = int.from_bytes(head[16:20], sys.byteorder)
    if version != 3007000 or frames == 0:
        return 0
    page_size = 65536 if page == 1 else page
    need = _WAL_HEADER + frames * (_WAL_FRAME_HEADER + page_size)
    return frames if _size(wal) < need else 0


def _check_current(conn: sqlite3.Connection, db: Path) -> None:
    found = outbox_schema.version(conn)
    if found != outbox_schema.CURRENT:
        raise SchemaError(
            f"outbox {db} has schema version {found}, this gateway reads {outbox_schema.CURRENT}; "
            "the daemon migrates it on start"
        )


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _lock(db: Path) -> int:
    """One writer per outbox file: a second daemon on the same file would interleave row ids."""
    fd = os.open(f"{db}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OutboxError(f"outbox {db} is in use by another process") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


class AsyncOutbox:
    """Runs an Outbox on a dedicated writer thread; concurrent add/ack calls share a transaction.

    Peeks run on a second thread with their own connection, so the uplink reads the backlog
    while acks are being committed.

    Readers of ``depth``/``last_row_id``/``storage_alarm`` get the values as of the last
    completed operation (plain attribute reads, safe under the GIL).
    """

    def __init__(
        self,
        outbox: Outbox,
        executor: ThreadPoolExecutor,
        reader: OutboxReader,
        reader_executor: ThreadPoolExecutor,
        *,
        max_group_readings: int = 50_000,
        retry_interval: float = 1.0,
        commit_interval: float = 0.0,
    ) -> None:
        self.outbox = outbox
        self._executor = executor
        self._reader = reader
        self._reader_executor = reader_executor
        self._loop = asyncio.get_running_loop()
        self._max_group = max_group_readings
        self._retry_interval = retry_interval
        self._commit_interval = commit_interval
        self._last_write = -math.inf  # loop time the last write started
        self._adds: list[tuple[list[Reading], asyncio.Future[AddResult], SlotMark | None]] = []
        self._acks: list[tuple[list[int], asyncio.Future[int]]] = []
        self._writer: asyncio.Task[None] | None = None
        self._retry: asyncio.Task[None] | None = None
        self._new_rows = asyncio.Event()
        self._closed = False
        # set once SQLite reports the file damaged; ``on_damage`` (the daemon's) hears it once
        self.damaged: str | None = None
        self.on_damage: Callable[[str], None] | None = None

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        max_group_readings: int = 50_000,
        retry_interval: float = 1.0,
        commit_interval: float = 0.0,
        **kwargs: Any,
    ) -> AsyncOutbox:
        """Open like ``Outbox.open`` (same keyword arguments) on a fresh writer thread.

        ``retry_interval``: how often held readings are retried while the storage is failing.
        ``commit_interval``: the shortest time from one write transaction to the next; what
        arrives meanwhile shares the next one (fewer fsyncs and per-transaction costs for a few
        milliseconds more before ``add`` returns).
        """
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox")
        reader_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox-read")
        loop = asyncio.get_running_loop()
        try:
            outbox = await loop.run_in_executor(executor, lambda: Outbox.open(path, **kwargs))
            try:
                reader = await loop.run_in_executor(reader_executor, outbox.open_reader)
            except BaseException:
                await loop.run_in_executor(executor, outbox.close)
                raise
        except BaseException:
            executor.shutdown(wait=False)
            reader_executor.shutdown(wait=False)
            raise
        return cls(
            outbox,
            executor,
            reader,
            reader_executor,
            max_group_readings=max_group_readings,
            retry_interval=retry_interval,
            commit_interval=commit_interval,
        )

    @property
    def depth(self) -> int:
        return self.outbox.depth

    @property
    def instance(self) -> str:
        return self.outbox.instance

    @property
    def last_row_id(self) -> int:
        return self.outbox.last_row_id

    @property
    def storage_alarm(self) -> str | None:
        return self.outbox.storage_alarm

    @property
    def over_budget(self) -> bool:
        return self.outbox.over_budget

    async def add(self, readings: Iterable[Reading], *, mark: SlotMark | None = None) -> AddResult:
        self._check_open()
        fut: asyncio.Future[AddResult] = self._loop.create_future()
        self._adds.append((list(readings), fut, mark))
        self._kick()
        return await fut

    async def ack(self, row_ids: Iterable[int]) -> int:
        self._check_open()
        fut: asyncio.Future[int] = self._loop.create_future()
        self._acks.append((list(row_ids), fut))
        self._kick()
        return await fut

    async def peek(self, after_row_id: int = 0, limit: int = 1000) -> list[Row]:
        self._check_open()
        return await self._run(self._reader.peek, after_row_id, limit, reader=True)

    async def peek_records(self, after_row_id: int = 0, limit: int = 1000) -> list[Record]:
        """Whole records with rows after ``after_row_id``, about ``limit`` readings (see ``_peek_records``)."""
        self._check_open()
        return await self._run(self._reader.peek_records, after_row_id, limit, reader=True)

    async def get(self, key: int | str) -> Row | None:
        return await self._run(self._reader.get, key, reader=True)

    async def oldest_undelivered(self) -> tuple[int, float] | None:
        return await self._run(self.outbox.oldest_undelivered)

    async def committed_slots(self) -> dict[tuple[str, str], int]:
        return await self._run(self.outbox.committed_slots)

    async def stats(self) -> OutboxStats:
        return await self._run(self.outbox.stats)

    async def set_page_limit(self, pages: int | None) -> None:
        await self._run(self.outbox.set_page_limit, pages)

    async def wait_for_rows(self, after_row_id: int) -> None:
        """Return once a row with id > ``after_row_id`` has been committed."""
        while self.outbox.last_row_id <= after_row_id:
            self._new_rows.clear()
            await self._new_rows.wait()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retry
        if self._writer is not None:
            await asyncio.shield(self._writer)
        try:
            await self._loop.run_in_executor(self._reader_executor, self._reader.close)
            await self._run(self.outbox.close)
        finally:
            self._reader_executor.shutdown(wait=True)
            self._executor.shutdown(wait=True)

    # -- internals ---------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise OutboxError(f"outbox {self.outbox.path} is closed")

    async def _run(self, fn: Callable[..., _T], *args: Any, reader: bool = False) -> _T:
        """``fn(*args)`` on the writer thread (or the reader's); damage it meets is reported."""
        try:
            return await self._loop.run_in_executor(self._reader_executor if reader else self._executor, fn, *args)
        except sqlite3.DatabaseError as exc:
            self._check_damage(exc)
            raise

    def _check_damage(self, exc: sqlite3.DatabaseError) -> None:
        """Damage (not a full disk or a busy file, which are ridden out): mark the file for
        quarantine at the next open, say so once, tell the daemon, and raise OutboxDamaged."""
        if not is_damage(exc):
            return
        if self.damaged is None:
            self.damaged = str(exc)
            mark_damaged(self.outbox.path, str(exc))
            log.error(
                "event=outbox_damaged path=%s reason=%r action=restart_and_quarantine "
                "detail='the next start moves the file aside and opens a fresh outbox'",
                self.outbox.path,
                str(exc),
            )
            if self.on_damage is not None:
                self.on_damage(str(exc))
        raise OutboxDamaged(f"outbox {self.outbox.path} is damaged: {exc}") from exc

    def _kick(self) -> None:
        if self._writer is None or self._writer.done():
            self._writer = self._loop.create_task(self._write_loop(), name="outbox-writer")

    def _take_acks(self) -> list[tuple[list[int], asyncio.Future[int]]]:
        # Deletes cost page writes (the id index too): a drain acks thousands of rows a second,
        # and one huge delete would hold the adds of the same transaction back (polls' commits wait).
        taken: list[tuple[list[int], asyncio.Future[int]]] = []
        total = 0
        while self._acks and (not taken or total + len(self._acks[0][0]) <= ACK_GROUP_ROWS):
            item = self._acks.pop(0)
            taken.append(item)
            total += len(item[0])
        return taken

    def _take_adds(self) -> list[tuple[list[Reading], asyncio.Future[AddResult], SlotMark | None]]:
        taken: list[tuple[list[Reading], asyncio.Future[AddResult], SlotMark | None]] = []
        total = 0
        while self._adds and (not taken or total + len(self._adds[0][0]) <= self._max_group):
            item = self._adds.pop(0)
            taken.append(item)
            total += len(item[0])
        return taken

    async def _write_loop(self) -> None:
        while self._adds or self._acks:
            wait = self._last_write + self._commit_interval - self._loop.time()
            if wait > 0 and not self._closed:
                await asyncio.sleep(wait)  # what arrives meanwhile joins this transaction
            self._last_write = self._loop.time()
            adds = self._take_adds()
            acks = self._take_acks()
            try:
                add_results, ack_counts = await self._run(
                    self.outbox.write, [a for a, _, _ in adds], [ids for ids, _ in acks], [m for _, _, m in adds]
                )
            except BaseException as exc:  # a real bug or corruption: every waiter hears about it
                for _, add_fut, _ in adds:
                    if not add_fut.done():
                        add_fut.set_exception(exc)
                for _, ack_fut in acks:
                    if not ack_fut.done():
                        ack_fut.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            for (_, add_fut, _), result in zip(adds, add_results, strict=True):
                if not add_fut.done():
                    add_fut.set_result(result)
            for (_, ack_fut), count in zip(acks, ack_counts, strict=True):
                if not ack_fut.done():
                    ack_fut.set_result(count)
            self._new_rows.set()
            if (self.outbox.held or self.outbox.pending_acks) and self._retry is None and not self._closed:
                self._retry = self._loop.create_task(self._retry_loop(), name="outbox-retry")

    async def _retry_loop(self) -> None:
        try:
            while self.outbox.held or self.outbox.pending_acks:
                await asyncio.sleep(self._retry_interval)
                await self._run(self.outbox.retry_held)
                self._new_rows.set()
        finally:
            self._retry = None

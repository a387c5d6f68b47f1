"""Schedule cursors that survive a restart: ``<state_dir>/schedule.sqlite``.

What is kept, per meter:

* the poll schedule's next slot owed per (group, meter) (:meth:`PollSchedule.cursors`), so a
  gateway restarted after an outage resumes from there and its schedule reports the slots it
  missed while down (:meth:`PollSchedule.take_missed`) for backfill;
* the daily frozen schedule's next freeze owed (:meth:`DailyFrozenSchedule.cursors`) and the
  freezes still owed (due or missed, not yet committed, with their retry count and the poll
  slots they would fill), so an outage or a failed read is caught up after a restart;
* the last clock sync sent to each meter and its last measured drift, so the once-a-day rule of
  DL/T 645 time sync holds across restarts.

Nothing is ever deleted because of its age by the wall clock: a gateway clock stepped a year
forward must not wipe what is owed. Owed freezes leave the store when they are committed or
given up (the meter no longer has them), and by count (:data:`MAX_OWED_PER_METER`).
Cursors that lie far in the *future* of the current clock are ignored on load (not deleted):
they were saved by a clock that was wrong, and resuming from them would stop polling until the
clock got there.

The store is small and written with ``synchronous=NORMAL`` in WAL mode: a power cut can lose
the last few saves, never the file; a lost save only means a few slots are backfilled again.
Slots are not read again: the outbox marks each slot it commits (``committed_slots``) and the
daemon resumes from the later of that mark and the saved cursor (:class:`ResumeCursors`).
A file that is not a readable database, or that ``PRAGMA quick_check`` finds damaged, is moved
aside with its -wal/-shm (``schedule.sqlite.corrupt-<UTC timestamp>``, kept for forensics) and a
fresh one started,
logged on one line: losing cursors costs backfill and at worst one extra time sync (the
once-a-day record), never billing data. Checking on open matters: a damaged page found later,
by a load during start-up, would fail every start (a crash loop).

The methods are synchronous and thread safe (one connection behind a lock); async callers run
them with ``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import sqlite3
import threading
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date, timedelta, tzinfo
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from meter_gateway.gateway.daemon.logs import log_limited
from meter_gateway.gateway.daemon.schedule import DEFAULT_RESYNC_AFTER, latest_freeze_date
from meter_gateway.gateway.store.sqlite_check import (
    DEFAULT_CHECK_BUDGET,
    DamagedDatabase,
    checked_connection,
    limit_cache,
    limit_wal,
    open_store,
)

if TYPE_CHECKING:
    from meter_gateway.gateway.config import Config

__all__ = [
    "FILE_NAME",
    "MAX_OWED_PER_METER",
    "CursorStore",
    "CursorStoreError",
    "OwedFreeze",
    "ResumeCursors",
    "SavedPollCursors",
    "TimeSyncRecord",
    "autosave_poll",
    "store_path",
]

log = logging.getLogger("meter_gateway")

FILE_NAME: Final = "schedule.sqlite"
SCHEMA_VERSION: Final = 1
MAX_OWED_PER_METER: Final = 62  # a DL/T 645-2007 meter keeps 62 daily freezes; more cannot be read

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS poll_cursor (
    grp TEXT NOT NULL, meter TEXT NOT NULL, next_slot INTEGER NOT NULL, PRIMARY KEY (grp, meter));
CREATE TABLE IF NOT EXISTS frozen_cursor (meter TEXT PRIMARY KEY, next_day TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS frozen_owed (
    meter TEXT NOT NULL, day TEXT NOT NULL, backfill INTEGER NOT NULL, fills TEXT NOT NULL,
    attempts INTEGER NOT NULL, PRIMARY KEY (meter, day));
CREATE TABLE IF NOT EXISTS time_sync (
    meter TEXT PRIMARY KEY, synced_at REAL, drift REAL, measured_at REAL);
"""


class CursorStoreError(Exception):
    """The cursor store cannot be opened (its directory is missing or not writable)."""


@dataclass(frozen=True, slots=True)
class OwedFreeze:
    """A daily freeze of one meter still to be read and committed.

    ``backfill``: it was missed (outage, failed read), not read on time. ``fills`` maps a poll
    group to the missed slot (the freeze instant) this freeze's energies fill.
    """

    meter: str
    day: date
    backfill: bool
    fills: Mapping[str, int] = field(default_factory=dict)
    attempts: int = 0


@dataclass(frozen=True, slots=True)
class TimeSyncRecord:
    synced_at: float | None  # gateway time of the last sync command that reached this meter
    drift: float | None  # last measured drift (meter minus gateway), seconds
    measured_at: float | None


class SavedPollCursors(Mapping[tuple[str, str], int]):
    """(group, meter) -> next slot owed, as saved, looked up in the file (see
    :meth:`CursorStore.load_poll`); valid while the store is open."""

    def __init__(self, conn: sqlite3.Connection, lock: threading.Lock, limit: float) -> None:
        self._conn = conn
        self._lock = lock
        self._limit = limit

    def _query(self, sql: str, *params: object) -> list[Any]:
        with self._lock:
            try:
                return self._conn.execute(sql, (*params, self._limit)).fetchall()
            except sqlite3.ProgrammingError as exc:
                raise CursorStoreError(f"saved poll cursors read after the cursor store was closed: {exc}") from None

    def __getitem__(self, key: tuple[str, str]) -> int:
        rows = self._query("SELECT next_slot FROM poll_cursor WHERE grp = ? AND meter = ? AND next_slot <= ?", *key)
        if not rows:
            raise KeyError(key)
        return int(rows[0][0])

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._query("SELECT grp, meter FROM poll_cursor WHERE next_slot <= ? ORDER BY grp, meter"))

    def __len__(self) -> int:
        return int(self._query("SELECT count(*) FROM poll_cursor WHERE next_slot <= ?")[0][0])


class ResumeCursors(Mapping[tuple[str, str], int]):
    """(group, meter) -> next slot owed on start: the later of the saved cursor and the slot
    after the last one the outbox committed (``Outbox.committed_slots``).

    The cursors are saved every few seconds; the outbox marks a slot in the transaction that
    commits its readings. After a crash the mark can be ahead of the saved cursor, and a slot
    read again would publish its reading ids with other values. A mark past ``limit`` (a wrong
    clock, as for the saved cursors) is left out."""

    def __init__(
        self,
        saved: Mapping[tuple[str, str], int],
        committed: Mapping[tuple[str, str], int],
        intervals: Mapping[str, int],
        limit: float,
    ) -> None:
        self._saved = saved
        self._after: dict[tuple[str, str], int] = {}
        for (group, meter), slot in committed.items():
            interval = intervals.get(group)
            if interval is not None and slot + interval <= limit:
                self._after[(group, meter)] = slot + interval

    def __getitem__(self, key: tuple[str, str]) -> int:
        saved = self._saved.get(key)
        after = self._after.get(key)
        if saved is None and after is None:
            raise KeyError(key)
        return max(s for s in (saved, after) if s is not None)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        yield from self._saved
        yield from (key for key in self._after if key not in self._saved)

    def __len__(self) -> int:
        return sum(1 for _ in self)


def store_path(config: Config) -> Path:
    return Path(config.gateway.state_dir) / FILE_NAME


class CursorStore:
    """The schedule cursors of one gateway, in one SQLite file. See the module doc."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self.path = path
        self._lock = threading.Lock()
        self.saves = 0
        self.quarantined: Path | None = None  # where open() moved a damaged file, if it did

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> CursorStore:
        db = Path(path)
        if not db.parent.is_dir():
            raise CursorStoreError(f"cursor store directory {db.parent} does not exist")

        def moved(aside: Path, reason: str) -> None:
            log.error("event=cursor_store_unreadable path=%s error=%r moved_to=%s", db, reason[:300], aside)

        def fresh_damaged(again: DamagedDatabase) -> CursorStoreError:
            return CursorStoreError(f"cursor store {db}: a fresh store is damaged too: {again}")

        conn, aside, _ = open_store(db, lambda: _connect(db), fresh_damaged=fresh_damaged, on_moved=moved)
        store = cls(conn, db)
        store.quarantined = aside
        return store

    @classmethod
    def for_config(cls, config: Config) -> CursorStore:
        path = store_path(config)
        path.parent.mkdir(parents=True, exist_ok=True)
        return cls.open(path)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # -- poll schedule ----------------------------------------------------------------------------

    def save_poll(self, cursors: Mapping[tuple[str, str], int]) -> None:
        """Upsert (group, meter) -> next slot owed. Pairs not given are kept (a group removed by
        a reload and added back later resumes where it stopped)."""
        rows = [(g, m, int(slot)) for (g, m), slot in cursors.items()]
        with self._lock, self._conn:
            self._conn.executemany(
                "INSERT INTO poll_cursor (grp, meter, next_slot) VALUES (?, ?, ?) "
                "ON CONFLICT (grp, meter) DO UPDATE SET next_slot = excluded.next_slot",
                rows,
            )
            self.saves += 1

    def load_poll(self, now: float, *, resync_after: float = DEFAULT_RESYNC_AFTER) -> SavedPollCursors:
        """The saved poll cursors, for ``PollSchedule(resume=...)``. Cursors more than
        ``resync_after`` ahead of ``now`` came from a wrong clock and are left out.

        Read from the file on lookup, not loaded: a dict with an entry per (group, meter) would
        live only while the schedule is built, yet the memory it freed would stay in the daemon's
        resident set, pinned by what start-up allocates meanwhile."""
        limit = now + resync_after
        with self._lock:
            ignored = self._conn.execute("SELECT count(*) FROM poll_cursor WHERE next_slot > ?", (limit,)).fetchone()
        if ignored[0]:
            log.warning("event=cursors_ignored kind=poll count=%d reason=ahead_of_clock now=%.0f", ignored[0], now)
        return SavedPollCursors(self._conn, self._lock, limit)

    # -- daily frozen schedule --------------------------------------------------------------------

    def save_frozen(
        self,
        cursors: Mapping[str, date],
        *,
        owed: Iterable[OwedFreeze] = (),
        settled: Iterable[tuple[str, date]] = (),
    ) -> None:
        """In one transaction: upsert the schedule's next freeze owed per meter, upsert
        ``owed`` freezes and remove ``settled`` ones (committed or given up)."""
        owed_rows = [
            (o.meter, o.day.isoformat(), int(o.backfill), json.dumps(dict(o.fills), sort_keys=True), o.attempts)
            for o in owed
        ]
        with self._lock, self._conn:
            self._conn.executemany(
                "INSERT INTO frozen_cursor (meter, next_day) VALUES (?, ?) "
                "ON CONFLICT (meter) DO UPDATE SET next_day = excluded.next_day",
                [(m, d.isoformat()) for m, d in cursors.items()],
            )
            self._conn.executemany(
                "DELETE FROM frozen_owed WHERE meter = ? AND day = ?", [(m, d.isoformat()) for m, d in settled]
            )
            self._conn.executemany(
                "INSERT INTO frozen_owed (meter, day, backfill, fills, attempts) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (meter, day) DO UPDATE SET backfill = excluded.backfill, fills = excluded.fills, "
                "attempts = excluded.attempts",
                owed_rows,
            )
            self.saves += 1

    def load_frozen(self, now: float, tz: tzinfo) -> dict[str, date]:
        """Saved next-freeze cursors, for ``DailyFrozenSchedule(resume=...)``; cursors later
        than the day after today's freeze came from a wrong clock and are left out."""
        newest_sane = latest_freeze_date(now, tz) + timedelta(days=1)
        with self._lock:
            rows = self._conn.execute("SELECT meter, next_day FROM frozen_cursor").fetchall()
        out: dict[str, date] = {}
        ignored = 0
        for meter, text in rows:
            day = _day(text)
            if day is None or day > newest_sane:
                ignored += 1
                continue
            out[meter] = day
        if ignored:
            log.warning("event=cursors_ignored kind=frozen count=%d reason=ahead_of_clock", ignored)
        return out

    def load_owed(self) -> list[OwedFreeze]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT meter, day, backfill, fills, attempts FROM frozen_owed ORDER BY meter, day"
            ).fetchall()
        out: list[OwedFreeze] = []
        for meter, text, backfill, fills, attempts in rows:
            day = _day(text)
            parsed = _fills(fills)
            if day is None or parsed is None:
                log.warning("event=cursor_row_unreadable table=frozen_owed meter=%s day=%r", meter, text)
                continue
            out.append(OwedFreeze(meter, day, bool(backfill), parsed, int(attempts)))
        return out

    # -- time sync --------------------------------------------------------------------------------

    def save_time_sync(self, records: Mapping[str, TimeSyncRecord]) -> None:
        """Record syncs sent and/or drifts measured per meter; None fields keep their value."""
        rows = [(meter, r.synced_at, r.drift, r.measured_at) for meter, r in records.items()]
        with self._lock, self._conn:
            self._conn.executemany(
                "INSERT INTO time_sync (meter, synced_at, drift, measured_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (meter) DO UPDATE SET synced_at = coalesce(excluded.synced_at, synced_at), "
                "drift = coalesce(excluded.drift, drift), measured_at = coalesce(excluded.measured_at, measured_at)",
                rows,
            )
            self.saves += 1

    def load_time_sync(self) -> dict[str, TimeSyncRecord]:
        with self._lock:
            rows = self._conn.execute("SELECT meter, synced_at, drift, measured_at FROM time_sync").fetchall()
        return {
            meter: TimeSyncRecord(_finite(synced), _finite(drift), _finite(measured))
            for meter, synced, drift, measured in rows
        }


async def autosave_poll(
    store: CursorStore,
    snapshot: Callable[[], Mapping[tuple[str, str], int]],
    stop: asyncio.Event,
    *,
    every: float = 10.0,
) -> None:
    """Save ``snapshot()`` (the live poll cursors) every ``every`` seconds of monotonic time, and
    once more when ``stop`` is set. Only cursors that moved since the last save are written, so a
    short period is cheap with 10,000 meters (it bounds what a crash re-reads). A failed save is
    logged and retried at the next turn: cursors are worth keeping, never worth stopping the
    daemon for."""
    # What was saved, compactly (10,000 meters: one int and an 80 kB array, not a dict of tuples):
    # the snapshot's keys come in a stable order while the schedule is unchanged.
    saved_keys: int | None = None
    saved_slots = array("q")
    while True:
        stopping = stop.is_set()
        current = dict(snapshot())
        keys = hash(tuple(current))
        slots = array("q", current.values())
        if keys != saved_keys:
            changed = current  # a new schedule (reload): save everything
        else:
            changed = {key: slot for (key, slot), old in zip(current.items(), saved_slots, strict=True) if slot != old}
        if changed:
            try:
                await asyncio.to_thread(store.save_poll, changed)
            except Exception as exc:
                log_limited(
                    log,
                    logging.ERROR,
                    "cursor_save_failed.poll",
                    "event=cursor_save_failed kind=poll error=%r",
                    str(exc),
                )
            else:
                saved_keys, saved_slots = keys, slots
        del current
        if stopping:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)


def _connect(db: Path) -> sqlite3.Connection:
    """Open, check and set up the store; DamagedDatabase for any file SQLite cannot use as one
    (a cursor store holds nothing worth a refused start), an error when it cannot be opened."""

    def configure(conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        limit_cache(conn)
        limit_wal(conn)

    def migrate(conn: sqlite3.Connection) -> None:
        conn.executescript(_SCHEMA)
        _check_version(conn, db)
        conn.execute("SELECT count(*) FROM poll_cursor").fetchone()  # what every load reads

    try:
        conn = checked_connection(
            db,
            what="cursor_store",
            check_budget=DEFAULT_CHECK_BUDGET,
            configure=configure,
            migrate=migrate,
            isolation_level=None,
            check_same_thread=False,
            timeout=5.0,
        )
    except sqlite3.DatabaseError as exc:
        if isinstance(exc, sqlite3.OperationalError) and "unable to open" in str(exc):
            raise CursorStoreError(f"cannot open cursor store {db}: {exc}") from exc
        raise DamagedDatabase(str(exc)) from exc
    # isolation_level=None: "with conn" alone would not open a transaction
    conn.isolation_level = "DEFERRED"
    return conn


def _check_version(conn: sqlite3.Connection, db: Path) -> None:
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    if row is None:
        conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
    elif int(row[0]) > SCHEMA_VERSION:
        # written by a newer gateway: refuse rather than move it aside (a downgrade keeps it)
        raise CursorStoreError(f"{db}: schema version {row[0]} is newer than this gateway's {SCHEMA_VERSION}")


def _day(text: object) -> date | None:
    try:
        return date.fromisoformat(str(text))
    except ValueError:
        return None


def _fills(text: object) -> dict[str, int] | None:
    try:
        raw = json.loads(str(text))
    except ValueError:
        return None
    if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, int) for k, v in raw.items()):
        return None
    return raw


def _finite(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None

"""Versioned schema of the outbox database: ordered migration steps keyed by PRAGMA user_version.

Each step runs in its own IMMEDIATE transaction together with the user_version bump (the
version lives in the database header page, so it commits or rolls back with the step). A
database written by a newer gateway (user_version above CURRENT) is refused rather than
guessed at: an older binary must not reinterpret billing data it does not understand.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from collections.abc import Callable

# Counters persisted as lifetime totals (schema v3). The in-memory process counters use the
# same names; the persisted ones survive restarts so `meter-gateway outbox stats` can show them.
COUNTER_NAMES: tuple[str, ...] = (
    "committed",
    "duplicates",
    "delivered",
    "overflow_dropped",
    "refused",
    "invalid",
    "disk_full_events",
)


class SchemaError(Exception):
    """The database cannot be used by this version of the gateway."""


def _v1_readings(conn: sqlite3.Connection) -> None:
    # AUTOINCREMENT (not just INTEGER PRIMARY KEY) so a row id is never reused after deletes:
    # the head-end sees row numbers per outbox instance and any gap means loss.
    # `value` has no declared type on purpose: no affinity, so ints, floats and text are stored
    # exactly as the meter gave them.
    conn.execute(
        """
        CREATE TABLE readings (
            row_id       INTEGER PRIMARY KEY AUTOINCREMENT,
            reading_id   TEXT    NOT NULL UNIQUE,
            meter_id     TEXT    NOT NULL,
            quantity     TEXT    NOT NULL,
            value                NOT NULL,
            unit         TEXT    NOT NULL,
            gateway_time REAL    NOT NULL,
            meter_time   REAL,
            slot         REAL,
            quality      INTEGER NOT NULL,
            added_at     REAL    NOT NULL
        )
        """
    )


def _v2_meta(conn: sqlite3.Connection) -> None:
    # The instance id tells the head-end that row numbers restarted (a new database file).
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    conn.executemany(
        "INSERT INTO meta (key, value) VALUES (?, ?)",
        [("instance", uuid.uuid4().hex), ("created_at", repr(time.time()))],
    )


def _v3_counters(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL DEFAULT 0)")
    conn.executemany("INSERT INTO counters (name, value) VALUES (?, 0)", [(n,) for n in COUNTER_NAMES])


# Ordered steps: MIGRATIONS[i] takes the database from version i to i + 1. Append only.
MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (_v1_readings, _v2_meta, _v3_counters)
CURRENT = len(MIGRATIONS)


def version(conn: sqlite3.Connection) -> int:
    value: int = conn.execute("PRAGMA user_version").fetchone()[0]
    return value


def migrate(conn: sqlite3.Connection, target: int = CURRENT) -> int:
    """Bring the database up to ``target``; return the version it had before.

    ``conn`` must be in autocommit mode (isolation_level=None): each step manages its own
    transaction.
    """
    if not 0 <= target <= CURRENT:
        raise ValueError(f"schema target {target} outside 0..{CURRENT}")
    start = version(conn)
    if start > CURRENT:
        raise SchemaError(
            f"outbox schema version {start} is newer than this gateway understands ({CURRENT}); "
            "upgrade the gateway or point it at another file"
        )
    for step in range(start, target):
        conn.execute("BEGIN IMMEDIATE")
        try:
            MIGRATIONS[step](conn)
            # PRAGMA does not take bound parameters; step + 1 is our own int.
            conn.execute(f"PRAGMA user_version = {step + 1:d}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    return start

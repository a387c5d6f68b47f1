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

from meter_gateway.gateway.uplink.contract import WireReading, encode_readings

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


# v4: one row per read. `wire` holds the read's readings exactly as a readings batch carries
# them (encode_readings: ids and row numbers included), encoded once at commit and spliced into
# every publish. Reading row numbers stay per reading: a record holds first_row..last_row (rows
# of its readings, ascending; fewer than the span once some were acked alone), records never
# interleave, and the highest row number ever given stays in sqlite_sequence under 'readings'
# (a plain table SQLite lets us write), so numbers are never reused. `key` is
# "{meter}/{stamp}", the part of the reading ids a read shares: a re-acquired read is found
# through its index (one entry per read, not per reading) and its readings compared by id.
_READS = """
    CREATE TABLE reads (
        first_row INTEGER PRIMARY KEY,
        last_row  INTEGER NOT NULL,
        n         INTEGER NOT NULL,
        key       TEXT    NOT NULL,
        added_at  REAL    NOT NULL,
        wire      BLOB    NOT NULL
    )
"""
# The per-reading table as a view (read-only tools and SQL inspection keep working) and an
# INSERT into it as a one-reading record (bulk test fixtures).
_READINGS_VIEW = """
    CREATE VIEW readings (row_id, reading_id, meter_id, quantity, value, unit, gateway_time, meter_time,
                          slot, quality, added_at) AS
    SELECT json_extract(j.value, '$.row'), json_extract(j.value, '$.id'), json_extract(j.value, '$.meter'),
           json_extract(j.value, '$.qty'), json_extract(j.value, '$.value'), json_extract(j.value, '$.unit'),
           json_extract(j.value, '$.gt'), json_extract(j.value, '$.mt'), json_extract(j.value, '$.slot'),
           coalesce(json_extract(j.value, '$.q'), 0), reads.added_at
    FROM reads, json_each('[' || CAST(reads.wire AS TEXT) || ']') AS j
"""
_READINGS_INSERT = """
    CREATE TRIGGER readings_insert INSTEAD OF INSERT ON readings BEGIN
        UPDATE sqlite_sequence SET seq = seq + 1 WHERE name = 'readings';
        INSERT INTO reads (first_row, last_row, n, key, added_at, wire)
        SELECT seq, seq, 1,
               NEW.meter_id || '/' || CASE WHEN NEW.meter_time IS NOT NULL
                   THEN 'm' || CAST(NEW.meter_time AS INTEGER) ELSE 's' || CAST(NEW.slot AS INTEGER) END,
               NEW.added_at,
               CAST(json_object('id', NEW.reading_id, 'row', seq, 'meter', NEW.meter_id, 'qty', NEW.quantity,
                                'value', NEW.value, 'unit', NEW.unit, 'gt', NEW.gateway_time,
                                'q', coalesce(NEW.quality, 0), 'mt', NEW.meter_time, 'slot', NEW.slot) AS BLOB)
        FROM sqlite_sequence WHERE name = 'readings';
    END
"""
_MIGRATE_CHUNK = 10_000


def _v4_reads(conn: sqlite3.Connection) -> None:
    conn.execute(_READS)
    conn.execute("CREATE INDEX reads_key ON reads (key)")
    seq_row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'readings'").fetchone()
    seq = seq_row[0] if seq_row else 0
    # undelivered rows keep their row numbers and ids: consecutive rows of one read become one record
    after = 0
    run: list[tuple[WireReading, str, float]] = []
    while True:
        rows = conn.execute(
            "SELECT row_id, reading_id, meter_id, quantity, value, unit, gateway_time, meter_time, slot, quality, "
            "added_at FROM readings WHERE row_id > ? ORDER BY row_id LIMIT ?",
            (after, _MIGRATE_CHUNK),
        ).fetchall()
        if not rows:
            break
        for row_id, rid, meter, qty, value, unit, gt, mt, slot, q, added in rows:
            wire = WireReading(
                id=rid, row=row_id, meter=meter, qty=qty, value=value, unit=unit, gt=gt, q=q, mt=mt, slot=slot
            )
            key = f"{meter}/{rid.rsplit('/', 1)[-1]}"
            if run and (key != run[0][1] or added != run[0][2] or gt != run[0][0].gt):
                _v4_insert(conn, run)
                run = []
            run.append((wire, key, added))
        after = rows[-1][0]
    if run:
        _v4_insert(conn, run)
    conn.execute("DROP TABLE readings")  # takes its sqlite_sequence entry with it
    conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('readings', ?)", (seq,))
    conn.execute(_READINGS_VIEW)
    conn.execute(_READINGS_INSERT)


def _v4_insert(conn: sqlite3.Connection, run: list[tuple[WireReading, str, float]]) -> None:
    wires = [w for w, _, _ in run]
    conn.execute(
        "INSERT INTO reads (first_row, last_row, n, key, added_at, wire) VALUES (?, ?, ?, ?, ?, ?)",
        (wires[0].row, wires[-1].row, len(wires), run[0][1], run[0][2], encode_readings(wires)),
    )


def _v5_committed_slots(conn: sqlite3.Connection) -> None:
    # The latest poll slot per (group, meter) whose readings were committed, written in the
    # transaction that commits them and kept when acks delete the reads: the schedule cursors
    # are saved to another file every few seconds, so after a crash only this says a slot was
    # already read (reading it again would publish its ids with other values once the first
    # rows are delivered and gone).
    conn.execute(
        "CREATE TABLE committed_slots (grp TEXT NOT NULL, meter TEXT NOT NULL, slot INTEGER NOT NULL, "
        "PRIMARY KEY (grp, meter)) WITHOUT ROWID"
    )


# Ordered steps: MIGRATIONS[i] takes the database from version i to i + 1. Append only.
MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (
    _v1_readings,
    _v2_meta,
    _v3_counters,
    _v4_reads,
    _v5_committed_slots,
)
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

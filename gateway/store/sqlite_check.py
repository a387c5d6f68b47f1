"""What every SQLite state file of the daemon shares (outbox, cursors, command store, audit log):
finding a damaged file on open and moving it aside, so a damaged file cannot crash-loop the
daemon; and the page cache each connection may keep.

The approach is the outbox's (docs/outbox.md "Damaged database: quarantine on open"): SQLite's
own errors on first use (not a database, malformed image) and ``PRAGMA quick_check`` within a
time budget count as damage; the file and its -wal/-shm are renamed to
``<name>.corrupt-<UTC timestamp>`` (kept for forensics) and a fresh one is started. Every store
opens through :func:`open_store` (that sequence) and :func:`checked_connection` (connect, its own
pragmas, the check, its own schema), keeping to itself only its pragmas, its schema, what it
salvages from the moved file and its one-line ``event=..._quarantined``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final, TypeVar

from meter_gateway.drivers.log_limit import logfmt_value

__all__ = [
    "CACHE_KIB",
    "DEFAULT_CHECK_BUDGET",
    "SMALL_CACHE_KIB",
    "SMALL_WAL_BYTES",
    "DamagedDatabase",
    "checked_connection",
    "clear_damage_mark",
    "damage_mark",
    "is_damage",
    "limit_cache",
    "limit_wal",
    "mark_damaged",
    "open_readonly",
    "open_store",
    "quarantine",
    "quick_check",
    "refuse_truncated",
    "time_limit",
]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

# Small state files (commands, audit): a quick_check of a few MiB takes milliseconds.
DEFAULT_CHECK_BUDGET: Final = 1.0

# Per connection. SQLite's default (2,000 KiB) is reached by the open-time quick_check alone,
# which reads the whole file, and then kept for the process's life: every connection would hold
# pages the kernel's page cache holds anyway. What the daemon touches per write is
# the B-tree's edges (appends, deletes from the front, one cursor row), a few dozen pages.
# The outbox writer keeps more: each insert and delete also lands at a random place in the
# reading-id index.
CACHE_KIB: Final = 512
# Every other connection (outbox reader, cursors, commands, audit) reads or writes a few pages
# per turn, so a small cache each is enough (bench memory).
SMALL_CACHE_KIB: Final = 128

# The WAL of a small state file (cursors, commands, audit): SQLite's default auto-checkpoint lets
# it reach ~4 MiB, the size of a whole small state partition (gateway/store/outbox_sizing.py counts the
# other state files at a few hundred KiB each).
SMALL_WAL_BYTES: Final = 256 * 1024

# SQLite primary result codes (https://www.sqlite.org/rescode.html)
_SQLITE_CORRUPT: Final = 11
_SQLITE_NOTADB: Final = 26
_SIDE_FILES: Final = ("", "-wal", "-shm")


class DamagedDatabase(Exception):
    """The database file is damaged; the message says what SQLite found."""


def is_damage(exc: BaseException) -> bool:
    """True for SQLite's "this file is damaged" errors (CORRUPT, NOTADB), not for busy/full/I/O."""
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    text = str(exc).lower()
    return primary in (_SQLITE_CORRUPT, _SQLITE_NOTADB) or "malformed" in text or "file is not a database" in text


@contextlib.contextmanager
def time_limit(conn: sqlite3.Connection, seconds: float) -> Iterator[None]:
    """Interrupt whatever ``conn`` runs after ``seconds`` (it then raises OperationalError
    "interrupted"). ``Connection.interrupt()`` from a timer: a progress handler would only run
    between VDBE opcodes, and quick_check is one opcode for the whole file."""
    lock = threading.Lock()
    running = True

    def expire() -> None:
        with lock:  # never interrupt a statement after the block: only what runs inside it
            if running:
                conn.interrupt()

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        with lock:
            running = False
        timer.cancel()


def limit_cache(conn: sqlite3.Connection, kib: int = SMALL_CACHE_KIB) -> None:
    """Cap ``conn``'s page cache at ``kib`` KiB (call before the quick_check)."""
    conn.execute(f"PRAGMA cache_size = -{kib:d}")


def limit_wal(conn: sqlite3.Connection, max_bytes: int = SMALL_WAL_BYTES) -> None:
    """Checkpoint ``conn``'s WAL once it holds ``max_bytes`` and truncate it back to that size
    after a checkpoint (call after switching to WAL mode)."""
    page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
    conn.execute(f"PRAGMA wal_autocheckpoint = {max(1, max_bytes // page_size):d}")
    conn.execute(f"PRAGMA journal_size_limit = {int(max_bytes):d}")


def quick_check(conn: sqlite3.Connection, budget: float, *, what: str, path: Path) -> None:
    """Raise :class:`DamagedDatabase` with what ``PRAGMA quick_check`` (or opening the file) finds
    wrong. A check cut short by ``budget`` seconds found nothing in what it covered: logged as
    ``event=<what>_check_incomplete`` and the open goes on. ``budget <= 0`` skips the check."""
    if budget <= 0:
        return
    started = time.monotonic()
    try:
        with time_limit(conn, budget):
            rows = conn.execute("PRAGMA quick_check(5)").fetchall()
    except sqlite3.OperationalError as exc:
        if "interrupted" in str(exc).lower():
            log.warning("event=%s_check_incomplete path=%s budget=%.1fs", what, path, budget)
            return
        if is_damage(exc):
            raise DamagedDatabase(str(exc)) from exc
        raise
    except sqlite3.DatabaseError as exc:
        if is_damage(exc):
            raise DamagedDatabase(str(exc)) from exc
        raise
    log.debug("event=quick_check what=%s seconds=%.3f", logfmt_value(what), time.monotonic() - started)
    found = [str(r[0]) for r in rows]
    if found != ["ok"]:
        raise DamagedDatabase("; ".join(" ".join(f.split()) for f in found)[:400])


# Damage found while a daemon runs cannot be repaired under it, and the next open's quick_check
# may miss it (a check cut short by its budget, or damage quick_check does not look at): a mark
# beside the file makes that open quarantine it regardless.
_MARK_SUFFIX: Final = ".damaged"


def mark_damaged(db: Path, detail: str) -> None:
    """Leave a mark that ``db`` was found damaged while open (best effort, made durable)."""
    mark = Path(f"{db}{_MARK_SUFFIX}")
    try:
        with open(mark, "w", encoding="utf-8") as f:
            f.write(detail[:400] + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        log.warning("event=damage_mark_failed path=%s detail=%s", mark, exc)


def damage_mark(db: Path) -> str | None:
    """What the mark beside ``db`` says, or None when there is none."""
    try:
        return Path(f"{db}{_MARK_SUFFIX}").read_text(encoding="utf-8").strip() or "damaged while open"
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"damaged while open (mark unreadable: {exc})"


def clear_damage_mark(db: Path) -> None:
    Path(f"{db}{_MARK_SUFFIX}").unlink(missing_ok=True)


def quarantine(db: Path) -> Path:
    """Rename ``db`` and its -wal/-shm to ``<name>.corrupt-<UTC timestamp>[-n]`` (never over an
    earlier quarantine); the new path of the main file. The caller logs the event."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = db.with_name(f"{db.name}.corrupt-{stamp}")
    n = 1
    while any(Path(f"{aside}{s}").exists() for s in _SIDE_FILES):
        n += 1
        aside = db.with_name(f"{db.name}.corrupt-{stamp}-{n}")
    for suffix in _SIDE_FILES:
        src = Path(f"{db}{suffix}")
        if src.exists():
            src.replace(Path(f"{aside}{suffix}"))
    return aside


def open_readonly(path: Path) -> sqlite3.Connection:
    """A read-only connection to a (quarantined) file for best-effort salvage: with its -wal if
    SQLite can use it, else the main file alone (``immutable``)."""
    uri = path.resolve().as_uri()
    conn = sqlite3.connect(f"{uri}?mode=ro", uri=True)
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error:
        conn.close()
        conn = sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True)
    return conn


def refuse_truncated(db: Path) -> None:
    """DamagedDatabase for a file truncated to nothing (and no -wal): SQLite would take it for a
    new database and the store would start over silently, as if it had never held anything."""
    if db.is_file() and db.stat().st_size == 0 and not Path(f"{db}-wal").is_file():
        raise DamagedDatabase("empty file (truncated)")


def checked_connection(
    db: Path,
    *,
    what: str,
    check_budget: float,
    configure: Callable[[sqlite3.Connection], None],
    migrate: Callable[[sqlite3.Connection], object],
    **connect_args: Any,
) -> sqlite3.Connection:
    """Connect to ``db``, ``configure`` it (pragmas, WAL, cache), ``quick_check`` it within
    ``check_budget`` and ``migrate`` it (schema, and whatever the store reads at start). Damage
    SQLite reports on the way is :class:`DamagedDatabase`; any failure closes the connection."""
    conn: sqlite3.Connection = sqlite3.connect(db, **connect_args)
    try:
        configure(conn)
        quick_check(conn, check_budget, what=what, path=db)
        migrate(conn)
    except sqlite3.DatabaseError as exc:
        conn.close()
        if is_damage(exc):
            raise DamagedDatabase(str(exc)) from exc
        raise
    except BaseException:
        conn.close()
        raise
    return conn


def open_store(
    db: Path,
    connect: Callable[[], _T],
    *,
    fresh_damaged: Callable[[DamagedDatabase], BaseException],
    on_moved: Callable[[Path, str], None] | None = None,
) -> tuple[_T, Path | None, str]:
    """``connect()`` to the store at ``db``; when it raises :class:`DamagedDatabase`, move the
    file aside (:func:`quarantine`), tell ``on_moved(aside, reason)`` and connect to a fresh one.
    A fresh file damaged too raises ``fresh_damaged(error)``: nothing more can be done here.
    Returns the store, where the damaged file went (None if it was not) and the damage found
    (empty if none); the caller logs its own one-line ``event=..._quarantined``."""
    try:
        return connect(), None, ""
    except DamagedDatabase as exc:
        reason = str(exc)
    aside = quarantine(db)
    if on_moved is not None:
        on_moved(aside, reason)
    try:
        store = connect()
    except DamagedDatabase as again:
        raise fresh_damaged(again) from again
    return store, aside, reason

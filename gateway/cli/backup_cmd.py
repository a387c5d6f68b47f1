"""`meter-gateway backup`: consistent copies of the gateway's SQLite stores while it runs.

Copying ``outbox.sqlite`` with ``cp`` copies the main file only; in WAL mode the latest commits
live in ``outbox.sqlite-wal`` until a checkpoint, and a copy taken mid-checkpoint is torn. The
SQLite online backup API (``sqlite3.Connection.backup``) copies one consistent snapshot through a
read transaction instead; in WAL mode a reader does not block the daemon's writer, so polling and
delivery go on during the copy. The copy is done in one step on purpose: a stepped backup restarts
from the beginning whenever another process writes the source, which with a daemon committing
readings every few milliseconds may never finish.

Each copy is written to ``<name>.partial``, switched to a self-contained rollback journal (no -wal
beside it), checked with ``PRAGMA integrity_check``, synced and only then renamed into place, so
a file named like a store in the backup directory is always a complete, verified copy. Existing
files are never overwritten. Restore is described in docs/operations.md ("Backups and restore").

Exit status: 0 every store present was copied and verified, 1 a copy failed or the outbox is
missing (nothing worth backing up there: wrong config or state directory), 2 usage, 78 bad config.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sqlite3
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BackupError", "Copy", "backup_store", "config_stores", "main"]

PARTIAL = ".partial"


class BackupError(Exception):
    """One store could not be copied or its copy did not verify; the message is one line."""


@dataclass(frozen=True, slots=True)
class Copy:
    """A verified backup copy."""

    name: str
    source: Path
    target: Path
    bytes: int
    tables: dict[str, int]  # row count per table of the copy


def config_stores(config_path: str) -> list[tuple[str, Path, bool]]:
    """(name, path, required) of every store the config's daemon writes. Raises ConfigError."""
    from meter_gateway.gateway.config import load_config
    from meter_gateway.gateway.daemon.app import outbox_path
    from meter_gateway.gateway.store.cursors import store_path

    config = load_config(config_path)
    state = Path(config.gateway.state_dir)
    commands = config.commands
    return [
        ("outbox", outbox_path(config), True),
        ("cursors", store_path(config), False),
        ("commands", Path(commands.store_path or state / "commands.sqlite"), False),
        ("audit", Path(commands.audit_path or state / "audit.sqlite"), False),
    ]


def _open_source(path: Path) -> sqlite3.Connection:
    # read-only: a backup must never create, migrate or checkpoint the daemon's files
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=10.0)
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except BaseException:
        conn.close()
        raise
    return conn


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def backup_store(name: str, source: Path, target: Path) -> Copy:
    """Copy ``source`` (a SQLite file, possibly in use) to ``target`` and verify the copy."""
    if target.exists():
        raise BackupError(f"{name}: {target} already exists; choose an empty --out directory")
    partial = target.with_name(target.name + PARTIAL)
    partial.unlink(missing_ok=True)  # left by an interrupted earlier run: never a valid copy
    try:
        src = _open_source(source)
    except sqlite3.Error as exc:
        raise BackupError(f"{name}: cannot read {source}: {exc}") from exc
    try:
        dst = sqlite3.connect(partial, isolation_level=None)
        try:
            src.backup(dst)  # pages=-1: one consistent snapshot (see the module docstring)
            # the copy is one file: a rollback journal, nothing pending in a -wal beside it
            dst.execute("PRAGMA journal_mode=DELETE")
            result = [row[0] for row in dst.execute("PRAGMA integrity_check")]
            if result != ["ok"]:
                raise BackupError(f"{name}: the copy of {source} failed integrity_check: {'; '.join(result[:3])}")
            tables = [r[0] for r in dst.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
            counts = {t: _count(dst, t) for t in tables}
        finally:
            dst.close()
    except sqlite3.Error as exc:
        partial.unlink(missing_ok=True)
        raise BackupError(f"{name}: copying {source} failed: {exc}") from exc
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        src.close()
    with open(partial, "rb+") as f:
        os.fsync(f.fileno())
    partial.replace(target)
    _fsync_dir(target.parent)
    return Copy(name, source, target, target.stat().st_size, counts)


def _count(conn: sqlite3.Connection, table: str) -> int:
    quoted = table.replace('"', '""')  # a name read from sqlite_master, quoted as an identifier
    return int(conn.execute(f'SELECT count(*) FROM "{quoted}"').fetchone()[0])  # noqa: S608


def _describe(copy: Copy) -> str:
    rows = ", ".join(f"{table} {n}" for table, n in copy.tables.items())
    return f"{copy.name}: {copy.source} -> {copy.target} ({copy.bytes} bytes, integrity ok; rows: {rows})"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="meter-gateway backup",
        description="Copy the outbox, cursor, command and audit stores with SQLite's online backup "
        "API (safe while the daemon runs); each copy is verified. Restore: docs/operations.md.",
    )
    p.add_argument("-c", "--config", help="gateway config file: back up every store it names")
    p.add_argument("--out", required=True, help="directory for the copies (created; existing files are kept)")
    p.add_argument("stores", nargs="*", metavar="FILE", help="SQLite files to copy instead of the config's stores")
    return p


def main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(list(argv))
    if bool(args.config) == bool(args.stores):
        print("meter-gateway backup: give either -c CONFIG or the store FILEs, not both", file=sys.stderr)
        return 2
    if args.config:
        from meter_gateway.gateway.cli.config_cmd import EX_CONFIG
        from meter_gateway.gateway.config import ConfigError

        try:
            stores = config_stores(args.config)
        except ConfigError as exc:
            for line in exc.messages:
                print(line, file=sys.stderr)
            return EX_CONFIG
    else:
        stores = [(Path(f).stem, Path(f), True) for f in args.stores]
        names = [Path(f).name for f in args.stores]
        if len(set(names)) != len(names):
            print("meter-gateway backup: two FILEs have the same name; back them up separately", file=sys.stderr)
            return 2
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"meter-gateway backup: cannot create {out}: {exc.strerror}", file=sys.stderr)
        return 1
    failed = 0
    for name, source, required in stores:
        if not source.is_file():
            if required:
                print(f"{name}: {source} does not exist; nothing backed up for it", file=sys.stderr)
                failed += 1
            else:
                print(f"{name}: {source} does not exist (not used by this gateway); skipped")
            continue
        try:
            copy = backup_store(name, source, out / source.name)
        except (BackupError, OSError) as exc:
            print(str(exc) if isinstance(exc, BackupError) else f"{name}: {exc}", file=sys.stderr)
            failed += 1
            continue
        print(_describe(copy))
    with contextlib.suppress(OSError):
        _fsync_dir(out)
    return 1 if failed else 0

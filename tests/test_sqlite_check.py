"""The stores' one open sequence (gateway/store/sqlite_check.py) on real SQLite files."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from meter_gateway.gateway.store.sqlite_check import (
    DamagedDatabase,
    checked_connection,
    open_store,
    refuse_truncated,
)


def _schema(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE IF NOT EXISTS t (x INTEGER)")


def _open(db: Path) -> sqlite3.Connection:
    refuse_truncated(db)
    return checked_connection(db, what="test_store", check_budget=1.0, configure=lambda c: None, migrate=_schema)


def test_a_sound_file_opens_as_it_is(tmp_path: Path) -> None:
    db = tmp_path / "s.sqlite"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE t (x INTEGER)")
        conn.execute("INSERT INTO t VALUES (42)")
    conn.close()
    store, aside, reason = open_store(db, lambda: _open(db), fresh_damaged=RuntimeError)
    try:
        assert (aside, reason) == (None, "")
        assert store.execute("SELECT x FROM t").fetchall() == [(42,)]
    finally:
        store.close()


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_file_is_moved_aside_and_a_fresh_one_opened(tmp_path: Path, damage: str) -> None:
    db = tmp_path / "s.sqlite"
    db.write_bytes(b"this is not a database file, " * 200 if damage == "garbage" else b"")
    moved: list[tuple[Path, str]] = []
    store, aside, reason = open_store(
        db, lambda: _open(db), fresh_damaged=RuntimeError, on_moved=lambda p, r: moved.append((p, r))
    )
    try:
        assert aside is not None
        assert aside.exists()
        assert moved == [(aside, reason)]
        assert reason
        if damage == "truncated":
            assert reason == "empty file (truncated)"
        assert store.execute("SELECT count(*) FROM t").fetchone() == (0,)
    finally:
        store.close()


def test_a_fresh_file_damaged_too_raises_the_stores_own_error(tmp_path: Path) -> None:
    db = tmp_path / "s.sqlite"

    def always_damaged() -> sqlite3.Connection:
        raise DamagedDatabase("disk returns garbage")

    db.write_bytes(b"x")
    with pytest.raises(RuntimeError, match="disk returns garbage"):
        open_store(db, always_damaged, fresh_damaged=lambda e: RuntimeError(f"store: {e}"))

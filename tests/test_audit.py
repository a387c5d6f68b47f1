"""The hash-chained audit log and `meter-gateway audit`, on real SQLite files."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from pathlib import Path

import pytest

from meter_gateway.gateway.cli import audit_cmd
from meter_gateway.gateway.store.audit import GENESIS, AuditEntry, AuditError, AuditLog, record_hash

T0 = 1_700_000_000.0


def _fill(path: Path, n: int = 5) -> None:
    with AuditLog.open(path) as log:
        for i in range(n):
            log.append(
                at=T0 + i,
                actor="ops",
                command=f"cmd-{i % 2}",
                meter=f"m{i % 3}",
                action="disconnect",
                state="verified" if i % 2 else "accepted",
                detail=f"step {i} ünïcode",
            )


def _raw(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


def test_records_chain_and_persist(tmp_path: Path) -> None:
    path = tmp_path / "state" / "audit.sqlite"
    with AuditLog.open(path) as log:
        first = log.append(at=T0, state="received", command="c1", detail=None)
        second = log.append(at=T0 + 0.25, state="rejected", actor="ops", command="c1", detail="bad_signature")
    assert (first.seq, second.seq) == (1, 2)
    assert first.prev_hash == GENESIS
    assert second.prev_hash == first.hash
    # the documented record hash: SHA-256(prev_hash hex || JSON array of the record)
    canonical = b'[2,1700000000.25,"ops","c1",null,null,"rejected","bad_signature"]'
    assert second.hash == hashlib.sha256(first.hash.encode() + canonical).hexdigest()
    with AuditLog.open(path) as log:
        third = log.append(at=T0 + 1, state="accepted", command="c2")
        assert third.seq == 3
        assert third.prev_hash == second.hash
        assert log.verify() is None
        assert log.count() == 3
        assert log.head() == third
        assert log.query() == [first, second, third]


def test_triggers_refuse_update_and_delete(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite"
    _fill(path, 3)
    conn = _raw(path)
    with pytest.raises(sqlite3.DatabaseError, match="append-only: UPDATE refused"):
        conn.execute("UPDATE audit SET detail = 'nothing happened' WHERE seq = 2")
    with pytest.raises(sqlite3.DatabaseError, match="append-only: DELETE refused"):
        conn.execute("DELETE FROM audit WHERE seq = 3")
    conn.close()
    with AuditLog.open(path) as log:
        assert log.count() == 3
        assert log.verify() is None


def test_verify_finds_an_edited_row(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite"
    _fill(path)
    conn = _raw(path)
    conn.execute("DROP TRIGGER audit_no_update")
    conn.execute("UPDATE audit SET state = 'rejected' WHERE seq = 3")
    conn.close()
    with AuditLog.open(path, readonly=True) as log:
        assert log.verify() == 3


def test_verify_finds_a_row_rehashed_to_hide_an_edit(tmp_path: Path) -> None:
    """Recomputing the edited row's own hash just moves the break to the next row."""
    path = tmp_path / "audit.sqlite"
    _fill(path)
    conn = _raw(path)
    conn.execute("DROP TRIGGER audit_no_update")
    seq, at, actor, command, meter, action, _state, detail, prev = conn.execute(
        "SELECT seq, at, actor, command, meter, action, state, detail, prev_hash FROM audit WHERE seq = 2"
    ).fetchone()
    forged = record_hash(
        prev, seq=seq, at=at, actor=actor, command=command, meter=meter, action=action, state="held", detail=detail
    )
    conn.execute("UPDATE audit SET state = 'held', hash = ? WHERE seq = 2", (forged,))
    conn.close()
    with AuditLog.open(path, readonly=True) as log:
        assert log.verify() == 3


def test_verify_finds_deleted_rows(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite"
    _fill(path)
    conn = _raw(path)
    conn.execute("DROP TRIGGER audit_no_delete")
    conn.execute("DELETE FROM audit WHERE seq = 2")
    conn.close()
    with AuditLog.open(path, readonly=True) as log:
        assert log.verify() == 3
    conn = _raw(path)
    conn.execute("DELETE FROM audit WHERE seq = 1")
    conn.close()
    with AuditLog.open(path, readonly=True) as log:
        assert log.verify() == 3  # the first remaining record does not start the chain


def test_verify_finds_an_inserted_row(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite"
    _fill(path, 3)
    conn = _raw(path)
    last = conn.execute("SELECT hash FROM audit WHERE seq = 3").fetchone()[0]
    conn.execute(
        "INSERT INTO audit VALUES (4, ?, 'ops', 'c9', 'm1', 'reconnect', 'verified', NULL, ?, ?)",
        (T0 + 9, last, "0" * 64),
    )
    conn.close()
    with AuditLog.open(path, readonly=True) as log:
        assert log.verify() == 4


def test_query_filters(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite"
    _fill(path, 6)
    with AuditLog.open(path, readonly=True) as log:
        assert [r.seq for r in log.query(meter="m1")] == [2, 5]
        assert [r.seq for r in log.query(command="cmd-1")] == [2, 4, 6]
        assert [r.seq for r in log.query(command="cmd-1", meter="m0")] == [4]
        assert [r.seq for r in log.query(since=T0 + 3)] == [4, 5, 6]
        assert [r.seq for r in log.query(limit=2)] == [5, 6]  # the newest, oldest first
        assert log.query(meter="nope") == []
        assert log.query()[0].detail == "step 0 ünïcode"


def test_readonly_and_bad_files(tmp_path: Path) -> None:
    with pytest.raises(AuditError, match="no audit log"):
        AuditLog.open(tmp_path / "missing.sqlite", readonly=True)
    _fill(tmp_path / "a.sqlite", 1)
    with AuditLog.open(tmp_path / "a.sqlite", readonly=True) as log, pytest.raises(AuditError, match="read-only"):
        log.append(at=T0, state="accepted")
    (tmp_path / "junk.sqlite").write_bytes(b"this is not a database" * 100)
    with pytest.raises(AuditError, match="cannot open"):
        AuditLog.open(tmp_path / "junk.sqlite", readonly=True)
    # opened for writing, a file that is not a database is quarantined, not a start failure
    # (tests/faults/test_command_store_damage.py has the damage cases)
    with AuditLog.open(tmp_path / "junk.sqlite") as log:
        assert log.quarantined is not None
        assert log.quarantined.read_bytes() == b"this is not a database" * 100
    other = sqlite3.connect(tmp_path / "other.sqlite")
    other.execute("CREATE TABLE t (x)")
    other.commit()
    other.close()
    with pytest.raises(AuditError, match="schema version"):
        AuditLog.open(tmp_path / "other.sqlite", readonly=True)


# -- meter-gateway audit ------------------------------------------------------------------------


def test_cli_query_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "audit.sqlite"
    _fill(path, 4)
    assert audit_cmd.main(["--file", str(path), "--meter", "m1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    assert lines[0].split()[:7] == ["2", "2023-11-14T22:13:21.000Z", "ops", "cmd-1", "m1", "disconnect", "verified"]
    assert audit_cmd.main(["--file", str(path), "--command", "cmd-0", "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["seq"] for r in records] == [1, 3]
    assert len(records[0]["hash"]) == 64
    assert records[0]["prev_hash"] == GENESIS
    assert audit_cmd.main(["--file", str(path), "--since", "2023-11-14T22:13:22Z", "--limit", "1"]) == 0
    assert capsys.readouterr().out.split()[0] == "4"


def test_cli_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "audit.sqlite"
    _fill(path, 4)
    assert audit_cmd.main(["--file", str(path), "--verify"]) == 0
    assert "intact, 4 records" in capsys.readouterr().out
    conn = _raw(path)
    conn.execute("DROP TRIGGER audit_no_update")
    conn.execute("UPDATE audit SET meter = 'm9' WHERE seq = 2")
    conn.close()
    assert audit_cmd.main(["--file", str(path), "--verify"]) == 1
    assert "BROKEN at record 2" in capsys.readouterr().out
    assert audit_cmd.main(["--file", str(path), "--verify", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["broken_at"] == 2


def test_cli_reads_the_path_from_the_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "gw.toml"
    config.write_text('[gateway]\nid = "gw-1"\nstate_dir = "st"\n\n[uplink]\nhost = "127.0.0.1"\n')
    assert audit_cmd.main(["-c", str(config)]) == 1  # nothing logged yet
    assert "no audit log" in capsys.readouterr().err
    _fill(tmp_path / "st" / "audit.sqlite", 2)
    assert audit_cmd.main(["-c", str(config), "--verify"]) == 0
    assert "intact, 2 records" in capsys.readouterr().out
    # an operator's shell has none of the daemon's secrets: the audit tool does not need them
    config.write_text(
        '[gateway]\nid = "gw-1"\nstate_dir = "st"\n\n[uplink]\nhost = "127.0.0.1"\n'
        'password_env = "AUDIT_TEST_UNSET_SECRET"\nusername = "gw"\n'
    )
    assert "AUDIT_TEST_UNSET_SECRET" not in os.environ
    assert audit_cmd.main(["-c", str(config), "--verify"]) == 0
    assert "intact, 2 records" in capsys.readouterr().out
    config.write_text('[gateway]\nid = "gw-1"\n[uplink]\nhots = "x"\n')
    assert audit_cmd.main(["-c", str(config)]) == 78
    assert "uplink.hots" in capsys.readouterr().err


def test_since_forms() -> None:
    now = T0 + 7200
    assert audit_cmd.parse_since("2h", now) == T0
    assert audit_cmd.parse_since("1700000000", now) == T0
    assert audit_cmd.parse_since("2023-11-14T22:13:20", now) == T0
    assert audit_cmd.parse_since("2023-11-15T06:13:20+08:00", now) == T0
    with pytest.raises(ValueError, match="--since"):
        audit_cmd.parse_since("yesterday", now)


def test_append_many_is_one_transaction(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite"
    with AuditLog.open(path) as log:
        log.append(at=T0, state="accepted", command="big")
        records = log.append_many(
            AuditEntry(at=T0 + 1, state="queued", command="big", meter=f"m{i}", action="disconnect") for i in range(50)
        )
        assert [r.seq for r in records] == list(range(2, 52))
        assert records[0].prev_hash == log.query(limit=51)[0].hash
        bad = [AuditEntry(at=T0 + 2, state="sent", meter="m1"), AuditEntry(at=T0 + 2, state=None)]  # type: ignore[arg-type]
        with pytest.raises(AuditError, match="NOT NULL"):
            log.append_many(bad)
        assert log.count() == 51  # the good first entry went back out with the bad one
        assert log.append_many([]) == []
        assert log.verify() is None

"""`meter-gateway backup`: copies of real SQLite stores taken while a real writer commits to them,
restored and opened by the classes that own them."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from meter_gateway.drivers.reading import Reading
from meter_gateway.gateway.cli.backup_cmd import main as backup_main
from meter_gateway.gateway.store.audit import AuditEntry, AuditLog
from meter_gateway.gateway.store.commands import CommandStore
from meter_gateway.gateway.store.cursors import CursorStore
from meter_gateway.gateway.store.outbox import Outbox

BATCH = 50


def batch(start: int) -> list[Reading]:
    return [
        Reading("000000000001", "energy.import", 1000.0 + i, "kWh", gateway_time=1_700_000_000.0 + i, slot=900.0 * i)
        for i in range(start, start + BATCH)
    ]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meter_gateway.gateway.cli", "backup", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class Writer:
    """A real Outbox committing batches from a thread, as the daemon's outbox writer does."""

    def __init__(self, db: Path) -> None:
        self.box = Outbox.open(db)
        self.written = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outbox-writer")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.written += self.box.add(batch(self.written)).committed

    def __enter__(self) -> Writer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.box.close()


def wait_for(check: object, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_backup_while_a_writer_commits_is_a_consistent_restorable_copy(tmp_path: Path) -> None:
    live = tmp_path / "state" / "outbox.sqlite"
    live.parent.mkdir()
    out = tmp_path / "backup"
    with Writer(live) as writer:
        wait_for(lambda: writer.written >= 20 * BATCH)
        done = cli("--out", str(out), str(live))
        at_backup_end = writer.written
        wait_for(lambda: writer.written >= at_backup_end + 10 * BATCH)  # the writer was never stopped
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    copy = out / "outbox.sqlite"
    assert done.stdout.startswith(f"outbox: {live} -> {copy} (")
    assert "integrity ok" in done.stdout
    assert not (out / "outbox.sqlite-wal").exists()
    assert not (out / "outbox.sqlite.partial").exists()

    # restore: the copy goes where the daemon looks for its outbox, and opens as one
    restored = tmp_path / "restored" / "outbox.sqlite"
    restored.parent.mkdir()
    shutil.copyfile(copy, restored)
    box = Outbox.open(restored)
    try:
        depth = box.depth
        assert 20 * BATCH <= depth <= at_backup_end
        assert depth % BATCH == 0  # whole transactions only: a consistent snapshot, never a torn one
        rows = box.peek(0, limit=depth)
        assert [r.row_id for r in rows] == list(range(1, depth + 1))
        assert [r.value for r in rows[:3]] == [1000.0, 1001.0, 1002.0]
    finally:
        box.close()
    with sqlite3.connect(copy) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """A state directory with all four stores, written by their own classes."""
    state = tmp_path / "state"
    state.mkdir()
    box = Outbox.open(state / "outbox.sqlite")
    box.add(batch(0))
    box.close()
    cursors = CursorStore.open(state / "schedule.sqlite")
    cursors.save_poll({("fast", "m1"): 900, ("fast", "m2"): 1800})
    cursors.close()
    CommandStore.open(state / "commands.sqlite", "gw-backup").close()
    with AuditLog.open(state / "audit.sqlite") as audit:
        audit.append_many([AuditEntry(at=1_700_000_000.0 + i, state="received", command=f"c{i}") for i in range(3)])
    return state


def config_file(tmp_path: Path, state: Path) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(
        f"""
[gateway]
id = "gw-backup"
state_dir = "{state}"

[uplink]
host = "127.0.0.1"
port = 1883
"""
    )
    return path


def test_backup_from_the_config_copies_every_store_and_each_restores(tmp_path: Path, state: Path) -> None:
    out = tmp_path / "backup"
    done = cli("-c", str(config_file(tmp_path, state)), "--out", str(out))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["outbox", "cursors", "commands", "audit"]
    assert all("integrity ok" in line for line in lines)
    assert sorted(p.name for p in out.iterdir()) == [
        "audit.sqlite",
        "commands.sqlite",
        "outbox.sqlite",
        "schedule.sqlite",
    ]

    restored = tmp_path / "restored"
    shutil.copytree(out, restored)
    box = Outbox.open(restored / "outbox.sqlite")
    assert box.depth == BATCH
    box.close()
    cursors = CursorStore.open(restored / "schedule.sqlite")
    assert dict(cursors.load_poll(0.0)) == {("fast", "m1"): 900, ("fast", "m2"): 1800}
    cursors.close()
    CommandStore.open(restored / "commands.sqlite", "gw-backup").close()
    with AuditLog.open(restored / "audit.sqlite") as audit:
        assert audit.count() == 3
        assert audit.verify() is None  # the hash chain survived the copy


def test_a_store_the_gateway_does_not_use_is_skipped_and_said(tmp_path: Path, state: Path) -> None:
    (state / "commands.sqlite").unlink()
    (state / "audit.sqlite").unlink()
    done = cli("-c", str(config_file(tmp_path, state)), "--out", str(tmp_path / "b"))
    assert done.returncode == 0, done.stderr
    assert "commands: " in done.stdout
    assert "does not exist (not used by this gateway); skipped" in done.stdout


def test_bad_input_is_one_line_and_loses_nothing(
    tmp_path: Path, state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "backup"
    assert backup_main(["--out", str(out), str(state / "outbox.sqlite")]) == 0
    before = (out / "outbox.sqlite").read_bytes()
    capsys.readouterr()

    # an earlier backup is never overwritten
    assert backup_main(["--out", str(out), str(state / "outbox.sqlite")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "already exists" in err
    assert (out / "outbox.sqlite").read_bytes() == before

    # not a database: one line, no partial copy left behind
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not sqlite" * 100)
    assert backup_main(["--out", str(out), str(junk)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(("junk: cannot read", "junk: copying"))
    assert not list(out.glob("junk*"))

    # no outbox where the config says: nothing to back up is an error
    (state / "outbox.sqlite").unlink()
    assert backup_main(["-c", str(config_file(tmp_path, state)), "--out", str(tmp_path / "c")]) == 1
    assert "outbox: " in capsys.readouterr().err

    # a bad config: exit 78 with the line that names the problem
    bad = tmp_path / "bad.toml"
    bad.write_text('[gateway]\nid = "gw"\nstate_dri = "/tmp"\n')
    assert backup_main(["-c", str(bad), "--out", str(tmp_path / "d")]) == 78
    assert "state_dri" in capsys.readouterr().err

    # neither or both of -c and FILEs
    assert backup_main(["--out", str(out)]) == 2
    assert "either -c CONFIG or the store FILEs" in capsys.readouterr().err

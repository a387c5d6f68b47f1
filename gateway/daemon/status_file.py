"""The daemon's status file, written so that a full disk cannot make it go stale.

Normally the file is replaced atomically (a temporary file renamed over it). Each version is
padded with spaces (JSON ignores trailing whitespace) to leave room to grow, so the file always
owns more blocks than its content needs. When the disk is full and the temporary file cannot be
written, the new content is written in place over the existing file's blocks instead: no new
block is needed, and `meter-gateway status` still sees a running daemon and its storage alarm.
In place, a reader can catch a half-written file; it then reads again (gateway/cli/status_cmd.py).
If even the padded room is too small, the per-meter state map is left out of that version.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path
from typing import Any

from meter_gateway.drivers.log_limit import logfmt_value
from meter_gateway.gateway.daemon.logs import limited_kind_ended, log_limited

__all__ = ["StatusFile"]

log = logging.getLogger(__name__)

_BLOCK = 4096
# errors that mean "no room to write a new file", as opposed to a broken directory
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _padded(data: bytes) -> bytes:
    """``data`` plus spaces: a quarter more and a block, rounded up to whole blocks."""
    size = -(-(len(data) + len(data) // 4 + _BLOCK) // _BLOCK) * _BLOCK
    return data + b" " * (size - len(data))


class StatusFile:
    """Writes ``<state_dir>/status.json``; ``in_place`` is True while the disk refuses new files."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.in_place = False
        self.failed = False  # the last write could not be made at all

    def write(self, doc: dict[str, Any]) -> None:
        data = json.dumps(doc, indent=1).encode()
        try:
            self._replace(data)
        except OSError as exc:
            if exc.errno not in _NO_SPACE:
                self._failed(exc)
                return
            self._write_in_place(doc, data, exc)
            return
        if self.in_place or self.failed:
            log.info("event=status_file_ok path=%s detail='written normally again'", self.path)
            limited_kind_ended("status_file.unwritable")
        self.in_place = self.failed = False

    def _replace(self, data: bytes) -> None:
        tmp = self.path.with_suffix(".tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(_padded(data))
            tmp.replace(self.path)
        except OSError:
            tmp.unlink(missing_ok=True)  # frees what it took, and leaves no stray file behind
            raise

    def _write_in_place(self, doc: dict[str, Any], data: bytes, cause: OSError) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY)
        except OSError as exc:
            self._failed(exc)
            return
        try:
            room = os.fstat(fd).st_size
            if len(data) > room and "meters" in doc:
                data = json.dumps({**doc, "meters": None, "meters_omitted": True}, indent=1).encode()
            if len(data) > room:
                self._failed(cause)
                return
            # the same length as before: overwriting allocated blocks needs no free space
            os.pwrite(fd, data + b" " * (room - len(data)), 0)
        except OSError as exc:
            self._failed(exc)
            return
        finally:
            os.close(fd)
        if not self.in_place:
            log.debug("event=status_file_in_place path=%s cause=%s", logfmt_value(self.path), logfmt_value(cause))
        self.in_place = True
        self.failed = False

    def _failed(self, exc: OSError) -> None:
        self.failed = True
        log_limited(
            log,
            logging.ERROR,
            "status_file.unwritable",
            "event=status_file_unwritable path=%s error=%r",
            self.path,
            str(exc),
        )

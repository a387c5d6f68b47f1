"""How much disk the outbox may take, and how big the state partition must be for it.

The outbox's budget (``[outbox] budget_mb``) bounds the database pages in use. The disk also holds
the write-ahead log, the -shm index and the daemon's other state files (poll cursors, command
store, audit log, status file). SQLite's automatic checkpoint waits for 1,000 pages (~4 MiB) of
WAL, which alone fills a 4 MiB partition: the WAL is therefore bounded from the budget here
(``wal_limit``), transactions are kept below a share of it (``transaction_rows``), and the daemon
refuses to start on a partition smaller than ``min_partition_bytes`` (docs/operations.md,
"Sizing the state partition").
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

__all__ = [
    "PartitionTooSmall",
    "check_partition",
    "min_partition_bytes",
    "partition_bytes",
    "transaction_rows",
    "wal_bound",
    "wal_limit",
]

KIB: Final = 1024
MIB: Final = 1024 * KIB
PAGE: Final = 4096  # SQLite's default page size, which the outbox uses

# The WAL is checkpointed once it holds an eighth of the budget, within these bounds: more than
# 4 MiB (SQLite's own default) buys nothing but a longer replay after a crash; less than 128 KiB
# checkpoints every few commits.
WAL_SHARE: Final = 8
MIN_WAL: Final = 128 * KIB
MAX_WAL: Final = 4 * MIB
# Bytes of WAL one stored reading may cost in a transaction: its row and its reading-id index
# entry land on different pages, and a page is logged whole; a batch of readings of one poll
# shares pages, so this is generous for real batches.
WAL_BYTES_PER_ROW: Final = 512
# The -shm wal-index: 32 KiB per 4,096 WAL frames, so one block for any WAL bounded here.
SHM_BYTES: Final = 64 * KIB
# The other state files (cursor store, command store, audit log, status file, lock files), each
# SQLite file with its WAL bounded by ``sqlite_check.limit_wal``, for a site of a few hundred
# meters; each configured meter adds its poll and job cursors.
STATE_RESERVE: Final = 2 * MIB
STATE_BYTES_PER_METER: Final = 256


class PartitionTooSmall(Exception):
    """The filesystem holding the state directory cannot hold the outbox's budget."""


def _pages(n: int) -> int:
    return n // PAGE * PAGE


def wal_limit(budget_bytes: int) -> int:
    """WAL size (bytes, whole pages) at which it is checkpointed and back to which it is truncated."""
    return min(MAX_WAL, max(MIN_WAL, _pages(budget_bytes // WAL_SHARE)))


def transaction_rows(budget_bytes: int) -> int:
    """Most readings one write transaction of the held backlog stores, so its WAL stays within
    half the limit."""
    return max(64, wal_limit(budget_bytes) // 2 // WAL_BYTES_PER_ROW)


def wal_bound(budget_bytes: int) -> int:
    """The largest the -wal file gets: the limit, plus the transaction that crosses it (a
    checkpoint runs after a commit, never inside one), kept below the limit again."""
    return 2 * wal_limit(budget_bytes)


def min_partition_bytes(budget_bytes: int, meters: int = 0) -> int:
    """Smallest state partition (bytes, rounded up to a MiB) for an outbox of ``budget_bytes``
    and ``meters`` configured meters: the budget, one transaction past it (the budget is checked
    before a batch), the bounded WAL and -shm, and the other state files."""
    need = (
        budget_bytes
        + wal_limit(budget_bytes) // 2
        + wal_bound(budget_bytes)
        + SHM_BYTES
        + STATE_RESERVE
        + STATE_BYTES_PER_METER * max(0, meters)
    )
    return -(-need // MIB) * MIB


def partition_bytes(directory: str | os.PathLike[str]) -> int:
    """Total size of the filesystem holding ``directory`` (not what is free: that changes)."""
    st = os.statvfs(directory)
    return st.f_blocks * st.f_frsize


def check_partition(directory: str | os.PathLike[str], budget_bytes: int, meters: int = 0) -> None:
    """Raise :class:`PartitionTooSmall` (one line, with the numbers) when the filesystem of
    ``directory`` is smaller than :func:`min_partition_bytes`."""
    size = partition_bytes(directory)
    need = min_partition_bytes(budget_bytes, meters)
    if size < need:
        largest = largest_budget(size, meters)
        advice = f"set [outbox] budget_mb to at most {largest / MIB:g}" if largest > 0 else "no outbox budget fits it"
        raise PartitionTooSmall(
            f"state partition of {Path(directory)} is {size / MIB:.1f} MiB; an outbox budget of "
            f"{budget_bytes / MIB:g} MiB with {meters} meters needs at least {need // MIB} MiB "
            f"(docs/operations.md, 'Sizing the state partition'): enlarge it or {advice}"
        )


def largest_budget(partition: int, meters: int = 0) -> int:
    """The largest budget (whole MiB, 0 if none) whose minimum partition fits in ``partition`` bytes."""
    budget = partition // MIB * MIB
    while budget > 0 and min_partition_bytes(budget, meters) > partition:
        budget -= MIB
    return budget

"""`meter-gateway outbox`: inspect the durable outbox (read-only; safe while the daemon runs).

meter-gateway outbox stats DB [--json]
meter-gateway outbox list DB [--after ROW] [--limit N] [--json]
meter-gateway outbox show DB ID [--json]        (ID: a row number or a reading id)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import time
from typing import Any

from meter_gateway.gateway.store.outbox import Outbox, OutboxError, Row, SchemaError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meter-gateway outbox", description="Inspect the durable outbox.")
    sub = parser.add_subparsers(dest="action", required=True)
    stats = sub.add_parser("stats", help="depth, oldest undelivered age, sizes and counters")
    stats.add_argument("db", help="outbox database file")
    stats.add_argument("--json", action="store_true", help="print JSON")
    lst = sub.add_parser("list", help="undelivered rows in delivery order")
    lst.add_argument("db")
    lst.add_argument("--after", type=int, default=0, metavar="ROW", help="start after this row number")
    lst.add_argument("--limit", type=int, default=20, metavar="N", help="at most N rows (default 20)")
    lst.add_argument("--json", action="store_true", help="print JSON lines")
    show = sub.add_parser("show", help="one undelivered row by row number or reading id")
    show.add_argument("db")
    show.add_argument("id", help="row number (digits) or reading id")
    show.add_argument("--json", action="store_true")
    return parser


def _when(t: float | None) -> str:
    if t is None:
        return "-"
    return datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat(timespec="seconds")


def _row_dict(row: Row) -> dict[str, Any]:
    return row._asdict()


def _row_line(row: Row) -> str:
    stamp = f"meter {_when(row.meter_time)}" if row.meter_time is not None else f"slot {_when(row.slot)}"
    return (
        f"{row.row_id:>10}  {row.reading_id}  {row.value!r} {row.unit}  {stamp}  "
        f"q={row.quality}  added {_when(row.added_at)}"
    )


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        outbox = Outbox.open_readonly(args.db)
    except (OutboxError, SchemaError) as exc:
        print(f"meter-gateway outbox: {exc}", file=sys.stderr)
        return 1
    try:
        if args.action == "stats":
            stats = outbox.stats()
            if args.json:
                data = dataclasses.asdict(stats)
                data["oldest_age_s"] = stats.oldest_age(time.time())
                print(json.dumps(data, indent=2, sort_keys=True))
                return 0
            age = stats.oldest_age(time.time())
            print(f"outbox           {stats.path} (schema v{stats.schema_version}, instance {stats.instance})")
            print(f"undelivered      {stats.depth} rows, last row number {stats.last_row_id}")
            print(
                f"oldest           row {stats.oldest_row_id if stats.oldest_row_id is not None else '-'}, "
                f"added {_when(stats.oldest_added_at)}" + (f" ({age:.0f} s ago)" if age is not None else "")
            )
            print(f"size             {stats.live_bytes} bytes in use, file {stats.file_bytes}, wal {stats.wal_bytes}")
            print("lifetime totals  " + ", ".join(f"{k}={v}" for k, v in sorted(stats.totals.items())))
            return 0
        if args.action == "list":
            if args.limit < 1:
                print("meter-gateway outbox: --limit must be >= 1", file=sys.stderr)
                return 2
            for row in outbox.peek(args.after, args.limit):
                print(json.dumps(_row_dict(row)) if args.json else _row_line(row))
            return 0
        key: int | str = int(args.id) if args.id.isdigit() else args.id
        found = outbox.get(key)
        if found is None:
            print(f"meter-gateway outbox: no undelivered row {args.id!r} (delivered rows are deleted)", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps(_row_dict(found), indent=2))
        else:
            for name, value in _row_dict(found).items():
                extra = f"  ({_when(value)})" if name in {"meter_time", "slot", "added_at", "gateway_time"} else ""
                print(f"{name:<13} {value!r}{extra}")
        return 0
    finally:
        outbox.close()

"""`meter-gateway audit`: read the remote-control audit log (read-only; safe while the daemon runs).

meter-gateway audit -c CONFIG [--meter M] [--command ID] [--since WHEN] [--limit N] [--json]
meter-gateway audit -c CONFIG --verify
(``--file DB`` instead of ``-c CONFIG`` reads a copied database.)

WHEN: ISO 8601 time (``2026-11-23T05:00:00Z``; no zone means UTC), unix seconds, or an age like
``15m``, ``2h``, ``1d`` (that long ago).

Exit codes: 0 ok (for --verify: the chain is intact); 1 the chain is broken (--verify) or the
log cannot be read; 2 usage; 78 the config is bad.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime

from meter_gateway.gateway.cli.config_cmd import EX_CONFIG
from meter_gateway.gateway.config import ConfigError, load_config, parse_duration
from meter_gateway.gateway.store.audit import AuditError, AuditLog, AuditRecord


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meter-gateway audit", description="Query or verify the audit log.")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("-c", "--config", help="gateway config file (its [commands] audit_path)")
    where.add_argument("--file", help="audit database file")
    parser.add_argument("--meter", help="only records of this meter")
    parser.add_argument("--command", help="only records of this command id")
    parser.add_argument("--since", metavar="WHEN", help="only records at or after WHEN")
    parser.add_argument("--limit", type=int, metavar="N", help="only the newest N matching records")
    parser.add_argument("--verify", action="store_true", help="recompute the hash chain")
    parser.add_argument("--json", action="store_true", help="print JSON lines")
    return parser


def parse_since(text: str, now: float) -> float:
    """ISO 8601 time, unix seconds or an age (``2h``: two hours before ``now``)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--since: expected an ISO time, unix seconds or an age like '2h', got {text!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def _line(r: AuditRecord) -> str:
    when = datetime.fromtimestamp(r.at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    fields = [f"{r.seq:>8}", when, r.actor or "-", r.command or "-", r.meter or "-", r.action or "-", r.state]
    return "  ".join(fields) + (f"  {r.detail}" if r.detail else "")


def main(argv: list[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be >= 1")
    try:
        since = parse_since(args.since, time.time()) if args.since is not None else None
    except ValueError as exc:
        parser.error(str(exc))
    if args.file is not None:
        path = args.file
    else:
        try:
            path = load_config(args.config, secrets=False).commands.audit_path
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            return EX_CONFIG
    try:
        with AuditLog.open(path, readonly=True) as log:
            if args.verify:
                broken = log.verify()
                head = log.head()
                count = log.count()
                if args.json:
                    doc = {"path": path, "records": count, "broken_at": broken, "head": head.hash if head else None}
                    print(json.dumps(doc, sort_keys=True))
                elif broken is None:
                    print(f"audit log {path}: intact, {count} records, head {head.hash if head else '-'}")
                else:
                    print(f"audit log {path}: BROKEN at record {broken} (of {count}): altered, inserted or deleted")
                return 0 if broken is None else 1
            records = log.query(meter=args.meter, command=args.command, since=since, limit=args.limit)
    except AuditError as exc:
        print(f"meter-gateway audit: {exc}", file=sys.stderr)
        return 1
    for r in records:
        print(json.dumps(r.as_dict(), sort_keys=True) if args.json else _line(r))
    return 0

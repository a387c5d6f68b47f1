"""`meter-gateway status -c FILE`: meters by state and why, outbox depth and last delivery.

Reads the status file the daemon replaces every few seconds in its state directory and the
outbox itself (read-only: the depth is the committed truth even when the daemon is down). On a
full disk the daemon writes the status file in place (gateway/daemon/status_file.py), so a running
daemon still shows as running, with its storage alarm.
Exit status: 0 the daemon is running, 3 it is not (the status file is missing, says it
stopped, or is stale), 78 the config is bad.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from meter_gateway.gateway.cli.config_cmd import EX_CONFIG
from meter_gateway.gateway.config import ConfigError, load_config
from meter_gateway.gateway.daemon.app import STATUS_EVERY, outbox_path, status_path
from meter_gateway.gateway.store.outbox import Outbox, OutboxError

NOT_RUNNING = 3  # as `systemctl status` / LSB init scripts
STALE_AFTER = 6 * STATUS_EVERY
# A status file written in place (full disk) can be caught half-written: read it again.
READ_ATTEMPTS = 5
READ_RETRY_DELAY = 0.05
LISTED = 20  # meters named per state and reason
REASONS_LISTED = 10  # reasons shown per state


def _read_status(path: Path) -> dict[str, Any] | None:
    """The daemon's status document, or None when there is no status file."""
    for attempt in range(READ_ATTEMPTS):
        try:
            doc = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except ValueError:
            if attempt + 1 == READ_ATTEMPTS:
                raise
            time.sleep(READ_RETRY_DELAY)
            continue
        if not isinstance(doc, dict):
            raise ValueError(f"{path}: not a JSON object")  # noqa: TRY004 (bad file content, handled as such)
        return doc
    return None


def _pid_alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user (the service user)
        return True
    return True


def _when(t: float | None) -> str:
    if t is None:
        return "never"
    return datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat(timespec="seconds")


def _ago(t: float | None, now: float) -> str:
    return "" if t is None else f" ({max(0.0, now - t):.0f} s ago)"


def collect(config_path: str, now: float | None = None) -> dict[str, Any]:
    """Everything `status` prints, as data (``--json`` prints it as is)."""
    config = load_config(config_path)
    now = time.time() if now is None else now
    out: dict[str, Any] = {"gateway": config.gateway.id, "configured_meters": len(config.meters)}
    daemon: dict[str, Any] | None = None
    try:
        daemon = _read_status(status_path(config))
    except (OSError, ValueError) as exc:
        out["status_file_error"] = str(exc)
    running = bool(
        daemon
        and daemon.get("running")
        and _pid_alive(daemon.get("pid"))
        and now - float(daemon.get("updated_at", 0)) < STALE_AFTER
    )
    out["running"] = running
    out["daemon"] = daemon
    try:
        outbox = Outbox.open_readonly(outbox_path(config))
    except OutboxError as exc:
        out["outbox"] = {"error": str(exc)}
    else:
        try:
            stats = outbox.stats()
            out["outbox"] = {
                "path": stats.path,
                "depth": stats.depth,
                "oldest_age": stats.oldest_age(now),
                "file_bytes": stats.file_bytes + stats.wal_bytes,
                "totals": stats.totals,
            }
        finally:
            outbox.close()
    return out


def _failing(daemon: dict[str, Any]) -> list[str]:
    """One line per degraded or offline reason: its meters (the first :data:`LISTED`), then why."""
    states: dict[str, str] = daemon.get("meters") or {}
    reasons: dict[str, str] = daemon.get("reasons") or {}  # absent from an older daemon's file
    lines: list[str] = []
    for state in ("degraded", "offline"):
        by_reason: dict[str, list[str]] = {}
        for meter, s in states.items():
            if s == state:
                by_reason.setdefault(str(reasons.get(meter) or ""), []).append(meter)
        # the reason most meters share first: a link down before one meter's timeout
        groups = sorted(by_reason.items(), key=lambda g: (-len(g[1]), g[0]))
        for reason, meters in groups[:REASONS_LISTED]:
            more = f" (+{len(meters) - LISTED} more)" if len(meters) > LISTED else ""
            why = f"; reason: {reason}" if reason else ""
            lines.append(f"  {state + ':':<12} {', '.join(meters[:LISTED])}{more}{why}")
        if len(groups) > REASONS_LISTED:
            rest = sum(len(m) for _, m in groups[REASONS_LISTED:])
            lines.append(f"  {state + ':':<12} {rest} more, for {len(groups) - REASONS_LISTED} other reasons (--json)")
    return lines


def render(info: dict[str, Any], now: float) -> str:
    daemon = info.get("daemon") or {}
    lines = [f"gateway {info['gateway']}: {'running' if info['running'] else 'NOT RUNNING'}"]
    if daemon:
        lines.append(f"  status file: updated {_when(daemon.get('updated_at'))}{_ago(daemon.get('updated_at'), now)}")
    counts = daemon.get("meter_counts") or {}
    if info["running"] and counts:
        text = ", ".join(f"{counts.get(k, 0)} {k}" for k in ("online", "degraded", "offline", "unknown"))
        lines.append(f"  meters:      {info['configured_meters']} configured: {text}")
        lines.extend(_failing(daemon))
    else:
        lines.append(f"  meters:      {info['configured_meters']} configured")
    ob = info.get("outbox") or {}
    if "error" in ob:
        lines.append(f"  outbox:      {ob['error']}")
    else:
        age = ob.get("oldest_age")
        lines.append(
            f"  outbox:      {ob['depth']} undelivered"
            + (f", oldest waiting {age:.0f} s" if age is not None else "")
            + f" ({ob['path']})"
        )
    dob = daemon.get("outbox") or {}
    if info["running"] and dob.get("storage_alarm"):
        lines.append(
            f"  storage:     {str(dob['storage_alarm']).upper()}: {dob.get('held', 0)} readings held in memory"
            " (not yet committed; lost if the daemon stops)"
        )
    poll = daemon.get("poll") or {}
    if info["running"] and poll.get("paused"):
        lines.append(
            f"  polling:     PAUSED, outbox over its budget ({poll.get('paused_slots', 0)} slots skipped so far)"
        )
    up = daemon.get("uplink") or {}
    if daemon:
        state = "connected" if up.get("connected") and info["running"] else "disconnected"
        lines.append(f"  uplink:      {state}; last delivery {_when(up.get('last_delivery'))}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="meter-gateway status", description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", required=True, help="the gateway's TOML config file")
    parser.add_argument("--json", action="store_true", help="print JSON")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    now = time.time()
    try:
        info = collect(args.config, now)
    except ConfigError as exc:
        for line in exc.messages:
            print(line, file=sys.stderr)
        return EX_CONFIG
    print(json.dumps(info, indent=2) if args.json else render(info, now))
    return 0 if info["running"] else NOT_RUNNING


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

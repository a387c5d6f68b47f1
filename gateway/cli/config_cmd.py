"""`meter-gateway check-config FILE`: validate a config file without starting anything.

Exit 0 and a short summary when the file is good; exit 78 (EX_CONFIG, sysexits.h) with one line
per problem on stderr, each naming the file, the TOML line, the key path and what was expected.
Every problem the file has is listed in one run. ``warning:`` lines (stderr) name what is valid
but probably not meant, such as a serial device missing on this machine; they alone exit 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

from meter_gateway.gateway.config import Config, ConfigError, SerialBus, load_config_and_warnings

EX_CONFIG = 78


def summary(config: Config) -> str:
    buses = Counter("serial" if isinstance(b, SerialBus) else "tcp" for b in config.buses)
    protocols = Counter(m.protocol for m in config.meters)
    groups = ", ".join(f"{g.name} every {_seconds(g.interval)}" for g in config.poll_groups) or "none"
    u = config.uplink
    bus_text = ", ".join(f"{n} {k}" for k, n in sorted(buses.items())) or "none"
    meter_text = ", ".join(f"{n} {k}" for k, n in sorted(protocols.items())) or "none"
    lines = [
        f"gateway {config.gateway.id}",
        f"  buses:       {len(config.buses)} ({bus_text})",
        f"  meters:      {len(config.meters)} ({meter_text})",
        f"  poll groups: {groups}",
        f"  uplink:      mqtt{'s' if u.tls else ''}://{u.host}:{u.port} as {u.client_id}",
        f"  outbox:      {config.outbox.path}",
    ]
    return "\n".join(lines)


def _seconds(value: float) -> str:
    seconds = int(value)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{value:g}s"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="meter-gateway check-config", description=__doc__.splitlines()[0])
    parser.add_argument("file", help="the gateway's TOML config file")
    parser.add_argument("--json", action="store_true", help="print the resolved config (secrets redacted) as JSON")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        config, warnings = load_config_and_warnings(args.file)
    except ConfigError as e:
        for line in [*e.messages, *e.warnings]:
            print(line, file=sys.stderr)
        print(f"{args.file}: {len(e.messages)} error(s), {len(e.warnings)} warning(s)", file=sys.stderr)
        return EX_CONFIG
    for line in warnings:
        print(line, file=sys.stderr)
    if args.json:
        print(json.dumps(config.redacted(), indent=2))
    else:
        print(f"ok: {args.file}")
        print(summary(config))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""`meter-gateway` console entry point: dispatches to one module per subcommand.

Each subcommand's module exposes ``main(argv: list[str]) -> int`` and owns its own argument
parser, so subcommands stay independent and start-up imports only what the command needs.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "decode": ("meter_gateway.gateway.cli.decode_cmd", "decode DL/T 645 frames given as hex and print them as JSON"),
    "simulate": ("meter_gateway.simulators.cli", "run simulated DL/T 645 and Modbus meters on TCP ports or ptys"),
    "run": ("meter_gateway.gateway.cli.run_cmd", "run the gateway daemon with a config file"),
    "check-config": ("meter_gateway.gateway.cli.config_cmd", "validate a config file; exit 78 when it is bad"),
    "config-reference": ("meter_gateway.gateway.config_reference", "every config key: Markdown or JSON Schema"),
    "example-config": (
        "meter_gateway.gateway.cli.example_config_cmd",
        "print an example config, the systemd unit, alert rules or dashboard",
    ),
    "status": ("meter_gateway.gateway.cli.status_cmd", "show meters by state, outbox depth and last delivery"),
    "outbox": ("meter_gateway.gateway.cli.outbox_cmd", "inspect the durable outbox"),
    "demo": ("meter_gateway.gateway.cli.demo", "simulators + local MQTT broker + gateway, readings shown live"),
    "ctl": ("meter_gateway.gateway.cli.ctl_cmd", "head-end reference client: signed remote-control commands"),
    "audit": ("meter_gateway.gateway.cli.audit_cmd", "query the remote-control audit log"),
    "backup": ("meter_gateway.gateway.cli.backup_cmd", "back up the outbox, cursor, command and audit stores"),
    "read": ("meter_gateway.gateway.cli.read_cmd", "read one meter once, without the daemon (field tool)"),
    "discover": ("meter_gateway.gateway.cli.discover_cmd", "find the meters on a bus; print [[meters]] to paste"),
}


def _usage() -> str:
    lines = ["usage: meter-gateway COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<15} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "Run `meter-gateway COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0
    if args[0] == "--version":
        from meter_gateway.gateway import __version__

        print(f"meter-gateway {__version__}")
        return 0
    entry = COMMANDS.get(args[0])
    if entry is None:
        print(f"meter-gateway: unknown command {args[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(entry[0])
    except ModuleNotFoundError as exc:
        if exc.name != entry[0]:
            raise
        print(f"meter-gateway: command {args[0]!r} is not available in this build", file=sys.stderr)
        return 2
    try:
        code: int = module.main(args[1:])
    except BrokenPipeError:  # `meter-gateway decode ... | head`: stop quietly like other Unix tools
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())

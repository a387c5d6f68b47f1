"""`meter-gateway example-config NAME`: print a shipped example to start from.

    meter-gateway example-config rs485 > gateway.toml      # then edit, then check-config
    meter-gateway example-config systemd                   # the unit deploy/install.sh installs

The gateway configs validate as printed (secrets are left commented out). Without NAME, lists what
there is. The files come from the installed package (``meter_gateway.config``), so this works from
a wheel as well as from a checkout.
"""

from __future__ import annotations

import argparse
import sys

from meter_gateway.config import EXAMPLES, read_text


def _listing() -> str:
    lines = ["examples (meter-gateway example-config NAME):"]
    lines += [f"  {name:<17} {example.text}" for name, example in EXAMPLES.items()]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="meter-gateway example-config",
        description=__doc__.splitlines()[0],
        epilog=_listing(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", nargs="?", help="which example; omit to list them")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if args.name is None:
        print(_listing())
        return 0
    example = EXAMPLES.get(args.name)
    if example is None:
        print(f"meter-gateway example-config: no example {args.name!r}; one of: {', '.join(EXAMPLES)}", file=sys.stderr)
        return 2
    sys.stdout.write(read_text(example.file))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Files a user needs besides the code, shipped in the wheel: example gateway configs, the demo's
config, the simulator's example, the systemd unit, the Prometheus alert rules and the Grafana
dashboard.

They are read through :mod:`importlib.resources`, which finds them in an installed wheel and in
the source tree (editable install) alike; ``meter-gateway example-config NAME`` prints them.
"""

from __future__ import annotations

from importlib.resources import files
from importlib.resources.abc import Traversable
from typing import NamedTuple


class Example(NamedTuple):
    file: str
    text: str


# `meter-gateway example-config NAME`: the name a user types, the file, what it is for.
EXAMPLES: dict[str, Example] = {
    "rs485": Example("rs485-site.toml", "gateway config: RS-485 lines on USB adapters (DL/T 645, Modbus RTU)"),
    "tcp-concentrator": Example(
        "tcp-concentrator-site.toml", "gateway config: lines behind transparent serial servers, Modbus TCP"
    ),
    "demo": Example("demo.toml", "gateway config of `meter-gateway demo` (simulated meters on 127.0.0.1)"),
    "simulator": Example("simulator.toml", "simulated meters: `meter-gateway simulate --config FILE`"),
    "systemd": Example("meter-gateway.service", "systemd unit (/etc/systemd/system/meter-gateway.service)"),
    "alerts": Example("alerts.yml", "Prometheus alert rules (rule_files: in prometheus.yml)"),
    "grafana": Example("grafana-dashboard.json", "Grafana dashboard (Dashboards > Import)"),
}

# Where deploy/install.sh puts things; the shipped unit names these paths.
INSTALL_PREFIX = "/opt/meter-gateway"
UNIT_EXEC_START = f"{INSTALL_PREFIX}/bin/meter-gateway run -c /etc/meter-gateway/gateway.toml"


def resource(file: str) -> Traversable:
    """One of this package's files, e.g. ``resource("demo.toml")``."""
    return files(__name__) / file


def read_text(file: str) -> str:
    return resource(file).read_text(encoding="utf-8")

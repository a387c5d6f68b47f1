"""Side by side with peers: one Modbus TCP workload, every side measured the same way.

    python -m bench peers [--sides NAME,...] [--runs 3] [--warmup 20] [--seconds 30]
                          [--devices 1000] [--ports 20] [--interval 1] [--cache-dir DIR] [--quick]

The workload: ``--devices`` Modbus TCP devices, ``--ports`` TCP ports of one simulator process
(``meter-gateway simulate``, its own process so its CPU counts against no side), unit ids 1..N on
each port, every device 10 holding registers (addresses 0-9, u16/i16: three voltages, three
currents, three active powers, frequency) polled every ``--interval`` seconds: with the defaults,
10,000 datapoints/s. One mosquitto on loopback takes every side's output.

The sides (``--sides``, default all):

* ``meter-gateway``: ``meter-gateway run`` with a generated config, outbox ``synchronous=FULL``,
  one 10-register read per device and poll; ``meter-gateway-1reg``: the same with a model that
  allows one register per request (10 requests per device and poll);
* ``thingsboard-10reg-memory``, ``thingsboard-10reg-sqlite``: ThingsBoard IoT Gateway (PyPI
  ``thingsboard-gateway``) with its Modbus connector reading the 10 registers as one wide-range
  request (``"address": "0-9"``), memory or SQLite event storage, its MQTT client pointed at the
  local mosquitto in place of a ThingsBoard server; ``thingsboard-default``: one request per key,
  as its shipped example configures, memory storage;
* ``node-red``: Node-RED (npm ``node-red``) with ``node-red-contrib-modbus``: one modbus-client per
  port, one modbus-read node per device (10 registers, every interval), a function node that
  stamps device and time, and an ``mqtt out`` node at QoS 1.

Peers are installed on first use into ``--cache-dir`` (default ``$XDG_CACHE_HOME/meter-gateway-bench``
or ``~/.cache/meter-gateway-bench``) at the pinned versions below; a peer that cannot be installed
or started is skipped with one line saying why, and the other sides still run.

Each run starts one mosquitto and one simulator, then runs the sides one after another (the order
rotates between runs, so no side always goes first). Per side, a counter process subscribes to the
side's topics and counts DISTINCT datapoints (meter-gateway: reading ids; ThingsBoard: device, key
and ts of each telemetry value; Node-RED: device, register and ts), printing its count ten times a
second. ``--warmup`` seconds after its first datapoint the side is measured over ``--seconds``
(whole poll intervals): datapoints/s at the counter, CPU time (user + system, all threads, the
whole process tree, from /proc/PID/stat) of the side per 1,000 of those datapoints, and the side's
RSS (sum over its process tree, from /proc/PID/status) at the end of the window. Medians over
``--runs`` are reported. "Sustained" means at least 97 % of the offered load reached the counter.

Traffic stays on 127.0.0.1. ``--quick`` is a smoke test: 20 devices on 2 ports, 3 s warm-up, 4 s
window, 1 run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.e2e import GATEWAY_ID, LineReader, Protocol, gateway_config, parse_endpoints, stop_process

ROOT = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")
SUSTAINED = 0.97  # share of the offered load that must reach the counter
START_TIMEOUT = 90.0  # seconds from a side's start to its first datapoint

# Versions the published table was measured with; a bump is a new measurement.
THINGSBOARD_GATEWAY = "thingsboard-gateway==3.8.5"
# The Modbus connector installs exactly this pymodbus at start-up if it is missing; installing it
# with the gateway keeps the first measured run from paying for a pip run.
THINGSBOARD_EXTRAS = ("pymodbus==3.9.2", "pyserial", "pyserial-asyncio")
# node-red-contrib-modbus 5.23.3 is the newest release whose dependencies all come from the npm
# registry (later ones fetch their modbus-serial fork from a vendor's own package host).
NODE_RED = ("node-red@4.1.8", "node-red-contrib-modbus@5.23.3")

# The device's register map: address, quantity, type, scale, unit. Sized for u16/i16 registers.
REGISTERS = (
    (0, "voltage.l1", "u16", 0.1, "V"),
    (1, "voltage.l2", "u16", 0.1, "V"),
    (2, "voltage.l3", "u16", 0.1, "V"),
    (3, "current.l1", "u16", 0.01, "A"),
    (4, "current.l2", "u16", 0.01, "A"),
    (5, "current.l3", "u16", 0.01, "A"),
    (6, "power.active.l1", "i16", 0.01, "kW"),
    (7, "power.active.l2", "i16", 0.01, "kW"),
    (8, "power.active.l3", "i16", 0.01, "kW"),
    (9, "frequency", "u16", 0.01, "Hz"),
)


# -- processes ------------------------------------------------------------------------------------


def tree_pids(root: int) -> list[int]:
    """``root`` and every live descendant (a peer may run helpers in child processes)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone since the listing
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU so far of ``root``'s tree, including children it has reaped."""
    total = 0
    for pid in tree_pids(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # utime, stime, cutime, cstime: fields 14-17 of stat(5)
        total += int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
    return total / CLK_TCK


def tree_rss_kib(root: int) -> int:
    total = 0
    for pid in tree_pids(root):
        try:
            text = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


class Skip(Exception):
    """A side that cannot run here; the message is the one line that says why."""


def _run_quiet(cmd: list[str], cwd: Path | None = None, timeout: float = 900) -> None:
    """Run an installer; on failure raise Skip with its last line of output."""
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise Skip(f"{cmd[0]} {cmd[1] if len(cmd) > 1 else ''} failed: {e}") from e
    if done.returncode != 0:
        lines = [x for x in (done.stderr + done.stdout).splitlines() if x.strip() and "WARNING" not in x]
        raise Skip(f"`{' '.join(cmd[:3])} ...` exited {done.returncode}: {lines[-1] if lines else ''}")


# -- the workload ---------------------------------------------------------------------------------


def model_toml(name: str, max_registers: int) -> str:
    lines = [
        f'name = "{name}"',
        'protocol = "modbus"',
        'vendor = "meter-gateway bench"',
        'description = "bench/peers.py workload: 10 holding registers, u16/i16"',
        "",
        "[source]",
        'title = "bench/peers.py"',
        'version = "1"',
        "",
        "[defaults]",
        'function = "holding"',
        'type = "u16"',
        f"max_registers_per_read = {max_registers}",
        "max_gap = 0",
        "",
        "[[sections]]",
        'source = "holding registers 0-9"',
        "points = [",
    ]
    for address, quantity, kind, scale, unit in REGISTERS:
        lines.append(
            f'  {{ quantity = "{quantity}", address = {address}, type = "{kind}", scale = {scale}, unit = "{unit}" }},'
        )
    lines.append("]")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Workload:
    devices: int
    ports: int
    interval: float

    def units_per_port(self) -> list[int]:
        base, extra = divmod(self.devices, self.ports)
        return [base + (1 if p < extra else 0) for p in range(self.ports)]

    @property
    def offered(self) -> float:
        return self.devices * len(REGISTERS) / self.interval

    def devices_on(self, ports: dict[str, int]) -> Iterator[tuple[str, int, int]]:
        """(device name, TCP port, unit id) of every device; names as meter-gateway's e2e uses."""
        for (bus, port), count in zip(sorted(ports.items()), self.units_per_port(), strict=True):
            for unit in range(1, count + 1):
                yield f"{bus}-m{unit:03d}", port, unit


def simulator_toml(workload: Workload, model: Path) -> str:
    lines = ["[simulator]", "seed = 7", ""]
    for p, count in enumerate(workload.units_per_port()):
        lines += [
            "[[bus]]",
            f'name = "b{p:03d}"',
            'protocol = "modbus-tcp"',
            "port = 0",
            f'model = "{model}"',
            "first_address = 1",
            f"count = {count}",
            "",
        ]
    return "\n".join(lines)


# -- the counter (a head-end subscriber) ----------------------------------------------------------


def _datapoints(kind: str) -> Callable[[bytes], list[int]]:
    """A function giving the hashes of the distinct datapoints in one payload of ``kind``."""
    if kind == "meter-gateway":
        from meter_gateway.gateway.uplink.contract import decode_batch

        return lambda payload: [hash(r.id) for r in decode_batch(payload).readings]
    if kind == "thingsboard":

        def thingsboard(payload: bytes) -> list[int]:
            # v1/gateway/telemetry: {"Device": [{"ts": ms, "values": {key: value}}, ...]}
            out: list[int] = []
            for device, entries in json.loads(payload).items():
                for entry in entries if isinstance(entries, list) else [entries]:
                    values = entry.get("values", entry)
                    ts = entry.get("ts")
                    out.extend(hash((device, key, ts)) for key in values if key != "ts")
            return out

        return thingsboard
    if kind == "node-red":

        def node_red(payload: bytes) -> list[int]:
            record = json.loads(payload)  # {"d": device, "ts": ms, "v": [registers]}
            device, ts = record["d"], record["ts"]
            return [hash((device, i, ts)) for i in range(len(record["v"]))]

        return node_red
    raise ValueError(f"unknown payload kind {kind!r}")


TB_RPC_REQUEST = "v1/devices/me/rpc/request/"
# What the stand-in for the ThingsBoard server answers to the gateway's session-limits request:
# no rate limits (ThingsBoard CE's transport default), 100 messages in flight. The gateway sends
# nothing until it has an answer.
TB_SESSION_LIMITS = {"rateLimits": {}, "gatewayRateLimits": {}, "maxInflightMessages": 100, "maxPayloadSize": 65536}


def _answer_thingsboard_rpc(client: Any, msg: Any) -> None:
    request = json.loads(msg.payload)
    if request.get("method") == "getSessionLimits":
        request_id = msg.topic.rsplit("/", 1)[1]
        client.publish(f"v1/devices/me/rpc/response/{request_id}", json.dumps(TB_SESSION_LIMITS), qos=1)


def _counter_main(kind: str, host: str, port: int, topic: str) -> int:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    decode = _datapoints(kind)
    seen: set[int] = set()
    bad = [0]
    ready = threading.Event()
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)

    def on_connect(c: mqtt.Client, *_: Any) -> None:
        c.subscribe([(topic, 1), *([(f"{TB_RPC_REQUEST}+", 1)] if kind == "thingsboard" else [])])

    def on_message(c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic.startswith(TB_RPC_REQUEST):
            _answer_thingsboard_rpc(c, msg)
            return
        try:
            seen.update(decode(bytes(msg.payload)))
        except (ValueError, KeyError, TypeError, AttributeError):
            bad[0] += 1  # not a datapoint message of this side (e.g. a device-connect notice)

    client.on_connect = on_connect
    client.on_subscribe = lambda *_: ready.set()
    client.on_message = on_message
    client.connect(host, port)
    client.loop_start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if not ready.wait(10):
        return 1
    print("ready", flush=True)
    while not stop.wait(0.1):
        print(f"n {time.monotonic():.4f} {len(seen)} {bad[0]}", flush=True)
    client.disconnect()
    client.loop_stop()
    return 0


class Counter:
    """The counter process of one side; ``sample()`` is its latest (monotonic time, datapoints)."""

    def __init__(self, kind: str, host: str, port: int, topic: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.peers", "_count", kind, host, str(port), topic],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.reader = LineReader(self.proc.stdout)
        self.reader.wait_for("ready", 15)

    def samples(self) -> list[tuple[float, int]]:
        out = []
        for line in list(self.reader.lines):
            parts = line.split()
            if len(parts) == 4 and parts[0] == "n":
                out.append((float(parts[1]), int(parts[2])))
        return out

    def sample(self) -> tuple[float, int]:
        got = self.samples()
        return got[-1] if got else (time.monotonic(), 0)

    def sample_near(self, when: float) -> tuple[float, int]:
        return min(self.samples(), key=lambda s: abs(s[0] - when))

    def stop(self) -> None:
        stop_process(self.proc)


# -- the sides ------------------------------------------------------------------------------------


@dataclass
class Started:
    """A running side: its root process, the counter's payload kind and topic, its log file."""

    proc: subprocess.Popen[Any]
    kind: str
    topic: str
    log: Path


@dataclass(frozen=True)
class Context:
    workdir: Path
    cache: Path
    broker_port: int
    ports: dict[str, int]  # simulator bus name -> TCP port
    workload: Workload


@dataclass(frozen=True)
class Side:
    name: str
    durable: str  # what is on disk before the datapoint leaves, in a few words
    install: Callable[[Path], None]
    start: Callable[[Context, Path], Started]


def _spawn(cmd: list[str], cwd: Path, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[Any]:
    with log.open("w") as out:
        return subprocess.Popen(
            cmd,
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )


def _nothing_to_install(_cache: Path) -> None:
    return None


def _meter_gateway(max_registers: int) -> Callable[[Context, Path], Started]:
    def start(ctx: Context, home: Path) -> Started:
        from meter_gateway.gateway.cli.local_broker import free_port
        from meter_gateway.gateway.uplink.contract import Topics

        name = f"bench-{max_registers}reg"
        model = home / f"{name}.toml"
        model.write_text(model_toml(name, max_registers))
        quantities = tuple(q for _, q, *_ in REGISTERS)
        proto = Protocol("modbus", "modbus-tcp", "modbus-tcp", "modbus", str(model), quantities, 1)
        per_port = ctx.workload.units_per_port()
        if len(set(per_port)) != 1:
            raise Skip("meter-gateway side needs --devices to be a multiple of --ports")
        config = gateway_config(
            proto,
            ctx.ports,
            per_port[0],
            broker_port=ctx.broker_port,
            metrics_port=free_port(),
            state_dir=home / "state",
            interval=ctx.workload.interval,
            quantities=quantities,
        )
        (home / "gateway.toml").write_text(config)
        log = home / "gateway.log"
        cmd = [sys.executable, "-m", "meter_gateway.gateway.cli", "run", "-c", str(home / "gateway.toml")]
        proc = _spawn([*cmd, "--log-level", "WARNING"], ROOT, log)
        return Started(proc, "meter-gateway", Topics(GATEWAY_ID).readings, log)

    return start


def _tb_venv(cache: Path) -> Path:
    return cache / "thingsboard-gateway"


def _install_thingsboard(cache: Path) -> None:
    venv = _tb_venv(cache)
    stamp = venv / ".installed"
    wanted = " ".join((THINGSBOARD_GATEWAY, *THINGSBOARD_EXTRAS))
    if stamp.exists() and stamp.read_text() == wanted:
        return
    print(f"installing {wanted} into {venv} ...", flush=True)
    if not (venv / "bin" / "python").exists():
        _run_quiet([sys.executable, "-m", "venv", str(venv)])
    _run_quiet(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", *wanted.split()]
    )
    stamp.write_text(wanted)


def _thingsboard(storage: str, wide: bool) -> Callable[[Context, Path], Started]:
    def start(ctx: Context, home: Path) -> Started:
        venv = _tb_venv(ctx.cache)
        package = next((venv / "lib").glob("python3*/site-packages/thingsboard_gateway"), None)
        if package is None:
            raise Skip(f"thingsboard-gateway is not installed in {venv}")
        config = home / "config"
        config.mkdir()
        if wide:
            timeseries: list[dict[str, Any]] = [
                {
                    "tag": "r${address}",
                    "type": "16uint",
                    "functionCode": 3,
                    "objectsCount": 1,
                    "address": f"0-{len(REGISTERS) - 1}",
                    "maxRegistersPerRequest": len(REGISTERS),
                }
            ]
        else:
            timeseries = [
                {"tag": f"r{a}", "type": "16uint", "functionCode": 3, "objectsCount": 1, "address": a}
                for a, *_ in REGISTERS
            ]
        slaves = [
            {
                "host": "127.0.0.1",
                "port": port,
                "type": "tcp",
                "method": "socket",
                "unitId": unit,
                "deviceName": device,
                "deviceType": "bench",
                "timeout": 35,
                "byteOrder": "BIG",
                "wordOrder": "BIG",
                "retries": 3,
                "retryOnEmpty": True,
                "retryOnInvalid": True,
                "pollPeriod": int(ctx.workload.interval * 1000),
                "connectAttemptTimeMs": 5000,
                "connectAttemptCount": 5,
                "waitAfterFailedAttemptsMs": 300000,
                "attributes": [],
                "timeseries": timeseries,
                "attributeUpdates": [],
                "rpc": [],
            }
            for device, port, unit in ctx.workload.devices_on(ctx.ports)
        ]
        (config / "modbus.json").write_text(json.dumps({"master": {"slaves": slaves}}, indent=1))
        shipped = json.loads((package / "config" / "tb_gateway.json").read_text())
        tb = shipped["thingsboard"]
        # mosquitto stands in for the ThingsBoard server: no remote configuration or shell, no
        # statistics telemetry, so only the connector's datapoints flow
        tb.update(
            host="127.0.0.1",
            port=ctx.broker_port,
            remoteShell=False,
            remoteConfiguration=False,
            security={"type": "accessToken", "accessToken": "bench"},
            qos=1,
        )
        tb["statistics"]["enable"] = False
        (home / "data").mkdir()
        if storage == "memory":
            shipped["storage"] = {"type": "memory", "read_records_count": 100, "max_records_count": 100000}
        else:
            shipped["storage"] = {
                "type": "sqlite",
                "data_file_path": str(home / "data" / "data.db"),
                "messages_ttl_check_in_hours": 1,
                "messages_ttl_in_days": 7,
            }
        shipped["grpc"] = {"enabled": False}
        shipped["connectors"] = [{"type": "modbus", "name": "Modbus", "configuration": "modbus.json"}]
        (config / "tb_gateway.json").write_text(json.dumps(shipped, indent=1))
        logs = json.loads((package / "config" / "logs.json").read_text())
        for logger in [*logs.get("loggers", {}).values(), logs.get("root", {})]:
            logger["level"] = "WARNING"
        # pymodbus 3.9 warns that the connector's payload decoder is deprecated, once per decoded
        # value: an operator would silence that, and the table should not measure log writing
        logs.setdefault("loggers", {})["pymodbus"] = {"level": "ERROR"}
        for handler in logs.get("handlers", {}).values():
            if "filename" in handler:
                handler["filename"] = str(home / "logs" / Path(handler["filename"]).name)
        (config / "logs.json").write_text(json.dumps(logs, indent=1))
        (home / "logs").mkdir()
        log = home / "thingsboard.log"
        # It posts to its vendor's update service at start and hourly, with no setting to stop it:
        # a proxy on a closed loopback port makes that post fail at once, and off-host traffic none.
        env = {
            **os.environ,
            "TB_GW_CONFIG_DIR": str(config),
            "HTTPS_PROXY": "http://127.0.0.1:9",
            "HTTP_PROXY": "http://127.0.0.1:9",
            "NO_PROXY": "127.0.0.1,localhost",
        }
        proc = _spawn([str(venv / "bin" / "thingsboard-gateway")], home, log, env)
        return Started(proc, "thingsboard", "v1/gateway/telemetry", log)

    return start


def _node_red_dir(cache: Path) -> Path:
    return cache / "node-red"


def _install_node_red(cache: Path) -> None:
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        raise Skip("node and npm are not installed (Debian: apt-get install nodejs npm)")
    home = _node_red_dir(cache)
    stamp = home / ".installed"
    wanted = " ".join(NODE_RED)
    if stamp.exists() and stamp.read_text() == wanted:
        return
    print(f"installing {wanted} into {home} ...", flush=True)
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "package.json").exists():
        (home / "package.json").write_text('{"name": "meter-gateway-bench-peers", "private": true}\n')
    _run_quiet([npm, "install", "--no-audit", "--no-fund", "--save-exact", *NODE_RED], cwd=home)
    stamp.write_text(wanted)


# Runs once per read: the device name is the read node's topic, the values its payload.
NODE_RED_FORMAT = (
    'return {topic: "bench/nodered/" + msg.topic, '
    "payload: JSON.stringify({d: msg.topic, ts: Date.now(), v: msg.payload})};"
)


def node_red_flow(ctx: Context) -> list[dict[str, Any]]:
    flow: list[dict[str, Any]] = [
        {"id": "tab", "type": "tab", "label": "bench"},
        {
            "id": "broker",
            "type": "mqtt-broker",
            "name": "mosquitto",
            "broker": "127.0.0.1",
            "port": str(ctx.broker_port),
            "clientid": "",
            "autoConnect": True,
            "usetls": False,
            "protocolVersion": "4",
            "keepalive": "60",
            "cleansession": True,
        },
        {"id": "out", "type": "mqtt out", "z": "tab", "topic": "", "qos": "1", "retain": "false", "broker": "broker"},
        {"id": "fmt", "type": "function", "z": "tab", "func": NODE_RED_FORMAT, "outputs": 1, "wires": [["out"]]},
    ]
    for bus, port in sorted(ctx.ports.items()):
        flow.append(
            {
                "id": f"client-{bus}",
                "type": "modbus-client",
                "name": bus,
                "clienttype": "tcp",
                "bufferCommands": True,
                "stateLogEnabled": False,
                "queueLogEnabled": False,
                "failureLogEnabled": False,
                "tcpHost": "127.0.0.1",
                "tcpPort": str(port),
                "tcpType": "DEFAULT",
                "unit_id": "1",
                "commandDelay": "1",
                "clientTimeout": "1000",
                "reconnectOnTimeout": True,
                "reconnectTimeout": "2000",
                "parallelUnitIdsAllowed": True,
            }
        )
    bus_of = {port: bus for bus, port in ctx.ports.items()}
    for device, port, unit in ctx.workload.devices_on(ctx.ports):
        flow.append(
            {
                "id": f"read-{device}",
                "type": "modbus-read",
                "z": "tab",
                "topic": device,
                "showStatusActivities": False,
                "logIOActivities": False,
                "showErrors": True,
                "showWarnings": True,
                "unitid": str(unit),
                "dataType": "HoldingRegister",
                "adr": "0",
                "quantity": str(len(REGISTERS)),
                "rate": f"{ctx.workload.interval:g}",
                "rateUnit": "s",
                "delayOnStart": False,
                "server": f"client-{bus_of[port]}",
                "useIOFile": False,
                "useIOForPayload": False,
                "emptyMsgOnFail": False,
                "wires": [["fmt"], []],
            }
        )
    return flow


def _start_node_red(ctx: Context, home: Path) -> Started:
    from meter_gateway.gateway.cli.local_broker import free_port

    red = _node_red_dir(ctx.cache) / "node_modules" / "node-red" / "red.js"
    node = shutil.which("node")
    if node is None or not red.exists():
        raise Skip(f"node-red is not installed in {_node_red_dir(ctx.cache)}")
    user_dir = home / "node-red"
    user_dir.mkdir()
    (user_dir / "flows.json").write_text(json.dumps(node_red_flow(ctx), indent=1))
    # no editor and no HTTP routes: the runtime only; the port is bound on loopback all the same
    (user_dir / "settings.js").write_text(
        "module.exports = {\n"
        f'  uiHost: "127.0.0.1", uiPort: {free_port()},\n'
        "  httpAdminRoot: false, httpNodeRoot: false, disableEditor: true,\n"
        '  flowFile: "flows.json", credentialSecret: false,\n'
        '  logging: { console: { level: "warn" } },\n'
        '  contextStorage: { default: { module: "memory" } },\n'
        "};\n"
    )
    log = home / "node-red.log"
    cmd = [node, str(red), "--userDir", str(user_dir), "--settings", str(user_dir / "settings.js"), "flows.json"]
    return Started(_spawn(cmd, user_dir, log), "node-red", "bench/nodered/#", log)


SIDES = {
    s.name: s
    for s in (
        Side("meter-gateway", "yes: SQLite FULL before publish", _nothing_to_install, _meter_gateway(len(REGISTERS))),
        Side("meter-gateway-1reg", "yes: SQLite FULL before publish", _nothing_to_install, _meter_gateway(1)),
        Side("thingsboard-10reg-memory", "no: memory", _install_thingsboard, _thingsboard("memory", wide=True)),
        Side(
            "thingsboard-10reg-sqlite",
            "partly: SQLite NORMAL (power cut loses)",
            _install_thingsboard,
            _thingsboard("sqlite", wide=True),
        ),
        Side("thingsboard-default", "no: memory", _install_thingsboard, _thingsboard("memory", wide=False)),
        Side("node-red", "no: memory", _install_node_red, _start_node_red),
    )
}


# -- one measurement ------------------------------------------------------------------------------


@dataclass
class Measure:
    rate: float  # distinct datapoints/s at the counter over the window
    cpu_per_1000: float  # CPU ms of the side's process tree per 1,000 datapoints
    cpu_share: float  # share of one core over the window
    rss_mib: float
    simulator_share: float  # the simulator's share of one core (is it the limit?)
    broker_share: float


def measure_side(side: Side, ctx: Context, args: argparse.Namespace, simulator_pid: int, broker_pid: int) -> Measure:
    home = Path(tempfile.mkdtemp(prefix=f"{side.name}-", dir=ctx.workdir))
    started = side.start(ctx, home)
    counter: Counter | None = None
    try:
        counter = Counter(started.kind, "127.0.0.1", ctx.broker_port, started.topic)
        # Start-up (imports, connecting every device) is not the steady state being compared: the
        # warm-up runs from each side's first datapoint.
        deadline = time.monotonic() + START_TIMEOUT
        while counter.sample()[1] == 0:
            if started.proc.poll() is not None:
                raise Skip(f"exited {started.proc.returncode} at start: {_tail(started.log)}")
            if time.monotonic() > deadline:
                raise Skip(f"no datapoints within {START_TIMEOUT:g} s of start: {_tail(started.log)}")
            time.sleep(0.1)
        time.sleep(args.warmup)
        # Datapoints arrive in bursts, one per poll interval: a window of whole intervals, its ends
        # read at the same phase of the schedule, counts whole bursts and not a fraction of one.
        window = max(1, round(args.seconds / ctx.workload.interval)) * ctx.workload.interval
        c0 = time.monotonic()
        cpu0 = tree_cpu_seconds(started.proc.pid)
        sim0, brk0 = tree_cpu_seconds(simulator_pid), tree_cpu_seconds(broker_pid)
        t0, n0 = counter.sample()
        time.sleep(max(0.0, t0 + window - time.monotonic()) + 0.3)  # + a counter line past the end
        t1, n1 = counter.sample_near(t0 + window)
        cpu1 = tree_cpu_seconds(started.proc.pid)
        sim1, brk1 = tree_cpu_seconds(simulator_pid), tree_cpu_seconds(broker_pid)
        cpu_elapsed = time.monotonic() - c0
        rss = tree_rss_kib(started.proc.pid)
        if started.proc.poll() is not None:
            raise Skip(f"exited {started.proc.returncode} while measured: {_tail(started.log)}")
        count, elapsed = n1 - n0, t1 - t0
        share = (cpu1 - cpu0) / cpu_elapsed
        return Measure(
            rate=count / elapsed,
            cpu_per_1000=1e6 * share * elapsed / max(count, 1),
            cpu_share=share,
            rss_mib=rss / 1024,
            simulator_share=(sim1 - sim0) / cpu_elapsed,
            broker_share=(brk1 - brk0) / cpu_elapsed,
        )
    finally:
        _stop_tree(started.proc)
        if counter is not None:
            counter.stop()
        if args.keep:
            print(f"    {side.name}: kept {home}", flush=True)
        else:
            shutil.rmtree(home, ignore_errors=True)


def _stop_tree(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM to the side's process group (it was started in its own session), then SIGKILL."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(15)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # helpers left behind by the side
    proc.wait()


def _tail(log: Path) -> str:
    lines = [x.strip() for x in log.read_text(errors="replace").splitlines() if x.strip()] if log.exists() else []
    return lines[-1][:300] if lines else "(no output)"


@contextlib.contextmanager
def _workdir(keep: bool) -> Iterator[str]:
    if keep:
        yield tempfile.mkdtemp(prefix="bench-peers-")
    else:
        with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp:
            yield tmp


@contextlib.contextmanager
def simulator(workload: Workload, workdir: Path) -> Iterator[tuple[int, dict[str, int]]]:
    model = workdir / "bench-sim.toml"
    model.write_text(model_toml("bench-sim", 125))
    (workdir / "sim.toml").write_text(simulator_toml(workload, model))
    proc = subprocess.Popen(
        [sys.executable, "-m", "meter_gateway.gateway.cli", "simulate", "--config", str(workdir / "sim.toml")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ports = parse_endpoints(LineReader(proc.stdout).wait_for("ready", 60))
        if len(ports) != workload.ports:
            raise RuntimeError(f"simulator reported {len(ports)} ports, expected {workload.ports}")
        yield proc.pid, ports
    finally:
        stop_process(proc)


# -- main -----------------------------------------------------------------------------------------


def _table(results: dict[str, list[Measure]], skipped: dict[str, str], offered: float) -> str:
    med = statistics.median
    rows = [
        "| side | CPU ms per 1,000 datapoints | datapoints/s (runs) | sustained | RSS MiB | durable before counted |",
        "|---|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        side = SIDES[name]
        if not runs:
            continue  # its "skipped" line says why
        rate = med(r.rate for r in runs)
        rates = ", ".join(f"{r.rate:,.0f}" for r in runs)
        sustained = "yes" if rate >= SUSTAINED * offered else f"no ({rate / offered:.0%})"
        rows.append(
            f"| {name} | {med(r.cpu_per_1000 for r in runs):.0f} | {rate:,.0f} ({rates}) | {sustained} | "
            f"{med(r.rss_mib for r in runs):.0f} | {side.durable} |"
        )
    rows += [f"skipped {name}: {why}" for name, why in skipped.items()]
    return "\n".join(rows)


def run(args: argparse.Namespace) -> tuple[dict[str, list[Measure]], dict[str, str], Workload]:
    from meter_gateway.gateway.cli.local_broker import LocalBroker

    workload = Workload(args.devices, args.ports, args.interval)
    names: list[str] = args.sides
    skipped: dict[str, str] = {}
    for name in names:
        try:
            SIDES[name].install(args.cache_dir)
        except Skip as e:
            skipped[name] = str(e)
            print(f"skipped {name}: {e}", flush=True)
    active = [n for n in names if n not in skipped]
    results: dict[str, list[Measure]] = {n: [] for n in active}
    print(
        f"workload: {workload.devices} Modbus TCP devices on {workload.ports} ports x {len(REGISTERS)} holding "
        f"registers every {workload.interval:g} s = {workload.offered:,.0f} datapoints/s offered; "
        f"warm-up {args.warmup:g} s, window {args.seconds:g} s, {args.runs} run(s)",
        flush=True,
    )
    for number in range(args.runs):
        order = active[number % len(active) :] + active[: number % len(active)] if active else []
        with (
            _workdir(args.keep) as tmp,
            LocalBroker() as broker,
            simulator(workload, Path(tmp)) as (sim_pid, ports),
        ):
            if broker.pid is None:
                raise RuntimeError("mosquitto is not running")
            for name in order:
                if name in skipped:
                    continue
                ctx = Context(Path(tmp), args.cache_dir, broker.port, ports, workload)
                try:
                    m = measure_side(SIDES[name], ctx, args, sim_pid, broker.pid)
                except Skip as e:
                    skipped[name] = str(e)
                    print(f"skipped {name}: {e}", flush=True)
                    continue
                results[name].append(m)
                print(
                    f"run {number + 1} {name}: {m.rate:,.0f} datapoints/s, {m.cpu_per_1000:.1f} CPU ms per 1,000 "
                    f"({m.cpu_share:.0%} of a core), RSS {m.rss_mib:.0f} MiB; simulator {m.simulator_share:.0%}, "
                    f"mosquitto {m.broker_share:.0%} of a core",
                    flush=True,
                )
    return results, skipped, workload


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "meter-gateway-bench"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="peers", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, of: {', '.join(SIDES)}")
    parser.add_argument("--runs", type=int, default=3, help="runs, sides alternating within each; medians reported")
    parser.add_argument(
        "--warmup", type=float, default=20.0, help="seconds from a side's first datapoint to its window"
    )
    parser.add_argument("--seconds", type=float, default=30.0, help="measuring window per side and run")
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--ports", type=int, default=20, help="simulator TCP ports the devices are spread over")
    parser.add_argument("--interval", type=float, default=1.0, help="poll interval, seconds")
    parser.add_argument("--cache-dir", type=Path, default=default_cache(), help="where peers are installed")
    parser.add_argument("--keep", action="store_true", help="keep each side's config and logs (paths printed)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 20 devices, 2 ports, 3 s + 4 s, 1 run")
    args = parser.parse_args(argv)
    if args.quick:
        args.devices, args.ports, args.warmup, args.seconds, args.runs = 20, 2, 3.0, 4.0, 1
    args.sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown = [s for s in args.sides if s not in SIDES]
    if unknown:
        parser.error(f"unknown side(s) {', '.join(unknown)}; known: {', '.join(SIDES)}")
    if args.runs < 1 or args.seconds <= 0 or args.warmup < 0 or args.interval <= 0:
        parser.error("--runs must be >= 1, --seconds and --interval > 0, --warmup >= 0")
    if not 1 <= args.ports <= args.devices or args.devices > 247 * args.ports:
        parser.error("--ports must be 1..--devices, with at most 247 devices (unit ids) per port")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_count"]:
        return _counter_main(argv[1], argv[2], int(argv[3]), argv[4])
    args = parse_args(argv)
    results, skipped, workload = run(args)
    print()
    print(
        f"{time.strftime('%Y-%m-%d')}: {workload.devices} devices x {len(REGISTERS)} registers every "
        f"{workload.interval:g} s = {workload.offered:,.0f} datapoints/s offered; medians of {args.runs} run(s)"
    )
    print(_table(results, skipped, workload.offered))
    return 0 if any(results.values()) else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())

"""`meter-gateway ctl`: a reference head-end client for signed remote-control commands.

meter-gateway ctl keygen --key-id ID --out DIR [--role command|release ...]
meter-gateway ctl ACTION METER... --gateway GW --key FILE --key-id ID [--broker HOST:PORT] [--wait]
meter-gateway ctl release COMMAND_ID... --gateway GW --key FILE --key-id ID [--meter M ...] [--wait]

ACTION: disconnect, reconnect, status, keep-power-on, keep-power-off, alarm-on, alarm-off,
time-sync, read-now, valve-close, valve-open. Head-end side, like
gateway/uplink/headend_client.py: paho's threaded client. It subscribes to the gateway's acks
before publishing, so no transition is missed.

Exit codes: 0 published (without --wait) or every meter verified (with --wait); 1 the command
finished but some meter is not verified (rejected, meter_refused, unverified, expired);
2 usage, key or file problem; 3 broker problem (cannot connect or subscribe, PUBACK refused or
missing); 4 --wait timed out before every meter reached a terminal state (e.g. held).
"""

from __future__ import annotations

import argparse
import os
import queue
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion

from meter_gateway.gateway.commands.auth import SigningKey, load_signing_key, sign_envelope
from meter_gateway.gateway.commands.envelope import (
    TERMINAL_STATES,
    Ack,
    CommandEnvelope,
    Params,
    decode_ack,
    encode_envelope,
)
from meter_gateway.gateway.uplink.contract import TOPIC_ROOT, ContractError, Topics

EXIT_OK: Final = 0
EXIT_NOT_VERIFIED: Final = 1
EXIT_USAGE: Final = 2
EXIT_BROKER: Final = 3
EXIT_TIMEOUT: Final = 4

# ctl verb -> envelope action
ACTIONS: Final = {
    "disconnect": "disconnect",
    "reconnect": "reconnect",
    "status": "relay_status",
    "keep-power-on": "keep_power_on",
    "keep-power-off": "keep_power_off",
    "alarm-on": "alarm_on",
    "alarm-off": "alarm_off",
    "time-sync": "time_sync",
    "read-now": "read_now",
    "valve-close": "valve_close",
    "valve-open": "valve_open",
}
# not_before is backdated by this much so a gateway whose clock is a little behind still runs it
CLOCK_TOLERANCE: Final = 30.0


class CtlError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gateway", required=True, help="target gateway id")
    p.add_argument("--key", required=True, metavar="FILE", help="signing key: Ed25519 PEM private key (or HMAC secret)")
    p.add_argument("--key-id", required=True, metavar="ID", help="the key's id in the gateway's [commands] keys")
    p.add_argument("--alg", choices=("ed25519", "hmac-sha256"), default="ed25519")
    p.add_argument("--broker", default="127.0.0.1:1883", metavar="HOST:PORT")
    p.add_argument("--username")
    p.add_argument("--password-file", metavar="FILE")
    p.add_argument("--ca-file", metavar="FILE", help="use TLS, trusting this CA")
    p.add_argument("--topic-prefix", default=TOPIC_ROOT, metavar="P")
    p.add_argument("--id", dest="command_id", metavar="CMD_ID", help="command id (default: ctl-<random>)")
    p.add_argument("--expires", type=float, default=300.0, metavar="S", help="valid for S seconds (default 300)")
    p.add_argument("--seq", type=int, metavar="N", help="per-key sequence number (default: unix time in ms)")
    p.add_argument("--wait", action="store_true", help="print acks until every meter reaches a terminal state")
    p.add_argument("--timeout", type=float, default=60.0, metavar="S", help="give up waiting after S s (default 60)")
    p.add_argument("--json", action="store_true", help="print acks as raw JSON lines")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meter-gateway ctl",
        description="Sign and publish remote-control commands; follow their acknowledgements.",
        epilog="exit codes: 0 ok/all verified, 1 some meter not verified, 2 usage or key problem, "
        "3 broker problem, 4 timed out waiting",
    )
    sub = parser.add_subparsers(dest="verb", required=True)
    keygen = sub.add_parser("keygen", help="create an Ed25519 key pair and print the gateway config snippet")
    keygen.add_argument("--key-id", required=True, metavar="ID")
    keygen.add_argument("--out", required=True, metavar="DIR")
    keygen.add_argument("--role", action="append", choices=("command", "release"), help="roles (default command)")
    for verb in ACTIONS:
        p = sub.add_parser(verb, help=f"send {ACTIONS[verb]} to meters")
        p.add_argument("meters", nargs="+", metavar="METER")
        _common(p)
        if verb == "reconnect":
            p.add_argument("--mode", choices=("close_permit", "direct_close"), help="default: the meter's setting")
        if ACTIONS[verb] in ("disconnect", "reconnect", "keep_power_on", "keep_power_off"):
            p.add_argument(
                "--apdu",
                metavar="HEX",
                help="DL/T 698.45 pass-through: the secured APDU (from the head-end's crypto service) to forward",
            )
        if verb == "read-now":
            p.add_argument("--quantity", action="append", dest="quantities", help="quantity (repeatable)")
    release = sub.add_parser("release", help="release commands held by the mass-disconnect guard")
    release.add_argument("commands", nargs="+", metavar="COMMAND_ID")
    release.add_argument("--meter", action="append", dest="meters", default=[], help="only these meters")
    _common(release)
    return parser


# -- keygen --------------------------------------------------------------------------------------


def _write_new(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)  # the umask may have narrowed a public key's mode; never widens the private one


def keygen(key_id: str, out: Path, roles: list[str]) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    private_path, public_path = out / f"{key_id}.key", out / f"{key_id}.pub"
    for path in (private_path, public_path):
        if path.exists():
            raise CtlError(f"{path} exists; not overwriting a key", EXIT_USAGE)
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_new(private_path, private_pem, 0o600)
    _write_new(public_path, public_pem, 0o644)
    print(f"private key: {private_path} (keep it on the head-end; never copy it to a gateway)")
    print(f"public key:  {public_path}")
    print("\nAdd to the gateway config (copy the .pub file next to it):\n")
    print("[[commands.keys]]")
    print(f'id = "{key_id}"')
    print('alg = "ed25519"')
    print(f'public_key_file = "{public_path.resolve()}"')
    print("roles = [" + ", ".join(f'"{r}"' for r in roles) + "]")
    return private_path, public_path


# -- building the command ------------------------------------------------------------------------


def build_envelope(args: argparse.Namespace, key: SigningKey, now: float) -> CommandEnvelope:
    if args.verb == "release":
        action, meters = "release", list(args.meters)
        params: Params | None = Params(commands=list(args.commands))
    else:
        action, meters = ACTIONS[args.verb], list(args.meters)
        params = None
        apdu = getattr(args, "apdu", None)
        if apdu is not None:
            apdu = apdu.replace(" ", "").upper()
        if (action == "reconnect" and args.mode) or apdu:
            params = Params(mode=args.mode if action == "reconnect" else None, apdu=apdu or None)
        elif action == "read_now" and args.quantities:
            params = Params(quantities=list(args.quantities))
    if args.expires <= 0:
        raise CtlError("--expires must be > 0", EXIT_USAGE)
    issued = round(now, 3)
    env = CommandEnvelope(
        v=1,
        id=args.command_id or f"ctl-{uuid.uuid4().hex[:20]}",
        gateway=args.gateway,
        meters=meters,
        action=action,  # type: ignore[arg-type]  # one of ACTIONS' values
        params=params,
        issued_at=issued,
        not_before=round(issued - CLOCK_TOLERANCE, 3),
        expires_at=round(issued + args.expires, 3),
        seq=args.seq if args.seq is not None else int(now * 1000),
        key_id=key.key_id,
        alg=key.alg,
    )
    try:
        env.check()
    except ContractError as exc:
        raise CtlError(f"bad command: {exc}", EXIT_USAGE) from None
    return sign_envelope(env, key)


# -- MQTT ----------------------------------------------------------------------------------------


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise CtlError(f"--broker wants HOST:PORT, got {text!r}", EXIT_USAGE)
    return host.strip("[]") or "127.0.0.1", int(port)


@dataclass
class _Session:
    acks: queue.Queue[bytes] = field(default_factory=queue.Queue)
    connected: threading.Event = field(default_factory=threading.Event)
    subscribed: threading.Event = field(default_factory=threading.Event)
    published: threading.Event = field(default_factory=threading.Event)
    problem: str | None = None
    puback_reason: int | None = None


class _Client:
    """paho on its own network thread: subscribe to acks, publish one command, collect acks."""

    def __init__(self, args: argparse.Namespace, topics: Topics) -> None:
        self.topics = topics
        self.s = _Session()
        self.host, self.port = _host_port(args.broker)
        self.c = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"meter-gateway-ctl-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        if args.username:
            password = None
            if args.password_file:
                password = Path(args.password_file).read_text(encoding="utf-8").rstrip("\r\n")
            self.c.username_pw_set(args.username, password)
        if args.ca_file:
            self.c.tls_set(ca_certs=args.ca_file)
        self.c.on_connect = self._on_connect
        self.c.on_subscribe = self._on_subscribe
        self.c.on_message = self._on_message
        self.c.on_publish = self._on_publish

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        if rc.is_failure:
            self.s.problem = f"broker refused the connection: {rc}"
            self.s.connected.set()
            self.s.subscribed.set()  # nothing more will come: stop waiting
            client.disconnect()
            return
        self.s.connected.set()
        client.subscribe(self.topics.acks, qos=1)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, codes: Any, props: Any = None) -> None:
        if any(c.is_failure for c in codes):
            self.s.problem = f"broker refused the subscription to {self.topics.acks}: {codes[0]}"
        self.s.subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == self.topics.acks:
            self.s.acks.put(bytes(msg.payload))

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, rc: Any, props: Any = None) -> None:
        self.s.puback_reason = int(rc.value) if rc is not None else 0
        self.s.published.set()

    def start(self, timeout: float) -> None:
        try:
            self.c.connect(self.host, self.port, keepalive=30)
        except OSError as exc:
            raise CtlError(f"cannot connect to {self.host}:{self.port}: {exc}", EXIT_BROKER) from None
        self.c.loop_start()
        if not self.s.subscribed.wait(timeout) or self.s.problem:
            raise CtlError(self.s.problem or f"no SUBACK from {self.host}:{self.port} in {timeout:g} s", EXIT_BROKER)

    def publish(self, payload: bytes, timeout: float) -> None:
        info = self.c.publish(self.topics.commands, payload, qos=1, retain=False)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise CtlError(f"publish failed: {mqtt.error_string(info.rc)}", EXIT_BROKER)
        if not self.s.published.wait(timeout):
            raise CtlError(f"no PUBACK for the command within {timeout:g} s", EXIT_BROKER)
        # 0x10 "no matching subscribers" is still success: the broker took it (gateway offline?)
        if self.s.puback_reason is not None and self.s.puback_reason >= 0x80:
            raise CtlError(f"broker refused the command (PUBACK reason 0x{self.s.puback_reason:02x})", EXIT_BROKER)

    def stop(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


# -- following acks ------------------------------------------------------------------------------


def _when(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def ack_line(ack: Ack) -> str:
    parts = [_when(ack.at), ack.command or "-", ack.meter or "(all)", ack.state]
    if ack.relay:
        parts.append(f"relay={ack.relay}")
    if ack.reason:
        parts.append(f"reason={ack.reason}")
    if ack.detail:
        parts.append(f"- {ack.detail}")
    return "  ".join(parts)


class Tracker:
    """Which meters of one command reached which state (an ack with meter null counts for all)."""

    def __init__(self, env: CommandEnvelope) -> None:
        self.command = env.id
        self.gateway = env.gateway
        self.meters = list(env.meters)
        self.final: dict[str, str] = {}
        self.command_final: str | None = None
        self.seen: set[int] = set()

    def take(self, ack: Ack) -> bool:
        """Record an ack; False if it is not for this command or a duplicate (QoS 1 resend)."""
        if ack.command != self.command or ack.gateway != self.gateway or ack.seq in self.seen:
            return False
        self.seen.add(ack.seq)
        if ack.state in TERMINAL_STATES:
            if ack.meter is None:
                self.command_final = ack.state
                for m in self.meters:
                    self.final.setdefault(m, ack.state)
            elif ack.meter in self.meters:
                self.final.setdefault(ack.meter, ack.state)
        return True

    @property
    def done(self) -> bool:
        if not self.meters:
            return self.command_final is not None
        return all(m in self.final for m in self.meters)

    @property
    def all_verified(self) -> bool:
        if not self.meters:
            return self.command_final == "verified"
        return all(self.final.get(m) == "verified" for m in self.meters)


def follow(client: _Client, env: CommandEnvelope, timeout: float, *, as_json: bool) -> int:
    tracker = Tracker(env)
    deadline = time.monotonic() + timeout
    while not tracker.done:
        left = deadline - time.monotonic()
        if left <= 0:
            pending = [m for m in tracker.meters if m not in tracker.final] or ["(command)"]
            print(f"timed out after {timeout:g} s; not finished: {', '.join(pending[:20])}", file=sys.stderr)
            return EXIT_TIMEOUT
        try:
            payload = client.s.acks.get(timeout=min(left, 0.5))
        except queue.Empty:
            continue
        try:
            ack = decode_ack(payload)
        except ContractError as exc:
            print(f"ignoring a bad ack: {exc}", file=sys.stderr)
            continue
        if tracker.take(ack):
            print(payload.decode("utf-8", "replace") if as_json else ack_line(ack), flush=True)
    if tracker.all_verified:
        return EXIT_OK
    counts: dict[str, int] = {}
    for state in tracker.final.values():
        counts[state] = counts.get(state, 0) + 1
    summary = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    print(f"finished, not all verified: {summary or tracker.command_final}", file=sys.stderr)
    return EXIT_NOT_VERIFIED


def send(args: argparse.Namespace) -> int:
    try:
        key = load_signing_key(Path(args.key).read_bytes(), args.key_id, args.alg)
    except OSError as exc:
        raise CtlError(f"cannot read key {args.key}: {exc.strerror or exc}", EXIT_USAGE) from None
    except ValueError as exc:
        raise CtlError(f"key {args.key}: {exc}", EXIT_USAGE) from None
    try:
        topics = Topics(args.gateway, root=args.topic_prefix)
    except ContractError as exc:
        raise CtlError(str(exc), EXIT_USAGE) from None
    env = build_envelope(args, key, time.time())
    client = _Client(args, topics)
    try:
        client.start(timeout=10.0)
        client.publish(encode_envelope(env), timeout=10.0)
        print(f"sent {env.action} {env.id} to {len(env.meters)} meter(s) on {topics.commands} (seq {env.seq})")
        if client.s.puback_reason == 0x10:
            print("warning: no subscriber on the command topic; is the gateway connected?", file=sys.stderr)
        sys.stdout.flush()
        if not args.wait:
            return EXIT_OK
        return follow(client, env, args.timeout, as_json=args.json)
    finally:
        client.stop()


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.verb == "keygen":
            keygen(args.key_id, Path(args.out), args.role or ["command"])
            return EXIT_OK
        return send(args)
    except CtlError as exc:
        print(f"meter-gateway ctl: {exc}", file=sys.stderr)
        return exc.code

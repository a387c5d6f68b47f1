"""MQTT broker fixtures: a real mosquitto on a free 127.0.0.1 port with a generated config.

``mosquitto`` gives a started default broker (anonymous, no persistence). ``broker_factory``
makes variants: an ACL file (``acl=``), password users (``users=``), a TLS listener with
generated CA/server/client certificates (``tls=True``), sessions persisted across restarts
(``persistence=True``), extra config lines (``extra_config=``). Every Broker can be
stopped, killed, restarted on the SAME port and told to reload its ACL/password files (SIGHUP)
within a test. ``Subscriber`` is a threaded paho client that records what it receives.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True)
class BrokerTls:
    """PEM files of a throw-away PKI: the client trusts ``ca_file`` and presents its pair."""

    ca_file: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str


def make_pki(directory: Path, client_cn: str = "gateway-1") -> BrokerTls:
    """CA, server certificate for 127.0.0.1/localhost and a client certificate (EC P-256)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> str:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return str(path)

    def write_cert(cert: x509.Certificate, path: Path) -> str:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return str(path)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("meter-gateway test CA"))
        .issuer_name(name("meter-gateway test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(cn: str, server: bool) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        return builder.sign(ca_key, hashes.SHA256()), key

    server, server_key = leaf("localhost", server=True)
    client, client_key = leaf(client_cn, server=False)
    directory.mkdir(parents=True, exist_ok=True)
    return BrokerTls(
        ca_file=write_cert(ca, directory / "ca.pem"),
        server_cert=write_cert(server, directory / "server.pem"),
        server_key=write_key(server_key, directory / "server.key"),
        client_cert=write_cert(client, directory / "client.pem"),
        client_key=write_key(client_key, directory / "client.key"),
    )


def _password_line(user: str, password: str) -> str:
    # mosquitto's "$6$" format: base64(salt) and base64(sha512(password + salt))
    salt = os.urandom(12)
    digest = hashlib.sha512(password.encode() + salt).digest()
    return f"{user}:$6${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


class Broker:
    """One mosquitto process; ``stop()``/``start()`` keeps the port, so clients can reconnect."""

    def __init__(
        self,
        workdir: Path,
        *,
        acl: str | None = None,
        users: dict[str, str] | None = None,
        tls: bool = False,
        persistence: bool = False,
        extra_config: str = "",
    ) -> None:
        self.host = "127.0.0.1"
        self.port = _free_port()
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.conf_path = workdir / "mosquitto.conf"
        self.log_path = workdir / "mosquitto.log"
        self.acl_path = workdir / "acl" if acl is not None else None
        self.password_path = workdir / "passwords" if users else None
        self.tls = make_pki(workdir / "pki") if tls else None
        self.users = dict(users or {})
        self._extra = extra_config
        self.persistence = persistence
        self._proc: subprocess.Popen[bytes] | None = None
        self._started_once = False  # after the first start the port is ours: never change it
        if acl is not None:
            self.set_acl(acl)
        if users:
            self.set_users(users)
        self._write_config()

    # -- configuration -----------------------------------------------------------------------

    def _write_config(self) -> None:
        lines = [
            "per_listener_settings false",
            f"listener {self.port} {self.host}",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.workdir}/",
            f"allow_anonymous {'false' if self.users else 'true'}",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
        ]
        if os.geteuid() == 0:
            # as root mosquitto would switch to user "mosquitto", who cannot read pytest's tmp dirs
            lines.append("user root")
        if self.acl_path is not None:
            lines.append(f"acl_file {self.acl_path}")
        if self.password_path is not None:
            lines.append(f"password_file {self.password_path}")
        if self.tls is not None:
            lines += [
                f"cafile {self.tls.ca_file}",
                f"certfile {self.tls.server_cert}",
                f"keyfile {self.tls.server_key}",
                "require_certificate true",
                "tls_version tlsv1.2",
            ]
        if self._extra:
            lines.append(self._extra)
        self.conf_path.write_text("\n".join(lines) + "\n")

    def set_acl(self, acl: str) -> None:
        """Rewrite the ACL file (call ``reload()`` on a running broker to apply it)."""
        if self.acl_path is None:
            raise RuntimeError("this broker was made without an ACL file")
        self.acl_path.write_text(acl.strip() + "\n")

    def set_users(self, users: dict[str, str]) -> None:
        if self.password_path is None:
            raise RuntimeError("this broker was made without a password file")
        self.users = dict(users)
        self.password_path.write_text("".join(_password_line(u, p) + "\n" for u, p in users.items()))
        self.password_path.chmod(0o600)

    # -- process -----------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self, timeout: float = 5.0) -> None:
        """Start mosquitto and return once it accepts TCP connections on ``port``."""
        if self.running:
            return
        for attempt in range(3):
            with self.log_path.open("ab") as log:
                self._proc = subprocess.Popen(
                    [MOSQUITTO, "-c", str(self.conf_path)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            if self._wait_listening(timeout):
                return
            text = self.log_text()
            self._reap()
            if "Address already in use" in text and attempt < 2 and not self._started_once:
                self.port = _free_port()  # lost the race for a fresh port: take another
                self._write_config()
                continue
            raise RuntimeError(f"mosquitto did not start on {self.host}:{self.port}:\n{text[-2000:]}")
        raise RuntimeError("mosquitto did not start")

    def _wait_listening(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self._proc is None or self._proc.poll() is not None:
                return False
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    self._started_once = True
                    return True
            except OSError:
                time.sleep(0.01)
        return False

    def _reap(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait(timeout=5)
        self._proc = None

    def stop(self) -> None:
        """Graceful stop (SIGTERM): clients see their connections closed."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._reap()

    def kill(self) -> None:
        """Abrupt death (SIGKILL), like a broker host losing power."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)
        self._reap()

    def restart(self) -> None:
        self.stop()
        self.start()

    def reload(self) -> None:
        """SIGHUP: mosquitto re-reads its ACL and password files."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGHUP)

    async def astart(self) -> None:
        await asyncio.to_thread(self.start)

    async def astop(self) -> None:
        await asyncio.to_thread(self.stop)

    async def akill(self) -> None:
        await asyncio.to_thread(self.kill)


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retain: bool
    qos: int


class Subscriber:
    """A paho client on its own network thread that records every message it gets.

    ``protocol`` 5 by default; ``clean=False`` with a fixed client id gives a persistent
    session (QoS 1 messages are queued by the broker while it is away).
    """

    def __init__(
        self,
        broker: Broker,
        topics: list[str],
        *,
        client_id: str | None = None,
        clean: bool = True,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self.broker = broker
        self.messages: list[Received] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._topics = topics
        self._clean = clean
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id or f"test-sub-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        if username is not None:
            self._client.username_pw_set(username, password)
        if broker.tls is not None:
            self._client.tls_set(
                ca_certs=broker.tls.ca_file, certfile=broker.tls.client_cert, keyfile=broker.tls.client_key
            )
        self._props: Properties | None = None
        if not clean:
            self._props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            self._props.SessionExpiryInterval = 3600
        self._client.reconnect_delay_set(0.1, 0.5)  # type: ignore[arg-type]  # floats work; tests are short
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.on_subscribe = lambda *a: self._subscribed.set()

    def _on_connect(self, client: object, userdata: object, flags: object, rc: object, props: object = None) -> None:
        self._client.subscribe([(t, 1) for t in self._topics])

    def _on_message(self, client: object, userdata: object, msg: object) -> None:
        with self._lock:
            self.messages.append(
                Received(msg.topic, bytes(msg.payload), bool(msg.retain), msg.qos)  # type: ignore[attr-defined]
            )

    def start(self, timeout: float = 5.0) -> Subscriber:
        self._client.connect(
            self.broker.host, self.broker.port, keepalive=30, clean_start=self._clean, properties=self._props
        )
        self._client.loop_start()
        if not self._subscribed.wait(timeout):
            self.stop()
            raise RuntimeError("test subscriber did not get its SUBACK")
        return self

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def snapshot(self, topic: str | None = None) -> list[Received]:
        with self._lock:
            return [m for m in self.messages if topic is None or m.topic == topic]

    async def wait_for(self, cond: Callable[[list[Received]], bool], within: float = 5.0) -> list[Received]:
        end = time.monotonic() + within
        while True:
            got = self.snapshot()
            if cond(got):
                return got
            assert time.monotonic() < end, f"subscriber condition not met within {within} s ({len(got)} messages)"
            await asyncio.sleep(0.01)


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[Callable[..., Broker]]:
    """``broker_factory(acl=..., users=..., tls=..., start=True)`` -> Broker; all stopped after."""
    brokers: list[Broker] = []

    def make(*, start: bool = True, **kwargs: object) -> Broker:
        broker = Broker(tmp_path / f"broker{len(brokers)}", **kwargs)  # type: ignore[arg-type]
        brokers.append(broker)
        if start:
            broker.start()
        return broker

    yield make
    for broker in brokers:
        broker.kill()


@pytest.fixture
def mosquitto(broker_factory: Callable[..., Broker]) -> Broker:
    """A started anonymous mosquitto without persistence: ``.host``, ``.port``, ``.stop()``, ..."""
    return broker_factory()

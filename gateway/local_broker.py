"""A throw-away local MQTT broker for the demo: loopback only, anonymous, no persistence.

mosquitto when it is installed; otherwise the embedded pure-Python demo broker
(gateway/embedded_broker.py) on its own thread. Either way: ``with LocalBroker() as broker:``
gives ``host``, ``port``, ``kind`` ("mosquitto" or "embedded") and ``description``.
``METER_GATEWAY_MOSQUITTO`` overrides the search: a path (or name on PATH) of the mosquitto
binary to use, or ``none`` to use the embedded broker even when mosquitto is installed.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Literal

from meter_gateway.gateway.embedded_broker import BrokerThread

CANDIDATES = ("mosquitto", "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
ENV_MOSQUITTO = "METER_GATEWAY_MOSQUITTO"
_NO_MOSQUITTO = ("", "none", "no", "off", "embedded")

BrokerKind = Literal["mosquitto", "embedded"]


def find_mosquitto() -> str | None:
    """The mosquitto binary to run, or None (not installed, or ``METER_GATEWAY_MOSQUITTO=none``)."""
    override = os.environ.get(ENV_MOSQUITTO)
    if override is not None:
        if override.strip().lower() in _NO_MOSQUITTO:
            return None
        return shutil.which(override)
    for name in CANDIDATES:
        path = shutil.which(name) or (name if os.access(name, os.X_OK) else None)
        if path:
            return path
    return None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


class LocalBroker:
    """``with LocalBroker() as broker: broker.port``; the broker is stopped on exit.

    ``kind="auto"`` takes mosquitto when ``find_mosquitto()`` finds it, else the embedded broker;
    ``"mosquitto"`` insists on mosquitto (FileNotFoundError without it); ``"embedded"`` never
    runs mosquitto.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        *,
        kind: Literal["auto", "mosquitto", "embedded"] = "auto",
    ) -> None:
        binary = find_mosquitto() if kind != "embedded" else None
        if binary is None and kind == "mosquitto":
            raise FileNotFoundError("mosquitto is not installed (Debian: apt-get install mosquitto)")
        self.kind: BrokerKind = "mosquitto" if binary is not None else "embedded"
        if self.kind == "embedded" and host != "127.0.0.1":
            raise ValueError("the embedded broker binds 127.0.0.1 only")
        self.binary = binary
        self.host = host
        self.port = port or (free_port(host) if binary is not None else 0)
        self._dir = tempfile.TemporaryDirectory(prefix="meter-gateway-broker-")
        self._proc: subprocess.Popen[bytes] | None = None
        self._embedded: BrokerThread | None = None

    @property
    def description(self) -> str:
        if self.kind == "mosquitto":
            return f"mosquitto ({self.binary})"
        return "embedded Python MQTT broker (demo/test only)"

    def __enter__(self) -> LocalBroker:
        if self.binary is None:
            self._embedded = BrokerThread(self.port).start()
            self.port = self._embedded.port
            return self
        conf = Path(self._dir.name) / "mosquitto.conf"
        conf.write_text(f"listener {self.port} {self.host}\nallow_anonymous true\npersistence false\n")
        self._proc = subprocess.Popen(  # noqa: S603 - our own binary path and config
            [self.binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                raise RuntimeError(f"mosquitto exited at start: {err.strip()}")
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
            except OSError:
                time.sleep(0.05)
            else:
                return self
        self.__exit__()
        raise RuntimeError(f"mosquitto did not listen on {self.host}:{self.port} within 10 s")

    def __exit__(self, *exc: object) -> None:
        if self._embedded is not None:
            self._embedded.stop()
            self._embedded = None
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._dir.cleanup()

"""A throw-away local mosquitto for the demo and the benchmarks: loopback, anonymous, no persistence.

``with LocalBroker() as broker:`` runs mosquitto on a free port with a generated config and gives
``host``, ``port``, ``kind`` and ``description``; the process is stopped on exit.
``METER_GATEWAY_MOSQUITTO`` names the binary (a path, or a name on PATH) when it is not in the
usual places. The product carries no broker of its own: without mosquitto, ``BrokerUnavailable``
says in one line how to install it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

CANDIDATES = ("mosquitto", "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
ENV_MOSQUITTO = "METER_GATEWAY_MOSQUITTO"
INSTALL_HINT = f"install it (Debian/Ubuntu: apt-get install mosquitto) or set {ENV_MOSQUITTO} to its path"


class BrokerUnavailable(RuntimeError):
    """No local MQTT broker can be run; the message is one line that says what to do."""


def find_mosquitto(env: Mapping[str, str] | None = None, candidates: Iterable[str] = CANDIDATES) -> str:
    """The mosquitto binary to run: ``METER_GATEWAY_MOSQUITTO`` if set, else the first candidate
    found. Raises BrokerUnavailable when there is none."""
    override = (os.environ if env is None else env).get(ENV_MOSQUITTO)
    if override is not None:
        path = shutil.which(override)
        if path is None:
            raise BrokerUnavailable(f"{ENV_MOSQUITTO}={override!r} is not an executable mosquitto; {INSTALL_HINT}")
        return path
    for name in candidates:
        path = shutil.which(name) or (name if os.path.isabs(name) and os.access(name, os.X_OK) else None)
        if path:
            return path
    raise BrokerUnavailable(f"no MQTT broker: mosquitto is not installed; {INSTALL_HINT}")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


class LocalBroker:
    """``with LocalBroker() as broker: broker.port``; mosquitto is stopped on exit.

    Constructing it finds the binary (BrokerUnavailable without one); entering starts it and
    returns once it accepts connections (BrokerUnavailable if it exits or does not listen).
    """

    kind: Literal["mosquitto"] = "mosquitto"

    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.binary = find_mosquitto()
        self.host = host
        self.port = port or free_port(host)
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """mosquitto's process id while it runs (benchmarks sample its CPU time)."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def description(self) -> str:
        return f"mosquitto ({self.binary})"

    def __enter__(self) -> LocalBroker:
        self._dir = tempfile.TemporaryDirectory(prefix="meter-gateway-broker-")
        conf = Path(self._dir.name) / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} {self.host}\nallow_anonymous true\npersistence false\n"
            "log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
            "connection_messages false\n"
        )
        # a file, not a pipe: nobody reads mosquitto's log while it runs, and a full pipe would stall it
        log_path = Path(self._dir.name) / "mosquitto.log"
        with log_path.open("wb") as log:
            self._proc = subprocess.Popen(  # noqa: S603 - our own binary path and config
                [self.binary, "-c", str(conf)], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            text = log_path.read_text(errors="replace")
            if self._proc.poll() is not None:
                lines = text.strip().splitlines()
                why = lines[-1] if lines else f"exit status {self._proc.returncode}"
                self.__exit__()
                raise BrokerUnavailable(f"mosquitto ({self.binary}) exited at start: {why}")
            # An accepting port alone is no proof: whoever won a race for it would answer too.
            # mosquitto says "running" only once all its listeners are bound.
            if " running" in text and self._accepts():
                return self
            time.sleep(0.02)
        self.__exit__()
        raise BrokerUnavailable(f"mosquitto ({self.binary}) did not listen on {self.host}:{self.port} within 10 s")

    def _accepts(self) -> bool:
        try:
            socket.create_connection((self.host, self.port), timeout=0.5).close()
        except OSError:
            return False
        return True

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

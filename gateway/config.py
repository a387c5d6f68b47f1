"""The gateway's configuration: one TOML file, validated completely before anything starts.

Loading is strict. Every problem becomes one line ``error: <file>:<line>: <key path>: <message>``
(e.g. ``buses[2].baud_rate``, at the line it is written on, or its table's header when missing) in
a :class:`ConfigError`, and one load lists every problem of the file: values are checked one by
one, a wrong list item is left out of the later checks rather than stopping them. Unknown keys are
errors that suggest the closest valid key, because a silently ignored ``baudrate`` would poll at
the wrong speed. What is valid but probably not meant gives ``warning:`` lines instead.
Secrets (MQTT password, DL/T 645 meter passwords) are never written in the file: it names a file
(``password_file``) or an environment variable (``password_env``) and the value is read at load
into a :class:`Secret`, which prints as ``******``.

Relative paths (state_dir, outbox path, TLS files, password files, model files) are relative to
the directory of the config file, so a config and its secrets can be moved together.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hmac
import math
import os
import re
import tomllib
import types
import typing
import zoneinfo
from collections.abc import Iterable, Mapping
from datetime import tzinfo
from pathlib import Path
from typing import Annotated, Any, ClassVar, Final, Literal, TypeVar

import msgspec
from msgspec import Meta, inspect

from meter_gateway.drivers import registry
from meter_gateway.gateway.config_lines import key_lines, line_of

__all__ = [
    "BusConfig",
    "CommandKeyConfig",
    "CommandsSection",
    "Config",
    "ConfigDiff",
    "ConfigError",
    "Credentials",
    "DailyFrozen",
    "Dlt698Options",
    "Duration",
    "Meter",
    "PollGroup",
    "Secret",
    "SerialBus",
    "TcpBus",
    "diff",
    "load_config",
    "load_config_and_warnings",
    "parse_duration",
    "schema_hook",
]

DEFAULT_STATE_DIR: Final = "/var/lib/meter-gateway"
MAX_FROZEN_DAYS: Final = 62  # DL/T 645-2007 meters keep the last 62 daily freezes
BAUD_RATES: Final = (300, 600, 1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200)

# Names that end up in MQTT topics and metric labels: no spaces, slashes or wildcards.
_NAME: Final = r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$"
# Canonical quantity names are lower-case dotted words: ``energy.active.import.t1``.
_QUANTITY: Final = re.compile(r"[a-z][a-z0-9_]*(\.[a-z0-9_]+)*")
_DURATION: Final = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d)\s*")
MAX_COMMIT_INTERVAL: Final = 1.0
_UNIT_SECONDS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

Name = Annotated[str, Meta(pattern=_NAME, max_length=64)]
Port = Annotated[int, Meta(ge=1, le=65535)]
_T = TypeVar("_T")


class ConfigError(Exception):
    """The config is unusable; ``messages`` holds one complete line per problem, ``warnings`` one
    per doubt found on the way (see :func:`load_config_and_warnings`)."""

    def __init__(self, messages: list[str], *, warnings: list[str] | None = None) -> None:
        super().__init__("\n".join(messages))
        self.messages = messages
        self.warnings = warnings or []


class Duration(float):
    """Seconds. In the file: a number of seconds or text like ``"30s"``, ``"15m"``, ``"1h"``, ``"1d"``."""

    def __repr__(self) -> str:
        return f"Duration({float(self)!r})"


def parse_duration(value: object) -> Duration:
    if isinstance(value, bool):
        raise TypeError(f"expected a duration like '30s', '15m', '1h' or seconds, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.fullmatch(value)):
        seconds = float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    else:
        raise ValueError(f"expected a duration like '30s', '15m', '1h' or seconds, got {value!r}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"expected a duration >= 0, got {value!r}")
    return Duration(seconds)


class Secret:
    """A secret value that never shows up in logs, reprs or redacted dumps; ``reveal()`` it to use it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "******"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return "******"

    def __eq__(self, other: object) -> bool:
        # constant-time: a reload diff must not leak the secret through timing either
        return isinstance(other, Secret) and hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(Secret)

    def __reduce__(self) -> Any:
        raise TypeError("a Secret is not picklable")


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    # Fields filled in at load from references; writing them in the file is an error.
    resolved: ClassVar[frozenset[str]] = frozenset()


def _about(description: str, *, unit: str | None = None) -> Meta:
    """A field's text in docs/configuration.md and docs/config.schema.json (gateway/config_reference.py).
    ``unit`` is for numbers whose unit the type does not say (a Duration is always seconds)."""
    return Meta(description=description, extra_json_schema={"x-unit": unit} if unit else None)


def _seconds(value: float) -> Duration:
    # A factory, not a Duration default: msgspec.json.schema encodes plain defaults without an
    # enc_hook and cannot encode a float subclass (msgspec issue #679); config_reference adds
    # the default to the schema from the factory.
    return msgspec.field(default_factory=functools.partial(Duration, value))


class GatewaySection(_Section, kw_only=True, frozen=True):
    """This gateway: its id, the zone its meters keep time in, where it keeps its files."""

    id: Annotated[
        Name,
        _about(
            "This gateway's id: a level of every MQTT topic, in every payload and metric, and the default MQTT "
            "client id. Letters, digits and _ . : - (starting with a letter or digit), at most 64."
        ),
    ]
    timezone: Annotated[
        str | None,
        _about(
            "IANA name of the zone the meters keep their clocks in (daily freezes are at their local midnight), "
            'e.g. "Asia/Shanghai". Not set: this machine\'s zone (TZ, else /etc/localtime, else UTC).'
        ),
    ] = None
    state_dir: Annotated[
        str,
        _about(
            "Directory of the gateway's files: outbox, command store, audit log, poll and job cursors, status file. "
            "Relative to the config file's directory."
        ),
    ] = DEFAULT_STATE_DIR

    def zone(self) -> tzinfo:
        """The zone meters keep their clocks (and daily freezes) in."""
        if self.timezone is not None:
            return zoneinfo.ZoneInfo(self.timezone)
        try:
            return zoneinfo.ZoneInfo(os.environ.get("TZ", "").lstrip(":") or "localtime")
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            try:
                with open("/etc/localtime", "rb") as f:
                    return zoneinfo.ZoneInfo.from_file(f, key="localtime")
            except OSError:
                return zoneinfo.ZoneInfo("UTC")


class TlsSection(_Section, kw_only=True, frozen=True):
    """Present (even empty) means TLS; without ``ca_file`` the system's CA store is trusted."""

    ca_file: Annotated[
        str | None,
        _about(
            "CA certificate(s), PEM, the broker's certificate must chain to. Not set: the system's trusted CAs. "
            "Relative to the config file's directory."
        ),
    ] = None
    cert_file: Annotated[
        str | None, _about("Client certificate, PEM, for mutual TLS; needs key_file. Relative to the config file.")
    ] = None
    key_file: Annotated[
        str | None, _about("Private key, PEM, of cert_file; needs cert_file. Relative to the config file.")
    ] = None


class UplinkSection(_Section, kw_only=True, frozen=True):
    """The MQTT connection to the head-end's broker (docs/mqtt.md)."""

    resolved: ClassVar[frozenset[str]] = frozenset({"password"})

    host: Annotated[str, Meta(min_length=1), _about("Broker host name or address.")]
    port: Annotated[
        Port, _about("Broker TCP port. [uplink.tls] does not change it: set the broker's TLS port (often 8883).")
    ] = 1883
    client_id: Annotated[str | None, _about("MQTT client id. Not set: the gateway id (gateway.id).")] = None
    username: Annotated[str | None, _about("MQTT user name.")] = None
    password_file: Annotated[
        str | None,
        _about(
            "File holding the MQTT password (trailing newlines ignored; relative to the config file). "
            "Needs username; give this or password_env, not both."
        ),
    ] = None
    password_env: Annotated[
        str | None,
        _about("Environment variable holding the MQTT password. Needs username; give this or password_file."),
    ] = None
    password: Secret | None = None
    tls: Annotated[
        TlsSection | None,
        _about("TLS to the broker. The table being present, even empty, turns TLS on; absent: plain TCP."),
    ] = None
    keepalive: Annotated[
        Duration,
        _about(
            "MQTT keepalive: without traffic for 1.5 times this, the broker drops the connection and publishes "
            "the gateway's offline Will. Whole seconds (a fraction is dropped), at least 5."
        ),
    ] = _seconds(60)
    topic_prefix: Annotated[
        str,
        _about(
            "First topic levels of every topic: {topic_prefix}/v1/{gateway.id}/... . MQTT topic levels without "
            "wildcards (+ #), a leading / or empty levels."
        ),
    ] = "meter-gateway"  # gateway.mqtt_contract.TOPIC_ROOT
    protocol: Annotated[
        Literal["auto", "5", "3.1.1"],
        _about('MQTT version. "auto": 5, and 3.1.1 from the first time the broker refuses 5; "5" or "3.1.1" pin it.'),
    ] = "auto"
    batch_max_readings: Annotated[
        int,
        Meta(ge=1, le=10000),
        _about(
            "Most readings in one readings message (a batch is also cut at 256 KiB, or the broker's MQTT 5 "
            "Maximum Packet Size when smaller).",
            unit="readings",
        ),
    ] = 500
    max_inflight: Annotated[
        int,
        Meta(ge=1, le=65535),
        _about(
            "Most QoS 1 messages (readings batches, status, meter states) published and not yet acknowledged at "
            "once; lowered to the broker's MQTT 5 Receive Maximum when it announces a smaller one.",
            unit="messages",
        ),
    ] = 20


class OutboxSection(_Section, kw_only=True, frozen=True):
    """The SQLite outbox every reading is committed to before it counts as acquired (docs/outbox.md)."""

    path: Annotated[
        str | None,
        _about("The outbox's SQLite file. Not set: <state_dir>/outbox.sqlite. Relative to the config file."),
    ] = None
    synchronous: Annotated[
        Literal["FULL", "NORMAL", "EXTRA"],
        _about(
            "SQLite synchronous mode (the outbox always runs in WAL mode). FULL: the WAL is fsynced at every "
            "commit, a power cut loses no committed reading. NORMAL: a power cut can roll back the last commits "
            "(a process crash cannot). EXTRA: as FULL in WAL mode."
        ),
    ] = "FULL"
    budget_mb: Annotated[
        float,
        Meta(gt=0),
        _about(
            "Disk budget: most database pages in use, in MiB (the WAL is not counted). When a batch does not fit, "
            "overflow_policy applies.",
            unit="MiB",
        ),
    ] = 512.0
    overflow_policy: Annotated[
        Literal["pause_polling", "drop_oldest"],
        _about(
            'What a full budget does. "pause_polling": nothing committed is removed; polling stops while the '
            "outbox is over budget (each slot not read counts in missed_slots_total with reason outbox_full and "
            "the daily frozen job fills it from the meters' freezes later) and resumes by itself as deliveries "
            'free space. "drop_oldest": polling goes on and the oldest undelivered readings are deleted to make '
            "room (outbox_overflow_dropped_total); the head-end sees a gap in row numbers."
        ),
    ] = "pause_polling"
    commit_interval: Annotated[
        Duration,
        _about(
            "Group commit: readings arriving within this time of a commit's start share its transaction (one "
            "fsync). A reading counts as acquired at most this much later. At most 1 s."
        ),
    ] = _seconds(0.02)


class MetricsSection(_Section, kw_only=True, frozen=True):
    """Prometheus metrics, served at http://{host}:{port}/metrics (docs/operations.md)."""

    enabled: Annotated[bool, _about("Serve the metrics endpoint.")] = True
    host: Annotated[str, _about("Address the endpoint listens on; 127.0.0.1 keeps it on this machine.")] = "127.0.0.1"
    port: Annotated[Port, _about("TCP port the endpoint listens on.")] = 9108


class LimitsSection(_Section, kw_only=True, frozen=True):
    """Back-pressure and meter health thresholds."""

    max_queue_per_bus: Annotated[
        int,
        Meta(ge=1),
        _about("Most reads queued for one bus; a due read beyond it is shed (counted) instead.", unit="reads"),
    ] = 1000
    degraded_after: Annotated[
        int,
        Meta(ge=1),
        _about(
            "Consecutive failed transactions after which a meter is degraded. At most offline_after.",
            unit="failures",
        ),
    ] = 1  # drivers.health.HealthPolicy
    offline_after: Annotated[
        int,
        Meta(ge=1),
        _about(
            "Consecutive failed transactions after which a meter is offline: its transactions then fail at once, "
            "but for one probe per offline_probe_interval.",
            unit="failures",
        ),
    ] = 3
    offline_probe_interval: Annotated[Duration, _about("Time between probes of an offline meter.")] = _seconds(60)
    link_down_after: Annotated[
        Duration,
        _about(
            "How long a bus link may be down (or fail to open) before its meters are offline, reason link_down. "
            "Keep it at most max(2 poll intervals, 60 s)."
        ),
    ] = _seconds(30)
    backfill_max_slots: Annotated[
        int,
        Meta(ge=0),
        _about("Reserved: checked (>= 0) but not used by this version.", unit="slots"),
    ] = 2880


class _BusBase(_Section, kw_only=True, frozen=True):
    name: Annotated[Name, _about("Bus name, unique; meters name it in meters[].bus.")]
    protocol: Annotated[
        Literal["dlt645", "dlt698", "cjt188", "modbus-rtu", "modbus-tcp"],
        _about(
            "What the line carries. dlt645, dlt698 and cjt188 are the same kind of line: the gateway's own "
            "byte transport, on which DL/T 645, DL/T 698.45 and CJ/T 188 meters may be mixed (each meter's "
            "protocol says how it is spoken to); the name is the line's main protocol. modbus-rtu: Modbus RTU "
            "on a serial line or through a TCP serial server; modbus-tcp: Modbus TCP (tcp buses only)."
        ),
    ]
    reply_timeout: Annotated[Duration, _about("How long to wait for a meter's reply. More than 0.")] = _seconds(1.0)
    attempts: Annotated[
        int, Meta(ge=1, le=10), _about("Tries of one transaction before it counts as failed.", unit="tries")
    ] = 3
    inter_frame_gap: Annotated[
        Duration | None,
        _about(
            "Silence kept between frames. Not set: serial buses 3.5 character times (1.75 ms above 19200 baud, "
            "Modbus over Serial Line V1.02 2.5.1.1); tcp buses none."
        ),
    ] = None  # None: the protocol's own rule (see SerialBus.frame_gap)
    preamble: Annotated[
        Annotated[int, Meta(ge=0, le=16)] | None,
        _about(
            "FE wake-up bytes sent before each DL/T 645 request on this bus (some meters' receivers need them; "
            "the common DL/T 645 libraries send 4). A meter may override it (meters[].dlt645.preamble). Not set: "
            "4 on serial buses, 0 on tcp buses.",
            unit="bytes",
        ),
    ] = None
    trace: Annotated[
        bool,
        _about(
            "Log every frame on this bus (direction, meter, time since the request, bytes in hex) at DEBUG on the "
            "logger meter_gateway.trace, whatever --log-level is. --log-level DEBUG traces every bus. For "
            "commissioning and fault finding: a busy bus writes many lines."
        ),
    ] = False

    DEFAULT_PREAMBLE: ClassVar[int] = 0

    def dlt645_preamble(self) -> int:
        """FE bytes before each DL/T 645 request: as configured, else the bus type's default."""
        return self.DEFAULT_PREAMBLE if self.preamble is None else self.preamble


class SerialBus(_BusBase, kw_only=True, frozen=True, tag="serial", tag_field="type"):
    """Meters on a local serial port (RS-485, or RS-232): ``type = "serial"``."""

    DEFAULT_PREAMBLE: ClassVar[int] = 4  # DL/T 645-2007 clause 4: a master sends 4 FE to wake the receiver

    port: Annotated[str, Meta(min_length=1), _about("Serial device, e.g. /dev/ttyUSB0.")]
    baud_rate: Annotated[
        Literal[300, 600, 1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200],
        _about("Line speed.", unit="bit/s"),
    ]
    data_bits: Annotated[Literal[7, 8], _about("Data bits per character.", unit="bits")] = 8
    parity: Annotated[Literal["N", "E", "O"], _about("Parity: N none, E even, O odd (DL/T 645 lines use E).")]
    stop_bits: Annotated[Literal[1, 2], _about("Stop bits per character.", unit="bits")] = 1
    rs485: Annotated[
        bool,
        _about(
            "Kernel RS-485 mode: the serial driver switches the transceiver's direction. false for RS-232 and for "
            "adapters that switch by themselves."
        ),
    ] = True

    def frame_gap(self) -> float:
        """Silence between frames: as configured, else 3.5 character times (Modbus over Serial
        Line V1.02 §2.5.1.1), fixed at 1.75 ms above 19200 baud as that clause recommends."""
        if self.inter_frame_gap is not None:
            return float(self.inter_frame_gap)
        if self.baud_rate > 19200:
            return 0.00175
        bits = 1 + self.data_bits + (self.parity != "N") + self.stop_bits
        return 3.5 * bits / self.baud_rate


class TcpBus(_BusBase, kw_only=True, frozen=True, tag="tcp", tag_field="type"):
    """Meters behind a TCP endpoint (a serial device server, or Modbus TCP devices): ``type = "tcp"``."""

    host: Annotated[str, Meta(min_length=1), _about("Host name or address of the device server or Modbus TCP device.")]
    port: Annotated[Port, _about("Its TCP port.")]
    connect_timeout: Annotated[Duration, _about("How long a TCP connect may take.")] = _seconds(5.0)

    def frame_gap(self) -> float:
        return 0.0 if self.inter_frame_gap is None else float(self.inter_frame_gap)


BusConfig = SerialBus | TcpBus


class Credentials(_Section, kw_only=True, frozen=True):
    """DL/T 645 write access (remote disconnect): password level, password, operator code."""

    resolved: ClassVar[frozenset[str]] = frozenset({"password"})

    password_level: Annotated[
        int,
        Meta(ge=0, le=9),
        _about("DL/T 645 password level the password belongs to (meters usually take 2 or 4 for remote control)."),
    ] = 2
    password_file: Annotated[
        str | None,
        _about(
            "File holding the meter password, 6 hex digits (trailing newlines ignored; relative to the config "
            "file). Give this or password_env."
        ),
    ] = None
    password_env: Annotated[
        str | None, _about("Environment variable holding the meter password, 6 hex digits. Or password_file.")
    ] = None
    password: Secret | None = None
    operator: Annotated[
        str,
        Meta(pattern=r"^[0-9A-Fa-f]{8}$"),
        _about("Operator code, 8 hex digits: the meter records it in its trip and close event log."),
    ] = "00000000"


class Cjt188Options(_Section, kw_only=True, frozen=True):
    """CJ/T 188 per-meter settings (``meters[].cjt188``); not set: the model's."""

    di_order: Annotated[
        Literal["standard", "swapped"] | None,
        _about(
            'Data identifier byte order: "standard" sends 90 1F as the standard prints 901F, "swapped" 1F 90 '
            "(some meters' firmware). Not set: the model's."
        ),
    ] = None
    preamble: Annotated[
        Annotated[int, Meta(ge=0, le=16)] | None,
        _about(
            "FE wake-up bytes before each request (the standard sends 2 to 4; a battery meter that sleeps may "
            "need more). Not set: the model's.",
            unit="bytes",
        ),
    ] = None


class Dlt645Options(_Section, kw_only=True, frozen=True):
    """DL/T 645 per-meter settings (``meters[].dlt645``); not set: the bus's."""

    preamble: Annotated[
        Annotated[int, Meta(ge=0, le=16)] | None,
        _about(
            "FE wake-up bytes before each request to this meter (a meter that needs more, or none). Not set: the "
            "bus's preamble.",
            unit="bytes",
        ),
    ] = None


class Dlt698Options(_Section, kw_only=True, frozen=True):
    """DL/T 698.45 per-meter settings (``meters[].dlt698``); not set: the model's (docs/dlt698.md)."""

    association: Annotated[
        Literal["auto", "connect", "none"] | None,
        _about(
            'Application association (CONNECT) before reading: "connect" always, "none" never, "auto" learns it '
            "from the first exchange (a meter that refuses access without one gets one). The password, if the meter "
            "wants PasswordSecurity, is meters[].credentials. Not set: the model's."
        ),
    ] = None
    security: Annotated[
        Literal["plain", "rn"] | None,
        _about(
            'How requests go: "plain", or "rn" (SECURITY plaintext + a 16-byte random number) for meters whose '
            "security mode table asks for it. Their MAC cannot be verified without an ESAM: such readings carry the "
            "MAC_UNVERIFIED quality flag. Not set: the model's."
        ),
    ] = None
    control: Annotated[
        Literal["plaintext", "passthrough"],
        _about(
            'Remote control: "plaintext" sends ACTION 8000/8001 itself (test benches, meters that accept it); '
            '"passthrough" forwards the secured APDU the signed command carries (params.apdu, made by the '
            "head-end's crypto service or an ESAM): the gateway frames it, never makes or opens it."
        ),
    ] = "plaintext"


# Protocol families whose meters take a settings table of their own (Meter fields of the same name).
_PROTOCOL_OPTIONS: Final = ("dlt645", "dlt698", "cjt188")


class Meter(_Section, kw_only=True, frozen=True, gc=False):
    """One meter on a bus."""

    # gc=False: 16 bytes less per meter (it holds strings, an int and Credentials: no cycles)
    id: Annotated[
        Name, _about("Meter id, unique: in topics, reading ids and metric labels (same characters as gateway.id).")
    ]
    bus: Annotated[str, _about("The bus the meter is on (a buses[].name).")]
    protocol: Annotated[
        Literal["dlt645-2007", "dlt645-1997", "dlt698", "cjt188", "modbus"],
        _about(
            "DL/T 645 edition, dlt698 (DL/T 698.45) or cjt188 (water, gas and heat meters; all on a dlt645, dlt698 "
            "or cjt188 bus), or modbus (on a modbus-rtu or modbus-tcp bus)."
        ),
    ]
    address: Annotated[
        str | int,
        _about(
            'DL/T 645: the 12-digit address as a quoted string ("000000001234"; not the broadcast 999999999999). '
            'CJ/T 188: the 14-digit address, most significant digit first ("00000000000001"). '
            'DL/T 698.45: the server address, an even number of 2..32 digits ("000000000001"). '
            "Modbus: the unit id 1..247 as an integer. Unique on its bus."
        ),
    ]
    model: Annotated[
        str,
        _about(
            "Meter model: a shipped name (drivers/models/, e.g. dlt645-2007-generic) or the path of a model TOML "
            "file (relative to the config file)."
        ),
    ]
    credentials: Annotated[
        Credentials | None,
        _about("DL/T 645 write access for remote control (DL/T 645 meters only). Not set: no control frames."),
    ] = None
    # "close_permit" is the default so nobody is surprised by power coming back (DL/T 645 1C,
    # direct close since the 2013 amendment).
    reconnect: Annotated[
        Literal["close_permit", "direct_close"],
        _about(
            'How a remote reconnect closes the relay when the command does not say: "close_permit" arms it and '
            'the customer presses the meter\'s button; "direct_close" closes it at once.'
        ),
    ] = "close_permit"
    dlt645: Annotated[
        Dlt645Options | None,
        _about("DL/T 645 settings of this meter that differ from its bus's (DL/T 645 meters only)."),
    ] = None
    cjt188: Annotated[
        Cjt188Options | None,
        _about("CJ/T 188 settings of this meter that differ from its model's (CJ/T 188 meters only)."),
    ] = None
    dlt698: Annotated[
        Dlt698Options | None,
        _about("DL/T 698.45 association, security and control mode of this meter (DL/T 698.45 meters only)."),
    ] = None

    def protocol_options(self) -> dict[str, Any]:
        """The meter's protocol-specific settings (its ``meters[].<family>`` table) as plain data."""
        section = getattr(self, registry.get(self.protocol).family, None)
        return msgspec.to_builtins(section) if section is not None else {}

    @property
    def unit_id(self) -> int:
        if not isinstance(self.address, int):
            raise TypeError(f"meter {self.id} is not a Modbus meter")
        return self.address

    @property
    def dlt645_address(self) -> str:
        if not isinstance(self.address, str):
            raise TypeError(f"meter {self.id} is not a DL/T 645 meter")
        return self.address


class PollGroup(_Section, kw_only=True, frozen=True):
    """Quantities read from a set of meters once per interval."""

    name: Annotated[Name, _about("Poll group name, unique.")]
    interval: Annotated[
        Duration,
        _about(
            "Time between reads: a whole number of seconds, at least 1. Slots start at multiples of it since the "
            "Unix epoch."
        ),
    ]
    quantities: Annotated[
        list[str],
        Meta(min_length=1),
        _about(
            "Quantity names to read (lower-case dotted words like energy.active.import.total); each must be one "
            "at least one meter of the group's model can read."
        ),
    ]
    meters: Annotated[str | list[str], _about('Meter ids, or "*" for every meter.')] = "*"
    spread: Annotated[
        float,
        Meta(ge=0, lt=1),
        _about(
            "Fraction of the interval the group's reads are spread over, each meter at its own fixed offset.",
            unit="fraction of interval",
        ),
    ] = 0.1
    backfill: Annotated[
        bool, _about("Fill slots missed by an outage from the meters' daily frozen data (docs/backfill.md).")
    ] = False


class TimeSync(_Section, kw_only=True, frozen=True):
    """DL/T 645 meter clock sync (docs/backfill.md "Meter time sync"). No [time_sync] table: no sync."""

    enabled: Annotated[bool, _about("Check and correct meter clocks.")] = True
    interval: Annotated[Duration, _about("Time between clock checks: a whole number of seconds, at least 1.")] = (
        _seconds(86400)
    )
    offset: Annotated[
        Duration,
        _about("Into each interval, so syncs need not coincide with reads at :00. Less than interval."),
    ] = _seconds(0)
    mode: Annotated[
        Literal["broadcast", "unicast"],
        _about(
            'How a drifting clock is corrected: "broadcast" one broadcast time-set per bus and protocol (DL/T 645 '
            "0x08, DL/T 698.45 ACTION 4000-127; meters of a protocol without one, like CJ/T 188, are set one by "
            'one), "unicast" once per meter to correct.'
        ),
    ] = "broadcast"
    max_drift: Annotated[Duration, _about("Meter clock drift tolerated before it is corrected.")] = _seconds(5)
    # meter-vs-gateway skew beyond which the meter's readings carry Quality.CLOCK_SUSPECT
    # (default: the drift beyond which a broadcast cannot correct a meter, time_sync_job.BROADCAST_LIMIT)
    suspect_drift: Annotated[
        Duration,
        _about(
            "Meter clock skew beyond which the meter's readings carry the CLOCK_SUSPECT quality flag (the default "
            "is the most a broadcast sync can correct). At least max_drift."
        ),
    ] = _seconds(300)


class DailyFrozen(_Section, kw_only=True, frozen=True):
    """Reading each meter's daily frozen record after local midnight (DL/T 645 05060xxx).
    No [daily_frozen] table: no daily frozen reads."""

    enabled: Annotated[bool, _about("Read the daily freezes.")] = True
    delay: Annotated[Duration, _about("After local midnight (gateway.timezone), so every meter has frozen.")] = (
        _seconds(300)
    )
    spread: Annotated[
        Duration, _about("Reads are spread over this window after the delay. delay + spread is under a day.")
    ] = _seconds(600)
    meters: Annotated[
        str | list[str], _about('DL/T 645 meter ids, or "*" for every DL/T 645 meter (Modbus meters keep no freezes).')
    ] = "*"
    backfill_days: Annotated[
        int,
        Meta(ge=0, le=MAX_FROZEN_DAYS),
        _about(
            "How many days back freezes missed by an outage are recovered (DL/T 645-2007 meters keep 62).",
            unit="days",
        ),
    ] = 7


class CommandKeyConfig(_Section, kw_only=True, frozen=True):
    """A key remote-control commands may be signed with (gateway.commands.auth.KeyRing)."""

    resolved: ClassVar[frozenset[str]] = frozenset({"public_key", "secret"})

    id: Annotated[
        str,
        Meta(pattern=r"^[A-Za-z0-9._:-]{1,64}$"),
        _about("Key id, unique: the key_id of the envelopes it signs."),
    ]
    alg: Annotated[
        Literal["ed25519", "hmac-sha256"],
        _about("Signature algorithm. Prefer ed25519: the gateway then holds no secret that could sign commands."),
    ]
    public_key_file: Annotated[
        str | None,
        _about(
            "ed25519: the public key, PEM, or the raw 32 bytes in base64 (relative to the config file). Required "
            "for ed25519."
        ),
    ] = None
    secret_file: Annotated[
        str | None,
        _about(
            "hmac-sha256: file holding the shared secret, at least 32 bytes (trailing newlines ignored). Or secret_env."
        ),
    ] = None
    secret_env: Annotated[
        str | None, _about("hmac-sha256: environment variable holding the shared secret. Or secret_file.")
    ] = None
    roles: Annotated[
        list[Literal["command", "release"]],
        Meta(min_length=1),
        _about('What the key may sign: "command" every action but release, "release" held commands\' release.'),
    ] = msgspec.field(default_factory=lambda: ["command"])
    public_key: bytes | None = None  # resolved: raw Ed25519 public key
    secret: Secret | None = None  # resolved: HMAC key


class CommandsSection(_Section, kw_only=True, frozen=True):
    """Remote control (docs/mqtt.md "Commands and acknowledgements"). Off unless enabled."""

    enabled: Annotated[
        bool, _about("Run signed remote-control commands. Off: command messages are logged and ignored.")
    ] = False
    keys: Annotated[list[CommandKeyConfig], _about("Keys commands may be signed with; at least one when enabled.")] = (
        msgspec.field(default_factory=list)
    )
    max_validity: Annotated[
        Duration, _about("Longest expires_at - issued_at accepted; longer: rejected (validity_too_long).")
    ] = _seconds(86400)
    max_disconnects: Annotated[
        int,
        Meta(ge=1),
        _about("Disconnects per guard_window; beyond it commands are held for a release.", unit="meters"),
    ] = 50
    guard_window: Annotated[Duration, _about("Sliding window of the mass-disconnect guard.")] = _seconds(3600)
    verify_window: Annotated[Duration, _about("How long the relay is read back after a control frame.")] = _seconds(30)
    retry: Annotated[
        int,
        Meta(ge=1, le=10),
        _about("Attempts per control frame when the meter does not answer.", unit="attempts"),
    ] = 3
    store_path: Annotated[
        str | None,
        _about("Command store (SQLite). Not set: <state_dir>/commands.sqlite. Relative to the config file."),
    ] = None
    audit_path: Annotated[
        str | None,
        _about("Audit log (SQLite). Not set: <state_dir>/audit.sqlite. Relative to the config file."),
    ] = None


class Config(_Section, kw_only=True, frozen=True):
    """The whole file: one table per section, lists of tables for buses, meters and poll groups."""

    gateway: Annotated[GatewaySection, _about("This gateway.")]
    uplink: Annotated[UplinkSection, _about("The MQTT broker readings go to and commands come from.")]
    outbox: Annotated[OutboxSection, _about("The durable outbox.")] = msgspec.field(default_factory=OutboxSection)
    metrics: Annotated[MetricsSection, _about("The Prometheus endpoint.")] = msgspec.field(
        default_factory=MetricsSection
    )
    limits: Annotated[LimitsSection, _about("Back-pressure and meter health thresholds.")] = msgspec.field(
        default_factory=LimitsSection
    )
    buses: Annotated[
        list[BusConfig], _about('Serial lines and TCP endpoints meters are reached through; "type" picks which.')
    ] = msgspec.field(default_factory=list)
    meters: Annotated[list[Meter], _about("The meters.")] = msgspec.field(default_factory=list)
    poll_groups: Annotated[list[PollGroup], _about("What is read from which meters, how often.")] = msgspec.field(
        default_factory=list
    )
    time_sync: Annotated[TimeSync | None, _about("Meter clock sync. Absent: off.")] = None
    daily_frozen: Annotated[DailyFrozen | None, _about("Daily frozen reads and their backfill. Absent: off.")] = None
    commands: Annotated[CommandsSection, _about("Remote control.")] = msgspec.field(default_factory=CommandsSection)

    def bus(self, name: str) -> BusConfig:
        for b in self.buses:
            if b.name == name:
                return b
        raise KeyError(name)

    def meter(self, meter_id: str) -> Meter:
        for m in self.meters:
            if m.id == meter_id:
                return m
        raise KeyError(meter_id)

    def group_meters(self, group: PollGroup | DailyFrozen) -> list[Meter]:
        """The meters a poll group (or the daily frozen read) covers, in config order. The daily
        frozen read's "*" means every DL/T 645 meter (Modbus meters keep no frozen records)."""
        if group.meters == "*":
            if isinstance(group, DailyFrozen):
                return [m for m in self.meters if registry.capable(m.protocol, registry.Can.FROZEN)]
            return list(self.meters)
        wanted = set(group.meters)
        return [m for m in self.meters if m.id in wanted]

    def redacted(self) -> dict[str, Any]:
        """The whole config as plain data for logs; secrets appear as ``******``."""
        data: dict[str, Any] = msgspec.to_builtins(self, enc_hook=_redact)
        return data


def _redact(obj: Any) -> Any:
    if isinstance(obj, Secret):
        return "******"
    if isinstance(obj, Duration):
        return float(obj)
    raise NotImplementedError(type(obj).__name__)


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(
    path: str | os.PathLike[str], *, environ: Mapping[str, str] | None = None, secrets: bool = True
) -> Config:
    """Read, validate and resolve a config file. ``environ`` (default ``os.environ``) supplies
    ``password_env`` secrets. ``secrets=False`` leaves every secret unread (empty) for tools that
    never use one, such as ``meter-gateway audit`` in an operator's shell. Raises
    :class:`ConfigError` listing every problem found."""
    return load_config_and_warnings(path, environ=environ, secrets=secrets)[0]


def load_config_and_warnings(
    path: str | os.PathLike[str], *, environ: Mapping[str, str] | None = None, secrets: bool = True
) -> tuple[Config, list[str]]:
    """:func:`load_config`, and the ``warning: <file>:<line>: <key path>: <message>`` lines about
    what is valid but probably not meant (a serial device missing on this machine, no meters, a
    poll group that covers none); a :class:`ConfigError` carries them too."""
    file = Path(path)
    env = os.environ if environ is None else environ
    try:
        data = file.read_bytes()
    except OSError as e:
        raise ConfigError([f"error: {file}: cannot read: {e.strerror or e}"]) from e
    try:
        text = data.decode("utf-8")
        raw = tomllib.loads(text)
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError([f"error: {file}:{line}: not valid TOML: not UTF-8 text ({e.reason})"]) from None
    except tomllib.TOMLDecodeError as e:
        at = re.search(r"\(at line (\d+), column \d+\)$", str(e))
        where = f"{file}:{at.group(1)}" if at else str(file)
        raise ConfigError([f"error: {where}: not valid TOML: {e}"]) from None
    _share_repeated_values(raw)
    v = _Validator(file, text, env, secrets=secrets)
    config = v.run(raw)
    return config, v.lines("warning", v.warnings)


def _share_repeated_values(raw: dict[str, Any]) -> None:
    """tomllib makes a new str for every value; with 10,000 meters one object per distinct bus,
    protocol and model name saves about a megabyte (msgspec keeps the objects it is given)."""
    meters = raw.get("meters")
    if not isinstance(meters, list):
        return
    shared: dict[str, str] = {}
    for meter in meters:
        if isinstance(meter, dict):
            for key in ("bus", "protocol", "model", "reconnect"):
                value = meter.get(key)
                if isinstance(value, str):
                    meter[key] = shared.setdefault(value, value)


# Required keys that get a stand-in value when they are missing or wrong, so that the rest of
# their (required) section is still checked in the same run; checks of the stand-in itself are
# skipped, its problem having been reported.
_STAND_INS: Final[Mapping[str, Any]] = {
    "gateway": {},
    "gateway.id": "gateway",
    "uplink": {},
    "uplink.host": "localhost",
}


class _Bad:
    """A value that failed its check (and was reported)."""


_BAD: Final = _Bad()


def _within(where: str, outer: str) -> bool:
    """Whether key path ``where`` is ``outer`` or inside it."""
    return where == outer or where.startswith((outer + ".", outer + "["))


class _Validator:
    def __init__(self, file: Path, text: str, environ: Mapping[str, str], *, secrets: bool = True) -> None:
        self.file = file
        self.text = text
        self.base = file.resolve().parent
        self.environ = environ
        self.secrets = secrets
        self.errors: list[tuple[str, str]] = []
        self.warnings: list[tuple[str, str]] = []
        self.raw: dict[str, Any] = {}
        # what the structural pass left out, for the checks of meaning that follow
        self.derived = False  # the checks of meaning have begun
        self.dropped: set[str] = set()  # keys replaced by their default or a stand-in
        self.partial: set[str] = set()  # lists some items of which were left out
        self.positions: dict[str, list[int]] = {}  # such a list: the file's index of each kept item
        self._lines: dict[str, int] | None = None

    def error(self, where: str, message: str) -> None:
        if not self._covered(where):
            self.errors.append((where, message))

    def warn(self, where: str, message: str) -> None:
        self.warnings.append((where, message))

    def _covered(self, where: str) -> bool:
        """Whether a problem at ``where`` would only repeat one already reported."""
        if not self.derived:  # a key inside a table already reported as wrong adds nothing
            return any(_within(where, w) for w, _ in self.errors)
        # a default or stand-in put in place of a wrong value is not judged, nor is a list by
        # the items that were left
        return where in self.partial or any(_within(where, d) for d in self.dropped)

    def lines(self, kind: str, problems: list[tuple[str, str]]) -> list[str]:
        """``kind: file:line: key: message`` lines in the file's order (lines found only when needed)."""
        if self._lines is None:
            self._lines = key_lines(self.text)
        out: list[tuple[int, str]] = []
        for where, msg in problems:
            line = line_of(self._lines, where) if where else None
            at = f"{self.file}:{line}" if line else str(self.file)
            out.append((line or 0, f"{kind}: {at}: {where}: {msg}" if where else f"{kind}: {at}: {msg}"))
        return [text for _, text in sorted(out, key=lambda item: item[0])]

    def fail(self) -> ConfigError:
        return ConfigError(self.lines("error", self.errors), warnings=self.lines("warning", self.warnings))

    def run(self, raw: dict[str, Any]) -> Config:
        self.raw = raw
        # msgspec stops at a value's first problem, so the file is checked piece by piece: every
        # unknown key, missing key and wrong value in one run; then the checks of meaning run on
        # everything that passed, each list item keeping its index in the file.
        cleaned = self._shape(raw, Config, "")
        if isinstance(cleaned, _Bad):
            raise self.fail()
        try:
            config = msgspec.convert(cleaned, Config, dec_hook=_dec_hook)
        except msgspec.ValidationError as e:  # a rule the piecewise pass does not know
            self._validation_error(e, "", raw)
            raise self.fail() from None
        self.derived = True
        config = self._check(config)
        if self.errors:
            raise self.fail()
        return config

    def _validation_error(self, e: msgspec.ValidationError, prefix: str, raw: Any) -> None:
        where, message = _explain(str(e), raw, prefix)
        self.error(where, message)

    # -- structure: unknown keys, missing keys, wrong values, literal secrets ------------------

    def _shape(self, value: Any, tp: Any, where: str) -> Any:
        """Check ``value`` against the annotation ``tp``, reporting every problem in it; return it
        without unknown keys and left-out list items, or ``_BAD``."""
        bare = _unannotated(tp)
        if isinstance(value, dict) and (structs := _structs_in(bare)):
            cls = self._variant(structs, value, where)
            return _BAD if cls is None else self._shape_struct(value, cls, where)
        if isinstance(value, list) and (lists := [t for t in _members(bare) if typing.get_origin(t) is list]):
            (item_tp,) = typing.get_args(lists[0])
            if _structs_in(_unannotated(item_tp)):
                return self._shape_items(value, item_tp, where)
            items = [self._shape(item, item_tp, f"{where}[{i}]") for i, item in enumerate(value)]
            if any(isinstance(item, _Bad) for item in items):
                return _BAD
        try:  # a scalar, or a whole list of them (its length limits)
            msgspec.convert(value, tp, dec_hook=_dec_hook)
        except msgspec.ValidationError as e:
            self._validation_error(e, where, self.raw)
            return _BAD
        return value

    def _variant(self, structs: list[type[msgspec.Struct]], value: dict[str, Any], where: str) -> Any:
        tag_field = structs[0].__struct_config__.tag_field
        if tag_field is None:
            return structs[0]
        tags = {str(s.__struct_config__.tag): s for s in structs}
        tag = value.get(tag_field)
        if tag not in tags:
            got = "missing" if tag is None else f"got {tag!r}{_suggest(str(tag), tags)}"
            self.error(_join(where, tag_field), f"expected one of {_choices(tags)}; {got}")
            return None
        return tags[tag]

    def _shape_struct(self, value: dict[str, Any], cls: type[msgspec.Struct], where: str) -> Any:
        fields = {f.encode_name: f for f in msgspec.structs.fields(cls)}
        resolved: frozenset[str] = getattr(cls, "resolved", frozenset())
        tag_field = cls.__struct_config__.tag_field
        out: dict[str, Any] = {}
        broken = False
        suggested: set[str] = set()  # a misspelt required key is reported once, as the unknown key
        for key, item in value.items():
            path = _join(where, key)
            field = fields.get(key)
            if key == tag_field:
                out[key] = item
            elif key in resolved:
                refs = [f for f in fields if f.startswith(key + "_")] or [f"{key}_file", f"{key}_env"]
                self.error(path, f"secrets are given by reference: use {' or '.join(refs)}")
            elif field is None:
                valid = [f for f in fields if f not in resolved]
                suggested.update(difflib.get_close_matches(key, valid, n=1))
                self.error(path, f"unknown key{_suggest(key, valid)} (valid keys: {', '.join(valid)})")
            elif not isinstance(shaped := self._shape(item, field.type, path), _Bad):
                out[key] = shaped
            elif not field.required:
                self.dropped.add(path)
            elif path in _STAND_INS:
                out[key] = self._stand_in(path, field.type)
            else:
                broken = True
        for key, field in fields.items():
            if field.required and key not in value:
                path = _join(where, key)
                if key not in suggested:
                    self.error(path, "missing (required)")
                if path in _STAND_INS:
                    out[key] = self._stand_in(path, field.type)
                else:
                    broken = True
        return _BAD if broken else out

    def _stand_in(self, path: str, tp: Any) -> Any:
        self.dropped.add(path)
        return self._shape(_STAND_INS[path], tp, path)

    def _shape_items(self, value: list[Any], item_tp: Any, where: str) -> list[Any]:
        """A list of tables: a wrong item is left out (and reported); the others are still checked."""
        kept: list[Any] = []
        positions: list[int] = []
        for i, item in enumerate(value):
            shaped = self._shape(item, item_tp, f"{where}[{i}]")
            if not isinstance(shaped, _Bad):
                kept.append(shaped)
                positions.append(i)
        if len(kept) < len(value):
            self.partial.add(where)
            self.positions[where] = positions
        return kept

    def _numbered(self, where: str, items: list[_T]) -> Iterable[tuple[int, _T]]:
        """The kept items of the list at ``where`` with their index in the file."""
        return zip(self.positions.get(where, range(len(items))), items, strict=True)

    def _raw_names(self, where: str, key: str) -> list[Any]:
        """``key`` of every item of the list at ``where`` as written, left-out items included."""
        found, items = _lookup(self.raw, where)
        if not found or not isinstance(items, list):
            return []
        return [item.get(key) if isinstance(item, dict) else None for item in items]

    # -- meaning: references, cross-field rules, secrets --------------------------------------

    def _check(self, c: Config) -> Config:
        gateway = c.gateway
        self._timezone(gateway.timezone)
        state_dir = self._path(gateway.state_dir)
        gateway = msgspec.structs.replace(gateway, state_dir=state_dir)
        outbox = msgspec.structs.replace(
            c.outbox, path=self._path(c.outbox.path) if c.outbox.path else str(Path(state_dir) / "outbox.sqlite")
        )
        uplink = self._uplink(c.uplink, gateway.id)
        if c.outbox.commit_interval > MAX_COMMIT_INTERVAL:
            self.error(
                "outbox.commit_interval",
                f"must be at most {MAX_COMMIT_INTERVAL:g} s (polls wait for their commit), "
                f"got {float(c.outbox.commit_interval):g} s",
            )
        if c.limits.degraded_after > c.limits.offline_after:
            self.error("limits.degraded_after", f"must be <= limits.offline_after ({c.limits.offline_after})")
        buses = self._buses(c.buses)
        meters = self._meters(c.meters, {b.name: b for b in buses})
        # meters left out for a wrong value are still known by id: no second error where named
        known = {m.id for m in meters} | {i for i in self._raw_names("meters", "id") if isinstance(i, str)}
        if not self._raw_names("meters", "id") and "meters" not in self.dropped:
            self.warn("meters", "no meters are configured: the gateway will read nothing")
        model_quantities = self._model_quantities(meters)
        for gi, g in self._numbered("poll_groups", c.poll_groups):
            self._poll_group(f"poll_groups[{gi}]", g, meters, known, model_quantities)
        self._duplicates(self._raw_names("poll_groups", "name"), "poll_groups", "name", "poll group name")
        if c.daily_frozen is not None:
            self._daily_frozen(c, c.daily_frozen, meters, known)
        if c.time_sync is not None:
            self._time_sync(c.time_sync)
        commands = self._commands(c.commands, state_dir)
        return msgspec.structs.replace(
            c, gateway=gateway, outbox=outbox, uplink=uplink, buses=buses, meters=meters, commands=commands
        )

    def _timezone(self, timezone: str | None) -> None:
        if timezone is None:
            return
        try:
            zoneinfo.ZoneInfo(timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            self.error("gateway.timezone", f"unknown time zone {timezone!r} (an IANA name like 'Asia/Shanghai')")

    def _poll_group(
        self,
        where: str,
        g: PollGroup,
        meters: list[Meter],
        known: set[str],
        model_quantities: dict[str, frozenset[str]],
    ) -> None:
        if g.interval < 1 or not float(g.interval).is_integer():
            self.error(f"{where}.interval", f"must be a whole number of seconds >= 1, got {float(g.interval)!r}")
        self._meter_refs(g.meters, f"{where}.meters", known)
        if g.meters == "*" and not known and "meters" not in self.dropped:
            self.warn(f"{where}.meters", '"*" matches no meters (none are configured): this group reads nothing')
        ids = [m.id for m in meters] if g.meters == "*" else [m for m in g.meters if m in known]
        # a group some of whose meters have no known model may read anything: only judged when all are known
        offered = [model_quantities[i] for i in ids if i in model_quantities]
        judged = bool(offered) and len(offered) == len(ids)
        for qi, q in enumerate(g.quantities):
            if not _QUANTITY.fullmatch(q):
                self.error(
                    f"{where}.quantities[{qi}]",
                    f"{q!r} is not a quantity name (lower-case dotted words like 'energy.active.import.total')",
                )
            elif judged and not any(q in o for o in offered):
                everything = sorted(set().union(*offered))
                self.error(
                    f"{where}.quantities[{qi}]", f"no meter of this group can read {q!r}{_suggest(q, everything)}"
                )

    def _daily_frozen(self, c: Config, frozen: DailyFrozen, meters: list[Meter], known: set[str]) -> None:
        self._meter_refs(frozen.meters, "daily_frozen.meters", known)
        by_id = {m.id: m for m in meters}
        if frozen.enabled and frozen.meters == "*" and known and not c.group_meters(frozen):
            self.warn("daily_frozen.meters", '"*" matches no meter that keeps daily freezes: nothing is read')
        for i, ref in enumerate(frozen.meters if isinstance(frozen.meters, list) else ()):
            if ref in by_id and not registry.capable(by_id[ref].protocol, registry.Can.FROZEN):
                title = registry.get(by_id[ref].protocol).title
                self.error(f"daily_frozen.meters[{i}]", f"{ref!r} is a {title} meter, which keeps no daily freezes")
        if frozen.delay + frozen.spread >= 86400:
            self.error("daily_frozen", "delay + spread must be less than a day")

    def _time_sync(self, sync: TimeSync) -> None:
        if sync.interval < 1 or not float(sync.interval).is_integer():
            self.error("time_sync.interval", f"must be a whole number of seconds >= 1, got {float(sync.interval)!r}")
        elif sync.offset >= sync.interval:
            self.error("time_sync.offset", f"must be less than time_sync.interval ({float(sync.interval):g} s)")
        if sync.suspect_drift < sync.max_drift:
            self.error(
                "time_sync.suspect_drift",
                f"must be at least time_sync.max_drift ({float(sync.max_drift):g} s): a drift the job "
                "corrects is not a suspect clock",
            )

    def _commands(self, section: CommandsSection, state_dir: str) -> CommandsSection:
        where = "commands"
        for name in ("max_validity", "guard_window", "verify_window"):
            if getattr(section, name) <= 0:
                self.error(f"{where}.{name}", "must be > 0")
        if section.enabled and not section.keys:
            self.error(f"{where}.keys", "remote control is enabled but no key is configured")
        self._duplicates(self._raw_names(f"{where}.keys", "id"), f"{where}.keys", "id", "key id")
        keys = [self._command_key(k, f"{where}.keys[{ki}]") for ki, k in self._numbered(f"{where}.keys", section.keys)]
        return msgspec.structs.replace(
            section,
            keys=keys,
            store_path=self._path(section.store_path or str(Path(state_dir) / "commands.sqlite")),
            audit_path=self._path(section.audit_path or str(Path(state_dir) / "audit.sqlite")),
        )

    def _command_key(self, k: CommandKeyConfig, where: str) -> CommandKeyConfig:
        if len(set(k.roles)) != len(k.roles):
            self.error(f"{where}.roles", "lists a role more than once")
        shared = k.secret_file is not None or k.secret_env is not None
        if k.alg == "ed25519":
            if shared:
                self.error(where, "an ed25519 key takes public_key_file, not secret_file/secret_env")
            if k.public_key_file is None:
                self.error(f"{where}.public_key_file", "missing (required for alg 'ed25519')")
                return k
            path = self._path(k.public_key_file)
            try:
                data = Path(path).read_bytes()
            except OSError as e:
                self.error(f"{where}.public_key_file", f"cannot read key file {path}: {e.strerror or e}")
                return k
            from meter_gateway.gateway.commands.auth import load_ed25519_public_key

            try:
                raw = load_ed25519_public_key(data)
            except ValueError as e:
                self.error(f"{where}.public_key_file", f"{path}: {e}")
                return k
            return msgspec.structs.replace(k, public_key_file=path, public_key=raw)
        if k.public_key_file is not None:
            self.error(f"{where}.public_key_file", "an hmac-sha256 key takes secret_file or secret_env")
        if k.secret_file is not None and k.secret_env is not None:
            self.error(where, "give secret_file or secret_env, not both")
            return k
        if not self.secrets:
            return k
        secret: Secret | None = None
        if k.secret_file is not None:
            path = self._path(k.secret_file)
            try:
                text = Path(path).read_text(encoding="utf-8").rstrip("\r\n")
            except (OSError, UnicodeError) as e:
                reason = getattr(e, "strerror", None) or e
                self.error(f"{where}.secret_file", f"cannot read secret file {path}: {reason}")
                return k
            secret, src = Secret(text), f"{where}.secret_file"
        elif k.secret_env is not None:
            secret, src = Secret(self.environ.get(k.secret_env, "")), f"{where}.secret_env"
            if not secret.reveal():
                self.error(src, f"environment variable {k.secret_env} is not set (or empty)")
                return k
        else:
            self.error(where, "an hmac-sha256 key needs secret_file or secret_env")
            return k
        if len(secret.reveal().encode()) < 32:
            self.error(src, "the shared secret must be at least 32 bytes (value not shown)")
        return msgspec.structs.replace(k, secret=secret)

    def _path(self, text: str) -> str:
        return os.path.normpath(self.base / Path(text).expanduser())

    def _existing(self, text: str | None, where: str) -> str | None:
        if text is None:
            return None
        path = self._path(text)
        if not Path(path).is_file():
            self.error(where, f"file {path} does not exist")
        return path

    def _secret(self, section: Any, where: str, *, required: bool) -> Secret | None:
        file, env = section.password_file, section.password_env
        if file is not None and env is not None:
            self.error(where, "give password_file or password_env, not both")
            return None
        if not self.secrets and (file is not None or env is not None):
            return Secret("")
        if file is not None:
            path = self._path(file)
            try:
                text = Path(path).read_text(encoding="utf-8")
            except (OSError, UnicodeError) as e:
                reason = getattr(e, "strerror", None) or e
                self.error(f"{where}.password_file", f"cannot read secret file {path}: {reason}")
                return None
            secret_text = text.rstrip("\r\n")
            if not secret_text:
                self.error(f"{where}.password_file", f"secret file {path} is empty")
                return None
            return Secret(secret_text)
        if env is not None:
            value = self.environ.get(env)
            if not value:
                self.error(f"{where}.password_env", f"environment variable {env} is not set (or empty)")
                return None
            return Secret(value)
        if required:
            self.error(where, "needs password_file or password_env")
        return None

    def _uplink(self, u: UplinkSection, gateway_id: str) -> UplinkSection:
        if any(ch in u.topic_prefix for ch in "+#\0") or u.topic_prefix.startswith("/") or "//" in u.topic_prefix:
            self.error(
                "uplink.topic_prefix",
                f"must be MQTT topic levels without wildcards or empty levels, got {u.topic_prefix!r}",
            )
        tls = u.tls
        if tls is not None:
            if (tls.cert_file is None) != (tls.key_file is None):
                self.error("uplink.tls", "cert_file and key_file go together (client certificate and its key)")
            tls = TlsSection(
                ca_file=self._existing(tls.ca_file, "uplink.tls.ca_file"),
                cert_file=self._existing(tls.cert_file, "uplink.tls.cert_file"),
                key_file=self._existing(tls.key_file, "uplink.tls.key_file"),
            )
        password = self._secret(u, "uplink", required=False)
        if password is not None and u.username is None:
            self.error("uplink.username", "a password is configured but no username")
        return msgspec.structs.replace(u, tls=tls, password=password, client_id=u.client_id or gateway_id)

    def _buses(self, buses: list[BusConfig]) -> list[BusConfig]:
        self._duplicates(self._raw_names("buses", "name"), "buses", "name", "bus name")
        out: list[BusConfig] = []
        for bi, b in self._numbered("buses", buses):
            if isinstance(b, SerialBus) and not os.path.exists(b.port):
                self.warn(
                    f"buses[{bi}].port",
                    f"serial device {b.port} does not exist on this machine (fine if it is plugged in later)",
                )
            if isinstance(b, SerialBus) and b.protocol == "modbus-tcp":
                self.error(
                    f"buses[{bi}].protocol",
                    "'modbus-tcp' framing needs a tcp bus; a serial line carries 'modbus-rtu' or 'dlt645'",
                )
            if b.reply_timeout <= 0:
                self.error(f"buses[{bi}].reply_timeout", "must be > 0")
            out.append(b)
        return out

    def _meters(self, meters: list[Meter], buses: Mapping[str, BusConfig]) -> list[Meter]:
        self._duplicates(self._raw_names("meters", "id"), "meters", "id", "meter id")
        written = [n for n in self._raw_names("buses", "name") if isinstance(n, str)]
        left_out_buses = set(written) - set(buses)  # their problem is reported already
        seen_addresses: dict[tuple[str, str | int], tuple[int, str]] = {}
        out: list[Meter] = []
        for mi, m in self._numbered("meters", meters):
            where = f"meters[{mi}]"
            bus = buses.get(m.bus)
            if bus is None and (m.bus in left_out_buses or "buses" in self.dropped):
                pass
            elif bus is None:
                known = ", ".join(dict.fromkeys(written)) or "none"
                self.error(f"{where}.bus", f"unknown bus {m.bus!r}{_suggest(m.bus, written)} (buses: {known})")
            elif m.protocol not in registry.carried_by(bus.protocol):
                self.error(
                    f"{where}.protocol", f"{m.protocol!r} meter on bus {bus.name!r} whose framing is {bus.protocol!r}"
                )
            problem = registry.check_address(m.protocol, m.address)
            if problem is not None:
                self.error(f"{where}.address", problem)
            key = (m.bus, m.address)
            if key in seen_addresses:
                first, first_id = seen_addresses[key]
                self.error(
                    f"{where}.address",
                    f"address {m.address!r} on bus {m.bus!r} is already used by meters[{first}] ({first_id!r})",
                )
            else:
                seen_addresses[key] = (mi, m.id)
            model = self._model(m, where)
            for family in _PROTOCOL_OPTIONS:  # meters[].<family> tables belong to meters of that family
                if getattr(m, family) is not None and registry.get(m.protocol).family != family:
                    self.error(f"{where}.{family}", f"only for {family} meters; this meter speaks {m.protocol}")
            credentials = m.credentials
            if credentials is not None:
                rule = registry.get(m.protocol).password
                if rule is None:
                    with_password = ", ".join(p for p in registry.PROTOCOLS if registry.get(p).password is not None)
                    self.error(
                        f"{where}.credentials",
                        f"{m.protocol} meters take no password; credentials are for {with_password} meters",
                    )
                password = self._secret(credentials, f"{where}.credentials", required=True)
                # the tool that asked for no secrets gets none to check
                if password is not None and rule is not None and self.secrets and rule.problem(password.reveal()):
                    self.error(f"{where}.credentials", f"{rule.hint} (value not shown)")
                credentials = msgspec.structs.replace(credentials, password=password)
            out.append(msgspec.structs.replace(m, model=model, credentials=credentials))
        return out

    def _model(self, m: Meter, where: str) -> str:
        """Model names are checked against drivers/models/ when the meter-model module is present;
        paths (containing '/' or ending in .toml) are made absolute and must exist."""
        if "/" in m.model or m.model.endswith(".toml"):
            return self._existing(m.model, f"{where}.model") or m.model
        names = _available_models()
        if names is not None and m.model not in names:
            self.error(
                f"{where}.model",
                f"unknown meter model {m.model!r}{_suggest(m.model, names)} (available: {', '.join(names)})",
            )
        return m.model

    def _model_quantities(self, meters: list[Meter]) -> dict[str, frozenset[str]]:
        """Quantities each meter's model can read (meters whose model cannot be loaded are left out)."""
        try:
            from meter_gateway.drivers.meter_models import load_model
        except ImportError:
            return {}
        out: dict[str, frozenset[str]] = {}
        for mi, m in self._numbered("meters", meters):
            try:
                model = load_model(m.model)
            except Exception as e:  # any problem with a model file is one config error line
                if not any(w == f"meters[{mi}].model" for w, _ in self.errors):
                    self.error(f"meters[{mi}].model", f"cannot load meter model: {e}")
                continue
            family = registry.get(m.protocol).family
            if model.protocol != family:
                self.error(
                    f"meters[{mi}].model",
                    f"model {m.model!r} is a {model.protocol} model, the meter speaks {m.protocol}",
                )
            out[m.id] = frozenset(model.quantities)
        return out

    def _meter_refs(self, refs: str | list[str], where: str, known: set[str]) -> None:
        if isinstance(refs, str):
            if refs != "*":
                self.error(where, f'expected a list of meter ids or "*", got {refs!r}')
            return
        if not refs:
            self.error(where, 'lists no meters (give meter ids, or "*" for all)')
        if "meters" in self.dropped:  # the meter list itself is wrong (reported): no id is known
            return
        for i, ref in enumerate(refs):
            if ref not in known:
                self.error(f"{where}[{i}]", f"unknown meter {ref!r}{_suggest(ref, known)}")

    def _duplicates(self, names: list[Any], section: str, key: str, what: str) -> None:
        """``names`` as written (see _raw_names): an item left out for another problem still counts."""
        first: dict[str, int] = {}
        for i, name in enumerate(names):
            if not isinstance(name, str):
                continue
            if name in first:
                self.error(f"{section}[{i}].{key}", f"duplicate {what} {name!r} (first at {section}[{first[name]}])")
            else:
                first.setdefault(name, i)


def _available_models() -> list[str] | None:
    """Shipped model names, or None when this build has no meter-model module."""
    try:
        from meter_gateway.drivers.meter_models import available_models
    except ImportError:
        return None
    return available_models()


def _dec_hook(t: type, obj: Any) -> Any:
    if t is Duration:
        return parse_duration(obj)
    raise NotImplementedError(f"cannot read {t!r}")


def schema_hook(t: type) -> dict[str, Any]:
    """JSON Schema of the custom types, for ``msgspec.json.schema(Config, schema_hook=schema_hook)``
    (gateway/config_reference.py writes the complete schema, defaults included)."""
    if t is Duration:
        return {
            "x-type": "duration",
            "x-unit": "s",
            "anyOf": [
                {"type": "number", "minimum": 0},
                {"type": "string", "pattern": f"^{_DURATION.pattern}$"},
            ],
        }
    if t is Secret:  # filled in at load from a file or the environment, never written in the file
        return {"type": "string", "writeOnly": True}
    raise NotImplementedError(f"no JSON Schema for {t!r}")


_MSGSPEC_ERROR: Final = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)


def _explain(text: str, raw: Any, prefix: str = "") -> tuple[str, str]:
    """Turn a msgspec message ("Expected `int`, got `str` - at `$.buses[0].port`") into a key
    path and a message that says what was expected and what was found."""
    m = _MSGSPEC_ERROR.match(text)
    assert m is not None  # the pattern matches any text
    where = prefix + (m.group("path") or "")
    where = where.lstrip(".")
    msg = m.group("msg")
    missing = re.fullmatch(r"Object missing required field `([^`]+)`", msg)
    if missing:
        return (f"{where}.{missing.group(1)}" if where else missing.group(1)), "missing (required)"
    found, value = _lookup(raw, where)
    expected = _expected_at(where)
    msg = (
        msg.replace("`", "").replace("Expected object", "expected a table").replace("Expected array", "expected a list")
    )
    if expected:
        msg = f"expected {expected}"
    if found and not msg.endswith(f"got {type(value).__name__}"):
        msg += f", got {value!r}"
    return where, msg[:1].lower() + msg[1:]


_PATH_PART: Final = re.compile(r"\.?([^.\[\]]+)|\[(\d+)\]")


def _lookup(raw: Any, where: str) -> tuple[bool, Any]:
    value = raw
    for name, index in _PATH_PART.findall(where):
        try:
            value = value[int(index)] if index else value[name]
        except (KeyError, IndexError, TypeError):
            return False, None
    return True, value


def _expected_at(where: str) -> str:
    """What the schema wants at a key path, in words (literals spelt out), '' if unknown."""
    t: inspect.Type = inspect.type_info(Config)
    for name, index in _PATH_PART.findall(where):
        t = _strip_optional(t)
        if index:
            if not isinstance(t, inspect.ListType):
                return ""
            t = t.item_type
            continue
        if isinstance(t, inspect.UnionType):  # tagged buses: the field exists on one variant
            t = next(
                (s for s in t.types if isinstance(s, inspect.StructType) and any(f.name == name for f in s.fields)), t
            )
        if not isinstance(t, inspect.StructType):
            return ""
        field = next((f for f in t.fields if f.encode_name == name), None)
        if field is None:
            return ""
        t = field.type
    return _describe(_strip_optional(t))


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _unannotated(tp: Any) -> Any:
    while typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _members(tp: Any) -> tuple[Any, ...]:
    """The types of a union, or the type alone."""
    return typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)


def _structs_in(tp: Any) -> list[type[msgspec.Struct]]:
    return [t for t in _members(tp) if isinstance(t, type) and issubclass(t, msgspec.Struct)]


def _strip_optional(t: inspect.Type) -> inspect.Type:
    t = _bare(t)
    if isinstance(t, inspect.UnionType):
        rest = [x for x in t.types if not isinstance(x, inspect.NoneType)]
        if len(rest) == 1:
            return _bare(rest[0])
    return t


def _bare(t: inspect.Type) -> inspect.Type:
    """The type without its field descriptions (``Meta`` documentation wraps it in Metadata)."""
    while isinstance(t, inspect.Metadata):
        t = t.type
    return t


def _describe(t: inspect.Type) -> str:
    if isinstance(t, inspect.LiteralType):
        return f"one of {_choices(t.values)}"
    if isinstance(t, inspect.IntType):
        return "an integer" + _bounds(t.ge, t.gt, t.le, t.lt)
    if isinstance(t, inspect.FloatType):
        return "a number" + _bounds(t.ge, t.gt, t.le, t.lt)
    if isinstance(t, inspect.StrType):
        if t.pattern == _NAME:
            return "a name of letters, digits and _ . : - (starting with a letter or digit)"
        return "a string" + (f" matching {t.pattern}" if t.pattern else "")
    if isinstance(t, inspect.BoolType):
        return "true or false"
    if isinstance(t, inspect.ListType):
        return "a list" + (f" of at least {t.min_length}" if t.min_length else "")
    if isinstance(t, inspect.StructType):
        return "a table"
    if isinstance(t, inspect.CustomType) and t.cls is Duration:
        return "a duration like '30s', '15m', '1h' or seconds"
    return ""


def _bounds(ge: Any, gt: Any, le: Any, lt: Any) -> str:
    parts = [f"{op} {v}" for op, v in ((">=", ge), (">", gt), ("<=", le), ("<", lt)) if v is not None]
    return f" {' and '.join(parts)}" if parts else ""


def _choices(values: Iterable[Any]) -> str:
    return ", ".join(repr(v) for v in values)


def _suggest(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ---------------------------------------------------------------------------------------------
# Reload


@dataclasses.dataclass(frozen=True, slots=True)
class Changes:
    added: frozenset[str] = frozenset()
    removed: frozenset[str] = frozenset()
    changed: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)

    @property
    def touched(self) -> frozenset[str]:
        return self.added | self.removed | self.changed


@dataclasses.dataclass(frozen=True, slots=True)
class ConfigDiff:
    """What a reload changes. ``sections`` names changed singleton sections (gateway, uplink, ...);
    a meter on a changed bus is not listed as changed itself, see :meth:`meters_to_restart`."""

    buses: Changes
    meters: Changes
    poll_groups: Changes
    sections: frozenset[str]

    def __bool__(self) -> bool:
        return bool(self.buses or self.meters or self.poll_groups or self.sections)

    def meters_to_restart(self, new: Config) -> frozenset[str]:
        """Meters whose own settings or bus changed (removed ones included)."""
        bus_touched = self.buses.touched
        return self.meters.touched | frozenset(m.id for m in new.meters if m.bus in bus_touched)


def _changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> Changes:
    return Changes(
        added=frozenset(new.keys() - old.keys()),
        removed=frozenset(old.keys() - new.keys()),
        changed=frozenset(k for k in old.keys() & new.keys() if old[k] != new[k]),
    )


def diff(old: Config, new: Config) -> ConfigDiff:
    """Pure comparison of two loaded configs (secrets compare by value, without revealing them)."""
    singletons = ("gateway", "uplink", "outbox", "metrics", "limits", "time_sync", "daily_frozen", "commands")
    return ConfigDiff(
        buses=_changes({b.name: b for b in old.buses}, {b.name: b for b in new.buses}),
        meters=_changes({m.id: m for m in old.meters}, {m.id: m for m in new.meters}),
        poll_groups=_changes({g.name: g for g in old.poll_groups}, {g.name: g for g in new.poll_groups}),
        sections=frozenset(s for s in singletons if getattr(old, s) != getattr(new, s)),
    )

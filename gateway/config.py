"""The gateway's configuration: one TOML file, validated completely before anything starts.

Loading is strict. Every problem becomes one line ``error: <file>: <key path>: <message>``
(e.g. ``buses[2].baud_rate``) in a :class:`ConfigError`; unknown keys are errors that suggest the
closest valid key, because a silently ignored ``baudrate`` would poll at the wrong speed.
Secrets (MQTT password, DL/T 645 meter passwords) are never written in the file: it names a file
(``password_file``) or an environment variable (``password_env``) and the value is read at load
into a :class:`Secret`, which prints as ``******``.

Relative paths (state_dir, outbox path, TLS files, password files, model files) are relative to
the directory of the config file, so a config and its secrets can be moved together.
"""

from __future__ import annotations

import dataclasses
import difflib
import hmac
import math
import os
import re
import tomllib
import typing
import zoneinfo
from collections.abc import Iterable, Mapping
from datetime import tzinfo
from pathlib import Path
from typing import Annotated, Any, ClassVar, Final, Literal

import msgspec
from msgspec import Meta, inspect

__all__ = [
    "BusConfig",
    "CommandKeyConfig",
    "CommandsSection",
    "Config",
    "ConfigDiff",
    "ConfigError",
    "Credentials",
    "DailyFrozen",
    "Duration",
    "Meter",
    "PollGroup",
    "Secret",
    "SerialBus",
    "TcpBus",
    "diff",
    "load_config",
    "parse_duration",
]

DEFAULT_STATE_DIR: Final = "/var/lib/meter-gateway"
MAX_FROZEN_DAYS: Final = 62  # DL/T 645-2007 meters keep the last 62 daily freezes
BAUD_RATES: Final = (300, 600, 1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200)

# Names that end up in MQTT topics and metric labels: no spaces, slashes or wildcards.
_NAME: Final = r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$"
# Canonical quantity names are lower-case dotted words: ``energy.active.import.t1``.
_QUANTITY: Final = re.compile(r"[a-z][a-z0-9_]*(\.[a-z0-9_]+)*")
_DLT645_ADDRESS: Final = re.compile(r"[0-9]{12}")
_DURATION: Final = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d)\s*")
MAX_COMMIT_INTERVAL: Final = 1.0
_UNIT_SECONDS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

Name = Annotated[str, Meta(pattern=_NAME, max_length=64)]
Port = Annotated[int, Meta(ge=1, le=65535)]


class ConfigError(Exception):
    """The config is unusable; ``messages`` holds one complete line per problem."""

    def __init__(self, messages: list[str]) -> None:
        super().__init__("\n".join(messages))
        self.messages = messages


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


class GatewaySection(_Section, kw_only=True, frozen=True):
    id: Name
    timezone: str | None = None  # IANA name of the meters' clock zone; None: this machine's zone
    state_dir: str = DEFAULT_STATE_DIR

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

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


class UplinkSection(_Section, kw_only=True, frozen=True):
    resolved: ClassVar[frozenset[str]] = frozenset({"password"})

    host: Annotated[str, Meta(min_length=1)]
    port: Port = 1883
    client_id: str | None = None  # default: the gateway id
    username: str | None = None
    password_file: str | None = None
    password_env: str | None = None
    password: Secret | None = None
    tls: TlsSection | None = None
    keepalive: Duration = Duration(60)
    topic_prefix: str = "meter-gateway"  # gateway.mqtt_contract.TOPIC_ROOT
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    batch_max_readings: Annotated[int, Meta(ge=1, le=10000)] = 500
    max_inflight: Annotated[int, Meta(ge=1, le=65535)] = 20


class OutboxSection(_Section, kw_only=True, frozen=True):
    path: str | None = None  # default: <state_dir>/outbox.sqlite
    synchronous: Literal["FULL", "NORMAL", "EXTRA"] = "FULL"
    budget_mb: Annotated[float, Meta(gt=0)] = 512.0
    # When the budget is full: stop polling new data (nothing committed is lost) or drop the oldest
    # undelivered readings.
    overflow_policy: Literal["pause_polling", "drop_oldest"] = "pause_polling"
    # Shortest time between two commits: readings arriving meanwhile share one transaction (and
    # one fsync under FULL). docs/outbox.md "Group commit".
    commit_interval: Duration = Duration(0.02)


class MetricsSection(_Section, kw_only=True, frozen=True):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: Port = 9108


class LimitsSection(_Section, kw_only=True, frozen=True):
    max_queue_per_bus: Annotated[int, Meta(ge=1)] = 1000  # queued transactions before polls are shed
    degraded_after: Annotated[int, Meta(ge=1)] = 1  # consecutive failures (drivers.health.HealthPolicy)
    offline_after: Annotated[int, Meta(ge=1)] = 3
    offline_probe_interval: Duration = Duration(60)
    backfill_max_slots: Annotated[int, Meta(ge=0)] = 2880  # per meter and group, per backfill run


class _BusBase(_Section, kw_only=True, frozen=True):
    name: Name
    protocol: Literal["dlt645", "modbus-rtu", "modbus-tcp"]
    reply_timeout: Duration = Duration(1.0)
    attempts: Annotated[int, Meta(ge=1, le=10)] = 3
    inter_frame_gap: Duration | None = None  # None: the protocol's own rule (see SerialBus.frame_gap)


class SerialBus(_BusBase, kw_only=True, frozen=True, tag="serial", tag_field="type"):
    port: Annotated[str, Meta(min_length=1)]
    baud_rate: Literal[300, 600, 1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200]
    data_bits: Literal[7, 8] = 8
    parity: Literal["N", "E", "O"]
    stop_bits: Literal[1, 2] = 1
    rs485: bool = True

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
    host: Annotated[str, Meta(min_length=1)]
    port: Port
    connect_timeout: Duration = Duration(5.0)

    def frame_gap(self) -> float:
        return 0.0 if self.inter_frame_gap is None else float(self.inter_frame_gap)


BusConfig = SerialBus | TcpBus


class Credentials(_Section, kw_only=True, frozen=True):
    """DL/T 645 write access (remote disconnect): password level, password, operator code."""

    resolved: ClassVar[frozenset[str]] = frozenset({"password"})

    password_level: Annotated[int, Meta(ge=0, le=9)] = 2
    password_file: str | None = None
    password_env: str | None = None
    password: Secret | None = None
    operator: Annotated[str, Meta(pattern=r"^[0-9A-Fa-f]{8}$")] = "00000000"


class Meter(_Section, kw_only=True, frozen=True, gc=False):
    # gc=False: 16 bytes less per meter (it holds strings, an int and Credentials: no cycles)
    id: Name
    bus: str
    protocol: Literal["dlt645-2007", "dlt645-1997", "modbus"]
    address: str | int  # DL/T 645: 12 digits as a string; Modbus: unit id 1..247
    model: str
    credentials: Credentials | None = None
    # How a remote reconnect closes the relay when the command does not say: "close_permit" arms
    # it and the customer presses the meter's button (safe default: nobody is surprised by power
    # coming back); "direct_close" closes it at once (DL/T 645 1C, 2013 amendment).
    reconnect: Literal["close_permit", "direct_close"] = "close_permit"

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
    name: Name
    interval: Duration
    quantities: Annotated[list[str], Meta(min_length=1)]
    meters: str | list[str] = "*"  # meter ids, or "*" for every meter
    spread: Annotated[float, Meta(ge=0, lt=1)] = 0.1  # fraction of the interval reads are spread over
    backfill: bool = False


class TimeSync(_Section, kw_only=True, frozen=True):
    enabled: bool = True
    interval: Duration = Duration(86400)
    offset: Duration = Duration(0)  # into each interval, so syncs need not coincide with reads at :00
    mode: Literal["broadcast", "unicast"] = "broadcast"
    max_drift: Duration = Duration(5)  # seconds of meter clock drift tolerated before correcting
    # meter-vs-gateway skew beyond which the meter's readings carry Quality.CLOCK_SUSPECT
    # (default: the drift beyond which a broadcast cannot correct a meter, time_sync_job.BROADCAST_LIMIT)
    suspect_drift: Duration = Duration(300)


class DailyFrozen(_Section, kw_only=True, frozen=True):
    """Reading each meter's daily frozen record after local midnight (DL/T 645 05060xxx)."""

    enabled: bool = True
    delay: Duration = Duration(300)  # after local midnight, so every meter has frozen
    spread: Duration = Duration(600)  # reads are spread over this window after the delay
    meters: str | list[str] = "*"
    backfill_days: Annotated[int, Meta(ge=0, le=MAX_FROZEN_DAYS)] = 7


class CommandKeyConfig(_Section, kw_only=True, frozen=True):
    """A key remote-control commands may be signed with (gateway.commands.auth.KeyRing)."""

    resolved: ClassVar[frozenset[str]] = frozenset({"public_key", "secret"})

    id: Annotated[str, Meta(pattern=r"^[A-Za-z0-9._:-]{1,64}$")]
    alg: Literal["ed25519", "hmac-sha256"]
    public_key_file: str | None = None  # ed25519: PEM public key, or the raw 32 bytes in base64
    secret_file: str | None = None  # hmac-sha256: the shared secret (>= 32 bytes)
    secret_env: str | None = None
    roles: Annotated[list[Literal["command", "release"]], Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: ["command"]
    )
    public_key: bytes | None = None  # resolved: raw Ed25519 public key
    secret: Secret | None = None  # resolved: HMAC key


class CommandsSection(_Section, kw_only=True, frozen=True):
    """Remote control (docs/mqtt.md "Commands and acknowledgements"). Off unless enabled."""

    enabled: bool = False
    keys: list[CommandKeyConfig] = msgspec.field(default_factory=list)
    max_validity: Duration = Duration(86400)  # longest expires_at - issued_at accepted
    max_disconnects: Annotated[int, Meta(ge=1)] = 50  # per guard_window, then commands are held
    guard_window: Duration = Duration(3600)
    verify_window: Duration = Duration(30)  # to read the relay back after a control frame
    retry: Annotated[int, Meta(ge=1, le=10)] = 3  # attempts per control frame
    store_path: str | None = None  # default: <state_dir>/commands.sqlite
    audit_path: str | None = None  # default: <state_dir>/audit.sqlite


class Config(_Section, kw_only=True, frozen=True):
    gateway: GatewaySection
    uplink: UplinkSection
    outbox: OutboxSection = OutboxSection()
    metrics: MetricsSection = MetricsSection()
    limits: LimitsSection = LimitsSection()
    buses: list[BusConfig] = msgspec.field(default_factory=list)
    meters: list[Meter] = msgspec.field(default_factory=list)
    poll_groups: list[PollGroup] = msgspec.field(default_factory=list)
    time_sync: TimeSync | None = None
    daily_frozen: DailyFrozen | None = None
    commands: CommandsSection = CommandsSection()

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
                return [m for m in self.meters if m.protocol.startswith("dlt645")]
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
    file = Path(path)
    env = os.environ if environ is None else environ
    try:
        with file.open("rb") as f:
            raw = tomllib.load(f)
    except OSError as e:
        raise ConfigError([f"error: {file}: cannot read: {e.strerror or e}"]) from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"error: {file}: not valid TOML: {e}"]) from e
    _share_repeated_values(raw)
    v = _Validator(file, env, secrets=secrets)
    return v.run(raw)


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


class _Validator:
    def __init__(self, file: Path, environ: Mapping[str, str], *, secrets: bool = True) -> None:
        self.file = file
        self.base = file.resolve().parent
        self.environ = environ
        self.secrets = secrets
        self.errors: list[tuple[str, str]] = []

    def error(self, where: str, message: str) -> None:
        self.errors.append((where, message))

    def fail(self) -> ConfigError:
        return ConfigError(
            [
                f"error: {self.file}: {where}: {msg}" if where else f"error: {self.file}: {msg}"
                for where, msg in self.errors
            ]
        )

    def run(self, raw: dict[str, Any]) -> Config:
        cleaned = self._walk(raw, inspect.type_info(Config), "")
        # msgspec stops at the first problem: convert section by section, and list items one by
        # one, so one run reports a problem in every section and every bus/meter/group.
        for field in msgspec.structs.fields(Config):
            value = cleaned.get(field.encode_name)
            if value is None:
                continue
            item_type = typing.get_args(field.type)[0] if typing.get_origin(field.type) is list else None
            if item_type is not None and isinstance(value, list):
                for i, item in enumerate(value):
                    self._convert(item, item_type, f"{field.encode_name}[{i}]", raw)
            else:
                self._convert(value, field.type, field.encode_name, raw)
        if self.errors:
            raise self.fail()
        try:
            config = msgspec.convert(cleaned, Config, dec_hook=_dec_hook)
        except msgspec.ValidationError as e:
            self._validation_error(e, "", raw)
            raise self.fail() from None
        config = self._check(config)
        if self.errors:
            raise self.fail()
        return config

    def _convert(self, value: Any, t: Any, where: str, raw: Any) -> None:
        try:
            msgspec.convert(value, t, dec_hook=_dec_hook)
        except msgspec.ValidationError as e:
            self._validation_error(e, where, raw)

    def _validation_error(self, e: msgspec.ValidationError, prefix: str, raw: Any) -> None:
        where, message = _explain(str(e), raw, prefix)
        if not any(where == w or where.startswith((w + ".", w + "[")) for w, _ in self.errors):
            self.error(where, message)

    # -- structure: unknown keys, literal secrets ----------------------------------------------

    def _walk(self, value: Any, t: inspect.Type, where: str) -> Any:
        """Report unknown keys (all of them, with suggestions) and return ``value`` without them."""
        if isinstance(t, inspect.StructType) and isinstance(value, dict):
            fields = {f.encode_name: f for f in t.fields}
            resolved: frozenset[str] = getattr(t.cls, "resolved", frozenset())
            out: dict[str, Any] = {}
            for key, item in value.items():
                path = f"{where}.{key}" if where else key
                if key in resolved:
                    refs = [f for f in fields if f.startswith(key + "_")] or [f"{key}_file", f"{key}_env"]
                    self.error(path, f"secrets are given by reference: use {' or '.join(refs)}")
                elif key == t.tag_field:
                    out[key] = item
                elif key not in fields:
                    valid = [f for f in fields if f not in resolved]
                    self.error(path, f"unknown key{_suggest(key, valid)} (valid keys: {', '.join(valid)})")
                else:
                    out[key] = self._walk(item, fields[key].type, path)
            return out
        if isinstance(t, inspect.ListType) and isinstance(value, list):
            return [self._walk(item, t.item_type, f"{where}[{i}]") for i, item in enumerate(value)]
        if isinstance(t, inspect.UnionType):
            structs = [s for s in t.types if isinstance(s, inspect.StructType)]
            if isinstance(value, dict) and structs:
                tag_field = structs[0].tag_field
                if tag_field is None:
                    return self._walk(value, structs[0], where)
                tags = {str(s.tag): s for s in structs}
                tag = value.get(tag_field)
                if tag not in tags:
                    got = "missing" if tag is None else f"got {tag!r}{_suggest(str(tag), tags)}"
                    self.error(f"{where}.{tag_field}", f"expected one of {_choices(tags)}; {got}")
                    return value
                return self._walk(value, tags[tag], where)
            lists = [s for s in t.types if isinstance(s, inspect.ListType)]
            if isinstance(value, list) and lists:
                return self._walk(value, lists[0], where)
        return value

    # -- meaning: references, cross-field rules, secrets --------------------------------------

    def _check(self, c: Config) -> Config:
        gateway = c.gateway
        if gateway.timezone is not None:
            try:
                zoneinfo.ZoneInfo(gateway.timezone)
            except (zoneinfo.ZoneInfoNotFoundError, ValueError):
                self.error(
                    "gateway.timezone", f"unknown time zone {gateway.timezone!r} (an IANA name like 'Asia/Shanghai')"
                )
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
        known = {m.id for m in meters}
        model_quantities = self._model_quantities(meters)
        for gi, g in enumerate(c.poll_groups):
            where = f"poll_groups[{gi}]"
            if g.interval < 1 or not float(g.interval).is_integer():
                self.error(f"{where}.interval", f"must be a whole number of seconds >= 1, got {float(g.interval)!r}")
            self._meter_refs(g.meters, f"{where}.meters", known)
            ids = [m.id for m in meters] if g.meters == "*" else [m for m in g.meters if m in known]
            for qi, q in enumerate(g.quantities):
                if not _QUANTITY.fullmatch(q):
                    self.error(
                        f"{where}.quantities[{qi}]",
                        f"{q!r} is not a quantity name (lower-case dotted words like 'energy.active.import.total')",
                    )
                    continue
                offered = [model_quantities[i] for i in ids if i in model_quantities]
                if offered and len(offered) == len(ids) and not any(q in o for o in offered):
                    everything = sorted(set().union(*offered))
                    self.error(
                        f"{where}.quantities[{qi}]", f"no meter of this group can read {q!r}{_suggest(q, everything)}"
                    )
        self._duplicates([g.name for g in c.poll_groups], "poll_groups", "name", "poll group name")
        if c.daily_frozen is not None:
            frozen = c.daily_frozen
            self._meter_refs(frozen.meters, "daily_frozen.meters", known)
            by_id = {m.id: m for m in meters}
            for i, ref in enumerate(frozen.meters if isinstance(frozen.meters, list) else ()):
                if ref in by_id and not by_id[ref].protocol.startswith("dlt645"):
                    self.error(f"daily_frozen.meters[{i}]", f"{ref!r} is a Modbus meter; daily freezes are DL/T 645")
            if frozen.delay + frozen.spread >= 86400:
                self.error("daily_frozen", "delay + spread must be less than a day")
        if c.time_sync is not None:
            sync = c.time_sync
            if sync.interval < 1 or not float(sync.interval).is_integer():
                self.error(
                    "time_sync.interval", f"must be a whole number of seconds >= 1, got {float(sync.interval)!r}"
                )
            elif sync.offset >= sync.interval:
                self.error("time_sync.offset", f"must be less than time_sync.interval ({float(sync.interval):g} s)")
            if sync.suspect_drift < sync.max_drift:
                self.error(
                    "time_sync.suspect_drift",
                    f"must be at least time_sync.max_drift ({float(sync.max_drift):g} s): a drift the job "
                    "corrects is not a suspect clock",
                )
        commands = self._commands(c.commands, state_dir)
        return msgspec.structs.replace(
            c, gateway=gateway, outbox=outbox, uplink=uplink, buses=buses, meters=meters, commands=commands
        )

    def _commands(self, section: CommandsSection, state_dir: str) -> CommandsSection:
        where = "commands"
        for name in ("max_validity", "guard_window", "verify_window"):
            if getattr(section, name) <= 0:
                self.error(f"{where}.{name}", "must be > 0")
        if section.enabled and not section.keys:
            self.error(f"{where}.keys", "remote control is enabled but no key is configured")
        self._duplicates([k.id for k in section.keys], f"{where}.keys", "id", "key id")
        keys = [self._command_key(k, f"{where}.keys[{ki}]") for ki, k in enumerate(section.keys)]
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
        self._duplicates([b.name for b in buses], "buses", "name", "bus name")
        out: list[BusConfig] = []
        for bi, b in enumerate(buses):
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
        self._duplicates([m.id for m in meters], "meters", "id", "meter id")
        seen_addresses: dict[tuple[str, str | int], int] = {}
        out: list[Meter] = []
        for mi, m in enumerate(meters):
            where = f"meters[{mi}]"
            bus = buses.get(m.bus)
            if bus is None:
                known = ", ".join(buses) or "none"
                self.error(f"{where}.bus", f"unknown bus {m.bus!r}{_suggest(m.bus, buses)} (buses: {known})")
            elif (bus.protocol == "dlt645") != m.protocol.startswith("dlt645"):
                self.error(
                    f"{where}.protocol", f"{m.protocol!r} meter on bus {bus.name!r} whose framing is {bus.protocol!r}"
                )
            if m.protocol.startswith("dlt645"):
                if not isinstance(m.address, str) or not _DLT645_ADDRESS.fullmatch(m.address):
                    self.error(
                        f"{where}.address",
                        f'a DL/T 645 address is exactly 12 decimal digits in quotes (e.g. "000000001234"), '
                        f"got {m.address!r}",
                    )
                elif m.address == "999999999999":
                    self.error(f"{where}.address", "999999999999 is the broadcast address, not a meter")
            elif isinstance(m.address, bool) or not isinstance(m.address, int) or not 1 <= m.address <= 247:
                self.error(f"{where}.address", f"a Modbus unit id is an integer 1..247, got {m.address!r}")
            key = (m.bus, m.address)
            if key in seen_addresses:
                first = seen_addresses[key]
                self.error(
                    f"{where}.address",
                    f"address {m.address!r} on bus {m.bus!r} is already used by meters[{first}] ({meters[first].id!r})",
                )
            else:
                seen_addresses[key] = mi
            model = self._model(m, where)
            credentials = m.credentials
            if credentials is not None:
                if not m.protocol.startswith("dlt645"):
                    self.error(f"{where}.credentials", "credentials are for DL/T 645 meters; Modbus has no password")
                password = self._secret(credentials, f"{where}.credentials", required=True)
                unchecked = not self.secrets  # the tool that asked for no secrets gets none to check
                if password is not None and not unchecked and not re.fullmatch(r"[0-9A-Fa-f]{6}", password.reveal()):
                    self.error(f"{where}.credentials", "the DL/T 645 password must be 6 hex digits (value not shown)")
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
        for mi, m in enumerate(meters):
            try:
                model = load_model(m.model)
            except Exception as e:  # any problem with a model file is one config error line
                if not any(w == f"meters[{mi}].model" for w, _ in self.errors):
                    self.error(f"meters[{mi}].model", f"cannot load meter model: {e}")
                continue
            family = "dlt645" if m.protocol.startswith("dlt645") else "modbus"
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
        for i, ref in enumerate(refs):
            if ref not in known:
                self.error(f"{where}[{i}]", f"unknown meter {ref!r}{_suggest(ref, known)}")

    def _duplicates(self, names: list[str], section: str, key: str, what: str) -> None:
        first: dict[str, int] = {}
        for i, name in enumerate(names):
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


def _strip_optional(t: inspect.Type) -> inspect.Type:
    if isinstance(t, inspect.UnionType):
        rest = [x for x in t.types if not isinstance(x, inspect.NoneType)]
        if len(rest) == 1:
            return rest[0]
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

"""MQTT uplink: drains the outbox to the broker, publishes status and meter states, takes commands.

Delivery is at least once from the outbox to the broker: rows are acked in the outbox only after
a PUBACK with a success reason code. The connection is gateway/uplink/mqtt_connection.py (paho's public
client API on our event loop; aiomqtt's public API cannot report a PUBACK's reason code), whose
publish() gives a future of that code. A negative code (>= 0x80: not authorized, quota exceeded,
...) is a failure: the rows stay, the pump backs off and sends them again.

The publish window is ours: at most ``window`` unacknowledged batches (capped by the broker's
Receive Maximum), because thousands of concurrent publishes just time out.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import inspect
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from meter_gateway.drivers.backoff import Backoff, BackoffPolicy
from meter_gateway.drivers.log_limit import logfmt_value
from meter_gateway.gateway import __version__
from meter_gateway.gateway.daemon.logs import log_limited
from meter_gateway.gateway.store.outbox import AsyncOutbox, OutboxDamaged, Record, Row
from meter_gateway.gateway.uplink.contract import (
    BATCH_OVERHEAD,
    CONTRACT_VERSION,
    TOPIC_ROOT,
    MeterState,
    MeterStateName,
    Status,
    Topics,
    WireReading,
    encode_batch,
    encode_meter_state,
    encode_reading,
    encode_status,
)
from meter_gateway.gateway.uplink.mqtt_connection import ConnectionLost, ConnectRefused, MqttConnection, MqttError, Will

__all__ = [
    "CommandHook",
    "InboundMessage",
    "Protocol",
    "TlsConfig",
    "Uplink",
    "UplinkConfig",
    "UplinkConfigError",
    "UplinkStats",
]

log = logging.getLogger(__name__)
_paho_log = logging.getLogger(f"{__name__}.paho")  # paho's own lines, separable from ours

_UNSUPPORTED_PROTOCOL = (1, 0x84)  # MQTT 3.1.1 return code 1; MQTT 5 reason 0x84


class _KnownState(NamedTuple):
    """A meter's latest state, kept to publish now and again after every reconnect."""

    state: MeterStateName
    since: float
    detail: str | None


class _KnownStates:
    """The latest state of every meter, in insertion order. A fleet's meters share a handful of
    (state, detail) pairs, so each pair is one object and a meter holds a reference to it and its
    own ``since``: two dict entries, not a tuple of three as well (~0.4 MiB less per 10,000)."""

    SHARED_MAX = 64  # pairs remembered for sharing; details that differ per meter only stop the sharing

    def __init__(self) -> None:
        self._since: dict[str, float] = {}
        self._condition: dict[str, tuple[MeterStateName, str | None]] = {}
        self._shared: dict[tuple[MeterStateName, str | None], tuple[MeterStateName, str | None]] = {}

    def set(self, meter_id: str, state: MeterStateName, since: float, detail: str | None) -> None:
        condition = (state, detail)
        if len(self._shared) >= self.SHARED_MAX and condition not in self._shared:
            self._shared.clear()
        self._since[meter_id] = since
        self._condition[meter_id] = self._shared.setdefault(condition, condition)

    def get(self, meter_id: str) -> _KnownState | None:
        since = self._since.get(meter_id)
        if since is None:
            return None
        state, detail = self._condition[meter_id]
        return _KnownState(state, since, detail)

    def __iter__(self) -> Iterator[str]:
        return iter(self._since)


class Protocol(enum.StrEnum):
    AUTO = "auto"  # MQTT 5, falling back to 3.1.1 when the broker refuses the protocol version
    V5 = "5"
    V311 = "3.1.1"


def _cancel(task: asyncio.Task[Any] | None) -> None:
    """Cancel a read-ahead that is no longer wanted (the pump then forgets it)."""
    if task is not None:
        task.cancel()


def _settled(
    inflight: set[asyncio.Task[None]],
    broken: list[BaseException],
    refused: asyncio.Event,
    wake: asyncio.Event,
    task: asyncio.Task[None],
) -> None:
    """A batch's publish task ended: forget it, keep its failure, and wake the pump to act on it."""
    inflight.discard(task)
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        broken.append(exc)
    if exc is not None or refused.is_set():
        wake.set()


class UplinkConfigError(ValueError):
    """The uplink configuration cannot work (bad numbers, unreadable TLS files)."""


@dataclass(frozen=True, slots=True)
class TlsConfig:
    ca_file: str | None = None  # None: the system's trusted CAs
    cert_file: str | None = None  # client certificate (with key_file) for mutual TLS
    key_file: str | None = None
    key_password: str | None = None
    check_hostname: bool = True


@dataclass(frozen=True, slots=True)
class UplinkConfig:
    gateway_id: str
    host: str
    port: int = 1883
    client_id: str | None = None  # config loading fills in the gateway id; this default serves direct use
    username: str | None = None
    password: str | None = None
    tls: TlsConfig | None = None
    protocol: Protocol = Protocol.AUTO
    keepalive: int = 30
    connect_timeout: float = 10.0
    batch_max_readings: int = 1000
    batch_max_bytes: int = 256 * 1024
    window: int = 16  # unacknowledged batches at once
    ack_timeout: float = 30.0  # no PUBACK this long on a live connection: reconnect
    shutdown_timeout: float = 5.0  # on stop(), wait this long for in-flight PUBACKs
    reconnect: BackoffPolicy = field(default_factory=lambda: BackoffPolicy(initial=0.5, maximum=30.0))
    refused_backoff: BackoffPolicy = field(default_factory=lambda: BackoffPolicy(initial=1.0, maximum=60.0))
    topic_root: str = TOPIC_ROOT

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "protocol", Protocol(str(self.protocol)))
        except ValueError:
            raise UplinkConfigError(
                f"uplink: protocol must be one of {', '.join(Protocol)}, got {self.protocol!r}"
            ) from None
        checks = [
            (0 < self.port < 65536, f"port {self.port} out of range"),
            (self.keepalive >= 5, f"keepalive must be >= 5 s, got {self.keepalive}"),
            (self.batch_max_readings >= 1, "batch_max_readings must be >= 1"),
            (self.batch_max_bytes >= 1024, "batch_max_bytes must be >= 1024"),
            (1 <= self.window <= 65535, f"window must be 1..65535, got {self.window}"),
            (self.ack_timeout > 0 and self.connect_timeout > 0, "timeouts must be > 0"),
            (self.shutdown_timeout >= 0, "shutdown_timeout must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise UplinkConfigError(f"uplink: {message}")
        if self.password is not None and self.username is None:
            raise UplinkConfigError("uplink: a password needs a username")
        Topics(self.gateway_id, self.topic_root)  # validates the gateway id as a topic level


@dataclass(frozen=True, slots=True)
class InboundMessage:
    """A raw message on the command topic. ``retained`` ones are stale by definition: never run them.

    On MQTT 5 ``retained`` is also set for a message published with retain while the gateway is
    subscribed (Retain As Published); on MQTT 3.1.1 only for one the broker held when it subscribed.
    """

    topic: str
    payload: bytes
    retained: bool
    qos: int
    received_at: float
    response_topic: str | None = None
    correlation_data: bytes | None = None


CommandHook = Callable[[InboundMessage], Awaitable[None] | None]


@dataclass
class UplinkStats:
    connected: bool = False
    protocol: str | None = None
    connects: int = 0
    connect_failures: int = 0
    disconnects: int = 0
    published_batches: int = 0  # positively acknowledged
    published_readings: int = 0
    inflight_batches: int = 0  # published, PUBACK not yet received
    max_inflight_batches: int = 0  # peak use of the publish window
    failures: dict[str, int] = field(default_factory=dict)  # by reason ("not_authorized", ...)
    last_delivery: float | None = None  # gateway time of the last positive PUBACK of readings
    commands_received: int = 0
    commands_retained: int = 0
    command_errors: int = 0

    def fail(self, reason: str) -> None:
        self.failures[reason] = self.failures.get(reason, 0) + 1


class _SessionBroken(Exception):
    """The session cannot go on (no PUBACK in time, publish refused locally): reconnect."""


def _reason_key(name: str) -> str:
    return name.strip().lower().replace(" ", "_").replace("-", "_")


def _tls_context(tls: TlsConfig) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_file)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if tls.cert_file is not None:
            ctx.load_cert_chain(tls.cert_file, tls.key_file, tls.key_password)
        elif tls.key_file is not None:
            raise UplinkConfigError("uplink TLS: key_file given without cert_file")
    except (OSError, ssl.SSLError) as exc:
        raise UplinkConfigError(f"uplink TLS: cannot load certificates: {exc}") from None
    ctx.check_hostname = tls.check_hostname
    return ctx


def _wire(row: Row) -> WireReading:
    return WireReading(
        id=row.reading_id,
        row=row.row_id,
        meter=row.meter_id,
        qty=row.quantity,
        value=row.value,
        unit=row.unit,
        gt=row.gateway_time,
        q=row.quality,
        mt=row.meter_time,
        slot=row.slot,
    )


class Uplink:
    """One MQTT connection (re-established forever) carrying the outbox to the broker.

    ``run()`` until ``stop()``; ``set_meter_state`` from the health tracker; ``on_command``
    receives raw messages from the command topic (it runs inline: keep it quick).
    """

    def __init__(
        self,
        config: UplinkConfig,
        outbox: AsyncOutbox,
        *,
        on_command: CommandHook | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.outbox = outbox
        self.topics = Topics(config.gateway_id, config.topic_root)
        self.stats = UplinkStats()
        self._on_command = on_command
        self._clock = clock
        self._tls = _tls_context(config.tls) if config.tls is not None else None
        self._client_id = config.client_id or f"meter-gateway-{config.gateway_id}"
        self._protocol = Protocol.V5 if config.protocol is Protocol.AUTO else config.protocol
        self._started_at = clock()
        self._stopping = asyncio.Event()
        self._stopped = asyncio.Event()
        self._running = False
        self._client: MqttConnection | None = None
        # the publish window of the current session: readings, status and meter states share it,
        # so the broker's Receive Maximum is never exceeded
        self._window_sem = asyncio.Semaphore(1)
        # the latest state of every meter: topic and payload are built when published, not kept,
        # so a large fleet holds little per meter (_KnownStates)
        self._meter_states = _KnownStates()
        self._states_due: dict[str, None] = {}  # meters whose state this session still has to publish
        self._states_changed = asyncio.Event()
        self._refusals = Backoff(config.refused_backoff)
        self._refusing: str | None = None  # reason of the current run of negative PUBACKs
        self._connect_error: str | None = None

    # -- public ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, deliver, reconnect with jittered capped backoff; return after ``stop()``."""
        if self._running:
            raise RuntimeError("uplink is already running")
        self._running = True
        self._stopped.clear()
        backoff = Backoff(self.config.reconnect)
        try:
            while not self._stopping.is_set():
                client = await self._connect()
                if client is not None:
                    backoff.reset()
                    try:
                        await self._session(client)
                    except OutboxDamaged:  # the outbox said so once and the daemon stops for a restart
                        self.stats.fail("outbox_damaged")
                    except Exception:  # a bug must not end delivery for good: log, back off, retry
                        self.stats.fail("internal_error")
                        log.exception("event=mqtt_session_crashed reconnecting=true")
                if self._stopping.is_set():
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), backoff.next())
        finally:
            self._running = False
            self._stopped.set()

    async def stop(self) -> None:
        """Stop taking batches, wait briefly for in-flight PUBACKs, say offline, disconnect."""
        self._stopping.set()
        if self._running:
            await self._stopped.wait()

    def set_meter_state(self, meter_id: str, state: MeterStateName, since: float, detail: str | None = None) -> None:
        """Record a meter's state; published retained now if connected, and on every reconnect."""
        self.topics.meter_state(meter_id)  # a meter id that cannot be a topic level fails here, not later
        self._meter_states.set(meter_id, state, since, detail)
        if self._client is not None and self.stats.connected:
            self._states_due[meter_id] = None
            self._states_changed.set()

    @property
    def connected(self) -> bool:
        return self._client is not None and self.stats.connected

    async def publish(self, topic: str, payload: bytes, *, within: float | None = None) -> bool:
        """Publish one non-retained QoS 1 message (command acks); True once the broker gave a
        success PUBACK, False if not connected, not confirmed within ``within`` (default
        ``ack_timeout``) or refused. The caller keeps the message and retries on False."""
        client = self._client
        if client is None or not self.stats.connected:
            return False
        limit = within or self.config.ack_timeout
        try:
            await asyncio.wait_for(self._window_sem.acquire(), limit)
        except TimeoutError:
            return False
        try:
            fut = client.publish(topic, payload, properties=self._publish_properties())
            code, name = await asyncio.wait_for(fut, limit)
        except (MqttError, TimeoutError) as exc:
            log.debug("event=publish_unconfirmed topic=%s error=%s", logfmt_value(topic), logfmt_value(exc))
            return False
        finally:
            self._window_sem.release()
        if code >= 0x80:
            self.stats.fail(_reason_key(name))
            log_limited(
                log,
                logging.WARNING,
                f"broker_refused:{name}",
                "event=broker_refused topic=%s reason=%s code=0x%02x",
                logfmt_value(topic),
                logfmt_value(name),
                code,
            )
            return False
        return True

    # -- connection --------------------------------------------------------------------------

    def _make_client(self, protocol: Protocol) -> MqttConnection:
        return MqttConnection(
            self.config.host,
            self.config.port,
            identifier=self._client_id,
            mqtt5=protocol is Protocol.V5,
            username=self.config.username,
            password=self.config.password,
            will=Will(self.topics.status, encode_status(self._status("offline", reason="connection lost"))),
            keepalive=self.config.keepalive,
            timeout=self.config.connect_timeout,
            max_inflight=self.config.window,
            tls_context=self._tls,
            logger=_paho_log,
        )

    async def _connect(self) -> MqttConnection | None:
        while True:
            client = self._make_client(self._protocol)
            try:
                if not await self._wait_any(client.connect(), self._stopping):
                    client.abandon()
                    return None
            except ConnectRefused as exc:
                if (
                    self.config.protocol is Protocol.AUTO
                    and self._protocol is Protocol.V5
                    and exc.code in _UNSUPPORTED_PROTOCOL
                ):
                    log.warning("event=mqtt5_refused host=%s fallback=3.1.1", logfmt_value(self.config.host))
                    self._protocol = Protocol.V311
                    continue
                self._connect_failed(f"refused: {exc}", "connect_refused")
                return None
            except MqttError as exc:
                self._connect_failed(str(exc) or type(exc).__name__, "connect_error")
                return None
            return client

    def _connect_failed(self, text: str, key: str) -> None:
        self.stats.connect_failures += 1
        self.stats.fail(key)
        message = f"cannot connect to MQTT broker {self.config.host}:{self.config.port}: {text}"
        # one line per distinct problem, not one per retry
        if message != self._connect_error:
            log.warning("event=mqtt_connect_failed error=%s retry=backoff", logfmt_value(message))
            self._connect_error = message

    def _status(self, state: str, *, reason: str | None = None, connected_at: float | None = None) -> Status:
        return Status(
            v=CONTRACT_VERSION,
            gateway=self.config.gateway_id,
            state="online" if state == "online" else "offline",
            version=__version__,
            started_at=self._started_at,
            connected_at=connected_at,
            protocol=self._protocol.value,
            reason=reason,
        )

    async def _session(self, client: MqttConnection) -> None:
        self._connect_error = None
        self.stats.connects += 1
        self.stats.connected = True
        self.stats.protocol = self._protocol.value
        self._client = client
        log.info(
            "event=mqtt_connected host=%s port=%d mqtt=%s",
            logfmt_value(self.config.host),
            self.config.port,
            self._protocol.value,
        )
        tasks: list[asyncio.Task[None]] = []
        clean = False
        try:
            window = asyncio.Semaphore(self._window(client))
            self._window_sem = window
            await self._publish_retained(
                client,
                self.topics.status,
                encode_status(self._status("online", connected_at=self._clock())),
                "status",
            )
            await self._subscribe(client)
            self._states_due = dict.fromkeys(self._meter_states)  # all of them again, after every connect
            tasks = [
                asyncio.create_task(self._pump(client, window), name="uplink-pump"),
                asyncio.create_task(self._inbound(client), name="uplink-inbound"),
                asyncio.create_task(self._publish_states(client), name="uplink-meter-states"),
            ]
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                exc = task.exception()
                if exc is not None and not isinstance(exc, MqttError | _SessionBroken):
                    raise exc
                if exc is not None:
                    log.warning("event=mqtt_connection_lost error=%s", logfmt_value(exc))
            clean = self._stopping.is_set() and tasks[0] in done and tasks[0].exception() is None
        except (MqttError, _SessionBroken) as exc:
            log.warning("event=mqtt_session_ended error=%s", logfmt_value(exc))
        finally:
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks)
            self.stats.connected = False
            self._states_due = {}
            self.stats.inflight_batches = 0  # unacked batches of this session are resent anyway
            self._client = None
            await self._close(client, clean=clean)

    async def _close(self, client: MqttConnection, *, clean: bool) -> None:
        if clean:
            offline = encode_status(self._status("offline", reason="shutdown"))
            # a clean DISCONNECT suppresses the Will, so say "offline" ourselves
            with contextlib.suppress(MqttError, _SessionBroken, TimeoutError):
                await self._publish_retained(
                    client, self.topics.status, offline, "status", within=max(self.config.shutdown_timeout, 0.1)
                )
        else:
            self.stats.disconnects += 1
        await client.disconnect(within=2.0)

    def _window(self, client: MqttConnection) -> int:
        props = client.connack_properties
        receive_max = getattr(props, "ReceiveMaximum", None) if props is not None else None
        if isinstance(receive_max, int) and receive_max > 0:
            return min(self.config.window, receive_max)
        return self.config.window

    def _max_payload(self, client: MqttConnection) -> int:
        props = client.connack_properties
        limit = getattr(props, "MaximumPacketSize", None) if props is not None else None
        if isinstance(limit, int) and limit > 0:
            # fixed header, topic and properties take the rest of the packet
            return max(1024, min(self.config.batch_max_bytes, limit - len(self.topics.readings) - 64))
        return self.config.batch_max_bytes

    async def _subscribe(self, client: MqttConnection) -> None:
        if self._protocol is Protocol.V5:
            # Retained commands are stale by definition and never run. Retain handling 2: the
            # broker does not send the ones it holds when we subscribe. Retain As Published: one
            # published with retain while we are subscribed arrives with its retain flag (without
            # RAP the broker clears it on forwarding, MQTT 5.0 3.8.3.1), so the command service can
            # refuse it. On 3.1.1 neither exists: docs/mqtt.md "Retained commands".
            options = SubscribeOptions(
                qos=1,
                noLocal=True,
                retainAsPublished=True,
                retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND,
            )
            granted = await client.subscribe(self.topics.commands_filter, options=options)
        else:
            granted = await client.subscribe(self.topics.commands_filter, qos=1)
        codes = granted
        if any(c >= 0x80 for c in codes):
            self.stats.fail("subscribe_refused")
            log.warning(
                "event=command_subscription_refused topic=%s codes=%s",
                logfmt_value(self.topics.commands_filter),
                logfmt_value(codes),
            )

    def _publish_properties(self) -> Properties | None:
        if self._protocol is not Protocol.V5:
            return None
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.PayloadFormatIndicator = 1
        props.ContentType = "application/json"
        return props

    async def _publish_retained(
        self, client: MqttConnection, topic: str, payload: bytes, what: str, within: float | None = None
    ) -> bool:
        window = self._window_sem
        limit = within or self.config.ack_timeout
        try:
            await asyncio.wait_for(window.acquire(), limit)
        except TimeoutError:
            return False
        try:
            fut = client.publish(topic, payload, retain=True, properties=self._publish_properties())
            code, name = await asyncio.wait_for(fut, limit)
        except (MqttError, TimeoutError) as exc:
            log.debug(
                "event=publish_unconfirmed what=%s topic=%s error=%s",
                logfmt_value(what),
                logfmt_value(topic),
                logfmt_value(exc),
            )
            return False
        finally:
            window.release()
        if code >= 0x80:
            self.stats.fail(_reason_key(name))
            log_limited(
                log,
                logging.WARNING,
                f"broker_refused:{what}:{name}",
                "event=broker_refused what=%s topic=%s reason=%s code=0x%02x",
                logfmt_value(what),
                logfmt_value(topic),
                logfmt_value(name),
                code,
            )
            return False
        return True

    def _meter_state_payload(self, meter_id: str, known: _KnownState) -> bytes:
        return encode_meter_state(
            MeterState(
                v=CONTRACT_VERSION,
                gateway=self.config.gateway_id,
                meter=meter_id,
                state=known.state,
                since=known.since,
                detail=known.detail,
            )
        )

    async def _publish_states(self, client: MqttConnection) -> None:
        """Publish the states of the meters in ``_states_due`` (retained), the latest state of
        each, at most a window's worth at once: one task per meter would cost 10,000 tasks
        after a reconnect. A state not confirmed is published again after the next connect."""
        limit = asyncio.Semaphore(max(1, self._window(client)))
        pending: set[asyncio.Task[bool]] = set()
        loop = asyncio.get_running_loop()

        def published(task: asyncio.Task[bool]) -> None:
            pending.discard(task)
            limit.release()
            if not task.cancelled() and task.exception() is not None:
                log.warning("event=meter_state_publish_failed error=%s", logfmt_value(task.exception()))

        try:
            while True:
                if not self._states_due:
                    self._states_changed.clear()
                    await self._states_changed.wait()
                    continue
                due, self._states_due = self._states_due, {}  # changes from now on go to a new round
                for meter_id in due:
                    await limit.acquire()
                    state = self._meter_states.get(meter_id)
                    if state is None:
                        limit.release()
                        continue
                    topic = self.topics.meter_state(meter_id)
                    payload = self._meter_state_payload(meter_id, state)
                    task = loop.create_task(self._publish_retained(client, topic, payload, "meter state"))
                    pending.add(task)
                    task.add_done_callback(published)
                # not kept while waiting for the next change: after a connect it holds every meter
                del due
        finally:
            for task in list(pending):
                task.cancel()

    # -- readings ----------------------------------------------------------------------------

    def _batches(self, rows: Sequence[Row], max_bytes: int) -> Iterator[tuple[list[int], bytes]]:
        """Cut rows into batches by count and exact payload size; yield (row ids, payload)."""
        limit = self.config.batch_max_readings
        fixed = BATCH_OVERHEAD + len(self.config.gateway_id) + len(self.outbox.instance)
        ids: list[int] = []
        parts: list[bytes] = []
        size = fixed
        for row in rows:
            part = encode_reading(_wire(row))
            if ids and (len(ids) >= limit or size + len(part) + 1 > max_bytes):
                yield ids, self._batch_payload(ids[0], ids[-1], parts)
                ids, parts, size = [], [], fixed
            ids.append(row.row_id)
            parts.append(part)
            size += len(part) + 1
        if ids:
            yield ids, self._batch_payload(ids[0], ids[-1], parts)

    def _record_batches(self, records: Sequence[Record], max_bytes: int) -> Iterator[tuple[list[int], bytes]]:
        """Cut records into batches of whole records by count and exact payload size, splicing
        each record's stored encoding in as is; a record too big for one batch alone is cut by
        reading. Yields (row ids, payload)."""
        limit = self.config.batch_max_readings
        fixed = BATCH_OVERHEAD + len(self.config.gateway_id) + len(self.outbox.instance)
        ids: list[int] = []
        parts: list[bytes] = []
        size = fixed
        for rec in records:
            part = rec.wire
            if rec.n > limit or fixed + len(part) + 1 > max_bytes:
                if ids:
                    yield ids, self._batch_payload(ids[0], ids[-1], parts)
                    ids, parts, size = [], [], fixed
                yield from self._batches(rec.rows(), max_bytes)
                continue
            if ids and (len(ids) + rec.n > limit or size + len(part) + 1 > max_bytes):
                yield ids, self._batch_payload(ids[0], ids[-1], parts)
                ids, parts, size = [], [], fixed
            ids += rec.row_ids()
            parts.append(part)
            size += len(part) + 1
        if ids:
            yield ids, self._batch_payload(ids[0], ids[-1], parts)

    def _batch_payload(self, first_row: int, last_row: int, parts: list[bytes]) -> bytes:
        return encode_batch(
            gateway_id=self.config.gateway_id,
            outbox=self.outbox.instance,
            first_row=first_row,
            last_row=last_row,
            sent_at=self._clock(),
            encoded_readings=parts,
        )

    async def _pump(self, client: MqttConnection, window: asyncio.Semaphore) -> None:
        """Publish undelivered rows in row order, at most the window's size unacknowledged."""
        inflight: set[asyncio.Task[None]] = set()
        refused = asyncio.Event()  # a negative PUBACK: pause, then resend from the oldest row
        broken: list[BaseException] = []
        wake = asyncio.Event()  # refused or broken: stop waiting for rows or window slots
        properties = self._publish_properties()
        max_bytes = self._max_payload(client)
        # readings held at once: this chunk and the one read ahead. A backlog (a start-up burst,
        # an outage) keeps both full, and heap the process once grew it keeps; a chunk of one
        # batch drains as fast (bench outbox_drain)
        prefetch = max(self.config.batch_max_readings, 500)
        topic = self.topics.readings
        loop = asyncio.get_running_loop()
        cursor = 0
        # the next chunk is read while this one is encoded and published; it is only valid
        # if every row of this chunk went out (it starts after the chunk's last row)
        ahead: asyncio.Task[list[Record]] | None = None

        settled = functools.partial(_settled, inflight, broken, refused, wake)
        try:
            while not self._stopping.is_set():
                if broken:
                    raise broken[0]
                if refused.is_set():
                    _cancel(ahead)
                    ahead = None
                    await self._after_refusal(inflight)
                    refused.clear()
                    wake.clear()
                    cursor = 0  # resend from the oldest undelivered row
                    continue
                if ahead is not None:
                    records = await ahead
                    ahead = None
                else:
                    records = await self.outbox.peek_records(cursor, prefetch)
                if not records:
                    await self._wait_any(self.outbox.wait_for_rows(cursor), wake)
                    continue
                if sum(r.n for r in records) >= prefetch:  # more backlog: read on while this chunk goes out
                    ahead = loop.create_task(self.outbox.peek_records(records[-1].last_row, prefetch))
                for ids, payload in self._record_batches(records, max_bytes):
                    acquired = await self._wait_any(window.acquire(), wake)
                    if not acquired or self._stopping.is_set() or wake.is_set():
                        if acquired:
                            window.release()
                        _cancel(ahead)
                        ahead = None
                        break
                    fut = client.publish(topic, payload, properties=properties)
                    self.stats.inflight_batches += 1
                    self.stats.max_inflight_batches = max(self.stats.max_inflight_batches, self.stats.inflight_batches)
                    cursor = ids[-1]
                    task = loop.create_task(self._settle(fut, ids, window, refused))
                    inflight.add(task)
                    task.add_done_callback(settled)
            # stopping: let in-flight batches get their PUBACKs (and their rows acked) briefly
            if inflight:
                await asyncio.wait(set(inflight), timeout=self.config.shutdown_timeout)
        finally:
            _cancel(ahead)
            ahead = None
            for task in list(inflight):
                task.cancel()

    async def _wait_any(self, aw: Awaitable[Any], wake: asyncio.Event) -> bool:
        """Await ``aw`` unless stop or ``wake`` comes first (``aw`` is then cancelled).

        Returns whether ``aw`` completed; its exception, if it raised, propagates.
        """
        main = asyncio.ensure_future(aw)
        others = [asyncio.ensure_future(self._stopping.wait()), asyncio.ensure_future(wake.wait())]
        try:
            await asyncio.wait({main, *others}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for other in others:
                other.cancel()
            if not main.done():
                main.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await main
        if main.done() and not main.cancelled():
            main.result()
            return True
        return False

    async def _settle(
        self,
        fut: asyncio.Future[tuple[int, str]],
        ids: list[int],
        window: asyncio.Semaphore,
        refused: asyncio.Event,
    ) -> None:
        try:
            try:
                code, name = await asyncio.wait_for(fut, self.config.ack_timeout)
            except TimeoutError:
                self.stats.fail("ack_timeout")
                raise _SessionBroken(f"no PUBACK within {self.config.ack_timeout:g} s") from None
            except ConnectionLost:
                self.stats.fail("disconnected")
                return
        finally:
            window.release()
            self.stats.inflight_batches -= 1
        if code >= 0x80:
            key = _reason_key(name)
            self.stats.fail(key)
            if self._refusing != key:
                log.warning(
                    "event=batch_refused first_row=%d last_row=%d reason=%s code=0x%02x kept=true retrying=true",
                    ids[0],
                    ids[-1],
                    logfmt_value(name),
                    code,
                )
                self._refusing = key
            refused.set()
            return
        if self._refusing is not None:
            log.warning("event=broker_accepts_again was_refusing=%s", logfmt_value(self._refusing))
            self._refusing = None
            self._refusals.reset()
        self.stats.published_batches += 1
        self.stats.published_readings += len(ids)
        self.stats.last_delivery = self._clock()
        await self.outbox.ack(ids)

    async def _after_refusal(self, inflight: set[asyncio.Task[None]]) -> None:
        """Let the batches in flight settle, then wait out the refusal backoff before resending."""
        if inflight:
            await asyncio.wait(set(inflight), timeout=self.config.ack_timeout)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), self._refusals.next())

    # -- commands (inbound skeleton) ---------------------------------------------------------

    async def _inbound(self, client: MqttConnection) -> None:
        async for message in client.messages():
            props = getattr(message, "properties", None)  # paho sets it on MQTT 5 messages only
            payload = message.payload
            msg = InboundMessage(
                topic=str(message.topic),
                payload=payload if isinstance(payload, bytes) else str(payload).encode(),
                retained=bool(message.retain),
                qos=message.qos,
                received_at=self._clock(),
                response_topic=getattr(props, "ResponseTopic", None) if props is not None else None,
                correlation_data=getattr(props, "CorrelationData", None) if props is not None else None,
            )
            self.stats.commands_received += 1
            if msg.retained:
                self.stats.commands_retained += 1
            if self._on_command is None:
                continue
            try:
                result = self._on_command(msg)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                self.stats.command_errors += 1
                log.exception("event=command_hook_crashed topic=%s", logfmt_value(msg.topic))

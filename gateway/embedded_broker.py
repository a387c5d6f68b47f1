"""A small pure-Python MQTT broker for ``meter-gateway demo`` and tests, when mosquitto is not installed.

DEMO / TEST BROKER ONLY: NOT FOR PRODUCTION. It binds 127.0.0.1 only and keeps everything in
memory. It speaks MQTT 3.1.1 and 5.0 well enough for the gateway's uplink (MQTT 5 first, QoS 1,
retained status with a Last Will, a command subscription with No Local and Retain Handling 2) and
for paho clients, and is framed by the sans-I/O codec in gateway/mqtt_packets.py.

What it does: CONNECT/CONNACK (MQTT 5 CONNACK says Receive Maximum, Topic Alias Maximum 0,
Maximum QoS 1, Retain Available, Maximum Packet Size, no shared subscriptions and no subscription
identifiers); PUBLISH at QoS 0 and 1 with PUBACK (MQTT 5 reason 0x00, or 0x10 "no matching
subscribers"); SUBSCRIBE with ``+``/``#`` and the MQTT 5 options No Local, Retain As Published and
Retain Handling, granted QoS min(requested, 1); UNSUBSCRIBE; PINGREQ; DISCONNECT (MQTT 5 reason
0x04 sends the Will); retained messages (an empty payload deletes; Message Expiry is honoured);
the Last Will on any end but a normal DISCONNECT (EOF, keepalive timeout after 1.5x keepalive,
malformed packet, session takeover, slow client dropped); session takeover by client id; the
client's Receive Maximum and Maximum Packet Size on what it sends to a client.

What it does NOT do:
- QoS 2. SUBACK grants at most QoS 1; a QoS 2 PUBLISH is refused: MQTT 5 DISCONNECT 0x9B "QoS not
  supported", MQTT 3.1.1 the connection is closed (3.1.1 has no way to say it). An MQTT 5 Will
  at QoS 2 gets CONNACK 0x9B; a 3.1.1 Will at QoS 2 is published at QoS 1.
- Persistent sessions. Every session is clean: CONNACK always says Session Present 0, and an MQTT
  5 client asking for a Session Expiry Interval is told 0 in CONNACK (the spec lets the server
  override it), so nothing is queued for absent clients. A 3.1.1 client connecting with
  CleanSession 0 gets a clean session too, and Session Present 0 tells it so.
- Persistence (retained messages die with the process), authentication (user names and
  passwords are accepted and ignored; an MQTT 5 Authentication Method gets CONNACK 0x8C),
  authorization, TLS, WebSockets, shared subscriptions ($share/: SUBACK failure), topic aliases,
  subscription identifiers, Will Delay (with a session that ends at disconnect the Will goes out
  at once, as MQTT 5 §3.1.3.2.2 allows).
- Scale: a PUBLISH is matched against every subscription of every client.

A client that cannot keep up (``queue_limit`` packets waiting to be written) is dropped with one
log line instead of growing memory; a malformed packet closes only that client, with one log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from meter_gateway.gateway.mqtt_packets import (
    MQTT_5,
    Connect,
    MalformedPacket,
    PacketReader,
    PacketType,
    Prop,
    Properties,
    Publish,
    RawPacket,
    Subscribe,
    SubscriptionRequest,
    UnsupportedProtocol,
    decode_connect,
    decode_disconnect,
    decode_puback,
    decode_publish,
    decode_subscribe,
    decode_unsubscribe,
    encode_connack,
    encode_disconnect,
    encode_pingresp,
    encode_puback,
    encode_publish,
    encode_suback,
    encode_unsuback,
    topic_matches,
    valid_topic_filter,
)

__all__ = ["BrokerStats", "BrokerThread", "EmbeddedBroker"]

log = logging.getLogger(__name__)

HOST = "127.0.0.1"  # loopback only, by design: this broker has no authentication

# MQTT 5 reason codes (§2.4)
_NO_MATCHING_SUBSCRIBERS = 0x10
_NO_SUBSCRIPTION_EXISTED = 0x11
_UNSPECIFIED_ERROR = 0x80
_PROTOCOL_ERROR = 0x82
_CLIENT_ID_NOT_VALID = 0x85
_BAD_AUTH_METHOD = 0x8C
_SESSION_TAKEN_OVER = 0x8E
_TOPIC_FILTER_INVALID = 0x8F
_TOPIC_NAME_INVALID = 0x90
_TOPIC_ALIAS_INVALID = 0x94
_QOS_NOT_SUPPORTED = 0x9B
_SHARED_NOT_SUPPORTED = 0x9E
_SUB_IDS_NOT_SUPPORTED = 0xA1
_DISCONNECT_WITH_WILL = 0x04

# properties a broker must not forward as they came (§3.3.4): aliases are per connection,
# subscription identifiers are the receiver's; expiry is recomputed
_NOT_FORWARDED = (Prop.TOPIC_ALIAS, Prop.SUBSCRIPTION_IDENTIFIER, Prop.MESSAGE_EXPIRY_INTERVAL)


@dataclass
class BrokerStats:
    connections: int = 0  # CONNACKed sessions, ever
    publishes_in: int = 0
    publishes_out: int = 0
    malformed: int = 0  # clients closed for a malformed packet or a protocol error
    keepalive_timeouts: int = 0
    slow_clients_dropped: int = 0
    takeovers: int = 0
    wills_published: int = 0


@dataclass
class _Retained:
    message: Publish
    expires_at: float | None


class _Closed(Exception):
    """This connection has ended; stop handling it."""


@dataclass(eq=False)
class _Connection:
    broker: EmbeddedBroker
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    peer: str
    version: int = MQTT_5
    client_id: str = ""
    connected: bool = False  # CONNACK sent
    will: Publish | None = None
    subscriptions: dict[str, SubscriptionRequest] = field(default_factory=dict)
    max_packet_size: int | None = None  # the client's Maximum Packet Size
    keepalive_timeout: float | None = None  # 1.5 x the client's keepalive (§3.1.2.10)
    queue: asyncio.Queue[bytes | Publish] = field(init=False)
    inflight: dict[int, None] = field(default_factory=dict)  # our QoS 1 PUBLISHes awaiting PUBACK
    send_window: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(65535))
    closed: bool = False
    _next_id: int = 0
    _writer_task: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        self.queue = asyncio.Queue(self.broker.queue_limit)

    @property
    def name(self) -> str:
        return f"{self.client_id or '?'} ({self.peer})"

    # -- outgoing ------------------------------------------------------------------------------

    def send(self, item: bytes | Publish) -> None:
        if self.closed:
            return
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self.broker.stats.slow_clients_dropped += 1
            self.end(f"dropping slow client: {self.queue.qsize()} packets waiting to be written", will=True, abort=True)

    async def write_loop(self) -> None:
        try:
            while True:
                item = await self.queue.get()
                if isinstance(item, Publish):
                    data = await self._prepare(item)
                    if data is None:
                        continue
                else:
                    data = item
                self.writer.write(data)
                await self.writer.drain()
        except (ConnectionError, OSError) as exc:
            self.end(f"write failed: {exc}", will=True)

    async def _prepare(self, msg: Publish) -> bytes | None:
        if msg.qos:
            await self.send_window.acquire()  # the client's Receive Maximum
            while True:
                self._next_id = self._next_id % 0xFFFF + 1
                if self._next_id not in self.inflight:
                    break
            msg = dataclasses.replace(msg, packet_id=self._next_id)
        data = encode_publish(msg, self.version)
        if self.max_packet_size is not None and len(data) > self.max_packet_size:
            # §3.1.2.11.4: a message too large for the client is discarded, as if sent
            log.debug("embedded broker: %d-byte message on %s too large for %s", len(data), msg.topic, self.name)
            if msg.qos:
                self.send_window.release()
            return None
        if msg.packet_id is not None:
            self.inflight[msg.packet_id] = None
        self.broker.stats.publishes_out += 1
        return data

    # -- lifecycle -----------------------------------------------------------------------------

    def end(self, why: str, *, will: bool, level: int = logging.INFO, abort: bool = False) -> None:
        """Close this connection once; publish the Will unless the client said goodbye properly."""
        if self.closed:
            return
        self.closed = True
        log.log(logging.WARNING if abort else level, "embedded broker: %s: %s", self.name, why)
        if self.broker.sessions.get(self.client_id) is self:
            del self.broker.sessions[self.client_id]
        if self._writer_task is not None and self._writer_task is not asyncio.current_task():
            self._writer_task.cancel()
        if abort:
            self.writer.transport.abort()
        else:
            self.writer.close()
        if will and self.will is not None and self.connected:
            self.broker.stats.wills_published += 1
            self.broker.route(self.will, origin=None)
        self.will = None

    def refuse(self, reason: int, why: str) -> None:
        """Protocol error after CONNACK: MQTT 5 gets a DISCONNECT with the reason; 3.1.1 is just closed."""
        self.broker.stats.malformed += 1
        if self.version == MQTT_5 and self.connected and not self.closed:
            with contextlib.suppress(Exception):
                self.writer.write(encode_disconnect(reason, why[:200]))
        self.end(why, will=True, level=logging.WARNING)

    async def run(self) -> None:
        packets = PacketReader(self.broker.max_packet_size)
        self._writer_task = asyncio.create_task(self.write_loop(), name=f"mqtt-write-{self.peer}")
        timeout: float | None = self.broker.connect_timeout
        try:
            while not self.closed:
                try:
                    data = await asyncio.wait_for(self.reader.read(65536), timeout)
                except TimeoutError:
                    if self.connected:
                        self.broker.stats.keepalive_timeouts += 1
                        self.end(f"keepalive timeout (nothing for {timeout:g} s)", will=True, level=logging.WARNING)
                    else:
                        self.end("no CONNECT in time", will=False)
                    return
                except (ConnectionError, OSError) as exc:
                    self.end(f"connection lost: {exc}", will=True)
                    return
                if not data:
                    self.end("connection closed without DISCONNECT", will=True)
                    return
                try:
                    for packet in packets.feed(data):
                        self.dispatch(packet)
                        if self.closed:
                            return
                except MalformedPacket as exc:
                    self.refuse(exc.reason, f"malformed packet: {exc}")
                    return
                if self.connected:
                    timeout = self.keepalive_timeout
        finally:
            if not self.closed:
                self.end("handler ended", will=True)
            if self._writer_task is not None:
                self._writer_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._writer_task

    # -- incoming ------------------------------------------------------------------------------

    def dispatch(self, packet: RawPacket) -> None:
        ptype = packet.type
        if not self.connected:
            if ptype is not PacketType.CONNECT:
                self.refuse(_PROTOCOL_ERROR, f"first packet is {ptype.name}, not CONNECT")
                return
            self.on_connect(packet.body)
        elif ptype is PacketType.PUBLISH:
            self.on_publish(decode_publish(packet.flags, packet.body, self.version))
        elif ptype is PacketType.PUBACK:
            ack = decode_puback(packet.body, self.version)
            if ack.packet_id in self.inflight:
                del self.inflight[ack.packet_id]
                self.send_window.release()
        elif ptype is PacketType.SUBSCRIBE:
            self.on_subscribe(decode_subscribe(packet.body, self.version))
        elif ptype is PacketType.UNSUBSCRIBE:
            unsub = decode_unsubscribe(packet.body, self.version)
            codes = [0 if self.subscriptions.pop(f, None) else _NO_SUBSCRIPTION_EXISTED for f in unsub.topic_filters]
            self.send(encode_unsuback(unsub.packet_id, codes, self.version))
        elif ptype is PacketType.PINGREQ:
            self.send(encode_pingresp())
        elif ptype is PacketType.DISCONNECT:
            goodbye = decode_disconnect(packet.body, self.version)
            self.end(f"DISCONNECT (reason 0x{goodbye.reason:02x})", will=goodbye.reason == _DISCONNECT_WITH_WILL)
        else:  # a second CONNECT, anything of QoS 2, AUTH: nothing we negotiated
            self.refuse(_PROTOCOL_ERROR, f"unexpected {ptype.name}")

    def on_connect(self, body: bytes) -> None:
        try:
            connect = decode_connect(body)
        except UnsupportedProtocol as exc:
            # answer in the format the client's level understands: 3.1.1 code 1, MQTT 5 0x84
            code = exc.reason if exc.level == MQTT_5 else 0x01
            self.writer.write(encode_connack(False, code, MQTT_5 if exc.level == MQTT_5 else 4))
            self.broker.stats.malformed += 1
            self.end(f"refused: {exc}", will=False, level=logging.WARNING)
            return
        self.version = connect.version
        self.client_id = connect.client_id
        refusal = self._connect_refusal(connect)
        if refusal is not None:
            code, why = refusal
            self.writer.write(encode_connack(False, code, self.version))
            self.end(f"CONNECT refused: {why}", will=False, level=logging.WARNING)
            return
        props = Properties(
            (
                (Prop.RECEIVE_MAXIMUM, self.broker.receive_maximum),
                (Prop.TOPIC_ALIAS_MAXIMUM, 0),
                (Prop.MAXIMUM_QOS, 1),
                (Prop.RETAIN_AVAILABLE, 1),
                (Prop.MAXIMUM_PACKET_SIZE, self.broker.max_packet_size),
                (Prop.WILDCARD_SUBSCRIPTION_AVAILABLE, 1),
                (Prop.SUBSCRIPTION_IDENTIFIER_AVAILABLE, 0),
                (Prop.SHARED_SUBSCRIPTION_AVAILABLE, 0),
            )
        )
        if not self.client_id:
            self.client_id = f"embedded-{uuid.uuid4().hex[:12]}"
            props = props.with_(Prop.ASSIGNED_CLIENT_IDENTIFIER, self.client_id)
        if connect.properties.get_int(Prop.SESSION_EXPIRY_INTERVAL):
            props = props.with_(Prop.SESSION_EXPIRY_INTERVAL, 0)  # clean sessions only, and we say so
        if not connect.clean_start:
            log.info("embedded broker: %s asked to resume a session; sessions are not kept here", self.name)
        receive_max = connect.properties.get_int(Prop.RECEIVE_MAXIMUM)
        self.send_window = asyncio.Semaphore(receive_max or 65535)
        self.max_packet_size = connect.properties.get_int(Prop.MAXIMUM_PACKET_SIZE)
        will = connect.will
        if will is not None:
            will = dataclasses.replace(
                will, qos=min(will.qos, 1), properties=will.properties.without(Prop.WILL_DELAY_INTERVAL)
            )
        self.will = will
        self.keepalive_timeout = connect.keepalive * 1.5 if connect.keepalive else None
        previous = self.broker.sessions.get(self.client_id)
        if previous is not None:
            self.broker.stats.takeovers += 1
            if previous.version == MQTT_5:
                with contextlib.suppress(Exception):
                    previous.writer.write(encode_disconnect(_SESSION_TAKEN_OVER))
            previous.end(f"session taken over by {self.peer}", will=True)
        self.broker.sessions[self.client_id] = self
        self.connected = True
        self.broker.stats.connections += 1
        self.send(encode_connack(False, 0, self.version, props))
        log.info("embedded broker: %s connected (MQTT %s)", self.name, "5" if self.version == MQTT_5 else "3.1.1")

    def _connect_refusal(self, connect: Connect) -> tuple[int, str] | None:
        v5 = connect.version == MQTT_5
        if not connect.client_id and not connect.clean_start and not v5:
            return 0x02, "empty client id needs CleanSession 1"  # 3.1.1 §3.1.3.1
        if v5 and Prop.AUTHENTICATION_METHOD in connect.properties:
            return _BAD_AUTH_METHOD, "enhanced authentication is not supported"
        if v5 and connect.properties.get_int(Prop.RECEIVE_MAXIMUM) == 0:
            return _PROTOCOL_ERROR, "Receive Maximum 0"
        if v5 and connect.properties.get_int(Prop.MAXIMUM_PACKET_SIZE) == 0:
            return _PROTOCOL_ERROR, "Maximum Packet Size 0"
        if v5 and connect.will is not None and connect.will.qos > 1:
            return _QOS_NOT_SUPPORTED, "Will QoS 2 (this broker's Maximum QoS is 1)"
        if v5 and len(connect.client_id) > 0xFFFF:
            return _CLIENT_ID_NOT_VALID, "client id too long"
        return None

    def on_publish(self, msg: Publish) -> None:
        if msg.qos == 2:
            self.refuse(_QOS_NOT_SUPPORTED, f"QoS 2 PUBLISH on {msg.topic}: this broker's Maximum QoS is 1")
            return
        if Prop.TOPIC_ALIAS in msg.properties:
            self.refuse(_TOPIC_ALIAS_INVALID, "topic alias used, Topic Alias Maximum is 0")
            return
        if not msg.topic:
            self.refuse(_TOPIC_NAME_INVALID, "PUBLISH with an empty topic")
            return
        self.broker.stats.publishes_in += 1
        matched = self.broker.route(msg, origin=self)
        if msg.qos == 1 and msg.packet_id is not None:
            self.send(encode_puback(msg.packet_id, 0 if matched else _NO_MATCHING_SUBSCRIBERS, self.version))

    def on_subscribe(self, sub: Subscribe) -> None:
        if Prop.SUBSCRIPTION_IDENTIFIER in sub.properties:
            self.refuse(_SUB_IDS_NOT_SUPPORTED, "subscription identifiers are not supported")
            return
        v5 = self.version == MQTT_5
        codes: list[int] = []
        retained: list[Publish] = []
        for req in sub.requests:
            if not valid_topic_filter(req.topic_filter):
                codes.append(_TOPIC_FILTER_INVALID if v5 else _UNSPECIFIED_ERROR)
                continue
            if req.topic_filter.startswith("$share/"):
                codes.append(_SHARED_NOT_SUPPORTED if v5 else _UNSPECIFIED_ERROR)
                continue
            granted = dataclasses.replace(req, qos=min(req.qos, 1))
            existed = req.topic_filter in self.subscriptions
            self.subscriptions[req.topic_filter] = granted
            codes.append(granted.qos)
            if req.retain_handling == 0 or (req.retain_handling == 1 and not existed):
                retained += self.broker.retained_for(granted)
        self.send(encode_suback(sub.packet_id, codes, self.version))
        for msg in retained:
            self.send(msg)


class EmbeddedBroker:
    """The asyncio server: ``async with EmbeddedBroker() as broker: broker.port``.

    Runs on the caller's event loop; callers that block (paho's threaded clients waiting on
    events, a sync ``with``) want ``BrokerThread`` instead.
    """

    def __init__(
        self,
        port: int = 0,
        *,
        queue_limit: int = 1000,
        max_packet_size: int = 1024 * 1024,
        receive_maximum: int = 64,
        connect_timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 1 <= receive_maximum <= 65535:
            raise ValueError("receive_maximum must be 1..65535")
        self.host = HOST
        self._requested_port = port
        self.port = port
        self.queue_limit = queue_limit
        self.max_packet_size = max_packet_size
        self.receive_maximum = receive_maximum
        self.connect_timeout = connect_timeout
        self.stats = BrokerStats()
        self.sessions: dict[str, _Connection] = {}
        self._retained: dict[str, _Retained] = {}
        self._clock = clock
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        self._connections: set[_Connection] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, self._requested_port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("embedded MQTT broker (demo/test only) listening on %s:%d", self.host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for conn in list(self._connections):
            conn.end("broker stopping", will=False, level=logging.DEBUG)
        if self._handlers:
            await asyncio.wait(set(self._handlers), timeout=2.0)

    async def __aenter__(self) -> EmbeddedBroker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peername = writer.get_extra_info("peername")
        peer = f"{peername[0]}:{peername[1]}" if peername else "?"
        conn = _Connection(self, reader, writer, peer)
        self._connections.add(conn)
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            await conn.run()
        except MalformedPacket as exc:  # raised by a decoder inside dispatch
            conn.refuse(exc.reason, f"malformed packet: {exc}")
        except Exception:  # one client's bug must not stop the broker
            log.exception("embedded broker: %s: handler failed", conn.name)
            conn.end("handler failed", will=True)
        finally:
            self._connections.discard(conn)
            if task is not None:
                self._handlers.discard(task)

    # -- routing -----------------------------------------------------------------------------

    def route(self, msg: Publish, origin: _Connection | None) -> int:
        """Store/delete a retained message and hand ``msg`` to every matching client; returns how many."""
        now = self._clock()
        expiry = msg.properties.get_int(Prop.MESSAGE_EXPIRY_INTERVAL)
        if msg.retain:
            if msg.payload:
                deadline = now + expiry if expiry is not None else None
                self._retained[msg.topic] = _Retained(msg, deadline)
            else:
                self._retained.pop(msg.topic, None)
        props = msg.properties.without(*_NOT_FORWARDED)
        if expiry is not None:
            props = props.with_(Prop.MESSAGE_EXPIRY_INTERVAL, expiry)
        matched = 0
        for conn in list(self.sessions.values()):
            best: SubscriptionRequest | None = None
            for sub in conn.subscriptions.values():
                if sub.no_local and conn is origin:
                    continue
                if topic_matches(sub.topic_filter, msg.topic) and (best is None or sub.qos > best.qos):
                    best = sub
            if best is None:
                continue
            matched += 1
            retain = msg.retain and best.retain_as_published  # §3.3.1.3; 3.1.1 always clears it
            conn.send(Publish(msg.topic, msg.payload, min(msg.qos, best.qos), retain, properties=props))
        return matched

    def retained_for(self, sub: SubscriptionRequest) -> list[Publish]:
        now = self._clock()
        out = []
        for topic, stored in list(self._retained.items()):
            if stored.expires_at is not None and stored.expires_at <= now:
                del self._retained[topic]
                continue
            if not topic_matches(sub.topic_filter, topic):
                continue
            msg = stored.message
            props = msg.properties.without(*_NOT_FORWARDED)
            if stored.expires_at is not None:
                props = props.with_(Prop.MESSAGE_EXPIRY_INTERVAL, max(1, int(stored.expires_at - now)))
            out.append(Publish(topic, msg.payload, min(msg.qos, sub.qos), True, properties=props))
        return out

    @property
    def retained_topics(self) -> list[str]:
        return sorted(self._retained)


class BrokerThread:
    """An ``EmbeddedBroker`` on its own event loop in a daemon thread, for synchronous callers.

    ``with BrokerThread() as broker: broker.host, broker.port``.
    """

    def __init__(self, port: int = 0, **options: Any) -> None:
        self.host = HOST
        self.port = port
        self._options = options
        self._broker: EmbeddedBroker | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop: asyncio.Event | None = None

    @property
    def broker(self) -> EmbeddedBroker:
        if self._broker is None:
            raise RuntimeError("the broker is not running")
        return self._broker

    def start(self, timeout: float = 5.0) -> BrokerThread:
        self._thread = threading.Thread(target=self._main, name="embedded-mqtt-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"embedded broker did not start within {timeout:g} s")
        if self._error is not None:
            raise RuntimeError(f"embedded broker did not start: {self._error}") from self._error
        return self

    def _main(self) -> None:
        async def serve() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            broker = EmbeddedBroker(self.port, **self._options)
            try:
                await broker.start()
            except OSError as exc:
                self._error = exc
                self._ready.set()
                return
            self._broker = broker
            self.port = broker.port
            self._ready.set()
            try:
                await self._stop.wait()
            finally:
                await broker.stop()

        asyncio.run(serve())

    def stop(self, timeout: float = 5.0) -> None:
        loop, stop, thread = self._loop, self._stop, self._thread
        if loop is not None and stop is not None and thread is not None and thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop closed already
                loop.call_soon_threadsafe(stop.set)
            thread.join(timeout)

    def call(self, fn: Callable[[EmbeddedBroker], Any], timeout: float = 5.0) -> Any:
        """Run ``fn(broker)`` on the broker's loop and return its result (for tests that inspect it)."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("the broker is not running")

        async def run() -> Any:
            return fn(self.broker)

        return asyncio.run_coroutine_threadsafe(run(), loop).result(timeout)

    def __enter__(self) -> BrokerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

"""One MQTT connection on the asyncio loop: paho-mqtt's public client API, driven by our loop.

aiomqtt 2.5's public API resolves ``publish()`` on any PUBACK without its reason code and keeps
the CONNACK properties (Receive Maximum, Maximum Packet Size) to itself; both are only reachable
through its private paho client and callbacks. Delivery here is acked in the outbox only after a
*successful* PUBACK, so the uplink drives paho directly through paho's documented external event
loop support (``on_socket_open`` / ``on_socket_close`` / ``on_socket_register_write`` /
``on_socket_unregister_write`` with ``loop_read`` / ``loop_write`` / ``loop_misc``; see paho's
client documentation and its ``examples/loop_asyncio.py``), and reads every outcome from paho's
public callbacks (``on_connect``, ``on_publish``, ``on_subscribe``, ``on_message``,
``on_disconnect``), which carry the MQTT 5 reason codes and properties.

Nothing here retries or reconnects: a :class:`MqttConnection` is one connection attempt and, if it
succeeds, one session; the uplink makes a new one after every loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

__all__ = ["ConnectRefused", "ConnectionLost", "MqttConnection", "MqttError", "Will"]


class MqttError(Exception):
    """The connection cannot be made or has ended."""


class ConnectRefused(MqttError):
    """The broker answered CONNECT with a failure; ``code`` is its return / reason code."""

    def __init__(self, code: int, name: str) -> None:
        super().__init__(f"{name} ({code:#04x})")
        self.code = code


class ConnectionLost(MqttError):
    """The connection ended while something waited on it (a PUBACK, a SUBACK, a message)."""


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


_PAHO_LEVELS: dict[int, int] = {
    paho.MQTT_LOG_DEBUG: logging.DEBUG,
    paho.MQTT_LOG_INFO: logging.INFO,
    paho.MQTT_LOG_NOTICE: logging.INFO,
    paho.MQTT_LOG_WARNING: logging.WARNING,
    paho.MQTT_LOG_ERR: logging.ERROR,
}
# paho says ERR when the socket fails or times out: a lost connection (a broker restart, a frozen
# broker), which the uplink reports itself with what it does about it. ERROR stays for the rest
# (an exception raised in one of our callbacks is a bug).
_CONNECTION_TROUBLE = ("failed to receive on socket", "timeout on socket")


def _code(reason: ReasonCode | int) -> tuple[int, str]:
    if isinstance(reason, ReasonCode):
        return int(reason.value), reason.getName()
    return int(reason), paho.error_string(reason)


class MqttConnection:
    """A paho client whose socket the running asyncio loop serves."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        identifier: str,
        mqtt5: bool,
        username: str | None = None,
        password: str | None = None,
        will: Will | None = None,
        keepalive: int = 60,
        timeout: float = 10.0,
        max_inflight: int = 20,
        tls_context: ssl.SSLContext | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self.host, self.port, self.keepalive, self.timeout = host, port, keepalive, timeout
        self.mqtt5 = mqtt5
        self.connack_properties: Properties | None = None
        self._loop = asyncio.get_running_loop()
        self._connack: asyncio.Future[None] = self._loop.create_future()
        self._closed: asyncio.Future[None] = self._loop.create_future()
        self._acks: dict[int, asyncio.Future[tuple[int, str]]] = {}
        self._subacks: dict[int, asyncio.Future[list[int]]] = {}
        self._messages: asyncio.Queue[paho.MQTTMessage] = asyncio.Queue()
        self._misc: asyncio.Task[None] | None = None
        self._fd: int | None = None
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=identifier,
            protocol=paho.MQTTv5 if mqtt5 else paho.MQTTv311,
            reconnect_on_failure=False,
        )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write
        client.max_inflight_messages_set(max_inflight)
        self._logger = logger
        if logger is not None:
            client.on_log = self._on_log
        if username is not None:
            client.username_pw_set(username, password)
        if tls_context is not None:
            client.tls_set_context(tls_context)
        if will is not None:
            client.will_set(will.topic, will.payload, will.qos, will.retain)
        self._client = client

    # -- lifecycle ------------------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect and wait for a positive CONNACK; raises ConnectRefused or MqttError."""
        try:
            # paho's connect() resolves the name and opens the socket, blocking: off the loop
            await self._loop.run_in_executor(None, self._client.connect, self.host, self.port, self.keepalive)
        except (OSError, ValueError) as exc:
            self.abandon()
            raise MqttError(str(exc) or type(exc).__name__) from None
        try:
            async with asyncio.timeout(self.timeout):
                await asyncio.shield(self._connack)
        except TimeoutError:
            self.abandon()
            raise MqttError(f"no CONNACK within {self.timeout:g} s") from None
        except MqttError:
            self.abandon()
            raise

    async def disconnect(self, within: float) -> None:
        """Send DISCONNECT (which suppresses the Will) and wait for the socket to close."""
        if self._closed.done():
            return
        self._client.disconnect()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await asyncio.shield(self._closed)
        self.abandon()

    def abandon(self) -> None:
        """Drop the connection without a DISCONNECT (the broker then sends the Will)."""
        sock = self._client.socket()
        if sock is not None:
            self._on_socket_close(self._client, None, sock)
            with contextlib.suppress(OSError):
                sock.close()
        self._lost("connection abandoned")

    @property
    def closed(self) -> bool:
        return self._closed.done()

    # -- operations -----------------------------------------------------------------------------

    def publish(
        self, topic: str, payload: bytes, *, retain: bool = False, properties: Properties | None = None
    ) -> asyncio.Future[tuple[int, str]]:
        """Publish at QoS 1; the future gives the PUBACK's (reason code, name), >= 0x80 a refusal,
        or raises ConnectionLost. Raises MqttError at once if paho cannot queue the message."""
        info = self._client.publish(topic, payload, qos=1, retain=retain, properties=properties)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise MqttError(f"publish refused by the client: {paho.error_string(info.rc)}")
        fut: asyncio.Future[tuple[int, str]] = self._loop.create_future()
        self._acks[info.mid] = fut  # paho reports the PUBACK from loop_read, on this loop, later
        return fut

    async def subscribe(self, topic: str, *, qos: int = 1, options: SubscribeOptions | None = None) -> list[int]:
        """Subscribe and return the SUBACK's reason codes (granted QoS, or >= 0x80 refused)."""
        if options is not None:
            rc, mid = self._client.subscribe(topic, options=options)
        else:
            rc, mid = self._client.subscribe(topic, qos=qos)
        if rc != paho.MQTT_ERR_SUCCESS or mid is None:
            raise MqttError(f"subscribe refused by the client: {paho.error_string(rc)}")
        fut: asyncio.Future[list[int]] = self._loop.create_future()
        self._subacks[mid] = fut
        try:
            async with asyncio.timeout(self.timeout):
                return await fut
        except TimeoutError:
            # a broker that stopped answering (frozen) on a connection that still looks open: the
            # caller treats it as the lost connection it is, not as a bug
            raise MqttError(f"no SUBACK within {self.timeout:g} s") from None

    async def messages(self) -> AsyncIterator[paho.MQTTMessage]:
        """Messages as they arrive; raises ConnectionLost when the connection ends."""
        while True:
            if self._messages.empty() and self._closed.done():
                raise ConnectionLost("connection lost")
            getter = asyncio.ensure_future(self._messages.get())
            waits: set[asyncio.Future[Any]] = {getter, self._closed}
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not getter.done():
                    getter.cancel()
            if getter.done() and not getter.cancelled():
                yield getter.result()

    # -- paho callbacks (run on the loop: paho is only ever called from here) ------------------

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Properties | None
    ) -> None:
        self.connack_properties = properties
        if self._connack.done():
            return
        if reason.is_failure:
            code, name = _code(reason)
            self._connack.set_exception(ConnectRefused(code, name))
        else:
            self._connack.set_result(None)

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Properties | None
    ) -> None:
        self._lost(f"disconnected: {reason}")

    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode, properties: Properties | None
    ) -> None:
        fut = self._acks.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(_code(reason))

    def _on_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, reasons: list[ReasonCode], properties: Properties | None
    ) -> None:
        fut = self._subacks.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result([_code(r)[0] for r in reasons])

    def _on_log(self, client: paho.Client, userdata: Any, level: int, buf: str) -> None:
        if self._logger is None:
            return
        std = _PAHO_LEVELS.get(level, logging.WARNING)
        if std >= logging.ERROR and buf.startswith(_CONNECTION_TROUBLE):
            std = logging.WARNING
        self._logger.log(std, "%s", buf)

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        self._messages.put_nowait(message)

    def _lost(self, why: str) -> None:
        if not self._connack.done():
            # closed before any CONNACK (e.g. a TLS 1.3 "certificate required" alert): fail the
            # attempt now rather than after the whole connect timeout
            self._connack.set_exception(MqttError(f"connection closed before CONNACK ({why})"))
            self._connack.exception()  # retrieved here if nobody awaits it any more
        if not self._closed.done():
            self._closed.set_result(None)
        waiting: list[asyncio.Future[Any]] = [*self._acks.values(), *self._subacks.values()]
        self._acks, self._subacks = {}, {}
        for fut in waiting:
            if not fut.done():
                fut.set_exception(ConnectionLost(f"connection lost before the broker answered ({why})"))
                fut.exception()  # a publish nobody waits for any more must not log "never retrieved"

    # -- socket plumbing (paho's external event loop interface) --------------------------------

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # paho calls this from the executor thread that runs connect()
        self._loop.call_soon_threadsafe(self._watch, sock)

    def _watch(self, sock: Any) -> None:
        if self._closed.done():
            return
        self._fd = sock.fileno()
        self._loop.add_reader(self._fd, self._readable, sock)
        self._misc = self._loop.create_task(self._housekeeping(), name="mqtt-misc")

    def _readable(self, sock: Any) -> None:
        try:
            while True:
                self._client.loop_read()
                # an SSL socket may hold decrypted bytes the selector will not report again
                if not (isinstance(sock, ssl.SSLSocket) and sock.pending() > 0):
                    break
        except Exception as exc:  # paho's loop_read raises on a broken socket
            self._lost(f"read failed: {exc}")

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        fd, self._fd = self._fd, None
        if fd is not None and fd >= 0:
            self._loop.remove_reader(fd)
            self._loop.remove_writer(fd)
        if self._misc is not None:
            self._misc.cancel()
            self._misc = None

    def _on_socket_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._loop.call_soon_threadsafe(self._want_write, sock)

    def _want_write(self, sock: Any) -> None:
        if self._closed.done() or sock.fileno() < 0:
            return
        self._loop.add_writer(sock.fileno(), self._writable)

    def _writable(self) -> None:
        try:
            self._client.loop_write()
        except Exception as exc:  # as in _readable
            self._lost(f"write failed: {exc}")

    def _on_socket_unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # after a register from the connect() thread, so in the same queue to keep the order
        self._loop.call_soon_threadsafe(self._no_write, sock)

    def _no_write(self, sock: Any) -> None:
        if sock.fileno() >= 0:
            self._loop.remove_writer(sock.fileno())

    async def _housekeeping(self) -> None:
        # keepalive PINGREQs and their timeouts: paho wants a tick, there is no event to wait for
        while self._client.loop_misc() == paho.MQTT_ERR_SUCCESS:  # noqa: ASYNC110
            await asyncio.sleep(1.0)

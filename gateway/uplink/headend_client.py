"""The head-end side of the MQTT contract, for the demo viewer (and reference integrators).

This is a *consumer* of the gateway's topics, not part of the gateway's own uplink, so it uses
paho's threaded client directly and hands decoded readings to a callback.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from meter_gateway.gateway.uplink.contract import ReadingsBatch, Topics, decode_batch, decode_meter_state


class ReadingsWatcher:
    """Subscribes to one gateway's readings and meter states; calls back from paho's thread."""

    def __init__(
        self,
        host: str,
        port: int,
        topics: Topics,
        on_batch: Callable[[ReadingsBatch], None],
        on_state: Callable[[str, str], None] | None = None,
    ) -> None:
        self.topics = topics
        self._on_batch = on_batch
        self._on_state = on_state
        self._ready = threading.Event()
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"headend-viewer-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self._client.on_connect = self._connected
        self._client.on_message = self._message
        self._client.on_subscribe = lambda *args: self._ready.set()
        self._client.connect(host, port)

    def _connected(self, client: mqtt.Client, *args: object) -> None:
        client.subscribe([(self.topics.readings, 1), (f"{self.topics.base}/meters/+/state", 1)])

    def _message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == self.topics.readings:
            self._on_batch(decode_batch(bytes(msg.payload)))
        elif self._on_state is not None and msg.topic.endswith("/state"):
            state = decode_meter_state(bytes(msg.payload))
            self._on_state(msg.topic.split("/")[-2], state.state)

    def start(self, timeout: float = 5.0) -> ReadingsWatcher:
        self._client.loop_start()
        if not self._ready.wait(timeout):
            raise TimeoutError("could not subscribe to the broker")
        return self

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

"""The demo's local broker: a real mosquitto on a free loopback port, or one clear line without it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from meter_gateway.gateway.cli.local_broker import ENV_MOSQUITTO, BrokerUnavailable, LocalBroker, find_mosquitto

ROOT = Path(__file__).resolve().parents[1]


def test_local_broker_runs_mosquitto_and_carries_a_message_then_stops() -> None:
    got: list[tuple[str, bytes]] = []
    subscribed = threading.Event()
    arrived = threading.Event()
    with LocalBroker() as broker:
        assert (broker.kind, broker.host) == ("mosquitto", "127.0.0.1")
        assert broker.description == f"mosquitto ({broker.binary})"
        pid = broker.pid
        assert pid is not None
        client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        client.on_connect = lambda c, *_: c.subscribe("demo/#", qos=1)
        client.on_subscribe = lambda *_: subscribed.set()

        def on_message(c: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
            got.append((msg.topic, bytes(msg.payload)))
            arrived.set()

        client.on_message = on_message
        client.connect(broker.host, broker.port)
        client.loop_start()
        try:
            assert subscribed.wait(5), "no SUBACK from mosquitto"
            client.publish("demo/x", b"reading", qos=1).wait_for_publish(5)
            assert arrived.wait(5), "message did not come back"
        finally:
            client.disconnect()
            client.loop_stop()
        port = broker.port
    assert got == [("demo/x", b"reading")]
    assert broker.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped, not left running
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass


def test_the_override_names_the_binary_to_run() -> None:
    real = find_mosquitto()
    assert find_mosquitto({ENV_MOSQUITTO: real}) == real


def test_no_mosquitto_is_one_line_saying_how_to_install_it() -> None:
    with pytest.raises(BrokerUnavailable) as err:
        find_mosquitto({}, candidates=("no-such-mosquitto", "/nonexistent/sbin/mosquitto"))
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith("no MQTT broker: mosquitto is not installed")
    assert "apt-get install mosquitto" in text


def test_an_override_that_is_not_a_binary_is_named_in_the_error(tmp_path: Path) -> None:
    not_executable = tmp_path / "mosquitto"
    not_executable.write_text("#!/bin/sh\n")
    for bad in ("/nonexistent/mosquitto", str(not_executable)):
        with pytest.raises(BrokerUnavailable, match=f"{ENV_MOSQUITTO}='{bad}' is not an executable mosquitto"):
            find_mosquitto({ENV_MOSQUITTO: bad})


def test_mosquitto_that_cannot_start_says_why_in_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        broker = LocalBroker(port=taken.getsockname()[1])
        with pytest.raises(BrokerUnavailable) as err, broker:
            pass
    assert "\n" not in str(err.value)
    assert str(err.value).startswith(f"mosquitto ({broker.binary}) exited at start: ")
    assert broker.pid is None


def test_demo_without_a_broker_exits_69_with_one_line() -> None:
    env = {**os.environ, ENV_MOSQUITTO: "/nonexistent/mosquitto"}
    proc = subprocess.run(
        [sys.executable, "-m", "meter_gateway.gateway.cli", "demo", "--duration", "5"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 69, proc.stderr[-2000:]
    assert proc.stderr.splitlines() == [
        f"demo: {ENV_MOSQUITTO}='/nonexistent/mosquitto' is not an executable mosquitto; install it "
        f"(Debian/Ubuntu: apt-get install mosquitto) or set {ENV_MOSQUITTO} to its path"
    ]
    assert "reached the broker" not in proc.stdout

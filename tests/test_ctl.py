"""`meter-gateway ctl` against a real mosquitto: keygen, signed publish, following acks."""

from __future__ import annotations

import json
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from meter_gateway.gateway.cli import ctl_cmd
from meter_gateway.gateway.commands.auth import KeyRing, authenticate
from meter_gateway.gateway.commands.envelope import Ack, AckState, CommandEnvelope, decode_envelope, encode_ack
from meter_gateway.gateway.config import load_config
from meter_gateway.gateway.uplink.contract import Topics
from tests.plugins.broker import Broker, Subscriber

GW = "gw-ctl"
METERS = ["000012345678", "000012345679"]


@pytest.fixture
def keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, KeyRing]:
    """``ctl keygen`` for an operator and a supervisor; the gateway config built from its snippets."""
    snippets = []
    for key_id, role in (("ops", "command"), ("sup", "release")):
        assert ctl_cmd.main(["keygen", "--key-id", key_id, "--out", str(tmp_path / "keys"), "--role", role]) == 0
        out = capsys.readouterr().out
        snippets.append(out[out.index("[[commands.keys]]") :])
    config = tmp_path / "gw.toml"
    config.write_text(
        f'[gateway]\nid = "{GW}"\nstate_dir = "st"\n[uplink]\nhost = "127.0.0.1"\n'
        "[commands]\nenabled = true\n\n" + "\n".join(snippets)
    )
    loaded = load_config(config, environ={})
    return tmp_path / "keys", KeyRing.from_config(loaded.commands.keys)


def _args(broker: Broker, key_dir: Path, key_id: str = "ops") -> list[str]:
    return [
        "--gateway",
        GW,
        "--key",
        str(key_dir / f"{key_id}.key"),
        "--key-id",
        key_id,
        "--broker",
        f"{broker.host}:{broker.port}",
    ]


def _accept(payload: bytes, ring: KeyRing, retained: bool = False) -> CommandEnvelope:
    return authenticate(payload, retained=retained, gateway_id=GW, keyring=ring, now=time.time(), max_validity=86400)


def test_keygen_writes_keys_and_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "k"
    assert ctl_cmd.main(["keygen", "--key-id", "op-1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert 'id = "op-1"' in text
    assert 'roles = ["command"]' in text
    assert f'public_key_file = "{(out / "op-1.pub").resolve()}"' in text
    assert stat.S_IMODE((out / "op-1.key").stat().st_mode) == 0o600
    assert (out / "op-1.key").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert (out / "op-1.pub").read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    before = (out / "op-1.key").read_bytes()
    assert ctl_cmd.main(["keygen", "--key-id", "op-1", "--out", str(out)]) == 2
    assert "not overwriting" in capsys.readouterr().err
    assert (out / "op-1.key").read_bytes() == before


def test_published_command_is_accepted_by_the_gateway_side(
    mosquitto: Broker, keys: tuple[Path, KeyRing], capsys: pytest.CaptureFixture[str]
) -> None:
    key_dir, ring = keys
    topics = Topics(GW)
    sub = Subscriber(mosquitto, [topics.commands_filter]).start()
    try:
        argv = ["disconnect", *METERS, *_args(mosquitto, key_dir), "--id", "cmd-t1", "--seq", "42", "--expires", "60"]
        assert ctl_cmd.main(argv) == 0
        assert "sent disconnect cmd-t1 to 2 meter(s)" in capsys.readouterr().out
        deadline = time.monotonic() + 5
        while not sub.snapshot() and time.monotonic() < deadline:
            time.sleep(0.01)
        (msg,) = sub.snapshot()
    finally:
        sub.stop()
    assert (msg.topic, msg.qos, msg.retain) == (topics.commands, 1, False)
    env = _accept(msg.payload, ring)
    assert (env.id, env.action, env.meters, env.seq, env.key_id, env.alg) == (
        "cmd-t1",
        "disconnect",
        METERS,
        42,
        "ops",
        "ed25519",
    )
    assert env.expires_at - env.issued_at == pytest.approx(60)
    assert env.not_before < env.issued_at  # tolerance for a gateway clock a little behind


def test_status_release_and_default_seq(
    mosquitto: Broker, keys: tuple[Path, KeyRing], capsys: pytest.CaptureFixture[str]
) -> None:
    key_dir, ring = keys
    sub = Subscriber(mosquitto, [Topics(GW).commands]).start()
    try:
        before = int(time.time() * 1000)
        assert ctl_cmd.main(["status", METERS[0], *_args(mosquitto, key_dir)]) == 0
        assert ctl_cmd.main(["reconnect", METERS[0], *_args(mosquitto, key_dir), "--mode", "direct_close"]) == 0
        assert ctl_cmd.main(["release", "cmd-held-1", "cmd-held-2", *_args(mosquitto, key_dir, "sup")]) == 0
        # a release signed with the operator key leaves ctl fine but is refused by the gateway
        assert ctl_cmd.main(["release", "cmd-held-1", *_args(mosquitto, key_dir, "ops")]) == 0
        deadline = time.monotonic() + 5
        while len(sub.snapshot()) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        status, reconnect, release, bad_release = (m.payload for m in sub.snapshot())
    finally:
        sub.stop()
    capsys.readouterr()
    s = _accept(status, ring)
    assert s.action == "relay_status"
    assert before <= s.seq <= int(time.time() * 1000)
    r = _accept(reconnect, ring)
    assert (r.action, r.reconnect_mode) == ("reconnect", "direct_close")
    assert r.seq > s.seq or r.seq == s.seq  # time-based; same millisecond is possible
    rel = _accept(release, ring)
    assert (rel.action, rel.meters, rel.released_commands) == ("release", [], ["cmd-held-1", "cmd-held-2"])
    with pytest.raises(Exception, match="key_not_allowed"):
        _accept(bad_release, ring)


class FakeGateway:
    """Answers each command on the broker with the acks ``script(env)`` returns (head-end view)."""

    def __init__(self, broker: Broker, ring: KeyRing, script: Callable[[CommandEnvelope], list[bytes]]) -> None:
        self.topics = Topics(GW)
        self.ring = ring
        self.script = script
        self.commands: list[CommandEnvelope] = []
        self._ready = threading.Event()
        self.c = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"fake-gw-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self.c.on_connect = lambda client, *a: client.subscribe(self.topics.commands, qos=1)
        self.c.on_subscribe = lambda *a: self._ready.set()
        self.c.on_message = self._message
        self.c.connect(broker.host, broker.port)
        self.c.loop_start()
        assert self._ready.wait(5), "fake gateway could not subscribe"

    def _message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        env = _accept(bytes(msg.payload), self.ring, retained=bool(msg.retain))
        self.commands.append(env)
        for payload in self.script(env):
            client.publish(self.topics.acks, payload, qos=1)

    def stop(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def ack(env: CommandEnvelope, seq: int, state: AckState, meter: str | None = None, **kw: str) -> bytes:
    """An ack as the gateway would publish it (``kw``: relay, reason, detail)."""
    doc = {"gateway": GW, "command": env.id, "meter": meter, "state": state, "at": 1_700_000_000.0 + seq, "seq": seq}
    return encode_ack(msgspec.convert({**doc, **kw}, Ack))


@pytest.fixture
def fake_gateway(mosquitto: Broker, keys: tuple[Path, KeyRing]) -> Iterator[Callable[..., FakeGateway]]:
    made: list[FakeGateway] = []

    def make(script: Callable[[CommandEnvelope], list[bytes]]) -> FakeGateway:
        made.append(FakeGateway(mosquitto, keys[1], script))
        return made[-1]

    yield make
    for g in made:
        g.stop()


def test_wait_prints_each_transition_and_exits_0_when_all_verified(
    mosquitto: Broker,
    keys: tuple[Path, KeyRing],
    fake_gateway: Callable[..., FakeGateway],
    capsys: pytest.CaptureFixture[str],
) -> None:
    def script(env: CommandEnvelope) -> list[bytes]:
        a, b = env.meters
        other = CommandEnvelope(**{**{f: getattr(env, f) for f in env.__struct_fields__}, "id": "someone-else"})
        return [
            ack(env, 1, "received"),
            ack(env, 2, "accepted"),
            ack(other, 3, "verified", a),  # another command's ack: ignored
            b"not an ack",  # garbage on the topic: reported, ignored
            ack(env, 3, "sent", a),
            ack(env, 3, "sent", a),  # QoS 1 duplicate: printed once
            ack(env, 4, "no_answer", b, detail="attempt 1"),
            ack(env, 5, "verified", a, relay="open"),
            ack(env, 6, "verified", b, relay="open", detail="after retry"),
        ]

    gw = fake_gateway(script)
    argv = ["disconnect", *METERS, *_args(mosquitto, keys[0]), "--id", "cmd-w1", "--wait", "--timeout", "10"]
    assert ctl_cmd.main(argv) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].startswith("sent disconnect cmd-w1")
    transitions = [line.split("  ")[1:4] for line in lines[1:]]
    assert transitions == [
        ["cmd-w1", "(all)", "received"],
        ["cmd-w1", "(all)", "accepted"],
        ["cmd-w1", METERS[0], "sent"],
        ["cmd-w1", METERS[1], "no_answer"],
        ["cmd-w1", METERS[0], "verified"],
        ["cmd-w1", METERS[1], "verified"],
    ]
    assert lines[-1].endswith("verified  relay=open  - after retry")
    assert lines[1].startswith("2023-11-14T22:13:21.000Z")
    assert "bad ack" in err
    assert [c.id for c in gw.commands] == ["cmd-w1"]


def test_wait_json_and_exit_1_when_a_meter_is_not_verified(
    mosquitto: Broker,
    keys: tuple[Path, KeyRing],
    fake_gateway: Callable[..., FakeGateway],
    capsys: pytest.CaptureFixture[str],
) -> None:
    def script(env: CommandEnvelope) -> list[bytes]:
        a, b = env.meters
        return [
            ack(env, 1, "accepted"),
            ack(env, 2, "verified", a, relay="armed"),
            ack(env, 3, "meter_refused", b, reason="meter_refused", detail="keep-power active"),
        ]

    fake_gateway(script)
    argv = ["reconnect", *METERS, *_args(mosquitto, keys[0]), "--wait", "--json", "--timeout", "10"]
    assert ctl_cmd.main(argv) == 1
    out, err = capsys.readouterr()
    acks = [json.loads(line) for line in out.splitlines()[1:]]
    assert [(a["meter"], a["state"]) for a in acks] == [
        (None, "accepted"),
        (METERS[0], "verified"),
        (METERS[1], "meter_refused"),
    ]
    assert "1 meter_refused, 1 verified" in err


def test_wait_command_level_rejection_ends_every_meter(
    mosquitto: Broker,
    keys: tuple[Path, KeyRing],
    fake_gateway: Callable[..., FakeGateway],
    capsys: pytest.CaptureFixture[str],
) -> None:
    fake_gateway(lambda env: [ack(env, 1, "received"), ack(env, 2, "rejected", reason="replayed", detail="seq 5 <= 9")])
    argv = ["disconnect", *METERS, *_args(mosquitto, keys[0]), "--wait", "--timeout", "10"]
    assert ctl_cmd.main(argv) == 1
    out, err = capsys.readouterr()
    assert out.splitlines()[-1].endswith("(all)  rejected  reason=replayed  - seq 5 <= 9")
    assert "2 rejected" in err


def test_wait_times_out_on_a_held_command(
    mosquitto: Broker,
    keys: tuple[Path, KeyRing],
    fake_gateway: Callable[..., FakeGateway],
    capsys: pytest.CaptureFixture[str],
) -> None:
    fake_gateway(
        lambda env: [ack(env, 1, "accepted"), ack(env, 2, "held", reason="mass_disconnect", detail="51 > 50/h")]
    )
    argv = ["disconnect", *METERS, *_args(mosquitto, keys[0]), "--wait", "--timeout", "1"]
    started = time.monotonic()
    assert ctl_cmd.main(argv) == 4
    assert time.monotonic() - started < 5
    out, err = capsys.readouterr()
    assert "(all)  held  reason=mass_disconnect" in out
    assert f"not finished: {METERS[0]}, {METERS[1]}" in err


def test_broker_problems_exit_3(
    broker_factory: Callable[..., Broker],
    unused_port: int,
    keys: tuple[Path, KeyRing],
    capsys: pytest.CaptureFixture[str],
) -> None:
    key_dir = keys[0]
    argv = ["disconnect", METERS[0], *_args(broker_factory(start=False), key_dir)]
    argv[argv.index("--broker") + 1] = f"127.0.0.1:{unused_port}"
    assert ctl_cmd.main(argv) == 3
    assert "cannot connect" in capsys.readouterr().err
    # an ACL that lets the head-end read acks but not publish commands: PUBACK 0x87
    broker = broker_factory(acl=f"topic read meter-gateway/v1/{GW}/acks\n")
    assert ctl_cmd.main(["disconnect", METERS[0], *_args(broker, key_dir)]) == 3
    assert "PUBACK reason 0x87" in capsys.readouterr().err


def test_usage_problems_exit_2(
    mosquitto: Broker, keys: tuple[Path, KeyRing], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_dir = keys[0]
    bad_key = ["disconnect", METERS[0], *_args(mosquitto, key_dir)]
    bad_key[bad_key.index("--key") + 1] = str(tmp_path / "nope.key")
    assert ctl_cmd.main(bad_key) == 2
    assert "cannot read key" in capsys.readouterr().err
    pub_as_key = ["disconnect", METERS[0], *_args(mosquitto, key_dir)]
    pub_as_key[pub_as_key.index("--key") + 1] = str(key_dir / "ops.pub")
    assert ctl_cmd.main(pub_as_key) == 2
    assert "PEM private key" in capsys.readouterr().err
    assert ctl_cmd.main(["disconnect", METERS[0], METERS[0], *_args(mosquitto, key_dir)]) == 2
    assert "more than once" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        ctl_cmd.main(["disconnect", "--gateway", GW])
    assert info.value.code == 2
    capsys.readouterr()


def test_a_retained_copy_of_a_genuine_command_is_refused(mosquitto: Broker, keys: tuple[Path, KeyRing]) -> None:
    """A retained copy of a genuine command is refused by the gateway side (never executed)."""
    key_dir, ring = keys
    topics = Topics(GW)
    sub = Subscriber(mosquitto, [topics.commands]).start()
    try:
        assert ctl_cmd.main(["keep-power-on", METERS[0], *_args(mosquitto, key_dir)]) == 0
        deadline = time.monotonic() + 5
        while not sub.snapshot() and time.monotonic() < deadline:
            time.sleep(0.01)
        payload = sub.snapshot()[0].payload
    finally:
        sub.stop()
    assert decode_envelope(payload).action == "keep_power_on"
    with pytest.raises(Exception, match="retained"):
        _accept(payload, ring, retained=True)

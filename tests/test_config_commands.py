"""The [commands] config section (remote-control keys and limits) and the meters' ``reconnect``."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meter_gateway.gateway.commands.auth import KeyRing, SigningKey
from meter_gateway.gateway.config import Config, ConfigError, Secret, diff, load_config

BASE = """
[gateway]
id = "gw-1"
state_dir = "state"

[uplink]
host = "127.0.0.1"

[[buses]]
name = "line-1"
type = "tcp"
host = "127.0.0.1"
port = 8899
protocol = "dlt645"

[[meters]]
id = "m1"
bus = "line-1"
protocol = "dlt645-2007"
address = "000000000001"
model = "dlt645-2007-generic"
"""

HMAC_SECRET = "s3cret-s3cret-s3cret-s3cret-s3cret-0123"  # 39 bytes


def _write(tmp_path: Path, extra: str, *, base: str = BASE) -> Path:
    path = tmp_path / "gw.toml"
    path.write_text(base + extra, encoding="utf-8")
    return path


def _errors(path: Path, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, environ=environ or {})
    return info.value.messages


@pytest.fixture
def ed_key(tmp_path: Path) -> Ed25519PrivateKey:
    key = Ed25519PrivateKey.generate()
    (tmp_path / "ops.pub").write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    (tmp_path / "sup.b64").write_text(base64.b64encode(raw).decode() + "\n")
    return key


def test_defaults_when_absent(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, ""), environ={})
    c = config.commands
    assert c.enabled is False
    assert c.keys == []
    assert (c.max_validity, c.max_disconnects, c.guard_window, c.verify_window, c.retry) == (
        86400.0,
        50,
        3600.0,
        30.0,
        3,
    )
    state = tmp_path / "state"
    assert c.store_path == str(state / "commands.sqlite")
    assert c.audit_path == str(state / "audit.sqlite")
    assert config.meters[0].reconnect == "close_permit"


def test_full_section_resolves_keys_and_builds_a_keyring(tmp_path: Path, ed_key: Ed25519PrivateKey) -> None:
    (tmp_path / "hmac.secret").write_text(HMAC_SECRET + "\n")
    path = _write(
        tmp_path,
        """
[commands]
enabled = true
max_validity = "2h"
max_disconnects = 10
guard_window = "30m"
verify_window = "45s"
retry = 2
store_path = "db/cmd.sqlite"

[[commands.keys]]
id = "ops"
alg = "ed25519"
public_key_file = "ops.pub"

[[commands.keys]]
id = "sup"
alg = "ed25519"
public_key_file = "sup.b64"
roles = ["release"]

[[commands.keys]]
id = "legacy"
alg = "hmac-sha256"
secret_file = "hmac.secret"
roles = ["command", "release"]

[[commands.keys]]
id = "env-key"
alg = "hmac-sha256"
secret_env = "CMD_SECRET"
""",
    )
    config = load_config(path, environ={"CMD_SECRET": HMAC_SECRET + "-env"})
    c = config.commands
    assert c.enabled
    assert (c.max_validity, c.max_disconnects, c.guard_window, c.verify_window, c.retry) == (
        7200.0,
        10,
        1800.0,
        45.0,
        2,
    )
    assert c.store_path == str(tmp_path / "db" / "cmd.sqlite")
    raw = ed_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert c.keys[0].public_key == raw
    assert c.keys[1].public_key == raw
    assert c.keys[0].roles == ["command"]
    assert c.keys[2].secret == Secret(HMAC_SECRET)
    assert c.keys[3].secret == Secret(HMAC_SECRET + "-env")
    # secrets stay out of the redacted dump
    dumped = str(config.redacted())
    assert HMAC_SECRET not in dumped
    ring = KeyRing.from_config(c.keys)
    assert len(ring) == 4
    ops = ring.get("ops")
    assert ops is not None
    assert ops.roles == frozenset({"command"})
    assert ops.verify(b"x", SigningKey.ed25519("ops", ed_key).sign(b"x"))
    legacy = ring.get("legacy")
    assert legacy is not None
    assert legacy.roles == frozenset({"command", "release"})
    assert legacy.verify(b"x", SigningKey.hmac_sha256("legacy", HMAC_SECRET.encode()).sign(b"x"))
    assert "HMAC" not in repr(legacy)
    assert HMAC_SECRET not in repr(legacy)


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        (
            '[[commands.keys]]\nid = "k"\nalg = "ed25519"\npublic_key_file = "missing.pub"\n',
            "commands.keys[0].public_key_file: cannot read key file",
        ),
        ('[[commands.keys]]\nid = "k"\nalg = "ed25519"\n', "commands.keys[0].public_key_file: missing"),
        (
            '[[commands.keys]]\nid = "k"\nalg = "ed25519"\npublic_key_file = "junk.pub"\n',
            "commands.keys[0].public_key_file: ",
        ),
        (
            '[[commands.keys]]\nid = "k"\nalg = "ed25519"\npublic_key_file = "ops.pub"\nsecret_env = "X"\n',
            "commands.keys[0]: an ed25519 key takes public_key_file",
        ),
        (
            '[[commands.keys]]\nid = "k"\nalg = "hmac-sha256"\n',
            "commands.keys[0]: an hmac-sha256 key needs secret_file",
        ),
        (
            '[[commands.keys]]\nid = "k"\nalg = "hmac-sha256"\nsecret_env = "UNSET"\n',
            "commands.keys[0].secret_env: environment variable UNSET is not set",
        ),
        (
            '[[commands.keys]]\nid = "k"\nalg = "hmac-sha256"\nsecret_env = "SHORT"\n',
            "commands.keys[0].secret_env: the shared secret must be at least 32 bytes",
        ),
        (
            '[[commands.keys]]\nid = "k"\nalg = "hmac-sha256"\nsecret_file = "nope"\n',
            "commands.keys[0].secret_file: cannot read secret file",
        ),
        (
            '[[commands.keys]]\nid = "k"\nalg = "rsa"\n',
            "commands.keys[0].alg: expected one of 'ed25519', 'hmac-sha256'",
        ),
        (
            '[[commands.keys]]\nid = "k"\nalg = "ed25519"\npublic_key_file = "ops.pub"\nroles = ["admin"]\n',
            "commands.keys[0].roles[0]: expected one of 'command', 'release'",
        ),
        (
            '[[commands.keys]]\nid = "k"\nalg = "ed25519"\npublic_key_file = "ops.pub"\nroles = []\n',
            "commands.keys[0].roles",
        ),
        (
            '[[commands.keys]]\nid = "k"\nalg = "ed25519"\npublic_key_file = "ops.pub"\nsecret = "x"\n',
            "commands.keys[0].secret: secrets are given by reference",
        ),
        (
            '[[commands.keys]]\nid = "k"\nalg = "ed25519"\npublic_key_file = "ops.pub"\n'
            '[[commands.keys]]\nid = "k"\nalg = "ed25519"\npublic_key_file = "ops.pub"\n',
            "commands.keys[1].id: duplicate key id 'k' (first at commands.keys[0])",
        ),
        ("enabled = true\n", "commands.keys: remote control is enabled but no key is configured"),
        ('max_validity = "0s"\n', "commands.max_validity: must be > 0"),
        ("max_disconnects = 0\n", "commands.max_disconnects: expected an integer >= 1"),
        ("retry = 11\n", "commands.retry: expected an integer >= 1 and <= 10"),
        ("max_disconect = 3\n", "commands.max_disconect: unknown key (did you mean 'max_disconnects'?)"),
    ],
)
def test_bad_commands_section_names_the_key(
    tmp_path: Path, ed_key: Ed25519PrivateKey, section: str, expected: str
) -> None:
    (tmp_path / "junk.pub").write_text("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    messages = _errors(_write(tmp_path, "\n[commands]\n" + section), {"SHORT": "too-short"})
    assert any(expected in m for m in messages), messages


def test_a_non_ed25519_public_key_file_is_refused(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    (tmp_path / "ec.pub").write_bytes(pem)
    (tmp_path / "short.b64").write_text(base64.b64encode(b"x" * 31).decode())
    messages = _errors(
        _write(
            tmp_path,
            '\n[[commands.keys]]\nid = "a"\nalg = "ed25519"\npublic_key_file = "ec.pub"\n'
            '[[commands.keys]]\nid = "b"\nalg = "ed25519"\npublic_key_file = "short.b64"\n',
        )
    )
    assert any("commands.keys[0].public_key_file" in m and "not an Ed25519 public key" in m for m in messages)
    assert any("commands.keys[1].public_key_file" in m and "32 bytes" in m for m in messages)


def test_meter_reconnect_mode(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, 'reconnect = "direct_close"\n'), environ={})
    assert config.meters[0].reconnect == "direct_close"
    messages = _errors(_write(tmp_path, 'reconnect = "direct"\n'))
    assert any("meters[0].reconnect: expected one of 'close_permit', 'direct_close'" in m for m in messages), messages


def test_reload_diff_sees_the_commands_section(tmp_path: Path, ed_key: Ed25519PrivateKey) -> None:
    key = '\n[[commands.keys]]\nid = "ops"\nalg = "ed25519"\npublic_key_file = "ops.pub"\n'
    old: Config = load_config(_write(tmp_path, key), environ={})
    new: Config = load_config(_write(tmp_path, key + 'roles = ["command", "release"]\n'), environ={})
    assert "commands" in diff(old, new).sections
    assert "commands" not in diff(old, old).sections

"""The daemon's config loading in a child process: same Config, same errors, in-process fallback."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from meter_gateway.gateway.config import ConfigError, Secret, load_config, load_config_and_warnings
from meter_gateway.gateway.config_child import decode, encode, load_config_in_child
from tests.test_config import BASE, CONFIG_DIR, EXAMPLES, with_meter_secret, write

SECRETS = BASE.replace(
    'host = "127.0.0.1"\n\n[[buses]]',
    'host = "127.0.0.1"\nusername = "gw"\npassword_file = "mqtt.pw"\nkeepalive = "90s"\n\n[[buses]]',
)


@pytest.mark.parametrize("name", EXAMPLES)
def test_the_example_configs_load_the_same_in_a_child(name: str) -> None:
    path = CONFIG_DIR / name
    environ = {**os.environ, "METER_GATEWAY_MQTT_PASSWORD": "example-password", "FLAT_101_METER_PASSWORD": "123456"}
    assert load_config_in_child(path, environ=environ) == load_config(path, environ=environ)


def test_secrets_durations_and_credentials_come_back_whole(tmp_path: Path) -> None:
    (tmp_path / "mqtt.pw").write_text("s3cr3t-from-file\n")
    text = with_meter_secret('password_env = "GW_TEST_METER_PW"').replace(
        BASE[: BASE.index("[[buses]]")], SECRETS[: SECRETS.index("[[buses]]")]
    )
    path = write(tmp_path, text)
    environ = {**os.environ, "GW_TEST_METER_PW": "123456"}
    config = load_config_in_child(path, environ=environ)
    assert config == load_config(path, environ=environ)
    assert isinstance(config.uplink.password, Secret)
    assert config.uplink.password.reveal() == "s3cr3t-from-file"
    assert float(config.uplink.keepalive) == 90.0
    assert type(config.uplink.keepalive).__name__ == "Duration"
    creds = config.meter("m1").credentials
    assert creds is not None
    assert creds.password is not None
    assert creds.password.reveal() == "123456"
    assert creds.operator == "0000000A"


def test_repeated_bus_and_model_names_are_one_object(tmp_path: Path) -> None:
    meters = "".join(
        f'\n[[meters]]\nid = "x{i}"\nbus = "line-1"\nprotocol = "dlt645-2007"\n'
        f'address = "{i + 10:012d}"\nmodel = "dlt645-2007-generic"\n'
        for i in range(3)
    )
    path = write(tmp_path, BASE.replace("[[poll_groups]]", meters + "\n[[poll_groups]]"))
    config = load_config_in_child(path)
    dlt = [m for m in config.meters if m.bus == "line-1"]
    assert len(dlt) == 4
    assert all(m.bus is dlt[0].bus and m.model is dlt[0].model for m in dlt)
    assert config == load_config(path)


def test_errors_are_the_same_lines(tmp_path: Path) -> None:
    path = write(tmp_path, BASE.replace("baud_rate = 2400", "baudrate = 2400"))
    with pytest.raises(ConfigError) as in_process:
        load_config(path)
    with pytest.raises(ConfigError) as in_child:
        load_config_in_child(path)
    assert in_child.value.messages == in_process.value.messages
    assert any("baudrate" in line and "baud_rate" in line for line in in_child.value.messages)


def test_a_child_that_cannot_run_falls_back_to_loading_here(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path, BASE)
    with caplog.at_level(logging.WARNING, logger="meter_gateway"):
        config = load_config_in_child(path, python=str(tmp_path / "no-such-python"))
    assert config == load_config(path)
    assert [r.getMessage() for r in caplog.records if "config_child_failed" in r.getMessage()]


def test_a_child_that_fails_falls_back_and_a_bad_config_still_fails(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    script = tmp_path / "crashing-python"
    script.write_text("#!/bin/sh\necho boom >&2\nexit 3\n")
    script.chmod(0o755)
    bad = write(tmp_path, BASE.replace('interval = "15m"', 'interval = "15 fortnights"'))
    with caplog.at_level(logging.WARNING, logger="meter_gateway"), pytest.raises(ConfigError) as exc:
        load_config_in_child(bad, python=str(script))
    assert any("poll_groups[0].interval" in line for line in exc.value.messages)
    assert any("exit status 3" in r.getMessage() and "boom" in r.getMessage() for r in caplog.records)


def test_a_garbled_answer_is_not_a_config() -> None:
    with pytest.raises(ValueError, match="garbled"):
        decode(b"\xc1 not msgpack")
    with pytest.raises(ValueError, match="empty"):
        decode(encode())
    with pytest.raises(ConfigError) as exc:
        decode(encode(errors=["error: x.toml: a: b"]))
    assert exc.value.messages == ["error: x.toml: a: b"]


def test_warnings_are_logged_at_every_load(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    device = tmp_path / "ttyUSB-later"
    path = write(tmp_path, BASE.replace("/dev/ttyUSB0", str(device)))
    _, expected = load_config_and_warnings(path)
    assert len(expected) == 1
    for python in (None, str(tmp_path / "no-such-python")):  # in the child, and in the fallback
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="meter_gateway"):
            config = load_config_in_child(path, python=python)
        assert config == load_config(path)
        logged = [r for r in caplog.records if "event=config_warning" in r.getMessage()]
        assert [r.levelno for r in logged] == [logging.WARNING]
        assert f"serial device {device} does not exist" in logged[0].getMessage()
        assert f"{path}:" in logged[0].getMessage()


def test_a_bad_config_in_the_child_logs_its_warnings_and_fails(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path, BASE.replace("/dev/ttyUSB0", str(tmp_path / "gone")).replace('bus = "mb"', 'bus = "x"'))
    with caplog.at_level(logging.WARNING, logger="meter_gateway"), pytest.raises(ConfigError) as exc:
        load_config_in_child(path)
    assert [line.split(": ")[2] for line in exc.value.messages] == ["meters[1].bus"]
    assert [line.split(": ")[2] for line in exc.value.warnings] == ["buses[0].port"]
    assert any("event=config_warning" in r.getMessage() for r in caplog.records)


def test_the_answer_carries_the_warnings(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, BASE))
    assert decode(encode(config, warnings=["warning: x.toml:3: a: b"])) == (config, ["warning: x.toml:3: a: b"])

"""Config loading and validation, through `meter-gateway check-config` where an error is expected."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import pytest

from meter_gateway.gateway.cli import config_cmd
from meter_gateway.gateway.config import (
    ConfigError,
    Secret,
    SerialBus,
    diff,
    load_config,
    load_config_and_warnings,
    parse_duration,
)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
# The gateway's example configs (config/ also holds other tools' files, e.g. the simulator's).
EXAMPLES = ("demo.toml", "rs485-site.toml", "tcp-concentrator-site.toml")

BASE = """
[gateway]
id = "gw-1"
timezone = "Asia/Shanghai"
state_dir = "state"

[uplink]
host = "127.0.0.1"

[[buses]]
name = "line-1"
type = "serial"
port = "/dev/ttyUSB0"
baud_rate = 2400
parity = "E"
protocol = "dlt645"

[[buses]]
name = "mb"
type = "tcp"
host = "127.0.0.1"
port = 1502
protocol = "modbus-tcp"

[[meters]]
id = "m1"
bus = "line-1"
protocol = "dlt645-2007"
address = "000000000001"
model = "dlt645-2007-generic"

[[meters]]
id = "m2"
bus = "mb"
protocol = "modbus"
address = 1
model = "sim-3ph"

[[poll_groups]]
name = "billing"
interval = "15m"
meters = ["m1", "m2"]
quantities = ["energy.active.import.total"]
"""


def write(tmp_path: Path, text: str, name: str = "gw.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def check(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str], str]:
    code = config_cmd.main([str(path)])
    out, err = capsys.readouterr()
    return code, [line for line in err.splitlines() if line.startswith("error:")], out


def assert_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, key: str, *fragments: str, line: bool = True
) -> str:
    """``text`` fails check-config with exit 78 and a line naming the file, the TOML line (unless
    ``line`` is false: a missing section has none) and ``key``."""
    path = write(tmp_path, text)
    code, errors, _ = check(path, capsys)
    assert code == 78
    prefix = re.compile(rf"error: {re.escape(str(path))}{':[0-9]+' if line else ''}: {re.escape(key)}: ")
    matching = [e for e in errors if prefix.match(e)]
    assert matching, f"no error for {key!r} in {errors}"
    for fragment in fragments:
        assert fragment in matching[0], matching[0]
    return matching[0]


def test_base_config_is_good(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, BASE)
    code, errors, out = check(path, capsys)
    assert (code, errors) == (0, [])
    assert "gw-1" in out
    assert "2 meters" in out.replace("meters:      2", "2 meters")
    config = load_config(path)
    assert config.outbox.path == str(tmp_path / "state" / "outbox.sqlite")
    assert config.uplink.client_id == "gw-1"
    assert config.meter("m1").dlt645_address == "000000000001"
    assert config.meter("m2").unit_id == 1
    assert [m.id for m in config.group_meters(config.poll_groups[0])] == ["m1", "m2"]
    assert config.poll_groups[0].interval == 900.0


@pytest.mark.parametrize("name", EXAMPLES)
def test_examples_pass_check_config(
    name: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # the site examples take their secrets from the environment, as a service unit would give them
    monkeypatch.setenv("METER_GATEWAY_MQTT_PASSWORD", "mqtt-secret")
    monkeypatch.setenv("FLAT_101_METER_PASSWORD", "123456")
    example = CONFIG_DIR / name
    code, errors, out = check(example, capsys)
    assert (code, errors) == (0, [])
    assert out.startswith(f"ok: {example}")
    assert "mqtt-secret" not in out


def test_rs485_example_line_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METER_GATEWAY_MQTT_PASSWORD", "x")
    monkeypatch.setenv("FLAT_101_METER_PASSWORD", "123456")
    config = load_config(CONFIG_DIR / "rs485-site.toml")
    dlt, modbus = config.buses
    assert isinstance(dlt, SerialBus)
    assert isinstance(modbus, SerialBus)
    assert (dlt.baud_rate, dlt.data_bits, dlt.parity, dlt.stop_bits, dlt.protocol) == (2400, 8, "E", 1, "dlt645")
    assert (modbus.baud_rate, modbus.parity, modbus.protocol) == (9600, "N", "modbus-rtu")
    assert dlt.port.startswith("/dev/serial/by-id/")
    # the example ships its secrets commented out, so it validates before anyone fills them in
    assert config.meter("flat-101").credentials is None
    assert config.uplink.password is None


# -- structure -------------------------------------------------------------------------------


def test_unknown_key_suggests_closest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = BASE.replace("baud_rate = 2400", "baudrate = 2400")
    assert_error(tmp_path, capsys, text, "buses[0].baudrate", "unknown key", "did you mean 'baud_rate'")


def test_every_unknown_key_is_reported_in_one_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = BASE.replace("baud_rate = 2400", "baud_rate = 2400\nstopbits = 1").replace(
        'host = "127.0.0.1"\n\n[[buses]]', 'host = "127.0.0.1"\nkeep_alive = 30\n\n[[buses]]'
    )
    path = write(tmp_path, text)
    code, errors, _ = check(path, capsys)
    assert code == 78
    assert any("buses[0].stopbits: unknown key (did you mean 'stop_bits'?)" in e for e in errors)
    assert any("uplink.keep_alive: unknown key (did you mean 'keepalive'?)" in e for e in errors)


def test_unknown_section(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert_error(tmp_path, capsys, BASE + "\n[metric]\nport = 1\n", "metric", "did you mean 'metrics'")


def test_wrong_type_names_expected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = BASE.replace("baud_rate = 2400", "baud_rate = 2401")
    assert_error(tmp_path, capsys, text, "buses[0].baud_rate", "expected one of", "2400", "9600", "got 2401")


def test_bad_parity(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = BASE.replace('parity = "E"', 'parity = "even"')
    assert_error(tmp_path, capsys, text, "buses[0].parity", "'E', 'N', 'O'", "got 'even'")


def test_missing_required_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = BASE.replace('port = "/dev/ttyUSB0"\n', "")
    assert_error(tmp_path, capsys, text, "buses[0].port", "missing")


def test_missing_section(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = BASE.replace('[uplink]\nhost = "127.0.0.1"\n', "")
    assert_error(tmp_path, capsys, text, "uplink", "missing", line=False)


def test_bad_bus_type(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = BASE.replace('type = "tcp"', 'type = "tpc"')
    assert_error(tmp_path, capsys, text, "buses[1].type", "'serial', 'tcp'", "did you mean 'tcp'")


def test_out_of_range_number(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = BASE.replace('host = "127.0.0.1"\n\n[[buses]]', 'host = "127.0.0.1"\nmax_inflight = 0\n\n[[buses]]')
    assert_error(tmp_path, capsys, text, "uplink.max_inflight", ">= 1", "got 0")


def test_bad_duration(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = BASE.replace('interval = "15m"', 'interval = "15 minutes"')
    assert_error(tmp_path, capsys, text, "poll_groups[0].interval", "duration", "'15 minutes'")


def test_interval_must_be_whole_seconds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = BASE.replace('interval = "15m"', 'interval = "1500ms"')
    assert_error(tmp_path, capsys, text, "poll_groups[0].interval", "whole number of seconds")


def test_toml_syntax_error_has_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, BASE.replace('id = "gw-1"', 'id = "gw-1'))
    code, errors, _ = check(path, capsys)
    assert code == 78
    assert len(errors) == 1
    assert errors[0].startswith(f"error: {path}:3: not valid TOML")


def test_unreadable_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, errors, _ = check(tmp_path / "nope.toml", capsys)
    assert code == 78
    assert "cannot read" in errors[0]


def test_bad_timezone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = BASE.replace("Asia/Shanghai", "Asia/Shanghia")
    assert_error(tmp_path, capsys, text, "gateway.timezone", "unknown time zone")


def test_bad_gateway_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = BASE.replace('id = "gw-1"', 'id = "gw/1 #"')
    assert_error(tmp_path, capsys, text, "gateway.id", "a name of letters")


# -- cross-field rules -----------------------------------------------------------------------


def test_eleven_digit_dlt645_address(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = BASE.replace('address = "000000000001"', 'address = "00000000001"')
    assert_error(tmp_path, capsys, text, "meters[0].address", "exactly 12 decimal digits", "'00000000001'")


def test_dlt645_address_as_number(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = BASE.replace('address = "000000000001"', "address = 1")
    assert_error(tmp_path, capsys, text, "meters[0].address", "in quotes")


def test_dlt645_broadcast_address(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = BASE.replace('address = "000000000001"', 'address = "999999999999"')
    assert_error(tmp_path, capsys, text, "meters[0].address", "broadcast")


@pytest.mark.parametrize("unit", ["0", "248", '"1"'])
def test_modbus_unit_id_range(tmp_path: Path, capsys: pytest.CaptureFixture[str], unit: str) -> None:
    text = BASE.replace("address = 1\n", f"address = {unit}\n")
    assert_error(tmp_path, capsys, text, "meters[1].address", "1..247")


def test_outbox_commit_interval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert load_config(write(tmp_path, BASE)).outbox.commit_interval == 0.02
    text = BASE + '\n[outbox]\ncommit_interval = "50ms"\n'
    assert load_config(write(tmp_path, text)).outbox.commit_interval == pytest.approx(0.05)
    text = BASE + '\n[outbox]\ncommit_interval = "5s"\n'
    assert_error(tmp_path, capsys, text, "outbox.commit_interval", "at most 1 s")


def test_duplicate_meter_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = BASE.replace('id = "m2"', 'id = "m1"')
    assert_error(tmp_path, capsys, text, "meters[1].id", "duplicate meter id 'm1'", "meters[0]")


def test_duplicate_bus_and_address(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = BASE + '\n[[meters]]\nid = "m3"\nbus = "mb"\nprotocol = "modbus"\naddress = 1\nmodel = "sim-3ph"\n'
    assert_error(tmp_path, capsys, text, "meters[2].address", "already used by meters[1] ('m2')")


def test_same_address_on_other_bus_is_fine(tmp_path: Path) -> None:
    text = BASE + (
        '\n[[buses]]\nname = "mb2"\ntype = "tcp"\nhost = "127.0.0.1"\nport = 1503\nprotocol = "modbus-tcp"\n'
        '\n[[meters]]\nid = "m3"\nbus = "mb2"\nprotocol = "modbus"\naddress = 1\nmodel = "sim-3ph"\n'
    )
    assert len(load_config(write(tmp_path, text)).meters) == 3


def test_duplicate_bus_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = BASE.replace('name = "mb"', 'name = "line-1"').replace('bus = "mb"', 'bus = "line-1"')
    assert_error(tmp_path, capsys, text, "buses[1].name", "duplicate bus name")


def test_unknown_bus(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = BASE.replace('bus = "line-1"', 'bus = "line1"')
    assert_error(tmp_path, capsys, text, "meters[0].bus", "unknown bus 'line1'", "did you mean 'line-1'")


def test_protocol_framing_mismatch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = BASE.replace('bus = "mb"', 'bus = "line-1"')
    assert_error(tmp_path, capsys, text, "meters[1].protocol", "'modbus' meter on bus 'line-1'", "'dlt645'")


def test_modbus_tcp_framing_on_serial_bus(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = BASE.replace('protocol = "dlt645"\n', 'protocol = "modbus-tcp"\n').replace(
        'protocol = "dlt645-2007"', 'protocol = "modbus"'
    )
    assert_error(tmp_path, capsys, text, "buses[0].protocol", "needs a tcp bus")


def test_poll_group_unknown_meter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = BASE.replace('meters = ["m1", "m2"]', 'meters = ["m1", "m22"]')
    assert_error(tmp_path, capsys, text, "poll_groups[0].meters[1]", "unknown meter 'm22'", "did you mean 'm2'")


def test_poll_group_meters_string_must_be_star(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = BASE.replace('meters = ["m1", "m2"]', 'meters = "m1"')
    assert_error(tmp_path, capsys, text, "poll_groups[0].meters", '"*"')


def test_poll_group_without_meters(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = BASE.replace('meters = ["m1", "m2"]', "meters = []")
    assert_error(tmp_path, capsys, text, "poll_groups[0].meters", "lists no meters")


def test_daily_frozen_is_for_dlt645_meters(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = BASE + '\n[daily_frozen]\nmeters = ["m1", "m2"]\n'
    assert_error(tmp_path, capsys, text, "daily_frozen.meters[1]", "Modbus meter")
    config = load_config(write(tmp_path, BASE + '\n[daily_frozen]\nmeters = "*"\n'))
    assert config.daily_frozen is not None
    assert [m.id for m in config.group_meters(config.daily_frozen)] == ["m1"]


def test_time_sync_offset_within_interval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = BASE + '\n[time_sync]\ninterval = "1h"\noffset = "2h"\n'
    assert_error(tmp_path, capsys, text, "time_sync.offset", "less than time_sync.interval")


def test_time_sync_suspect_drift_not_below_max_drift(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = BASE + '\n[time_sync]\nmax_drift = "10s"\nsuspect_drift = "5s"\n'
    assert_error(tmp_path, capsys, text, "time_sync.suspect_drift", "at least time_sync.max_drift")
    config = load_config(write(tmp_path, BASE + '\n[time_sync]\nsuspect_drift = "2m"\n'))
    assert config.time_sync is not None
    assert float(config.time_sync.suspect_drift) == 120


def test_quantity_syntax(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = BASE.replace('quantities = ["energy.active.import.total"]', 'quantities = ["Energy Import"]')
    assert_error(tmp_path, capsys, text, "poll_groups[0].quantities[0]", "not a quantity name")


def test_quantity_no_meter_can_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = BASE.replace('quantities = ["energy.active.import.total"]', 'quantities = ["voltage.l4"]')
    assert_error(tmp_path, capsys, text, "poll_groups[0].quantities[0]", "no meter of this group", "voltage.l")


def test_duplicate_poll_group(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = BASE + '\n[[poll_groups]]\nname = "billing"\ninterval = 60\nquantities = ["frequency"]\nmeters = ["m2"]\n'
    assert_error(tmp_path, capsys, text, "poll_groups[1].name", "duplicate poll group name")


def test_unknown_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = BASE.replace('model = "sim-3ph"', 'model = "sim-3p"')
    assert_error(tmp_path, capsys, text, "meters[1].model", "unknown meter model", "did you mean 'sim-3ph'")


def test_model_of_other_protocol(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = BASE.replace('model = "sim-3ph"', 'model = "dlt645-2007-generic"')
    assert_error(tmp_path, capsys, text, "meters[1].model", "is a dlt645 model")


def test_model_path_must_exist(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = BASE.replace('model = "sim-3ph"', 'model = "models/mine.toml"')
    assert_error(tmp_path, capsys, text, "meters[1].model", "does not exist")


def test_missing_tls_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = BASE.replace(
        'host = "127.0.0.1"\n\n[[buses]]', 'host = "127.0.0.1"\ntls = { ca_file = "ca.pem" }\n\n[[buses]]'
    )
    assert_error(tmp_path, capsys, text, "uplink.tls.ca_file", "ca.pem does not exist")


def test_tls_files_resolve_relative_to_config(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("not checked here\n")
    text = BASE.replace(
        'host = "127.0.0.1"\n\n[[buses]]', 'host = "127.0.0.1"\ntls = { ca_file = "ca.pem" }\n\n[[buses]]'
    )
    config = load_config(write(tmp_path, text))
    assert config.uplink.tls is not None
    assert config.uplink.tls.ca_file == str(tmp_path / "ca.pem")


def test_many_errors_one_line_each(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = (
        BASE.replace('address = "000000000001"', 'address = "1"')
        .replace('bus = "mb"', 'bus = "nope"')
        .replace('meters = ["m1", "m2"]', 'meters = ["m9"]')
    )
    path = write(tmp_path, text)
    code, errors, _ = check(path, capsys)
    assert code == 78
    keys = [e.split(": ")[2] for e in errors]
    assert {"meters[0].address", "meters[1].bus", "poll_groups[0].meters[0]"} <= set(keys)
    assert all(re.match(rf"error: {re.escape(str(path))}:[0-9]+: [\w.\[\]]+: \S", e) for e in errors)


def test_usage_error_is_not_config_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert config_cmd.main([]) == 2
    capsys.readouterr()


# -- secrets -----------------------------------------------------------------------------------

SECRET_UPLINK = 'host = "127.0.0.1"\nusername = "gw"\n{ref}\n\n[[buses]]'
METER_CREDS = 'model = "dlt645-2007-generic"\ncredentials = {{ password_level = 2, {ref}, operator = "0000000A" }}'


def with_uplink_secret(ref: str) -> str:
    return BASE.replace('host = "127.0.0.1"\n\n[[buses]]', SECRET_UPLINK.format(ref=ref))


def with_meter_secret(ref: str) -> str:
    return BASE.replace('model = "dlt645-2007-generic"', METER_CREDS.format(ref=ref))


def test_secret_from_file(tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "mqtt.pw").write_text("s3cr3t-from-file\n")
    path = write(tmp_path, with_uplink_secret('password_file = "mqtt.pw"'))
    config = load_config(path)
    assert config.uplink.password is not None
    assert config.uplink.password.reveal() == "s3cr3t-from-file"
    assert "s3cr3t" not in repr(config)
    assert "s3cr3t" not in str(config.uplink)
    assert "s3cr3t" not in json.dumps(config.redacted())
    assert config.redacted()["uplink"]["password"] == "******"
    with caplog.at_level(logging.INFO):
        logging.getLogger("test").info("config %s %r %s", config, config.uplink, config.redacted())
    assert "s3cr3t" not in caplog.text
    assert "******" in caplog.text
    assert config_cmd.main([str(path), "--json"]) == 0
    out = capsys.readouterr().out
    assert "s3cr3t" not in out
    assert json.loads(out)["uplink"]["password"] == "******"


def test_secret_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GW_TEST_METER_PW", "123456")
    config = load_config(write(tmp_path, with_meter_secret('password_env = "GW_TEST_METER_PW"')))
    creds = config.meter("m1").credentials
    assert creds is not None
    assert creds.password is not None
    assert creds.password.reveal() == "123456"
    assert "123456" not in repr(config.meter("m1"))
    assert "123456" not in json.dumps(config.redacted())


def test_secret_from_environ_argument(tmp_path: Path) -> None:
    path = write(tmp_path, with_uplink_secret('password_env = "MQTT_PW"'))
    config = load_config(path, environ={"MQTT_PW": "pw-1"})
    assert config.uplink.password is not None
    assert config.uplink.password.reveal() == "pw-1"


def test_missing_secret_env(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GW_TEST_UNSET", raising=False)
    text = with_uplink_secret('password_env = "GW_TEST_UNSET"')
    assert_error(tmp_path, capsys, text, "uplink.password_env", "GW_TEST_UNSET is not set")


def test_missing_secret_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = with_meter_secret('password_file = "meter.pw"')
    assert_error(tmp_path, capsys, text, "meters[0].credentials.password_file", "meter.pw")


def test_empty_secret_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "mqtt.pw").write_text("\n")
    assert_error(tmp_path, capsys, with_uplink_secret('password_file = "mqtt.pw"'), "uplink.password_file", "empty")


def test_both_secret_references(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = with_uplink_secret('password_file = "a"\npassword_env = "B"')
    assert_error(tmp_path, capsys, text, "uplink", "not both")


def test_literal_password_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = assert_error(tmp_path, capsys, with_uplink_secret('password = "hunter2"'), "uplink.password", "by reference")
    assert "hunter2" not in line


def test_meter_password_format_not_echoed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "meter.pw").write_text("toolong-secret\n")
    line = assert_error(
        tmp_path, capsys, with_meter_secret('password_file = "meter.pw"'), "meters[0].credentials", "6 hex digits"
    )
    assert "toolong" not in line


def test_credentials_need_a_password(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = BASE.replace('model = "dlt645-2007-generic"', 'model = "dlt645-2007-generic"\ncredentials = {}')
    assert_error(tmp_path, capsys, text, "meters[0].credentials", "password_file or password_env")


def test_secret_type() -> None:
    s = Secret("abc")
    assert (repr(s), str(s), f"{s}", f"{s:>10}") == ("******",) * 4
    assert s == Secret("abc")
    assert s != Secret("abd")
    with pytest.raises(TypeError):
        s.__reduce__()


# -- values, reload ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"), [("30s", 30.0), ("15m", 900.0), ("1h", 3600.0), ("1d", 86400.0), ("500ms", 0.5), (10, 10.0)]
)
def test_parse_duration(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "15", "1w", "-5s", True, -1])
def test_parse_duration_rejects(bad: object) -> None:
    with pytest.raises((ValueError, TypeError)):
        parse_duration(bad)


def test_serial_frame_gap(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, BASE))
    bus = config.bus("line-1")
    assert isinstance(bus, SerialBus)
    assert bus.frame_gap() == pytest.approx(3.5 * 11 / 2400)  # 8E1: start + 8 + parity + stop


def test_config_error_lists_messages(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, BASE.replace('bus = "mb"', 'bus = "x"')))
    assert len(info.value.messages) == 1
    assert str(info.value) == info.value.messages[0]


def test_diff(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("one\n")
    old = load_config(write(tmp_path, with_uplink_secret('password_file = "pw"'), "old.toml"))
    assert not diff(old, old)
    (tmp_path / "pw").write_text("two\n")
    text = (
        with_uplink_secret('password_file = "pw"')
        .replace("port = 1502", "port = 1503")
        .replace('interval = "15m"', 'interval = "5m"')
        + '\n[[meters]]\nid = "m3"\nbus = "line-1"\nprotocol = "dlt645-2007"\naddress = "000000000003"\n'
        'model = "dlt645-2007-generic"\n'
    )
    new = load_config(write(tmp_path, text, "new.toml"))
    d = diff(old, new)
    assert d.buses.changed == {"mb"}
    assert d.buses.added == d.buses.removed == frozenset()
    assert d.meters.added == {"m3"}
    assert d.meters.changed == frozenset()
    assert d.poll_groups.changed == {"billing"}
    assert d.sections == {"uplink"}  # the rotated password, compared without showing it
    assert d.meters_to_restart(new) == {"m2", "m3"}  # m2's bus changed


def test_meter_zone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_config(write(tmp_path, BASE))
    assert str(config.gateway.zone()) == "Asia/Shanghai"
    monkeypatch.setenv("TZ", "Europe/Berlin")
    local = load_config(write(tmp_path, BASE.replace('timezone = "Asia/Shanghai"\n', ""), "local.toml"))
    assert local.gateway.timezone is None
    assert str(local.gateway.zone()) == "Europe/Berlin"


# -- one run reports every mistake, each at its line -------------------------------------------

MANY_MISTAKES = """
[gateway]
id = "gw 1"
timezone = "Asia/Shanghia"

[uplink]
host = "127.0.0.1"
port = "1883"

[outbox]
synchronous = "FAST"

[metric]
port = 9109

[[buses]]
name = "line-1"
type = "serial"
port = "/dev/ttyUSB0"
baudrate = 2400
parity = "E"
protocol = "dlt645"

[[buses]]
name = "mb"
type = "tcp"
host = "127.0.0.1"
protocol = "modbus-tcp"

[[buses]]
name = "mb2"
type = "tcp"
host = "127.0.0.1"
port = 1503
protocol = "modbus-tcp"

[[meters]]
id = "m1"
bus = "line-1"
protocol = "dlt645-2007"
address = "00000000001"
model = "dlt645-2007-generic"

[[meters]]
id = "m2"
bus = "mb22"
protocol = "modbus"
address = 1
model = "sim-3ph"

[[meters]]
id = "m1"
bus = "mb2"
protocol = "modbus"
address = 2
model = "sim-3p"

[[meters]]
id = "m4"
bus = "mb"
protocol = "modbus"
address = 3
model = "sim-3ph"

[[poll_groups]]
name = "billing"
interval = "15 minutes"
meters = ["m1", "m4"]
quantities = ["energy.active.import.total"]

[[poll_groups]]
name = "fast"
interval = 60
meters = ["m9"]
quantities = ["frequency"]

[time_sync]
interval = "1h"
offset = "2h"
"""


def line_number(text: str, fragment: str, after: str = "") -> int:
    """The 1-based line of the first ``fragment`` in ``text`` after ``after``."""
    start = text.index(after) if after else 0
    return text.count("\n", 0, text.index(fragment, start)) + 1


def test_every_mistake_is_reported_in_one_run_with_its_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, MANY_MISTAKES)
    code, errors, _ = check(path, capsys)
    assert code == 78
    text = MANY_MISTAKES
    expected = {  # key path: (line of the mistake, what the message must say)
        "gateway.id": (line_number(text, 'id = "gw 1"'), "a name of letters"),
        "gateway.timezone": (line_number(text, "timezone ="), "unknown time zone 'Asia/Shanghia'"),
        "uplink.port": (line_number(text, 'port = "1883"'), "expected an integer >= 1 and <= 65535, got '1883'"),
        "outbox.synchronous": (
            line_number(text, "synchronous ="),
            "expected one of 'EXTRA', 'FULL', 'NORMAL', got 'FAST'",
        ),
        "metric": (line_number(text, "[metric]"), "unknown key (did you mean 'metrics'?)"),
        "buses[0].baudrate": (line_number(text, "baudrate ="), "unknown key (did you mean 'baud_rate'?)"),
        # a missing key is shown at its table's header
        "buses[1].port": (line_number(text, "[[buses]]", after='name = "line-1"'), "missing (required)"),
        "meters[0].address": (line_number(text, '"00000000001"'), "exactly 12 decimal digits"),
        "meters[1].bus": (
            line_number(text, 'bus = "mb22"'),
            "unknown bus 'mb22' (did you mean 'mb2'?) (buses: line-1, mb, mb2)",
        ),
        "meters[2].id": (line_number(text, 'id = "m1"', after='id = "m2"'), "duplicate meter id 'm1'"),
        "meters[2].model": (line_number(text, 'model = "sim-3p"\n'), "unknown meter model 'sim-3p'"),
        "poll_groups[0].interval": (line_number(text, "15 minutes"), "expected a duration like"),
        "poll_groups[1].meters[0]": (line_number(text, '["m9"]'), "unknown meter 'm9'"),
        "time_sync.offset": (line_number(text, 'offset = "2h"'), "must be less than time_sync.interval"),
    }
    found: dict[str, tuple[int, str]] = {}
    for error in errors:
        m = re.fullmatch(rf"error: {re.escape(str(path))}:([0-9]+): ([\w.\[\]]+): (.+)", error)
        assert m, f"not an 'error: file:line: key: message' line: {error}"
        assert m.group(2) not in found, f"two errors for {m.group(2)}: {errors}"
        found[m.group(2)] = (int(m.group(1)), m.group(3))
    # all of them, and nothing that only follows from another (m4 on the bus left out, m1 in a
    # group though meters[2] repeats its id, baud_rate "missing" beside the misspelt baudrate)
    assert set(found) == set(expected), "\n".join(errors)
    for key, (line, fragment) in expected.items():
        assert found[key][0] == line, f"{key}: reported at line {found[key][0]}, written at {line}"
        assert fragment in found[key][1], f"{key}: {found[key][1]}"
    assert [int(e.split(":")[2]) for e in errors] == sorted(int(e.split(":")[2]) for e in errors)  # file order


def test_a_wrong_item_does_not_hide_the_checks_of_the_next(tmp_path: Path) -> None:
    # meters[0] is left out for a wrong protocol: meters[1] keeps its index in the next error, and
    # the poll group naming m1 is not told that m1 is unknown
    text = BASE.replace('"dlt645-2007"', '"dlt645-2008"').replace("address = 1\n", "address = 300\n")
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    keys = [line.split(": ")[2] for line in info.value.messages]
    assert keys == ["meters[0].protocol", "meters[1].address"], info.value.messages


def test_every_wrong_value_of_one_table_is_reported(tmp_path: Path) -> None:
    text = BASE.replace("baud_rate = 2400", "baud_rate = 2401").replace('parity = "E"', 'parity = "even"')
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    keys = [line.split(": ")[2] for line in info.value.messages]
    assert keys == ["buses[0].baud_rate", "buses[0].parity"], info.value.messages


def test_missing_gateway_section_still_checks_the_rest(tmp_path: Path) -> None:
    text = BASE.replace('[gateway]\nid = "gw-1"\ntimezone = "Asia/Shanghai"\nstate_dir = "state"\n', "")
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text.replace('bus = "mb"', 'bus = "nope"')))
    keys = [line.split(": ")[2] for line in info.value.messages]
    # the missing section has no line: it comes first, the others in the file's order
    assert keys == ["gateway", "meters[1].bus"], info.value.messages
    assert info.value.messages[0] == f"error: {tmp_path / 'gw.toml'}: gateway: missing (required)"


def test_file_that_is_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "gw.toml"
    path.write_bytes(BASE.encode().replace(b'"gw-1"', b'"gw-\xff"'))
    code, errors, _ = check(path, capsys)
    assert code == 78
    assert errors == [f"error: {path}:3: not valid TOML: not UTF-8 text (invalid start byte)"]


# -- warnings --------------------------------------------------------------------------------


def check_output(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str], list[str]]:
    code = config_cmd.main([str(path)])
    _, err = capsys.readouterr()
    lines = err.splitlines()
    return code, [x for x in lines if x.startswith("error:")], [x for x in lines if x.startswith("warning:")]


def test_missing_serial_device_is_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    device = tmp_path / "ttyUSB-not-plugged"
    path = write(tmp_path, BASE.replace("/dev/ttyUSB0", str(device)))
    code, errors, warnings = check_output(path, capsys)
    assert (code, errors) == (0, [])
    line = line_number(BASE, "/dev/ttyUSB0")
    assert warnings == [
        f"warning: {path}:{line}: buses[0].port: serial device {device} does not exist on this machine "
        "(fine if it is plugged in later)"
    ]
    config, listed = load_config_and_warnings(path)
    assert listed == warnings
    assert config.bus("line-1").name == "line-1"


def test_existing_serial_device_gets_no_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    controller, device = os.openpty()  # a real terminal device, as a USB adapter would be
    try:
        path = write(tmp_path, BASE.replace("/dev/ttyUSB0", os.ttyname(device)))
        assert check_output(path, capsys) == (0, [], [])
    finally:
        os.close(controller)
        os.close(device)


def test_no_meters_and_a_group_of_none_are_warnings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = (
        BASE[: BASE.index("[[meters]]")] + '[[poll_groups]]\nname = "all"\ninterval = 60\nquantities = ["frequency"]\n'
    )
    text = text.replace('type = "serial"\nport = "/dev/ttyUSB0"\nbaud_rate = 2400\nparity = "E"\n', "").replace(
        'name = "line-1"\n', 'name = "line-1"\ntype = "tcp"\nhost = "127.0.0.1"\nport = 8899\n'
    )
    path = write(tmp_path, text)
    code, errors, warnings = check_output(path, capsys)
    assert (code, errors) == (0, [])
    group_line = line_number(text, "[[poll_groups]]")
    assert warnings == [
        f"warning: {path}: meters: no meters are configured: the gateway will read nothing",
        f'warning: {path}:{group_line}: poll_groups[0].meters: "*" matches no meters (none are configured): '
        "this group reads nothing",
    ]


def test_warnings_accompany_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, BASE.replace("/dev/ttyUSB0", str(tmp_path / "gone")).replace('bus = "mb"', 'bus = "x"'))
    code, errors, warnings = check_output(path, capsys)
    assert code == 78
    assert [e.split(": ")[2] for e in errors] == ["meters[1].bus"]
    assert [w.split(": ")[2] for w in warnings] == ["buses[0].port"]


def test_a_wrong_list_is_not_judged_by_its_absence(tmp_path: Path) -> None:
    text = (
        'buses = 5\nmeters = "m1"\n[gateway]\nid = "gw-1"\n[uplink]\nhost = "127.0.0.1"\n'
        '[[poll_groups]]\nname = "billing"\ninterval = 60\nmeters = ["m1"]\nquantities = ["frequency"]\n'
    )
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    # no "unknown meter 'm1'" in the group, no "no meters are configured"
    assert info.value.messages == [
        f"error: {path}:1: buses: expected a list, got 5",
        f"error: {path}:2: meters: expected a list, got 'm1'",
    ]
    assert info.value.warnings == []

"""DL/T 698.45 meters in the config, the registry and the model files: what is accepted, and the
one-line errors (exit 78) for what is not."""

from __future__ import annotations

from pathlib import Path

import pytest

from meter_gateway.drivers import registry
from meter_gateway.drivers.dlt698_model import Dlt698Model
from meter_gateway.drivers.meter_models import ModelError, load_model
from meter_gateway.gateway.config import load_config
from tests.test_config import BASE, assert_error, check, write

DLT698 = """
[[meters]]
id = "m3"
bus = "line-1"
protocol = "dlt698"
address = "000000000003"
model = "dlt698-generic"
"""


def test_a_698_meter_with_its_options_on_a_645_line_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = BASE + DLT698 + 'dlt698 = { association = "connect", security = "rn", control = "passthrough" }\n'
    path = write(tmp_path, text)
    code, errors, _ = check(path, capsys)
    assert (code, errors) == (0, [])
    meter = load_config(path).meter("m3")
    assert meter.dlt698 is not None
    assert meter.protocol_options() == {"association": "connect", "security": "rn", "control": "passthrough"}


def test_the_options_table_on_a_645_meter_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = BASE.replace('model = "dlt645-2007-generic"', 'model = "dlt645-2007-generic"\ndlt698 = { security = "rn" }')
    assert_error(tmp_path, capsys, text, "meters[0].dlt698", "only for dlt698 meters", "dlt645-2007")


def test_a_misspelt_option_is_an_error_that_suggests(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert_error(tmp_path, capsys, BASE + DLT698 + 'dlt698 = { secrity = "rn" }\n', "meters[2].dlt698.secrity")
    assert_error(tmp_path, capsys, BASE + DLT698 + 'dlt698 = { control = "cipher" }\n', "meters[2].dlt698.control")


@pytest.mark.parametrize("address", ["00000000000", "AAAAAAAAAAAA", "AA", "0000000000000000000000000000000000", 3])
def test_wildcard_broadcast_and_odd_addresses_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], address: object
) -> None:
    value = f'"{address}"' if isinstance(address, str) else str(address)
    text = BASE + DLT698.replace('address = "000000000003"', f"address = {value}")
    assert_error(tmp_path, capsys, text, "meters[2].address", "DL/T 698.45 server address")


def test_the_registry_entry() -> None:
    entry = registry.get("dlt698")
    assert entry.family == "dlt698"
    assert entry.buses == registry.BYTE_BUSES
    for can in (registry.Can.READ, registry.Can.FROZEN, registry.Can.TIME_SYNC, registry.Can.RELAY):
        assert registry.capable("dlt698", can)
    assert registry.capable("dlt698", registry.Can.KEEP_POWER)
    assert registry.capable("dlt698", registry.Can.DISCOVER)
    assert not registry.capable("dlt698", registry.Can.VALVE)
    assert registry.check_address("dlt698", "12") is None
    assert registry.check_address("dlt698", "000000000001") is None
    assert entry.password is not None
    assert entry.password.problem("secret") is None
    assert entry.password.problem("密码") is not None
    assert entry.build_driver().__name__ == "from_config"


def test_both_shipped_models_load_with_their_freezes_and_relay() -> None:
    generic = load_model("dlt698-generic")
    prepaid = load_model("dlt698-single-phase-prepaid")
    assert isinstance(generic, Dlt698Model)
    assert isinstance(prepaid, Dlt698Model)
    assert generic.security == "plain"
    assert prepaid.security == "rn"
    assert prepaid.oads_per_request < generic.oads_per_request
    assert "prepaid.money.remaining" in prepaid.quantities
    assert "energy.active.import.total" in generic.daily_quantities
    assert generic.relay is not None
    assert str(generic.relay.output) == "F2050201"


@pytest.mark.parametrize(
    ("change", "key", "fragment"),
    [
        (('oad = "00100201"', 'oad = "0010020"'), "sections[0].points[0].oad", "8 hex digits"),
        (('oad = "00100201"', 'oad = "99990201"'), "sections[0].points[0].oad", "not in the DL/T 698.45 catalogue"),
        (('oad = "20000201"', 'oad = "20010201"'), "sections[1].points[0].oad", "is in A, voltage.l1 is in V"),
        (("oads_per_request = 8", "oads_per_request = 0"), "oads_per_request", "1..64"),
        (('security = "plain"', 'security = "clear"'), "security", "plain, rn"),
        (('"energy.active.import.total", "energy.active.import.t1"', '"energy.nope"'), "freeze.daily", "not a point"),
        (("bit = 4", "bit = 16"), "relay.bit", "0..15"),
    ],
)
def test_model_errors_name_file_and_key(tmp_path: Path, change: tuple[str, str], key: str, fragment: str) -> None:
    text = (Path(registry.__file__).parent / "models" / "dlt698-generic.toml").read_text("utf-8")
    assert change[0] in text
    bad = tmp_path / "dlt698-generic.toml"
    bad.write_text(text.replace(change[0], change[1], 1), encoding="utf-8")
    with pytest.raises(ModelError) as caught:
        load_model(bad)
    assert f"{bad}: {key}: " in str(caught.value)
    assert fragment in str(caught.value)

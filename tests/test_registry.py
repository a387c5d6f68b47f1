"""The protocol registry is the one place that says what each meter protocol can do."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest

from meter_gateway.drivers import registry
from meter_gateway.drivers.registry import Can
from meter_gateway.gateway.config import Meter, SerialBus, TcpBus


def _literal(struct: type, field: str) -> set[str]:
    hint = typing.get_type_hints(struct, include_extras=True)[field]
    while typing.get_origin(hint) is typing.Annotated:
        hint = typing.get_args(hint)[0]
    return set(typing.get_args(hint))


def test_the_config_accepts_exactly_the_registered_protocols() -> None:
    assert _literal(Meter, "protocol") == set(registry.PROTOCOLS)
    assert _literal(TcpBus, "protocol") == set(registry.BUS_PROTOCOLS)
    assert _literal(SerialBus, "protocol") == set(registry.BUS_PROTOCOLS)


@pytest.mark.parametrize("name", list(registry.PROTOCOLS))
def test_every_protocol_is_whole(name: str) -> None:
    info = registry.get(name)
    assert info.name == name
    assert info.buses <= registry.BUS_PROTOCOLS
    assert Can.READ in info.can
    assert info.driver.startswith("meter_gateway.drivers.")
    assert callable(info.build_driver())
    assert name in [p for bus in info.buses for p in registry.carried_by(bus)]


def test_capabilities_answer_for_each_protocol() -> None:
    assert registry.capable("dlt645-2007", Can.FROZEN)
    assert not registry.capable("dlt645-1997", Can.FROZEN)
    assert not registry.capable("modbus", Can.RELAY)
    assert not registry.capable("no-such-protocol", Can.READ)
    assert "dlt645-2007" in registry.meter_protocols(Can.TIME_SYNC)


@pytest.mark.parametrize(
    ("protocol", "address", "problem"),
    [
        ("dlt645-2007", "000000001234", None),
        ("dlt645-2007", "00000000123", "exactly 12 decimal digits"),
        ("dlt645-2007", 1234, "exactly 12 decimal digits"),
        ("dlt645-1997", "999999999999", "broadcast address"),
        ("modbus", 1, None),
        ("modbus", 248, "1..247"),
        ("modbus", True, "1..247"),
        ("modbus", "1", "1..247"),
    ],
)
def test_addresses_are_checked_by_the_protocols_rule(protocol: str, address: object, problem: str | None) -> None:
    got = registry.check_address(protocol, address)
    if problem is None:
        assert got is None
    else:
        assert got is not None
        assert problem in got


def test_an_unknown_protocol_is_named_with_the_known_ones() -> None:
    with pytest.raises(KeyError, match="known: dlt645-2007"):
        registry.get("dlt645-2009")


def test_a_protocol_settings_table_on_another_protocols_meter_is_an_error(tmp_path: Path) -> None:
    from meter_gateway.gateway.config import ConfigError, load_config

    path = tmp_path / "gw.toml"
    path.write_text(
        '[gateway]\nid = "gw"\nstate_dir = "state"\n[uplink]\nhost = "127.0.0.1"\n'
        '[[buses]]\nname = "b"\ntype = "tcp"\nhost = "127.0.0.1"\nport = 1\nprotocol = "dlt645"\n'
        '[[meters]]\nid = "m"\nbus = "b"\nprotocol = "dlt645-2007"\naddress = "000000000001"\n'
        'model = "dlt645-2007-generic"\n[meters.cjt188]\ndi_order = "swapped"\n'
    )
    with pytest.raises(ConfigError, match=r"meters\[0\]\.cjt188: only for cjt188 meters"):
        load_config(path, secrets=False)

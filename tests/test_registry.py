"""The protocol registry is the one place that says what each meter protocol can do."""

from __future__ import annotations

import ast
import asyncio
import typing
from pathlib import Path
from typing import Final

import pytest

from meter_gateway.drivers import registry
from meter_gateway.drivers.registry import Can
from meter_gateway.gateway.config import Meter, SerialBus, TcpBus
from tests.plugins.simulators import SimBusFactory


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


# -- the hooks: every protocol names what each part of the gateway asks of it -------------------------


@pytest.mark.parametrize("name", list(registry.PROTOCOLS))
def test_every_hook_a_protocol_names_resolves(name: str) -> None:
    """Each "module:function" (or callable) an entry names imports and is callable; the hooks every
    protocol needs (driver, command actuator, model files) are named."""
    info = registry.get(name)
    assert callable(info.build_driver())
    assert callable(info.build_actuator())
    assert callable(info.model_builder())
    assert registry.of_family(info.family) is not None
    for hook in (
        info.discoverer(),
        info.event_describer(),
        info.simulated_meter(),
        info.simulated_group_meter(),
        info.broadcaster(),
    ):
        assert hook is None or callable(hook)


@pytest.mark.parametrize("name", list(registry.PROTOCOLS))
def test_capabilities_and_hooks_agree(name: str) -> None:
    info = registry.get(name)
    on_byte_buses = bool(info.buses & registry.BYTE_BUSES)
    if Can.DISCOVER in info.can and on_byte_buses:  # a Modbus bus is scanned by unit id instead
        assert info.discoverer() is not None
    if info.control_password:
        assert info.password is not None  # the password it needs can be configured
    if info.bus_preamble or info.typed_meters:
        assert on_byte_buses
    # a byte protocol is simulated per meter, both for the demo and in the simulator's own config
    assert (info.simulated_meter() is not None) == on_byte_buses
    assert (info.simulated_group_meter() is not None) == on_byte_buses
    # protocols of one family share its model files
    assert info.models == registry.of_family(info.family).models  # type: ignore[union-attr]


@pytest.mark.parametrize("name", list(registry.PROTOCOLS))
def test_the_shipped_models_of_each_protocol_load_through_its_family_builder(name: str) -> None:
    from meter_gateway.drivers.meter_models import load_model
    from meter_gateway.gateway.cli.field_bus import shipped_models

    info = registry.get(name)
    names = shipped_models(name)
    assert names, f"no shipped model for {name}"
    for model_name in names:
        model = load_model(model_name)
        assert model.protocol == info.family
        edition = getattr(model, "edition", None)
        if info.edition:
            assert edition is not None
            assert edition.value == info.edition


def test_an_unknown_model_family_names_the_registered_ones(tmp_path: Path) -> None:
    from meter_gateway.drivers.meter_models import ModelError, load_model

    path = tmp_path / "m.toml"
    path.write_text('name = "m"\nprotocol = "iec62056"\n')
    with pytest.raises(ModelError, match="protocol: must be") as info:
        load_model(path)
    for family in registry.families():
        assert f"'{family}'" in str(info.value)


@pytest.mark.parametrize("name", list(registry.PROTOCOLS))
def test_the_actuator_is_the_class_the_registry_names(name: str) -> None:
    """make_actuator builds what the entry names, by protocol or by the driver's module."""
    from meter_gateway.gateway.commands.actuators import make_actuator

    info = registry.get(name)
    actuator_class = info.build_actuator()
    driver_module = info.driver.partition(":")[0]
    fake_driver = type("FakeDriver", (), {"__module__": driver_module, "meter_id": "m", "model": None})()
    assert type(make_actuator(fake_driver, protocol=name)) is actuator_class
    assert registry.of_driver(fake_driver).family == info.family
    assert type(make_actuator(fake_driver)) is actuator_class


def test_an_unregistered_driver_has_no_protocol() -> None:
    with pytest.raises(KeyError, match="no registered protocol"):
        registry.of_driver(object())


def test_the_simulator_protocols_are_the_registrys_byte_protocols_and_modbus_framings() -> None:
    from meter_gateway.simulators import sim_config

    byte = [p.name for p in registry.PROTOCOLS.values() if p.buses & registry.BYTE_BUSES]
    assert list(sim_config.BYTE_PROTOCOLS) == byte
    assert set(sim_config.PROTOCOLS) == set(byte) | set(sim_config.MODBUS_FRAMINGS)
    for protocol in sim_config.PROTOCOLS:
        assert sim_config.family(protocol) in registry.families()


# -- the seam holds: no module outside protocols/<name>/ and the registry tests protocol names ------

_ROOT = Path(registry.__file__).resolve().parents[1]
# Product code checked (bench/, fuzz/ and tests/ are harnesses that pick what to run).
_CHECKED = ("gateway", "drivers", "simulators", "protocols")
# Bus-framing details: these compare a *bus's* protocol, whose framing is the bus's own business
# (Modbus TCP's MBAP header or RTU frames), not what a meter protocol can do.
_ALLOWED: Final = frozenset(
    {
        ("gateway/config.py", "modbus-tcp"),  # a serial port cannot carry Modbus TCP framing
        ("gateway/daemon/meters.py", "modbus-tcp"),  # a Modbus bus's framing: MBAP or RTU
        ("gateway/cli/demo.py", "modbus-tcp"),  # the simulated Modbus server's framing
    }
)


def _protocol_names() -> set[str]:
    from meter_gateway.simulators.sim_config import MODBUS_FRAMINGS

    return set(registry.PROTOCOLS) | set(registry.families()) | set(registry.BUS_PROTOCOLS) | set(MODBUS_FRAMINGS)


def _product_files() -> list[Path]:
    out: list[Path] = []
    for top in _CHECKED:
        for path in sorted((_ROOT / top).rglob("*.py")):
            rel = path.relative_to(_ROOT)
            if rel.parts[0] == "protocols" and len(rel.parts) > 2:
                continue  # protocols/<name>/: a protocol's own package may name itself
            if rel.as_posix() == "drivers/registry.py":
                continue
            out.append(path)
    return out


def _strings(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.Set | ast.Tuple | ast.List):
        return [s for element in node.elts for s in _strings(element)]
    return []


def _name_tests(tree: ast.AST, names: set[str]) -> list[tuple[int, str]]:
    """(line, name) of each comparison, membership test, prefix test or match case against a
    protocol name literal."""
    families = {name.split("-")[0] for name in names}
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for operand in [node.left, *node.comparators]:
                found += [(node.lineno, s) for s in _strings(operand) if s in names]
                if isinstance(operand, ast.JoinedStr) and operand.values:  # f"dlt645-{edition}"
                    found += [(node.lineno, s) for s in _strings(operand.values[0]) if s.split("-")[0] in families]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in {"startswith", "endswith"}:
                for arg in node.args:
                    found += [(node.lineno, s) for s in _strings(arg) if s and s.split("-")[0] in families]
        elif isinstance(node, ast.MatchValue):
            found += [(node.lineno, s) for s in _strings(node.value) if s in names]
    return found


def test_no_module_outside_the_protocol_packages_and_the_registry_tests_a_protocol_name() -> None:
    """Adding a protocol means its package, driver, simulated meter, model files and one registry
    entry: code elsewhere asks the registry what a protocol can do, never which one it is."""
    names = _protocol_names()
    offenders: list[str] = []
    files = _product_files()
    assert len(files) > 50  # the walk found the product
    for path in files:
        rel = path.relative_to(_ROOT).as_posix()
        tree = ast.parse(path.read_text("utf-8"), filename=rel)
        offenders += [
            f"{rel}:{line}: {name!r}" for line, name in _name_tests(tree, names) if (rel, name) not in _ALLOWED
        ]
    assert not offenders, "protocol names tested outside the registry:\n" + "\n".join(offenders)


def test_the_name_test_finder_finds_each_kind_of_test() -> None:
    source = (
        'a == "dlt645"\nb.startswith("dlt645")\nc in {"cjt188", "x"}\n"modbus-tcp" != d\n'
        'match e:\n    case "dlt698":\n        pass\nf == "dlt6450"\ng != f"dlt645-{h}"\n'
    )
    found = sorted(_name_tests(ast.parse(source), _protocol_names()))
    assert found == [(1, "dlt645"), (2, "dlt645"), (3, "cjt188"), (4, "modbus-tcp"), (6, "dlt698"), (9, "dlt645-")]


@pytest.mark.asyncio
async def test_control_without_the_password_its_protocol_needs_is_refused_before_anything_is_sent(
    tmp_path: Path, sim_bus: SimBusFactory
) -> None:
    """``control_password`` (DL/T 645): a meter configured without credentials is not controllable."""
    import msgspec

    from tests.test_command_exec import dlt_rig, envelope, make_config, mid

    assert registry.get("dlt645-2007").control_password
    handle = await sim_bus(1)
    (meter,) = handle.meters
    async with dlt_rig(tmp_path, handle) as rig:
        bare = [msgspec.structs.replace(m, credentials=None) for m in rig.config.meters]
        rig.config = make_config(tmp_path, bare)
        await rig.start()
        cut = envelope("disconnect", [mid(meter)])
        await rig.send(cut)
        for _ in range(200):
            if rig.of(cut.id, mid(meter)):
                break
            await asyncio.sleep(0.01)
        final = rig.of(cut.id, mid(meter))[-1]
        assert (final.state, final.reason) == ("rejected", "unsupported")
        assert "no meter password" in (final.detail or "")
        assert meter.relay_closed

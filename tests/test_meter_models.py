"""Meter model files: every shipped model loads; mistakes are rejected naming file and key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from meter_gateway.drivers.errors import ConfigurationError
from meter_gateway.drivers.meter_models import (
    MODELS_DIR,
    Dlt645Model,
    ModbusModel,
    ModelError,
    available_models,
    canonical_unit,
    load_model,
)
from meter_gateway.protocols.dlt645.edition import Edition

SHIPPED = [
    "chint-dtsu666",
    "cjt188-cold-water",
    "cjt188-gas",
    "cjt188-heat",
    "dlt645-1997-generic",
    "dlt645-2007-generic",
    "dlt698-generic",
    "dlt698-single-phase-prepaid",
    "eastron-sdm630",
    "sim-3ph",
]


def test_the_shipped_models_are_available() -> None:
    assert available_models() == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_each_shipped_model_loads_and_cites_its_source(name: str) -> None:
    model = load_model(name)
    assert model.name == name
    assert model.source.title
    assert model.points
    for p in model.points:
        assert p.source, f"{name}: {p.quantity} has no citation"
    assert load_model(name) is model  # cached: hundreds of meters share one model
    assert load_model(MODELS_DIR / f"{name}.toml") is model


@pytest.mark.parametrize("name", ["sim-3ph", "eastron-sdm630", "chint-dtsu666"])
def test_modbus_points_use_canonical_units_and_fit(name: str) -> None:
    model = load_model(name)
    assert isinstance(model, ModbusModel)
    for p in model.points:
        assert p.unit == canonical_unit(p.quantity)
        assert p.count <= model.max_registers_per_read
        assert p.address >= 0
        assert p.end <= 0x10000


def test_sim_model_has_both_tables_and_a_relay() -> None:
    model = load_model("sim-3ph")
    assert isinstance(model, ModbusModel)
    assert model.variants == ("", "int32")
    floats = {p.quantity: p for p in model.points if p.variant == ""}
    ints = {p.quantity: p for p in model.points if p.variant == "int32"}
    assert set(ints) == set(floats) - {"relay.state"}
    assert floats["voltage.l1"].function == 4
    assert floats["voltage.l1"].type == "float32"
    v = ints["voltage.l1"]
    assert (v.function, v.type, v.word_order, v.scale) == (3, "u32", "little", 0.01)
    assert ints["power.active.total"].type == "i32"
    assert model.point("voltage.l1", "int32") is v
    assert model.point("relay.state", "int32") is floats["relay.state"]  # falls back to the default
    assert model.relay is not None
    assert (model.relay.write.function, model.relay.write.address, model.relay.write.closed) == (1, 0, 1)


def test_sdm630_addresses_are_zero_based() -> None:
    model = load_model("eastron-sdm630")
    assert isinstance(model, ModbusModel)
    by_q = {p.quantity: p for p in model.points}
    assert by_q["voltage.l1"].address == 0  # 30001
    assert by_q["frequency"].address == 0x46  # 30071
    assert by_q["energy.active.import.total"].address == 0x48  # 30073
    assert by_q["power.active.total"].scale == 0.001  # W -> kW
    assert model.max_registers_per_read == 80
    assert all(p.function == 4 and p.type == "float32" for p in model.points)


def test_dlt645_models() -> None:
    m07 = load_model("dlt645-2007-generic")
    assert isinstance(m07, Dlt645Model)
    assert m07.edition is Edition.DLT645_2007
    assert m07.supports_block_reads
    assert m07.format_di(m07.di_for("energy.active.import.total")) == "00010000"
    assert m07.format_di(m07.di_for("frequency")) == "02800002"
    assert m07.format_di(m07.di_for("status.word3")) == "04000503"
    block = next(b for b in m07.blocks if m07.format_di(b.di) == "0001FF00")
    assert block.covers[0] == "energy.active.import.total"
    assert block.covers[-1] == "energy.active.import.t4"
    assert m07.relay is not None
    assert (m07.relay.bit, m07.relay.open_when) == (4, 1)

    m97 = load_model("dlt645-1997-generic")
    assert isinstance(m97, Dlt645Model)
    assert m97.edition is Edition.DLT645_1997
    assert m97.format_di(m97.di_for("energy.active.import.total")) == "9010"
    assert m97.format_di(m97.di_for("voltage.l2")) == "B612"
    assert m97.format_di(m97.di_for("clock.time")) == "C011"
    with pytest.raises(ConfigurationError, match="no data identifier for 'frequency'"):
        m97.di_for("frequency")


def test_unknown_model_name_suggests() -> None:
    with pytest.raises(ModelError, match=r"no meter model named 'sdm630'.*available: .*eastron-sdm630"):
        load_model("sdm630")
    with pytest.raises(ModelError, match="did you mean 'sim-3ph'"):
        load_model("sim-3hp")


def test_layout_override_changes_every_register_point() -> None:
    model = load_model("sim-3ph")
    assert isinstance(model, ModbusModel)
    cdab = model.with_layout(word_order="little")
    assert all(p.word_order == "little" for p in cdab.points if p.codec is not None)
    assert cdab.point("voltage.l1").codec is not None
    assert cdab.point("voltage.l1").codec.layout == "CDAB"  # type: ignore[union-attr]
    assert model.point("voltage.l1").word_order == "big"  # the original is untouched


# -- validation: mutate a shipped file, expect a clear error ----------------------------------


def _variant(tmp_path: Path, name: str, old: str, new: str, *, count: int = 1) -> Path:
    text = (MODELS_DIR / f"{name}.toml").read_text()
    assert text.count(old) >= 1, f"{old!r} not in {name}"
    path = tmp_path / f"{name}.toml"
    path.write_text(text.replace(old, new, count))
    return path


@pytest.mark.parametrize(
    ("name", "old", "new", "error"),
    [
        # a typo'd key is named, with the file's key path and a suggestion
        (
            "sim-3ph",
            '{ quantity = "voltage.l1", address = 0x0000, unit = "V" }',
            '{ quantity = "voltage.l1", adress = 0x0000, unit = "V" }',
            r"sections\[0\]\.points\[0\]\.adress: unknown key \(did you mean 'address'\?\)",
        ),
        ("sim-3ph", "max_gap = 8", "max_gaps = 8", r"defaults\.max_gaps: unknown key \(did you mean 'max_gap'\?\)"),
        ("sim-3ph", 'vendor = "meter-gateway"', 'vendr = "x"', r"vendr: unknown key"),
        (
            "sim-3ph",
            'quantity = "voltage.l1", address = 0x0000',
            'quantity = "voltage.L1", address = 0x0000',
            r"sections\[0\]\.points\[0\]\.quantity: 'voltage.L1' is not a canonical quantity name "
            r"\(did you mean 'voltage.l1'\?\)",
        ),
        (
            "sim-3ph",
            '{ quantity = "voltage.l1", address = 0x0000, unit = "V" }',
            '{ quantity = "voltage.l1", address = 0x0000, unit = "kV" }',
            r"points\[0\]\.unit: voltage.l1 is reported in 'V', not 'kV'",
        ),
        (
            "eastron-sdm630",
            '{ quantity = "power.active.l1", address = 0x000C, scale = 0.001 }',
            '{ quantity = "power.active.l1", address = 0x000C, unit = "W" }',
            r"reported in 'kW', not 'W'.*scale = 0\.001",
        ),
        ("sim-3ph", 'function = "input"', 'function = "inputs"', r"defaults\.function: 'inputs' is not one of"),
        ("sim-3ph", 'type = "float32"', 'type = "float"', r"unknown data type 'float'"),
        ("sim-3ph", 'word_order = "little"', 'word_order = "litle"', r"word_order must be 'big' or 'little'"),
        ("sim-3ph", "max_registers_per_read = 64", "max_registers_per_read = 200", r"must be 1\.\.125"),
        ("sim-3ph", "max_registers_per_read = 64", 'max_registers_per_read = "64"', r"must be an integer"),
        (
            "sim-3ph",
            '{ quantity = "voltage.l2", address = 0x0002, unit = "V" }',
            '{ quantity = "voltage.l1", address = 0x0002, unit = "V" }',
            r"points\[1\]: duplicate point for 'voltage.l1'.*first at sections\[0\]\.points\[0\]",
        ),
        (
            "sim-3ph",
            '{ quantity = "voltage.l1", address = 0x0000, unit = "V" }',
            '{ quantity = "voltage.l1", address = 0xFFFF, unit = "V" }',
            r"runs past register 65535",
        ),
        ("sim-3ph", 'name = "sim-3ph"', 'name = "sim3ph"', r"name: 'sim3ph' must match the file name"),
        ("sim-3ph", "[source]\ntitle", "[source]\ntitel", r"source\.titel: unknown key"),
        ("sim-3ph", 'relay.state", address = 0x0000 }', 'relay.state", address = 0x0000, type = "u16" }', "'bool'"),
        (
            "sim-3ph",
            "closed = 1, open = 0 }",
            "closed = 1, open = 1 }",
            r"relay\.write: 'closed' and 'open' must differ",
        ),
        (
            "sim-3ph",
            'protocol = "modbus"',
            'protocol = "modbus-tcp"',
            r"protocol: must be 'dlt645', 'dlt698', 'cjt188' or 'modbus'",
        ),
        (
            "dlt645-2007-generic",
            'di = "00010000"',
            'di = "0001000"',
            r"DL/T 645-2007 DI is 8 hex digits, got '0001000'",
        ),
        ("dlt645-1997-generic", 'di = "9010"', 'di = "00010000"', r"DL/T 645-1997 DI is 4 hex digits"),
        ("dlt645-2007-generic", 'edition = "2007"', 'edition = "2009"', r"edition: unknown DL/T 645 edition"),
        (
            "dlt645-2007-generic",
            '"energy.active.import.t4"]',
            '"energy.active.import.t5"]',
            r"blocks\[0\]\.covers: 'energy.active.import.t5' is not a point of this model",
        ),
        (
            "dlt645-2007-generic",
            "supports_block_reads = true",
            "supports_block_reads = false",
            r"blocks: blocks are listed but supports_block_reads is false",
        ),
        (
            "dlt645-2007-generic",
            '{ quantity = "clock.date", di = "04000101" }',
            '{ quantity = "clock.dat", di = "04000101" }',
            r"'clock.dat' is not a known quantity name",
        ),
        ("dlt645-2007-generic", "open_when = 1", "open_when = 2", r"relay: bit must be 0..15 and open_when 0 or 1"),
    ],
)
def test_invalid_models_are_rejected_with_file_and_key(
    tmp_path: Path, name: str, old: str, new: str, error: str
) -> None:
    path = _variant(tmp_path, name, old, new)
    with pytest.raises(ModelError) as info:
        load_model(path)
    message = str(info.value)
    assert message.startswith(str(path)), message
    assert re.search(error, message), message
    assert isinstance(info.value, ConfigurationError)


def test_broken_toml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.toml"
    bad.write_text('name = "broken"\nprotocol = \n')
    with pytest.raises(ModelError, match=r"broken\.toml: not valid TOML"):
        load_model(bad)
    with pytest.raises(ModelError, match="cannot read meter model"):
        load_model(tmp_path / "nope.toml")


def test_missing_required_key(tmp_path: Path) -> None:
    path = _variant(tmp_path, "sim-3ph", "max_registers_per_read = 64\n", "")
    with pytest.raises(ModelError, match=r"defaults\.max_registers_per_read: missing"):
        load_model(path)


def test_edited_file_is_reloaded(tmp_path: Path) -> None:
    path = _variant(tmp_path, "sim-3ph", "max_gap = 8", "max_gap = 3")
    first = load_model(path)
    assert isinstance(first, ModbusModel)
    assert first.max_gap == 3
    path.write_text(path.read_text().replace("max_gap = 3", "max_gap = 40"))
    second = load_model(path)
    assert isinstance(second, ModbusModel)
    assert second.max_gap == 40


def test_unknown_quantity_asked_of_a_model() -> None:
    model = load_model("sim-3ph")
    assert isinstance(model, ModbusModel)
    with pytest.raises(ConfigurationError, match=r"no point for 'voltage.l4' \(did you mean 'voltage.l\d'\?\)"):
        model.points_for(["voltage.l4"])

"""CJ/T 188 model files: the shipped ones load with their settings; mistakes name file and key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from meter_gateway.drivers.cjt188_model import Cjt188Model
from meter_gateway.drivers.meter_models import MODELS_DIR, ModelError, load_model


def test_the_shipped_models_say_how_each_meter_is_spoken_to() -> None:
    water, gas, heat = (load_model(f"cjt188-{n}") for n in ("cold-water", "gas", "heat"))
    assert isinstance(water, Cjt188Model)
    assert isinstance(gas, Cjt188Model)
    assert isinstance(heat, Cjt188Model)
    assert (water.meter_type, water.meter_class, water.valve, water.battery) == (0x10, "water", True, True)
    assert (gas.meter_type, gas.meter_class, gas.preamble) == (0x30, "gas", 4)
    assert (heat.meter_type, heat.meter_class, heat.valve) == (0x20, "heat", False)
    assert "heat.total" in heat.quantities
    assert all(p.source.startswith("CJ/T 188-2004 clause 7") for m in (water, gas, heat) for p in m.points)


@pytest.mark.parametrize(
    ("old", "new", "error"),
    [
        ('meter_type = "10"', 'meter_type = "60"', r"meter_type: 60 is no water, heat, gas or other meter type"),
        ('meter_type = "10"', "meter_type = 16", r"meter_type: must be a string"),
        ('di_order = "standard"', 'di_order = "reversed"', r"di_order: must be one of standard, swapped"),
        ("preamble = 4", "preamble = 40", r"preamble: FE wake-up bytes must be 0..16"),
        ("valve = true", "valve = false", r"points\[2\]\.quantity: valve.state needs valve = true"),
        ("preamble = 4", "preambel = 4", r"preambel: unknown key \(did you mean 'preamble'\?\)"),
        (
            'quantity = "volume.total", di = "901F"',
            'quantity = "volume.total", di = "D120"',
            r"does not carry volume.total",
        ),
        (
            'quantity = "volume.total", di = "901F"',
            'quantity = "heat.total", di = "901F"',
            r"does not carry heat.total",
        ),
        (
            'quantity = "volume.total", di = "901F"',
            'quantity = "volume.totl", di = "901F"',
            r"is not a CJ/T 188 quantity",
        ),
        ('quantity = "volume.total", di = "901F"', 'quantity = "volume.total", di = "90F"', r"4 hex digits"),
    ],
)
def test_mistakes_are_rejected_with_file_and_key(tmp_path: Path, old: str, new: str, error: str) -> None:
    text = (MODELS_DIR / "cjt188-cold-water.toml").read_text(encoding="utf-8")
    assert old in text
    path = tmp_path / "cjt188-cold-water.toml"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    with pytest.raises(ModelError) as info:
        load_model(path)
    message = str(info.value)
    assert message.startswith(str(path)), message
    assert re.search(error, message), message

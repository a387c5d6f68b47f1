"""A reload that drops a DL/T 698.45 meter and keeps its bus lets go of the meter's driver: the
bus no longer routes what that meter sends unasked to it, and nothing keeps it; the meters that
stay keep their drivers and routes."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest

from meter_gateway.drivers.dlt698_driver import Dlt698Driver, _share
from meter_gateway.drivers.health import HealthBook
from meter_gateway.gateway.config import diff, load_config
from meter_gateway.gateway.daemon.meters import Fleet


def config_text(state: Path, meters: list[str]) -> str:
    lines = [
        "[gateway]",
        'id = "gw-698"',
        f'state_dir = "{state}"',
        "",
        "[uplink]",
        'host = "127.0.0.1"',
        "port = 1883",
        "",
        "[[buses]]",
        'name = "line"',
        'type = "tcp"',
        'host = "127.0.0.1"',
        "port = 9",  # never opened: the fleet is built and reloaded, not run
        'protocol = "dlt698"',
        "",
    ]
    for address in meters:
        lines += [
            "[[meters]]",
            f'id = "m{address[-2:]}"',
            'bus = "line"',
            'protocol = "dlt698"',
            f'address = "{address}"',
            'model = "dlt698-generic"',
            "",
        ]
    return "\n".join(lines)


@pytest.mark.asyncio
async def test_a_reload_that_drops_a_meter_detaches_its_driver_and_keeps_the_others(tmp_path: Path) -> None:
    old_path, new_path = tmp_path / "old.toml", tmp_path / "new.toml"
    old_path.write_text(config_text(tmp_path / "state", ["000000000001", "000000000002"]))
    new_path.write_text(config_text(tmp_path / "state", ["000000000001"]))
    old, new = load_config(old_path), load_config(new_path)
    fleet = Fleet(HealthBook())
    fleet.build(old)
    bus = fleet.buses["line"]
    kept, dropped = fleet.meters["m01"].driver, fleet.meters["m02"].driver
    assert isinstance(kept, Dlt698Driver)
    assert isinstance(dropped, Dlt698Driver)
    routes = _share(bus).drivers
    assert routes == {bytes.fromhex("010000000000"): kept, bytes.fromhex("020000000000"): dropped}
    gone = weakref.ref(dropped)
    del dropped
    buses, meters = await fleet.apply(old, new, diff(old, new))
    assert buses == set()
    assert meters == {"m02"}
    gc.collect()
    assert gone() is None  # nothing keeps the dropped meter's driver
    assert fleet.buses["line"] is bus
    assert fleet.meters["m01"].driver is kept
    assert routes == {bytes.fromhex("010000000000"): kept}
    await fleet.close()

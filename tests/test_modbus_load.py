"""The shared simulated load (simulators/load.py): physics consistency, determinism, energy, relay."""

from __future__ import annotations

import math

import pytest

from meter_gateway.simulators.load import DEFAULT_TARIFFS, LoadModel, LoadSettings, TariffSchedule

T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC
DAY = 86400.0


def _midnight(t: float) -> float:
    return t - t % DAY


def test_powers_are_consistent_with_each_other() -> None:
    model = LoadModel(LoadSettings(seed=5, pv_peak_current=12.0), start=_midnight(T0))
    for hour in (3, 8, 12.5, 19.5):
        model.advance(_midnight(T0) + hour * 3600)
        v = model.values()
        for k in (1, 2, 3):
            p, q, s = v[f"power.active.l{k}"], v[f"power.reactive.l{k}"], v[f"power.apparent.l{k}"]
            assert s == pytest.approx(math.hypot(p, q), rel=1e-9)
            assert v[f"current.l{k}"] == pytest.approx(s * 1000 / v[f"voltage.l{k}"], rel=1e-9)
            assert v[f"power_factor.l{k}"] == pytest.approx(p / s, rel=1e-9)
            assert 215 < v[f"voltage.l{k}"] < 240
        assert v["power.active.total"] == pytest.approx(sum(v[f"power.active.l{k}"] for k in (1, 2, 3)))
        assert v["power.apparent.total"] == pytest.approx(sum(v[f"power.apparent.l{k}"] for k in (1, 2, 3)))
        assert v["power_factor.total"] == pytest.approx(v["power.active.total"] / v["power.apparent.total"])
        assert 49.9 < v["frequency"] < 50.1
        assert 0 <= v["current.n"] <= max(v[f"current.l{k}"] for k in (1, 2, 3)) * 2


def test_daily_profile_and_pv_export() -> None:
    model = LoadModel(LoadSettings(seed=1, pv_peak_current=15.0), start=_midnight(T0))
    model.advance(_midnight(T0) + 3 * 3600)
    night = model.values()
    model.advance(_midnight(T0) + 12 * 3600)
    noon = model.values()
    model.advance(_midnight(T0) + 19.5 * 3600)
    evening = model.values()
    assert evening["current.l1"] > 5 * night["current.l1"]  # evening peak vs night base
    assert noon["power.active.total"] < 0  # PV exceeds the midday load: exporting
    assert noon["power_factor.total"] < 0
    assert model.energy("energy.active.export.total") > 0


def test_same_seed_same_values_other_seed_other_values() -> None:
    a = LoadModel(LoadSettings(seed=7), start=T0)
    b = LoadModel(LoadSettings(seed=7), start=T0)
    c = LoadModel(LoadSettings(seed=8), start=T0)
    for m in (a, b, c):
        m.advance(T0 + 3600)
    assert a.values() == b.values()
    assert a.values()["voltage.l1"] != c.values()["voltage.l1"]


def test_energy_does_not_depend_on_how_time_was_advanced() -> None:
    settings = LoadSettings(seed=3, pv_peak_current=10.0)
    once = LoadModel(settings, start=T0)
    once.advance(T0 + DAY)
    stepped = LoadModel(settings, start=T0)
    t = T0
    while t < T0 + DAY:
        t = min(T0 + DAY, t + 873.3)
        stepped.advance(t)
    for name in ("energy.active.import.total", "energy.active.export.total", "energy.reactive.import.total"):
        assert stepped.energy(name) == pytest.approx(once.energy(name), rel=1e-12, abs=1e-9)


def test_energy_matches_integrated_power_and_totals_sum_tariffs() -> None:
    model = LoadModel(LoadSettings(seed=2), start=T0)
    hours = 6
    samples = []
    for minute in range(hours * 60):
        model.advance(T0 + minute * 60 + 30)  # cell midpoints: noise-free power is what is integrated
        samples.append(model.values()["power.active.total"])
    model.advance(T0 + hours * 3600)
    expected = sum(samples) / 60  # kWh, 1-minute rectangles
    # instantaneous values carry fast voltage noise the energy integration does not; tolerate it
    assert model.energy("energy.active.import.total") == pytest.approx(expected, rel=0.01)
    total = model.energy("energy.active.import.total")
    parts = [model.energy(f"energy.active.import.t{t}") for t in range(1, DEFAULT_TARIFFS.tariffs + 1)]
    assert total == pytest.approx(math.fsum(parts))

    assert model.values()["energy.active.import.total"] == total


@pytest.mark.parametrize(
    "name", ["energy.active.import.t5", "energy.apparent.import.total", "energy.active.total", "total", ""]
)
def test_unknown_energy_registers_are_key_errors(name: str) -> None:
    with pytest.raises(KeyError):
        LoadModel(start=T0).energy(name)


def test_energy_goes_into_the_scheduled_tariff() -> None:
    schedule = TariffSchedule.parse([("00:00", 2), ("06:00", 1)])
    start = _midnight(T0)
    model = LoadModel(LoadSettings(seed=1, tariffs=schedule), start=start)
    model.advance(start + 6 * 3600)
    assert model.energy("energy.active.import.t1") == 0
    night = model.energy("energy.active.import.t2")
    assert night > 0
    model.advance(start + 7 * 3600)
    assert model.energy("energy.active.import.t1") > 0
    assert model.energy("energy.active.import.t2") == night
    assert schedule.tariff_at(23 * 60) == 1
    assert schedule.tariff_at(0) == 2


def test_utc_offset_moves_the_profile() -> None:
    start = _midnight(T0)
    utc = LoadModel(LoadSettings(seed=1), start=start)
    shifted = LoadModel(LoadSettings(seed=1, utc_offset=8 * 3600), start=start)
    utc.advance(start + 11.5 * 3600)  # 19:30 local for the +8 h model: its evening peak
    shifted.advance(start + 11.5 * 3600)
    assert shifted.values()["current.l1"] > 2 * utc.values()["current.l1"]


def test_open_relay_cuts_current_and_stops_energy() -> None:
    model = LoadModel(LoadSettings(seed=4), start=T0)
    model.advance(T0 + 3600)
    before = model.energy("energy.active.import.total")
    assert before > 0
    model.set_relay(False, at=T0 + 3600)
    model.advance(T0 + 3 * 3600)
    v = model.values()
    assert v["relay.state"] == 0
    assert model.energy("energy.active.import.total") == before
    for k in (1, 2, 3):
        assert v[f"current.l{k}"] == 0
        assert v[f"power.active.l{k}"] == 0
        assert v[f"voltage.l{k}"] > 200  # the supply side is still live
    assert v["current.n"] == 0
    assert v["power_factor.total"] == 1.0
    model.set_relay(True, at=T0 + 4 * 3600)
    model.advance(T0 + 5 * 3600)
    assert model.values()["relay.state"] == 1
    assert model.energy("energy.active.import.total") > before


def test_time_never_runs_backwards() -> None:
    model = LoadModel(LoadSettings(seed=1), start=T0)
    model.advance(T0 + 7200)
    energy = model.energy("energy.active.import.total")
    model.advance(T0 + 3600)
    assert model.time == T0 + 7200
    assert model.energy("energy.active.import.total") == energy


def test_initial_energy_and_validation() -> None:
    model = LoadModel(LoadSettings(initial_energy={"energy.active.import.t3": 1520.25}), start=T0)
    assert model.energy("energy.active.import.total") == 1520.25
    with pytest.raises(ValueError, match=r"unknown register 'energy\.active\.import\.total'"):
        LoadModel(LoadSettings(initial_energy={"energy.active.import.total": 1.0}), start=T0)
    with pytest.raises(KeyError):
        model.energy("energy.apparent.import.total")
    with pytest.raises(ValueError, match="sorted"):
        TariffSchedule(((600, 1), (300, 2)))


def test_one_value_is_the_same_as_in_all_values() -> None:
    model = LoadModel(LoadSettings(seed=6, pv_peak_current=8.0), start=T0)
    for step, relay in ((0.0, True), (0.4, True), (3600.7, True), (7200.2, False), (7200.9, False), (9000.0, True)):
        model.set_relay(relay, at=T0 + step)
        everything = model.values()
        assert {name: model.value(name) for name in everything} == everything
    with pytest.raises(KeyError):
        model.value("voltage.l4")


def test_instantaneous_values_hold_for_a_measurement_cycle_and_energy_does_not() -> None:
    model = LoadModel(LoadSettings(seed=9), start=T0 + 3600.0)
    model.advance(T0 + 7200.1)
    first = model.values()
    model.advance(T0 + 7200.9)  # the same second
    same = model.values()
    model.advance(T0 + 7201.0)  # the next one
    later = model.values()
    assert same["voltage.l1"] == first["voltage.l1"]
    assert same["power.active.total"] == first["power.active.total"]
    assert same["energy.active.import.total"] > first["energy.active.import.total"]
    assert later["voltage.l1"] != first["voltage.l1"]
    model.set_relay(False, at=T0 + 7201.5)  # opening the relay shows at once, mid-cycle
    assert model.value("power.active.total") == 0.0
    assert model.value("relay.state") == 0.0

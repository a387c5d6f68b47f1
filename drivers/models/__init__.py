"""Meter model files (TOML), loaded by drivers.meter_models; a package so wheels ship them."""

"""Packaged CJ/T 188 tables (TOML), read by meter_gateway.protocols.cjt188.catalogue."""

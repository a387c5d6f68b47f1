"""Packaged DL/T 645 data-identifier tables (TOML), read by protocols.dlt645.catalogue."""

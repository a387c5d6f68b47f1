"""Decode the error byte/word of abnormal replies into named flags (tables in data/error_words.toml)."""

from __future__ import annotations

import functools
import tomllib
from importlib import resources

from meter_gateway.protocols.dlt645.edition import Edition


@functools.cache
def _tables() -> dict[str, tuple[str, ...]]:
    text = resources.files("meter_gateway.protocols.dlt645").joinpath("data/error_words.toml").read_text("utf-8")
    raw = tomllib.loads(text)
    return {name: tuple(str(bit) for bit in table["bits"]) for name, table in raw.items()}


def _flags(table: str, word: int) -> tuple[str, ...]:
    names = _tables()[table]
    flags = [names[i] if i < len(names) else f"bit{i}" for i in range(word.bit_length()) if word >> i & 1]
    return tuple(flags)


def error_flags(edition: Edition, code: int) -> tuple[str, ...]:
    """Flags of the one-byte ERR of an abnormal reply."""
    return _flags("err_2007" if edition is Edition.DLT645_2007 else "err_1997", code)


def remote_control_flags(word: int) -> tuple[str, ...]:
    """Flags of the two-byte error word of a 0xDC reply."""
    return _flags("remote_control_2007", word)


def describe_flags(flags: tuple[str, ...]) -> str:
    return ", ".join(flag.replace("_", " ") for flag in flags) or "no flag set"

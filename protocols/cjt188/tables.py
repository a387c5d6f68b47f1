"""The packaged table file ``data/cjt188.toml``, parsed once.

The catalogue, the status word and the meter types all come from this one file, so the
protocol's facts live in data, each with its source.
"""

from __future__ import annotations

import functools
from typing import Any, Final

from meter_gateway.protocols.cjt188.errors import LocalProtocolError
from meter_gateway.protocols.package_data import read_packaged

DATA_FILE: Final = "cjt188.toml"


def parse_tables(text: str, origin: str = DATA_FILE) -> dict[str, Any]:
    import tomllib

    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise LocalProtocolError(f"{origin}: not valid TOML: {exc}") from None


def read_data_file() -> str:
    from meter_gateway.protocols.cjt188 import data

    try:
        return read_packaged(data, DATA_FILE)
    except (OSError, UnicodeDecodeError) as exc:
        raise LocalProtocolError(f"packaged CJ/T 188 table {DATA_FILE} cannot be read: {exc}") from None


@functools.cache
def default_tables() -> dict[str, Any]:
    """The parsed packaged table file (do not mutate it)."""
    return parse_tables(read_data_file())

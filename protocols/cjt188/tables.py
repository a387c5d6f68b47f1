"""The packaged table file ``data/cjt188.toml``, parsed once.

Read through the package's own loader (what :func:`pkgutil.get_data` does, so zip installs work
too); :mod:`importlib.resources` is the fallback. The catalogue, the status word and the meter
types all come from this one file, so the protocol's facts live in data, each with its source.
"""

from __future__ import annotations

import functools
from typing import Any, Final

from meter_gateway.protocols.cjt188.errors import LocalProtocolError

DATA_FILE: Final = "cjt188.toml"


def parse_tables(text: str, origin: str = DATA_FILE) -> dict[str, Any]:
    import tomllib

    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise LocalProtocolError(f"{origin}: not valid TOML: {exc}") from None


def read_data_file() -> str:
    import os

    from meter_gateway.protocols.cjt188 import data

    try:
        get_data = getattr(data.__spec__.loader, "get_data", None)
        if get_data is not None and data.__file__:
            raw = get_data(os.path.join(os.path.dirname(data.__file__), DATA_FILE))
            if isinstance(raw, bytes):
                return raw.decode("utf-8")
        from importlib import resources

        return resources.files(data).joinpath(DATA_FILE).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LocalProtocolError(f"packaged CJ/T 188 table {DATA_FILE} cannot be read: {exc}") from None


@functools.cache
def default_tables() -> dict[str, Any]:
    """The parsed packaged table file (do not mutate it)."""
    return parse_tables(read_data_file())

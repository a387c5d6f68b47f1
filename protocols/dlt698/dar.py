"""DAR result codes (DL/T 698.45-2017 clause 6.3.3, "DAR 数据访问结果"), loaded from ``data/dar.toml``.

A DAR is what a meter answers per object in GET/SET/ACTION responses and in SECURITY-Response
errors. Unknown codes are not an error: :func:`dar_name` says ``DAR nn``.
"""

from __future__ import annotations

import functools
import tomllib
from typing import NamedTuple

from meter_gateway.protocols.package_data import read_packaged

SUCCESS = 0


class DarInfo(NamedTuple):
    code: int
    key: str
    name: str  # the standard's text
    label: str  # English


@functools.cache
def table() -> dict[int, DarInfo]:
    """Every DAR code the standard names."""
    from meter_gateway.protocols.dlt698 import data

    text = read_packaged(data, "dar.toml")
    raw = tomllib.loads(text)["codes"]
    return {int(code): DarInfo(int(code), e["key"], e["name"], e["label"]) for code, e in raw.items()}


def dar_info(code: int) -> DarInfo | None:
    return table().get(code)


def dar_name(code: int) -> str:
    """The English label of ``code``, or ``DAR nn`` for a code the standard does not name."""
    info = table().get(code)
    return info.label if info is not None else f"DAR {code}"

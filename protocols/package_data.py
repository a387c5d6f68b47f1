"""The table files a protocol package ships in its ``data`` package (catalogues, code tables)."""

from __future__ import annotations

import os
from types import ModuleType

__all__ = ["read_packaged"]


def read_packaged(package: ModuleType, name: str) -> str:
    """The UTF-8 text of file ``name`` in the data package ``package``.

    Read through the package's own loader (what :func:`pkgutil.get_data` does, so zip installs
    work too) rather than :mod:`importlib.resources`, whose imports alone are a noticeable part of
    the CLI's start-up; importlib.resources remains the fallback. Raises OSError or
    UnicodeDecodeError.
    """
    spec = package.__spec__
    get_data = getattr(spec.loader, "get_data", None) if spec is not None else None
    if get_data is not None and package.__file__:
        raw = get_data(os.path.join(os.path.dirname(package.__file__), name))
        if isinstance(raw, bytes):
            return raw.decode("utf-8")
    from importlib import resources

    return resources.files(package).joinpath(name).read_text(encoding="utf-8")

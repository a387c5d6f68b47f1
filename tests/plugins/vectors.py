"""Protocol vectors kept in the repository (tests/vectors/, copied from the project's shared set).

Each file keeps its ``about`` text and every vector's ``source``: real frames from public sources
(captures, other implementations' tests, the standards' appendices) with the fields a correct
decoder must report. The tests read only these copies, so a clone with nothing beside it passes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

VECTORS_DIR = Path(__file__).resolve().parents[1] / "vectors"


def load_file(name: str) -> dict[str, Any]:
    """The whole vectors file ``name`` (``dlt645``, ``dlt698``, ``cjt188``): ``about``, ``vectors``..."""
    data: dict[str, Any] = json.loads((VECTORS_DIR / f"{name}.json").read_text("utf-8"))
    return data


def load_vectors(name: str = "dlt645") -> list[dict[str, Any]]:
    vectors: list[dict[str, Any]] = load_file(name)["vectors"]
    return vectors


@pytest.fixture(scope="session")
def dlt645_vectors() -> list[dict[str, Any]]:
    return load_vectors("dlt645")

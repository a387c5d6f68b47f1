"""The shared DL/T 645 vectors from ../shared/vectors/ (real frames from public sources)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

VECTORS_PATH = Path(__file__).resolve().parents[2].parent / "shared" / "vectors" / "dlt645.json"


def load_vectors() -> list[dict[str, Any]]:
    if not VECTORS_PATH.exists():
        raise FileNotFoundError(f"shared vectors not found at {VECTORS_PATH}")
    data = json.loads(VECTORS_PATH.read_text())
    vectors: list[dict[str, Any]] = data["vectors"]
    return vectors


@pytest.fixture(scope="session")
def dlt645_vectors() -> list[dict[str, Any]]:
    return load_vectors()

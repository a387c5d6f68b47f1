"""The two editions of DL/T 645. The edition is a per-meter property and is never guessed."""

from __future__ import annotations

import enum


class Edition(enum.Enum):
    DLT645_2007 = "2007"  # 4-byte data identifiers
    DLT645_1997 = "1997"  # 2-byte data identifiers

    # Bytes of a data identifier. A plain attribute set once per member, not a property: every
    # frame reads it, so it is a stored value rather than computed on each read.
    di_length: int

    def __init__(self, value: str) -> None:
        self.di_length = 4 if value == "2007" else 2

    def format_di(self, di: int) -> str:
        """Printed order, most significant byte first (``00010000``, ``9010``)."""
        return f"{di:0{self.di_length * 2}X}"

    @classmethod
    def parse(cls, text: str) -> Edition:
        for edition in cls:
            if text in {edition.value, f"dlt645-{edition.value}"}:
                return edition
        raise ValueError(f"unknown DL/T 645 edition {text!r} (expected '2007' or '1997')")

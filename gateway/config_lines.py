"""Where each key of a TOML file is written: ``key path -> line number``, for config messages.

tomllib returns values only, so a message about ``buses[2].baud_rate`` could not say where to look.
:func:`key_lines` reads the text once more and records the line of every table header, key, array
item and inline-table key, under the same paths the config checker uses (``meters[3].credentials``,
``poll_groups[0].meters[1]``). It runs only on text tomllib has accepted, so it can follow the
grammar loosely; whatever it cannot follow is left out rather than guessed, and :func:`line_of`
falls back to the nearest enclosing key (a missing key is reported at its table's header).
"""

from __future__ import annotations

import bisect
import contextlib
import re
import tomllib
from collections.abc import Mapping
from typing import Final

__all__ = ["key_lines", "line_of"]

_BARE_KEY: Final = re.compile(r"[A-Za-z0-9_-]+")
_LAST_PART: Final = re.compile(r"(?:\.[^.\[\]]+|\[\d+\])$")
_SCALAR_END: Final = re.compile(r"[,\]}\n#]")


def line_of(lines: Mapping[str, int], where: str) -> int | None:
    """The line of ``where``, else of its nearest enclosing key that has one, else None."""
    path = where
    while path:
        line = lines.get(path)
        if line is not None:
            return line
        cut = _LAST_PART.search(path)
        path = path[: cut.start()] if cut else ""
    return None


def key_lines(text: str) -> dict[str, int]:
    """Key paths of ``text`` (a valid TOML document) and the 1-based line each is first written on."""
    scanner = _Scanner(text)
    # text tomllib accepted but this scanner does not follow: keep the lines found so far
    with contextlib.suppress(IndexError, ValueError):
        scanner.document()
    return scanner.lines


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.i = 0
        self.starts = [0] + [m.end() for m in re.finditer("\n", text)]
        self.lines: dict[str, int] = {}
        self.array_tables: dict[str, int] = {}  # [[path]] -> index of its last table

    def line(self, at: int) -> int:
        return bisect.bisect_right(self.starts, at)

    def note(self, path: str, at: int) -> None:
        self.lines.setdefault(path, self.line(at))

    # -- layout ------------------------------------------------------------------------------

    def spaces(self) -> None:
        while self.i < len(self.text) and self.text[self.i] in " \t":
            self.i += 1

    def blank(self) -> None:
        """Spaces, newlines and comments (inside arrays and between statements)."""
        while self.i < len(self.text):
            ch = self.text[self.i]
            if ch in " \t\r\n":
                self.i += 1
            elif ch == "#":
                end = self.text.find("\n", self.i)
                self.i = len(self.text) if end < 0 else end
            else:
                return

    def expect(self, token: str) -> None:
        if not self.text.startswith(token, self.i):
            raise ValueError(f"expected {token!r} at offset {self.i}")
        self.i += len(token)

    # -- statements --------------------------------------------------------------------------

    def document(self) -> None:
        table = ""
        while True:
            self.blank()
            if self.i >= len(self.text):
                return
            if self.text.startswith("[[", self.i):
                table = self.header(array=True)
            elif self.text[self.i] == "[":
                table = self.header(array=False)
            else:
                self.key_value(table)

    def header(self, *, array: bool) -> str:
        at = self.i
        self.i += 2 if array else 1
        keys = self.dotted_key()
        self.expect("]]" if array else "]")
        path = ""
        for key in keys[:-1]:
            path = _join(path, key)
            self.note(path, at)
            if path in self.array_tables:  # [a.b] where [[a]]: b of a's last table
                path = f"{path}[{self.array_tables[path]}]"
        path = _join(path, keys[-1])
        self.note(path, at)
        if array:
            index = self.array_tables.get(path, -1) + 1
            self.array_tables[path] = index
            path = f"{path}[{index}]"
            self.note(path, at)
        return path

    def key_value(self, table: str) -> None:
        at = self.i
        path = table
        for key in self.dotted_key():
            path = _join(path, key)
            self.note(path, at)
        self.expect("=")
        self.spaces()
        self.value(path)

    def dotted_key(self) -> list[str]:
        keys: list[str] = []
        while True:
            self.spaces()
            keys.append(self.key())
            self.spaces()
            if self.i < len(self.text) and self.text[self.i] == ".":
                self.i += 1
                continue
            return keys

    def key(self) -> str:
        ch = self.text[self.i]
        if ch in "\"'":
            start = self.i
            self.string()
            # the quoted key decoded by the same rules as tomllib's (escapes included)
            return str(tomllib.loads(f"k = {self.text[start : self.i]}")["k"])
        m = _BARE_KEY.match(self.text, self.i)
        if m is None:
            raise ValueError(f"no key at offset {self.i}")
        self.i = m.end()
        return m.group()

    # -- values ------------------------------------------------------------------------------

    def value(self, path: str) -> None:
        ch = self.text[self.i]
        if ch in "\"'":
            self.string()
        elif ch == "[":
            self.array(path)
        elif ch == "{":
            self.inline_table(path)
        else:  # numbers, booleans, dates (a date-time may hold a space)
            m = _SCALAR_END.search(self.text, self.i)
            self.i = len(self.text) if m is None else m.start()

    def string(self) -> None:
        quote = self.text[self.i]
        if self.text.startswith(quote * 3, self.i):
            end = self.i + 3
            while True:
                end = self.text.index(quote * 3, end)
                if quote == '"' and _escaped(self.text, end):
                    end += 1
                    continue
                break
            end += 3
            # up to two quotes may end the content right before the delimiter (""""x"""" is legal)
            extra = 0
            while extra < 2 and end < len(self.text) and self.text[end] == quote:
                end += 1
                extra += 1
            self.i = end
            return
        end = self.i + 1
        while True:
            end = self.text.index(quote, end)
            if quote == '"' and _escaped(self.text, end):
                end += 1
                continue
            break
        self.i = end + 1

    def array(self, path: str) -> None:
        self.i += 1
        index = 0
        while True:
            self.blank()
            if self.text[self.i] == "]":
                self.i += 1
                return
            item = f"{path}[{index}]"
            self.note(item, self.i)
            self.value(item)
            self.blank()
            if self.text[self.i] == ",":
                self.i += 1
            index += 1

    def inline_table(self, path: str) -> None:
        self.i += 1
        while True:
            self.blank()
            if self.text[self.i] == "}":
                self.i += 1
                return
            self.key_value(path)
            self.blank()
            if self.text[self.i] == ",":
                self.i += 1


def _escaped(text: str, at: int) -> bool:
    """Whether the character at ``at`` follows an odd number of backslashes."""
    count = 0
    while at - count - 1 >= 0 and text[at - count - 1] == "\\":
        count += 1
    return count % 2 == 1

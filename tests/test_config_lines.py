"""Key path -> TOML line, as config messages use it (gateway/config_lines.py)."""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meter_gateway.gateway.config_lines import key_lines, line_of

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"

TRICKY = '''# a comment with [brackets] and key = "value"
title = "x" # trailing [comment]
"quoted key" = 1
'single.quoted' = 2
dotted.inner.key = "a = b"
escaped = "a \\" ] } # not a comment"
literal = 'C:\\path\\'

[gateway]
id = "gw"
notes = """
[not.a.header]
fake = 1
ends with quotes"" """
raw = \'\'\'
[[also.not]]\'\'\'
when = 1979-05-27 07:32:00Z

[[buses]]
name = "a"
[buses.extra]
deep = { x = 1, y = [1, 2], z = { w = "}" } }

[[buses]]
name = "b"
list = [
  "one", # comment ]
  [2, 3],
  { k = "v" },
]

[[commands.keys]]
id = "k1"
[[commands.keys]]
id = "k2"
roles = ["command",
         "release"]
'''


def paths(value: Any, where: str = "") -> Iterator[str]:
    """Every key path and list item path of a parsed document."""
    if isinstance(value, dict):
        for key, item in value.items():
            path = f"{where}.{key}" if where else key
            yield path
            yield from paths(item, path)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            path = f"{where}[{i}]"
            yield path
            yield from paths(item, path)


@pytest.mark.parametrize("crlf", [False, True])
def test_every_key_and_item_has_its_line(crlf: bool) -> None:
    text = TRICKY.replace("\n", "\r\n") if crlf else TRICKY
    lines = key_lines(text)
    written = TRICKY.splitlines()
    for path in paths(tomllib.loads(text)):
        assert path in lines, path
    expected = {
        "title": "title = ",
        "quoted key": '"quoted key"',
        "single.quoted": "'single.quoted'",
        "dotted.inner.key": "dotted.inner.key",
        "escaped": "escaped =",
        "gateway": "[gateway]",
        "gateway.notes": "notes =",
        "gateway.raw": "raw =",
        "gateway.when": "when =",
        "buses[0]": "[[buses]]",
        "buses[0].extra": "[buses.extra]",
        "buses[0].extra.deep.z.w": "deep =",
        "buses[1].name": 'name = "b"',
        "buses[1].list[0]": '"one"',
        "buses[1].list[1][1]": "[2, 3]",
        "buses[1].list[2].k": '{ k = "v" }',
        "commands": "[[commands.keys]]",
        "commands.keys[1].id": 'id = "k2"',
        "commands.keys[1].roles[1]": '"release"]',
    }
    for path, fragment in expected.items():
        assert fragment in written[lines[path] - 1], (path, written[lines[path] - 1])
    assert lines["buses[1]"] == written.index('name = "b"')  # the header above it


def test_the_example_configs_are_mapped_whole() -> None:
    for example in ("demo.toml", "rs485-site.toml", "tcp-concentrator-site.toml"):
        text = (CONFIG_DIR / example).read_text(encoding="utf-8")
        lines = key_lines(text)
        assert set(paths(tomllib.loads(text))) <= set(lines), example


def test_a_key_not_written_falls_back_to_its_table() -> None:
    lines = key_lines('[gateway]\nid = "gw"\n\n[[buses]]\nname = "a"\n')
    assert line_of(lines, "buses[0].port") == 4
    assert line_of(lines, "buses[0].tls.ca_file") == 4
    assert line_of(lines, "gateway.id") == 2
    assert line_of(lines, "uplink") is None
    assert line_of(lines, "uplink.host") is None

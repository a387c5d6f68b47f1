"""docs/configuration.md and docs/config.schema.json are generated from gateway/config.py and
must match it: every key of every config Struct documented, with a description, and the
committed files equal to what `meter-gateway config-reference` writes now."""

from __future__ import annotations

import ast
import difflib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from msgspec import inspect

from meter_gateway.gateway import config_reference
from meter_gateway.gateway.config import Config, Duration, parse_duration, schema_hook

ROOT = Path(__file__).resolve().parent.parent
MARKDOWN = ROOT / "docs" / "configuration.md"
SCHEMA = ROOT / "docs" / "config.schema.json"


def _bare(t: inspect.Type) -> inspect.Type:
    while isinstance(t, inspect.Metadata):
        t = t.type
    if isinstance(t, inspect.UnionType):
        rest = [x for x in t.types if not isinstance(x, inspect.NoneType)]
        if len(rest) == 1:
            return _bare(rest[0])
    return t


def _file_structs(path: str = "", t: inspect.Type | None = None) -> Iterator[tuple[str, bool, inspect.StructType]]:
    """(dotted path in the file, array of tables?, struct) for every table the file can hold,
    walked here independently of the generator's own walk."""
    t = _bare(inspect.type_info(Config) if t is None else t)
    many = isinstance(t, inspect.ListType)
    if isinstance(t, inspect.ListType):
        t = _bare(t.item_type)
    variants = t.types if isinstance(t, inspect.UnionType) else (t,)
    for struct in variants:
        if not isinstance(struct, inspect.StructType):
            continue
        if path:
            yield path, many, struct
        for field in struct.fields:
            if field.encode_name not in getattr(struct.cls, "resolved", frozenset()):
                yield from _file_structs(f"{path}.{field.encode_name}".lstrip("."), field.type)


def _markdown_tables(text: str) -> dict[str, dict[str, list[str]]]:
    """Section heading -> key -> the cells of its row (type, default, unit, allowed, description)."""
    tables: dict[str, dict[str, list[str]]] = {}
    heading = None
    for line in text.splitlines():
        if line.startswith("## "):
            heading = line[3:].strip("`")
            tables[heading] = {}
        elif heading is not None and (m := re.match(r"\| `([^`]+)` \|", line)):
            cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[2:-1]]
            tables[heading][m.group(1)] = cells
    return tables


def _same(committed: Path, generated: str, regenerate: str) -> None:
    current = committed.read_text(encoding="utf-8")
    if current != generated:
        diff = "".join(
            list(
                difflib.unified_diff(
                    current.splitlines(keepends=True),
                    generated.splitlines(keepends=True),
                    str(committed.relative_to(ROOT)),
                    "generated",
                )
            )[:40]
        )
        pytest.fail(f"{committed.relative_to(ROOT)} is out of date; regenerate with: {regenerate}\n{diff}")


def test_committed_markdown_is_the_generated_reference() -> None:
    _same(MARKDOWN, config_reference.markdown(), "meter-gateway config-reference -o docs/configuration.md")


def test_committed_json_schema_is_the_generated_schema() -> None:
    _same(
        SCHEMA,
        config_reference.render(schema=True),
        "meter-gateway config-reference --json-schema -o docs/config.schema.json",
    )


def test_every_key_of_every_struct_is_documented_with_a_description() -> None:
    tables = _markdown_tables(MARKDOWN.read_text(encoding="utf-8"))
    defs = json.loads(SCHEMA.read_text(encoding="utf-8"))["$defs"]
    seen = 0
    for path, many, struct in _file_structs():
        table = f"[[{path}]]" if many else f"[{path}]"
        heading = f'{table} type = "{struct.tag}"' if struct.tag is not None else table
        assert heading in tables, f"no section {heading} in docs/configuration.md"
        resolved = getattr(struct.cls, "resolved", frozenset())
        props = defs[struct.cls.__name__]["properties"]
        assert not resolved & props.keys(), f"{heading}: keys filled in at load are not config keys"
        for field in struct.fields:
            if field.encode_name in resolved:
                continue
            seen += 1
            where = f"{path}.{field.encode_name}"
            assert field.encode_name in tables[heading], f"{where} is missing from docs/configuration.md"
            description = props[field.encode_name].get("description", "")
            assert len(description) >= 10, f"{where} has no description in gateway/config.py"
            kind, default, _unit, _allowed, text = tables[heading][field.encode_name]
            assert kind
            assert (default == "required") == field.required, where
            assert text == description
    top = _bare(inspect.type_info(Config))
    assert isinstance(top, inspect.StructType)
    for field in top.fields:
        assert defs["Config"]["properties"][field.encode_name].get("description"), field.encode_name
    assert seen > 90  # every section, not a few: the walk above found them all


def test_msgspec_json_schema_covers_every_type() -> None:
    """msgspec's own schema generation handles Duration and Secret with the hook, and every
    default msgspec could not encode itself is filled in by the generator."""
    raw = msgspec.json.schema(Config, schema_hook=schema_hook)
    assert raw["$defs"]["UplinkSection"]["properties"]["keepalive"]["x-type"] == "duration"
    defs = config_reference.json_schema()["$defs"]
    for _, _, struct in _file_structs():
        props = defs[struct.cls.__name__]["properties"]
        for field in struct.fields:
            if field.encode_name not in props or field.required:
                continue
            prop = props[field.encode_name]
            default = field.default if field.default is not msgspec.NODEFAULT else field.default_factory()
            if default is None:
                assert "default" not in prop  # TOML has no null: a key left out is "not set"
            elif isinstance(default, msgspec.Struct):
                assert prop["default"] == {}
            else:
                decoded = msgspec.convert(prop["default"], type(default), dec_hook=_dec)
                assert decoded == default, f"{struct.cls.__name__}.{field.encode_name}"


def _dec(t: type, obj: Any) -> Any:
    if t is Duration:
        return parse_duration(obj)
    raise NotImplementedError(t)


@pytest.mark.parametrize("text", ["30s", "15m", "1h", "1d", "500ms", " 2.5 s ", "0s"])
def test_schema_duration_pattern_accepts_what_the_loader_accepts(text: str) -> None:
    pattern = _duration_schema()["anyOf"][1]["pattern"]
    assert re.search(pattern, text)
    parse_duration(text)


@pytest.mark.parametrize("text", ["30", "1w", "-5s", "s", "1.s", "30 sec"])
def test_schema_duration_pattern_refuses_what_the_loader_refuses(text: str) -> None:
    pattern = _duration_schema()["anyOf"][1]["pattern"]
    assert not re.search(pattern, text)
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(text)


def _duration_schema() -> dict[str, Any]:
    schema: dict[str, Any] = config_reference.json_schema()["$defs"]["OutboxSection"]["properties"]["commit_interval"]
    return schema


def test_defaults_the_reference_states_are_the_code_defaults() -> None:
    text = MARKDOWN.read_text(encoding="utf-8")
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(\w+)` \| [^|]+ \| ([^|]+) \|", text, re.M)}
    # spot checks against the behaviour the issue found misdocumented elsewhere
    assert rows["budget_mb"].strip() == "512"
    assert rows["overflow_policy"].strip() == '"pause_polling"'
    assert rows["keepalive"].strip() == '"1m"'
    assert rows["batch_max_readings"].strip() == "500"
    assert rows["max_inflight"].strip() == "20"
    assert rows["client_id"].strip() == "not set"


def test_restart_sections_agree_with_the_daemon() -> None:
    """The reference's "on SIGHUP" column and gateway/daemon/app.py's RESTART_SECTIONS (read from the
    source, so this test does not need the daemon's drivers importable)."""
    tree = ast.parse((ROOT / "gateway" / "daemon" / "app.py").read_text(encoding="utf-8"))
    node = next(
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "RESTART_SECTIONS" for t in n.targets)
    )
    assert isinstance(node.value, ast.Call)
    assert ast.literal_eval(node.value.args[0]) == set(config_reference.RESTART_SECTIONS)


def test_cli_writes_and_checks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "configuration.md"
    out.write_text("stale\n", encoding="utf-8")
    assert config_reference.main(["-o", str(out), "--check"]) == 1
    assert "out of date" in capsys.readouterr().err
    assert out.read_text(encoding="utf-8") == "stale\n"  # --check writes nothing
    assert config_reference.main(["-o", str(out)]) == 0
    assert config_reference.main(["-o", str(out), "--check"]) == 0
    assert out.read_text(encoding="utf-8") == config_reference.markdown()
    schema = tmp_path / "config.schema.json"
    assert config_reference.main(["--json-schema", "-o", str(schema)]) == 0
    assert json.loads(schema.read_text(encoding="utf-8"))["$ref"] == "#/$defs/Config"
    assert config_reference.main(["--check"]) == 2


def test_cli_command_is_registered() -> None:
    from meter_gateway.gateway.cli.main import COMMANDS

    assert COMMANDS["config-reference"][0] == "meter_gateway.gateway.config_reference"

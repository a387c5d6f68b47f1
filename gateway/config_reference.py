"""`meter-gateway config-reference`: the configuration reference, generated from gateway/config.py.

``docs/configuration.md`` (every section and key: type, default, unit, allowed values, what it
does) and ``docs/config.schema.json`` (a JSON Schema of the file's data, for editors that
validate TOML and for CI) are both written from the msgspec Structs of gateway/config.py and
their ``Meta`` descriptions, so neither can say something the loader does not do.
tests/test_config_reference.py fails when a committed file differs from what this writes.

Regenerate both after changing gateway/config.py::

    meter-gateway config-reference -o docs/configuration.md
    meter-gateway config-reference --json-schema -o docs/config.schema.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import msgspec
from msgspec import inspect

from meter_gateway.gateway.config import Config, Duration, Secret, schema_hook

__all__ = ["Key", "Section", "json_schema", "main", "markdown", "sections"]

JSON_SCHEMA_DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"
# Sections a SIGHUP reload cannot change in the running daemon: gateway.daemon.app.RESTART_SECTIONS, not
# imported so the reference needs no drivers (tests/test_config_reference.py checks they agree).
RESTART_SECTIONS: Final = frozenset({"gateway", "uplink", "outbox", "metrics"})


# ---------------------------------------------------------------------------------------------
# The model: sections and keys, read from the Structs


@dataclasses.dataclass(frozen=True, slots=True)
class Key:
    """One key of a section, as the reference shows it."""

    name: str
    type: str
    default: str
    unit: str
    allowed: str
    description: str


@dataclasses.dataclass(frozen=True, slots=True)
class Section:
    """A TOML table (``[uplink]``) or array of tables (``[[meters]]``) and its keys."""

    path: str  # dotted, as in the file: "uplink.tls", "commands.keys"
    many: bool  # an array of tables
    tag: str | None  # the "type" value that selects this variant (buses)
    description: str
    keys: tuple[Key, ...]

    @property
    def heading(self) -> str:
        table = f"[[{self.path}]]" if self.many else f"[{self.path}]"
        return f'{table} type = "{self.tag}"' if self.tag is not None else table


def sections() -> list[Section]:
    """Every table the file can hold, in file order, with its keys (resolved fields left out:
    they are filled in at load, and writing them is an error)."""
    root = _bare(inspect.type_info(Config))
    assert isinstance(root, inspect.StructType)
    out: list[Section] = []
    for field in root.fields:
        out.extend(_sections_of(field.encode_name, field.type))
    return out


def _sections_of(path: str, t: inspect.Type) -> Iterator[Section]:
    t = _strip_optional(t)
    many = isinstance(t, inspect.ListType)
    if isinstance(t, inspect.ListType):
        t = _bare(t.item_type)
    variants = [s for s in t.types if isinstance(s, inspect.StructType)] if isinstance(t, inspect.UnionType) else [t]
    for struct in variants:
        if not isinstance(struct, inspect.StructType):
            continue
        yield Section(
            path=path,
            many=many,
            tag=None if struct.tag is None else str(struct.tag),
            description=_doc(struct.cls),
            keys=tuple(_keys(path, struct)),
        )
        for field in _file_fields(struct):
            yield from _sections_of(f"{path}.{field.encode_name}", field.type)


def _file_fields(struct: inspect.StructType) -> list[inspect.Field]:
    resolved: frozenset[str] = getattr(struct.cls, "resolved", frozenset())
    return [f for f in struct.fields if f.encode_name not in resolved]


def _keys(path: str, struct: inspect.StructType) -> Iterator[Key]:
    if struct.tag_field is not None:
        yield Key(
            name=struct.tag_field,
            type="string",
            default="required",
            unit="",
            allowed=_toml(struct.tag),
            description="Which kind of entry this is.",
        )
    for field in _file_fields(struct):
        bare = _strip_optional(field.type)
        yield Key(
            name=field.encode_name,
            type=_type_text(bare, f"{path}.{field.encode_name}"),
            default=_default_text(field),
            unit=_unit(field.type),
            allowed=_allowed(bare),
            description=_meta(field.type).get("description", ""),
        )


def _doc(cls: type) -> str:
    return " ".join((cls.__doc__ or "").split())


def _bare(t: inspect.Type) -> inspect.Type:
    while isinstance(t, inspect.Metadata):
        t = t.type
    return t


def _strip_optional(t: inspect.Type) -> inspect.Type:
    t = _bare(t)
    if isinstance(t, inspect.UnionType):
        rest = [x for x in t.types if not isinstance(x, inspect.NoneType)]
        if len(rest) == 1:
            return _bare(rest[0])
    return t


def _meta(t: inspect.Type) -> dict[str, Any]:
    """The JSON Schema text a field's ``Meta`` carries (description, x-unit)."""
    merged: dict[str, Any] = {}
    while isinstance(t, inspect.Metadata):
        merged = {**(t.extra_json_schema or {}), **merged}
        t = t.type
    return merged


def _is_duration(t: inspect.Type) -> bool:
    return isinstance(t, inspect.CustomType) and t.cls is Duration


def _unit(t: inspect.Type) -> str:
    unit: str = _meta(t).get("x-unit", "")
    if not unit and _is_duration(_strip_optional(t)):
        return "s"
    return unit


def _type_text(t: inspect.Type, path: str) -> str:
    if isinstance(t, inspect.StructType):
        return f"table [{path}]"
    if isinstance(t, inspect.ListType):
        item = _bare(t.item_type)
        if isinstance(item, inspect.StructType | inspect.UnionType):
            return f"array of tables [[{path}]]"
        return f"array of {_plural(_type_text(item, path))}"
    if isinstance(t, inspect.UnionType):
        return " or ".join(_type_text(_bare(x), path) for x in t.types)
    if isinstance(t, inspect.LiteralType):
        return " or ".join(dict.fromkeys(_scalar_name(v) for v in t.values))
    if _is_duration(t):
        return "duration"
    names: dict[type[inspect.Type], str] = {
        inspect.StrType: "string",
        inspect.IntType: "integer",
        inspect.FloatType: "number",
        inspect.BoolType: "boolean",
    }
    for kind, name in names.items():
        if isinstance(t, kind):
            return name
    raise TypeError(f"{path}: no reference text for {t!r}")


def _plural(text: str) -> str:
    return " or ".join(f"{word}s" for word in text.split(" or "))


def _scalar_name(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    return "string"


def _allowed(t: inspect.Type) -> str:
    if isinstance(t, inspect.LiteralType):
        return ", ".join(_toml(v) for v in t.values)
    if _is_duration(t):
        return 'seconds, or text: "500ms", "30s", "15m", "1h", "1d"'
    parts: list[str] = []
    if isinstance(t, inspect.IntType | inspect.FloatType):
        parts += [
            f"{op} {_number(v)}" for op, v in ((">=", t.ge), (">", t.gt), ("<=", t.le), ("<", t.lt)) if v is not None
        ]
    elif isinstance(t, inspect.StrType):
        if t.pattern is not None:
            parts.append(f"matches `{t.pattern}`")
        if t.min_length:
            parts.append("not empty" if t.min_length == 1 else f"at least {t.min_length} characters")
        if t.max_length is not None:
            parts.append(f"at most {t.max_length} characters")
    elif isinstance(t, inspect.ListType):
        item = _bare(t.item_type)
        if t.min_length:
            parts.append(f"at least {t.min_length} item{'s' if t.min_length > 1 else ''}")
        if isinstance(item, inspect.LiteralType):
            parts.append(f"items: {_allowed(item)}")
    elif isinstance(t, inspect.UnionType):
        parts += [text for x in t.types if (text := _allowed(_bare(x)))]
    return ", ".join(parts)


def _default_text(field: inspect.Field) -> str:
    if field.required:
        return "required"
    value = field.default if field.default is not msgspec.NODEFAULT else field.default_factory()
    if isinstance(value, msgspec.Struct):
        return "(all defaults)"
    if value is None:
        return "not set"
    return _toml(value)


def _toml(value: object) -> str:
    """A value as it is written in the file."""
    if isinstance(value, Duration):
        return f'"{_duration_text(float(value))}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return _number(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"no TOML text for {value!r}")


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def _duration_text(seconds: float) -> str:
    if seconds == 0:
        return "0s"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and (seconds / size).is_integer():
            return f"{int(seconds // size)}{unit}"
    milliseconds = seconds * 1000
    if math.isclose(milliseconds, round(milliseconds)):
        return f"{round(milliseconds)}ms"
    return f"{seconds:g}s"


# ---------------------------------------------------------------------------------------------
# JSON Schema


def json_schema() -> dict[str, Any]:
    """JSON Schema (2020-12) of the config file's data: msgspec's schema of :class:`Config`, with
    the defaults msgspec cannot encode itself (Durations, sections), without the fields filled in
    at load, and without ``null``, which TOML cannot write (a key left out is "not set")."""
    schema = msgspec.json.schema(Config, schema_hook=schema_hook)
    defs: dict[str, Any] = schema["$defs"]
    for struct in _structs():
        if "description" in defs[struct.cls.__name__]:  # one line, as in the Markdown
            defs[struct.cls.__name__]["description"] = _doc(struct.cls)
        props: dict[str, Any] = defs[struct.cls.__name__]["properties"]
        resolved: frozenset[str] = getattr(struct.cls, "resolved", frozenset())
        for field in struct.fields:
            if field.encode_name in resolved:
                del props[field.encode_name]
            elif field.default_factory is not msgspec.NODEFAULT:
                value = field.default_factory()
                # a section left out takes its own keys' defaults, which its definition states
                default = {} if isinstance(value, msgspec.Struct) else msgspec.to_builtins(value, enc_hook=_plain)
                props[field.encode_name]["default"] = default
        required: list[str] = defs[struct.cls.__name__]["required"]
        required[:] = [r for r in required if r not in resolved]
    schema = _without_null(schema)
    return {
        "$schema": JSON_SCHEMA_DIALECT,
        "title": "meter-gateway configuration",
        "description": (
            "The data of the gateway's TOML config file. Generated from gateway/config.py by "
            "`meter-gateway config-reference --json-schema`; `meter-gateway check-config` is the full check "
            "(references between sections, files, secrets)."
        ),
        **schema,
    }


def _structs() -> Iterator[inspect.StructType]:
    seen: set[type] = set()
    todo: list[inspect.Type] = [inspect.type_info(Config)]
    while todo:
        t = _bare(todo.pop())
        if isinstance(t, inspect.StructType):
            if t.cls in seen:
                continue
            seen.add(t.cls)
            yield t
            todo.extend(f.type for f in t.fields)
        elif isinstance(t, inspect.UnionType):
            todo.extend(t.types)
        elif isinstance(t, inspect.ListType):
            todo.append(t.item_type)


def _plain(obj: Any) -> Any:
    if isinstance(obj, Duration):
        return float(obj)
    if isinstance(obj, Secret):
        raise TypeError("a secret has no default")
    raise NotImplementedError(type(obj).__name__)


def _without_null(node: Any) -> Any:
    if isinstance(node, list):
        return [_without_null(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _without_null(v) for k, v in node.items() if not (k == "default" and v is None)}
    options = out.get("anyOf")
    if isinstance(options, list):
        kept = [o for o in options if o != {"type": "null"}]
        if len(kept) == 1:
            del out["anyOf"]
            out = {**kept[0], **out}
        else:
            out["anyOf"] = kept
    return out


# ---------------------------------------------------------------------------------------------
# Markdown


_INTRO: Final = """\
# Configuration reference

<!-- Generated from gateway/config.py by `meter-gateway config-reference -o docs/configuration.md`.
     Do not edit: change the descriptions in gateway/config.py and regenerate.
     tests/test_config_reference.py fails when this file is out of date. -->

The gateway reads one TOML file (`meter-gateway run CONFIG`, `meter-gateway check-config CONFIG`).
The same content as a JSON Schema, for editors that validate TOML: [config.schema.json](config.schema.json).

- **Strict.** Every problem is one line naming the file and the key path (`buses[2].baud_rate`);
  an unknown key is an error that suggests the closest valid key. `check-config` prints them all
  and exits 78 (EX_CONFIG).
- **Durations** are seconds as a number, or text with a unit: `"500ms"`, `"30s"`, `"15m"`, `"1h"`,
  `"1d"`.
- **Relative paths** (state_dir, outbox path, TLS files, password and key files, model files) are
  relative to the directory of the config file.
- **Secrets are never written in the file**: a key names the file (`password_file`,
  `secret_file`) or the environment variable (`password_env`, `secret_env`) that holds them.
- **Reload.** SIGHUP re-reads the file and applies it, except the sections marked "restart" in
  the table below: they keep their old values until the daemon restarts (it logs
  `event=reload_needs_restart`).
"""


def markdown() -> str:
    """docs/configuration.md."""
    root = _bare(inspect.type_info(Config))
    assert isinstance(root, inspect.StructType)
    found = sections()
    lines = [_INTRO, "## Sections", "", "| section | required | on SIGHUP | what it is |", "|---|---|---|---|"]
    for field in root.fields:
        name = field.encode_name
        tables = [s for s in found if s.path == name]
        heading = ", ".join(f"[`{s.heading}`](#{_anchor(s)})" for s in tables)
        required = "yes" if field.required else "no"
        reload = "restart" if name in RESTART_SECTIONS else "reloaded"
        lines.append(f"| {heading} | {required} | {reload} | {_cell(_meta(field.type).get('description', ''))} |")
    for section in found:
        lines += ["", f"## `{section.heading}`", ""]
        if section.description:
            lines += [section.description, ""]
        lines += ["| key | type | default | unit | allowed | description |", "|---|---|---|---|---|---|"]
        for key in section.keys:
            cells = (f"`{key.name}`", key.type, key.default, key.unit, key.allowed, key.description)
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _anchor(section: Section) -> str:
    """GitHub's anchor for a ``## `heading` `` line: lower case, punctuation dropped, spaces to -."""
    text = section.heading.lower()
    return "".join(ch for ch in text if ch.isalnum() or ch in " -_").replace(" ", "-")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# ---------------------------------------------------------------------------------------------
# CLI


def render(*, schema: bool) -> str:
    return json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n" if schema else markdown()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="meter-gateway config-reference", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("--json-schema", action="store_true", help="the JSON Schema instead of the Markdown reference")
    parser.add_argument("-o", "--output", metavar="FILE", help="write FILE instead of printing")
    parser.add_argument("--check", action="store_true", help="with -o: exit 1 if FILE differs, write nothing")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if args.check and not args.output:
        print("meter-gateway config-reference: --check needs -o FILE", file=sys.stderr)
        return 2
    text = render(schema=args.json_schema)
    if args.output is None:
        sys.stdout.write(text)
        return 0
    path = Path(args.output)
    if args.check:
        try:
            current = path.read_text(encoding="utf-8")
        except OSError as e:
            print(f"{path}: cannot read: {e.strerror or e}", file=sys.stderr)
            return 1
        if current != text:
            print(
                f"{path}: out of date; regenerate with: meter-gateway config-reference{_flag(args)} -o {path}",
                file=sys.stderr,
            )
            return 1
        return 0
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        print(f"{path}: cannot write: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0


def _flag(args: argparse.Namespace) -> str:
    return " --json-schema" if args.json_schema else ""


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

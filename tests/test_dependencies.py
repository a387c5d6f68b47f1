"""Third-party libraries are used through their public API only, at the versions we pin.

What the private-API check sees (static, per module, by name):

* imports of underscore names or underscore modules from pymodbus, aiomqtt or paho;
* ``X._name`` where the expression ``X`` starts at a name bound by importing from those
  libraries (``aiomqtt.Client._on_publish``, ``FramerRTU._table``, ...);
* in a class derived from one of their classes: methods named ``_x`` (overriding a private
  hook), ``super()._x``, and ``self._x`` for any ``_x`` the class itself never assigns.

It cannot follow values through variables (``client = AsyncModbusTcpClient(); client._x``):
for that, the second test lists every ``._x`` access in the modules that import these
libraries, and each must be an attribute the module itself defines.
"""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("drivers", "gateway", "simulators", "protocols")
LIBRARIES = ("pymodbus", "aiomqtt", "paho")


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _from_library(module: str | None) -> bool:
    return module is not None and module.split(".")[0] in LIBRARIES


def _root(node: ast.expr) -> ast.expr:
    while isinstance(node, ast.Attribute | ast.Call | ast.Subscript):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node


def private_uses(source: str) -> list[str]:
    """Private uses of LIBRARIES in ``source`` (see the module docstring), as "line: what"."""
    tree = ast.parse(source)
    bound: set[str] = set()
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _from_library(alias.name):
                    bound.add((alias.asname or alias.name).split(".")[0])
                    if any(_private(part) for part in alias.name.split(".")):
                        found.append(f"{node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and _from_library(node.module):
            assert node.module is not None
            for alias in node.names:
                bound.add(alias.asname or alias.name)
                if _private(alias.name) or any(_private(part) for part in node.module.split(".")):
                    found.append(f"{node.lineno}: from {node.module} import {alias.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            root = _root(node.value)
            if isinstance(root, ast.Name) and root.id in bound:
                found.append(f"{node.lineno}: {ast.unparse(node)}")
        if isinstance(node, ast.ClassDef) and any(
            isinstance(r := _root(base), ast.Name) and r.id in bound for base in node.bases
        ):
            found.extend(_subclass_uses(node))
    return sorted(set(found), key=lambda s: int(s.split(":")[0]))


def _subclass_uses(cls: ast.ClassDef) -> list[str]:
    own: set[str] = set()
    for node in ast.walk(cls):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            own.add(node.attr)
        elif isinstance(node, ast.AnnAssign | ast.Assign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            own.update(t.id for t in targets if isinstance(t, ast.Name))
    found = [
        f"{item.lineno}: {cls.name}.{item.name} overrides a private hook"
        for item in cls.body
        if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef) and _private(item.name)
    ]
    for node in ast.walk(cls):
        if not (isinstance(node, ast.Attribute) and _private(node.attr)):
            continue
        base = node.value
        if isinstance(base, ast.Call) and isinstance(base.func, ast.Name) and base.func.id == "super":
            found.append(f"{node.lineno}: {ast.unparse(node)}")
        elif isinstance(base, ast.Name) and base.id == "self" and node.attr not in own:
            found.append(f"{node.lineno}: {ast.unparse(node)} (not defined by {cls.name})")
    return found


def product_modules() -> list[Path]:
    return sorted(p for folder in PRODUCT for p in (ROOT / folder).rglob("*.py"))


def library_users() -> list[Path]:
    pattern = re.compile(rf"^\s*(from|import)\s+({'|'.join(LIBRARIES)})\b", re.MULTILINE)
    return [p for p in product_modules() if pattern.search(p.read_text(encoding="utf-8"))]


def test_the_checker_finds_what_the_old_code_did() -> None:
    """The patterns issue 18 found (aiomqtt callbacks overridden, private attributes reached),
    so the check below cannot pass by seeing nothing."""
    old = """
import aiomqtt
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.framer import _private_helper

class _Client(aiomqtt.Client):
    def _on_publish(self, client, userdata, mid, rc, props):
        super()._on_publish(client, userdata, mid, rc, props)
        if not self._connected.done():
            self._client.disconnect()
        self.acks = {}
        self._acks_seen = 0
        return self._acks_seen

def tune(c: AsyncModbusTcpClient) -> None:
    AsyncModbusTcpClient._transport = None
"""
    found = private_uses(old)
    assert found == [
        "4: from pymodbus.framer import _private_helper",
        "7: _Client._on_publish overrides a private hook",
        "8: super()._on_publish",
        "9: self._connected (not defined by _Client)",
        "10: self._client (not defined by _Client)",
        "16: AsyncModbusTcpClient._transport",
    ]


@pytest.mark.parametrize("path", product_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_private_api_of_pymodbus_aiomqtt_or_paho(path: Path) -> None:
    found = private_uses(path.read_text(encoding="utf-8"))
    assert not found, f"{path.relative_to(ROOT)} uses private library API:\n" + "\n".join(found)


def test_underscore_attributes_in_library_users_are_their_own() -> None:
    """In the modules that import these libraries, every ``x._name`` must name something the
    module defines itself (a variable flowing from a library object is not followed above)."""
    assert library_users(), "no module imports pymodbus or paho any more: update LIBRARIES"
    problems = []
    for path in library_users():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        defined = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store)}
        defined |= {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
        defined |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in defined:
                problems.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not problems, "\n".join(problems)


def _pins() -> dict[str, Version]:
    pins = {}
    for raw in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        line = raw.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[name.lower().replace("_", "-")] = Version(version)
    return pins


def test_constraints_pin_every_dependency_at_an_admitted_version() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    pins = _pins()
    wanted = [Requirement(r) for r in project["dependencies"]]
    wanted += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    for req in wanted:
        if req.marker is not None and not req.marker.evaluate():
            continue
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"constraints.txt does not pin {req.name}"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req} does not admit the pin {pins[name]}"


def test_current_releases_are_admitted() -> None:
    """Issue 18: pymodbus at its current minor, and caps that admit today's cryptography and msgspec."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    spec = {Requirement(r).name.lower(): Requirement(r).specifier for r in project["dependencies"]}
    today = [("pymodbus", "3.16.1"), ("cryptography", "51.0.1"), ("msgspec", "0.23.0"), ("prometheus-client", "0.26.0")]
    for name, version in today:
        assert spec[name].contains(version), f"{name} {spec[name]} excludes {version}"

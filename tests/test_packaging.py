"""What the wheel carries: every package folder, its data files, and config/ (example configs, the
systemd unit, alert rules, dashboard) as the package ``meter_gateway.config``."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from meter_gateway.config import EXAMPLES, read_text, resource

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
NOT_SHIPPED = {"tests", "bench", "fuzz", "build", "dev", "docs", "deploy"}


def package_dirs() -> dict[str, Path]:
    """Every folder of the source tree that is a package, by the name it installs under."""
    out = {"meter_gateway": ROOT}
    for init in ROOT.rglob("__init__.py"):
        rel = init.parent.relative_to(ROOT)
        if rel.parts and (rel.parts[0] in NOT_SHIPPED or rel.parts[0].startswith(".")):
            continue
        if rel.parts:
            out[".".join(("meter_gateway", *rel.parts))] = init.parent
    return out


def test_every_package_folder_is_listed() -> None:
    assert sorted(SETUPTOOLS["packages"]) == sorted(package_dirs())


def test_every_data_file_matches_a_package_data_pattern() -> None:
    patterns = SETUPTOOLS["package-data"]["*"]
    for name, folder in package_dirs().items():
        for file in folder.iterdir():
            if not file.is_file() or file.suffix in {".py", ".pyc"} or name == "meter_gateway":
                continue
            assert any(fnmatch.fnmatch(file.name, p) for p in patterns), f"{file} would be left out of the wheel"


def test_config_folder_holds_exactly_the_examples() -> None:
    shipped = {p.name for p in (ROOT / "config").iterdir() if p.is_file() and p.suffix != ".py"}
    assert shipped == {e.file for e in EXAMPLES.values()}
    for example in EXAMPLES.values():
        assert resource(example.file).is_file()
        assert read_text(example.file).strip()


ALERTS = read_text("alerts.yml")


def test_alert_rules_carry_severity_and_first_action() -> None:
    # no YAML parser is a dependency; promtool (below) parses it for real where it is installed
    rules = re.split(r"\n\s*- alert: ", ALERTS)[1:]
    assert len(rules) >= 9  # at least the ones docs/operations.md has always suggested
    for rule in rules:
        name = rule.split("\n", 1)[0]
        assert re.search(r"\n\s+severity: (page|ticket)\n", rule), name
        for annotation in ("summary", "description", "first_action"):
            assert re.search(rf"\n\s+{annotation}: ", rule), f"{name}: no {annotation}"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Prometheus) not installed")
def test_alert_rules_load_in_prometheus() -> None:
    done = subprocess.run(
        ["promtool", "check", "rules", str(ROOT / "config" / "alerts.yml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(re.findall('- alert:', ALERTS))} rules found" in done.stdout


def build_wheel(work: Path) -> Path:
    """The wheel as a release would build it (PEP 517, isolated), from a copy of the tree: setuptools
    reuses an existing build/lib, where modules deleted since would still lie and be shipped."""
    source = work / "source"
    shutil.copytree(
        ROOT,
        source,
        symlinks=True,
        ignore=shutil.ignore_patterns(".*", "build", "dist", "*.egg-info", "__pycache__", "*.sqlite*", "state"),
    )
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(work / "dist"), str(source)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = (work / "dist").glob("meter_gateway-*.whl")
    return wheel


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_wheel_carries_config_and_leaves_tests_out(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    for example in EXAMPLES.values():
        assert f"meter_gateway/config/{example.file}" in names
    assert "meter_gateway/config/__init__.py" in names
    assert "meter_gateway/protocols/dlt645/data/dlt645_2007.toml" in names
    assert not {n for n in names if n.split("/")[1] in NOT_SHIPPED and n.startswith("meter_gateway/")}
    # one import package and its metadata, nothing else at the top; no build files inside it
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"meter_gateway"}
    assert {n for n in names if n.count("/") == 1 and n.startswith("meter_gateway/")} == {
        "meter_gateway/__init__.py",
        "meter_gateway/py.typed",
    }
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "meter-gateway = meter_gateway.gateway.cli.main:main" in zipfile.ZipFile(wheel).read(entry_points).decode()

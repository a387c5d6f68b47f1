"""deploy/install.sh onto an edge box, run into a temporary root directory (`--root`).

The root is furnished like a fresh Debian box as far as the installer and `systemd-analyze verify`
look at it: passwd and group with root and dialout, the distribution's unit files and /bin/kill.
The fast tests use `--use-python` (this checkout's interpreter behind a launcher) so no dependency
is downloaded; the slow one builds the wheel and lets the installer make the real virtualenv.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from meter_gateway.config import EXAMPLES, read_text
from tests.test_packaging import build_wheel

ROOT = Path(__file__).resolve().parents[1]
INSTALL = ROOT / "deploy" / "install.sh"
NOBODY = 65534

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="install.sh creates a system user and chowns files: run the tests as root"
)


class Box:
    """A target root directory and the ids the installer gave the service user there."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def ids(self, name: str = "meter-gateway") -> tuple[int, int]:
        uid = next(int(f[2]) for f in self.rows("passwd") if f[0] == name)
        gid = next(int(f[2]) for f in self.rows("group") if f[0] == name)
        return uid, gid

    def group_members(self, group: str) -> list[str]:
        row = next(f for f in self.rows("group") if f[0] == group)
        return [m for m in row[3].split(",") if m]

    def rows(self, file: str) -> list[list[str]]:
        return [line.split(":") for line in (self.path / "etc" / file).read_text().splitlines() if line]

    def install(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            ["sh", str(INSTALL), "--root", str(self.path), *args],
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        if check:
            assert done.returncode == 0, done.stdout + done.stderr
        return done

    def __truediv__(self, rel: str) -> Path:
        return self.path / rel.lstrip("/")


@pytest.fixture
def box() -> Iterator[Box]:
    # Not under tmp_path: its parent /tmp/pytest-of-root is 0700, and the service user must be
    # able to walk down to its files for the permission checks to mean anything.
    path = Path(tempfile.mkdtemp(prefix="meter-gateway-box-"))
    path.chmod(0o755)
    (path / "etc").mkdir()
    (path / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (path / "etc" / "group").write_text("root:x:0:\ndialout:x:20:\n")
    # what systemd-analyze verify --root looks for on a real box: the distribution's units
    # (sysinit.target, network-online.target, ...) and ExecReload's /bin/kill
    if Path("/usr/lib/systemd/system").is_dir():
        shutil.copytree("/usr/lib/systemd/system", path / "usr/lib/systemd/system", symlinks=True)
    kill = shutil.which("kill", path="/bin:/usr/bin")
    if kill is not None:
        (path / "bin").mkdir()
        shutil.copy2(kill, path / "bin" / "kill")
    yield Box(path)
    shutil.rmtree(path)


def mode_owner(path: Path) -> tuple[int, int, int]:
    st = path.lstat()
    return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid


def can_read(path: Path, uid: int, gid: int, groups: list[int]) -> bool:
    done = subprocess.run(
        ["/bin/cat", str(path)],
        user=uid,
        group=gid,
        extra_groups=groups,
        capture_output=True,
        timeout=30,
        check=False,
    )
    return done.returncode == 0


def test_install_into_a_root(box: Box) -> None:
    out = box.install("--use-python", sys.executable).stdout
    assert "service enabled, not started" in out

    uid, gid = box.ids()
    assert uid != 0
    assert gid != 0
    assert "meter-gateway" in box.group_members("dialout")
    assert mode_owner(box / "etc/meter-gateway") == (0o750, 0, gid)
    assert mode_owner(box / "etc/meter-gateway/secrets") == (0o750, 0, gid)
    assert mode_owner(box / "etc/meter-gateway/gateway.toml") == (0o640, 0, gid)
    assert mode_owner(box / "var/lib/meter-gateway") == (0o750, uid, gid)
    assert (box / "etc/meter-gateway/gateway.toml").read_text() == read_text(EXAMPLES["rs485"].file)

    unit = box / "etc/systemd/system/meter-gateway.service"
    assert mode_owner(unit) == (0o644, 0, 0)
    lines = unit.read_text().splitlines()
    assert "ExecStart=/opt/meter-gateway/bin/meter-gateway run -c /etc/meter-gateway/gateway.toml" in lines
    assert not any(line.startswith("ConfigurationDirectory") for line in lines)
    wants = box / "etc/systemd/system/multi-user.target.wants/meter-gateway.service"
    assert os.readlink(wants) == "/etc/systemd/system/meter-gateway.service"
    assert os.readlink(box / "usr/local/bin/meter-gateway") == "/opt/meter-gateway/bin/meter-gateway"

    # the console script ExecStart names runs, and the config it was given validates
    exe = box / "opt/meter-gateway/bin/meter-gateway"
    checked = subprocess.run(
        [str(exe), "check-config", str(box / "etc/meter-gateway/gateway.toml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr

    # the service user reads its config; a stranger does not
    config = box / "etc/meter-gateway/gateway.toml"
    assert can_read(config, uid, gid, [20])
    assert not can_read(config, NOBODY, NOBODY, [])


def test_upgrade_keeps_config_secrets_and_state_and_repairs_modes(box: Box) -> None:
    box.install("--use-python", sys.executable)
    uid, gid = box.ids()
    config = box / "etc/meter-gateway/gateway.toml"
    edited = config.read_text() + "\n# edited on site\n"
    config.write_text(edited)
    # a secret made as older docs said (root-only 0600) and a directory left root-only by the old
    # unit's ConfigurationDirectory=: both unreadable to the service user until the installer runs
    secret = box / "etc/meter-gateway/secrets/mqtt-password"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    os.chown(box / "etc/meter-gateway", 0, 0)
    outbox = box / "var/lib/meter-gateway/outbox.sqlite"
    outbox.write_bytes(b"billing data")
    os.chown(outbox, uid, gid)

    out = box.install("--use-python", sys.executable).stdout
    assert "keeping" in out
    assert box.ids() == (uid, gid)  # the same user, not a second one
    assert [r[0] for r in box.rows("passwd")].count("meter-gateway") == 1
    assert config.read_text() == edited
    assert outbox.read_bytes() == b"billing data"
    assert mode_owner(outbox)[1:] == (uid, gid)
    assert mode_owner(box / "etc/meter-gateway") == (0o750, 0, gid)
    assert mode_owner(secret) == (0o640, 0, gid)
    assert can_read(secret, uid, gid, [20])
    assert not can_read(secret, NOBODY, NOBODY, [])


def test_prefix_and_example_choice(box: Box) -> None:
    box.install("--use-python", sys.executable, "--prefix", "/srv/mg", "--example", "tcp-concentrator")
    unit = (box / "etc/systemd/system/meter-gateway.service").read_text()
    assert "ExecStart=/srv/mg/bin/meter-gateway run -c /etc/meter-gateway/gateway.toml" in unit.splitlines()
    assert (box / "srv/mg/bin/meter-gateway").is_file()
    assert (box / "etc/meter-gateway/gateway.toml").read_text() == read_text(EXAMPLES["tcp-concentrator"].file)


def test_bad_arguments_are_one_clear_line(box: Box) -> None:
    done = box.install("--use-python", sys.executable, "--example", "nope", check=False)
    assert done.returncode == 1
    assert done.stderr.strip() == "install.sh: --example must be rs485 or tcp-concentrator"
    done = box.install("--wheel", str(box / "missing.whl"), check=False)
    assert done.returncode == 1
    assert "no such wheel" in done.stderr
    done = box.install("--use-python", sys.executable, "--constraints", str(box / "nope.txt"), check=False)
    assert done.returncode == 1
    assert "no such constraints file" in done.stderr
    assert not (box / "etc/meter-gateway").exists()  # nothing half-done


def test_refuses_to_run_unprivileged(box: Box) -> None:
    done = subprocess.run(
        ["sh", str(INSTALL), "--root", str(box.path), "--use-python", sys.executable],
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert "run as root" in done.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_installed_unit_verifies_inside_the_root(box: Box) -> None:
    box.install("--use-python", sys.executable)
    verify = [
        "systemd-analyze",
        "verify",
        "--man=no",
        f"--root={box.path}",
        "/etc/systemd/system/meter-gateway.service",
    ]
    done = subprocess.run(verify, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == ""
    # and it does look inside the root: without the console script, ExecStart fails verification
    (box / "opt/meter-gateway/bin/meter-gateway").unlink()
    done = subprocess.run(verify, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0
    assert "/opt/meter-gateway/bin/meter-gateway" in done.stderr


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_wheel_install_runs_the_demo_from_an_empty_directory(box: Box, tmp_path: Path) -> None:
    """The real path: build the wheel, let the installer make the virtualenv and pip install the
    wheel with its dependencies, then use only what the wheel carries."""
    wheel = build_wheel(tmp_path)
    box.install("--wheel", str(wheel))
    exe = box / "opt/meter-gateway/bin/meter-gateway"
    site = subprocess.run(
        [str(box / "opt/meter-gateway/bin/python"), "-c", "import meter_gateway; print(meter_gateway.__file__)"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert str(ROOT) not in site.stdout  # the wheel's copy, not this checkout
    # every dependency at the tested version: the installer pins by the checkout's constraints.txt
    pinned = dict(line.split("==", 1) for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line)
    installed = subprocess.run(
        [
            str(box / "opt/meter-gateway/bin/python"),
            "-c",
            "import importlib.metadata as m; print(*(m.version(d) for d in ('pymodbus', 'paho-mqtt', 'msgspec')))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert installed.stdout.split() == [pinned["pymodbus"], pinned["paho-mqtt"], pinned["msgspec"]]

    empty = tmp_path / "empty"
    empty.mkdir()
    demo = subprocess.run(
        [str(exe), "demo", "--duration", "15"], cwd=empty, capture_output=True, text=True, timeout=180, check=False
    )
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-2000:]
    summary = demo.stdout.splitlines()[-1]
    assert "reached the broker" in summary
    assert not summary.startswith("demo: 0 readings")
    assert list(empty.iterdir()) == []  # it wrote nothing where it was started

    for name in ("rs485", "tcp-concentrator", "demo"):
        example = empty / f"{name}.toml"
        printed = subprocess.run(
            [str(exe), "example-config", name], capture_output=True, text=True, timeout=60, check=True
        )
        example.write_text(printed.stdout)
        checked = subprocess.run(
            [str(exe), "check-config", str(example)], capture_output=True, text=True, timeout=60, check=False
        )
        assert checked.returncode == 0, f"{name}: {checked.stderr}"
    for name in ("systemd", "alerts", "grafana"):
        printed = subprocess.run(
            [str(exe), "example-config", name], capture_output=True, text=True, timeout=60, check=True
        )
        assert printed.stdout == read_text(EXAMPLES[name].file)

"""Load the config in a short-lived child process, so the daemon never holds the parse.

Reading a 10,000-meter TOML file with tomllib peaks at ~30 MiB of small Python objects in the
process that parses it, and CPython keeps most of those pages after they are freed (pymalloc
arenas stay mapped while any object in them lives): the daemon would carry ~10 MiB of parse
leftovers for its whole life, and again after every SIGHUP reload. So ``meter-gateway run``
parses and validates in a child (``python -m gateway.config_child PATH``, the same
:func:`gateway.config.load_config`), which sends the resolved :class:`Config` back as MessagePack
on a pipe; decoding that allocates only the objects the daemon keeps.

Same results as :func:`load_config`: the same :class:`Config` (secrets included, as
:class:`Secret`), the same :class:`ConfigError` lines. The config's warnings (a serial device
missing on this machine, no meters...) are logged as WARNING lines, ``event=config_warning``, at
every start and reload. If the child cannot run at all (no interpreter, killed, garbled answer)
the config is loaded in-process instead, with one log line: slower to shed memory, never a
reason not to start.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

import msgspec

from meter_gateway.gateway.cli.config_cmd import EX_CONFIG  # the child's exit status when its answer is a ConfigError
from meter_gateway.gateway.config import Config, ConfigError, Duration, Secret, load_config_and_warnings

__all__ = ["decode", "encode", "load_config_in_child"]

log = logging.getLogger("meter_gateway")

CHILD_TIMEOUT = 300.0  # seconds; a healthy parse of 10,000 meters takes about one


class _Answer(msgspec.Struct, array_like=True):
    config: Config | None = None
    errors: list[str] | None = None
    warnings: list[str] = msgspec.field(default_factory=list)


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, Secret):
        return obj.reveal()
    if isinstance(obj, Duration):
        return float(obj)
    raise NotImplementedError(type(obj).__name__)


def _dec_hook(t: type, obj: Any) -> Any:
    if t is Secret and isinstance(obj, str):
        return Secret(obj)
    if t is Duration and isinstance(obj, int | float) and not isinstance(obj, bool):
        return Duration(obj)
    raise NotImplementedError(f"cannot decode {t!r}")


def encode(config: Config | None = None, errors: list[str] | None = None, warnings: list[str] | None = None) -> bytes:
    """The child's answer: a loaded config, or the lines of its ConfigError; and its warnings."""
    return msgspec.msgpack.encode(_Answer(config, errors, warnings or []), enc_hook=_enc_hook)


def decode(data: bytes) -> tuple[Config, list[str]]:
    """The config a child sent and its warnings; raises ConfigError with the child's lines,
    ValueError if garbled."""
    try:
        answer = msgspec.msgpack.decode(data, type=_Answer, dec_hook=_dec_hook)
    except msgspec.DecodeError as exc:
        raise ValueError(f"garbled answer from the config child: {exc}") from None
    if answer.errors is not None:
        raise ConfigError(answer.errors, warnings=answer.warnings)
    if answer.config is None:
        raise ValueError("empty answer from the config child")
    _share_repeated_values(answer.config)
    return answer.config, answer.warnings


def _share_repeated_values(config: Config) -> None:
    """Decoding makes a new str for every value: one object per distinct bus and model name
    saves ~1 MB with 10,000 meters (protocol and reconnect are literals msgspec already shares)."""
    shared: dict[str, str] = {}
    for meter in config.meters:
        for name in ("bus", "model"):
            value = getattr(meter, name)
            kept = shared.setdefault(value, value)
            if kept is not value:
                msgspec.structs.force_setattr(meter, name, kept)


def load_config_in_child(
    path: str | os.PathLike[str], *, environ: Mapping[str, str] | None = None, python: str | None = None
) -> Config:
    """:func:`gateway.config.load_config` run in a child process (see the module doc)."""
    try:
        try:
            config, warnings = decode(_run_child(path, environ, python or sys.executable))
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            log.warning("event=config_child_failed detail=%r fallback=in_process", str(exc))
            config, warnings = load_config_and_warnings(path, environ=environ)
    except ConfigError as exc:
        _log_warnings(exc.warnings)
        raise
    _log_warnings(warnings)
    return config


def _log_warnings(lines: list[str]) -> None:
    for line in lines:
        log.warning("event=config_warning detail=%r", line.removeprefix("warning: "))


def _run_child(path: str | os.PathLike[str], environ: Mapping[str, str] | None, python: str) -> bytes:
    env = dict(os.environ if environ is None else environ)  # the same interpreter imports this same package
    proc = subprocess.run(  # noqa: S603 - our own interpreter and module; the path is an argument, no shell
        [python, "-m", "meter_gateway.gateway.config_child", os.fspath(path)],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=CHILD_TIMEOUT,
        check=False,
    )
    if proc.returncode not in (0, EX_CONFIG):
        raise ValueError(f"exit status {proc.returncode}: {proc.stderr.decode(errors='replace').strip()[-300:]}")
    return proc.stdout


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m gateway.config_child CONFIG", file=sys.stderr)
        return 2
    try:
        config, warnings = load_config_and_warnings(argv[0])
    except ConfigError as exc:
        sys.stdout.buffer.write(encode(errors=exc.messages, warnings=exc.warnings))
        return EX_CONFIG
    sys.stdout.buffer.write(encode(config, warnings=warnings))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Structured logging: one line per event, logfmt or JSON, journald-friendly, rate-limited, redacted.

Every message of ours is logfmt, event first (``log.info("event=meter_offline meter=%s", mid)``;
free text goes through ``logfmt_value`` so it stays one field); tests/test_logs.py holds the code
to that. Structured fields can also come through ``extra=fields(bus="a", n=3)``. Only library
lines arrive as plain sentences; they are carried as ``msg="..."``. Under journald
($JOURNAL_STREAM names our stderr) lines carry an sd-daemon(3) priority prefix (``<6>``) and no
timestamp, since the journal stamps each line itself.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import re
import sys
import time
from collections.abc import Mapping
from typing import IO, Any, Literal

# the rate limiter lives with the drivers (which must not import the gateway): one limiter for both
from meter_gateway.drivers.log_limit import REPEAT_INTERVAL, RateLimiter, limited_kind_ended, log_limited, logfmt_value

__all__ = [
    "REDACTED",
    "REPEAT_INTERVAL",
    "JsonFormatter",
    "LogfmtFormatter",
    "RateLimiter",
    "RedactFilter",
    "fields",
    "limited_kind_ended",
    "log_limited",
    "logfmt_value",
    "setup_logging",
    "under_journald",
]

LogFormat = Literal["logfmt", "json"]
REDACTED = "***"

# sd-daemon(3) priorities (syslog levels)
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}

# A key is secret when it is, or ends in, one of these words: password, mqtt_password, api_key, ...
_SECRET_KEY = re.compile(r"(?:^|[_.-])(?:password|passwd|secret|key|token)$", re.IGNORECASE)
# Secrets in text are ``name=value`` (logfmt, URLs' queries, reprs) or a quoted name before a colon
# (JSON, dict reprs). A bare ``name: text`` is not one: config errors read ``mqtt.token: unknown
# key`` and that text is the operator's only clue.
_SECRET_IN_TEXT = re.compile(
    r"""(?:(?P<key>\b[\w.-]*?(?:password|passwd|secret|key|token))(?P<sep>\s*=\s*)"""
    r"""|(?P<q>['"])(?P<qkey>[\w.-]*?(?:password|passwd|secret|key|token))(?P=q)(?P<qsep>\s*:\s*))"""
    r"""(?P<value>"(?:[^"\\]|\\.)*"|'[^']*'|[^\s,;}\]]+)""",
    re.IGNORECASE,
)
# A value is bare, "double-quoted" (logfmt, JSON escapes) or 'single-quoted' (a %r in the call).
_LOGFMT_PAIR = re.compile(r"""([A-Za-z_][\w.-]*)=("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|\S*)""")
_BARE = re.compile(r"""^[^\s="\\]+$""")


def fields(**kv: object) -> dict[str, Any]:
    """``extra=`` for structured fields: ``log.warning("event=x", extra=fields(bus="a"))``."""
    return {"fields": kv}


def is_secret_key(key: str) -> bool:
    return _SECRET_KEY.search(key) is not None


def redact_text(text: str) -> str:
    def sub(m: re.Match[str]) -> str:
        key = m.group("key") or m.group("qkey")
        if not is_secret_key(key):
            return m.group(0)
        if m.group("key"):
            return f"{key}{m.group('sep')}{REDACTED}"
        quote = m.group("q")
        return f"{quote}{key}{quote}{m.group('qsep')}{quote}{REDACTED}{quote}"

    return _SECRET_IN_TEXT.sub(sub, text)


class RedactFilter(logging.Filter):
    """Replaces values of secret-named keys, in the message text and in structured fields."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact_text(message)
        if redacted != message or record.args:
            record.msg, record.args = redacted, None
        extra = getattr(record, "fields", None)
        if isinstance(extra, Mapping):
            record.fields = {k: REDACTED if is_secret_key(str(k)) else v for k, v in extra.items()}
        return True


def _logfmt_value(value: object) -> str:
    text = "" if value is None else str(value)
    if text and _BARE.match(text):
        return text
    return json.dumps(text, ensure_ascii=False)


_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][-+]?\d+)?")
# Names, not quantities, even when they look like numbers: a meter's address must not turn into a
# number for one meter and stay a string for the next.
_ALWAYS_TEXT = frozenset({"meter", "bus", "id", "command", "gateway", "key", "key_id", "topic", "di", "oad", "hex"})


def _typed(key: str, raw: str) -> object:
    """A logfmt value as JSON carries it: bare numbers as numbers, true/false as bools. Quoted values
    and names stay strings (``000123`` is no number either: its zeros matter)."""
    if raw[:1] in ('"', "'"):
        return _unquote(raw)
    if key in _ALWAYS_TEXT:
        return raw
    if raw in ("true", "false"):
        return raw == "true"
    if _NUMBER.fullmatch(raw):
        return json.loads(raw)
    return raw


def _unquote(raw: str) -> str:
    try:
        return str(json.loads(raw)) if raw.startswith('"') else str(ast.literal_eval(raw))
    except (ValueError, SyntaxError):  # a Python repr's escapes (\x..) are no JSON
        try:
            return str(ast.literal_eval(raw))
        except (ValueError, SyntaxError):
            return raw[1:-1]


def _pairs(message: str) -> list[tuple[str, str]] | None:
    """The message's raw key=value pairs when it is nothing but those, else None."""
    pairs: list[tuple[str, str]] = _LOGFMT_PAIR.findall(message)
    if not pairs or " ".join(f"{k}={v}" for k, v in pairs) != message.strip():
        return None
    return pairs


def _parse_logfmt(message: str) -> dict[str, object] | None:
    """The message's key=value pairs, typed, when it is nothing but those, else None."""
    pairs = _pairs(message)
    return None if pairs is None else {k: _typed(k, v) for k, v in pairs}


class _StructuredFormatter(logging.Formatter):
    def __init__(self, journald: bool = False) -> None:
        super().__init__()
        self.journald = journald

    def _prefix(self, record: logging.LogRecord) -> str:
        if not self.journald:
            return ""
        level = max((lv for lv in _PRIORITY if lv <= record.levelno), default=logging.DEBUG)
        return f"<{_PRIORITY[level]}>"

    @staticmethod
    def _extra(record: logging.LogRecord) -> dict[str, object]:
        extra = getattr(record, "fields", None)
        out = dict(extra) if isinstance(extra, Mapping) else {}
        if record.exc_info:
            out["exc"] = logging.Formatter().formatException(record.exc_info)
        return out


class LogfmtFormatter(_StructuredFormatter):
    def format(self, record: logging.LogRecord) -> str:
        parts = [] if self.journald else [f"ts={_iso(record.created)}"]
        parts += [f"level={record.levelname.lower()}", f"logger={record.name}"]
        message = record.getMessage()
        pairs = _pairs(message)
        if pairs is not None:
            # a %r value comes out 'single-quoted': one quoting style on every line
            parts += [f"{k}={_logfmt_value(_unquote(v)) if v.startswith(chr(39)) else v}" for k, v in pairs]
        elif message:
            parts.append(f"msg={_logfmt_value(message)}")
        parts += [f"{k}={_logfmt_value(v)}" for k, v in self._extra(record).items()]
        return self._prefix(record) + " ".join(parts)


class JsonFormatter(_StructuredFormatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {} if self.journald else {"ts": _iso(record.created)}
        out |= {"level": record.levelname.lower(), "logger": record.name}
        message = record.getMessage()
        parsed = _parse_logfmt(message)
        if parsed is None:
            out["msg"] = message
        else:
            out |= {k: v for k, v in parsed.items() if k not in out}
        out |= self._extra(record)
        return self._prefix(record) + json.dumps(out, ensure_ascii=False, default=str)


def _iso(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


def under_journald(stream: IO[str] | None = None, environ: Mapping[str, str] | None = None) -> bool:
    """True when ``stream`` is the journal's stream ($JOURNAL_STREAM is "device:inode" of it)."""
    env = os.environ if environ is None else environ
    value = env.get("JOURNAL_STREAM", "")
    if not value:
        return False
    stream = sys.stderr if stream is None else stream
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return True  # cannot check (a wrapped stream): trust the environment
    return value == f"{st.st_dev}:{st.st_ino}"


def setup_logging(
    level: str | int = "INFO",
    fmt: LogFormat = "logfmt",
    *,
    stream: IO[str] | None = None,
    journald: bool | None = None,
    environ: Mapping[str, str] | None = None,
) -> logging.Handler:
    """Configure the root logger (replacing earlier handlers of ours) and return the handler."""
    if fmt not in ("logfmt", "json"):
        raise ValueError(f"unknown log format {fmt!r}: use logfmt or json")
    stream = sys.stderr if stream is None else stream
    if journald is None:
        journald = under_journald(stream, environ)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter(journald) if fmt == "json" else LogfmtFormatter(journald))
    handler.addFilter(RedactFilter())
    handler.set_name("meter-gateway")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "meter-gateway"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    return handler

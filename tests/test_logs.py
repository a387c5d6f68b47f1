"""Log line format, journald mode, rate limiting and redaction."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator

import pytest

from meter_gateway.gateway.daemon.logs import (
    RateLimiter,
    fields,
    limited_kind_ended,
    log_limited,
    redact_text,
    setup_logging,
    under_journald,
)


@pytest.fixture
def root_restored() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
        root.setLevel(level)


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


@pytest.mark.usefixtures("root_restored")
def test_logfmt_line() -> None:
    out = io.StringIO()
    setup_logging("INFO", "logfmt", stream=out, journald=False)
    log = logging.getLogger("meter_gateway.drivers.bus")
    log.info("event=meter_offline meter=%s after=%d", "000000123456", 3)
    log.warning("outbox over budget: dropped %d rows", 5, extra=fields(bus="rs485 A"))
    log.debug("event=hidden")  # quiet at INFO
    first, second = lines(out)
    assert re.fullmatch(
        r"ts=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z level=info logger=meter_gateway.drivers.bus "
        r"event=meter_offline meter=000000123456 after=3",
        first,
    )
    assert second.endswith(
        'level=warning logger=meter_gateway.drivers.bus msg="outbox over budget: dropped 5 rows" bus="rs485 A"'
    )


@pytest.mark.usefixtures("root_restored")
def test_json_line() -> None:
    out = io.StringIO()
    setup_logging("DEBUG", "json", stream=out, journald=False)
    log = logging.getLogger("meter_gateway.gateway.uplink.session")
    log.debug('event=publish_failed reason=not_authorized detail="no ACL"', extra=fields(batch=7))
    log.error("plain sentence")
    a, b = (json.loads(line) for line in lines(out))
    assert a["level"] == "debug"
    assert a["event"] == "publish_failed"
    assert a["reason"] == "not_authorized"
    assert a["detail"] == "no ACL"
    assert a["batch"] == 7
    assert "ts" in a
    assert b["msg"] == "plain sentence"
    assert b["level"] == "error"


@pytest.mark.usefixtures("root_restored")
@pytest.mark.parametrize("fmt", ["logfmt", "json"])
def test_journald_mode_priority_prefix_and_no_timestamp(fmt: str) -> None:
    out = io.StringIO()
    setup_logging("DEBUG", fmt, stream=out, journald=True)  # type: ignore[arg-type]
    log = logging.getLogger("t")
    log.debug("event=a")
    log.info("event=b")
    log.warning("event=c")
    log.error("event=d")
    log.critical("event=e")
    got = lines(out)
    assert [line[:3] for line in got] == ["<7>", "<6>", "<4>", "<3>", "<2>"]
    assert not any("ts" in line.split(" ")[0] or '"ts"' in line for line in got)


def test_journald_detection_matches_the_stream() -> None:
    with tempfile.TemporaryFile("w+") as f:
        st = os.fstat(f.fileno())
        assert under_journald(f, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert not under_journald(f, {"JOURNAL_STREAM": "1:2"})  # inherited, stderr redirected since
        assert not under_journald(f, {})


def test_unknown_format_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown log format"):
        setup_logging("INFO", "xml", stream=io.StringIO())  # type: ignore[arg-type]


@pytest.mark.usefixtures("root_restored")
def test_redaction() -> None:
    out = io.StringIO()
    setup_logging("INFO", "logfmt", stream=out, journald=False)
    log = logging.getLogger("meter_gateway.gateway.config")
    log.info("event=connect user=gw password=%s host=broker", "hunter2")
    log.info("event=x", extra=fields(mqtt_password="hunter2", api_key="abc123", token="t0k", keys=3, monkey="ok"))
    log.info("settings: {'tls_key': 'hunter2', 'secret': \"s3\"}")
    text = out.getvalue()
    for secret in ("hunter2", "abc123", "t0k", "s3"):
        assert secret not in text
    assert "user=gw" in text
    assert "host=broker" in text
    assert "keys=3" in text
    assert "monkey=ok" in text
    assert redact_text("key_id=7 session_token: abc") == "key_id=7 session_token: ***"


def test_rate_limiter_counts_what_it_holds_back() -> None:
    now = [0.0]
    rl = RateLimiter(interval=10.0, clock=lambda: now[0])
    assert rl.allow("garbage:bus1") == 0
    for _ in range(99):
        assert rl.allow("garbage:bus1") is None
    assert rl.allow("garbage:bus2") == 0  # kinds are independent
    now[0] = 10.0
    assert rl.allow("garbage:bus1") == 99
    assert rl.allow("garbage:bus1") is None
    now[0] = 25.0
    assert rl.allow("garbage:bus1") == 1


@pytest.mark.usefixtures("root_restored")
def test_rate_limited_log_lines() -> None:
    out = io.StringIO()
    setup_logging("INFO", "logfmt", stream=out, journald=False)
    now = [0.0]
    rl = RateLimiter(interval=60.0, clock=lambda: now[0])
    log = logging.getLogger("meter_gateway.drivers.bus")
    logged = [rl.log(log, logging.WARNING, "garbage", "event=garbage bus=%s bytes=%d", "b1", i) for i in range(500)]
    assert logged.count(True) == 1
    now[0] = 61.0
    assert rl.log(log, logging.WARNING, "garbage", "event=garbage bus=%s bytes=%d", "b1", 9)
    got = lines(out)
    assert len(got) == 2
    assert got[0].endswith("event=garbage bus=b1 bytes=0")
    assert got[1].endswith("event=garbage bus=b1 bytes=9 suppressed=499")


@pytest.mark.usefixtures("root_restored")
def test_daemon_limiter_logs_the_first_occurrence_then_counts(caplog: pytest.LogCaptureFixture) -> None:
    """``log_limited`` is the daemon's one limiter: a condition repeating in a loop (an outbox
    refusing a read a second, a save failing every turn) is one line, not one per occurrence."""
    log = logging.getLogger("meter_gateway.test_limited")
    with caplog.at_level(logging.INFO, logger="meter_gateway.test_limited"):
        written = [log_limited(log, logging.WARNING, "test.refused", "event=refused n=%d", i) for i in range(346)]
        assert written.count(True) == 1
        assert log_limited(log, logging.WARNING, "test.other", "event=other") is True  # kinds are separate
        assert log_limited(log, logging.DEBUG, "test.debug", "event=quiet") is False  # below the level: not counted
        limited_kind_ended("test.refused")  # the condition cleared: a new episode is said at once
        assert log_limited(log, logging.WARNING, "test.refused", "event=refused n=%d", 999) is True
    got = [r.getMessage() for r in caplog.records]
    assert got == ["event=refused n=0", "event=other", "event=refused n=999"]

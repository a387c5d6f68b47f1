"""Log line format, journald mode, rate limiting and redaction."""

from __future__ import annotations

import ast
import datetime
import io
import json
import logging
import os
import re
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from meter_gateway.drivers.backoff import BackoffPolicy
from meter_gateway.drivers.bus import Bus, BusSettings
from meter_gateway.drivers.dlt645_driver import Dlt645Driver
from meter_gateway.drivers.log_limit import logfmt_value
from meter_gateway.drivers.meter_models import Dlt645Model, ModbusModel, load_model
from meter_gateway.drivers.modbus import ModbusLink, ModbusMeter
from meter_gateway.drivers.tcp_link import TcpLink
from meter_gateway.drivers.transport import TcpSettings
from meter_gateway.gateway.config import ConfigError, load_config
from meter_gateway.gateway.daemon.logs import (
    REDACTED,
    RateLimiter,
    fields,
    limited_kind_ended,
    log_limited,
    redact_text,
    setup_logging,
    under_journald,
)
from meter_gateway.simulators.load import LoadSettings
from meter_gateway.simulators.modbus_meter import ModbusSimServer, SimulatedMeter
from tests.plugins.simulators import SimBusFactory, SimBusHandle


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
    assert redact_text("key_id=7 session_token=abc") == "key_id=7 session_token=***"


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


# -- one style for every line (issue 20, item 9) ---------------------------------------------------

_LEVEL_CALLS = {"debug", "info", "warning", "error", "exception", "critical"}
_LOGGERS = {"log", "logger", "_log", "LOG", "trace_log"}


def _message_arg(call: ast.Call) -> ast.expr | None:
    """The format string of a logging call in our code, or None when ``call`` is not one."""
    func = call.func
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in _LOGGERS:
        if func.attr in _LEVEL_CALLS:
            return call.args[0] if call.args else None
        if func.attr == "log":
            return call.args[1] if len(call.args) > 1 else None
    if isinstance(func, ast.Name) and func.id == "log_limited":
        return call.args[3] if len(call.args) > 3 else None
    return None


def _starts_with_event(node: ast.expr) -> bool:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value.startswith("event=")
    if isinstance(node, ast.JoinedStr) and node.values:
        first = node.values[0]
        return isinstance(first, ast.Constant) and str(first.value).startswith("event=")
    return False


def test_every_log_call_of_the_daemon_and_drivers_names_its_event() -> None:
    """A line is ``event=name key=value ...``: a sentence in ``msg="..."`` cannot be filtered on."""
    root = Path(__file__).resolve().parent.parent
    offenders = []
    for package in ("gateway", "drivers"):
        for path in sorted((root / package).rglob("*.py")):
            if path.name == "log_limit.py":  # the limiter passes its callers' messages on; those are checked
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
                if isinstance(node, ast.Call):
                    message = _message_arg(node)
                    if message is not None and not _starts_with_event(message):
                        offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    assert offenders == [], "log calls without event=: " + ", ".join(offenders)


@pytest.mark.usefixtures("root_restored")
def test_json_carries_numbers_as_numbers_and_names_as_text() -> None:
    out = io.StringIO()
    setup_logging("INFO", "json", stream=out, journald=False)
    log = logging.getLogger("meter_gateway.drivers.health")
    log.warning(
        "event=meter_offline meter=%s bus=%s failures=%d latency=%.3f ok=%s code=%s reason=%s",
        "000000123456",
        "7",
        3,
        0.25,
        "true",
        "-0x02",
        logfmt_value("no answer x3"),
    )
    (line,) = (json.loads(raw) for raw in lines(out))
    assert line["event"] == "meter_offline"
    assert line["meter"] == "000000123456"  # leading zeros: an address, not a number
    assert line["bus"] == "7"  # a name stays a name even when it looks like a number
    assert line["failures"] == 3
    assert line["latency"] == 0.25
    assert line["ok"] is True
    assert line["code"] == "-0x02"
    assert line["reason"] == "no answer x3"
    assert "msg" not in line


@pytest.mark.usefixtures("root_restored")
def test_logfmt_values_with_spaces_and_quotes_stay_one_field() -> None:
    out = io.StringIO()
    setup_logging("INFO", "json", stream=out, journald=False)
    log = logging.getLogger("meter_gateway.drivers.transport")
    log.warning("event=link_lost link=%s reason=%s", logfmt_value("rs485 A"), logfmt_value('peer said "bye"'))
    (line,) = (json.loads(raw) for raw in lines(out))
    assert (line["link"], line["reason"]) == ("rs485 A", 'peer said "bye"')


_CONFIG_WITH_A_TYPO = """
[gateway]
id = "gw-1"
timezone = "Asia/Shanghai"
state_dir = "state"

[uplink]
host = "127.0.0.1"
token = "abc"

[[buses]]
name = "line-1"
type = "tcp"
host = "127.0.0.1"
port = 1502
protocol = "dlt645"

[[meters]]
id = "m1"
bus = "line-1"
protocol = "dlt645-2007"
address = "000000000001"
model = "dlt645-2007-generic"

[[poll_groups]]
name = "billing"
interval = "15m"
meters = ["m1"]
quantities = ["energy.active.import.total"]
"""


@pytest.mark.usefixtures("root_restored")
def test_a_reload_error_about_an_unknown_key_is_not_redacted(tmp_path: Path) -> None:
    """Redaction hides secrets, not the operator's only clue: a typo'd key named like a secret
    (``token``) is reported as it is, its message intact."""
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(_CONFIG_WITH_A_TYPO, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(cfg)
    problems = [line for line in caught.value.messages if "unknown key" in line]
    assert problems, caught.value.messages
    out = io.StringIO()
    setup_logging("INFO", "logfmt", stream=out, journald=False)
    log = logging.getLogger("meter_gateway.gateway.daemon.app")
    for line in problems:  # as the daemon logs a rejected reload (gateway/daemon/app.py)
        log.error("event=reload_rejected problem=%r", line)
    text = out.getvalue()
    assert REDACTED not in text
    for line in problems:  # whole, and in the one quoting style of every line
        assert f"event=reload_rejected problem={logfmt_value(line)}" in text
    assert "uplink.token: unknown key" in text


# -- frame trace (issue 20, item 10) ---------------------------------------------------------------

_FRAME = re.compile(
    r"level=debug logger=meter_gateway\.trace event=frame dir=(?P<dir>tx|rx) bus=(?P<bus>\S+) "
    r'meter=(?P<meter>\S+) t=\+(?P<ms>\d+\.\d)ms len=(?P<len>\d+) hex="(?P<hex>[0-9a-f]{2}(?: [0-9a-f]{2})*)"'
)


async def _read_voltages(handle: SimBusHandle, *, trace: bool) -> None:
    host, port = handle.endpoint  # type: ignore[misc]
    link = TcpLink(TcpSettings(host, port, no_reply_limit=0, reconnect=BackoffPolicy(initial=0.05, maximum=0.1)))
    bus = Bus("rs485-a", link, settings=BusSettings(reply_timeout=0.5, attempts=2, trace=trace))
    meter = handle.meters[0]
    model = load_model("dlt645-2007-generic")
    assert isinstance(model, Dlt645Model)
    assert await bus.open()
    try:
        driver = Dlt645Driver(bus, "m01", meter.address_text, meter.edition, model, tz=datetime.UTC)
        readings = await driver.read(["voltage.l1", "voltage.l2", "voltage.l3"], slot=0.0, now=0.0)
        assert [r.quantity for r in readings] == ["voltage.l1", "voltage.l2", "voltage.l3"]
    finally:
        await bus.close()


@pytest.mark.asyncio
@pytest.mark.usefixtures("root_restored")
async def test_a_traced_bus_logs_every_frame_in_hex_at_any_level(sim_bus: SimBusFactory) -> None:
    handle = await sim_bus(1, speed=0.0)
    out = io.StringIO()
    setup_logging("INFO", "logfmt", stream=out, journald=False)  # the bus's trace = true, not the level
    await _read_voltages(handle, trace=True)
    frames = [m for m in map(_FRAME.search, lines(out)) if m]
    assert [m["dir"] for m in frames][:2] == ["tx", "rx"], out.getvalue()
    assert {m["bus"] for m in frames} == {"rs485-a"}
    assert {m["meter"] for m in frames} == {"m01"}
    tx = next(m for m in frames if m["dir"] == "tx")
    # the request as on the wire: a DL/T 645 frame addressed to the meter (address bytes reversed)
    wire = bytes.fromhex(tx["hex"]).lstrip(b"\xfe")
    assert (wire[0], wire[-1]) == (0x68, 0x16)
    assert wire[1:7] == bytes.fromhex(handle.meters[0].address_text)[::-1]
    assert int(tx["len"]) == len(bytes.fromhex(tx["hex"]))
    received = b"".join(bytes.fromhex(m["hex"]) for m in frames if m["dir"] == "rx").lstrip(b"\xfe")
    assert (received[0], received[-1]) == (0x68, 0x16)
    assert received[1:7] == wire[1:7]
    rx_times = [float(m["ms"]) for m in frames if m["dir"] == "rx"]
    assert rx_times == sorted(rx_times)
    assert float(tx["ms"]) <= rx_times[0]


@pytest.mark.asyncio
@pytest.mark.usefixtures("root_restored")
async def test_frames_are_traced_on_every_bus_at_debug_and_on_none_at_info(sim_bus: SimBusFactory) -> None:
    handle = await sim_bus(1, speed=0.0)
    quiet, loud = io.StringIO(), io.StringIO()
    setup_logging("INFO", "logfmt", stream=quiet, journald=False)
    await _read_voltages(handle, trace=False)
    setup_logging("DEBUG", "json", stream=loud, journald=False)
    await _read_voltages(handle, trace=False)
    assert "event=frame" not in quiet.getvalue()
    frames = [json.loads(line) for line in lines(loud) if '"event": "frame"' in line]
    assert {f["dir"] for f in frames} == {"tx", "rx"}
    assert all(f["bus"] == "rs485-a" and f["meter"] == "m01" and f["logger"] == "meter_gateway.trace" for f in frames)
    assert all(isinstance(f["len"], int) and isinstance(f["hex"], str) for f in frames)


@pytest.mark.asyncio
@pytest.mark.usefixtures("root_restored")
async def test_a_traced_modbus_tcp_bus_logs_each_request_and_its_reply() -> None:
    unit, start = 7, 1_700_000_000.0
    meter = SimulatedMeter("sim-3ph", settings=LoadSettings(seed=unit), start=start)
    out = io.StringIO()
    setup_logging("INFO", "logfmt", stream=out, journald=False)  # the bus's trace = true, not the level
    async with ModbusSimServer({unit: meter}, transport="tcp", port=0, clock=lambda: start + 60) as server:
        link = TcpLink(TcpSettings("127.0.0.1", server.port, reconnect=BackoffPolicy(initial=0.05, maximum=0.1)))
        bus = Bus("mb-a", link, settings=BusSettings(reply_timeout=0.5, attempts=2, trace=True))
        model = load_model("sim-3ph")
        assert isinstance(model, ModbusModel)
        modbus = ModbusMeter(ModbusLink(bus, framing="tcp"), model, unit=unit, meter_id="pm7")
        assert await bus.open()
        try:
            readings = await modbus.read(slot=0.0, now=0.0)
        finally:
            await bus.close()
    assert len(readings) == len(model.quantities)
    frames = [m for m in map(_FRAME.search, lines(out)) if m]
    requests = len(modbus.plan())
    assert requests >= 2
    # one request, then its reply, for every read of the plan (on loopback a reply is one chunk)
    assert [m["dir"] for m in frames] == ["tx", "rx"] * requests, out.getvalue()
    assert {m["bus"] for m in frames} == {"mb-a"}
    assert {m["meter"] for m in frames} == {"pm7"}
    for tx, rx in zip(frames[::2], frames[1::2], strict=True):
        sent, got = bytes.fromhex(tx["hex"]), bytes.fromhex(rx["hex"])
        assert int(tx["len"]) == len(sent) == 12  # MBAP (7) + function, address, count
        assert int(rx["len"]) == len(got)
        # MBAP header: transaction id, protocol 0, length of what follows, then the unit id
        tid, protocol, length, to = struct.unpack(">HHHB", sent[:7])
        assert (protocol, length, to) == (0, len(sent) - 6, unit)
        assert struct.unpack(">HHHB", got[:7]) == (tid, 0, len(got) - 6, unit)
        assert got[7] == sent[7] in (1, 2, 3, 4)  # the read answered, not an exception (function | 0x80)
        assert float(tx["ms"]) <= float(rx["ms"])
    assert len({bytes.fromhex(m["hex"])[:2] for m in frames[::2]}) == requests  # a new transaction id each

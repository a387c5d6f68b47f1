"""Transports against real peers: TCP servers on 127.0.0.1 and pseudo-terminals (8N1: ptys refuse parity)."""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import time
from pathlib import Path

import pytest

from meter_gateway.drivers.backoff import Backoff, BackoffPolicy
from meter_gateway.drivers.bus import Bus, BusSettings
from meter_gateway.drivers.errors import ConfigurationError, LinkDown, NoAnswer
from meter_gateway.drivers.serial_link import SerialLink
from meter_gateway.drivers.tcp_link import TcpLink
from meter_gateway.drivers.transport import (
    BufferedInbox,
    Rs485Settings,
    SerialSettings,
    TcpSettings,
    Transport,
    make_transport,
    settings_from_mapping,
)
from tests.plugins.peers import (
    PeerConn,
    ToyDeframer,
    ToyExchange,
    ToyFrame,
    request,
    silent,
    until,
)
from tests.plugins.ports import free_port

FAST = BackoffPolicy(initial=0.1, maximum=0.4, jitter=0.2)


async def read_frame(link: Transport, within: float = 1.0) -> ToyFrame:
    """Read until one whole toy frame arrived."""
    deadline = asyncio.get_running_loop().time() + within
    deframer = ToyDeframer()
    while True:
        data = await link.read(deadline)
        assert data, "no frame before the deadline"
        for _, frame in deframer.feed(data):
            assert frame is not None
            return frame


# -- backoff ------------------------------------------------------------------------------------


def test_backoff_grows_is_jittered_and_capped() -> None:
    b = Backoff(BackoffPolicy(initial=1.0, maximum=8.0, factor=2.0, jitter=0.25), rng=random.Random(7))
    delays = [b.next() for _ in range(10)]
    for n, d in enumerate(delays):
        base = min(8.0, 2.0**n)
        assert base * 0.75 <= d <= min(8.0, base * 1.25)
    assert len(set(delays)) == len(delays)  # jittered, not lock-step
    assert max(delays) <= 8.0
    b.reset()
    assert b.next() <= 1.25


def test_backoff_survives_a_very_long_outage() -> None:
    b = Backoff(BackoffPolicy(initial=0.5, maximum=30.0))
    for _ in range(5000):
        d = b.next()
    assert 24.0 <= d <= 30.0


def test_backoff_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        BackoffPolicy(initial=5, maximum=1)
    with pytest.raises(ValueError):
        BackoffPolicy(jitter=1.5)


# -- settings and factory --------------------------------------------------------------------------


def test_settings_from_mapping_serial() -> None:
    s = settings_from_mapping(
        {
            "type": "serial",
            "port": "/dev/serial/by-id/usb-x",
            "baudrate": 2400,
            "parity": "e",
            "rs485": True,
            "reconnect_max": 10,
        }
    )
    assert isinstance(s, SerialSettings)
    assert (s.baudrate, s.bytesize, s.parity, s.stopbits) == (2400, 8, "E", 1)
    assert s.label == "2400 8E1"
    assert s.frame_bits == 11
    assert s.rs485 == Rs485Settings()
    assert s.reconnect.maximum == 10
    assert isinstance(make_transport(s), SerialLink)


def test_settings_from_mapping_tcp() -> None:
    s = settings_from_mapping({"type": "tcp", "host": "10.0.0.5", "port": 4001, "no_reply_limit": 5})
    assert isinstance(s, TcpSettings)
    assert s.no_reply_limit == 5
    link = make_transport(s)
    assert isinstance(link, TcpLink)
    assert link.name == "tcp://10.0.0.5:4001"


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ({"type": "serial", "port": "/dev/ttyS0", "baud": 2400}, "unknown setting(s) baud"),
        ({"type": "serial", "port": "/dev/ttyS0", "parity": "X"}, "parity must be N, E or O"),
        ({"type": "serial", "port": "/dev/ttyS0", "stopbits": 3}, "stopbits"),
        ({"type": "tcp", "host": "h", "port": 0}, "port must be 1..65535"),
        ({"type": "udp", "host": "h", "port": 1}, "'serial' or 'tcp'"),
        ({"type": "tcp", "host": "h", "port": 1, "reconnect_initial": 9, "reconnect_max": 1}, "backoff"),
    ],
)
def test_settings_errors_are_clear(raw: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigurationError, match=words.replace("(", r"\(").replace(")", r"\)")):
        settings_from_mapping(raw)


# -- TCP ----------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_tcp_roundtrip_sets_keepalive_options(toy_server) -> None:
    server = await toy_server()
    link = TcpLink(
        TcpSettings(
            server.host, server.port, keepalive_idle=7, keepalive_interval=3, keepalive_count=4, user_timeout=12.5
        )
    )
    assert isinstance(link, Transport)
    try:
        assert await link.open()
        assert link.connected
        assert link.down_since is None
        await link.write(request(3, 1, b"hi").encode())
        frame = await read_frame(link)
        assert frame == ToyFrame(0x81, 3, 1, b"re:hi")
        assert link.stats.bytes_out == 7
        assert link.stats.bytes_in == 10
        opts = link.socket_options()
        assert opts["keepalive"] == 1
        assert (opts["keepalive_idle"], opts["keepalive_interval"], opts["keepalive_count"]) == (7, 3, 4)
        assert opts["user_timeout_ms"] == 12500
        assert opts["nodelay"] == 1
    finally:
        await link.close()
    assert not link.connected


@pytest.mark.asyncio
async def test_read_returns_what_arrived_or_nothing_at_the_deadline(toy_server) -> None:
    async def two_parts(frame: ToyFrame, conn: PeerConn) -> None:
        raw = frame.reply().encode()
        conn.write(raw[:3])
        await asyncio.sleep(0.05)
        conn.write(raw[3:])

    server = await toy_server(two_parts)
    link = TcpLink(TcpSettings(server.host, server.port))
    loop = asyncio.get_running_loop()
    try:
        await link.open()
        t0 = loop.time()
        assert await link.read(t0 + 0.1) == b""
        assert 0.09 <= loop.time() - t0 < 0.2
        await link.write(request(1, 1).encode())
        first = await link.read(loop.time() + 1)
        assert len(first) == 3  # returns as soon as something arrived
        second = await link.read(loop.time() + 1)
        assert len(first + second) == len(ToyFrame(0x81, 1, 1, b"re:").encode())
    finally:
        await link.close()


@pytest.mark.asyncio
async def test_tcp_link_receives_into_its_own_buffer_whatever_the_size(toy_server) -> None:
    """TCP links receive with recv_into into a small buffer (BufferedProtocol), not asyncio's 256 KiB
    allocation per read; input bigger than that buffer still arrives whole and in order."""
    blob = bytes(random.Random(7).getrandbits(8) for _ in range(5 * BufferedInbox.RX_SIZE + 17))

    async def flood(frame: ToyFrame, conn: PeerConn) -> None:
        conn.write(blob)

    server = await toy_server(flood)
    link = TcpLink(TcpSettings(server.host, server.port))
    loop = asyncio.get_running_loop()
    got: list[bytes] = []
    try:
        await link.open()
        assert all(isinstance(inbox, asyncio.BufferedProtocol) for inbox in link._inboxes)
        await link.write(request(1, 1).encode())

        def collect(data: bytes) -> bool:
            assert type(data) is bytes  # a copy, not a view of the buffer
            assert len(data) <= BufferedInbox.RX_SIZE
            got.append(data)
            return sum(map(len, got)) >= len(blob)

        assert await link.read_until(collect, loop.time() + 2.0) is True
        assert b"".join(got) == blob
        assert len(got) >= 6
        assert link.stats.bytes_in == len(blob)
    finally:
        await link.close()


@pytest.mark.asyncio
async def test_read_until_feeds_arrivals_to_the_consumer_until_it_accepts(toy_server) -> None:
    async def two_parts(frame: ToyFrame, conn: PeerConn) -> None:
        raw = frame.reply().encode()
        conn.write(raw[:3])
        await asyncio.sleep(0.05)
        conn.write(raw[3:])

    server = await toy_server(two_parts)
    link = TcpLink(TcpSettings(server.host, server.port))
    loop = asyncio.get_running_loop()
    chunks: list[bytes] = []
    deframer = ToyDeframer()

    def whole_frame(data: bytes) -> bool:
        chunks.append(data)
        return any(frame is not None for _, frame in deframer.feed(data))

    try:
        await link.open()
        await link.write(request(1, 1).encode())
        assert await link.read_until(whole_frame, loop.time() + 1.0) is True
        assert len(chunks) == 2  # both parts went to the consumer, nothing was left buffered
        assert b"".join(chunks) == ToyFrame(0x81, 1, 1, b"re:").encode()
        assert link.flush_input() == 0
    finally:
        await link.close()


@pytest.mark.asyncio
async def test_read_until_ends_at_each_deadline_and_passes_on_what_the_consumer_raises(toy_server) -> None:
    server = await toy_server(silent)
    link = TcpLink(TcpSettings(server.host, server.port))
    loop = asyncio.get_running_loop()

    def refuse(data: bytes) -> bool:
        raise NoAnswer(f"refused {data!r}")

    try:
        await link.open()
        await until(lambda: server.connections == 1)
        # deadlines short, long and short again: each read ends at its own
        t0 = loop.time()
        assert await link.read_until(lambda data: False, t0 + 0.05) is False
        assert 0.04 <= loop.time() - t0 < 0.3
        t1 = loop.time()
        assert await link.read_until(lambda data: False, t1 + 0.15) is False
        assert 0.14 <= loop.time() - t1 < 0.4
        t2 = loop.time()
        assert await link.read_until(lambda data: False, t2 + 0.02) is False
        assert 0.01 <= loop.time() - t2 < 0.3
        # a deadline already passed returns at once
        assert await link.read_until(lambda data: False, loop.time() - 1) is False
        # bytes that arrive with nobody reading are kept for the next reader (or a flush)
        server.conns[0].write(b"\x01\x02")
        await until(lambda: link.stats.bytes_in == 2)
        with pytest.raises(NoAnswer, match="refused"):
            await link.read_until(refuse, loop.time() + 1.0)
        # and from data_received, while waiting
        waiting = asyncio.ensure_future(link.read_until(refuse, loop.time() + 1.0))
        await asyncio.sleep(0.02)
        server.conns[0].write(b"\x03")
        with pytest.raises(NoAnswer, match="refused"):
            await waiting
    finally:
        await link.close()


@pytest.mark.asyncio
async def test_read_until_raises_link_down_when_the_peer_goes_away(toy_server) -> None:
    server = await toy_server(silent)
    link = TcpLink(TcpSettings(server.host, server.port, reconnect=FAST))
    loop = asyncio.get_running_loop()
    try:
        await link.open()
        await until(lambda: server.connections == 1)
        waiting = asyncio.ensure_future(link.read_until(lambda data: False, loop.time() + 5.0))
        await asyncio.sleep(0.02)
        server.conns[0].hang_up()
        t0 = loop.time()
        with pytest.raises(LinkDown):
            await waiting
        assert loop.time() - t0 < 1.0  # not at the deadline
    finally:
        await link.close()


@pytest.mark.asyncio
async def test_flush_input_discards_and_counts(toy_server) -> None:
    server = await toy_server(silent)
    link = TcpLink(TcpSettings(server.host, server.port))
    loop = asyncio.get_running_loop()
    try:
        await link.open()
        await until(lambda: server.connections == 1)
        server.conns[0].write(b"\x01\x02\x03\x04\x05\x06\x07")
        await until(lambda: link.stats.bytes_in == 7)
        assert link.flush_input() == 7
        assert link.flush_input() == 0
        assert await link.read(loop.time() + 0.05) == b""
    finally:
        await link.close()


@pytest.mark.asyncio
async def test_tcp_down_raises_link_down_and_says_why() -> None:
    port = free_port()
    link = TcpLink(TcpSettings("127.0.0.1", port, reconnect=FAST))
    loop = asyncio.get_running_loop()
    try:
        assert await link.open() is False
        assert not link.connected
        assert link.down_since is not None
        assert "refused" in link.stats.last_error.lower()
        with pytest.raises(LinkDown):
            await link.write(b"x")
        with pytest.raises(LinkDown):
            await link.read(loop.time() + 0.05)
        assert await link.wait_connected(0.05) is False
    finally:
        await link.close()


@pytest.mark.asyncio
async def test_tcp_reconnects_with_backoff_after_server_restart(toy_server) -> None:
    server = await toy_server()
    link = TcpLink(TcpSettings(server.host, server.port, reconnect=FAST))
    try:
        assert await link.open()
        await link.write(request(1, 1).encode())
        assert (await read_frame(link)).seq == 1

        await server.stop()
        await until(lambda: not link.connected)
        attempts_before = link.stats.open_attempts
        await asyncio.sleep(0.6)
        during_outage = link.stats.open_attempts - attempts_before
        # backoff 0.1, 0.2, 0.4, 0.4...: a handful of tries, not a busy loop
        assert 1 <= during_outage <= 5

        await server.start()
        assert await link.wait_connected(1.0)
        assert link.stats.connects == 2
        assert link.stats.losses == 1
        await link.write(request(1, 2).encode())
        assert (await read_frame(link)).seq == 2
        assert server.connections == 2
    finally:
        await link.close()


@pytest.mark.asyncio
async def test_peer_that_closes_right_after_accepting_is_retried_not_trusted() -> None:
    accepted = 0

    async def bouncer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        if accepted <= 2:  # "too many clients": accept, then close at once
            writer.close()
            return
        writer.write(b"hello")
        await reader.read()  # hold the connection until the link closes it
        writer.close()

    server = await asyncio.start_server(bouncer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    link = TcpLink(TcpSettings("127.0.0.1", port, reconnect=BackoffPolicy(initial=0.02, maximum=0.05)))
    loop = asyncio.get_running_loop()
    try:
        await link.open()
        await until(lambda: link.connected and link.stats.bytes_in == 5, within=1.5)
        assert await link.read(loop.time() + 0.1) == b"hello"
        assert accepted == 3
        assert link.stats.open_attempts >= 3
    finally:
        await link.close()
        server.close()
        await server.wait_closed()


@pytest.mark.asyncio
async def test_half_open_link_is_reconnected_after_consecutive_silences(toy_server) -> None:
    async def dead_first_connection(frame: ToyFrame, conn: PeerConn) -> None:
        if conn.number > 1:  # the first socket looks up but nothing ever answers on it
            conn.write(frame.reply().encode())

    server = await toy_server(dead_first_connection)
    link = TcpLink(
        TcpSettings(server.host, server.port, no_reply_limit=2, reconnect=BackoffPolicy(initial=0.05, maximum=0.1))
    )
    bus = Bus("b", link, settings=BusSettings(reply_timeout=0.1, attempts=1))
    try:
        await bus.open()
        for seq in (1, 2):
            with pytest.raises(NoAnswer):
                await bus.exchange(request(1, seq).encode(), ToyExchange(request(1, seq)))
        assert link.stats.half_open_resets == 1
        reply = await bus.exchange(request(1, 3).encode(), ToyExchange(request(1, 3)))
        assert reply.seq == 3
        assert server.connections == 2
        assert link.stats.connects == 2
    finally:
        await bus.close()


@pytest.mark.asyncio
async def test_a_single_silence_does_not_reconnect(toy_server) -> None:
    async def skip_first(frame: ToyFrame, conn: PeerConn) -> None:
        if frame.seq != 1:
            conn.write(frame.reply().encode())

    server = await toy_server(skip_first)
    link = TcpLink(TcpSettings(server.host, server.port, no_reply_limit=2))
    bus = Bus("b", link, settings=BusSettings(reply_timeout=0.1, attempts=1))
    try:
        await bus.open()
        with pytest.raises(NoAnswer):
            await bus.exchange(request(1, 1).encode(), ToyExchange(request(1, 1)))
        await bus.exchange(request(1, 2).encode(), ToyExchange(request(1, 2)))
        with pytest.raises(NoAnswer):
            await bus.exchange(request(1, 1).encode(), ToyExchange(request(1, 1)))
        assert link.stats.half_open_resets == 0  # the answer in between reset the count
        assert server.connections == 1
    finally:
        await bus.close()


# -- serial (pty at 8N1) ---------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_serial_pty_roundtrip_8n1(pty_meter) -> None:
    meter = pty_meter()
    link = SerialLink(SerialSettings(meter.path, baudrate=9600))
    try:
        assert await link.open()
        await link.write(request(9, 4, b"abc").encode())
        assert await read_frame(link) == ToyFrame(0x81, 9, 4, b"re:abc")
        assert meter.arrivals[0].frame == request(9, 4, b"abc")
        assert link.tx_time(96) == pytest.approx(0.1)  # 10 bits per character at 9600 baud
        received = link.stats.bytes_in
        meter.write(b"\x00\x11\x22")
        await until(lambda: link.stats.bytes_in == received + 3)
        assert link.flush_input() == 3
    finally:
        await link.close()


@pytest.mark.asyncio
async def test_serial_rs485_refused_is_logged_once_and_the_link_runs(pty_meter, caplog) -> None:
    meter = pty_meter()
    link = SerialLink(SerialSettings(meter.path, rs485=Rs485Settings()))
    caplog.set_level(logging.INFO, logger="meter_gateway.drivers")
    try:
        assert await link.open()
        assert not link.rs485_active
        refusals = [r for r in caplog.records if "event=rs485_mode_refused" in r.getMessage()]
        assert len(refusals) == 1
        assert refusals[0].levelno == logging.WARNING
        await link.write(request(1, 1).encode())
        assert (await read_frame(link)).seq == 1
    finally:
        await link.close()


@pytest.mark.asyncio
async def test_serial_settings_reach_the_device(pty_meter) -> None:
    # ptys refuse parity: that the open fails proves 8E1 is really applied, and the error is clear
    meter = pty_meter()
    link = SerialLink(SerialSettings(meter.path, baudrate=2400, parity="E", reconnect=FAST))
    try:
        assert await link.open() is False
        assert "refused line settings 2400 8E1" in link.stats.last_error
    finally:
        await link.close()


@pytest.mark.asyncio
async def test_serial_adapter_vanishes_and_returns_without_spinning(pty_meter, tmp_path: Path) -> None:
    by_id = tmp_path / "usb-FTDI_FT232R_A1B2C3-if00-port0"
    first = pty_meter()
    by_id.symlink_to(first.path)
    link = SerialLink(SerialSettings(str(by_id), reconnect=FAST))
    try:
        assert await link.open()
        await link.write(request(1, 1).encode())
        assert (await read_frame(link)).seq == 1

        # unplug: the line hangs up and the by-id path disappears
        await first.close()
        by_id.unlink()
        await until(lambda: not link.connected)
        attempts_before = link.stats.open_attempts
        cpu_before = time.process_time()
        await asyncio.sleep(0.6)
        assert link.stats.open_attempts - attempts_before <= 5
        assert time.process_time() - cpu_before < 0.25  # sleeping between attempts, not spinning
        with pytest.raises(LinkDown):
            await link.write(b"x")

        # plug back in: a new tty behind the same stable path
        second = pty_meter()
        by_id.symlink_to(second.path)
        assert await link.wait_connected(1.5)
        await link.write(request(1, 2).encode())
        assert (await read_frame(link)).seq == 2
        assert second.arrivals[0].frame.seq == 2
        assert link.stats.connects == 2
    finally:
        await link.close()


@pytest.mark.asyncio
async def test_serial_path_now_naming_another_device_is_noticed_on_silence(pty_meter, tmp_path: Path) -> None:
    by_id = tmp_path / "usb-adapter"
    old = pty_meter(silent)  # the old line still looks open but nothing answers on it
    by_id.symlink_to(old.path)
    link = SerialLink(SerialSettings(str(by_id), reconnect=BackoffPolicy(initial=0.05, maximum=0.1)))
    bus = Bus("rs485-1", link, settings=BusSettings(reply_timeout=0.1, attempts=1))
    try:
        await bus.open()
        new = pty_meter()
        by_id.unlink()
        by_id.symlink_to(new.path)
        with pytest.raises(NoAnswer):
            await bus.exchange(request(1, 1).encode(), ToyExchange(request(1, 1)))
        reply = await bus.exchange(request(1, 2).encode(), ToyExchange(request(1, 2)))
        assert reply.seq == 2
        assert [a.frame.seq for a in new.arrivals] == [2]
        assert link.stats.connects == 2
        assert by_id.resolve() == Path(new.path)
    finally:
        await bus.close()


@pytest.mark.asyncio
async def test_close_while_connecting_leaks_nothing() -> None:
    # nothing listens; close() during the backoff sleep must end the supervisor cleanly
    link = TcpLink(TcpSettings("127.0.0.1", free_port(), reconnect=FAST))
    await link.open()
    await link.close()
    await link.close()  # idempotent
    assert not link.connected
    with socket.socket() as s:  # the loop is still healthy
        s.bind(("127.0.0.1", 0))

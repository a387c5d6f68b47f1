"""The bus scheduler against scripted TCP meters speaking the toy framing (tests/plugins/peers.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest

from meter_gateway.drivers.backoff import BackoffPolicy
from meter_gateway.drivers.bus import Bus, BusSettings, Priority
from meter_gateway.drivers.errors import BadReply, LinkDown, MeterRefused, NoAnswer
from meter_gateway.drivers.health import HealthBook, HealthPolicy, MeterOffline, MeterState, StateChange
from meter_gateway.drivers.tcp_link import TcpLink
from meter_gateway.drivers.transport import TcpSettings
from meter_gateway.drivers.turn_lock import TurnLock
from meter_gateway.protocols.exchange import Answer, Event, Refusal, Unusable
from tests.plugins.peers import (
    SYNC,
    PeerConn,
    ToyExchange,
    ToyFrame,
    ToyServer,
    request,
    silent,
    until,
)
from tests.plugins.ports import free_port

QUICK_RETRY = BackoffPolicy(initial=0.02, maximum=0.05)


def make_bus(server: ToyServer, **settings: object) -> Bus:
    link = TcpLink(
        TcpSettings(server.host, server.port, no_reply_limit=0, reconnect=BackoffPolicy(initial=0.05, maximum=0.1))
    )
    return Bus(f"bus-{server.port}", link, settings=BusSettings(**settings))  # type: ignore[arg-type]


async def ask(bus: Bus, address: int, seq: int, **kw: object) -> ToyFrame:
    req = request(address, seq, b"q")
    return await bus.exchange(req.encode(), ToyExchange(req), **kw)  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_many_buses_run_concurrently_one_transaction_at_a_time_each(toy_server) -> None:
    async def slow_meter(frame: ToyFrame, conn: PeerConn) -> None:
        await asyncio.sleep(0.02)
        conn.write(frame.reply().encode())

    server = await toy_server(slow_meter)
    buses = [make_bus(server, reply_timeout=1.0) for _ in range(100)]
    try:
        assert all(await asyncio.gather(*(b.open() for b in buses)))
        t0 = time.monotonic()
        # three transactions per bus submitted at once: each bus must serialize its own
        replies = await asyncio.gather(*(ask(b, 1, seq) for b in buses for seq in (1, 2, 3)))
        elapsed = time.monotonic() - t0
        assert [r.seq for r in replies] == [1, 2, 3] * 100
        assert server.overlaps == 0  # no bus ever had two requests outstanding
        assert len(server.arrivals) == 300
        assert elapsed < 1.5  # 300 x 20 ms would be 6 s if the buses were not concurrent
        assert all(b.counters.ok == 3 and b.counters.sent == 3 for b in buses)
    finally:
        await asyncio.gather(*(b.close() for b in buses))


@pytest.mark.asyncio
async def test_dribbling_peer_cannot_extend_the_deadline(toy_server) -> None:
    async def dribble(frame: ToyFrame, conn: PeerConn) -> None:
        for byte in frame.reply(b"x" * 20).encode():
            conn.write(bytes([byte]))
            await asyncio.sleep(0.03)

    server = await toy_server(dribble)
    bus = make_bus(server, reply_timeout=0.2, attempts=1)
    try:
        await bus.open()
        t0 = time.monotonic()
        with pytest.raises(NoAnswer):
            await ask(bus, 1, 1)
        assert 0.18 <= time.monotonic() - t0 < 0.35
        assert bus.counters.timeouts == 1
        assert bus.counters.no_answer == 1
    finally:
        await bus.close()


def serial_trickle(
    interval: float, payload: bytes, wire: asyncio.Lock | None = None
) -> tuple[Callable[[ToyFrame, PeerConn], Awaitable[None]], list[float]]:
    """A meter on a serial line (``wire``: one reply on it at a time) that sends its replies one
    byte at a time (a request heard while a reply is on the line waits its turn); also the times
    its replies end."""
    line = wire or asyncio.Lock()
    finished: list[float] = []

    async def trickle(frame: ToyFrame, conn: PeerConn) -> None:
        async with line:
            for byte in frame.reply(payload).encode():
                conn.write(bytes([byte]))
                await asyncio.sleep(interval)
            finished.append(asyncio.get_running_loop().time())

    return trickle, finished


@pytest.mark.asyncio
async def test_a_trickle_whose_previous_tail_reaches_the_window_is_one_overrun_not_noise(toy_server) -> None:
    # 25 bytes, 30 ms apart: 0.75 s a reply, longer than the meter's turn (2 attempts x 0.3 s), so
    # the last bytes of the first reply land in the window of the next request, as garbage, before
    # the second reply starts trickling.
    trickle, finished = serial_trickle(0.03, b"x" * 20)
    server = await toy_server(trickle)
    bus = make_bus(server, reply_timeout=0.3, attempts=2, retry=QUICK_RETRY)
    try:
        await bus.open()
        for seq in (1, 2):
            with pytest.raises(NoAnswer, match="still arriving"):
                await ask(bus, 1, seq)
            assert len(server.arrivals) == seq  # one attempt per transaction: an overrun is not retried
        c = bus.counters
        assert (c.sent, c.retries, c.timeouts, c.no_answer, c.bad_reply) == (2, 0, 2, 2, 0)
        # the fault happened: the first reply's tail was heard, as garbage, in the second window
        assert finished[0] > server.arrivals[1].at
        assert c.garbage_bytes > 0
    finally:
        await bus.close()


@pytest.mark.asyncio
async def test_a_neighbour_whose_window_a_trickle_runs_into_gets_its_retries(toy_server) -> None:
    # Meter 1 trickles a 40-byte reply (1.2 s) holding a sync byte that announces a long frame; its
    # turn ends at 0.6 s, and the rest of its trickle runs through meter 2's first two windows,
    # held as the start of a frame at their deadlines. Those bytes are meter 1's: meter 2 is
    # retried (as before the dribbler's overrun rule) and answers once the line is free.
    wire = asyncio.Lock()
    trickle, _ = serial_trickle(0.03, b"x" * 19 + bytes([SYNC, 0x40]) + b"x" * 14, wire)

    async def shared_line(frame: ToyFrame, conn: PeerConn) -> None:
        if frame.address == 1:
            await trickle(frame, conn)
            return
        async with wire:  # the neighbour waits for the line like any meter on it
            conn.write(frame.reply().encode())

    server = await toy_server(shared_line)
    bus = make_bus(server, reply_timeout=0.3, attempts=2, retry=QUICK_RETRY)
    try:
        await bus.open()
        with pytest.raises(NoAnswer, match="still arriving"):
            await ask(bus, 1, 1, meter="m1")
        reply = await ask(bus, 2, 1, meter="m2", attempts=3)
        assert reply == ToyFrame(0x81, 2, 1, b"re:q")
        assert [a.frame.address for a in server.arrivals][:3] == [1, 2, 2]  # retried, not given up
    finally:
        await bus.close()


@pytest.mark.asyncio
async def test_a_line_noisy_up_to_the_deadline_gets_its_retries(toy_server) -> None:
    async def noise_until_after_the_deadline(frame: ToyFrame, conn: PeerConn) -> None:
        for _ in range(20):  # 0.4 s of noise, past the 0.2 s deadline
            conn.write(b"\x11")
            await asyncio.sleep(0.02)

    server = await toy_server(noise_until_after_the_deadline)
    bus = make_bus(server, reply_timeout=0.2, attempts=3, retry=QUICK_RETRY)
    try:
        await bus.open()
        with pytest.raises(BadReply, match="garbage"):
            await ask(bus, 1, 1)
        assert len(server.arrivals) == 3
        c = bus.counters
        assert (c.sent, c.retries, c.bad_reply, c.no_answer) == (3, 2, 1, 0)
    finally:
        await bus.close()


@pytest.mark.asyncio
async def test_inter_frame_gap_measured_from_the_last_byte_on_the_bus(toy_server) -> None:
    async def reply_then_noise(frame: ToyFrame, conn: PeerConn) -> None:
        conn.write(frame.reply().encode())
        if frame.seq == 1:
            await asyncio.sleep(0.05)
            conn.write(b"\x00")  # a stray byte after the reply keeps the bus busy

    server = await toy_server(reply_then_noise)
    bus = make_bus(server, inter_frame_gap=0.15)
    try:
        await bus.open()
        await ask(bus, 1, 1)
        await ask(bus, 1, 2)
        await ask(bus, 1, 3)
        _, second, third = server.arrivals
        reply1, stray, reply2, _ = server.conns[0].sent_at
        assert stray - reply1 >= 0.04
        assert second.at - stray >= 0.14  # quiet for the gap after the stray byte, not the reply
        assert third.at - reply2 >= 0.14
        assert bus.counters.stale_bytes_flushed == 1
    finally:
        await bus.close()


@pytest.mark.asyncio
async def test_stale_input_is_flushed_before_the_request(toy_server) -> None:
    server = await toy_server()
    bus = make_bus(server)
    link = bus.transport
    assert isinstance(link, TcpLink)
    try:
        await bus.open()
        await until(lambda: server.connections == 1)
        # an old reply that arrived between transactions: must not be taken as the next answer
        stale = ToyFrame(0x81, 1, 7, b"old").encode() + b"\xff\xfe"
        server.conns[0].write(stale)
        await until(lambda: link.stats.bytes_in == len(stale))
        reply = await ask(bus, 1, 7)
        assert reply.payload == b"re:q"
        assert bus.counters.stale_bytes_flushed == len(stale)
        assert bus.counters.late_replies == 0
        assert bus.counters.garbage_bytes == 0
    finally:
        await bus.close()


@pytest.mark.asyncio
async def test_echo_of_our_request_is_ignored_and_the_real_reply_taken(toy_server) -> None:
    async def echoing_adapter(frame: ToyFrame, conn: PeerConn) -> None:
        conn.write(frame.encode())  # the adapter hears itself
        await asyncio.sleep(0.01)
        conn.write(frame.reply().encode())

    server = await toy_server(echoing_adapter)
    bus = make_bus(server)
    try:
        await bus.open()
        reply = await ask(bus, 4, 1)
        assert reply == ToyFrame(0x81, 4, 1, b"re:q")
        assert bus.counters.echo_ignored == 1
        assert bus.counters.ok == 1
        assert bus.counters.retries == 0
    finally:
        await bus.close()


@pytest.mark.asyncio
async def test_late_reply_is_never_attributed_to_the_current_request(toy_server) -> None:
    delays = {1: 0.3, 2: 0.25}

    async def slow_first(frame: ToyFrame, conn: PeerConn) -> None:
        await asyncio.sleep(delays[frame.seq])
        conn.write(frame.reply(f"answer {frame.seq}".encode()).encode())

    server = await toy_server(slow_first)
    bus = make_bus(server, attempts=1)
    try:
        await bus.open()
        with pytest.raises(NoAnswer):
            await ask(bus, 1, 1, reply_timeout=0.15)
        # request 2 goes out at ~0.15 s; the reply to request 1 lands at ~0.3 s, inside its window
        reply = await ask(bus, 1, 2, reply_timeout=0.4)
        assert reply.seq == 2
        assert reply.payload == b"answer 2"
        assert bus.counters.late_replies == 1
        assert bus.counters.ok == 1
    finally:
        await bus.close()


@pytest.mark.asyncio
async def test_reply_from_another_meter_is_counted_and_skipped(toy_server) -> None:
    async def crosstalk(frame: ToyFrame, conn: PeerConn) -> None:
        conn.write(ToyFrame(0x81, frame.address + 1, frame.seq, b"not yours").encode())
        conn.write(ToyFrame(0x01, frame.address, frame.seq, b"a request").encode())
        conn.write(frame.reply().encode())

    server = await toy_server(crosstalk)
    bus = make_bus(server)
    try:
        await bus.open()
        assert (await ask(bus, 2, 1)).address == 2
        assert bus.counters.mismatched == 2
    finally:
        await bus.close()


@pytest.mark.asyncio
async def test_retries_then_no_answer(toy_server) -> None:
    server = await toy_server(silent)
    bus = make_bus(server, reply_timeout=0.1, attempts=3, retry=QUICK_RETRY)
    try:
        await bus.open()
        with pytest.raises(NoAnswer):
            await ask(bus, 1, 1)
        assert len(server.arrivals) == 3
        c = bus.counters
        assert (c.sent, c.retries, c.timeouts, c.no_answer, c.ok) == (3, 2, 3, 1, 0)
    finally:
        await bus.close()


@pytest.mark.asyncio
async def test_retry_succeeds_after_a_missed_reply(toy_server) -> None:
    async def deaf_once(frame: ToyFrame, conn: PeerConn) -> None:
        if len(server.arrivals) > 1:
            conn.write(frame.reply().encode())

    server = await toy_server(deaf_once)
    bus = make_bus(server, reply_timeout=0.1, attempts=3, retry=QUICK_RETRY)
    try:
        await bus.open()
        assert (await ask(bus, 1, 1)).seq == 1
        assert (bus.counters.retries, bus.counters.timeouts, bus.counters.ok) == (1, 1, 1)
    finally:
        await bus.close()


@pytest.mark.asyncio
async def test_garbage_only_ends_in_bad_reply(toy_server) -> None:
    async def noisy(frame: ToyFrame, conn: PeerConn) -> None:
        conn.write(b"\x11\x22\x33\x44")

    server = await toy_server(noisy)
    bus = make_bus(server, reply_timeout=0.1, attempts=2, retry=QUICK_RETRY)
    try:
        await bus.open()
        with pytest.raises(BadReply, match="garbage"):
            await ask(bus, 1, 1)
        assert bus.counters.garbage_bytes == 8
        assert bus.counters.bad_reply == 1
        assert bus.counters.no_answer == 0
    finally:
        await bus.close()


class RefusingExchange(ToyExchange):
    """The toy reply ``ERR`` is the meter's refusal; ``BAD`` a reply whose content does not decode."""

    def consider(self, frame: ToyFrame) -> Event[ToyFrame]:
        event = super().consider(frame)
        if isinstance(event, Answer) and frame.payload == b"ERR":
            return Refusal("meter refused", 0x04, ("bad password",))
        if isinstance(event, Answer) and frame.payload == b"BAD":
            return Unusable("the reply does not decode")
        return event


@pytest.mark.asyncio
async def test_meter_refusal_is_not_retried_and_counts_as_alive(toy_server) -> None:
    async def refuse(frame: ToyFrame, conn: PeerConn) -> None:
        conn.write(frame.reply(b"ERR").encode())

    server = await toy_server(refuse)
    bus = make_bus(server, attempts=3)
    bus.health = HealthBook()
    try:
        await bus.open()
        req = request(1, 1)
        with pytest.raises(MeterRefused) as err:
            await bus.exchange(req.encode(), RefusingExchange(req), meter="m1")
        assert err.value.code == 0x04
        assert len(server.arrivals) == 1
        assert bus.counters.refused == 1
        assert bus.counters.retries == 0
        assert bus.health.state("m1") is MeterState.ONLINE
    finally:
        await bus.close()


@pytest.mark.asyncio
async def test_command_jumps_ahead_of_queued_polls_fifo_within_priority(toy_server) -> None:
    release = asyncio.Event()

    async def hold_the_first(frame: ToyFrame, conn: PeerConn) -> None:
        if frame.seq == 1:
            await release.wait()  # the first transaction holds the bus while the others queue
        conn.write(frame.reply().encode())

    server = await toy_server(hold_the_first)
    bus = make_bus(server, reply_timeout=2.0)
    try:
        await bus.open()
        holder = asyncio.create_task(ask(bus, 1, 1))
        await until(lambda: len(server.arrivals) == 1)
        queued = [
            ("poll-1", 2, Priority.POLL),
            ("backfill", 3, Priority.BACKFILL),
            ("poll-2", 4, Priority.POLL),
            ("poll-cancelled", 5, Priority.POLL),
            ("disconnect", 6, Priority.COMMAND),
        ]
        tasks: dict[str, asyncio.Task[ToyFrame]] = {}
        for name, seq, priority in queued:
            tasks[name] = asyncio.create_task(ask(bus, 1, seq, priority=priority))
            await asyncio.sleep(0)
        assert bus.queued == 5
        tasks.pop("poll-cancelled").cancel()
        release.set()
        replies = await asyncio.gather(holder, *tasks.values())
        assert [r.seq for r in replies] == [1, 2, 3, 4, 6]
        order = [a.frame.seq for a in server.arrivals]
        assert order == [1, 6, 2, 4, 3]  # the command first, then the polls FIFO, the backfill last
        assert bus.queued == 0
        assert bus.counters.ok == 5
        assert server.overlaps == 0
    finally:
        await bus.close()


@pytest.mark.asyncio
async def test_quiet_gap_between_transactions_and_failures_reach_the_health_book(toy_server) -> None:
    async def answer_until_seq_4(frame: ToyFrame, conn: PeerConn) -> None:
        if frame.seq < 4:
            conn.write(frame.reply().encode())

    server = await toy_server(answer_until_seq_4)
    health = HealthBook(HealthPolicy(degraded_after=1, offline_after=5))
    bus = make_bus(server, reply_timeout=0.1, attempts=1, inter_frame_gap=0.05)
    bus.health = health
    try:
        await bus.open()
        replies = await asyncio.gather(*(ask(bus, 1, seq, meter="m") for seq in (1, 2, 3)))
        assert [r.seq for r in replies] == [1, 2, 3]
        assert server.overlaps == 0
        reply_at = server.conns[0].sent_at
        arrivals = [a.at for a in server.arrivals]
        assert arrivals[1] - reply_at[0] >= 0.04
        assert arrivals[2] - reply_at[1] >= 0.04
        with pytest.raises(NoAnswer):
            await ask(bus, 1, 4, meter="m")
        assert bus.counters.no_answer == 1
        assert bus.counters.ok == 3
        assert health.state("m") is MeterState.DEGRADED
    finally:
        await bus.close()


@pytest.mark.asyncio
async def test_offline_meter_is_probed_slowly_and_fails_fast_in_between(toy_server) -> None:
    alive = False

    async def sometimes(frame: ToyFrame, conn: PeerConn) -> None:
        if alive:
            conn.write(frame.reply().encode())

    changes: list[StateChange] = []
    server = await toy_server(sometimes)
    bus = make_bus(server, reply_timeout=0.05, attempts=2, retry=QUICK_RETRY)
    bus.health = HealthBook(
        HealthPolicy(degraded_after=1, offline_after=2, probe_interval=0.3), on_change=changes.append
    )
    try:
        await bus.open()
        for seq in (1, 2):
            with pytest.raises(NoAnswer):
                await ask(bus, 1, seq, meter="m1")
        assert bus.health.state("m1") is MeterState.OFFLINE
        sent = len(server.arrivals)
        assert sent == 4

        t0 = time.monotonic()
        with pytest.raises(MeterOffline):
            await ask(bus, 1, 3, meter="m1")
        assert time.monotonic() - t0 < 0.02
        assert len(server.arrivals) == sent  # nothing touched the wire
        # other meters on the bus are unaffected
        alive = True
        assert (await ask(bus, 2, 4, meter="m2")).address == 2
        alive = False

        await asyncio.sleep(0.3)
        with pytest.raises(NoAnswer):  # the probe: one attempt only
            await ask(bus, 1, 5, meter="m1")
        assert len(server.arrivals) == sent + 2
        with pytest.raises(MeterOffline):
            await ask(bus, 1, 6, meter="m1")

        alive = True
        await asyncio.sleep(0.3)
        assert (await ask(bus, 1, 7, meter="m1")).seq == 7
        assert bus.health.state("m1") is MeterState.ONLINE
        transitions = [(c.meter_id, c.old, c.new) for c in changes]
        assert transitions == [
            ("m1", MeterState.UNKNOWN, MeterState.DEGRADED),
            ("m1", MeterState.DEGRADED, MeterState.OFFLINE),
            ("m2", MeterState.UNKNOWN, MeterState.ONLINE),
            ("m1", MeterState.OFFLINE, MeterState.ONLINE),
        ]
        assert bus.counters.offline_skipped == 2
        assert bus.counters.probes == 2
        # operator commands are not held back by the offline gate
    finally:
        await bus.close()


@pytest.mark.asyncio
async def test_queued_transactions_of_a_meter_gone_offline_fail_fast(toy_server) -> None:
    server = await toy_server(silent)
    bus = make_bus(server, reply_timeout=0.05, attempts=1)
    bus.health = HealthBook(HealthPolicy(degraded_after=1, offline_after=1, probe_interval=60))
    try:
        await bus.open()
        t0 = time.monotonic()
        results = await asyncio.gather(*(ask(bus, 1, s, meter="m1") for s in range(1, 11)), return_exceptions=True)
        assert isinstance(results[0], NoAnswer)
        assert not isinstance(results[0], MeterOffline)
        assert all(isinstance(r, MeterOffline) for r in results[1:])
        assert len(server.arrivals) == 1
        assert time.monotonic() - t0 < 0.2
        # a forced transaction (a remote disconnect) still goes out
        with pytest.raises(NoAnswer):
            await ask(bus, 1, 11, meter="m1", priority=Priority.COMMAND, force=True)
        assert len(server.arrivals) == 2
    finally:
        await bus.close()


@pytest.mark.asyncio
async def test_link_down_waits_briefly_then_fails_fast_and_spares_meter_health() -> None:
    link = TcpLink(TcpSettings("127.0.0.1", free_port(), reconnect=BackoffPolicy(initial=0.5, maximum=1)))
    health = HealthBook()
    bus = Bus("dead", link, settings=BusSettings(link_wait=0.2), health=health)
    try:
        assert await bus.open() is False
        t0 = time.monotonic()
        with pytest.raises(LinkDown):
            await ask(bus, 1, 1, meter="m1")
        assert time.monotonic() - t0 < 0.3
        t1 = time.monotonic()
        with pytest.raises(LinkDown):
            await ask(bus, 1, 2, meter="m1")
        assert time.monotonic() - t1 < 0.05  # later in the outage: no waiting, the queue drains
        assert bus.counters.link_down == 2
        assert bus.counters.sent == 0
        assert health.state("m1") is MeterState.UNKNOWN
        snap = bus.snapshot()
        assert snap["link_down"] == 2
        assert snap["link_connected"] == 0
        assert snap["link_open_attempts"] >= 1
    finally:
        await bus.close()
    with pytest.raises(LinkDown):
        await ask(bus, 1, 3)


@pytest.mark.asyncio
async def test_transaction_rides_over_a_reconnect(toy_server) -> None:
    server = await toy_server()
    bus = make_bus(server, link_wait=1.0, reply_timeout=0.2)
    try:
        await bus.open()
        assert (await ask(bus, 1, 1)).seq == 1
        server.drop_connections()  # the concentrator closed an idle connection
        # (a connection that had answered is reconnected at once: wait for the loss, not the gap)
        await until(lambda: bus.transport is not None and bus.transport.stats.losses == 1)
        assert (await ask(bus, 1, 2)).seq == 2
        assert server.connections == 2
    finally:
        await bus.close()


@pytest.mark.asyncio
async def test_link_lost_mid_transaction_is_retried_after_the_reconnect(toy_server) -> None:
    async def hang_up_on_first(frame: ToyFrame, conn: PeerConn) -> None:
        if conn.number == 1:
            conn.hang_up()
        else:
            conn.write(frame.reply().encode())

    server = await toy_server(hang_up_on_first)
    bus = make_bus(server, attempts=2, reply_timeout=0.5, link_wait=1.0, retry=QUICK_RETRY)
    try:
        await bus.open()
        assert (await ask(bus, 1, 1)).seq == 1
        assert [a.conn for a in server.arrivals] == [1, 2]
        assert bus.counters.retries == 1
        assert bus.counters.link_down == 0
    finally:
        await bus.close()


@pytest.mark.asyncio
async def test_broadcast_send_expects_no_reply(toy_server) -> None:
    server = await toy_server(silent)
    bus = make_bus(server)
    try:
        await bus.open()
        t0 = time.monotonic()
        await bus.send(request(0xFF, 1, b"time").encode(), priority=Priority.COMMAND)
        assert time.monotonic() - t0 < 0.1
        await until(lambda: server.arrivals)
        assert server.arrivals[0].frame.address == 0xFF
        assert bus.counters.sent == 1
    finally:
        await bus.close()


@pytest.mark.asyncio
async def test_an_unusable_reply_is_retried_then_ends_in_bad_reply(toy_server) -> None:
    async def bad_then_good(frame: ToyFrame, conn: PeerConn) -> None:
        payload = b"BAD" if len(server.arrivals) < 3 else b"fine"
        conn.write(frame.reply(payload).encode())

    server = await toy_server(bad_then_good)
    bus = make_bus(server, attempts=2, retry=QUICK_RETRY)
    bus.health = HealthBook()
    try:
        await bus.open()
        req = request(1, 1)
        with pytest.raises(BadReply, match="does not decode"):
            await bus.exchange(req.encode(), RefusingExchange(req), meter="m1")
        assert (bus.counters.sent, bus.counters.retries, bus.counters.bad_reply) == (2, 1, 1)
        assert bus.counters.timeouts == 0  # it was an answer, not silence
        reply = await bus.exchange(req.encode(), RefusingExchange(req), meter="m1")
        assert reply.payload == b"fine"
        assert bus.health.state("m1") is MeterState.ONLINE
    finally:
        await bus.close()


@pytest.mark.asyncio
async def test_turn_lock_passes_a_turn_on_when_its_waiter_is_cancelled() -> None:
    turns = TurnLock()
    await turns.acquire(Priority.POLL)
    order: list[str] = []

    async def take(name: str, priority: int) -> None:
        await turns.acquire(priority)
        order.append(name)
        turns.release()

    poll = asyncio.create_task(take("poll", Priority.POLL))
    command = asyncio.create_task(take("command", Priority.COMMAND))
    doomed = asyncio.create_task(take("doomed", Priority.COMMAND))
    await asyncio.sleep(0)
    assert turns.waiting == 3
    turns.release()  # the command gets the turn ...
    command.cancel()  # ... and is cancelled before it runs: the turn goes on
    await asyncio.gather(poll, doomed, command, return_exceptions=True)
    assert order == ["doomed", "poll"]  # commands first, FIFO among equals
    await asyncio.wait_for(turns.acquire(Priority.POLL), 1.0)  # and the lock is free again

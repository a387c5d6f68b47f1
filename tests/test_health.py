"""Per-meter health book with an injected clock (no I/O needed: it is pure bookkeeping)."""

from __future__ import annotations

import logging

import pytest

from meter_gateway.drivers.errors import BadReply, ConfigurationError, LinkDown, MeterRefused, NoAnswer
from meter_gateway.drivers.health import LINK_DOWN, HealthBook, HealthPolicy, MeterOffline, MeterState, StateChange


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_transitions_follow_consecutive_failures(clock: Clock) -> None:
    changes: list[StateChange] = []
    book = HealthBook(
        HealthPolicy(degraded_after=2, offline_after=4, probe_interval=30), on_change=changes.append, clock=clock
    )
    assert book.state("m") is MeterState.UNKNOWN
    book.record("m", None)
    assert book.state("m") is MeterState.ONLINE
    book.record("m", NoAnswer("x"))
    assert book.state("m") is MeterState.ONLINE  # one miss is not yet degraded with degraded_after=2
    book.record("m", BadReply("garbled"))
    assert book.state("m") is MeterState.DEGRADED
    book.record("m", NoAnswer("x"))
    book.record("m", NoAnswer("last straw"))
    assert book.state("m") is MeterState.OFFLINE
    assert book.get("m").failures == 4
    clock.now += 30
    book.record("m", None)
    assert book.state("m") is MeterState.ONLINE
    assert book.get("m").failures == 0
    assert [(c.old, c.new) for c in changes] == [
        (MeterState.UNKNOWN, MeterState.ONLINE),
        (MeterState.ONLINE, MeterState.DEGRADED),
        (MeterState.DEGRADED, MeterState.OFFLINE),
        (MeterState.OFFLINE, MeterState.ONLINE),
    ]
    assert changes[2].reason == "last straw"
    assert changes[2].failures == 4
    assert changes[2].at == 1000.0
    assert changes[3].reason == ""
    assert changes[3].at == 1030.0


def test_refusal_proves_the_meter_alive_and_link_errors_say_nothing(clock: Clock) -> None:
    book = HealthBook(HealthPolicy(degraded_after=1, offline_after=2), clock=clock)
    book.record("m", NoAnswer("x"))
    assert book.state("m") is MeterState.DEGRADED
    book.record("m", MeterRefused("no", code=1))
    assert book.state("m") is MeterState.ONLINE
    for _ in range(5):
        book.record("m", LinkDown("adapter unplugged"))
        book.record("m", ConfigurationError("unsupported"))
    assert book.state("m") is MeterState.ONLINE
    assert book.get("m").failures == 0


def test_offline_meter_fails_fast_until_its_probe_is_due(clock: Clock) -> None:
    book = HealthBook(HealthPolicy(degraded_after=1, offline_after=1, probe_interval=60), clock=clock)
    assert book.begin("m") is False  # unknown meters are tried normally
    book.record("m", NoAnswer("x"))
    assert book.state("m") is MeterState.OFFLINE

    clock.now += 59
    with pytest.raises(MeterOffline) as err:
        book.check("m")
    assert err.value.retry_in == pytest.approx(1.0)
    assert isinstance(err.value, NoAnswer)
    assert err.value.kind == "offline"
    with pytest.raises(MeterOffline):
        book.begin("m")

    clock.now += 1
    book.check("m")  # due: check has no side effects, so it can be asked twice
    book.check("m")
    assert book.begin("m") is True  # this caller probes (one attempt)
    with pytest.raises(MeterOffline):  # and everything queued behind it fails fast
        book.begin("m")
    book.record("m", NoAnswer("still dead"))
    book.record("m", MeterOffline("m", 5))  # fail-fast errors do not count as attempts
    assert book.get("m").failures == 2
    clock.now += 60
    assert book.begin("m") is True
    book.record("m", None)
    assert book.state("m") is MeterState.ONLINE
    assert book.begin("m") is False


def test_counts_and_states_for_export(clock: Clock) -> None:
    book = HealthBook(HealthPolicy(degraded_after=1, offline_after=2), clock=clock)
    book.record("a", None)
    book.record("b", NoAnswer("x"))
    book.record("c", NoAnswer("x"))
    book.record("c", NoAnswer("x"))
    book.get("d")
    assert book.states() == {
        "a": MeterState.ONLINE,
        "b": MeterState.DEGRADED,
        "c": MeterState.OFFLINE,
        "d": MeterState.UNKNOWN,
    }
    assert book.counts() == {"unknown": 1, "online": 1, "degraded": 1, "offline": 1}


def test_a_failing_callback_is_logged_and_does_not_break_accounting(clock: Clock, caplog) -> None:
    def broken(change: StateChange) -> None:
        raise RuntimeError("subscriber bug")

    book = HealthBook(on_change=broken, clock=clock)
    with caplog.at_level(logging.ERROR, logger="meter_gateway.drivers.health"):
        book.record("m", None)
    assert book.state("m") is MeterState.ONLINE
    assert any("event=state_callback_crashed" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(("degraded", "offline"), [(0, 3), (4, 3)])
def test_policy_rejects_nonsense(degraded: int, offline: int) -> None:
    with pytest.raises(ValueError):
        HealthPolicy(degraded_after=degraded, offline_after=offline)


def test_a_meter_without_failures_costs_no_health_object(clock: Clock) -> None:
    """10,000 meters: only meters in a run of failures keep a MeterHealth; the rest are a state."""
    book = HealthBook(HealthPolicy(degraded_after=1, offline_after=2, probe_interval=30), clock=clock)
    book.check("a")
    book.record("b", None)
    book.record("c", NoAnswer("x"))
    assert book.state("a") is MeterState.UNKNOWN
    assert book.counts() == {"unknown": 1, "online": 1, "degraded": 1, "offline": 0}
    assert sum(isinstance(h, MeterState) for h in book._meters.values()) == 2
    copy = book.get("b")
    copy.failures = 5  # a copy: the book is not changed through it
    assert book.get("b").failures == 0
    book.record("c", NoAnswer("y"))
    assert book.get("c").state is MeterState.OFFLINE
    assert book.get("c").last_error == "y"
    clock.now += 30
    assert book.begin("c") is True
    book.record("c", None)
    assert book._meters["c"] is MeterState.ONLINE
    assert book.states() == {"a": MeterState.UNKNOWN, "b": MeterState.ONLINE, "c": MeterState.ONLINE}


def test_a_link_down_makes_the_meter_offline_without_holding_its_reads_back(clock: Clock) -> None:
    changes: list[StateChange] = []
    book = HealthBook(HealthPolicy(offline_after=3, probe_interval=60), on_change=changes.append, clock=clock)
    book.link_down("never-read")  # a link that never opened: from unknown straight to offline
    book.record("m", None)
    book.link_down("m")
    book.link_down("m")  # still down: no second change
    assert book.state("m") is MeterState.OFFLINE
    assert book.get("m").last_error == LINK_DOWN
    assert [(c.meter_id, c.old, c.new, c.reason) for c in changes] == [
        ("never-read", MeterState.UNKNOWN, MeterState.OFFLINE, LINK_DOWN),
        ("m", MeterState.UNKNOWN, MeterState.ONLINE, ""),
        ("m", MeterState.ONLINE, MeterState.OFFLINE, LINK_DOWN),
    ]
    # not gated by the probe interval: the first read after the link returns may go at once
    book.check("m")
    assert book.begin("m") is False  # full attempts, not a single probe
    book.record("m", LinkDown("still down"))  # says nothing more
    assert book.state("m") is MeterState.OFFLINE
    book.record("m", None)
    assert book.state("m") is MeterState.ONLINE
    assert (changes[-1].old, changes[-1].new) == (MeterState.OFFLINE, MeterState.ONLINE)


def test_a_link_down_does_not_rewrite_a_meter_already_offline_for_silence(clock: Clock) -> None:
    book = HealthBook(HealthPolicy(degraded_after=1, offline_after=1, probe_interval=60), clock=clock)
    book.record("m", NoAnswer("no reply"))
    book.link_down("m")
    assert book.get("m").last_error == "no reply"
    with pytest.raises(MeterOffline):
        book.check("m")  # still probe-gated: the meter itself was silent


def test_link_down_after_is_checked() -> None:
    with pytest.raises(ValueError, match="link_down_after"):
        HealthPolicy(link_down_after=-1)

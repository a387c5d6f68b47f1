"""The command lifecycle table (gateway/commands/states.py) and the store going through it.

The allowed transitions are written out here a second time, as wire strings, on purpose: a change
to the table must be a deliberate change to this list too (and to docs/commands.md "States").
"""

from __future__ import annotations

import itertools
import logging
import sqlite3
from pathlib import Path

import pytest

from meter_gateway.gateway.commands.envelope import (
    ACK_STATES,
    TERMINAL_STATES,
    Ack,
    Params,
    decode_ack,
    encode_ack,
)
from meter_gateway.gateway.commands.states import (
    ACTIVE,
    COMMAND_START,
    EXECUTION_START,
    RESULTS,
    TERMINAL,
    TRANSITIONS,
    CommandEvent,
    CommandState,
    IllegalTransition,
    Scope,
    allowed_events,
    transition,
)
from meter_gateway.gateway.store.commands import CommandStore, MeterPlan, StoreError, Transition
from tests.test_command_exec import envelope

E = CommandEvent

# (scope, state, event) -> new state, as the wire and the store spell the states.
ALLOWED: dict[tuple[Scope, str, str], str] = {
    (Scope.COMMAND, "received", "accept"): "accepted",
    (Scope.COMMAND, "received", "reject"): "rejected",
    (Scope.COMMAND, "accepted", "confirm"): "verified",
    (Scope.COMMAND, "accepted", "give_up"): "unverified",
    (Scope.EXECUTION, "accepted", "admit"): "queued",
    (Scope.EXECUTION, "accepted", "hold"): "held",
    (Scope.EXECUTION, "accepted", "reject"): "rejected",
    (Scope.EXECUTION, "accepted", "confirm"): "verified",
    (Scope.EXECUTION, "held", "release"): "queued",
    (Scope.EXECUTION, "held", "expire"): "expired",
    (Scope.EXECUTION, "queued", "send"): "sent",
    (Scope.EXECUTION, "queued", "refuse"): "meter_refused",
    (Scope.EXECUTION, "queued", "reject"): "rejected",
    (Scope.EXECUTION, "queued", "confirm"): "verified",
    (Scope.EXECUTION, "queued", "expire"): "expired",
    (Scope.EXECUTION, "queued", "fail"): "unverified",
    (Scope.EXECUTION, "sent", "acknowledge"): "meter_acknowledged",
    (Scope.EXECUTION, "sent", "no_reply"): "no_answer",
    (Scope.EXECUTION, "sent", "refuse"): "meter_refused",
    (Scope.EXECUTION, "sent", "reject"): "rejected",
    (Scope.EXECUTION, "sent", "confirm"): "verified",
    (Scope.EXECUTION, "sent", "give_up"): "unverified",
    (Scope.EXECUTION, "sent", "send"): "sent",
    (Scope.EXECUTION, "sent", "expire"): "expired",
    (Scope.EXECUTION, "sent", "fail"): "unverified",
    (Scope.EXECUTION, "meter_acknowledged", "confirm"): "verified",
    (Scope.EXECUTION, "meter_acknowledged", "give_up"): "unverified",
    (Scope.EXECUTION, "meter_acknowledged", "send"): "sent",
    (Scope.EXECUTION, "meter_acknowledged", "expire"): "expired",
    (Scope.EXECUTION, "meter_acknowledged", "fail"): "unverified",
    (Scope.EXECUTION, "no_answer", "send"): "sent",
    (Scope.EXECUTION, "no_answer", "confirm"): "verified",
    (Scope.EXECUTION, "no_answer", "give_up"): "unverified",
    (Scope.EXECUTION, "no_answer", "expire"): "expired",
    (Scope.EXECUTION, "no_answer", "fail"): "unverified",
}
WIRE_STATES = (
    "received",
    "accepted",
    "rejected",
    "queued",
    "sent",
    "meter_acknowledged",
    "meter_refused",
    "no_answer",
    "verified",
    "unverified",
    "held",
    "expired",
)
WIRE_TERMINAL = {"rejected", "meter_refused", "verified", "unverified", "expired"}

PRODUCT = list(itertools.product(Scope, CommandState, CommandEvent))


def test_states_are_the_wire_strings() -> None:
    assert sorted(s.value for s in CommandState) == sorted(WIRE_STATES)
    assert sorted(ACK_STATES) == sorted(WIRE_STATES)
    assert {s.value for s in TERMINAL} == WIRE_TERMINAL
    assert TERMINAL_STATES == TERMINAL
    assert {s.value for s in ACTIVE} == {"queued", "sent", "meter_acknowledged", "no_answer"}
    assert {s.value for s in RESULTS} == WIRE_TERMINAL - {"rejected"}
    assert (COMMAND_START.value, EXECUTION_START.value) == ("received", "accepted")


def test_an_ack_encodes_byte_identical_and_decodes_to_the_enum() -> None:
    ack = Ack(gateway="gw-1", command="c-1", meter="m1", state=CommandState.METER_ACKNOWLEDGED, at=1.5, seq=3)
    payload = encode_ack(ack)
    wire = b'{"v":1,"gateway":"gw-1","command":"c-1","meter":"m1","state":"meter_acknowledged","at":1.5,"seq":3}'
    assert payload == wire
    back = decode_ack(payload)
    assert back.state is CommandState.METER_ACKNOWLEDGED
    assert back.state == "meter_acknowledged"  # head-end code comparing with strings keeps working
    assert f"{back.state}" == "meter_acknowledged"


@pytest.mark.parametrize(("scope", "state", "event"), list(ALLOWED))
def test_every_allowed_transition(scope: Scope, state: str, event: str) -> None:
    new = transition(scope, CommandState(state), CommandEvent(event))
    assert new is CommandState(ALLOWED[scope, state, event])


@pytest.mark.parametrize(("scope", "state", "event"), PRODUCT, ids=lambda x: getattr(x, "value", x))
def test_every_other_pair_is_rejected(scope: Scope, state: CommandState, event: CommandEvent) -> None:
    if (scope, state.value, event.value) in ALLOWED:
        assert transition(scope, state, event) is CommandState(ALLOWED[scope, state.value, event.value])
        return
    with pytest.raises(IllegalTransition) as caught:
        transition(scope, state, event)
    err = caught.value
    assert (err.scope, err.state, err.event) == (scope, state, event)
    message = str(err)
    assert "\n" not in message
    assert f"state {state.value!r} cannot take event {event.value!r}" in message


def test_the_table_is_exactly_the_allowed_list() -> None:
    listed = {
        (scope, state.value, event.value): new.value
        for scope, table in TRANSITIONS.items()
        for state, events in table.items()
        for event, new in events.items()
    }
    assert listed == ALLOWED


@pytest.mark.parametrize("state", sorted(TERMINAL))
def test_terminal_states_accept_nothing(state: CommandState) -> None:
    for scope, event in itertools.product(Scope, CommandEvent):
        with pytest.raises(IllegalTransition, match="none: terminal"):
            transition(scope, state, event)
        assert allowed_events(scope, state) == frozenset()


def test_terminal_is_explicit_and_every_other_state_leads_to_one() -> None:
    for scope, table in TRANSITIONS.items():
        ends = {state for state, events in table.items() if not events}
        assert ends == TERMINAL & set(table), scope
        start = COMMAND_START if scope is Scope.COMMAND else EXECUTION_START
        reachable, frontier = {start}, [start]
        while frontier:
            for new in table[frontier.pop()].values():
                if new not in reachable:
                    reachable.add(new)
                    frontier.append(new)
        assert reachable == set(table), f"{scope}: unreachable {set(table) - reachable}"
        for state in set(table) - TERMINAL:
            seen, todo = set(), [state]
            while todo:
                for new in table[todo.pop()].values():
                    if new not in seen:
                        seen.add(new)
                        todo.append(new)
            assert seen & TERMINAL, f"{scope}: {state} never ends"


# -- the store goes through the table ---------------------------------------------------------------


def _raw(path: Path, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute(sql, params).fetchall()
        conn.commit()
        return rows
    finally:
        conn.close()


def test_store_applies_events_and_keeps_the_wire_strings(tmp_path: Path) -> None:
    path = tmp_path / "commands.sqlite"
    store = CommandStore.open(path, "gw-1")
    try:
        env = envelope("disconnect", ["m1", "m2", "m3"], now=1_800_000_000.0)
        plans = [MeterPlan("m1", E.ADMIT), MeterPlan("m2", E.HOLD), MeterPlan("m3", E.REJECT, reason="unknown_meter")]
        acks = store.accept(env, 1_800_000_000.0, plans)
        assert [(a.meter, a.state) for a in acks] == [
            (None, "received"),
            (None, "accepted"),
            ("m1", "queued"),
            ("m2", "held"),
            ("m3", "rejected"),
        ]
        steps = [E.SEND, E.NO_REPLY, E.SEND, E.ACKNOWLEDGE, E.CONFIRM]
        got = [store.apply([Transition(env.id, "m1", e)], 1_800_000_001.0)[0].state for e in steps]
        assert got == ["sent", "no_answer", "sent", "meter_acknowledged", "verified"]
        execution = store.execution(env.id, "m1")
        assert execution is not None
        assert execution.state is CommandState.VERIFIED
    finally:
        store.close()
    stored = dict(_raw(path, "SELECT meter, state || '|' || typeof(state) FROM executions"))
    assert stored == {"m1": "verified|text", "m2": "held|text", "m3": "rejected|text"}
    history = [r[0] for r in _raw(path, "SELECT state FROM history WHERE meter = 'm1' ORDER BY seq")]
    assert history == ["queued", "sent", "no_answer", "sent", "meter_acknowledged", "verified"]


def test_store_rejects_an_illegal_step_and_writes_nothing_of_the_batch(tmp_path: Path) -> None:
    store = CommandStore.open(tmp_path / "commands.sqlite", "gw-1")
    try:
        env = envelope("disconnect", ["m1", "m2"], now=1_800_000_000.0)
        store.accept(env, 1_800_000_000.0, [MeterPlan("m1", E.ADMIT), MeterPlan("m2", E.ADMIT)])
        store.apply([Transition(env.id, "m1", E.SEND), Transition(env.id, "m1", E.REFUSE)], 1_800_000_001.0)
        pending, history = store.pending_count(), len(store.history(env.id))
        # m2 may move, m1 is terminal: neither is written
        batch = [Transition(env.id, "m2", E.SEND), Transition(env.id, "m1", E.CONFIRM)]
        with pytest.raises(IllegalTransition, match="'meter_refused' cannot take event 'confirm'"):
            store.apply(batch, 1_800_000_002.0)
        # a step the state does not allow, terminal or not
        with pytest.raises(IllegalTransition, match="'queued' cannot take event 'acknowledge'"):
            store.apply([Transition(env.id, "m2", E.ACKNOWLEDGE)], 1_800_000_002.0)
        assert (store.pending_count(), len(store.history(env.id))) == (pending, history)
        states = {e.meter: e.state for e in store.executions(command=env.id)}
        assert states == {"m1": CommandState.METER_REFUSED, "m2": CommandState.QUEUED}
        # a plan whose event does not start an execution is refused before anything is stored
        other = envelope("disconnect", ["m3"], now=1_800_000_003.0)
        with pytest.raises(IllegalTransition, match="'accepted' cannot take event 'send'"):
            store.accept(other, 1_800_000_003.0, [MeterPlan("m3", E.SEND)])
        assert not store.known(other.id)
    finally:
        store.close()


def test_store_command_scope_release_result_is_final(tmp_path: Path) -> None:
    store = CommandStore.open(tmp_path / "commands.sqlite", "gw-1")
    try:
        cut = envelope("disconnect", ["m1"], now=1_800_000_000.0)
        store.accept(cut, 1_800_000_000.0, [MeterPlan("m1", E.HOLD)])
        release = envelope("release", [], now=1_800_000_001.0, params=Params(commands=[cut.id]))
        then = [
            Transition(cut.id, "m1", E.RELEASE, guarded=True),
            Transition(release.id, None, E.CONFIRM, detail="released 1"),
        ]
        acks = store.accept(release, 1_800_000_001.0, [], then)
        assert [(a.command, a.meter, a.state) for a in acks] == [
            (release.id, None, "received"),
            (release.id, None, "accepted"),
            (cut.id, "m1", "queued"),
            (release.id, None, "verified"),
        ]
        assert store.guard_count(0.0) == 1
        with pytest.raises(IllegalTransition, match="command in state 'verified'"):
            store.apply([Transition(release.id, None, E.GIVE_UP)], 1_800_000_002.0)
        # an execution event cannot be applied to the command as a whole
        with pytest.raises(IllegalTransition, match="command in state 'accepted' cannot take event 'send'"):
            store.apply([Transition(cut.id, None, E.SEND)], 1_800_000_002.0)
    finally:
        store.close()


def test_unknown_stored_state_at_open_quarantines_like_damage(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "commands.sqlite"
    store = CommandStore.open(path, "gw-1")
    env = envelope("disconnect", ["m1"], now=1_800_000_000.0)
    store.accept(env, 1_800_000_000.0, [MeterPlan("m1", E.ADMIT)])
    store.close()
    _raw(path, "UPDATE executions SET state = 'exploded'")
    with caplog.at_level(logging.ERROR, logger="meter_gateway.gateway.store.commands"):
        store = CommandStore.open(path, "gw-1", clock=lambda: 1_800_000_100.0)
    try:
        assert store.quarantined is not None
        assert store.quarantined.exists()
        lines = [r.getMessage() for r in caplog.records if "command_store_quarantined" in r.getMessage()]
        assert len(lines) == 1, lines
        assert "unknown state 'exploded'" in lines[0]
        assert store.executions() == []
        assert store.predates_reset(env) is not None  # the salvaged id still refuses the old command
    finally:
        store.close()


def test_unknown_stored_state_while_open_is_a_clear_store_error(tmp_path: Path) -> None:
    path = tmp_path / "commands.sqlite"
    store = CommandStore.open(path, "gw-1")
    try:
        env = envelope("disconnect", ["m1"], now=1_800_000_000.0)
        store.accept(env, 1_800_000_000.0, [MeterPlan("m1", E.ADMIT)])
        _raw(path, "UPDATE executions SET state = 'exploded'")
        with pytest.raises(StoreError) as caught:
            store.execution(env.id, "m1")
        message = str(caught.value)
        assert f"execution {env.id}/m1 has unknown state 'exploded'" in message
        assert "\n" not in message
        with pytest.raises(StoreError, match="unknown state 'exploded'"):
            store.apply([Transition(env.id, "m1", E.SEND)], 1_800_000_001.0)
    finally:
        store.close()

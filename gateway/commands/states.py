"""The command lifecycle as data: the states an ack can carry, the events that move them, and the
one table of allowed transitions that every state change goes through.

Modelled on h11's ``_state.py``: everything that decides whether a step is allowed lives in this
file, as a table rather than as conditions spread through the code that runs the steps. The
executor, the guard and the service say what happened (an *event*); the command store looks up
the stored state, asks :func:`transition` for the next one and persists that. Anything the table
does not list raises :class:`IllegalTransition` and nothing is written.

Two scopes, because an ack has two kinds of subject (docs/mqtt.md "Commands and acknowledgements"):

* :attr:`Scope.COMMAND`: the command as a whole (the ack's ``meter`` is null). Every message
  starts ``received``; without a readable id it gets only its ``rejected`` ack (seq 1), since
  there is nothing to correlate a ``received`` with.
* :attr:`Scope.EXECUTION`: one meter of one accepted command. Every execution starts where its
  command is after acceptance, ``accepted``; its first own state (``queued``, ``held``,
  ``rejected``, or a release command's per-meter result) is a transition from there.

States (the values are the ack's ``state`` strings on the wire and the strings the store keeps;
docs/commands.md "States" is the operators' version):

``received``
    command: the gateway has the message.
``accepted``
    command: authenticated, not a replay, stored durably; its executions will run.
``rejected``
    terminal. Nothing was done: authentication, replay or ``store_reset`` (command); the meter is
    unknown or cannot do the action (execution).
``held``
    execution: a disconnect stopped by the mass-disconnect guard; waits for a release or expiry.
``queued``
    execution: waiting for its meter (one execution at a time per meter) or its bus.
``sent``
    execution: a frame is going to the meter, one per attempt. Persisted before it is written.
``meter_acknowledged``
    execution: the meter answered the control frame positively; the relay is read back next.
``no_answer``
    execution: an attempt got no (valid) answer; the gateway retries, then still verifies.
``meter_refused``
    terminal. The meter said no, or keep-power was found on before a trip (nothing sent).
``verified``
    terminal. Confirmed: the relay read back in the wanted state, keep-power read back, the
    meter's answer to a read/alarm/time sync; for a release, what it released.
``unverified``
    terminal. Could not be confirmed (relay wrong after the verify window, never answered, clock
    still off, an internal error); for a release command, nothing it named was held.
``expired``
    terminal. ``expires_at`` passed before the meter was started, while held, or while the
    gateway was down (then nothing is sent again).

Events:

``accept``      command: authenticated, not a replay, stored (received -> accepted).
``reject``      refused: a command at reception; an execution at acceptance (unknown meter,
                unsupported; a release's listed meter that was not held), at its start (the meter
                left the config, or cannot do it), or on an attempt (the meter's model cannot).
``admit``       acceptance lets the execution run (accepted -> queued).
``hold``        the mass-disconnect guard holds it (accepted -> held).
``release``     a release command frees a held execution (held -> queued).
``send``        an attempt starts: first attempt, retry after no answer, the extra round after a
                read-back showed no sign of the command, or the next attempt after a restart.
``acknowledge`` the meter answered the control frame positively (sent -> meter_acknowledged).
``no_reply``    the attempt got no valid answer (sent -> no_answer).
``refuse``      the meter refused, or keep-power was found on before a trip (nothing sent).
``confirm``     the result is confirmed (-> verified): read back in the wanted state (also
                found so before sending after a store reset, or after a restart), the meter's
                answer to a read-type action, a release's result.
``give_up``     the result could not be confirmed (-> unverified).
``expire``      expires_at passed before the meter was started, while held, or (after a restart,
                from a state that may have sent a frame) while the gateway was down.
``fail``        an internal error ended the execution (-> unverified): never silently lost.

Terminal states (:data:`TERMINAL`) accept no event in either scope.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Final

__all__ = [
    "ACTIVE",
    "COMMAND_START",
    "EXECUTION_START",
    "RESULTS",
    "TERMINAL",
    "TRANSITIONS",
    "CommandEvent",
    "CommandState",
    "IllegalTransition",
    "Scope",
    "allowed_events",
    "transition",
]


class CommandState(enum.StrEnum):
    """A state of a command or of one execution. A ``str`` subclass whose value is the wire and
    store string, so acks, the audit log and the store stay byte-identical to plain strings."""

    RECEIVED = "received"
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    HELD = "held"
    QUEUED = "queued"
    SENT = "sent"
    METER_ACKNOWLEDGED = "meter_acknowledged"
    NO_ANSWER = "no_answer"
    METER_REFUSED = "meter_refused"
    VERIFIED = "verified"
    UNVERIFIED = "unverified"
    EXPIRED = "expired"


class CommandEvent(enum.Enum):
    """What happened to a command or an execution; never on the wire or in the store."""

    ACCEPT = "accept"
    REJECT = "reject"
    ADMIT = "admit"
    HOLD = "hold"
    RELEASE = "release"
    SEND = "send"
    ACKNOWLEDGE = "acknowledge"
    NO_REPLY = "no_reply"
    REFUSE = "refuse"
    CONFIRM = "confirm"
    GIVE_UP = "give_up"
    EXPIRE = "expire"
    FAIL = "fail"


class Scope(enum.Enum):
    COMMAND = "command"  # the whole command: ack meter null
    EXECUTION = "execution"  # one meter of one command


class IllegalTransition(Exception):
    """An event the table does not allow in the current state: a bug in the caller, or a stored
    state that changed under it. Nothing is written when this is raised."""

    def __init__(self, scope: Scope, state: CommandState, event: CommandEvent) -> None:
        allowed = ", ".join(sorted(e.value for e in allowed_events(scope, state))) or "none: terminal"
        super().__init__(
            f"{scope.value} in state {state.value!r} cannot take event {event.value!r} (allowed: {allowed})"
        )
        self.scope = scope
        self.state = state
        self.event = event


S = CommandState
E = CommandEvent

TERMINAL: Final = frozenset({S.REJECTED, S.METER_REFUSED, S.VERIFIED, S.UNVERIFIED, S.EXPIRED})
# Not terminal and not waiting for a release: what the executor owns (and resumes after a restart).
ACTIVE: Final = frozenset({S.QUEUED, S.SENT, S.METER_ACKNOWLEDGED, S.NO_ANSWER})
# Terminal states that end an accepted execution (``rejected`` is counted by reason instead).
RESULTS: Final = TERMINAL - {S.REJECTED}

COMMAND_START: Final = S.RECEIVED
EXECUTION_START: Final = S.ACCEPTED

# Terminal states are listed, with no events, so the table itself shows where a lifecycle ends.
_NOTHING: Final[Mapping[CommandEvent, CommandState]] = {}

_COMMAND: Final[Mapping[CommandState, Mapping[CommandEvent, CommandState]]] = {
    S.RECEIVED: {E.ACCEPT: S.ACCEPTED, E.REJECT: S.REJECTED},
    # only a release command has a result of its own (when it lists no meters)
    S.ACCEPTED: {E.CONFIRM: S.VERIFIED, E.GIVE_UP: S.UNVERIFIED},
    S.REJECTED: _NOTHING,
    S.VERIFIED: _NOTHING,
    S.UNVERIFIED: _NOTHING,
}

_EXECUTION: Final[Mapping[CommandState, Mapping[CommandEvent, CommandState]]] = {
    S.ACCEPTED: {
        E.ADMIT: S.QUEUED,
        E.HOLD: S.HELD,
        E.REJECT: S.REJECTED,
        E.CONFIRM: S.VERIFIED,  # a release command's result for a meter it listed
    },
    S.HELD: {E.RELEASE: S.QUEUED, E.EXPIRE: S.EXPIRED},
    S.QUEUED: {
        E.SEND: S.SENT,
        E.REFUSE: S.METER_REFUSED,  # keep-power on: no trip sent
        E.REJECT: S.REJECTED,
        E.CONFIRM: S.VERIFIED,  # after a store reset: already in the wanted state, nothing sent
        E.EXPIRE: S.EXPIRED,
        E.FAIL: S.UNVERIFIED,
    },
    S.SENT: {
        E.ACKNOWLEDGE: S.METER_ACKNOWLEDGED,
        E.NO_REPLY: S.NO_ANSWER,
        E.REFUSE: S.METER_REFUSED,
        E.REJECT: S.REJECTED,
        E.CONFIRM: S.VERIFIED,  # a read-type action's answer; a relay found so after a restart
        E.GIVE_UP: S.UNVERIFIED,
        E.SEND: S.SENT,  # after a restart: the stored attempt's fate is unknown, the next one goes
        E.EXPIRE: S.EXPIRED,  # after a restart
        E.FAIL: S.UNVERIFIED,
    },
    S.METER_ACKNOWLEDGED: {
        E.CONFIRM: S.VERIFIED,
        E.GIVE_UP: S.UNVERIFIED,
        E.SEND: S.SENT,  # after a restart, relay not yet where it should be
        E.EXPIRE: S.EXPIRED,  # after a restart
        E.FAIL: S.UNVERIFIED,
    },
    S.NO_ANSWER: {
        E.SEND: S.SENT,
        E.CONFIRM: S.VERIFIED,  # the frame arrived, only its reply was lost
        E.GIVE_UP: S.UNVERIFIED,
        E.EXPIRE: S.EXPIRED,
        E.FAIL: S.UNVERIFIED,
    },
    S.REJECTED: _NOTHING,
    S.METER_REFUSED: _NOTHING,
    S.VERIFIED: _NOTHING,
    S.UNVERIFIED: _NOTHING,
    S.EXPIRED: _NOTHING,
}

TRANSITIONS: Final[Mapping[Scope, Mapping[CommandState, Mapping[CommandEvent, CommandState]]]] = {
    Scope.COMMAND: _COMMAND,
    Scope.EXECUTION: _EXECUTION,
}


def transition(scope: Scope, current: CommandState, event: CommandEvent) -> CommandState:
    """The state after ``event`` in ``current``; :class:`IllegalTransition` for anything the
    table does not list (every event in a terminal state, every state outside ``scope``)."""
    try:
        return TRANSITIONS[scope][current][event]
    except KeyError:
        raise IllegalTransition(scope, current, event) from None


def allowed_events(scope: Scope, state: CommandState) -> frozenset[CommandEvent]:
    return frozenset(TRANSITIONS[scope].get(state, _NOTHING))

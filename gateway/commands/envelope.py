"""Command envelopes and acknowledgements: the wire structs, their checks and the canonical form.

Pure data (no keys, no network, no clock): ``auth.py`` verifies signatures over
:func:`canonical_bytes`, the executor publishes :class:`Ack`s. docs/mqtt.md "Commands and
acknowledgements" is the prose contract; change both together.
"""

from __future__ import annotations

import re
from typing import Annotated, Final, Literal, get_args

import msgspec
from msgspec import Meta

from meter_gateway.gateway.commands.states import TERMINAL, CommandState
from meter_gateway.gateway.uplink.contract import CONTRACT_VERSION, ContractError

__all__ = [
    "ACK_STATES",
    "ACTIONS",
    "TERMINAL_STATES",
    "Ack",
    "AckState",
    "Action",
    "CommandEnvelope",
    "Params",
    "RelayState",
    "canonical_bytes",
    "decode_ack",
    "decode_envelope",
    "encode_ack",
    "encode_envelope",
]

Action = Literal[
    "disconnect",
    "reconnect",
    "keep_power_on",
    "keep_power_off",
    "alarm_on",
    "alarm_off",
    "read_now",
    "time_sync",
    "relay_status",
    "release",
    "valve_close",
    "valve_open",
]
ACTIONS: Final[tuple[str, ...]] = get_args(Action)

# The ack states are the command lifecycle's states (states.py); these names stay for the wire
# contract's readers.
AckState = CommandState
ACK_STATES: Final[tuple[str, ...]] = tuple(s.value for s in CommandState)
# After one of these, no further ack is published for that meter (or, with meter null, the command).
TERMINAL_STATES: Final = TERMINAL

RelayState = Literal["closed", "open", "armed"]
ReconnectMode = Literal["close_permit", "direct_close"]

# Actions a DL/T 698.45 pass-through APDU (params.apdu) may carry.
_APDU_ACTIONS: Final = frozenset({"disconnect", "reconnect", "keep_power_on", "keep_power_off"})
# Every string in an envelope is from these sets, so the canonical JSON never needs escaping.
_ID_PATTERN: Final = r"^[A-Za-z0-9._:-]{1,64}$"
_METER_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"  # config.Name
_QUANTITY_PATTERN: Final = r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)*$"
_ID: Final = re.compile(_ID_PATTERN)
_METER: Final = re.compile(_METER_PATTERN)

CommandId = Annotated[str, Meta(pattern=_ID_PATTERN)]
MeterId = Annotated[str, Meta(pattern=_METER_PATTERN)]
Quantity = Annotated[str, Meta(pattern=_QUANTITY_PATTERN, max_length=128)]
UnixTime = Annotated[float, Meta(ge=0, lt=1e11)]

MAX_APDU_BYTES: Final = 2048  # one link frame's worth: pass-through APDUs are never fragmented
_APDU_PATTERN: Final = r"^(?:[0-9A-Fa-f]{2})+$"
MAX_METERS: Final = 1000
MAX_RELEASE: Final = 100
MAX_QUANTITIES: Final = 64
# 1000 meter ids of 64 characters plus everything else fits with room to spare; bigger is not ours
MAX_ENVELOPE_BYTES: Final = 128 * 1024


class Params(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, frozen=True, kw_only=True):
    quantities: Annotated[list[Quantity], Meta(min_length=1, max_length=MAX_QUANTITIES)] | None = None
    commands: Annotated[list[CommandId], Meta(min_length=1, max_length=MAX_RELEASE)] | None = None
    mode: ReconnectMode | None = None
    # DL/T 698.45 pass-through control: the head-end's secured APDU (SECURITY-Request ciphertext +
    # SID_MAC from its crypto service or an ESAM), hex; forwarded to the meter untouched
    apdu: Annotated[str, Meta(pattern=_APDU_PATTERN, max_length=2 * MAX_APDU_BYTES)] | None = None


class CommandEnvelope(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, frozen=True, kw_only=True):
    """One signed remote-control command. ``sig`` is empty before signing."""

    v: int
    id: CommandId
    gateway: MeterId  # the config's gateway id rule (same characters as meter ids)
    meters: Annotated[list[MeterId], Meta(max_length=MAX_METERS)]
    action: Action
    issued_at: UnixTime
    not_before: UnixTime
    expires_at: UnixTime
    seq: Annotated[int, Meta(ge=0, le=2**63 - 1)]
    key_id: CommandId
    alg: Literal["ed25519", "hmac-sha256"]
    params: Params | None = None
    sig: str = ""

    def check(self) -> None:
        """Rules msgspec's types cannot say; raises :class:`ContractError` (a ``malformed`` command)."""
        if self.v != CONTRACT_VERSION:
            raise ContractError(f"envelope version {self.v}, expected {CONTRACT_VERSION}")
        if len(set(self.meters)) != len(self.meters):
            raise ContractError("meters lists a meter more than once")
        if not self.meters and self.action != "release":
            raise ContractError(f"{self.action} needs at least one meter")
        p = self.params or Params()
        if p.quantities is not None and self.action != "read_now":
            raise ContractError("params.quantities is only for read_now")
        if p.mode is not None and self.action != "reconnect":
            raise ContractError("params.mode is only for reconnect")
        if p.apdu is not None and self.action not in _APDU_ACTIONS:
            raise ContractError(f"params.apdu is only for {', '.join(sorted(_APDU_ACTIONS))}")
        if self.action == "release":
            if not p.commands:
                raise ContractError("release needs params.commands (the held command ids)")
            if len(set(p.commands)) != len(p.commands):
                raise ContractError("params.commands lists a command more than once")
        elif p.commands is not None:
            raise ContractError("params.commands is only for release")
        if self.expires_at <= self.not_before:
            raise ContractError("expires_at must be after not_before")
        if self.expires_at < self.issued_at:
            raise ContractError("expires_at must not be before issued_at")

    @property
    def reconnect_mode(self) -> ReconnectMode | None:
        """The mode asked for in params (None: use the meter's configured ``reconnect``)."""
        return self.params.mode if self.params is not None else None

    @property
    def secured_apdu(self) -> bytes | None:
        """The pass-through APDU (params.apdu) as bytes, or None."""
        return bytes.fromhex(self.params.apdu) if self.params is not None and self.params.apdu else None

    @property
    def released_commands(self) -> list[str]:
        return list(self.params.commands or ()) if self.params is not None else []


class Ack(msgspec.Struct, omit_defaults=True, frozen=True, kw_only=True):
    """One state transition of a command (``meter`` None: the whole command)."""

    v: int = CONTRACT_VERSION
    gateway: str
    command: str | None
    meter: str | None
    state: CommandState
    at: float
    seq: Annotated[int, Meta(ge=1)]
    relay: RelayState | None = None
    reason: str | None = None
    detail: str | None = None

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES


_encoder: Final = msgspec.json.Encoder(order="sorted")
_plain_encoder: Final = msgspec.json.Encoder()
_envelope_decoder: Final = msgspec.json.Decoder(CommandEnvelope)
_ack_decoder: Final = msgspec.json.Decoder(Ack)


def canonical_bytes(env: CommandEnvelope) -> bytes:
    """The bytes that are signed: the envelope without ``sig``, keys sorted, no whitespace, null
    and absent optional fields left out, floats in shortest round-trip form (docs/mqtt.md)."""
    return _encoder.encode(msgspec.structs.replace(env, sig=""))


def encode_envelope(env: CommandEnvelope) -> bytes:
    return _plain_encoder.encode(env)


def decode_envelope(payload: bytes) -> CommandEnvelope:
    """Decode and check an envelope (signature not verified); :class:`ContractError` if malformed."""
    if len(payload) > MAX_ENVELOPE_BYTES:
        raise ContractError(f"command envelope of {len(payload)} bytes, more than {MAX_ENVELOPE_BYTES}")
    try:
        env = _envelope_decoder.decode(payload)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:  # bad UTF-8, JSON nested too deep
        raise ContractError(f"bad command envelope: {exc}") from None
    env.check()
    return env


def peek_command_id(payload: bytes) -> str | None:
    """The ``id`` of a message that may not decode as an envelope, if it has a well-formed one."""
    if len(payload) > MAX_ENVELOPE_BYTES:
        return None
    try:
        raw = msgspec.json.decode(payload)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None
    value = raw.get("id") if isinstance(raw, dict) else None
    return value if isinstance(value, str) and _ID.fullmatch(value) else None


def encode_ack(ack: Ack) -> bytes:
    if ack.meter is not None and not _METER.fullmatch(ack.meter):
        raise ContractError(f"ack meter id {ack.meter[:64]!r} is not a meter id")
    # omit_defaults would drop "v" too: the version is always written
    return _plain_encoder.encode({"v": ack.v, **msgspec.to_builtins(ack)})


def decode_ack(payload: bytes) -> Ack:
    """Decode an ack; unknown fields are ignored (new optional fields do not bump the version)."""
    try:
        ack = _ack_decoder.decode(payload)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:  # bad UTF-8, JSON nested too deep
        raise ContractError(f"bad ack: {exc}") from None
    if ack.v != CONTRACT_VERSION:
        raise ContractError(f"ack version {ack.v}, expected {CONTRACT_VERSION}")
    return ack

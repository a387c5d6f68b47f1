"""Who may command this gateway: the key ring, signature checks and :func:`authenticate`.

Ed25519 (public keys only on the gateway: preferred) and HMAC-SHA256 (shared secret). The only
module that imports ``cryptography`` for commands. Replay protection (seen ids, per-key ``seq``)
needs state and lives in the executor's store; everything here is a pure function of its inputs.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Literal

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from meter_gateway.gateway.commands.envelope import CommandEnvelope, canonical_bytes, decode_envelope, peek_command_id
from meter_gateway.gateway.uplink.contract import ContractError

if TYPE_CHECKING:
    from meter_gateway.gateway.config import CommandKeyConfig

__all__ = [
    "REJECT_REASONS",
    "Alg",
    "CommandRejected",
    "KeyRing",
    "Role",
    "SigningKey",
    "VerifyKey",
    "authenticate",
    "load_ed25519_public_key",
    "load_signing_key",
    "sign_envelope",
]

Alg = Literal["ed25519", "hmac-sha256"]
Role = Literal["command", "release"]

REJECT_REASONS: Final = (
    "retained",
    "malformed",
    "unsigned",
    "unknown_key",
    "bad_signature",
    "key_not_allowed",
    "wrong_gateway",
    "validity_too_long",
    "not_yet_valid",
    "expired",
)
MIN_HMAC_SECRET: Final = 32  # bytes: a shorter shared secret is guessable offline from one signed command
ED25519_SIGNATURE: Final = 64
HMAC_SIGNATURE: Final = 32


class CommandRejected(Exception):
    """A command that must not run. ``reason`` is one of :data:`REJECT_REASONS` (machine-readable,
    goes into the ack); ``detail`` is for people and never holds key material."""

    def __init__(self, reason: str, command_id: str | None, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.command_id = command_id
        self.detail = detail


# -- keys ----------------------------------------------------------------------------------------


def load_ed25519_public_key(data: bytes) -> bytes:
    """The raw 32-byte Ed25519 public key from a PEM (SubjectPublicKeyInfo) file or a file holding
    the raw key in base64. Raises ValueError saying what is wrong."""
    text = data.strip()
    if text.startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(text)
        except ValueError as exc:
            raise ValueError(f"not a readable PEM public key ({exc})") from None
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError(f"PEM holds a {type(key).__name__.removeprefix('_')}, not an Ed25519 public key")
        return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("neither a PEM public key nor a base64 raw Ed25519 key") from None
    if len(raw) != 32:
        raise ValueError(f"a raw Ed25519 public key is 32 bytes, this one decodes to {len(raw)}")
    return raw


@dataclass(frozen=True, slots=True)
class VerifyKey:
    """One key the gateway accepts commands from. ``secret`` (HMAC) never appears in reprs."""

    key_id: str
    alg: Alg
    roles: frozenset[str]
    public_key: bytes | None = None  # Ed25519, raw 32 bytes
    secret: bytes | None = field(default=None, repr=False)  # HMAC-SHA256 key

    def __post_init__(self) -> None:
        if self.alg == "ed25519":
            if self.public_key is None or len(self.public_key) != 32:
                raise ValueError(f"key {self.key_id}: an Ed25519 key needs the 32-byte public key")
        elif self.secret is None or len(self.secret) < MIN_HMAC_SECRET:
            raise ValueError(f"key {self.key_id}: an HMAC secret must be at least {MIN_HMAC_SECRET} bytes")

    def verify(self, data: bytes, signature: bytes) -> bool:
        if self.alg == "ed25519":
            assert self.public_key is not None
            if len(signature) != ED25519_SIGNATURE:
                return False
            try:
                Ed25519PublicKey.from_public_bytes(self.public_key).verify(signature, data)
            except InvalidSignature:
                return False
            return True
        assert self.secret is not None
        expected = hmac.new(self.secret, data, hashlib.sha256).digest()
        return hmac.compare_digest(expected, signature)


class KeyRing:
    """The configured keys by id."""

    def __init__(self, keys: Iterable[VerifyKey] = ()) -> None:
        self._keys: dict[str, VerifyKey] = {}
        for key in keys:
            if key.key_id in self._keys:
                raise ValueError(f"duplicate key id {key.key_id!r}")
            self._keys[key.key_id] = key

    @classmethod
    def from_config(cls, keys: Iterable[CommandKeyConfig]) -> KeyRing:
        """From ``config.commands.keys`` (already resolved by the config loader: files read)."""
        out = []
        for k in keys:
            secret = k.secret.reveal().encode() if k.secret is not None else None
            out.append(VerifyKey(k.id, k.alg, frozenset(k.roles), public_key=k.public_key, secret=secret))
        return cls(out)

    def get(self, key_id: str) -> VerifyKey | None:
        return self._keys.get(key_id)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._keys

    @property
    def ids(self) -> Mapping[str, VerifyKey]:
        return dict(self._keys)


@dataclass(frozen=True, slots=True)
class SigningKey:
    """The head-end side of a key (ctl, tests): an Ed25519 private key or an HMAC secret."""

    key_id: str
    alg: Alg
    private_key: Ed25519PrivateKey | None = field(default=None, repr=False)
    secret: bytes | None = field(default=None, repr=False)

    @classmethod
    def ed25519(cls, key_id: str, private_key: Ed25519PrivateKey) -> SigningKey:
        return cls(key_id, "ed25519", private_key=private_key)

    @classmethod
    def hmac_sha256(cls, key_id: str, secret: bytes) -> SigningKey:
        if len(secret) < MIN_HMAC_SECRET:
            raise ValueError(f"an HMAC secret must be at least {MIN_HMAC_SECRET} bytes")
        return cls(key_id, "hmac-sha256", secret=secret)

    def sign(self, data: bytes) -> bytes:
        if self.private_key is not None:
            return self.private_key.sign(data)
        assert self.secret is not None
        return hmac.new(self.secret, data, hashlib.sha256).digest()

    def verify_key(self, roles: Iterable[str] = ("command",)) -> VerifyKey:
        """The matching gateway-side key (for tests and ``ctl keygen``)."""
        if self.private_key is not None:
            raw = self.private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            return VerifyKey(self.key_id, "ed25519", frozenset(roles), public_key=raw)
        return VerifyKey(self.key_id, "hmac-sha256", frozenset(roles), secret=self.secret)


def load_signing_key(data: bytes, key_id: str, alg: Alg = "ed25519") -> SigningKey:
    """A signing key from a file's content: a PEM Ed25519 private key (``ctl keygen`` output), or
    for ``hmac-sha256`` the shared secret text (trailing newline ignored)."""
    if alg == "hmac-sha256":
        return SigningKey.hmac_sha256(key_id, data.rstrip(b"\r\n"))
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("the PEM private key is not an Ed25519 key")  # noqa: TRY004 - a bad key file, like the others
    return SigningKey.ed25519(key_id, key)


def sign_envelope(env: CommandEnvelope, key: SigningKey) -> CommandEnvelope:
    """``env`` signed with ``key``; its ``key_id`` and ``alg`` are set from the key first, so they
    are covered by the signature."""
    unsigned = msgspec.structs.replace(env, key_id=key.key_id, alg=key.alg, sig="")
    signature = key.sign(canonical_bytes(unsigned))
    return msgspec.structs.replace(unsigned, sig=base64.b64encode(signature).decode("ascii"))


# -- authentication -----------------------------------------------------------------------------


def authenticate(
    payload: bytes,
    *,
    retained: bool,
    gateway_id: str,
    keyring: KeyRing,
    now: float,
    max_validity: float,
) -> CommandEnvelope:
    """The envelope if ``payload`` is a well-formed command for this gateway, signed by a
    configured key allowed to give it, valid at ``now``; else :class:`CommandRejected`.

    The checks run in the order of the table in docs/mqtt.md; the signature is checked before
    anything about the gateway or the clock, so only a genuine head-end learns about those.
    """
    if retained:
        raise CommandRejected("retained", peek_command_id(payload), "retained messages are stale; never executed")
    try:
        env = decode_envelope(payload)
    except ContractError as exc:
        raise CommandRejected("malformed", peek_command_id(payload), str(exc)[:300]) from None
    cid = env.id
    if not env.sig:
        raise CommandRejected("unsigned", cid, "the envelope has no sig")
    try:
        signature = base64.b64decode(env.sig, validate=True)
    except (binascii.Error, ValueError):
        raise CommandRejected("malformed", cid, "sig is not standard base64") from None
    key = keyring.get(env.key_id)
    if key is None:
        raise CommandRejected("unknown_key", cid, f"no configured key has id {env.key_id!r}")
    if key.alg != env.alg:
        raise CommandRejected("bad_signature", cid, f"key {env.key_id!r} is {key.alg}, the envelope says {env.alg}")
    if not key.verify(canonical_bytes(env), signature):
        raise CommandRejected("bad_signature", cid, f"signature does not verify with key {env.key_id!r}")
    role = "release" if env.action == "release" else "command"
    if role not in key.roles:
        raise CommandRejected("key_not_allowed", cid, f"key {env.key_id!r} lacks the {role!r} role for {env.action}")
    if env.gateway != gateway_id:
        raise CommandRejected("wrong_gateway", cid, f"addressed to gateway {env.gateway!r}, this is {gateway_id!r}")
    validity = env.expires_at - env.issued_at
    if validity > max_validity:
        raise CommandRejected(
            "validity_too_long", cid, f"valid for {validity:g} s, this gateway accepts at most {max_validity:g} s"
        )
    if now < env.not_before:
        raise CommandRejected("not_yet_valid", cid, f"not before {env.not_before:.3f}, gateway time is {now:.3f}")
    if now >= env.expires_at:
        raise CommandRejected("expired", cid, f"expired at {env.expires_at:.3f}, gateway time is {now:.3f}")
    return env

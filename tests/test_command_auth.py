"""Command envelopes: canonical form, Ed25519/HMAC signatures, every rejection reason, acks."""

from __future__ import annotations

import base64
import json
from typing import Any

import msgspec
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from meter_gateway.gateway.commands.auth import (
    REJECT_REASONS,
    CommandRejected,
    KeyRing,
    SigningKey,
    VerifyKey,
    authenticate,
    load_ed25519_public_key,
    load_signing_key,
    sign_envelope,
)
from meter_gateway.gateway.commands.envelope import (
    ACK_STATES,
    TERMINAL_STATES,
    Ack,
    CommandEnvelope,
    Params,
    canonical_bytes,
    decode_ack,
    decode_envelope,
    encode_ack,
    encode_envelope,
)
from meter_gateway.gateway.uplink.contract import ContractError

# The worked example of docs/mqtt.md "Canonical form": RFC 8032 test 1 key.
VECTOR_SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
VECTOR_PUBLIC = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
VECTOR_SENT = (
    b'{"v":1,"id":"cmd-20231114-0001","gateway":"gw-0042","meters":["000012345678","000012345679"],\n'
    b' "action":"reconnect","params":{"mode":"close_permit"},"issued_at":1700000000,"not_before":1700000000.0,\n'
    b' "expires_at":1700000300.5,"seq":1700000000000,"key_id":"ops-2023","alg":"ed25519",\n'
    b' "sig":"yUQ/LXv4wpb6/j6s+6QhlYMZwkQWOkjkj7f2Fg6bfzm2KooXUtxjl4uAGYaad+2qn8Enl0fne1VeCJRTFVZ/Bg=="}'
)
VECTOR_CANONICAL = (
    b'{"action":"reconnect","alg":"ed25519","expires_at":1700000300.5,"gateway":"gw-0042",'
    b'"id":"cmd-20231114-0001","issued_at":1700000000.0,"key_id":"ops-2023",'
    b'"meters":["000012345678","000012345679"],"not_before":1700000000.0,"params":{"mode":"close_permit"},'
    b'"seq":1700000000000,"v":1}'
)
VECTOR_SIG = "yUQ/LXv4wpb6/j6s+6QhlYMZwkQWOkjkj7f2Fg6bfzm2KooXUtxjl4uAGYaad+2qn8Enl0fne1VeCJRTFVZ/Bg=="

GW = "gw-0042"
NOW = 1_700_000_100.0
DAY = 86400.0
HMAC_SECRET = b"0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def ops() -> SigningKey:
    return SigningKey.ed25519("ops", Ed25519PrivateKey.generate())


@pytest.fixture(scope="module")
def supervisor() -> SigningKey:
    return SigningKey.ed25519("sup", Ed25519PrivateKey.generate())


@pytest.fixture(scope="module")
def shared() -> SigningKey:
    return SigningKey.hmac_sha256("legacy", HMAC_SECRET)


@pytest.fixture(scope="module")
def ring(ops: SigningKey, supervisor: SigningKey, shared: SigningKey) -> KeyRing:
    return KeyRing([ops.verify_key(["command"]), supervisor.verify_key(["release"]), shared.verify_key(["command"])])


def envelope(**over: Any) -> CommandEnvelope:
    fields: dict[str, Any] = {
        "v": 1,
        "id": "cmd-1",
        "gateway": GW,
        "meters": ["000012345678", "m2"],
        "action": "disconnect",
        "issued_at": NOW - 60,
        "not_before": NOW - 60,
        "expires_at": NOW + 240,
        "seq": 1,
        "key_id": "ops",
        "alg": "ed25519",
    }
    fields.update(over)
    return CommandEnvelope(**fields)


def auth(payload: bytes, ring: KeyRing, *, retained: bool = False, now: float = NOW) -> CommandEnvelope:
    return authenticate(payload, retained=retained, gateway_id=GW, keyring=ring, now=now, max_validity=DAY)


def rejected(payload: bytes, ring: KeyRing, **kw: Any) -> CommandRejected:
    with pytest.raises(CommandRejected) as info:
        auth(payload, ring, **kw)
    assert info.value.reason in REJECT_REASONS
    return info.value


def signed(key: SigningKey, **over: Any) -> bytes:
    return encode_envelope(sign_envelope(envelope(**over), key))


def edit(payload: bytes, **changes: Any) -> bytes:
    """The payload with JSON fields changed (None deletes) after signing."""
    doc = json.loads(payload)
    for name, value in changes.items():
        if value is None:
            doc.pop(name, None)
        else:
            doc[name] = value
    return json.dumps(doc).encode()


# -- canonical form ---------------------------------------------------------------------------


def test_canonical_vector() -> None:
    """docs/mqtt.md's worked example: what a Java/Go head-end must reproduce byte for byte."""
    key = SigningKey.ed25519("ops-2023", Ed25519PrivateKey.from_private_bytes(VECTOR_SEED))
    assert key.verify_key().public_key == VECTOR_PUBLIC
    env = decode_envelope(VECTOR_SENT)
    assert canonical_bytes(env) == VECTOR_CANONICAL
    assert len(VECTOR_CANONICAL) == 280
    # Ed25519 is deterministic: signing again gives the documented signature
    assert sign_envelope(msgspec.structs.replace(env, sig=""), key).sig == VECTOR_SIG
    ring = KeyRing([VerifyKey("ops-2023", "ed25519", frozenset({"command"}), public_key=VECTOR_PUBLIC)])
    got = authenticate(VECTOR_SENT, retained=False, gateway_id=GW, keyring=ring, now=1_700_000_001.0, max_validity=DAY)
    assert got.reconnect_mode == "close_permit"
    assert got.meters == ["000012345678", "000012345679"]


def test_canonical_form_ignores_layout_and_key_order(ops: SigningKey, ring: KeyRing) -> None:
    payload = signed(ops)
    doc = json.loads(payload)
    relaid = json.dumps(dict(reversed(list(doc.items()))), indent=3).encode()
    assert relaid != payload
    assert auth(relaid, ring) == auth(payload, ring)
    assert b" " not in canonical_bytes(decode_envelope(relaid))
    assert b'"sig"' not in canonical_bytes(decode_envelope(relaid))


def test_canonical_leaves_out_absent_and_null_params() -> None:
    assert b"params" not in canonical_bytes(envelope())
    with_null = json.loads(encode_envelope(envelope()))
    with_null["params"] = None
    assert b"params" not in canonical_bytes(decode_envelope(json.dumps(with_null).encode()))
    partial = envelope(action="reconnect", params=Params(mode="direct_close"))
    assert b'"params":{"mode":"direct_close"}' in canonical_bytes(partial)


@settings(max_examples=60, deadline=None)
@given(
    meters=st.lists(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,20}", fullmatch=True), min_size=1, max_size=5),
    issued=st.floats(min_value=1e9, max_value=5e9, allow_nan=False),
    validity=st.floats(min_value=0.001, max_value=DAY),
    seq=st.integers(min_value=0, max_value=2**63 - 1),
)
def test_any_signed_envelope_round_trips(meters: list[str], issued: float, validity: float, seq: int) -> None:
    key = SigningKey.ed25519("k", Ed25519PrivateKey.from_private_bytes(VECTOR_SEED))
    ring = KeyRing([key.verify_key()])
    meters = list(dict.fromkeys(meters))
    expires = issued + validity
    if expires <= issued or expires - issued > DAY:  # float rounding at the edges
        return
    env = sign_envelope(
        envelope(meters=meters, issued_at=issued, not_before=issued, expires_at=expires, seq=seq, key_id="k"), key
    )
    got = authenticate(encode_envelope(env), retained=False, gateway_id=GW, keyring=ring, now=issued, max_validity=DAY)
    assert got == env
    # the documented float rule: shortest round-trip digits, as Python's repr writes them
    assert f'"issued_at":{issued!r}'.encode() in canonical_bytes(env)
    assert f'"expires_at":{expires!r}'.encode() in canonical_bytes(env)


# -- good commands --------------------------------------------------------------------------------


def test_ed25519_command_is_accepted(ops: SigningKey, ring: KeyRing) -> None:
    env = auth(signed(ops), ring)
    assert (env.id, env.action, env.key_id, env.alg) == ("cmd-1", "disconnect", "ops", "ed25519")
    assert len(base64.b64decode(env.sig)) == 64


def test_hmac_command_is_accepted(shared: SigningKey, ring: KeyRing) -> None:
    env = auth(signed(shared, action="reconnect", params=Params(mode="direct_close")), ring)
    assert (env.key_id, env.alg, env.reconnect_mode) == ("legacy", "hmac-sha256", "direct_close")
    assert len(base64.b64decode(env.sig)) == 32


def test_release_with_release_key(supervisor: SigningKey, ring: KeyRing) -> None:
    env = auth(signed(supervisor, action="release", meters=[], params=Params(commands=["cmd-0"])), ring)
    assert env.released_commands == ["cmd-0"]


def test_times_at_the_edges(ops: SigningKey, ring: KeyRing) -> None:
    payload = signed(ops, issued_at=NOW, not_before=NOW, expires_at=NOW + DAY)
    assert auth(payload, ring, now=NOW).id == "cmd-1"  # exactly not_before, exactly max validity
    assert rejected(payload, ring, now=NOW + DAY).reason == "expired"  # expires_at itself is too late


def test_key_files_load(ops: SigningKey) -> None:
    assert ops.private_key is not None
    public = ops.private_key.public_key()
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert load_ed25519_public_key(pem) == raw
    assert load_ed25519_public_key(base64.b64encode(raw) + b"\n") == raw
    for bad in (b"hello", base64.b64encode(raw[:31]), b"-----BEGIN PUBLIC KEY-----\nAA==\n-----END PUBLIC KEY-----"):
        with pytest.raises(ValueError):
            load_ed25519_public_key(bad)
    private_pem = ops.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    loaded = load_signing_key(private_pem, "ops")
    assert loaded.sign(b"abc") == ops.sign(b"abc")
    assert load_signing_key(HMAC_SECRET + b"\n", "x", "hmac-sha256").secret == HMAC_SECRET
    with pytest.raises(ValueError, match="at least 32"):
        load_signing_key(b"short", "x", "hmac-sha256")
    with pytest.raises(ValueError, match="PEM private key"):
        load_signing_key(b"not a key", "x")


# -- every rejection reason -------------------------------------------------------------------------


def test_retained_is_rejected_before_anything_else(ops: SigningKey, ring: KeyRing) -> None:
    r = rejected(signed(ops), ring, retained=True)
    assert (r.reason, r.command_id) == ("retained", "cmd-1")
    assert rejected(b"garbage", ring, retained=True).reason == "retained"


@pytest.mark.parametrize(
    ("payload", "command_id", "detail"),
    [
        (b"", None, "bad command envelope"),
        (b"not json", None, "bad command envelope"),
        (b"[1, 2]", None, "Expected `object`"),
        (b'{"id": "cmd-9"}', "cmd-9", "missing required field"),
    ],
)
def test_malformed_payloads(ring: KeyRing, payload: bytes, command_id: str | None, detail: str) -> None:
    r = rejected(payload, ring)
    assert (r.reason, r.command_id) == ("malformed", command_id)
    assert detail in r.detail


@pytest.mark.parametrize(
    ("changes", "detail"),
    [
        ({"v": 2}, "envelope version 2"),
        ({"extra": 1}, "unknown field"),
        ({"meters": ["a", "a"]}, "more than once"),
        ({"meters": []}, "needs at least one meter"),
        ({"meters": [f"m{i}" for i in range(1001)]}, "length <= 1000"),
        ({"meters": ["bad/meter"]}, "meters[0]"),
        ({"action": "explode"}, "action"),
        ({"key_id": "a b"}, "key_id"),
        ({"alg": "rsa"}, "alg"),
        ({"seq": -1}, "seq"),
        ({"seq": 1.5}, "seq"),
        ({"expires_at": NOW - 61}, "expires_at must be after not_before"),
        ({"not_before": NOW - 100, "expires_at": NOW - 80}, "expires_at must not be before issued_at"),
        ({"params": {"quantities": ["energy.active.import.total"]}}, "only for read_now"),
        ({"params": {"mode": "direct_close"}}, "only for reconnect"),
        ({"params": {"commands": ["x"]}}, "only for release"),
        ({"params": {"colour": "red"}}, "unknown field"),
        ({"sig": "!!!not-base64!!!"}, "sig is not standard base64"),
        ({"gateway": "gw\u00e9"}, "gateway"),
        ({"meters": ["m" * 65]}, "meters[0]"),
    ],
)
def test_malformed_envelopes(ops: SigningKey, ring: KeyRing, changes: dict[str, Any], detail: str) -> None:
    r = rejected(edit(signed(ops), **changes), ring)
    assert (r.reason, r.command_id) == ("malformed", "cmd-1")
    assert detail in r.detail


def test_oversized_payload_is_malformed(ring: KeyRing) -> None:
    r = rejected(b'{"id":"big","pad":"' + b"x" * 140_000 + b'"}', ring)
    assert (r.reason, r.command_id) == ("malformed", None)
    assert "more than 131072" in r.detail


def test_bad_command_id_is_malformed_without_an_id(ops: SigningKey, ring: KeyRing) -> None:
    r = rejected(edit(signed(ops), id="has space"), ring)
    assert (r.reason, r.command_id) == ("malformed", None)


def test_release_needs_commands(supervisor: SigningKey, ring: KeyRing) -> None:
    r = rejected(edit(signed(supervisor, action="release", params=Params(commands=["c"])), params=None), ring)
    assert r.reason == "malformed"
    assert "release needs params.commands" in r.detail


def test_unsigned(ops: SigningKey, ring: KeyRing) -> None:
    assert rejected(edit(signed(ops), sig=None), ring).reason == "unsigned"
    assert rejected(edit(signed(ops), sig=""), ring).reason == "unsigned"


def test_unknown_key(ring: KeyRing) -> None:
    stranger = SigningKey.ed25519("stranger", Ed25519PrivateKey.generate())
    r = rejected(signed(stranger), ring)
    assert (r.reason, r.command_id) == ("unknown_key", "cmd-1")


@pytest.mark.parametrize(
    "changes",
    [
        {"meters": ["000012345678", "m2", "m3"]},  # a meter added after signing
        {"action": "reconnect"},
        {"gateway": "gw-other"},  # changed gateway fails the signature first
        {"expires_at": NOW + 3000},
        {"seq": 2},
        {"id": "cmd-2"},
    ],
)
def test_tampering_breaks_the_ed25519_signature(ops: SigningKey, ring: KeyRing, changes: dict[str, Any]) -> None:
    assert rejected(edit(signed(ops), **changes), ring).reason == "bad_signature"


def test_tampering_breaks_the_hmac_signature(shared: SigningKey, ring: KeyRing) -> None:
    assert rejected(edit(signed(shared), meters=["000012345678"]), ring).reason == "bad_signature"


def test_signature_by_another_key_with_the_same_id(ring: KeyRing) -> None:
    impostor = SigningKey.ed25519("ops", Ed25519PrivateKey.generate())
    assert rejected(signed(impostor), ring).reason == "bad_signature"
    wrong_secret = SigningKey.hmac_sha256("legacy", b"x" * 32)
    assert rejected(signed(wrong_secret), ring).reason == "bad_signature"


def test_algorithm_must_match_the_key(ops: SigningKey, ring: KeyRing) -> None:
    # an HMAC "signature" keyed with something public must never pass as the Ed25519 key
    fake = SigningKey.hmac_sha256("ops", b"y" * 32)
    r = rejected(signed(fake), ring)
    assert r.reason == "bad_signature"
    assert "is ed25519" in r.detail


def test_truncated_signature(ops: SigningKey, ring: KeyRing) -> None:
    payload = signed(ops)
    sig = base64.b64decode(json.loads(payload)["sig"])
    assert rejected(edit(payload, sig=base64.b64encode(sig[:63]).decode()), ring).reason == "bad_signature"


def test_key_roles(ops: SigningKey, supervisor: SigningKey, ring: KeyRing) -> None:
    r = rejected(signed(ops, action="release", meters=[], params=Params(commands=["cmd-0"])), ring)
    assert (r.reason, r.command_id) == ("key_not_allowed", "cmd-1")
    assert "'release' role" in r.detail
    assert rejected(signed(supervisor, action="disconnect"), ring).reason == "key_not_allowed"


def test_wrong_gateway(ops: SigningKey, ring: KeyRing) -> None:
    r = rejected(signed(ops, gateway="gw-0043"), ring)
    assert (r.reason, r.command_id) == ("wrong_gateway", "cmd-1")


def test_validity_too_long(ops: SigningKey, ring: KeyRing) -> None:
    r = rejected(signed(ops, issued_at=NOW, not_before=NOW, expires_at=NOW + DAY + 1), ring)
    assert r.reason == "validity_too_long"
    # measured from issued_at, so a late not_before cannot stretch it
    assert rejected(signed(ops, issued_at=NOW - DAY, not_before=NOW, expires_at=NOW + 10), ring).reason == (
        "validity_too_long"
    )


def test_not_yet_valid(ops: SigningKey, ring: KeyRing) -> None:
    r = rejected(signed(ops, issued_at=NOW, not_before=NOW + 5, expires_at=NOW + 60), ring)
    assert (r.reason, r.command_id) == ("not_yet_valid", "cmd-1")


def test_expired(ops: SigningKey, ring: KeyRing) -> None:
    r = rejected(signed(ops, issued_at=NOW - 300, not_before=NOW - 300, expires_at=NOW - 0.001), ring)
    assert (r.reason, r.command_id) == ("expired", "cmd-1")


def test_rejection_details_hold_no_secrets(shared: SigningKey, ring: KeyRing) -> None:
    r = rejected(edit(signed(shared), meters=["x"]), ring)
    assert HMAC_SECRET.decode() not in str(r)
    assert HMAC_SECRET.decode() not in repr(shared) + repr(ring.get("legacy"))


def test_every_reason_is_covered() -> None:
    """Keeps REJECT_REASONS and the tests above in step."""
    tested = {
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
    }
    assert set(REJECT_REASONS) == tested


def test_keyring_refuses_weak_or_duplicate_keys() -> None:
    with pytest.raises(ValueError, match="at least 32"):
        VerifyKey("k", "hmac-sha256", frozenset({"command"}), secret=b"short")
    with pytest.raises(ValueError, match="32-byte public key"):
        VerifyKey("k", "ed25519", frozenset({"command"}), public_key=b"\x00" * 31)
    key = VerifyKey("k", "ed25519", frozenset({"command"}), public_key=VECTOR_PUBLIC)
    with pytest.raises(ValueError, match="duplicate key id"):
        KeyRing([key, key])


# -- acks -------------------------------------------------------------------------------------------


def test_ack_round_trip_and_terminal_states() -> None:
    ack = Ack(gateway=GW, command="cmd-1", meter="m2", state="verified", at=NOW, seq=7, relay="armed", detail="ok")
    payload = encode_ack(ack)
    assert json.loads(payload) == {
        "v": 1,
        "gateway": GW,
        "command": "cmd-1",
        "meter": "m2",
        "state": "verified",
        "at": NOW,
        "seq": 7,
        "relay": "armed",
        "detail": "ok",
    }
    assert decode_ack(payload) == ack
    assert ack.terminal
    whole = Ack(gateway=GW, command=None, meter=None, state="rejected", at=NOW, seq=1, reason="malformed")
    assert json.loads(encode_ack(whole))["meter"] is None  # null, not omitted: "the whole command"
    assert {"rejected", "meter_refused", "verified", "unverified", "expired"} == TERMINAL_STATES
    assert set(ACK_STATES) > TERMINAL_STATES
    assert not Ack(gateway=GW, command="c", meter=None, state="held", at=NOW, seq=2).terminal


def test_ack_decoding() -> None:
    newer = b'{"v":1,"gateway":"g","command":"c","meter":null,"state":"accepted","at":1.0,"seq":1,"new_field":3}'
    assert decode_ack(newer).state == "accepted"
    for bad in (
        b'{"v":2,"gateway":"g","command":"c","meter":null,"state":"accepted","at":1.0,"seq":1}',
        b'{"v":1,"gateway":"g","command":"c","meter":null,"state":"exploded","at":1.0,"seq":1}',
        b'{"v":1,"gateway":"g","command":"c","meter":null,"state":"accepted","at":1.0,"seq":0}',
        b"nope",
    ):
        with pytest.raises(ContractError):
            decode_ack(bad)
    with pytest.raises(ContractError):
        encode_ack(Ack(gateway=GW, command="c", meter="a/b", state="sent", at=NOW, seq=1))

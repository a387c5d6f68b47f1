"""Malformed MQTT command payloads: every one is refused, counted and acked; none raises, none
reaches a relay, memory stays bounded.

The bulk goes straight into ``CommandService.on_message`` (the uplink's hook, with a real command
store, audit log and simulated meters on a real TCP bus); a few hundred, one 10 MB payload among
them, go through a real mosquitto and the real Uplink. The cases come from a seeded generator
(``cases``): random bytes, invalid UTF-8, 10 MB payloads, deeply nested JSON, wrong types, missing
and extra fields, and byte-level mutations of well-formed envelopes whose signature does not
verify. CI runs ``scale(6_000, 100_000)`` direct cases; METER_GATEWAY_LONG_FAULTS=1 the long run.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from meter_gateway.drivers.backoff import BackoffPolicy
from meter_gateway.gateway.commands.envelope import CommandEnvelope, encode_envelope
from meter_gateway.gateway.commands.service import CommandService
from meter_gateway.gateway.uplink.session import InboundMessage
from tests.faults import scale
from tests.faults.test_commands_faults import counting_bus, operations, publish_many
from tests.plugins.broker import Broker
from tests.test_command_exec import GW, dlt_rig, envelope
from tests.test_command_service import TOPICS, gateway, until

MB10 = 10 * 1024 * 1024
FIELDS = ("v", "id", "gateway", "meters", "action", "issued_at", "not_before", "expires_at", "seq", "key_id", "alg")
WRONG_VALUES: tuple[Any, ...] = (
    None, True, 0, -1, 2**64, 1.5e308, -0.0, "", "x" * 70, "nan", [], [1, 2], {}, {"a": 1}, ["\u0000"], "\udfff",
)  # fmt: skip
JSON_ESCAPE_GARBAGE = (
    b"\\ud800",
    b"\\u0000",
    b"\\uZZZZ",
    b"\\",
    b"\xff\xfe",
    b"\xc3\x28",
    b"\xed\xa0\x80",
    b"\xf4\x90",
)


# msgspec raises UnicodeDecodeError (invalid UTF-8 inside a JSON string) and RecursionError (nesting
# deeper than the recursion limit) besides DecodeError: this file found them escaping
# decode_envelope / peek_command_id; they are refused as malformed now, so nothing is allowed for.


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def base_envelopes(meter: str) -> list[dict[str, Any]]:
    """Well-formed envelopes (as dicts) whose signature does not verify: mutations of them must
    all be refused, and none can turn into a command that runs."""
    t = 1_790_000_000.0  # fixed, so a seed gives the same cases (the signature fails first anyway)
    out = []
    for seq, action in enumerate(("disconnect", "reconnect", "release", "read_now"), 1):
        env = envelope(
            action if action != "release" else "disconnect", [meter], now=t, command_id=f"c-{action}", seq=seq
        )
        raw = msgspec.to_builtins(env)
        raw["sig"] = base64.b64encode(random.Random(action).randbytes(64)).decode()
        if action == "release":
            raw.update(action="release", meters=[], params={"commands": ["cmd-1"]})
        if action == "read_now":
            raw["params"] = {"quantities": ["energy.active.import"]}
        out.append(raw)
    return out


def _mutate(rng: random.Random, data: bytes) -> bytes:
    """``data`` with 1 to 8 random byte edits: overwrite, insert, delete, escape garbage, cut."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(5)
        pos = rng.randrange(len(b) + 1)
        if op == 0 and b:
            b[min(pos, len(b) - 1)] = rng.randrange(256)
        elif op == 1:
            b[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif op == 2:
            del b[pos : pos + rng.randint(1, 16)]
        elif op == 3:
            b[pos:pos] = rng.choice(JSON_ESCAPE_GARBAGE)
        else:
            b = b[:pos]
    return bytes(b)


# Each case maker takes the seeded RNG and a copy of a base envelope it may change in place.
_Maker = Callable[[random.Random, dict[str, Any]], bytes]


def _big_random(rng: random.Random, base: dict[str, Any]) -> bytes:
    return rng.randbytes(MB10)


def _big_string(rng: random.Random, base: dict[str, Any]) -> bytes:
    return json.dumps({**base, "id": "x" * MB10}).encode()


def _big_array(rng: random.Random, base: dict[str, Any]) -> bytes:
    return b"[" + b"1," * (MB10 // 2) + b"1]"


def _random(rng: random.Random, base: dict[str, Any]) -> bytes:
    return rng.randbytes(rng.choice([0, 1, 2, 8, 64, 512, 4096]))


def _invalid_utf8(rng: random.Random, base: dict[str, Any]) -> bytes:
    text = json.dumps(base).encode()
    key = rng.choice([b'"id": "', b'"gateway": "', b'"key_id": "', b'"sig": "', b'"action": "'])
    at = text.find(key)
    garbage = rng.choice(JSON_ESCAPE_GARBAGE[4:]) * rng.randint(1, 3)
    return text[: at + len(key)] + garbage + text[at + len(key) :] if at >= 0 else text + garbage


def _nested(rng: random.Random, base: dict[str, Any]) -> bytes:
    # nesting deeper than the JSON decoder's recursion limit is test_deep_nesting_...'s
    depth = rng.choice([2, 10, 100, 400])
    opener, closer = rng.choice([(b"[", b"]"), (b'{"a":', b"}")])
    inner = opener * depth + b"1" + closer * depth
    where = rng.choice(["alone", "params", "meters", "extra"])
    if where == "alone":
        return inner
    return json.dumps({**base, where: "@@"}).encode().replace(b'"@@"', inner)


def _wrong_type(rng: random.Random, base: dict[str, Any]) -> bytes:
    for field in rng.sample([*FIELDS, "params", "sig"], rng.randint(1, 3)):
        base[field] = rng.choice(WRONG_VALUES)
    return json.dumps(base).encode("utf-8", "surrogatepass")


def _missing(rng: random.Random, base: dict[str, Any]) -> bytes:
    for field in rng.sample(FIELDS, rng.randint(1, len(FIELDS))):
        base.pop(field, None)
    return json.dumps(base).encode()


def _extra(rng: random.Random, base: dict[str, Any]) -> bytes:
    target = base
    if rng.random() < 0.3:
        target = base["params"] = dict(base.get("params") or {})
    for _ in range(rng.randint(1, 3)):
        target[rng.choice(["x", "sig2", "extra", "__proto__", "Id", "meter"])] = rng.choice(WRONG_VALUES[:12])
    return json.dumps(base).encode()


def _mutated(rng: random.Random, base: dict[str, Any]) -> bytes:
    return _mutate(rng, json.dumps(base).encode())


def _not_object(rng: random.Random, base: dict[str, Any]) -> bytes:
    return json.dumps(rng.choice([[base], "id", 1, None, True, [], base["id"]])).encode()


_BIG: dict[str, _Maker] = {"big_random": _big_random, "big_string": _big_string, "big_array": _big_array}
_SMALL: dict[str, _Maker] = {
    "random": _random,
    "invalid_utf8": _invalid_utf8,
    "nested": _nested,
    "wrong_type": _wrong_type,
    "missing": _missing,
    "extra": _extra,
    "mutated": _mutated,
    "not_object": _not_object,
}


def cases(n: int, seed: int, meter: str, *, big: int) -> Iterator[tuple[str, bytes]]:
    """``n`` (kind, payload) malformed command messages, ``big`` of them 10 MB."""
    rng = random.Random(seed)
    bases = base_envelopes(meter)
    big_at = set(rng.sample(range(n), big)) if big else set()
    for i in range(n):
        base = dict(rng.choice(bases))
        makers = _BIG if i in big_at else _SMALL
        kind = rng.choice(list(makers))
        yield kind, makers[kind](rng, base)


async def _service(rig: Any) -> tuple[CommandService, list[int], asyncio.Event, asyncio.Task[None]]:
    published = [0]

    async def publish(topic: str, payload: bytes) -> bool:
        published[0] += 1
        return True

    service = CommandService(
        rig.config, rig.meters, rig.buses, publish, TOPICS.acks, publish_backoff=BackoffPolicy(0.02, 0.1)
    )
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    return service, published, stop, task


async def _run_hook_cases(tmp_path: Path, n: int) -> tuple[Any, int, Any, list[int]]:
    """Feed ``n`` generated cases to a CommandService; (stats, RSS growth, bus handle, acks)."""
    warmup = 2_000
    async with counting_bus(2) as handle, dlt_rig(tmp_path, handle) as rig:
        service, published, stop, task = await _service(rig)
        meter = next(iter(rig.meters))
        kinds: dict[str, int] = {}
        rss_after_warmup = 0
        start = time.monotonic()
        for i, (kind, payload) in enumerate(cases(n, seed=7, meter=meter, big=scale(3, 10))):
            kinds[kind] = kinds.get(kind, 0) + 1
            errors_before = service.stats.internal_errors
            await service.on_message(InboundMessage(TOPICS.commands, payload, False, 1, time.time()))
            assert service.stats.internal_errors == errors_before, f"unhandled on a {kind} payload {payload[:200]!r}"
            if i % 500 == 0:
                await asyncio.sleep(0)  # let the ack publisher run, as the uplink's loop would
            if i + 1 == warmup:
                rss_after_warmup = rss_bytes()
        elapsed = time.monotonic() - start
        await until(lambda: service.stats.acks_pending == 0, within=scale(30, 300), what="every ack published")
        growth = rss_bytes() - rss_after_warmup
        stats = service.stats
        print(
            f"\n{n} malformed payloads in {elapsed:.1f} s ({n / elapsed:.0f}/s), kinds {kinds}, "
            f"rejected {stats.rejected}, acks {published[0]}, RSS growth after warm-up {growth / 1e6:.1f} MB"
        )
        stop.set()
        await asyncio.wait_for(task, 10)
    return stats, growth, handle, published


class ErrorCount(logging.Handler):
    """Counts ERROR records and their exception types without keeping them (pytest's own capture
    would hold every record and its traceback, which would swamp the memory measurement)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.count = 0
        self.types: set[type[BaseException]] = set()

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        if record.exc_info and record.exc_info[1] is not None:
            self.types.add(type(record.exc_info[1]))


@contextlib.contextmanager
def errors_counted(name: str) -> Iterator[ErrorCount]:
    """ERROR records of logger ``name`` counted, not propagated; WARNING and below dropped (one
    WARNING line per refusal is the contract; bugs log ERROR)."""
    logger = logging.getLogger(name)
    handler = ErrorCount()
    saved = logger.propagate, logger.level
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.ERROR)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.propagate, logger.level = saved[0], saved[1]


@pytest.mark.asyncio
@pytest.mark.timeout(scale(120, 1800))
async def test_malformed_payloads_into_the_command_hook_are_all_refused_and_counted(tmp_path: Path) -> None:
    n = scale(6_000, 100_000)
    with errors_counted("gateway.commands.service") as logged:
        stats, growth, handle, published = await _run_hook_cases(tmp_path, n)
    assert stats.received == n
    assert stats.internal_errors == 0
    assert sum(stats.rejected.values()) == n
    assert set(stats.rejected) <= {"malformed", "unsigned", "unknown_key", "bad_signature"}
    assert stats.accepted == 0
    assert operations(handle) == 0
    assert published[0] >= n  # every refused message was answered
    assert logged.count == 0, logged.types
    assert growth < 64 * 1024 * 1024, f"RSS grew {growth / 1e6:.1f} MB"


@pytest.mark.asyncio
async def test_invalid_utf8_and_deep_nesting_are_refused_as_malformed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    payloads = [
        b'{"id": "\xed\xa0\x80"}',  # a UTF-16 surrogate encoded as UTF-8
        b'{"v":1,"id":"cmd-1","gateway":"gw-\xc3\x28"}',
        b'"\xf4\x90"',
        b"\x81" * 8,
        b"[" * 1200 + b"]" * 1200,
        b'{"a":' * 5000 + b"1" + b"}" * 5000,
        b"[" * 60_000,
    ]
    async with counting_bus(1) as handle, dlt_rig(tmp_path, handle) as rig:
        service, _, stop, task = await _service(rig)
        for payload in payloads:
            await service.on_message(InboundMessage(TOPICS.commands, payload, False, 1, time.time()))
        stats = service.stats
        stop.set()
        await asyncio.wait_for(task, 10)
    assert (stats.internal_errors, stats.rejected) == (0, {"malformed": len(payloads)})


@pytest.mark.asyncio
@pytest.mark.timeout(scale(120, 900))
async def test_malformed_payloads_through_mosquitto_are_all_refused(tmp_path: Path, mosquitto: Broker) -> None:
    n = scale(300, 3_000)
    async with counting_bus(2) as handle:
        meter = f"m{handle.meters[0].address_text}"
        payloads = [p for _, p in cases(n - 1, seed=11, meter=meter, big=0)]
        payloads.append(os.urandom(MB10))
        async with gateway(tmp_path, mosquitto, handle) as gw:
            start = time.monotonic()
            await asyncio.to_thread(publish_many, mosquitto, payloads)
            await until(lambda: gw.service.stats.received == n, within=scale(30, 600), what=f"{n} messages")
            elapsed = time.monotonic() - start
            stats = gw.service.stats
            print(f"\n{n} malformed payloads through mosquitto handled in {elapsed:.1f} s: {stats.rejected}")
            assert stats.internal_errors == 0
            assert sum(stats.rejected.values()) == n
            assert gw.uplink.stats.command_errors == 0
            assert stats.accepted == 0
            assert operations(handle) == 0
            # the gateway still takes a genuine command afterwards
            ok = envelope("relay_status", [meter])
            await gw.command(ok)
            await until(lambda: gw.service.stats.accepted == 1, what="a genuine command accepted")


def test_generator_covers_every_kind_and_is_repeatable() -> None:
    a = list(cases(400, seed=3, meter="m000000000001", big=1))
    b = list(cases(400, seed=3, meter="m000000000001", big=1))
    assert a == b
    kinds = {k for k, _ in a}
    assert {"random", "invalid_utf8", "nested", "wrong_type", "missing", "extra", "mutated", "not_object"} <= kinds
    assert any(len(p) >= MB10 for _, p in a)
    for _, p in a:
        with pytest.raises(Exception):  # noqa: B017 - none of them may decode as a valid envelope + signature
            _check_refused(p)


def _check_refused(payload: bytes) -> CommandEnvelope:
    from meter_gateway.gateway.commands.auth import KeyRing, authenticate
    from tests.test_command_exec import OPS

    return authenticate(
        payload, retained=False, gateway_id=GW, keyring=KeyRing([OPS.verify_key()]), now=time.time(), max_validity=1e9
    )


def test_encode_envelope_roundtrip_sanity() -> None:
    """The generator's base envelopes really are envelopes (so mutations start from valid structure)."""
    for raw in base_envelopes("m000000000001"):
        env = msgspec.convert(raw, CommandEnvelope)
        env.check()
        assert encode_envelope(env)

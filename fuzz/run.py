"""The fuzz driver: Hypothesis draws structure-aware base inputs; each is run as is and with a
batch of seeded byte-level mutations; every exception outside the target's documented types is a
crash, counted by signature (type and raising line) with its first reproducer.

    .venv/bin/python -m fuzz dlt645 --runs 1000000
    .venv/bin/python -m fuzz command --runs 200000 --seed 3 --stop-on-crash   # shrink the first crash
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from fuzz.targets import TARGETS, Target

INTERESTING = (0x00, 0x01, 0x16, 0x33, 0x68, 0x7F, 0x80, 0xFE, 0xFF)
JSON_TOKENS = (
    b'"',
    b"\\",
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"null",
    b"1e999",
    b"-0",
    b"\\u0000",
    b"\xff",
    b"\xed\xa0\x80",
)


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One seeded mutant of ``data``: 1-6 of flips, sets, inserts, deletes, duplications,
    interesting bytes, JSON tokens and truncation."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(8)
        pos = rng.randrange(len(b) + 1)
        if op == 0 and b:
            i = min(pos, len(b) - 1)
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            b[min(pos, len(b) - 1)] = rng.randrange(256)
        elif op == 2:
            b[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif op == 3:
            del b[pos : pos + rng.randint(1, 8)]
        elif op == 4 and b:
            start = rng.randrange(len(b))
            b[pos:pos] = b[start : start + rng.randint(1, 32)]
        elif op == 5 and b:
            b[min(pos, len(b) - 1)] = rng.choice(INTERESTING)
        elif op == 6:
            b[pos:pos] = rng.choice(JSON_TOKENS)
        else:
            del b[pos:]
    return bytes(b)


@dataclass
class Crash:
    count: int
    context: Any
    data: bytes
    trace: str


@dataclass
class Fuzzer:
    target: Target
    runs: int
    batch: int
    stop_on_crash: bool
    executions: int = 0
    crashes: dict[str, Crash] = field(default_factory=dict)
    pool: list[tuple[Any, bytes]] = field(default_factory=list)  # base inputs, for topping up

    def execute(self, context: Any, data: bytes, rng: random.Random) -> None:
        self.executions += 1
        try:
            self.target.run(context, data, rng)
        except self.target.allowed:
            pass
        except Exception as exc:  # anything else is what we are looking for
            if self.stop_on_crash:
                raise
            for each in exc.exceptions if isinstance(exc, ExceptionGroup) else (exc,):
                self.record(each, context, data)

    def record(self, exc: BaseException, context: Any, data: bytes) -> None:
        frames = traceback.extract_tb(exc.__traceback__)
        where = f"{frames[-1].filename.rsplit('/', 2)[-1]}:{frames[-1].lineno} ({frames[-1].name})" if frames else ""
        signature = f"{type(exc).__name__} at {where}" if where else f"{type(exc).__name__}: {str(exc)[:80]}"
        crash = self.crashes.get(signature)
        if crash is None:
            self.crashes[signature] = Crash(1, context, data, "".join(traceback.format_exception(exc))[-1500:])
        else:
            crash.count += 1

    def run_batch(self, context: Any, data: bytes, seed: int) -> None:
        rng = random.Random(seed)
        if len(self.pool) < 2000:
            self.pool.append((context, data))
        else:
            self.pool[rng.randrange(len(self.pool))] = (context, data)
        self.execute(context, data, rng)
        for _ in range(self.batch - 1):
            if self.executions >= self.runs:
                return
            self.execute(context, mutate(data, rng), rng)

    def run(self, seed: int) -> None:
        examples = max(1, math.ceil(self.runs / self.batch))
        phases = [Phase.generate, Phase.shrink] if self.stop_on_crash else [Phase.generate]

        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            phases=phases,
            suppress_health_check=list(HealthCheck),
        )
        @given(self.target.base, st.integers(0, 2**32 - 1))
        def one(base: tuple[Any, bytes], batch_seed: int) -> None:
            if self.executions < self.runs:
                self.run_batch(base[0], base[1], batch_seed)

        hypothesis_seed(seed)(one)()
        rng = random.Random(seed)
        while self.executions < self.runs and self.pool:  # Hypothesis may stop early: top up
            context, data = rng.choice(self.pool)
            self.run_batch(context, data, rng.getrandbits(32))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("target", choices=sorted(TARGETS))
    parser.add_argument("--runs", type=int, default=100_000, help="executions (default 100000)")
    parser.add_argument("--batch", type=int, default=200, help="executions per Hypothesis example (default 200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop-on-crash", action="store_true", help="raise the first crash (Hypothesis shrinks it)")
    args = parser.parse_args(argv)
    logging.disable(logging.CRITICAL)  # the targets log refusals; a million lines help nobody
    target = TARGETS[args.target]()
    fuzzer = Fuzzer(target, args.runs, max(1, args.batch), args.stop_on_crash)
    print(f"fuzz {target.name}: {target.description}")
    print(f"allowed to escape: {', '.join(t.__name__ for t in target.allowed)}")
    started = time.monotonic()
    fuzzer.run(args.seed)
    elapsed = time.monotonic() - started
    crashes = sum(c.count for c in fuzzer.crashes.values())
    print(
        f"{fuzzer.executions} executions in {elapsed:.1f} s ({fuzzer.executions / elapsed:.0f}/s), "
        f"{crashes} crashes, {len(fuzzer.crashes)} distinct"
        + (" (an execution can crash in more than one entry point)" if crashes else "")
    )
    for signature, crash in sorted(fuzzer.crashes.items(), key=lambda kv: -kv[1].count):
        print(f"\nCRASH x{crash.count}: {signature}\n  context {crash.context!r}\n  input {crash.data[:300]!r}")
        print("  " + crash.trace.strip().replace("\n", "\n  "))
    return 1 if crashes else 0

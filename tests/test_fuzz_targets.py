"""Every ``python -m fuzz`` target runs a few thousand executions in the suite with nothing escaping
but its documented errors (the long runs are in docs/reliability.md), and the driver reports what
does escape."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import strategies as st

from fuzz.run import Fuzzer, mutate
from fuzz.targets import TARGETS, InvariantBroken, Target

RUNS = 3000


def _crash_report(fuzzer: Fuzzer) -> str:
    return "\n".join(
        f"{sig}: context {c.context!r} input {c.data[:200]!r}\n{c.trace}" for sig, c in fuzzer.crashes.items()
    )


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_target_runs_clean(name: str) -> None:
    fuzzer = Fuzzer(TARGETS[name](), RUNS, batch=200, stop_on_crash=False)
    fuzzer.run(seed=1)
    assert fuzzer.executions == RUNS
    assert not fuzzer.crashes, _crash_report(fuzzer)
    assert len(fuzzer.pool) >= RUNS // 200  # every base input was drawn and run


def _faulty(data: bytes) -> None:
    if data.startswith(b"\x68"):
        raise KeyError("a parser bug")
    if len(data) > 8:
        raise InvariantBroken("an invariant")
    raise ValueError("documented")


def test_the_driver_reports_what_escapes_by_signature() -> None:
    base: st.SearchStrategy[tuple[Any, bytes]] = st.tuples(st.none(), st.binary(min_size=1, max_size=16))
    target = Target("faulty", "test", base, lambda context, data, rng: _faulty(data), (ValueError,))
    fuzzer = Fuzzer(target, 2000, batch=50, stop_on_crash=False)
    fuzzer.run(seed=3)
    kinds = {sig.split(" ")[0] for sig in fuzzer.crashes}
    assert kinds == {"KeyError", "InvariantBroken"}
    assert all(c.count >= 1 and c.data for c in fuzzer.crashes.values())


def test_mutations_are_seeded() -> None:
    data = bytes(range(40))
    assert mutate(data, random.Random(5)) == mutate(data, random.Random(5))
    assert {mutate(data, random.Random(s)) for s in range(50)} != {data}

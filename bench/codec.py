"""DL/T 645 codec throughput on one core: frames deframed/decoded and encoded per second.

The input is the 20-byte forward-active-energy reply with 4 FE wake-up bytes (24 bytes), fed to
the streaming deframer one frame per ``feed`` call, as a bus read delivers it. Three figures:
deframe only (bytes -> Frame), full decode (Frame -> ReadReply -> catalogue value), and encode
(ReadRequest -> bytes). Each is the median of ``--runs`` runs of ``--seconds`` each.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

from meter_gateway.protocols.dlt645.catalogue import default_catalogue
from meter_gateway.protocols.dlt645.deframer import Deframer
from meter_gateway.protocols.dlt645.edition import Edition
from meter_gateway.protocols.dlt645.frame import Address, Frame
from meter_gateway.protocols.dlt645.messages import ReadReply, ReadRequest, parse_message

FRAME = bytes.fromhex("FE FE FE FE 68 61 01 00 00 00 00 68 91 08 33 33 34 33 59 33 33 33 8A 16")
E7 = Edition.DLT645_2007


def _rate(step: Callable[[int], None], seconds: float) -> float:
    batch = 2000
    done = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        step(batch)
        done += batch
    return done / elapsed


_DEFRAMER = Deframer()


def deframe(n: int) -> None:
    feed = _DEFRAMER.feed
    for _ in range(n):
        feed(FRAME)


def decode(n: int) -> None:
    catalogue = default_catalogue()
    feed = _DEFRAMER.feed
    for _ in range(n):
        for frame in feed(FRAME):
            if isinstance(frame, Frame):
                reply = parse_message(frame, E7)
                assert isinstance(reply, ReadReply)
                catalogue.decode(E7, reply.di, reply.value)


REQUEST = ReadRequest(Address.parse("000000000161"), 0x00010000)


def encode(n: int) -> None:
    for _ in range(n):
        REQUEST.encode(E7, 4)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench codec", description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core
    assert decode_check()
    print(f"Python {platform.python_version()} on {platform.machine()}, {args.runs} runs x {args.seconds}s, 1 core")
    for name, step in (("deframe", deframe), ("decode", decode), ("encode", encode)):
        rates = [_rate(step, args.seconds) for _ in range(args.runs)]
        print(f"{name:8} median {statistics.median(rates):>10,.0f}/s  (min {min(rates):,.0f}, max {max(rates):,.0f})")
    return 0


def decode_check() -> bool:
    [frame] = Deframer().feed(FRAME)
    assert isinstance(frame, Frame)
    reply = parse_message(frame, E7)
    assert isinstance(reply, ReadReply)
    return default_catalogue().decode(E7, reply.di, reply.value)[0].value == 0.26
